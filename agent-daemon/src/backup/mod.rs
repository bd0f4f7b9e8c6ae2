//! Local backups: a deduplicating, compressed, encrypted repository under
//! the data dir, with snapshots of backup sets, restore, verify and prune.
//!
//! The subsystem: `repo` (format, key check, lock, blobs, chunks and
//! manifests), `manifest` (heads and chunked entries), `legacy` (older
//! formats, read), `meta` (attributes, holes, special files, owner names),
//! `snapshot` (a backup run), `restore` (confined restore),
//! `maintenance` (verify, prune, recovery after an interrupted run),
//! `remote` (upload to and restore from the hub), `daemon` (scheduled
//! sets as jobs, the upload task, hub commands). The data model (entries,
//! snapshots) and the errors live here; the CLI's output is `main.rs`'s.
//!
//! Layout of `<data_dir>/backups/`:
//! - `config`: repository version and a check value of the key, so a wrong
//!   key is refused before anything is written.
//! - `packs/<2 hex>/<64 hex>`: pack files, each the blobs of many chunks
//!   one after another, and `index/<name>`: where each chunk's blob is
//!   (see `pack`). Files are cut by content-defined chunking (FastCDC,
//!   256 KiB min / 1 MiB average / 4 MiB max), so an edit moves only the
//!   chunks around it. A chunk's id is the BLAKE3 hash of its plaintext
//!   keyed with a key derived from the backup key, so ids reveal nothing to
//!   whoever stores the blobs. A blob is `nonce (24 bytes) ||
//!   XChaCha20-Poly1305(zstd(chunk))`, with the id as associated data: a
//!   blob cannot be swapped for another.
//! - `chunks/<2 hex>/<64 hex>`: one blob per chunk, the layout of format
//!   version 1; still read, and pruned, in repositories made by it.
//! - `snapshots/<name>`: one encrypted head per snapshot (set, times,
//!   report of problems, owner names, and the chunks holding its entries:
//!   files with path, mode, owner, mtime, size, chunk list and holes;
//!   directories; symlinks; hard links; FIFOs and devices; each with its
//!   extended attributes, ACLs among them; see `meta`).
//!   The entries are chunked and stored like file content, so what did not
//!   change is not stored again (see `manifest`).
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
//! Writes are crash-safe: packs are written unsynced, then one `syncfs`,
//! then the run's index segment and its manifest (each to a temporary file,
//! synced and renamed): a chunk is indexed only once its pack is durable,
//! and a snapshot exists only once every chunk it names is indexed. A
//! failed run (a full disk, a crash, a power cut) leaves at most packs no
//! index names, possibly torn, which nothing trusts and `prune` deletes.
//! Version 1 repositories could be left with torn chunk files and an
//! `unsynced` marker; opening one checks the chunks written since the
//! marked start and deletes the damaged ones.

use crate::bulk::{BulkClient, BulkError};
use crate::config::BackupSet;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use outpost_shared::DeviceId;
use outpost_shared::protocol::{
    ChunkBlob, ChunkIds, ChunkRef, Message, SnapshotChunkList, SnapshotData, SnapshotRef, SnapshotSummary,
};
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Chunk size bounds (bytes).
mod daemon;
mod legacy;
mod maintenance;
mod manifest;
mod meta;
mod pack;
mod remote;
mod repo;
mod restore;
mod snapshot;

/// Entry points of the fuzz targets (`fuzz/fuzz_targets/backup.rs`): the
/// parsers of what a repository or the hub holds, fed plaintext as it is
/// after decryption (what a holder of the key, or a bug, could have
/// written). Each returns normally, with a value or a refusal.
#[doc(hidden)]
pub mod fuzz {
    use super::manifest::{EntryFormat, Head, decode_manifest, read_entries};

    /// A manifest file's plaintext, named `s-1`.
    pub fn manifest(plain: &[u8]) -> bool {
        decode_manifest("s-1", plain).is_ok()
    }

