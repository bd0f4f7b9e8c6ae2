//! One bad push must not take down a fleet, and no record may vanish:
//! a device whose store starts over under its identity loses nothing; an
//! absurd interval is refused with its key everywhere; hub jobs run
//! programs only where the device allows it; desired state can be patched;
//! `validate` catches what would stop the daemon, which then exits 64.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::{CommandRequest, CommandStateView, EventKindView, OutcomeView};
use outpost_tests::{Agent, Hub, Scratch, Timings, bin, outpostctl as ctl, run, wait_for, wait_online, wait_progress};
use std::process::Command;
use std::time::Duration;

fn fast() -> Timings {
    Timings { telemetry: "100ms", ..Timings::default() }
}

#[test]
fn a_store_that_starts_over_under_a_kept_identity_loses_no_record() {
    let scratch = Scratch::new().unwrap();
    let mut hub = Hub::start(scratch.path(), fast()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "phoenix", &fast()).unwrap();
    agent.start().unwrap();
    // The hub's mark climbs well past what the new store will number
    // while offline.
    let mark = wait_progress(&hub, &agent.id, 60, Duration::from_secs(30));

    // The store is deleted (corrupt, restored, rolled back) while the hub
    // is away; the device keeps its identity and makes records offline.
    agent.proc.as_mut().unwrap().terminate(Duration::from_secs(10));
    hub.kill();
    std::fs::remove_dir_all(agent.data_dir.join("store")).unwrap();
    let offline_from = outpost_shared::time::Timestamp::now().0;
    agent.start().unwrap();
    wait_for(Duration::from_secs(10), "the agent to start its new store", || {
        agent.data_dir.join("store").exists().then_some(())
    })
    .unwrap();
    // About 15 samples at 100 ms: numbered 1.., all below the hub's mark.
    std::thread::sleep(Duration::from_millis(1500)); // The agent works offline for a while.
    let offline_until = outpost_shared::time::Timestamp::now().0;
    hub.serve().unwrap();

    // A command sent now completes: its result is not taken for a duplicate.
    let client = hub.client();
    let echo = CommandRequest { kind: "echo".into(), args: vec!["still here".into()], expires_in: None };
    let sent = client.send_command(&agent.id, &echo).unwrap();
    let done = hub.wait_command(sent.id, "the command after the store reset", |s| {
        matches!(s, CommandStateView::Completed { .. })
    });
    assert!(
        matches!(&done.state, CommandStateView::Completed { outcome: OutcomeView::Succeeded, output, .. } if output == "still here"),
        "{:?}",
        done.state
    );

    // Every sample made offline reached the hub, once.
    let samples = wait_for(Duration::from_secs(20), "the offline samples at the hub", || {
        let view = client
            .metrics(&agent.id, Some(&offline_from.to_string()), Some(&offline_until.to_string()), Some(10_000))
            .ok()?;
        (view.samples.len() >= 10).then_some(view.samples)
    })
    .unwrap();
    let mut times: Vec<u64> = samples.iter().map(|s| s.at_ms).collect();
    times.dedup();
    assert_eq!(times.len(), samples.len(), "a sample arrived twice");
    assert!(samples.iter().all(|s| s.seq > mark), "a renumbered sample is at or below the old mark {mark}");

    // And the device said what happened.
    let alarm = wait_for(Duration::from_secs(10), "the StoreReset alarm", || {
        client.events(&agent.id, 1000).ok()?.into_iter().find_map(|e| match e.event {
            EventKindView::Alarm { alarm, message, .. } if alarm == "store_reset" => Some(message),
            _ => None,
        })
    })
    .unwrap();
    assert!(alarm.contains("none was dropped"), "{alarm}");
}

