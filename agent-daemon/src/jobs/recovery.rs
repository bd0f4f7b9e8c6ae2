//! Runs an agent that died left behind: found at start by their running
//! records, their processes killed, reported `Interrupted`.

use super::Jobs;
use super::records::{RUN_PREFIX, RunningRecord, run_marker};
use crate::store::{Changes, StoreError};
use outpost_shared::job::{JobRun, RunOutcome};
use outpost_shared::time::Timestamp;

impl Jobs {
    /// Reports runs left over by an agent that died, killing their process
    /// groups if they still run. Skips runs this process knows are live.
    pub(super) async fn recover(&self) -> Result<(), StoreError> {
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
            // And what is left in its cgroup, if runs have them.
            if let Some(group) = self.0.cgroups.as_ref().and_then(|c| c.left(record.run_id)) {
                note.push_str(&crate::cgroup::killed_note(group.close_off_thread(|_| true).await));
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
}
