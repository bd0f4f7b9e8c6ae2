#!/usr/bin/env bash
# LAN discovery: how long from starting two agents in two network namespaces
# (joined by a veth pair, real multicast) until each trusts the other
# (mDNS discovery plus the mutual-TLS proof), and how long until a peer that
# left is marked gone: after a clean stop (goodbye packets) and after SIGKILL
# (no goodbye: the peer link's gone_after). Reference in the same namespaces:
# avahi-daemon + avahi-publish / avahi-browse (discovery only, no proof).
#
#   tests/bench-peers.sh [RUNS]      (default 20; needs root)
#
# Needs iproute2, python3, and for the reference avahi-daemon, avahi-utils and
# dbus (apt-get install avahi-daemon avahi-utils dbus).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-20}
[ "$(id -u)" -eq 0 ] || { echo "bench-peers: needs root (network namespaces)" >&2; exit 1; }
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=$PWD/target/release
work=$(mktemp -d /tmp/outpost-bench-peers-XXXXXX); chmod 755 "$work"
tag=$$; nsA=obpA$tag; nsB=obpB$tag
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    pkill -f "avahi-daemon.*$work" 2>/dev/null || true
    ip netns del "$nsA" 2>/dev/null || true; ip netns del "$nsB" 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM
now_ms() { date +%s%3N; }
ip netns add "$nsA"; ip netns add "$nsB"
ip link add "va$tag" type veth peer name "vb$tag"
ip link set "va$tag" netns "$nsA"; ip link set "vb$tag" netns "$nsB"
ip -n "$nsA" addr add 10.66.0.1/24 dev "va$tag"; ip -n "$nsB" addr add 10.66.0.2/24 dev "vb$tag"
for ns in "$nsA" "$nsB"; do ip -n "$ns" link set lo up; done
ip -n "$nsA" link set "va$tag" up; ip -n "$nsB" link set "vb$tag" up

# Identities from a hub that is then stopped: discovery needs no hub.
"$bin/outpost-hub" init --data-dir "$work/hub" >/dev/null
printf 'data_dir = "%s"\nlog = "warn"\n[quic]\nlisten = "127.0.0.1:0"\n[http]\nlisten = "127.0.0.1:0"\n' "$work/hub" >"$work/hub.toml"
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & hub=$!
until [ -s "$work/hub/http.addr" ]; do sleep 0.05; done
for name in a b; do
    token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 10m --uses 1)
    "$bin/outpost-agent" enroll --token "$token" --data-dir "$work/$name" --name "$name" >/dev/null
    cat >"$work/$name.toml" <<CFG
data_dir = "$work/$name"
log = "info"
[peers]
probe_interval = "500ms"
gone_after = "3s"
relay = false
CFG
done
kill "$hub"; wait "$hub" 2>/dev/null || true
idb=$(grep device_id "$work/b/identity/device.toml" | cut -d'"' -f2)

# The state A lists for B ("" when absent).
state_of_b() {
    "$bin/outpost-agent" peers --json --config "$work/a.toml" 2>/dev/null |
        python3 -c "import json,sys; print(next((p['state'] if isinstance(p['state'], str) else list(p['state'])[0] for p in json.load(sys.stdin) if p['id'] == '$idb'), ''))" 2>/dev/null || true
}
wait_state() { # want limit_ms → elapsed ms or "timeout"
    local want=$1 limit=$2 t0; t0=$(now_ms)
    while [ "$(state_of_b)" != "$want" ]; do
        [ $(( $(now_ms) - t0 )) -lt "$limit" ] || { echo timeout; return; }
        sleep 0.02
    done
}
start_agent() { ip netns exec "$1" "$bin/outpost-agent" run --config "$work/$2.toml" >/dev/null 2>>"$work/$2.log" & echo $!; }
discover=(); gone_term=(); gone_kill=()
for run in $(seq 1 "$RUNS"); do
    rm -f "$work/a/control.sock" "$work/b/control.sock"
    t0=$(now_ms)
    a=$(start_agent "$nsA" a); b=$(start_agent "$nsB" b); pids+=("$a" "$b")
    r=$(wait_state trusted 30000); [ "$r" != timeout ] || { echo "run $run: no trust within 30 s" >&2; exit 1; }
    discover+=($(( $(now_ms) - t0 )))
    t1=$(now_ms)
    if [ $((run % 2)) -eq 1 ]; then kill -9 "$b"; else kill "$b"; fi
    r=$(wait_state gone 30000); [ "$r" != timeout ] || { echo "run $run: B not gone within 30 s" >&2; exit 1; }
    if [ $((run % 2)) -eq 1 ]; then gone_kill+=($(( $(now_ms) - t1 ))); else gone_term+=($(( $(now_ms) - t1 ))); fi
    kill "$a"
    # Not children of this shell (started in a command substitution): poll.
    while kill -0 "$a" 2>/dev/null || kill -0 "$b" 2>/dev/null; do sleep 0.02; done