#[test]
fn an_absurd_interval_is_refused_with_its_key_by_the_hub_and_by_validate() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "steady", &Timings::default()).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let client = hub.client();
    let absurd = serde_json::json!({"jobs": [
        {"name": "tick", "schedule": "@every 9223372036854775813s", "kind": "store-check"},
    ]});
    let err = client.put_desired(&agent.id, 0, absurd.clone()).unwrap_err().to_string();
    assert!(err.contains("422") && err.contains("jobs[tick].schedule") && err.contains("too long"), "{err}");
    let err = client.patch_desired(&agent.id, serde_json::json!({"telemetry_interval": "99999999999999s"}));
    let err = err.unwrap_err().to_string();
    assert!(err.contains("422") && err.contains("telemetry_interval"), "{err}");
    assert_eq!(client.desired(&agent.id).unwrap().version, 0, "a refused document was stored");

    // The same job in a config file: validate and run exit 64 naming the key.
    let config = scratch.path().join("absurd.toml");
    let text = std::fs::read_to_string(&agent.config).unwrap()
        + "[[job]]\nname = \"tick\"\nschedule = \"@every 9223372036854775813s\"\nkind = \"store-check\"\n";
    std::fs::write(&config, text).unwrap();
    for cmd in ["validate", "run"] {
        let out = run(Command::new(bin("outpost-agent")).arg(cmd).arg("--config").arg(&config)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {stderr}");
        assert!(stderr.contains("job[tick].schedule") && stderr.contains("too long"), "{cmd}: {stderr}");
    }
    // The device never stopped.
    assert!(agent.proc.as_mut().unwrap().running());
}

