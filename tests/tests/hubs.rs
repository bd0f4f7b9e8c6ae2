//! Several hubs, one fleet: two hubs on one PostgreSQL database, agents
//! split across them, one hub woken by notifications, the other polling. Changes made on either hub reach devices on the other
//! within about a second and run once; a SIGKILLed hub's agents move to the
//! other and every record is stored once, in order; an enrollment token is
//! redeemed once across hubs.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::{CommandRequest, CommandStateView, EventKindView};
use outpost_shared::token;
use outpost_tests::{
    Agent, Hub, Scratch, Timings, assert_exactly_once_in_order, bin, run, two_hubs_with_broker, wait_all, wait_for,
    wait_online, wait_progress,
};
use std::process::Command;
use std::time::{Duration, Instant};

const RECORDS: u64 = 20_000;
const LOADGEN: [&str; 6] = ["--records", "20000", "--batch", "20", "--appends-per-sec", "60"];

/// Points an enrolled agent at `hubs` (`host:port`, comma-separated).
fn use_hubs(agent: &Agent, hubs: &str) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, text.replacen("[uplink]\n", &format!("[uplink]\nhub = {hubs:?}\n"), 1)).unwrap();
}

/// The hub holding `device`'s session, from the shared database.
fn holder(first: &Hub, device: &str) -> String {
    let pg = first.postgres.as_ref().unwrap();
    pg.psql("outpost", &format!("SELECT hub FROM sessions WHERE device = '{device}'")).unwrap().trim().to_owned()
}

/// The hub id a hub process logged at start.
fn hub_id(root: &std::path::Path) -> String {
    let log = std::fs::read_to_string(root.join("hub.log")).unwrap();
    let line = log.lines().rev().find(|l| l.contains("Hub serving.")).unwrap().to_owned();
    let at = line.find("hub=").unwrap() + 4;
    line[at..].split_whitespace().next().unwrap().trim_matches('"').to_owned()
}

fn echo(hub: &Hub, device: &str, text: &str) -> u64 {
    let request = CommandRequest { kind: "echo".into(), args: vec![text.into()], expires_in: None };
    hub.client().send_command(device, &request).unwrap().id
}

fn results_of(hub: &Hub, device: &str, command: u64) -> usize {
    hub.client()
        .events(device, 1000)
        .unwrap()
        .iter()
        .filter(|e| matches!(&e.event, EventKindView::CommandResult { command: c, .. } if *c == command))
        .count()
}

