//! One run of a job: its attempts, each recorded durably before it starts
//! and when it ends, with retries after failures.

use super::Jobs;
use super::records::{RunningRecord, run_key, run_marker};
use crate::process::{self, ProcessEnd, ProcessSpec};
use crate::store::Changes;
use outpost_shared::job::{Action, Builtin, JobRun, JobSpec, RunOutcome, Trigger};
use outpost_shared::time::Timestamp;
use tokio_util::sync::CancellationToken;

/// Longest wait for a replaced run to record its end before the new one
/// starts anyway.
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) struct Run {
    pub jobs: Jobs,
    pub spec: JobSpec,
    pub run_id: u64,
    pub trigger: Trigger,
    /// Cancelled by a replacing run, or (through its parent) when the
    /// agent stops and its grace ran out.
    pub stop: CancellationToken,
    /// Runs this one replaces; it starts once they have ended.
    pub predecessors: Vec<CancellationToken>,
}

impl Run {
    fn record(&self, attempt: u32, started: Timestamp, process: Option<(u32, u64)>) -> (String, Vec<u8>) {
        let record = RunningRecord {
            run_id: self.run_id,
            job: self.spec.name.clone(),
            trigger: self.trigger.clone(),
            attempt,
            started,
            process,
        };
        (run_key(self.run_id), postcard::to_stdvec(&record).unwrap_or_default())
    }

