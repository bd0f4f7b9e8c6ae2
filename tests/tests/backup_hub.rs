//! Backups through the hub: upload of what the hub lacks, the catalog,
//! restore onto a replacement device under an operator's grant, corruption
//! at the hub, and uploads interrupted by a killed agent or a killed hub.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::trees::{assert_same_tree, describe, lost, noise, populate, populate_fidelity, walk};
use outpost_tests::{Agent, Hub, Scratch, Timings, bin, run, wait_for};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Config tables of an agent that backs `src` up as set `field`, uploading.
fn backup_config(scratch: &Scratch, src: &Path) -> String {
    let key = scratch.path().join("fleet-backup.key");
    outpost_shared::fsutil::write_atomic(&key, KEY.as_bytes(), 0o600).unwrap();
    format!(
        "[backups]\nkey_file = {:?}\n[[backup]]\nname = \"field\"\npaths = [{:?}]\nupload = true\n",
        key.display().to_string(),
        src.display().to_string()
    )
}

fn backup(agent: &Agent, args: &[&str]) -> Output {
    run(Command::new(bin("outpost-agent")).arg("backup").arg("--config").arg(&agent.config).args(args)).unwrap()
}

/// Where the restored copy of `src` is under `target`.
fn restored(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

/// Starts `outpost-agent backup ARGS`, output captured.
fn spawn_backup(agent: &Agent, args: &[&str]) -> std::process::Child {
    Command::new(bin("outpost-agent"))
        .arg("backup")
        .arg("--config")
        .arg(&agent.config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Chunk files the hub holds for `device` (not temporary files).
fn hub_chunks(hub: &Hub, device: &str) -> Vec<PathBuf> {
    let dir = hub.data_dir.join("backups").join(device).join("chunks");
    let mut files = Vec::new();
    for sub in fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            if !f.file_name().to_string_lossy().starts_with('.') {
                files.push(f.path());
            }
        }
    }
    files
}

/// Parses "N chunk(s) sent (B bytes), M already ..." of an upload.
fn sent_and_present(out: &str) -> (u64, u64) {
    let number_before = |marker: &str| -> u64 {
        let at = out.find(marker).unwrap_or_else(|| panic!("no {marker:?} in {out}"));
        out[..at].split_whitespace().last().unwrap().trim_start_matches(['(', ',']).parse().unwrap()
    };
    (number_before(" chunk(s) sent"), number_before(" already"))
}

#[test]
fn a_replacement_device_restores_the_dead_devices_latest_snapshot_through_the_hub() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let src = scratch.path().join("field-data");
    populate(&src);
    // Hard links, attributes, ACLs, special files and holes travel through
    // the hub too (issue 29).
    populate_fidelity(&src.join("fidelity"), 64);
    let config = backup_config(&scratch, &src);
    let old = Agent::enroll_with(scratch.path(), &hub, "old-gateway", &timings, &config).unwrap();

    let first = backup(&old, &["run", "field"]);
    assert!(first.status.success(), "{}", text(&first));
    let (first_sent, first_present) = sent_and_present(&text(&first));
    assert_eq!(first_present, 0, "{}", text(&first));
    // Change a little; the second upload sends only new chunks.
    fs::write(src.join("logs/app.log"), "a changed log line\n".repeat(40_000)).unwrap();
    fs::write(src.join("new.txt"), b"new file\n").unwrap();
    let second = backup(&old, &["run", "field"]);
    assert!(second.status.success(), "{}", text(&second));
    let (sent, present) = sent_and_present(&text(&second));
    assert!(present >= 1, "the unchanged 6 MiB file's chunks are at the hub already: {}", text(&second));
    assert!(sent >= 1 && sent < first_sent, "{}", text(&second));

    let client = hub.client();
    let catalog = client.backups(&old.id).unwrap();
    assert_eq!(catalog.snapshots.len(), 2, "{catalog:?}");
    assert!(catalog.snapshots.iter().all(|s| s.set == "field" && s.problems == 0), "{catalog:?}");
    assert_eq!(catalog.stored_chunks as usize, hub_chunks(&hub, &old.id).len());
    // The hub holds no plaintext: the log's text is nowhere in its files.
    for f in hub_chunks(&hub, &old.id) {
        let bytes = fs::read(f).unwrap();
        assert!(!bytes.windows(18).any(|w| w == b"a changed log line"), "plaintext at the hub");
    }

    // The old device dies; a new one is enrolled with the fleet's key.
    let new = Agent::enroll_with(scratch.path(), &hub, "new-gateway", &timings, &config).unwrap();
    let target = scratch.path().join("restore");
    let args = ["restore", "--from-device", &old.id, "--snapshot", "latest", "--target", target.to_str().unwrap()];
    let refused = backup(&new, &args);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("outpostctl backups grant"), "{}", text(&refused));
    assert!(!target.exists() || describe(&target).is_empty(), "nothing restored without a grant");

    let grant = run(Command::new(bin("outpostctl")).args([
        "--hub",
        &hub.api,
        "--token",
        &hub.admin_token,
        "backups",
        "grant",
        &old.id,
        "--to",
        &new.id,
    ]))
    .unwrap();
    assert!(grant.status.success(), "{}", text(&grant));
    let done = backup(&new, &args);
    assert!(done.status.success(), "{}", text(&done));
    let losses = lost(&walk(&src), &walk(&restored(&target, &src)));
    assert!(losses.is_empty(), "the restore through the hub lost: {losses:#?}");

    // A chunk changes on the hub's disk: verify names it, a restore that
    // needs it fails loudly and writes nothing wrong.
    let victim = hub_chunks(&hub, &old.id).into_iter().max_by_key(|f| fs::metadata(f).unwrap().len()).unwrap();
    let mut bytes = fs::read(&victim).unwrap();
    bytes[1000] ^= 0x40;
    fs::write(&victim, bytes).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let verify = run(Command::new(bin("outpostctl")).args([
        "--hub",
        &hub.api,
        "--token",
        &hub.admin_token,
        "backups",
        "verify",
        &old.id,
    ]))
    .unwrap();
    assert!(!verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains(&name) && text(&verify).contains("1 problem(s)"), "{}", text(&verify));
    let target2 = scratch.path().join("restore-2");
    let args2 = ["restore", "--from-device", &old.id, "--target", target2.to_str().unwrap()];
    let failed = backup(&new, &args2);
    assert!(!failed.status.success(), "{}", text(&failed));
    assert!(text(&failed).contains(&name) && text(&failed).contains("corrupt"), "{}", text(&failed));
    let expected = walk(&src);
    for (path, node) in walk(&restored(&target2, &src)) {
        if node["kind"] == "file" && path != "." {
            assert_eq!(expected[&path]["content"], node["content"], "{path}: wrong data written");
        }
    }

    // The old device retired: its backups go from the hub, on request only.
    let ctl = |args: &[&str]| {
        run(Command::new(bin("outpostctl")).args(["--hub", &hub.api, "--token", &hub.admin_token]).args(args)).unwrap()
    };
    let unconfirmed = ctl(&["backups", "delete", &old.id]);
    assert!(!unconfirmed.status.success() && text(&unconfirmed).contains("--yes"), "{}", text(&unconfirmed));
    assert_eq!(client.backups(&old.id).unwrap().snapshots.len(), 2);
    let deleted = ctl(&["backups", "delete", &old.id, "--yes"]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(text(&deleted).contains("deleted 2 snapshot(s)"), "{}", text(&deleted));
    let after = client.backups(&old.id).unwrap();
    assert!(after.snapshots.is_empty() && after.stored_chunks == 0, "{after:?}");
    assert!(!hub.data_dir.join("backups").join(&old.id).exists());
    let gone = backup(&new, &args);
    assert!(!gone.status.success() && text(&gone).contains("no snapshot latest"), "{}", text(&gone));
}

