//! The hub store's behaviour, one suite run against both backends: every
//! case runs on sled (in a temporary directory) and on PostgreSQL (a private
//! cluster made for the test and removed after it).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::store::{
    Admission, ApiToken, CatalogEntry, CommandState, DeviceKeys, DeviceRecord, Grant, NewCommand, Role, Store,
    StoreConfig, StoreError, TelemetryRange, UP_SESSIONS,
};
use outpost_shared::job::{JobRun, RunOutcome, Trigger};
use outpost_shared::mqtt::Stale;
use outpost_shared::protocol::{
    Alarm, AlarmKind, CommandResult, Outcome, Record, RecordBody, SnapshotSummary, StateReport,
};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use outpost_shared::{DeviceId, Fingerprint};
use outpost_tests::postgres::Postgres;
use std::future::Future;

/// Runs `case` on a fresh store of each backend.
fn on_both<F, Fut>(case: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let store = Store::open(&StoreConfig::Sled, dir.path()).await.unwrap();
        case(store.clone()).await;
        store.close().await.unwrap();
    });
    let pg = Postgres::start(true).unwrap();
    let url = pg.create_db("outpost").unwrap();
    runtime.block_on(async {
        let store = Store::open(&StoreConfig::Postgres { url, pool_size: 4, listen: true }, dir.path()).await.unwrap();
        case(store.clone()).await;
        store.close().await.unwrap();
    });
}

fn device(id: &str) -> DeviceRecord {
    DeviceRecord {
        id: id.parse().unwrap(),
        name: format!("name of {id}"),
        enrolled_at: Timestamp(1_700_000_000_000),
        cert_fingerprint: Fingerprint([7; 32]),
        agent_version: None,
        last_seen: None,
        last_addr: None,
        last_sample: None,
    }
}

async fn enrolled(store: &Store, id: &str) -> DeviceId {
    let mut token = [0u8; 16];
    token[..id.len().min(16)].copy_from_slice(&id.as_bytes()[..id.len().min(16)]);
    store.enroll(&token, 1, &device(id), b"public key").await.unwrap();
    id.parse().unwrap()
}

fn sample(at: u64) -> Sample {
    Sample {
        at: Timestamp(at),
        cpu_percent: 12.5,
        mem_used_bytes: 1 << 20,
        mem_total_bytes: 1 << 30,
        swap_used_bytes: 0,
        load: [0.1, 0.2, 0.3],
        uptime_secs: 99,
        disks: Vec::new(),
        net: Vec::new(),
        temperatures: Vec::new(),
    }
}

fn now_ms() -> u64 {
    Timestamp::now().0
}

fn telemetry(seq: u64, at: u64) -> Record {
    Record { seq, at: Timestamp(at), body: RecordBody::Telemetry(sample(at)) }
}

