//! The hub's copy of devices' backups: encrypted chunks, content-addressed
//! on disk, and the snapshot catalog in the [`Store`].
//!
//! The hub never has the fleet backup key: a chunk is stored exactly as the
//! device's repository holds it (`nonce || ciphertext`), and so is a
//! snapshot's manifest. Each device's chunks live apart, under its own id,
//! so that one device (a compromised one, say) cannot plant a chunk that
//! another device's backup would then be assumed to contain.
//!
//! Layout of `<data_dir>/backups/<device>/`:
//! - `chunks/<2 hex>/<64 hex>`: `BLAKE3(blob) (32 bytes) || blob`. The hash
//!   is taken on arrival, so a verify or a download finds a file that
//!   changed on the hub's disk and names it.
//! - `snapshots/<name>`: the encrypted manifest.
//! - `chunklists/<name>`: the ids of the chunks the snapshot needs (sorted,
//!   32 bytes each), as the device listed them before the upload
//!   (`SnapshotChunks`) and the hub checked them at `PutSnapshot`: ids are
//!   keyed hashes, so the list reveals nothing, yet it lets the hub's own
//!   retention ([`Backups::prune`]) delete what no kept snapshot needs.
//!   `uploading/<name>` holds the list while its upload runs.
//!
//! Retention is the hub's (`[backups.retention]` in hub.toml), never the
//! device's: no request of a device deletes anything, so a compromised
//! device cannot erase its history at the hub. Prune and catalogue take one
//! lock, so a snapshot is never catalogued while a prune deletes a chunk it
//! needs; chunks listed by an upload in flight, and chunks younger than
//! [`PRUNE_GRACE`], are never deleted.
//!
//! Every file is written to a temporary name, synced and renamed (the
//! directory synced too) before the upload is answered, so what the hub
//! answered for survives a crash, and a chunk file that exists is whole:
//! "which chunks are missing" is a question for the file system.

use crate::store::{CatalogEntry, Grant, Store, StoreError};
use outpost_shared::DeviceId;
use outpost_shared::fsutil::write_atomic;
use outpost_shared::protocol::{ChunkBlob, ChunkId, RefusalReason, SnapshotChunkList, SnapshotData};
use outpost_shared::time::Timestamp;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Most ids one `HaveChunks` (or `SnapshotChunks`) may carry.
pub const MAX_IDS_PER_QUERY: usize = 16 * 1024;
/// Chunks written this recently are never pruned: their snapshot may still
/// be on its way.
pub const PRUNE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// An upload whose list is older than this was abandoned: its list stops
/// protecting chunks (a device that resumes sends it again).
pub const UPLOAD_ABANDONED: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);
/// Largest blob accepted: a 4 MiB chunk stored raw, its flag byte, nonce
/// and tag, with room for a future format.
pub const MAX_BLOB: usize = (4 << 20) + 4096;

/// `[backups] device_quota` and `min_free`: what devices' backups may take
/// of the hub's disk, so that one device (a stolen one uploading chunks it
/// never catalogues, or snapshots of junk) can neither take the others'
/// room nor fill the disk the hub's store needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    /// Bytes of chunks one device may hold at the hub (`None`: no quota).
    pub device_quota: Option<u64>,
    /// Free bytes a chunk must leave on the backups' file system.
    pub min_free: u64,
}

impl Default for Room {
    fn default() -> Self {
        Room { device_quota: None, min_free: 512 << 20 }
    }
}

/// Whether a chunk file of `bytes` may be stored for a device holding
/// `held` bytes of chunks, with `free` bytes free on the disk (`None`:
/// unknown, not refused). Pure; `Err` says why not, for the device's log.
pub fn may_store(room: Room, bytes: u64, held: u64, free: Option<u64>) -> Result<(), String> {
    if let Some(quota) = room.device_quota
        && held.saturating_add(bytes) > quota
    {
        return Err(format!(
            "this device's backups at the hub have reached its quota ([backups] device_quota = {quota} bytes; \
             {held} held): the upload waits until the hub's retention frees room or the quota is raised"
        ));
    }
    if let Some(free) = free
        && free.saturating_sub(bytes) < room.min_free
    {
        return Err(format!(
            "the hub's disk for backups is nearly full ({free} bytes free, [backups] min_free = {} kept): \
             the upload is retried later",
            room.min_free
        ));
    }
    Ok(())
}