/// Waits until the hub holds at least `n` chunks of `device`.
fn wait_chunks(hub: &Hub, device: &str, n: usize) {
    wait_for(Duration::from_secs(60), "chunks at the hub", || (hub_chunks(hub, device).len() >= n).then_some(()))
        .unwrap();
}

/// Waits until the hub's chunk count of `device` stays the same for a
/// second.
fn settle(hub: &Hub, device: &str) {
    let mut last = (usize::MAX, std::time::Instant::now());
    wait_for(Duration::from_secs(30), "the hub's chunk count to settle", || {
        let n = hub_chunks(hub, device).len();
        if n != last.0 {
            last = (n, std::time::Instant::now());
        }
        (last.1.elapsed() >= Duration::from_secs(1)).then_some(())
    })
    .unwrap();
}

#[test]
fn an_interrupted_upload_resumes_without_resending_what_arrived() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let src = scratch.path().join("field-data");
    fs::create_dir_all(&src).unwrap();
    // 60 files of 1 MiB random data: about 60 distinct chunks.
    for i in 0..60u64 {
        fs::write(src.join(format!("part-{i:03}.bin")), noise(1 << 20, i + 1)).unwrap();
    }
    let config = backup_config(&scratch, &src);
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "uploader", &timings, &config).unwrap();
    let repo = agent.data_dir.join("backups");
    let mut first = spawn_backup(&agent, &["run", "field"]);
    // The agent is killed part-way through the upload (the hub stopped
    // meanwhile, so the upload cannot finish before the kill).
    wait_chunks(&hub, &agent.id, 12);
    hub.proc.as_ref().unwrap().signal(libc::SIGSTOP);
    first.kill().unwrap();
    first.wait().unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGCONT);
    // The hub finishes what was in flight when the agent died (up to four
    // chunks): those arrived, and must not be sent again either.
    settle(&hub, &agent.id);
    assert!(repo.join("upload-pending").exists(), "the killed upload leaves its mark");
    let client = hub.client();
    assert!(client.backups(&agent.id).unwrap().snapshots.is_empty(), "not catalogued before all chunks arrived");

    // Resumed: only what had not arrived is sent.
    let resumed = backup(&agent, &["upload"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (sent, present) = sent_and_present(&text(&resumed));
    assert!(present >= 12, "{}", text(&resumed));
    let total = hub_chunks(&hub, &agent.id).len() as u64;
    assert_eq!(sent + present, total, "{}", text(&resumed));
    assert!(!repo.join("upload-pending").exists());
    assert_eq!(client.backups(&agent.id).unwrap().snapshots.len(), 1);

    // More data; this time the hub is killed during the upload, and the
    // daemon finishes it once the hub is back.
    for i in 60..90u64 {
        fs::write(src.join(format!("part-{i:03}.bin")), noise(1 << 20, i + 1)).unwrap();
    }
    let running = spawn_backup(&agent, &["run", "field"]);
    wait_chunks(&hub, &agent.id, total as usize + 6);
    hub.kill();
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success(), "the snapshot itself succeeded: {}", text(&out));
    assert!(text(&out).contains("upload pending"), "{}", text(&out));
    assert!(repo.join("upload-pending").exists());
    hub.serve().unwrap();
    agent.start().unwrap();
    let client = hub.client();
    wait_for(Duration::from_secs(60), "the daemon to finish the upload", || {
        (client.backups(&agent.id).ok()?.snapshots.len() == 2).then_some(())
    })
    .unwrap();
    let hub_log = fs::read_to_string(scratch.path().join("hub.log")).unwrap();
    assert!(!hub_log.contains("Chunk was already stored"), "a chunk that had arrived was sent again");
    wait_for(Duration::from_secs(10), "the daemon's upload report", || {
        agent.log_text().contains("Pending backups uploaded").then_some(())
    })
    .unwrap();

    // What the hub has restores byte for byte.
    let target = scratch.path().join("restore");
    let id = agent.id.clone();
    let out = backup(&agent, &["restore", "--from-device", &id, "--target", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_tree(&src, &restored(&target, &src));
}

/// The hub's own retention: a device uploads three snapshots; the hub keeps
/// the newest two, deletes the oldest and the chunks only it needed (never
/// a chunk a kept snapshot needs), and what it keeps still restores. No
/// request of the device deletes anything; the policy is in hub.toml.
#[test]
fn the_hubs_retention_keeps_what_it_says_and_every_kept_snapshot_restores() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.extra_config = "[backups]\nprune_every = \"1h\"\n[backups.retention]\nlast = 2\n".into();
    hub.kill();
    hub.serve().unwrap();
    let src = scratch.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let agent = Agent::enroll_with(scratch.path(), &hub, "kept", &timings, &backup_config(&scratch, &src)).unwrap();
    // Three snapshots: each replaces one file, so each has chunks only it needs.
    for round in 0..3u64 {
        fs::write(src.join("changes.bin"), noise(300 << 10, round + 10)).unwrap();
        fs::write(src.join("stays.bin"), noise(600 << 10, 99)).unwrap();
        let out = backup(&agent, &["run", "field"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let client = hub.client();
    let catalog = client.backups(&agent.id).unwrap();
    assert_eq!(catalog.snapshots.len(), 3, "{catalog:?}");
    let oldest = catalog.snapshots[0].name.clone();
    let ctl = |args: &[&str]| {
        run(Command::new(bin("outpostctl")).args(["--hub", &hub.api, "--token", &hub.admin_token]).args(args)).unwrap()
    };
    // Just uploaded: the oldest snapshot goes, its chunks are still in
    // their grace period.
    let out = ctl(&["backups", "prune", &agent.id, "--dry-run"]);
    let report = text(&out);
    assert!(out.status.success() && report.contains(&format!("would remove snapshot {oldest}")), "{report}");
    assert!(report.contains("would remove 1 snapshot(s) and 0 chunk(s)"), "{report}");
    // An hour later (the chunk files aged): the oldest's own chunks go too.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for file in hub_chunks(&hub, &agent.id) {
        fs::File::options().write(true).open(file).unwrap().set_modified(hour_ago).unwrap();
    }
    let before = hub_chunks(&hub, &agent.id).len();
    let out = ctl(&["backups", "prune", &agent.id]);
    let report = text(&out);
    assert!(out.status.success() && report.contains(&format!("removed snapshot {oldest}")), "{report}");
    let after = hub_chunks(&hub, &agent.id).len();
    assert!(after < before, "no chunk removed: {report}");
    let catalog = client.backups(&agent.id).unwrap();
    assert_eq!(catalog.snapshots.len(), 2);
    assert!(catalog.snapshots.iter().all(|s| s.name != oldest));
    // Every kept snapshot restores from the hub, byte for byte.
    let out = backup(&agent, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    for (i, snapshot) in catalog.snapshots.iter().enumerate() {
        let target = scratch.path().join(format!("restore-{i}"));
        let from = agent.id.clone();
        let out = backup(
            &agent,
            &["restore", "--from-device", &from, "--snapshot", &snapshot.name, "--target", target.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out));
        let got = fs::read(restored(&target, &src).join("changes.bin")).unwrap();
        assert_eq!(got, noise(300 << 10, i as u64 + 11), "snapshot {} restored other content", snapshot.name);
    }
    let out = backup(&agent, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let hub_verify = client.verify_backups(&agent.id).unwrap();
    assert!(hub_verify.problems.is_empty(), "{hub_verify:?}");
}

/// A device that grabs every bulk turn it can (eight bulk connections, each
/// with 32 streams that start a 1 MiB request and never finish it: each
/// holds a turn until the hub's 60 s request timeout) does not stall another
/// device's upload: a device's turns are one pool across its connections
/// (`[fleet] device_bulk_turns`, 16 of the hub's 32), and connections past
/// `device_bulk_connections` (4) are refused (issue 23).
#[test]
fn a_device_holding_its_bulk_turns_does_not_stall_another_devices_upload() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let greedy = Agent::enroll(scratch.path(), &hub, "greedy", &timings).unwrap();
    let src = scratch.path().join("honest-data");
    populate(&src);
    let honest = Agent::enroll_with(scratch.path(), &hub, "honest", &timings, &backup_config(&scratch, &src)).unwrap();

    let hog = outpost_tests::BulkHog::start(&hub, &greedy, 8, 32).unwrap();
    wait_for(Duration::from_secs(10), "the hub to refuse the greedy device's extra connections", || {
        let log = fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
        log.contains("Bulk connection refused: the device holds its limit").then_some(())
    })
    .unwrap();

    let started = std::time::Instant::now();
    let out = backup(&honest, &["run", "field"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("the honest upload took {took:?} beside the greedy device");
    assert!(took < Duration::from_secs(30), "the honest upload waited {took:?} for the greedy device's turns");
    drop(hog);
}

/// A device's backups at the hub stop at `[backups] device_quota` (issue
/// 23: a stolen device uploading junk can neither take the others' room
/// nor fill the hub's disk): its upload is refused with the reason, the hub
/// holds no more than the quota for it, another device's upload goes on,
/// and once the quota is raised (SIGHUP) the refused upload completes.
#[test]
fn a_device_past_its_backup_quota_is_refused_and_others_are_not() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let mut hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    hub.extra_config = "[backups]\ndevice_quota = \"1 MiB\"\n".into();
    hub.kill();
    hub.serve().unwrap();
    let big = scratch.path().join("big");
    fs::create_dir_all(&big).unwrap();
    fs::write(big.join("junk.bin"), noise(3 << 20, 7)).unwrap();
    let greedy = Agent::enroll_with(scratch.path(), &hub, "greedy", &timings, &backup_config(&scratch, &big)).unwrap();
    let out = backup(&greedy, &["run", "field"]);
    let report = text(&out);
    assert!(report.contains("quota"), "the refusal does not say why: {report}");
    let held: u64 = hub_chunks(&hub, &greedy.id).iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert!(held <= (1 << 20), "the hub holds {held} bytes for a device with a 1 MiB quota");
    let client = hub.client();
    assert!(client.backups(&greedy.id).unwrap().snapshots.is_empty(), "a snapshot past the quota was catalogued");

    // Another device is not held back by the first one's quota.
    let small = scratch.path().join("small");
    fs::create_dir_all(&small).unwrap();
    fs::write(small.join("config.bin"), noise(200 << 10, 8)).unwrap();
    let modest =
        Agent::enroll_with(scratch.path(), &hub, "modest", &timings, &backup_config(&scratch, &small)).unwrap();
    let out = backup(&modest, &["run", "field"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(client.backups(&modest.id).unwrap().snapshots.len(), 1);

    // The quota raised on a running hub: the refused upload completes.
    let config = fs::read_to_string(&hub.config).unwrap();
    fs::write(&hub.config, config.replace("device_quota = \"1 MiB\"", "device_quota = \"64 MiB\"")).unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the reload", || hub.log_text().contains("Config reloaded").then_some(()))
        .unwrap();
    let out = backup(&greedy, &["upload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(client.backups(&greedy.id).unwrap().snapshots.len(), 1);
    let out = backup(&greedy, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
}
