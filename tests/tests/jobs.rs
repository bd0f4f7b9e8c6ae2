//! Scheduled jobs on real agents: schedules fire on time, overlap policies
//! hold, retries back off, hung jobs die with their children, missed runs
//! are caught up once, hub schedules replace local ones and survive a
//! restart, and every run reaches the hub.
//!
//! tokio-cron-scheduler reads the wall clock, so tokio's paused clock cannot
//! drive it: these tests use short real schedules and deadlines.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::{CommandRequest, CommandStateView, JobRunView, JobsView, OutcomeView};
use outpost_tests::{Agent, Hub, Scratch, Timings, bin, run, wait_for, wait_online};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn sh(script: &str) -> String {
    format!("[\"sh\", \"-c\", {script:?}]")
}

fn job(name: &str, schedule: &str, script: &str, extra: &str) -> String {
    format!("[[job]]\nname = {name:?}\nschedule = {schedule:?}\ncommand = {}\n{extra}\n", sh(script))
}

fn runs(hub: &Hub, agent: &Agent, job: &str) -> Vec<JobRunView> {
    let mut runs = hub.client().job_runs(&agent.id, job, 1000).unwrap_or_default();
    runs.reverse(); // oldest first
    runs
}

fn wait_runs(hub: &Hub, agent: &Agent, job: &str, what: &str, ok: impl Fn(&[JobRunView]) -> bool) -> Vec<JobRunView> {
    wait_for(Duration::from_secs(30), what, || Some(runs(hub, agent, job)).filter(|r| ok(r))).unwrap()
}

