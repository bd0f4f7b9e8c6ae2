//! The MQTT uplink against a real Mosquitto: the same guarantees as QUIC.
//! Every test starts its own broker on free ports (see
//! [`outpost_tests::Broker`]): a TLS listener enforcing
//! `configs/mosquitto-acl`, and a permissive one for playing an attacker.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_agent::identity::Identity;
use outpost_hub::api::CommandRequest;
use outpost_hub::api::{CommandStateView, OutcomeView};
use outpost_shared::DeviceId;
use outpost_shared::mqtt::{UpKind, up_topic};
use outpost_shared::protocol::{
    Batch, Direction, Envelope, Fresh, Hello, Message, Record, RecordBody, Signed, StateReport,
};
use outpost_shared::time::Timestamp;
use outpost_tests::{
    Agent, Broker, Hub, Scratch, Timings, assert_exactly_once_in_order, hub_with_broker, two_hubs_with_broker,
    wait_all, wait_for, wait_online, wait_progress,
};
use std::time::Duration;

fn mqtt_agent(scratch: &Scratch, hub: &Hub, broker: &Broker, name: &str, extra: &str) -> Agent {
    let agent = Agent::enroll_with(scratch.path(), hub, name, &Timings::default(), extra).unwrap();
    agent.use_transport(Some(broker)).unwrap();
    agent
}

#[test]
fn a_fleet_over_mqtt_works_as_over_quic() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let mut agents: Vec<Agent> =
        (0..2).map(|i| mqtt_agent(&scratch, &hub, &broker, &format!("mqtt-{i}"), "")).collect();
    for agent in &mut agents {
        agent.start().unwrap();
    }
    let owned: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
    wait_for(Duration::from_secs(15), "both agents online over MQTT with telemetry", || {
        let devices = hub.devices().ok()?;
        ids.iter()
            .all(|id| {
                devices
                    .iter()
                    .any(|d| d.id == *id && d.online && d.transport.as_deref() == Some("mqtt") && d.telemetry.is_some())
            })
            .then_some(())
    })
    .unwrap();
    // Through the broker, with the device ids from the certificates.
    let log = broker.log_text();
    for id in &ids {
        assert!(log.contains(&format!("u'{id}'")), "{id} did not connect to the broker:\n{log}");
    }
    let first = hub.device(ids[0]).unwrap();
    assert_eq!(first.name, "mqtt-0");
    assert_eq!(first.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));

    // Commands.
    let client = hub.client();
    let request = CommandRequest { kind: "echo".into(), args: vec!["over mqtt".into()], expires_in: None };
    let cmd = client.send_command(ids[0], &request).unwrap();
    let done = hub.wait_command(cmd.id, "the echo's result", |s| matches!(s, CommandStateView::Completed { .. }));
    match done.state {
        CommandStateView::Completed { outcome: OutcomeView::Succeeded, output, .. } => assert_eq!(output, "over mqtt"),
        other => panic!("echo: {other:?}"),
    }

    // Desired state: applied and reported.
    client.put_desired(ids[1], 0, serde_json::json!({ "telemetry_interval": "1s" })).unwrap();
    wait_for(Duration::from_secs(15), "desired state applied over MQTT", || {
        client.desired(ids[1]).ok().filter(|d| d.in_sync && d.reported_version == 1)
    })
    .unwrap();

    // Telemetry keeps flowing; records arrive in sequence.
    let before = hub.device(ids[1]).unwrap().last_seq;
    wait_progress(&hub, ids[1], before + 2, Duration::from_secs(10));

    // A stopped agent goes offline after the heartbeat timeout.
    agents[0].proc.as_mut().unwrap().kill();
    wait_online(&hub, &[ids[0]], false, Duration::from_secs(10)).unwrap();
    assert!(hub.device(ids[1]).unwrap().online, "the other agent went offline too");
}

/// 20 000 records over about 25 s, so the broker restarts land while the
/// agent produces.
const LOADGEN: [&str; 6] = ["--records", "20000", "--batch", "20", "--appends-per-sec", "40"];
const RECORDS: u64 = 20_000;

