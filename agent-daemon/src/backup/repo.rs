//! The repository on disk: its config and key check, the lock, sealing
//! and opening blobs, chunks and snapshot manifests.

use super::*;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RepoConfig {
    version: u32,
    key_check: String,
}

/// An open repository. Held exclusively while it lives, unless opened with
/// [`Repository::open_unlocked`] to read (upload, restore from the hub).
pub struct Repository {
    pub(super) root: PathBuf,
    pub(super) cipher: XChaCha20Poly1305,
    pub(super) id_key: [u8; 32],
    pub(super) _lock: Option<fs::File>,
    /// The index segments, oldest first (see [`super::pack`]).
    pub(super) index: std::sync::RwLock<Vec<pack::Segment>>,
    /// Packs open for reading (restores read many chunks of one pack).
    pub(super) open_packs: std::sync::Mutex<HashMap<[u8; 32], std::sync::Arc<fs::File>>>,
}

/// Most packs kept open for reading.
const OPEN_PACKS: usize = 32;

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("root", &self.root).finish()
    }
}

impl Repository {
    /// Opens (creating if needed) the repository at `root` with `key`.
    /// Waits for the lock if another operation holds it.
    pub fn open(root: &Path, key: &[u8; 32]) -> Result<Self, BackupError> {
        Self::open_with(root, key, true)
    }

    /// Opens the repository without its lock, to read blobs and manifests
    /// while a backup or prune may run: uploads and restores from the hub,
    /// which must not hold up a scheduled backup for hours. What they read
    /// is immutable; a snapshot pruned meanwhile is skipped.
    pub fn open_unlocked(root: &Path, key: &[u8; 32]) -> Result<Self, BackupError> {
        Self::open_with(root, key, false)
    }

