//! What the hub asks of a device arrives once: commands queued while it is
//! offline run exactly once, expired ones never; desired state is applied,
//! reported, and kept across restarts.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::CommandRequest;
use outpost_hub::api::{CommandStateView, OutcomeView};
use outpost_hub::client::ClientError;
use outpost_tests::{Agent, Hub, Scratch, Timings, wait_for, wait_online};
use std::time::Duration;

fn exec(script: String, expires_in: &str) -> CommandRequest {
    CommandRequest {
        kind: "exec".into(),
        args: vec!["sh".into(), "-c".into(), script],
        expires_in: Some(expires_in.into()),
    }
}

#[test]
fn a_command_sent_offline_runs_exactly_once_even_if_the_agent_dies_on_receipt_and_an_expired_one_never() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let extra = "[commands]\nallow_exec = true\n";
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "remote", &timings, extra).unwrap();
    let ran = scratch.path().join("ran.txt");
    let expired = scratch.path().join("expired.txt");
    let client = hub.client();

    // Both queued while the device is offline.
    let once = client.send_command(&agent.id, &exec(format!("echo ran >> {}", ran.display()), "10m")).unwrap();
    let late = client.send_command(&agent.id, &exec(format!("echo ran >> {}", expired.display()), "1s")).unwrap();
    assert_eq!(once.state, CommandStateView::Queued);
    hub.wait_command(late.id, "the short-lived command to expire", |s| matches!(s, CommandStateView::Expired { .. }));

    // The device comes back and is killed as soon as it confirmed receipt.
    agent.start().unwrap();
    hub.wait_command(once.id, "delivery", |s| !matches!(s, CommandStateView::Queued));
    agent.proc.as_mut().unwrap().kill();
    agent.start().unwrap();

    let done = hub.wait_command(once.id, "the outcome", |s| matches!(s, CommandStateView::Completed { .. }));
    let lines = wait_for(Duration::from_secs(10), "the command's effect", || {
        std::fs::read_to_string(&ran).ok().filter(|t| !t.is_empty())
    })
    .unwrap();
    // Give a second run, if there were one, the time to show.
    let again = client
        .send_command(&agent.id, &CommandRequest { kind: "echo".into(), args: vec!["after".into()], expires_in: None });
    let again = again.unwrap();
    let echoed = hub.wait_command(again.id, "a later command", |s| matches!(s, CommandStateView::Completed { .. }));
    match echoed.state {
        CommandStateView::Completed { outcome: OutcomeView::Succeeded, output, .. } => assert_eq!(output, "after"),
        other => panic!("echo: {other:?}"),
    }
    let lines = std::fs::read_to_string(&ran).unwrap_or(lines);
    assert_eq!(lines.lines().count(), 1, "the command ran {} times", lines.lines().count());
    match done.state {
        CommandStateView::Completed { outcome: OutcomeView::Succeeded | OutcomeView::Interrupted, .. } => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(!expired.exists(), "an expired command ran");
    assert!(matches!(client.command(late.id).unwrap().state, CommandStateView::Expired { .. }));
}

#[test]
fn exec_is_refused_unless_the_device_allows_it() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "locked", &timings).unwrap();
    agent.start().unwrap();
    let marker = scratch.path().join("never.txt");
    let cmd = hub.client().send_command(&agent.id, &exec(format!("touch {}", marker.display()), "1m")).unwrap();
    let done = hub.wait_command(cmd.id, "the refusal", |s| matches!(s, CommandStateView::Completed { .. }));
    assert!(matches!(done.state, CommandStateView::Completed { outcome: OutcomeView::Rejected, .. }), "{done:?}");
    assert!(!marker.exists());
    let bad =
        hub.client().send_command(&agent.id, &CommandRequest { kind: "reboot".into(), args: vec![], expires_in: None });
    assert!(matches!(bad, Err(ClientError::Status { status: 422, .. })), "{bad:?}");
}

/// Median spacing of the newest `n` samples taken after `after_ms`.
fn median_spacing(hub: &Hub, id: &str, after_ms: u64, n: usize) -> Duration {
    let samples = wait_for(Duration::from_secs(20), "fresh samples", || {
        let s = hub.client().metrics(id, Some(&after_ms.to_string()), None, Some(100_000)).ok()?.samples;
        (s.len() > n).then_some(s)
    })
    .unwrap();
    let mut gaps: Vec<u64> = samples.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
    gaps.sort_unstable();
    Duration::from_millis(gaps[gaps.len() / 2])
}