#[test]
fn ingest_stores_each_record_once_names_gaps_and_files_each_kind() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-ingest").await;
        let t = now_ms() - 60_000;
        let alarm = Alarm { kind: AlarmKind::OutboxFull, raised: true, message: "full".into() };
        let first = vec![
            telemetry(1, t),
            telemetry(2, t + 1000),
            Record { seq: 3, at: Timestamp(t + 1500), body: RecordBody::Alarm(alarm) },
            Record {
                seq: 4,
                at: Timestamp(t + 1600),
                body: RecordBody::StateReport(StateReport { applied_version: 3, error: None }),
            },
        ];
        let done = store.ingest(&id, &first).await.unwrap();
        assert_eq!((done.upto, done.stored, done.duplicates), (4, 4, 0));
        assert!(done.gaps.is_empty());
        // A resend after a lost ack, with new records after a gap.
        let mut again = first[2..].to_vec();
        again.push(telemetry(7, t + 2000));
        again.push(telemetry(8, t - 5000));
        let done = store.ingest(&id, &again).await.unwrap();
        assert_eq!((done.upto, done.stored, done.duplicates), (8, 2, 2));
        assert_eq!(done.gaps, [(5, 6)]);
        // The whole batch again: nothing new, the mark stays.
        let done = store.ingest(&id, &first).await.unwrap();
        assert_eq!((done.upto, done.stored, done.duplicates), (8, 0, 4));
        assert_eq!(store.high_water(&id).await.unwrap(), 8);

        let samples =
            store.telemetry(&id, &TelemetryRange::between(Timestamp(0), Timestamp(u64::MAX), 100)).await.unwrap();
        let seqs: Vec<u64> = samples.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [8, 1, 2, 7], "telemetry is ordered by sample time");
        let window =
            store.telemetry(&id, &TelemetryRange::between(Timestamp(t), Timestamp(t + 2000), 100)).await.unwrap();
        assert_eq!(window.len(), 2, "since is inclusive, until exclusive");
        let events = store.events(&id, 10).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 3], "events newest first");
        assert_eq!(store.alarms(&id, 10).await.unwrap().len(), 1);
        assert_eq!(store.reported(&id).await.unwrap().map(|r| r.applied_version), Some(3));
        let record = store.device(&id).await.unwrap().unwrap();
        assert_eq!(record.last_sample.map(|s| s.at), Some(Timestamp(t + 2000)), "newest sample by time");
        assert!(record.last_seen.is_some());
        // Another device's records are its own.
        let other = enrolled(&store, "dev-other").await;
        assert_eq!(store.high_water(&other).await.unwrap(), 0);
        assert!(
            store
                .telemetry(&other, &TelemetryRange::between(Timestamp(0), Timestamp(u64::MAX), 10))
                .await
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn telemetry_pages_by_cursor_without_loss_or_repeat() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-pages").await;
        let t = now_ms() - 3_600_000;
        // 2 500 samples, some sharing a time (a clock that did not move).
        // Every 100th record is a sample far outside the window asked for.
        let records: Vec<Record> = (1..=2500)
            .map(|seq| if seq % 100 == 0 { telemetry(seq, t + 1_000_000_000) } else { telemetry(seq, t + seq / 2) })
            .collect();
        for batch in records.chunks(500) {
            store.ingest(&id, batch).await.unwrap();
        }
        let mut range = TelemetryRange::between(Timestamp(t), Timestamp(t + 2000), 700);
        let mut seen = Vec::new();
        loop {
            let page = store.telemetry(&id, &range).await.unwrap();
            let Some((seq, last)) = page.last() else { break };
            range.after = Some((last.at, *seq));
            seen.extend(page.iter().map(|(seq, _)| *seq));
        }
        let expected: Vec<u64> = (1..=2500).filter(|seq| seq % 100 != 0).collect();
        assert_eq!(seen, expected, "pages lost, repeated or overran samples");
    });
}

#[test]
fn telemetry_far_from_now_and_past_retention() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-prune").await;
        let now = now_ms();
        // A device clock at 1970, one a year ahead, and today.
        let records = vec![telemetry(1, 5_000), telemetry(2, now + 365 * 86_400_000), telemetry(3, now)];
        assert_eq!(store.ingest(&id, &records).await.unwrap().stored, 3);
        assert_eq!(
            store.telemetry(&id, &TelemetryRange::between(Timestamp(0), Timestamp(u64::MAX), 10)).await.unwrap().len(),
            3
        );
        let removed = store.prune_telemetry(Timestamp(now - 86_400_000)).await.unwrap();
        assert!(removed >= 1, "the 1970 sample is past any retention");
        let left: Vec<u64> = store
            .telemetry(&id, &TelemetryRange::between(Timestamp(0), Timestamp(u64::MAX), 10))
            .await
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(left, [3, 2]);
    });
}

fn run(job: &str, run_id: u64) -> JobRun {
    JobRun {
        job: job.into(),
        run_id,
        attempt: 1,
        trigger: Trigger::Schedule,
        started: Timestamp(run_id),
        ended: Timestamp(run_id + 5),
        outcome: RunOutcome::Exited { code: 0 },
        output: String::new(),
        output_bytes: 0,
    }
}

#[test]
fn job_runs_keep_the_newest_thousand_per_job() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-jobs").await;
        let records: Vec<Record> = (1..=1005)
            .map(|i| Record { seq: i, at: Timestamp(i), body: RecordBody::JobRun(run("tick", i)) })
            .chain(std::iter::once(Record { seq: 1006, at: Timestamp(1), body: RecordBody::JobRun(run("other", 1)) }))
            .collect();
        for batch in records.chunks(300) {
            store.ingest(&id, batch).await.unwrap();
        }
        let runs = store.job_runs(&id, "tick", 5000).await.unwrap();
        assert_eq!(runs.len(), 1000);
        assert_eq!((runs[0].run_id, runs[999].run_id), (1005, 6), "newest first, oldest trimmed");
        assert_eq!(store.job_runs(&id, "other", 10).await.unwrap().len(), 1);
    });
}