#[test]
fn broker_killed_and_restarted_while_the_agent_produces_loses_and_doubles_nothing() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, mut broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let mut agent = mqtt_agent(&scratch, &hub, &broker, "gen", "");
    agent.start_loadgen(&LOADGEN).unwrap();
    let mut seen = 0;
    for cycle in 1..=4u64 {
        seen = wait_progress(&hub, &agent.id, cycle * RECORDS / 5, Duration::from_secs(60));
        let noticed = |agent: &Agent| agent.log_text().matches("MQTT broker").count();
        let before = noticed(&agent);
        broker.kill();
        // Production goes on into the outbox while the broker is away.
        let produced = seen;
        wait_for(Duration::from_secs(10), "the agent to notice", || (noticed(&agent) > before).then_some(())).unwrap();
        broker.restart().unwrap();
        eprintln!("cycle {cycle}: broker killed at hub seq {produced} and restarted");
    }
    let samples = wait_all(&hub, &agent.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
    assert!(seen > 0);
}

#[test]
fn switching_between_mqtt_and_quic_mid_stream_is_exactly_once_in_order() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let mut agent = mqtt_agent(&scratch, &hub, &broker, "switcher", "");
    agent.start_loadgen(&LOADGEN).unwrap();
    for (step, to_mqtt) in [(1u64, false), (2, true), (3, false)] {
        wait_progress(&hub, &agent.id, step * RECORDS / 4, Duration::from_secs(60));
        let want = if to_mqtt { "mqtt" } else { "quic" };
        agent.proc.as_mut().unwrap().terminate(Duration::from_secs(10));
        agent.use_transport(to_mqtt.then_some(&broker)).unwrap();
        agent.start_loadgen(&LOADGEN).unwrap();
        wait_for(Duration::from_secs(15), &format!("the agent on {want}"), || {
            hub.device(&agent.id).ok().filter(|d| d.transport.as_deref() == Some(want))
        })
        .unwrap();
        eprintln!("step {step}: switched to {want}");
    }
    let samples = wait_all(&hub, &agent.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
}

/// `message` as an agent of protocol 11 sends it over MQTT: numbered `seq`
/// in `session`, with no ticket, signed for `device` by `sign`.
fn fresh(device: &DeviceId, session: u64, seq: u64, message: Message, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let fresh = Message::Fresh(Fresh { session, sender: 0, seq, ticket: Vec::new(), message: Box::new(message) });
    Envelope::new(Message::Signed(Signed::new(Direction::Up, device.clone(), &fresh, sign))).encode()
}

/// Connects with `options`, publishes `payload` to `topic` (QoS 1) and
/// returns once the broker acknowledged it.
fn publish_with(options: rumqttc::MqttOptions, topic: &str, payload: Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
        let acked = async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), acked).await.unwrap();
    });
}

/// Publishes `payload` to `topic` through the broker's permissive listener,
/// as any client on a careless broker could.
fn publish_anonymously(broker: &Broker, topic: &str, payload: Vec<u8>) {
    publish_with(rumqttc::MqttOptions::new("intruder", "127.0.0.1", broker.plain_port), topic, payload);
}

/// Options for the devices' listener with `identity`'s certificate and key,
/// asking for client id `client_id` (on `port`: the devices' or the hubs').
fn device_options(broker: &Broker, port: u16, identity: &Identity, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    let roots = outpost_shared::mqtt::read_pem_certs(&broker.ca_file).unwrap();
    let tls = outpost_shared::mqtt::tls_client_config(&roots, vec![identity.cert.clone()], identity.key()).unwrap();
    options.set_transport(rumqttc::Transport::tls_with_config(tls.into()));
    options
}

