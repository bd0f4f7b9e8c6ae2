//! Local backups: a deduplicating, compressed, encrypted repository under
//! the data dir, with snapshots of backup sets, restore, verify and prune.
//!
//! Layout of `<data_dir>/backups/`:
//! - `config`: repository version and a check value of the key, so a wrong
//!   key is refused before anything is written.
//! - `chunks/<2 hex>/<64 hex>`: one blob per chunk. Files are cut by
//!   content-defined chunking (FastCDC, 256 KiB min / 1 MiB average / 4 MiB
//!   max), so an edit moves only the chunks around it. A chunk's id is the
//!   BLAKE3 hash of its plaintext keyed with a key derived from the backup
//!   key, so ids reveal nothing to whoever stores the blobs. A blob is
//!   `nonce (24 bytes) || XChaCha20-Poly1305(zstd(chunk))`, with the id as
//!   associated data: a blob cannot be swapped for another.
//! - `snapshots/<name>`: one encrypted manifest per snapshot (files with
//!   path, mode, owner, mtime, size and chunk list; directories; symlinks)
//!   and its report of problems.
//! - `lock`: an exclusive `flock` while an operation writes.
//!
//! Incremental: a file whose size, mtime and inode match the set's previous
//! snapshot is not read again; its chunk list is reused.
//!
//! Upload (sets with `upload = true`): the blobs and manifests go to the hub
//! as they are (the hub never sees plaintext), over a bulk connection
//! ([`crate::bulk`]): the agent asks which chunks the hub lacks, sends only
//! those, several at once, and catalogs the snapshot at the hub once every
//! chunk arrived. A chunk the hub answered for is never sent again, so an
//! interrupted upload resumes where it stopped. `upload-pending` in the
//! repository marks that something is left to send; the daemon runs an
//! upload when its uplink is connected and the mark is there.
//!
//! Writes are crash-safe: blobs and manifests are written to a temporary
//! file, synced and renamed; a snapshot exists only once its manifest is in
//! place, after every chunk it names. A failed run (a full disk, a crash)
//! leaves at most unreferenced chunks, which `prune` removes. Chunks are
//! synced once per run (one `syncfs` before the manifest), so a power cut
//! during a run can leave chunk files that exist but are torn; the next run
//! would take them for stored. A run therefore marks the repository
//! `unsynced` (with its start time) until its sync, and opening a marked
//! repository first checks every chunk written since that start and
//! deletes the damaged ones, so they are stored again.

use crate::bulk::{BulkClient, BulkError};
use crate::config::BackupSet;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use outpost_shared::DeviceId;
use outpost_shared::protocol::{ChunkBlob, ChunkIds, ChunkRef, Message, SnapshotData, SnapshotRef, SnapshotSummary};
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Chunk size bounds (bytes).
const MIN_CHUNK: usize = 256 << 10;
const AVG_CHUNK: usize = 1 << 20;
const MAX_CHUNK: usize = 4 << 20;
/// zstd level: fast, still compresses text well.
const ZSTD_LEVEL: i32 = 3;
const REPO_VERSION: u32 = 1;

/// A chunk id: keyed BLAKE3 of the plaintext.
pub use outpost_shared::protocol::ChunkId;

/// Chunk transfers (uploads, fetches for a restore) in flight at once.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Ids per "which of these do you lack" question.
const IDS_PER_QUERY: usize = 16 * 1024;
/// The file that marks snapshots waiting for upload.
const UPLOAD_PENDING: &str = "upload-pending";
/// The file that marks a run whose chunks are not yet known to be on disk;
/// holds the run's start (ms since the epoch).
const UNSYNCED: &str = "unsynced";

/// Errors of backup operations.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file or directory of the repository could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key does not open this repository.
    #[error("the backup key does not match this repository (wrong key_file?)")]
    WrongKey,
    /// A restore refused an entry (it would leave the target, or replace
    /// a file that differs).
    #[error("{0}")]
    Refused(String),
    /// The key file is not 32 bytes in hex.
    #[error(
        "[backups] key_file {0}: expected 64 hex digits (32 bytes); make one with `head -c 32 /dev/urandom | xxd -p -c 64`"
    )]
    BadKey(PathBuf),
    /// The key file cannot be read.
    #[error("[backups] key_file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Data in the repository does not decrypt, decode or hash to its id.
    #[error("corrupt {what}: {why}")]
    Corrupt {
        /// Which blob.
        what: String,
        /// Why.
        why: String,
    },
    /// No such snapshot.
    #[error("no snapshot {0}")]
    NoSnapshot(String),
    /// No such backup set in the config.
    #[error("no backup set {0:?} in the config")]
    NoSet(String),
    /// A restore could not write every file correctly.
    #[error("restore incomplete: {0} file(s) not restored (see above)")]
    RestoreIncomplete(usize),
    /// The hub could not be reached or refused.
    #[error("hub: {0}")]
    Hub(#[from] BulkError),
    /// The device's identity (for the hub) could not be loaded.
    #[error("{0}")]
    Setup(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

/// One entry of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path on the device.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// Kinds of entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File {
        /// Bytes.
        size: u64,
        /// Inode at backup time (for the incremental check).
        inode: u64,
        /// Its chunks, in order.
        chunks: Vec<ChunkId>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: String,
    },
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its name (file name in `snapshots/`).
    pub name: String,
    /// The backup set.
    pub set: String,
    /// When it started.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
    /// The set's paths at the time.
    pub paths: Vec<String>,
    /// Everything backed up.
    pub entries: Vec<Entry>,
    /// What could not be backed up, or changed while read.
    pub problems: Vec<String>,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
    /// Files read this time (the others were unchanged).
    pub files_read: u64,
    /// Chunks this snapshot added to the repository.
    pub new_chunks: u64,
    /// Bytes those new chunks take on disk (compressed, encrypted).
    pub new_stored_bytes: u64,
}

/// A snapshot's summary, for lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// Backup set.
    pub set: String,
    /// Start, RFC 3339.
    pub started: String,
    /// Files, directories and links.
    pub entries: usize,
    /// Bytes of file content.
    pub bytes: u64,
    /// Problems reported.
    pub problems: usize,
}

