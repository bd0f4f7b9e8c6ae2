//! JSON shapes of the HTTP API (`/api/v1`), shared by the server and by
//! `outpostctl`: views made for API clients, never store records. Times are
//! RFC 3339 strings (some views add the same time in milliseconds as
//! `*_ms`); states and kinds are snake_case strings, with the fields of a
//! state beside it. `GET /api/v1/openapi.json` describes them
//! ([`crate::web::http::ApiDoc`]).

use crate::store::{AlarmRecord, AuditEntry, CommandRecord, CommandState, DesiredRecord, EventRecord, ReportedState};
use outpost_shared::job::{Action, JobRun, JobSource, JobSpec, RunOutcome, Schedule, Trigger};
use outpost_shared::protocol::{AlarmKind, Outcome, RecordBody};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One device as `GET /api/v1/devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
    #[schema(value_type = Option<SampleSchema>)]
    pub telemetry: Option<Sample>,
    /// The newest alarms, newest first.
    #[serde(default)]
    pub alarms: Vec<AlarmView>,
    /// Highest record sequence number stored for this device.
    #[serde(default)]
    pub last_seq: u64,
    /// Labels (`PUT .../labels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// It has alarms raised and not cleared.
    #[serde(default)]
    pub alarmed: bool,
    /// Failed job attempts in the last 24 hours.
    #[serde(default)]
    pub failed_runs_24h: usize,
    /// Scheduled backup jobs overdue (no success for two periods).
    #[serde(default)]
    pub overdue_backups: Vec<String>,
    /// Seconds between the device time of its newest record at the hub and
    /// now: how far behind the hub's copy of its data is.
    #[serde(default)]
    pub behind_secs: Option<u64>,
    /// Set when the hub refused the device's certificate as expired since
    /// it was last seen (RFC 3339): it cannot connect until an operator
    /// re-admits it (`POST .../readmit`).
    #[serde(default)]
    pub certificate_expired: Option<String>,
    /// A re-admission in force: until then the hub lets the device in with
    /// its expired certificate, to renew it (RFC 3339).
    #[serde(default)]
    pub readmitted_until: Option<String>,
    /// When an admin revoked it (RFC 3339): refused for good.
    #[serde(default)]
    pub revoked: Option<String>,
    /// When its certificate stops being valid (RFC 3339), as the hub last
    /// learnt it (a handshake, enrollment or renewal); the agent renews it
    /// before.
    #[serde(default)]
    pub certificate_expires: Option<String>,
    /// While it is not online: since when and why.
    #[serde(default)]
    pub offline: Option<OfflineView>,
    /// Why it refused its latest desired state, until it applies one.
    #[serde(default)]
    pub desired_error: Option<String>,
    /// Jobs whose latest runs failed.
    #[serde(default)]
    pub failing_jobs: Vec<FailingJobView>,
}

/// Why a device is offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OfflineView {
    /// Its last message (RFC 3339), or the refusal or revocation.
    pub since: String,
    /// The same, milliseconds since the epoch.
    pub since_ms: u64,
    /// In words: how its last session ended (`closed by the device (agent
    /// stopping)`, `timed out: the device stopped answering`, `refused by
    /// the hub: …`), or the refusal or revocation that keeps it out.
    pub reason: String,
}

/// A job whose latest runs failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailingJobView {
    /// The job.
    pub job: String,
    /// Runs in a row that failed (its retries count once).
    pub runs: u32,
    /// When the first of them ended (RFC 3339).
    pub since: String,
}

/// Why a device that is not online is out, and since when: a revocation,
/// a certificate the hub refused since it was last seen (`expired`), how
/// its last session ended, or silence. `None` while online or before it
/// ever connected. Pure.
pub fn offline_reason(
    online: bool,
    last_seen: Option<Timestamp>,
    session: Option<&crate::store::SessionRecord>,
    admission: &crate::store::Admission,
    expired: Option<Timestamp>,
) -> Option<(Timestamp, String)> {
    if online {
        return None;
    }
    if let Some(at) = admission.revoked_at {
        return Some((at, "revoked: the hub refuses it on every path".into()));
    }
    if let Some(at) = expired {
        return Some((at, "its certificate expired: the hub refused it".into()));
    }
    let seen = last_seen?;
    let reason = match session {
        Some(s) => match &s.ended {
            Some((_, reason)) => reason.clone(),
            None => "silent: no message within the heartbeat timeout".into(),
        },
        None => "no session since the hub started".into(),
    };
    Some((seen, reason))
}

