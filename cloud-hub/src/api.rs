//! JSON shapes of the HTTP API (`/api/v1`), shared by the server and by
//! `outpostctl`.

use crate::store::{AlarmRecord, DesiredRecord, DeviceRecord, ReportedState};
use outpost_shared::job::{Action, JobRun, JobSource, JobSpec, RunOutcome, Schedule, Trigger};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};

/// One device as `GET /api/v1/devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Something arrived from it within the heartbeat timeout.
    pub online: bool,
    /// It holds a live session (QUIC, or MQTT messages within the
    /// heartbeat timeout).
    pub connected: bool,
    /// The live session's transport: `quic` or `mqtt`.
    #[serde(default)]
    pub transport: Option<String>,
    /// Last message, RFC 3339.
    pub last_seen: Option<String>,
    /// Last message, milliseconds since the epoch.
    pub last_seen_ms: Option<u64>,
    /// Agent version from its last hello.
    pub agent_version: Option<String>,
    /// Enrollment time, RFC 3339.
    pub enrolled_at: String,
    /// Address of its last connection.
    pub address: Option<String>,
    /// CPU busy share from the latest sample.
    pub cpu_percent: Option<f32>,
    /// Memory in use from the latest sample.
    pub mem_percent: Option<f32>,
    /// The latest telemetry sample.
    pub telemetry: Option<Sample>,
    /// The newest alarms, newest first.
    #[serde(default)]
    pub alarms: Vec<AlarmRecord>,
    /// Highest record sequence number stored for this device.
    #[serde(default)]
    pub last_seq: u64,
}

/// Query of `GET /api/v1/devices/{id}/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetricsQuery {
    /// Earliest sample time (RFC 3339 or ms since the epoch), inclusive.
    pub since: Option<String>,
    /// Latest sample time, exclusive.
    pub until: Option<String>,
    /// Most samples returned (default 10 000).
    pub limit: Option<usize>,
}

/// Query of list endpoints that only page by count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LimitQuery {
    /// Most items returned.
    pub limit: Option<usize>,
}

/// One stored sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleView {
    /// The record's sequence number on the device.
    pub seq: u64,
    /// Sample time (device clock), RFC 3339.
    pub at: String,
    /// Sample time, ms since the epoch.
    pub at_ms: u64,
    /// The sample.
    pub sample: Sample,
}

impl SampleView {
    /// The view of a stored sample.
    pub fn new(seq: u64, sample: Sample) -> Self {
        SampleView { seq, at: rfc3339(sample.at), at_ms: sample.at.0, sample }
    }
}

/// Answer of `GET /api/v1/devices/{id}/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsView {
    /// The device.
    pub device: String,
    /// Samples, oldest first.
    pub samples: Vec<SampleView>,
}

/// Body of `PUT /api/v1/devices/{id}/desired`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredPut {
    /// The version the change is based on (0 if none was set).
    pub version: u64,
    /// The new document.
    pub doc: serde_json::Value,
}

/// Desired and reported state side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredView {
    /// Desired version (0 if never set).
    pub version: u64,
    /// Desired document.
    pub doc: serde_json::Value,
    /// Version the device applied (0 if none reported).
    pub reported_version: u64,
    /// Why the device refused the latest version, if it did.
    pub reported_error: Option<String>,
    /// True when the device runs the desired version.
    pub in_sync: bool,
}

impl DesiredView {
    /// Joins the desired record with the device's report.
    pub fn new(desired: Option<DesiredRecord>, reported: Option<ReportedState>) -> Self {
        let version = desired.as_ref().map_or(0, |d| d.version);
        let doc = desired
            .and_then(|d| serde_json::from_str(&d.doc).ok())
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let reported_version = reported.as_ref().map_or(0, |r| r.applied_version);
        DesiredView {
            version,
            doc,
            reported_version,
            reported_error: reported.and_then(|r| r.error),
            in_sync: reported_version == version,
        }
    }
}

