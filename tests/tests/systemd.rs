//! Both daemons speak systemd's notify protocol. The agent: READY once its
//! actors run, WATCHDOG while they are alive, STATUS with the link and
//! outbox state, including the outbox-full alarm. The hub: READY once it
//! listens, WATCHDOG while its parts run, STATUS with its sessions and its
//! store's health, STOPPING on SIGTERM.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Hub, Proc, Scratch, Timings, bin, wait_for};
use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

/// Every notify message received so far, as text.
fn drain(socket: &UnixDatagram, seen: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

#[test]
fn ready_watchdog_and_status_reach_systemd() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let extra = "[store]\noutbox_budget = \"64 KiB\"\n";
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "unit", &timings, extra).unwrap();
    let path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    agent.env = vec![("NOTIFY_SOCKET".into(), path.display().to_string()), ("WATCHDOG_USEC".into(), "2000000".into())];

    agent.start().unwrap();
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(10), "READY, WATCHDOG and a connected STATUS", || {
        drain(&socket, &mut seen);
        let ready = seen.iter().any(|m| m.contains("READY=1"));
        let watchdog = seen.iter().any(|m| m.contains("WATCHDOG=1"));
        let connected = seen.iter().any(|m| m.contains("STATUS=connected to hub"));
        (ready && watchdog && connected).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: got {seen:?}"));

    // Offline with more results than the budget holds: the alarm shows in STATUS.
    agent.proc.as_mut().unwrap().kill();
    hub.kill();
    seen.clear();
    agent
        .start_loadgen(&["--records", "2000", "--batch", "10", "--precious-every", "1", "--precious-bytes", "100"])
        .unwrap();
    wait_for(Duration::from_secs(30), "the outbox-full alarm in STATUS", || {
        drain(&socket, &mut seen);
        seen.iter().any(|m| m.contains("ALARM outbox full")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: got {seen:?}"));
    assert!(seen.iter().any(|m| m.contains("records waiting")), "{seen:?}");
}

/// One entry of journald's native protocol: `NAME=value\n`, or
/// `NAME\n` + a 64-bit little-endian length + the value + `\n`.
fn journal_entry(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while let Some(end) = data.iter().position(|&b| b == b'\n' || b == b'=') {
        let name = String::from_utf8_lossy(&data[..end]).into_owned();
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            fields.insert(name, String::from_utf8_lossy(&rest[..stop]).into_owned());
            data = rest.get(stop + 1..).unwrap_or_default();
        } else {
            let len = u64::from_le_bytes(data[end + 1..end + 9].try_into().unwrap()) as usize;
            let value = &data[end + 9..end + 9 + len];
            fields.insert(name, String::from_utf8_lossy(value).into_owned());
            data = data.get(end + 10 + len..).unwrap_or_default();
        }
    }
    fields
}

/// Under systemd (`JOURNAL_STREAM` set) the agent logs to journald in its
/// native protocol, with its spans' fields as journal fields. The journal's
/// socket is at a fixed path: the agent runs in a private mount namespace
/// (`unshare`, as root) where a directory of this test is mounted on
/// /run/systemd/journal, with this test's socket in it.
#[test]
fn under_systemd_the_agent_logs_to_journald_with_structured_fields() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let jobs = "[[job]]\nname = \"tick\"\nschedule = \"@every 1s\"\ncommand = [\"true\"]\n";
    let agent = Agent::enroll_with(scratch.path(), &hub, "journaled", &timings, jobs).unwrap();
    let dir = scratch.path().join("journal");
    std::fs::create_dir(&dir).unwrap();
    let socket = UnixDatagram::bind(dir.join("socket")).unwrap();
    socket.set_nonblocking(true).unwrap();
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
                  mount --bind \"$0\" /run/systemd/journal && exec \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&dir)
        .arg(bin("outpost-agent"))
        .args(["run", "--config"])
        .arg(&agent.config)
        .env("JOURNAL_STREAM", "0:0");
    let log = scratch.path().join("journaled-stderr.log");
    let mut proc = Proc::spawn(&mut cmd, log.clone()).unwrap();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    let found = wait_for(Duration::from_secs(20), "a job run's entry with its fields", || {
        while let Ok(n) = socket.recv(&mut buf) {
            entries.push(journal_entry(&buf[..n]));
        }
        entries.iter().find(|e| e.get("OUTPOST_JOB").is_some_and(|j| j == "tick")).cloned()
    });
    proc.terminate(Duration::from_secs(5));
    let job = found
        .unwrap_or_else(|e| panic!("{e}: {entries:?}\nstderr: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    assert!(job.contains_key("MESSAGE") && job.contains_key("PRIORITY"), "{job:?}");
    assert_eq!(job.get("SYSLOG_IDENTIFIER").map(String::as_str), Some("outpost-agent"), "{job:?}");
    let connected = entries.iter().find(|e| e.get("MESSAGE").is_some_and(|m| m == "Connected to the hub.")).unwrap();
    assert_eq!(connected.get("OUTPOST_DEVICE"), Some(&agent.id), "{connected:?}");
    assert_eq!(connected.get("PRIORITY").map(String::as_str), Some("5"), "info is notice: {connected:?}");
    // Nothing went to standard error: the journal has it all.
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("Connected to the hub."), "{stderr}");
}

/// A wedged actor (its context held by a future that never ends: the
/// test-only switch `OUTPOST_TEST_WEDGE`) stops the watchdog pings, so
/// systemd would restart the agent, and STATUS says which actor.
#[test]
fn a_wedged_actor_stops_the_watchdog_and_status_names_it() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "wedged", &timings).unwrap();
    let path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    agent.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "2000000".into()),
        ("OUTPOST_TEST_WEDGE".into(), "scheduler".into()),
    ];
    agent.start().unwrap();
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(15), "STATUS naming the wedged actor", || {
        drain(&socket, &mut seen);
        seen.iter().any(|m| m.contains("WEDGED actor scheduler")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: got {seen:?}"));
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    let wedged_at = seen.iter().position(|m| m.contains("WEDGED actor scheduler")).unwrap();
    assert!(seen[..wedged_at].iter().any(|m| m.contains("WATCHDOG=1")), "pings before the wedge: {seen:?}");
    // From then on no ping, for longer than WatchdogSec (2 s): systemd
    // would have restarted it. Counted over three seconds of notifications.
    seen.clear();
    let quiet = std::time::Instant::now();
    wait_for(Duration::from_secs(10), "three quiet seconds", || {
        drain(&socket, &mut seen);
        (quiet.elapsed() > Duration::from_secs(3)).then_some(())
    })
    .unwrap();
    assert!(!seen.iter().any(|m| m.contains("WATCHDOG=1")), "a ping while wedged: {seen:?}");
    assert!(agent.log_text().contains("Actor wedged; watchdog pings stop."));
}

#[test]
fn the_hub_is_ready_when_it_listens_and_reports_sessions_and_its_store() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "seen", &timings).unwrap();
    agent.start().unwrap();
    hub.kill();
    let path = scratch.path().join("hub-notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    hub.env = vec![("NOTIFY_SOCKET".into(), path.display().to_string()), ("WATCHDOG_USEC".into(), "2000000".into())];
    hub.serve().unwrap();

    let mut seen = Vec::new();
    wait_for(Duration::from_secs(10), "READY with a STATUS, then WATCHDOG", || {
        drain(&socket, &mut seen);
        let ready = seen.iter().any(|m| m.contains("READY=1") && m.contains("STATUS=") && m.contains(") ok"));
        let watchdog = seen.iter().any(|m| m.contains("WATCHDOG=1"));
        (ready && watchdog).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: got {seen:?}"));
    // The HTTP address is written before READY: the API answers by then.
    assert!(hub.devices().is_ok());
    wait_for(Duration::from_secs(15), "the agent's session in STATUS", || {
        drain(&socket, &mut seen);
        seen.iter().any(|m| m.contains("STATUS=1 device session;")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: got {seen:?}"));

    hub.proc.as_mut().unwrap().terminate(Duration::from_secs(20));
    drain(&socket, &mut seen);
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "no STOPPING on SIGTERM: {seen:?}");
}
