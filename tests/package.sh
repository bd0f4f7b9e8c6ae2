#!/usr/bin/env bash
# The Debian packages as an operator meets them (issue 25).
#
# Builds outpost-hub and outpost-agent with cargo-deb (tests/build-debs.sh,
# the test build's binaries), installs them with dpkg into a throw-away
# Debian root made by debootstrap (minbase, the machine's own release and
# mirror; made once and kept under $OUTPOST_TEST_CACHE), and checks what the
# packages install and what they leave alone. Then follows README's
# "Running it for real" steps in that root: configure, `outpost-hub init`
# and `outpost-agent enroll` as the units' users, each unit's own
# ExecStartPre and ExecStart lines run as its User=, a token, the device
# online. Last, the agent package is upgraded while the agent runs and its
# hub is down; the agent is restarted as the package's try-restart does
# (SIGTERM, then start), and every sample it took meanwhile reaches the hub.
# Then remove keeps the device's identity and config, and purge removes them.
#
# A chroot: this test is about what dpkg does, so systemd does not start
# the units here; their command lines and users are read from the installed
# unit files and run as systemd would run them. The units themselves run
# under a real systemd, booted in a container, in tests/units.sh.
# Everything runs in a network namespace of its own, so the example
# configs' fixed ports are free. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "package.sh: needs root (debootstrap, chroot, ip netns)" >&2
    exit 1
fi

. tests/debian-common.sh
base=$(debian_root minbase)
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")

work=$(mktemp -d /tmp/outpost-package.XXXXXX)
root=$work/root
ns=outpost-pkg-$$
cleanup() {
    local status=$?
    kill_in "$root"
    wait 2>/dev/null || true
    umount -l "$root/proc" "$root/dev" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    [ "$status" -eq 0 ] || show_logs "$work"
    rm -rf "$work"
}
trap cleanup EXIT

# The packages, and the same agent package with a later version, for the
# upgrade.
build_debs "$work/debs"
version=$(dpkg-deb -f "$agent_deb" Version)
later="${version%-*}-$((${version##*-} + 1))"
cargo deb --no-build --profile "$profile" -p outpost-agent --deb-version "$later" -o "$work/debs/upgrade" \
    >>"$work/build.log" 2>&1 || fail "cargo deb (the upgrade)"
agent_upgrade=$(ls "$work"/debs/upgrade/outpost-agent_*.deb)

cp -a "$base" "$root"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
cp "$hub_deb" "$agent_deb" "$agent_upgrade" "$root/tmp/"

in_root() { ip netns exec "$ns" chroot "$root" "$@"; }
unit=/usr/lib/systemd/system
unit_key() { sed -n "s/^$2=//p" "$root$unit/$1.service" | head -1; }
# start UNIT: runs the unit's ExecStartPre, then its ExecStart in the
# background, as its User= (setpriv, as systemd's User= does: no PAM
# session, so the daemon is the process started here).
start() {
    local user pre cmd
    user=$(unit_key "$1" User)
    pre=$(unit_key "$1" ExecStartPre)
    cmd=$(unit_key "$1" ExecStart)
    # shellcheck disable=SC2086 # the unit's command line, split as systemd does for these
    in_root setpriv --reuid="$user" --regid="$user" --init-groups $pre >>"$work/$1.log" 2>&1 || fail "$1: ExecStartPre ($pre)"
    # Not through in_root: a function run in the background is a subshell,
    # and $! must be the daemon (ip, chroot and setpriv each exec the next).
    # shellcheck disable=SC2086
    ip netns exec "$ns" chroot "$root" setpriv --reuid="$user" --regid="$user" --init-groups $cmd >>"$work/$1.log" 2>&1 &
    eval "${1//-/_}_pid=$!"
}
# stop PID: SIGTERM, as systemctl stop does; the daemon must exit 0.
stop() {
    kill -TERM "$1"
    wait "$1" || fail "exit status $? after SIGTERM"
}

# --- Install: what the packages put where, and what they leave alone.
# As README says: apt-get, which brings what the packages depend on (from
# the mirror: outside the network namespace).
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "/tmp/$(basename "$hub_deb")" \
    "/tmp/$(basename "$agent_deb")" >"$work/dpkg.log" 2>&1 || fail "apt-get install"
pass "apt-get install of both packages into a fresh $codename root"
for user in outpost outpost-hub; do
    entry=$(in_root getent passwd "$user") || fail "no $user user"
    [ "${entry##*:}" = /usr/sbin/nologin ] || fail "$user's shell is ${entry##*:}"