#[test]
fn messages_for_another_device_or_with_forged_signatures_are_rejected_and_logged() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    // The victim never runs: anything stored for it came from the intruder.
    let victim = mqtt_agent(&scratch, &hub, &broker, "victim", "");
    let intruder = mqtt_agent(&scratch, &hub, &broker, "intruder", "");
    let victim_id: DeviceId = victim.id.parse().unwrap();
    let intruder_id: DeviceId = intruder.id.parse().unwrap();
    let identity = Identity::load(&intruder.data_dir).unwrap();
    let signer = identity.signer().unwrap();
    let sign = |input: &[u8]| signer.sign(input);
    let record = Record {
        seq: 1,
        at: Timestamp::now(),
        body: RecordBody::StateReport(StateReport { applied_version: 9, error: None }),
    };
    let batch_topic = up_topic(&victim_id, UpKind::Batch);
    let hello_topic = up_topic(&victim_id, UpKind::Hello);
    let hello = Message::Hello(Hello { agent_version: "x".into(), name: "hijacked".into(), started_at: Timestamp(1) });
    let own_batch = Message::Batch(Batch::new(intruder_id.clone(), std::slice::from_ref(&record), sign));
    let forged_batch = Message::Batch(Batch::new(victim_id.clone(), std::slice::from_ref(&record), sign));
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "the intruder's own valid batch on the victim's topic",
            batch_topic.clone(),
            fresh(&intruder_id, 1, 1, own_batch.clone(), sign),
            "on dev-",
        ),
        (
            "a batch claiming the victim as origin, signed by the intruder",
            batch_topic.clone(),
            fresh(&victim_id, 1, 1, forged_batch.clone(), sign),
            "signature does not verify",
        ),
        (
            "a batch as agents before protocol 11 sent it (no freshness)",
            batch_topic.clone(),
            Envelope::new(own_batch).encode(),
            "without freshness",
        ),
        (
            "a hello in the victim's name, signed by the intruder",
            hello_topic.clone(),
            fresh(&victim_id, 1, 1, hello.clone(), sign),
            "signature does not verify",
        ),
        (
            "the intruder's own signed hello on the victim's topic",
            hello_topic.clone(),
            fresh(&intruder_id, 1, 1, hello.clone(), sign),
            "on dev-",
        ),
        (
            "garbage after a valid version",
            batch_topic.clone(),
            vec![outpost_shared::protocol::PROTOCOL_VERSION as u8, 0xFF, 0xFF, 0xFF],
            "malformed envelope",
        ),
    ];
    for (what, topic, payload, reason) in cases {
        publish_anonymously(&broker, &topic, payload);
        wait_for(Duration::from_secs(10), &format!("the hub to reject {what}"), || {
            let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("Rejected MQTT message") && l.contains(&victim.id) && l.contains(reason))
                .then_some(())
        })
        .unwrap();
        eprintln!("rejected: {what}");
    }
    let view = hub.device(&victim.id).unwrap();
    assert_eq!(view.last_seq, 0, "a forged record was stored");
    assert_eq!(view.name, "victim", "a forged hello renamed the device");
    assert!(!view.online, "forged messages made the device look online");
    assert_eq!(hub.client().desired(&victim.id).unwrap().reported_version, 0);

    // On the TLS listener the ACL stops a device at the broker already.
    let mut intruder = intruder;
    let topic_of_victim = batch_topic;
    intruder.start().unwrap();
    wait_online(&hub, &[&intruder.id], true, Duration::from_secs(15)).unwrap();
    // The intruder device's own traffic is allowed; now play a compromised
    // device publishing into the victim's topic with its own certificate.
    let options = device_options(&broker, broker.tls_port, &identity, "intruder-2");
    publish_with(options, &topic_of_victim, vec![1, 2, 3]);
    wait_for(Duration::from_secs(5), "the broker to deny the publish", || {
        broker.log_text().lines().any(|l| l.contains("Denied PUBLISH") && l.contains(&topic_of_victim)).then_some(())
    })
    .unwrap();

    // A replayed (validly signed) hello cannot take a device's deliveries
    // away from its open QUIC session: it is answered, and taken no further
    // (no fresh message of its session follows).
    let mut victim = victim;
    victim.use_transport(None).unwrap();
    victim.start().unwrap();
    wait_for(Duration::from_secs(15), "the victim online over QUIC", || {
        hub.device(&victim.id).ok().filter(|d| d.online && d.transport.as_deref() == Some("quic"))
    })
    .unwrap();
    let victim_identity = Identity::load(&victim.data_dir).unwrap();
    let victim_signer = victim_identity.signer().unwrap();
    let replayed = fresh(&victim_id, 99, 1, hello, |input| victim_signer.sign(input));
    let recorder = Recorder::start(&broker);
    publish_anonymously(&broker, &hello_topic, replayed);
    wait_for(Duration::from_secs(10), "the hub to answer the replayed hello", || {
        let answered = recorder.find("/down", "Welcome");
        answered.iter().any(|(topic, _)| topic.contains(victim.id.as_str())).then_some(())
    })
    .unwrap();
    let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
    let taken = log.lines().any(|l| l.contains("Session opened") && l.contains("mqtt") && l.contains(&victim.id));
    assert!(!taken, "the replayed hello opened an MQTT session");
    assert_eq!(hub.device(&victim.id).unwrap().transport.as_deref(), Some("quic"));
    let request = CommandRequest { kind: "echo".into(), args: vec!["still quic".into()], expires_in: None };
    let cmd = hub.client().send_command(&victim.id, &request).unwrap();
    let done = hub.wait_command(cmd.id, "the echo over QUIC", |s| matches!(s, CommandStateView::Completed { .. }));
    assert!(matches!(done.state, CommandStateView::Completed { outcome: OutcomeView::Succeeded, .. }), "{done:?}");
    assert!(!victim.log_text().contains("replaced"), "the replay closed the device's QUIC session");
}

