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

mod run;

use crate::settings::Settings;
use crate::store::{AgentStore, Changes, StoreError};
use actix::prelude::*;
use outpost_shared::job::{JobRun, JobSource, JobSpec, JobsReport, RunOutcome, Schedule, Trigger};
use outpost_shared::protocol::RecordBody;
use outpost_shared::time::{Timestamp, instant_after, millis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const FIRE_PREFIX: &str = "job.fire.";
const LAST_PREFIX: &str = "job.last.";
const RUN_PREFIX: &str = "job.run.";
const REPORTED: &str = "jobs.reported";
/// How long a request waits for a starting scheduler.
const SCHEDULER_WAIT: Duration = Duration::from_secs(5);
/// How often the wall clock is compared with the monotonic clock.
const CLOCK_CHECK: Duration = Duration::from_secs(2);
/// A backward step of the wall clock larger than this reschedules cron jobs.
const CLOCK_STEP: Duration = Duration::from_secs(1);

fn fire_key(name: &str) -> String {
    format!("{FIRE_PREFIX}{name}")
}

fn last_key(name: &str) -> String {
    format!("{LAST_PREFIX}{name}")
}

fn run_key(run_id: u64) -> String {
    format!("{RUN_PREFIX}{run_id:020}")
}

/// When a job was set up and last fired.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FireState {
    /// When the job was first scheduled on this device.
    pub armed_at: Option<Timestamp>,
    /// When its schedule last fired.
    pub last_fire: Option<Timestamp>,
}

impl FireState {
    /// The later of the two: the point missed runs are counted from.
    fn since(&self) -> Option<Timestamp> {
        self.last_fire.into_iter().chain(self.armed_at).max()
    }
}

/// A finished attempt, in brief.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// The run.
    pub run_id: u64,
    /// The attempt.
    pub attempt: u32,
    /// When it ended.
    pub ended: Timestamp,
    /// How.
    pub outcome: RunOutcome,
}

/// A run in progress, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunningRecord {
    run_id: u64,
    job: String,
    trigger: Trigger,
    attempt: u32,
    started: Timestamp,
    /// The process (and group) id and its start time, once started.
    process: Option<(u32, u64)>,
}

/// The environment entry marking run `run_id` of the agent whose data dir
/// is `data_dir` (unique on the machine: one agent per data dir).
pub(crate) fn run_marker(data_dir: &std::path::Path, run_id: u64) -> (&'static str, String) {
    ("OUTPOST_JOB_RUN", format!("{}#{run_id}", data_dir.display()))
}

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
    shutdown: CancellationToken,
    finished: broadcast::Sender<(JobRun, bool)>,
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
    /// Jobs whose runs are tracked by `tasks` and stopped on `shutdown`.
    pub fn new(store: AgentStore, data_dir: PathBuf, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
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
            finished,
        }))
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

    /// Reports runs left over by an agent that died, killing their process
    /// groups if they still run. Skips runs this process knows are live.
    async fn recover(&self) -> Result<(), StoreError> {
        let store = &self.0.store;
        for (key, value) in store.scan(RUN_PREFIX)? {
            let Ok(record) = postcard::from_bytes::<RunningRecord>(&value) else {
                tracing::warn!(key, "Unreadable run record; removing it.");
                store.commit(Changes { kv_remove: vec![key], ..Changes::default() }).await?;
                continue;
            };
            if self.live().contains_key(&record.run_id) {
                continue;
            }
            let mut note = "the agent stopped while this run was in progress; it is not resumed".to_owned();
            let mut groups = Vec::new();
            if let Some((pid, started)) = record.process
                && crate::process::start_time(pid) == Some(started)
            {
                groups.push(i32::try_from(pid).unwrap_or(0));
            }
            // Also what carries the run's marker: the agent may have died
            // between starting the job and recording its process id.
            let (name, value) = run_marker(&self.0.data_dir, record.run_id);
            groups.extend(crate::process::groups_with_env(&format!("{name}={value}")));
            groups.sort_unstable();
            groups.dedup();
            for pgid in &groups {
                crate::process::kill_group(*pgid);
            }
            if !groups.is_empty() {
                let list: Vec<String> = groups.iter().map(i32::to_string).collect();
                note.push_str(&format!(
                    "; its process group {} was still running and has been killed",
                    list.join(", ")
                ));
            }
            tracing::warn!(job = %record.job, run = record.run_id, "Run was cut off by a restart; reporting it interrupted.");
            let run = JobRun {
                run_id: record.run_id,
                job: record.job.clone(),
                trigger: record.trigger,
                attempt: record.attempt,
                started: record.started,
                ended: Timestamp::now(),
                outcome: RunOutcome::Interrupted,
                output: note,
                output_bytes: 0,
            };
            self.record_end(&run, None).await?;
        }
        Ok(())
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
        let _ = self.0.finished.send((run.clone(), final_attempt));
        Ok(())
    }
}

