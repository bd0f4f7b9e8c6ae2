#!/usr/bin/env bash
# The shipped units under a real systemd (issue 25).
#
#   tests/units.sh
#
# Boots systemd (Debian's, as PID 1 of a container made by systemd-nspawn,
# with a network of its own) in a Debian root of this machine's release
# that has systemd, D-Bus and polkit (debootstrap, made once and kept under
# $OUTPOST_TEST_CACHE), installs the packages (tests/build-debs.sh) and
# then, as an operator would, with systemctl:
#   - starts outpost-hub and outpost-agent (Type=notify: `systemctl start`
#     returns once the daemon said READY=1) and reads their STATUS= lines;
#   - restarts a service from an exec command, as the README's example does,
#     under the agent unit's sandbox, allowed by the polkit rule of
#     docs/OPERATIONS.md for that one unit, and refused for another;
#   - reloads the hub (ExecReload, SIGHUP);
#   - freezes the agent (SIGSTOP): its watchdog pings stop, systemd kills and
#     restarts it, and it comes back online (WatchdogSec shortened to 6 s by
#     a drop-in, so the test does not wait 30 s);
#   - stops both: each exits cleanly (`Result=success`, not failed).
# Needs root, debootstrap and systemd-nspawn (Debian: systemd-container).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "units.sh: needs root (debootstrap, systemd-nspawn)" >&2
    exit 1
fi
command -v systemd-nspawn >/dev/null || { echo "units.sh: needs systemd-nspawn (apt-get install systemd-container)" >&2; exit 1; }

. tests/debian-common.sh
base=$(debian_root systemd systemd,systemd-sysv,dbus,libpam-systemd,polkitd)

work=$(mktemp -d /tmp/outpost-units.XXXXXX)
root=$work/root
boot=
cleanup() {
    local status=$?
    if [ "$status" -ne 0 ] && [ -n "${init:-}" ]; then
        echo "--- the container's journal"
        in_ct journalctl --no-pager -n 80 2>/dev/null || true
    fi
    if [ -n "$boot" ]; then
        kill -TERM "$boot" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$boot" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$boot" 2>/dev/null || true
    fi
    kill_in "$root"
    wait 2>/dev/null || true
    [ "$status" -eq 0 ] || show_logs "$work"
    rm -rf "$work"
}
trap cleanup EXIT

build_debs "$work/debs"
cp -a "$base" "$root"
cp "$hub_deb" "$agent_deb" "$root/tmp/"
# Installed before the boot as README says (apt-get brings what they depend
# on), in a chroot, as package.sh checks.
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "/tmp/$(basename "$hub_deb")" \
    "/tmp/$(basename "$agent_deb")" >"$work/dpkg.log" 2>&1 || fail "apt-get install"

# The operator's part: the hub initialised as its user, the agent allowed to
# run programs, the polkit rule of docs/OPERATIONS.md, a service for it to
# restart and one it may not, and a shorter watchdog for the test.
sed -i 's/^# advertise = "hub.example.com:7443"$/advertise = "127.0.0.1:7443"/' "$root/etc/outpost/hub.toml"
chroot "$root" runuser -u outpost-hub -- outpost-hub init --config /etc/outpost/hub.toml >"$work/init.log" 2>&1 || fail "outpost-hub init"
admin=$(grep '^opt_' "$work/init.log") || fail "init printed no admin token"
sed -i 's/^allow_exec = false$/allow_exec = true/' "$root/etc/outpost/agent.toml"
grep -q '^allow_exec = true' "$root/etc/outpost/agent.toml" || fail "agent.toml has no allow_exec to set"
mkdir -p "$root/etc/polkit-1/rules.d"
rule=$(awk '/^\/\/ \/etc\/polkit-1\/rules.d\/50-outpost-restart-app.rules$/ {on = 1} on && /^```$/ {exit} on' docs/OPERATIONS.md)
[ -n "$rule" ] || fail "docs/OPERATIONS.md has no polkit rule for app.service"
echo "$rule" >"$root/etc/polkit-1/rules.d/50-outpost-restart-app.rules"
for name in app other; do
    printf '[Service]\nExecStart=/bin/sleep infinity\n' >"$root/etc/systemd/system/$name.service"
done
mkdir -p "$root/etc/systemd/system/outpost-agent.service.d"
printf '[Service]\nWatchdogSec=6s\n' >"$root/etc/systemd/system/outpost-agent.service.d/watchdog.conf"
# Nothing in the container may wait for a network it does not have.
ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"