#[test]
fn commands_move_queued_delivered_completed_or_expired_once() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-cmd").await;
        let other = enrolled(&store, "dev-cmd-2").await;
        let later = Timestamp(now_ms() + 3_600_000);
        let new = |device: &DeviceId, kind: &str, expires_at| NewCommand {
            device: device.clone(),
            kind: kind.into(),
            args: vec!["a b".into(), "c".into()],
            expires_at,
            created_by: "tester".into(),
        };
        let a = store.create_command(new(&id, "echo", later)).await.unwrap();
        let b = store.create_command(new(&id, "exec", later)).await.unwrap();
        let c = store.create_command(new(&id, "echo", Timestamp(now_ms() - 1))).await.unwrap();
        let theirs = store.create_command(new(&other, "echo", later)).await.unwrap();
        assert!(a.id < b.id && b.id < c.id, "ids grow");
        assert_eq!(store.command(a.id).await.unwrap().unwrap(), a);
        let queued: Vec<u64> = store.queued_commands(&id, 10).await.unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(queued, [a.id, b.id], "expired ones are not offered");
        assert_eq!(store.queued_commands(&id, 1).await.unwrap().len(), 1);
        // Another device's command cannot be marked through this one.
        let marked = store.mark_delivered(&id, &[a.id, theirs.id], Timestamp(5)).await.unwrap();
        assert_eq!(marked, [a.id]);
        assert_eq!(store.mark_delivered(&id, &[a.id], Timestamp(6)).await.unwrap(), Vec::<u64>::new());
        assert_eq!(store.command(a.id).await.unwrap().unwrap().state, CommandState::Delivered { at: Timestamp(5) });
        // Across devices, by id range, newest first; queued ones only.
        let ids = |cmds: Vec<outpost_hub::store::CommandRecord>| cmds.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(store.commands_in(a.id..=theirs.id, false, 10).await.unwrap()), [theirs.id, c.id, b.id, a.id]);
        assert_eq!(ids(store.commands_in(b.id..=c.id, false, 10).await.unwrap()), [c.id, b.id]);
        assert_eq!(ids(store.commands_in(0..=u64::MAX, true, 10).await.unwrap()), [theirs.id, c.id, b.id]);
        assert_eq!(ids(store.commands_in(0..=u64::MAX, true, 2).await.unwrap()), [theirs.id, c.id]);
        // Expiry takes the expired queued one, once.
        let expired: Vec<u64> =
            store.expire_commands(Timestamp::now()).await.unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(expired, [c.id]);
        assert!(store.expire_commands(Timestamp::now()).await.unwrap().is_empty());
        // A result completes the command of its own device only.
        let result = |seq, cmd: u64| Record {
            seq,
            at: Timestamp(seq),
            body: RecordBody::CommandResult(CommandResult {
                id: cmd,
                outcome: Outcome::Succeeded,
                output: "out".into(),
            }),
        };
        store.ingest(&id, &[result(1, a.id), result(2, theirs.id), result(3, 999_999)]).await.unwrap();
        match store.command(a.id).await.unwrap().unwrap().state {
            CommandState::Completed { outcome: Outcome::Succeeded, output, .. } => assert_eq!(output, "out"),
            other => panic!("not completed: {other:?}"),
        }
        assert_eq!(store.command(theirs.id).await.unwrap().unwrap().state, CommandState::Queued);
        let page = |after, limit| {
            let store = store.clone();
            let id = id.clone();
            async move {
                let (page, total) = store.device_commands(&id, after, limit).await.unwrap();
                (page.into_iter().map(|c| c.id).collect::<Vec<u64>>(), total)
            }
        };
        assert_eq!(page(0, 10).await, (vec![a.id, b.id, c.id], 3));
        // Pages from a cursor (the last id of the page before), oldest first.
        assert_eq!(page(0, 2).await, (vec![a.id, b.id], 3));
        assert_eq!(page(b.id, 2).await, (vec![c.id], 3));
        assert_eq!(page(c.id, 2).await, (vec![], 3));
        assert_eq!(page(u64::MAX, 2).await, (vec![], 3));
        // The newest of one device's, newest first, bounded.
        assert_eq!(ids(store.newest_device_commands(&id, 2).await.unwrap()), [c.id, b.id]);
        assert_eq!(ids(store.newest_device_commands(&id, 10).await.unwrap()), [c.id, b.id, a.id]);
        assert_eq!(ids(store.newest_device_commands(&other, 10).await.unwrap()), [theirs.id]);
        assert!(store.newest_device_commands(&id, 0).await.unwrap().is_empty());
        assert!(store.command(999_999).await.unwrap().is_none());
    });
}

#[test]
fn desired_state_versions_and_conflicts() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-desired").await;
        assert!(store.desired(&id).await.unwrap().is_none());
        let v1 = store.put_desired(&id, 0, "{\"a\":1}".into()).await.unwrap();
        assert_eq!(v1.version, 1);
        match store.put_desired(&id, 0, "{}".into()).await {
            Err(StoreError::VersionConflict { expected: 0, current: 1 }) => {}
            other => panic!("a stale create must conflict: {other:?}"),
        }
        let v2 = store.put_desired(&id, 1, "{\"a\":2}".into()).await.unwrap();
        assert_eq!(v2.version, 2);
        match store.put_desired(&id, 1, "{}".into()).await {
            Err(StoreError::VersionConflict { expected: 1, current: 2 }) => {}
            other => panic!("a stale update must conflict: {other:?}"),
        }
        assert_eq!(store.desired(&id).await.unwrap().unwrap().doc, "{\"a\":2}");
    });
}

