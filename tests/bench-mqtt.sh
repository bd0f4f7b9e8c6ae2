#!/usr/bin/env bash
# MQTT versus QUIC, end to end (agent outbox → hub store, durable), same
# payloads, same machine, same run; and Mosquitto's own ceiling for messages
# of the same size, measured with mosquitto_pub/mosquitto_sub.
#
#   tests/bench-mqtt.sh [N] [A] [R]     (defaults 200000 10 20000)
#
#  1. drain: one agent's backlog of N telemetry records (made offline by
#     outpost-loadgen), delivered once the hub is up: over QUIC straight to the
#     hub, then (another agent, same backlog) over MQTT through Mosquitto with
#     TLS, client certificates and the ACL of configs/mosquitto-acl.
#  2. fan-in: A agents with R records each, all at once, over QUIC, then over
#     MQTT.
#  3. broker ceiling: the batch the MQTT agent published is captured and
#     published again 2000 times by mosquitto_pub (QoS 1, TLS, device
#     certificate) to one mosquitto_sub (QoS 1), with no hub.
# Needs mosquitto, mosquitto-clients, openssl, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}; A=${2:-10}; R=${3:-20000}
for tool in mosquitto mosquitto_pub mosquitto_sub openssl curl python3; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "bench-mqtt: $tool is missing" >&2; exit 1; }
done
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=$PWD/target/release
work=$(mktemp -d /tmp/outpost-bench-mqtt-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
base=$(( $(now_ms) - 86400000 ))

"$bin/outpost-hub" init --data-dir "$work/hub" >"$work/init.out"
admin=$(tail -1 "$work/init.out")
qport=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tls_port=$(free_port); plain_port=$(free_port)

# The broker: its own CA and certificate; clients checked against the fleet CA.
mkdir -p "$work/broker"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-broker-ca \
    -keyout "$work/broker/ca.key" -out "$work/broker/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=broker \
    -keyout "$work/broker/broker.key" -out "$work/broker/broker.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$work/broker/san.ext"
openssl x509 -req -in "$work/broker/broker.csr" -CA "$work/broker/ca.crt" -CAkey "$work/broker/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/broker/san.ext" -out "$work/broker/broker.crt" 2>/dev/null
cat > "$work/broker/mosquitto.conf" <<CFG
per_listener_settings true
# Started as root, Mosquitto would switch to its own user, which cannot read
# this run's private files; a no-op when not root.
user root
persistence false
log_dest file $work/broker/mosquitto.log
set_tcp_nodelay true
listener $tls_port 127.0.0.1
cafile $work/hub/ca.crt
certfile $work/broker/broker.crt
keyfile $work/broker/broker.key
require_certificate true
use_identity_as_username true
acl_file $PWD/configs/mosquitto-acl
listener $plain_port 127.0.0.1
allow_anonymous true
CFG
"$MOSQUITTO" -c "$work/broker/mosquitto.conf" & pids+=($!)
until (exec 3<>/dev/tcp/127.0.0.1/$tls_port) 2>/dev/null; do sleep 0.05; done

cat > "$work/hub.toml" <<CFG
data_dir = "$work/hub"
log = "warn"
[quic]
listen = "127.0.0.1:$qport"
[http]
listen = "127.0.0.1:0"
[fleet]
# The benchmark measures what the hub ingests, not the per-device allowance.
device_records_per_sec = 10000000
device_bytes_per_sec = "4 GiB"
[mqtt]
broker = "mqtts://127.0.0.1:$tls_port"
ca_file = "$work/broker/ca.crt"
CFG
token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 1h --uses $((2 * A + 2)) --hub-addr "127.0.0.1:$qport")

agent_config() { # name transport
    cat > "$work/$1.toml" <<CFG
data_dir = "$work/$1"
name = "$1"
log = "warn"
[uplink]
transport = "$2"
backoff_initial = "100ms"
backoff_max = "500ms"
[uplink.mqtt]
broker = "mqtts://127.0.0.1:$tls_port"
ca_file = "$work/broker/ca.crt"
[store]
outbox_budget = "2 GiB"
[peers]
# Many agents on one host: LAN peers would only find each other.
enabled = false
CFG
}
enroll() { "$bin/outpost-agent" enroll --token "$token" --data-dir "$work/$1" --name "$1" >/dev/null; agent_config "$1" "$2"; }
serve() {
    rm -f "$work/hub/http.addr"
    "$bin/outpost-hub" serve --config "$work/hub.toml" 2>>"$work/hub.log" & hub=$!; pids+=($hub)
    until [ -s "$work/hub/http.addr" ]; do sleep 0.01; done
    api="http://$(cat "$work/hub/http.addr")"
}
stop_hub() { kill "$hub"; wait "$hub" 2>/dev/null || true; }
serve
enroll drain-quic quic; enroll drain-mqtt mqtt
for i in $(seq 1 "$A"); do enroll "q$i" quic; enroll "m$i" mqtt; done
stop_hub

