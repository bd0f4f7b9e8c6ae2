//! The hub's fleet state in sled, behind a narrow typed interface.
//!
//! Trees (values are postcard):
//! - `devices`: device id → [`DeviceRecord`]
//! - `api_tokens`: SHA-256 of a bearer token → [`ApiToken`]
//! - `enroll_uses`: enrollment token id → redemptions so far
//! - `seq`: device id → highest record sequence number stored (the ingest
//!   high-water mark; a record at or below it is a duplicate)
//! - `telemetry`: device id, 0, sample time (u64 BE), seq (u64 BE) → sample
//! - `events`: device id, 0, seq (u64 BE) → [`EventRecord`]: command
//!   results, state reports and alarms, as the device's log (telemetry and
//!   job records have their own trees)
//! - `reported`: device id → [`ReportedState`]
//! - `desired`: device id → [`DesiredRecord`]
//! - `commands`: command id (u64 BE) → [`CommandRecord`]; `device_commands`:
//!   device id, 0, command id → () as the per-device index
//! - `jobs`: device id → [`JobsRecord`], the device's latest job list
//! - `device_keys`: device id → the public key of its certificate, taken
//!   from the TLS handshake of its sessions, to verify its signed batches
//! - `job_runs`: device id, 0, job name, 0, run id (u64 BE), attempt (u32
//!   BE) → [`JobRun`]; run ids grow on a device, so a job's runs are in
//!   order, and the newest [`MAX_RUNS_PER_JOB`] are kept
//! - `backups`: device id, 0, snapshot name → [`CatalogEntry`], the backup
//!   catalog (the chunks and manifests themselves are files, see
//!   [`crate::backups`])
//! - `restore_grants`: reader device id, 0, owner device id → [`Grant`]:
//!   the reader may fetch the owner's backups until the grant expires
//!
//! Writes that must be durable before they are acknowledged run on the
//! group-commit writer ([`Store::writer`]). Everything the fleet keeps goes
//! through this type so that a distributed engine can take sled's place
//! later without touching callers.

use outpost_shared::commit::GroupCommit;
use outpost_shared::job::{JobRun, JobSource, JobSpec};
use outpost_shared::protocol::{Alarm, Outcome, Record, RecordBody, StateReport};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use outpost_shared::{DeviceId, Fingerprint};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::path::Path;

/// What the hub knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The id (certificate common name).
    pub id: DeviceId,
    /// Name the device gave at enrollment or in its last hello.
    pub name: String,
    /// When it enrolled.
    pub enrolled_at: Timestamp,
    /// Fingerprint of the certificate issued at enrollment.
    pub cert_fingerprint: Fingerprint,
    /// Agent version from the last hello.
    pub agent_version: Option<String>,
    /// Last time any message arrived from it.
    pub last_seen: Option<Timestamp>,
    /// Address of its last connection.
    pub last_addr: Option<String>,
    /// The latest telemetry sample.
    pub last_sample: Option<Sample>,
}

/// A non-telemetry record of a device, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The record's sequence number.
    pub seq: u64,
    /// When the device made it.
    pub at: Timestamp,
    /// The record.
    pub body: RecordBody,
}

/// A device's job list as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsRecord {
    /// When the device made the report.
    pub at: Timestamp,
    /// Each job and where it came from.
    pub jobs: Vec<(JobSpec, JobSource)>,
}

/// A device's LAN peer table as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersRecord {
    /// When the device made the report.
    pub at: Timestamp,
    /// The peers.
    pub peers: Vec<outpost_shared::peers::PeerEntry>,
}

/// A snapshot in the hub's backup catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// What the device said about it.
    pub summary: outpost_shared::protocol::SnapshotSummary,
    /// When its upload completed.
    pub uploaded_at: Timestamp,
}

/// Permission for one device to read another's backups (to restore a dead
/// device's data onto its replacement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// When an operator granted it.
    pub granted_at: Timestamp,
    /// When it ends.
    pub expires_at: Timestamp,
    /// The name of the API token that granted it.
    pub by: String,
}

/// Attempts kept per job and device.
pub const MAX_RUNS_PER_JOB: usize = 1000;