done
stats() { python3 -c "import statistics,sys; v=[int(x) for x in sys.argv[1:]]; print(f'median {statistics.median(v):.0f} ms, worst {max(v)} ms, n={len(v)}')" "$@"; }
echo "| outpost-agent: start of both agents → each trusts the other (mDNS + mutual TLS) | $(stats "${discover[@]}") |"
echo "| outpost-agent: peer stopped cleanly (SIGTERM, goodbye) → marked gone | $(stats "${gone_term[@]}") |"
echo "| outpost-agent: peer SIGKILLed (no goodbye; gone_after 3s) → marked gone | $(stats "${gone_kill[@]}") |"

# Reference: avahi in the same namespaces (each with its own D-Bus and a
# private /run for avahi's pid file).
if command -v avahi-browse >/dev/null && [ -x /usr/sbin/avahi-daemon ] && command -v dbus-daemon >/dev/null; then
    printf '[server]\nuse-ipv4=yes\nuse-ipv6=no\n[publish]\npublish-hinfo=no\npublish-workstation=no\n' >"$work/avahi.conf"
    for ns in "$nsA" "$nsB"; do
        dbus-daemon --system --address="unix:path=$work/$ns.bus" --nopidfile --fork --print-pid >"$work/$ns.dbus.pid"
        pids+=("$(cat "$work/$ns.dbus.pid")")
        ip netns exec "$ns" unshare -m sh -c "mount -t tmpfs none /run && mkdir -p /run/avahi-daemon && DBUS_SYSTEM_BUS_ADDRESS=unix:path=$work/$ns.bus exec avahi-daemon --no-drop-root --no-chroot --no-rlimits -f $work/avahi.conf" >"$work/$ns.avahi.log" 2>&1 &
        pids+=($!)
    done
    until grep -q "Server startup complete" "$work/$nsA.avahi.log" && grep -q "Server startup complete" "$work/$nsB.avahi.log"; do sleep 0.1; done
    found=(); removed=()
    for run in $(seq 1 "$RUNS"); do
        DBUS_SYSTEM_BUS_ADDRESS="unix:path=$work/$nsA.bus" stdbuf -oL avahi-browse -rp _outpost._udp >"$work/browse.out" 2>/dev/null & browse=$!; pids+=($browse)
        sleep 0.5 # the browser registers with its daemon first
        t0=$(now_ms)
        DBUS_SYSTEM_BUS_ADDRESS="unix:path=$work/$nsB.bus" avahi-publish -s "dev-bench-$run" _outpost._udp 7444 fleet=x >/dev/null 2>&1 & pub=$!; pids+=($pub)
        until grep -q "^=.*dev-bench-$run" "$work/browse.out"; do sleep 0.01; done
        found+=($(( $(now_ms) - t0 )))
        t1=$(now_ms); kill "$pub"
        until grep -q "^-.*dev-bench-$run" "$work/browse.out"; do sleep 0.01; done
        removed+=($(( $(now_ms) - t1 )))
        kill "$browse"; wait "$browse" 2>/dev/null || true
    done
    echo "| avahi: avahi-publish started → avahi-browse resolves it (no proof of identity) | $(stats "${found[@]}") |"
    echo "| avahi: avahi-publish stopped (goodbye) → avahi-browse drops it | $(stats "${removed[@]}") |"
else
    echo "avahi-daemon, avahi-utils or dbus missing: no reference measured"
fi
