//! What the web layer (the API and the console) reads about a device and
//! the fleet's records: through here, never from the store directly, so a
//! read has one place to be bounded, indexed or cached, and both front
//! ends get the same answer.

use super::ServiceError;
use crate::service::fleet::Fleet;
use crate::store::{
    AuditEntry, AuditQuery, CommandRecord, DesiredRecord, EventRecord, PeersRecord, ReportedState, TelemetryRange,
};
use outpost_shared::DeviceId;
use outpost_shared::job::{JobRun, JobSource, JobSpec};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;

/// A device's telemetry in `range`, oldest first, with sequence numbers.
pub async fn telemetry(
    fleet: &Fleet,
    id: &DeviceId,
    range: &TelemetryRange,
) -> Result<Vec<(u64, Sample)>, ServiceError> {
    Ok(fleet.store().telemetry(id, range).await?)
}

/// A device's newest `limit` events, newest first.
pub async fn events(fleet: &Fleet, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, ServiceError> {
    Ok(fleet.store().events(id, limit).await?)
}

/// A device's reported jobs, each with its newest `runs` runs (newest
/// first).
#[derive(Debug, Default)]
pub struct DeviceJobs {
    /// When the device last reported its jobs.
    pub reported_at: Option<Timestamp>,
    /// Each job, where it comes from, and its newest runs.
    pub jobs: Vec<(JobSpec, JobSource, Vec<JobRun>)>,
}

/// A device's jobs as it last reported them, with their newest `runs` runs.
pub async fn jobs(fleet: &Fleet, id: &DeviceId, runs: usize) -> Result<DeviceJobs, ServiceError> {
    let store = fleet.store();
    let Some(record) = store.jobs(id).await? else { return Ok(DeviceJobs::default()) };
    let mut jobs = Vec::with_capacity(record.jobs.len());
    for (spec, source) in record.jobs {
        let last = store.job_runs(id, &spec.name, runs).await?;
        jobs.push((spec, source, last));
    }
    Ok(DeviceJobs { reported_at: Some(record.at), jobs })
}

/// A job's newest `limit` runs on a device, newest first.
pub async fn job_runs(fleet: &Fleet, id: &DeviceId, job: &str, limit: usize) -> Result<Vec<JobRun>, ServiceError> {
    Ok(fleet.store().job_runs(id, job, limit).await?)
}

/// A device's LAN peers as it last reported them.
pub async fn peers(fleet: &Fleet, id: &DeviceId) -> Result<Option<PeersRecord>, ServiceError> {
    Ok(fleet.store().peers(id).await?)
}

/// A device's desired state and what it reported applying.
pub async fn desired(
    fleet: &Fleet,
    id: &DeviceId,
) -> Result<(Option<DesiredRecord>, Option<ReportedState>), ServiceError> {
    let store = fleet.store();
    Ok((store.desired(id).await?, store.reported(id).await?))
}

/// A page of a device's commands (ids after `after`, oldest first, at
/// most `limit`) and how many it has in all.
pub async fn commands_page(
    fleet: &Fleet,
    id: &DeviceId,
    after: u64,
    limit: usize,
) -> Result<(Vec<CommandRecord>, usize), ServiceError> {
    Ok(fleet.store().device_commands(id, after, limit).await?)
}

/// One command.
pub async fn command(fleet: &Fleet, id: u64) -> Result<Option<CommandRecord>, ServiceError> {
    Ok(fleet.store().command(id).await?)
}

/// Audit entries matching `query`, newest first.
pub async fn audit(fleet: &Fleet, query: &AuditQuery) -> Result<Vec<AuditEntry>, ServiceError> {
    Ok(fleet.store().audit(query).await?)
}

/// A device's name (empty if it has none or is unknown).
pub async fn name(fleet: &Fleet, id: &DeviceId) -> Result<String, ServiceError> {
    Ok(fleet.store().device(id).await?.map(|d| d.name).unwrap_or_default())
}

/// The telemetry a device sent late (after a time in its past), as its
/// digest keeps it: the console's chart marks these spans.
pub async fn late(fleet: &Fleet, id: &DeviceId) -> Result<Vec<(Timestamp, Timestamp)>, ServiceError> {
    let row = fleet.store().fleet_rows(Some(std::slice::from_ref(id))).await?.pop();
    Ok(row.map(|r| r.digest.late).unwrap_or_default())
}

/// The fleet's API tokens and console sessions (not sign-in links).
pub async fn tokens(fleet: &Fleet) -> Result<Vec<([u8; 32], crate::store::ApiToken)>, ServiceError> {
    let mut tokens = fleet.store().api_tokens().await?;
    tokens.retain(|(_, t)| t.kind != crate::store::TokenKind::SignInLink);
    Ok(tokens)
}

/// A device's backup snapshots at the hub, oldest first.
pub async fn catalog(fleet: &Fleet, id: &DeviceId) -> Result<Vec<crate::store::CatalogEntry>, ServiceError> {
    Ok(fleet.store().catalog(id).await?)
}

/// The store's health as last seen (no I/O).
pub fn health(fleet: &Fleet) -> crate::store::Health {
    fleet.store().health()
}

/// The store's health, checked now with a durable write.
pub async fn probe(fleet: &Fleet) -> crate::store::Health {
    fleet.store().probe().await
}
