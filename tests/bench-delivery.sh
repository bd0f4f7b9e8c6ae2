#!/usr/bin/env bash
# Benchmarks of offline-first delivery, with release binaries:
#  1. drain: one agent's backlog of N telemetry records (produced while the hub
#     was down) delivered after the hub appears: time from the hub serving to
#     the hub holding all N durably;
#  2. ingest: A agents with R records each, all pushing at once when the hub
#     appears: records stored durably per second.
#
#   tests/bench-delivery.sh [N] [A] [R]     (defaults 1000000 100 10000)
#   BACKENDS="sled postgres" (default: both, in this order, in one run)
#   BIN=DIR: use the binaries in DIR instead of building target/release
#   PERF=DIR: profile the hub in each phase with `perf record -g` into
#             DIR/<backend>-<phase>.data (perf attaches after the hub serves)
#
# The backlogs are made by outpost-loadgen (the real agent with a synthetic
# producer of real-sized samples) while no hub runs. For PostgreSQL, a private
# cluster with default (durable) settings on a unix socket; its own ceiling
# is measured beside it with pgbench, inserting rows of the same size in
# transactions of 2 000 rows (the agent's batch), and pg_stat_statements
# counts the statements the hub ran per 1 000 records.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}; A=${2:-100}; R=${3:-10000}
# BIN=DIR: binaries built elsewhere (a build with symbols, for PERF).
[ -n "${BIN:-}" ] || cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=${BIN:-$PWD/target/release}
top=$(mktemp -d /tmp/outpost-bench-XXXXXX)
work=$top
pids=()
. tests/bench-common.sh
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$top"; }
trap cleanup EXIT
trap "exit 130" INT TERM
now_ms() { date +%s%3N; }
base=$(( $(now_ms) - 86400000 ))

for backend in ${BACKENDS:-sled postgres}; do
work=$top/$backend; mkdir -p "$work"; pg_url=
echo "# backend: $backend"
[ "$backend" = postgres ] && start_pg
init_hub
token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 1h --uses $((A + 1)) --hub-addr "127.0.0.1:$port")

agent_config() { # name
    cat > "$work/$1.toml" <<CFG
data_dir = "$work/$1"
name = "$1"
log = "warn"
[uplink]
backoff_initial = "100ms"
backoff_max = "500ms"
[store]
outbox_budget = "2 GiB"
[peers]
# Many agents on one host: LAN peers would only find each other.
enabled = false
CFG
}
enroll() { "$bin/outpost-agent" enroll --token "$token" --data-dir "$work/$1" --name "$1" >/dev/null; agent_config "$1"; }
# The enrollment needs the hub once.
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & hub=$!
for _ in $(seq 100); do [ -s "$work/hub/http.addr" ] && break; sleep 0.1; done
enroll drain
for i in $(seq 1 "$A"); do enroll "a$i"; done
kill "$hub"; wait "$hub" 2>/dev/null || true

produce() { # name records
    RUST_LOG=warn,outpost_loadgen=info "$bin/outpost-loadgen" --config "$work/$1.toml" --records "$2" --batch 1000 --base-ms "$base" 2>"$work/$1.log" & pids+=($!)
}
wait_produced() { # name
    until grep -q "Load generator done" "$work/$1.log"; do sleep 0.2; done
}
serve() {
    rm -f "$work/hub/http.addr"
    "$bin/outpost-hub" serve --config "$work/hub.toml" 2>>"$work/hub.log" & hub=$!; pids+=($hub)
    until [ -s "$work/hub/http.addr" ]; do sleep 0.01; done
    api="http://$(cat "$work/hub/http.addr")"
    if [ -n "${PERF:-}" ]; then
        mkdir -p "$PERF"
        perf record -q -F 999 -g -p "$hub" -o "$PERF/$backend-$1.data" 2>/dev/null & perf_pid=$!; pids+=($perf_pid)
    fi
}
unprofile() { if [ -n "${PERF:-}" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi; }
last_seqs() { curl -s -H "Authorization: Bearer $admin" "$api/api/v1/devices?limit=1000" | python3 -c '
import json, sys
for d in json.load(sys.stdin): print(d["name"], d["last_seq"])'; }

echo "## drain: $N records of one agent"
t=$(now_ms); produce drain "$N"; wait_produced drain
echo "produced offline in $(( $(now_ms) - t )) ms; outbox on disk: $(du -sh "$work/drain/store" | cut -f1)"
serve drain; t0=$(now_ms)
while :; do
    seq=$(last_seqs | awk '$1 == "drain" {print $2}')
    [ "${seq:-0}" -ge "$N" ] && break
    sleep 0.2
done
t1=$(now_ms)
unprofile
echo "| drain $N records after reconnect | $(( t1 - t0 )) ms | $(( N * 1000 / (t1 - t0) )) records/s | hub peak RSS $(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$hub/status) |"
kill "$hub"; wait "$hub" 2>/dev/null || true

echo "## ingest: $A agents x $R records"
t=$(now_ms)
for i in $(seq 1 "$A"); do produce "a$i" "$R"; done
for i in $(seq 1 "$A"); do wait_produced "a$i"; done
echo "produced offline in $(( $(now_ms) - t )) ms"
serve ingest; t0=$(now_ms)
while :; do
    done_agents=$(last_seqs | awk -v r="$R" '$1 ~ /^a[0-9]+$/ && $2 >= r' | wc -l)
    [ "$done_agents" -ge "$A" ] && break
    sleep 0.2
done
t1=$(now_ms)
unprofile
total=$(( A * R ))
echo "| $A agents pushing $R records each at once | $(( t1 - t0 )) ms | $(( total * 1000 / (t1 - t0) )) records/s stored durably | hub peak RSS $(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$hub/status) |"
kill "$hub"; wait "$hub" 2>/dev/null || true
if [ "$backend" = postgres ]; then
    calls=$(psql_pg -c "SELECT sum(calls) FROM pg_stat_statements")
    stored=$(( N + A * R ))
    echo "| statements the hub ran (pg_stat_statements, all calls incl. BEGIN/COMMIT) | $calls | $(( calls * 1000 / stored )) per 1 000 records | |"
    row_bytes=$(psql_pg -c "SELECT coalesce(avg(length(sample))::int, 300) FROM telemetry")
    echo "## PostgreSQL's own ceiling: pgbench, 2 000-row transactions of $row_bytes-byte samples (the hub's average)"
    psql_pg -c "CREATE TABLE bench (device text, at bigint, seq bigint, sample bytea, PRIMARY KEY (device, at, seq))"
    cat >"$work/insert.sql" <<SQL
\\set base random(1, 1000000000000)
INSERT INTO bench (device, at, seq, sample)
SELECT 'dev-' || :client_id, :base + g, g, decode(repeat('ab', $row_bytes), 'hex') FROM generate_series(1, 2000) g;
SQL
    for clients in 1 8; do
        out=$("${as_pg[@]}" "$pg_bin/pgbench" -h "$work/pg" -p "$pg_port" -U outpost -n -c "$clients" -j 2 -T 20 -f "$work/insert.sql" outpost 2>&1)
        tps=$(echo "$out" | awk -F'= ' '/^tps/ {print int($2)}')
        echo "| pgbench $clients client(s), 20 s | $tps transactions/s | $(( tps * 2000 )) rows/s | |"
    done
    stop_pg
fi
done
