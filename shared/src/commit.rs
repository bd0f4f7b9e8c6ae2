//! Group commit: one writer thread runs durable jobs in arrival order and
//! makes them durable with one sync per group, so a burst of small writes
//! costs one fsync, not one each. Callers wait for their job's result, which
//! is only handed out after the sync succeeded.
//!
//! Storage-agnostic: the state `S` and its `sync` are the caller's (sled in
//! both daemons). A job that panics fails alone; the writer keeps going.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, mpsc};

/// Why a job did not complete durably.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The writer thread is gone (process shutting down).
    #[error("the store writer has stopped")]
    Stopped,
    /// The job panicked; nothing it did is acknowledged.
    #[error("a store job panicked: {0}")]
    Panicked(String),
    /// The sync after the job failed (disk full, I/O error).
    #[error("the store could not make writes durable: {0}")]
    Sync(Arc<str>),
}

type Done = Box<dyn FnOnce(Result<(), CommitError>) + Send>;
type Job<S> = Box<dyn FnOnce(&S) -> Done + Send>;

enum Msg<S> {
    Job(Job<S>),
    Stop,
}

/// Handle to a writer thread. Cheap to clone.
pub struct GroupCommit<S> {
    jobs: mpsc::Sender<Msg<S>>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl<S> Clone for GroupCommit<S> {
    fn clone(&self) -> Self {
        GroupCommit { jobs: self.jobs.clone(), thread: self.thread.clone() }
    }
}

impl<S> std::fmt::Debug for GroupCommit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommit")
    }
}

/// Most jobs in one group, so one slow burst cannot starve waiters forever.
const MAX_GROUP: usize = 4096;

impl<S: Send + 'static> GroupCommit<S> {
    /// Starts the writer thread (named `name`) owning `state`; `sync` makes
    /// everything written so far durable. The thread ends when every handle
    /// is dropped.
    pub fn start(
        name: &str,
        state: S,
        sync: impl Fn(&S) -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg<S>>();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let mut stop = false;
            while !stop {
                let Ok(Msg::Job(first)) = rx.recv() else {
                    break;
                };
                let mut done = vec![run_job(first, &state)];
                while done.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Msg::Job(job)) => done.push(run_job(job, &state)),
                        Ok(Msg::Stop) => {
                            stop = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let synced = sync(&state).map_err(|e| CommitError::Sync(e.into()));
                for d in done {
                    d(synced.clone());
                }
            }
        })?;
        Ok(GroupCommit { jobs: tx, thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    /// Finishes the jobs already submitted, stops the writer and waits for
    /// it to exit (dropping its state). Later jobs fail with `Stopped`.
    pub fn close(&self) {
        let _ = self.jobs.send(Msg::Stop);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    fn submit<R: Send + 'static>(
        &self,
        job: impl FnOnce(&S) -> R + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<R, CommitError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let wrapped: Job<S> = Box::new(move |state: &S| {
            let result = job(state);
            Box::new(move |synced: Result<(), CommitError>| {
                let _ = tx.send(synced.map(|()| result));
            })
        });
        // If the writer is gone, the sender is dropped and the receiver
        // reports it as `Stopped`.
        let _ = self.jobs.send(Msg::Job(wrapped));
        rx
    }

    /// Runs `job` on the writer thread and returns its result once it is
    /// durable.
    pub async fn run<R: Send + 'static>(&self, job: impl FnOnce(&S) -> R + Send + 'static) -> Result<R, CommitError> {
        self.submit(job).await.unwrap_or(Err(CommitError::Stopped))
    }

    /// Like [`GroupCommit::run`], blocking the calling (non-async) thread.
    pub fn run_blocking<R: Send + 'static>(
        &self,
        job: impl FnOnce(&S) -> R + Send + 'static,
    ) -> Result<R, CommitError> {
        self.submit(job).blocking_recv().unwrap_or(Err(CommitError::Stopped))
    }
}

fn run_job<S>(job: Job<S>, state: &S) -> Done {
    match catch_unwind(AssertUnwindSafe(|| job(state))) {
        Ok(done) => done,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // The job's reply channel went down with it; the caller sees
            // `Stopped` for that job only.
            tracing::error!(%message, "A store job panicked.");
            Box::new(|_| {})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn groups_jobs_under_one_sync_and_survives_a_panicking_job() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let s = syncs.clone();
        let writer = GroupCommit::start("test-writer", Mutex::new(Vec::new()), move |_| {
            s.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(())
        })
        .unwrap();
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let w = writer.clone();
                std::thread::spawn(move || w.run_blocking(move |v: &Mutex<Vec<i32>>| v.lock().unwrap().push(i)))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!(n < 50, "50 concurrent jobs took {n} syncs: no grouping");
        assert!(matches!(writer.run_blocking(|_| -> () { panic!("boom") }), Err(CommitError::Stopped)));
        assert_eq!(writer.run_blocking(|v| v.lock().unwrap().len()).unwrap(), 50);
    }

    #[test]
    fn a_failed_sync_fails_the_jobs_of_its_group() {
        let writer = GroupCommit::start("failing", (), |_| Err("disk full".into())).unwrap();
        match writer.run_blocking(|_| 1) {
            Err(CommitError::Sync(msg)) => assert_eq!(&*msg, "disk full"),
            other => panic!("{other:?}"),
        }
    }
}
