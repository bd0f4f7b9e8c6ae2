//! The agent's durable state in sled: the outbox, the inbox and a small
//! key-value tree, behind a typed interface.
//!
//! Every write goes through one writer thread ([`GroupCommit`]), which syncs
//! once per group of writes: an append returns only when its records are on
//! disk, and a burst of appends costs one fsync. Writes that belong together
//! (a command's result and the inbox entry that marks it done) are one sled
//! transaction, so a crash leaves both or neither.
//!
//! Outbox keys are `seq (u64 BE) ++ class (0 telemetry, 1 precious)`, so
//! trimming by sequence is a range delete and thinning can tell telemetry
//! apart without decoding. `meta` holds `next_seq`, `acked_seq` and, until
//! the first session with the hub, `fresh`.
//!
//! Sequence numbers belong to the device's identity, not to this store: a
//! store that starts over (deleted, restored from an old copy, a disk image
//! rolled back) while the identity stays would hand out numbers the hub
//! already holds, and the hub would drop those records as duplicates. So a
//! session starts with [`AgentStore::resume`], which decides with
//! [`resume_plan`] from the hub's high-water mark: trim what the hub holds,
//! or, when the hub holds numbers this store never handed out (or this
//! store is new and the hub knows the device), renumber every waiting
//! record after the hub's mark and raise a `StoreReset` alarm. Nothing is
//! dropped; at worst a rolled-back store sends a few records twice.
//!
//! Budget: when the outbox exceeds its budget in force, telemetry is thinned
//! oldest-first (every other sample, then the oldest dropped) down to 90 % of
//! it. The budget in force is the configured byte budget, lowered while the
//! file system holding the store has less free space than its floor
//! ([`space_cap`]): the outbox then stops growing, whatever the budget says,
//! and thins telemetry to make room for new records. Precious records
//! (command results, state reports, alarms) are never dropped; if they alone
//! exceed the budget in force an `OutboxFull` alarm is raised and the outbox
//! keeps growing. Both alarms are cleared by a record when their condition
//! ends ([`alarm_changes`]), and whether they stand is kept with the data.
//!
//! A full disk: sled keeps the first I/O error of an open database and
//! fails every later write with it. The store drops a database whose write
//! or sync failed and opens the files again on the next call, at most once a
//! second ([`outpost_shared::reopen`], as the hub's store does), so it
//! recovers by itself when space returns; calls fail meanwhile, and the
//! figures are read again from what reached the disk.

use outpost_shared::commit::{CommitError, GroupCommit};
use outpost_shared::protocol::{Alarm, AlarmKind, Command, Record, RecordBody};
use outpost_shared::reopen::{OPEN_ROOM, Reopening, Unavailable, room_to_open};
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, or another process holds the data dir).
    #[error("agent store: {0}")]
    Sled(#[from] sled::Error),
    /// The writer could not make a change durable.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A blocking read could not run.
    #[error("agent store: read task failed: {0}")]
    Task(String),
    /// The store failed (a full disk) and could not be opened again yet.
    #[error("agent store unavailable: {0}")]
    Unavailable(String),
    /// A stored value does not decode.
    #[error("agent store: corrupt value in {tree}: {source}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The cause.
        source: postcard::Error,
    },
}

/// Where a received command stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InboxState {
    /// Persisted, not started.
    Pending,
    /// Started; if the agent dies now it is reported as interrupted, not
    /// run again.
    Running,
    /// Its result is in the outbox.
    Done,
}

/// A command in the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// The command.
    pub command: Command,
    /// Its state.
    pub state: InboxState,
}

/// Outbox figures, kept in memory and rebuilt from disk at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// The hub holds everything up to here.
    pub acked_seq: u64,
    /// Records numbered below this are on disk: only they are sent, as a
    /// write whose sync fails is gone after the store is opened again, and
    /// its numbers are handed out anew.
    pub durable_seq: u64,
    /// Records waiting.
    pub records: u64,
    /// Bytes of records waiting.
    pub bytes: u64,
    /// Bytes of precious (never dropped) records waiting.
    pub precious_bytes: u64,
    /// Telemetry records thinned since the process started.
    pub thinned: u64,
    /// True while precious records alone exceed the budget in force (the
    /// `OutboxFull` alarm stands).
    pub full: bool,
    /// True while the `TelemetryThinned` alarm stands.
    pub thinning: bool,
    /// The outbox's size limit while the store's file system is short of
    /// space (see [`space_cap`]).
    pub space_cap: Option<SpaceCap>,
    /// Why the store cannot write, while it cannot.
    pub fault: Option<String>,
    /// True from the store's creation until its first session with the
    /// hub: its numbers are not yet known to follow the hub's mark, so
    /// nothing may be relayed through a peer before that.
    pub fresh: bool,
}

/// What a session does with the hub's high-water mark when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The hub holds everything up to here: trim it (the usual case).
    Trim(u64),
    /// The hub holds numbers this store never handed out: every waiting
    /// record gets a new number after `after`, in order.
    Renumber {
        /// The hub's mark.
        after: u64,
        /// True if this store is new (deleted and made again), false if it
        /// is older than the hub's view of the device (restored, rolled back).
        new_store: bool,
    },
}

/// Decides how a session resumes from the hub's mark `hub_acked`, given
/// this store's figures. Pure: unit-tested below.
pub fn resume_plan(hub_acked: u64, stats: &OutboxStats) -> Resume {
    if stats.fresh && hub_acked > 0 {
        Resume::Renumber { after: hub_acked, new_store: true }
    } else if hub_acked >= stats.next_seq {
        Resume::Renumber { after: hub_acked, new_store: false }
    } else {
        Resume::Trim(hub_acked)
    }
}

/// The free space kept on the store's file system: `keep_free`, but at
/// most half of a small file system (sled's files grow to several times
/// what they hold, so half is what a small disk needs).
pub fn space_floor(keep_free: u64, fs_size: u64) -> u64 {
    keep_free.min(fs_size / 2)
}

/// The outbox's size limit while its file system is short of space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceCap {
    /// Bytes the outbox may hold.
    pub bytes: u64,
    /// Free bytes when the limit was last set or lowered.
    pub free_at: u64,
}

/// What sled's files take on disk per byte they hold, at most, under an
/// outbox's churn (4 to 7 measured, docs/BENCHMARKS.md): what files of a
/// given size can hold without growing.
pub const SLED_SPACE_FACTOR: u64 = 5;

