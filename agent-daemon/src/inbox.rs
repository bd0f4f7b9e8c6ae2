//! What the hub asks of the device: commands and desired state.
//!
//! [`accept`] persists a delivery before anything acts on it: commands go to
//! the inbox as `Pending` (a command already there is not added again, so a
//! re-delivery is harmless; one at or below the highest id forgotten from
//! the inbox is never run, see [`to_queue`]), a newer desired state replaces
//! the stored one. Only then does the uplink confirm receipt to the hub.
//!
//! [`executor`] runs as a task: it marks a command `Running` (durably) before
//! starting it, and writes its result to the outbox and `Done` to the inbox in
//! one transaction. A command found `Running` at start was cut off by a crash:
//! it is reported `Interrupted`, never started twice, and what is left in its
//! cgroup (an `exec` left to finish when the agent stopped) is killed. A
//! command whose expiry
//! has passed is reported `Expired` and not started. Desired state is applied
//! (today: the telemetry interval) and the applied version reported.

use crate::cgroup::Subtree;
use crate::config::CommandsConfig;
use crate::jobs::Jobs;
use crate::link::HubClock;
use crate::process::{self, ProcessEnd, ProcessSpec};
use crate::settings::Settings;
use crate::store::{AgentStore, Changes, InboxEntry, InboxState, StoreError};
use outpost_shared::desired::DesiredDoc;
use outpost_shared::job::Trigger;
use outpost_shared::protocol::{CommandKind, CommandResult, Deliver, Desired, Outcome, RecordBody, StateReport};
use outpost_shared::time::Timestamp;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const DESIRED: &str = "desired";
/// Finished commands remembered to recognise re-deliveries. The hub resends
/// a command only until it records its receipt or result, so a re-delivery
/// of anything older than the last thousand commands cannot happen.
const KEEP_DONE: usize = 1000;
/// The highest command id pruned from the inbox (big-endian u64): a
/// command at or below it that the inbox does not hold ran long ago (or is
/// a replay) and is never run.
const FORGOTTEN: &str = "inbox.forgotten";
const APPLIED: &str = "desired.applied";
/// The last desired-state document that was applied (the one in force).
const GOOD: &str = "desired.good";

/// When a command the hub set to expire at `expires_at` (hub clock)
/// expires on the device's clock, given that the hub's clock reads
/// `hub_now` while the device's reads `local_now`: the time it has left is
/// counted from receipt, so a device without a real-time clock (booted
/// near 1970) or one far ahead expires commands when the hub meant it to.
pub fn local_expiry(expires_at: Timestamp, hub_now: Timestamp, local_now: Timestamp) -> Timestamp {
    local_now.saturating_add(hub_now.until(expires_at))
}

/// Persists a delivery; returns the ids of the commands now held (new or
/// already known), for the `Received` reply. Each command's expiry is
/// turned from the hub's clock into the device's ([`local_expiry`]).
pub async fn accept(store: &AgentStore, deliver: Deliver, hub: &HubClock) -> Result<Vec<u64>, StoreError> {
    let mut changes = Changes::default();
    let mut ids = Vec::new();
    let (hub_now, local_now) = (hub.now(), Timestamp::now());
    let forgotten = forgotten_upto(store)?;
    for mut command in deliver.commands {
        ids.push(command.id);
        command.expires_at = local_expiry(command.expires_at, hub_now, local_now);
        let held = store.inbox_entry(command.id)?.is_some();
        if to_queue(command.id, held, forgotten) {
            changes.inbox.push(InboxEntry { command, state: InboxState::Pending });
        } else if !held {
            tracing::warn!(
                command = command.id,
                forgotten_upto = forgotten,
                "Refused a command at or below the highest id this device has finished and forgotten (a replay, or \
                 one delivered after a thousand newer ones); it is not run."
            );
        }
    }
    if let Some(desired) = deliver.desired {
        let current = stored_desired(store)?.map_or(0, |d| d.version);
        if desired.version > current {
            changes.kv.push((DESIRED.into(), postcard::to_stdvec(&desired).unwrap_or_default()));
        }
    }
    let wake = !changes.kv.is_empty();
    if !changes.inbox.is_empty() || wake {
        store.commit(changes).await?;
        if wake {
            // A new desired state with no command: the executor applies it.
            store.wake_inbox();
        }
    }
    Ok(ids)
}

