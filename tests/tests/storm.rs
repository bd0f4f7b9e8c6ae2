//! A hub restart is not a reconnect storm (issue 28): a fleet whose hub
//! comes back all at once is admitted at the hub's `[quic] accept_rate`;
//! the devices past it are told when to come back, come back then, and
//! are admitted without being turned away again and again.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Hub, Scratch, Timings, wait_for, wait_online};
use std::time::{Duration, Instant};

/// A sample of the hub's `/metrics` (0 when absent).
fn metric(hub: &Hub, sample: &str) -> f64 {
    let Ok(mut response) = ureq::get(format!("{}/metrics", hub.api)).call() else { return 0.0 };
    let text = response.body_mut().read_to_string().unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

#[test]
fn a_fleet_reconnecting_at_once_is_admitted_at_the_hubs_rate_and_obeys_its_retry_after() {
    const DEVICES: usize = 16;
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agents = Vec::new();
    for i in 0..DEVICES {
        let mut agent = Agent::enroll(scratch.path(), &hub, &format!("storm-{i}"), &timings).unwrap();
        agent.start().unwrap();
        agents.push(agent);
    }
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    wait_online(&hub, &ids, true, Duration::from_secs(30)).unwrap();

    // The hub dies and comes back at once with a door of 4 a second after
    // a burst of 2: its stateless resets tell every device at the same
    // moment that its connection is gone.
    hub.kill();
    hub.quic_extra = "accept_rate = 4\naccept_burst = 2\n".into();
    let back = Instant::now();
    hub.serve().unwrap();
    let open = || metric(&hub, "outpost_hub_sessions_open{transport=\"quic\"}");
    wait_for(Duration::from_secs(60), "every device to have a session with the new hub", || {
        (open() >= DEVICES as f64).then_some(())
    })
    .unwrap();
    let took = back.elapsed();
    wait_online(&hub, &ids, true, Duration::from_secs(10)).unwrap();

    let busy = metric(&hub, "outpost_hub_connections_turned_away_total{reason=\"busy\"}");
    let sessions = metric(&hub, "outpost_hub_sessions_total{transport=\"quic\"}");
    eprintln!("{DEVICES} devices back in {took:?}: {sessions} sessions, {busy} connections told to come back later");
    // Most of the fleet came past the door at once and was told when to
    // come back ...
    assert!(busy >= (DEVICES / 2) as f64, "only {busy} of {DEVICES} devices were turned away");
    // ... and came back then and was admitted: each was told about once,
    // where devices retrying on their own backoff would be turned away
    // several times each.
    assert!(busy <= (DEVICES + DEVICES / 2) as f64, "{busy} busy answers for {DEVICES} devices");
    assert!(sessions <= (DEVICES + 2) as f64, "{sessions} sessions for {DEVICES} devices");
    // Admitted at the rate: 14 devices past the burst at 4 a second take
    // more than 3 s.
    assert!(took >= Duration::from_secs(3), "the whole fleet was back in {took:?}: the door let it all in");
    let obeyed = agents.iter().filter(|a| a.log_text().contains("coming back when it said")).count();
    assert!(obeyed as f64 >= busy / 2.0, "{obeyed} agents logged that they obey the hub's retry-after");
    // The hub says so in its log, in a line per 10 s, not one per device.
    let lines = hub.log_text().matches("Connections turned away at the door").count();
    let bound = 1 + back.elapsed().as_secs() / 10;
    assert!(lines >= 1 && lines as u64 <= bound, "{lines} lines about turned-away connections (at most {bound})");
}

/// Devices enrolled all at once past the door's rate are told to come back
/// and enroll when they do: `outpost-agent enroll` obeys the busy answer
/// instead of failing.
#[test]
fn enrollments_past_the_hubs_rate_wait_their_turn_and_succeed() {
    const DEVICES: usize = 5;
    let scratch = Scratch::new().unwrap();
    let mut hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    hub.kill();
    hub.quic_extra = "accept_rate = 2\naccept_burst = 1\n".into();
    hub.serve().unwrap();
    let tokens: Vec<String> = (0..DEVICES).map(|_| hub.token("10m", 1).unwrap()).collect();
    let enrolls: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let dir = scratch.path().join(format!("late-{i}"));
            std::thread::spawn(move || {
                outpost_tests::run(
                    std::process::Command::new(outpost_tests::bin("outpost-agent"))
                        .args(["enroll", "--name", &format!("late-{i}"), "--token", &token, "--data-dir"])
                        .arg(&dir),
                )
                .unwrap()
            })
        })
        .collect();
    for (i, enroll) in enrolls.into_iter().enumerate() {
        let out = enroll.join().unwrap();
        assert!(
            out.status.success(),
            "enrollment {i} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let busy = metric(&hub, "outpost_hub_connections_turned_away_total{reason=\"busy\"}");
    assert!(busy >= 1.0, "no enrollment came past the door's rate ({busy} busy answers)");
    assert_eq!(hub.devices().unwrap().len(), DEVICES);
}