/// The outbox's size cap given the free space of its file system. When the
/// free space falls under `floor`, the outbox is held to 90 % of what it
/// holds, or of what the store's files (`store_disk` bytes) can hold
/// without growing if that is more (an outbox drained before the disk
/// filled is not held to nothing), so it stops growing and thinning makes
/// room. sled's files do not
/// shrink when records leave, and churn at a fixed size still grows them
/// (docs/BENCHMARKS.md, "Agent store on a small disk"), so while the free
/// space keeps falling the cap is lowered by a tenth for each further
/// sixteenth of the floor lost. It is kept while the free space stays
/// under half as much again as the floor (so it does not flap) and lifted
/// above. Pure: unit-tested below.
pub fn space_cap(cap: Option<SpaceCap>, outbox_bytes: u64, store_disk: u64, free: u64, floor: u64) -> Option<SpaceCap> {
    match cap {
        _ if free >= floor.saturating_add(floor / 2) => None,
        None if free < floor => {
            Some(SpaceCap { bytes: outbox_bytes.max(store_disk / SLED_SPACE_FACTOR) / 10 * 9, free_at: free })
        }
        Some(cap) if free.saturating_add(floor / 16) < cap.free_at => {
            Some(SpaceCap { bytes: cap.bytes.min(outbox_bytes) / 10 * 9, free_at: free })
        }
        cap => cap,
    }
}

/// The budget in force: the configured one, or the space cap if lower.
pub fn budget_in_force(budget: u64, cap: Option<SpaceCap>) -> u64 {
    cap.map_or(budget, |cap| cap.bytes.min(budget))
}

/// Which alarms stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// `TelemetryThinned`.
    pub thinning: bool,
    /// `OutboxFull`.
    pub full: bool,
}

/// Which alarms stand after a change of the outbox (`bytes` waiting,
/// `precious` of them never dropped, `budget` in force; `thinned` if this
/// change thinned telemetry). Raised over the budget, cleared only once the
/// outbox is down to half of it: a space cap holds the outbox near what it
/// holds, and without the margin each result would raise `OutboxFull` and
/// each acknowledgement clear it again (seen: every 50 ms on a full disk).
/// Pure.
pub fn standing(before: Standing, thinned: bool, bytes: u64, precious: u64, budget: u64) -> Standing {
    Standing {
        thinning: thinned || (before.thinning && bytes > budget / 2),
        full: precious > budget || (before.full && precious > budget / 2),
    }
}

/// The alarm records to append when the standing alarms go from `before`
/// to `after`: (kind, raised). Pure.
pub fn alarm_changes(before: Standing, after: Standing) -> Vec<(AlarmKind, bool)> {
    let mut out = Vec::new();
    if before.thinning != after.thinning {
        out.push((AlarmKind::TelemetryThinned, after.thinning));
    }
    if before.full != after.full {
        out.push((AlarmKind::OutboxFull, after.full));
    }
    out
}

/// The free space kept by default on the store's file system.
pub const DEFAULT_KEEP_FREE: u64 = 64 << 20;

/// One durable change: records to append, inbox entries to set, keys to set.
#[derive(Debug, Default)]
pub struct Changes {
    /// Appended to the outbox, in order.
    pub records: Vec<RecordBody>,
    /// Inbox entries written (by command id).
    pub inbox: Vec<InboxEntry>,
    /// Inbox entries removed (by command id).
    pub inbox_remove: Vec<u64>,
    /// Key-value pairs written.
    pub kv: Vec<(String, Vec<u8>)>,
    /// Keys removed (after `kv` is written).
    pub kv_remove: Vec<String>,
}

/// The open database and its trees.
struct Trees {
    db: sled::Db,
    outbox: sled::Tree,
    meta: sled::Tree,
    inbox: sled::Tree,
    kv: sled::Tree,
}

/// What the writer thread and the readers share.
struct Shared {
    db: Reopening<Trees, StoreError>,
    stats: Arc<Mutex<OutboxStats>>,
    budget: u64,
    keep_free: AtomicU64,
    /// The store's directory, whose file system's free space is watched.
    dir: PathBuf,
    reserve: Arc<Reserve>,
}

/// The agent's store. Cheap to clone.
#[derive(Clone)]
pub struct AgentStore {
    shared: Arc<Shared>,
    writer: GroupCommit<Arc<Shared>>,
    appended: Arc<Notify>,
    inbox_changed: Arc<Notify>,
}

impl std::fmt::Debug for AgentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStore").field("stats", &self.stats()).finish()
    }
}

const NEXT_SEQ: &[u8] = b"next_seq";
const ACKED_SEQ: &[u8] = b"acked_seq";
const FRESH: &[u8] = b"fresh";
/// Present in `kv` while the `TelemetryThinned` alarm stands.
const THINNING: &str = "store.alarm.thinning";

fn outbox_key(seq: u64, telemetry: bool) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key[8] = u8::from(!telemetry);
    key
}

fn hex(bytes: &[u8]) -> String {
    outpost_shared::identity::hex(bytes)
}

fn key_seq(key: &[u8]) -> u64 {
    key.first_chunk::<8>().map_or(0, |b| u64::from_be_bytes(*b))
}

fn key_is_telemetry(key: &[u8]) -> bool {
    key.get(8) == Some(&0)
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree.get(key)?.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
}