# The boot: systemd as PID 1 of the container, its own network (loopback).
systemd-nspawn -D "$root" --boot --private-network --register=no --keep-unit -q --console=pipe >"$work/boot.log" 2>&1 &
boot=$!
init=
find_init() {
    local child
    for child in $(pgrep -P "$boot"); do
        [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ] && { init=$child; return 0; }
    done
    return 1
}
wait_for 30 "systemd started in the container" find_init
in_ct() { nsenter -t "$init" -a "$@"; }
booted() { case "$(in_ct systemctl is-system-running 2>/dev/null)" in running | degraded) return 0 ;; esac; return 1; }
wait_for 60 "the container's boot" booted
pass "systemd $(in_ct systemctl --version | awk 'NR == 1 {print $2}') booted in a container"

show() { in_ct systemctl show -P "$2" "$1"; }
in_ct systemctl start outpost-hub || fail "systemctl start outpost-hub"
[ "$(show outpost-hub ActiveState)" = active ] || fail "outpost-hub is $(show outpost-hub ActiveState)"
ctl() { in_ct outpostctl --hub 127.0.0.1:8080 --token "$admin" "$@"; }
ctl overview >/dev/null || fail "the hub's API does not answer once systemctl start returned"
hub_status() { show outpost-hub StatusText | grep -q 'device session.*store (sled) ok'; }
wait_for 10 "the hub's STATUS= line" hub_status
pass "systemctl start outpost-hub returns once it is ready: the API answers; status \"$(show outpost-hub StatusText)\""

token=$(in_ct runuser -u outpost-hub -- outpost-hub token create --data-dir /var/lib/outpost-hub --ttl 1h) || fail "token create"
in_ct runuser -u outpost -- outpost-agent enroll --token "$token" --data-dir /var/lib/outpost --name unit-device \
    >"$work/enroll.log" 2>&1 || fail "outpost-agent enroll"
in_ct systemctl start outpost-agent || fail "systemctl start outpost-agent"
field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
online() { [ "$(ctl --json device unit-device | field online)" = True ]; }
wait_for 60 "the device online" online
agent_status() { show outpost-agent StatusText | grep -q '^connected to hub'; }
wait_for 30 "the agent's STATUS= line" agent_status
pass "systemctl start outpost-agent: the device online; status \"$(show outpost-agent StatusText)\""

# The README's exec example under the agent unit, by the polkit rule.
in_ct systemctl start app other || fail "systemctl start app other"
before=$(show app MainPID)
ctl command send unit-device exec --wait 60s -- systemctl restart app >"$work/restart-app.log" 2>&1 \
    || fail "systemctl restart app from an exec command: $(cat "$work/restart-app.log")"
after=$(show app MainPID)
[ "$after" != "$before" ] && [ "$(show app ActiveState)" = active ] || fail "app was not restarted ($before, $after)"
pass "an exec command restarts app.service under the agent's sandbox, allowed by the polkit rule (pid $before -> $after)"
before=$(show other MainPID)
if ctl command send unit-device exec --wait 60s -- systemctl restart other >"$work/restart-other.log" 2>&1; then
    fail "an exec command restarted other.service, which the rule does not name"
fi
grep -qi 'access denied\|authentication\|not authorized\|interactive' "$work/restart-other.log" \
    || fail "the refused restart does not say why: $(cat "$work/restart-other.log")"
[ "$(show other MainPID)" = "$before" ] || fail "other.service was restarted"
pass "the same command for other.service is refused by polkit and says so"

# Reload: SIGHUP, the hub stays.
in_ct systemctl reload outpost-hub || fail "systemctl reload outpost-hub"
[ "$(show outpost-hub ActiveState)" = active ] && [ "$(show outpost-hub NRestarts)" = 0 ] || fail "the hub after reload"
ctl overview >/dev/null || fail "the hub's API after reload"
pass "systemctl reload outpost-hub: still active, not restarted, the API answers"

# The watchdog: a frozen agent pings no more; systemd restarts it.
frozen=$(show outpost-agent MainPID)
in_ct kill -STOP "$frozen"
restarted() { [ "$(show outpost-agent NRestarts)" -ge 1 ] && [ "$(show outpost-agent ActiveState)" = active ]; }
wait_for 40 "systemd restarting the frozen agent" restarted
[ "$(show outpost-agent MainPID)" != "$frozen" ] || fail "the agent's pid did not change"
in_ct journalctl -u outpost-agent --no-pager | grep -q 'Watchdog timeout' || fail "the journal does not name the watchdog"
wait_for 60 "the device online after the watchdog restart" online
pass "a frozen agent: watchdog timeout, systemd restarts it (pid $frozen -> $(show outpost-agent MainPID)), the device back online"

# Stop: both exit cleanly.
in_ct systemctl stop outpost-agent outpost-hub || fail "systemctl stop"
for u in outpost-agent outpost-hub; do
    [ "$(show $u ActiveState)" = inactive ] && [ "$(show $u Result)" = success ] \
        || fail "$u after stop: $(show $u ActiveState), $(show $u Result)"
done
pass "systemctl stop: both inactive, Result=success"

echo "units: $passed passed, 0 failed"
