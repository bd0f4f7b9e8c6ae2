//! A database that opens its files again after a failure, for the hub's and
//! the agent's sled stores.
//!
//! sled keeps the first I/O error of an open database (a full disk) and
//! fails every later write with it, so a store that only retried would never
//! recover. [`Reopening`] holds the open instance; when a write or a sync
//! fails, the owner calls [`Reopening::failed`], which drops it, and the next
//! call to [`Reopening::get`] opens the files again, at most once per
//! [`REOPEN_EVERY`]. Until then every call fails, reads too: the failed
//! instance may hold writes that never reached the disk, and reopening reads
//! only what did. [`FaultLog`] says so in the log once, then at most every
//! [`FaultLog::EVERY`], and once more when writes are durable again.
//!
//! sled must not be opened on a full disk: sled 0.34 writes when it opens
//! (a snapshot of its page table, the start of a segment), and an open that
//! runs out of space can leave files that no later open reads ("Read
//! corrupted data at file offset None", 5 of 8 rounds of
//! `agent-daemon/examples/sled_enospc.rs` on a 16 MiB tmpfs; 0 of 12 with
//! 256 KiB free). So both stores call [`room_to_open`] first, and
//! wait for space instead of trying.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Least time between two attempts to reopen a failed database.
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Least free space on a sled store's file system before it is opened.
/// What an open wrote, measured with `sled_enospc cost` (2 KB values): 4 KB
/// for 4 MB of data, 0.50 MB for 40 MB, 0.65 MB for 200 MB.
pub const OPEN_ROOM: u64 = 2 << 20;

/// Free bytes needed to open a sled store of `size_on_disk` bytes: at
/// least [`OPEN_ROOM`], and more for a large store (its snapshot grows
/// with it; about 1/300 of its size as measured, 1/128 asked).
pub fn open_needs(size_on_disk: u64) -> u64 {
    OPEN_ROOM.max(size_on_disk / 128)
}

/// Whether the sled store in `dir` may be opened: `Err` says how much
/// space it waits for. A store not made yet is measured as empty, on the
/// file system of the nearest directory that exists.
pub fn room_to_open(dir: &Path) -> Result<(), String> {
    let size = size_on_disk(dir);
    let Some(free) = crate::fsutil::free_bytes(dir) else {
        return Ok(()); // Unknown: sled will say what is wrong.
    };
    let needs = open_needs(size);
    if free >= needs {
        Ok(())
    } else {
        Err(format!(
            "waiting for {needs} bytes free on the store's file system before opening it ({free} free; \
             opening on a full disk can leave the store unreadable)"
        ))
    }
}

/// Bytes taken by the files of the store in `dir` (sled's files and its
/// `blobs` directory).
fn size_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let files = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks().saturating_mul(512))
            .sum()
    };
    files(dir).saturating_add(files(&dir.join("blobs")))
}

/// Why [`Reopening::get`] has no database to give.
#[derive(Debug)]
pub enum Unavailable<E> {
    /// [`Reopening::close`] was called.
    Closed,
    /// It failed and the last attempt to reopen it was under
    /// [`REOPEN_EVERY`] ago; the fault as last logged.
    Waiting(String),
    /// Opening it again failed.
    Open(E),
}

/// A database that is open, or failed and is opened again on demand.
pub struct Reopening<T, E> {
    open: Box<dyn Fn() -> Result<T, E> + Send + Sync>,
    current: RwLock<Option<Arc<T>>>,
    last_attempt: Mutex<Option<Instant>>,
    closed: AtomicBool,
    /// The durability state, for logs and health checks.
    pub fault: FaultLog,
}

impl<T, E: std::fmt::Display> Reopening<T, E> {
    /// Opens the database with `open` (which is also how it is opened again
    /// after a failure); `what` names the store in the log.
    pub fn open(what: &'static str, open: impl Fn() -> Result<T, E> + Send + Sync + 'static) -> Result<Self, E> {
        let first = open()?;
        Ok(Reopening {
            open: Box::new(open),
            current: RwLock::new(Some(Arc::new(first))),
            last_attempt: Mutex::default(),
            closed: AtomicBool::new(false),
            fault: FaultLog::new(what),
        })
    }