    pub(super) fn open_with(root: &Path, key: &[u8; 32], exclusive: bool) -> Result<Self, BackupError> {
        for dir in [
            root.to_owned(),
            root.join("chunks"),
            root.join("packs"),
            root.join("index"),
            root.join("snapshots"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let lock_path = root.join("lock");
        let lock = if exclusive {
            let lock = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io(&lock_path))?;
            lock_exclusive(&lock).map_err(io(&lock_path))?;
            Some(lock)
        } else {
            None
        };
        let enc_key = blake3::derive_key("outpost backup encryption v1", key);
        let id_key = blake3::derive_key("outpost backup chunk id v1", key);
        let check = hex(blake3::keyed_hash(&id_key, b"outpost backup key check").as_bytes());
        let config_path = root.join("config");
        match fs::read(&config_path) {
            Ok(bytes) => {
                let config: RepoConfig = serde_json::from_slice(&bytes)
                    .map_err(|e| BackupError::Corrupt { what: "repository config".into(), why: e.to_string() })?;
                if config.key_check != check {
                    return Err(BackupError::WrongKey);
                }
                if config.version > REPO_VERSION {
                    return Err(BackupError::Corrupt {
                        what: "repository config".into(),
                        why: format!(
                            "format version {} is newer than this agent's ({REPO_VERSION}); update the agent",
                            config.version
                        ),
                    });
                }
                if config.version < REPO_VERSION && exclusive {
                    // Version 1 kept one file per chunk, version 2 whole
                    // manifests; those stay readable, and new chunks go into
                    // packs, new entries into chunks (an older agent would
                    // not see or read them, hence the new number).
                    let config = RepoConfig { version: REPO_VERSION, key_check: check.clone() };
                    let text = serde_json::to_vec_pretty(&config).unwrap_or_default();
                    outpost_shared::fsutil::write_atomic(&config_path, &text, 0o600).map_err(io(&config_path))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = RepoConfig { version: REPO_VERSION, key_check: check };
                let text = serde_json::to_vec_pretty(&config).unwrap_or_default();
                outpost_shared::fsutil::write_atomic(&config_path, &text, 0o600).map_err(io(&config_path))?;
            }
            Err(e) => return Err(io(&config_path)(e)),
        }
        // Leftovers of an interrupted run (only with the lock: without it,
        // they may be a running backup's files).
        let tmp = root.join("tmp");
        if let Some(entries) = fs::read_dir(&tmp).ok().filter(|_| exclusive) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let repo = Repository {
            root: root.to_owned(),
            cipher: XChaCha20Poly1305::new(&enc_key.into()),
            id_key,
            _lock: lock,
            index: std::sync::RwLock::new(load_segments(root)?),
            open_packs: Default::default(),
        };
        if exclusive {
            repo.recover_interrupted_run()?;
        }
        Ok(repo)
    }

    pub(super) fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = hex(id);
        self.root.join("chunks").join(&h[..2]).join(h)
    }

    pub(super) fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackupError> {
        let mut nonce = [0u8; 24];
        rand::fill(&mut nonce[..]);
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| BackupError::Corrupt { what: "encryption".into(), why: "cipher failed".into() })?;
        let mut out = Vec::with_capacity(24 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub(super) fn open_blob(&self, blob: &[u8], aad: &[u8], what: &str) -> Result<Vec<u8>, BackupError> {
        self.open_blob_owned(blob.to_vec(), aad, what)
    }

    /// Like [`Repository::open_blob`], decrypting in the blob's own buffer
    /// (no second chunk-sized buffer).
    pub(super) fn open_blob_owned(&self, mut blob: Vec<u8>, aad: &[u8], what: &str) -> Result<Vec<u8>, BackupError> {
        use chacha20poly1305::aead::AeadInPlace;
        if blob.len() < 24 + 16 {
            return Err(BackupError::Corrupt { what: what.into(), why: "too short".into() });
        }
        let nonce = *XNonce::from_slice(&blob[..24]);
        blob.drain(..24);
        self.cipher.decrypt_in_place(&nonce, aad, &mut blob).map_err(|_| BackupError::Corrupt {
            what: what.into(),
            why: "does not decrypt (altered or wrong key)".into(),
        })?;
        Ok(blob)
    }

    /// Writes `bytes` to `path` through a synced temporary file.
    pub(super) fn write_durably(&self, path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
        let tmp = self.root.join("tmp").join(unique_suffix());
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io(path))?;
        // The rename itself durable before anything names what it wrote (an
        // index segment before the manifest that needs it).
        match path.parent() {
            Some(parent) => fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent)),
            None => Ok(()),
        }
    }

    /// A chunk's blob: compressed (unless that does not help) and sealed
    /// with its id as associated data, the same bytes as [`Repository::seal`]
    /// of the flagged payload: `nonce || XChaCha20-Poly1305(flag || bytes)`.
    /// Built in one buffer, encrypted in place, with `sealer`'s reused zstd
    /// context (a fresh one per chunk zeroed about a megabyte each time:
    /// tens of thousands of times for a tree of small files).
    pub(super) fn seal_chunk(&self, sealer: &mut Sealer, id: &ChunkId, plain: &[u8]) -> Result<Vec<u8>, BackupError> {
        use chacha20poly1305::aead::AeadInPlace;
        let failed = |why: String| BackupError::Corrupt { what: format!("chunk {}", hex(id)), why };
        let Sealer { zstd, compressed } = sealer;
        compressed.clear();
        compressed.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        zstd.compress_to_buffer(plain, compressed).map_err(|e| failed(format!("zstd: {e}")))?;
        // Flag byte: 1 = zstd, 0 = stored (when compression does not help,
        // as for random data), so a restore does not decompress in vain.
        let (flag, payload) = if compressed.len() < plain.len() { (1, compressed.as_slice()) } else { (0, plain) };
        let mut nonce = [0u8; 24];
        rand::fill(&mut nonce[..]);
        let mut blob = Vec::with_capacity(24 + 1 + payload.len() + 16);
        blob.extend_from_slice(&nonce);
        blob.push(flag);
        blob.extend_from_slice(payload);
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), id, &mut blob[24..])
            .map_err(|_| failed("cipher failed".into()))?;
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    /// Where chunk `id` is in a pack, if the index has it.
    pub(super) fn locate(&self, id: &ChunkId) -> Result<Option<pack::Location>, BackupError> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        for segment in index.iter().rev() {
            if let Some(at) = segment.lookup(id)? {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// True if the repository holds chunk `id` (in a pack, or as a file of
    /// the older one-file-per-chunk layout).
    pub(super) fn has_chunk(&self, id: &ChunkId) -> Result<bool, BackupError> {
        Ok(self.locate(id)?.is_some() || self.chunk_path(id).exists())
    }

    /// Adds a durable index segment `name` for `records` (whose packs are
    /// already durable).
    pub(super) fn add_segment(&self, name: &str, records: Vec<pack::Record>) -> Result<(), BackupError> {
        if records.is_empty() {
            return Ok(());
        }
        let path = self.root.join("index").join(name);
        self.write_durably(&path, &pack::encode_segment(records))?;
        let segment = pack::Segment::open(&path)?;
        self.index.write().unwrap_or_else(|p| p.into_inner()).push(segment);
        Ok(())
    }

    /// Reads one blob from its pack, keeping the pack open for the next.
    pub(super) fn read_packed(&self, at: &pack::Location) -> Result<Vec<u8>, BackupError> {
        let cached = self.open_packs.lock().unwrap_or_else(|p| p.into_inner()).get(&at.pack).cloned();
        let file = match cached {
            Some(file) => file,
            None => {
                let path = pack::pack_path(&self.root.join("packs"), &at.pack);
                let file = std::sync::Arc::new(fs::File::open(&path).map_err(io(&path))?);
                let mut open = self.open_packs.lock().unwrap_or_else(|p| p.into_inner());
                if open.len() >= OPEN_PACKS {
                    open.clear();
                }
                open.insert(at.pack, file.clone());
                file
            }
        };
        pack::read_at(&file, at)
            .map_err(|source| BackupError::Io { path: pack::pack_path(&self.root.join("packs"), &at.pack), source })
    }

    /// Reads the index again (another process pruned meanwhile).
    pub(super) fn reload_index(&self) -> Result<(), BackupError> {
        let segments = load_segments(&self.root)?;
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = segments;
        self.open_packs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// Flushes everything written to the repository's file system.
    pub(super) fn sync_all(&self) -> Result<(), BackupError> {
        syncfs(&self.root)
    }

    /// A chunk's blob as stored (encrypted); `None` if it is not here.
    /// Readers without the lock (uploads) may find a pack a prune just
    /// repacked: they read the index again once.
    pub(super) fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, BackupError> {
        if let Some(at) = self.locate(id)? {
            match self.read_packed(&at) {
                Err(BackupError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    self.reload_index()?;
                    if let Some(at) = self.locate(id)? {
                        return self.read_packed(&at).map(Some);
                    }
                }
                other => return other.map(Some),
            }
        }
        let path = self.chunk_path(id);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Reads a chunk and checks it: decrypts, decompresses and re-hashes.
    pub fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackupError> {
        match self.chunk_blob(id)? {
            Some(blob) => self.open_chunk(id, blob),
            None => Err(BackupError::Corrupt { what: format!("chunk {}", hex(id)), why: "missing".into() }),
        }
    }

    /// Decrypts, decompresses and re-hashes a chunk's blob.
    pub(super) fn open_chunk(&self, id: &ChunkId, blob: Vec<u8>) -> Result<Vec<u8>, BackupError> {
        let what = format!("chunk {}", hex(id));
        let mut framed = self.open_blob_owned(blob, id, &what)?;
        let plain = match framed.first() {
            Some(0) => {
                framed.drain(..1);
                framed
            }
            Some(1) => {
                // Sized from the frame (zstd records the content size), at
                // most the largest chunk: no 4 MiB buffer for a 2 KiB file.
                let size = zstd::zstd_safe::get_frame_content_size(&framed[1..])
                    .ok()
                    .flatten()
                    .map_or(MAX_CHUNK, |n| usize::try_from(n).unwrap_or(MAX_CHUNK).min(MAX_CHUNK));
                zstd::bulk::decompress(&framed[1..], size).map_err(|e| BackupError::Corrupt {
                    what: what.clone(),
                    why: format!("does not decompress: {e}"),
                })?
            }
            _ => return Err(BackupError::Corrupt { what, why: "unknown chunk format".into() }),
        };
        if blake3::keyed_hash(&self.id_key, &plain).as_bytes() != id {
            return Err(BackupError::Corrupt { what, why: "content does not match its id".into() });
        }
        Ok(plain)
    }

    /// Every snapshot's name, oldest first.
    pub(super) fn snapshot_names(&self) -> Result<Vec<String>, BackupError> {
        let dir = self.root.join("snapshots");
        let mut names: Vec<String> =
            fs::read_dir(&dir).map_err(io(&dir))?.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        Ok(names)
    }

    /// Calls `visit` with every snapshot, oldest first, one decoded at a
    /// time: a device with many snapshots of a large tree never holds more
    /// than one manifest.
    pub fn each_snapshot(&self, mut visit: impl FnMut(Snapshot) -> Result<(), BackupError>) -> Result<(), BackupError> {
        for name in self.snapshot_names()? {
            visit(self.snapshot(&name)?)?;
        }
        Ok(())
    }

    /// What `backup list` shows of every snapshot, oldest first: heads
    /// only, no entry is read.
    pub fn snapshot_infos(&self) -> Result<Vec<SnapshotInfo>, BackupError> {
        self.snapshot_names()?.iter().map(|name| Ok(SnapshotInfo::from(&self.snapshot_head(name)?))).collect()
    }

    /// A snapshot's manifest as stored (encrypted).
    pub(super) fn snapshot_blob(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        let path = self.root.join("snapshots").join(name);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BackupError::NoSnapshot(name.into())),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// One snapshot by name, its entries read from the repository.
    pub fn snapshot(&self, name: &str) -> Result<Snapshot, BackupError> {
        self.decode_snapshot_with(name, &self.snapshot_blob(name)?, |id| self.chunk(id))
    }

    /// The snapshot `name`, or the newest (of `set`, if given) for `latest`.
    pub fn find(&self, name: &str, set: Option<&str>) -> Result<Snapshot, BackupError> {
        if name != "latest" {
            return self.snapshot(name);
        }
        let newest = self.newest_name(set)?.ok_or_else(|| BackupError::NoSnapshot("latest".into()))?;
        self.snapshot(&newest)
    }

    /// The newest snapshot's name (of `set`, if given), read from the names
    /// alone (`<ms>-<set>-<8 hex>` sorts by time): no manifest is decoded
    /// but the one a caller then reads.
    pub(super) fn newest_name(&self, set: Option<&str>) -> Result<Option<String>, BackupError> {
        Ok(self.snapshot_names()?.into_iter().rev().find(|n| set.is_none_or(|set| snapshot::set_of(n) == Some(set))))
    }
}

/// A writer thread's reused state for [`Repository::seal_chunk`].
pub(super) struct Sealer {
    zstd: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Sealer {
    pub(super) fn new() -> Result<Self, BackupError> {
        let zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map_err(|e| BackupError::Corrupt { what: "compressor".into(), why: format!("zstd: {e}") })?;
        Ok(Sealer { zstd, compressed: Vec::new() })
    }
}

#[allow(unsafe_code)]
pub(super) fn lock_exclusive(file: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Starts writing a file's dirty pages to disk without waiting, so the
/// `syncfs` at the end of a run finds little left to do.
#[allow(unsafe_code)]
pub(super) fn start_writeback(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a descriptor we own; only a hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// The index segments under `root/index`, oldest first.
fn load_segments(root: &Path) -> Result<Vec<pack::Segment>, BackupError> {
    let dir = root.join("index");
    let mut names: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&dir)(e)),
    };
    names.sort();
    names.iter().map(|p| pack::Segment::open(p)).collect()
}
