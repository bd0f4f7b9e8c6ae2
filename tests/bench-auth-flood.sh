#!/usr/bin/env bash
# A wrong bearer token at full speed from one address (wrk, 8 connections,
# 2 threads, from 127.0.0.1) against a sled hub for D seconds, while an
# honest client reads with the admin token once a second from another
# address (127.0.0.2). Reports what the flood got
# (answers by status), the hub's data dir growth, its resident memory
# before, after and at peak, the audit rows written, and the honest
# client's latency during the flood.
#
#   tests/bench-auth-flood.sh [D]          (default 60)
#   BIN_DIR=/path/to/binaries              (default: a release build of HEAD)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-60}
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
if [ -z "${BIN_DIR:-}" ]; then
    cargo build --locked --release -p outpost-hub >/dev/null 2>&1
    bin=$PWD/target/release
else
    bin=$BIN_DIR
fi
work=$(mktemp -d /tmp/outpost-bench-XXXXXX)
hub=
. tests/bench-common.sh
cleanup() { [ -n "$hub" ] && kill "$hub" 2>/dev/null; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM

echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%FT%TZ); hub $bin ($(git rev-parse --short HEAD))"
init_hub
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & hub=$!
until [ -s "$work/hub/http.addr" ]; do sleep 0.05; done
api="http://$(cat "$work/hub/http.addr")"
rss() { awk '/^VmRSS/ {print int($2/1024)}' /proc/$hub/status; }
size() { du -sm "$work/hub" | cut -f1; }
sleep 2
echo "before: data dir $(size) MiB, RSS $(rss) MiB"

cat >"$work/count.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init() codes = {} end
function response(status) codes[status] = (codes[status] or 0) + 1 end
function done()
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("codes")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do io.write(string.format("answers %d: %d\n", code, n)) end
end
LUA
wrk -t2 -c8 -d"${D}s" -s "$work/count.lua" -H "Authorization: Bearer tok-wrong-wrong-wrong" \
    "$api/api/v1/devices" >"$work/wrk.out" 2>&1 & flood=$!
honest=()
for _ in $(seq 1 "$D"); do
    honest+=("$(curl -s --interface 127.0.0.2 -o /dev/null -w '%{http_code} %{time_total}' -H "Authorization: Bearer $admin" "$api/api/v1/overview")")
    sleep 1
done
wait $flood
grep -E "Requests/sec|answers" "$work/wrk.out"
echo "after ${D} s: data dir $(size) MiB, RSS $(rss) MiB, peak RSS $(awk '/^VmHWM/ {print int($2/1024)}' /proc/$hub/status) MiB"
printf '%s\n' "${honest[@]}" | sort -k2 -n | awk '{ t[NR] = $2; if ($1 != 200) bad++ } END {
    printf "honest client: %d requests, %d not 200, median %.1f ms, max %.1f ms\n", NR, bad, t[int((NR + 1) / 2)] * 1000, t[NR] * 1000 }'
rows=$(curl -s --interface 127.0.0.2 -H "Authorization: Bearer $admin" "$api/api/v1/audit?limit=1000" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["entries"]))')
echo "audit rows (first 1000 read): $rows"