#[test]
fn catalog_and_grants() {
    on_both(|store| async move {
        let id = enrolled(&store, "dev-backup").await;
        let reader = enrolled(&store, "dev-reader").await;
        let entry = |name: &str| CatalogEntry {
            summary: SnapshotSummary {
                name: name.into(),
                set: "data".into(),
                started: Timestamp(1),
                ended: Timestamp(2),
                entries: 3,
                bytes: 4,
                chunks: 5,
                problems: 0,
            },
            uploaded_at: Timestamp(7),
        };
        for name in ["1000-data-b", "0999-data-a", "1001-data-c"] {
            store.put_catalog_entry(&id, &entry(name)).await.unwrap();
        }
        let names: Vec<String> = store.catalog(&id).await.unwrap().into_iter().map(|e| e.summary.name).collect();
        assert_eq!(names, ["0999-data-a", "1000-data-b", "1001-data-c"], "oldest first");
        assert_eq!(store.catalog_entry(&id, "1000-data-b").await.unwrap(), Some(entry("1000-data-b")));
        assert!(store.catalog(&reader).await.unwrap().is_empty());
        store.delete_catalog_entries(&id, &["1000-data-b".into()]).await.unwrap();
        assert_eq!(store.catalog(&id).await.unwrap().len(), 2);
        assert_eq!(store.delete_catalog(&id).await.unwrap(), 2);
        assert!(store.catalog(&id).await.unwrap().is_empty());

        assert!(store.grant(&reader, &id).await.unwrap().is_none());
        let grant = Grant { granted_at: Timestamp(1), expires_at: Timestamp(2), by: "ops".into() };
        store.put_grant(&reader, &id, &grant).await.unwrap();
        assert_eq!(store.grant(&reader, &id).await.unwrap(), Some(grant));
        assert!(store.grant(&id, &reader).await.unwrap().is_none(), "a grant goes one way");
    });
}

