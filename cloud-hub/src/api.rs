//! JSON shapes of the HTTP API (`/api/v1`), shared by the server and by
//! `outpostctl`.

use crate::store::DeviceRecord;
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
        }
    }
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}