    /// Runs every attempt; errors of the store are logged (the run record
    /// left behind is reported interrupted at the next start).
    pub async fn execute(self) {
        for done in &self.predecessors {
            let _ = tokio::time::timeout(REPLACE_WAIT, done.cancelled()).await;
        }
        let store = &self.jobs.0.store;
        let mut started = Timestamp::now();
        if let Err(e) = store.commit(Changes { kv: vec![self.record(1, started, None)], ..Changes::default() }).await {
            tracing::error!(job = %self.spec.name, error = %e, "Cannot record a run's start; not running it.");
            return;
        }
        let attempts = self.spec.retries + 1;
        for attempt in 1..=attempts {
            let (outcome, output, output_bytes) = self.attempt(attempt, started).await;
            let retry = attempt < attempts && !outcome.ends_run();
            let run = JobRun {
                run_id: self.run_id,
                job: self.spec.name.clone(),
                trigger: self.trigger.clone(),
                attempt,
                started,
                ended: Timestamp::now(),
                outcome,
                output,
                output_bytes,
            };
            tracing::info!(job = %run.job, run = run.run_id, attempt, outcome = %run.outcome, "Job run ended.");
            // The next attempt's start is recorded with this one's end, so a
            // crash during the backoff still reports the run as interrupted.
            let next_start = retry.then(|| {
                let at = Timestamp::now().saturating_add(self.spec.retry_delay(attempt + 1));
                self.record(attempt + 1, at, None)
            });
            if let Err(e) = self.jobs.record_end(&run, next_start).await {
                tracing::error!(job = %self.spec.name, error = %e, "Cannot record a run's end.");
                return;
            }
            if !retry {
                return;
            }
            let delay = self.spec.retry_delay(attempt + 1);
            tracing::info!(job = %self.spec.name, run = self.run_id, next_attempt = attempt + 1, delay_ms = outpost_shared::time::millis(delay), "Retrying after a failed attempt.");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => {
                    let outcome = if self.jobs.0.kill_runs.is_cancelled() { RunOutcome::Interrupted } else { RunOutcome::Replaced };
                    let now = Timestamp::now();
                    let run = JobRun { attempt: attempt + 1, started: now, ended: now, outcome, output: "cancelled before the retry started".into(), output_bytes: 0, ..run };
                    if let Err(e) = self.jobs.record_end(&run, None).await {
                        tracing::error!(job = %self.spec.name, error = %e, "Cannot record a run's end.");
                    }
                    return;
                }
            }
            started = Timestamp::now();
        }
    }

    /// One attempt: (outcome, output tail, output bytes).
    async fn attempt(&self, attempt: u32, started: Timestamp) -> (RunOutcome, String, u64) {
        let stopped = || {
            if self.jobs.0.kill_runs.is_cancelled() { RunOutcome::Interrupted } else { RunOutcome::Replaced }
        };
        match &self.spec.action {
            Action::Command { argv, env, working_dir } => {
                let dir = working_dir.as_deref().unwrap_or(&self.jobs.0.data_dir);
                // A marker in the run's environment finds its processes if
                // the agent dies before the process id below is durable.
                let mut env = env.clone();
                let (name, value) = run_marker(&self.jobs.0.data_dir, self.run_id);
                env.insert(name.to_owned(), value.clone());
                // A cgroup of its own, if the agent was given a subtree:
                // everything the run starts stays in it, whatever it does.
                let group = match self.jobs.0.cgroups.as_ref().map(|c| c.run(self.run_id)).transpose() {
                    Ok(group) => group,
                    Err(e) => {
                        let error = format!("cannot make the run's cgroup: {e}");
                        return (RunOutcome::FailedToStart { error }, String::new(), 0);
                    }
                };
                let scoped = group.is_some();
                let spec = ProcessSpec { argv, env: &env, working_dir: Some(dir), cgroup: group };
                let spawned = match process::spawn(spec) {
                    Ok(s) => s,
                    Err(error) => return (RunOutcome::FailedToStart { error }, String::new(), 0),
                };
                let pid = spawned.pid();
                if let Some(ticks) = process::start_time(pid) {
                    let record = self.record(attempt, started, Some((pid, ticks)));
                    let store = &self.jobs.0.store;
                    if let Err(e) = store.commit(Changes { kv: vec![record], ..Changes::default() }).await {
                        tracing::warn!(job = %self.spec.name, error = %e, "Cannot record a run's process id.");
                    }
                }
                let max_output = usize::try_from(self.spec.max_output).unwrap_or(usize::MAX);
                let result = spawned.wait(self.spec.timeout, max_output, &self.stop).await;
                let outcome = match result.end {
                    ProcessEnd::Exited(code) => RunOutcome::Exited { code },
                    ProcessEnd::Signaled(signal) => RunOutcome::Signaled { signal },
                    ProcessEnd::TimedOut => RunOutcome::TimedOut,
                    ProcessEnd::Stopped => stopped(),
                };
                let mut output = result.output;
                if scoped {
                    // The run's group is gone, and what left it (setsid, a
                    // double fork, a scrubbed environment) with the run's
                    // cgroup, however the run ended.
                    let strays = result.strays;
                    if strays > 0 {
                        tracing::warn!(job = %self.spec.name, run = self.run_id, processes = strays, "Killed processes the run left in its cgroup.");
                        output
                            .push_str(&format!("\n[outpost: killed {strays} process(es) the run left in its cgroup]"));
                    }
                } else if matches!(result.end, ProcessEnd::TimedOut | ProcessEnd::Stopped) {
                    // The run's group is gone; what left it (setsid, a
                    // double fork) still carries the run's marker: a run
                    // that is killed leaves nothing behind.
                    let own = i32::try_from(pid).unwrap_or(0);
                    let strays = kill_marked(format!("{name}={value}"), own).await;
                    if strays > 0 {
                        tracing::warn!(job = %self.spec.name, run = self.run_id, groups = strays, "Killed processes the run had moved out of its group.");
                        output.push_str(&format!(
                            "\n[outpost: killed {strays} process group(s) the run had moved out of its own]"
                        ));
                    }
                }
                (outcome, output, result.output_bytes)
            }
            Action::Builtin(Builtin::StoreCheck) => {
                let store = self.jobs.0.store.clone();
                let check = tokio::task::spawn_blocking(move || store.check());
                tokio::select! {
                    result = check => match result {
                        Ok(Ok(summary)) => (RunOutcome::Exited { code: 0 }, summary, 0),
                        Ok(Err(problems)) => (RunOutcome::Failed { error: "the store has unreadable records".into() }, problems, 0),
                        Err(e) => (RunOutcome::Failed { error: format!("the check crashed: {e}") }, String::new(), 0),
                    },
                    () = tokio::time::sleep(self.spec.timeout) => (RunOutcome::TimedOut, String::new(), 0),
                    () = self.stop.cancelled() => (stopped(), String::new(), 0),
                }
            }
        }
    }
}

/// Kills every process group but `own` (the run's, killed already) whose
/// processes carry `marker` (`NAME=value`) in their environment; returns
/// how many there were.
async fn kill_marked(marker: String, own: i32) -> usize {
    let mut groups = tokio::task::spawn_blocking(move || process::groups_with_env(&marker)).await.unwrap_or_default();
    groups.retain(|pgid| *pgid != own);
    for pgid in &groups {
        process::kill_group(*pgid);
    }
    groups.len()
}
