//! Local backups through `outpost-agent backup`: no hub, no daemon. Trees
//! are compared byte for byte with their modes, mtimes and symlinks.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_shared::fsutil::write_atomic;
use outpost_tests::trees::{assert_same_tree, lost, noise, populate, populate_fidelity, walk};
use outpost_tests::{Scratch, bin, run};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

struct Setup {
    config: PathBuf,
    src: PathBuf,
    repo: PathBuf,
}

fn setup(scratch: &Scratch, retention: &str) -> Setup {
    let root = scratch.path();
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    let key = root.join("backup.key");
    write_atomic(&key, b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n", 0o600).unwrap();
    let config = root.join("agent.toml");
    let text = format!(
        "data_dir = {:?}\n[backups]\nkey_file = {:?}\n[[backup]]\nname = \"data\"\npaths = [{:?}, {:?}]\nexclude = [\"**/*.tmp\"]\n[backup.retention]\n{retention}\n",
        root.join("agent").display().to_string(),
        key.display().to_string(),
        src.display().to_string(),
        root.join("does-not-exist").display().to_string(),
    );
    fs::write(&config, text).unwrap();
    Setup { config, src, repo: root.join("agent/backups") }
}

fn backup(s: &Setup, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("outpost-agent"));
    cmd.arg("backup").arg("--config").arg(&s.config).args(args);
    run(&mut cmd).unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The snapshot names, oldest first.
fn snapshots(s: &Setup) -> Vec<String> {
    let out = backup(s, &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.iter().map(|v| v["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn backup_modify_backup_then_each_snapshot_restores_byte_identical() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    let out = backup(&s, &["run", "data"]);
    // The missing path is a problem in the report; the rest is backed up.
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("does-not-exist"), "{}", text(&out));
    let first_copy = scratch.path().join("expected-first");
    assert!(Command::new("cp").arg("-a").arg(&s.src).arg(&first_copy).status().unwrap().success());
    fs::remove_file(first_copy.join("scratch.tmp")).unwrap();

    // Change one byte in the middle of the big file, add, delete, chmod.
    let mut big = fs::read(s.src.join("big.bin")).unwrap();
    big[3 << 20] ^= 0xFF;
    fs::write(s.src.join("big.bin"), &big).unwrap();
    fs::write(s.src.join("logs/new.log"), b"new\n").unwrap();
    fs::remove_file(s.src.join("run.sh")).unwrap();
    fs::set_permissions(s.src.join("secret.conf"), fs::Permissions::from_mode(0o640)).unwrap();
    let out = backup(&s, &["run", "data"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(3), "{report}");
    // Incremental: only the two changed or new files were read; the edit in
    // the middle of 6 MiB added a few chunks, not the whole file.
    assert!(report.contains(" 2 files read"), "{report}");
    let new_chunks: u64 = report.split(" new chunks").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!((1..=4).contains(&new_chunks), "{new_chunks} new chunks: {report}");

    let names = snapshots(&s);
    assert_eq!(names.len(), 2);
    let first = scratch.path().join("restore-first");
    let out = backup(&s, &["restore", &names[0], "--target", first.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_tree(&first_copy, &first.join(s.src.strip_prefix("/").unwrap()));
    let latest = scratch.path().join("restore-latest");
    let out = backup(&s, &["restore", "latest", "--target", latest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    fs::remove_file(s.src.join("scratch.tmp")).unwrap();
    assert_same_tree(&s.src, &latest.join(s.src.strip_prefix("/").unwrap()));

    // A subset.
    let part = scratch.path().join("restore-part");
    let only = s.src.join("logs").display().to_string();
    let out = backup(&s, &["restore", "latest", "--target", part.to_str().unwrap(), "--path", &only]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = part.join(s.src.strip_prefix("/").unwrap());
    assert!(restored.join("logs/new.log").exists() && !restored.join("big.bin").exists());

    let out = backup(&s, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    // Nothing readable without the key: no plaintext in the repository.
    let mut stack = vec![s.repo.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                let bytes = fs::read(e.path()).unwrap();
                assert!(!bytes.windows(10).any(|w| w == b"password=1"), "plaintext in {}", e.path().display());
            }
        }
    }
}

#[test]
fn a_corrupted_chunk_is_named_by_verify_and_a_restore_that_needs_it_refuses() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    backup(&s, &["run", "data"]);
    // The smallest chunk is a whole small file: corrupt one byte of its
    // blob inside its pack.
    let mut blobs = index_records(&s);
    blobs.sort_by_key(|b| b.len);
    let victim = &blobs[0];
    let mut bytes = fs::read(&victim.pack).unwrap();
    bytes[(victim.offset + victim.len / 2) as usize] ^= 1;
    fs::write(&victim.pack, &bytes).unwrap();
    let id = victim.id.clone();

    let out = backup(&s, &["verify"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains(&id) && report.contains("does not decrypt"), "{report}");
    assert!(report.contains("needed by"), "{report}");

    let target = scratch.path().join("restore");
    let out = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    let report = text(&out);
    assert!(!out.status.success(), "a restore with a corrupt chunk succeeded: {report}");
    assert!(report.contains("not restored") && report.contains(&id), "{report}");
    // The file that needed it is not there at all (no wrong data), the
    // others are.
    let bad: Vec<&str> = report.lines().filter(|l| l.starts_with("not restored:")).collect();
    assert_eq!(bad.len(), 1, "{report}");
    let bad_path = bad[0].trim_start_matches("not restored: ").split(": ").next().unwrap();
    assert!(!target.join(bad_path.trim_start_matches('/')).exists(), "{bad_path} was written");
    let big = target.join(s.src.strip_prefix("/").unwrap()).join("big.bin");
    assert!(big.exists() || bad_path.ends_with("big.bin"));
}

#[test]
fn prune_keeps_exactly_what_the_retention_says_and_drops_unneeded_chunks() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "last = 2");
    let mut made = Vec::new();
    for round in 0..4u64 {
        fs::write(s.src.join(format!("round-{round}.bin")), noise(300 << 10, round + 10)).unwrap();
        if round > 0 {
            fs::remove_file(s.src.join(format!("round-{}.bin", round - 1))).unwrap();
        }
        let out = backup(&s, &["run", "data"]);
        let report = text(&out);
        made.push(report.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned());
        // Each run applies the retention: from the third run on, the oldest
        // snapshot goes, and with it the one chunk only it needed and the
        // chunk holding its list of entries.
        let expected = if round >= 2 { "1 snapshot(s) and 2 chunk(s) removed" } else { "0 snapshot(s)" };
        assert!(report.contains(&format!("retention: {expected}")), "{report}");
    }
    assert_eq!(snapshots(&s), made[2..].to_vec());
    // The chunks of the dropped snapshots went with their packs.
    let packs = pack_files(&s);
    let named: std::collections::BTreeSet<PathBuf> = index_records(&s).into_iter().map(|b| b.pack).collect();
    assert_eq!(packs, named, "packs on disk are not the packs the index names");
    // An explicit prune has nothing left to drop but the pack of a run that
    // ended before it wrote its index.
    let some_dir = fs::read_dir(s.repo.join("packs")).unwrap().flatten().next().unwrap().path();
    let leftover = some_dir.join("0".repeat(64));
    fs::write(&leftover, b"half a pack").unwrap();
    let out = backup(&s, &["prune"]);
    assert!(!leftover.exists(), "prune left a pack nothing names");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 snapshot(s) and 0 chunk(s) removed"), "{}", text(&out));
    assert_eq!(snapshots(&s), made[2..].to_vec());
    let out = backup(&s, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn files_that_change_while_read_or_cannot_be_read_are_reported_and_the_backup_goes_on() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    // A file that opens but cannot be read (EIO at offset 0, even for root).
    let config = fs::read_to_string(&s.config).unwrap().replace("paths = [", "paths = [\"/proc/self/mem\", ");
    fs::write(&s.config, config).unwrap();
    let growing = s.src.join("growing.log");
    fs::write(&growing, noise(4 << 20, 9)).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // A writer appending 64 KiB every 2 ms (a busy log) for the whole run.
    let writer = {
        let (path, stop) = (growing.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
            let block = noise(64 << 10, 10);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                file.write_all(&block).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let out = backup(&s, &["run", "data"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(report.contains("growing.log: changed while read"), "{report}");
    assert!(report.contains("/proc/self/mem: read failed"), "{report}");
    assert!(report.contains("does-not-exist: No such file"), "{report}");
    // The rest of the set is in the snapshot and restores intact.
    let target = scratch.path().join("restore");
    let restored = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(restored.status.success(), "{}", text(&restored));
    fs::remove_file(&growing).unwrap();
    let copy = target.join(s.src.strip_prefix("/").unwrap());
    let got = copy.join("growing.log");
    assert!(fs::metadata(&got).unwrap().len() >= 4 << 20, "stored as read");
    fs::remove_file(got).unwrap();
    fs::remove_file(s.src.join("scratch.tmp")).unwrap();
    assert_same_tree(&s.src, &copy);
}

/// Every pack file in the repository.
fn pack_files(s: &Setup) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    for sub in fs::read_dir(s.repo.join("packs")).unwrap().flatten() {
        out.extend(fs::read_dir(sub.path()).unwrap().flatten().map(|e| e.path()));
    }
    out
}

/// Where a chunk's blob is, as the index says.
struct Blob {
    id: String,
    pack: PathBuf,
    offset: u64,
    len: u64,
}

/// Every record of every index segment: after an 8-byte magic line,
/// records of chunk id (32), pack id (32), offset and length (u32 LE).
fn index_records(s: &Setup) -> Vec<Blob> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for segment in fs::read_dir(s.repo.join("index")).unwrap().flatten() {
        let bytes = fs::read(segment.path()).unwrap();
        assert_eq!(&bytes[..8], b"OPIDX01\n");
        for r in bytes[8..].chunks_exact(72) {
            let pack = hex(&r[32..64]);
            out.push(Blob {
                id: hex(&r[..32]),
                pack: s.repo.join("packs").join(&pack[..2]).join(&pack),
                offset: u64::from(u32::from_le_bytes(r[64..68].try_into().unwrap())),
                len: u64::from(u32::from_le_bytes(r[68..72].try_into().unwrap())),
            });
        }
    }
    out
}

#[test]
fn packs_a_power_cut_left_torn_are_never_trusted_and_their_chunks_are_stored_again() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    assert_eq!(backup(&s, &["run", "data"]).status.code(), Some(3)); // the missing path
    // A run that lost power after writing its packs, before the sync that
    // comes before its index and manifest: its packs exist but are torn,
    // and nothing names them.
    let before = pack_files(&s);
    let segments_before: Vec<PathBuf> =
        fs::read_dir(s.repo.join("index")).unwrap().flatten().map(|e| e.path()).collect();
    fs::write(s.src.join("new.bin"), noise(3 << 20, 77)).unwrap();
    assert_eq!(backup(&s, &["run", "data"]).status.code(), Some(3));
    let torn: Vec<PathBuf> = pack_files(&s).difference(&before).cloned().collect();
    assert!(!torn.is_empty());
    let newest = snapshots(&s).pop().unwrap();
    fs::remove_file(s.repo.join("snapshots").join(newest)).unwrap();
    for segment in fs::read_dir(s.repo.join("index")).unwrap().flatten() {
        if !segments_before.contains(&segment.path()) {
            fs::remove_file(segment.path()).unwrap();
        }
    }
    for pack in &torn {
        fs::write(pack, b"").unwrap();
    }

    let out = backup(&s, &["run", "data"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(3), "{report}");
    let verify = backup(&s, &["verify"]);
    assert!(verify.status.success(), "a torn pack was trusted: {}", text(&verify));
    let target = scratch.path().join("restore");
    let restored = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(restored.status.success(), "{}", text(&restored));
    fs::remove_file(s.src.join("scratch.tmp")).unwrap();
    assert_same_tree(&s.src, &target.join(s.src.strip_prefix("/").unwrap()));
    // Prune removes the torn packs nothing names.
    let out = backup(&s, &["prune"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(torn.iter().all(|p| !p.exists()), "torn packs left after prune");
}

#[test]
fn a_wrong_key_is_refused_before_anything_is_written() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    backup(&s, &["run", "data"]);
    write_atomic(&scratch.path().join("backup.key"), "ff".repeat(32).as_bytes(), 0o600).unwrap();
    let out = backup(&s, &["run", "data"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does not match this repository"), "{}", text(&out));
    assert_eq!(snapshots_with_key(&s), 1);
}

fn snapshots_with_key(s: &Setup) -> usize {
    fs::read_dir(s.repo.join("snapshots")).unwrap().count()
}

#[test]
fn scheduled_backups_run_as_jobs_and_the_hub_can_list_and_restore() {
    use outpost_hub::api::CommandRequest;
    use outpost_hub::api::{CommandStateView, OutcomeView};
    use outpost_tests::{Agent, Hub, Timings, wait_for};
    use std::time::Duration;
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let src = scratch.path().join("field-data");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/readings.csv"), "t,v\n1,2\n".repeat(1000)).unwrap();
    let key = scratch.path().join("backup.key");
    write_atomic(&key, "ab".repeat(32).as_bytes(), 0o600).unwrap();
    let extra = format!(
        "[backups]\nkey_file = {:?}\n[[backup]]\nname = \"field\"\npaths = [{:?}]\nschedule = \"@every 2s\"\n",
        key.display().to_string(),
        src.display().to_string()
    );
    let mut agent = Agent::enroll_with(scratch.path(), &hub, "backed-up", &timings, &extra).unwrap();
    agent.start().unwrap();
    let client = hub.client();
    let run = wait_for(Duration::from_secs(30), "a scheduled backup at the hub", || {
        client.job_runs(&agent.id, "backup-field", 10).ok()?.into_iter().find(|r| r.succeeded)
    })
    .unwrap();
    assert!(run.outcome_kind == "exited", "{run:?}");

    let send = |args: &[&str]| {
        let request = CommandRequest {
            kind: "backup".into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            expires_in: None,
        };
        let cmd = client.send_command(&agent.id, &request).unwrap();
        hub.wait_command(cmd.id, "the backup command's result", |s| matches!(s, CommandStateView::Completed { .. }))
    };
    let listed = send(&["list"]);
    match &listed.state {
        CommandStateView::Completed { outcome: OutcomeView::Succeeded, output, .. } => {
            assert!(output.contains("field") && output.contains("SNAPSHOT"), "{output}");
        }
        other => panic!("list: {other:?}"),
    }
    let target = scratch.path().join("restored-by-hub");
    let restored = send(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(
        matches!(restored.state, CommandStateView::Completed { outcome: OutcomeView::Succeeded, .. }),
        "{restored:?}"
    );
    let copy = target.join(src.strip_prefix("/").unwrap()).join("sub/readings.csv");
    assert_eq!(fs::read(copy).unwrap(), fs::read(src.join("sub/readings.csv")).unwrap());
    let refused = send(&["rm", "-rf", "/"]);
    assert!(matches!(refused.state, CommandStateView::Completed { outcome: OutcomeView::Rejected, .. }), "{refused:?}");
}

#[test]
fn a_full_disk_fails_the_snapshot_cleanly_and_earlier_snapshots_stay_restorable() {
    outpost_tests::netns::require_root();
    let scratch = Scratch::new().unwrap();
    let repo = scratch.path().join("small-disk");
    let _disk = outpost_tests::Tmpfs::mount(&repo, "4m").unwrap();
    let s = setup(&scratch, "");
    let text_cfg = fs::read_to_string(&s.config).unwrap();
    let text_cfg = text_cfg.replace("[backups]\n", &format!("[backups]\ndir = {:?}\n", repo.display().to_string()));
    fs::write(&s.config, text_cfg).unwrap();
    fs::write(s.src.join("first.bin"), noise(1 << 20, 7)).unwrap();
    let first_copy = scratch.path().join("expected-first");
    assert!(Command::new("cp").arg("-a").arg(&s.src).arg(&first_copy).status().unwrap().success());
    let out = backup(&s, &["run", "data"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out)); // the missing path

    fs::write(s.src.join("too-big.bin"), noise(8 << 20, 8)).unwrap();
    let out = backup(&s, &["run", "data"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("No space left on device"), "{report}");
    assert_eq!(snapshots(&s).len(), 1, "a failed run left a snapshot");
    let out = backup(&s, &["verify"]);
    assert!(out.status.success(), "the repository is inconsistent after the failure: {}", text(&out));
    let target = scratch.path().join("restore");
    let out = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_tree(&first_copy, &target.join(s.src.strip_prefix("/").unwrap()));
    // Room again (the big file gone): the next run works.
    fs::remove_file(s.src.join("too-big.bin")).unwrap();
    let out = backup(&s, &["run", "data"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

#[test]
fn an_in_place_restore_brings_back_what_was_lost_and_keeps_what_changed_unless_asked() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate(&s.src);
    let out = backup(&s, &["run", "data"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let expected = scratch.path().join("expected");
    assert!(Command::new("cp").arg("-a").arg(&s.src).arg(&expected).status().unwrap().success());
    fs::remove_file(expected.join("scratch.tmp")).unwrap();

    // One file lost, one changed since the snapshot.
    fs::remove_file(s.src.join("logs/app.log")).unwrap();
    fs::write(s.src.join("secret.conf"), b"edited after the backup\n").unwrap();
    let out = backup(&s, &["restore", "latest", "--in-place"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("secret.conf") && report.contains("--overwrite"), "{report}");
    assert_eq!(fs::read(s.src.join("logs/app.log")).unwrap(), fs::read(expected.join("logs/app.log")).unwrap());
    assert_eq!(fs::read(s.src.join("secret.conf")).unwrap(), b"edited after the backup\n");

    let out = backup(&s, &["restore", "latest", "--in-place", "--overwrite"]);
    assert!(out.status.success(), "{}", text(&out));
    fs::remove_file(s.src.join("scratch.tmp")).unwrap();
    assert_same_tree(&expected, &s.src);

    // A listing piped into a reader that is already gone ends quietly.
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!("{} backup --config {} list | true", bin("outpost-agent").display(), s.config.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// SIGKILL at points spread over backup runs and prunes (a device's power
/// supply or the OOM killer does not wait for a good moment): after each,
/// verify accepts the repository, and at the end a run completes and its
/// snapshot restores byte for byte.
#[test]
fn backups_and_prunes_killed_at_any_point_leave_a_sound_repository() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "last = 1");
    populate(&s.src);
    for i in 0..200u64 {
        let text = format!("file {i}\n").repeat(200 + (i as usize % 50) * 40);
        fs::write(s.src.join(format!("small-{i:03}.txt")), &text).unwrap();
        fs::write(s.src.join(format!("twin-{i:03}.txt")), &text).unwrap();
    }
    let spawn = |args: &[&str]| {
        Command::new(bin("outpost-agent"))
            .arg("backup")
            .arg("--config")
            .arg(&s.config)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Kill points (ms after start) spread from the first files to the
    // manifest and the prune after it.
    for (round, kill_after) in [15u64, 60, 120, 200, 320, 500, 800].into_iter().enumerate() {
        fs::write(s.src.join("big.bin"), noise(6 << 20, round as u64)).unwrap();
        fs::write(s.src.join(format!("new-{round}.txt")), format!("round {round}\n").repeat(3000)).unwrap();
        for args in [&["run", "data"][..], &["prune"][..]] {
            let mut child = spawn(args);
            // The fault is injected at this moment; nothing is awaited.
            std::thread::sleep(Duration::from_millis(kill_after));
            let _ = child.kill();
            let _ = child.wait();
            let verify = backup(&s, &["verify"]);
            assert!(
                verify.status.success(),
                "round {round}: {args:?} killed after {kill_after} ms, then verify: {}",
                text(&verify)
            );
        }
    }
    let out = backup(&s, &["run", "data"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out)); // the missing path of setup()
    let verify = backup(&s, &["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let target = scratch.path().join("restore");
    let restored = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(restored.status.success(), "{}", text(&restored));
    fs::remove_file(s.src.join("scratch.tmp")).unwrap();
    assert_same_tree(&s.src, &target.join(s.src.strip_prefix("/").unwrap()));
    // Retention held: one snapshot, however many runs were cut short.
    assert_eq!(snapshots(&s).len(), 1);
}

/// A ramfs mounted for a test (it has no extended attributes at all),
/// unmounted when dropped, also when the test fails.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(at: PathBuf) -> Ramfs {
        fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount").args(["-t", "ramfs", "outpost-test"]).arg(&at).status().unwrap();
        assert!(ok.success(), "mount ramfs at {}", at.display());
        Ramfs(at)
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Issue 29: hard links, extended attributes, access and default ACLs, a
/// FIFO, a device, a sparse file, other owners and nanosecond times come
/// back as they were (one tree walker compares every field); `list` and
/// `verify` say what the snapshot carries; a target without extended
/// attributes gets everything else, and each attribute it could not take
/// is named, exit 3.
#[test]
fn a_restore_keeps_links_attributes_acls_special_files_and_holes() {
    let scratch = Scratch::new().unwrap();
    let s = setup(&scratch, "");
    populate_fidelity(&s.src, 256);
    let out = backup(&s, &["run", "data"]);
    let report = text(&out);
    // Exit 3 for the set's missing path alone: a socket is a note.
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(report.contains("carries: 2 hard links"), "{report}");
    assert!(report.contains("note: ") && report.contains("socket, skipped"), "{report}");
    assert!(!report.contains("problem: ") || report.matches("problem: ").count() == 1, "{report}");
    let list = text(&backup(&s, &["list"]));
    assert!(list.contains("CARRIES") && list.contains("2 hard links"), "{list}");
    let verify = backup(&s, &["verify"]);
    assert!(verify.status.success() && text(&verify).contains("carries: 2 hard links"), "{}", text(&verify));

    let target = scratch.path().join("restored");
    let out = backup(&s, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let copy = target.join(s.src.strip_prefix("/").unwrap());
    let losses = lost(&walk(&s.src), &walk(&copy));
    assert!(losses.is_empty(), "the restore lost:\n{}", losses.iter().map(|l| format!("{l}\n")).collect::<String>());
    // The sparse file allocates about what the source did, not 256 MiB.
    let allocated = |p: &PathBuf| fs::metadata(p.join("disk.img")).map(|m| m.blocks() * 512).unwrap();
    assert!(allocated(&copy) <= 2 * allocated(&s.src) + (64 << 10), "{} bytes allocated", allocated(&copy));

    if !outpost_tests::is_root() {
        eprintln!("not root: the restore onto a file system without attributes (ramfs) is not tried");
        return;
    }
    let ramfs = Ramfs::mount(scratch.path().join("ramfs"));
    let out = backup(&s, &["restore", "latest", "--target", ramfs.0.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    for attr in [
        "attrs.txt: extended attribute user.color not set",
        "shared: extended attribute system.posix_acl_default not set",
        "report.txt: extended attribute system.posix_acl_access not set",
    ] {
        assert!(said.contains(attr), "{attr:?} not reported: {said}");
    }
    // Everything else is there.
    let copy = ramfs.0.join(s.src.strip_prefix("/").unwrap());
    let losses: Vec<_> =
        lost(&walk(&s.src), &walk(&copy)).into_iter().filter(|l| !matches!(l.field, "xattrs" | "acl")).collect();
    assert!(losses.is_empty(), "{losses:?}");
}