/// Runs the jobs' schedules. Restarted by the supervisor if it fails; the
/// runs in progress are not affected.
pub struct SchedulerActor {
    jobs: Jobs,
    local: Vec<JobSpec>,
    settings: watch::Receiver<Settings>,
    cron: Option<JobScheduler>,
    slots: BTreeMap<String, Slot>,
    generation: u64,
    booted: bool,
    /// Wall clock and monotonic clock at the last clock check.
    clock: (Timestamp, Instant),
}

struct Slot {
    spec: JobSpec,
    source: JobSource,
    generation: u64,
    cron_id: Option<Uuid>,
    timer: Option<SpawnHandle>,
    /// Next `@every` fire, on the monotonic clock.
    every_due: Option<Instant>,
    /// What `job.fire.<name>` holds.
    fire: FireState,
    skipped: u64,
}

impl SchedulerActor {
    /// A scheduler for the config's jobs plus the hub's from `settings`.
    pub fn new(jobs: Jobs, local: Vec<JobSpec>, settings: watch::Receiver<Settings>) -> Self {
        SchedulerActor {
            jobs,
            local,
            settings,
            cron: None,
            slots: BTreeMap::new(),
            generation: 0,
            booted: false,
            clock: (Timestamp::now(), Instant::now()),
        }
    }

    /// The config's jobs, each replaced by the hub's job of the same name.
    fn effective(&self) -> Vec<(JobSpec, JobSource)> {
        let hub = &self.settings.borrow().hub_jobs;
        let mut out: BTreeMap<String, (JobSpec, JobSource)> =
            self.local.iter().map(|j| (j.name.clone(), (j.clone(), JobSource::Config))).collect();
        for job in hub {
            out.insert(job.name.clone(), (job.clone(), JobSource::Hub));
        }
        out.into_values().collect()
    }

    /// Brings the schedules in line with the jobs in force.
    fn apply(&mut self, ctx: &mut Context<Self>) {
        let effective = self.effective();
        let names: Vec<&str> = effective.iter().map(|(j, _)| j.name.as_str()).collect();
        let gone: Vec<String> = self.slots.keys().filter(|n| !names.contains(&n.as_str())).cloned().collect();
        let mut forget = Vec::new();
        for name in gone {
            tracing::info!(job = %name, "Job removed.");
            self.unschedule(&name, ctx);
            self.slots.remove(&name);
            forget.extend([fire_key(&name), last_key(&name)]);
        }
        let now = Timestamp::now();
        let mut armed = Vec::new();
        for (spec, source) in &effective {
            if self.slots.get(&spec.name).is_some_and(|s| s.spec == *spec && s.source == *source) {
                continue;
            }
            self.unschedule(&spec.name, ctx);
            self.generation += 1;
            let mut fire = self.jobs.fire_state(&spec.name);
            if fire.armed_at.is_none() {
                fire.armed_at = Some(now);
                armed.push((fire_key(&spec.name), postcard::to_stdvec(&fire).unwrap_or_default()));
            }
            let slot = Slot {
                spec: spec.clone(),
                source: *source,
                generation: self.generation,
                cron_id: None,
                timer: None,
                every_due: None,
                fire,
                skipped: 0,
            };
            self.slots.insert(spec.name.clone(), slot);
            if spec.enabled {
                tracing::info!(job = %spec.name, schedule = %spec.schedule, %source, "Job scheduled.");
                self.schedule(&spec.name, ctx);
            }
        }
        let catch_up = !std::mem::replace(&mut self.booted, true);
        if catch_up {
            self.catch_up(now, ctx);
        }
        self.report(effective, armed, forget, ctx);
    }

