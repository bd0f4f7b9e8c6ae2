//! What ingesting a batch does, decided without I/O: [`plan`] takes a
//! device's stored high-water mark and the batch's records and says which
//! are duplicates, where the gaps are, which record goes to which table and
//! what the new mark is. Each backend applies a [`Plan`] in one transaction
//! that also writes the mark, so a record is stored exactly once however
//! often the device resends it.

use super::{EventRecord, Ingested, JobsRecord, PeersRecord, ReportedState};
use outpost_shared::DeviceId;
use outpost_shared::job::JobRun;
use outpost_shared::protocol::{CommandResult, Record, RecordBody, StateReport};
use outpost_shared::telemetry::Sample;

/// What one batch changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan<'a> {
    /// The high-water mark before the batch.
    pub before: u64,
    /// The high-water mark after the batch (the ack to send).
    pub upto: u64,
    /// True if the mark moves (something new to store).
    pub advances: bool,
    /// Records at or below the old mark.
    pub duplicates: usize,
    /// Sequence ranges skipped (telemetry the device thinned).
    pub gaps: Vec<(u64, u64)>,
    /// The device's log: command results, state reports and alarms.
    pub events: Vec<EventRecord>,
    /// Telemetry samples with their sequence numbers.
    pub samples: Vec<(u64, &'a Sample)>,
    /// Job run attempts.
    pub runs: Vec<&'a JobRun>,
    /// The newest job list in the batch (it replaces the stored one).
    pub jobs: Option<JobsRecord>,
    /// The newest peer table in the batch.
    pub peers: Option<PeersRecord>,
    /// The newest desired-state report in the batch.
    pub reported: Option<ReportedState>,
    /// Command outcomes to record on the commands.
    pub results: Vec<&'a CommandResult>,
    /// The sample with the latest time in the batch (for the device's
    /// record, if newer than the one it holds).
    pub newest_sample: Option<&'a Sample>,
    /// Job names whose run history grew (to trim to the newest
    /// [`super::MAX_RUNS_PER_JOB`]).
    pub touched_jobs: Vec<&'a str>,
    /// Job lists in the batch (only the newest is kept).
    pub jobs_reports: usize,
    /// Peer tables in the batch (only the newest is kept).
    pub peers_reports: usize,
}

impl Plan<'_> {
    /// Records the plan stores.
    pub fn stored(&self) -> usize {
        self.events.len() + self.samples.len() + self.runs.len() + self.jobs_reports + self.peers_reports
    }
}

/// Decides what storing `records` (in increasing sequence order, as the
/// session checked) does to a device whose high-water mark is `high_water`.
pub fn plan(high_water: u64, records: &[Record]) -> Plan<'_> {
    let mut plan = Plan { before: high_water, upto: high_water, ..Plan::default() };
    for record in records {
        if record.seq <= plan.upto {
            plan.duplicates += 1;
            continue;
        }
        if record.seq > plan.upto + 1 {
            plan.gaps.push((plan.upto + 1, record.seq - 1));
        }
        plan.upto = record.seq;
        match &record.body {
            RecordBody::Telemetry(sample) => {
                plan.samples.push((record.seq, sample));
                if plan.newest_sample.is_none_or(|n| n.at <= sample.at) {
                    plan.newest_sample = Some(sample);
                }
            }
            RecordBody::JobRun(run) => {
                plan.runs.push(run);
                if !plan.touched_jobs.contains(&run.job.as_str()) {
                    plan.touched_jobs.push(&run.job);
                }
            }
            RecordBody::JobsReport(report) => {
                plan.jobs = Some(JobsRecord { at: record.at, jobs: report.jobs.clone() });
                plan.jobs_reports += 1;
            }
            RecordBody::PeersReport(report) => {
                plan.peers = Some(PeersRecord { at: record.at, peers: report.peers.clone() });
                plan.peers_reports += 1;
            }
            body @ (RecordBody::Alarm(_) | RecordBody::StateReport(_) | RecordBody::CommandResult(_)) => {
                plan.events.push(EventRecord { seq: record.seq, at: record.at, body: body.clone() });
                match body {
                    RecordBody::StateReport(StateReport { applied_version, error }) => {
                        plan.reported = Some(ReportedState {
                            applied_version: *applied_version,
                            error: error.clone(),
                            at: record.at,
                        });
                    }
                    RecordBody::CommandResult(result) => plan.results.push(result),
                    _ => {}
                }
            }
        }
    }
    plan.advances = plan.upto > high_water;
    plan
}

