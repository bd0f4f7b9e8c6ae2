//! docs/OPERATIONS.md done as an operator would: the hub backed up and
//! restored on both backends (its data dir with tar; with PostgreSQL the
//! database with pg_dump and pg_restore). After the restore the device
//! reconnects by itself, every record the hub held at the backup is there
//! exactly once, and delivery goes on.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::{Agent, Hub, Scratch, Timings, assert_exactly_once_in_order, run, wait_all, wait_online};
use std::process::Command;
use std::time::Duration;

fn tar(args: &[&str], dir: &std::path::Path) {
    let out = run(Command::new("tar").arg("-C").arg(dir).args(args)).unwrap();
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn back_up_and_restore(on_postgres: bool) {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start_with(scratch.path(), timings.clone(), "127.0.0.1:0", on_postgres).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "kept", &timings).unwrap();
    agent.start_loadgen(&["--records", "3000", "--batch", "50"]).unwrap();
    assert_exactly_once_in_order(&wait_all(&hub, &agent.id, 3000, Duration::from_secs(60)), 3000);

    // The backup: the hub stopped (sled) or running (PostgreSQL's dump is
    // consistent online; the data dir's keys do not change).
    let parent = hub.data_dir.parent().unwrap().to_owned();
    let (archive, dump) = (scratch.path().join("hub-backup.tar"), scratch.path().join("outpost.dump"));
    if let Some(pg) = &hub.postgres {
        pg.dump("outpost", &dump).unwrap();
        tar(&["-cf", archive.to_str().unwrap(), "hub"], &parent);
    } else {
        hub.proc.as_mut().unwrap().terminate(Duration::from_secs(20));
        tar(&["-cf", archive.to_str().unwrap(), "hub"], &parent);
        hub.serve().unwrap();
    }

    // The disaster: the hub's machine is lost with its data dir (and, with
    // PostgreSQL, its database's content).
    hub.kill();
    std::fs::remove_dir_all(&hub.data_dir).unwrap();
    if let Some(pg) = &hub.postgres {
        pg.drop_db("outpost").unwrap();
    }

    // The restore, in the order OPERATIONS.md gives.
    tar(&["-xf", archive.to_str().unwrap()], &parent);
    if let Some(pg) = &hub.postgres {
        pg.restore("outpost", &dump).unwrap();
    }
    hub.serve().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(20)).unwrap();
    assert_exactly_once_in_order(&wait_all(&hub, &agent.id, 3000, Duration::from_secs(30)), 3000);
    // Delivery goes on after the restore.
    agent.proc.take().unwrap().kill();
    agent.start_loadgen(&["--records", "4000", "--batch", "50"]).unwrap();
    assert_exactly_once_in_order(&wait_all(&hub, &agent.id, 4000, Duration::from_secs(60)), 4000);
    hub.kill();
}

#[test]
fn the_hub_on_sled_is_backed_up_and_restored_as_operations_md_says() {
    back_up_and_restore(false);
}

#[test]
fn the_hub_on_postgresql_is_backed_up_and_restored_as_operations_md_says() {
    back_up_and_restore(true);
}