#[test]
fn tokens_enrollment_keys_and_hellos() {
    on_both(|store| async move {
        let token = ApiToken {
            role: Role::Operator,
            name: "ops".into(),
            created_at: Timestamp(3),
            expires_at: Some(Timestamp(9)),
            last_used: None,
            kind: outpost_hub::store::TokenKind::Api,
            made_by: None,
        };
        store.put_api_token(&[1; 32], &token).await.unwrap();
        assert_eq!(store.api_token(&[1; 32]).await.unwrap(), Some(token.clone()));
        assert!(store.api_token(&[2; 32]).await.unwrap().is_none());
        let used = ApiToken { last_used: Some((Timestamp(5), "10.1.2.3".into())), ..token.clone() };
        assert!(store.update_api_token(&[1; 32], &used).await.unwrap());
        assert_eq!(store.api_tokens().await.unwrap(), [([1; 32], used.clone())]);
        assert_eq!(store.take_api_token(&[1; 32]).await.unwrap(), Some(used.clone()));
        assert_eq!(store.take_api_token(&[1; 32]).await.unwrap(), None, "a token is taken once");
        assert!(!store.update_api_token(&[1; 32], &used).await.unwrap(), "a use does not bring a revoked token back");
        assert!(store.api_tokens().await.unwrap().is_empty());
        // A console session keeps who made it.
        let maker = outpost_hub::store::MadeBy { name: "ops".into(), token: Some([1; 32]) };
        let kind = outpost_hub::store::TokenKind::ConsoleSession;
        let session = ApiToken { name: "ops (console ab12)".into(), kind, made_by: Some(maker), ..token.clone() };
        store.put_api_token(&[2; 32], &session).await.unwrap();
        assert_eq!(store.take_api_token(&[2; 32]).await.unwrap(), Some(session));

        // Names are unique among live tokens, as one step: of twenty
        // creations of one name at once, one succeeds.
        let live = ApiToken { expires_at: None, ..token.clone() };
        let tries: Vec<_> = (0..20u8)
            .map(|n| {
                let (store, live) = (store.clone(), live.clone());
                tokio::spawn(async move { store.insert_api_token(&[n + 10; 32], &live).await.unwrap() })
            })
            .collect();
        let mut made = 0;
        for t in tries {
            made += usize::from(t.await.unwrap());
        }
        assert_eq!(made, 1, "one token of a name");
        let expired = ApiToken { name: "old".into(), expires_at: Some(Timestamp(9)), ..token.clone() };
        assert!(store.insert_api_token(&[40; 32], &expired).await.unwrap());
        assert!(store.insert_api_token(&[41; 32], &expired).await.unwrap(), "an expired token's name is free");
        for (hash, _) in store.api_tokens().await.unwrap() {
            store.take_api_token(&hash).await.unwrap();
        }

        // Of two revocations of the last two admin tokens at once, one
        // passes: the check and the removal are one step.
        let admin = ApiToken { role: Role::Admin, expires_at: None, ..token.clone() };
        for n in [50u8, 51] {
            store.insert_api_token(&[n; 32], &ApiToken { name: format!("admin-{n}"), ..admin.clone() }).await.unwrap();
        }
        let refuse: outpost_hub::store::RefuseTake = |tokens, hash, now| {
            tokens
                .iter()
                .find(|(h, _)| h == hash)
                .is_some_and(|(_, t)| outpost_hub::service::last_admin(tokens, hash, t, now))
        };
        let tries: Vec<_> = [50u8, 51]
            .into_iter()
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.take_api_token_unless(&[n; 32], refuse).await.unwrap() })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tries {
            outcomes.push(t.await.unwrap().is_ok());
        }
        assert_eq!(outcomes.iter().filter(|taken| **taken).count(), 1, "{outcomes:?}");
        assert_eq!(store.api_tokens().await.unwrap().len(), 1, "one admin token is left");
        assert_eq!(store.take_api_token_unless(&[99; 32], refuse).await.unwrap(), Ok(None), "no such token");
        for (hash, _) in store.api_tokens().await.unwrap() {
            store.take_api_token(&hash).await.unwrap();
        }

        store.enroll(&[9; 16], 2, &device("dev-e1"), b"k1").await.unwrap();
        store.enroll(&[9; 16], 2, &device("dev-e2"), b"k2").await.unwrap();
        match store.enroll(&[9; 16], 2, &device("dev-e3"), b"k3").await {
            Err(StoreError::UsedUp { used: 2, allowed: 2 }) => {}
            other => panic!("a used-up token must be refused: {other:?}"),
        }
        let ids: Vec<String> = store.devices().await.unwrap().into_iter().map(|d| d.id.to_string()).collect();
        assert_eq!(ids, ["dev-e1", "dev-e2"], "nothing of the refused enrollment is kept");
        let e1: DeviceId = "dev-e1".parse().unwrap();
        assert_eq!(store.device(&e1).await.unwrap(), Some(device("dev-e1")));
        let keys = |current: &[u8], next: Option<&[u8]>| {
            Some(DeviceKeys { current: current.to_vec(), next: next.map(<[u8]>::to_vec) })
        };
        assert_eq!(store.device_keys(&e1).await.unwrap(), keys(b"k1", None));
        store.put_device_key(&e1, b"k1-new").await.unwrap();
        assert_eq!(store.device_keys(&e1).await.unwrap(), keys(b"k1-new", None));
        // A renewal: the next key is kept beside the current one, and
        // becomes the current one when the device is seen using it.
        store.put_next_device_key(&e1, b"k1-next").await.unwrap();
        assert_eq!(store.device_keys(&e1).await.unwrap(), keys(b"k1-new", Some(b"k1-next")));
        store.put_device_key(&e1, b"k1-new").await.unwrap();
        assert_eq!(store.device_keys(&e1).await.unwrap(), keys(b"k1-new", Some(b"k1-next")), "the old key seen again");
        store.put_device_key(&e1, b"k1-next").await.unwrap();
        assert_eq!(store.device_keys(&e1).await.unwrap(), keys(b"k1-next", None));
        assert_eq!(store.device_keys(&"dev-none".parse().unwrap()).await.unwrap(), None);
        // An expired certificate met, then a re-admission; the default clears.
        assert!(store.admissions().await.unwrap().is_empty());
        let met = Admission { expired_seen: Some(Timestamp(5)), ..Admission::default() };
        store.set_admission(&e1, &met).await.unwrap();
        let both = Admission { readmit_until: Some(Timestamp(9)), revoked_at: Some(Timestamp(11)), ..met };
        store.set_admission(&e1, &both).await.unwrap();
        assert_eq!(store.admissions().await.unwrap(), [(e1.clone(), both)]);
        let rows = store.fleet_rows(Some(std::slice::from_ref(&e1))).await.unwrap();
        assert_eq!(rows[0].admission, both);
        store.set_admission(&e1, &Admission::default()).await.unwrap();
        assert!(store.admissions().await.unwrap().is_empty());
        assert_eq!(store.fleet_rows(Some(std::slice::from_ref(&e1))).await.unwrap()[0].admission, Admission::default());

        let hello = |id: &str| outpost_hub::store::HelloRecord {
            id: id.parse().unwrap(),
            name: "renamed".into(),
            agent_version: "9.9".into(),
            addr: "10.0.0.1:5".into(),
            at: Timestamp(42),
        };
        assert!(store.record_hello(&hello("dev-e1")).await.unwrap());
        assert!(!store.record_hello(&hello("dev-none")).await.unwrap(), "an unknown device is not created");
        let record = store.device(&e1).await.unwrap().unwrap();
        assert_eq!(
            (record.name.as_str(), record.agent_version.as_deref(), record.last_seen, record.last_addr.as_deref()),
            ("renamed", Some("9.9"), Some(Timestamp(42)), Some("10.0.0.1:5"))
        );
        assert!(store.probe().await.ok, "{:?}", store.probe().await);
        assert!(store.health().ok);
    });
}

