//! The scheduler actor: brings the schedules in line with the jobs in
//! force (the config's, replaced by name by the hub's), fires them, starts
//! runs under their overlap policy, catches up what was missed while
//! stopped, and reports the job list to the hub when it changes.

use super::clock::{CLOCK_CHECK, ClockWatch, first_every_delay, next_every_instant};
use super::records::{FireState, REPORTED, fire_key, last_key};
use super::{JobView, Jobs, JobsError, LiveRun, run};
use crate::settings::Settings;
use crate::store::Changes;
use actix::prelude::*;
use outpost_shared::job::{JobSource, JobSpec, JobsReport, Schedule, Trigger};
use outpost_shared::protocol::RecordBody;
use outpost_shared::time::{Timestamp, instant_after, millis};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Runs the jobs' schedules. Restarted by the supervisor if it fails; the
/// runs in progress are not affected.
pub struct SchedulerActor {
    jobs: Jobs,
    settings: watch::Receiver<Settings>,
    cron: Option<JobScheduler>,
    slots: BTreeMap<String, Slot>,
    generation: u64,
    booted: bool,
    /// The wall clock at the last clock check.
    clock: ClockWatch,
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
    /// A scheduler for the config's jobs and the hub's, from `settings`.
    pub fn new(jobs: Jobs, settings: watch::Receiver<Settings>) -> Self {
        SchedulerActor {
            jobs,
            settings,
            cron: None,
            slots: BTreeMap::new(),
            generation: 0,
            booted: false,
            clock: ClockWatch::new(Timestamp::now(), Instant::now()),
        }
    }

    /// The jobs in force now.
    fn effective(&self) -> Vec<(JobSpec, JobSource)> {
        let settings = self.settings.borrow();
        effective(&settings.config_jobs, &settings.hub_jobs)
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
        let Some(back) = self.clock.stepped_back(Timestamp::now(), Instant::now()) else { return };
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
        if self.jobs.0.shutdown.is_cancelled() {
            // The agent stops: runs in progress may finish, none starts.
            return Err(JobsError::NotRunning);
        }
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
        let stop = self.jobs.0.kill_runs.child_token();
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
        let span = tracing::info_span!("job", job = %name, run = run_id);
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
                act.clock = ClockWatch::new(Timestamp::now(), Instant::now());
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
pub(super) struct List;

impl Handler<List> for SchedulerActor {
    type Result = Result<Vec<JobView>, JobsError>;
    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        Ok(self.views())
    }
}

#[derive(Message)]
#[rtype(result = "Result<u64, JobsError>")]
pub(super) struct RunNow {
    pub(super) name: String,
    pub(super) trigger: Trigger,
}

impl Handler<RunNow> for SchedulerActor {
    type Result = Result<u64, JobsError>;
    fn handle(&mut self, msg: RunNow, _: &mut Self::Context) -> Self::Result {
        self.start(&msg.name, msg.trigger)
    }
}

/// The config's jobs, each replaced by the hub's job of the same name, by
/// name. Pure.
fn effective(local: &[JobSpec], hub: &[JobSpec]) -> Vec<(JobSpec, JobSource)> {
    let mut out: BTreeMap<String, (JobSpec, JobSource)> =
        local.iter().map(|j| (j.name.clone(), (j.clone(), JobSource::Config))).collect();
    for job in hub {
        out.insert(job.name.clone(), (job.clone(), JobSource::Hub));
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, schedule: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            schedule: Schedule::parse(schedule).unwrap(),
            action: outpost_shared::job::Action::Builtin(outpost_shared::job::Builtin::ALL[0].1),
            timeout: Duration::from_secs(60),
            retries: 0,
            retry_backoff: Duration::from_secs(10),
            overlap: outpost_shared::job::Overlap::Forbid,
            catch_up: false,
            jitter: Duration::ZERO,
            max_output: 1024,
            enabled: true,
        }
    }

    #[test]
    fn the_hub_replaces_config_jobs_by_name_and_adds_its_own() {
        let local = [job("backup", "@every 1h"), job("clean", "@every 1d")];
        let hub = [job("backup", "@every 5m"), job("ping", "@every 30s")];
        assert_eq!(
            effective(&local, &hub),
            [(hub[0].clone(), JobSource::Hub), (local[1].clone(), JobSource::Config), (hub[1].clone(), JobSource::Hub),]
        );
        assert!(effective(&[], &[]).is_empty());
    }
}
