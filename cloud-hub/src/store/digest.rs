//! A device's digest: the few facts the fleet's overview and device list
//! need (active alarms, recent failed runs, backups, how far behind the
//! device's data is, which periods arrived late), folded from each ingested
//! batch by [`DeviceDigest::fold`] — a pure function — and stored in the
//! same transaction as the batch. Listing 10 000 devices then reads one row
//! per device instead of scanning each device's history.

use super::AlarmRecord;
use super::ingest::Plan;
use outpost_shared::job::{JobSpec, Schedule};
use outpost_shared::protocol::{AlarmKind, RecordBody};
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Newest alarms kept (raised or cleared).
pub const RECENT_ALARMS: usize = 10;
/// Failed run times kept (those of the last day matter).
pub const FAILED_RUNS_KEPT: usize = 200;
/// Late periods kept, newest last.
pub const LATE_PERIODS_KEPT: usize = 100;
/// Samples that reach the hub this much after they were taken arrived late
/// (backfilled after an outage).
pub const LATE_AFTER_MS: u64 = 120_000;
/// Two late samples this close in time belong to one late period.
pub const LATE_JOIN_MS: u64 = 600_000;
/// A backup job is overdue once its last success is this many periods old.
pub const OVERDUE_PERIODS: u64 = 2;

pub use outpost_shared::job::BACKUP_JOB_PREFIX;

/// What the fleet views need to know about one device's history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceDigest {
    /// Device time of the newest record stored.
    pub newest_at: Option<Timestamp>,
    /// Hub time when that record was stored.
    pub stored_at: Option<Timestamp>,
    /// Alarms raised and not cleared, one per kind.
    pub active_alarms: Vec<AlarmRecord>,
    /// The newest alarms, newest first.
    pub recent_alarms: Vec<AlarmRecord>,
    /// End times of failed job attempts, oldest first.
    pub failed_runs: Vec<Timestamp>,
    /// Scheduled backup jobs and how they last went.
    pub backups: Vec<BackupDigest>,
    /// Sample-time periods whose samples reached the hub late, oldest
    /// first, as (first, last) sample times.
    pub late: Vec<(Timestamp, Timestamp)>,
    /// Why the device refused its latest desired state, until it applies
    /// one.
    pub desired_error: Option<String>,
    /// Jobs whose latest runs failed, and how many runs in a row.
    pub failing: Vec<FailingJob>,
}

/// A job whose latest runs failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingJob {
    /// The job's name.
    pub job: String,
    /// Runs in a row with a failed attempt and no successful one (the
    /// attempts of one run count once).
    pub runs: u32,
    /// The run id of the latest of them.
    pub last_run: u64,
    /// When the first of them ended.
    pub since: Timestamp,
}

/// The stored form of digests made before they held the desired-state
/// refusal and the failing jobs.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct DigestV1 {
    newest_at: Option<Timestamp>,
    stored_at: Option<Timestamp>,
    active_alarms: Vec<AlarmRecord>,
    recent_alarms: Vec<AlarmRecord>,
    failed_runs: Vec<Timestamp>,
    backups: Vec<BackupDigest>,
    late: Vec<(Timestamp, Timestamp)>,
}

/// One scheduled backup job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupDigest {
    /// The job's name (`backup-<set>`).
    pub job: String,
    /// Time between runs, in milliseconds.
    pub period_ms: u64,
    /// End of the last successful run.
    pub last_ok: Option<Timestamp>,
    /// When the job was first seen (overdue counts from here if it never
    /// succeeded).
    pub since: Timestamp,
}

impl DeviceDigest {
    /// Decodes a stored digest, in its current or its first form.
    pub fn decode(bytes: &[u8]) -> Result<DeviceDigest, super::StoreError> {
        postcard::from_bytes::<DeviceDigest>(bytes)
            .or_else(|_| {
                postcard::from_bytes::<DigestV1>(bytes).map(|d| DeviceDigest {
                    newest_at: d.newest_at,
                    stored_at: d.stored_at,
                    active_alarms: d.active_alarms,
                    recent_alarms: d.recent_alarms,
                    failed_runs: d.failed_runs,
                    backups: d.backups,
                    late: d.late,
                    desired_error: None,
                    failing: Vec::new(),
                })
            })
            .map_err(|e| super::StoreError::Corrupt { what: "digests", message: e.to_string() })
    }