/// Body of `POST /api/v1/devices/{id}/commands`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandRequest {
    /// `echo`, `exec` or `run_job` (one argument: the job's name).
    pub kind: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Lifetime before it expires undelivered, e.g. `"10m"` (default 1h).
    pub expires_in: Option<String>,
}

/// RFC 3339 text of a timestamp, to the second.
pub fn rfc3339(t: Timestamp) -> String {
    t.rfc3339()
}

impl DeviceView {
    /// Builds the view of `record` with its live presence.
    pub fn new(
        record: DeviceRecord,
        last_seen: Option<Timestamp>,
        online: bool,
        transport: Option<&str>,
        alarms: Vec<AlarmRecord>,
        last_seq: u64,
    ) -> Self {
        DeviceView {
            id: record.id.to_string(),
            name: record.name,
            online,
            connected: transport.is_some(),
            transport: transport.map(str::to_owned),
            last_seen: last_seen.map(rfc3339),
            last_seen_ms: last_seen.map(|t| t.0),
            agent_version: record.agent_version,
            enrolled_at: rfc3339(record.enrolled_at),
            address: record.last_addr,
            cpu_percent: record.last_sample.as_ref().map(|s| s.cpu_percent),
            mem_percent: record.last_sample.as_ref().map(Sample::mem_percent),
            telemetry: record.last_sample,
            alarms,
            last_seq,
        }
    }
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// `GET /api/v1/devices/{id}/backups`: the device's uploaded snapshots and
/// what its chunks take at the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupsView {
    /// Device id.
    pub device: String,
    /// Catalogued snapshots, oldest first.
    pub snapshots: Vec<crate::backups::SnapshotView>,
    /// Chunks at the hub.
    pub stored_chunks: u64,
    /// Their bytes on disk.
    pub stored_bytes: u64,
}

/// `POST /api/v1/devices/{id}/backups/grants`: let another device (a
/// replacement) fetch this device's backups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRequest {
    /// The device that may read.
    pub to: String,
    /// For how long, e.g. `24h` (default 24 hours).
    #[serde(default)]
    pub valid_for: Option<String>,
}

/// `DELETE /api/v1/devices/{id}/backups`: what was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupsDeleted {
    /// Device id.
    pub device: String,
    /// Snapshots removed from the catalog.
    pub snapshots: usize,
    /// Chunks removed.
    pub chunks: u64,
    /// Their bytes on disk.
    pub bytes: u64,
}

/// A restore grant as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantView {
    /// Whose backups.
    pub owner: String,
    /// Who may read them.
    pub reader: String,
    /// Until when, RFC 3339.
    pub expires_at: String,
    /// The API token that granted it.
    pub by: String,
}

/// `GET /api/v1/devices/{id}/peers`: the device's LAN neighbours as it
/// last reported them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersView {
    /// Device id.
    pub device: String,
    /// When the device reported this table (none: never reported).
    pub reported_at: Option<String>,
    /// The peers.
    pub peers: Vec<outpost_shared::peers::PeerEntry>,
}

/// `GET /api/v1/devices/{id}/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsView {
    /// Device id.
    pub device: String,
    /// When the device reported this list (none: never reported).
    pub reported_at: Option<String>,
    /// The jobs in force on the device.
    pub jobs: Vec<JobView>,
}

/// One job in force on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// Name.
    pub name: String,
    /// `config` (the device's file) or `hub` (desired state).
    pub source: String,
    /// `command` or a built-in kind.
    pub kind: String,
    /// `@every 30s` or a cron expression (UTC).
    pub schedule: String,
    /// Program and arguments, for commands.
    pub command: Option<Vec<String>>,
    /// `forbid`, `allow` or `replace`.
    pub overlap: String,
    /// Runs missed while the device was off are made up once at start.
    pub catch_up: bool,
    /// Further attempts after a failure.
    pub retries: u32,
    /// Per-attempt time limit.
    pub timeout: String,
    /// Random start delay limit.
    pub jitter: String,
    /// False when switched off.
    pub enabled: bool,
    /// The next scheduled run as the hub computes it (for `@every`, one
    /// interval after the last run's start).
    pub next_run: Option<String>,
    /// The newest attempt the hub holds.
    pub last_run: Option<JobRunView>,
}