impl From<&Snapshot> for SnapshotInfo {
    fn from(s: &Snapshot) -> Self {
        SnapshotInfo {
            name: s.name.clone(),
            set: s.set.clone(),
            started: s.started.rfc3339(),
            entries: s.entries.len(),
            bytes: s.bytes,
            problems: s.problems.len(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RepoConfig {
    version: u32,
    key_check: String,
}

/// Reads the operator's backup key: 64 hex digits (whitespace ignored).
pub fn read_key(path: &Path) -> Result<[u8; 32], BackupError> {
    let text = fs::read_to_string(path).map_err(|source| BackupError::KeyFile { path: path.to_owned(), source })?;
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if hex.len() != 64 {
        return Err(BackupError::BadKey(path.to_owned()));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| BackupError::BadKey(path.to_owned()))?;
    }
    Ok(key)
}

/// An open repository. Held exclusively while it lives, unless opened with
/// [`Repository::open_unlocked`] to read (upload, restore from the hub).
pub struct Repository {
    root: PathBuf,
    cipher: XChaCha20Poly1305,
    id_key: [u8; 32],
    _lock: Option<fs::File>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("root", &self.root).finish()
    }
}

fn hex(id: &[u8]) -> String {
    outpost_shared::identity::hex(id)
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

    fn open_with(root: &Path, key: &[u8; 32], exclusive: bool) -> Result<Self, BackupError> {
        for dir in [root.to_owned(), root.join("chunks"), root.join("snapshots"), root.join("tmp")] {
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
        let repo =
            Repository { root: root.to_owned(), cipher: XChaCha20Poly1305::new(&enc_key.into()), id_key, _lock: lock };
        if exclusive {
            repo.recover_interrupted_run()?;
        }
        Ok(repo)
    }

    /// After a run that ended before its sync (see the module docs): checks
    /// the chunks written since it began (a minute of slack for the clock)
    /// and deletes those that do not decrypt and hash to their id.
    fn recover_interrupted_run(&self) -> Result<(), BackupError> {
        let marker = self.root.join(UNSYNCED);
        let started = match fs::read_to_string(&marker) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&marker)(e)),
        };
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(started.saturating_sub(60_000));
        let (mut checked, mut removed) = (0usize, 0usize);
        for path in self.chunk_files()? {
            let Some(id) = path.file_name().and_then(|n| parse_id(&n.to_string_lossy())) else {
                // A half-written `<id>.tmp`.
                let _ = fs::remove_file(&path);
                continue;
            };
            if fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|m| m < since) {
                continue;
            }
            checked += 1;
            if let Err(e) = self.chunk(&id) {
                eprintln!("removing a chunk an interrupted backup left damaged: {e}");
                fs::remove_file(&path).map_err(io(&path))?;
                removed += 1;
            }
        }
        self.sync_all()?;
        fs::remove_file(&marker).map_err(io(&marker))?;
        eprintln!(
            "an earlier backup was interrupted: checked the {checked} chunk(s) it may have written, removed {removed}"
        );
        Ok(())
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = hex(id);
        self.root.join("chunks").join(&h[..2]).join(h)
    }

    fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackupError> {
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

    fn open_blob(&self, blob: &[u8], aad: &[u8], what: &str) -> Result<Vec<u8>, BackupError> {
        if blob.len() < 24 + 16 {
            return Err(BackupError::Corrupt { what: what.into(), why: "too short".into() });
        }
        self.cipher.decrypt(XNonce::from_slice(&blob[..24]), Payload { msg: &blob[24..], aad }).map_err(|_| {
            BackupError::Corrupt { what: what.into(), why: "does not decrypt (altered or wrong key)".into() }
        })
    }

    /// Writes `bytes` to `path` through a synced temporary file.
    fn write_durably(&self, path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
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
        result.map_err(io(path))
    }

    /// Stores a chunk unless present; returns the bytes written (0 if it
    /// was there). Not synced: [`Repository::backup`] syncs the file system
    /// once before it writes the manifest that names the chunks.
    fn put_chunk(&self, id: &ChunkId, plain: &[u8]) -> Result<u64, BackupError> {
        let path = self.chunk_path(id);
        if path.exists() {
            return Ok(0);
        }
        let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL).map_err(io(&path))?;
        // Flag byte: 1 = zstd, 0 = stored (when compression does not help,
        // as for random data), so a restore does not decompress in vain.
        let mut framed = Vec::with_capacity(1 + compressed.len().min(plain.len()));
        if compressed.len() < plain.len() {
            framed.push(1);
            framed.extend_from_slice(&compressed);
        } else {
            framed.push(0);
            framed.extend_from_slice(plain);
        }
        let blob = self.seal(&framed, id)?;
        // A name of this writer's own: two writers never share a temporary
        // file (a chunk is queued once per run, but an upload or a crash
        // leftover must not meet it either).
        let tmp = path.with_extension(format!("{}.tmp", unique_suffix()));
        let result = (|| {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&blob)?;
            start_writeback(&file);
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io(&path))?;
        Ok(blob.len() as u64)
    }

    /// Flushes everything written to the repository's file system.
    fn sync_all(&self) -> Result<(), BackupError> {
        syncfs(&self.root)
    }

    /// A chunk's blob as stored (encrypted); `None` if it is not here.
    fn chunk_blob(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, BackupError> {
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
            Some(blob) => self.open_chunk(id, &blob),
            None => Err(BackupError::Corrupt { what: format!("chunk {}", hex(id)), why: "missing".into() }),
        }
    }

    /// Decrypts, decompresses and re-hashes a chunk's blob.
    fn open_chunk(&self, id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>, BackupError> {
        let what = format!("chunk {}", hex(id));
        let framed = self.open_blob(blob, id, &what)?;
        let plain = match framed.split_first() {
            Some((0, stored)) => stored.to_vec(),
            Some((1, compressed)) => zstd::bulk::decompress(compressed, MAX_CHUNK)
                .map_err(|e| BackupError::Corrupt { what: what.clone(), why: format!("does not decompress: {e}") })?,
            _ => return Err(BackupError::Corrupt { what, why: "unknown chunk format".into() }),
        };
        if blake3::keyed_hash(&self.id_key, &plain).as_bytes() != id {
            return Err(BackupError::Corrupt { what, why: "content does not match its id".into() });
        }
        Ok(plain)
    }

    /// Every snapshot's name, oldest first.
    fn snapshot_names(&self) -> Result<Vec<String>, BackupError> {
        let dir = self.root.join("snapshots");
        let mut names: Vec<String> =
            fs::read_dir(&dir).map_err(io(&dir))?.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        Ok(names)
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, BackupError> {
        self.snapshot_names()?.iter().map(|n| self.snapshot(n)).collect()
    }

    /// A snapshot's manifest as stored (encrypted).
    fn snapshot_blob(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        let path = self.root.join("snapshots").join(name);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BackupError::NoSnapshot(name.into())),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// One snapshot by name.
    pub fn snapshot(&self, name: &str) -> Result<Snapshot, BackupError> {
        self.decode_snapshot(name, &self.snapshot_blob(name)?)
    }

    /// Decrypts and decodes a manifest (from this repository or the hub).
    fn decode_snapshot(&self, name: &str, blob: &[u8]) -> Result<Snapshot, BackupError> {
        let what = format!("snapshot {name}");
        let plain = self.open_blob(blob, name.as_bytes(), &what)?;
        postcard::from_bytes(&plain).map_err(|e| BackupError::Corrupt { what, why: e.to_string() })
    }

    /// The snapshot `name`, or the newest (of `set`, if given) for `latest`.
    pub fn find(&self, name: &str, set: Option<&str>) -> Result<Snapshot, BackupError> {
        if name != "latest" {
            return self.snapshot(name);
        }
        self.snapshots()?
            .into_iter()
            .rev()
            .find(|s| set.is_none_or(|set| s.set == set))
            .ok_or_else(|| BackupError::NoSnapshot("latest".into()))
    }

    /// Backs up `set` and writes its snapshot.
    pub fn backup(&self, set: &BackupSet) -> Result<Snapshot, BackupError> {
        let started = Timestamp::now();
        let previous: HashMap<String, Entry> = self
            .snapshots()?
            .into_iter()
            .rev()
            .find(|s| s.set == set.name)
            .map(|s| s.entries.into_iter().map(|e| (e.path.clone(), e)).collect())
            .unwrap_or_default();
        let unsynced = self.root.join(UNSYNCED);
        self.write_durably(&unsynced, started.0.to_string().as_bytes())?;
        let exclude = set.exclude_matcher();
        // Two stages: this thread walks, reads, chunks and hashes; writer
        // threads (one per CPU) compress, encrypt and store new chunks.
        let (entries, problems, stats) = std::thread::scope(|scope| {
            let (sink, chunks) = std::sync::mpsc::sync_channel::<(ChunkId, Vec<u8>)>(8);
            let chunks = std::sync::Arc::new(std::sync::Mutex::new(chunks));
            let writers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
            let writers: Vec<_> = (0..writers)
                .map(|_| {
                    let chunks = chunks.clone();
                    scope.spawn(move || {
                        let (mut new_chunks, mut stored) = (0u64, 0u64);
                        loop {
                            let next = chunks.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok((id, data)) = next else { break };
                            let written = self.put_chunk(&id, &data)?;
                            if written > 0 {
                                new_chunks += 1;
                                stored += written;
                            }
                        }
                        Ok::<_, BackupError>((new_chunks, stored))
                    })
                })
                .collect();
            let mut run = Run {
                repo: self,
                previous,
                exclude,
                entries: Vec::new(),
                problems: Vec::new(),
                stats: Stats::default(),
                sink,
                queued: HashSet::new(),
                buffer: Vec::new(),
            };
            let walked = set.paths.iter().try_for_each(|path| run.walk(Path::new(path)));
            let Run { entries, problems, mut stats, sink, .. } = run;
            drop(sink);
            for writer in writers {
                let written = writer.join().unwrap_or_else(|_| {
                    Err(BackupError::Corrupt { what: "backup writer".into(), why: "panicked".into() })
                });
                // A writer failure (a full disk) is the cause of a walk
                // failure.
                let (new_chunks, stored) = written?;
                stats.new_chunks += new_chunks;
                stats.new_stored_bytes += stored;
            }
            walked?;
            Ok::<_, BackupError>((entries, problems, stats))
        })?;
        self.sync_all()?;
        let mut random = [0u8; 4];
        rand::fill(&mut random[..]);
        let name = format!("{}-{}-{}", started.0, set.name, hex(&random));
        let snapshot = Snapshot {
            name: name.clone(),
            set: set.name.clone(),
            started,
            ended: Timestamp::now(),
            paths: set.paths.clone(),
            entries,
            problems,
            bytes: stats.bytes,
            files_read: stats.files_read,
            new_chunks: stats.new_chunks,
            new_stored_bytes: stats.new_stored_bytes,
        };
        let plain = postcard::to_stdvec(&snapshot).unwrap_or_default();
        let blob = self.seal(&plain, name.as_bytes())?;
        self.write_durably(&self.root.join("snapshots").join(&name), &blob)?;
        // Every chunk is on disk (synced above); losing this removal only
        // costs the next run a check.
        let _ = fs::remove_file(&unsynced);
        Ok(snapshot)
    }

    /// Restores `snapshot` (or the entries under `to.only`) into
    /// `to.target`. Each file is written to a temporary name and renamed
    /// only once every chunk checked out; a file that cannot be restored is
    /// reported and the restore fails at the end.
    pub fn restore(&self, snapshot: &Snapshot, to: &RestoreTo<'_>) -> Result<u64, BackupError> {
        self.restore_with(snapshot, to, &|id| self.chunk(id))
    }

    /// Like [`Repository::restore`], with chunks from `chunk` (checked
    /// plaintext by id), e.g. fetched from the hub.
    ///
    /// A manifest is not trusted (every device holds the fleet's key, so a
    /// compromised one can write any manifest): each entry's path is
    /// confined to the target ([`confined_path`]), an entry under a
    /// symbolic link this restore made is refused, and an existing file
    /// that differs is kept unless `to.overwrite`. Durability: one `syncfs`
    /// of the target's file system at the end, not one sync per file.
    fn restore_with(
        &self,
        snapshot: &Snapshot,
        to: &RestoreTo<'_>,
        chunk: &dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError>,
    ) -> Result<u64, BackupError> {
        let target = to.target;
        fs::create_dir_all(target).map_err(io(target))?;
        let mut failed = 0usize;
        let mut restored = 0u64;
        let mut dirs = Vec::new();
        let mut links = BTreeSet::new();
        for entry in snapshot.selected(to.only) {
            let result = confined_path(&entry.path, &links).map_err(BackupError::Refused).and_then(|relative| {
                let dest = target.join(&relative);
                match existing(&dest, entry) {
                    Existing::Same => return Ok(()),
                    Existing::Differs if !to.overwrite => {
                        return Err(BackupError::Refused(format!(
                            "{} exists and differs from the backup (--overwrite replaces it)",
                            dest.display()
                        )));
                    }
                    Existing::Differs | Existing::Absent => {}
                }
                match &entry.kind {
                    EntryKind::Dir => {
                        let r = fs::create_dir_all(&dest).map_err(io(&dest));
                        dirs.push((dest, entry));
                        r
                    }
                    EntryKind::Symlink { target: link } => {
                        links.insert(relative);
                        (|| {
                            if let Some(parent) = dest.parent() {
                                fs::create_dir_all(parent).map_err(io(parent))?;
                            }
                            let _ = fs::remove_file(&dest);
                            std::os::unix::fs::symlink(link, &dest).map_err(io(&dest))
                        })()
                    }
                    EntryKind::File { chunks, .. } => {
                        restore_file(&dest, chunks, chunk).and_then(|()| apply_meta(&dest, entry))
                    }
                }
            });
            match result {
                Ok(()) => restored += 1,
                Err(e) => {
                    failed += 1;
                    tracing::error!(path = %entry.path, error = %e, "Not restored.");
                    eprintln!("not restored: {}: {e}", entry.path);
                }
            }
        }
        // Directory times last, after their contents were written.
        for (dest, entry) in dirs.iter().rev() {
            if let Err(e) = apply_meta(dest, entry) {
                tracing::warn!(path = %entry.path, error = %e, "Directory metadata not restored.");
            }
        }
        syncfs(target)?;
        if failed > 0 {
            return Err(BackupError::RestoreIncomplete(failed));
        }
        Ok(restored)
    }
}

/// Where and how a restore writes.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTo<'a> {
    /// The directory the snapshot's absolute paths are restored under
    /// (`/` restores in place).
    pub target: &'a Path,
    /// Only these paths and what is under them (all if empty).
    pub only: &'a [String],
    /// Replace existing files that differ from the backup.
    pub overwrite: bool,
}