/// The outcome of one of this store's transactions, whose closures never
/// abort (an abort would have changed nothing; it is reported, not a panic).
fn committed(result: Result<(), TransactionError<()>>) -> Result<(), StoreError> {
    match result {
        Ok(()) => Ok(()),
        Err(TransactionError::Storage(e)) => Err(e.into()),
        Err(TransactionError::Abort(())) => Err(sled::Error::Unsupported("transaction aborted".into()).into()),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data; serialization into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Records per batch sent to the hub.
pub const BATCH_RECORDS: usize = 2000;

/// Period of sled's background flush and segment-cleaning pass.
const FLUSH_EVERY_MS: u64 = 10_000;

impl Trees {
    /// Opens (or creates) the database in `dir`.
    fn open(dir: &Path, cache: u64) -> Result<Self, StoreError> {
        // Every write goes through the group commit, which flushes before
        // it answers, so sled's own periodic flush adds no durability; its
        // pass also cleans segments, which writes do as they go. Every 10 s
        // instead of sled's 500 ms: the flusher thread was the idle agent's
        // second most frequent wake-up (docs/BENCHMARKS.md).
        let db = sled::Config::new().path(dir).cache_capacity(cache).flush_every_ms(Some(FLUSH_EVERY_MS)).open()?;
        let outbox = db.open_tree("outbox")?;
        let meta = db.open_tree("meta")?;
        let inbox = db.open_tree("inbox")?;
        let kv = db.open_tree("kv")?;
        if meta.get(NEXT_SEQ)?.is_none() && outbox.is_empty() {
            // A new store: it has not met the hub yet (see `resume_plan`).
            meta.insert(NEXT_SEQ, &1u64.to_be_bytes()[..])?;
            meta.insert(FRESH, &[1u8][..])?;
            db.flush()?;
        }
        Ok(Trees { db, outbox, meta, inbox, kv })
    }

    /// The outbox figures as stored, with the process's own counters and
    /// the space cap taken from `kept`.
    fn read_stats(&self, budget: u64, kept: &OutboxStats) -> Result<OutboxStats, StoreError> {
        let mut stats = OutboxStats {
            next_seq: read_u64(&self.meta, NEXT_SEQ)?.max(1),
            acked_seq: read_u64(&self.meta, ACKED_SEQ)?,
            fresh: self.meta.get(FRESH)?.is_some(),
            thinning: self.kv.get(THINNING)?.is_some(),
            thinned: kept.thinned,
            space_cap: kept.space_cap,
            ..OutboxStats::default()
        };
        for entry in self.outbox.iter() {
            let (key, value) = entry?;
            stats.records += 1;
            stats.bytes += value.len() as u64;
            if !key_is_telemetry(&key) {
                stats.precious_bytes += value.len() as u64;
            }
            stats.next_seq = stats.next_seq.max(key_seq(&key) + 1);
        }
        stats.durable_seq = stats.next_seq;
        // Whether the alarm stands is in the outbox: the newest OutboxFull
        // record. Taken from the figures instead, as the alarm follows them.
        stats.full = stats.precious_bytes > budget_in_force(budget, stats.space_cap);
        Ok(stats)
    }
}

/// A file of [`RESERVE`] bytes beside the store, on the same file system,
/// given back when the store's own writes filled the disk: sled is not
/// opened on a full disk ([`room_to_open`]), so without it a store that
/// filled the disk by itself would never open again. Made again once space
/// is back.
struct Reserve {
    path: PathBuf,
    present: std::sync::atomic::AtomicBool,
}

/// Bytes of the space reserve: the room sled needs to open.
pub const RESERVE: u64 = OPEN_ROOM;

impl Reserve {
    fn new(path: PathBuf) -> Self {
        let present = path.metadata().is_ok_and(|m| m.len() >= RESERVE);
        Reserve { path, present: present.into() }
    }

    /// Its size while it is there.
    fn held(&self) -> u64 {
        if self.present.load(Ordering::Relaxed) { RESERVE } else { 0 }
    }

    /// Makes it if it is missing; a disk without room for it goes without.
    fn make(&self) {
        if self.present.load(Ordering::Relaxed) {
            return;
        }
        let made = std::fs::File::create(&self.path).and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE)?;
            f.sync_all()
        });
        match made {
            Ok(()) => self.present.store(true, Ordering::Relaxed),
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                tracing::debug!(error = %e, "No room for the store's space reserve yet.");
            }
        }
    }

    /// Gives its space back; true if it was there.
    fn release(&self) -> bool {
        let was = self.present.swap(false, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
        if was {
            tracing::warn!(path = %self.path.display(), "The disk is full: released the store's space reserve.");
        }
        was
    }
}

/// Where a store that cannot be read is kept (one, the newest), for a
/// person to look at.
pub const UNREADABLE: &str = "store.unreadable";

/// The store in `dir` cannot be read (`error`): it is moved aside to
/// [`UNREADABLE`] beside it and a new one made, which says why when it
/// meets the hub (its `StoreReset` alarm, see [`AgentStore::resume`]). A
/// device whose store will never open again would otherwise deliver
/// nothing until a person comes; this way it loses what was waiting in the
/// old store (unreadable in any case) and keeps working.
fn start_over(dir: &Path, cache: u64, error: &sled::Error) -> Result<Trees, StoreError> {
    let aside = dir.with_file_name(UNREADABLE);
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(sled::Error::Io)?;
    }
    std::fs::rename(dir, &aside).map_err(sled::Error::Io)?;
    tracing::error!(
        %error,
        moved_to = %aside.display(),
        "Agent store cannot be read: moved aside, starting a new one under the same identity."
    );
    let trees = Trees::open(dir, cache)?;
    let why = format!("the old one could not be read ({error}) and was moved to {}", aside.display());
    trees.meta.insert(FRESH, why.as_bytes())?;
    trees.db.flush()?;
    Ok(trees)
}

/// Waits (at most `limit`) until no one holds the lock sled takes on
/// `file` (an exclusive `flock`); returns at once if the file is missing.
fn released(file: &Path, limit: std::time::Duration) {
    let Ok(f) = std::fs::File::open(file) else { return };
    let deadline = std::time::Instant::now() + limit;
    while rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(file = %file.display(), "The store's files are still locked after it closed.");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = rustix::fs::flock(&f, rustix::fs::FlockOperation::Unlock);
}

/// True for errors after which sled's instance is of no more use (it keeps
/// the first I/O error): the database is dropped and opened again.
fn is_io(e: &StoreError) -> bool {
    matches!(e, StoreError::Sled(sled::Error::Io(_)))
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, OutboxStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, opening it again after a failure.
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.db.get().map_err(|e| match e {
            Unavailable::Closed => StoreError::Unavailable("the store is closed".into()),
            Unavailable::Waiting(fault) => StoreError::Unavailable(fault),
            Unavailable::Open(e) => e,
        })
    }

    /// Runs a write on the open database; an I/O failure drops it.
    fn write<T>(&self, job: impl FnOnce(&Self, &Trees) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = self.trees().and_then(|trees| job(self, &trees));
        if let Err(e) = &result
            && is_io(e)
        {
            self.failed(&e.to_string());
        }
        result
    }

    /// The sync of a group of writes.
    fn sync(&self) -> Result<(), String> {
        let trees = self.trees().map_err(|e| e.to_string())?;
        match trees.db.flush() {
            Ok(_) => {
                self.db.fault.ok();
                let mut stats = self.stats();
                stats.durable_seq = stats.next_seq;
                Ok(())
            }
            Err(e) => {
                drop(trees);
                self.failed(&e.to_string());
                Err(e.to_string())
            }
        }
    }

    /// A write or sync failed: the database is dropped, to be opened again,
    /// and the space reserve given back so that it can be.
    fn failed(&self, error: &str) {
        self.db.failed(error);
        self.reserve.release();
    }

    /// Free bytes (its reserve counted as free) and size of the store's
    /// file system (`None` if it cannot be read: then the floor is not
    /// enforced).
    fn space(&self) -> Option<(u64, u64)> {
        let vfs = rustix::fs::statvfs(&self.dir).ok()?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize).saturating_add(self.reserve.held());
        Some((free, vfs.f_blocks.saturating_mul(vfs.f_frsize)))
    }
}

