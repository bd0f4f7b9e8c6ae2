//! Identities that outlive their certificates (issue 22): the hub renews
//! its own TLS certificate while it runs, and every path that presents it
//! (QUIC sessions and enrollment, the MQTT bridge's client side) takes the
//! new one without dropping what is connected; devices renew theirs over
//! their session (QUIC or MQTT) without a restart or a lost record, also
//! after months offline, by the hub's clock.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{
    Agent, Broker, Hub, Scratch, Timings, assert_exactly_once_in_order, faketime, hub_with_broker, outpostctl,
    wait_all, wait_for, wait_online,
};
use std::time::{Duration, Instant};

/// The device certificate an agent holds now (PEM).
fn device_cert(agent: &Agent) -> String {
    std::fs::read_to_string(agent.data_dir.join("identity/device.crt")).unwrap()
}

/// When a PEM certificate stops being valid, as the API writes it.
fn not_after(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, until) = outpost_shared::identity::validity_of(&der).unwrap();
    outpost_shared::time::Timestamp::from_system(until).rfc3339()
}

/// Device certificates of 30 s (renewed at two thirds: about every 20 s)
/// while the load generator streams 20,000 records over about 40 s: the
/// device renews twice within one session (new key each time, proven to
/// the hub beside the session), every record arrives once and in order,
/// and after the first certificate has long expired a restarted agent
/// connects with the renewed one. The hub's audit log names each renewal.
#[test]
fn a_device_renews_its_certificate_within_its_session_while_streaming() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.quic_extra = "device_cert_lifetime = \"30s\"\n".into();
    hub.kill();
    hub.serve().unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "renewer", &timings).unwrap();
    let first = device_cert(&agent);
    let started = Instant::now();
    agent.start_loadgen(&["--records", "20000", "--batch", "20", "--appends-per-sec", "25"]).unwrap();
    wait_for(Duration::from_secs(70), "two renewals by the device", || {
        (agent.log_text().matches("Switched to the renewed certificate.").count() >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let samples = wait_all(&hub, &agent.id, 20_000, Duration::from_secs(60));
    assert_exactly_once_in_order(&samples, 20_000);
    let log = agent.log_text();
    assert_eq!(log.matches("Connected to the hub.").count(), 1, "the session was not kept:\n{log}");
    assert!(!log.contains("WARN"), "{log}");
    assert_ne!(device_cert(&agent), first);
    assert!(!agent.data_dir.join("identity/next.crt").exists() && !agent.data_dir.join("identity/next.key").exists());
    let audit = hub.client().audit("action=renew%20certificate").unwrap();
    assert!(audit.entries.iter().filter(|e| e.target == agent.id).count() >= 2, "{:?}", audit.entries);

    // Past the first certificate's end: a new handshake needs the renewed one.
    wait_for(Duration::from_secs(40), "the first certificate to expire", || {
        (started.elapsed() > Duration::from_secs(35)).then_some(())
    })
    .unwrap();
    agent.proc.as_mut().unwrap().kill();
    agent.start().unwrap();
    wait_for(Duration::from_secs(20), "the agent to reconnect", || {
        (agent.log_text().matches("Connected to the hub.").count() >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    // The hub knows when the certificate the device uses expires.
    wait_for(Duration::from_secs(30), "the hub to know the certificate's expiry", || {
        let known = hub.device(&agent.id).ok()?.certificate_expires?;
        (known == not_after(&device_cert(&agent))).then_some(())
    })
    .unwrap();
}

/// Over MQTT the renewal request and answer travel as signed messages; the
/// agent then reconnects to the broker (which checks client certificates)
/// with the new certificate, and the hub takes the new key from the first
/// message signed with it.
#[test]
fn a_device_renews_its_certificate_over_mqtt() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "device_cert_lifetime = \"30s\"\n").unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "mqtt-renewer", &timings).unwrap();
    agent.use_transport(Some(&broker)).unwrap();
    let first = device_cert(&agent);
    // The hub knows when the certificate it signed at enrollment expires,
    // though over MQTT it never sees it in a handshake.
    let known = hub.device(&agent.id).unwrap().certificate_expires;
    assert_eq!(known.as_deref(), Some(not_after(&first).as_str()));
    agent.start().unwrap();
    wait_for(Duration::from_secs(60), "a renewal over MQTT", || {
        agent.log_text().contains("Switched to the renewed certificate.").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_ne!(device_cert(&agent), first);
    // Still online, and its telemetry still accepted (signed with the new key).
    let seen = hub.device(&agent.id).unwrap().last_seq;
    wait_for(Duration::from_secs(30), "records signed with the new key", || {
        let device = hub.device(&agent.id).ok()?;
        (device.online && device.last_seq > seen).then_some(())
    })
    .unwrap();
    let hub_log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap();
    assert!(hub_log.contains("Device signs with its renewed certificate's key."), "{hub_log}");
    assert!(!hub_log.contains("Rejected MQTT message"), "{hub_log}");
    // And the renewed one's, from the renewal.
    let renewed = not_after(&device_cert(&agent));
    assert_ne!(renewed, not_after(&first));
    let known = wait_for(Duration::from_secs(10), "the renewed certificate's expiry", || {
        hub.device(&agent.id).ok()?.certificate_expires.filter(|at| *at >= renewed)
    })
    .unwrap();
    assert!(known >= renewed, "{known} < {renewed}");
}

/// Months ahead, by libfaketime: hub and agent 250 days after enrollment
/// (past two thirds of the 365-day certificate) renew on the first
/// connection; then 400 days after (the first certificate expired) the
/// device connects with the renewed one; then with the device's clock at
/// 1970 the hub's clock still decides (day 500: renewed again). Last, the
/// hub at day 1000, past the end of every certificate the device holds: it
/// is refused, the device says so, the API and `outpostctl` show it as
/// `expired`; `outpostctl readmit` lets it renew once, and everything it
/// recorded meanwhile arrives.
#[test]
fn a_device_renews_after_months_offline_by_the_hubs_clock_and_is_readmitted_when_expired() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "sleeper", &timings).unwrap();
    let first = device_cert(&agent);
    let (hub_clock, agent_clock) = (scratch.path().join("hub-clock"), scratch.path().join("agent-clock"));
    hub.env = faketime(&hub_clock);
    agent.env = faketime(&agent_clock);
    let restart_hub = |hub: &mut Hub, offset: &str| {
        std::fs::write(&hub_clock, format!("{offset}\n")).unwrap();
        hub.kill();
        hub.serve().unwrap();
    };
    let switched = |agent: &Agent| agent.log_text().matches("Switched to the renewed certificate.").count();

    // Both 250 days on: renewed at the first connection.
    restart_hub(&mut hub, "+250d");
    std::fs::write(&agent_clock, "+250d\n").unwrap();
    agent.start().unwrap();
    wait_for(Duration::from_secs(30), "the renewal", || (switched(&agent) == 1).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_ne!(device_cert(&agent), first);
    agent.proc.as_mut().unwrap().kill();

    // Both 400 days on: the renewed certificate (valid to day 615) works.
    restart_hub(&mut hub, "+400d");
    std::fs::write(&agent_clock, "+400d\n").unwrap();
    let before = agent.log_text().matches("Connected to the hub.").count();
    agent.start().unwrap();
    wait_for(Duration::from_secs(20), "a session at day 400", || {
        (agent.log_text().matches("Connected to the hub.").count() > before).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    agent.proc.as_mut().unwrap().kill();

    // The hub at day 500 (past two thirds of the certificate renewed at day
    // 250), the device's clock back at 1970: it renews, as the hub's clock
    // says, and takes the hub's certificate (issued at day 500, long after
    // this agent was built).
    let renewed = device_cert(&agent);
    restart_hub(&mut hub, "+500d");
    std::fs::write(&agent_clock, "@1970-01-02 00:00:00\n").unwrap();
    agent.start().unwrap();
    wait_for(Duration::from_secs(30), "a renewal with the device at 1970", || (switched(&agent) == 2).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_ne!(device_cert(&agent), renewed);
    agent.proc.as_mut().unwrap().kill();

    // The hub at day 1000: the certificate renewed at day 500 ended at day
    // 865. The device is refused and says so; the hub shows why.
    let held = hub.device(&agent.id).unwrap().last_seq;
    restart_hub(&mut hub, "+1000d");
    std::fs::write(&agent_clock, "+1000d\n").unwrap();
    agent.start().unwrap();
    wait_for(Duration::from_secs(20), "the agent to say its certificate is refused", || {
        agent.log_text().contains("The hub refuses this device's certificate").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert!(agent.log_text().contains("certificate expired"), "{}", agent.log_text());
    let view = wait_for(Duration::from_secs(15), "the hub to show the device as expired", || {
        hub.device(&agent.id).ok().filter(|d| d.certificate_expired.is_some())
    })
    .unwrap();
    assert_eq!(view.state(), "expired");
    let ctl = |args: &[&str]| outpostctl(&hub, args);
    let shown = ctl(&["device", &agent.id]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("its certificate expired"), "{shown:?}");

    // Re-admitted: it connects with the expired certificate, renews at
    // once, and delivers what it recorded while refused.
    let readmit = ctl(&["readmit", &agent.id, "--within", "1h"]);
    assert!(readmit.status.success(), "{readmit:?}");
    assert!(String::from_utf8_lossy(&readmit.stdout).contains("readmitted"), "{readmit:?}");
    wait_for(Duration::from_secs(60), "the re-admitted device to renew", || (switched(&agent) == 3).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let view = wait_for(Duration::from_secs(20), "the device online, renewed, delivering", || {
        hub.device(&agent.id).ok().filter(|d| d.online && d.last_seq > held)
    })
    .unwrap();
    assert_eq!((view.certificate_expired, view.readmitted_until), (None, None), "the re-admission is used up");
    let audit = hub.client().audit("action=readmit").unwrap();
    assert!(audit.entries.iter().any(|e| e.target == agent.id && e.status == 200), "{:?}", audit.entries);
}

/// A hub whose certificate lives 12 s (renewed at 8 s) runs past two
/// lifetimes: the session opened with the first certificate stays up, a
/// device enrolls and connects long after that certificate expired, and
/// the MQTT bridge, reconnecting to a restarted broker that checks client
/// certificates, is let in with the renewed one.
#[test]
fn the_hub_renews_its_certificate_while_running_and_keeps_its_sessions() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut broker = Broker::start(scratch.path(), &hub).unwrap();
    hub.extra_config = broker.hub_config();
    hub.quic_extra = "cert_lifetime = \"12s\"\n".into();
    hub.kill();
    hub.serve().unwrap();
    let started = Instant::now();
    let hub_log = || std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();

    let mut first = Agent::enroll(scratch.path(), &hub, "early", &timings).unwrap();
    first.start().unwrap();
    wait_online(&hub, &[&first.id], true, Duration::from_secs(20)).unwrap();

    // Past the first certificate's end, and renewed at least twice.
    wait_for(Duration::from_secs(40), "two renewals of the hub's certificate", || {
        (hub_log().matches("Hub certificate renewed.").count() >= 2 && started.elapsed() > Duration::from_secs(14))
            .then_some(())
    })
    .unwrap();
    // The session made with the first certificate was never dropped.
    let connects = first.log_text().matches("Connected to the hub.").count();
    assert_eq!(connects, 1, "the early device reconnected:\n{}", first.log_text());
    wait_online(&hub, &[&first.id], true, Duration::from_secs(5)).unwrap();

    // A device enrolling now meets the renewed certificate (the first one
    // expired: an agent would refuse it).
    let mut late = Agent::enroll(scratch.path(), &hub, "late", &timings).unwrap();
    late.start().unwrap();
    wait_online(&hub, &[&late.id], true, Duration::from_secs(20)).unwrap();

    // The broker restarts: the bridge connects again with the renewed
    // certificate (Mosquitto refuses an expired client certificate).
    let bridged = hub_log().matches("Connected to the MQTT broker.").count();
    assert!(bridged >= 1, "{}", hub_log());
    broker.kill();
    broker.restart().unwrap();
    wait_for(Duration::from_secs(30), "the bridge to reconnect", || {
        (hub_log().matches("Connected to the MQTT broker.").count() > bridged).then_some(())
    })
    .unwrap();
    assert!(!broker.log_text().contains("certificate expired"), "{}", broker.log_text());
}

/// Revocation, by `outpostctl revoke`: a device on QUIC loses its session
/// within a second and is refused at every reconnection (it says so); a
/// device on MQTT is heard no more; a third device is untouched; a revoked
/// device cannot be re-admitted; the API and `outpostctl` show `revoked`.
#[test]
fn a_revoked_device_is_cut_off_within_a_second_and_refused_on_every_path() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let (hub, broker) = hub_with_broker(scratch.path(), &timings, "").unwrap();
    let mut stolen = Agent::enroll(scratch.path(), &hub, "stolen", &timings).unwrap();
    let mut lost = Agent::enroll(scratch.path(), &hub, "lost", &timings).unwrap();
    lost.use_transport(Some(&broker)).unwrap();
    let mut bystander = Agent::enroll(scratch.path(), &hub, "bystander", &timings).unwrap();
    // A second bystander over the broker hears of the revocations there.
    let mut listener = Agent::enroll(scratch.path(), &hub, "listener", &timings).unwrap();
    listener.use_transport(Some(&broker)).unwrap();
    for agent in [&mut stolen, &mut lost, &mut bystander, &mut listener] {
        agent.start().unwrap();
    }
    wait_online(&hub, &[&stolen.id, &lost.id, &bystander.id, &listener.id], true, Duration::from_secs(20)).unwrap();
    wait_for(Duration::from_secs(10), "the QUIC session held", || {
        hub.device(&stolen.id).ok().filter(|d| d.connected).map(drop)
    })
    .unwrap();
    let ctl = |args: &[&str]| outpostctl(&hub, args);

    let started = Instant::now();
    let revoked = ctl(&["revoke", &stolen.id]);
    assert!(revoked.status.success(), "{revoked:?}");
    wait_for(Duration::from_secs(5), "the revoked device's session to close", || {
        hub.device(&stolen.id).ok().filter(|d| !d.connected).map(drop)
    })
    .unwrap();
    let cut = started.elapsed();
    eprintln!("revoked device cut off after {cut:?} (outpostctl included)");
    assert!(cut < Duration::from_secs(1), "cut off after {cut:?}");
    wait_for(Duration::from_secs(15), "the device to hear it is revoked", || {
        stolen.log_text().contains("The hub revoked this device").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stolen.log_text()));
    let view = hub.device(&stolen.id).unwrap();
    assert_eq!(view.state(), "revoked");
    let shown = ctl(&["device", &stolen.id]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("revoked: refused for good"), "{shown:?}");
    let readmit = ctl(&["readmit", &stolen.id]);
    assert!(!readmit.status.success(), "a revoked device was re-admitted: {readmit:?}");
    assert!(String::from_utf8_lossy(&readmit.stderr).contains("enrolling anew"), "{readmit:?}");

    // Over MQTT: its messages are dropped. What was in flight lands within
    // a second; in the three seconds after that (telemetry every 500 ms,
    // heartbeats every 250 ms) nothing does.
    assert!(ctl(&["revoke", &lost.id]).status.success());
    let settled = Instant::now() + Duration::from_secs(1);
    let (held, seen) = wait_for(Duration::from_secs(3), "messages in flight to land", || {
        (Instant::now() >= settled).then(|| hub.device(&lost.id).map(|d| (d.last_seq, d.last_seen_ms)).unwrap())
    })
    .unwrap();
    let quiet = Instant::now() + Duration::from_secs(3);
    wait_for(Duration::from_secs(5), "three quiet seconds", || (Instant::now() >= quiet).then_some(())).unwrap();
    let after = hub.device(&lost.id).unwrap();
    assert_eq!((after.last_seq, after.last_seen_ms), (held, seen), "a revoked device's messages were taken");
    assert_eq!(after.state(), "revoked");

    // The bystanders (QUIC and MQTT) never noticed, but for the list of
    // revoked devices their LAN peers go by (through the broker: signed).
    wait_online(&hub, &[&bystander.id, &listener.id], true, Duration::from_secs(5)).unwrap();
    wait_for(Duration::from_secs(5), "the devices to hear of both revocations", || {
        [&bystander, &listener]
            .iter()
            .all(|a| a.log_text().contains("Trust bundle from the hub kept. cas=1 revoked=2"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", bystander.log_text(), listener.log_text()));
    let kept = std::fs::read_to_string(listener.data_dir.join("identity/revoked")).unwrap();
    let mut both = [stolen.id.clone(), lost.id.clone()];
    both.sort();
    assert_eq!(kept, format!("{}\n{}\n", both[0], both[1]));
    for agent in [&bystander, &listener] {
        assert_eq!(agent.log_text().matches("Connected to the hub.").count(), 1, "{}", agent.log_text());
    }
}

/// The CA certificates of a PEM file, as DER.
fn pem_certs(path: &std::path::Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for block in text.split("-----BEGIN CERTIFICATE-----").skip(1) {
        let body: String = block.split("-----END").next().unwrap().split_whitespace().collect();
        out.push(base64_decode(&body));
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// True if the agent's certificate is from the CA `ca` (DER).
fn issued_by(agent: &Agent, ca: &[u8]) -> bool {
    let cert = pem_certs(&agent.data_dir.join("identity/device.crt")).remove(0);
    outpost_shared::identity::issued_by(&cert, ca)
}

/// CA rotation in one run: three devices, one of them offline through the
/// first part of the overlap, and a token made before the rotation. During
/// the overlap the hub still shows the old CA, every device receives the
/// new one and renews onto it, the old token still enrolls; at the end of
/// the overlap the hub moves to the new CA without dropping a session,
/// devices drop the old CA, and a device that never came back during the
/// overlap, like the old token, is refused.
#[test]
fn a_ca_rotation_moves_the_fleet_to_the_new_ca_and_drops_the_old_one() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut online: Vec<Agent> =
        ["rot-a", "rot-b"].iter().map(|n| Agent::enroll(scratch.path(), &hub, n, &timings).unwrap()).collect();
    let mut late = Agent::enroll(scratch.path(), &hub, "rot-late", &timings).unwrap();
    let mut never = Agent::enroll(scratch.path(), &hub, "rot-never", &timings).unwrap();
    let old_token = hub.token("10m", 2).unwrap();
    let old_ca = pem_certs(&hub.data_dir.join("ca.crt")).remove(0);
    for agent in &mut online {
        agent.start().unwrap();
    }
    let ids: Vec<&str> = online.iter().map(|a| a.id.as_str()).collect();
    wait_online(&hub, &ids, true, Duration::from_secs(15)).unwrap();

    let overlap = Duration::from_secs(30);
    let rotate = std::process::Command::new(outpost_tests::bin("outpost-hub"))
        .args(["ca", "rotate", "--overlap", "30s", "--data-dir"])
        .arg(&hub.data_dir)
        .output()
        .unwrap();
    let rotated_at = Instant::now();
    assert!(rotate.status.success(), "{}", String::from_utf8_lossy(&rotate.stderr));
    let new_ca = pem_certs(&hub.data_dir.join("ca.crt")).remove(0);
    assert_ne!(new_ca, old_ca);
    hub.kill();
    hub.serve().unwrap();

    // Devices online receive the bundle and renew onto the new CA.
    let on_new_ca = |agent: &Agent| issued_by(agent, &new_ca);
    for agent in &online {
        wait_for(Duration::from_secs(20), "the device to renew onto the new CA", || on_new_ca(agent).then_some(()))
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        assert_eq!(pem_certs(&agent.data_dir.join("identity/ca.crt")), vec![new_ca.clone(), old_ca.clone()]);
    }
    // A token made before the rotation enrolls during the overlap.
    let data_dir = scratch.path().join("rot-new");
    let enroll = std::process::Command::new(outpost_tests::bin("outpost-agent"))
        .args(["enroll", "--name", "rot-new", "--token", &old_token, "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(enroll.status.success(), "{}", String::from_utf8_lossy(&enroll.stderr));
    // The device offline so far comes back during the overlap and renews.
    late.start().unwrap();
    wait_for(Duration::from_secs(20), "the late device to renew onto the new CA", || on_new_ca(&late).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", late.log_text()));
    online.push(late);
    assert!(rotated_at.elapsed() < overlap, "the overlap ended before the devices renewed: the test is too slow");

    // The overlap ends: the hub moves to the new CA, sessions stay, devices
    // drop the old CA.
    let connects = |agent: &Agent| agent.log_text().matches("Connected to the hub.").count();
    let before: Vec<usize> = online.iter().map(connects).collect();
    wait_for(overlap + Duration::from_secs(20), "the hub to move to the new CA", || {
        let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
        log.contains("The CA rotation's overlap ended").then_some(())
    })
    .unwrap();
    for (agent, before) in online.iter().zip(&before) {
        wait_for(Duration::from_secs(10), "the device to drop the old CA", || {
            (pem_certs(&agent.data_dir.join("identity/ca.crt")) == vec![new_ca.clone()]).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        assert_eq!(connects(agent), *before, "a session was dropped:\n{}", agent.log_text());
    }
    // New connections: the hub's certificate is from the new CA now.
    for agent in &mut online {
        agent.proc.as_mut().unwrap().kill();
        agent.start().unwrap();
    }
    let ids: Vec<&str> = online.iter().map(|a| a.id.as_str()).collect();
    wait_for(Duration::from_secs(20), "every renewed device to reconnect", || {
        online.iter().zip(&before).all(|(a, before)| connects(a) > *before).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_online(&hub, &ids, true, Duration::from_secs(10)).unwrap();

    // The device that slept through the overlap, and the old token, are
    // refused now.
    never.start().unwrap();
    wait_for(Duration::from_secs(15), "the device of the old CA to be refused", || {
        let log = never.log_text();
        log.contains("The hub's certificate is from a CA this device does not trust").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", never.log_text()));
    assert!(!never.log_text().contains("Connected to the hub."));
    let enroll = std::process::Command::new(outpost_tests::bin("outpost-agent"))
        .args(["enroll", "--name", "rot-too-late", "--token", &old_token, "--data-dir"])
        .arg(scratch.path().join("rot-too-late"))
        .output()
        .unwrap();
    assert!(!enroll.status.success());
}

/// A renewal interrupted at each of its steps, by the agent dying on the
/// spot (`OUTPOST_CRASH_AT`, debug builds: an abort, nothing flushed or
/// cleaned up, as after a SIGKILL at that instant): after the new key was
/// written and before the request left; after the hub's certificate was
/// written; after the hub accepted it and before the switch; between the
/// two renames of the switch. Each time the restarted agent connects with
/// one of its two identities, completes the renewal, and the device keeps
/// delivering: its records arrive once and in order.
#[test]
#[cfg_attr(not(debug_assertions), ignore = "crash points (OUTPOST_CRASH_AT) exist in debug builds only")]
fn a_device_killed_at_each_step_of_a_renewal_comes_back() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.quic_extra = "device_cert_lifetime = \"40s\"\n".into();
    hub.kill();
    hub.serve().unwrap();
    // Renewal at a fifth of the life (which starts 4 s back): about 5 s
    // after each certificate is issued.
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "crashy", &timings, "").unwrap();
    let config = std::fs::read_to_string(&agent.config).unwrap().replace("[uplink]\n", "[uplink]\nrenew_at = 0.2\n");
    std::fs::write(&agent.config, config).unwrap();
    let identity = agent.data_dir.join("identity");
    let has = |name: &str| identity.join(name).exists();
    let switched = |agent: &Agent| agent.log_text().matches("Switched to the renewed certificate.").count();
    let connected = |agent: &Agent| agent.log_text().matches("Connected to the hub.").count();

    // Each step, and whether next.key and next.crt are on disk after it.
    let steps = [
        ("renew-before-csr", true, false),
        ("renew-after-cert", true, true),
        ("renew-after-proof", true, true),
        ("renew-mid-promotion", false, true),
    ];
    for (step, key, crt) in steps {
        let before = device_cert(&agent);
        agent.env = vec![("OUTPOST_CRASH_AT".into(), step.into())];
        agent.start().unwrap();
        wait_for(Duration::from_secs(20), &format!("the agent to die at {step}"), || {
            (!agent.proc.as_mut().unwrap().running()).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        assert!(agent.log_text().contains(&format!("step=\"{step}\"")), "{}", agent.log_text());
        assert_eq!((has("next.key"), has("next.crt")), (key, crt), "next.key, next.crt after {step}");

        let (switches, connects) = (switched(&agent), connected(&agent));
        agent.env = Vec::new();
        agent.start().unwrap();
        wait_for(Duration::from_secs(20), &format!("the agent back after {step}, renewed"), || {
            (connected(&agent) > connects && device_cert(&agent) != before && !has("next.key") && !has("next.crt"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        if step != "renew-mid-promotion" {
            // The load completes an interrupted promotion without a word;
            // every other step ends in a switch.
            wait_for(Duration::from_secs(10), "the switch", || (switched(&agent) > switches).then_some(()))
                .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
        }
        agent.proc.as_mut().unwrap().kill();
    }
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(15)).unwrap();
    let held = hub.device(&agent.id).unwrap().last_seq;
    wait_for(Duration::from_secs(15), "the device to keep delivering", || {
        (hub.device(&agent.id).unwrap().last_seq > held).then_some(())
    })
    .unwrap();
    let samples = hub.client().metrics(&agent.id, None, None, Some(1_000_000)).unwrap().samples;
    let seqs: Vec<u64> = samples.iter().map(|s| s.seq).collect();
    assert!(seqs.len() > 5 && seqs.windows(2).all(|w| w[0] < w[1]), "records out of order or twice: {seqs:?}");
}
