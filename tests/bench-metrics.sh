#!/usr/bin/env bash
# Cost of a Prometheus scrape of the hub at N devices (default 10 000,
# written through the store by outpost-fleetgen), release binaries, sled:
# time and bytes of GET /metrics over R requests (median, p95), beside a
# scrape of Debian's prometheus-node-exporter on the same machine in the
# same run, and the hub's own overview call (the store read a scrape makes).
# Then the alert evaluation at that size: one offline rule (threshold 1s:
# none of fleetgen's devices is connected, so every one fires: 10 000
# alerts, the worst case), evaluated every second, told to a local receiver
# that answers 200;
# the hub's own histogram of the rounds gives their count and mean, and the
# first round (every alert new) is read from the log's timestamps. Last, a
# quiet fleet (measured first): six rules of six kinds that hold for none
# of the devices (the usual case), whose rounds build no view at all.
#
#   tests/bench-metrics.sh [N] [R]      (defaults 10000 30)
#   HUB=/path/to/outpost-hub tests/bench-metrics.sh ...   (another hub build)
#   QUIET_ONLY=1 tests/bench-metrics.sh 100000 10         (stop after the quiet
#     rounds: at 100,000 devices all firing, 30 rounds take over ten minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; R=${2:-30}
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=$PWD/target/release
hub_bin=${HUB:-$bin/outpost-hub}
top=$(mktemp -d /tmp/outpost-bench-XXXXXX)
work=$top
pids=()
. tests/bench-common.sh
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$top"; }
trap cleanup EXIT
trap "exit 130" INT TERM

echo "# hub: $hub_bin"
echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%FT%TZ); $(git rev-parse --short HEAD)"

init_hub
# A receiver that takes every POST (Python's http.server).
python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()' >"$work/receiver.port" & pids+=($!)
until [ -s "$work/receiver.port" ]; do sleep 0.05; done
"$bin/outpost-fleetgen" --data-dir "$work/hub" --devices "$N" 2>"$work/gen.log"
# serve_hub CONFIG LOG: starts the hub and waits (at most 30 s) for its API.
serve_hub() {
    rm -f "$work/hub/http.addr"
    "$hub_bin" serve --config "$1" 2>"$2" & hub=$!; pids+=($hub)
    for _ in $(seq 600); do [ -s "$work/hub/http.addr" ] && break; sleep 0.05; done
    [ -s "$work/hub/http.addr" ] || { echo "the hub did not start: $(tail -5 "$2")" >&2; exit 1; }
    api="http://$(cat "$work/hub/http.addr")"
}
serve_hub "$work/hub.toml" "$work/hub.log"
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2>"$work/ne.log" & ne=$!; pids+=($ne)
ne_port=$(port_in_log "$work/ne.log" address)
# Some traffic first, so the HTTP and store series exist.
for _ in $(seq 1 20); do curl -s -o /dev/null -H "Authorization: Bearer $admin" "$api/api/v1/devices?limit=10"; done
curl -s "$api/metrics" | promtool check metrics
echo
echo "## $N devices, sled; $(curl -s "$api/metrics" | grep -vc '^#') samples in the hub's /metrics"
echo
echo "| request ($R each) | median | p95 | bytes |"
echo "|---|---|---|---|"
timed "hub: GET /metrics (loopback, no token)" "$api/metrics"
timed "hub: GET /api/v1/overview (the store read a scrape makes)" "$api/api/v1/overview" -H "Authorization: Bearer $admin"
timed "peer: prometheus-node-exporter $(prometheus-node-exporter --version 2>&1 | awk 'NR==1 {print $3}'): GET /metrics" "http://127.0.0.1:$ne_port/metrics"

# Rounds every second, told to the local receiver.
alerts_config() {
    cat <<CFG
[alerts]
evaluate_every = "1s"
group_wait = "0s"
group_interval = "1s"
[[alerts.receiver]]
name = "bench"
url = "http://127.0.0.1:$(head -1 "$work/receiver.port")/hook"
CFG
}
metric() { curl -s "$api/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# rounds WHAT: waits for 30 alert rounds, prints their count and mean.
rounds() {
    until [ "$(metric outpost_hub_alert_evaluation_duration_seconds_count | cut -d. -f1)" -ge 30 ] 2>/dev/null; do sleep 1; done
    count=$(metric outpost_hub_alert_evaluation_duration_seconds_count)
    sum=$(metric outpost_hub_alert_evaluation_duration_seconds_sum)
    firing=$(metric 'outpost_hub_alerts{state="firing"}')
    sent=$(metric 'outpost_hub_alert_notifications_total{receiver="bench",result="sent"}')
    echo "| alert evaluation, $N devices, $1 | rounds | mean round | alerts firing | notifications sent |"
    echo "|---|---|---|---|---|"
    awk -v c="$count" -v s="$sum" -v f="${firing:-0}" -v n="${sent:-0}" 'BEGIN { printf "| sled | %d | %.1f ms | %d | %d |\n", c, s / c * 1000, f, n }'
}
# A quiet fleet: rules of six kinds, none of which holds for any device.
kill "$hub"; wait "$hub" 2>/dev/null || true
cp "$work/hub.toml" "$work/quiet.toml"
alerts_config >>"$work/quiet.toml"
for rule in "offline 30d" "behind 30d" "disk_above 95" "job_failing 3" "backup_overdue" "certificate_expired"; do
    set -- $rule
    printf '[[alerts.rule]]\nname = "quiet-%s"\ncondition = "%s"\n%s\n' "$1" "$1" "${2:+threshold = \"$2\"}" >>"$work/quiet.toml"
done
serve_hub "$work/quiet.toml" "$work/hub-quiet.log"
echo
rounds "six quiet rules (offline 30d, behind 30d, disk above 95 %, a job failing 3 runs, a backup overdue, an expired certificate)"
echo
echo "hub RSS after the rounds: $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' /proc/$hub/status)"
[ -z "${QUIET_ONLY:-}" ] || exit 0

# The same hub again, with the alert rule that fires for every device.
kill "$hub"; wait "$hub" 2>/dev/null || true
alerts_config >>"$work/hub.toml"
cat >>"$work/hub.toml" <<CFG
[[alerts.rule]]
name = "DeviceOffline"
condition = "offline"
threshold = "1s"
CFG
serve_hub "$work/hub.toml" "$work/hub.log"
echo
rounds "one offline rule"
echo
echo "hub RSS after the rounds: $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' /proc/$hub/status)"
echo
echo "| request ($R each) | median | p95 | bytes |"
echo "|---|---|---|---|"
timed "hub: GET /metrics with the alerts running" "$api/metrics"

