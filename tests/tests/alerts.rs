//! Alerts (issue 26): a stopped agent fires the offline alert to a webhook
//! receiver run by the test, once, with Alertmanager's payload (version 4);
//! a receiver that answers 500 twice and then 200 gets it once; a hub
//! restart while it fires sends no duplicate; it resolves when the agent
//! returns; a silence made with outpostctl holds it back; with two hubs on
//! one database it is sent once.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Hub, Scratch, Timings, Webhook, outpostctl, wait_for, wait_online};
use serde_json::Value;
use std::time::Duration;

fn alerts_config(url: &str) -> String {
    format!(
        "[alerts]\nevaluate_every = \"200ms\"\ngroup_wait = \"0s\"\ngroup_interval = \"1s\"\nrepeat_interval = \"1h\"\n\
         external_url = \"https://hub.example\"\n\
         [[alerts.receiver]]\nname = \"pager\"\nurl = {url:?}\n\
         [[alerts.rule]]\nname = \"DeviceOffline\"\ncondition = \"offline\"\nthreshold = \"1s\"\n\
         severity = \"critical\"\nsummary = \"{{device}} is offline\"\n"
    )
}

/// A sample of the hub's `/metrics`.
fn metric(hub: &Hub, sample: &str) -> Option<f64> {
    let mut response = ureq::get(format!("{}/metrics", hub.api)).call().ok()?;
    let text = response.body_mut().read_to_string().ok()?;
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// The hub's gauge of firing alerts (set at the end of each evaluation;
/// absent on a hub that never evaluated).
fn firing(hub: &Hub) -> Option<f64> {
    metric(hub, "outpost_hub_alerts{state=\"firing\"}")
}

/// Waits until `hub` has seen `n` firing alerts and then made two more
/// rounds: whatever they had to send is sent by then.
fn settled(hub: &Hub, n: f64) {
    let rounds = || metric(hub, "outpost_hub_alert_evaluation_duration_seconds_count").unwrap_or(0.0);
    let start =
        wait_for(Duration::from_secs(20), "the hub to evaluate the alerts", || (firing(hub) == Some(n)).then(rounds))
            .unwrap();
    wait_for(Duration::from_secs(10), "two more rounds", || (rounds() >= start + 2.0).then_some(())).unwrap();
    assert_eq!(firing(hub), Some(n));
}

/// Checks a notification against Alertmanager's webhook format (version 4).
fn check_payload(body: &Value, status: &str, device: &str) {
    assert_eq!(body["version"], "4", "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["receiver"], "pager", "{body}");
    assert_eq!(body["groupLabels"]["alertname"], "DeviceOffline", "{body}");
    assert_eq!(body["groupKey"], "{}:{alertname=\"DeviceOffline\"}", "{body}");
    assert_eq!(body["commonLabels"]["severity"], "critical", "{body}");
    assert_eq!(body["externalURL"], "https://hub.example", "{body}");
    assert_eq!(body["truncatedAlerts"], 0, "{body}");
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{body}");
    let a = &alerts[0];
    assert_eq!(a["status"], status, "{body}");
    assert_eq!(a["labels"]["alertname"], "DeviceOffline");
    assert_eq!(a["labels"]["device"], device);
    assert_eq!(a["labels"]["device_name"], "watched");
    assert_eq!(a["annotations"]["summary"], "watched is offline");
    assert!(a["annotations"]["description"].as_str().unwrap().starts_with("offline for "), "{body}");
    let starts = a["startsAt"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(starts).is_ok(), "{starts}");
    let ends = a["endsAt"].as_str().unwrap();
    if status == "firing" {
        assert_eq!(ends, "0001-01-01T00:00:00Z");
    } else {
        assert!(
            chrono::DateTime::parse_from_rfc3339(ends).unwrap() > chrono::DateTime::parse_from_rfc3339(starts).unwrap()
        );
    }
    let fp = a["fingerprint"].as_str().unwrap();
    assert!(fp.len() == 16 && fp.chars().all(|c| c.is_ascii_hexdigit()), "{fp}");
    assert_eq!(a["generatorURL"], format!("https://hub.example/console/devices/{device}"));
}

#[test]
fn an_offline_device_is_told_once_through_failures_and_restarts_resolves_and_can_be_silenced() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    // The receiver fails twice before it takes the alert.
    let hook = Webhook::start(vec![500, 500]).unwrap();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.extra_config = alerts_config(&hook.url);
    hub.kill();
    hub.serve().unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "watched", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();
    assert!(hook.received().is_empty(), "an alert for an online device");

    agent.proc.take().unwrap().kill();
    let accepted = wait_for(Duration::from_secs(30), "the offline alert", || {
        let a = hook.accepted();
        (!a.is_empty()).then_some(a)
    })
    .unwrap();
    check_payload(&accepted[0], "firing", &agent.id);
    let statuses: Vec<u16> = hook.received().iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [500, 500, 200], "retried after each 500, then told once");
    // The failures are in the audit log.
    let audit = hub.client().audit("who=alerts").unwrap();
    assert_eq!(audit.entries.len(), 2, "{audit:?}");
    assert!(audit.entries[0].detail.contains("HTTP 500"), "{audit:?}");

    // A restart while it fires: the new process knows it was told.
    let stopped = hub.proc.take().unwrap().terminate(Duration::from_secs(10));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    hub.serve().unwrap();
    settled(&hub, 1.0);
    assert_eq!(hook.accepted().len(), 1, "told again after a restart");
    let listed = hub.client().alerts(10).unwrap();
    assert_eq!((listed.len(), listed[0].state.as_str(), listed[0].silenced), (1, "firing", false), "{listed:?}");

    // The device returns: the resolution is told, once.
    agent.start().unwrap();
    let accepted = wait_for(Duration::from_secs(30), "the resolution", || {
        let a = hook.accepted();
        (a.len() >= 2).then_some(a)
    })
    .unwrap();
    check_payload(&accepted[1], "resolved", &agent.id);
    settled(&hub, 0.0);
    assert_eq!(hook.accepted().len(), 2);

    // A silence for the rule, made with outpostctl: the next outage is
    // seen (firing, silenced) and told to nobody.
    let out =
        outpostctl(&hub, &["alerts", "silence", "alertname=DeviceOffline", "--for", "1h", "--comment", "maintenance"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.proc.take().unwrap().kill();
    wait_for(Duration::from_secs(30), "the silenced alert to fire", || {
        hub.client().alerts(10).unwrap().iter().any(|a| a.state == "firing" && a.silenced).then_some(())
    })
    .unwrap();
    settled(&hub, 1.0);
    assert_eq!(hook.accepted().len(), 2, "a silenced alert was told");
    let silences = hub.client().silences().unwrap();
    assert_eq!((silences.len(), silences[0].comment.as_str(), silences[0].active), (1, "maintenance", true));

    // Ending the silence tells it.
    hub.client().end_silence(&silences[0].id).unwrap();
    let accepted = wait_for(Duration::from_secs(30), "the alert once unsilenced", || {
        let a = hook.accepted();
        (a.len() >= 3).then_some(a)
    })
    .unwrap();
    check_payload(&accepted[2], "firing", &agent.id);
}

/// A device whose certificate runs out within the rule's threshold (here
/// the hub signs 1 h certificates and the rule looks 2 h ahead) fires the
/// expiring alert, saying when it expires.
#[test]
fn a_certificate_close_to_its_end_fires_its_alert() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let hook = Webhook::start(Vec::new()).unwrap();
    hub.quic_extra = "device_cert_lifetime = \"1h\"\n".into();
    hub.extra_config = format!(
        "[alerts]\nevaluate_every = \"200ms\"\ngroup_wait = \"0s\"\n[[alerts.receiver]]\nname = \"pager\"\nurl = {:?}\n\
         [[alerts.rule]]\nname = \"CertificateExpiring\"\ncondition = \"certificate_expiring\"\nthreshold = \"2h\"\n",
        hook.url
    );
    hub.kill();
    hub.serve().unwrap();
    let agent = Agent::enroll(scratch.path(), &hub, "short-lived", &timings).unwrap();
    let others: Vec<Agent> =
        (0..2).map(|i| Agent::enroll(scratch.path(), &hub, &format!("other-{i}"), &timings).unwrap()).collect();
    let alert = wait_for(Duration::from_secs(20), "the expiring alerts", || {
        let alerts = hub.client().alerts(10).ok()?;
        (alerts.iter().filter(|a| a.state == "firing").count() == 3)
            .then(|| alerts.into_iter().find(|a| a.device == agent.id))
            .flatten()
    })
    .unwrap();
    assert_eq!(alert.rule, "CertificateExpiring");
    assert!(alert.description.starts_with("certificate expires in "), "{}", alert.description);

    // The list pages: two, then the third, named by the Link header.
    let get = |path: &str| {
        let mut answer = ureq::get(format!("{}{path}", hub.api))
            .header("Authorization", &format!("Bearer {}", hub.admin_token))
            .call()
            .unwrap();
        let link = answer.headers().get("link").map(|v| v.to_str().unwrap().to_owned());
        let total = answer.headers().get("x-total-count").unwrap().to_str().unwrap().to_owned();
        let body: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        (body, link, total)
    };
    let (first, link, total) = get("/api/v1/alerts?limit=2&state=firing");
    assert_eq!((first.as_array().unwrap().len(), total.as_str()), (2, "3"));
    let next = link.unwrap();
    let next = next.trim_start_matches('<').split(">;").next().unwrap().to_owned();
    let (second, link, _) = get(&next);
    assert_eq!((second.as_array().unwrap().len(), link), (1, None));
    let mut devices: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .chain(second.as_array().unwrap())
        .map(|a| a["device"].as_str().unwrap())
        .collect();
    devices.sort_unstable();
    let mut want = vec![agent.id.as_str(), others[0].id.as_str(), others[1].id.as_str()];
    want.sort_unstable();
    assert_eq!(devices, want, "each alert once");
    let (one, _, total) = get("/api/v1/alerts?device=other-1");
    assert_eq!((one[0]["device"].as_str(), total.as_str()), (Some(others[1].id.as_str()), "1"));
    let (none, _, _) = get("/api/v1/alerts?state=resolved");
    assert!(none.as_array().unwrap().is_empty());
    // The same filters through outpostctl.
    let out = outpostctl(&hub, &["alerts", "list", "--state", "firing", "--device", "other-0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("other-0") && !text.contains("short-lived"), "{text}");
    let out = outpostctl(&hub, &["alerts", "list", "--state", "burning"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("firing, pending or resolved"));
}

#[test]
fn a_silence_needs_known_labels_and_a_sane_duration() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    let request = |matchers: &[(&str, &str)], duration: &str| outpost_hub::api::SilenceRequest {
        matchers: matchers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        duration: duration.into(),
        comment: String::new(),
    };
    let client = hub.client();
    for (bad, why) in [
        (request(&[], "1h"), "at least one label"),
        (request(&[("nodename", "x")], "1h"), "not a label of alerts"),
        (request(&[("alertname", "")], "1h"), "1 to 256"),
        (request(&[("alertname", "X")], "1s"), "at least 1m"),
        (request(&[("alertname", "X")], "1y"), "duration"),
    ] {
        let err = client.silence(&bad).unwrap_err().to_string();
        assert!(err.contains("422") && err.contains(why), "{err}");
    }
    assert!(client.end_silence("sil-000000000000").unwrap_err().to_string().contains("404"));
}

/// Two hubs on one PostgreSQL database: one evaluates (the lease), so the
/// receiver is told once.
#[test]
fn two_hubs_on_one_database_tell_an_alert_once() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hook = Webhook::start(Vec::new()).unwrap();
    let mut a = Hub::start_with(&scratch.path().join("a"), timings.clone(), "127.0.0.1:0", true).unwrap();
    a.extra_config = alerts_config(&hook.url);
    a.kill();
    a.serve().unwrap();
    let mut b = Hub::join(&scratch.path().join("b"), &a).unwrap();
    b.extra_config = alerts_config(&hook.url);
    b.kill();
    b.serve().unwrap();
    let mut agent = Agent::enroll(scratch.path(), &a, "watched", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&a, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();
    agent.proc.take().unwrap().kill();
    let accepted = wait_for(Duration::from_secs(30), "the offline alert", || {
        let got = hook.accepted();
        (!got.is_empty()).then_some(got)
    })
    .unwrap();
    check_payload(&accepted[0], "firing", &agent.id);
    // The hub that does not hold the lease evaluates nothing; the one that
    // does settles; nothing more is sent.
    let evaluator = if firing(&a) == Some(1.0) { &a } else { &b };
    settled(evaluator, 1.0);
    assert_eq!(hook.received().len(), 1, "{:?}", hook.received());
    // The other hub takes over when the first goes: it knows it was told.
    let (mut first, second) = if std::ptr::eq(evaluator, &a) { (a, b) } else { (b, a) };
    first.kill();
    wait_for(Duration::from_secs(40), "the other hub to take over", || (firing(&second) == Some(1.0)).then_some(()))
        .unwrap();
    settled(&second, 1.0);
    assert_eq!(hook.received().len(), 1, "told again by the hub that took over");
}

/// A real Alertmanager (Debian's prometheus-alertmanager): the hub posts
/// the alerts to its `/api/v2/alerts` (format `alertmanager_api`), it
/// holds them firing and then resolved, and its own webhook notification,
/// caught by the test's receiver, has every top-level field and alert field
/// the hub's `alertmanager` format writes.
#[test]
fn a_real_alertmanager_takes_the_alerts_and_its_webhook_has_the_hubs_shape() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hook = Webhook::start(Vec::new()).unwrap();
    let port = outpost_tests::free_port().unwrap();
    let am_dir = scratch.path().join("alertmanager");
    std::fs::create_dir_all(&am_dir).unwrap();
    std::fs::write(
        am_dir.join("alertmanager.yml"),
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: {}\n        send_resolved: true\n",
            hook.url
        ),
    )
    .unwrap();
    let _alertmanager = outpost_tests::Proc::spawn(
        std::process::Command::new("prometheus-alertmanager").args([
            &format!("--config.file={}", am_dir.join("alertmanager.yml").display()),
            &format!("--storage.path={}", am_dir.display()),
            &format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=",
        ]),
        scratch.path().join("alertmanager.log"),
    )
    .unwrap();
    let am = format!("http://127.0.0.1:{port}");
    wait_for(Duration::from_secs(20), "Alertmanager to be ready", || {
        ureq::get(format!("{am}/-/ready")).call().ok().filter(|r| r.status() == 200).map(drop)
    })
    .unwrap();

    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.extra_config =
        alerts_config(&format!("{am}/api/v2/alerts")).replace("\nurl = ", "\nformat = \"alertmanager_api\"\nurl = ");
    hub.kill();
    hub.serve().unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "watched", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();
    agent.proc.take().unwrap().kill();

    // Alertmanager holds it, and tells its receiver.
    let active = |state: &str| {
        let mut r = ureq::get(format!("{am}/api/v2/alerts")).call().ok()?;
        let list: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
        list.as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "DeviceOffline" && a["status"]["state"] == state)
            .cloned()
    };
    let held = wait_for(Duration::from_secs(30), "the alert in Alertmanager", || active("active")).unwrap();
    assert_eq!(held["labels"]["device"], agent.id.as_str());
    assert_eq!(held["annotations"]["summary"], "watched is offline");
    let told =
        wait_for(Duration::from_secs(30), "Alertmanager's notification", || hook.accepted().first().cloned()).unwrap();
    // What Alertmanager sends receivers has the fields the hub's own
    // webhook payload has, and check_payload's reading of them holds.
    let hub_payload = outpost_hub::service::alerts::example_payload();
    for key in hub_payload.as_object().unwrap().keys() {
        assert!(told.get(key).is_some(), "Alertmanager's webhook has no {key:?}: {told}");
    }
    for key in hub_payload["alerts"][0].as_object().unwrap().keys() {
        assert!(told["alerts"][0].get(key).is_some(), "Alertmanager's alert has no {key:?}: {told}");
    }
    assert_eq!(told["version"], "4");
    assert_eq!(told["status"], "firing");
    assert_eq!(told["alerts"][0]["labels"]["device"], agent.id.as_str());

    // The device returns: the hub posts the resolution, Alertmanager tells it.
    agent.start().unwrap();
    let resolved = wait_for(Duration::from_secs(30), "the resolution through Alertmanager", || {
        hook.accepted().into_iter().find(|b| b["status"] == "resolved")
    })
    .unwrap();
    assert_eq!(resolved["alerts"][0]["labels"]["device"], agent.id.as_str());
}

/// Rules added to the config of a running hub take effect on SIGHUP, and a
/// config with an error in its rules is refused while the rules in force
/// stay.
#[test]
fn alert_rules_are_reloaded_on_sighup() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hook = Webhook::start(Vec::new()).unwrap();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "watched", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();
    agent.proc.take().unwrap().kill();
    wait_online(&hub, &[agent.id.as_str()], false, Duration::from_secs(20)).unwrap();
    assert!(hook.received().is_empty());

    // A broken rule first: refused, nothing runs.
    let plain = std::fs::read_to_string(&hub.config).unwrap();
    std::fs::write(&hub.config, format!("{plain}{}", alerts_config(&hook.url).replace("\"offline\"", "\"gone\"")))
        .unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the refusal", || hub.log_text().contains("Config not reloaded.").then_some(()))
        .unwrap();
    // Then a good one: the offline device is told.
    std::fs::write(&hub.config, format!("{plain}{}", alerts_config(&hook.url))).unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    let told =
        wait_for(Duration::from_secs(30), "the alert after the reload", || hook.accepted().first().cloned()).unwrap();
    check_payload(&told, "firing", &agent.id);
    assert!(hub.log_text().contains("Alert rules in force."));
}