/// The path under the target where a manifest entry goes: its absolute
/// path made relative. Refused (with why) if it has a `..`, `.` or empty
/// name, or lies under a symbolic link made earlier in the same restore
/// (`links`, relative), since the restore would then write wherever the
/// link points.
pub fn confined_path(path: &str, links: &BTreeSet<PathBuf>) -> Result<PathBuf, String> {
    if path.contains('\0') {
        return Err(format!("{path:?}: a path with a NUL byte"));
    }
    let mut relative = PathBuf::new();
    for (i, name) in path.trim_start_matches('/').split('/').enumerate() {
        if name.is_empty() || name == "." || name == ".." {
            return Err(format!("{path:?} does not name a place under the target ({name:?} in it)"));
        }
        if i > 0 && links.contains(&relative) {
            return Err(format!("{path:?} lies under {}, a symbolic link this restore made", relative.display()));
        }
        relative.push(name);
    }
    if links.contains(&relative) {
        return Err(format!("{path:?} is a symbolic link this restore made"));
    }
    Ok(relative)
}

/// What is already where an entry is restored.
enum Existing {
    /// Nothing (or a directory where a directory goes).
    Absent,
    /// The same (a file of the same size and modification time, a link to
    /// the same target): left as it is.
    Same,
    /// Something else.
    Differs,
}

fn existing(dest: &Path, entry: &Entry) -> Existing {
    let Ok(meta) = fs::symlink_metadata(dest) else { return Existing::Absent };
    if matches!(entry.kind, EntryKind::Dir) && meta.is_dir() {
        // An existing directory is used as it is; its metadata is still
        // restored after its contents.
        return Existing::Absent;
    }
    let same_time = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()) == entry.mtime_ns;
    let same = match &entry.kind {
        EntryKind::Dir => false,
        EntryKind::File { size, .. } => meta.is_file() && meta.len() == *size && same_time,
        EntryKind::Symlink { target } => {
            meta.file_type().is_symlink() && fs::read_link(dest).is_ok_and(|t| t.as_os_str() == target.as_str())
        }
    };
    if same { Existing::Same } else { Existing::Differs }
}

/// Flushes everything written to the file system that holds `path`.
fn syncfs(path: &Path) -> Result<(), BackupError> {
    let dir = fs::File::open(path).map_err(io(path))?;
    #[allow(unsafe_code)]
    // SAFETY: syncfs(2) on a descriptor we own.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
    if rc == 0 { Ok(()) } else { Err(io(path)(std::io::Error::last_os_error())) }
}

impl Snapshot {
    /// The entries a restore of `only` (all if empty) writes, in order.
    fn selected<'a>(&'a self, only: &'a [String]) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| {
            only.is_empty()
                || only.iter().any(|o| e.path == *o || e.path.starts_with(&format!("{}/", o.trim_end_matches('/'))))
        })
    }
}