/// The numbers of a device's MQTT sessions, as the hubs of a shared
/// subscription take them: each once, whoever asks, in any order within
/// the window; a bounded number of sessions per device; pruned by age.
#[test]
fn mqtt_numbers_are_taken_once_by_whoever_asks_first() {
    on_both(|store| async move {
        let id: DeviceId = "dev-mqtt".parse().unwrap();
        let session = u64::MAX - 6; // all 64 bits, as agents draw them
        let t0 = now_ms();
        let take = |store: Store, id: DeviceId, session: u64, seq: u64, at: u64| async move {
            store.take_up_number(&id, session, seq, Timestamp(at)).await.unwrap()
        };
        assert_eq!(take(store.clone(), id.clone(), session, 1, t0).await, Ok(()));
        assert_eq!(take(store.clone(), id.clone(), session, 1, t0).await, Err(Stale::Again { seq: 1 }));
        let other: DeviceId = "dev-other".parse().unwrap();
        assert_eq!(take(store.clone(), other, session, 1, t0).await, Ok(()), "numbers are per device");
        // Many takers at once (the hubs' tasks; on PostgreSQL separate
        // connections racing on one row): every number once, none lost.
        let mut tasks = tokio::task::JoinSet::new();
        for taker in 0..8u64 {
            let (store, id) = (store.clone(), id.clone());
            tasks.spawn(async move {
                let mut taken = Vec::new();
                for i in 0..40u64 {
                    // Each taker walks the numbers in its own order.
                    let seq = 2 + (i * 7 + taker * 5) % 40;
                    if take(store.clone(), id.clone(), session, seq, t0).await.is_ok() {
                        taken.push(seq);
                    }
                }
                taken
            });
        }
        let mut taken: Vec<u64> = tasks.join_all().await.into_iter().flatten().collect();
        taken.sort_unstable();
        assert_eq!(taken, (2..42).collect::<Vec<_>>(), "each number taken exactly once");
        // More sessions than the bound, each heard later than the last: the
        // least recently heard is forgotten, the others kept.
        let sessions = UP_SESSIONS as u64;
        for new in 0..sessions {
            assert_eq!(take(store.clone(), id.clone(), new, 1, t0 + 1 + new).await, Ok(()));
        }
        for new in 0..sessions {
            let again = take(store.clone(), id.clone(), new, 1, t0 + 100).await;
            assert_eq!(again, Err(Stale::Again { seq: 1 }), "session {new} was forgotten");
        }
        assert_eq!(take(store.clone(), id.clone(), session, 50, t0 + 100).await, Ok(()), "the oldest is forgotten");
        // Pruning by age forgets every session heard before the cut.
        assert_eq!(store.prune_up_numbers(Timestamp(t0)).await.unwrap(), 0);
        let pruned = store.prune_up_numbers(Timestamp(t0 + 1000)).await.unwrap();
        assert_eq!(pruned, UP_SESSIONS + 1, "the device's sessions and the other device's");
        assert_eq!(take(store.clone(), id.clone(), 0, 1, t0 + 1000).await, Ok(()), "forgotten: its ticket decides now");
    });
}

#[test]
fn a_lease_has_one_holder_until_it_is_given_back_or_expires() {
    on_both(|store| async move {
        let ttl = std::time::Duration::from_millis(300);
        assert!(store.take_lease("backups/dev-a", "hub-1", ttl).await.unwrap());
        assert!(!store.take_lease("backups/dev-a", "hub-2", ttl).await.unwrap(), "two holders at once");
        assert!(store.take_lease("backups/dev-b", "hub-2", ttl).await.unwrap(), "leases are per name");
        assert!(store.take_lease("backups/dev-a", "hub-1", ttl).await.unwrap(), "the holder renews");
        store.release_lease("backups/dev-a", "hub-2").await.unwrap();
        assert!(!store.take_lease("backups/dev-a", "hub-2", ttl).await.unwrap(), "only the holder gives it back");
        store.release_lease("backups/dev-a", "hub-1").await.unwrap();
        assert!(store.take_lease("backups/dev-a", "hub-2", ttl).await.unwrap());
        // A holder that died: its lease expires.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert!(store.take_lease("backups/dev-a", "hub-3", ttl).await.unwrap());
    });
}

