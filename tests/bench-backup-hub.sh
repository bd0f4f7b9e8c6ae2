#!/usr/bin/env bash
# Backups through the hub, with release binaries on loopback: one device's
# first snapshot uploaded to the hub (only what the hub lacks, encrypted),
# then restored onto a second, newly enrolled device under an operator's
# grant; the restored tree is compared with the source. For scale, restic
# backs up and restores the same data into a local repository in the same
# run (no restic server is installed here, so restic does not cross a
# network).
#
#   tests/bench-backup-hub.sh [real|MIB|DIR]   (default real: the tree of
#                                  bench-backup.sh real; DIR: a copy of one
#                                  real directory, e.g. /usr/include)
#
# RTT_MS=50 puts a link with that round trip between the devices and the
# hub (outpost-udpdelay, a UDP relay holding each datagram RTT_MS/2 each
# way; this machine's kernel has no netem).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-real}
for tool in restic python3 curl; do command -v "$tool" >/dev/null || { echo "bench-backup-hub: $tool missing" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { echo "bench-backup-hub: /usr/bin/time missing (apt-get install time)" >&2; exit 1; }
# BIN_DIR: binaries to measure instead of this tree's release build.
[ -n "${BIN_DIR:-}" ] || cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=${BIN_DIR:-$PWD/target/release}
work=$(mktemp -d /var/tmp/outpost-bench-backup-hub-XXXXXX)
hub= relay=
cleanup() {
    [ -n "$hub" ] && kill "$hub" 2>/dev/null; [ -n "$relay" ] && kill "$relay" 2>/dev/null
    wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM
data=$work/data
. tests/bench-common.sh
if [ "$WHAT" = real ]; then
    copy_real_tree "$data"
elif [ -d "$WHAT" ]; then
    REAL_TREE=("$WHAT")
    copy_real_tree "$data"
else
    mkdir -p "$data"
    python3 - "$data" "$WHAT" <<'PY'
import os, random, sys
root, mib = sys.argv[1], int(sys.argv[2])
rng, total, n = random.Random(7), 0, 0
while total < mib << 20:
    size = rng.randint(64 << 10, 2 << 20)
    with open(os.path.join(root, f"f{n:05d}"), "wb") as f:
        f.write(os.urandom(size) if n % 2 else bytes(rng.choice(b"abcdefgh \n") for _ in range(size)))
    total += size; n += 1
PY
fi
echo "data set ($WHAT): $(find "$data" -type f | wc -l) files, $(du -sm --apparent-size "$data" | cut -f1) MiB" >&2

init_hub
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & hub=$!
for _ in $(seq 200); do [ -s "$work/hub/http.addr" ] && break; sleep 0.05; done
api="http://$(cat "$work/hub/http.addr")"
hub_addr=127.0.0.1:$port
if [ -n "${RTT_MS:-}" ]; then
    "$bin/outpost-udpdelay" 127.0.0.1:0 "$hub_addr" "$((RTT_MS / 2))" >"$work/relay.addr" & relay=$!
    for _ in $(seq 200); do [ -s "$work/relay.addr" ] && break; sleep 0.05; done
    hub_addr=$(cat "$work/relay.addr")
    echo "link: ${RTT_MS} ms round trip (outpost-udpdelay $hub_addr -> 127.0.0.1:$port)" >&2
fi
token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 1h --uses 2 --hub-addr "$hub_addr")
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/backup.key"
chmod 600 "$work/backup.key"
device() { # name
    "$bin/outpost-agent" enroll --token "$token" --data-dir "$work/$1" --name "$1" >/dev/null
    cat >"$work/$1.toml" <<CFG
data_dir = "$work/$1"
[peers]
enabled = false
[backups]
key_file = "$work/backup.key"
[[backup]]
name = "data"
paths = ["$data"]
upload = true
CFG
}
device old
device new
id_of() { sed -n 's/^device_id = "\(.*\)"/\1/p' "$work/$1/identity/device.toml"; }

echo "| step | time | peak RSS |"
echo "|---|---|---|"
# The snapshot without its upload, then the upload alone (the hub is empty).
sed -i 's/^upload = true$/upload = false/' "$work/old.toml"
measure "outpost-agent backup run (local)" "$bin/outpost-agent" backup --config "$work/old.toml" run data
sed -i 's/^upload = false$/upload = true/' "$work/old.toml"
measure "outpost-agent backup upload (first, to the hub)" "$bin/outpost-agent" backup --config "$work/old.toml" upload
grep -o 'uploaded .*' "$work/cmd.out" >&2
curl -sf -X POST -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
    -d "{\"to\":\"$(id_of new)\"}" "$api/api/v1/devices/$(id_of old)/backups/grants" >/dev/null
measure "outpost-agent restore --from-device (onto the new device)" "$bin/outpost-agent" backup --config "$work/new.toml" \
    restore --from-device "$(id_of old)" --snapshot latest --target "$work/restored"
diff -r --no-dereference "$data" "$work/restored$data" >/dev/null || { echo "bench-backup-hub: the restore differs from the source" >&2; exit 1; }
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic-repo
restic init >/dev/null
measure "restic backup (local repository, for scale)" restic backup --quiet "$data"
measure "restic restore (local repository, for scale)" restic restore latest --target "$work/restic-restored"
echo "| hub disk for the device | $(du -sm "$work/hub/backups" | cut -f1) MiB, $(find "$work/hub/backups" -type f | wc -l) files |"