/// Writes a file from its chunks through a temporary name, renamed into
/// place only once every chunk checked out.
fn restore_file(
    dest: &Path,
    chunks: &[ChunkId],
    chunk: &dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError>,
) -> Result<(), BackupError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = dest.with_file_name(format!(
        ".{}.{}.outpost-restore",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        unique_suffix()
    ));
    let result = (|| {
        // create_new: never through a link or onto a file someone put there.
        let mut file = fs::File::create_new(&tmp).map_err(io(&tmp))?;
        for id in chunks {
            let plain = chunk(id)?;
            file.write_all(&plain).map_err(io(&tmp))?;
        }
        // Synced with the whole restore (one syncfs at its end).
        fs::rename(&tmp, dest).map_err(io(dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl Repository {
    /// Re-reads every chunk the snapshots name (and any other chunk in the
    /// repository) and checks it. Returns the problems found, each naming
    /// the chunk and the snapshots and files that need it.
    pub fn verify(&self) -> Result<Vec<String>, BackupError> {
        let mut users: BTreeMap<ChunkId, Vec<String>> = BTreeMap::new();
        let mut problems = Vec::new();
        let snapshots = match self.snapshots() {
            Ok(s) => s,
            Err(e) => {
                problems.push(e.to_string());
                Vec::new()
            }
        };
        for s in &snapshots {
            for e in &s.entries {
                if let EntryKind::File { chunks, .. } = &e.kind {
                    for id in chunks {
                        users.entry(*id).or_default().push(format!("{}:{}", s.name, e.path));
                    }
                }
            }
        }
        for id in self.stored_chunks()? {
            users.entry(id).or_default();
        }
        for (id, needed_by) in &users {
            if let Err(e) = self.chunk(id) {
                let mut who: Vec<&String> = needed_by.iter().collect();
                who.dedup();
                let shown: Vec<String> = who.iter().take(3).map(|s| s.to_string()).collect();
                let more = if who.len() > 3 { format!(" and {} more", who.len() - 3) } else { String::new() };
                let needed = if who.is_empty() {
                    "unreferenced".into()
                } else {
                    format!("needed by {}{more}", shown.join(", "))
                };
                problems.push(format!("{e} ({needed})"));
            }
        }
        Ok(problems)
    }

    /// Every file under `chunks/`: chunks, and `<id>.tmp` files a crash
    /// left half-written.
    fn chunk_files(&self) -> Result<Vec<PathBuf>, BackupError> {
        let dir = self.root.join("chunks");
        let mut files = Vec::new();
        for sub in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let sub = sub.path();
            files.extend(fs::read_dir(&sub).map_err(io(&sub))?.flatten().map(|e| e.path()));
        }
        Ok(files)
    }

    fn stored_chunks(&self) -> Result<Vec<ChunkId>, BackupError> {
        Ok(self
            .chunk_files()?
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| parse_id(&n.to_string_lossy())))
            .collect())
    }

    /// Applies each set's retention to its snapshots, then deletes chunks
    /// no remaining snapshot needs. Returns (snapshots removed, chunks
    /// removed).
    pub fn prune(&self, sets: &[BackupSet]) -> Result<(Vec<String>, usize), BackupError> {
        let snapshots = self.snapshots()?;
        let mut removed = Vec::new();
        for set in sets {
            let mine: Vec<&Snapshot> = snapshots.iter().filter(|s| s.set == set.name).collect();
            let keep = set.retention.keep(&mine.iter().map(|s| s.started).collect::<Vec<_>>());
            for (i, s) in mine.iter().enumerate() {
                if !keep.contains(&i) {
                    let path = self.root.join("snapshots").join(&s.name);
                    fs::remove_file(&path).map_err(io(&path))?;
                    removed.push(s.name.clone());
                }
            }
        }
        let mut needed = BTreeSet::new();
        for s in self.snapshots()? {
            for e in s.entries {
                if let EntryKind::File { chunks, .. } = e.kind {
                    needed.extend(chunks);
                }
            }
        }
        // Chunk files a crash left half-written.
        for leftover in self.chunk_files()?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "tmp")) {
            let _ = fs::remove_file(leftover);
        }
        let mut chunks_removed = 0;
        for id in self.stored_chunks()? {
            if !needed.contains(&id) {
                let path = self.chunk_path(&id);
                fs::remove_file(&path).map_err(io(&path))?;
                chunks_removed += 1;
            }
        }
        Ok((removed, chunks_removed))
    }
}

/// Random hex for temporary file names no other writer uses.
fn unique_suffix() -> String {
    let mut suffix = [0u8; 8];
    rand::fill(&mut suffix[..]);
    hex(&suffix)
}

fn parse_id(name: &str) -> Option<ChunkId> {
    if name.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[allow(unsafe_code)]
fn lock_exclusive(file: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Starts writing a file's dirty pages to disk without waiting, so the
/// `syncfs` at the end of a run finds little left to do.
#[allow(unsafe_code)]
fn start_writeback(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a descriptor we own; only a hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Asks the kernel to read a file ahead (it is read next), so reading
/// overlaps with chunking and hashing the current one.
#[allow(unsafe_code)]
fn prefetch(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = fs::File::open(path) {
        // SAFETY: posix_fadvise(2) on a descriptor we own; only a hint.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
        }
    }
}

/// Sets mode, owner (when permitted) and mtime.
fn apply_meta(dest: &Path, entry: &Entry) -> Result<(), BackupError> {
    fs::set_permissions(dest, fs::Permissions::from_mode(entry.mode & 0o7777)).map_err(io(dest))?;
    let _ = std::os::unix::fs::chown(dest, Some(entry.uid), Some(entry.gid));
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(entry.mtime_ns).unwrap_or(0));
    let file = fs::File::open(dest).map_err(io(dest))?;
    file.set_modified(mtime).map_err(io(dest))
}

#[derive(Debug, Default)]
struct Stats {
    bytes: u64,
    files_read: u64,
    new_chunks: u64,
    new_stored_bytes: u64,
}

struct Run<'a> {
    repo: &'a Repository,
    previous: HashMap<String, Entry>,
    exclude: globset::GlobSet,
    entries: Vec<Entry>,
    problems: Vec<String>,
    stats: Stats,
    /// New chunks go to the writer thread.
    sink: std::sync::mpsc::SyncSender<(ChunkId, Vec<u8>)>,
    /// Chunks already sent to the writers or found stored in this run: a
    /// chunk is written once however many files contain it.
    queued: HashSet<ChunkId>,
    /// Small files are read whole into this one buffer, reused.
    buffer: Vec<u8>,
}