#[test]
fn fleet_rows_carry_labels_digests_and_sessions_and_the_audit_log_pages() {
    on_both(|store| async move {
        let a = enrolled(&store, "dev-fa").await;
        let b = enrolled(&store, "dev-fb").await;
        let labels: outpost_hub::store::Labels = [("env".to_owned(), "prod".to_owned())].into();
        assert!(store.set_labels(&a, &labels).await.unwrap());
        assert!(!store.set_labels(&"dev-none".parse().unwrap(), &labels).await.unwrap());
        let alarm = outpost_shared::protocol::Alarm {
            kind: outpost_shared::protocol::AlarmKind::OutboxFull,
            raised: true,
            message: "full".into(),
        };
        let now = now_ms();
        let records =
            [telemetry(1, now - 3_600_000), Record { seq: 2, at: Timestamp(now), body: RecordBody::Alarm(alarm) }];
        store.ingest(&a, &records).await.unwrap();
        store.claim_session(&b, "hub-x", "mqtt").await.unwrap();

        let rows = store.fleet_rows(None).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.record.id.to_string()).collect::<Vec<_>>(), ["dev-fa", "dev-fb"]);
        assert_eq!(rows[0].labels, labels);
        assert_eq!(rows[0].high_water, 2);
        assert!(rows[0].digest.alarmed());
        assert_eq!(rows[0].digest.late.len(), 1, "an hour-old sample arrived late");
        assert!(rows[1].labels.is_empty() && rows[1].digest == Default::default());
        assert_eq!(rows[1].session.as_ref().map(|s| s.transport.as_str()), Some("mqtt"));
        assert_eq!(rows[1].session.as_ref().unwrap().ended, None);
        // A certificate's expiry, once known, is read with the row.
        assert_eq!(rows[1].cert_expires, None);
        store.set_cert_expires(&b, Timestamp(9_000)).await.unwrap();
        store.set_cert_expires(&b, Timestamp(9_000)).await.unwrap();
        let again = store.fleet_rows(Some(std::slice::from_ref(&b))).await.unwrap();
        assert_eq!(again[0].cert_expires, Some(Timestamp(9_000)));
        // Why a session ended is kept for that session only, until the next.
        let epoch = rows[1].session.as_ref().unwrap().epoch;
        store.end_session(&b, "hub-x", epoch + 1, Timestamp(7), "not this one").await.unwrap();
        store.end_session(&b, "hub-y", epoch, Timestamp(7), "nor this").await.unwrap();
        assert_eq!(store.session(&b).await.unwrap().unwrap().ended, None);
        store.end_session(&b, "hub-x", epoch, Timestamp(8), "timed out").await.unwrap();
        assert_eq!(store.session(&b).await.unwrap().unwrap().ended, Some((Timestamp(8), "timed out".into())));
        let only = store.fleet_rows(Some(std::slice::from_ref(&b))).await.unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].record.id, b);
        assert_eq!(only[0].session.as_ref().unwrap().ended, Some((Timestamp(8), "timed out".into())));
        store.claim_session(&b, "hub-x", "quic").await.unwrap();
        assert_eq!(store.session(&b).await.unwrap().unwrap().ended, None, "a new session has not ended");

        for i in 0..5u64 {
            let entry = outpost_hub::store::AuditEntry {
                id: 0,
                at: Timestamp(1000 + i),
                who: match i {
                    1 => "ops (console Ab12Cd)".into(),
                    3 => "opsy".into(),
                    _ => "ops".into(),
                },
                action: "POST /api/v1/devices/{id}/commands".into(),
                target: a.to_string(),
                matched: None,
                from: "127.0.0.1".into(),
                status: if i == 4 { 403 } else { 201 },
                detail: String::new(),
            };
            store.append_audit(&entry).await.unwrap();
        }
        let q = |who: Option<&str>, outcome: Option<&str>, before, limit| outpost_hub::store::AuditQuery {
            before,
            limit,
            who: who.map(Into::into),
            outcome: outcome.map(Into::into),
            ..Default::default()
        };
        let all = store.audit(&q(None, None, None, 10)).await.unwrap();
        assert_eq!(all.iter().map(|e| e.at.0).collect::<Vec<_>>(), [1004, 1003, 1002, 1001, 1000], "newest first");
        let page = store.audit(&q(None, None, Some(all[1].id), 2)).await.unwrap();
        assert_eq!(page.iter().map(|e| e.at.0).collect::<Vec<_>>(), [1002, 1001]);
        let ops = store.audit(&q(Some("ops"), Some("ok"), None, 10)).await.unwrap();
        assert_eq!(ops.iter().map(|e| e.at.0).collect::<Vec<_>>(), [1002, 1001, 1000], "ops and its console sessions");
        let session = store.audit(&q(Some("ops (console Ab12Cd)"), None, None, 10)).await.unwrap();
        assert_eq!(session.iter().map(|e| e.at.0).collect::<Vec<_>>(), [1001], "one session");
        let refused = store.audit(&q(None, Some("refused"), None, 10)).await.unwrap();
        assert_eq!(refused.len(), 1);
        // Retention: entries before the cut go, the others stay.
        assert_eq!(store.prune_audit(Timestamp(1003)).await.unwrap(), 3);
        let kept = store.audit(&q(None, None, None, 10)).await.unwrap();
        assert_eq!(kept.iter().map(|e| e.at.0).collect::<Vec<_>>(), [1004, 1003]);
        assert_eq!(store.prune_audit(Timestamp(1003)).await.unwrap(), 0);
    });
}