    /// Folds a batch's plan in, at hub time `now`.
    pub fn fold(&mut self, plan: &Plan<'_>, records: &[outpost_shared::protocol::Record], now: Timestamp) {
        if let Some(jobs) = &plan.jobs {
            self.backups = jobs
                .jobs
                .iter()
                .filter_map(|(spec, _)| {
                    let period_ms = backup_period(spec)?;
                    let old = self.backups.iter().find(|b| b.job == spec.name);
                    Some(BackupDigest {
                        job: spec.name.clone(),
                        period_ms,
                        last_ok: old.and_then(|b| b.last_ok),
                        since: old.map_or(now, |b| b.since),
                    })
                })
                .collect();
        }
        for record in records.iter().filter(|r| r.seq > plan.before && r.seq <= plan.upto) {
            if self.newest_at.is_none_or(|t| t <= record.at) {
                self.newest_at = Some(record.at);
                self.stored_at = Some(now);
            }
            match &record.body {
                RecordBody::Telemetry(sample) if sample.at.until(now).as_millis() as u64 > LATE_AFTER_MS => {
                    self.mark_late(sample.at);
                }
                RecordBody::JobRun(run) if run.outcome.succeeded() => {
                    if let Some(b) = self.backups.iter_mut().find(|b| b.job == run.job) {
                        b.last_ok = b.last_ok.max(Some(run.ended));
                    }
                    self.failing.retain(|f| f.job != run.job);
                }
                RecordBody::JobRun(run) => {
                    self.failed_runs.push(run.ended);
                    match self.failing.iter_mut().find(|f| f.job == run.job) {
                        Some(f) if f.last_run == run.run_id => {}
                        Some(f) => {
                            f.runs = f.runs.saturating_add(1);
                            f.last_run = run.run_id;
                        }
                        None => self.failing.push(FailingJob {
                            job: run.job.clone(),
                            runs: 1,
                            last_run: run.run_id,
                            since: run.ended,
                        }),
                    }
                }
                RecordBody::StateReport(report) => self.desired_error.clone_from(&report.error),
                RecordBody::JobsReport(jobs) => {
                    self.failing.retain(|f| jobs.jobs.iter().any(|(spec, _)| spec.name == f.job))
                }
                RecordBody::Alarm(alarm) => {
                    let entry = AlarmRecord { seq: record.seq, at: record.at, alarm: alarm.clone() };
                    self.active_alarms.retain(|a| a.alarm.kind != alarm.kind);
                    if alarm.raised {
                        self.active_alarms.push(entry.clone());
                    }
                    self.recent_alarms.insert(0, entry);
                    self.recent_alarms.truncate(RECENT_ALARMS);
                }
                _ => {}
            }
        }
        self.failed_runs.sort();
        let excess = self.failed_runs.len().saturating_sub(FAILED_RUNS_KEPT);
        self.failed_runs.drain(..excess);
    }

    fn mark_late(&mut self, at: Timestamp) {
        if let Some(period) =
            self.late.iter_mut().find(|(a, b)| at.0 + LATE_JOIN_MS >= a.0 && at.0 <= b.0.saturating_add(LATE_JOIN_MS))
        {
            period.0 = period.0.min(at);
            period.1 = period.1.max(at);
        } else {
            self.late.push((at, at));
            self.late.sort();
            let excess = self.late.len().saturating_sub(LATE_PERIODS_KEPT);
            self.late.drain(..excess);
        }
    }

    /// Failed job attempts that ended at or after `since`.
    pub fn failed_runs_since(&self, since: Timestamp) -> usize {
        self.failed_runs.iter().filter(|t| **t >= since).count()
    }

    /// Failed job attempts in the 24 hours before `now` (what the device
    /// list, the overview and the views count).
    pub fn failed_runs_in_a_day(&self, now: Timestamp) -> usize {
        self.failed_runs_since(Timestamp(now.0.saturating_sub(86_400_000)))
    }

    /// Backup jobs whose last success (or first sight, if none) is more than
    /// [`OVERDUE_PERIODS`] periods before `now`.
    pub fn overdue_backups(&self, now: Timestamp) -> Vec<&BackupDigest> {
        self.backups
            .iter()
            .filter(|b| {
                let from = b.last_ok.unwrap_or(b.since);
                from.until(now).as_millis() as u64 > b.period_ms.saturating_mul(OVERDUE_PERIODS)
            })
            .collect()
    }

    /// How far the hub's newest record of a device lags behind `now` (its
    /// backlog still on the device, while it catches up), when it has any.
    pub fn behind(&self, now: Timestamp) -> Option<std::time::Duration> {
        self.newest_at.map(|t| t.until(now))
    }

    /// The most runs in a row any one job failed (0: none is failing).
    pub fn failing_in_a_row(&self) -> u32 {
        self.failing.iter().map(|f| f.runs).max().unwrap_or(0)
    }

    /// True if the device has alarms raised and not cleared.
    pub fn alarmed(&self) -> bool {
        !self.active_alarms.is_empty()
    }