impl Run<'_> {
    /// Backs up `path` and everything under it. Problems with single files
    /// are recorded and skipped; a repository write failure ends the run.
    fn walk(&mut self, path: &Path) -> Result<(), BackupError> {
        let text = path.to_string_lossy().into_owned();
        if self.exclude.is_match(path) {
            return Ok(());
        }
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                self.problems.push(format!("{text}: {e}"));
                return Ok(());
            }
        };
        let base = |kind| Entry {
            path: text.clone(),
            kind,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => {
                    self.entries.push(base(EntryKind::Symlink { target: target.to_string_lossy().into_owned() }))
                }
                Err(e) => self.problems.push(format!("{text}: {e}")),
            }
        } else if ft.is_dir() {
            self.entries.push(base(EntryKind::Dir));
            let mut children: Vec<PathBuf> = match fs::read_dir(path) {
                Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
                Err(e) => {
                    self.problems.push(format!("{text}: {e}"));
                    return Ok(());
                }
            };
            children.sort();
            for (i, child) in children.iter().enumerate() {
                if let Some(next) = children.get(i + 1)
                    && self.needs_reading(next)
                {
                    prefetch(next);
                }
                self.walk(child)?;
            }
        } else if ft.is_file() {
            let entry = base(EntryKind::Dir);
            let chunks = match self.unchanged(&text, &meta) {
                Some(chunks) => chunks.clone(),
                None => match self.read_file(path, &meta)? {
                    Some(chunks) => chunks,
                    None => return Ok(()),
                },
            };
            self.stats.bytes += meta.len();
            self.entries.push(Entry { kind: EntryKind::File { size: meta.len(), inode: meta.ino(), chunks }, ..entry });
        } else {
            self.problems.push(format!("{text}: skipped (not a file, directory or symlink)"));
        }
        Ok(())
    }

    /// True for a regular file the previous snapshot does not cover.
    fn needs_reading(&self, path: &Path) -> bool {
        fs::symlink_metadata(path)
            .is_ok_and(|meta| meta.is_file() && self.unchanged(&path.to_string_lossy(), &meta).is_none())
    }

    /// The chunk list of the previous snapshot's `path`, if the file is
    /// unchanged since: same size, mtime and inode.
    fn unchanged(&self, path: &str, meta: &fs::Metadata) -> Option<&Vec<ChunkId>> {
        let previous = self.previous.get(path)?;
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        match &previous.kind {
            EntryKind::File { size, inode, chunks }
                if *size == meta.len() && *inode == meta.ino() && previous.mtime_ns == mtime_ns =>
            {
                Some(chunks)
            }
            _ => None,
        }
    }

    /// Chunks and stores a file; `None` (with a problem recorded) if it
    /// cannot be read.
    fn read_file(&mut self, path: &Path, before: &fs::Metadata) -> Result<Option<Vec<ChunkId>>, BackupError> {
        let text = path.to_string_lossy().into_owned();
        let mut file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.problems.push(format!("{text}: {e}"));
                return Ok(None);
            }
        };
        self.stats.files_read += 1;
        let mut chunks = Vec::new();
        let mut read = 0u64;
        // Most files of a real tree are small: read them whole into the
        // reused buffer and cut them in place, instead of a fresh, zeroed
        // streaming buffer of the largest chunk size per file.
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        if let Err(e) = (&mut file).take(MAX_CHUNK as u64 + 1).read_to_end(&mut buffer) {
            self.problems.push(format!("{text}: read failed: {e}"));
            self.buffer = buffer;
            return Ok(None);
        }
        if buffer.len() <= MAX_CHUNK {
            read = buffer.len() as u64;
            for cut in fastcdc::v2020::FastCDC::new(&buffer, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
                let piece = &buffer[cut.offset..cut.offset + cut.length];
                let id = *blake3::keyed_hash(&self.repo.id_key, piece).as_bytes();
                self.queue(id, piece.to_vec())?;
                chunks.push(id);
            }
            self.buffer = buffer;
        } else {
            // A large file: what was read goes first, the rest streams.
            // StreamCDC buffers by itself; no BufReader (it would copy twice).
            let source = std::io::Cursor::new(buffer).chain(file);
            for chunk in fastcdc::v2020::StreamCDC::new(source, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        self.problems.push(format!("{text}: read failed: {e}"));
                        return Ok(None);
                    }
                };
                read += chunk.data.len() as u64;
                let id = *blake3::keyed_hash(&self.repo.id_key, &chunk.data).as_bytes();
                self.queue(id, chunk.data)?;
                chunks.push(id);
            }
        }
        match fs::symlink_metadata(path) {
            Ok(after)
                if after.len() == before.len()
                    && after.mtime_nsec() == before.mtime_nsec()
                    && after.mtime() == before.mtime()
                    && read == before.len() => {}
            _ => self.problems.push(format!("{text}: changed while read (stored as read)")),
        }
        Ok(Some(chunks))
    }
}

impl Run<'_> {
    /// Sends a chunk to the writers unless this run already did or the
    /// repository has it.
    fn queue(&mut self, id: ChunkId, data: Vec<u8>) -> Result<(), BackupError> {
        if self.queued.insert(id) && !self.repo.chunk_path(&id).exists() && self.sink.send((id, data)).is_err() {
            // The writer stopped on an error; `backup` reports it.
            return Err(BackupError::Corrupt { what: "repository".into(), why: "the chunk writer stopped".into() });
        }
        Ok(())
    }
}

/// Reads a whole file (for tests and small helpers).
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    fs::File::open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

/// What one upload did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadReport {
    /// Snapshots catalogued at the hub.
    pub snapshots: Vec<String>,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Bytes of chunks sent.
    pub bytes_sent: u64,
    /// Chunks the hub already had.
    pub chunks_present: u64,
}

/// The hub's connection for this device: identity from the data dir, hub
/// address from the config or enrollment.
pub struct HubLink {
    client: BulkClient,
    device: DeviceId,
    runtime: tokio::runtime::Runtime,
}

impl HubLink {
    /// Connects to the hub over a bulk connection.
    pub fn connect(config: &crate::config::AgentConfig) -> Result<Self, BackupError> {
        let identity = crate::identity::Identity::load(&config.data_dir)
            .map_err(|e| BackupError::Setup(format!("this device's identity (is it enrolled?): {e}")))?;
        let hub = config.uplink.hub.clone().unwrap_or_else(|| identity.hub.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| BackupError::Setup(format!("cannot start the tokio runtime: {e}")))?;
        let timings =
            crate::tls::Timings { keepalive: config.uplink.keepalive, idle_timeout: config.uplink.idle_timeout };
        let client = runtime.block_on(BulkClient::connect(&identity, &hub, config.uplink.connect_timeout, timings))?;
        Ok(HubLink { client, device: identity.device_id, runtime })
    }

    fn request(&self, message: Message) -> Result<Message, BulkError> {
        self.runtime.block_on(self.client.request(message))
    }

    /// The snapshots the hub holds of `device`, oldest first.
    fn catalog(&self, device: &DeviceId) -> Result<Vec<SnapshotSummary>, BackupError> {
        match self.request(Message::ListBackups(device.clone()))? {
            Message::Backups(list) => Ok(list),
            other => Err(BulkError::Unexpected(other.kind(), "ListBackups").into()),
        }
    }

    /// The ids among `ids` the hub lacks.
    fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, BackupError> {
        let mut missing = Vec::new();
        for part in ids.chunks(IDS_PER_QUERY) {
            match self.request(Message::HaveChunks(ChunkIds { ids: part.to_vec() }))? {
                Message::MissingChunks(m) => missing.extend(m.ids),
                other => return Err(BulkError::Unexpected(other.kind(), "HaveChunks").into()),
            }
        }
        Ok(missing)
    }

    /// Closes the connection.
    pub fn close(self) {
        let HubLink { client, runtime, .. } = self;
        runtime.block_on(client.close());
    }
}

fn expect_done(answer: Result<Message, BulkError>, request: &'static str) -> Result<(), BackupError> {
    match answer? {
        Message::Done => Ok(()),
        other => Err(BulkError::Unexpected(other.kind(), request).into()),
    }
}

impl Repository {
    fn pending_flag(&self) -> PathBuf {
        self.root.join(UPLOAD_PENDING)
    }

    /// Marks that snapshots wait for upload.
    fn mark_pending(&self) {
        let flag = self.pending_flag();
        if let Err(e) = fs::write(&flag, b"") {
            tracing::warn!(path = %flag.display(), error = %e, "Cannot mark a pending upload.");
        }
    }

    /// Sends the hub every snapshot of an uploading set it does not have,
    /// oldest first, each after the chunks it lacks. The pending mark goes
    /// only when everything is up and no backup marked it again meanwhile;
    /// a failed or killed upload leaves it, so the daemon tries again. One upload at a time (`upload.lock`): a
    /// second one waits, then finds little left to send.
    pub fn upload(&self, sets: &[BackupSet], hub: &HubLink) -> Result<UploadReport, BackupError> {
        let lock_path = self.root.join("upload.lock");
        let lock =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock_exclusive(&lock).map_err(io(&lock_path))?;
        let flag = self.pending_flag();
        let marked = || fs::metadata(&flag).and_then(|m| m.modified()).ok();
        let before = marked();
        let report = self.upload_all(sets, hub).inspect_err(|_| self.mark_pending())?;
        // Marked again meanwhile (a backup ended): keep the mark.
        if marked() == before {
            let _ = fs::remove_file(&flag);
        }
        Ok(report)
    }

    fn upload_all(&self, sets: &[BackupSet], hub: &HubLink) -> Result<UploadReport, BackupError> {
        let uploading: BTreeSet<&str> = sets.iter().filter(|s| s.upload).map(|s| s.name.as_str()).collect();
        let at_hub: BTreeSet<String> = hub.catalog(&hub.device)?.into_iter().map(|s| s.name).collect();
        let mut report = UploadReport::default();
        for name in self.snapshot_names()? {
            if at_hub.contains(&name) {
                continue;
            }
            let snapshot = match self.snapshot(&name) {
                Ok(s) => s,
                // Pruned since the listing.
                Err(BackupError::NoSnapshot(_)) => continue,
                Err(e) => return Err(e),
            };
            if uploading.contains(snapshot.set.as_str()) && self.upload_snapshot(&snapshot, hub, &mut report)? {
                report.snapshots.push(name);
            }
        }
        Ok(report)
    }

