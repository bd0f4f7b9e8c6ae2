# shellcheck shell=bash
# Shared by tests/package.sh and tests/units.sh (sourced): checks, waits,
# the Debian roots they install into, and the packages they install.

passed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() {
    echo "FAILED: $*" >&2
    exit 1
}
# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what (gave up after the deadline)"
        sleep 0.2
    done
}

# debian_root NAME [PACKAGES]: prints the path of a Debian root of this
# machine's release from this machine's mirror (debootstrap minbase, with
# adduser and PACKAGES, comma-separated), made once and kept under
# $OUTPOST_TEST_CACHE (default /var/cache/outpost-tests) as <release>-NAME.
debian_root() {
    local name=$1 include=adduser${2:+,$2} codename mirror cache dir
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | awk '{print $2; exit}' || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || fail "no Debian mirror in /etc/apt/sources.list*"
    cache=${OUTPOST_TEST_CACHE:-/var/cache/outpost-tests}
    dir=$cache/$codename-$name
    if [ ! -x "$dir/usr/bin/dpkg" ]; then
        mkdir -p "$cache"
        rm -rf "$dir.new"
        echo "making a $codename root ($name) with debootstrap (once)" >&2
        debootstrap --variant=minbase --include="$include" "$codename" "$dir.new" "$mirror" >"$cache/debootstrap-$name.log" 2>&1 \
            || { tail -20 "$cache/debootstrap-$name.log" >&2; fail "debootstrap"; }
        mv "$dir.new" "$dir"
    fi
    echo "$dir"
}

# build_debs DIR: the two packages, of the test build's binaries (CI builds
# nothing twice), into DIR; sets hub_deb and agent_deb. With
# OUTPOST_DEB_PROFILE (default dev) another profile, built here.
build_debs() {
    local build=--no-build
    profile=${OUTPOST_DEB_PROFILE:-dev}
    mkdir -p "$1"
    # `cargo test --workspace` (tests/run.sh) built them; a `cargo build`
    # here would build the graph again with other features.
    [ -x target/debug/outpost-agent ] && [ -x target/debug/outpost-hub ] && [ -x target/debug/outpostctl ] || build=
    [ "$profile" = dev ] || build=
    tests/build-debs.sh --profile "$profile" $build >"$1/build.log" 2>&1 || { tail -20 "$1/build.log" >&2; fail "tests/build-debs.sh"; }
    cp target/debian/outpost-hub_*.deb target/debian/outpost-agent_*.deb "$1/"
    hub_deb=$(ls "$1"/outpost-hub_*.deb)
    agent_deb=$(ls "$1"/outpost-agent_*.deb)
}

# kill_in ROOT: kills every process whose root is ROOT, whatever started
# it, and waits (up to 10 s) until none is left.
kill_in() {
    local proc left
    for _ in $(seq 50); do
        left=0
        for proc in /proc/[0-9]*; do
            if [ "$(readlink "$proc/root" 2>/dev/null)" = "$1" ]; then
                kill -9 "${proc#/proc/}" 2>/dev/null || true
                left=1
            fi
        done
        [ "$left" = 1 ] || return 0
        sleep 0.2
    done
}

# show_logs DIR: the tail of each log in DIR (after a failure).
show_logs() {
    local log
    for log in "$1"/*.log; do
        [ -e "$log" ] && { echo "--- $log"; tail -40 "$log"; }
    done
}