/// Messages recorded: (topic, payload) in order.
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Everything published under `outpost/v1/#`, as an eavesdropper on the
/// broker's permissive listener records it.
struct Recorder {
    seen: Recorded,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn start(broker: &Broker) -> Self {
        let seen = Recorded::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (port, (subscribed, on_sub)) = (broker.plain_port, std::sync::mpsc::channel());
        let (into, until) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let options = rumqttc::MqttOptions::new("eavesdropper", "127.0.0.1", port);
                let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
                client.subscribe("outpost/v1/#", rumqttc::QoS::AtLeastOnce).await.unwrap();
                while !until.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await else {
                        continue;
                    };
                    match event {
                        rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                            let _ = subscribed.send(());
                        }
                        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                            into.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
                        }
                        _ => {}
                    }
                }
            });
        });
        on_sub.recv_timeout(Duration::from_secs(10)).unwrap();
        Recorder { seen, stop }
    }

    /// The recorded messages on topics ending in `suffix` whose message
    /// (inside `Signed` and `Fresh`) is a `kind`.
    fn find(&self, suffix: &str, kind: &str) -> Vec<(String, Vec<u8>)> {
        let inner = |payload: &[u8]| -> Option<String> {
            let Message::Signed(signed) = Envelope::decode(payload).ok()?.message else { return None };
            match signed.message().ok()? {
                Message::Fresh(fresh) => Some(fresh.message.kind().to_owned()),
                other => Some(other.kind().to_owned()),
            }
        };
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(t, p)| t.ends_with(suffix) && inner(p).as_deref() == Some(kind)).cloned().collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn replayed_welcome_deliver_heartbeat_and_batch_are_refused_and_change_nothing() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (mut hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let recorder = Recorder::start(&broker);
    let mut agent = mqtt_agent(&scratch, &hub, &broker, "replayed", "");
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(15)).unwrap();
    let request = CommandRequest { kind: "echo".into(), args: vec!["once".into()], expires_in: None };
    let cmd = hub.client().send_command(&agent.id, &request).unwrap();
    hub.wait_command(cmd.id, "the echo", |s| matches!(s, CommandStateView::Completed { .. }));
    let old_welcome = recorder.find("/down", "Welcome").remove(0);
    let old_deliver = recorder.find("/down", "Deliver").into_iter().last().unwrap();

    // A new session; the old one's Welcome and Deliver, replayed at the
    // device, are refused: its session goes on, the echo does not run again.
    agent.proc.as_mut().unwrap().kill();
    agent.start().unwrap();
    wait_for(Duration::from_secs(15), "the second session", || {
        (agent.log_text().matches("Connected to the hub").count() == 2).then_some(())
    })
    .unwrap();
    for _ in 0..5 {
        publish_anonymously(&broker, &old_welcome.0, old_welcome.1.clone());
        publish_anonymously(&broker, &old_deliver.0, old_deliver.1.clone());
    }
    wait_for(Duration::from_secs(10), "the agent to refuse ten replays", || {
        let log = agent.log_text();
        let refused = log.lines().filter(|l| l.contains("Ignored a down message") && l.contains("a replay")).count();
        (refused >= 10).then_some(())
    })
    .unwrap();
    assert_eq!(agent.log_text().matches("Connected to the hub").count(), 2, "a replayed Welcome restarted the session");
    let events = hub.client().events(&agent.id, 1000).unwrap();
    let results: Vec<_> = events
        .into_iter()
        .filter(|e| matches!(e.event, outpost_hub::api::EventKindView::CommandResult { .. }))
        .collect();
    assert_eq!(results.len(), 1, "the echo ran again: {results:?}");

    // The device dies; its heartbeats and a batch, replayed at the hub, are
    // refused and it stays offline with nothing new stored.
    let beats = recorder.find("/heartbeat", "Heartbeat");
    let batch = recorder.find("/batch", "Batch").into_iter().last().unwrap();
    assert!(beats.len() >= 2, "{} heartbeats recorded", beats.len());
    agent.proc.as_mut().unwrap().kill();
    wait_online(&hub, &[&agent.id], false, Duration::from_secs(20)).unwrap();
    let before = hub.device(&agent.id).unwrap();
    let hub_log = scratch.path().join("hub.log");
    let stale_before = std::fs::read_to_string(&hub_log).unwrap().matches("stale message").count();
    let replays: Vec<_> = beats.iter().rev().take(5).chain(std::iter::once(&batch)).collect();
    for (topic, payload) in &replays {
        publish_anonymously(&broker, topic, payload.clone());
    }
    wait_for(Duration::from_secs(10), "the hub to refuse every replay", || {
        let stale = std::fs::read_to_string(&hub_log).unwrap().matches("stale message").count();
        (stale >= stale_before + replays.len()).then_some(())
    })
    .unwrap();
    // Refused messages are dropped where they are refused: nothing after
    // the refusal can change the device.
    let now = hub.device(&agent.id).unwrap();
    assert!(!now.online, "a replayed heartbeat brought a dead device online");
    assert_eq!((now.last_seq, now.last_seen), (before.last_seq, before.last_seen.clone()));

    // A restarted hub remembers the numbers taken (they are in its
    // store): the old hello and heartbeats, replayed again, are refused
    // and not answered.
    let hello = recorder.find("/hello", "Hello").remove(0);
    hub.kill();
    hub.serve().unwrap();
    wait_for(Duration::from_secs(15), "the restarted hub at the broker", || {
        (hub.log_text().matches("Connected to the MQTT broker").count() >= 2).then_some(())
    })
    .unwrap();
    let welcomes = recorder.find("/down", "Welcome").len();
    let opened = hub.log_text().matches("Session opened").count();
    let stale_before = hub.log_text().matches("stale message").count();
    let replays: Vec<_> = std::iter::repeat_n(&hello, 3).chain(beats.iter().rev().take(3)).collect();
    for (topic, payload) in &replays {
        publish_anonymously(&broker, topic, payload.clone());
    }
    wait_for(Duration::from_secs(10), "the restarted hub to refuse every replay", || {
        (hub.log_text().matches("stale message").count() >= stale_before + replays.len()).then_some(())
    })
    .unwrap();
    assert_eq!(recorder.find("/down", "Welcome").len(), welcomes, "the restarted hub answered a replayed hello");
    let now = hub.device(&agent.id).unwrap();
    assert!(!now.online, "a replay brought a dead device online after a restart");
    assert_eq!((now.last_seen, now.connected), (before.last_seen, false));
    assert_eq!(hub.log_text().matches("Session opened").count(), opened, "a replayed hello opened a session");
}

