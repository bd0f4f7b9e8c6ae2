//! Scheduled jobs: the [`SchedulerActor`] decides when, [`run`] runs.
//!
//! Jobs come from the config (`[[job]]`) and from the hub's desired state,
//! whose jobs replace config jobs of the same name. Cron schedules are
//! driven by tokio-cron-scheduler (one library job per cron job, whose only
//! work is to send the actor a `Fire`). `@every` schedules are timers on
//! the actor, on the monotonic clock: tokio-cron-scheduler's repeated jobs
//! count from the wall clock and, after the clock steps forward, fire every
//! 500 ms until they have caught up (its `scheduler.rs` adds the interval
//! to the previous due time), which is the burst of late runs this feature
//! exists to avoid.
//!
//! Durable state, in the store's key-value tree:
//! - `job.fire.<name>`: when the job was first set up and last fired
//!   (written by the actor only): catch-up after downtime compares these
//!   with the schedule, and `@every` jobs keep their rhythm across restarts.
//! - `job.last.<name>`: its last finished attempt (written by runs only).
//! - `job.run.<id>`: a run in progress (written before the program starts,
//!   updated with its pid). One left over at start belongs to an agent that
//!   died: its process group, if still alive (pid and start time match), is
//!   killed, and so is every group whose processes carry the run's marker
//!   in their environment (`OUTPOST_JOB_RUN=<data dir>#<run id>`: the agent
//!   may have died before the pid was durable); the run is reported
//!   `Interrupted` — never resumed, never overlapping the next.
//! - `jobs.reported`: the job list last sent to the hub, so a `JobsReport`
//!   goes out only when the list changes.
//!
//! Live runs are held by [`Jobs`], which outlives the actor, so a restarted
//! actor still knows what runs and applies the overlap policy to it.
//!
//! Where it lives: `scheduler.rs` (the actor), `run.rs` (one run: process,
//! timeout, retries), `records.rs` (the stored state above), `recovery.rs`
//! (runs a dead agent left), `clock.rs` (clock steps and the rhythm of
//! `@every` jobs, pure), and this file: the [`Jobs`] handle.

mod clock;
mod records;
mod recovery;
mod run;
mod scheduler;

pub use records::{FireState, LastRun};
pub use scheduler::SchedulerActor;

use records::{fire_key, last_key, run_key};
use scheduler::{List, RunNow};

use crate::cgroup::Subtree;
use crate::store::{AgentStore, Changes, StoreError};
use actix::prelude::*;
use outpost_shared::job::{JobRun, JobSource, JobSpec, Trigger};
use outpost_shared::protocol::RecordBody;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a request waits for a starting scheduler.
const SCHEDULER_WAIT: Duration = Duration::from_secs(5);

/// Errors of job requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobsError {
    /// No job of that name is configured.
    #[error("no job named {0:?}")]
    Unknown(String),
    /// The job is switched off.
    #[error("job {0:?} is disabled")]
    Disabled(String),
    /// `overlap = "forbid"` and a run is in progress.
    #[error("job {job:?} is still running (run {run_id}) and its overlap policy is forbid")]
    Busy {
        /// The job.
        job: String,
        /// The run in progress.
        run_id: u64,
    },
    /// The scheduler is not running (starting, or restarting after a fault).
    #[error("the scheduler is not running; try again")]
    NotRunning,
    /// The store failed.
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        JobsError::Store(e.to_string())
    }
}

/// One job as `outpost-agent jobs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// The definition in force.
    pub spec: JobSpec,
    /// Where it came from.
    pub source: JobSource,
    /// The next scheduled run (none if disabled).
    pub next_run: Option<Timestamp>,
    /// Runs in progress: (run id, attempt start).
    pub running: Vec<(u64, Timestamp)>,
    /// The last finished attempt.
    pub last: Option<LastRun>,
    /// Scheduled runs skipped since start because one was still running.
    pub skipped: u64,
}

struct LiveRun {
    job: String,
    /// Cancelled to stop the run (replace, or agent shutdown via its parent).
    stop: CancellationToken,
    /// Cancelled when the run task has finished and recorded its end.
    done: CancellationToken,
    started: Timestamp,
}

struct Shared {
    store: AgentStore,
    data_dir: PathBuf,
    runs: Mutex<HashMap<u64, LiveRun>>,
    /// The running scheduler actor, set by it when it starts.
    scheduler: watch::Sender<Option<Addr<SchedulerActor>>>,
    tasks: TaskTracker,
    /// Cancelled when the agent stops: no new run starts after.
    shutdown: CancellationToken,
    /// Cancelled when running runs must end (the agent stops and its grace
    /// ran out): their process groups are killed and they are recorded
    /// interrupted.
    kill_runs: CancellationToken,
    finished: broadcast::Sender<(JobRun, bool)>,
    /// The agent's delegated cgroup: each run gets one of its own under
    /// it, and everything in it ends with the run. None: process groups
    /// and the run's marker only.
    cgroups: Option<Subtree>,
}