    /// Uploads one snapshot; false if it was pruned meanwhile.
    fn upload_snapshot(
        &self,
        snapshot: &Snapshot,
        hub: &HubLink,
        report: &mut UploadReport,
    ) -> Result<bool, BackupError> {
        let mut seen = BTreeSet::new();
        let ids: Vec<ChunkId> = snapshot
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => Some(chunks.iter()),
                _ => None,
            })
            .flatten()
            .filter(|id| seen.insert(**id))
            .copied()
            .collect();
        let missing = hub.missing(&ids)?;
        report.chunks_present += (ids.len() - missing.len()) as u64;
        let sent: Result<(u64, u64), BackupError> = hub.runtime.block_on(async {
            let mut in_flight = tokio::task::JoinSet::new();
            let (mut chunks, mut bytes) = (0u64, 0u64);
            let mut next = missing.iter();
            loop {
                while in_flight.len() < CHUNKS_IN_FLIGHT {
                    let Some(id) = next.next() else { break };
                    let Some(blob) = self.chunk_blob(id)? else {
                        if !self.root.join("snapshots").join(&snapshot.name).exists() {
                            return Ok((chunks, bytes));
                        }
                        return Err(BackupError::Corrupt {
                            what: format!("chunk {}", hex(id)),
                            why: format!("missing in the local repository, needed by {} (run verify)", snapshot.name),
                        });
                    };
                    let (client, len) = (hub.client.clone(), blob.len() as u64);
                    let put = Message::PutChunk(ChunkBlob { id: *id, blob });
                    in_flight.spawn(async move { (client.request(put).await, len) });
                }
                let Some(done) = in_flight.join_next().await else { break };
                let (answer, len) = done.map_err(|e| BackupError::Setup(format!("upload task failed: {e}")))?;
                expect_done(answer, "PutChunk")?;
                chunks += 1;
                bytes += len;
            }
            Ok((chunks, bytes))
        });
        let (chunks, bytes) = sent?;
        report.chunks_sent += chunks;
        report.bytes_sent += bytes;
        let manifest = match self.snapshot_blob(&snapshot.name) {
            Ok(m) => m,
            Err(BackupError::NoSnapshot(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let left = hub.missing(&ids)?;
        if !left.is_empty() {
            return Err(BulkError::Transfer(format!(
                "the hub still lacks {} chunk(s) of {}",
                left.len(),
                snapshot.name
            ))
            .into());
        }
        let summary = SnapshotSummary {
            name: snapshot.name.clone(),
            set: snapshot.set.clone(),
            started: snapshot.started,
            ended: snapshot.ended,
            entries: snapshot.entries.len() as u64,
            bytes: snapshot.bytes,
            chunks: ids.len() as u64,
            problems: snapshot.problems.len() as u64,
        };
        expect_done(hub.request(Message::PutSnapshot(SnapshotData { summary, manifest })), "PutSnapshot")?;
        Ok(true)
    }

    /// Restores `owner`'s snapshot (a name or `latest`, of `set` if given)
    /// from the hub into `target`: manifest and chunks are fetched and
    /// checked here, with this repository's key (the fleet backup key).
    pub fn restore_from_hub(
        &self,
        hub: &HubLink,
        owner: &DeviceId,
        name: &str,
        set: Option<&str>,
        to: &RestoreTo<'_>,
    ) -> Result<(String, u64), BackupError> {
        let only = to.only;
        let catalog = hub.catalog(owner)?;
        let summary = catalog
            .iter()
            .rev()
            .find(|s| if name == "latest" { set.is_none_or(|set| s.set == set) } else { s.name == name })
            .ok_or_else(|| BackupError::NoSnapshot(format!("{name} of {owner} at the hub")))?;
        let data = match hub
            .request(Message::GetSnapshot(SnapshotRef { device: owner.clone(), name: summary.name.clone() }))?
        {
            Message::Snapshot(data) => data,
            other => return Err(BulkError::Unexpected(other.kind(), "GetSnapshot").into()),
        };
        let snapshot = self.decode_snapshot(&summary.name, &data.manifest)?;
        // Chunks are fetched ahead, several at once, in the order the
        // restore needs them, so a restore over a slow link is not one
        // round trip per chunk.
        let order: Vec<ChunkId> = snapshot
            .selected(only)
            .filter_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => Some(chunks.iter().copied()),
                _ => None,
            })
            .flatten()
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkId, Result<Message, BulkError>)>(CHUNKS_IN_FLIGHT);
        let (client, device) = (hub.client.clone(), owner.clone());
        let fetcher = hub.runtime.spawn(async move {
            let mut ids = order.into_iter();
            let mut ahead = std::collections::VecDeque::new();
            loop {
                while ahead.len() < CHUNKS_IN_FLIGHT {
                    let Some(id) = ids.next() else { break };
                    let (client, device) = (client.clone(), device.clone());
                    let get = Message::GetChunk(ChunkRef { device, id });
                    ahead.push_back((id, tokio::spawn(async move { client.request(get).await })));
                }
                let Some((id, task)) = ahead.pop_front() else { break };
                let answer = task.await.unwrap_or_else(|e| Err(BulkError::Transfer(e.to_string())));
                if tx.send((id, answer)).await.is_err() {
                    break;
                }
            }
        });
        let rx = std::cell::RefCell::new(rx);
        // Chunks of a file that failed part-way are skipped.
        let fetch = |id: &ChunkId| loop {
            match rx.borrow_mut().blocking_recv() {
                Some((got, answer)) if got == *id => match answer? {
                    Message::Chunk(chunk) => return self.open_chunk(id, &chunk.blob),
                    other => return Err(BulkError::Unexpected(other.kind(), "GetChunk").into()),
                },
                Some(_) => {}
                None => return Err(BulkError::Transfer("the chunk fetcher stopped".into()).into()),
            }
        };
        let restored = self.restore_with(&snapshot, to, &fetch);
        fetcher.abort();
        Ok((snapshot.name, restored?))
    }
}

/// Keeps uploading what waits for upload: whenever the uplink is connected
/// (on connecting, then every `retry_every`) and the repository is marked
/// pending, runs `argv` (`outpost-agent backup ... upload`, low priority)
/// and waits for it, at most `timeout`.
pub async fn upload_task(
    argv: Vec<String>,
    flag: PathBuf,
    mut link: tokio::sync::watch::Receiver<crate::uplink::LinkState>,
    timeout: std::time::Duration,
    retry_every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    use crate::uplink::LinkState;
    let mut tick = tokio::time::interval(retry_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = link.changed() => if changed.is_err() { return },
        }
        if *link.borrow_and_update() != LinkState::Connected || !flag.exists() {
            continue;
        }
        let Some((program, args)) = argv.split_first() else { return };
        tracing::info!("Uploading pending backups.");
        let run = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            outcome = tokio::time::timeout(timeout, run) => outcome,
        };
        match outcome {
            Ok(Ok(out)) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                tracing::info!(report = %text.trim(), "Pending backups uploaded.");
            }
            Ok(Ok(out)) => {
                let text = String::from_utf8_lossy(&out.stderr);
                tracing::warn!(status = %out.status, error = %text.trim(), "Backup upload failed; will retry.");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Backup upload could not start."),
            Err(_) => tracing::warn!(?timeout, "Backup upload timed out; will retry."),
        }
    }
}

/// What `outpost-agent backup` does.
#[derive(Debug, Clone)]
pub enum Operation {
    /// Back up one set now.
    Run {
        /// The set's name.
        set: String,
    },
    /// List the snapshots.
    List {
        /// As JSON.
        json: bool,
    },
    /// Send the hub what it lacks of every uploading set's snapshots.
    Upload,
    /// Restore a snapshot (a name or `latest`) into `target`.
    Restore {
        /// Restore another device's snapshot from the hub (needs a grant).
        from_device: Option<String>,
        /// Snapshot name or `latest`.
        snapshot: String,
        /// Where to write (`/` restores in place).
        target: PathBuf,
        /// With `latest`: of this set.
        set: Option<String>,
        /// Only these paths (and what is under them).
        paths: Vec<String>,
        /// Replace existing files that differ from the backup.
        overwrite: bool,
    },
    /// Re-read and check every chunk.
    Verify,
    /// Apply every set's retention and drop unneeded chunks.
    Prune,
}