/// Query of `GET /api/v1/devices/{id}/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Earliest sample time (RFC 3339 or ms since the epoch), inclusive.
    pub since: Option<String>,
    /// Latest sample time, exclusive.
    pub until: Option<String>,
    /// Most samples in this page (default and maximum 10 000).
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

/// Query of list endpoints that only page by count.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitQuery {
    /// Most items returned.
    pub limit: Option<usize>,
}

/// One stored sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SampleView {
    /// The record's sequence number on the device.
    pub seq: u64,
    /// Sample time (device clock), RFC 3339.
    pub at: String,
    /// Sample time, ms since the epoch.
    pub at_ms: u64,
    /// The sample.
    #[schema(value_type = SampleSchema)]
    pub sample: Sample,
}

impl SampleView {
    /// The view of a stored sample.
    pub fn new(seq: u64, sample: Sample) -> Self {
        SampleView { seq, at: rfc3339(sample.at), at_ms: sample.at.0, sample }
    }
}

/// Answer of `GET /api/v1/devices/{id}/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsView {
    /// The device.
    pub device: String,
    /// Samples, oldest first.
    pub samples: Vec<SampleView>,
    /// When there may be more: pass it as `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The cursor after a sample: `<time ms>.<seq>`.
pub fn metrics_cursor(sample: &SampleView) -> String {
    format!("{}.{}", sample.at_ms, sample.seq)
}

/// Reads a cursor made by [`metrics_cursor`].
pub fn parse_metrics_cursor(text: &str) -> Option<(u64, u64)> {
    let (at, seq) = text.split_once('.')?;
    Some((at.parse().ok()?, seq.parse().ok()?))
}

/// Body of `PUT /api/v1/devices/{id}/desired`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DesiredPut {
    /// The version the change is based on (0 if none was set).
    pub version: u64,
    /// The new document.
    pub doc: serde_json::Value,
}

/// Desired and reported state side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    /// One word for its state: `revoked`, `online`, `expired` (the hub
    /// refused its expired certificate since it was last seen), `offline`,
    /// or `never` (never connected).
    pub fn state(&self) -> &'static str {
        state_word(self.revoked.is_some(), self.online, self.certificate_expired.is_some(), self.last_seen.is_some())
    }

    /// Builds the view of a fleet row with its live presence, at `now`.
    pub fn new(
        row: crate::store::FleetRow,
        last_seen: Option<Timestamp>,
        online: bool,
        transport: Option<&str>,
        now: Timestamp,
    ) -> Self {
        let crate::store::FleetRow { record, labels, digest, high_water, admission, session, cert_expires } = row;
        let expired = expired_since(&admission, last_seen);
        let offline = offline_reason(online, last_seen, session.as_ref(), &admission, expired);
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
            alarmed: digest.alarmed(),
            failed_runs_24h: digest.failed_runs_in_a_day(now),
            overdue_backups: digest.overdue_backups(now).into_iter().map(|b| b.job.clone()).collect(),
            behind_secs: digest.behind(now).map(|d| d.as_secs()),
            alarms: digest.recent_alarms.into_iter().map(AlarmView::from).collect(),
            last_seq: high_water,
            labels,
            certificate_expired: expired.map(rfc3339),
            readmitted_until: admission.readmit_until.filter(|&until| now < until).map(rfc3339),
            revoked: admission.revoked_at.map(rfc3339),
            certificate_expires: cert_expires.map(rfc3339),
            offline: offline.map(|(at, reason)| OfflineView { since: rfc3339(at), since_ms: at.0, reason }),
            desired_error: digest.desired_error,
            failing_jobs: digest
                .failing
                .into_iter()
                .map(|f| FailingJobView { job: f.job, runs: f.runs, since: rfc3339(f.since) })
                .collect(),
        }
    }
}

/// One word for a device's state: `revoked`, `online`, `expired` (the hub
/// refused its expired certificate since it was last seen), `offline`, or
/// `never` (never connected). Pure.
pub fn state_word(revoked: bool, online: bool, expired: bool, seen: bool) -> &'static str {
    match (online, expired, seen) {
        _ if revoked => "revoked",
        (true, _, _) => "online",
        (false, true, _) => "expired",
        (false, false, true) => "offline",
        (false, false, false) => "never",
    }
}