#[test]
fn hub_jobs_run_programs_only_with_allow_exec_and_desired_state_can_be_patched() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "locked", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let client = hub.client();
    let marker = scratch.path().join("ran-as-hub-job");
    let program = serde_json::json!({"name": "id", "schedule": "@every 1s",
        "command": ["sh", "-c", format!("id > {}", marker.display())]});

    // allow_exec = false (the default): the device refuses the document,
    // says why, and runs nothing.
    client.put_desired(&agent.id, 0, serde_json::json!({"telemetry_interval": "1s", "jobs": [program]})).unwrap();
    let view = wait_for(Duration::from_secs(15), "the device's refusal", || {
        client.desired(&agent.id).ok().filter(|v| v.reported_error.is_some())
    })
    .unwrap();
    let reason = view.reported_error.unwrap();
    assert!(reason.contains("jobs[id].command") && reason.contains("commands.allow_exec = false"), "{reason}");
    // The device list flags it, and the status filter finds it.
    let flagged = wait_for(Duration::from_secs(15), "the refusal in the device list", || {
        hub.device(&agent.id).ok().filter(|d| d.desired_error.is_some())
    })
    .unwrap();
    assert_eq!(flagged.desired_error.as_deref(), Some(reason.as_str()));
    let (status, refused) = client.raw("GET", "/api/v1/devices?status=refused", None).unwrap();
    assert_eq!(status, 200, "{refused:#}");
    assert_eq!(refused.as_array().map(Vec::len), Some(1), "{refused:#}");
    assert_eq!(refused[0]["id"], agent.id.as_str(), "{refused:#}");
    // A built-in job from the hub is still accepted; a patch keeps the
    // interval and replaces the jobs.
    let builtin = serde_json::json!({"name": "check", "schedule": "@every 1s", "kind": "store-check"});
    let patched = client.patch_desired(&agent.id, serde_json::json!({"jobs": [builtin]})).unwrap();
    assert_eq!(patched.version, 2);
    assert_eq!(patched.doc["telemetry_interval"], "1s", "the patch dropped a key it did not name");
    let applied = wait_for(Duration::from_secs(15), "the patched state applied", || {
        client.desired(&agent.id).ok().filter(|v| v.in_sync && v.reported_version == 2)
    })
    .unwrap();
    assert!(applied.reported_error.is_none(), "{applied:?}");
    wait_for(Duration::from_secs(15), "the refusal cleared in the device list", || {
        hub.device(&agent.id).ok().filter(|d| d.desired_error.is_none())
    })
    .unwrap();
    wait_for(Duration::from_secs(15), "the hub's built-in job to run", || {
        client.job_runs(&agent.id, "check", 10).ok().filter(|r| !r.is_empty())
    })
    .unwrap();
    assert!(!marker.exists(), "a hub job ran a program on a device with allow_exec = false");

    // `null` removes a key; `set` names what it removes.
    let patched = client.patch_desired(&agent.id, serde_json::json!({"telemetry_interval": null})).unwrap();
    assert_eq!(patched.doc, serde_json::json!({"jobs": [builtin]}));
    let out = ctl(&hub, &["desired", "set", &agent.id, r#"{"telemetry_interval":"2s"}"#]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("removed from the desired state: jobs"), "{stderr}");
    let out = ctl(&hub, &["desired", "patch", &agent.id, r#"{"jobs":[]}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(client.desired(&agent.id).unwrap().doc, serde_json::json!({"telemetry_interval": "2s", "jobs": []}));
}

#[test]
fn validate_catches_what_would_stop_the_daemon_and_the_daemon_exits_64() {
    let scratch = Scratch::new().unwrap();
    let dir = scratch.path();
    let check = |program: &str, cmd: &str, config: &std::path::Path, wants: &[&str]| {
        let out = run(Command::new(bin(program)).arg(cmd).arg("--config").arg(config)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{program} {cmd}: {stderr}");
        for want in wants {
            assert!(stderr.contains(want), "{program} {cmd}: {want:?} missing from: {stderr}");
        }
    };

    // An agent that never enrolled, with a missing and a short backup key.
    let agent = dir.join("agent.toml");
    let short_key = dir.join("short.key");
    std::fs::write(&short_key, "abcd\n").unwrap();
    let data = dir.join("never-enrolled");
    let text = format!(
        "data_dir = {:?}\n[backups]\nkey_file = {:?}\n[[backup]]\nname = \"etc\"\npaths = [\"/etc\"]\n",
        data.display().to_string(),
        dir.join("missing.key").display().to_string()
    );
    std::fs::write(&agent, &text).unwrap();
    for cmd in ["validate", "run"] {
        check("outpost-agent", cmd, &agent, &["data_dir: not enrolled", "backups.key_file", "missing.key"]);
    }
    std::fs::write(&agent, text.replace("missing.key", "short.key")).unwrap();
    check("outpost-agent", "validate", &agent, &["backups.key_file", "expected 64 hex digits"]);
    // A valid key that group or others may read: refused, with the fix.
    let open_key = dir.join("open.key");
    std::fs::write(&open_key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&open_key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&agent, text.replace("missing.key", "open.key")).unwrap();
    for cmd in ["validate", "run"] {
        check("outpost-agent", cmd, &agent, &["backups.key_file", "open to group or others (mode 644)", "chmod 600"]);
    }
    let hub_addr = format!("data_dir = {:?}\n[uplink]\nhub = \"hub.example.com\"\n", data.display().to_string());
    std::fs::write(&agent, hub_addr).unwrap();
    check("outpost-agent", "validate", &agent, &["uplink.hub", "has no port"]);

    // A hub whose data dir was never initialised, advertising no port.
    let hub = dir.join("hub.toml");
    let text = format!(
        "data_dir = {:?}\n[quic]\nadvertise = \"hub.example.com\"\n",
        dir.join("blank-hub").display().to_string()
    );
    std::fs::write(&hub, text).unwrap();
    for cmd in ["validate", "serve"] {
        check("outpost-hub", cmd, &hub, &["quic.advertise", "has no port"]);
    }
    let text = format!("data_dir = {:?}\n", dir.join("blank-hub").display().to_string());
    std::fs::write(&hub, text).unwrap();
    for cmd in ["validate", "serve"] {
        check("outpost-hub", cmd, &hub, &["data_dir", "not an initialised hub data dir", "outpost-hub init"]);
    }

    // An initialised hub whose CA key was opened to the group.
    let data = dir.join("hub-data");
    let out = run(Command::new(bin("outpost-hub")).args(["init", "--data-dir"]).arg(&data)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(data.join("ca.key"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    std::fs::write(&hub, format!("data_dir = {:?}\n", data.display().to_string())).unwrap();
    for cmd in ["validate", "serve"] {
        check("outpost-hub", cmd, &hub, &["data_dir", "ca.key holds a secret", "(mode 640)", "chmod 600"]);
    }
}