/// Whether a delivered command is queued to run: not if the inbox holds
/// it already (a re-delivery), nor if its id is at or below the highest id
/// forgotten from the inbox (it ran before, or it is a replay). Command ids
/// grow with time at the hub; a device forgets only its oldest finished
/// ones, so this mark refuses every command it ever ran, forever, in eight
/// bytes.
pub fn to_queue(id: u64, held: bool, forgotten_upto: u64) -> bool {
    !held && id > forgotten_upto
}

fn forgotten_upto(store: &AgentStore) -> Result<u64, StoreError> {
    Ok(store.get(FORGOTTEN)?.and_then(|b| b.try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
}

fn stored_desired(store: &AgentStore) -> Result<Option<Desired>, StoreError> {
    Ok(store.get(DESIRED)?.and_then(|b| postcard::from_bytes(&b).ok()))
}

fn applied_version(store: &AgentStore) -> Result<u64, StoreError> {
    Ok(store.get(APPLIED)?.and_then(|b| b.try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
}

/// The settings in force: the config's, overridden by the applied desired
/// state.
pub fn current_settings(store: &AgentStore, defaults: &Settings, allow_exec: bool) -> Settings {
    // The document in force is the last one applied; a refused newer one
    // does not replace it (agents from before `GOOD` existed only kept the
    // applied document under DESIRED).
    let good = store.get(GOOD).ok().flatten().and_then(|b| String::from_utf8(b).ok()).or_else(|| {
        let applied = applied_version(store).unwrap_or(0);
        stored_desired(store).ok().flatten().filter(|d| d.version == applied).map(|d| d.doc)
    });
    match good.map(|text| DesiredDoc::parse(&text).and_then(|doc| Settings::with(defaults, doc, allow_exec))) {
        Some(Ok(settings)) => settings,
        Some(Err(e)) => {
            // Applied once, refused now: the config changed since (exec
            // switched off). The config's settings hold until the hub
            // sends a document this device accepts.
            tracing::warn!(error = %e, "The desired state in force is not allowed by this config; using the config's settings.");
            defaults.clone()
        }
        None => defaults.clone(),
    }
}

/// Runs commands and applies desired state until `cancel`.
pub async fn executor(
    store: AgentStore,
    config: CommandsConfig,
    jobs: Jobs,
    defaults: crate::settings::Defaults,
    settings: std::sync::Arc<watch::Sender<Settings>>,
    cancel: CancellationToken,
) {
    if let Err(e) = run_executor(&store, &config, &jobs, &defaults, &settings, &cancel).await {
        tracing::error!(error = %e, "Command executor failed.");
    }
}

async fn run_executor(
    store: &AgentStore,
    config: &CommandsConfig,
    jobs: &Jobs,
    defaults: &crate::settings::Defaults,
    settings: &watch::Sender<Settings>,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    for entry in store.inbox_in(&InboxState::Running)? {
        tracing::warn!(command = entry.command.id, "Command was cut off by a restart; reporting it interrupted.");
        let mut note = "the agent stopped while this command ran; it is not run again".to_owned();
        // What still runs of it in its cgroup goes now.
        if let Some(group) = jobs.cgroups().and_then(|c| c.left_command(entry.command.id)) {
            note.push_str(&crate::cgroup::killed_note(group.close_off_thread(|_| true).await));
        }
        finish(store, entry, Outcome::Interrupted, note).await?;
    }
    loop {
        let now = crate::settings::defaults_now(defaults);
        apply_desired(store, &now, config.allow_exec, settings).await?;
        for entry in store.inbox_in(&InboxState::Pending)? {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let span = tracing::info_span!("command", id = entry.command.id, kind = %entry.command.kind);
            run_one(store, config, jobs, entry, cancel).instrument(span).await?;
        }
        prune_done(store).await?;
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = store.inbox_changed() => {}
        }
    }
}

/// Forgets the oldest finished commands beyond [`KEEP_DONE`], raising the
/// forgotten mark ([`to_queue`]) in the same transaction.
async fn prune_done(store: &AgentStore) -> Result<(), StoreError> {
    let mut done = store.inbox_in(&InboxState::Done)?;
    if done.len() > KEEP_DONE {
        done.sort_by_key(|e| e.command.id);
        let inbox_remove: Vec<u64> = done[..done.len() - KEEP_DONE].iter().map(|e| e.command.id).collect();
        let mark = inbox_remove.iter().copied().max().unwrap_or(0).max(forgotten_upto(store)?);
        let kv = vec![(FORGOTTEN.to_owned(), mark.to_be_bytes().to_vec())];
        store.commit(Changes { inbox_remove, kv, ..Changes::default() }).await?;
    }
    Ok(())
}

async fn apply_desired(
    store: &AgentStore,
    defaults: &Settings,
    allow_exec: bool,
    settings: &watch::Sender<Settings>,
) -> Result<(), StoreError> {
    let Some(desired) = stored_desired(store)? else {
        return Ok(());
    };
    let applied = applied_version(store)?;
    if desired.version <= applied {
        return Ok(());
    }
    let mut good = None;
    let (report, new_applied) = match DesiredDoc::parse(&desired.doc)
        .and_then(|d| Settings::with(defaults, d, allow_exec))
    {
        Ok(new) => {
            settings.send_replace(new);
            tracing::info!(version = desired.version, "Desired state applied.");
            good = Some(desired.doc.clone());
            (StateReport { applied_version: desired.version, error: None }, desired.version)
        }
        Err(e) => {
            tracing::warn!(version = desired.version, error = %e, "Desired state refused; keeping the last good one.");
            // Remember the refusal as applied-or-refused, so it is reported once.
            (StateReport { applied_version: applied, error: Some(e) }, desired.version)
        }
    };
    let mut kv = vec![(APPLIED.into(), new_applied.to_be_bytes().to_vec())];
    kv.extend(good.map(|doc| (GOOD.to_owned(), doc.into_bytes())));
    let changes = Changes { records: vec![RecordBody::StateReport(report)], kv, ..Changes::default() };
    store.commit(changes).await?;
    Ok(())
}

async fn finish(store: &AgentStore, mut entry: InboxEntry, outcome: Outcome, output: String) -> Result<(), StoreError> {
    let result = CommandResult { id: entry.command.id, outcome, output };
    entry.state = InboxState::Done;
    store
        .commit(Changes { records: vec![RecordBody::CommandResult(result)], inbox: vec![entry], ..Changes::default() })
        .await?;
    Ok(())
}

async fn run_one(
    store: &AgentStore,
    config: &CommandsConfig,
    jobs: &Jobs,
    mut entry: InboxEntry,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let command = entry.command.clone();
    if Timestamp::now() >= command.expires_at {
        tracing::info!(command = command.id, "Command expired before it could start.");
        return finish(store, entry, Outcome::Expired, String::new()).await;
    }
    entry.state = InboxState::Running;
    store.commit(Changes { inbox: vec![entry.clone()], ..Changes::default() }).await?;
    tracing::info!(command = command.id, kind = %command.kind, "Running command.");
    let (outcome, output) = match CommandKind::parse(&command.kind) {
        Some(CommandKind::Echo) => (Outcome::Succeeded, command.args.join(" ")),
        Some(CommandKind::Exec) if config.allow_exec => {
            exec(&command.args, config.timeout, config.max_output, jobs.cgroups().map(|c| (c, command.id)), cancel)
                .await
        }
        Some(CommandKind::Backup) => match &config.backup_command {
            Some(prefix) => match crate::backup::hub_command(prefix, &command.args) {
                Ok(argv) => {
                    let cgroup = jobs.cgroups().map(|c| (c, command.id));
                    exec(&argv, config.backup_timeout, config.max_output, cgroup, cancel).await
                }
                Err(e) => (Outcome::Rejected, e),
            },
            None => (Outcome::Rejected, "this agent runs without a config file; backups are unavailable".into()),
        },
        Some(CommandKind::Exec) => {
            (Outcome::Rejected, "exec commands are disabled on this device (commands.allow_exec)".into())
        }
        Some(CommandKind::RunJob) => match command.args.as_slice() {
            [name] => match jobs.run_now(name, Trigger::Command { id: command.id }).await {
                Ok(run_id) => (Outcome::Succeeded, format!("run {run_id} of job {name:?} started")),
                Err(e) => (Outcome::Rejected, e.to_string()),
            },
            _ => (Outcome::Rejected, "run_job takes one argument: the job's name".into()),
        },
        None => (Outcome::Rejected, format!("unknown command kind {:?}", command.kind)),
    };
    finish(store, entry, outcome, output).await
}

/// Runs a program in its own process group (and a cgroup of its own under
/// `cgroup`'s subtree, named by the command's id, when the agent has one)
/// with a timeout and an output cap (the tail is kept); when it ends or
/// times out, the whole group (and cgroup) is killed.
async fn exec(
    args: &[String],
    timeout: Duration,
    max_output: usize,
    cgroup: Option<(&Subtree, u64)>,
    cancel: &CancellationToken,
) -> (Outcome, String) {
    let env = std::collections::BTreeMap::new();
    let cgroup = match cgroup.map(|(subtree, id)| subtree.command(id)).transpose() {
        Ok(group) => group,
        Err(e) => return (Outcome::Failed { code: 127 }, format!("cannot make the command's cgroup: {e}")),
    };
    let spawned = match process::spawn(ProcessSpec { argv: args, env: &env, working_dir: None, cgroup }) {
        Ok(s) => s,
        Err(e) => return (Outcome::Failed { code: 127 }, e),
    };
    // On shutdown the command is left to finish on its own (under systemd,
    // stopping the unit ends it with the agent's cgroup); at the next start
    // it is reported interrupted, not run again.
    let detached = CancellationToken::new();
    let run = spawned.wait(timeout, max_output, &detached);
    let result = tokio::select! {
        r = run => r,
        () = cancel.cancelled() => {
            return (Outcome::Interrupted, "the agent stopped while this command ran".into());
        }
    };
    let mut output = result.output;
    if result.strays > 0 {
        output.push_str(&format!("\n[outpost: killed {} process(es) the command left in its cgroup]", result.strays));
    }
    match result.end {
        ProcessEnd::Exited(0) => (Outcome::Succeeded, output),
        ProcessEnd::Exited(code) => (Outcome::Failed { code }, output),
        ProcessEnd::Signaled(_) | ProcessEnd::Stopped => (Outcome::Failed { code: -1 }, output),
        ProcessEnd::TimedOut => {
            (Outcome::Failed { code: -1 }, format!("{output}\nkilled after the timeout of {timeout:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::protocol::Command;

    #[test]
    fn expiry_follows_the_hubs_clock_whatever_the_devices_says() {
        let hub_now = Timestamp(1_800_000_000_000);
        let expires = Timestamp(hub_now.0 + 60_000);
        // A device that booted near 1970 without a real-time clock.
        assert_eq!(local_expiry(expires, hub_now, Timestamp(5_000)), Timestamp(65_000));
        // A device a year ahead.
        let ahead = Timestamp(hub_now.0 + 31_536_000_000);
        assert_eq!(local_expiry(expires, hub_now, ahead), Timestamp(ahead.0 + 60_000));
        // Already expired at the hub: expired on arrival.
        assert_eq!(local_expiry(Timestamp(1), hub_now, Timestamp(5_000)), Timestamp(5_000));
        assert_eq!(local_expiry(Timestamp(u64::MAX), Timestamp(0), Timestamp(u64::MAX - 1)), Timestamp(u64::MAX));
    }

    #[tokio::test]
    async fn commands_run_once_and_old_finished_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        let far = Timestamp(Timestamp::now().0 + 3_600_000);
        let command = |id| Command { id, kind: "echo".into(), args: vec![id.to_string()], expires_at: far };
        let deliver = |ids: std::ops::Range<u64>| Deliver { commands: ids.map(command).collect(), desired: None };
        let hub = HubClock::new(Timestamp::now());
        assert_eq!(accept(&store, deliver(1..1101), &hub).await.unwrap().len(), 1100);
        let config = CommandsConfig {
            allow_exec: false,
            timeout: Duration::from_secs(1),
            max_output: 1024,
            backup_command: None,
            backup_timeout: Duration::from_secs(1),
        };
        let defaults =
            Settings { telemetry_interval: Duration::from_secs(1), hub_jobs: Vec::new(), config_jobs: Vec::new() };
        let (tx, _rx) = watch::channel(defaults.clone());
        let defaults = std::sync::Arc::new(std::sync::RwLock::new(defaults));
        let cancel = CancellationToken::new();
        let run = {
            let (store, cancel) = (store.clone(), cancel.clone());
            let jobs = Jobs::new(store.clone(), dir.path().into(), Default::default(), cancel.clone(), None);
            tokio::spawn(async move { executor(store, config, jobs, defaults, std::sync::Arc::new(tx), cancel).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.inbox_in(&InboxState::Pending).unwrap().len() + store.inbox_in(&InboxState::Done).unwrap().len()
            > KEEP_DONE
        {
            let (p, d) =
                (store.inbox_in(&InboxState::Pending).unwrap().len(), store.inbox_in(&InboxState::Done).unwrap().len());
            assert!(std::time::Instant::now() < deadline, "executor did not finish: {p} pending, {d} done");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A re-delivery of a remembered command is confirmed but not queued again.
        assert_eq!(accept(&store, deliver(1090..1101), &hub).await.unwrap().len(), 11);
        assert!(store.inbox_in(&InboxState::Pending).unwrap().is_empty(), "a re-delivered command was queued again");
        // Nor is a forgotten one (a replay of the first hundred): the mark
        // refuses them though the inbox no longer holds them.
        assert!(store.inbox_entry(1).unwrap().is_none(), "the oldest were forgotten");
        assert_eq!(forgotten_upto(&store).unwrap(), 100);
        assert_eq!(accept(&store, deliver(1..101), &hub).await.unwrap().len(), 100);
        assert!(store.inbox_in(&InboxState::Pending).unwrap().is_empty(), "a forgotten command was queued again");
        cancel.cancel();
        run.await.unwrap();
        assert_eq!(store.inbox_in(&InboxState::Done).unwrap().len(), KEEP_DONE);
        assert!(store.inbox_in(&InboxState::Pending).unwrap().is_empty());
        let results = store
            .peek(0, 10_000, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|r| matches!(r.body, RecordBody::CommandResult(_)))
            .count();
        assert_eq!(results, 1100, "every command ran exactly once");
    }

    #[test]
    fn a_command_is_queued_once_and_never_at_or_below_the_forgotten_mark() {
        assert!(to_queue(5, false, 0));
        assert!(!to_queue(5, true, 0), "held: a re-delivery");
        assert!(!to_queue(5, false, 5), "at the mark");
        assert!(!to_queue(4, false, 5), "below the mark");
        assert!(to_queue(6, false, 5));
    }
}