/// When the hub refused the device's expired certificate, if it did so
/// after the device was last heard from (the refusal is then the news).
pub fn expired_since(admission: &crate::store::Admission, last_seen: Option<Timestamp>) -> Option<Timestamp> {
    admission.expired_seen.filter(|&at| last_seen.is_none_or(|seen| seen < at))
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// A command, as `POST`/`GET .../commands` and `GET /commands/{id}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    /// Fleet-unique id.
    pub id: u64,
    /// The device.
    pub device: String,
    /// `echo`, `exec`, `run_job` or `backup`.
    pub kind: String,
    /// Arguments.
    pub args: Vec<String>,
    /// When it was queued (RFC 3339).
    pub created_at: String,
    /// Not started after this (RFC 3339).
    pub expires_at: String,
    /// The API token that queued it.
    pub created_by: String,
    /// Where it stands: `state` and that state's fields.
    #[serde(flatten)]
    pub state: CommandStateView,
}

/// Where a command stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CommandStateView {
    /// Waiting for the device.
    Queued,
    /// The device holds it durably.
    Delivered {
        /// When it confirmed (RFC 3339).
        delivered_at: String,
    },
    /// The device reported how it ended.
    Completed {
        /// When the result arrived (RFC 3339).
        completed_at: String,
        /// How it ended.
        outcome: OutcomeView,
        /// Exit status, for `failed`.
        exit_code: Option<i32>,
        /// Captured output (capped by the device).
        output: String,
    },
    /// Its expiry passed before delivery; it never runs.
    Expired {
        /// When the hub found it expired (RFC 3339).
        expired_at: String,
    },
}

impl CommandStateView {
    /// True once it can change no more.
    pub fn is_final(&self) -> bool {
        matches!(self, CommandStateView::Completed { .. } | CommandStateView::Expired { .. })
    }
}

/// How a command ended on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeView {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed (see `exit_code`).
    Failed,
    /// Its expiry passed before it could start.
    Expired,
    /// The agent stopped while it ran; it is not run again.
    Interrupted,
    /// The device does not run this kind of command (or may not).
    Rejected,
}

fn outcome_view(outcome: &Outcome) -> (OutcomeView, Option<i32>) {
    match outcome {
        Outcome::Succeeded => (OutcomeView::Succeeded, None),
        Outcome::Failed { code } => (OutcomeView::Failed, Some(*code)),
        Outcome::Expired => (OutcomeView::Expired, None),
        Outcome::Interrupted => (OutcomeView::Interrupted, None),
        Outcome::Rejected => (OutcomeView::Rejected, None),
    }
}

impl From<CommandRecord> for CommandView {
    fn from(c: CommandRecord) -> Self {
        let state = match c.state {
            CommandState::Queued => CommandStateView::Queued,
            CommandState::Delivered { at } => CommandStateView::Delivered { delivered_at: rfc3339(at) },
            CommandState::Completed { at, outcome, output } => {
                let (outcome, exit_code) = outcome_view(&outcome);
                CommandStateView::Completed { completed_at: rfc3339(at), outcome, exit_code, output }
            }
            CommandState::Expired { at } => CommandStateView::Expired { expired_at: rfc3339(at) },
        };
        CommandView {
            id: c.id,
            device: c.device.to_string(),
            kind: c.kind,
            args: c.args,
            created_at: rfc3339(c.created_at),
            expires_at: rfc3339(c.expires_at),
            created_by: c.created_by,
            state,
        }
    }
}

/// An alarm a device raised or cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AlarmView {
    /// The record's sequence number on the device.
    pub seq: u64,
    /// When (device clock, RFC 3339).
    pub at: String,
    /// `outbox_full`, `telemetry_thinned` or `store_reset`.
    pub alarm: String,
    /// True when raised, false when cleared.
    pub raised: bool,
    /// Explanation.
    pub message: String,
}

fn alarm_kind(kind: AlarmKind) -> &'static str {
    match kind {
        AlarmKind::OutboxFull => "outbox_full",
        AlarmKind::TelemetryThinned => "telemetry_thinned",
        AlarmKind::StoreReset => "store_reset",
    }
}

impl From<AlarmRecord> for AlarmView {
    fn from(a: AlarmRecord) -> Self {
        AlarmView {
            seq: a.seq,
            at: rfc3339(a.at),
            alarm: alarm_kind(a.alarm.kind).into(),
            raised: a.alarm.raised,
            message: a.alarm.message,
        }
    }
}