    /// Entry chunks of a head: `data[0]` picks the entry format, `data[1]`
    /// into how many chunks the rest is cut.
    pub fn entries(data: &[u8]) -> bool {
        let [format, pieces, rest @ ..] = data else { return false };
        let pieces = usize::from(pieces % 4) + 1;
        let size = rest.len().div_ceil(pieces).max(1);
        let chunks: Vec<Vec<u8>> = rest.chunks(size).map(<[u8]>::to_vec).collect();
        let head = Head {
            name: "s-1".into(),
            set: "s".into(),
            started: outpost_shared::time::Timestamp(0),
            ended: outpost_shared::time::Timestamp(0),
            paths: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            users: Default::default(),
            groups: Default::default(),
            bytes: 0,
            files_read: 0,
            new_chunks: 0,
            new_stored_bytes: 0,
            entries: 1 << 20,
            carries: Default::default(),
            entry_chunks: (0..chunks.len()).map(|i| [i as u8; 32]).collect(),
            entry_format: if format & 1 == 0 { EntryFormat::V4 } else { EntryFormat::V3 },
        };
        read_entries(head, |id| Ok(chunks.get(usize::from(id[0])).cloned().unwrap_or_default())).is_ok()
    }
}

pub use daemon::{command_prefix, hub_command, scheduled_jobs, upload_command, upload_task};
pub use manifest::{Carries, Head};
pub use remote::{HubLink, UploadReport};
pub use repo::Repository;
pub use restore::{RestoreTo, Restored, confined_path};
pub use snapshot::read_all;

pub(crate) const MIN_CHUNK: usize = 256 << 10;
pub(crate) const AVG_CHUNK: usize = 1 << 20;
pub(crate) const MAX_CHUNK: usize = 4 << 20;
/// zstd level: fast, still compresses text well.
pub(crate) const ZSTD_LEVEL: i32 = 3;
/// First byte of a whole, compressed manifest's plaintext (the format
/// before chunked manifests, still read). A whole uncompressed one (the
/// first format) starts with the length of the snapshot's name, which is
/// never this large (nor `manifest::CHUNKED_MANIFEST`'s 0xFE).
pub(crate) const COMPRESSED_MANIFEST: u8 = 0xFF;
/// Largest manifest (decompressed) a restore accepts.
pub(crate) const MAX_MANIFEST: u64 = 1 << 30;
/// Repository format: 1 kept one file per chunk, 2 packs them, 3 keeps a
/// snapshot's entries in chunks (see `manifest`), 4 adds extended
/// attributes, hard links, special files, holes and owner names to them.
/// Older chunk files and manifests stay readable; an agent older than a
/// repository refuses it instead of misreading it.
pub(crate) const REPO_VERSION: u32 = 4;

/// A chunk id: keyed BLAKE3 of the plaintext.
pub use outpost_shared::protocol::ChunkId;

/// Streams of chunk transfers (uploads, fetches for a restore) in flight
/// at once, at most: the streams a hub allows on a bulk connection (an
/// older hub allows 8; the rest then wait for a stream).
pub(crate) const STREAMS_IN_FLIGHT: usize = 32;
/// Chunk requests sent one after another on one stream, at most, and the
/// bytes of chunks a stream carries (but one chunk always): a tree of small
/// files is a chunk per file, and a link's round trip is then paid once per
/// batch, not per chunk.
pub(crate) const CHUNKS_PER_STREAM: usize = 64;
pub(crate) const BYTES_PER_STREAM: u64 = 1 << 20;
/// Bytes of chunks in flight (or fetched ahead) at once, at most, but one
/// stream is always allowed.
pub(crate) const BYTES_IN_FLIGHT: u64 = 8 << 20;
/// Ids per "which of these do you lack" question.
pub(crate) const IDS_PER_QUERY: usize = 16 * 1024;
/// The file that marks snapshots waiting for upload.
pub(crate) const UPLOAD_PENDING: &str = "upload-pending";
/// The file that marks a run whose chunks are not yet known to be on disk;
/// holds the run's start (ms since the epoch).
pub(crate) const UNSYNCED: &str = "unsynced";