/// Two hubs of one fleet in one shared subscription: the broker hands a
/// device's messages to either, so a message one hub took may be replayed
/// to the other. Both refuse it: the numbers taken are the fleet's (kept
/// in the shared store), not each hub's.
#[test]
fn replays_are_refused_by_every_hub_of_a_shared_subscription() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (a, b, broker) = two_hubs_with_broker(scratch.path(), &timings).unwrap();
    let recorder = Recorder::start(&broker);
    let mut agent = mqtt_agent(&scratch, &a, &broker, "replayed", "");
    agent.start().unwrap();
    wait_online(&a, &[&agent.id], true, Duration::from_secs(15)).unwrap();
    // Enough heartbeats and batches that both hubs took some of them.
    wait_progress(&a, &agent.id, 6, Duration::from_secs(15));
    wait_for(Duration::from_secs(15), "heartbeats taken by both hubs", || {
        (recorder.find("/heartbeat", "Heartbeat").len() >= 8).then_some(())
    })
    .unwrap();
    agent.proc.as_mut().unwrap().kill();
    wait_online(&a, &[&agent.id], false, Duration::from_secs(20)).unwrap();
    let before = a.device(&agent.id).unwrap();
    let stale = || a.log_text().matches("stale message").count() + b.log_text().matches("stale message").count();
    let stale_before = stale();
    // The newest messages: a hub that took a later message of the session
    // refuses an older one by its own count, but the newest heartbeats and
    // batch each came to one hub only. Each is replayed four times, and the
    // broker hands the copies to the two hubs in turn.
    let beats = recorder.find("/heartbeat", "Heartbeat");
    let batches = recorder.find("/batch", "Batch");
    let newest = beats[beats.len() - 3..].iter().chain(batches.last());
    let replays: Vec<_> = newest.flat_map(|m| std::iter::repeat_n(m.clone(), 4)).collect();
    for (topic, payload) in &replays {
        publish_anonymously(&broker, topic, payload.clone());
    }
    wait_for(Duration::from_secs(20), "the hubs to refuse every replay", || {
        (stale() >= stale_before + replays.len()).then_some(())
    })
    .map_err(|e| {
        let taken = stale_before + replays.len() - stale();
        anyhow::anyhow!("{e}: {taken} of {} replays were taken by a hub", replays.len())
    })
    .unwrap();
    for hub in [&a, &b] {
        let now = hub.device(&agent.id).unwrap();
        assert!(!now.online, "a replayed heartbeat brought a dead device online");
        assert_eq!((now.last_seq, now.last_seen), (before.last_seq, before.last_seen.clone()));
    }
}

