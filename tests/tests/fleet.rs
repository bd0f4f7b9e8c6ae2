//! A hub and agents as real processes on this machine: presence, telemetry,
//! crash and restart.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Scratch, Timings, fleet, wait_for, wait_online};
use std::time::{Duration, Instant};

#[test]
fn three_agents_are_online_with_telemetry_within_five_seconds() {
    let scratch = Scratch::new().unwrap();
    let started = Instant::now();
    let (hub, agents) = fleet(&scratch, 3, Timings::default()).unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    let launched = Instant::now();
    let devices = wait_for(Duration::from_secs(5), "3 agents online with telemetry", || {
        let devices = hub.devices().ok()?;
        let ready = ids.iter().all(|id| {
            devices.iter().any(|d| d.id == *id && d.online && d.telemetry.is_some() && d.cpu_percent.is_some())
        });
        ready.then_some(devices)
    })
    .unwrap();
    eprintln!("set-up {:?}, online with telemetry {:?} after start", launched - started, launched.elapsed());
    assert_eq!(devices.len(), 3);
    for agent in &agents {
        let d = devices.iter().find(|d| d.id == agent.id).unwrap();
        assert_eq!(d.name, agent.name);
        assert_eq!(d.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        let t = d.telemetry.as_ref().unwrap();
        assert!(t.mem_total_bytes > 0 && t.uptime_secs > 0 && !t.net.is_empty(), "{t:?}");
        assert!(d.mem_percent.unwrap() > 0.0);
    }
    // The CLI shows the same fleet.
    let out = std::process::Command::new(outpost_tests::bin("outpostctl"))
        .args(["--hub", &hub.api, "--token", &hub.admin_token, "devices"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    for agent in &agents {
        let row = table.lines().find(|l| l.starts_with(&agent.id)).unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains(&agent.name) && row.contains(" online "), "{row}");
    }
}

#[test]
fn killed_agent_goes_offline_after_the_heartbeat_timeout_and_returns_with_its_id() {
    let scratch = Scratch::new().unwrap();
    let (hub, mut agents) = fleet(&scratch, 2, Timings::default()).unwrap();
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let (victim, other) = (ids[0].as_str(), ids[1].as_str());
    wait_online(&hub, &[victim, other], true, Duration::from_secs(10)).unwrap();

    agents[0].proc.as_mut().unwrap().kill();
    let killed = Instant::now();
    wait_online(&hub, &[victim], false, Duration::from_secs(8)).unwrap();
    let offline_after = killed.elapsed();
    eprintln!("offline {offline_after:?} after SIGKILL (heartbeat timeout 2s)");
    // Not before the timeout minus one heartbeat interval.
    assert!(offline_after >= Duration::from_millis(1500), "offline too early: {offline_after:?}");
    let devices = hub.devices().unwrap();
    assert!(devices.iter().any(|d| d.id == other && d.online), "the other agent went offline too");
    // Why: silent first, then its QUIC connection times out (the agent's
    // idle timeout, 5 s here), and the device says so, since its last word.
    let gone = wait_for(Duration::from_secs(10), "the session to time out", || {
        hub.device(victim).ok().filter(|d| d.offline.as_ref().is_some_and(|o| o.reason.starts_with("timed out")))
    })
    .unwrap();
    let offline = gone.offline.unwrap();
    assert_eq!(Some(offline.since_ms), gone.last_seen_ms, "offline since its last message");

    agents[0].start().unwrap();
    wait_online(&hub, &[victim], true, Duration::from_secs(10)).unwrap();
    assert_eq!(hub.devices().unwrap().len(), 2, "restart must not register a new device");
}

#[test]
fn agents_reconnect_by_themselves_after_a_hub_restart() {
    let scratch = Scratch::new().unwrap();
    let (mut hub, agents) = fleet(&scratch, 3, Timings::default()).unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    wait_online(&hub, &ids, true, Duration::from_secs(10)).unwrap();
    let before = hub.devices().unwrap();

    let status = hub.proc.as_mut().unwrap().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "hub did not stop cleanly on SIGTERM: {status:?}");
    hub.proc = None;
    hub.serve().unwrap();

    let after = wait_online(&hub, &ids, true, Duration::from_secs(15)).unwrap();
    assert_eq!(after.len(), 3);
    for d in &before {
        let again = after.iter().find(|a| a.id == d.id).unwrap();
        assert_eq!((&again.name, &again.enrolled_at), (&d.name, &d.enrolled_at));
    }
    for agent in &agents {
        assert!(agent.data_dir.join("identity/device.key").exists());
    }
}

#[test]
fn a_sigkilled_hub_comes_back_with_its_fleet() {
    let scratch = Scratch::new().unwrap();
    let (mut hub, agents) = fleet(&scratch, 2, Timings::default()).unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    wait_online(&hub, &ids, true, Duration::from_secs(10)).unwrap();
    hub.proc.as_mut().unwrap().kill();
    hub.proc = None;
    hub.serve().unwrap();
    wait_online(&hub, &ids, true, Duration::from_secs(15)).unwrap();
    let late = Agent::enroll(scratch.path(), &hub, "late", &Timings::default()).unwrap();
    assert_eq!(hub.devices().unwrap().len(), 3, "{late:?}");
}

#[test]
fn an_agent_stops_cleanly_on_sigterm_and_the_hub_notices() {
    let scratch = Scratch::new().unwrap();
    let (hub, mut agents) = fleet(&scratch, 1, Timings::default()).unwrap();
    let id = agents[0].id.clone();
    wait_online(&hub, &[&id], true, Duration::from_secs(10)).unwrap();
    let stopping = Instant::now();
    let status = agents[0].proc.as_mut().unwrap().terminate(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "agent did not exit cleanly: {status:?}");
    eprintln!("agent stopped {:?} after SIGTERM", stopping.elapsed());
    // The session is closed, not left to time out: the device is offline
    // at once, and says why.
    let closed = wait_for(Duration::from_secs(5), "the hub to see the session closed", || {
        hub.devices().ok()?.into_iter().find(|d| d.id == id).filter(|d| !d.connected)
    })
    .unwrap();
    let left = closed.offline.as_ref().map(|o| o.reason.as_str());
    assert!(!closed.online && left == Some("closed by the device (agent stopping)"), "{closed:?}");
    eprintln!("offline {:?} after SIGTERM (heartbeat timeout 2 s)", stopping.elapsed());
}

#[test]
fn without_a_name_in_its_config_an_agent_keeps_the_name_it_enrolled_with() {
    let scratch = Scratch::new().unwrap();
    let hub = outpost_tests::Hub::start(scratch.path(), Timings::default()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "enrolled-name", &Timings::default()).unwrap();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let without: String = text.lines().filter(|l| !l.starts_with("name =")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&agent.config, without).unwrap();
    agent.start().unwrap();
    let devices = wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    assert_eq!(devices[0].name, "enrolled-name");
}