done
pass "the system users outpost and outpost-hub exist, with no login shell"
for bin in outpost-agent outpost-hub outpostctl; do
    [ -x "$root/usr/bin/$bin" ] || fail "/usr/bin/$bin"
    zcat "$root/usr/share/man/man1/$bin.1.gz" | grep -q "^\.TH $bin 1" || fail "man page of $bin"
    bash -n "$root/usr/share/bash-completion/completions/$bin" || fail "bash completion of $bin"
    [ -s "$root/usr/share/zsh/vendor-completions/_$bin" ] || fail "zsh completion of $bin"
    [ -s "$root/usr/share/fish/vendor_completions.d/$bin.fish" ] || fail "fish completion of $bin"
done
zcat "$root/usr/share/man/man1/outpost-agent.1.gz" | grep -q "enroll" || fail "the agent's man page lacks its subcommands"
pass "binaries in /usr/bin, man pages and bash/zsh/fish completions for all three"
for pair in outpost-agent:agent:outpost outpost-hub:hub:outpost-hub; do
    IFS=: read -r package conf group <<<"$pair"
    in_root dpkg-query -W -f='${Conffiles}\n' "$package" | grep -q "/etc/outpost/$conf.toml" || fail "$conf.toml is not a conffile"
    [ "$(in_root stat -c '%U:%G %a' "/etc/outpost/$conf.toml")" = "root:$group 640" ] || fail "$conf.toml: $(in_root stat -c '%U:%G %a' "/etc/outpost/$conf.toml")"
    [ -f "$root$unit/$package.service" ] || fail "$package.service"
    grep -q '^Type=notify' "$root$unit/$package.service" || fail "$package.service is not the shipped unit"
    # Installed, not enabled, not started: the operator enrolls or initialises first.
    ! ls "$root"/etc/systemd/system/*.wants/"$package.service" >/dev/null 2>&1 || fail "$package.service enabled at install"
done
for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/root" 2>/dev/null)" != "$root" ] || fail "a process runs in the root after install: $(cat "$proc/cmdline" | tr '\0' ' ')"
done
pass "configs are conffiles readable by their daemon's group only; units installed, none enabled or running"
# started_by UNIT: the file whose existence the unit's ConditionPathExists=
# asks for (what init or enrollment writes) exists.
started_by() { [ -e "$root$(unit_key "$1" ConditionPathExists)" ]; }
! started_by outpost-hub && ! started_by outpost-agent || fail "a unit's start condition holds before init or enrollment"

# --- README, "Running it for real": the hub.
sed -i 's/^# advertise = "hub.example.com:7443"$/advertise = "127.0.0.1:7443"/' "$root/etc/outpost/hub.toml"
grep -q '^advertise = "127.0.0.1:7443"' "$root/etc/outpost/hub.toml" || fail "hub.toml has no advertise example to set"
in_root runuser -u outpost-hub -- outpost-hub init --config /etc/outpost/hub.toml >"$work/init.log" 2>&1 || fail "outpost-hub init"
admin=$(grep '^opt_' "$work/init.log") || fail "init printed no admin token"
started_by outpost-hub || fail "outpost-hub init did not write what the unit's ConditionPathExists= names"
start outpost-hub
ctl() { in_root outpostctl --hub 127.0.0.1:8080 --token "$admin" "$@"; }
wait_for 30 "the hub answers its API" ctl overview
pass "outpost-hub init as its user, then the unit's validate and serve: the API answers"
token=$(in_root runuser -u outpost-hub -- outpost-hub token create --data-dir /var/lib/outpost-hub --ttl 1h --uses 10) \
    || fail "outpost-hub token create"

# --- The device: an operator's edit of the config, enroll, start.
sed -i 's/^interval = "10s"$/interval = "1s"/; s/^# \[metrics\]$/[metrics]/; s/^# listen = "127.0.0.1:9465"$/listen = "127.0.0.1:9465"/' \
    "$root/etc/outpost/agent.toml"
grep -q '^interval = "1s"' "$root/etc/outpost/agent.toml" || fail "agent.toml has no telemetry interval to set"
grep -q '^listen = "127.0.0.1:9465"' "$root/etc/outpost/agent.toml" || fail "agent.toml has no [metrics] example to set"
# outbox N: the agent's outbox holds at least (or, with -0, exactly no) N records.
outbox() {
    local n
    n=$(ip netns exec "$ns" python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9465/metrics", timeout=2).read().decode()
print(next(int(float(l.split()[-1])) for l in text.splitlines() if l.startswith("outpost_agent_outbox_records ")))
') || return 1
    if [ "$1" = -0 ]; then [ "$n" -eq 0 ]; else [ "$n" -ge "$1" ]; fi
}
in_root runuser -u outpost -- outpost-agent enroll --token "$token" --data-dir /var/lib/outpost --name pkg-device \
    >"$work/enroll.log" 2>&1 || fail "outpost-agent enroll"
started_by outpost-agent || fail "outpost-agent enroll did not write what the unit's ConditionPathExists= names"
start outpost-agent
field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
online() { [ "$(ctl --json device pkg-device | field online)" = True ]; }
wait_for 60 "the device online" online
device=$(ctl --json device pkg-device | field id)
[ -n "$device" ] || fail "no device id"
pass "outpost-agent enroll as its user, then the unit's validate and run: $device online"

# --- Upgrade the agent's package while the agent runs and its hub is down.
stop "$outpost_hub_pid"
down_from=$(date +%s%3N)
wait_for 30 "five samples waiting for the hub" outbox 5
in_root dpkg -i "/tmp/$(basename "$agent_upgrade")" >>"$work/dpkg.log" 2>&1 || fail "dpkg -i (upgrade)"
[ "$(in_root dpkg-query -W -f='${Version}' outpost-agent)" != "$version" ] || fail "the upgrade did not install"
grep -q '^interval = "1s"' "$root/etc/outpost/agent.toml" || fail "the upgrade replaced the operator's agent.toml"
[ "$(in_root stat -c '%U:%G %a' /etc/outpost/agent.toml)" = "root:outpost 640" ] || fail "agent.toml's owner after the upgrade"
# What the package's postinst does under systemd: try-restart.
stop "$outpost_agent_pid"
start outpost-agent
wait_for 30 "seven samples waiting for the hub after the restart" outbox 7
start outpost-hub
up_at=$(date +%s%3N)
wait_for 30 "the hub answers again" ctl overview
wait_for 60 "the device online after the upgrade" online
wait_for 60 "the agent's outbox delivered" outbox -0
pass "dpkg -i of a newer agent package with the agent running: the operator's config kept, the restarted agent back online"
# Every sample taken while the hub was down reaches it: no gap longer than
# the restart between the hub's stop and its start.
samples=$(ctl --json metrics pkg-device --since "$((down_from - 3000))")
echo "$samples" >"$work/samples.log"
gaps=$(python3 -c '
import json, sys
down, up = int(sys.argv[1]), int(sys.argv[2])
times = sorted(s["at_ms"] for s in json.load(sys.stdin)["samples"])
inside = [t for t in times if down - 3000 <= t <= up]
print(len(inside), max((b - a for a, b in zip(inside, inside[1:])), default=0))
' "$down_from" "$up_at" <"$work/samples.log") || fail "reading the samples"
read -r count gap <<<"$gaps"
[ "$count" -ge 7 ] || fail "only $count samples from the hub's downtime reached it"
[ "$gap" -le 5000 ] || fail "a gap of $gap ms in the samples across the upgrade"
pass "all $count samples the agent took while its hub was down reached it after the upgrade (largest gap $gap ms)"

# --- Remove keeps the device's identity and config; purge removes them.
stop "$outpost_agent_pid"
in_root dpkg -r outpost-agent >>"$work/dpkg.log" 2>&1 || fail "dpkg -r"
[ ! -e "$root/usr/bin/outpost-agent" ] || fail "dpkg -r left the binary"
[ -f "$root/var/lib/outpost/identity/device.key" ] && [ -f "$root/etc/outpost/agent.toml" ] || fail "dpkg -r removed the identity or the config"
in_root dpkg --purge outpost-agent >>"$work/dpkg.log" 2>&1 || fail "dpkg --purge"
[ ! -e "$root/var/lib/outpost" ] && [ ! -e "$root/etc/outpost/agent.toml" ] || fail "dpkg --purge left the state or the config"
[ -f "$root/etc/outpost/hub.toml" ] || fail "purging the agent touched the hub's config"
pass "dpkg -r keeps the device's identity and config; dpkg --purge removes both"
stop "$outpost_hub_pid"

echo "package: $passed passed, 0 failed"