/// One entry of a device's event log (`GET .../events`, newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// The record's sequence number on the device.
    pub seq: u64,
    /// When the device made it (RFC 3339).
    pub at: String,
    /// `kind` and its fields.
    #[serde(flatten)]
    pub event: EventKindView,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKindView {
    /// A command ended.
    CommandResult {
        /// The command's id.
        command: u64,
        /// How it ended.
        outcome: OutcomeView,
        /// Exit status, for `failed`.
        exit_code: Option<i32>,
        /// Captured output.
        output: String,
    },
    /// The device reported the desired-state version in force.
    StateReport {
        /// Version in force.
        applied_version: u64,
        /// Why the latest was refused, if it was.
        error: Option<String>,
    },
    /// An alarm raised or cleared.
    Alarm {
        /// `outbox_full`, `telemetry_thinned` or `store_reset`.
        alarm: String,
        /// True when raised.
        raised: bool,
        /// Explanation.
        message: String,
    },
    /// A record kind this hub version does not show in the log.
    Other {
        /// Its kind.
        record: String,
    },
}

impl From<EventRecord> for EventView {
    fn from(e: EventRecord) -> Self {
        let event = match e.body {
            RecordBody::CommandResult(r) => {
                let (outcome, exit_code) = outcome_view(&r.outcome);
                EventKindView::CommandResult { command: r.id, outcome, exit_code, output: r.output }
            }
            RecordBody::StateReport(r) => {
                EventKindView::StateReport { applied_version: r.applied_version, error: r.error }
            }
            RecordBody::Alarm(a) => {
                EventKindView::Alarm { alarm: alarm_kind(a.kind).into(), raised: a.raised, message: a.message }
            }
            RecordBody::Telemetry(_) => EventKindView::Other { record: "telemetry".into() },
            RecordBody::JobRun(_) => EventKindView::Other { record: "job_run".into() },
            RecordBody::JobsReport(_) => EventKindView::Other { record: "jobs_report".into() },
            RecordBody::PeersReport(_) => EventKindView::Other { record: "peers_report".into() },
        };
        EventView { seq: e.seq, at: rfc3339(e.at), event }
    }
}

/// The schema of a telemetry sample (the agent's measurement as stored;
/// its `at` is the device clock in milliseconds since the epoch, given as
/// RFC 3339 beside it where a view carries a sample).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SampleSchema {
    /// Device clock, ms since the epoch.
    pub at: u64,
    /// CPU busy share, 0–100.
    pub cpu_percent: f32,
    /// Memory in use, bytes.
    pub mem_used_bytes: u64,
    /// Installed memory, bytes.
    pub mem_total_bytes: u64,
    /// Swap in use, bytes.
    pub swap_used_bytes: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: Vec<f32>,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Mounted file systems: mount, total and available bytes.
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<serde_json::Value>,
    /// Network interfaces with counters since boot.
    #[schema(value_type = Vec<Object>)]
    pub net: Vec<serde_json::Value>,
    /// Temperature sensors.
    #[schema(value_type = Vec<Object>)]
    pub temperatures: Vec<serde_json::Value>,
}

/// `GET /api/v1/devices/{id}/backups`: the device's uploaded snapshots and
/// what its chunks take at the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupsView {
    /// Device id.
    pub device: String,
    /// Catalogued snapshots, oldest first.
    pub snapshots: Vec<SnapshotView>,
    /// Chunks at the hub.
    pub stored_chunks: u64,
    /// Their bytes on disk.
    pub stored_bytes: u64,
}

/// `POST /api/v1/devices/{id}/backups/grants`: let another device (a
/// replacement) fetch this device's backups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GrantRequest {
    /// The device that may read.
    pub to: String,
    /// For how long, e.g. `24h` (default 24 hours).
    #[serde(default)]
    pub valid_for: Option<String>,
}

/// `DELETE /api/v1/devices/{id}/backups`: what was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeersView {
    /// Device id.
    pub device: String,
    /// When the device reported this table (none: never reported).
    pub reported_at: Option<String>,
    /// The peers.
    pub peers: Vec<PeerView>,
}

/// One LAN peer in a device's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerView {
    /// The peer's device id (as it announced it).
    pub id: String,
    /// Addresses it announced.
    pub addresses: Vec<String>,
    /// First heard of (RFC 3339).
    pub first_seen: String,
    /// Last heard of (RFC 3339).
    pub last_seen: String,
    /// It announced a working uplink.
    pub uplink: bool,
    /// `unverified`, `trusted`, `foreign`, `untrusted` or `gone`.
    pub state: String,
    /// Why it is untrusted.
    pub state_reason: Option<String>,
    /// Round trip of the last exchange.
    pub rtt_ms: Option<u32>,
}