impl AgentStore {
    /// Opens (or creates) the store in `data_dir/store`, with an outbox
    /// budget of `budget` bytes and a sled page cache of `cache` bytes. The
    /// free space kept is [`DEFAULT_KEEP_FREE`] until
    /// [`AgentStore::set_keep_free`].
    pub fn open(data_dir: &Path, budget: u64, cache: u64) -> Result<Self, StoreError> {
        let dir = data_dir.join("store");
        let stats: Arc<Mutex<OutboxStats>> = Arc::default();
        let reserve = Arc::new(Reserve::new(data_dir.join("store.reserve")));
        let db = {
            let (dir, stats, reserve) = (dir.clone(), stats.clone(), reserve.clone());
            Reopening::open("Agent store", move || {
                // sled is opened only with room for what it writes then
                // (see `reopen`); the reserve makes that room when the
                // store's own writes filled the disk.
                if let Err(wait) = room_to_open(&dir) {
                    if !reserve.release() {
                        return Err(StoreError::Unavailable(wait));
                    }
                    room_to_open(&dir).map_err(StoreError::Unavailable)?;
                }
                let trees = match Trees::open(&dir, cache) {
                    Err(StoreError::Sled(e @ sled::Error::Corruption { .. })) => start_over(&dir, cache, &e)?,
                    opened => opened?,
                };
                let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                *stats = trees.read_stats(budget, &stats)?;
                Ok(trees)
            })?
        };
        reserve.make();
        let shared = Arc::new(Shared {
            db,
            stats,
            budget,
            keep_free: AtomicU64::new(DEFAULT_KEEP_FREE),
            dir: dir.clone(),
            reserve,
        });
        let writer = GroupCommit::start("outpost-store", shared.clone(), |s: &Arc<Shared>| s.sync())
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(AgentStore { shared, writer, appended: Arc::default(), inbox_changed: Arc::default() })
    }

    /// Sets the free space kept on the store's file system (`[store]
    /// keep_free`); at most a tenth of the file system is kept.
    pub fn set_keep_free(&self, bytes: u64) {
        self.shared.keep_free.store(bytes, Ordering::Relaxed);
    }

    /// Current outbox figures.
    pub fn stats(&self) -> OutboxStats {
        let mut stats = self.shared.stats().clone();
        stats.fault = self.shared.db.fault.fault();
        stats
    }

    /// Runs `job` on the open database (a read), opening it again after a
    /// failure.
    fn read<T>(&self, job: impl FnOnce(&Trees) -> Result<T, StoreError>) -> Result<T, StoreError> {
        job(&*self.shared.trees()?)
    }

    /// Applies `changes` durably and atomically; returns the sequence
    /// numbers of the appended records.
    pub async fn commit(&self, changes: Changes) -> Result<Vec<u64>, StoreError> {
        let notify_inbox = !changes.inbox.is_empty();
        let notify_outbox = !changes.records.is_empty();
        let seqs = self.writer.run(move |s: &Arc<Shared>| s.write(|s, t| s.apply(t, changes))).await??;
        if notify_outbox {
            self.appended.notify_one();
        }
        if notify_inbox {
            self.inbox_changed.notify_one();
        }
        Ok(seqs)
    }

    /// Appends records durably.
    pub async fn append(&self, records: Vec<RecordBody>) -> Result<Vec<u64>, StoreError> {
        self.commit(Changes { records, ..Changes::default() }).await
    }

    /// Resolves after the next append, or at once if one happened since the
    /// last call returned (the wake is kept), so a caller that peeked and
    /// found nothing misses no append made in between.
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    /// Wakes whoever waits in [`AgentStore::inbox_changed`].
    pub fn wake_inbox(&self) {
        self.inbox_changed.notify_one();
    }

    /// Resolves after the next inbox change.
    pub async fn inbox_changed(&self) {
        self.inbox_changed.notified().await;
    }

    /// Up to `max_records` records from `from_seq` on whose stored sizes add
    /// up to at most `max_bytes` (at least one record if any is waiting).
    pub fn peek(&self, from_seq: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, StoreError> {
        let durable = self.shared.stats().durable_seq;
        if from_seq >= durable {
            return Ok(Vec::new());
        }
        self.read(|t| {
            let mut out = Vec::new();
            let mut bytes = 0;
            for entry in t.outbox.range(outbox_key(from_seq, true)..outbox_key(durable, true)) {
                let (_, value) = entry?;
                if !out.is_empty() && (out.len() >= max_records || bytes + value.len() > max_bytes) {
                    break;
                }
                bytes += value.len();
                out.push(
                    postcard::from_bytes(&value).map_err(|source| StoreError::Corrupt { tree: "outbox", source })?,
                );
            }
            Ok(out)
        })
    }

    /// This store belongs to an identity that has just enrolled: the hub
    /// holds no record of it, so its numbers from 1 are right and it is
    /// not `fresh`. Called at start, before anything else writes.
    pub fn known_new(&self) -> Result<(), StoreError> {
        if !self.shared.stats().fresh {
            return Ok(());
        }
        self.read(|t| {
            t.meta.remove(FRESH)?;
            t.db.flush()?;
            Ok(())
        })?;
        self.shared.stats().fresh = false;
        Ok(())
    }

    /// A session with the hub starts and the hub holds this device's
    /// records up to `hub_acked`: trims them, or renumbers what waits if
    /// the store started over (see [`resume_plan`]). Returns what it did.
    pub async fn resume(&self, hub_acked: u64) -> Result<Resume, StoreError> {
        self.writer.run(move |s: &Arc<Shared>| s.write(|s, t| s.resume(t, hub_acked))).await?
    }

    /// The hub holds everything up to `upto`: trim it.
    pub async fn ack(&self, upto: u64) -> Result<(), StoreError> {
        self.writer.run(move |s: &Arc<Shared>| s.write(|s, t| s.trim(t, upto))).await??;
        Ok(())
    }

    /// An inbox entry.
    pub fn inbox_entry(&self, id: u64) -> Result<Option<InboxEntry>, StoreError> {
        self.read(|t| {
            t.inbox
                .get(id.to_be_bytes())?
                .map(|v| postcard::from_bytes(&v).map_err(|source| StoreError::Corrupt { tree: "inbox", source }))
                .transpose()
        })
    }

    /// Inbox entries in a given state, oldest first.
    pub fn inbox_in(&self, state: &InboxState) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(|t| {
            let mut out = Vec::new();
            for entry in t.inbox.iter() {
                let (_, value) = entry?;
                let entry: InboxEntry =
                    postcard::from_bytes(&value).map_err(|source| StoreError::Corrupt { tree: "inbox", source })?;
                if &entry.state == state {
                    out.push(entry);
                }
            }
            Ok(out)
        })
    }

