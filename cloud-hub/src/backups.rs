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
//!
//! Every file is written to a temporary name, synced and renamed (the
//! directory synced too) before the upload is answered, so what the hub
//! answered for survives a crash, and a chunk file that exists is whole:
//! "which chunks are missing" is a question for the file system.

use crate::store::{CatalogEntry, Grant, Store, StoreError};
use outpost_shared::DeviceId;
use outpost_shared::fsutil::write_atomic;
use outpost_shared::protocol::{ChunkBlob, ChunkId, RefusalReason, SnapshotData, SnapshotSummary};
use outpost_shared::time::Timestamp;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Most ids one `HaveChunks` may ask about.
pub const MAX_IDS_PER_QUERY: usize = 16 * 1024;
/// Largest blob accepted: a 4 MiB chunk stored raw, its flag byte, nonce
/// and tag, with room for a future format.
pub const MAX_BLOB: usize = (4 << 20) + 4096;

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
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupStoreError {
    /// The protocol's reason for this failure.
    pub fn reason(&self) -> RefusalReason {
        match self {
            BackupStoreError::Io { .. } | BackupStoreError::Store(_) => RefusalReason::Internal,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
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

/// Devices' backups at the hub. Every method blocks (files, fsync): call
/// them from blocking threads.
#[derive(Debug, Clone)]
pub struct Backups {
    dir: PathBuf,
    store: Store,
}

impl Backups {
    /// Backups under `<data_dir>/backups`, catalog in `store`.
    pub fn new(data_dir: &Path, store: Store) -> Self {
        Backups { dir: data_dir.join("backups"), store }
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
        let mut file = Vec::with_capacity(32 + chunk.blob.len());
        file.extend_from_slice(blake3::hash(&chunk.blob).as_bytes());
        file.extend_from_slice(&chunk.blob);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        write_atomic(&path, &file, 0o600).map_err(io(path.display()))?;
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

    /// Catalogs a snapshot of `device`: the manifest file first, then the
    /// catalog entry, both durable before this returns.
    pub fn put_snapshot(&self, device: &DeviceId, data: &SnapshotData) -> Result<(), BackupStoreError> {
        let name = &data.summary.name;
        if !valid_name(name) {
            return Err(BackupStoreError::BadRequest(format!("{name:?} is not a snapshot name")));
        }
        if data.manifest.len() > outpost_shared::protocol::MAX_BULK_FRAME {
            return Err(BackupStoreError::BadRequest("manifest too large".into()));
        }
        let path = self.manifest_path(device, name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.display()))?;
        }
        write_atomic(&path, &data.manifest, 0o600).map_err(io(path.display()))?;
        let entry = CatalogEntry { summary: data.summary.clone(), uploaded_at: Timestamp::now() };
        let device = device.clone();
        self.store.writer().run_blocking(move |s| s.put_catalog_entry(&device, &entry)).map_err(StoreError::from)??;
        Ok(())
    }

    /// A device's catalog, oldest first.
    pub fn catalog(&self, device: &DeviceId) -> Result<Vec<CatalogEntry>, BackupStoreError> {
        Ok(self.store.catalog(device)?)
    }

    /// A catalogued snapshot's summary and manifest.
    pub fn snapshot(&self, device: &DeviceId, name: &str) -> Result<SnapshotData, BackupStoreError> {
        let not_found = || BackupStoreError::NotFound(format!("no snapshot {name:?} of {device} at the hub"));
        if !valid_name(name) {
            return Err(not_found());
        }
        let entry = self.store.catalog_entry(device, name)?.ok_or_else(not_found)?;
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
        match self.store.grant(reader, owner)? {
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
        let (r, o, g) = (reader.clone(), owner.clone(), grant.clone());
        self.store.writer().run_blocking(move |s| s.put_grant(&r, &o, &g)).map_err(StoreError::from)??;
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

    /// Deletes everything the hub holds of `device`'s backups (a retired
    /// device whose data was restored elsewhere): the catalog first, so no
    /// snapshot ever names a missing chunk, then the files. Returns the
    /// snapshots and the usage removed.
    pub fn delete_all(&self, device: &DeviceId) -> Result<(usize, Usage), BackupStoreError> {
        let usage = self.usage(device)?;
        let d = device.clone();
        let snapshots = self.store.writer().run_blocking(move |s| s.delete_catalog(&d)).map_err(StoreError::from)??;
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

/// The summary of a catalog entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
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

impl From<&CatalogEntry> for SnapshotView {
    fn from(e: &CatalogEntry) -> Self {
        let SnapshotSummary { name, set, started, ended, entries, bytes, chunks, problems } = e.summary.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let store = Store::open(&dir).unwrap();
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
