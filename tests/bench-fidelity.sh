#!/usr/bin/env bash
# Backup fidelity: outpost-agent versus restic on trees with hard links,
# extended attributes, ACLs, special files and holes, same machine, same
# run. Backs both up, restores both into empty directories, compares each
# restore with the source by one tree walker (outpost-treediff: kind, mode,
# owner, group, mtime, size, content, link groups, devices, attributes,
# ACLs, holes), and reports time, peak memory and the disk the restores
# take.
#
#   tests/bench-fidelity.sh
#
# The data set, beside what the project generates (outpost-treediff
# populate: three names of one inode, user attributes, access and default
# ACLs, a FIFO, a device, a socket, other owners, nanosecond times) and a
# 2 GiB file with 4 KiB of data: real trees the project made none of,
# copied with their links: Mesa's drivers (/usr/lib/x86_64-linux-gnu/dri:
# one library under a dozen hard-linked names), this machine's /etc, and
# a `git clone --local` of this repository (objects hard-linked to the
# original's). Needs root (devices, owners), restic, /usr/bin/time,
# setfattr/setfacl/getfacl, git.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in restic git setfacl setfattr getfacl; do command -v "$tool" >/dev/null || { echo "bench-fidelity: $tool missing" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { echo "bench-fidelity: /usr/bin/time missing" >&2; exit 1; }
[ -n "${BIN_DIR:-}" ] || cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=${BIN_DIR:-$PWD/target/release}
work=$(mktemp -d /var/tmp/outpost-bench-fidelity-XXXXXX)
cleanup() { [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
. tests/bench-common.sh
data=$work/data
mkdir -p "$data"

"$bin/outpost-treediff" populate "$data/fixture" 64
python3 - "$data/fixture/vm.img" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(2 << 30)
    f.seek(1 << 30)
    f.write(os.urandom(4096))
PY
[ -d /usr/lib/x86_64-linux-gnu/dri ] && cp -a /usr/lib/x86_64-linux-gnu/dri "$data/dri"
cp -a /etc "$data/etc"
git clone -q --local "$PWD" "$data/clone"
echo "data set: $(find "$data" -type f | wc -l) files ($(find "$data" -type f -links +1 | wc -l) with more than one name), $(find "$data" -type l | wc -l) symlinks, $(du -sm "$data" | cut -f1) MiB allocated, $(du -sm --apparent-size "$data" | cut -f1) MiB apparent" >&2

init_backup_repos

echo "| step | time | peak RSS |"
echo "|---|---|---|"
measure "outpost-agent backup run" "$bin/outpost-agent" backup --config "$work/agent.toml" run data
measure "restic backup" restic backup --quiet "$data"
measure "outpost-agent restore latest" "$bin/outpost-agent" backup --config "$work/agent.toml" restore latest --target "$work/restore-outpost"
measure "restic restore latest" restic restore latest --target "$work/restore-restic"
echo "| disk the restores take (du) | outpost-agent $(du -sm "$work/restore-outpost" | cut -f1) MiB | restic $(du -sm "$work/restore-restic" | cut -f1) MiB |"
echo "| the 2 GiB sparse file (du) | outpost-agent $(du -k "$work/restore-outpost$data/fixture/vm.img" | cut -f1) KiB | restic $(du -k "$work/restore-restic$data/fixture/vm.img" | cut -f1) KiB (source $(du -k "$data/fixture/vm.img" | cut -f1) KiB) |"
echo "| repositories | outpost-agent $(du -sm "$work/outpost-repo" | cut -f1) MiB | restic $(du -sm "$work/restic-repo" | cut -f1) MiB |"
status=0
"$bin/outpost-treediff" "$data" "$work/restore-restic$data" "$work/restore-outpost$data" >"$work/treediff.out" || status=$?
echo
echo "tree walker (reference: restic's restore; candidate: outpost-agent's):"
sed 's/^/    /' "$work/treediff.out"
echo "restic $(restic version | cut -d' ' -f2)"
exit $status