    /// A key-value entry.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|t| Ok(t.kv.get(key)?.map(|v| v.to_vec())))
    }

    /// Key-value entries whose keys start with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|t| {
            let mut out = Vec::new();
            for entry in t.kv.scan_prefix(prefix) {
                let (key, value) = entry?;
                out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
            }
            Ok(out)
        })
    }

    /// The next signed batch of `device`'s outbox from `from` (at most
    /// [`BATCH_RECORDS`] records, within `max_frame`), and its last sequence
    /// number; `None` when nothing is waiting. The direct session and the
    /// LAN relay both send what this makes.
    pub async fn next_batch(
        &self,
        device: &outpost_shared::DeviceId,
        signer: &outpost_shared::identity::Signer,
        from: u64,
        max_frame: usize,
    ) -> Result<Option<(outpost_shared::protocol::Batch, u64)>, StoreError> {
        let max_bytes = max_frame.saturating_sub(4096).max(1024);
        let store = self.clone();
        let records = tokio::task::spawn_blocking(move || store.peek(from, BATCH_RECORDS, max_bytes))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let Some(last) = records.last().map(|r| r.seq) else { return Ok(None) };
        let batch = outpost_shared::protocol::Batch::new(device.clone(), &records, |input| signer.sign(input));
        Ok(Some((batch, last)))
    }

    /// A number never handed out before by this store (it survives
    /// restarts; numbers may skip).
    pub fn unique_id(&self) -> Result<u64, StoreError> {
        self.read(|t| Ok(t.db.generate_id()?))
    }

    /// Reads every record of every tree and checks that each decodes; the
    /// `store-check` job. Returns a summary, or the keys that failed.
    pub fn check(&self) -> Result<String, String> {
        let trees = self.shared.trees().map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let mut count = |tree: &sled::Tree, name: &str, decode: &dyn Fn(&[u8]) -> bool| {
            let (mut n, mut bytes) = (0u64, 0u64);
            for entry in tree.iter() {
                match entry {
                    Ok((key, value)) => {
                        n += 1;
                        bytes += (key.len() + value.len()) as u64;
                        if !decode(&value) {
                            problems.push(format!("{name}: value under key {} does not decode", hex(&key)));
                        }
                    }
                    Err(e) => problems.push(format!("{name}: read error: {e}")),
                }
            }
            format!("{name}: {n} entries, {bytes} bytes")
        };
        let summary = [
            count(&trees.outbox, "outbox", &|v| postcard::from_bytes::<Record>(v).is_ok()),
            count(&trees.inbox, "inbox", &|v| postcard::from_bytes::<InboxEntry>(v).is_ok()),
            count(&trees.kv, "kv", &|_| true),
        ]
        .join("; ");
        if problems.is_empty() { Ok(summary) } else { Err(problems.join("\n")) }
    }

    /// Waits until everything is on disk (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.read(|t| Ok(t.db.flush().map(drop)?))
    }

    /// Flushes, stops the writer and releases the database, so it can be
    /// opened again in this process. Other clones must be dropped first.
    pub fn close(self) -> Result<(), StoreError> {
        let flushed = self.flush();
        self.writer.close();
        self.shared.db.close();
        // sled lets go of its file lock once its own threads have let go of
        // the database, a moment after the last handle is dropped: wait for
        // that, so that an open right after this one finds the files free.
        released(&self.shared.dir.join("db"), std::time::Duration::from_secs(5));
        flushed
    }
}

