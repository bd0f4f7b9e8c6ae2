#!/usr/bin/env bash
# Builds the Debian packages: outpost-agent and outpost-hub (with outpostctl).
#
#   tests/build-debs.sh                  # release build, into target/debian/
#   tests/build-debs.sh --profile dev --no-build
#                                        # the binaries `cargo test` built
#                                        # (tests/package.sh)
#
# Needs cargo-deb (`cargo install cargo-deb --locked`). The manual pages and
# shell completions are printed by the binaries themselves (`man`,
# `completions SHELL`), so they always match the options.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=no; shift ;;
        *) echo "build-debs.sh: unknown argument $1" >&2; exit 64 ;;
    esac
done
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-debs.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi

if [ "$build" = yes ]; then
    cargo build --locked --profile "$profile" -p outpost-agent -p outpost-hub --bins
fi
gen=target/$dir/gen
rm -rf "$gen" && mkdir -p "$gen"
for bin in outpost-agent outpost-hub outpostctl; do
    "target/$dir/$bin" man | gzip -9n > "$gen/$bin.1.gz"
    "target/$dir/$bin" completions bash > "$gen/$bin.bash"
    "target/$dir/$bin" completions zsh > "$gen/_$bin"
    "target/$dir/$bin" completions fish > "$gen/$bin.fish"
done
rm -f target/debian/outpost-*.deb
for package in outpost-agent outpost-hub; do
    cargo deb --no-build --profile "$profile" -p "$package" ${DEB_VERSION:+--deb-version "$DEB_VERSION"}
done
ls -l target/debian/*.deb
