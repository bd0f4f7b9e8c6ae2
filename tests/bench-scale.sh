#!/usr/bin/env bash
# The hub's scale benchmark (issue 28), with release binaries: N agents
# simulated by outpost-swarm (real QUIC connections with mutual TLS, each with
# a certificate from a real enrollment), all dialling at once; then a steady
# state with heartbeats every 10 s, a telemetry batch every 30 s and echo
# commands through the API; then the hub killed (SIGKILL) and started again
# while they are connected, and the time until all are back.
#
#   tests/bench-scale.sh [N] [SECONDS] [COMMANDS_PER_SEC]   (defaults 10000 60 20)
#   BACKENDS="sled postgres" (default: sled)
#   HUB_QUIC="accept_rate = 1000" (extra [quic] lines for the hub)
#   SWARM_ARGS="--watch" (more outpost-swarm options)
#   HUB=/path/to/outpost-hub (another hub binary, e.g. an older build, to
#   compare with in the same conditions; default: this tree's)
#
# The hub's CPU and resident memory are read from /proc. The swarm runs on the
# same 2 cores as the hub, so its own CPU is printed beside. The peer, in the
# same run: Mosquitto with a TLS listener that requires client certificates
# from the fleet's CA (as docs/MQTT.md sets one up), to which every simulated
# agent then connects with its own certificate and subscribes to its own
# topic; its resident memory per connection is printed beside the hub's.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { apt-get install -y mosquitto >/dev/null || exit 1; }
# 10,000 TCP connections for the peer, on both ends (the hard limit must allow it).
ulimit -n "$(ulimit -Hn)"
N=${1:-10000}; SECS=${2:-60}; CPS=${3:-20}
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=$PWD/target/release
hub_bin=${HUB:-$bin/outpost-hub}
top=$(mktemp -d /tmp/outpost-bench-XXXXXX)
work=$top
. tests/bench-common.sh
cleanup() {
    for f in "$work/hub.pid" "$work/broker.pid"; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
    wait 2>/dev/null || true; stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$top"
}
trap cleanup EXIT
trap "exit 130" INT TERM

for backend in ${BACKENDS:-sled}; do
    work=$top/$backend; mkdir -p "$work"; pg_url=
    echo "# backend: $backend, $N agents, $(nproc) cores"
    [ "$backend" = postgres ] && start_pg
    init_hub
    # The scale figures, not the per-device allowance; the idle timeout a
    # field fleet would use with 10 s heartbeats.
    sed -i "s/^\[quic\]$/[quic]\nidle_timeout = \"45s\"\n${HUB_QUIC:-}/" "$work/hub.toml"
    # A fixed HTTP port, so that the API can be asked while the restarted
    # hub takes its fleet back.
    hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    sed -i "s/^listen = \"127.0.0.1:0\"$/listen = \"127.0.0.1:$hport\"/" "$work/hub.toml"
    serve() { "$hub_bin" serve --config "$work/hub.toml" >>"$work/hub.log" 2>&1 & echo $! >"$work/hub.pid"; }
    serve
    for _ in $(seq 100); do [ -s "$work/hub/http.addr" ] && break; sleep 0.1; done
    token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 2h --uses "$N" --hub-addr "127.0.0.1:$port")
    cat >"$work/restart.sh" <<RESTART
kill -9 \$(cat "$work/hub.pid"); while kill -0 \$(cat "$work/hub.pid") 2>/dev/null; do sleep 0.01; done
"$hub_bin" serve --config "$work/hub.toml" >>"$work/hub.log" 2>&1 &
echo \$! >"$work/hub.pid"; echo \$!
RESTART
    # The peer broker: its own server certificate, clients from the fleet CA.
    b=$work/broker; mkdir -p "$b"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$b/ca.key" -out "$b/ca.pem" \
        -subj /CN=bench-broker-ca -days 2 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$b/server.key" -out "$b/server.csr" \
        -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >"$b/ext"
    openssl x509 -req -in "$b/server.csr" -CA "$b/ca.pem" -CAkey "$b/ca.key" -CAcreateserial -out "$b/server.pem" \
        -days 2 -extfile "$b/ext" 2>/dev/null
    bport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$b/mosquitto.conf" <<MOSQ
user root
persistence false
log_dest stderr
log_type error
max_keepalive 65535
listener $bport 127.0.0.1
cafile $work/hub/ca.crt
certfile $b/server.pem
keyfile $b/server.key
require_certificate true
use_identity_as_username true
MOSQ
    mosquitto -c "$b/mosquitto.conf" 2>"$b/log" & echo $! >"$work/broker.pid"
    "$bin/outpost-swarm" --hub "127.0.0.1:$port" --api "http://$(cat "$work/hub/http.addr")" --admin "$admin" \
        --token "$token" --dir "$work/agents" --agents "$N" --duration "${SECS}s" --commands-per-sec "$CPS" \
        --hub-pid "$(cat "$work/hub.pid")" --restart "sh $work/restart.sh" \
        --mqtt-peer "127.0.0.1:$bport" --mqtt-peer-pid "$(cat "$work/broker.pid")" --mqtt-peer-ca "$b/ca.pem" ${SWARM_ARGS:-}
    kill "$(cat "$work/hub.pid")" "$(cat "$work/broker.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    stop_pg
done