# Backlogs, made while no hub runs; the load generator stops once it is done.
produce() { # name records
    RUST_LOG=warn,outpost_loadgen=info "$bin/outpost-loadgen" --config "$work/$1.toml" --records "$2" --batch 1000 --base-ms "$base" 2>"$work/$1.gen.log" & gen=$!; pids+=($gen)
    until grep -q "Load generator done" "$work/$1.gen.log"; do sleep 0.2; done
    kill "$gen"; wait "$gen" 2>/dev/null || true
}
t=$(now_ms)
produce drain-quic "$N"; produce drain-mqtt "$N"
for i in $(seq 1 "$A"); do produce "q$i" "$R"; produce "m$i" "$R"; done
echo "backlogs produced offline in $(( $(now_ms) - t )) ms"

last_seqs() { curl -s -H "Authorization: Bearer $admin" "$api/api/v1/devices?limit=1000" | python3 -c '
import json, sys
for d in json.load(sys.stdin): print(d["name"], d["last_seq"], d.get("transport"))'; }
# Starts the agents matching PATTERN ($2 of them expected) and times until
# each holds at least TARGET records at the hub.
drain() { # label pattern count target
    local label=$1 pattern=$2 count=$3 target=$4 started=() t0 t1
    t0=$(now_ms)
    for cfg in "$work"/*.toml; do
        name=$(basename "$cfg" .toml)
        [[ $name =~ ^$pattern$ ]] || continue
        "$bin/outpost-agent" run --config "$cfg" 2>"$work/$name.log" & started+=($!); pids+=($!)
    done
    while :; do
        done_agents=$(last_seqs | awk -v p="^$pattern\$" -v t="$target" '$1 ~ p && $2 >= t' | wc -l)
        [ "$done_agents" -ge "$count" ] && break
        sleep 0.1
    done
    t1=$(now_ms)
    local total=$(( count * target ))
    echo "| $label | $total | $(( t1 - t0 )) ms | $(( total * 1000 / (t1 - t0) )) records/s |"
    for p in "${started[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

serve
# Capture one batch as the broker carries it, for the ceiling measurement.
drain_mqtt_id=$(grep device_id "$work/drain-mqtt/identity/device.toml" | cut -d'"' -f2)
mosquitto_sub -h 127.0.0.1 -p "$plain_port" -q 1 -t "outpost/v1/$drain_mqtt_id/up/batch" -C 1 -N >"$work/batch.bin" & cap=$!; pids+=($cap)
sleep 0.5 # let the subscription register before the agent starts
echo "| path | records | time | rate |"
echo "|---|---|---|---|"
drain "drain, one agent, QUIC direct" drain-quic 1 "$N"
drain "drain, one agent, MQTT via Mosquitto (TLS)" drain-mqtt 1 "$N"
drain "fan-in, $A agents at once, QUIC direct" 'q[0-9]+' "$A" "$R"
drain "fan-in, $A agents at once, MQTT via Mosquitto (TLS)" 'm[0-9]+' "$A" "$R"
echo "hub peak RSS $(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$hub/status)"
stop_hub
wait "$cap" 2>/dev/null || true

# The broker alone: messages of the captured batch's size, QoS 1, published
# over TLS with the device's certificate (through the ACL) by mosquitto_pub,
# received by one mosquitto_sub. Line mode (-l) with text lines of that size:
# `-f batch.bin --repeat N` spun at 100 % CPU without delivering in 2.0.11.
size=$(stat -c %s "$work/batch.bin")
M=1000
python3 -c "import base64, os, sys; n = $size; line = base64.b64encode(os.urandom(n))[:n]; sys.stdout.buffer.write((line + b'\\n') * $M)" >"$work/lines.txt"
topic="outpost/v1/$drain_mqtt_id/up/batch"
mosquitto_sub -h 127.0.0.1 -p "$plain_port" -q 1 -t "$topic" -C "$M" >/dev/null & sub=$!; pids+=($sub)
sleep 0.5 # let the subscription register
t0=$(now_ms)
mosquitto_pub -h 127.0.0.1 -p "$tls_port" -q 1 -t "$topic" -l -i bench-pub --cafile "$work/broker/ca.crt" \
    --cert "$work/drain-mqtt/identity/device.crt" --key "$work/drain-mqtt/identity/device.key" <"$work/lines.txt"
wait "$sub"
t1=$(now_ms)
echo "| mosquitto_pub (TLS) → mosquitto_sub, $M messages of $size bytes (the size of a captured batch), QoS 1 | $(( t1 - t0 )) ms | $(( M * 1000 / (t1 - t0) )) messages/s | $(( M * size / 1024 / (t1 - t0) )) MiB/s |"