/// The lines an incomplete restore reports, `not restored: path: error`.
fn not_restored_lines(failed: &[String]) -> String {
    failed.iter().map(|f| format!("\nnot restored: {f}")).collect()
}

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
    /// The key file cannot be read or holds no key.
    #[error(transparent)]
    Key(#[from] crate::keyfile::KeyFileError),
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
    /// A restore could not write every file correctly: what was not
    /// restored and why, one `path: error` each (escaped), by path.
    #[error("restore incomplete: {} file(s) not restored{}", .0.len(), not_restored_lines(.0))]
    RestoreIncomplete(Vec<String>),
    /// The hub could not be reached or refused.
    #[error("hub: {0}")]
    Hub(#[from] BulkError),
    /// The device's identity (for the hub) could not be loaded.
    #[error("{0}")]
    Setup(String),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

/// One entry of a snapshot (the format of repository version 4; the
/// entries of older snapshots are read through `legacy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path on the device.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner (its name, if it had one, is in the snapshot's `users`).
    pub uid: u32,
    /// Group (its name in the snapshot's `groups`).
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Extended attributes, name and value, as the file system listed
    /// them: every namespace the backup could read (`user.*`, and as root
    /// `trusted.*`; `security.*`), POSIX ACLs among them
    /// (`system.posix_acl_access`, `system.posix_acl_default`, in the
    /// kernel's binary form, ids numeric).
    pub xattrs: Vec<Xattr>,
}

/// One extended attribute: its name (without the NUL) and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

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
        /// Its chunks, in order: of its data regions one after another.
        chunks: Vec<ChunkId>,
        /// For a sparse file, its data regions (offset, length), in order;
        /// the rest are holes. `None`: all of it is data.
        data: Option<Vec<(u64, u64)>>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: String,
    },
    /// Another name of a file (or special file) an earlier entry of the
    /// same snapshot holds: one inode, several names.
    HardLink {
        /// The path of that earlier entry.
        target: String,
    },
    /// A named pipe.
    Fifo,
    /// A character or block device.
    Device {
        /// A block device (else a character device).
        block: bool,
        /// Its device number (`st_rdev`).
        rdev: u64,
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
    /// What was passed over on purpose (sockets), for the record.
    pub notes: Vec<String>,
    /// Owners' names by id, as the device knew them.
    pub users: BTreeMap<u32, String>,
    /// Groups' names by id.
    pub groups: BTreeMap<u32, String>,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
    /// Files read this time (the others were unchanged).
    pub files_read: u64,
    /// Chunks this snapshot added to the repository (its entries' own
    /// chunks included).
    pub new_chunks: u64,
    /// Bytes those new chunks take on disk (compressed, encrypted).
    pub new_stored_bytes: u64,
    /// The chunks that hold `entries` in the repository (see `manifest`);
    /// empty for a manifest of an older format. Not part of an encoding.
    #[serde(skip)]
    pub manifest_chunks: Vec<ChunkId>,
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
    /// What its entries carry beside content.
    pub carries: Carries,
}

impl From<&Head> for SnapshotInfo {
    fn from(s: &Head) -> Self {
        SnapshotInfo {
            name: s.name.clone(),
            set: s.set.clone(),
            started: s.started.rfc3339(),
            entries: usize::try_from(s.entries).unwrap_or(usize::MAX),
            bytes: s.bytes,
            problems: s.problems.len(),
            carries: s.carries,
        }
    }
}

pub(crate) fn hex(id: &[u8]) -> String {
    outpost_shared::identity::hex(id)
}

/// Random hex for temporary file names no other writer uses.
pub(crate) fn unique_suffix() -> String {
    let mut suffix = [0u8; 8];
    rand::fill(&mut suffix[..]);
    hex(&suffix)
}

pub(crate) fn parse_id(name: &str) -> Option<ChunkId> {
    outpost_shared::identity::parse_hex32(name)
}