/// The handle to the jobs: asks the scheduler, holds the live runs. Cheap
/// to clone; lives as long as the agent.
#[derive(Clone)]
pub struct Jobs(Arc<Shared>);

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("running", &self.live().len()).finish()
    }
}

impl Jobs {
    /// Jobs whose runs are tracked by `tasks` and stopped on `shutdown`,
    /// each run in a cgroup of its own under `cgroups` if there is one.
    pub fn new(
        store: AgentStore,
        data_dir: PathBuf,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        cgroups: Option<Subtree>,
    ) -> Self {
        // Attempts carry up to 1 MiB of output each: a short queue; a slow
        // listener sees `Lagged` rather than holding memory.
        let (finished, _) = broadcast::channel(16);
        Jobs(Arc::new(Shared {
            store,
            data_dir,
            runs: Mutex::default(),
            scheduler: watch::Sender::new(None),
            tasks,
            shutdown,
            kill_runs: CancellationToken::new(),
            finished,
            cgroups,
        }))
    }

    /// The delegated cgroup runs (and `exec` commands) are started under,
    /// if the agent has one.
    pub fn cgroups(&self) -> Option<&Subtree> {
        self.0.cgroups.as_ref()
    }

    /// The agent stops: waits up to `grace` for the runs in progress to
    /// end by themselves, then kills what still runs (recorded
    /// interrupted) and waits for those records. Returns how many runs
    /// were killed.
    pub async fn finish(&self, grace: Duration) -> usize {
        let done: Vec<CancellationToken> = self.live().values().map(|r| r.done.clone()).collect();
        if done.is_empty() {
            return 0;
        }
        tracing::info!(runs = done.len(), grace = ?grace, "Waiting for running jobs to end.");
        let all = async {
            for d in &done {
                d.cancelled().await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_ok() {
            return 0;
        }
        let left = done.iter().filter(|d| !d.is_cancelled()).count();
        tracing::warn!(runs = left, "Running jobs outlived the stop grace; killing them.");
        self.0.kill_runs.cancel();
        for d in &done {
            d.cancelled().await;
        }
        left
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveRun>> {
        self.0.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scheduler, waiting up to [`SCHEDULER_WAIT`] for it if the agent
    /// is starting (a `run_job` command from the inbox may come first) or it
    /// is being restarted.
    async fn scheduler(&self) -> Result<Addr<SchedulerActor>, JobsError> {
        let mut current = self.0.scheduler.subscribe();
        let ready = current.wait_for(|a| a.as_ref().is_some_and(Addr::connected));
        match tokio::time::timeout(SCHEDULER_WAIT, ready).await {
            Ok(Ok(addr)) => addr.clone().ok_or(JobsError::NotRunning),
            _ => Err(JobsError::NotRunning),
        }
    }

    /// Every job with its next run and last outcome.
    pub async fn list(&self) -> Result<Vec<JobView>, JobsError> {
        self.scheduler().await?.send(List).await.map_err(|_| JobsError::NotRunning)?
    }

    /// Runs `name` now (its overlap policy applies); returns the run id.
    pub async fn run_now(&self, name: &str, trigger: Trigger) -> Result<u64, JobsError> {
        self.scheduler()
            .await?
            .send(RunNow { name: name.to_owned(), trigger })
            .await
            .map_err(|_| JobsError::NotRunning)?
    }

    /// True while run `run_id` is in progress.
    pub fn is_running(&self, run_id: u64) -> bool {
        self.live().contains_key(&run_id)
    }

    /// Every attempt that finishes from now on, and whether it was the
    /// run's last.
    pub fn subscribe(&self) -> broadcast::Receiver<(JobRun, bool)> {
        self.0.finished.subscribe()
    }

    fn fire_state(&self, name: &str) -> FireState {
        self.0.store.get(&fire_key(name)).ok().flatten().and_then(|b| postcard::from_bytes(&b).ok()).unwrap_or_default()
    }

    fn last_run(&self, name: &str) -> Option<LastRun> {
        self.0.store.get(&last_key(name)).ok().flatten().and_then(|b| postcard::from_bytes(&b).ok())
    }

    /// Records an attempt's end in one transaction: the outbox record, the
    /// job's last run, the running record removed. `next` is the running
    /// record of the following attempt, if one follows at once.
    async fn record_end(&self, run: &JobRun, next: Option<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let last = LastRun { run_id: run.run_id, attempt: run.attempt, ended: run.ended, outcome: run.outcome.clone() };
        let mut kv = vec![(last_key(&run.job), postcard::to_stdvec(&last).unwrap_or_default())];
        let mut kv_remove = vec![run_key(run.run_id)];
        let final_attempt = next.is_none();
        if let Some(next) = next {
            kv_remove.clear();
            kv.push(next);
        }
        let changes = Changes { records: vec![RecordBody::JobRun(run.clone())], kv, kv_remove, ..Changes::default() };
        self.0.store.commit(changes).await?;
        crate::metrics::METRICS.job_ended(run);
        let _ = self.0.finished.send((run.clone(), final_attempt));
        Ok(())
    }
}