impl Shared {
    fn apply(&self, t: &Trees, changes: Changes) -> Result<Vec<u64>, StoreError> {
        let first = self.stats().next_seq;
        let now = Timestamp::now();
        let encoded: Vec<(u64, bool, Vec<u8>)> = changes
            .records
            .into_iter()
            .zip(first..)
            .map(|(body, seq)| {
                let telemetry = body.is_telemetry();
                (seq, telemetry, encode(&Record { seq, at: now, body }))
            })
            .collect();
        let next = first + encoded.len() as u64;
        let trees = (&t.outbox, &t.meta, &t.inbox, &t.kv);
        let result = trees.transaction(
            |(outbox, meta, inbox, kv): &(
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
            )| {
                for (seq, telemetry, bytes) in &encoded {
                    outbox.insert(&outbox_key(*seq, *telemetry)[..], bytes.as_slice())?;
                }
                meta.insert(NEXT_SEQ, &next.to_be_bytes()[..])?;
                for entry in &changes.inbox {
                    inbox.insert(&entry.command.id.to_be_bytes()[..], encode(entry))?;
                }
                for id in &changes.inbox_remove {
                    inbox.remove(&id.to_be_bytes()[..])?;
                }
                for (key, value) in &changes.kv {
                    kv.insert(key.as_bytes(), value.as_slice())?;
                }
                for key in &changes.kv_remove {
                    kv.remove(key.as_bytes())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            },
        );
        committed(result)?;
        {
            let mut stats = self.stats();
            stats.next_seq = next;
            for (_, telemetry, bytes) in &encoded {
                stats.records += 1;
                stats.bytes += bytes.len() as u64;
                if !telemetry {
                    stats.precious_bytes += bytes.len() as u64;
                }
            }
        }
        let seqs = encoded.iter().map(|(seq, ..)| *seq).collect();
        if !encoded.is_empty() {
            self.enforce_budget(t)?;
        }
        Ok(seqs)
    }

    fn resume(&self, t: &Trees, hub_acked: u64) -> Result<Resume, StoreError> {
        let plan = resume_plan(hub_acked, &self.stats());
        match plan {
            Resume::Trim(upto) => self.trim(t, upto)?,
            Resume::Renumber { after, new_store } => self.renumber(t, after, new_store)?,
        }
        if self.stats().fresh {
            t.meta.remove(FRESH)?;
            self.stats().fresh = false;
        }
        Ok(plan)
    }

    /// Gives every waiting record a new number after `after`, in order, in
    /// one transaction with the new marks, then raises a `StoreReset`
    /// alarm. A crash before the commit leaves the old numbers and the
    /// next session decides again; after it, the new ones.
    fn renumber(&self, t: &Trees, after: u64, new_store: bool) -> Result<(), StoreError> {
        // Why a new store was made, when the agent knows (see `start_over`).
        let why = t.meta.get(FRESH)?.filter(|v| v.len() > 1).map(|v| format!("; {}", String::from_utf8_lossy(&v)));
        let mut old_keys = Vec::new();
        let mut moved = Vec::new();
        for (entry, seq) in t.outbox.iter().zip(after.saturating_add(1)..) {
            let (key, value) = entry?;
            let mut record: Record =
                postcard::from_bytes(&value).map_err(|source| StoreError::Corrupt { tree: "outbox", source })?;
            record.seq = seq;
            moved.push((outbox_key(seq, key_is_telemetry(&key)), encode(&record)));
            old_keys.push(key);
        }
        let count = moved.len() as u64;
        let next = after.saturating_add(count).saturating_add(1);
        let result = (&t.outbox, &t.meta).transaction(|(outbox, meta)| {
            for key in &old_keys {
                outbox.remove(key)?;
            }
            for (key, value) in &moved {
                outbox.insert(&key[..], value.as_slice())?;
            }
            meta.insert(NEXT_SEQ, &next.to_be_bytes()[..])?;
            meta.insert(ACKED_SEQ, &after.to_be_bytes()[..])?;
            meta.remove(FRESH)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        committed(result)?;
        {
            let mut stats = self.stats();
            stats.next_seq = next;
            stats.acked_seq = after;
            stats.fresh = false;
        }
        let message = format!(
            "this device's store started over ({}{}): the hub already holds its records up to {after}; \
             the {count} records waiting were renumbered from {} and none was dropped",
            if new_store {
                "it was made anew under an existing identity"
            } else {
                "it is older than the hub's records"
            },
            why.unwrap_or_default(),
            after.saturating_add(1),
        );
        tracing::error!(
            hub_acked = after,
            renumbered = count,
            "Store started over; records renumbered after the hub's mark."
        );
        let alarm = Alarm { kind: AlarmKind::StoreReset, raised: true, message };
        self.apply(t, Changes { records: vec![RecordBody::Alarm(alarm)], ..Changes::default() })?;
        Ok(())
    }

    fn trim(&self, t: &Trees, upto: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let (mut records, mut bytes, mut precious) = (0u64, 0u64, 0u64);
        for entry in t.outbox.range(..outbox_key(upto.saturating_add(1), true)) {
            let (key, value) = entry?;
            records += 1;
            bytes += value.len() as u64;
            if !key_is_telemetry(&key) {
                precious += value.len() as u64;
            }
            batch.remove(key);
        }
        t.outbox.apply_batch(batch)?;
        let before = {
            let mut stats = self.stats();
            if upto > stats.acked_seq {
                stats.acked_seq = upto;
                t.meta.insert(ACKED_SEQ, &upto.to_be_bytes()[..])?;
            }
            stats.records -= records.min(stats.records);
            stats.bytes -= bytes.min(stats.bytes);
            stats.precious_bytes -= precious.min(stats.precious_bytes);
            crate::metrics::METRICS.records_acked.inc_by(records);
            Standing { thinning: stats.thinning, full: stats.full }
        };
        // The hub caught up: alarms whose condition ended are cleared.
        let after = {
            let stats = self.stats();
            standing(before, false, stats.bytes, stats.precious_bytes, budget_in_force(self.budget, stats.space_cap))
        };
        self.alarms(t, before, after, "")
    }

    /// Thins telemetry until the outbox is within 90 % of its budget in
    /// force; raises an alarm record when precious records alone exceed it.
    fn enforce_budget(&self, t: &Trees) -> Result<(), StoreError> {
        let cap = {
            let mut stats = self.stats();
            if let Some((free, size)) = self.space() {
                let floor = space_floor(self.keep_free.load(Ordering::Relaxed), size);
                // What sled's files take, read only when a cap is set.
                let store_disk =
                    if stats.space_cap.is_none() && free < floor { t.db.size_on_disk().unwrap_or(0) } else { 0 };
                let cap = space_cap(stats.space_cap, stats.bytes, store_disk, free, floor);
                match (stats.space_cap, cap) {
                    (None, Some(cap)) => {
                        tracing::warn!(
                            free,
                            floor,
                            cap = cap.bytes,
                            "Little free space left: the outbox stops growing."
                        );
                    }
                    (Some(old), Some(new)) if new != old => {
                        tracing::warn!(
                            free,
                            floor,
                            cap = new.bytes,
                            "Free space still falling: the outbox is held lower."
                        );
                    }
                    (Some(_), None) => {
                        tracing::info!(free, floor, "Free space is back: the outbox may grow to its budget.");
                    }
                    _ => {}
                }
                if cap.is_none() && free > 2 * RESERVE {
                    self.reserve.make();
                }
                stats.space_cap = cap;
            }
            stats.space_cap
        };
        let budget = budget_in_force(self.budget, cap);
        if self.stats().bytes <= budget {
            return Ok(());
        }
        let target = budget / 10 * 9;
        let mut thinned = 0u64;
        // Pass 1: every other telemetry sample, oldest first. Pass 2: the
        // oldest telemetry samples outright.
        for keep_every_other in [true, false] {
            let mut keep = true;
            let mut batch = sled::Batch::default();
            let (mut freed, mut dropped) = (0u64, 0u64);
            let over = self.stats().bytes;
            for entry in t.outbox.iter() {
                if over - freed <= target {
                    break;
                }
                let (key, value) = entry?;
                if !key_is_telemetry(&key) {
                    continue;
                }
                if keep_every_other && keep {
                    keep = false;
                    continue;
                }
                keep = true;
                freed += value.len() as u64;
                dropped += 1;
                batch.remove(key);
            }
            t.outbox.apply_batch(batch)?;
            thinned += dropped;
            let mut stats = self.stats();
            stats.bytes -= freed.min(stats.bytes);
            stats.records -= dropped.min(stats.records);
            if stats.bytes <= target {
                break;
            }
        }
        let (before, after) = {
            let mut stats = self.stats();
            stats.thinned += thinned;
            let before = Standing { thinning: stats.thinning, full: stats.full };
            (before, standing(before, thinned > 0, stats.bytes, stats.precious_bytes, budget))
        };
        let why = match cap {
            Some(cap) => format!(
                "little free space on the file system of {}: the outbox is held to {} bytes",
                self.dir.display(),
                cap.bytes
            ),
            None => format!("the outbox is over its budget of {} bytes", self.budget),
        };
        self.alarms(t, before, after, &why)
    }

    /// Appends the alarm records for a change of the standing alarms, with
    /// the marks that say which stand, in one transaction.
    fn alarms(&self, t: &Trees, before: Standing, after: Standing, why: &str) -> Result<(), StoreError> {
        let changes = alarm_changes(before, after);
        if changes.is_empty() {
            return Ok(());
        }
        let precious_bytes = self.stats().precious_bytes;
        let alarms: Vec<Alarm> = changes
            .into_iter()
            .map(|(kind, raised)| {
                let message = match (kind, raised) {
                    (AlarmKind::TelemetryThinned, true) => format!("{why}: thinning telemetry"),
                    (AlarmKind::TelemetryThinned, false) => "telemetry no longer thinned: the hub caught up".into(),
                    (_, true) => format!(
                        "{why}; results, reports and alarms alone hold {precious_bytes} bytes, over it; keeping them all"
                    ),
                    (_, false) => "results, reports and alarms are back within the outbox budget".into(),
                };
                Alarm { kind, raised, message }
            })
            .collect();
        for alarm in &alarms {
            if alarm.raised {
                tracing::error!(kind = ?alarm.kind, message = %alarm.message, "Outbox alarm.");
            } else {
                tracing::info!(kind = ?alarm.kind, message = %alarm.message, "Outbox alarm cleared.");
            }
        }
        let mark = (THINNING.to_owned(), vec![1u8]);
        let (kv, kv_remove) = if after.thinning { (vec![mark], vec![]) } else { (vec![], vec![THINNING.to_owned()]) };
        {
            let mut stats = self.stats();
            stats.thinning = after.thinning;
            stats.full = after.full;
        }
        // Alarms are precious and small; appending them cannot recurse into
        // thinning more than once per condition.
        let records = alarms.into_iter().map(RecordBody::Alarm).collect();
        self.apply(t, Changes { records, kv, kv_remove, ..Changes::default() })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::protocol::{CommandResult, Outcome};
    use outpost_shared::telemetry::Sample;

    fn sample(i: u64) -> RecordBody {
        RecordBody::Telemetry(Sample {
            at: Timestamp(i),
            cpu_percent: 1.0,
            mem_used_bytes: i,
            mem_total_bytes: 100,
            swap_used_bytes: 0,
            load: [0.0; 3],
            uptime_secs: i,
            disks: vec![],
            net: vec![],
            temperatures: vec![],
        })
    }

    fn result(id: u64) -> RecordBody {
        RecordBody::CommandResult(CommandResult { id, outcome: Outcome::Succeeded, output: "x".repeat(40) })
    }

    #[tokio::test]
    async fn appends_are_sequenced_durable_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            assert_eq!(store.append(vec![sample(1), sample(2)]).await.unwrap(), vec![1, 2]);
            assert_eq!(store.append(vec![result(7)]).await.unwrap(), vec![3]);
            store.ack(1).await.unwrap();
            store.close().unwrap();
        }
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let stats = store.stats();
        assert_eq!((stats.next_seq, stats.acked_seq, stats.records), (4, 1, 2));
        let seqs: Vec<u64> = store.peek(2, 10, 1 << 20).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2, 3]);
        // Sequence numbers are never reused, even after everything is acked.
        store.ack(3).await.unwrap();
        assert_eq!(store.append(vec![sample(9)]).await.unwrap(), vec![4]);
    }