impl From<&Plan<'_>> for Ingested {
    fn from(plan: &Plan<'_>) -> Self {
        Ingested {
            before: plan.before,
            upto: plan.upto,
            stored: plan.stored(),
            duplicates: plan.duplicates,
            gaps: plan.gaps.clone(),
        }
    }
}

/// Logs what deserves a line among the records a batch stored (above the
/// mark `before` it): failed job runs and alarms.
pub fn log_stored(id: &DeviceId, records: &[Record], before: u64) {
    for record in records.iter().filter(|r| r.seq > before) {
        match &record.body {
            RecordBody::JobRun(run) if !run.outcome.succeeded() => {
                tracing::info!(device = %id, job = %run.job, run = run.run_id, attempt = run.attempt, outcome = %run.outcome, "Job run failed on a device.");
            }
            RecordBody::Alarm(alarm) => {
                tracing::warn!(device = %id, kind = ?alarm.kind, raised = alarm.raised, message = %alarm.message, "Device alarm.");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use outpost_shared::protocol::{Alarm, AlarmKind, Outcome};
    use outpost_shared::telemetry::Sample;
    use outpost_shared::time::Timestamp;

    /// A quiet telemetry sample of time `at`, no disks (shared with the
    /// digest's and the alert conditions' tests).
    pub(crate) fn quiet_sample(at: u64) -> Sample {
        Sample {
            at: Timestamp(at),
            cpu_percent: 1.0,
            mem_used_bytes: 1,
            mem_total_bytes: 2,
            swap_used_bytes: 0,
            load: [0.0; 3],
            uptime_secs: 1,
            disks: Vec::new(),
            net: Vec::new(),
            temperatures: Vec::new(),
        }
    }

    /// A telemetry record body of time `at` (shared with the digest's tests).
    pub(in crate::store) fn sample(at: u64) -> RecordBody {
        RecordBody::Telemetry(quiet_sample(at))
    }

    fn rec(seq: u64, body: RecordBody) -> Record {
        Record { seq, at: Timestamp(seq * 10), body }
    }

    fn result(id: u64) -> RecordBody {
        RecordBody::CommandResult(CommandResult { id, outcome: Outcome::Succeeded, output: String::new() })
    }

    #[test]
    fn records_at_or_below_the_mark_are_duplicates() {
        let records = [rec(4, sample(1)), rec(5, sample(2)), rec(6, sample(3))];
        let plan = plan(5, &records);
        assert_eq!((plan.duplicates, plan.upto, plan.samples.len(), plan.stored()), (2, 6, 1, 1));
        assert!(plan.advances);
        let all_old = super::plan(9, &records);
        assert_eq!((all_old.duplicates, all_old.upto, all_old.stored()), (3, 9, 0));
        assert!(!all_old.advances, "a resent batch must not move the mark");
    }

    #[test]
    fn gaps_are_named_and_the_mark_follows_the_last_record() {
        let records = [rec(3, sample(1)), rec(7, sample(2)), rec(8, sample(3)), rec(20, sample(4))];
        let plan = plan(0, &records);
        assert_eq!(plan.gaps, [(1, 2), (4, 6), (9, 19)]);
        assert_eq!(plan.upto, 20);
        assert_eq!(
            Ingested::from(&plan),
            Ingested { before: 0, upto: 20, stored: 4, duplicates: 0, gaps: plan.gaps.clone() }
        );
    }

    #[test]
    fn each_record_goes_to_its_place_and_reports_keep_the_newest() {
        let alarm = Alarm { kind: AlarmKind::OutboxFull, raised: true, message: "full".into() };
        let records = [
            rec(1, sample(50)),
            rec(2, RecordBody::StateReport(StateReport { applied_version: 1, error: None })),
            rec(3, result(9)),
            rec(4, RecordBody::Alarm(alarm)),
            rec(5, sample(40)),
            rec(6, RecordBody::StateReport(StateReport { applied_version: 2, error: Some("no".into()) })),
        ];
        let plan = plan(0, &records);
        assert_eq!(plan.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4, 6]);
        assert_eq!(plan.samples.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(
            plan.newest_sample.map(|s| s.at),
            Some(Timestamp(50)),
            "the latest sample time, not the last record"
        );
        assert_eq!(plan.reported.as_ref().map(|r| (r.applied_version, r.at)), Some((2, Timestamp(60))));
        assert_eq!(plan.results.iter().map(|r| r.id).collect::<Vec<_>>(), [9]);
        assert_eq!(plan.stored(), 6);
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        let plan = plan(7, &[]);
        assert_eq!((plan.upto, plan.advances, plan.stored()), (7, false, 0));
    }
}