/// Why a backup request failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupStoreError {
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Stored data no longer matches what arrived.
    #[error("{0}")]
    Corrupt(String),
    /// No such snapshot or chunk.
    #[error("{0}")]
    NotFound(String),
    /// The request is not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// The reader may not read these backups.
    #[error("{0}")]
    NotAuthorised(String),
    /// Another hub is working on this device's backups; retry later.
    #[error("{0}")]
    Busy(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupStoreError {
    /// The protocol's reason for this failure.
    pub fn reason(&self) -> RefusalReason {
        match self {
            BackupStoreError::Io { .. } | BackupStoreError::Store(_) | BackupStoreError::Busy(_) => {
                RefusalReason::Internal
            }
            BackupStoreError::Corrupt(_) => RefusalReason::Corrupt,
            BackupStoreError::NotFound(_) => RefusalReason::NotFound,
            BackupStoreError::BadRequest(_) => RefusalReason::BadRequest,
            BackupStoreError::NotAuthorised(_) => RefusalReason::NotAuthorised,
        }
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> BackupStoreError {
    let what = what.to_string();
    move |source| BackupStoreError::Io { what, source }
}

fn hex(bytes: &[u8]) -> String {
    outpost_shared::identity::hex(bytes)
}

/// A snapshot name a device may use: its own format, nothing that could
/// leave the directory.
fn valid_name(name: &str) -> bool {
    (1..=160).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// What a verify of a device's chunks at the hub found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Each bad chunk, named.
    pub problems: Vec<String>,
}

/// The chunks a device has at the hub.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Chunks.
    pub chunks: u64,
    /// Bytes on disk (blobs and their hashes).
    pub bytes: u64,
}

/// What a prune of a device's backups at the hub did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PruneReport {
    /// Snapshots removed (or to remove), by name.
    pub snapshots_removed: Vec<String>,
    /// Snapshots kept.
    pub snapshots_kept: usize,
    /// Chunk files removed (or to remove).
    pub chunks_removed: u64,
    /// Bytes those chunks took.
    pub bytes_freed: u64,
    /// Why no chunk was removed, when that is so (a kept snapshot without
    /// a chunk list, uploaded before protocol 9).
    pub chunks_kept_because: Option<String>,
    /// Nothing was deleted: this is what a prune would do.
    pub dry_run: bool,
}

/// The snapshots of a catalog that `retention` drops, per backup set, by
/// name. A snapshot's time is when it started, but never later than when
/// it arrived: a device cannot date a snapshot in the future to push older
/// ones out. Pure.
pub fn prune_plan(catalog: &[CatalogEntry], retention: &outpost_shared::retention::Retention) -> Vec<String> {
    let mut sets: std::collections::BTreeMap<&str, Vec<&CatalogEntry>> = std::collections::BTreeMap::new();
    for entry in catalog {
        sets.entry(entry.summary.set.as_str()).or_default().push(entry);
    }
    let mut drop = Vec::new();
    for entries in sets.values_mut() {
        entries.sort_by_key(|e| (e.summary.started.min(e.uploaded_at), e.summary.name.clone()));
        let times: Vec<Timestamp> = entries.iter().map(|e| e.summary.started.min(e.uploaded_at)).collect();
        let keep = retention.keep(&times);
        drop.extend(entries.iter().enumerate().filter(|(i, _)| !keep.contains(i)).map(|(_, e)| e.summary.name.clone()));
    }
    drop.sort();
    drop
}

/// Devices' backups at the hub. Every method blocks (files, fsync): call
/// them from blocking threads.
#[derive(Debug, Clone)]
pub struct Backups {
    dir: PathBuf,
    store: Store,
    /// Held by `put_snapshot` and `prune`: a snapshot is never catalogued
    /// while a prune deletes chunks.
    catalogue: std::sync::Arc<std::sync::Mutex<()>>,
    /// Shared by every clone: a reload (SIGHUP) sets it for all.
    retention: std::sync::Arc<std::sync::Mutex<outpost_shared::retention::Retention>>,
    /// The runtime the store's calls run on (these methods block).
    runtime: tokio::runtime::Handle,
    /// This process's name on the store's leases.
    holder: String,
    /// What backups may take of the disk (shared by clones: a reload sets
    /// it for all).
    room: std::sync::Arc<std::sync::Mutex<Room>>,
    /// Bytes of chunks each device holds, counted from its files the first
    /// time a quota asks, then kept up to date (forgotten after a prune).
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<DeviceId, u64>>>,
}

/// How long a prune may hold a device's backups.
const PRUNE_LEASE: std::time::Duration = std::time::Duration::from_secs(600);
/// How long cataloguing a snapshot may hold them.
const CATALOGUE_LEASE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long cataloguing waits for another hub's prune before it gives up.
const CATALOGUE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A device's backups held against other hubs (the store's lease); given
/// back when dropped.
struct Lease<'a> {
    backups: &'a Backups,
    name: String,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let (store, name, holder) = (&self.backups.store, &self.name, &self.backups.holder);
        if let Err(e) = self.backups.wait(store.release_lease(name, holder)) {
            // It expires by itself.
            tracing::debug!(error = %e, lease = %name, "Lease not given back.");
        }
    }
}

