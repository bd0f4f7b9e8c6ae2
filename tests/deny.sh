#!/usr/bin/env bash
# cargo-deny over the workspace: advisories (from the snapshot in
# deny/advisory-db, see deny/README.md), licences, bans, sources. Installs
# cargo-deny from crates.io when missing.
#
#   tests/deny.sh                       # check
#   tests/deny.sh --refresh DIR         # refresh the snapshot from a clone of
#                                       # github.com/rustsec/advisory-db
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=deny/advisory-db

if [ "${1:-}" = "--refresh" ]; then
    src=${2:?usage: tests/deny.sh --refresh DIR}
    rm -rf "$snapshot/crates"
    for name in $(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock fuzz/Cargo.lock | sort -u); do
        if [ -d "$src/crates/$name" ]; then
            mkdir -p "$snapshot/crates/$name"
            cp "$src/crates/$name"/*.md "$snapshot/crates/$name/"
        fi
    done
    git -C "$src" log -1 --format='%H %cI' > "$snapshot/SNAPSHOT"
    echo "deny: snapshot refreshed: $(cat "$snapshot/SNAPSHOT")"
    exit 0
fi

if ! cargo deny --version >/dev/null 2>&1; then
    echo "tests/deny.sh: installing cargo-deny"
    cargo install --locked cargo-deny
fi

# cargo-deny reads `cargo metadata` offline, which needs every package of
# the lock file, those of other platforms too (a build fetches only this
# one's): fetch them first, from the registry.
cargo fetch --locked

# The checkout cargo-deny expects under db-path: its directory name is the
# URL's last segment and a hash of the URL (cargo-deny's url_to_db_path),
# which it prints when the directory is missing.
read -r commit date < "$snapshot/SNAPSHOT"
root=target/advisory-dbs
name=$(cargo deny --offline --locked check advisories 2>&1 | grep -o 'advisory-db-[0-9a-f]\{16\}' | head -1 || true)
if [ -z "$name" ] && [ -d "$root" ]; then
    name=$(ls "$root" | grep '^advisory-db-' | head -1 || true)
fi
[ -n "$name" ] || { echo "tests/deny.sh: cannot tell where cargo-deny reads the advisory database" >&2; exit 1; }
db="$root/$name"
rm -rf "$db"
mkdir -p "$db"
cp -r "$snapshot/crates" "$db/"
git -C "$db" init -q
git -C "$db" add -A
GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date git -C "$db" \
    -c user.name=outpost -c user.email=outpost@invalid commit -q -m "RustSec advisory-db $commit (advisories of this workspace's crates)"

age_days=$(( ( $(date +%s) - $(date -d "$date" +%s) ) / 86400 ))
echo "deny: advisories from RustSec advisory-db $commit of $date ($age_days days old)"
if [ "$age_days" -gt 90 ]; then
    echo "deny: WARNING: the advisory snapshot is over 90 days old; refresh it (deny/README.md)" >&2
fi
cargo deny --offline --locked check --hide-inclusion-graph advisories licenses bans sources
