#!/usr/bin/env bash
# Benchmark: an idle agent's resident memory and wake-ups (context switches
# of all its threads per second) with the example config, connected to a hub,
# next to prometheus-node-exporter and cron measured the same way in the same
# run; and the stripped release binary sizes.
#
#   tests/bench-idle.sh [IDLE_SECONDS]     (default 60)
#
# Prints Markdown rows for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-60}

if ! command -v prometheus-node-exporter >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1 || ! [ -x /usr/sbin/cron ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-node-exporter curl cron >/dev/null
fi
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=target/release

work=$(mktemp -d /tmp/outpost-bench-XXXXXX)
pids=()
. tests/bench-common.sh
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
# A second agent with [metrics] on, scraped every 10 s like the second
# node_exporter.
token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 10m)
"$bin/outpost-agent" enroll --token "$token" --data-dir "$work/agent2" --name bench-metrics >/dev/null
{ sed -e "s|^data_dir = .*|data_dir = \"$work/agent2\"|" -e "s|^# \[metrics\]|[metrics]|" \
      -e "s|^# listen = \"127.0.0.1:9465\"|listen = \"127.0.0.1:0\"|" configs/agent.toml; } > "$work/agent2.toml"
grep -q '^\[metrics\]' "$work/agent2.toml" || { echo "configs/agent.toml has no [metrics] block to turn on" >&2; exit 1; }
"$bin/outpost-agent" run --config "$work/agent2.toml" 2>"$work/agent2.log" & agent2=$!; pids+=($agent2)
# Two node_exporters: one left alone, one scraped every 10 s (what Prometheus
# would do; the agent samples every 10 s with the example config).
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2>"$work/ne.log" & ne=$!; pids+=($ne)
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2>"$work/ne2.log" & ne2=$!; pids+=($ne2)
port=$(port_in_log "$work/ne2.log" address)
aport=$(port_in_log "$work/agent2.log" listen)
# cron in the foreground, with the system's crontabs (it wakes once a minute).
/usr/sbin/cron -f 2>"$work/cron.log" & cron=$!; pids+=($cron)
sleep 5
# Context switches (voluntary and not) of every thread of a process: each is
# a wake-up of some thread.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }
per_thread() { for t in /proc/"$1"/task/*; do echo "${t##*/} $(tr ' ' _ < "$t/comm") $(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")"; done | sort; }
declare -A before
for p in $agent $agent2 $ne $ne2 $cron; do before[$p]=$(switches "$p"); done
per_thread "$agent" > "$work/threads.before"
started=$SECONDS
end=$((SECONDS + idle))
while [ $SECONDS -lt "$end" ]; do
    curl -s "http://127.0.0.1:$port/metrics" >/dev/null || true
    curl -s "http://127.0.0.1:$aport/metrics" >/dev/null || true
    sleep 10
done
took=$((SECONDS - started))
per_thread "$agent" > "$work/threads.after"
wakes() { awk -v a="${before[$1]}" -v b="$(switches "$1")" -v t="$took" 'BEGIN { printf "%.1f", (b - a) / t }'; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
threads() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
grep -q "Connected to the hub" "$work/agent.log" || { echo "agent never connected" >&2; exit 1; }

echo "| process | RSS after ${idle}s idle | peak RSS (VmHWM) | threads | wake-ups/s over ${took}s |"
echo "|---|---|---|---|---|"
echo "| outpost-agent (configs/agent.toml, connected to a hub) | $(kib_to_mib "$(rss $agent)") MiB | $(kib_to_mib "$(hwm $agent)") MiB | $(threads $agent) | $(wakes $agent) |"
echo "| outpost-agent, [metrics] on, scraped every 10 s | $(kib_to_mib "$(rss $agent2)") MiB | $(kib_to_mib "$(hwm $agent2)") MiB | $(threads $agent2) | $(wakes $agent2) |"
version=$(prometheus-node-exporter --version 2>&1 | awk 'NR==1 {print $3}')
echo "| prometheus-node-exporter $version (defaults, not scraped) | $(kib_to_mib "$(rss $ne)") MiB | $(kib_to_mib "$(hwm $ne)") MiB | $(threads $ne) | $(wakes $ne) |"
echo "| prometheus-node-exporter $version (defaults, scraped every 10 s) | $(kib_to_mib "$(rss $ne2)") MiB | $(kib_to_mib "$(hwm $ne2)") MiB | $(threads $ne2) | $(wakes $ne2) |"
echo "| cron (Debian, system crontabs) | $(kib_to_mib "$(rss $cron)") MiB | $(kib_to_mib "$(hwm $cron)") MiB | $(threads $cron) | $(wakes $cron) |"
echo
echo "Agent wake-ups/s by thread name:"
join "$work/threads.before" "$work/threads.after" \
    | awk -v t="$took" '{ w[$2] += ($5 - $3) / t; n[$2]++ } END { for (k in w) printf "- %s (%d): %.2f\n", k, n[k], w[k] }' | sort
echo
echo
echo "| binary | stripped size |"
echo "|---|---|"
for b in outpost-agent outpost-hub outpostctl; do
    cp "$bin/$b" "$work/$b.stripped" && strip "$work/$b.stripped"
    echo "| $b | $(awk -v s="$(stat -c %s "$work/$b.stripped")" 'BEGIN { printf "%.2f MiB", s / 1048576 }') |"
done
