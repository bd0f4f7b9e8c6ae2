#!/usr/bin/env bash
# Benchmarks of the console and the fleet views at scale, release binaries:
#  1. server time per request at N devices (default 10 000, written through
#     the store by outpost-fleetgen: enrolled, labelled, two batches each)
#     for a device page of the API, a label filter, the overview, and the
#     console's overview, device list (filtered too) and a device page;
#     median and 95th percentile of R requests, measured by curl;
#  2. page weight: bytes a real browser (Chromium) transfers for the
#     console's overview, first visit and again with its cache;
#  3. hub memory (RSS) with S open live streams of the device list (what
#     S browsers each keep open on the devices page, 50 rows each).
#
#   tests/bench-console.sh [N] [R] [S]      (defaults 10000 30 50)
#   BACKENDS="sled postgres" (default: both, in one run)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; R=${2:-30}; S=${3:-50}
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=$PWD/target/release
top=$(mktemp -d /tmp/outpost-bench-XXXXXX)
pids=()
. tests/bench-common.sh
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$top"; }
trap cleanup EXIT
trap "exit 130" INT TERM
[ -d tests/browser/node_modules/playwright-core ] || npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error

echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%FT%TZ); $(git rev-parse --short HEAD)"

for backend in ${BACKENDS:-sled postgres}; do
    work=$top/$backend; mkdir -p "$work"
    pg_url=
    [ "$backend" = postgres ] && start_pg
    init_hub
    t0=$(date +%s%3N)
    if [ "$backend" = postgres ]; then
        "$bin/outpost-fleetgen" --data-dir "$work/hub" --postgres "$pg_url" --devices "$N" 2>"$work/gen.log"
    else
        "$bin/outpost-fleetgen" --data-dir "$work/hub" --devices "$N" 2>"$work/gen.log"
    fi
    echo
    echo "## $backend: $N devices (written in $(( ($(date +%s%3N) - t0) / 1000 )) s)"
    "$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & hub=$!; pids+=($hub)
    until [ -s "$work/hub/http.addr" ]; do sleep 0.05; done
    api="http://$(cat "$work/hub/http.addr")"
    link=$(curl -s -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
        -d '{"role":"admin","expires_in":"1h"}' "$api/api/v1/console/links" | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"].split("link=")[1])')
    curl -s -o /dev/null -c "$work/jar" -d "link=$link" "$api/console/sign-in"
    # The first fleet read loads the hub's fleet index (every device's row
    # in memory): its time and what it adds to the hub's memory.
    rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$hub/status"; }
    before=$(rss); t0=$(date +%s%3N)
    one=$(curl -s -H "Authorization: Bearer $admin" "$api/api/v1/devices?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
    echo "fleet index loaded by the first read: $(( $(date +%s%3N) - t0 )) ms; hub RSS $before -> $(rss) MiB"
    echo
    echo "| request ($R each) | median | p95 | bytes |"
    echo "|---|---|---|---|"
    timed "API: GET /devices?limit=100 (first page)" "$api/api/v1/devices?limit=100" -H "Authorization: Bearer $admin"
    timed "API: GET /devices?selector=env=dev,site=site-07&limit=100 (250 match)" "$api/api/v1/devices?selector=env%3Ddev,site%3Dsite-07&limit=100" -H "Authorization: Bearer $admin"
    timed "API: GET /devices?status=alarmed&sort=last_seen" "$api/api/v1/devices?status=alarmed&sort=last_seen&limit=100" -H "Authorization: Bearer $admin"
    timed "API: GET /overview" "$api/api/v1/overview" -H "Authorization: Bearer $admin"
    timed "API: GET /devices/{id}" "$api/api/v1/devices/$one" -H "Authorization: Bearer $admin"
    timed "console: overview" "$api/console/" -b "$work/jar"
    timed "console: devices (50 rows)" "$api/console/devices" -b "$work/jar"
    timed "console: devices?selector=env=prod" "$api/console/devices?selector=env%3Dprod" -b "$work/jar"
    timed "console: device page" "$api/console/devices/$one" -b "$work/jar"
    timed "console: device chart data (1h)" "$api/console/devices/$one/series?window=1h" -b "$work/jar"
    timed "console: commands waiting for their devices" "$api/console/commands" -b "$work/jar"
    timed "console: audit log (100 entries)" "$api/console/audit" -b "$work/jar"

    if [ "$backend" = postgres ]; then
        # The peer: the database's own time for the one read every fleet
        # view makes (all devices with their sessions), as psql sees it.
        for _ in $(seq 1 "$R"); do
            psql_pg -c '\timing on' -c "SELECT d.id, d.name, d.enrolled_at, d.cert_fingerprint, d.agent_version, d.last_seen,
                d.last_addr, d.last_sample, d.labels, d.digest, d.high_water, s.hub, s.epoch, s.transport, s.seen
                FROM devices d LEFT JOIN sessions s ON s.device = d.id ORDER BY d.id" | awk '/^Time:/ {print $2}'
        done | sort -n | awk -v r="$R" '{ t[NR] = $1 } END {
            printf "| peer: psql, the same SELECT of all %s rows | %.1f ms | %.1f ms | |\n", "'"$N"'", t[int((r + 1) / 2)], t[int(r * 0.95 + 0.999)] }'
    fi

    if [ "$backend" = sled ]; then
        echo
        echo "### page weight in Chromium (overview)"
        link=$(curl -s -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
            -d '{"role":"admin","expires_in":"1h"}' "$api/api/v1/console/links" | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
        HUB=$api LINK="$api$link" node tests/browser/weight.mjs
    fi

    echo
    echo "### hub memory with $S live device-list streams (50 rows each)"
    ids=$(curl -s -H "Authorization: Bearer $admin" "$api/api/v1/devices?limit=50" | python3 -c 'import json,sys; print(",".join(d["id"] for d in json.load(sys.stdin)))')
    rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$hub/status"; }
    before=$(rss)
    streams=()
    for _ in $(seq 1 "$S"); do
        curl -s -N -b "$work/jar" "$api/console/devices/stream?ids=$ids" >/dev/null & streams+=($!); pids+=($!)
    done
    sleep 20
    during=$(rss)
    cpu=$(awk '{print $14 + $15}' "/proc/$hub/stat"); sleep 10; cpu=$(( $(awk '{print $14 + $15}' "/proc/$hub/stat") - cpu ))
    for p in "${streams[@]}"; do kill "$p" 2>/dev/null || true; done
    echo "| hub RSS idle | with $S streams (after 20 s) | hub CPU with $S streams |"
    echo "|---|---|---|"
    echo "| $before MiB | $during MiB | $(( cpu * 10 / $(getconf CLK_TCK) ))% of one core (over 10 s) |"
    kill "$hub"; wait "$hub" 2>/dev/null || true
    stop_pg
done