fn ms(rfc: &str) -> u64 {
    humantime::parse_rfc3339(rfc).unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

#[test]
fn schedules_fire_on_time_and_every_run_reaches_the_hub() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let config = [
        job("cron2", "*/2 * * * * *", "date +%s%3N >> cron2.txt", ""),
        job("every1", "@every 1s", "date +%s%3N >> every1.txt", ""),
        job("nightly", "0 30 2 * * *", "true", "kind = \"command\""),
    ]
    .concat();
    let elsewhere = scratch.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = config
        + &job(
            "envdir",
            "0 0 0 1 1 *",
            "echo \"$GREETING from $(pwd)\" > out.txt",
            &format!("env = {{ GREETING = \"hello\" }}\nworking_dir = {:?}", elsewhere.display().to_string()),
        )
        + "[[job]]\nname = \"check\"\nschedule = \"0 0 0 1 1 *\"\nkind = \"store-check\"\n";
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "clock", &timings, &config).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();

    let cron2 = agent.data_dir.join("cron2.txt");
    let every1 = agent.data_dir.join("every1.txt");
    wait_for(Duration::from_secs(20), "five cron runs and eight interval runs", || {
        (lines(&cron2).len() >= 5 && lines(&every1).len() >= 8).then_some(())
    })
    .unwrap();
    let cron: Vec<u64> = lines(&cron2).iter().map(|l| l.parse().unwrap()).collect();
    for t in &cron {
        // At an even second; the library polls every 500 ms, so up to ~1 s
        // late, plus the time to start a shell on a loaded CI machine.
        assert!(t % 2000 < 1500, "cron run at {t} is not near an even second: {cron:?}");
    }
    for pair in cron.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((1000..=3000).contains(&gap), "cron runs {gap} ms apart: {cron:?}");
    }
    let every: Vec<u64> = lines(&every1).iter().map(|l| l.parse().unwrap()).collect();
    for pair in every.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((500..=1500).contains(&gap), "@every 1s runs {gap} ms apart: {every:?}");
    }

    // Every run is recorded at the hub, with exit status and output.
    let recorded = wait_runs(&hub, &agent, "cron2", "cron runs at the hub", |r| r.len() >= cron.len());
    assert!(recorded.iter().all(|r| r.succeeded && r.trigger == "schedule" && r.attempt == 1), "{recorded:?}");
    let view: JobsView = hub.client().jobs(&agent.id).unwrap();
    let names: Vec<&str> = view.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["check", "cron2", "envdir", "every1", "nightly"]);
    let nightly = &view.jobs[4];
    assert_eq!(nightly.source, "config");
    assert!(nightly.next_run.as_deref().unwrap().ends_with("T02:30:00Z"), "{nightly:?}");
    assert!(nightly.last_run.is_none());

    // The same, locally, with no hub involved.
    let out = agent.cli(&["jobs"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("nightly") && table.contains("02:30:00Z") && table.contains("succeeded"), "{table}");

    // Environment and working directory; the built-in store check.
    let out = agent.cli(&["run-job", "envdir"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(elsewhere.join("out.txt")).unwrap();
    assert_eq!(written.trim(), format!("hello from {}", elsewhere.display()));
    let out = agent.cli(&["run-job", "check"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("outbox:") && text.contains("entries"), "{text}");
}

#[test]
fn overlap_policies_retries_timeouts_and_bad_commands_behave_as_configured() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let config = [
        // Two at once would find the lock taken and exit 99.
        job("forbid", "@every 1s", "mkdir lock || exit 99; sleep 2.5; rmdir lock", "overlap = \"forbid\""),
        job("replace", "@every 2s", "echo $$ >> replace.pids; sleep 60", "overlap = \"replace\""),
        job("flaky", "0 0 0 1 1 *", "echo try; exit 3", "retries = 2\nretry_backoff = \"500ms\""),
        job("hang", "0 0 0 1 1 *", "sleep 300 & echo $! > hang.pid; wait", "timeout = \"1s\""),
        // A child that leaves the run's process group (a daemon of its own).
        job("escape", "0 0 0 1 1 *", "setsid sleep 301 & echo $! > escape.pid; wait", "timeout = \"1s\""),
        "[[job]]\nname = \"missing\"\nschedule = \"0 0 0 1 1 *\"\ncommand = [\"/nonexistent/program\"]\n".into(),
        job("flood", "0 0 0 1 1 *", "head -c 10000000 /dev/zero", "max_output = \"1 KiB\""),
    ]
    .concat();
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "busy", &timings, &config).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();

    // Retries: three attempts, the gaps growing 0.5 s then 1 s.
    let out = agent.cli(&["run-job", "flaky"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a failed run must exit non-zero: {text}");
    assert_eq!(text.matches("exited with status 3").count(), 3, "{text}");
    let flaky = wait_runs(&hub, &agent, "flaky", "three attempts", |r| r.len() == 3);
    assert_eq!(flaky.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(flaky.iter().all(|r| r.trigger == "manual" && r.exit_code == Some(3) && r.output == "try\n"));
    let gap = |a: &JobRunView, b: &JobRunView| ms(&b.started) as i64 - ms(&a.ended) as i64;
    assert!(gap(&flaky[0], &flaky[1]) >= 0, "{flaky:?}");
    // RFC 3339 to the second: compare with a second's slack.
    assert!(ms(&flaky[2].started) >= ms(&flaky[0].started) + 1000, "backoff too short: {flaky:?}");

    // A hung job is killed at its timeout together with its child.
    let out = agent.cli(&["run-job", "hang"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("timed out"), "{out:?}");
    let pid: u32 = std::fs::read_to_string(agent.data_dir.join("hang.pid")).unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the hung job's child to die", || (!process_alive(pid)).then_some(())).unwrap();
    // ...and so is a child that left the run's process group.
    let out = agent.cli(&["run-job", "escape"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("timed out"), "{out:?}");
    let pid: u32 = std::fs::read_to_string(agent.data_dir.join("escape.pid")).unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the escaped child to die", || (!process_alive(pid)).then_some(())).unwrap();
    let escape = wait_runs(&hub, &agent, "escape", "the escape's record", |r| !r.is_empty());
    assert!(escape[0].output.contains("killed 1 process group(s)"), "{escape:?}");

    // A missing program and a flood are recorded; the daemon carries on.
    let out = agent.cli(&["run-job", "missing"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed to start"), "{out:?}");
    let out = agent.cli(&["run-job", "flood"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let flood = wait_runs(&hub, &agent, "flood", "the flood's record", |r| !r.is_empty());
    assert_eq!(flood[0].output_bytes, 10_000_000);
    assert_eq!(flood[0].output.len(), 1024);
    let missing = wait_runs(&hub, &agent, "missing", "the missing program's record", |r| !r.is_empty());
    assert!(missing[0].outcome.contains("failed to start"), "{missing:?}");
    let out = agent.cli(&["run-job", "nonesuch"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job named \"nonesuch\""), "{out:?}");

    // Overlap: by now several seconds of schedules have passed.
    let replaced = wait_runs(&hub, &agent, "replace", "replaced runs", |r| r.len() >= 2);
    assert!(replaced.iter().all(|r| r.outcome.starts_with("replaced")), "{replaced:?}");
    let pids: Vec<u32> = lines(&agent.data_dir.join("replace.pids")).iter().map(|l| l.parse().unwrap()).collect();
    // A new run starts only once the one it replaces is gone: never two
    // alive (the newest two may be mid-replacement, the rest long dead).
    assert!(pids.iter().filter(|p| process_alive(**p)).count() <= 1, "two runs alive: {pids:?}");
    let old = &pids[..pids.len().saturating_sub(2)];
    assert!(old.iter().all(|p| !process_alive(*p)), "a replaced run survived: {pids:?}");
    let forbid = wait_runs(&hub, &agent, "forbid", "forbid runs", |r| r.len() >= 2);
    assert!(forbid.iter().all(|r| r.succeeded), "two forbid runs overlapped: {forbid:?}");
    for pair in forbid.windows(2) {
        assert!(ms(&pair[1].started) + 1000 >= ms(&pair[0].ended), "overlapping runs: {forbid:?}");
    }
    // Asked twice in a row, the second finds the first (or a scheduled one)
    // running: a 2.5 s job cannot have ended in between.
    agent.cli(&["run-job", "forbid", "--no-wait"]).unwrap();
    let out = agent.cli(&["run-job", "forbid", "--no-wait"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("still running"), "{err}");
}

#[test]
fn a_run_cut_off_by_a_crash_is_reported_interrupted_and_its_processes_do_not_linger() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let config = job("long", "0 0 0 1 1 *", "echo $$ > long.pid; sleep 300", "");
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "crashy", &timings, &config).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let out = agent.cli(&["run-job", "long", "--no-wait"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let pidfile = agent.data_dir.join("long.pid");
    let pid: u32 = wait_for(Duration::from_secs(10), "the job to start", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .unwrap();
    agent.proc.as_mut().unwrap().kill();
    assert!(process_alive(pid), "the job runs on after the agent died (own process group)");
    agent.start().unwrap();
    wait_for(Duration::from_secs(10), "the orphaned job to be killed", || (!process_alive(pid)).then_some(())).unwrap();
    let long = wait_runs(&hub, &agent, "long", "the interrupted run's record", |r| !r.is_empty());
    assert_eq!(long.len(), 1);
    assert!(long[0].outcome.starts_with("interrupted") && long[0].output.contains("killed"), "{long:?}");
}

#[test]
fn a_run_missed_while_stopped_is_caught_up_once_at_start_only_when_asked() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let config =
        [job("cu", "@every 4s", "true", "catch_up = true"), job("nocu", "@every 4s", "true", "catch_up = false")]
            .concat();
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "sleeper", &timings, &config).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    wait_runs(&hub, &agent, "cu", "a first scheduled run", |r| !r.is_empty());
    wait_runs(&hub, &agent, "nocu", "a first scheduled run", |r| !r.is_empty());
    agent.proc.as_mut().unwrap().terminate(Duration::from_secs(10));
    // Longer than the interval: each job misses a run.
    std::thread::sleep(Duration::from_secs(5));
    let restarted_ms = outpost_shared::time::Timestamp::now().0;
    agent.start().unwrap();
    let cu = wait_runs(&hub, &agent, "cu", "the catch-up run", |r| r.iter().any(|r| r.trigger == "catch_up"));
    let caught: Vec<_> = cu.iter().filter(|r| r.trigger == "catch_up").collect();
    assert_eq!(caught.len(), 1, "{cu:?}");
    assert!(ms(&caught[0].started) < restarted_ms + 3000, "the catch-up run came late: {caught:?}");
    // Let a scheduled run of each happen after the restart (they keep their
    // 4 s rhythm across the restart), then check: no catch-up for nocu.
    wait_runs(&hub, &agent, "nocu", "a scheduled run after the restart", |r| {
        r.iter().any(|r| ms(&r.started) + 1000 >= restarted_ms)
    });
    let nocu = runs(&hub, &agent, "nocu");
    assert!(nocu.iter().all(|r| r.trigger == "schedule"), "{nocu:?}");
    let cu = runs(&hub, &agent, "cu");
    assert_eq!(cu.iter().filter(|r| r.trigger == "catch_up").count(), 1, "{cu:?}");
}

#[test]
fn a_schedule_from_the_hub_replaces_the_local_one_by_name_and_survives_a_restart() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    // Hub jobs that run programs need the device's consent (see
    // `hub_jobs_run_programs_only_with_allow_exec` in resilience.rs).
    let config = job("greet", "@every 1s", "echo local >> greet.txt", "") + "[commands]\nallow_exec = true\n";
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "managed", &timings, &config).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let greet = agent.data_dir.join("greet.txt");
    wait_for(Duration::from_secs(10), "the local job", || lines(&greet).contains(&"local".to_owned()).then_some(()))
        .unwrap();
    let client = hub.client();

    // Invalid schedules are refused with the reason; nothing changes.
    let bad = serde_json::json!({"jobs": [
        {"name": "greet", "schedule": "every second", "command": ["true"]},
        {"name": "other", "schedule": "@every 1m", "kind": "teleport"},
        {"name": "zero", "schedule": "@every 1m", "command": ["true"], "timeout": "0s"},
    ]});
    let err = client.put_desired(&agent.id, 0, bad).unwrap_err().to_string();
    for reason in ["jobs[greet].schedule: invalid cron", "jobs[other].kind: unknown job kind", "jobs[zero].timeout"] {
        assert!(err.contains("422") && err.contains(reason), "{reason} missing from: {err}");
    }

    let doc = serde_json::json!({"jobs": [
        {"name": "greet", "schedule": "@every 1s", "command": ["sh", "-c", "echo hub >> greet.txt"]},
    ]});
    client.put_desired(&agent.id, 0, doc).unwrap();
    let view = wait_for(Duration::from_secs(10), "the hub's job in the device's list", || {
        client.jobs(&agent.id).ok().filter(|v| v.jobs.first().is_some_and(|j| j.source == "hub"))
    })
    .unwrap();
    assert_eq!(view.jobs.len(), 1);
    wait_for(Duration::from_secs(10), "the hub's job to run", || {
        lines(&greet).last().is_some_and(|l| l == "hub").then_some(())
    })
    .unwrap();

    // `outpostctl run-job` runs it now through the hub.
    let out = run(Command::new(bin("outpostctl")).args([
        "--hub",
        &hub.api,
        "--token",
        &hub.admin_token,
        "run-job",
        &agent.id,
        "greet",
    ]))
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("succeeded"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let out =
        run(Command::new(bin("outpostctl")).args(["--hub", &hub.api, "--token", &hub.admin_token, "jobs", &agent.id]))
            .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("greet") && table.contains("hub") && table.contains("@every 1s"), "{table}");
    let by_command = runs(&hub, &agent, "greet");
    assert_eq!(by_command.iter().filter(|r| r.trigger == "command").count(), 1);

    // The hub goes away; the agent restarts on its own and keeps the hub's job.
    hub.kill();
    agent.proc.as_mut().unwrap().kill();
    let before = lines(&greet).len();
    agent.start().unwrap();
    wait_for(Duration::from_secs(10), "runs after the restart", || (lines(&greet).len() >= before + 3).then_some(()))
        .unwrap();
    let after = &lines(&greet)[before..];
    assert!(after.iter().all(|l| l == "hub"), "the local job came back: {after:?}");
    let out = agent.cli(&["jobs", "--json"]).unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["source"], "hub", "{listed}");
}

#[test]
fn invalid_jobs_in_the_config_are_all_reported_with_their_names_and_exit_64() {
    let scratch = Scratch::new().unwrap();
    let path = scratch.path().join("agent.toml");
    let text = format!(
        "data_dir = \"/tmp/x\"\n{}{}{}{}",
        job("a", "*/5 * * * *", "true", ""),
        "[[job]]\nname = \"b\"\nschedule = \"@every 1m\"\nkind = \"teleport\"\n",
        job("c", "@every 1m", "true", "timeout = \"0s\""),
        job("c", "@every 1m", "true", ""),
    );
    std::fs::write(&path, text).unwrap();
    let out = run(Command::new(bin("outpost-agent")).args(["validate", "--config"]).arg(&path)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for needle in [
        "4 errors",
        "job[a].schedule: invalid cron expression",
        "job[b].kind: unknown job kind \"teleport\"",
        "job[c].timeout: must be more than zero",
        "job[c].name: duplicate job name",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

fn uptime_lines(path: &Path) -> Vec<f64> {
    lines(path).iter().filter_map(|l| l.parse().ok()).collect()
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime").unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn wall_clock_steps_neither_burst_nor_silence_the_schedules() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    // The jobs log the real monotonic time (/proc/uptime is not faked).
    let config = [
        job("every", "@every 1s", "cut -d' ' -f1 /proc/uptime >> every.txt", ""),
        job("cron", "*/2 * * * * *", "cut -d' ' -f1 /proc/uptime >> cron.txt", ""),
    ]
    .concat();
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "clocky", &timings, &config).unwrap();
    let offset = scratch.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    agent.env = outpost_tests::faketime(&offset);
    agent.start().unwrap();
    let (every, cron) = (agent.data_dir.join("every.txt"), agent.data_dir.join("cron.txt"));
    wait_for(Duration::from_secs(15), "both jobs running", || {
        (uptime_lines(&every).len() >= 3 && uptime_lines(&cron).len() >= 2).then_some(())
    })
    .unwrap();
    let count_since = |path: &Path, t: f64| uptime_lines(path).iter().filter(|&&u| u >= t).count();

    for (step, label) in [("+1h", "forward"), ("+0", "back")] {
        std::fs::write(&offset, format!("{step}\n")).unwrap();
        let (at, started) = (uptime(), std::time::Instant::now());
        // Not silenced: both keep running after the step.
        wait_for(Duration::from_secs(15), &format!("runs after the clock stepped {label}"), || {
            (count_since(&every, at) >= 5 && count_since(&cron, at) >= 2).then_some(())
        })
        .unwrap();
        // No burst: @every 1s about once a second, cron every 2 s, plus at
        // most one run for the skipped time.
        let elapsed = started.elapsed().as_secs_f64();
        let (e, c) = (count_since(&every, at) as f64, count_since(&cron, at) as f64);
        assert!(e <= elapsed + 2.0, "clock stepped {label}: {e} @every-1s runs in {elapsed:.1} s");
        assert!(c <= elapsed / 2.0 + 2.0, "clock stepped {label}: {c} cron runs in {elapsed:.1} s");
    }
    assert!(agent.log_text().contains("wall clock stepped back"), "the backward step went unnoticed");
}

/// SIGTERM while jobs run (issue 25): a run that ends within the stop grace
/// finishes and is recorded as it ended; one that does not is killed with
/// its process group when the grace runs out and recorded interrupted; the
/// agent exits within the grace and a little; both records reach the hub
/// after the next start.
#[test]
fn on_sigterm_runs_finish_within_the_grace_and_the_rest_are_killed_and_recorded_interrupted() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let never = "0 0 0 1 1 *";
    let config =
        [job("short", never, "sleep 2; echo finished", ""), job("long", never, "echo $$ > long.pid; sleep 300", "")]
            .concat();
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "stopping", &timings, &config).unwrap();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, format!("stop_grace = \"4s\"\n{text}")).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    assert!(agent.cli(&["run-job", "long", "--no-wait"]).unwrap().status.success());
    let pidfile = agent.data_dir.join("long.pid");
    let pid: u32 = wait_for(Duration::from_secs(10), "the long job to start", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .unwrap();
    assert!(agent.cli(&["run-job", "short", "--no-wait"]).unwrap().status.success());

    let asked = std::time::Instant::now();
    let status = agent.proc.as_mut().unwrap().terminate(Duration::from_secs(20));
    let took = asked.elapsed();
    assert!(status.is_some_and(|s| s.success()), "the agent did not exit cleanly on SIGTERM: {status:?}");
    assert!(took >= Duration::from_secs(3), "the agent did not wait for its runs: exited after {took:?}");
    assert!(took < Duration::from_secs(10), "the agent took {took:?} to stop with a 4 s grace");
    assert!(!process_alive(pid), "the long job outlived the agent");
    let log = agent.log_text();
    assert!(log.contains("Running jobs outlived the stop grace; killing them."), "{log}");

    agent.start().unwrap();
    let short = wait_runs(&hub, &agent, "short", "the short run's record", |r| !r.is_empty());
    assert_eq!(short.len(), 1, "{short:?}");
    assert!(short[0].outcome == "succeeded" && short[0].output.contains("finished"), "{short:?}");
    let long = wait_runs(&hub, &agent, "long", "the long run's record", |r| !r.is_empty());
    assert_eq!(long.len(), 1, "{long:?}");
    assert!(long[0].outcome.starts_with("interrupted"), "{long:?}");
}

/// SIGHUP (issue 25): a changed job list and log level take effect without
/// a reconnect (the hub sees one session throughout); a broken config is
/// refused, its errors logged, and the jobs in force keep running.
#[test]
fn sighup_reloads_jobs_and_the_log_level_without_a_reconnect_and_refuses_a_broken_config() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let first = job("first", "@every 1s", "echo x >> first.txt", "");
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "reloading", &timings, &first).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    let (first_file, second_file) = (agent.data_dir.join("first.txt"), agent.data_dir.join("second.txt"));
    wait_for(Duration::from_secs(10), "the first job to run", || (lines(&first_file).len() >= 2).then_some(()))
        .unwrap();
    let sessions = || hub.log_text().matches("Session opened.").count();
    assert_eq!(sessions(), 1);

    // The new config: another job, and only warnings logged.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let second = job("second", "@every 1s", "echo x >> second.txt", "");
    std::fs::write(&agent.config, format!("log = \"warn\"\n{}", text.replace(&first, &second))).unwrap();
    agent.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the second job to run", || (lines(&second_file).len() >= 2).then_some(()))
        .unwrap();
    let (first_runs, started_lines) = (lines(&first_file).len(), agent.log_text().matches("Job run starting.").count());
    wait_for(Duration::from_secs(10), "more runs of the second job", || (lines(&second_file).len() >= 5).then_some(()))
        .unwrap();
    assert!(lines(&first_file).len() <= first_runs + 1, "the removed job still runs");
    let log = agent.log_text();
    assert_eq!(log.matches("Job run starting.").count(), started_lines, "info lines are still logged at warn");
    assert_eq!(sessions(), 1, "the reload reconnected the agent");

    // A broken config on SIGHUP: refused, the second job keeps running.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, format!("stop_grace = \"forever\"\n{text}")).unwrap();
    agent.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the broken config to be refused", || {
        agent.log_text().contains("The config has errors; the one in force stays.").then_some(())
    })
    .unwrap();
    assert!(agent.log_text().contains("stop_grace"), "the error does not name the key");
    let runs = lines(&second_file).len();
    wait_for(Duration::from_secs(10), "the second job to keep running", || {
        (lines(&second_file).len() >= runs + 2).then_some(())
    })
    .unwrap();
    assert!(agent.proc.as_mut().unwrap().running());
    assert_eq!(sessions(), 1);
}

/// With a delegated cgroup (systemd's `Delegate=yes`, which the shipped
/// unit sets) every run gets a cgroup of its own, and what it started ends
/// with it however it ended: here a child that left the run's process
/// group and emptied its environment (so the run's marker cannot find it),
/// from a run that exited by itself, and one from a run killed at its
/// timeout, and from an `exec` command, also one the agent's death cut
/// off. Nothing is left under the agent's cgroup after.
#[test]
fn with_a_delegated_cgroup_everything_a_run_started_ends_with_it() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let config = [
        // The child writes its pid once it has left the run's group, and the
        // run waits for that (else it could end, and kill its group, first).
        job(
            "daemonize",
            "0 0 0 1 1 *",
            "setsid env -i sh -c 'echo $$ > daemon.pid; exec sleep 304' & until [ -s daemon.pid ]; do sleep 0.05; done",
            "",
        ),
        job(
            "hang",
            "0 0 0 1 1 *",
            "setsid env -i sh -c 'echo $$ > hang.pid; exec sleep 305' & sleep 300",
            "timeout = \"1s\"",
        ),
        "[commands]\nallow_exec = true\n".into(),
    ]
    .concat();
    let cgroup = outpost_tests::DelegatedCgroup::new().unwrap();
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "scoped", &timings, &config).unwrap();
    agent.start_in(&cgroup).unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(10)).unwrap();
    assert!(agent.log_text().contains("Each job run gets a cgroup of its own."), "{}", agent.log_text());

    let out = agent.cli(&["run-job", "daemonize"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: u32 = std::fs::read_to_string(agent.data_dir.join("daemon.pid")).unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the daemonized child to die", || (!process_alive(pid)).then_some(())).unwrap();
    let runs = wait_runs(&hub, &agent, "daemonize", "the run's record", |r| !r.is_empty());
    assert_eq!(runs[0].exit_code, Some(0), "{runs:?}");
    assert!(runs[0].output.contains("killed 1 process(es) the run left in its cgroup"), "{runs:?}");

    let out = agent.cli(&["run-job", "hang"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("timed out"), "{out:?}");
    let pid: u32 = std::fs::read_to_string(agent.data_dir.join("hang.pid")).unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the hung run's escaped child and its sleep to die", || {
        (!process_alive(pid)).then_some(())
    })
    .unwrap();
    let runs = wait_runs(&hub, &agent, "hang", "the run's record", |r| !r.is_empty());
    assert!(runs[0].output.contains("killed 1 process(es) the run left in its cgroup"), "{runs:?}");

    // An exec command is scoped the same way.
    let pid_file = agent.data_dir.join("cmd.pid");
    let script = format!(
        "setsid env -i sh -c 'echo $$ > {0}; exec sleep 306' & until [ -s {0} ]; do sleep 0.05; done",
        pid_file.display()
    );
    let out = outpost_tests::outpostctl(
        &hub,
        &["command", "send", &agent.id, "exec", "--wait", "20s", "--", "sh", "-c", &script],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("killed 1 process(es) the command left in its cgroup"), "{text}");
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the command's escaped child to die", || (!process_alive(pid)).then_some(()))
        .unwrap();

    // An exec command still running when the agent dies (SIGKILL; no
    // systemd here to end the cgroup with it) is reported interrupted at
    // the next start, and what is left in its cgroup is killed then.
    let pid_file = agent.data_dir.join("long.pid");
    let script = format!("echo $$ > {}; exec sleep 307", pid_file.display());
    let request =
        CommandRequest { kind: "exec".into(), args: vec!["sh".into(), "-c".into(), script], expires_in: None };
    let long = hub.client().send_command(&agent.id, &request).unwrap().id;
    let pid: u32 = wait_for(Duration::from_secs(10), "the long command to start", || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .unwrap();
    agent.proc.as_mut().unwrap().kill();
    assert!(process_alive(pid), "the command died with the agent");
    agent.start_in(&cgroup).unwrap();
    let done =
        hub.wait_command(long, "the cut-off command's report", |s| matches!(s, CommandStateView::Completed { .. }));
    match done.state {
        CommandStateView::Completed { outcome: OutcomeView::Interrupted, output, .. } => {
            assert!(output.contains("1 process(es) left in its cgroup have been killed"), "{output}");
        }
        other => panic!("the cut-off command: {other:?}"),
    }
    wait_for(Duration::from_secs(5), "the cut-off command's process to die", || (!process_alive(pid)).then_some(()))
        .unwrap();

    // The agent itself stays in its cgroup; no run's or command's cgroup is left.
    assert!(cgroup.children().is_empty(), "{:?}", cgroup.children());
}
