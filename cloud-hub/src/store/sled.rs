//! The sled backend: one hub, embedded, nothing to install.
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
//!   from the TLS handshake of its sessions, to verify its signed batches;
//!   device id, 0, `next` → the key of the certificate the hub signed at
//!   the device's renewal, until the device is seen using it
//! - `job_runs`: device id, 0, job name, 0, run id (u64 BE), attempt (u32
//!   BE) → [`JobRun`]; run ids grow on a device, so a job's runs are in
//!   order, and the newest [`MAX_RUNS_PER_JOB`] are kept
//! - `backups`: device id, 0, snapshot name → [`CatalogEntry`], the backup
//!   catalog (the chunks and manifests themselves are files, see
//!   [`crate::service::backups`])
//! - `restore_grants`: reader device id, 0, owner device id → [`Grant`]:
//!   the reader may fetch the owner's backups until the grant expires
//! - `labels`: device id → [`Labels`]
//! - `admissions`: device id → [`Admission`] (expired certificates met,
//!   re-admissions), only for devices that have one
//! - `digests`: device id → [`DeviceDigest`], written with each batch
//! - `audit`: entry id (u64 BE) → [`AuditEntry`]
//! - `up_numbers`: device id, 0, MQTT session (u64 BE) → the numbers taken
//!   in that session and when it was last heard (see
//!   [`super::Store::take_up_number`]); written without waiting for a sync
//!
//! Every write runs on the group-commit writer thread and is answered after
//! the sync of its group; every read runs on tokio's blocking pool. No sled
//! call runs on an async worker.
//!
//! Recovery: sled keeps the first I/O error of a database (a full disk) and
//! fails every later write with it. When a sync or a write fails, the open
//! database is dropped, and the next call (a write, a read, or the
//! readiness probe) opens the files again, at most once a second, so the
//! hub recovers by itself once space returns. While the database is closed,
//! calls fail with [`StoreError::Unavailable`], reads too (sled cannot open
//! its files on a full disk, and the failed instance may hold writes that
//! never reached the disk); reopening reads only what reached the disk, so
//! the API never shows a record that was not durable.

use super::digest::DeviceDigest;
use super::ingest::{self, Plan};
use super::{
    Admission, ApiToken, AuditEntry, AuditQuery, CatalogEntry, CommandRecord, CommandState, DesiredRecord, DeviceKeys,
    DeviceRecord, EventRecord, FleetRow, Grant, HelloRecord, Ingested, JobsRecord, Labels, MAX_RUNS_PER_JOB,
    NewCommand, PeersRecord, ReportedState, SessionRecord, StoreError, TelemetryRange, UP_SESSIONS,
};
use outpost_shared::DeviceId;
use outpost_shared::commit::GroupCommit;
use outpost_shared::job::JobRun;
use outpost_shared::mqtt::{Stale, UpNumbers};
use outpost_shared::protocol::Record;
use outpost_shared::reopen::{Reopening, Unavailable};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A sled error in the store's terms (sled's type stays in this module).
fn sled_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt { what: "sled", message: e.to_string() },
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// `?` for sled results.
trait OrStore<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> OrStore<T> for Result<T, sled::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(sled_err)
    }
}

/// The open database and its trees.
struct Trees {
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
    labels: sled::Tree,
    admissions: sled::Tree,
    cert_expires: sled::Tree,
    digests: sled::Tree,
    audit: sled::Tree,
    up_numbers: sled::Tree,
    meta: sled::Tree,
}

/// The database, or the fact that it failed and must be opened again.
struct Slot(Reopening<Trees, StoreError>);

impl Slot {
    /// The open database, reopening a failed one (at most every
    /// [`outpost_shared::reopen::REOPEN_EVERY`]).
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.0.get().map_err(|e| match e {
            Unavailable::Closed => StoreError::Unavailable("the store is closed".into()),
            Unavailable::Waiting(fault) => StoreError::Unavailable(fault),
            Unavailable::Open(e) => e,
        })
    }

    /// A write or sync failed: drop the database so the next call opens the
    /// files again (sled keeps the first I/O error forever otherwise).
    fn failed(&self, error: &str) {
        self.0.failed(error);
    }

    /// Releases the files for good.
    fn close(&self) {
        self.0.close();
    }

    /// The sync of a group of writes.
    fn sync(&self) -> Result<(), String> {
        let trees = self.trees().map_err(|e| e.to_string())?;
        match trees.db.flush() {
            Ok(_) => {
                self.0.fault.ok();
                Ok(())
            }
            Err(e) => {
                drop(trees);
                self.failed(&e.to_string());
                Err(e.to_string())
            }
        }
    }
}

/// The sled store. Cheap to clone; clones share one database.
#[derive(Clone)]
pub struct SledStore {
    slot: Arc<Slot>,
    writer: GroupCommit<Arc<Slot>>,
    /// Sessions live in this process only: sled serves one hub.
    sessions: Arc<Mutex<(u64, std::collections::HashMap<DeviceId, SessionRecord>)>>,
    /// Leases too.
    leases: Arc<Mutex<std::collections::HashMap<String, (String, Instant)>>>,
    /// Held while a number of an MQTT session is taken (read, compared,
    /// written).
    up_numbers: Arc<Mutex<()>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SledStore")
    }
}

