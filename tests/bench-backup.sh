#!/usr/bin/env bash
# Backups: outpost-agent versus restic on the same data set, same machine,
# same run: first snapshot, unchanged re-run, re-run after changing 1 % of
# the data, restore of the latest snapshot into an empty directory,
# repository size, peak memory (VmHWM via /usr/bin/time) of every step.
#
#   tests/bench-backup.sh [MIB]      generated data (default 1024 MiB)
#   tests/bench-backup.sh real       a real tree: a copy of this machine's
#                                    documentation, translations, man pages,
#                                    C headers, Python and Perl libraries
#
# The generated set: MIB MiB in files of 64 KiB to 2 MiB under nested
# directories, half random bytes (incompressible), half text (compressible).
# The real tree: tens of thousands of small files, many identical to
# another (licences, translations), and symlinks; the project made none of
# it. The 1 % change overwrites 1 % of the bytes with random ones, a run in
# the middle of each of a spread of files (see `change()`). Needs restic
# (Debian's package) and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
. tests/bench-common.sh
for tool in restic python3; do command -v "$tool" >/dev/null || { echo "bench-backup: $tool missing" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { echo "bench-backup: /usr/bin/time missing (apt-get install time)" >&2; exit 1; }
# BIN_DIR: binaries to measure instead of this tree's release build.
[ -n "${BIN_DIR:-}" ] || cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=${BIN_DIR:-$PWD/target/release}
work=$(mktemp -d /var/tmp/outpost-bench-backup-XXXXXX)
cleanup() { [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
data=$work/data

if [ "$MIB" = real ]; then
    copy_real_tree "$data"
    echo "data set: real tree, $(find "$data" -type f | wc -l) files, $(find "$data" -type l | wc -l) symlinks," \
        "$(find "$data" -type f -print0 | xargs -0 md5sum | cut -d' ' -f1 | sort | uniq -d | wc -l) contents that occur more than once," \
        "$(du -sm --apparent-size "$data" | cut -f1) MiB, from: ${REAL_TREE[*]}" >&2
else
python3 - "$data" "$MIB" <<'PY'
import os, random, sys
root, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)]
total, n = 0, 0
while total < mib << 20:
    d = os.path.join(root, f"d{n % 40:02d}", f"s{n % 7}")
    os.makedirs(d, exist_ok=True)
    size = rng.randint(64 << 10, 2 << 20)
    path = os.path.join(d, f"f{n:05d}")
    with open(path, "wb") as f:
        if n % 2:
            f.write(os.urandom(size))
        else:
            out = bytearray()
            while len(out) < size:
                out += b" ".join(rng.choice(words) for _ in range(16)) + b"\n"
            f.write(bytes(out[:size]))
    total += size
    n += 1
print(f"data set: {n} files, {total / (1 << 20):.0f} MiB", file=sys.stderr)
PY
fi

change() { # rewrite 1 % of the data: a run of random bytes inside files
    python3 - "$data" <<'PY'
import os, sys
root = sys.argv[1]
files = sorted(p for p in (os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
               if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0)
total = sum(os.path.getsize(f) for f in files)
budget, i = total // 100, 0
while budget > 0:
    path = files[(i * 37) % len(files)]
    size = os.path.getsize(path)
    n = min(budget, max(size // 10, 4096))
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(n))
    budget -= n
    i += 1
print(f"changed {total // 100} bytes in {i} files", file=sys.stderr)
PY
}

# outpost-agent: its own config, repository and key.
init_backup_repos

echo "| run | time | peak RSS |"
echo "|---|---|---|"
# The unchanged run takes half a second, where one run's noise (the disk
# of a shared machine) is a tenth of that: it is measured three times,
# alternating, and each figure shown.
for round in first unchanged unchanged unchanged changed; do
    [ "$round" = changed ] && change
    measure "outpost-agent backup run, $round" "$bin/outpost-agent" backup --config "$work/agent.toml" run data
    measure "restic backup, $round" restic backup --quiet "$data"
    echo "| repositories after the $round run | outpost-agent $(du -sm "$work/outpost-repo" | cut -f1) MiB | restic $(du -sm "$work/restic-repo" | cut -f1) MiB |"
done
measure "outpost-agent restore latest" "$bin/outpost-agent" backup --config "$work/agent.toml" restore latest --target "$work/restore-outpost"
measure "restic restore latest" restic restore latest --target "$work/restore-restic"
# Both restores must equal the source (restic restores the absolute paths too).
diff -r --no-dereference "$data" "$work/restore-outpost$data" >/dev/null || { echo "bench-backup: outpost's restore differs from the source" >&2; exit 1; }
diff -r --no-dereference "$data" "$work/restore-restic$data" >/dev/null || { echo "bench-backup: restic's restore differs from the source" >&2; exit 1; }
# Beside content, one tree walker: nothing restic's restore kept may be lost
# by Outpost's (owners, modes, times, links, attributes, holes).
treediff=${TREEDIFF:-$PWD/target/release/outpost-treediff}
if [ -x "$treediff" ]; then
    "$treediff" "$data" "$work/restore-restic$data" "$work/restore-outpost$data" >"$work/treediff.out" ||
        { cat "$work/treediff.out" >&2; echo "bench-backup: outpost's restore lost what restic's kept" >&2; exit 1; }
    echo "| tree walker | $(head -1 "$work/treediff.out") |"
fi
echo "| repository size | outpost-agent $(du -sm "$work/outpost-repo" | cut -f1) MiB, $(find "$work/outpost-repo" -type f | wc -l) files | restic $(du -sm "$work/restic-repo" | cut -f1) MiB, $(find "$work/restic-repo" -type f | wc -l) files |"
echo "data set $(du -sm "$data" | cut -f1) MiB; restic $(restic version | cut -d' ' -f2), compression auto (repository v2 default in 0.14: $(restic cat config 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("version"))'))"
