#!/usr/bin/env bash
# Benchmark: agent resident memory after idling with the example config, next
# to prometheus-node-exporter measured the same way in the same run; and the
# stripped release binary sizes.
#
#   tests/bench-idle.sh [IDLE_SECONDS]     (default 60)
#
# Prints Markdown rows for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-60}

if ! command -v prometheus-node-exporter >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-node-exporter curl >/dev/null
fi
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=target/release

work=$(mktemp -d /tmp/outpost-bench-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin/outpost-hub" init --data-dir "$work/hub" >/dev/null
cat > "$work/hub.toml" <<CFG
data_dir = "$work/hub"
[quic]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
CFG
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & pids+=($!)
for _ in $(seq 100); do [ -s "$work/hub/http.addr" ] && break; sleep 0.1; done
token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 10m)
"$bin/outpost-agent" enroll --token "$token" --data-dir "$work/agent" --name bench >/dev/null
# The example config, pointed at the scratch data dir.
sed "s|^data_dir = .*|data_dir = \"$work/agent\"|" configs/agent.toml > "$work/agent.toml"
"$bin/outpost-agent" run --config "$work/agent.toml" 2>"$work/agent.log" & agent=$!; pids+=($agent)
# Two node_exporters: one left alone, one scraped every 10 s (what Prometheus
# would do; the agent samples every 10 s with the example config).
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2>"$work/ne.log" & ne=$!; pids+=($ne)
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2>"$work/ne2.log" & ne2=$!; pids+=($ne2)
port=""
for _ in $(seq 100); do
    port=$(grep -o 'address=127.0.0.1:[0-9]*' "$work/ne2.log" | head -1 | cut -d: -f2) && [ -n "$port" ] && break
    sleep 0.1
done
end=$((SECONDS + idle))
while [ $SECONDS -lt "$end" ]; do
    curl -s "http://127.0.0.1:$port/metrics" >/dev/null || true
    sleep 10
done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
threads() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
grep -q "Connected to the hub" "$work/agent.log" || { echo "agent never connected" >&2; exit 1; }

echo "| process | RSS after ${idle}s idle | peak RSS (VmHWM) | threads |"
echo "|---|---|---|---|"
echo "| outpost-agent (configs/agent.toml, connected to a hub) | $(kib_to_mib "$(rss $agent)") MiB | $(kib_to_mib "$(hwm $agent)") MiB | $(threads $agent) |"
version=$(prometheus-node-exporter --version 2>&1 | awk 'NR==1 {print $3}')
echo "| prometheus-node-exporter $version (defaults, not scraped) | $(kib_to_mib "$(rss $ne)") MiB | $(kib_to_mib "$(hwm $ne)") MiB | $(threads $ne) |"
echo "| prometheus-node-exporter $version (defaults, scraped every 10 s) | $(kib_to_mib "$(rss $ne2)") MiB | $(kib_to_mib "$(hwm $ne2)") MiB | $(threads $ne2) |"
echo
echo "| binary | stripped size |"
echo "|---|---|"
for b in outpost-agent outpost-hub outpostctl; do
    cp "$bin/$b" "$work/$b.stripped" && strip "$work/$b.stripped"
    echo "| $b | $(awk -v s="$(stat -c %s "$work/$b.stripped")" 'BEGIN { printf "%.2f MiB", s / 1048576 }') |"
done