/// Runs `op` on the device's repository (no daemon and no hub needed; the
/// repository lock keeps it apart from a scheduled backup). Returns the
/// process exit status: 0 done, 1 failed, 3 a snapshot was written but some
/// paths could not be backed up (as restic does).
pub fn command(config: &crate::config::AgentConfig, op: Operation) -> Result<u8, BackupError> {
    let key_file =
        config.backup_repo.key_file.clone().ok_or_else(|| BackupError::BadKey(PathBuf::from("(not set)")))?;
    let key = read_key(&key_file)?;
    let dir = &config.backup_repo.dir;
    match op {
        Operation::Upload => {
            let repo = Repository::open_unlocked(dir, &key)?;
            let hub = HubLink::connect(config).inspect_err(|_| repo.mark_pending())?;
            let report = repo.upload(&config.backups, &hub);
            hub.close();
            let r = report?;
            println!(
                "uploaded {} snapshot(s): {} chunk(s) sent ({} bytes), {} already at the hub",
                r.snapshots.len(),
                r.chunks_sent,
                r.bytes_sent,
                r.chunks_present
            );
            Ok(0)
        }
        Operation::Restore { from_device: Some(owner), snapshot, target, set, paths, overwrite } => {
            let owner: DeviceId = owner.parse().map_err(|e| BackupError::Setup(format!("--from-device: {e}")))?;
            let repo = Repository::open_unlocked(dir, &key)?;
            let hub = HubLink::connect(config)?;
            let to = RestoreTo { target: &target, only: &paths, overwrite };
            let restored = repo.restore_from_hub(&hub, &owner, &snapshot, set.as_deref(), &to);
            hub.close();
            let (name, n) = restored?;
            println!("restored {n} entries of {owner}'s snapshot {name} from the hub into {}", target.display());
            Ok(0)
        }
        Operation::Run { set } => {
            let set = config.backups.iter().find(|s| s.name == set).ok_or(BackupError::NoSet(set))?;
            let repo = Repository::open(dir, &key)?;
            let s = repo.backup(set)?;
            println!(
                "snapshot {}: {} entries, {} bytes, {} files read, {} new chunks ({} bytes stored), {:.1}s",
                s.name,
                s.entries.len(),
                s.bytes,
                s.files_read,
                s.new_chunks,
                s.new_stored_bytes,
                s.started.until(s.ended).as_secs_f64()
            );
            for p in &s.problems {
                println!("problem: {p}");
            }
            // The set's retention applies after every run, so a device left
            // alone keeps what its config says without anyone running prune.
            let mut code = if s.problems.is_empty() { 0 } else { 3 };
            if set.retention != crate::config::Retention::default() {
                match repo.prune(std::slice::from_ref(set)) {
                    Ok((removed, chunks)) => {
                        println!("retention: {} snapshot(s) and {chunks} chunk(s) removed", removed.len())
                    }
                    Err(e) => {
                        println!("retention not applied: {e}");
                        code = 1;
                    }
                }
            }
            if set.upload {
                repo.mark_pending();
                drop(repo);
                // The snapshot is safe here; an upload that fails now is
                // retried by the daemon once the hub is reachable.
                match Repository::open_unlocked(dir, &key).and_then(|repo| {
                    let hub = HubLink::connect(config).inspect_err(|_| repo.mark_pending())?;
                    let report = repo.upload(&config.backups, &hub);
                    hub.close();
                    report
                }) {
                    Ok(r) => println!(
                        "uploaded to the hub: {} chunk(s) sent ({} bytes), {} already there",
                        r.chunks_sent, r.bytes_sent, r.chunks_present
                    ),
                    Err(e) => println!("upload pending ({e}); the agent retries when the hub is reachable"),
                }
            }
            Ok(code)
        }
        Operation::List { json } => {
            let repo = Repository::open(dir, &key)?;
            let infos: Vec<SnapshotInfo> = repo.snapshots()?.iter().map(SnapshotInfo::from).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&infos).unwrap_or_default());
            } else {
                let rows: Vec<Vec<String>> = infos
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.set.clone(),
                            i.started.clone(),
                            i.entries.to_string(),
                            i.bytes.to_string(),
                            i.problems.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    outpost_shared::table::render(
                        &["SNAPSHOT", "SET", "STARTED", "ENTRIES", "BYTES", "PROBLEMS"],
                        &rows
                    )
                );
            }
            Ok(0)
        }
        Operation::Restore { from_device: None, snapshot, target, set, paths, overwrite } => {
            let repo = Repository::open(dir, &key)?;
            let s = repo.find(&snapshot, set.as_deref())?;
            let n = repo.restore(&s, &RestoreTo { target: &target, only: &paths, overwrite })?;
            println!("restored {n} entries of snapshot {} into {}", s.name, target.display());
            Ok(0)
        }
        Operation::Verify => {
            let repo = Repository::open(dir, &key)?;
            let problems = repo.verify()?;
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("every chunk checks out");
                Ok(0)
            } else {
                println!("{} problem(s) found", problems.len());
                Ok(1)
            }
        }
        Operation::Prune => {
            let repo = Repository::open(dir, &key)?;
            let (removed, chunks) = repo.prune(&config.backups)?;
            for name in &removed {
                println!("removed snapshot {name}");
            }
            println!("{} snapshot(s) and {chunks} chunk(s) removed", removed.len());
            Ok(0)
        }
    }
}

/// The command line that runs `outpost-agent backup --config PATH` as a
/// separate, low-priority process: scheduled backups and backup commands
/// from the hub use it, so a backup never blocks the daemon and is limited
/// by `[backups] nice` and `io_class`. `None` without a config file.
pub fn command_prefix(config: &crate::config::AgentConfig) -> Option<Vec<String>> {
    let path = config.config_path.as_ref()?;
    let exe = std::env::current_exe().ok()?;
    let io_class = if config.backup_repo.io_class == "idle" { "3" } else { "2" };
    Some(vec![
        "nice".into(),
        "-n".into(),
        config.backup_repo.nice.to_string(),
        "ionice".into(),
        "-c".into(),
        io_class.into(),
        exe.display().to_string(),
        "backup".into(),
        "--config".into(),
        path.display().to_string(),
    ])
}

/// The command line of a low-priority upload of pending snapshots, if any
/// set uploads (see [`upload_task`]).
pub fn upload_command(config: &crate::config::AgentConfig) -> Option<Vec<String>> {
    if !config.backups.iter().any(|s| s.upload) {
        return None;
    }
    let mut argv = command_prefix(config)?;
    argv.push("upload".into());
    Some(argv)
}

/// A scheduled job per backup set with a `schedule`: `backup-<name>`,
/// running [`command_prefix`] + `run <name>`, never overlapping itself,
/// caught up after downtime. Its runs reach the hub as job runs.
pub fn scheduled_jobs(config: &crate::config::AgentConfig) -> Vec<outpost_shared::job::JobSpec> {
    use outpost_shared::job::{Action, JobSpec, Overlap, Schedule};
    let Some(prefix) = command_prefix(config) else { return Vec::new() };
    config
        .backups
        .iter()
        .filter_map(|set| {
            let schedule = Schedule::parse(set.schedule.as_deref()?).ok()?;
            let mut argv = prefix.clone();
            argv.extend(["run".to_owned(), set.name.clone()]);
            Some(JobSpec {
                name: format!("backup-{}", set.name),
                schedule,
                action: Action::Command { argv, env: Default::default(), working_dir: None },
                timeout: config.backup_repo.timeout,
                retries: 0,
                retry_backoff: std::time::Duration::from_secs(60),
                overlap: Overlap::Forbid,
                catch_up: true,
                jitter: std::time::Duration::ZERO,
                max_output: 64 << 10,
                enabled: true,
            })
        })
        .collect()
}

