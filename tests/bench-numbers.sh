#!/usr/bin/env bash
# What the fleet's MQTT replay window costs per message (issue 23): numbers
# taken a second by Store::take_up_number and the wait of one take, with T
# device tasks at once, on sled and on PostgreSQL (a private cluster with
# default, durable settings on a unix socket, as the other benchmarks use).
#
#   tests/bench-numbers.sh [T...] [SECONDS]     (defaults: 1 16 256, 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-10}
TASKS=("$@"); [ ${#TASKS[@]} -gt 0 ] || TASKS=(1 16 256)
work=$(mktemp -d /tmp/outpost-bench-numbers-XXXXXX)
pids=()
. tests/bench-common.sh
cleanup() { stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM
cargo bench --locked -p outpost-hub --bench up_numbers --no-run >/dev/null 2>&1
echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%FT%TZ); $(git rev-parse --short HEAD)"
start_pg
echo
echo "| store | device tasks | numbers taken a second | wait p50 | wait p99 | wait max |"
echo "|---|---|---|---|---|---|"
for t in "${TASKS[@]}"; do
    cargo bench --locked -q -p outpost-hub --bench up_numbers -- sled "$t" "$SECONDS_EACH" 2>/dev/null
    cargo bench --locked -q -p outpost-hub --bench up_numbers -- postgres "$pg_url" "$t" "$SECONDS_EACH" 2>/dev/null
done