impl From<outpost_shared::peers::PeerEntry> for PeerView {
    fn from(p: outpost_shared::peers::PeerEntry) -> Self {
        let state = p.state.as_str().to_owned();
        let state_reason = match p.state {
            outpost_shared::peers::PeerState::Untrusted { reason } => Some(reason),
            _ => None,
        };
        PeerView {
            id: p.id,
            addresses: p.addresses,
            first_seen: rfc3339(p.first_seen),
            last_seen: rfc3339(p.last_seen),
            uplink: p.uplink,
            state,
            state_reason,
            rtt_ms: p.rtt_ms,
        }
    }
}

/// `GET /api/v1/devices/{id}/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobsView {
    /// Device id.
    pub device: String,
    /// When the device reported this list (none: never reported).
    pub reported_at: Option<String>,
    /// The jobs in force on the device.
    pub jobs: Vec<JobView>,
}

/// One job in force on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
            outcome_kind: run.outcome.kind().into(),
            ends_run: run.outcome.ends_run(),
            outcome: run.outcome.to_string(),
            output: run.output,
            output_bytes: run.output_bytes,
        }
    }
}

/// One audit log entry, as `GET /api/v1/audit` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    /// Increasing id.
    pub id: u64,
    /// RFC 3339.
    pub at: String,
    /// Token name (`-`: none or not valid).
    pub who: String,
    /// `METHOD /path/pattern`.
    pub action: String,
    /// Device id, `selector ...`, `token ...`.
    pub target: String,
    /// Devices a selector matched.
    pub matched: Option<u64>,
    /// The caller's address.
    pub from: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// The HTTP status.
    pub status: u16,
    /// More.
    pub detail: String,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        AuditView {
            id: e.id,
            at: rfc3339(e.at),
            outcome: e.outcome().into(),
            who: e.who,
            action: e.action,
            target: e.target,
            matched: e.matched,
            from: e.from,
            status: e.status,
            detail: e.detail,
        }
    }
}

/// `POST /api/v1/devices/{id}/readmit`.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct ReadmitRequest {
    /// How long the device may come back with its expired certificate to
    /// renew it (`"7d"` when absent; 1 minute to 90 days).
    #[serde(default)]
    pub within: Option<String>,
}

/// A command for every device a selector matches.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct BulkCommandRequest {
    /// Label selector; empty or naming a label no device has is refused.
    pub selector: String,
    /// The command, as for one device.
    #[serde(flatten)]
    pub command: CommandRequest,
    /// Only count the devices it would reach.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a bulk action reached.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct BulkView {
    /// The selector.
    pub selector: String,
    /// Devices it matched.
    pub matched: usize,
    /// Their ids.
    pub devices: Vec<String>,
    /// The commands queued (none for a dry run or a desired-state patch).
    #[serde(default)]
    pub commands: Vec<CommandView>,
    /// The desired-state versions made, per device (a patch).
    #[serde(default)]
    pub versions: Vec<(String, u64)>,
}

/// A token as `GET /api/v1/tokens` lists it (never its secret).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct TokenView {
    /// `tok-` and 12 hex digits.
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; none for the initial admin token.
    pub expires_at: Option<String>,
    /// Last use, RFC 3339 (recorded at most once a minute).
    pub last_used_at: Option<String>,
    /// Address of the last use.
    pub last_used_from: Option<String>,
    /// Past its expiry.
    pub expired: bool,
    /// `api` or `console_session`.
    pub kind: String,
    /// The secret: only in the answer that made the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A token to make.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct TokenRequest {
    /// Unique name, shown in the audit log.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// Lifetime (`30d`, `12h`), at most 366 days.
    pub expires_in: String,
}

/// A one-time console sign-in link to make.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct LinkRequest {
    /// Role of the console session it opens.
    pub role: String,
    /// How long the link stays valid (at most 1 day); default 15m.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A one-time sign-in link.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct LinkView {
    /// Path and query to open on the hub's HTTP address.
    pub path: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// A page of the audit log.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    /// `before` for the next page.
    pub next: Option<u64>,
}

impl TokenView {
    /// The view of token `t` whose secret hashes to `hash`.
    pub fn new(hash: &[u8; 32], t: &crate::store::ApiToken, now: Timestamp) -> Self {
        TokenView {
            id: crate::store::ApiToken::id_of(hash),
            name: t.name.clone(),
            role: t.role.name().into(),
            created_at: t.created_at.rfc3339(),
            expires_at: t.expires_at.map(Timestamp::rfc3339),
            last_used_at: t.last_used.as_ref().map(|(at, _)| at.rfc3339()),
            last_used_from: t.last_used.as_ref().map(|(_, from)| from.clone()),
            expired: t.expired(now),
            kind: t.kind.name().into(),
            secret: None,
        }
    }
}