    #[test]
    fn resume_plan_trims_or_renumbers() {
        let stats = |next_seq, fresh| OutboxStats { next_seq, fresh, ..OutboxStats::default() };
        assert_eq!(resume_plan(0, &stats(1, true)), Resume::Trim(0));
        assert_eq!(resume_plan(5, &stats(9, false)), Resume::Trim(5));
        assert_eq!(resume_plan(8, &stats(9, false)), Resume::Trim(8));
        // The hub holds a number this store never handed out.
        assert_eq!(resume_plan(9, &stats(9, false)), Resume::Renumber { after: 9, new_store: false });
        // A new store under a known identity, even one that numbered past the hub's mark.
        assert_eq!(resume_plan(3, &stats(50, true)), Resume::Renumber { after: 3, new_store: true });
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_read_is_moved_aside_and_the_new_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        store.append(vec![sample(1), result(7)]).await.unwrap();
        store.close().unwrap();
        // What sled 0.34 left after an open on a full disk: a store no
        // open reads ("Read corrupted data at file offset None").
        std::fs::write(dir.path().join("store/conf"), "segment_size: many\n").unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let stats = store.stats();
        assert_eq!((stats.records, stats.next_seq, stats.fresh), (0, 1, true));
        assert!(dir.path().join(UNREADABLE).join("conf").exists(), "the old store was not kept");
        // It meets the hub, which holds 40 of its records: the alarm says why.
        store.resume(40).await.unwrap();
        let records = store.peek(0, 100, usize::MAX).unwrap();
        let [record] = &records[..] else { panic!("{records:?}") };
        let RecordBody::Alarm(alarm) = &record.body else { panic!("{record:?}") };
        assert_eq!((alarm.kind, record.seq), (AlarmKind::StoreReset, 41));
        assert!(alarm.message.contains("could not be read (Read corrupted data"), "{}", alarm.message);
        assert!(alarm.message.contains(UNREADABLE), "{}", alarm.message);
    }

