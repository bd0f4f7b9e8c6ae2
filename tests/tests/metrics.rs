//! Prometheus metrics of the hub (issue 26): `/metrics` after real traffic
//! passes `promtool check metrics` (Debian's `prometheus` package) and its
//! counters moved with that traffic, by value. A hub bound beyond loopback
//! asks a viewer token for it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::{CommandRequest, CommandStateView};
use outpost_tests::{Agent, Hub, Scratch, Timings, wait_for, wait_online};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// `GET /metrics` with `token` if any: (status, content type, body).
fn scrape(hub: &Hub, token: Option<&str>) -> (u16, String, String) {
    let mut request = http().get(format!("{}/metrics", hub.api));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (response.status().as_u16(), kind, response.body_mut().read_to_string().unwrap())
}

/// The value of the sample `name{labels}` (exactly as written), if present.
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_hub_metrics_pass_promtool_and_count_the_traffic() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "metered", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();

    // Bound to loopback: no token needed.
    let (status, kind, before) = scrape(&hub, None);
    assert_eq!(status, 200, "{before}");
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let (ok, said) = promtool(&before);
    assert!(ok, "promtool check metrics: {said}\n{before}");
    assert_eq!(value(&before, "outpost_hub_devices{state=\"online\"}"), Some(1.0), "{before}");
    assert_eq!(value(&before, "outpost_hub_devices{state=\"never_connected\"}"), Some(0.0), "{before}");
    assert_eq!(value(&before, "outpost_hub_sessions_open{transport=\"quic\"}"), Some(1.0), "{before}");
    assert!(value(&before, "outpost_hub_sessions_total{transport=\"quic\"}").unwrap() >= 1.0, "{before}");
    assert!(before.contains("outpost_hub_build_info{version=\""), "{before}");
    assert!(!before.contains(agent.id.as_str()), "a series names a device");

    // A command, run by the device: queued, then succeeded, with its result
    // record ingested.
    let client = hub.client();
    let request = CommandRequest { kind: "echo".into(), args: vec!["metered".into()], expires_in: None };
    let sent = client.send_command(&agent.id, &request).unwrap();
    hub.wait_command(sent.id, "the command's result", |s| matches!(s, CommandStateView::Completed { .. }));
    let records_before = value(&before, "outpost_hub_ingested_records_total").unwrap();
    let after = wait_for(Duration::from_secs(20), "the result to be counted", || {
        let (_, _, text) = scrape(&hub, None);
        (value(&text, "outpost_hub_commands_total{state=\"succeeded\"}") == Some(1.0)).then_some(text)
    })
    .unwrap();
    let (ok, said) = promtool(&after);
    assert!(ok, "promtool check metrics: {said}\n{after}");
    assert_eq!(value(&after, "outpost_hub_commands_total{state=\"queued\"}"), Some(1.0), "{after}");
    assert!(value(&after, "outpost_hub_ingested_records_total").unwrap() > records_before, "{after}");
    assert!(value(&after, "outpost_hub_ingested_bytes_total").unwrap() > 0.0, "{after}");
    let posted =
        "outpost_hub_http_requests_total{route=\"/api/v1/devices/{id}/commands\",method=\"POST\",code=\"201\"}";
    assert_eq!(value(&after, posted), Some(1.0), "{after}");
    let timed = "outpost_hub_store_operation_duration_seconds_count{operation=\"create_command\"}";
    assert_eq!(value(&after, timed), Some(1.0), "{after}");
    // The earlier scrapes were counted (a scrape counts once answered).
    assert!(
        value(&after, "outpost_hub_http_requests_total{route=\"/metrics\",method=\"GET\",code=\"200\"}").unwrap()
            >= 1.0
    );

    // A stranger's path makes no series of its own.
    let mut response = http().get(format!("{}/api/v1/no/such/{}", hub.api, "x".repeat(40))).call().unwrap();
    let _ = response.body_mut().read_to_string();
    let (_, _, text) = scrape(&hub, None);
    assert!(!text.contains(&"x".repeat(40)), "a raw path became a label");
}