#[test]
fn a_stolen_certificate_cannot_take_another_devices_client_id_at_the_broker() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let mut victim = mqtt_agent(&scratch, &hub, &broker, "victim", "");
    let thief = mqtt_agent(&scratch, &hub, &broker, "stolen", "");
    victim.start().unwrap();
    wait_online(&hub, &[&victim.id], true, Duration::from_secs(15)).unwrap();
    // The stolen device's certificate asks for the victim's client id, again
    // and again: with the shipped broker config (configs/mosquitto.conf)
    // the broker names the connection after the certificate instead.
    let stolen = Identity::load(&thief.data_dir).unwrap();
    let own_topic = up_topic(&stolen.device_id, UpKind::Heartbeat);
    for _ in 0..5 {
        publish_with(device_options(&broker, broker.tls_port, &stolen, &victim.id), &own_topic, vec![0]);
    }
    wait_for(Duration::from_secs(10), "the broker to name the thief by its certificate", || {
        let log = broker.log_text();
        (log.matches(&format!("as {} ", thief.id)).count() >= 5).then_some(())
    })
    .unwrap();
    let log = broker.log_text();
    assert!(
        !log.contains(&format!("Client {} already connected", victim.id)),
        "the broker closed the victim's connection:\n{log}"
    );
    assert_eq!(victim.log_text().matches("Connected to the hub").count(), 1, "the victim had to reconnect");
    assert!(hub.device(&victim.id).unwrap().online);
    // A device certificate cannot sign in where the hubs do (no password).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = runtime.block_on(async {
        let options = device_options(&broker, broker.hub_port, &stolen, &victim.id);
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await.unwrap() {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => return format!("{:?}", ack.code),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    });
    assert!(!refused.contains("Success"), "a device signed in on the hubs' listener: {refused}");
    assert_eq!(victim.log_text().matches("Connected to the hub").count(), 1, "the victim had to reconnect");
}