    /// Notices the wall clock stepping backwards (an NTP correction, an
    /// operator) and reschedules the cron jobs from the new time: the cron
    /// library keeps each job's next time as computed before the step and
    /// would leave it silent until the clock reaches that time again. A
    /// forward step needs nothing: the library runs each job whose time was
    /// skipped once and carries on (as cron does for steps under 3 hours).
    /// `@every` jobs follow the monotonic clock and are unaffected.
    fn check_clock(&mut self, ctx: &mut Context<Self>) {
        let (wall, mono) = (Timestamp::now(), Instant::now());
        let expected = self.clock.0.saturating_add(mono.duration_since(self.clock.1));
        self.clock = (wall, mono);
        if wall.saturating_add(CLOCK_STEP) >= expected {
            return;
        }
        let back = wall.until(expected);
        tracing::warn!(stepped_back_ms = millis(back), "The wall clock stepped back; rescheduling cron jobs.");
        let cron: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.spec.enabled && matches!(s.spec.schedule, Schedule::Cron(_)))
            .map(|s| s.spec.name.clone())
            .collect();
        for name in cron {
            self.unschedule(&name, ctx);
            self.generation += 1;
            let generation = self.generation;
            if let Some(slot) = self.slots.get_mut(&name) {
                slot.generation = generation;
            }
            self.schedule(&name, ctx);
        }
    }

    /// At start: runs once each `catch_up` job whose schedule fired while
    /// the agent was stopped.
    fn catch_up(&mut self, now: Timestamp, ctx: &mut Context<Self>) {
        let due: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.spec.enabled && s.spec.catch_up)
            .filter(|s| s.fire.since().is_some_and(|since| s.spec.schedule.missed_between(since, now)))
            .map(|s| s.spec.name.clone())
            .collect();
        for name in due {
            tracing::info!(job = %name, "A run was missed while the agent was stopped; catching up.");
            self.fire(&name, None, Trigger::CatchUp, ctx);
        }
    }

    /// Sends the hub the job list if it differs from the one last sent.
    fn report(
        &self,
        jobs: Vec<(JobSpec, JobSource)>,
        mut kv: Vec<(String, Vec<u8>)>,
        kv_remove: Vec<String>,
        ctx: &mut Context<Self>,
    ) {
        let report = JobsReport { jobs };
        let encoded = postcard::to_stdvec(&report).unwrap_or_default();
        let store = self.jobs.0.store.clone();
        // Never reported reads as an empty list: a device without jobs sends
        // no report.
        let empty = postcard::to_stdvec(&JobsReport { jobs: Vec::new() }).unwrap_or_default();
        let previous = store.get(REPORTED).ok().flatten().unwrap_or(empty);
        let changed = previous != encoded;
        let mut records = Vec::new();
        if changed {
            records.push(RecordBody::JobsReport(report));
            kv.push((REPORTED.into(), encoded));
        }
        if kv.is_empty() && kv_remove.is_empty() {
            return;
        }
        let commit = async move {
            if let Err(e) = store.commit(Changes { records, kv, kv_remove, ..Changes::default() }).await {
                tracing::error!(error = %e, "Cannot record the job list.");
            }
        };
        ctx.spawn(commit.into_actor(self));
    }

    fn unschedule(&mut self, name: &str, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(name) else { return };
        if let Some(timer) = slot.timer.take() {
            ctx.cancel_future(timer);
        }
        if let (Some(id), Some(cron)) = (slot.cron_id.take(), self.cron.clone()) {
            ctx.spawn(
                async move {
                    if let Err(e) = cron.remove(&id).await {
                        tracing::warn!(error = ?e, "Cannot remove a cron job.");
                    }
                }
                .into_actor(self),
            );
        }
    }

    fn schedule(&mut self, name: &str, ctx: &mut Context<Self>) {
        let addr = ctx.address();
        let Some(slot) = self.slots.get_mut(name) else { return };
        let generation = slot.generation;
        match slot.spec.schedule.clone() {
            Schedule::Cron(text) => {
                let Some(cron) = self.cron.clone() else { return };
                let job_name = name.to_owned();
                let job = Job::new_async(text.as_str(), move |_, _| {
                    let (addr, name) = (addr.clone(), job_name.clone());
                    Box::pin(async move { addr.do_send(Fire { name, generation }) })
                });
                match job {
                    Ok(job) => {
                        slot.cron_id = Some(job.guid());
                        ctx.spawn(
                            async move {
                                if let Err(e) = cron.add(job).await {
                                    tracing::error!(error = ?e, "Cannot add a cron job.");
                                }
                            }
                            .into_actor(self),
                        );
                    }
                    Err(e) => tracing::error!(job = %name, error = ?e, "The scheduler refused a cron expression."),
                }
            }
            Schedule::Every(interval) => {
                // The first fire keeps the rhythm of the last one if the
                // agent restarted in between; missed fires are not made up
                // here (that is catch-up's job).
                let now = Timestamp::now();
                let base = slot.fire.since().unwrap_or(now).min(now);
                let delay = first_every_delay(interval, base, now);
                slot.every_due = Some(instant_after(Instant::now(), delay));
                self.arm_every(name, delay, ctx);
            }
        }
    }

    fn arm_every(&mut self, name: &str, delay: Duration, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(name) else { return };
        let (name, generation) = (name.to_owned(), slot.generation);
        slot.timer = Some(ctx.run_later(delay, move |act, ctx| {
            let Some(slot) = act.slots.get_mut(&name).filter(|s| s.generation == generation) else { return };
            let Schedule::Every(interval) = slot.spec.schedule else { return };
            // Next due on the monotonic clock; if the agent fell behind by
            // more than an interval, skip ahead instead of firing a burst.
            let now = Instant::now();
            let next = next_every_instant(slot.every_due.unwrap_or(now), interval, now);
            slot.every_due = Some(next);
            act.arm_every(&name, next.saturating_duration_since(now), ctx);
            act.fire(&name, Some(generation), Trigger::Schedule, ctx);
        }));
    }

    /// A schedule fired: remember it, then start after the jitter.
    fn fire(&mut self, name: &str, generation: Option<u64>, trigger: Trigger, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(name) else { return };
        if generation.is_some_and(|g| g != slot.generation) || !slot.spec.enabled {
            return;
        }
        let jitter = slot.spec.jitter;
        slot.fire.last_fire = Some(Timestamp::now());
        let store = self.jobs.0.store.clone();
        let kv = vec![(fire_key(name), postcard::to_stdvec(&slot.fire).unwrap_or_default())];
        ctx.spawn(
            async move {
                if let Err(e) = store.commit(Changes { kv, ..Changes::default() }).await {
                    tracing::error!(error = %e, "Cannot record a job's fire time.");
                }
            }
            .into_actor(self),
        );
        let name = name.to_owned();
        if jitter.is_zero() {
            let _ = self.start(&name, trigger);
        } else {
            let delay = Duration::from_millis(rand::random_range(0..=millis(jitter)));
            ctx.run_later(delay, move |act, _| {
                let _ = act.start(&name, trigger);
            });
        }
    }

    /// Starts a run now, under the job's overlap policy.
    fn start(&mut self, name: &str, trigger: Trigger) -> Result<u64, JobsError> {
        let slot = self.slots.get_mut(name).ok_or_else(|| JobsError::Unknown(name.to_owned()))?;
        if !slot.spec.enabled {
            return Err(JobsError::Disabled(name.to_owned()));
        }
        let mut live = self.jobs.live();
        let running: Vec<u64> = live.iter().filter(|(_, r)| r.job == name).map(|(id, _)| *id).collect();
        let mut predecessors = Vec::new();
        match (slot.spec.overlap, running.first()) {
            (outpost_shared::job::Overlap::Forbid, Some(&run_id)) => {
                slot.skipped += 1;
                tracing::info!(job = %name, run = run_id, ?trigger, "Run skipped: the previous one is still running (overlap = forbid).");
                return Err(JobsError::Busy { job: name.to_owned(), run_id });
            }
            (outpost_shared::job::Overlap::Replace, Some(_)) => {
                for id in &running {
                    if let Some(run) = live.get(id) {
                        tracing::info!(job = %name, run = id, "Replacing the running run (overlap = replace).");
                        run.stop.cancel();
                        predecessors.push(run.done.clone());
                    }
                }
            }
            _ => {}
        }
        let run_id = self.jobs.0.store.unique_id()?;
        let stop = self.jobs.0.shutdown.child_token();
        let done = CancellationToken::new();
        live.insert(
            run_id,
            LiveRun { job: name.to_owned(), stop: stop.clone(), done: done.clone(), started: Timestamp::now() },
        );
        drop(live);
        tracing::info!(job = %name, run = run_id, ?trigger, "Job run starting.");
        let work = run::Run { jobs: self.jobs.clone(), spec: slot.spec.clone(), run_id, trigger, stop, predecessors };
        let jobs = self.jobs.clone();
        // Every line of the run (its output, its end) names the job and run.
        let span = tracing::info_span!("job", name = %name, run = run_id);
        self.jobs.0.tasks.spawn(tracing::Instrument::instrument(
            async move {
                work.execute().await;
                jobs.live().remove(&run_id);
                done.cancel();
            },
            span,
        ));
        Ok(run_id)
    }

    fn views(&self) -> Vec<JobView> {
        let live = self.jobs.live();
        let now = Timestamp::now();
        self.slots
            .values()
            .map(|slot| {
                let next_run = slot.spec.enabled.then(|| match &slot.spec.schedule {
                    Schedule::Cron(_) => slot.spec.schedule.next_cron_after(now),
                    Schedule::Every(_) => {
                        slot.every_due.map(|due| now.saturating_add(due.saturating_duration_since(Instant::now())))
                    }
                });
                let mut running: Vec<(u64, Timestamp)> =
                    live.iter().filter(|(_, r)| r.job == slot.spec.name).map(|(id, r)| (*id, r.started)).collect();
                running.sort_unstable();
                JobView {
                    spec: slot.spec.clone(),
                    source: slot.source,
                    next_run: next_run.flatten(),
                    running,
                    last: self.jobs.last_run(&slot.spec.name),
                    skipped: slot.skipped,
                }
            })
            .collect()
    }
}