#[test]
fn a_hub_reachable_beyond_loopback_asks_a_viewer_token_for_its_metrics() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings).unwrap();
    hub.kill();
    hub.http_listen = "0.0.0.0:0".into();
    hub.serve().unwrap();
    assert_eq!(scrape(&hub, None).0, 401);
    assert_eq!(scrape(&hub, Some("not-a-token")).0, 401);
    let viewer = hub.client().create_token("prometheus", "viewer", "1h").unwrap().secret.unwrap();
    let (status, _, text) = scrape(&hub, Some(&viewer));
    assert_eq!(status, 200, "{text}");
    assert_eq!(value(&text, "outpost_hub_devices{state=\"online\"}"), Some(0.0), "{text}");
}

/// The agent's `/metrics` address, from its log.
fn agent_metrics_url(agent: &Agent) -> String {
    let addr = wait_for(Duration::from_secs(20), "the agent to serve metrics", || {
        let log = agent.log_text();
        let line = log.lines().find(|l| l.contains("Serving metrics at /metrics."))?;
        Some(line.split("listen=").nth(1)?.split_whitespace().next()?.to_owned())
    })
    .unwrap();
    format!("http://{addr}/metrics")
}

fn get(url: &str) -> (u16, String) {
    let mut response = http().get(url).call().unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

/// The agent's optional `/metrics` (`[metrics] listen`, loopback only):
/// promtool passes on it, and its figures follow what the device does: a
/// job's runs, the records the hub took, the uplink going down, the outbox
/// growing and aging while the hub is away, and the reconnects.
#[test]
fn the_agent_metrics_pass_promtool_and_follow_the_uplink_the_outbox_and_the_jobs() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [[job]]\nname = \"tick\"\nschedule = \"@every 1s\"\ncommand = [\"true\"]\n\
                 [[job]]\nname = \"backup-fake\"\nschedule = \"@every 1s\"\ncommand = [\"false\"]\n";
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "exporter", &timings, extra).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[agent.id.as_str()], true, Duration::from_secs(20)).unwrap();
    let url = agent_metrics_url(&agent);

    let text = wait_for(Duration::from_secs(30), "job runs and acknowledged records", || {
        let (status, text) = get(&url);
        assert_eq!(status, 200, "{text}");
        let ran = value(&text, "outpost_agent_job_runs_total{outcome=\"succeeded\"}").unwrap_or(0.0) >= 2.0;
        let acked = value(&text, "outpost_agent_records_acknowledged_total").unwrap_or(0.0) >= 2.0;
        (ran && acked).then_some(text)
    })
    .unwrap();
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics: {said}\n{text}");
    assert_eq!(value(&text, "outpost_agent_uplink_connected{transport=\"quic\"}"), Some(1.0), "{text}");
    assert!(value(&text, "outpost_agent_job_runs_total{outcome=\"failed\"}").unwrap() >= 1.0, "{text}");
    assert!(value(&text, "outpost_agent_backup_runs_total{outcome=\"failed\"}").unwrap() >= 1.0, "{text}");
    assert_eq!(value(&text, "outpost_agent_backup_last_success_timestamp_seconds"), Some(0.0), "{text}");
    let sent = value(&text, "outpost_agent_records_sent_total").unwrap();
    assert!(sent >= value(&text, "outpost_agent_records_acknowledged_total").unwrap(), "{text}");
    assert!(value(&text, "outpost_agent_collector_duration_seconds_count{collector=\"telemetry\"}").unwrap() >= 1.0);
    assert!(text.contains("outpost_agent_build_info{version=\""), "{text}");
    assert_eq!(get(&url.replace("/metrics", "/other")).0, 404);

    // The hub goes away: the uplink is down, the outbox grows and ages,
    // and the failed attempts are counted.
    hub.kill();
    let mut last = String::new();
    let text = wait_for(Duration::from_secs(30), "the outbox to age while the hub is away", || {
        let (_, text) = get(&url);
        last.clone_from(&text);
        let down = value(&text, "outpost_agent_uplink_connected{transport=\"quic\"}") == Some(0.0);
        let waiting = value(&text, "outpost_agent_outbox_records").unwrap_or(0.0) >= 3.0;
        let aged = value(&text, "outpost_agent_outbox_oldest_record_age_seconds").unwrap_or(0.0) >= 1.0;
        let tried = text
            .lines()
            .filter(|l| l.starts_with("outpost_agent_reconnects_total{reason="))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            >= 1.0;
        (down && waiting && aged && tried).then_some(text)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{last}"));
    assert!(value(&text, "outpost_agent_outbox_bytes").unwrap() > 0.0, "{text}");
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics: {said}\n{text}");
}