#[test]
fn desired_state_is_versioned_applied_reported_and_kept_across_restarts() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings { telemetry: "1s", ..Timings::default() };
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "tuned", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let client = hub.client();
    let id = agent.id.clone();

    let initial = client.desired(&id).unwrap();
    assert_eq!((initial.version, initial.reported_version), (0, 0));

    let fast = serde_json::json!({"telemetry_interval": "200ms"});
    let set = client.put_desired(&id, 0, fast.clone()).unwrap();
    assert_eq!(set.version, 1);
    // A writer that read version 0 is told it changed.
    let stale = client.put_desired(&id, 0, serde_json::json!({"telemetry_interval": "5s"}));
    assert!(matches!(stale, Err(ClientError::Status { status: 409, .. })), "{stale:?}");
    // Documents the device could not apply are refused up front.
    for bad in [serde_json::json!({"telemetry_interval": "1ms"}), serde_json::json!({"colour": "blue"})] {
        let refused = client.put_desired(&id, 1, bad);
        assert!(matches!(refused, Err(ClientError::Status { status: 422, .. })), "{refused:?}");
    }

    let synced_at = wait_for(Duration::from_secs(10), "the device to report version 1", || {
        let view = client.desired(&id).ok()?;
        (view.in_sync && view.reported_version == 1).then(|| outpost_shared::time::Timestamp::now().0)
    })
    .unwrap();
    assert_eq!(client.desired(&id).unwrap().doc, fast);
    let spacing = median_spacing(&hub, &id, synced_at, 10);
    assert!(spacing < Duration::from_millis(400), "interval not applied: median spacing {spacing:?}");

    // Restarted, it keeps the applied state without the hub resending it.
    let status = agent.proc.as_mut().unwrap().terminate(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()));
    let restarted = outpost_shared::time::Timestamp::now().0;
    agent.start().unwrap();
    let spacing = median_spacing(&hub, &id, restarted, 10);
    assert!(spacing < Duration::from_millis(400), "desired state lost on restart: median spacing {spacing:?}");
    assert_eq!(client.desired(&id).unwrap().reported_version, 1);
}

#[test]
fn a_long_queue_of_commands_is_delivered_in_several_deliveries_each_run_once() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "busy", &timings).unwrap();
    let client = hub.client();
    // Queued offline: more than one delivery holds.
    let ids: Vec<u64> = (0..250)
        .map(|i| {
            let request = CommandRequest { kind: "echo".into(), args: vec![i.to_string()], expires_in: None };
            client.send_command(&agent.id, &request).unwrap().id
        })
        .collect();
    let too_big = CommandRequest { kind: "echo".into(), args: vec!["x".repeat(70_000)], expires_in: None };
    assert!(matches!(client.send_command(&agent.id, &too_big), Err(ClientError::Status { status: 422, .. })));

    agent.start().unwrap();
    let done = wait_for(Duration::from_secs(30), "all 250 commands completed", || {
        let all = client.commands(&agent.id).ok()?;
        let completed = all.iter().filter(|c| matches!(c.state, CommandStateView::Completed { .. })).count();
        (completed == ids.len()).then_some(all)
    })
    .unwrap();
    for (i, cmd) in done.iter().enumerate() {
        match &cmd.state {
            CommandStateView::Completed { outcome: OutcomeView::Succeeded, output, .. } => {
                assert_eq!(output, &i.to_string())
            }
            other => panic!("command {i}: {other:?}"),
        }
    }
    // The device's command list pages: 100, 100, 50, oldest first, each
    // page naming the next in its Link header, the count in all beside.
    let mut path = format!("/api/v1/devices/{}/commands?limit=100", agent.id);
    let mut paged: Vec<u64> = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let mut answer = ureq::get(format!("{}{path}", hub.api))
            .header("Authorization", &format!("Bearer {}", hub.admin_token))
            .call()
            .unwrap();
        assert_eq!(answer.headers().get("x-total-count").unwrap().to_str().unwrap(), "250");
        let link = answer.headers().get("link").map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<outpost_hub::api::CommandView> =
            serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        sizes.push(page.len());
        paged.extend(page.iter().map(|c| c.id));
        match link {
            Some(link) => path = link.trim_start_matches('<').split(">;").next().unwrap().to_owned(),
            None => break,
        }
    }
    assert_eq!((sizes, paged), (vec![100, 100, 50], ids.clone()));
    let bad = ureq::get(format!("{}/api/v1/devices/{}/commands?after=nope", hub.api, agent.id))
        .header("Authorization", &format!("Bearer {}", hub.admin_token))
        .call();
    assert!(matches!(bad, Err(ureq::Error::StatusCode(422))), "{bad:?}");
    let results = client
        .events(&agent.id, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e.event, outpost_hub::api::EventKindView::CommandResult { .. }))
        .count();
    assert_eq!(results, 250, "a command ran more than once");
}