/// Percent-encodes a query component.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The summary of a catalog entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SnapshotView {
    /// Name.
    pub name: String,
    /// Backup set.
    pub set: String,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    pub ended: String,
    /// Files, directories and links.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// Problems its report lists.
    pub problems: u64,
    /// When its upload completed, RFC 3339.
    pub uploaded_at: String,
}

impl From<&crate::store::CatalogEntry> for SnapshotView {
    fn from(e: &crate::store::CatalogEntry) -> Self {
        let outpost_shared::protocol::SnapshotSummary { name, set, started, ended, entries, bytes, chunks, problems } =
            e.summary.clone();
        SnapshotView {
            name,
            set,
            started: started.rfc3339(),
            ended: ended.rfc3339(),
            entries,
            bytes,
            chunks,
            problems,
            uploaded_at: e.uploaded_at.rfc3339(),
        }
    }
}

/// An alert as `GET /api/v1/alerts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertView {
    /// 16 hex digits, as in the webhook payload.
    pub fingerprint: String,
    /// The rule (`alertname`).
    pub rule: String,
    /// The device's id.
    pub device: String,
    /// The device's name.
    pub device_name: String,
    /// The rule's severity.
    pub severity: String,
    /// `pending`, `firing` or `resolved`.
    pub state: String,
    /// The summary.
    pub summary: String,
    /// Why it holds, in words.
    pub description: String,
    /// When its condition was first seen (RFC 3339).
    pub since: String,
    /// When it started firing.
    pub fired_at: Option<String>,
    /// When it resolved.
    pub resolved_at: Option<String>,
    /// Held back: its device is offline (its offline alert is told instead).
    pub inhibited: bool,
    /// Held back by a silence.
    pub silenced: bool,
}

/// A silence as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SilenceView {
    /// `sil-...`.
    pub id: String,
    /// Labels and the values they must have.
    pub matchers: std::collections::BTreeMap<String, String>,
    /// When it ends (RFC 3339).
    pub ends_at: String,
    /// Why.
    pub comment: String,
    /// The token that made it.
    pub created_by: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// In force now.
    pub active: bool,
}

/// Body of `POST /api/v1/silences`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    /// Labels and values an alert must have to be silenced (`alertname`,
    /// `device`, `device_name`, `severity`).
    pub matchers: std::collections::BTreeMap<String, String>,
    /// How long: `2h`, `3d` (1 minute to 90 days).
    pub duration: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Admission, SessionRecord};

    #[test]
    fn an_offline_device_says_since_when_and_why() {
        let none = Admission::default();
        let seen = Some(Timestamp(1_000));
        let session = |ended: Option<&str>| SessionRecord {
            hub: "hub-1".into(),
            epoch: 1,
            transport: "quic".into(),
            seen: Timestamp(1_000),
            ended: ended.map(|r| (Timestamp(1_200), r.to_owned())),
        };
        let closed = session(Some("closed by the device (agent stopping)"));
        assert_eq!(offline_reason(true, seen, Some(&closed), &none, None), None, "online");
        assert_eq!(offline_reason(false, None, None, &none, None), None, "never connected");
        assert_eq!(
            offline_reason(false, seen, Some(&closed), &none, None),
            Some((Timestamp(1_000), "closed by the device (agent stopping)".into())),
            "since its last message, for the reason its session ended"
        );
        let (_, silent) = offline_reason(false, seen, Some(&session(None)), &none, None).unwrap();
        assert!(silent.starts_with("silent"), "{silent}");
        let (_, restarted) = offline_reason(false, seen, None, &none, None).unwrap();
        assert!(restarted.contains("hub started"), "{restarted}");
        let (at, expired) = offline_reason(false, seen, Some(&closed), &none, Some(Timestamp(5_000))).unwrap();
        assert!(at == Timestamp(5_000) && expired.contains("certificate expired"), "{expired}");
        let revoked = Admission { revoked_at: Some(Timestamp(7_000)), ..none };
        let (at, why) = offline_reason(false, seen, Some(&closed), &revoked, Some(Timestamp(5_000))).unwrap();
        assert!(at == Timestamp(7_000) && why.starts_with("revoked"), "the revocation is the news: {why}");
    }
}