    /// Kinds of the active alarms.
    pub fn alarm_kinds(&self) -> impl Iterator<Item = AlarmKind> + '_ {
        self.active_alarms.iter().map(|a| a.alarm.kind)
    }
}

/// The period of a scheduled backup job, if `spec` is one.
fn backup_period(spec: &JobSpec) -> Option<u64> {
    if !spec.enabled || !spec.name.starts_with(BACKUP_JOB_PREFIX) {
        return None;
    }
    match &spec.schedule {
        Schedule::Every(d) => Some(d.as_millis().try_into().unwrap_or(u64::MAX)),
        cron @ Schedule::Cron(_) => {
            let first = cron.next_cron_after(Timestamp::now())?;
            let second = cron.next_cron_after(first)?;
            Some(second.0.saturating_sub(first.0).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ingest::plan;
    use crate::store::ingest::tests::sample;
    use outpost_shared::job::{Action, JobRun, JobSource, JobsReport, Overlap, RunOutcome, Trigger};
    use outpost_shared::protocol::{Alarm, Record, StateReport};

    fn run(job: &str, ended: u64, code: i32) -> RecordBody {
        RecordBody::JobRun(JobRun {
            run_id: ended,
            job: job.into(),
            trigger: Trigger::Schedule,
            attempt: 1,
            started: Timestamp(ended - 1),
            ended: Timestamp(ended),
            outcome: RunOutcome::Exited { code },
            output: String::new(),
            output_bytes: 0,
        })
    }

    fn alarm(kind: AlarmKind, raised: bool) -> RecordBody {
        RecordBody::Alarm(Alarm { kind, raised, message: "m".into() })
    }

    fn records(bodies: Vec<(u64, RecordBody)>) -> Vec<Record> {
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, (at, body))| Record { seq: i as u64 + 1, at: Timestamp(at), body })
            .collect()
    }

    fn fold(digest: &mut DeviceDigest, high_water: u64, records: &[Record], now: u64) {
        let p = plan(high_water, records);
        digest.fold(&p, records, Timestamp(now));
    }

    #[test]
    fn alarms_stay_active_until_cleared() {
        let mut d = DeviceDigest::default();
        let rs = records(vec![
            (10, alarm(AlarmKind::OutboxFull, true)),
            (20, alarm(AlarmKind::TelemetryThinned, true)),
            (30, alarm(AlarmKind::OutboxFull, false)),
        ]);
        fold(&mut d, 0, &rs, 40);
        assert_eq!(d.alarm_kinds().collect::<Vec<_>>(), [AlarmKind::TelemetryThinned]);
        assert_eq!(d.recent_alarms.iter().map(|a| a.seq).collect::<Vec<_>>(), [3, 2, 1], "newest first");
        assert!(d.alarmed());
    }

    #[test]
    fn duplicates_fold_nothing() {
        let mut d = DeviceDigest::default();
        let rs = records(vec![(10, run("j", 10, 1)), (20, run("j", 20, 1))]);
        fold(&mut d, 0, &rs, 30);
        fold(&mut d, 2, &rs, 40);
        assert_eq!(d.failed_runs, [Timestamp(10), Timestamp(20)], "a resent batch is not counted twice");
        assert_eq!(d.failed_runs_since(Timestamp(15)), 1);
        assert_eq!((d.newest_at, d.stored_at), (Some(Timestamp(20)), Some(Timestamp(30))));
    }

    #[test]
    fn runs_failed_in_a_row_count_runs_not_attempts_and_a_success_ends_them() {
        let attempt = |job: &str, run_id, attempt, ok: bool, at: u64| {
            RecordBody::JobRun(JobRun {
                run_id,
                job: job.into(),
                trigger: Trigger::Schedule,
                attempt,
                started: Timestamp(at),
                ended: Timestamp(at),
                outcome: RunOutcome::Exited { code: i32::from(!ok) },
                output: String::new(),
                output_bytes: 0,
            })
        };
        let mut d = DeviceDigest::default();
        let rs = records(vec![
            (10, attempt("a", 1, 1, false, 10)),
            (11, attempt("a", 1, 2, false, 11)),
            (20, attempt("a", 2, 1, false, 20)),
            (30, attempt("b", 3, 1, false, 30)),
            (40, attempt("a", 4, 1, false, 40)),
        ]);
        fold(&mut d, 0, &rs, 50);
        assert_eq!(d.failing_in_a_row(), 3, "three runs of a, one with a retry");
        assert_eq!(
            d.failing.iter().map(|f| (f.job.as_str(), f.runs, f.since)).collect::<Vec<_>>(),
            [("a", 3, Timestamp(10)), ("b", 1, Timestamp(30))]
        );
        let rs2 = vec![Record { seq: 6, at: Timestamp(60), body: attempt("a", 5, 2, true, 60) }];
        fold(&mut d, 5, &rs2, 60);
        assert_eq!(d.failing_in_a_row(), 1, "a succeeded: only b fails");
        let gone = RecordBody::JobsReport(JobsReport { jobs: Vec::new() });
        fold(&mut d, 6, &[Record { seq: 7, at: Timestamp(70), body: gone }], 70);
        assert!(d.failing.is_empty(), "a job taken away is not failing");
    }

    #[test]
    fn a_refused_desired_state_stands_until_one_is_applied() {
        let report = |error: Option<&str>| {
            RecordBody::StateReport(StateReport { applied_version: 3, error: error.map(str::to_owned) })
        };
        let mut d = DeviceDigest::default();
        fold(&mut d, 0, &records(vec![(10, report(Some("jobs[0].schedule: bad cron")))]), 10);
        assert_eq!(d.desired_error.as_deref(), Some("jobs[0].schedule: bad cron"));
        fold(&mut d, 1, &[Record { seq: 2, at: Timestamp(20), body: report(None) }], 20);
        assert_eq!(d.desired_error, None);
    }

    #[test]
    fn digests_stored_before_these_facts_still_read() {
        let old = DigestV1 {
            newest_at: Some(Timestamp(5)),
            stored_at: Some(Timestamp(6)),
            active_alarms: Vec::new(),
            recent_alarms: Vec::new(),
            failed_runs: vec![Timestamp(4)],
            backups: Vec::new(),
            late: vec![(Timestamp(1), Timestamp(2))],
        };
        let read = DeviceDigest::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!((read.newest_at, read.failed_runs.len(), read.late.len()), (Some(Timestamp(5)), 1, 1));
        assert_eq!((read.desired_error, read.failing.len()), (None, 0));
        let mut now = DeviceDigest { desired_error: Some("x".into()), ..DeviceDigest::default() };
        now.failing.push(FailingJob { job: "j".into(), runs: 2, last_run: 9, since: Timestamp(3) });
        assert_eq!(DeviceDigest::decode(&postcard::to_stdvec(&now).unwrap()).unwrap(), now);
    }

    #[test]
    fn late_samples_make_periods_and_fresh_ones_do_not() {
        let mut d = DeviceDigest::default();
        let now = 10 * 86_400_000;
        let old = now - 3_600_000;
        let rs =
            records(vec![(old, sample(old)), (old + 10_000, sample(old + 10_000)), (now - 1000, sample(now - 1000))]);
        fold(&mut d, 0, &rs, now);
        assert_eq!(d.late, [(Timestamp(old), Timestamp(old + 10_000))]);
        let far = now - 2 * 86_400_000;
        let rs2 = vec![Record { seq: 4, at: Timestamp(far), body: sample(far) }];
        fold(&mut d, 3, &rs2, now);
        assert_eq!(d.late.len(), 2);
        assert_eq!(d.late[0], (Timestamp(far), Timestamp(far)), "periods stay in time order");
        assert_eq!(d.newest_at, Some(Timestamp(now - 1000)), "an old record does not move the newest time back");
    }

    #[test]
    fn a_backup_job_is_overdue_after_two_periods_without_success() {
        use std::time::Duration;
        let spec = |name: &str| {
            let spec = JobSpec {
                name: name.into(),
                schedule: Schedule::Every(Duration::from_secs(60)),
                action: Action::Command { argv: vec!["true".into()], env: Default::default(), working_dir: None },
                timeout: Duration::from_secs(60),
                retries: 0,
                retry_backoff: Duration::from_secs(1),
                overlap: Overlap::Forbid,
                catch_up: false,
                jitter: Duration::ZERO,
                max_output: 100,
                enabled: true,
            };
            (spec, JobSource::Config)
        };
        let mut d = DeviceDigest::default();
        let report = RecordBody::JobsReport(JobsReport { jobs: vec![spec("backup-data"), spec("other")] });
        fold(&mut d, 0, &records(vec![(1_000, report)]), 1_000);
        assert_eq!(d.backups.len(), 1, "only backup-<set> jobs count");
        assert!(d.overdue_backups(Timestamp(100_000)).is_empty());
        assert_eq!(d.overdue_backups(Timestamp(122_000)).len(), 1, "never succeeded, seen 2 periods ago");
        let rs = vec![Record { seq: 2, at: Timestamp(130_000), body: run("backup-data", 130_000, 0) }];
        fold(&mut d, 1, &rs, 130_000);
        assert!(d.overdue_backups(Timestamp(200_000)).is_empty());
        assert_eq!(d.overdue_backups(Timestamp(251_000)).len(), 1);
        assert!(d.failed_runs.is_empty(), "a success is not a failure");
    }
}