    /// The open database, opening the files again if it failed (at most
    /// every [`REOPEN_EVERY`]).
    pub fn get(&self) -> Result<Arc<T>, Unavailable<E>> {
        if let Some(current) = self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(current.clone());
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = current.as_ref() {
            return Ok(open.clone());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Unavailable::Closed);
        }
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(Unavailable::Waiting(self.fault.fault().unwrap_or_else(|| "reopening".into())));
            }
            *last = Some(Instant::now());
        }
        match (self.open)() {
            Ok(open) => {
                tracing::info!(store = self.fault.what, "Store reopened after a failure.");
                let open = Arc::new(open);
                *current = Some(open.clone());
                Ok(open)
            }
            Err(e) => {
                tracing::debug!(store = self.fault.what, error = %e, "Store could not be reopened yet.");
                self.fault.failed(&format!("reopening: {e}"));
                Err(Unavailable::Open(e))
            }
        }
    }

    /// A write or a sync failed with `error`: drops the database, so the
    /// next [`Reopening::get`] opens the files again. Its files stay locked
    /// until every holder of the failed instance has let it go.
    pub fn failed(&self, error: &str) {
        self.fault.failed(error);
        self.current.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Releases the database for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.current.write().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The state of a store's durability, logged once when it turns bad, at
/// most every [`FaultLog::EVERY`] while it stays bad, and once when it
/// recovers.
#[derive(Debug)]
pub struct FaultLog {
    what: &'static str,
    state: Mutex<Option<(String, Instant)>>,
}

impl FaultLog {
    /// Repeats of the same fault are logged at most this often.
    pub const EVERY: Duration = Duration::from_secs(30);

    /// A fault log for the store named `what` ("Hub store").
    pub fn new(what: &'static str) -> Self {
        FaultLog { what, state: Mutex::default() }
    }

    /// A write could not be made durable.
    pub fn failed(&self, error: &str) {
        let what = self.what;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            Some((_, logged)) if logged.elapsed() < Self::EVERY => {}
            Some((message, logged)) => {
                tracing::error!(error, "{what} still cannot make writes durable; retrying.");
                *message = error.to_owned();
                *logged = Instant::now();
            }
            None => {
                tracing::error!(error, "{what} cannot make writes durable; refusing writes until it can.");
                *state = Some((error.to_owned(), Instant::now()));
            }
        }
    }

    /// A write was durable again.
    pub fn ok(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.take().is_some() {
            tracing::info!("{} recovered: writes are durable again.", self.what);
        }
    }

    /// The current fault, if any.
    pub fn fault(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(m, _)| m.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn a_failed_database_is_opened_again_at_most_once_a_second() {
        let opens = Arc::new(AtomicU32::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let (o, b) = (opens.clone(), broken.clone());
        let db = Reopening::open("test store", move || {
            let n = o.fetch_add(1, Ordering::SeqCst);
            if b.load(Ordering::SeqCst) { Err(format!("disk full ({n})")) } else { Ok(n) }
        })
        .unwrap();
        assert_eq!(*db.get().unwrap(), 0);
        assert_eq!(db.fault.fault(), None);

        broken.store(true, Ordering::SeqCst);
        db.failed("No space left on device");
        assert_eq!(db.fault.fault().as_deref(), Some("No space left on device"));
        assert!(matches!(db.get(), Err(Unavailable::Open(e)) if e == "disk full (1)"));
        // Within the second, no new attempt: the fault is answered.
        assert!(matches!(db.get(), Err(Unavailable::Waiting(_))));
        assert_eq!(opens.load(Ordering::SeqCst), 2);

        broken.store(false, Ordering::SeqCst);
        *db.last_attempt.lock().unwrap() = Some(Instant::now() - REOPEN_EVERY);
        assert_eq!(*db.get().unwrap(), 2, "space is back: opened again");
        db.fault.ok();
        assert_eq!(db.fault.fault(), None);

        db.close();
        assert!(matches!(db.get(), Err(Unavailable::Closed)));
    }

    #[test]
    fn a_store_is_opened_only_with_room_for_what_sled_writes_when_it_opens() {
        assert_eq!(open_needs(0), OPEN_ROOM);
        assert_eq!(open_needs(200 << 20), OPEN_ROOM, "0.65 MB measured for 200 MB");
        assert_eq!(open_needs(1 << 30), 8 << 20);
        // The ordinary case: a store on a disk with room opens.
        let dir = std::env::temp_dir().join(format!("outpost-room-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        std::fs::write(dir.join("db"), vec![1u8; 8192]).unwrap();
        assert!(size_on_disk(&dir) >= 8192);
        assert_eq!(room_to_open(&dir.join("not yet made")), Ok(()));
        assert_eq!(room_to_open(&dir), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
