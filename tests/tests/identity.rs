//! Identities that outlive their certificates (issue 22): the hub renews
//! its own TLS certificate while it runs, and every path that presents it
//! (QUIC sessions and enrollment, the MQTT bridge's client side) takes the
//! new one without dropping what is connected.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Broker, Hub, Scratch, Timings, wait_for, wait_online};
use std::time::{Duration, Instant};

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