impl Backups {
    /// Backups under `<data_dir>/backups`, catalog in `store`, every
    /// snapshot kept until [`Backups::with_retention`] says otherwise.
    /// Call inside the tokio runtime the store's calls are to run on.
    pub fn new(data_dir: &Path, store: Store) -> Self {
        Backups {
            dir: data_dir.join("backups"),
            store,
            catalogue: Default::default(),
            retention: Default::default(),
            runtime: tokio::runtime::Handle::current(),
            room: Default::default(),
            held: Default::default(),
            holder: {
                let mut random = [0u8; 6];
                rand::fill(&mut random[..]);
                format!("backups-{}", outpost_shared::identity::hex(&random))
            },
        }
    }

    /// Holds `device`'s backups against other hubs sharing the store: one
    /// try, or tries for up to `wait`.
    fn lease(
        &self,
        device: &DeviceId,
        ttl: std::time::Duration,
        wait: std::time::Duration,
    ) -> Result<Lease<'_>, BackupStoreError> {
        let name = format!("backups/{device}");
        let give_up = std::time::Instant::now() + wait;
        loop {
            if self.wait(self.store.take_lease(&name, &self.holder, ttl))? {
                return Ok(Lease { backups: self, name });
            }
            if std::time::Instant::now() >= give_up {
                return Err(BackupStoreError::Busy(format!(
                    "another hub is pruning or cataloguing {device}'s backups; try again later"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Waits for a store call from this blocking thread.
    fn wait<T>(&self, call: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.runtime.block_on(call)
    }

    /// The hub's retention (`[backups.retention]`), applied by
    /// [`Backups::prune`].
    pub fn with_retention(self, retention: outpost_shared::retention::Retention) -> Self {
        self.set_retention(retention);
        self
    }

    /// Replaces the hub's retention, for this value and its clones (a
    /// config reloaded on SIGHUP); the next prune applies it.
    pub fn set_retention(&self, retention: outpost_shared::retention::Retention) {
        *self.retention.lock().unwrap_or_else(|p| p.into_inner()) = retention;
    }

    /// What backups may take of the disk, for this value and its clones
    /// (a config reloaded on SIGHUP applies to the next chunk).
    pub fn set_room(&self, room: Room) {
        *self.room.lock().unwrap_or_else(|p| p.into_inner()) = room;
    }

    /// Bytes of chunks `device` holds at the hub.
    fn held(&self, device: &DeviceId) -> u64 {
        if let Some(held) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get(device) {
            return *held;
        }
        // Counted without the lock: other devices' chunks do not wait on
        // this walk.
        use std::os::unix::fs::MetadataExt;
        let chunks = self.dir.join(device.as_str()).join("chunks");
        let files = std::fs::read_dir(chunks).into_iter().flatten().flatten();
        let dirs = files.filter_map(|d| std::fs::read_dir(d.path()).ok());
        let counted = dirs.flatten().flatten().filter_map(|f| f.metadata().ok()).map(|m| m.size()).sum();
        *self.held.lock().unwrap_or_else(|p| p.into_inner()).entry(device.clone()).or_insert(counted)
    }

    fn retention(&self) -> outpost_shared::retention::Retention {
        *self.retention.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_catalogue(&self) -> std::sync::MutexGuard<'_, ()> {
        self.catalogue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn list_path(&self, device: &DeviceId, dir: &str, name: &str) -> PathBuf {
        self.dir.join(device.as_str()).join(dir).join(name)
    }

    /// Records part of the chunk list of a snapshot being uploaded (the
    /// first part starts it again).
    pub fn put_chunk_list(&self, device: &DeviceId, list: &SnapshotChunkList) -> Result<(), BackupStoreError> {
        if !valid_name(&list.name) {
            return Err(BackupStoreError::BadRequest(format!("{:?} is not a snapshot name", list.name)));
        }
        if list.ids.len() > MAX_IDS_PER_QUERY {
            return Err(BackupStoreError::BadRequest(format!("at most {MAX_IDS_PER_QUERY} ids per part")));
        }
        let path = self.list_path(device, "uploading", &list.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(!list.first)
            .write(true)
            .truncate(list.first)
            .open(&path)
            .map_err(io(path.display()))?;
        use std::io::Write;
        file.write_all(&list.ids.concat()).map_err(io(path.display()))?;
        file.sync_all().map_err(io(path.display()))
    }

    /// The chunk list of a snapshot (`dir` `chunklists` for catalogued
    /// ones, `uploading` for uploads under way), sorted and deduplicated;
    /// `None` if there is none.
    fn chunk_list(&self, device: &DeviceId, dir: &str, name: &str) -> Result<Option<Vec<ChunkId>>, BackupStoreError> {
        let path = self.list_path(device, dir, name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path.display())(e)),
        };
        let mut ids: Vec<ChunkId> = bytes.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(Some(ids))
    }

    fn chunk_path(&self, device: &DeviceId, id: &ChunkId) -> PathBuf {
        let h = hex(id);
        self.dir.join(device.as_str()).join("chunks").join(&h[..2]).join(h)
    }

    fn manifest_path(&self, device: &DeviceId, name: &str) -> PathBuf {
        self.dir.join(device.as_str()).join("snapshots").join(name)
    }

    /// The ids among `ids` the hub does not hold for `device`.
    pub fn missing(&self, device: &DeviceId, ids: &[ChunkId]) -> Result<Vec<ChunkId>, BackupStoreError> {
        if ids.len() > MAX_IDS_PER_QUERY {
            return Err(BackupStoreError::BadRequest(format!("at most {MAX_IDS_PER_QUERY} ids per query")));
        }
        Ok(ids.iter().filter(|id| !self.chunk_path(device, id).exists()).copied().collect())
    }

    /// Stores a chunk of `device` durably. Returns false if it was already
    /// there (then nothing is written).
    pub fn put_chunk(&self, device: &DeviceId, chunk: &ChunkBlob) -> Result<bool, BackupStoreError> {
        if chunk.blob.len() > MAX_BLOB || chunk.blob.len() < 40 {
            return Err(BackupStoreError::BadRequest(format!(
                "chunk {} has {} bytes: not a chunk blob",
                hex(&chunk.id),
                chunk.blob.len()
            )));
        }
        let path = self.chunk_path(device, &chunk.id);
        if path.exists() {
            return Ok(false);
        }
        let room = *self.room.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = 32 + chunk.blob.len() as u64;
        let held = if room.device_quota.is_some() { self.held(device) } else { 0 };
        may_store(room, bytes, held, outpost_shared::fsutil::free_bytes(&self.dir)).map_err(BackupStoreError::Busy)?;
        let mut file = Vec::with_capacity(32 + chunk.blob.len());
        file.extend_from_slice(blake3::hash(&chunk.blob).as_bytes());
        file.extend_from_slice(&chunk.blob);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        write_atomic(&path, &file, 0o600).map_err(io(path.display()))?;
        if let Some(held) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(device) {
            *held += bytes;
        }
        Ok(true)
    }

    /// A chunk of `device`, checked against the hash taken on arrival.
    pub fn chunk(&self, device: &DeviceId, id: &ChunkId) -> Result<Vec<u8>, BackupStoreError> {
        let path = self.chunk_path(device, id);
        let mut file = match std::fs::read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackupStoreError::NotFound(format!("chunk {} of {device} is not at the hub", hex(id))));
            }
            Err(e) => return Err(io(path.display())(e)),
        };
        check(&file)
            .map_err(|why| BackupStoreError::Corrupt(format!("chunk {} of {device} at the hub: {why}", hex(id))))?;
        Ok(file.split_off(32))
    }

    /// Catalogs a snapshot of `device`: its chunk list (sent before, every
    /// chunk in it here) and manifest files first, then the catalog entry,
    /// all durable before this returns.
    pub fn put_snapshot(&self, device: &DeviceId, data: &SnapshotData) -> Result<(), BackupStoreError> {
        let name = &data.summary.name;
        if !valid_name(name) {
            return Err(BackupStoreError::BadRequest(format!("{name:?} is not a snapshot name")));
        }
        if data.manifest.len() > outpost_shared::protocol::MAX_BULK_FRAME {
            return Err(BackupStoreError::BadRequest("manifest too large".into()));
        }
        let _catalogue = self.lock_catalogue();
        let _lease = self.lease(device, CATALOGUE_LEASE, CATALOGUE_WAIT)?;
        let ids = self.chunk_list(device, "uploading", name)?.unwrap_or_default();
        if ids.len() as u64 != data.summary.chunks {
            return Err(BackupStoreError::BadRequest(format!(
                "snapshot {name} needs {} chunks but its chunk list (SnapshotChunks) names {}",
                data.summary.chunks,
                ids.len()
            )));
        }
        let lacking = ids.iter().filter(|id| !self.chunk_path(device, id).exists()).count();
        if lacking > 0 {
            return Err(BackupStoreError::BadRequest(format!(
                "snapshot {name} needs {lacking} chunk(s) the hub does not hold; send them first"
            )));
        }
        let list = self.list_path(device, "chunklists", name);
        if let Some(parent) = list.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        write_atomic(&list, &ids.concat(), 0o600).map_err(io(list.display()))?;
        let path = self.manifest_path(device, name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        write_atomic(&path, &data.manifest, 0o600).map_err(io(path.display()))?;
        let entry = CatalogEntry { summary: data.summary.clone(), uploaded_at: Timestamp::now() };
        self.wait(self.store.put_catalog_entry(device, &entry))?;
        let _ = std::fs::remove_file(self.list_path(device, "uploading", name));
        Ok(())
    }

    /// Applies the hub's retention to `device`'s snapshots: drops what it
    /// does not keep (catalog first, then manifest and list), then deletes
    /// the chunks no kept snapshot and no upload under way needs. With
    /// `dry_run`, only reports.
    pub fn prune(&self, device: &DeviceId, dry_run: bool) -> Result<PruneReport, BackupStoreError> {
        let _catalogue = self.lock_catalogue();
        let _lease = self.lease(device, PRUNE_LEASE, std::time::Duration::ZERO)?;
        let catalog = self.wait(self.store.catalog(device))?;
        let drop = prune_plan(&catalog, &self.retention());
        let mut report = PruneReport {
            snapshots_kept: catalog.len() - drop.len(),
            snapshots_removed: drop.clone(),
            dry_run,
            ..PruneReport::default()
        };
        // What must stay: every kept snapshot's chunks, and those of uploads
        // under way (abandoned ones' lists are removed instead).
        let mut needed = std::collections::HashSet::new();
        for entry in catalog.iter().filter(|e| !drop.contains(&e.summary.name)) {
            match self.chunk_list(device, "chunklists", &entry.summary.name)? {
                Some(ids) => needed.extend(ids),
                None => {
                    report.chunks_kept_because = Some(format!(
                        "snapshot {} has no chunk list (uploaded before protocol 9): no chunk can be known unneeded",
                        entry.summary.name
                    ));
                }
            }
        }
        let uploading = self.dir.join(device.as_str()).join("uploading");
        let mut abandoned = Vec::new();
        for file in std::fs::read_dir(&uploading).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let age = file.metadata().and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok());
            if age.is_some_and(|a| a > UPLOAD_ABANDONED) {
                abandoned.push(file.path());
            } else if let Some(ids) = self.chunk_list(device, "uploading", &name)? {
                needed.extend(ids);
            }
        }
        let mut unneeded = Vec::new();
        if report.chunks_kept_because.is_none() {
            for file in self.chunk_files(device)? {
                let id = file.file_name().and_then(|n| outpost_shared::identity::parse_hex32(&n.to_string_lossy()));
                let meta = std::fs::metadata(&file).ok();
                let young = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|m| m.elapsed().ok());
                if id.is_some_and(|id| !needed.contains(&id)) && young.is_some_and(|a| a >= PRUNE_GRACE) {
                    report.chunks_removed += 1;
                    report.bytes_freed += meta.map_or(0, |m| m.len());
                    unneeded.push(file);
                }
            }
        }
        if dry_run {
            return Ok(report);
        }
        if !drop.is_empty() {
            self.wait(self.store.delete_catalog_entries(device, &drop))?;
        }
        for name in &drop {
            for path in [self.manifest_path(device, name), self.list_path(device, "chunklists", name)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(path.display())(e)),
                }
            }
        }
        // Counted again from the files when a quota next asks.
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(device);
        for path in abandoned.iter().chain(&unneeded) {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(path.display())(e)),
            }
        }
        Ok(report)
    }

    /// A device's catalog, oldest first.
    pub fn catalog(&self, device: &DeviceId) -> Result<Vec<CatalogEntry>, BackupStoreError> {
        Ok(self.wait(self.store.catalog(device))?)
    }

    /// A catalogued snapshot's summary and manifest.
    pub fn snapshot(&self, device: &DeviceId, name: &str) -> Result<SnapshotData, BackupStoreError> {
        let not_found = || BackupStoreError::NotFound(format!("no snapshot {name:?} of {device} at the hub"));
        if !valid_name(name) {
            return Err(not_found());
        }
        let entry = self.wait(self.store.catalog_entry(device, name))?.ok_or_else(not_found)?;
        let path = self.manifest_path(device, name);
        let manifest = std::fs::read(&path).map_err(io(path.display()))?;
        Ok(SnapshotData { summary: entry.summary, manifest })
    }

    /// Whether `reader` may fetch `owner`'s backups: its own, or with an
    /// unexpired grant.
    pub fn authorise(&self, reader: &DeviceId, owner: &DeviceId) -> Result<(), BackupStoreError> {
        if reader == owner {
            return Ok(());
        }
        match self.wait(self.store.grant(reader, owner))? {
            Some(grant) if grant.expires_at > Timestamp::now() => Ok(()),
            Some(_) => Err(BackupStoreError::NotAuthorised(format!(
                "the grant letting {reader} read {owner}'s backups has expired"
            ))),
            None => Err(BackupStoreError::NotAuthorised(format!(
                "{reader} may not read {owner}'s backups: an operator must grant it \
                 (outpostctl backups grant {owner} --to {reader})"
            ))),
        }
    }

    /// Lets `reader` fetch `owner`'s backups for `valid_for`.
    pub fn grant(
        &self,
        reader: &DeviceId,
        owner: &DeviceId,
        valid_for: std::time::Duration,
        by: &str,
    ) -> Result<Grant, BackupStoreError> {
        let now = Timestamp::now();
        let grant = Grant {
            granted_at: now,
            expires_at: Timestamp(now.0.saturating_add(u64::try_from(valid_for.as_millis()).unwrap_or(u64::MAX))),
            by: by.to_owned(),
        };
        self.wait(self.store.put_grant(reader, owner, &grant))?;
        Ok(grant)
    }

    fn chunk_files(&self, device: &DeviceId) -> Result<Vec<PathBuf>, BackupStoreError> {
        let dir = self.dir.join(device.as_str()).join("chunks");
        let mut files = Vec::new();
        let subs = match std::fs::read_dir(&dir) {
            Ok(subs) => subs,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(e) => return Err(io(dir.display())(e)),
        };
        for sub in subs.flatten() {
            let sub = sub.path();
            for entry in std::fs::read_dir(&sub).map_err(io(sub.display()))?.flatten() {
                // Temporary files of writes under way or interrupted.
                if !outpost_shared::fsutil::is_temporary(&entry.file_name().to_string_lossy()) {
                    files.push(entry.path());
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// Devices with backups at the hub.
    pub fn devices(&self) -> Result<Vec<DeviceId>, BackupStoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if let Ok(id) = entry.file_name().to_string_lossy().parse() {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Deletes everything the hub holds of `device`'s backups (a retired
    /// device whose data was restored elsewhere): the catalog first, so no
    /// snapshot ever names a missing chunk, then the files. Returns the
    /// snapshots and the usage removed.
    pub fn delete_all(&self, device: &DeviceId) -> Result<(usize, Usage), BackupStoreError> {
        let usage = self.usage(device)?;
        let snapshots = self.wait(self.store.delete_catalog(device))?;
        let dir = self.dir.join(device.as_str());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(dir.display())(e)),
        }
        Ok((snapshots, usage))
    }

    /// Chunks and bytes a device has at the hub.
    pub fn usage(&self, device: &DeviceId) -> Result<Usage, BackupStoreError> {
        let mut usage = Usage::default();
        for file in self.chunk_files(device)? {
            usage.chunks += 1;
            usage.bytes += std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        }
        Ok(usage)
    }

    /// Re-reads and re-hashes every chunk of `device` at the hub.
    pub fn verify(&self, device: &DeviceId) -> Result<VerifyReport, BackupStoreError> {
        let mut report = VerifyReport::default();
        for file in self.chunk_files(device)? {
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            report.chunks += 1;
            match std::fs::read(&file) {
                Ok(bytes) => {
                    report.bytes += bytes.len() as u64;
                    if let Err(why) = check(&bytes) {
                        report.problems.push(format!("chunk {name}: {why}"));
                    }
                }
                Err(e) => report.problems.push(format!("chunk {name}: {e}")),
            }
        }
        Ok(report)
    }
}

/// Checks a stored chunk file against the hash it starts with.
fn check(file: &[u8]) -> Result<(), &'static str> {
    if file.len() < 32 {
        return Err("truncated");
    }
    if blake3::hash(&file[32..]).as_bytes() != &file[..32] {
        return Err("corrupt (does not match the hash taken when it arrived)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_stored_only_within_the_devices_quota_and_the_disks_reserve() {
        let room = Room { device_quota: Some(1000), min_free: 100 };
        assert_eq!(may_store(room, 400, 600, Some(10_000)), Ok(()));
        let over = may_store(room, 401, 600, Some(10_000)).unwrap_err();
        assert!(over.contains("quota") && over.contains("600 held"), "{over}");
        let full = may_store(room, 400, 0, Some(499)).unwrap_err();
        assert!(full.contains("nearly full") && full.contains("499 bytes free"), "{full}");
        assert_eq!(may_store(room, 400, 0, Some(500)), Ok(()), "exactly the reserve left");
        assert_eq!(may_store(room, 400, 0, None), Ok(()), "free space unknown: not refused");
        let open = Room { device_quota: None, min_free: 0 };
        assert_eq!(may_store(open, u64::MAX, u64::MAX, Some(0)), Ok(()));
    }
    use outpost_shared::protocol::SnapshotSummary;

    use outpost_shared::retention::Retention;

    const DAY: u64 = 86_400_000;

    fn entry(set: &str, name: &str, started: u64, uploaded: u64, chunks: u64) -> CatalogEntry {
        CatalogEntry {
            summary: SnapshotSummary {
                name: name.into(),
                set: set.into(),
                started: Timestamp(started),
                ended: Timestamp(started),
                entries: 0,
                bytes: 0,
                chunks,
                problems: 0,
            },
            uploaded_at: Timestamp(uploaded),
        }
    }

    #[test]
    fn the_plan_counts_per_set_and_a_device_cannot_date_snapshots_in_the_future() {
        let base = 1_793_491_200_000u64;
        let mut catalog: Vec<CatalogEntry> = (0..5)
            .map(|d| entry("etc", &format!("{}-etc-{d}", base + d * DAY), base + d * DAY, base + d * DAY, 1))
            .collect();
        catalog.push(entry("srv", "x-srv", base, base, 1));
        let last2 = Retention { last: 2, ..Retention::default() };
        let drop = prune_plan(&catalog, &last2);
        assert_eq!(drop.len(), 3, "{drop:?}");
        assert!(!drop.contains(&"x-srv".to_owned()), "another set's only snapshot was dropped");
        // Five snapshots dated a year ahead, uploaded today: they count as
        // today's, so the real history is judged by when it arrived.
        let ahead = base + 365 * DAY;
        let mut forged = catalog.clone();
        forged.extend((0..5).map(|i| entry("etc", &format!("z-forged-{i}"), ahead + i, base + 4 * DAY, 1)));
        let daily = Retention { daily: 5, ..Retention::default() };
        let drop = prune_plan(&forged, &daily);
        let real_kept = catalog.iter().filter(|e| e.summary.set == "etc" && !drop.contains(&e.summary.name)).count();
        assert_eq!(real_kept, 4, "forged future dates pushed real days out: {drop:?}");
        assert!(prune_plan(&catalog, &Retention::default()).is_empty(), "no retention keeps everything");
    }

    fn upload(backups: &Backups, dev: &DeviceId, name: &str, day: u64, ids: &[ChunkId]) {
        for id in ids {
            backups.put_chunk(dev, &ChunkBlob { id: *id, blob: vec![id[0]; 4000] }).unwrap();
        }
        backups.put_chunk_list(dev, &SnapshotChunkList { name: name.into(), first: true, ids: ids.to_vec() }).unwrap();
        let summary = entry("data", name, day, day, ids.len() as u64).summary;
        backups.put_snapshot(dev, &SnapshotData { summary, manifest: vec![0; 64] }).unwrap();
        // The catalog entry records when it arrived: that day.
        let e = entry("data", name, day, day, ids.len() as u64);
        backups.wait(backups.store.put_catalog_entry(dev, &e)).unwrap();
    }

    fn age_chunks(backups: &Backups, dev: &DeviceId) {
        let old = std::time::SystemTime::now() - PRUNE_GRACE - std::time::Duration::from_secs(60);
        for file in backups.chunk_files(dev).unwrap() {
            std::fs::File::options().write(true).open(file).unwrap().set_modified(old).unwrap();
        }
    }

    /// 30 days of daily snapshots, 1 % of the chunks new each day, under
    /// 7 daily / 4 weekly: the hub ends up holding exactly the chunks the
    /// kept snapshots need, and every kept snapshot still has all of them.
    #[test]
    fn thirty_days_under_retention_leave_exactly_what_the_kept_snapshots_need() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let store = Store::open_sled(dir.path()).unwrap();
        let backups =
            Backups::new(dir.path(), store).with_retention(Retention { daily: 7, weekly: 4, ..Default::default() });
        let dev: DeviceId = "dev-a".parse().unwrap();
        let base = 1_793_491_200_000u64;
        let mut current: Vec<ChunkId> = (0..100u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                id
            })
            .collect();
        for (new_id, day) in (100u32..).zip(0..30u64) {
            // 1 % changes: one chunk replaced by a new one.
            let slot = (day as usize * 37) % current.len();
            current[slot][..4].copy_from_slice(&new_id.to_be_bytes());
            upload(&backups, &dev, &format!("{}-data-{day:02}", base + day * DAY), base + day * DAY, &current);
            if day % 7 == 6 {
                age_chunks(&backups, &dev);
                backups.prune(&dev, false).unwrap();
            }
        }
        age_chunks(&backups, &dev);
        let dry = backups.prune(&dev, true).unwrap();
        assert!(dry.dry_run && !dry.snapshots_removed.is_empty());
        let before = backups.catalog(&dev).unwrap().len();
        assert_eq!(before, dry.snapshots_kept + dry.snapshots_removed.len(), "a dry run changed the catalog");
        let report = backups.prune(&dev, false).unwrap();
        assert_eq!(report.snapshots_removed, dry.snapshots_removed);
        assert_eq!((report.chunks_removed, report.bytes_freed), (dry.chunks_removed, dry.bytes_freed));
        let kept = backups.catalog(&dev).unwrap();
        // 7 days, plus the newest of each of 4 weeks (overlapping the days).
        assert!((7..=11).contains(&kept.len()), "{} kept", kept.len());
        let mut needed = std::collections::BTreeSet::new();
        for e in &kept {
            needed.extend(backups.chunk_list(&dev, "chunklists", &e.summary.name).unwrap().unwrap());
        }
        let on_disk: std::collections::BTreeSet<ChunkId> = backups
            .chunk_files(&dev)
            .unwrap()
            .iter()
            .filter_map(|p| outpost_shared::identity::parse_hex32(&p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert_eq!(on_disk, needed, "the hub holds more or less than the kept snapshots need");
        let usage = backups.usage(&dev).unwrap();
        assert_eq!(usage.chunks, needed.len() as u64);
        eprintln!(
            "30 days, 7 daily / 4 weekly: {} snapshots kept, {} chunks ({} bytes) on disk = what they need",
            kept.len(),
            usage.chunks,
            usage.bytes
        );
    }

    #[test]
    fn a_retention_set_on_a_clone_applies_to_the_next_prune() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let store = Store::open_sled(dir.path()).unwrap();
        let backups = Backups::new(dir.path(), store);
        let dev: DeviceId = "dev-a".parse().unwrap();
        let base = 1_793_491_200_000u64;
        for day in 0..5u64 {
            let mut id = [0u8; 32];
            id[0] = day as u8;
            upload(&backups, &dev, &format!("{}-data-{day:02}", base + day * DAY), base + day * DAY, &[id]);
        }
        assert_eq!(backups.prune(&dev, true).unwrap().snapshots_removed.len(), 0, "keeps everything by default");
        // As a reload does: set on another handle of the same backups.
        backups.clone().set_retention(Retention { last: 2, ..Default::default() });
        let report = backups.prune(&dev, false).unwrap();
        assert_eq!((report.snapshots_removed.len(), report.snapshots_kept), (3, 2));
    }

    #[test]
    fn prune_keeps_chunks_of_uploads_under_way_and_of_snapshots_without_lists() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let store = Store::open_sled(dir.path()).unwrap();
        let backups = Backups::new(dir.path(), store).with_retention(Retention { last: 1, ..Default::default() });
        let dev: DeviceId = "dev-a".parse().unwrap();
        upload(&backups, &dev, "1-data-a", 1, &[[1; 32], [2; 32]]);
        upload(&backups, &dev, "2-data-b", 2, &[[2; 32]]);
        // An upload under way lists [1; 32] again and [3; 32], not yet sent.
        backups.put_chunk(&dev, &ChunkBlob { id: [3; 32], blob: vec![3; 4000] }).unwrap();
        backups
            .put_chunk_list(
                &dev,
                &SnapshotChunkList { name: "3-data-c".into(), first: true, ids: vec![[1; 32], [3; 32]] },
            )
            .unwrap();
        age_chunks(&backups, &dev);
        let report = backups.prune(&dev, false).unwrap();
        assert_eq!(report.snapshots_removed, ["1-data-a"]);
        assert_eq!(report.chunks_removed, 0, "a chunk of the upload under way was removed: {report:?}");
        // A snapshot catalogued before protocol 9 (no list) keeps every chunk.
        let legacy = entry("data", "4-data-d", 4, 4, 1);
        backups.wait(backups.store.put_catalog_entry(&dev, &legacy)).unwrap();
        std::fs::remove_file(backups.list_path(&dev, "uploading", "3-data-c")).unwrap();
        let report = backups.prune(&dev, true).unwrap();
        assert_eq!(report.chunks_removed, 0);
        assert!(report.chunks_kept_because.unwrap().contains("4-data-d"));
    }

    #[test]
    fn names_cannot_leave_the_directory() {
        assert!(valid_name("1700000000000-etc-0a1b2c3d"));
        for bad in ["", "..", ".hidden", "a/b", "../x", "a b", &"x".repeat(161)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_changed_chunk_file_is_named_and_not_served() {
        let dir = std::env::temp_dir().join(format!("outpost-hub-backups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let store = Store::open_sled(&dir).unwrap();
        let backups = Backups::new(&dir, store);
        let dev: DeviceId = "dev-a".parse().unwrap();
        let chunk = ChunkBlob { id: [3; 32], blob: vec![9; 100] };
        assert_eq!(backups.missing(&dev, &[[3; 32], [4; 32]]).unwrap(), vec![[3; 32], [4; 32]]);
        assert!(backups.put_chunk(&dev, &chunk).unwrap());
        assert!(!backups.put_chunk(&dev, &chunk).unwrap(), "a second copy is not written");
        assert_eq!(backups.missing(&dev, &[[3; 32], [4; 32]]).unwrap(), vec![[4; 32]]);
        assert_eq!(backups.chunk(&dev, &[3; 32]).unwrap(), vec![9; 100]);
        // Another device does not see it.
        let other: DeviceId = "dev-b".parse().unwrap();
        assert_eq!(backups.missing(&other, &[[3; 32]]).unwrap(), vec![[3; 32]]);
        assert!(backups.verify(&dev).unwrap().problems.is_empty());
        // Flip one byte on disk.
        let path = backups.chunk_path(&dev, &[3; 32]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let report = backups.verify(&dev).unwrap();
        assert_eq!(report.chunks, 1);
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].contains(&hex(&[3; 32])), "{report:?}");
        let err = backups.chunk(&dev, &[3; 32]).unwrap_err();
        assert_eq!(err.reason(), RefusalReason::Corrupt, "{err}");
        assert!(matches!(
            backups.put_chunk(&dev, &ChunkBlob { id: [5; 32], blob: vec![0; MAX_BLOB + 1] }),
            Err(BackupStoreError::BadRequest(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