    #[tokio::test]
    async fn a_store_that_started_over_renumbers_after_the_hub_and_raises_an_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert!(store.stats().fresh);
        store.append(vec![sample(1), result(7), sample(2)]).await.unwrap();
        let plan = store.resume(1_000_000).await.unwrap();
        assert_eq!(plan, Resume::Renumber { after: 1_000_000, new_store: true });
        let records = store.peek(0, 100, usize::MAX).unwrap();
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1_000_001, 1_000_002, 1_000_003, 1_000_004]);
        assert!(matches!(&records[1].body, RecordBody::CommandResult(c) if c.id == 7));
        assert!(matches!(&records[3].body, RecordBody::Alarm(a) if a.kind == AlarmKind::StoreReset));
        let stats = store.stats();
        assert_eq!((stats.next_seq, stats.acked_seq, stats.records, stats.fresh), (1_000_005, 1_000_000, 4, false));
        // Survives a reopen; the next session trims normally.
        store.close().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!((store.stats().next_seq, store.stats().fresh), (1_000_005, false));
        assert_eq!(store.resume(1_000_002).await.unwrap(), Resume::Trim(1_000_002));
        assert_eq!(store.stats().records, 2);
        assert_eq!(store.append(vec![sample(3)]).await.unwrap(), vec![1_000_005]);
        // A store rolled back behind the hub's mark renumbers too.
        assert_eq!(store.resume(2_000_000).await.unwrap(), Resume::Renumber { after: 2_000_000, new_store: false });
        let seqs: Vec<u64> = store.peek(0, 100, usize::MAX).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2_000_001, 2_000_002, 2_000_003, 2_000_004]);
    }

    #[tokio::test]
    async fn a_new_device_starts_at_one_and_is_not_fresh_after_its_first_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(store.append(vec![sample(1)]).await.unwrap(), vec![1]);
        assert_eq!(store.resume(0).await.unwrap(), Resume::Trim(0));
        assert!(!store.stats().fresh);
        assert_eq!(store.peek(0, 10, usize::MAX).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn over_budget_thins_telemetry_and_keeps_every_precious_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 4096, 1 << 20).unwrap();
        for i in 0..200 {
            store.append(vec![sample(i), result(i)]).await.unwrap();
        }
        let records = store.peek(0, 10_000, usize::MAX).unwrap();
        let results: Vec<u64> = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::CommandResult(c) => Some(c.id),
                _ => None,
            })
            .collect();
        assert_eq!(results, (0..200).collect::<Vec<_>>(), "a precious record was dropped");
        let telemetry = records.iter().filter(|r| r.body.is_telemetry()).count();
        assert!(telemetry < 200, "telemetry was not thinned ({telemetry} kept)");
        let alarms: Vec<AlarmKind> = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Alarm(a) => Some(a.kind),
                _ => None,
            })
            .collect();
        assert_eq!(alarms, [AlarmKind::TelemetryThinned, AlarmKind::OutboxFull]);
        assert!(store.stats().full);
    }

    #[test]
    fn the_space_cap_holds_the_outbox_while_free_space_is_short_and_does_not_flap() {
        let floor = space_floor(64 << 20, 16 << 20);
        assert_eq!(floor, (16 << 20) / 2, "half of a small file system");
        assert_eq!(space_floor(64 << 20, 1 << 40), 64 << 20);
        let cap = |bytes, free_at| Some(SpaceCap { bytes, free_at });
        // Plenty free: no cap.
        assert_eq!(space_cap(None, 5000, 0, 10_000, 1600), None);
        // Under the floor: held to 90 % of what the outbox holds.
        assert_eq!(space_cap(None, 5000, 0, 1599, 1600), cap(4500, 1599));
        // An outbox drained before the disk filled: held to what the
        // store's files hold without growing, not to nothing.
        assert_eq!(space_cap(None, 100, 50_000, 1599, 1600), cap(9000, 1599));
        // Still short by about as much, or back over the floor but not by
        // half as much again: the cap stays (it does not follow the outbox).
        assert_eq!(space_cap(cap(4500, 1599), 200, 0, 1599 - 100, 1600), cap(4500, 1599));
        assert_eq!(space_cap(cap(4500, 1599), 4500, 0, 2300, 1600), cap(4500, 1599));
        // A further sixteenth of the floor lost: a tenth lower, from what
        // the outbox holds if that is less.
        assert_eq!(space_cap(cap(4500, 1599), 4500, 0, 1498, 1600), cap(4050, 1498));
        assert_eq!(space_cap(cap(4500, 1599), 1000, 0, 1498, 1600), cap(900, 1498));
        // Half as much again free: lifted.
        assert_eq!(space_cap(cap(4500, 1599), 4500, 0, 2400, 1600), None);
        assert_eq!(budget_in_force(64 << 20, cap(4500, 0)), 4500);
        assert_eq!(budget_in_force(4000, cap(4500, 0)), 4000);
        assert_eq!(budget_in_force(4000, None), 4000);
    }

    #[test]
    fn alarms_are_raised_and_cleared_once_per_change() {
        let none = Standing::default();
        let thin = Standing { thinning: true, full: false };
        let both = Standing { thinning: true, full: true };
        assert_eq!(alarm_changes(none, none), []);
        assert_eq!(alarm_changes(none, both), [(AlarmKind::TelemetryThinned, true), (AlarmKind::OutboxFull, true)]);
        assert_eq!(alarm_changes(both, thin), [(AlarmKind::OutboxFull, false)]);
        assert_eq!(alarm_changes(thin, none), [(AlarmKind::TelemetryThinned, false)]);
    }

    #[test]
    fn an_alarm_is_cleared_only_once_the_outbox_is_down_to_half_its_budget() {
        let none = Standing::default();
        let full = Standing { thinning: false, full: true };
        // A result over a cap of 4,000 bytes raises it; the acknowledgement
        // that takes it below the cap, but not below half, leaves it.
        assert_eq!(standing(none, false, 4100, 4100, 4000), full);
        assert_eq!(standing(full, false, 3900, 3900, 4000), full);
        assert_eq!(standing(full, false, 4100, 4100, 4000), full, "raised again while it stands");
        assert_eq!(standing(full, false, 2000, 2000, 4000), none);
        assert_eq!(standing(none, false, 3900, 3900, 4000), none, "not raised below the budget");
        // Thinning: raised when something was thinned, cleared at half.
        let thin = Standing { thinning: true, full: false };
        assert_eq!(standing(none, true, 3600, 0, 4000), thin);
        assert_eq!(standing(thin, false, 2100, 0, 4000), thin);
        assert_eq!(standing(thin, false, 2000, 0, 4000), none);
    }

    fn alarm_records(store: &AgentStore) -> Vec<(AlarmKind, bool)> {
        store
            .peek(0, 100_000, usize::MAX)
            .unwrap()
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Alarm(a) => Some((a.kind, a.raised)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn the_alarms_are_cleared_when_the_hub_catches_up_and_a_restart_remembers_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AgentStore::open(dir.path(), 4096, 1 << 20).unwrap();
            for i in 0..200 {
                store.append(vec![sample(i), result(i)]).await.unwrap();
            }
            assert_eq!(alarm_records(&store), [(AlarmKind::TelemetryThinned, true), (AlarmKind::OutboxFull, true)]);
            store.close().unwrap();
        }
        let store = AgentStore::open(dir.path(), 4096, 1 << 20).unwrap();
        let stats = store.stats();
        assert!(stats.thinning && stats.full, "{stats:?}");
        // The hub takes everything: both alarms are cleared by records.
        let last = stats.next_seq - 1;
        store.ack(last).await.unwrap();
        assert_eq!(alarm_records(&store), [(AlarmKind::TelemetryThinned, false), (AlarmKind::OutboxFull, false)]);
        let stats = store.stats();
        assert!(!stats.thinning && !stats.full, "{stats:?}");
        store.ack(stats.next_seq - 1).await.unwrap();
        store.close().unwrap();
        let store = AgentStore::open(dir.path(), 4096, 1 << 20).unwrap();
        assert!(!store.stats().thinning, "the cleared alarm came back after a restart");
    }

    #[tokio::test]
    async fn a_failed_database_is_opened_again_with_the_figures_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(store.append(vec![sample(1), result(2)]).await.unwrap(), vec![1, 2]);
        // As a write that failed with ENOSPC does: the instance is dropped.
        store.shared.db.failed("No space left on device (simulated)");
        assert_eq!(store.stats().fault.as_deref(), Some("No space left on device (simulated)"));
        // The next call opens the files again and finds what was durable.
        assert_eq!(store.peek(0, 10, usize::MAX).unwrap().len(), 2);
        assert_eq!(store.append(vec![sample(3)]).await.unwrap(), vec![3]);
        let stats = store.stats();
        assert_eq!((stats.records, stats.next_seq, stats.durable_seq, stats.fault), (3, 4, 4, None));
    }

    #[tokio::test]
    async fn thinning_keeps_recent_telemetry_under_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 8192, 1 << 20).unwrap();
        for i in 0..500 {
            store.append(vec![sample(i)]).await.unwrap();
        }
        let stats = store.stats();
        assert!(stats.bytes <= 8192, "{stats:?}");
        assert!(!stats.full);
        let kept: Vec<u64> = store
            .peek(0, 10_000, usize::MAX)
            .unwrap()
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Telemetry(s) => Some(s.uptime_secs),
                _ => None,
            })
            .collect();
        assert_eq!(kept.last(), Some(&499), "the newest sample must survive");
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
    }
}
