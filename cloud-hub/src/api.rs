//! JSON shapes of the HTTP API (`/api/v1`), shared by the server and by
//! `outpostctl`.

use crate::store::{AlarmRecord, DesiredRecord, DeviceRecord, ReportedState};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::{Duration, UNIX_EPOCH};

/// One device as `GET /api/v1/devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Something arrived from it within the heartbeat timeout.
    pub online: bool,
    /// It holds an open QUIC session.
    pub connected: bool,
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
    /// `echo` or `exec`.
    pub kind: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Lifetime before it expires undelivered, e.g. `"10m"` (default 1h).
    pub expires_in: Option<String>,
}

/// RFC 3339 text of a timestamp, to the second.
pub fn rfc3339(t: Timestamp) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(t.0)).to_string()
}

impl DeviceView {
    /// Builds the view of `record` with its live presence.
    pub fn new(
        record: DeviceRecord,
        last_seen: Option<Timestamp>,
        online: bool,
        connected: bool,
        alarms: Vec<AlarmRecord>,
        last_seq: u64,
    ) -> Self {
        DeviceView {
            id: record.id.to_string(),
            name: record.name,
            online,
            connected,
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