impl JobView {
    /// The view of `spec`, with its newest attempt.
    pub fn new(spec: &JobSpec, source: JobSource, last: Option<JobRun>, now: Timestamp) -> Self {
        let next_run = match &spec.schedule {
            _ if !spec.enabled => None,
            Schedule::Cron(_) => spec.schedule.next_cron_after(now),
            Schedule::Every(d) => last.as_ref().map(|r| Schedule::next_every(*d, r.started).max(now)),
        };
        JobView {
            name: spec.name.clone(),
            source: source.to_string(),
            kind: spec.kind().into(),
            schedule: spec.schedule.to_string(),
            command: match &spec.action {
                Action::Command { argv, .. } => Some(argv.clone()),
                Action::Builtin(_) => None,
            },
            overlap: spec.overlap.to_string(),
            catch_up: spec.catch_up,
            retries: spec.retries,
            timeout: humantime::format_duration(spec.timeout).to_string(),
            jitter: humantime::format_duration(spec.jitter).to_string(),
            enabled: spec.enabled,
            next_run: next_run.map(rfc3339),
            last_run: last.map(JobRunView::from),
        }
    }
}

/// One attempt of a job run, as `GET .../jobs/{name}/runs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRunView {
    /// Run id (all attempts of a run share it).
    pub run_id: u64,
    /// The job.
    pub job: String,
    /// `schedule`, `catch_up`, `manual` or `command`.
    pub trigger: String,
    /// The command that asked for it, for `command`.
    pub command_id: Option<u64>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Start (RFC 3339).
    pub started: String,
    /// End (RFC 3339).
    pub ended: String,
    /// Milliseconds from start to end.
    pub duration_ms: u64,
    /// True if it exited with status 0.
    pub succeeded: bool,
    /// How it ended, in words.
    pub outcome: String,
    /// How it ended, as a keyword: `exited`, `signaled`, `timed_out`,
    /// `failed_to_start`, `replaced`, `interrupted` or `failed`.
    pub outcome_kind: String,
    /// True if no further attempt of this run can follow (it succeeded, or
    /// it was replaced or interrupted; otherwise it depends on the job's
    /// retries).
    pub ends_run: bool,
    /// Exit status, if it exited.
    pub exit_code: Option<i32>,
    /// Signal, if a signal (not the agent) killed it.
    pub signal: Option<i32>,
    /// The tail of its output.
    pub output: String,
    /// All bytes of output it produced.
    pub output_bytes: u64,
}

impl From<JobRun> for JobRunView {
    fn from(run: JobRun) -> Self {
        let (trigger, command_id) = match run.trigger {
            Trigger::Schedule => ("schedule", None),
            Trigger::CatchUp => ("catch_up", None),
            Trigger::Manual => ("manual", None),
            Trigger::Command { id } => ("command", Some(id)),
        };
        JobRunView {
            run_id: run.run_id,
            job: run.job,
            trigger: trigger.into(),
            command_id,
            attempt: run.attempt,
            started: rfc3339(run.started),
            ended: rfc3339(run.ended),
            duration_ms: run.ended.0.saturating_sub(run.started.0),
            succeeded: run.outcome.succeeded(),
            exit_code: match run.outcome {
                RunOutcome::Exited { code } => Some(code),
                _ => None,
            },
            signal: match run.outcome {
                RunOutcome::Signaled { signal } => Some(signal),
                _ => None,
            },
            outcome_kind: match run.outcome {
                RunOutcome::Exited { .. } => "exited",
                RunOutcome::Signaled { .. } => "signaled",
                RunOutcome::TimedOut => "timed_out",
                RunOutcome::FailedToStart { .. } => "failed_to_start",
                RunOutcome::Replaced => "replaced",
                RunOutcome::Interrupted => "interrupted",
                RunOutcome::Failed { .. } => "failed",
            }
            .into(),
            ends_run: run.outcome.ends_run(),
            outcome: run.outcome.to_string(),
            output: run.output,
            output_bytes: run.output_bytes,
        }
    }
}