/// The fleet index of a hub answers from memory and stays current: a write
/// through this process is seen by the next read (the store names the
/// devices whose rows it changed, and only those), and on PostgreSQL a
/// write by another hub within the index's resync period.
#[test]
fn the_fleet_index_sees_this_hubs_writes_at_once_and_another_hubs_soon() {
    use outpost_hub::service::fleet::Fleet;
    use outpost_hub::service::listing::{DeviceQuery, Selector};
    on_both(|store| async move {
        let dir = tempfile::tempdir().unwrap();
        let fleet = |store: Store| {
            let backups = outpost_hub::service::backups::Backups::new(dir.path(), store.clone());
            Fleet::new(store, backups, std::time::Duration::from_secs(15), Default::default(), Default::default())
        };
        let here = fleet(store.clone());
        let a = enrolled(&store, "dev-a").await;
        assert_eq!(here.overview(0).await.unwrap().devices, 1);
        let b = enrolled(&store, "dev-b").await;
        let prod = |text: &str| DeviceQuery {
            selector: Some(Selector::parse(text).unwrap()),
            limit: 10,
            ..Default::default()
        };
        let ids = |page: outpost_hub::service::listing::Page| page.rows.into_iter().map(|v| v.id).collect::<Vec<_>>();
        assert_eq!(
            ids(here.list(&DeviceQuery { limit: 10, ..Default::default() }).await.unwrap().unwrap()),
            ["dev-a", "dev-b"]
        );
        assert!(store.take_changed().is_empty(), "the index took what changed");

        // Reads change nothing; a write names its device and no other.
        store.fleet_rows(None).await.unwrap();
        store.touch_sessions("hub-x", &[(a.clone(), Timestamp::now())]).await.unwrap();
        assert!(store.take_changed().is_empty());
        let labels = [("env".to_owned(), "prod".to_owned())].into_iter().collect();
        store.set_labels(&b, &labels).await.unwrap();
        assert_eq!(store.take_changed(), std::slice::from_ref(&b));
        store.put_back_changed(vec![b.clone()]);
        assert_eq!(ids(here.list(&prod("env=prod")).await.unwrap().unwrap()), ["dev-b"]);
        store.ingest(&a, &[telemetry(1, now_ms())]).await.unwrap();
        assert_eq!(store.take_changed(), std::slice::from_ref(&a));
        store.put_back_changed(vec![a.clone()]);
        assert_eq!(here.device(&a).await.unwrap().unwrap().last_seq, 1);

        if store.shared() {
            // Another hub on the same database sets a label (a write this
            // process's record of changes does not hold). While no other
            // hub is alive the index never reads every row again; once one
            // holds its lease, the index finds the change within its resync
            // period, answering from what it holds meanwhile.
            use outpost_hub::service::index::{HUB_LEASE, HUB_LEASE_TTL, RESYNC};
            store.set_labels(&a, &labels).await.unwrap();
            drop(store.take_changed());
            let alone_until = std::time::Instant::now() + RESYNC * 2;
            while std::time::Instant::now() < alone_until {
                assert_eq!(ids(here.list(&prod("env=prod")).await.unwrap().unwrap()), ["dev-b"], "read again alone");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            assert!(store.take_lease(&format!("{HUB_LEASE}hub-other"), "hub-other", HUB_LEASE_TTL).await.unwrap());
            let deadline = std::time::Instant::now() + RESYNC * 4;
            loop {
                let found = ids(here.list(&prod("env=prod")).await.unwrap().unwrap());
                if found == ["dev-a", "dev-b"] {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "another hub's label not seen: {found:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    });
}