/// Checks the arguments of a `backup` command from the hub and returns the
/// full command line, or why it is refused. Accepted: `run SET`, `list`,
/// `verify`, `prune`, `upload`, `restore SNAPSHOT --target DIR|--in-place
/// [--set S] [--path P]... [--from-device ID] [--overwrite]`.
pub fn hub_command(prefix: &[String], args: &[String]) -> Result<Vec<String>, String> {
    let ok = match args.first().map(String::as_str) {
        Some("run") => args.len() == 2,
        Some("list") => args.len() == 1 || (args.len() == 2 && args[1] == "--json"),
        Some("verify" | "prune" | "upload") => args.len() == 1,
        Some("restore") => {
            let rest = args.get(2..).unwrap_or_default();
            let flag = |a: &&String| ["--in-place", "--overwrite"].contains(&a.as_str());
            let pairs: Vec<&String> = rest.iter().filter(|a| !flag(a)).collect();
            let in_place = rest.iter().any(|a| a == "--in-place");
            args.len() >= 3
                && pairs.chunks(2).all(|pair| {
                    pair.len() == 2 && ["--target", "--set", "--path", "--from-device"].contains(&pair[0].as_str())
                })
                && (pairs.iter().any(|a| *a == "--target") != in_place)
        }
        _ => false,
    };
    if !ok || args.iter().any(|a| a.starts_with("--config")) {
        return Err("backup takes: run SET | list [--json] | verify | prune | upload | \
                    restore SNAPSHOT --target DIR|--in-place [--set S] [--path P]... [--from-device ID] [--overwrite]"
            .into());
    }
    let mut argv = prefix.to_vec();
    argv.extend(args.iter().cloned());
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    const KEY: [u8; 32] = [7; 32];

    fn set(paths: &[&Path]) -> BackupSet {
        BackupSet {
            name: "s".into(),
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            exclude: Vec::new(),
            schedule: None,
            retention: crate::config::Retention::default(),
            upload: false,
        }
    }

    fn restore_all<'a>(target: &'a Path) -> RestoreTo<'a> {
        RestoreTo { target, only: &[], overwrite: false }
    }

    /// Every file under `dir`, relative, with its content.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.strip_prefix(dir).unwrap().to_owned(), fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    /// The race of issue 13: identical files next to each other made two
    /// writer threads store the same chunk under one temporary name, and
    /// a first backup failed with "No such file or directory".
    #[test]
    fn a_first_backup_of_many_twin_files_stores_each_chunk_once_and_restores() {
        let source = tempfile::tempdir().unwrap();
        // Twins large enough that storing one (compress, encrypt, write)
        // takes longer than reading and hashing the other.
        let pairs = 120;
        for i in 0..pairs {
            let text: String = (0..6000).map(|n| format!("{i} licence line {}\n", n * 7919 % 1013)).collect();
            fs::write(source.path().join(format!("a{i:03}.txt")), &text).unwrap();
            fs::write(source.path().join(format!("b{i:03}.txt")), &text).unwrap();
        }
        for round in 0..6 {
            let repo_dir = tempfile::tempdir().unwrap();
            let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
            let snapshot = repo.backup(&set(&[source.path()])).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(snapshot.new_chunks, pairs, "round {round}: a chunk was stored twice or not at all");
            assert!(repo.verify().unwrap().is_empty());
            let leftovers: Vec<_> = repo
                .chunk_files()
                .unwrap()
                .into_iter()
                .filter(|p| parse_id(&p.file_name().unwrap().to_string_lossy()).is_none())
                .collect();
            assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
            let target = tempfile::tempdir().unwrap();
            repo.restore(&snapshot, &restore_all(target.path())).unwrap();
            let restored = target.path().join(source.path().strip_prefix("/").unwrap());
            assert!(tree(&restored) == tree(source.path()), "round {round}: the restore differs");
        }
    }

    #[test]
    fn manifest_paths_are_confined_to_the_target() {
        let none = BTreeSet::new();
        assert_eq!(confined_path("/srv/data/x", &none).unwrap(), Path::new("srv/data/x"));
        for bad in ["/srv/../etc/passwd", "/..", "/srv/./x", "/srv//x", "", "/", "/a\0b"] {
            assert!(confined_path(bad, &none).is_err(), "{bad:?} accepted");
        }
        let links: BTreeSet<PathBuf> = [PathBuf::from("srv/link")].into();
        assert!(confined_path("/srv/link/passwd", &links).unwrap_err().contains("symbolic link this restore made"));
        assert!(confined_path("/srv/link", &links).is_err());
        assert!(confined_path("/srv/linked", &links).is_ok());
    }

    /// A manifest a compromised device wrote: entries that climb out of the
    /// target or through a link it just made are refused, named, and
    /// nothing is written outside the target.
    #[test]
    fn a_crafted_manifest_cannot_write_outside_the_target() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("f"), b"payload").unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let mut snapshot = repo.backup(&set(&[source.path()])).unwrap();
        let file = snapshot.entries.iter().find(|e| matches!(e.kind, EntryKind::File { .. })).unwrap().clone();
        let outside = tempfile::tempdir().unwrap();
        let escape = outside.path().join("escaped");
        let entry = |path: String, kind: EntryKind| Entry { path, kind, ..file.clone() };
        let up = "/..".repeat(outside.path().components().count() + 8);
        snapshot.entries = vec![
            entry(format!("{up}{}", escape.display()), file.kind.clone()),
            entry("/x/link".into(), EntryKind::Symlink { target: outside.path().display().to_string() }),
            entry("/x/link/escaped".into(), file.kind.clone()),
            entry("/x/link".into(), EntryKind::Dir),
            entry("/x/ok".into(), file.kind.clone()),
        ];
        let target = tempfile::tempdir().unwrap();
        match repo.restore(&snapshot, &restore_all(target.path())) {
            Err(BackupError::RestoreIncomplete(3)) => {}
            other => panic!("expected three refusals, got {other:?}"),
        }
        assert!(!escape.exists(), "the restore wrote outside its target");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "the restore wrote through its own link");
        assert_eq!(fs::read(target.path().join("x/ok")).unwrap(), b"payload");
    }

    #[test]
    fn a_restore_keeps_files_that_differ_unless_asked_to_overwrite() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("f"), b"backed up").unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let snapshot = repo.backup(&set(&[source.path()])).unwrap();
        let target = tempfile::tempdir().unwrap();
        repo.restore(&snapshot, &restore_all(target.path())).unwrap();
        // Unchanged files are left alone: a second restore succeeds.
        repo.restore(&snapshot, &restore_all(target.path())).unwrap();
        let restored = target.path().join(source.path().strip_prefix("/").unwrap()).join("f");
        fs::write(&restored, b"changed since").unwrap();
        match repo.restore(&snapshot, &restore_all(target.path())) {
            Err(BackupError::RestoreIncomplete(1)) => {}
            other => panic!("a file that differs was not refused: {other:?}"),
        }
        assert_eq!(fs::read(&restored).unwrap(), b"changed since");
        repo.restore(&snapshot, &RestoreTo { overwrite: true, ..restore_all(target.path()) }).unwrap();
        assert_eq!(fs::read(&restored).unwrap(), b"backed up");
    }

    #[test]
    fn hub_commands_are_checked_before_they_run() {
        let prefix = args("nice -n 10 outpost-agent backup --config /etc/outpost/agent.toml");
        for ok in [
            "run field",
            "list",
            "list --json",
            "verify",
            "prune",
            "upload",
            "restore latest --target /srv/restore",
            "restore latest --target /srv/restore --set field --path /var/lib/app",
            "restore latest --target /srv/restore --from-device dev-0123456789abcdef",
            "restore latest --in-place --from-device dev-0123456789abcdef --overwrite",
        ] {
            let argv = hub_command(&prefix, &args(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(argv, [prefix.clone(), args(ok)].concat());
        }
        for bad in [
            "",
            "run",
            "rm -rf /",
            "upload now",
            "restore latest",
            "restore latest --set field",
            "restore latest --in-place --target /x",
            "restore latest --overwrite",
            "restore",
            "restore latest --target /x --config /tmp/evil.toml",
            "restore latest --target /x --exec sh",
            "list --config=/tmp/evil.toml",
        ] {
            assert!(hub_command(&prefix, &args(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