/// An alarm a device raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmRecord {
    /// The record's sequence number.
    pub seq: u64,
    /// When the device raised it.
    pub at: Timestamp,
    /// The alarm.
    pub alarm: Alarm,
}

/// The desired-state version a device reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedState {
    /// Version in force on the device.
    pub applied_version: u64,
    /// Why the latest version was refused, if it was.
    pub error: Option<String>,
    /// When the device reported it.
    pub at: Timestamp,
}

/// A device's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Version, from 1.
    pub version: u64,
    /// The document (JSON).
    pub doc: String,
    /// When it was set.
    pub updated_at: Timestamp,
}

/// Where a command stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandState {
    /// Waiting for the device.
    Queued,
    /// The device holds it durably.
    Delivered {
        /// When it confirmed.
        at: Timestamp,
    },
    /// The device reported its outcome.
    Completed {
        /// When the result arrived.
        at: Timestamp,
        /// How it ended.
        outcome: Outcome,
        /// Captured output.
        output: String,
    },
    /// Its expiry passed before delivery; it will never run.
    Expired {
        /// When it was found expired.
        at: Timestamp,
    },
}

/// A command for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Fleet-unique id.
    pub id: u64,
    /// The device.
    pub device: DeviceId,
    /// Kind (`echo`, `exec`).
    pub kind: String,
    /// Arguments.
    pub args: Vec<String>,
    /// When it was queued.
    pub created_at: Timestamp,
    /// Not to be started after this.
    pub expires_at: Timestamp,
    /// Who queued it (API token name).
    pub created_by: String,
    /// Where it stands.
    pub state: CommandState,
}

/// What one ingested batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// The device's high-water mark after the batch: the ack to send.
    pub upto: u64,
    /// Records stored.
    pub stored: usize,
    /// Records already held (re-sent after a lost ack).
    pub duplicates: usize,
    /// Sequence ranges skipped (telemetry the device thinned).
    pub gaps: Vec<(u64, u64)>,
}

/// Roles of API callers, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads fleet state.
    Viewer,
    /// Also sends commands and changes desired state.
    Operator,
    /// Also manages tokens.
    Admin,
}

/// A stored API token (its hash is the key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    /// What the caller may do.
    pub role: Role,
    /// Label for the audit log.
    pub name: String,
    /// When it was made.
    pub created_at: Timestamp,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, or the data dir is locked by another
    /// hub process).
    #[error("hub store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("hub store: corrupt value in tree {tree}: {source}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The cause.
        source: postcard::Error,
    },
    /// The desired state changed since the caller read it.
    #[error("desired state is at version {current}, not {expected}")]
    VersionConflict {
        /// Version the caller based its change on.
        expected: u64,
        /// Version in the store.
        current: u64,
    },
    /// The group-commit writer failed.
    #[error("hub store: {0}")]
    Commit(#[from] outpost_shared::commit::CommitError),
    /// The enrollment token has no redemptions left.
    #[error("enrollment token has been used {used} of {allowed} times")]
    UsedUp {
        /// Redemptions so far.
        used: u32,
        /// Redemptions allowed.
        allowed: u32,
    },
}