impl Actor for SchedulerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.jobs.0.scheduler.send_replace(Some(ctx.address()));
        let jobs = self.jobs.clone();
        let setup = async move {
            if let Err(e) = jobs.recover().await {
                tracing::error!(error = %e, "Cannot recover interrupted runs.");
            }
            let cron = JobScheduler::new().await?;
            cron.start().await?;
            Ok::<_, tokio_cron_scheduler::JobSchedulerError>(cron)
        };
        ctx.wait(setup.into_actor(self).map(|cron, act, ctx| match cron {
            Ok(cron) => {
                act.cron = Some(cron);
                act.apply(ctx);
                act.clock = (Timestamp::now(), Instant::now());
                ctx.run_interval(CLOCK_CHECK, Self::check_clock);
                crate::settings::follow_settings(ctx, act.settings.clone(), Self::apply);
            }
            Err(e) => {
                tracing::error!(error = ?e, "Cannot start the cron scheduler.");
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(mut cron) = self.cron.take() {
            actix::spawn(async move {
                let _ = cron.shutdown().await;
            });
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Fire {
    name: String,
    generation: u64,
}

impl Handler<Fire> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, msg: Fire, ctx: &mut Self::Context) {
        self.fire(&msg.name, Some(msg.generation), Trigger::Schedule, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<JobView>, JobsError>")]
struct List;

impl Handler<List> for SchedulerActor {
    type Result = Result<Vec<JobView>, JobsError>;
    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        Ok(self.views())
    }
}

#[derive(Message)]
#[rtype(result = "Result<u64, JobsError>")]
struct RunNow {
    name: String,
    trigger: Trigger,
}

impl Handler<RunNow> for SchedulerActor {
    type Result = Result<u64, JobsError>;
    fn handle(&mut self, msg: RunNow, _: &mut Self::Context) -> Self::Result {
        self.start(&msg.name, msg.trigger)
    }
}

/// How long until the first fire of an `@every` job whose last fire (or
/// set-up) was at `base`, keeping its rhythm: the first multiple of
/// `interval` after `base` that lies after `now`.
fn first_every_delay(interval: Duration, base: Timestamp, now: Timestamp) -> Duration {
    let due = Schedule::next_every(interval, base);
    if due > now {
        return now.until(due);
    }
    let step = millis(interval).max(1);
    let behind = now.0.saturating_sub(base.0);
    let due = base.0.saturating_add((behind / step).saturating_add(1).saturating_mul(step));
    Duration::from_millis(due.saturating_sub(now.0))
}

/// The next fire of an `@every` job after the one due at `due`: one
/// interval later, or, if the agent fell behind by more than an interval,
/// the first multiple after `now` (no burst of fires). Never overflows.
fn next_every_instant(due: Instant, interval: Duration, now: Instant) -> Instant {
    let next = instant_after(due, interval);
    if next > now {
        return next;
    }
    let step = interval.as_nanos().max(1);
    let behind = now.duration_since(due).as_nanos();
    let skip = (behind / step + 1).saturating_mul(step);
    instant_after(due, Duration::from_nanos(u64::try_from(skip).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn every_delays_keep_the_rhythm_and_never_overflow() {
        let s = Duration::from_secs;
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(3_000)), s(7));
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(25_000)), s(5));
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(30_000)), s(10));
        let huge = Duration::from_secs(u64::MAX);
        assert!(first_every_delay(huge, Timestamp(5), Timestamp(6)) > s(1 << 40));
        let now = Instant::now();
        assert_eq!(next_every_instant(now, s(10), now), now + s(10));
        assert_eq!(next_every_instant(now, s(10), now + s(25)), now + s(30));
        assert!(next_every_instant(now, huge, now) > now + s(1 << 30));
    }
}