/// Flushes everything written to the file system that holds `path`.
pub(crate) fn syncfs(path: &Path) -> Result<(), BackupError> {
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

    /// A backup with fewer chunks than writers (an empty directory: one
    /// chunk, the list of entries) leaves no temporary pack behind: a writer
    /// that got no chunk left its empty pack's file in tmp/ (seen in CI as
    /// a flaky failure of the twin-files test below, under load).
    #[test]
    fn writers_that_get_no_chunk_leave_no_temporary_file() {
        let source = tempfile::tempdir().unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        for round in 0..3 {
            repo.backup(&set(&[source.path()])).unwrap();
            let leftovers: Vec<_> = fs::read_dir(repo_dir.path().join("tmp")).unwrap().flatten().collect();
            assert!(leftovers.is_empty(), "round {round}: temporary files left: {leftovers:?}");
        }
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
            // Each pair's chunk once, and the chunks of the list of entries
            // (one or two: where the list is cut depends on the chunk ids it
            // holds, so on the key).
            let lists = snapshot.manifest_chunks.len() as u64;
            assert!((1..=3).contains(&lists), "{lists} chunks for 241 entries");
            assert_eq!(snapshot.new_chunks, pairs + lists, "round {round}: a chunk was stored twice or not at all");
            assert!(repo.verify().unwrap().is_empty());
            let leftovers: Vec<_> = fs::read_dir(repo_dir.path().join("tmp")).unwrap().flatten().collect();
            assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
            // 120 small chunks in a few packs (one per writer), not 120 files.
            let packs = tree(&repo_dir.path().join("packs")).len();
            assert!((1..=4).contains(&packs), "{packs} pack files");
            let target = tempfile::tempdir().unwrap();
            repo.restore(&snapshot, &restore_all(target.path())).unwrap();
            let restored = target.path().join(source.path().strip_prefix("/").unwrap());
            assert!(tree(&restored) == tree(source.path()), "round {round}: the restore differs");
        }
    }

    /// A repository of format 1 (one file per chunk) on an upgraded device:
    /// its chunks restore, new ones go into packs, prune drops its files.
    #[test]
    fn a_version_1_repository_still_restores_and_prunes() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("old.txt"), b"backed up by the old agent").unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let old = repo.backup(&set(&[source.path()])).unwrap();
        // Rewrite it as version 1 did: the chunk as its own file, no index.
        let EntryKind::File { chunks, .. } =
            &old.entries.iter().find(|e| matches!(e.kind, EntryKind::File { .. })).unwrap().kind
        else {
            unreachable!()
        };
        let id = chunks[0];
        let blob = repo.chunk_blob(&id).unwrap().unwrap();
        let path = repo.chunk_path(&id);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &blob).unwrap();
        // Its manifest as a whole one, as agents before chunked manifests
        // wrote them.
        fs::write(repo_dir.path().join("snapshots").join(&old.name), whole_manifest(&repo, &old)).unwrap();
        drop(repo);
        fs::remove_dir_all(repo_dir.path().join("index")).unwrap();
        fs::remove_dir_all(repo_dir.path().join("packs")).unwrap();
        let config = repo_dir.path().join("config");
        let current = format!("\"version\": {REPO_VERSION}");
        let text = fs::read_to_string(&config).unwrap().replace(&current, "\"version\": 1");
        fs::write(&config, text).unwrap();

        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        assert!(fs::read_to_string(&config).unwrap().contains(&current), "the config was not upgraded");
        let target = tempfile::tempdir().unwrap();
        let read_back = repo.snapshot(&old.name).unwrap();
        assert_eq!(
            read_back.entries,
            old.entries.iter().cloned().map(|e| Entry { xattrs: vec![], ..e }).collect::<Vec<_>>()
        );
        repo.restore(&read_back, &restore_all(target.path())).unwrap();
        let restored = target.path().join(source.path().strip_prefix("/").unwrap()).join("old.txt");
        assert_eq!(fs::read(restored).unwrap(), b"backed up by the old agent");
        // A new run finds the file's chunk stored (no second copy in a
        // pack) and stores only its list of entries.
        let again = repo.backup(&set(&[source.path()])).unwrap();
        assert_eq!((again.new_chunks, again.files_read), (1, 0));
        // Once no snapshot needs it, prune removes the file.
        for name in [&old.name, &again.name] {
            fs::remove_file(repo_dir.path().join("snapshots").join(name)).unwrap();
        }
        repo.prune(&[]).unwrap();
        assert!(!path.exists(), "prune left an unneeded chunk file of format 1");
        // A repository of a newer format is refused, not misread.
        let text =
            fs::read_to_string(&config).unwrap().replace(&current, &format!("\"version\": {}", REPO_VERSION + 1));
        fs::write(&config, text).unwrap();
        drop(repo);
        let err = Repository::open(repo_dir.path(), &KEY).unwrap_err().to_string();
        assert!(err.contains("newer than this agent"), "{err}");
    }

    /// A snapshot of format 3 (a head whose entries knew no attributes,
    /// links, special files or holes) still reads and restores.
    #[test]
    fn a_format_3_snapshot_still_restores() {
        let source = tempfile::tempdir().unwrap();
        fs::create_dir(source.path().join("d")).unwrap();
        fs::write(source.path().join("d/old.txt"), b"written by a format-3 agent").unwrap();
        std::os::unix::fs::symlink("d/old.txt", source.path().join("link")).unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let snapshot = repo.backup(&set(&[source.path()])).unwrap();
        let old: Vec<legacy::Entry3> = snapshot.entries.iter().map(|e| legacy::Entry3::of(e).unwrap()).collect();
        let mut sealer = repo::Sealer::new().unwrap();
        let ids = manifest::cut_entries(&old, &repo.id_key, |id, bytes| {
            let path = repo.chunk_path(&id);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, repo.seal_chunk(&mut sealer, &id, &bytes).unwrap()).unwrap();
            Ok(())
        })
        .unwrap();
        let mut head = Head::of(&snapshot);
        head.entry_chunks = ids;
        let mut plain = vec![manifest::CHUNKED_MANIFEST];
        plain = postcard::to_extend(&legacy::Head3::of(&head), plain).unwrap();
        let blob = repo.seal(&plain, snapshot.name.as_bytes()).unwrap();
        fs::write(repo_dir.path().join("snapshots").join(&snapshot.name), blob).unwrap();
        let read_back = repo.snapshot(&snapshot.name).unwrap();
        let expected: Vec<Entry> = snapshot.entries.iter().cloned().map(|e| Entry { xattrs: vec![], ..e }).collect();
        assert_eq!(read_back.entries, expected);
        let target = tempfile::tempdir().unwrap();
        repo.restore(&read_back, &restore_all(target.path())).unwrap();
        let restored = target.path().join(source.path().strip_prefix("/").unwrap());
        assert_eq!(fs::read(restored.join("link")).unwrap(), b"written by a format-3 agent");
    }

    /// What a file is beside its content, as a walker sees it: kind, mode,
    /// owner, mtime, size, link group (by first name), device number,
    /// extended attributes, allocated blocks (of sparse files).
    fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut stack = vec![root.to_owned()];
        let mut buf = Vec::new();
        while let Some(path) = stack.pop() {
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            if m.is_dir() {
                let mut children: Vec<_> = fs::read_dir(&path).unwrap().flatten().map(|e| e.path()).collect();
                children.sort();
                stack.extend(children.into_iter().rev());
            }
            let group = if m.nlink() > 1 && !m.is_dir() {
                inodes.entry((m.dev(), m.ino())).or_insert_with(|| rel.clone()).display().to_string()
            } else {
                String::new()
            };
            let sparse = if meta::may_be_sparse(m.len(), m.blocks()) { m.blocks().to_string() } else { "-".into() };
            let mtime = if m.file_type().is_symlink() { 0 } else { m.mtime() * 1_000_000_000 + m.mtime_nsec() };
            let line = format!(
                "{:o} {}:{} mtime {mtime} size {} link {group:?} rdev {} sparse {sparse} xattrs {:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.len() },
                m.rdev(),
                meta::read_xattrs(&path, &mut buf).unwrap(),
            );
            out.insert(rel, line);
        }
        out
    }

    /// Issue 29: a tree with hard links, extended attributes, a FIFO, a
    /// device, a socket, a sparse file, other owners and nanosecond times
    /// restores as it was; `--path` keeps links inside it; list counts it.
    #[test]
    fn a_restore_keeps_links_attributes_special_files_and_holes() {
        use std::os::unix::fs::FileExt;
        #[allow(unsafe_code)]
        // SAFETY: geteuid(2) has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        let source = tempfile::tempdir().unwrap();
        let src = source.path();
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/one"), b"one inode, three names").unwrap();
        fs::hard_link(src.join("a/one"), src.join("a/b/two")).unwrap();
        fs::hard_link(src.join("a/one"), src.join("three")).unwrap();
        fs::write(src.join("plain"), b"plain").unwrap();
        let xattrs = rustix::fs::lsetxattr(src.join("plain"), "user.color", b"blue", rustix::fs::XattrFlags::empty())
            .and_then(|()| rustix::fs::lsetxattr(src.join("a"), "user.dir", b"d", rustix::fs::XattrFlags::empty()))
            .is_ok();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_bits_truncate(0o640),
            0,
        )
        .unwrap();
        if root_user {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                src.join("null"),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_bits_truncate(0o666),
                rustix::fs::makedev(1, 3),
            )
            .unwrap();
            std::os::unix::fs::lchown(src.join("plain"), Some(4321), Some(8765)).unwrap();
        }
        let _socket = std::os::unix::net::UnixListener::bind(src.join("socket")).unwrap();
        let sparse = fs::File::create(src.join("sparse")).unwrap();
        sparse.write_all_at(&[7u8; 4096], 1 << 30).unwrap();
        sparse.set_len(2 << 30).unwrap();
        drop(sparse);
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        fs::File::options().write(true).open(src.join("plain")).unwrap().set_modified(when).unwrap();
        fs::set_permissions(src.join("plain"), fs::Permissions::from_mode(0o4751)).unwrap();

        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let snapshot = repo.backup(&set(&[src])).unwrap();
        assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
        assert!(snapshot.notes.iter().any(|n| n.contains("socket")), "{:?}", snapshot.notes);
        let carries = repo.snapshot_infos().unwrap()[0].carries;
        assert_eq!(
            carries,
            Carries {
                hard_links: 2,
                with_xattrs: if xattrs { 2 } else { 0 },
                special: if root_user { 2 } else { 1 },
                sparse: 1
            }
        );
        assert!(carries.to_string().contains("2 hard links"), "{carries}");
        // The sparse file's holes were not read: a few KiB of content.
        assert!(snapshot.new_stored_bytes < 1 << 20, "{} bytes stored", snapshot.new_stored_bytes);

        let target = tempfile::tempdir().unwrap();
        let restored = repo.restore(&snapshot, &restore_all(target.path())).unwrap();
        assert!(restored.problems.is_empty(), "{:?}", restored.problems);
        let copy = target.path().join(src.strip_prefix("/").unwrap());
        let (mut want, got) = (describe(src), describe(&copy));
        want.remove(Path::new("socket"));
        assert_eq!(got, want);
        // Restoring again over it finds everything in place.
        assert!(repo.restore(&snapshot, &restore_all(target.path())).unwrap().problems.is_empty());

        // Only `a/b` and `three`: `three` links to a/one, outside them, so
        // it becomes the file and a/b/two joins it.
        let only = [format!("{}/a/b", src.display()), format!("{}/three", src.display())];
        let part = tempfile::tempdir().unwrap();
        repo.restore(&snapshot, &RestoreTo { target: part.path(), only: &only, overwrite: false }).unwrap();
        let copy = part.path().join(src.strip_prefix("/").unwrap());
        let (two, three) = (fs::metadata(copy.join("a/b/two")).unwrap(), fs::metadata(copy.join("three")).unwrap());
        assert_eq!((two.ino(), two.nlink()), (three.ino(), 2));
        assert_eq!(fs::read(copy.join("three")).unwrap(), b"one inode, three names");
        assert!(!copy.join("a/one").exists());
    }

    /// A repository with a snapshot of one file `f` ("payload"), and that
    /// file's entry: the start of a crafted manifest.
    fn one_file_snapshot() -> (tempfile::TempDir, tempfile::TempDir, Repository, Snapshot, Entry) {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("f"), b"payload").unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let snapshot = repo.backup(&set(&[source.path()])).unwrap();
        let file = snapshot.entries.iter().find(|e| matches!(e.kind, EntryKind::File { .. })).unwrap().clone();
        (source, repo_dir, repo, snapshot, file)
    }

    /// A hard link in a crafted manifest joins only what the restore made:
    /// not a file outside the target, not one the restore did not write.
    #[test]
    fn a_crafted_hard_link_cannot_reach_outside_what_the_restore_made() {
        let (_source, _repo_dir, repo, mut snapshot, file) = one_file_snapshot();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"secret").unwrap();
        let link = |path: &str, target: String| Entry {
            path: path.into(),
            kind: EntryKind::HardLink { target },
            ..file.clone()
        };
        snapshot.entries = vec![
            link("/x/a", outside.path().join("secret").display().to_string()),
            link("/x/b", format!("/x/../..{}", outside.path().join("secret").display())),
            Entry { path: "/x/dir".into(), kind: EntryKind::Dir, ..file.clone() },
            link("/x/c", "/x/dir".into()),
            Entry { path: "/x/ok".into(), ..file.clone() },
            link("/x/ok2", "/x/ok".into()),
        ];
        let target = tempfile::tempdir().unwrap();
        match repo.restore(&snapshot, &restore_all(target.path())) {
            Err(BackupError::RestoreIncomplete(failed)) if failed.len() == 3 => {}
            other => panic!("expected three refusals, got {other:?}"),
        }
        assert_eq!(fs::metadata(outside.path().join("secret")).unwrap().nlink(), 1, "a link reached outside");
        assert_eq!(fs::metadata(target.path().join("x/ok2")).unwrap().nlink(), 2);
    }

    /// A manifest of the format before chunked ones: `COMPRESSED_MANIFEST`,
    /// then zstd of the whole snapshot's postcard encoding, sealed.
    fn whole_manifest(repo: &Repository, snapshot: &Snapshot) -> Vec<u8> {
        let old = legacy::Snapshot3 {
            name: snapshot.name.clone(),
            set: snapshot.set.clone(),
            started: snapshot.started,
            ended: snapshot.ended,
            paths: snapshot.paths.clone(),
            entries: snapshot.entries.iter().map(|e| legacy::Entry3::of(e).unwrap()).collect(),
            problems: snapshot.problems.clone(),
            bytes: snapshot.bytes,
            files_read: snapshot.files_read,
            new_chunks: snapshot.new_chunks,
            new_stored_bytes: snapshot.new_stored_bytes,
        };
        let plain = postcard::to_stdvec(&old).unwrap();
        let mut framed = vec![COMPRESSED_MANIFEST];
        framed.extend(zstd::bulk::compress(&plain, ZSTD_LEVEL).unwrap());
        repo.seal(&framed, snapshot.name.as_bytes()).unwrap()
    }

    /// Every pack file of a repository.
    fn packs(repo: &Path) -> Vec<PathBuf> {
        tree(&repo.join("packs")).into_keys().map(|p| repo.join("packs").join(p)).collect()
    }

    #[test]
    fn verify_names_a_corrupt_chunk_and_the_files_that_need_it() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("a.txt"), "alpha\n".repeat(1000)).unwrap();
        fs::write(source.path().join("b.txt"), "beta\n".repeat(1000)).unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let snapshot = repo.backup(&set(&[source.path()])).unwrap();
        assert!(repo.verify().unwrap().is_empty());
        let id = file_chunks(&snapshot)[0];
        flip_a_bit(&repo, &id);
        drop(repo);
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let problems = repo.verify().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(&hex(&id)) && problems[0].contains(&snapshot.name), "{problems:?}");
        // A manifest that cannot be read is named, and the snapshots after
        // it are still checked.
        let second = repo.backup(&set(&[source.path()])).unwrap();
        let manifest = repo_dir.path().join("snapshots").join(&snapshot.name);
        let mut bytes = fs::read(&manifest).unwrap();
        bytes[30] ^= 1;
        fs::write(&manifest, bytes).unwrap();
        let problems = repo.verify().unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains(&snapshot.name), "{problems:?}");
        assert!(problems[1].contains(&hex(&id)) && problems[1].contains(&second.name), "{problems:?}");
    }

    /// The chunks of a snapshot's files, in order.
    fn file_chunks(snapshot: &Snapshot) -> Vec<ChunkId> {
        snapshot
            .entries
            .iter()
            .flat_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunks.clone(),
                _ => vec![],
            })
            .collect()
    }

    /// Damages the stored blob of chunk `id`.
    fn flip_a_bit(repo: &Repository, id: &ChunkId) {
        let at = repo.locate(id).unwrap().expect("the chunk is in a pack");
        let path = pack::pack_path(&repo.root.join("packs"), &at.pack);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(at.offset + at.len / 2) as usize] ^= 1;
        fs::write(&path, bytes).unwrap();
    }

    /// A snapshot's list of entries is chunked like file content: an
    /// unchanged run stores nothing, not even a new list; a damaged list
    /// is named by verify, with the snapshot that needs it; prune keeps a
    /// list as long as a snapshot names it.
    #[test]
    fn unchanged_runs_share_their_entries_and_verify_names_a_damaged_list() {
        let source = tempfile::tempdir().unwrap();
        for dir in 0..30 {
            fs::create_dir(source.path().join(format!("d{dir}"))).unwrap();
            for file in 0..100 {
                fs::write(source.path().join(format!("d{dir}/f{file}")), format!("{dir}/{file}")).unwrap();
            }
        }
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let first = repo.backup(&set(&[source.path()])).unwrap();
        assert!(first.manifest_chunks.len() > 1, "3,031 entries in one chunk");
        let second = repo.backup(&set(&[source.path()])).unwrap();
        assert_eq!((second.new_chunks, second.files_read), (0, 0), "an unchanged run stored something");
        assert_eq!(second.manifest_chunks, first.manifest_chunks);
        let head = fs::metadata(repo_dir.path().join("snapshots").join(&second.name)).unwrap().len();
        assert!(head < 1024, "the snapshot's file holds {head} bytes");
        // One file changes: a few of the list's chunks are new.
        fs::write(source.path().join("d15/f50"), "changed").unwrap();
        let third = repo.backup(&set(&[source.path()])).unwrap();
        let old: HashSet<ChunkId> = first.manifest_chunks.iter().copied().collect();
        let new = third.manifest_chunks.iter().filter(|id| !old.contains(*id)).count();
        assert!(new < 4 && new < third.manifest_chunks.len(), "{new} of {}", third.manifest_chunks.len());
        assert_eq!(repo.snapshot(&third.name).unwrap().entries, third.entries);
        // Pruned to the newest: the lists only the older ones named go.
        let mut newest = set(&[source.path()]);
        newest.retention = crate::config::Retention { last: 1, ..Default::default() };
        repo.prune(std::slice::from_ref(&newest)).unwrap();
        assert!(repo.verify().unwrap().is_empty());
        let gone = first.manifest_chunks.iter().filter(|id| !third.manifest_chunks.contains(id)).count();
        assert!(gone > 0);
        assert_eq!(
            first.manifest_chunks.iter().filter(|id| repo.has_chunk(id).unwrap()).count(),
            first.manifest_chunks.len() - gone
        );
        // A damaged chunk of the list: the snapshot cannot be read, and
        // verify says which chunk and whose list it is.
        let damaged = third.manifest_chunks[0];
        flip_a_bit(&repo, &damaged);
        drop(repo);
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        assert!(repo.snapshot(&third.name).is_err());
        let problems = repo.verify().unwrap();
        assert!(
            problems.iter().any(|p| p.contains(&hex(&damaged)) && p.contains(&format!("{}'s list", third.name))),
            "{problems:?}"
        );
    }

    /// A run cut off before its index (a crash or a power cut after the
    /// packs were written): its packs are torn and named by nothing; the
    /// next run stores its chunks again and prune removes the torn packs.
    #[test]
    fn torn_packs_of_an_interrupted_run_are_never_used() {
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("a.txt"), "alpha\n".repeat(5000)).unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let first = repo.backup(&set(&[source.path()])).unwrap();
        // Undo the run's index and manifest, and tear its pack.
        fs::remove_dir_all(repo_dir.path().join("index")).unwrap();
        fs::create_dir(repo_dir.path().join("index")).unwrap();
        fs::remove_file(repo_dir.path().join("snapshots").join(&first.name)).unwrap();
        let torn = packs(repo_dir.path());
        for p in &torn {
            fs::write(p, b"torn").unwrap();
        }
        drop(repo);
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let again = repo.backup(&set(&[source.path()])).unwrap();
        // The file's chunk and the entries' chunk, both in the torn pack.
        assert_eq!(again.new_chunks, 2, "a chunk in a torn, unindexed pack was taken as stored");
        assert!(repo.verify().unwrap().is_empty());
        repo.prune(&[]).unwrap();
        assert!(torn.iter().all(|p| !p.exists()), "prune kept a torn pack");
        let target = tempfile::tempdir().unwrap();
        repo.restore(&again, &restore_all(target.path())).unwrap();
    }

    #[test]
    fn prune_keeps_what_the_retention_says_and_only_the_chunks_it_needs() {
        let source = tempfile::tempdir().unwrap();
        let repo_dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(repo_dir.path(), &KEY).unwrap();
        let mut keep_last_two = set(&[source.path()]);
        keep_last_two.retention = crate::config::Retention { last: 2, ..Default::default() };
        let mut names = Vec::new();
        for round in 0..4 {
            fs::write(source.path().join("round.txt"), format!("round {round}\n").repeat(2000)).unwrap();
            fs::write(source.path().join("stays.txt"), "the same in every round\n".repeat(2000)).unwrap();
            names.push(repo.backup(&keep_last_two).unwrap().name);
            repo.prune(std::slice::from_ref(&keep_last_two)).unwrap();
        }
        let left: Vec<String> = repo.snapshot_infos().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(left, names[2..]);
        // Indexed: the two rounds kept, the shared file and the two kept
        // snapshots' lists of entries, nothing else.
        let records: usize = repo.index.read().unwrap().iter().map(|s| s.records().unwrap().len()).sum();
        assert_eq!(records, 5);
        assert!(repo.verify().unwrap().is_empty());
        repo.each_snapshot(|snapshot| {
            let target = tempfile::tempdir().unwrap();
            repo.restore(&snapshot, &restore_all(target.path())).map(drop)
        })
        .unwrap();
    }

    #[test]
    fn a_snapshot_name_tells_its_set() {
        assert_eq!(snapshot::set_of("1796052933260-data-e180b4e7"), Some("data"));
        assert_eq!(snapshot::set_of("1796052933260-my-set-e180b4e7"), Some("my-set"));
        assert_eq!(snapshot::set_of("garbage"), None);
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
        let (_source, _repo_dir, repo, mut snapshot, file) = one_file_snapshot();
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
            Err(BackupError::RestoreIncomplete(failed)) if failed.len() == 3 => {}
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
            Err(BackupError::RestoreIncomplete(failed)) if failed.len() == 1 => {}
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