/// The hub's store. Cheap to clone; clones share one database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    devices: sled::Tree,
    api_tokens: sled::Tree,
    enroll_uses: sled::Tree,
    seq: sled::Tree,
    telemetry: sled::Tree,
    events: sled::Tree,
    reported: sled::Tree,
    desired: sled::Tree,
    commands: sled::Tree,
    device_commands: sled::Tree,
    jobs: sled::Tree,
    job_runs: sled::Tree,
    device_keys: sled::Tree,
    peers: sled::Tree,
    backups: sled::Tree,
    restore_grants: sled::Tree,
    writer: Option<GroupCommit<Store>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn device_prefix(id: &DeviceId) -> Vec<u8> {
    let mut key = id.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

fn telemetry_key(id: &DeviceId, at: Timestamp, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(id);
    key.extend_from_slice(&at.0.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_key(id: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn job_prefix(id: &DeviceId, job: &str) -> Vec<u8> {
    let mut key = device_prefix(id);
    key.extend_from_slice(job.as_bytes());
    key.push(0);
    key
}

fn run_key(id: &DeviceId, job: &str, run_id: u64, attempt: u32) -> Vec<u8> {
    let mut key = job_prefix(id, job);
    key.extend_from_slice(&run_id.to_be_bytes());
    key.extend_from_slice(&attempt.to_be_bytes());
    key
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn tx_result<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data; serialization into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Corrupt { tree, source })
}

impl Store {
    /// Opens (or creates) the store under `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let db =
            sled::Config::new().path(data_dir.join("db")).cache_capacity(64 << 20).flush_every_ms(Some(500)).open()?;
        let mut store = Store {
            devices: db.open_tree("devices")?,
            api_tokens: db.open_tree("api_tokens")?,
            enroll_uses: db.open_tree("enroll_uses")?,
            seq: db.open_tree("seq")?,
            telemetry: db.open_tree("telemetry")?,
            events: db.open_tree("events")?,
            reported: db.open_tree("reported")?,
            desired: db.open_tree("desired")?,
            commands: db.open_tree("commands")?,
            device_commands: db.open_tree("device_commands")?,
            jobs: db.open_tree("jobs")?,
            job_runs: db.open_tree("job_runs")?,
            peers: db.open_tree("peers")?,
            device_keys: db.open_tree("device_keys")?,
            backups: db.open_tree("backups")?,
            restore_grants: db.open_tree("restore_grants")?,
            db,
            writer: None,
        };
        let writer = GroupCommit::start("hub-store", store.clone(), |s: &Store| {
            s.db.flush().map(drop).map_err(|e| e.to_string())
        })
        .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        store.writer = Some(writer);
        Ok(store)
    }

    /// The group-commit writer: jobs run in order on one thread, and their
    /// results are handed out after one fsync per group.
    pub fn writer(&self) -> &GroupCommit<Store> {
        // Set in `open` before the store is handed out; clones made for the
        // writer itself never call this.
        self.writer.as_ref().unwrap_or_else(|| unreachable!("store writer not started"))
    }

    /// The ingest high-water mark of a device.
    pub fn high_water(&self, id: &DeviceId) -> Result<u64, StoreError> {
        Ok(self.seq.get(id.as_str())?.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
    }

    /// Stores a batch of a device's records, each exactly once: records at
    /// or below the high-water mark are duplicates and skipped. Run on the
    /// writer, so the caller acknowledges only durable records.
    pub fn ingest(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        let trees = (
            &self.seq,
            &self.telemetry,
            &self.events,
            &self.reported,
            &self.commands,
            &self.devices,
            &self.jobs,
            &self.job_runs,
            &self.peers,
        );
        let now = Timestamp::now();
        let result = trees.transaction(
            |(seq, telemetry, events, reported, commands, devices, jobs, job_runs, peers): &(
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
            )| {
                let mut out = Ingested::default();
                let mut hwm = seq
                    .get(id.as_str())?
                    .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0);
                let mut newest: Option<&Sample> = None;
                for record in records {
                    if record.seq <= hwm {
                        out.duplicates += 1;
                        continue;
                    }
                    if record.seq > hwm + 1 {
                        out.gaps.push((hwm + 1, record.seq - 1));
                    }
                    if !matches!(
                        record.body,
                        RecordBody::Telemetry(_)
                            | RecordBody::JobRun(_)
                            | RecordBody::JobsReport(_)
                            | RecordBody::PeersReport(_)
                    ) {
                        let event = EventRecord { seq: record.seq, at: record.at, body: record.body.clone() };
                        events.insert(seq_key(id, record.seq), encode(&event))?;
                    }
                    match &record.body {
                        RecordBody::Telemetry(sample) => {
                            telemetry.insert(telemetry_key(id, sample.at, record.seq), encode(sample))?;
                            if newest.is_none_or(|n| n.at <= sample.at) {
                                newest = Some(sample);
                            }
                        }
                        RecordBody::JobRun(run) => {
                            job_runs.insert(run_key(id, &run.job, run.run_id, run.attempt), encode(run))?;
                            if !run.outcome.succeeded() {
                                tracing::info!(device = %id, job = %run.job, run = run.run_id, attempt = run.attempt, outcome = %run.outcome, "Job run failed on a device.");
                            }
                        }
                        RecordBody::JobsReport(report) => {
                            let rec = JobsRecord { at: record.at, jobs: report.jobs.clone() };
                            jobs.insert(id.as_str().as_bytes(), encode(&rec))?;
                        }
                        RecordBody::PeersReport(report) => {
                            let rec = PeersRecord { at: record.at, peers: report.peers.clone() };
                            peers.insert(id.as_str().as_bytes(), encode(&rec))?;
                        }
                        RecordBody::Alarm(alarm) => {
                            tracing::warn!(device = %id, kind = ?alarm.kind, raised = alarm.raised, message = %alarm.message, "Device alarm.");
                        }
                        RecordBody::StateReport(StateReport { applied_version, error }) => {
                            let rec = ReportedState { applied_version: *applied_version, error: error.clone(), at: record.at };
                            reported.insert(id.as_str().as_bytes(), encode(&rec))?;
                        }
                        RecordBody::CommandResult(result) => {
                            let key = result.id.to_be_bytes();
                            if let Some(bytes) = commands.get(key)? {
                                let mut cmd: CommandRecord = decode("commands", &bytes).map_err(abort)?;
                                if &cmd.device == id {
                                    cmd.state = CommandState::Completed {
                                        at: now,
                                        outcome: result.outcome.clone(),
                                        output: result.output.clone(),
                                    };
                                    commands.insert(&key[..], encode(&cmd))?;
                                } else {
                                    tracing::warn!(device = %id, command = result.id, "Result for another device's command ignored.");
                                }
                            } else {
                                tracing::debug!(device = %id, command = result.id, "Result for a command this hub does not know (kept in the event log).");
                            }
                        }
                    }
                    hwm = record.seq;
                    out.stored += 1;
                }
                seq.insert(id.as_str().as_bytes(), &hwm.to_be_bytes()[..])?;
                if let Some(bytes) = devices.get(id.as_str())? {
                    let mut device: DeviceRecord = decode("devices", &bytes).map_err(abort)?;
                    device.last_seen = Some(now);
                    if let Some(sample) = newest
                        && device.last_sample.as_ref().is_none_or(|s| s.at <= sample.at)
                    {
                        device.last_sample = Some(sample.clone());
                    }
                    devices.insert(id.as_str().as_bytes(), encode(&device))?;
                }
                out.upto = hwm;
                Ok(out)
            },
        );
        let ingested = tx_result(result)?;
        let mut touched: Vec<&str> = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::JobRun(run) => Some(run.job.as_str()),
                _ => None,
            })
            .collect();
        touched.sort_unstable();
        touched.dedup();
        for job in touched {
            self.prune_job_runs(id, job)?;
        }
        Ok(ingested)
    }

    /// Telemetry of a device with sample times in `[since, until)`, oldest
    /// first, at most `limit`: `(time, seq, sample)`.
    pub fn telemetry(
        &self,
        id: &DeviceId,
        since: Timestamp,
        until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(u64, Sample)>, StoreError> {
        let from = telemetry_key(id, since, 0);
        let to = telemetry_key(id, until, 0);
        let mut out = Vec::new();
        for entry in self.telemetry.range(from..to).take(limit) {
            let (key, value) = entry?;
            let seq = key.get(key.len() - 8..).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            out.push((seq, decode("telemetry", &value)?));
        }
        Ok(out)
    }

    /// Deletes telemetry sampled before `before`; returns how many samples.
    pub fn prune_telemetry(&self, before: Timestamp) -> Result<usize, StoreError> {
        let mut removed = 0;
        for device in self.devices.iter().keys() {
            let id: DeviceId = match std::str::from_utf8(&device?).ok().and_then(|s| s.parse().ok()) {
                Some(id) => id,
                None => continue,
            };
            let mut batch = sled::Batch::default();
            for key in self.telemetry.range(telemetry_key(&id, Timestamp(0), 0)..telemetry_key(&id, before, 0)).keys() {
                batch.remove(key?);
                removed += 1;
            }
            self.telemetry.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// The newest events of a device, newest first.
    pub fn events(&self, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.events.scan_prefix(device_prefix(id)).values().rev().take(limit).map(|v| decode("events", &v?)).collect()
    }

    /// The newest alarms of a device (among its last 1000 events), newest
    /// first.
    pub fn alarms(&self, id: &DeviceId, limit: usize) -> Result<Vec<AlarmRecord>, StoreError> {
        Ok(self
            .events(id, 1000)?
            .into_iter()
            .filter_map(|e| match e.body {
                RecordBody::Alarm(alarm) => Some(AlarmRecord { seq: e.seq, at: e.at, alarm }),
                _ => None,
            })
            .take(limit)
            .collect())
    }

    /// Records the public key of a device's certificate (unchanged keys are
    /// not rewritten).
    pub fn put_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        if self.device_keys.get(id.as_str())?.as_deref() != Some(key) {
            self.device_keys.insert(id.as_str(), key)?;
        }
        Ok(())
    }

    /// The public key of a device's certificate (stored at enrollment, and
    /// by each QUIC session from its certificate).
    pub fn device_key(&self, id: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.device_keys.get(id.as_str())?.map(|v| v.to_vec()))
    }

    /// Adds a snapshot to a device's backup catalog, durably (run on the
    /// writer).
    pub fn put_catalog_entry(&self, id: &DeviceId, entry: &CatalogEntry) -> Result<(), StoreError> {
        let mut key = device_prefix(id);
        key.extend_from_slice(entry.summary.name.as_bytes());
        self.backups.insert(key, encode(entry))?;
        Ok(())
    }

    /// A device's backup catalog, oldest first (names start with the start
    /// time in milliseconds, all of the same width for centuries).
    pub fn catalog(&self, id: &DeviceId) -> Result<Vec<CatalogEntry>, StoreError> {
        self.backups.scan_prefix(device_prefix(id)).values().map(|v| decode("backups", &v?)).collect()
    }

    /// One snapshot of a device's catalog.
    pub fn catalog_entry(&self, id: &DeviceId, name: &str) -> Result<Option<CatalogEntry>, StoreError> {
        let mut key = device_prefix(id);
        key.extend_from_slice(name.as_bytes());
        self.backups.get(key)?.map(|v| decode("backups", &v)).transpose()
    }

    /// Removes a device's whole backup catalog (run on the writer); returns
    /// how many snapshots it listed.
    pub fn delete_catalog(&self, id: &DeviceId) -> Result<usize, StoreError> {
        let keys: Vec<sled::IVec> = self.backups.scan_prefix(device_prefix(id)).keys().collect::<Result<_, _>>()?;
        for key in &keys {
            self.backups.remove(key)?;
        }
        Ok(keys.len())
    }

    /// Removes some snapshots from a device's catalog (run on the writer).
    pub fn delete_catalog_entries(&self, id: &DeviceId, names: &[String]) -> Result<(), StoreError> {
        for name in names {
            let mut key = device_prefix(id);
            key.extend_from_slice(name.as_bytes());
            self.backups.remove(key)?;
        }
        Ok(())
    }

    /// Lets `reader` fetch `owner`'s backups (run on the writer).
    pub fn put_grant(&self, reader: &DeviceId, owner: &DeviceId, grant: &Grant) -> Result<(), StoreError> {
        let mut key = device_prefix(reader);
        key.extend_from_slice(owner.as_str().as_bytes());
        self.restore_grants.insert(key, encode(grant))?;
        Ok(())
    }

    /// The grant letting `reader` fetch `owner`'s backups, if any.
    pub fn grant(&self, reader: &DeviceId, owner: &DeviceId) -> Result<Option<Grant>, StoreError> {
        let mut key = device_prefix(reader);
        key.extend_from_slice(owner.as_str().as_bytes());
        self.restore_grants.get(key)?.map(|v| decode("restore_grants", &v)).transpose()
    }

    /// The device's latest peer table.
    pub fn peers(&self, id: &DeviceId) -> Result<Option<PeersRecord>, StoreError> {
        self.peers.get(id.as_str())?.map(|v| decode("peers", &v)).transpose()
    }

    /// The device's latest job list.
    pub fn jobs(&self, id: &DeviceId) -> Result<Option<JobsRecord>, StoreError> {
        self.jobs.get(id.as_str())?.map(|v| decode("jobs", &v)).transpose()
    }

    /// The newest attempts of a device's job, newest first.
    pub fn job_runs(&self, id: &DeviceId, job: &str, limit: usize) -> Result<Vec<JobRun>, StoreError> {
        self.job_runs
            .scan_prefix(job_prefix(id, job))
            .values()
            .rev()
            .take(limit)
            .map(|v| decode("job_runs", &v?))
            .collect()
    }

    /// Forgets all but the newest [`MAX_RUNS_PER_JOB`] attempts of a job.
    fn prune_job_runs(&self, id: &DeviceId, job: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in self.job_runs.scan_prefix(job_prefix(id, job)).keys().rev().skip(MAX_RUNS_PER_JOB) {
            batch.remove(key?);
            removed += 1;
        }
        if removed > 0 {
            self.job_runs.apply_batch(batch)?;
        }
        Ok(())
    }

    /// What the device last reported about its desired state.
    pub fn reported(&self, id: &DeviceId) -> Result<Option<ReportedState>, StoreError> {
        self.reported.get(id.as_str())?.map(|v| decode("reported", &v)).transpose()
    }

    /// The device's desired state.
    pub fn desired(&self, id: &DeviceId) -> Result<Option<DesiredRecord>, StoreError> {
        self.desired.get(id.as_str())?.map(|v| decode("desired", &v)).transpose()
    }

    /// Replaces the desired state if it is still at `expected` (0 for none);
    /// the new version is `expected + 1`.
    pub fn put_desired(&self, id: &DeviceId, expected: u64, doc: String) -> Result<DesiredRecord, StoreError> {
        let result = self.desired.transaction(|tree| {
            let current = match tree.get(id.as_str())? {
                Some(v) => decode::<DesiredRecord>("desired", &v).map_err(abort)?.version,
                None => 0,
            };
            if current != expected {
                return Err(ConflictableTransactionError::Abort(StoreError::VersionConflict { expected, current }));
            }
            let record = DesiredRecord { version: expected + 1, doc: doc.clone(), updated_at: Timestamp::now() };
            tree.insert(id.as_str().as_bytes(), encode(&record))?;
            Ok(record)
        });
        tx_result(result)
    }

    /// Queues a command.
    pub fn create_command(
        &self,
        device: &DeviceId,
        kind: String,
        args: Vec<String>,
        expires_at: Timestamp,
        created_by: String,
    ) -> Result<CommandRecord, StoreError> {
        let id = self.db.generate_id()? + 1;
        let record = CommandRecord {
            id,
            device: device.clone(),
            kind,
            args,
            created_at: Timestamp::now(),
            expires_at,
            created_by,
            state: CommandState::Queued,
        };
        let trees = (&self.commands, &self.device_commands);
        let result = trees.transaction(|(commands, index)| {
            commands.insert(&id.to_be_bytes()[..], encode(&record))?;
            index.insert(seq_key(device, id), &[][..])?;
            Ok::<(), ConflictableTransactionError<StoreError>>(())
        });
        tx_result(result)?;
        Ok(record)
    }

    /// One command.
    pub fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.commands.get(id.to_be_bytes())?.map(|v| decode("commands", &v)).transpose()
    }

    /// A device's commands, oldest first.
    pub fn device_commands(&self, device: &DeviceId) -> Result<Vec<CommandRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.device_commands.scan_prefix(device_prefix(device)).keys() {
            let key = key?;
            let id = key.get(key.len() - 8..).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            if let Some(cmd) = self.command(id)? {
                out.push(cmd);
            }
        }
        Ok(out)
    }

    /// Sets the state of commands `ids` of `device` that are in a state
    /// `from` accepts.
    pub fn transition_commands(
        &self,
        device: &DeviceId,
        ids: &[u64],
        from: impl Fn(&CommandState) -> bool,
        to: CommandState,
    ) -> Result<Vec<u64>, StoreError> {
        let mut changed = Vec::new();
        for id in ids {
            let Some(mut cmd) = self.command(*id)? else {
                continue;
            };
            if &cmd.device == device && from(&cmd.state) {
                cmd.state = to.clone();
                self.commands.insert(id.to_be_bytes(), encode(&cmd))?;
                changed.push(*id);
            }
        }
        Ok(changed)
    }

    /// Marks queued commands whose expiry has passed as expired; returns
    /// them.
    pub fn expire_commands(&self, now: Timestamp) -> Result<Vec<CommandRecord>, StoreError> {
        let mut expired = Vec::new();
        for value in self.commands.iter().values() {
            let mut cmd: CommandRecord = decode("commands", &value?)?;
            if cmd.state == CommandState::Queued && cmd.expires_at <= now {
                cmd.state = CommandState::Expired { at: now };
                self.commands.insert(cmd.id.to_be_bytes(), encode(&cmd))?;
                expired.push(cmd);
            }
        }
        Ok(expired)
    }

    /// Flushes, stops the writer and releases the database, so it can be
    /// opened again in this process. Other clones must be dropped first.
    pub fn close(self) -> Result<(), StoreError> {
        self.flush()?;
        self.writer().close();
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Stores an API token under the SHA-256 of its secret.
    pub fn put_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<(), StoreError> {
        self.api_tokens.insert(hash, encode(token))?;
        self.db.flush()?;
        Ok(())
    }

    /// Looks up an API token by the SHA-256 of its secret.
    pub fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        self.api_tokens.get(hash)?.map(|v| decode("api_tokens", &v)).transpose()
    }

    /// Enrolls a device with one redemption of token `token_id`, atomically:
    /// either the use is counted and the device recorded, or nothing is
    /// written.
    /// `key` is the public key of the device's new certificate.
    pub fn enroll(
        &self,
        token_id: &[u8; 16],
        allowed: u32,
        record: &DeviceRecord,
        key: &[u8],
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let result = (&self.enroll_uses, &self.devices, &self.device_keys).transaction(|(uses, devices, keys)| {
            let used =
                uses.get(token_id)?.and_then(|v| v.as_ref().try_into().ok().map(u32::from_le_bytes)).unwrap_or(0);
            if used >= allowed {
                return Err(Abort::Abort(StoreError::UsedUp { used, allowed }));
            }
            uses.insert(&token_id[..], &(used + 1).to_le_bytes()[..])?;
            devices.insert(record.id.as_str().as_bytes(), encode(record))?;
            keys.insert(record.id.as_str().as_bytes(), key)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.db.flush()?;
                Ok(())
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// One device.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.devices.get(id.as_str())?.map(|v| decode("devices", &v)).transpose()
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices.iter().values().map(|v| decode("devices", &v?)).collect()
    }

    /// Changes one device's record in place. Returns the new record, or
    /// `None` if the device is unknown.
    pub fn update_device(
        &self,
        id: &DeviceId,
        mut change: impl FnMut(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let mut corrupt = None;
        let new = self.devices.update_and_fetch(id.as_str(), |old| {
            let old = old?;
            match decode::<DeviceRecord>("devices", old) {
                Ok(mut record) => {
                    change(&mut record);
                    Some(encode(&record))
                }
                Err(e) => {
                    corrupt = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        new.map(|v| decode("devices", &v)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.parse().unwrap(),
            name: "n".into(),
            enrolled_at: Timestamp(1),
            cert_fingerprint: Fingerprint([0; 32]),
            agent_version: None,
            last_seen: None,
            last_addr: None,
            last_sample: None,
        }
    }

    #[test]
    fn enrollment_counts_uses_and_writes_nothing_when_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.enroll(&[1; 16], 2, &record("dev-a"), b"key").unwrap();
        store.enroll(&[1; 16], 2, &record("dev-b"), b"key").unwrap();
        let err = store.enroll(&[1; 16], 2, &record("dev-c"), b"key").unwrap_err();
        assert!(matches!(err, StoreError::UsedUp { used: 2, allowed: 2 }));
        let ids: Vec<_> = store.devices().unwrap().into_iter().map(|d| d.id.to_string()).collect();
        assert_eq!(ids, ["dev-a", "dev-b"]);
    }

    #[test]
    fn devices_survive_reopen_and_update() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.enroll(&[2; 16], 1, &record("dev-a"), b"key").unwrap();
            let id = "dev-a".parse().unwrap();
            let new = store.update_device(&id, |r| r.name = "renamed".into()).unwrap().unwrap();
            assert_eq!(new.name, "renamed");
            assert!(store.update_device(&"dev-z".parse().unwrap(), |_| {}).unwrap().is_none());
            store.close().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.device(&"dev-a".parse().unwrap()).unwrap().unwrap().name, "renamed");
    }
}
