//! Faults of the hub's store: a full disk under sled, a database that goes
//! away under PostgreSQL, a database that is not there at start. The hub
//! stays up, stops acknowledging, says so on `/readyz` and `/healthz`, and
//! resumes by itself; every record arrives exactly once.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::postgres::Postgres;
use outpost_tests::{
    Agent, Hub, Scratch, Timings, Tmpfs, assert_exactly_once_in_order, bin, run, wait_all, wait_for, wait_progress,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// 30 000 records over about 15 s.
const RECORDS: u64 = 30_000;
const LOADGEN: [&str; 6] = ["--records", "30000", "--batch", "50", "--appends-per-sec", "40"];

fn health(hub: &Hub, check: &str) -> (u16, String) {
    hub.client().health(check).unwrap_or((0, String::new()))
}

fn hub_log(scratch: &Path) -> String {
    std::fs::read_to_string(scratch.join("hub.log")).unwrap_or_default()
}

/// The hub's data dir on a small tmpfs that fills up during ingest, then
/// grows: the hub refuses while full (`/readyz` 503, no ack), reopens its
/// store by itself once space is back, and every record arrives once.
#[test]
fn a_full_disk_stops_acknowledging_and_the_hub_resumes_by_itself_when_space_returns() {
    let scratch = Scratch::new().unwrap();
    let fs = Tmpfs::mount(&scratch.path().join("hub"), "3m").unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start_with(scratch.path(), timings.clone(), "127.0.0.1:0", false).unwrap();
    let pid = hub.proc.as_ref().unwrap().pid();
    let mut agent = Agent::enroll(scratch.path(), &hub, "gen", &timings).unwrap();
    agent.start_loadgen(&LOADGEN).unwrap();

    let full = wait_for(Duration::from_secs(60), "the hub to report that it cannot store", || {
        let (status, text) = health(&hub, "readyz");
        (status == 503).then_some(text)
    })
    .unwrap();
    assert!(full.contains("No space left") || full.contains("space"), "readyz: {full}");
    assert_eq!(health(&hub, "healthz").0, 503, "healthz must show the store's fault");
    // While full, the API answers 503 rather than show what may not be on
    // disk.
    match hub.device(&agent.id) {
        Err(e) => assert!(e.to_string().contains("503"), "{e}"),
        Ok(view) => panic!("the API answered from a store that cannot write: last_seq {}", view.last_seq),
    }

    fs.resize("512m").unwrap();
    wait_for(Duration::from_secs(30), "the hub to be ready again", || (health(&hub, "readyz").0 == 200).then_some(()))
        .unwrap();
    let samples = wait_all(&hub, &agent.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
    assert_eq!(hub.proc.as_mut().unwrap().pid(), pid, "the hub was restarted");
    assert!(hub.proc.as_mut().unwrap().running(), "the hub exited");
    let log = hub_log(scratch.path());
    let faults = log.matches("cannot make writes durable").count();
    assert!(faults >= 1, "the fault was not logged");
    assert!(faults <= 20, "the fault was logged {faults} times: the log must be rate-limited");
    assert!(log.contains("writes are durable again"), "the recovery was not logged");
    hub.kill();
}

/// PostgreSQL stops while an agent streams: the hub keeps running, stops
/// acknowledging, and resumes when the database is back; nothing
/// acknowledged is lost, nothing is stored twice.
#[test]
fn a_lost_database_stops_acknowledging_and_the_hub_resumes_when_it_returns() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start_with(scratch.path(), timings.clone(), "127.0.0.1:0", true).unwrap();
    let pid = hub.proc.as_ref().unwrap().pid();
    let mut agent = Agent::enroll(scratch.path(), &hub, "gen", &timings).unwrap();
    agent.start_loadgen(&LOADGEN).unwrap();
    wait_progress(&hub, &agent.id, 3_000, Duration::from_secs(30));

    hub.postgres.as_mut().unwrap().stop().unwrap();
    let down = wait_for(Duration::from_secs(20), "the hub to report the database gone", || {
        let (status, text) = health(&hub, "readyz");
        (status == 503).then_some(text)
    })
    .unwrap();
    assert!(down.contains("postgres"), "readyz: {down}");
    // The API says it cannot answer rather than guessing.
    assert!(hub.device(&agent.id).is_err(), "the API answered without its database");
    std::thread::sleep(Duration::from_secs(3)); // the outage lasts a while; nothing to poll
    assert!(hub.proc.as_mut().unwrap().running(), "the hub exited when its database went away");

    hub.postgres.as_mut().unwrap().start_again().unwrap();
    wait_for(Duration::from_secs(30), "the hub to be ready again", || (health(&hub, "readyz").0 == 200).then_some(()))
        .unwrap();
    let samples = wait_all(&hub, &agent.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
    assert_eq!(hub.proc.as_mut().unwrap().pid(), pid);
    hub.kill();
}

/// A database that is not there at start: `validate` names `store.url`, the
/// host and the reason and exits 69 (unavailable, not a config error: the
/// unit keeps retrying); `serve` exits non-zero with the same reason instead
/// of running without a store.
#[test]
fn an_unreachable_database_at_start_is_a_clear_error() {
    let scratch = Scratch::new().unwrap();
    let data_dir = scratch.path().join("hub");
    outpost_hub::init(&data_dir).unwrap();
    let pg = Postgres::start(true).unwrap();
    let socket = pg.socket_dir();
    drop(pg); // stopped and removed: nothing listens there any more
    let config = scratch.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[store]\nbackend = \"postgres\"\nurl = \"host={} port=5999 user=outpost dbname=outpost\"\n",
            data_dir.display().to_string(),
            socket.display()
        ),
    )
    .unwrap();
    let out = run(Command::new(bin("outpost-hub")).arg("validate").arg("--config").arg(&config)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("store.url") && err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("cannot reach the database"), "{err}");
    let out = run(Command::new(bin("outpost-hub")).arg("serve").arg("--config").arg(&config)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve ran without its database");
    assert!(err.contains("cannot reach the database"), "{err}");
}
