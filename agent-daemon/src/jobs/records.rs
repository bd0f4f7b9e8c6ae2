//! What the jobs keep in the store's key-value tree (see the module docs of
//! [`super`]): when each job was armed and last fired, its last finished
//! attempt, and the runs in progress.

use outpost_shared::job::{RunOutcome, Trigger};
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};

pub(super) const FIRE_PREFIX: &str = "job.fire.";
pub(super) const LAST_PREFIX: &str = "job.last.";
pub(super) const RUN_PREFIX: &str = "job.run.";
pub(super) const REPORTED: &str = "jobs.reported";
pub(super) fn fire_key(name: &str) -> String {
    format!("{FIRE_PREFIX}{name}")
}

pub(super) fn last_key(name: &str) -> String {
    format!("{LAST_PREFIX}{name}")
}

pub(super) fn run_key(run_id: u64) -> String {
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
    pub(super) fn since(&self) -> Option<Timestamp> {
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
pub(super) struct RunningRecord {
    pub(super) run_id: u64,
    pub(super) job: String,
    pub(super) trigger: Trigger,
    pub(super) attempt: u32,
    pub(super) started: Timestamp,
    /// The process (and group) id and its start time, once started.
    pub(super) process: Option<(u32, u64)>,
}

/// The environment entry marking run `run_id` of the agent whose data dir
/// is `data_dir` (unique on the machine: one agent per data dir).
pub(crate) fn run_marker(data_dir: &std::path::Path, run_id: u64) -> (&'static str, String) {
    ("OUTPOST_JOB_RUN", format!("{}#{run_id}", data_dir.display()))
}