impl SledStore {
    /// Opens (or creates) the store under `data_dir/db`. Blocks.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("db");
        let slot = Arc::new(Slot(Reopening::open("Hub store", move || Trees::open(&path))?));
        let writer = GroupCommit::start("hub-store", slot.clone(), |s: &Arc<Slot>| s.sync())
            .map_err(|e| StoreError::Unavailable(format!("start the store writer: {e}")))?;
        Ok(SledStore { slot, writer, sessions: Arc::default(), leases: Arc::default(), up_numbers: Arc::default() })
    }

    /// Runs `job` on the writer and answers once it is durable; a failed
    /// job or sync drops the database for a reopen.
    async fn write<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = self
            .writer
            .run(move |slot: &Arc<Slot>| {
                let result = slot.trees().and_then(|trees| job(&trees));
                if let Err(StoreError::Unavailable(e)) = &result {
                    slot.failed(e);
                }
                result
            })
            .await;
        result?
    }

    /// Runs `job` on tokio's blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.slot.clone();
        tokio::task::spawn_blocking(move || {
            let trees = slot.trees()?;
            job(&trees)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task: {e}")))?
    }

    pub(super) fn fault(&self) -> Option<String> {
        self.slot.0.fault.fault()
    }

    pub(super) async fn probe(&self) -> Result<(), StoreError> {
        self.write(|t| {
            t.meta.insert("probe", &Timestamp::now().0.to_be_bytes()).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn high_water(&self, id: &DeviceId) -> Result<u64, StoreError> {
        let id = id.clone();
        self.read(move |t| t.high_water(&id)).await
    }

    pub(super) async fn ingest(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        // The writer owns its job: the records move there and back.
        let (id, records) = (id.clone(), records.to_vec());
        self.write(move |t| t.ingest(&id, &records)).await
    }

    pub(super) async fn telemetry(
        &self,
        id: &DeviceId,
        range: &TelemetryRange,
    ) -> Result<Vec<(u64, Sample)>, StoreError> {
        let (id, range) = (id.clone(), *range);
        self.read(move |t| t.telemetry(&id, &range)).await
    }

    pub(super) async fn prune_telemetry(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.read(move |t| t.prune_telemetry(before)).await
    }

    pub(super) async fn events(&self, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.events(&id, limit)).await
    }

    pub(super) async fn put_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        let (id, key) = (id.clone(), key.to_vec());
        if self.device_keys(&id).await?.is_some_and(|k| k.current == key && k.next.is_none()) {
            return Ok(());
        }
        self.write(move |t| {
            let next = next_key_name(&id);
            if t.device_keys.get(&next).db()?.is_some_and(|n| n == key) {
                t.device_keys.remove(next).db()?;
            }
            t.device_keys.insert(id.as_str(), key).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn set_admission(&self, id: &DeviceId, admission: &Admission) -> Result<(), StoreError> {
        let (id, admission) = (id.clone(), *admission);
        self.write(move |t| {
            if admission == Admission::default() {
                t.admissions.remove(id.as_str()).db()?;
            } else {
                t.admissions.insert(id.as_str(), encode(&admission)).db()?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn admissions(&self) -> Result<Vec<(DeviceId, Admission)>, StoreError> {
        self.read(|t| {
            t.admissions
                .iter()
                .map(|item| {
                    let (key, value) = item.db()?;
                    let id = std::str::from_utf8(&key).ok().and_then(|k| k.parse().ok()).ok_or_else(|| {
                        StoreError::Corrupt { what: "admissions", message: "a key is not a device id".into() }
                    })?;
                    Ok((id, decode("admissions", &value)?))
                })
                .collect()
        })
        .await
    }

    pub(super) async fn put_next_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        let (id, key) = (id.clone(), key.to_vec());
        self.write(move |t| {
            t.device_keys.insert(next_key_name(&id), key).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn device_keys(&self, id: &DeviceId) -> Result<Option<DeviceKeys>, StoreError> {
        let id = id.clone();
        self.read(move |t| {
            let Some(current) = t.device_keys.get(id.as_str()).db()? else { return Ok(None) };
            let next = t.device_keys.get(next_key_name(&id)).db()?.map(|v| v.to_vec());
            Ok(Some(DeviceKeys { current: current.to_vec(), next }))
        })
        .await
    }

    pub(super) async fn put_catalog_entry(&self, id: &DeviceId, entry: &CatalogEntry) -> Result<(), StoreError> {
        let key = name_key(id, &entry.summary.name);
        let value = encode(entry);
        self.write(move |t| {
            t.backups.insert(key, value).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn catalog(&self, id: &DeviceId) -> Result<Vec<CatalogEntry>, StoreError> {
        let prefix = device_prefix(id);
        self.read(move |t| t.backups.scan_prefix(prefix).values().map(|v| decode("backups", &v.db()?)).collect()).await
    }

    pub(super) async fn catalog_entry(&self, id: &DeviceId, name: &str) -> Result<Option<CatalogEntry>, StoreError> {
        let key = name_key(id, name);
        self.read(move |t| t.backups.get(key).db()?.map(|v| decode("backups", &v)).transpose()).await
    }

    pub(super) async fn delete_catalog(&self, id: &DeviceId) -> Result<usize, StoreError> {
        let prefix = device_prefix(id);
        self.write(move |t| {
            let keys: Vec<sled::IVec> = t.backups.scan_prefix(prefix).keys().collect::<Result<_, _>>().db()?;
            for key in &keys {
                t.backups.remove(key).db()?;
            }
            Ok(keys.len())
        })
        .await
    }

    pub(super) async fn delete_catalog_entries(&self, id: &DeviceId, names: &[String]) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = names.iter().map(|n| name_key(id, n)).collect();
        self.write(move |t| {
            for key in keys {
                t.backups.remove(key).db()?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn put_grant(&self, reader: &DeviceId, owner: &DeviceId, grant: &Grant) -> Result<(), StoreError> {
        let (key, value) = (name_key(reader, owner.as_str()), encode(grant));
        self.write(move |t| {
            t.restore_grants.insert(key, value).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn grant(&self, reader: &DeviceId, owner: &DeviceId) -> Result<Option<Grant>, StoreError> {
        let key = name_key(reader, owner.as_str());
        self.read(move |t| t.restore_grants.get(key).db()?.map(|v| decode("restore_grants", &v)).transpose()).await
    }

    pub(super) async fn peers(&self, id: &DeviceId) -> Result<Option<PeersRecord>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.peers.get(id.as_str()).db()?.map(|v| decode("peers", &v)).transpose()).await
    }

    pub(super) async fn jobs(&self, id: &DeviceId) -> Result<Option<JobsRecord>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.jobs.get(id.as_str()).db()?.map(|v| decode("jobs", &v)).transpose()).await
    }

    pub(super) async fn job_runs(&self, id: &DeviceId, job: &str, limit: usize) -> Result<Vec<JobRun>, StoreError> {
        let prefix = job_prefix(id, job);
        self.read(move |t| {
            t.job_runs.scan_prefix(prefix).values().rev().take(limit).map(|v| decode("job_runs", &v.db()?)).collect()
        })
        .await
    }

    pub(super) async fn reported(&self, id: &DeviceId) -> Result<Option<ReportedState>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.reported.get(id.as_str()).db()?.map(|v| decode("reported", &v)).transpose()).await
    }

    pub(super) async fn desired(&self, id: &DeviceId) -> Result<Option<DesiredRecord>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.desired.get(id.as_str()).db()?.map(|v| decode("desired", &v)).transpose()).await
    }

    pub(super) async fn put_desired(
        &self,
        id: &DeviceId,
        expected: u64,
        doc: String,
    ) -> Result<DesiredRecord, StoreError> {
        let id = id.clone();
        self.write(move |t| t.put_desired(&id, expected, doc)).await
    }

    pub(super) async fn create_command(&self, command: NewCommand) -> Result<CommandRecord, StoreError> {
        self.write(move |t| t.create_command(command)).await
    }

    pub(super) async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.read(move |t| t.command(id)).await
    }

    pub(super) async fn device_commands(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<CommandRecord>, usize), StoreError> {
        let device = device.clone();
        self.read(move |t| {
            let page = t.device_commands(&device, after, limit, |_| true)?;
            let total = t.device_commands.scan_prefix(device_prefix(&device)).keys().count();
            Ok((page, total))
        })
        .await
    }

    pub(super) async fn newest_device_commands(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let device = device.clone();
        self.read(move |t| {
            let mut out = Vec::new();
            for key in t.device_commands.scan_prefix(device_prefix(&device)).keys().rev() {
                if out.len() >= limit {
                    break;
                }
                let key = key.db()?;
                if let Some(cmd) = t.command(key.get(key.len() - 8..).map_or(0, be_u64))? {
                    out.push(cmd);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn commands_in(
        &self,
        ids: std::ops::RangeInclusive<u64>,
        queued: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.read(move |t| {
            let mut out = Vec::new();
            let range = t.commands.range(ids.start().to_be_bytes()..=ids.end().to_be_bytes());
            for value in range.values().rev() {
                let cmd: CommandRecord = decode("commands", &value.db()?)?;
                if !queued || cmd.state == CommandState::Queued {
                    out.push(cmd);
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn queued_commands(
        &self,
        device: &DeviceId,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let device = device.clone();
        self.read(move |t| {
            t.device_commands(&device, 0, limit, |c| c.state == CommandState::Queued && c.expires_at > now)
        })
        .await
    }

    pub(super) async fn mark_delivered(
        &self,
        device: &DeviceId,
        ids: &[u64],
        at: Timestamp,
    ) -> Result<Vec<u64>, StoreError> {
        let (device, ids) = (device.clone(), ids.to_vec());
        self.write(move |t| {
            let mut changed = Vec::new();
            for id in ids {
                let Some(mut cmd) = t.command(id)? else { continue };
                if cmd.device == device && cmd.state == CommandState::Queued {
                    cmd.state = CommandState::Delivered { at };
                    t.commands.insert(id.to_be_bytes(), encode(&cmd)).db()?;
                    changed.push(id);
                }
            }
            Ok(changed)
        })
        .await
    }

    pub(super) async fn expire_commands(&self, now: Timestamp) -> Result<Vec<CommandRecord>, StoreError> {
        self.write(move |t| t.expire_commands(now)).await
    }

    pub(super) async fn put_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<(), StoreError> {
        let (hash, value) = (*hash, encode(token));
        self.write(move |t| {
            t.api_tokens.insert(hash, value).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn insert_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        let (hash, name, value) = (*hash, token.name.clone(), encode(token));
        // The writer thread runs one job at a time: no other token is made
        // between the check and the write.
        self.write(move |t| {
            let tokens =
                t.api_tokens.iter().values().map(|v| ApiToken::decode(&v.db()?)).collect::<Result<Vec<_>, _>>()?;
            if super::name_taken(tokens.iter(), &name, Timestamp::now()) {
                return Ok(false);
            }
            t.api_tokens.insert(hash, value).db()?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        let hash = *hash;
        self.read(move |t| t.api_tokens.get(hash).db()?.map(|v| ApiToken::decode(&v)).transpose()).await
    }

    pub(super) async fn update_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        let (hash, value) = (*hash, encode(token));
        // The writer thread runs one job at a time: nothing removes the
        // token between the check and the write.
        self.write(move |t| {
            if t.api_tokens.get(hash).db()?.is_none() {
                return Ok(false);
            }
            t.api_tokens.insert(hash, value).db()?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn take_api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        let hash = *hash;
        self.write(move |t| t.api_tokens.remove(hash).db()?.map(|v| ApiToken::decode(&v)).transpose()).await
    }

    pub(super) async fn take_api_token_unless(
        &self,
        hash: &[u8; 32],
        refuse: super::RefuseTake,
    ) -> Result<Result<Option<ApiToken>, ()>, StoreError> {
        let hash = *hash;
        // The writer thread runs one job at a time: the check and the
        // removal are one step.
        self.write(move |t| {
            if refuse(&all_tokens(t)?, &hash, Timestamp::now()) {
                return Ok(Err(()));
            }
            Ok(Ok(t.api_tokens.remove(hash).db()?.map(|v| ApiToken::decode(&v)).transpose()?))
        })
        .await
    }

    pub(super) async fn api_tokens(&self) -> Result<Vec<([u8; 32], ApiToken)>, StoreError> {
        self.read(all_tokens).await
    }

    pub(super) async fn set_labels(&self, id: &DeviceId, labels: &Labels) -> Result<bool, StoreError> {
        let (id, value) = (id.clone(), encode(labels));
        self.write(move |t| {
            if t.devices.get(id.as_str()).db()?.is_none() {
                return Ok(false);
            }
            t.labels.insert(id.as_str(), value).db()?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn fleet_rows(&self, only: Option<&[DeviceId]>) -> Result<Vec<FleetRow>, StoreError> {
        let only = only.map(<[DeviceId]>::to_vec);
        let mut rows = self
            .read(move |t| {
                let records: Vec<DeviceRecord> = match only {
                    Some(ids) => {
                        let mut ids = ids;
                        ids.sort();
                        ids.dedup();
                        ids.iter().filter_map(|id| t.device(id).transpose()).collect::<Result<_, _>>()?
                    }
                    None => t.devices.iter().values().map(|v| decode("devices", &v.db()?)).collect::<Result<_, _>>()?,
                };
                records
                    .into_iter()
                    .map(|record| {
                        let key = record.id.as_str();
                        let labels = t.labels.get(key).db()?.map(|v| decode("labels", &v)).transpose()?;
                        let digest = t.digests.get(key).db()?.map(|v| DeviceDigest::decode(&v)).transpose()?;
                        let admission = t.admissions.get(key).db()?.map(|v| decode("admissions", &v)).transpose()?;
                        let cert_expires = t.cert_expires.get(key).db()?.map(|v| Timestamp(be_u64(&v)));
                        Ok(FleetRow {
                            admission: admission.unwrap_or_default(),
                            cert_expires,
                            high_water: t.high_water(&record.id)?,
                            labels: labels.unwrap_or_default(),
                            digest: digest.unwrap_or_default(),
                            session: None,
                            record,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        let sessions = self.sessions();
        for row in &mut rows {
            row.session = sessions.1.get(&row.record.id).cloned();
        }
        Ok(rows)
    }

    pub(super) async fn prune_audit(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.write(move |t| {
            // Entries are appended in time order: the old ones come first.
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            for entry in t.audit.iter() {
                let (key, value) = entry.db()?;
                let entry: AuditEntry = decode("audit", &value)?;
                if entry.at >= before {
                    break;
                }
                batch.remove(key);
                removed += 1;
            }
            t.audit.apply_batch(batch).db()?;
            Ok(removed)
        })
        .await
    }

    pub(super) async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        let mut entry = entry.clone();
        self.write(move |t| {
            entry.id = t.db.generate_id().db()? + 1;
            t.audit.insert(entry.id.to_be_bytes(), encode(&entry)).db()?;
            Ok(entry.id)
        })
        .await
    }

    pub(super) async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let query = query.clone();
        self.read(move |t| {
            let end = query.before.unwrap_or(u64::MAX).to_be_bytes();
            let mut out = Vec::new();
            for entry in t.audit.range(..end).rev() {
                let (_, value) = entry.db()?;
                let entry: AuditEntry = decode("audit", &value)?;
                if query.since.is_some_and(|s| entry.at < s) {
                    break;
                }
                if query.matches(&entry) {
                    out.push(entry);
                    if out.len() >= query.limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn enroll(
        &self,
        token_id: &[u8; 16],
        allowed: u32,
        record: &DeviceRecord,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let (token_id, record, key) = (*token_id, record.clone(), key.to_vec());
        self.write(move |t| t.enroll(&token_id, allowed, &record, &key)).await
    }

    pub(super) async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.clone();
        self.read(move |t| t.device(&id)).await
    }

    pub(super) async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(|t| t.devices.iter().values().map(|v| decode("devices", &v.db()?)).collect()).await
    }

    pub(super) async fn record_hello(&self, hello: &HelloRecord) -> Result<bool, StoreError> {
        let hello = hello.clone();
        self.write(move |t| {
            let Some(mut record) = t.device(&hello.id)? else { return Ok(false) };
            record.name = hello.name;
            record.agent_version = Some(hello.agent_version);
            record.last_seen = Some(hello.at);
            record.last_addr = Some(hello.addr);
            t.devices.insert(hello.id.as_str(), encode(&record)).db()?;
            Ok(true)
        })
        .await
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, (u64, std::collections::HashMap<DeviceId, SessionRecord>)> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) async fn claim_session(&self, device: &DeviceId, hub: &str, transport: &str) -> Result<u64, StoreError> {
        let mut sessions = self.sessions();
        sessions.0 += 1;
        let epoch = sessions.0;
        let record = SessionRecord {
            hub: hub.to_owned(),
            epoch,
            transport: transport.to_owned(),
            seen: Timestamp::now(),
            ended: None,
        };
        sessions.1.insert(device.clone(), record);
        Ok(epoch)
    }

    pub(super) async fn set_cert_expires(&self, device: &DeviceId, not_after: Timestamp) -> Result<(), StoreError> {
        let key = device.as_str().to_owned();
        if self
            .read({
                let key = key.clone();
                move |t| Ok(t.cert_expires.get(&key).db()?.map(|v| be_u64(&v)))
            })
            .await?
            == Some(not_after.0)
        {
            return Ok(());
        }
        self.write(move |t| {
            t.cert_expires.insert(key.as_str(), &not_after.0.to_be_bytes()[..]).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn end_session(
        &self,
        device: &DeviceId,
        hub: &str,
        epoch: u64,
        at: Timestamp,
        reason: &str,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.sessions().1.get_mut(device).filter(|s| s.hub == hub && s.epoch == epoch) {
            s.ended = Some((at, reason.to_owned()));
        }
        Ok(())
    }

    pub(super) async fn holds_session(&self, device: &DeviceId, hub: &str, epoch: u64) -> Result<bool, StoreError> {
        Ok(self.sessions().1.get(device).is_some_and(|s| s.hub == hub && s.epoch == epoch))
    }

    pub(super) async fn session(&self, device: &DeviceId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.sessions().1.get(device).cloned())
    }

    pub(super) async fn touch_sessions(&self, hub: &str, seen: &[(DeviceId, Timestamp)]) -> Result<(), StoreError> {
        let mut sessions = self.sessions();
        for (device, at) in seen {
            if let Some(s) = sessions.1.get_mut(device).filter(|s| s.hub == hub) {
                s.seen = s.seen.max(*at);
            }
        }
        Ok(())
    }

    pub(super) async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match leases.get(name) {
            Some((other, until)) if other != holder && *until > now => Ok(false),
            _ => {
                leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    pub(super) async fn other_holders(&self, prefix: &str, holder: &str) -> Result<usize, StoreError> {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        Ok(leases.iter().filter(|(name, (h, until))| name.starts_with(prefix) && h != holder && *until > now).count())
    }

    /// Written without waiting for a sync (sled writes its log out every
    /// 500 ms): a crash forgets at most the numbers taken in that time.
    pub(super) async fn take_up_number(
        &self,
        device: &DeviceId,
        session: u64,
        seq: u64,
        now: Timestamp,
    ) -> Result<Result<(), Stale>, StoreError> {
        let (id, lock) = (device.clone(), self.up_numbers.clone());
        self.read(move |t| {
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            t.take_up_number(&id, session, seq, now)
        })
        .await
    }

    pub(super) async fn prune_up_numbers(&self, before: Timestamp) -> Result<usize, StoreError> {
        let lock = self.up_numbers.clone();
        self.read(move |t| {
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            t.prune_up_numbers(before)
        })
        .await
    }

    pub(super) async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases.get(name).is_some_and(|(h, _)| h == holder) {
            leases.remove(name);
        }
        Ok(())
    }

    pub(super) async fn hub_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("state/{name}");
        self.read(move |t| Ok(t.meta.get(key.as_bytes()).db()?.map(|v| v.to_vec()))).await
    }

    pub(super) async fn put_hub_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = format!("state/{name}");
        self.write(move |t| {
            t.meta.insert(key.as_bytes(), value).db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn notify(&self, _device: &DeviceId, _from: &str) -> Result<(), StoreError> {
        Ok(())
    }

    pub(super) async fn pending_devices(
        &self,
        _devices: &[DeviceId],
        _since: Timestamp,
    ) -> Result<Vec<DeviceId>, StoreError> {
        // One hub: every change wakes its session in the process.
        Ok(Vec::new())
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        self.write(|_| Ok(())).await
    }

    pub(super) async fn close(self) -> Result<(), StoreError> {
        let flushed = self.flush().await;
        tokio::task::spawn_blocking(move || self.close_writer())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        flushed
    }

    /// Flushes, stops the writer and releases the files, from a thread
    /// outside any runtime.
    pub fn close_blocking(self) -> Result<(), StoreError> {
        let flushed = self.writer.run_blocking(|s: &Arc<Slot>| s.trees().map(drop));
        self.close_writer();
        flushed?
    }

    fn close_writer(self) {
        self.writer.close();
        self.slot.close();
    }
}

fn device_prefix(id: &DeviceId) -> Vec<u8> {
    let mut key = id.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

fn next_key_name(id: &DeviceId) -> Vec<u8> {
    name_key(id, "next")
}

fn name_key(id: &DeviceId, name: &str) -> Vec<u8> {
    let mut key = device_prefix(id);
    key.extend_from_slice(name.as_bytes());
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
        TransactionError::Storage(e) => sled_err(e),
    })
}

/// A value of `up_numbers`: a session's [`UpNumbers`] and when it was last
/// heard (ms).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct UpEntry {
    numbers: UpNumbers,
    heard: u64,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data; serialization into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { what, message: e.to_string() })
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

impl Trees {
    fn open(path: &Path) -> Result<Self, StoreError> {
        // Not on a full disk: sled could leave files it cannot read.
        outpost_shared::reopen::room_to_open(path).map_err(StoreError::Unavailable)?;
        let db = sled::Config::new().path(path).cache_capacity(64 << 20).flush_every_ms(Some(500)).open().db()?;
        Ok(Trees {
            devices: db.open_tree("devices").db()?,
            api_tokens: db.open_tree("api_tokens").db()?,
            enroll_uses: db.open_tree("enroll_uses").db()?,
            seq: db.open_tree("seq").db()?,
            telemetry: db.open_tree("telemetry").db()?,
            events: db.open_tree("events").db()?,
            reported: db.open_tree("reported").db()?,
            desired: db.open_tree("desired").db()?,
            commands: db.open_tree("commands").db()?,
            device_commands: db.open_tree("device_commands").db()?,
            jobs: db.open_tree("jobs").db()?,
            job_runs: db.open_tree("job_runs").db()?,
            peers: db.open_tree("peers").db()?,
            device_keys: db.open_tree("device_keys").db()?,
            backups: db.open_tree("backups").db()?,
            restore_grants: db.open_tree("restore_grants").db()?,
            labels: db.open_tree("labels").db()?,
            admissions: db.open_tree("admissions").db()?,
            cert_expires: db.open_tree("cert_expires").db()?,
            digests: db.open_tree("digests").db()?,
            audit: db.open_tree("audit").db()?,
            up_numbers: db.open_tree("up_numbers").db()?,
            meta: db.open_tree("meta").db()?,
            db,
        })
    }

    fn high_water(&self, id: &DeviceId) -> Result<u64, StoreError> {
        Ok(self.seq.get(id.as_str()).db()?.map_or(0, |v| be_u64(&v)))
    }

    /// Applies [`ingest::plan`] of the batch in one transaction with the
    /// device's high-water mark.
    fn ingest(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        // More trees than sled's tuple transactions take: a slice of them.
        let trees: [&sled::Tree; 10] = [
            &self.seq,
            &self.telemetry,
            &self.events,
            &self.reported,
            &self.commands,
            &self.devices,
            &self.jobs,
            &self.job_runs,
            &self.peers,
            &self.digests,
        ];
        let now = Timestamp::now();
        let result = trees[..].transaction(|views: &Vec<TransactionalTree>| {
                let [seq, telemetry, events, reported, commands, devices, jobs, job_runs, peers, digests] =
                    &views[..]
                else {
                    unreachable!("one view per tree");
                };
                let hwm = seq.get(id.as_str())?.map_or(0, |v| be_u64(&v));
                let plan: Plan<'_> = ingest::plan(hwm, records);
                if !plan.advances {
                    return Ok(Ingested::from(&plan));
                }
                let mut digest: DeviceDigest = match digests.get(id.as_str())? {
                    Some(bytes) => DeviceDigest::decode(&bytes).map_err(abort)?,
                    None => DeviceDigest::default(),
                };
                digest.fold(&plan, records, now);
                digests.insert(id.as_str().as_bytes(), encode(&digest))?;
                for event in &plan.events {
                    events.insert(seq_key(id, event.seq), encode(event))?;
                }
                for (seq, sample) in &plan.samples {
                    telemetry.insert(telemetry_key(id, sample.at, *seq), encode(*sample))?;
                }
                for run in &plan.runs {
                    job_runs.insert(run_key(id, &run.job, run.run_id, run.attempt), encode(*run))?;
                }
                if let Some(rec) = &plan.jobs {
                    jobs.insert(id.as_str().as_bytes(), encode(rec))?;
                }
                if let Some(rec) = &plan.peers {
                    peers.insert(id.as_str().as_bytes(), encode(rec))?;
                }
                if let Some(rec) = &plan.reported {
                    reported.insert(id.as_str().as_bytes(), encode(rec))?;
                }
                for result in &plan.results {
                    let key = result.id.to_be_bytes();
                    let Some(bytes) = commands.get(key)? else {
                        tracing::debug!(device = %id, command = result.id, "Result for a command this hub does not know (kept in the event log).");
                        continue;
                    };
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
                }
                seq.insert(id.as_str().as_bytes(), &plan.upto.to_be_bytes()[..])?;
                if let Some(bytes) = devices.get(id.as_str())? {
                    let mut device: DeviceRecord = decode("devices", &bytes).map_err(abort)?;
                    device.last_seen = Some(now);
                    if let Some(sample) = plan.newest_sample
                        && device.last_sample.as_ref().is_none_or(|s| s.at <= sample.at)
                    {
                        device.last_sample = Some(sample.clone());
                    }
                    devices.insert(id.as_str().as_bytes(), encode(&device))?;
                }
                Ok(Ingested::from(&plan))
        });
        let ingested = tx_result(result)?;
        let mut touched: Vec<&str> = ingest::plan(0, records).touched_jobs;
        touched.sort_unstable();
        for job in touched {
            self.prune_job_runs(id, job)?;
        }
        Ok(ingested)
    }

    fn telemetry(&self, id: &DeviceId, range: &TelemetryRange) -> Result<Vec<(u64, Sample)>, StoreError> {
        let mut from = telemetry_key(id, range.since, 0);
        if let Some((at, seq)) = range.after {
            let next = match seq.checked_add(1) {
                Some(seq) => telemetry_key(id, at, seq),
                None => telemetry_key(id, Timestamp(at.0.saturating_add(1)), 0),
            };
            from = from.max(next);
        }
        let to = telemetry_key(id, range.until, 0);
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for entry in self.telemetry.range(from..to).take(range.limit) {
            let (key, value) = entry.db()?;
            let seq = key.get(key.len() - 8..).map_or(0, be_u64);
            out.push((seq, decode("telemetry", &value)?));
        }
        Ok(out)
    }

    fn take_up_number(
        &self,
        id: &DeviceId,
        session: u64,
        seq: u64,
        now: Timestamp,
    ) -> Result<Result<(), Stale>, StoreError> {
        let key = seq_key(id, session);
        let old: Option<UpEntry> = self.up_numbers.get(&key).db()?.map(|v| decode("MQTT numbers", &v)).transpose()?;
        let next = match old.map(|e| e.numbers).unwrap_or_default().admit(seq) {
            Ok(next) => next,
            Err(stale) => return Ok(Err(stale)),
        };
        if old.is_none() {
            // A new session: it and the device's most recently heard others
            // are kept.
            let mut sessions = Vec::new();
            for entry in self.up_numbers.scan_prefix(device_prefix(id)) {
                let (key, value) = entry.db()?;
                sessions.push((decode::<UpEntry>("MQTT numbers", &value)?.heard, key));
            }
            if sessions.len() >= UP_SESSIONS {
                sessions.sort();
                let mut batch = sled::Batch::default();
                for (_, key) in &sessions[..=sessions.len() - UP_SESSIONS] {
                    batch.remove(key);
                }
                self.up_numbers.apply_batch(batch).db()?;
            }
        }
        self.up_numbers.insert(key, encode(&UpEntry { numbers: next, heard: now.0 })).db()?;
        Ok(Ok(()))
    }

    fn prune_up_numbers(&self, before: Timestamp) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for entry in self.up_numbers.iter() {
            let (key, value) = entry.db()?;
            if decode::<UpEntry>("MQTT numbers", &value)?.heard < before.0 {
                batch.remove(key);
                removed += 1;
            }
        }
        self.up_numbers.apply_batch(batch).db()?;
        Ok(removed)
    }

    fn prune_telemetry(&self, before: Timestamp) -> Result<usize, StoreError> {
        let mut removed = 0;
        for device in self.devices.iter().keys() {
            let id: DeviceId = match std::str::from_utf8(&device.db()?).ok().and_then(|s| s.parse().ok()) {
                Some(id) => id,
                None => continue,
            };
            let mut batch = sled::Batch::default();
            for key in self.telemetry.range(telemetry_key(&id, Timestamp(0), 0)..telemetry_key(&id, before, 0)).keys() {
                batch.remove(key.db()?);
                removed += 1;
            }
            self.telemetry.apply_batch(batch).db()?;
        }
        Ok(removed)
    }

    fn events(&self, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.events
            .scan_prefix(device_prefix(id))
            .values()
            .rev()
            .take(limit)
            .map(|v| decode("events", &v.db()?))
            .collect()
    }

    /// Forgets all but the newest [`MAX_RUNS_PER_JOB`] attempts of a job.
    fn prune_job_runs(&self, id: &DeviceId, job: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in self.job_runs.scan_prefix(job_prefix(id, job)).keys().rev().skip(MAX_RUNS_PER_JOB) {
            batch.remove(key.db()?);
            removed += 1;
        }
        if removed > 0 {
            self.job_runs.apply_batch(batch).db()?;
        }
        Ok(())
    }

    fn put_desired(&self, id: &DeviceId, expected: u64, doc: String) -> Result<DesiredRecord, StoreError> {
        let result = self.desired.transaction(|tree| {
            let current = match tree.get(id.as_str())? {
                Some(v) => decode::<DesiredRecord>("desired", &v).map_err(abort)?.version,
                None => 0,
            };
            if current != expected {
                return Err(abort(StoreError::VersionConflict { expected, current }));
            }
            let record = DesiredRecord { version: expected + 1, doc: doc.clone(), updated_at: Timestamp::now() };
            tree.insert(id.as_str().as_bytes(), encode(&record))?;
            Ok(record)
        });
        tx_result(result)
    }

    fn create_command(&self, command: NewCommand) -> Result<CommandRecord, StoreError> {
        let id = self.db.generate_id().db()? + 1;
        let record = command.queued(id);
        let trees = (&self.commands, &self.device_commands);
        let result = trees.transaction(|(commands, index)| {
            commands.insert(&id.to_be_bytes()[..], encode(&record))?;
            index.insert(seq_key(&record.device, id), &[][..])?;
            Ok::<(), ConflictableTransactionError<StoreError>>(())
        });
        tx_result(result)?;
        Ok(record)
    }

    fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.commands.get(id.to_be_bytes()).db()?.map(|v| decode("commands", &v)).transpose()
    }

    /// A device's commands with ids after `after`, oldest first, those
    /// `keep` takes, at most `limit`: read from the device's index from
    /// `after` on, and no further than needed.
    fn device_commands(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        keep: impl Fn(&CommandRecord) -> bool,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let prefix = device_prefix(device);
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        let mut from = prefix.clone();
        from.extend_from_slice(&first.to_be_bytes());
        let mut out = Vec::new();
        for key in self.device_commands.range(from..).keys() {
            let key = key.db()?;
            if out.len() >= limit || !key.starts_with(&prefix) {
                break;
            }
            let id = key.get(key.len() - 8..).map_or(0, be_u64);
            if let Some(cmd) = self.command(id)?.filter(&keep) {
                out.push(cmd);
            }
        }
        Ok(out)
    }

    fn expire_commands(&self, now: Timestamp) -> Result<Vec<CommandRecord>, StoreError> {
        let mut expired = Vec::new();
        for value in self.commands.iter().values() {
            let mut cmd: CommandRecord = decode("commands", &value.db()?)?;
            if cmd.state == CommandState::Queued && cmd.expires_at <= now {
                cmd.state = CommandState::Expired { at: now };
                self.commands.insert(cmd.id.to_be_bytes(), encode(&cmd)).db()?;
                expired.push(cmd);
            }
        }
        Ok(expired)
    }

    fn enroll(&self, token_id: &[u8; 16], allowed: u32, record: &DeviceRecord, key: &[u8]) -> Result<(), StoreError> {
        let result = (&self.enroll_uses, &self.devices, &self.device_keys).transaction(|(uses, devices, keys)| {
            let used =
                uses.get(token_id)?.and_then(|v| v.as_ref().try_into().ok().map(u32::from_le_bytes)).unwrap_or(0);
            if used >= allowed {
                return Err(abort(StoreError::UsedUp { used, allowed }));
            }
            uses.insert(&token_id[..], &(used + 1).to_le_bytes()[..])?;
            devices.insert(record.id.as_str().as_bytes(), encode(record))?;
            keys.insert(record.id.as_str().as_bytes(), key)?;
            Ok(())
        });
        tx_result(result)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.devices.get(id.as_str()).db()?.map(|v| decode("devices", &v)).transpose()
    }
}

/// Every API token, by the hash of its secret.
fn all_tokens(t: &Trees) -> Result<Vec<([u8; 32], ApiToken)>, StoreError> {
    let mut out = Vec::new();
    for entry in t.api_tokens.iter() {
        let (key, value) = entry.db()?;
        let Ok(hash) = <[u8; 32]>::try_from(&key[..]) else { continue };
        out.push((hash, ApiToken::decode(&value)?));
    }
    Ok(out)
}