#[test]
fn two_hubs_on_one_database_serve_one_fleet() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut a = Hub::start_with(&scratch.path().join("a"), timings.clone(), "127.0.0.1:0", true).unwrap();
    let mut b = Hub::join(&scratch.path().join("b"), &a).unwrap();
    // B does not listen: changes made on A reach B's devices by B's polling
    // (as with an engine or pooler without LISTEN/NOTIFY); A listens.
    b.store_config.push_str("listen = false\n");
    b.kill();
    b.serve().unwrap();
    let (id_a, id_b) = (hub_id(&scratch.path().join("a")), hub_id(&scratch.path().join("b")));
    assert_ne!(id_a, id_b);

    // One agent on each hub; each enrolled through the hub it uses.
    let mut on_a = Agent::enroll(scratch.path(), &a, "on-a", &timings).unwrap();
    let mut on_b = Agent::enroll(scratch.path(), &b, "on-b", &timings).unwrap();
    use_hubs(&on_a, &a.quic_addr);
    use_hubs(&on_b, &b.quic_addr);
    on_a.start().unwrap();
    on_b.start().unwrap();
    let ids = [on_a.id.as_str(), on_b.id.as_str()];
    wait_online(&a, &ids, true, Duration::from_secs(15)).unwrap();
    assert_eq!(holder(&a, &on_a.id), id_a);
    assert_eq!(holder(&a, &on_b.id), id_b);

    // Every hub answers the same: each sees both devices online.
    for hub in [&a, &b] {
        let views = wait_online(hub, &ids, true, Duration::from_secs(5)).unwrap();
        assert!(views.iter().all(|v| v.connected && v.transport.as_deref() == Some("quic")), "{views:?}");
    }

    // A command made on each hub for the device on the other.
    for (hub, agent) in [(&a, &on_b), (&b, &on_a)] {
        let started = Instant::now();
        let command = echo(hub, &agent.id, "across");
        hub.wait_command(command, "the command to be delivered", |s| !matches!(s, CommandStateView::Queued));
        let delivered_in = started.elapsed();
        eprintln!("command delivered across hubs in {delivered_in:?}");
        assert!(delivered_in < Duration::from_secs(2), "delivery across hubs took {delivered_in:?}");
        let done =
            hub.wait_command(command, "the command to complete", |s| matches!(s, CommandStateView::Completed { .. }));
        assert!(matches!(done.state, CommandStateView::Completed { ref output, .. } if output.contains("across")));
        wait_for(Duration::from_secs(5), "the result in the event log", || {
            (results_of(hub, &agent.id, command) >= 1).then_some(())
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(500)); // a second run would have reported by now
        assert_eq!(results_of(hub, &agent.id, command), 1, "the command ran more than once");
    }

    // Desired state set on each hub for the device on the other.
    for (hub, agent) in [(&a, &on_b), (&b, &on_a)] {
        let started = Instant::now();
        let view = hub.client().put_desired(&agent.id, 0, serde_json::json!({"telemetry_interval": "2s"})).unwrap();
        let applied = wait_for(Duration::from_secs(10), "the device to apply it", || {
            hub.client().desired(&agent.id).ok().filter(|d| d.in_sync && d.reported_version == view.version)
        })
        .unwrap();
        eprintln!("desired state applied across hubs in {:?}", started.elapsed());
        assert_eq!(applied.version, 1);
    }

    // A token redeemed on A cannot be redeemed again on B: a copy of it
    // naming B (same id, same key, so the tag is valid) is refused there.
    let text = a.token("10m", 1).unwrap();
    let parsed = token::parse(&text).unwrap();
    let first = run(Command::new(bin("outpost-agent"))
        .args(["enroll", "--name", "first", "--token", &text, "--data-dir"])
        .arg(scratch.path().join("first")))
    .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let key = std::fs::read(a.data_dir.join("enroll.key")).unwrap();
    let again = token::issue(&token::TokenClaims { hub: b.quic_addr.clone(), ..parsed.claims }, &key);
    let second = run(Command::new(bin("outpost-agent"))
        .args(["enroll", "--name", "second", "--token", &again, "--data-dir"])
        .arg(scratch.path().join("second")))
    .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("used up"), "a token was redeemed twice: {err}");

    // An agent that knows both hubs streams records; the hub holding its
    // session is SIGKILLed; it moves to the other and loses nothing.
    on_a.proc.as_mut().unwrap().kill();
    on_b.proc.as_mut().unwrap().kill();
    a.token_hubs = Some(format!("{},{}", a.quic_addr, b.quic_addr));
    let mut streamer = Agent::enroll(scratch.path(), &a, "gen", &timings).unwrap();
    streamer.start_loadgen(&LOADGEN).unwrap();
    wait_progress(&a, &streamer.id, 3_000, Duration::from_secs(30));
    let held_by = holder(&a, &streamer.id);
    if held_by == id_a {
        a.kill();
    } else {
        b.kill();
    }
    eprintln!("killed the hub holding the session ({held_by})");
    let survivor = if held_by == id_a { &b } else { &a };
    let samples = wait_all(survivor, &streamer.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
    assert_ne!(holder(&a, &streamer.id), held_by, "the session did not move");
}

/// An MQTT fleet behind two hubs: both hubs subscribe with the same shared
/// group, so the broker hands a device's messages to either; every record
/// still arrives once and in order, and a command made on either hub runs
/// once.
#[test]
fn two_hubs_share_an_mqtt_fleet_and_keep_each_devices_order() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (a, b, broker) = two_hubs_with_broker(scratch.path(), &timings).unwrap();
    let mut streamer = Agent::enroll(scratch.path(), &a, "mqtt-gen", &timings).unwrap();
    streamer.use_transport(Some(&broker)).unwrap();
    streamer.start_loadgen(&["--records", "5000", "--batch", "20", "--appends-per-sec", "50"]).unwrap();
    let samples = wait_all(&b, &streamer.id, 5_000, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, 5_000);
    // The hubs take the device's numbers in the order they reach the
    // store, not the order it sent them: none of its own is refused.
    for hub in [&a, &b] {
        let log = hub.log_text();
        assert!(!log.contains("stale message"), "a hub refused the device's own message:\n{log}");
    }
    for (hub, text) in [(&a, "via a"), (&b, "via b")] {
        let command = echo(hub, &streamer.id, text);
        hub.wait_command(command, "the command over MQTT", |s| matches!(s, CommandStateView::Completed { .. }));
        wait_for(Duration::from_secs(5), "the result in the event log", || {
            (results_of(hub, &streamer.id, command) >= 1).then_some(())
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(500)); // a second run would have reported by now
        assert_eq!(results_of(hub, &streamer.id, command), 1, "the command ran more than once");
    }
}
