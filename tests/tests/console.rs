//! The console in a real browser: Debian's headless Chromium, driven by
//! Playwright (`tests/browser/console.mjs`), against a real hub with real
//! agents. The script signs in with a one-time link, checks the overview's
//! counts, a device named with markup, a stopped agent turning offline on
//! the open page and saying since when and why, charts with data, an
//! operator's job run, a bulk command's result page filling in (one device
//! offline: its command waits and is listed as waiting), and a viewer's
//! forged POST; this side checks what the hub recorded and that the waiting
//! command runs once its device is back. Screenshots are kept under
//! `target/tmp/console-artifacts/`.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::CommandStateView;
use outpost_tests::{Agent, Hub, Scratch, Timings, wait_online};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Fails with how to get what is missing (tests/run.sh installs both).
fn check_tools() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: install Debian's package (apt-get install chromium) or run tests/run.sh"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (tests/run.sh does)"
    );
    chromium
}

#[test]
fn the_console_in_a_real_browser() {
    let chromium = check_tools();
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    // An offline rule, told to a receiver run here: the agent stopped below
    // fires it, and the overview shows it.
    let hook = outpost_tests::Webhook::start(Vec::new()).unwrap();
    hub.extra_config = format!(
        "[alerts]\nevaluate_every = \"200ms\"\ngroup_wait = \"0s\"\n[[alerts.receiver]]\nname = \"pager\"\nurl = {:?}\n\
         [[alerts.rule]]\nname = \"DeviceOffline\"\ncondition = \"offline\"\nthreshold = \"1s\"\n",
        hook.url
    );
    hub.kill();
    hub.serve().unwrap();
    let job = "report";
    let jobs = format!("[[job]]\nname = {job:?}\nschedule = \"0 0 0 1 1 *\"\ncommand = [\"echo\", \"report done\"]\n");
    let mut watched = Agent::enroll_with(scratch.path(), &hub, "gw-one", &timings, &jobs).unwrap();
    let mut hostile = Agent::enroll(scratch.path(), &hub, "hostile", &timings).unwrap();
    let config = std::fs::read_to_string(&hostile.config).unwrap();
    std::fs::write(&hostile.config, config.replace("name = \"hostile\"", "name = \"<script>alert(1)</script>\""))
        .unwrap();
    let mut leaving = Agent::enroll(scratch.path(), &hub, "leaving", &timings).unwrap();
    let silent = Agent::enroll(scratch.path(), &hub, "silent", &timings).unwrap();
    for agent in [&mut watched, &mut hostile, &mut leaving] {
        agent.start().unwrap();
    }
    wait_online(&hub, &[&watched.id, &hostile.id, &leaving.id], true, Duration::from_secs(20)).unwrap();
    outpost_tests::wait_for(Duration::from_secs(20), "the hostile name to reach the hub", || {
        (hub.device(&hostile.id).ok()?.name == "<script>alert(1)</script>").then_some(())
    })
    .unwrap();

    let admin = hub.client();
    let token = |name: &str, role: &str| {
        let (status, body) =
            admin.raw("POST", "/api/v1/tokens", Some(json!({"name": name, "role": role, "expires_in": "1h"}))).unwrap();
        assert_eq!(status, 201, "{body:#}");
        body["secret"].as_str().unwrap().to_owned()
    };
    // The bulk step acts on these three (the last is stopped by then).
    for id in [&watched.id, &hostile.id, &leaving.id] {
        admin.set_labels(id, &[("group".to_owned(), "browser".to_owned())].into()).unwrap();
    }
    let operator = token("operator in a browser", "operator");
    let viewer = token("viewer in a browser", "viewer");
    let link = admin.sign_in_link("admin", "10m").unwrap();

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-artifacts");
    std::fs::create_dir_all(&out).unwrap();
    let stop_pid = leaving.proc.as_ref().unwrap().pid().to_string();
    let status = Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .current_dir(browser_dir())
        .env("CHROMIUM", &chromium)
        .env("HUB", &hub.api)
        .env("LINK", format!("{}{}", hub.api, link.path))
        .env("WANT_COUNTS", "4,3,1")
        .env("AGENT_ID", &watched.id)
        .env("HOSTILE_ID", &hostile.id)
        .env("STOP_ID", &leaving.id)
        .env("STOP_PID", &stop_pid)
        .env("JOB", job)
        .env("OPERATOR_TOKEN", &operator)
        .env("VIEWER_TOKEN", &viewer)
        .env("OUT_DIR", &out)
        .status()
        .expect("run node (tests/run.sh installs Node.js)");
    assert!(status.success(), "the browser script failed (its steps are above); artifacts in {}", out.display());
    drop(silent);

    // What the hub recorded of it.
    for shot in ["overview.png", "overview-alert.png", "device.png"] {
        let size = std::fs::metadata(out.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{shot} is {size} bytes");
    }
    // The bulk command that waited for the stopped device runs once it is back.
    leaving.start().unwrap();
    let done = outpost_tests::wait_for(Duration::from_secs(20), "the waiting command to run", || {
        let commands = admin.commands(&leaving.id).ok()?;
        commands.into_iter().find(|c| c.kind == "echo" && c.state.is_final())
    })
    .unwrap();
    assert!(matches!(done.state, CommandStateView::Completed { .. }), "{done:?}");
    let runs = admin.job_runs(&watched.id, job, 10).unwrap();
    assert!(runs.iter().any(|r| r.trigger == "command" && r.succeeded), "{runs:?}");
    let (_, refused) = admin.raw("GET", "/api/v1/audit?outcome=refused&who=viewer%20in%20a%20browser", None).unwrap();
    let entries = refused["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["action"] == "POST /console/devices/{id}/act"
            && e["status"] == 403
            && e["target"] == watched.id.as_str()),
        "the forged POST is in the audit log: {refused:#}"
    );
    // The silence set in the browser is the hub's, for that alert.
    let silences = admin.silences().unwrap();
    assert_eq!(silences.len(), 1, "{silences:?}");
    assert_eq!(silences[0].matchers.get("device").map(String::as_str), Some(leaving.id.as_str()));
    assert_eq!(silences[0].matchers.get("alertname").map(String::as_str), Some("DeviceOffline"));
    assert!(silences[0].active);
    let (_, done) = admin.raw("GET", "/api/v1/audit?who=operator%20in%20a%20browser&outcome=ok", None).unwrap();
    assert!(
        done["entries"].as_array().unwrap().iter().any(|e| {
            let detail = e["detail"].as_str().unwrap_or_default();
            detail.starts_with("command ") && detail.ends_with(&format!(": run_job {job}"))
        }),
        "the operator's run is in the audit log: {done:#}"
    );
}
