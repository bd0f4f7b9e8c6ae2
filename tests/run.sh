#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine,
# then builds and runs every test of the workspace.
#
#   tests/run.sh            # everything
#   tests/run.sh -- NAME    # only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# libfaketime steps the agent's wall clock in the scheduler's clock test.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || [ -n "$(find /usr/lib -name libfaketimeMT.so.1 2>/dev/null | head -1)" ] || need_apt+=(libfaketime)
# The MQTT tests start their own Mosquitto (the Debian package's service,
# if it starts, is not used).
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
# The store suite and the hub tests on PostgreSQL make private clusters
# (initdb in a temp dir) with Debian's PostgreSQL; its package also makes
# the postgres user they run as.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# The backup tests make extended attributes and ACLs with setfattr and
# setfacl, and read ACLs back with getfacl (Debian's attr and acl).
command -v setfattr >/dev/null 2>&1 || need_apt+=(attr)
command -v setfacl >/dev/null 2>&1 && command -v getfacl >/dev/null 2>&1 || need_apt+=(acl)
# The LAN tests build network namespaces with ip(8) (and need root).
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need_apt+=(iproute2)
# The console's browser test drives Debian's Chromium with Playwright
# (playwright-core from npm, pinned in tests/browser/package-lock.json).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# The metrics tests check /metrics with promtool (Debian's prometheus).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# The alerts tests post to a real Alertmanager.
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
# The package test (tests/package.sh) makes a Debian root with debootstrap
# and reads JSON with python3.
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The units test (tests/units.sh) boots systemd in a container.
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need_apt[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "tests/run.sh: cargo is missing; install Rust 1.95 or later (rustup.rs) first" >&2
    exit 1
fi

# The Debian packages are built with cargo-deb.
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "tests/run.sh: installing cargo-deb for the package test"
    cargo install --locked --quiet cargo-deb --version 3.8.0
fi

if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "tests/run.sh: installing playwright-core for the console's browser test"
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi

# The multi-process tests run the binaries next to the test executables:
# `cargo test --workspace` builds them (every package with binaries has
# integration tests) with the same features as the tests. A separate
# `cargo build --bins` first would build the whole graph a second time with
# other features (no dev-dependencies), doubling build time and disk.
cargo test --locked --workspace "$@"
# The tests that run hubs, again with every hub on PostgreSQL.
OUTPOST_TEST_STORE=postgres cargo test --locked -p outpost-tests \
    --test delivery --test control --test jobs --test backup_hub --test mqtt --test resilience --test fleet \
    --test roles --test identity "$@"
# The packages, installed and run in a throw-away Debian root, and the
# units under a real systemd booted in a container (root only; with a NAME
# filter, only when NAME is "package" or "units").
if [ $# -eq 0 ] || [ "${*: -1}" = package ]; then
    tests/package.sh
fi
if [ $# -eq 0 ] || [ "${*: -1}" = units ]; then
    tests/units.sh
fi
