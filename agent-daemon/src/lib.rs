//! The Outpost agent: an actix System of actors under one supervisor.
//!
//! Data flow: [`telemetry::TelemetryActor`] samples the OS into the durable
//! outbox of the [`store`]; the uplink task ([`uplink::link_loop`]) drains
//! the outbox to the hub over QUIC with mutual TLS in acknowledged batches
//! and puts what the hub delivers into the inbox; the command executor
//! ([`inbox::executor`]) runs commands and applies desired state; the
//! [`supervisor::SupervisorActor`] restarts whichever stops and reports
//! health to systemd. [`enroll`] turns a token into the [`identity`] on disk.

pub mod backoff;
pub mod backup;
pub mod bulk;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod crash;
pub mod enroll;
pub mod exporter;
pub mod identity;
pub mod inbox;
pub mod jobs;
pub mod keyfile;
pub mod link;
pub mod metrics;
pub mod peers;
pub mod process;
pub mod settings;
pub mod store;
pub mod supervisor;
pub mod task_actor;
pub mod telemetry;
pub mod tls;
pub mod uplink;

use crate::config::AgentConfig;
use crate::identity::{Identity, IdentityError};
use crate::jobs::{Jobs, SchedulerActor};
use crate::link::LinkState;
use crate::peers::{PeerParams, PeerTable};
use crate::settings::Settings;
use crate::store::AgentStore;
use crate::supervisor::{RestartPolicy, SupervisorActor};
use crate::task_actor::TaskActor;
use crate::telemetry::{Sampler, TelemetryActor};
use crate::uplink::LinkParams;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown may take before remaining tasks are abandoned.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// How often the daemon looks again for backups waiting for upload while
/// its uplink is connected (it also looks each time the uplink connects).
pub const UPLOAD_RETRY: Duration = Duration::from_secs(300);

/// Errors that stop the agent from running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The identity is missing or unreadable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The local store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The OS offers no system information.
    #[error("cannot read system information: {0}")]
    Telemetry(#[from] sysinfo::Error),
}

/// What every task child shares: the tracker shutdown waits on, and the
/// token that cancels them all.
struct Parts {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Parts {
    /// A child owning one long-running task, made by `task` at each (re)start.
    fn task<F, Fut>(&self, name: &'static str, task: F) -> impl Fn() -> TaskActor + 'static
    where
        F: Fn(CancellationToken) -> Fut + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tasks, stop) = (self.tasks.clone(), self.stop.clone());
        move || TaskActor::new(name, tasks.clone(), stop.clone(), task.clone())
    }
}

/// The name a device reports: from config, else the one it enrolled with,
/// else the host name.
pub fn device_name(config: &AgentConfig, identity: &Identity) -> String {
    config
        .name
        .clone()
        .or_else(|| identity.name.clone())
        .or_else(|| sysinfo::System::host_name().ok())
        .unwrap_or_else(|| "unnamed".into())
}

/// The systemd `STATUS=` line: the link, the backlog, and any outbox alarm.
pub fn status_line(link: &LinkState, outbox: &store::OutboxStats) -> String {
    let mut line = link.to_string();
    if outbox.records > 0 && *link != LinkState::Connected {
        line.push_str(&format!("; {} records waiting ({} KiB)", outbox.records, outbox.bytes / 1024));
    }
    if let Some(fault) = &outbox.fault {
        line.push_str(&format!("; ALARM store cannot write: {fault}"));
    }
    if let Some(cap) = outbox.space_cap {
        line.push_str(&format!(
            "; ALARM little free space: outbox held to {} KiB, telemetry thinned",
            cap.bytes / 1024
        ));
    }
    if outbox.full {
        line.push_str(&format!(
            "; ALARM outbox full: {} KiB of results, reports and alarms exceed the budget; all kept",
            outbox.precious_bytes / 1024
        ));
    }
    line
}

/// The settings the config gives (no hub jobs yet).
fn config_settings(config: &AgentConfig) -> Settings {
    let mut config_jobs = config.jobs.clone();
    config_jobs.extend(backup::scheduled_jobs(config));
    Settings { telemetry_interval: config.telemetry.interval, hub_jobs: Vec::new(), config_jobs }
}

/// The parts of a config that a reload cannot change while the agent runs:
/// the names of those that differ between `old` and `new`.
fn needs_restart(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let differ = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut out = Vec::new();
    for (name, changed) in [
        ("data_dir", old.data_dir != new.data_dir),
        ("name", old.name != new.name),
        ("uplink", differ(&old.uplink, &new.uplink)),
        ("store", differ(&old.store, &new.store)),
        ("commands", differ(&old.commands, &new.commands)),
        ("peers", differ(&old.peers, &new.peers)),
        ("backups", differ(&old.backup_repo, &new.backup_repo)),
        ("stop_grace", old.stop_grace != new.stop_grace),
        ("metrics", old.metrics != new.metrics),
    ] {
        if changed {
            out.push(name);
        }
    }
    out
}

/// On each SIGHUP, reads the config file again. A config with errors is
/// refused (every error logged) and the one in force stays. Otherwise the
/// log level, the jobs (`[[job]]` and the backup sets' schedules) and the
/// telemetry interval take effect at once, without touching the uplink;
/// the parts that need a restart are named in the log. Runs until the
/// process ends; resolves only if SIGHUP cannot be listened for.
async fn reload_on_hangup(
    config: AgentConfig,
    store: AgentStore,
    defaults: settings::Defaults,
    settings: Arc<watch::Sender<Settings>>,
) {
    use outpost_shared::config::ConfigFile;
    let Some(path) = config.config_path.clone() else { return std::future::pending().await };
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for SIGHUP; the config is read at start only.");
            return std::future::pending().await;
        }
    };
    while hangup.recv().await.is_some() {
        let mut new = match AgentConfig::load_checked(&path) {
            Ok(new) => new,
            Err(errors) => {
                for e in &errors.errors {
                    tracing::error!(file = %path.display(), key = %e.path, error = %e.message, "Config not reloaded.");
                }
                tracing::error!(file = %path.display(), "The config has errors; the one in force stays.");
                continue;
            }
        };
        new.config_path = Some(path.clone());
        if let Err(e) = outpost_shared::logging::set_filter(&new.log) {
            tracing::error!(error = %e, "Log level not changed.");
        }
        let fresh = config_settings(&new);
        *defaults.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        settings.send_replace(inbox::current_settings(&store, &fresh, config.commands.allow_exec));
        // Compared with the config the agent started with: that is what the
        // parts that wait for a restart still run on.
        let restart = needs_restart(&config, &new);
        if restart.is_empty() {
            tracing::info!(file = %path.display(), log = %new.log, "Config reloaded.");
        } else {
            tracing::warn!(
                file = %path.display(),
                unchanged_until_restart = %restart.join(", "),
                "Config reloaded; some changes take effect at the next restart."
            );
        }
    }
}

/// Runs the agent until `shutdown` resolves. Blocks the calling thread: it
/// owns one actix System on a tokio runtime.
pub fn run(config: AgentConfig, shutdown: impl Future<Output = ()> + 'static) -> Result<(), AgentError> {
    run_with(config, shutdown, |_| {})
}

/// Like [`run`]; `extra` is called inside the running System with the store,
/// so a caller can add its own producers of records (load generators, tests).
pub fn run_with(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + 'static,
    extra: impl FnOnce(&AgentStore),
) -> Result<(), AgentError> {
    let mut config = config;
    config.commands.backup_command = backup::command_prefix(&config);
    config.commands.backup_timeout = config.backup_repo.timeout;
    let identity = Identity::load(&config.data_dir)?;
    // What LAN peers and bulk connections present; switched at renewal.
    let live = identity::Live::new(identity.clone())?;
    let store = AgentStore::open(&config.data_dir, config.store.outbox_budget, config.store.cache)?;
    store.set_keep_free(config.store.keep_free);
    if Identity::is_new(&config.data_dir) {
        // Enrolled and never run: the store starts where the hub expects.
        store.known_new()?;
        Identity::settle_new(&config.data_dir);
    }
    let sampler = Arc::new(std::sync::Mutex::new(Sampler::new()?));
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
    });
    system.block_on(async move {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let defaults = config_settings(&config);
        let (settings_tx, settings_rx) =
            watch::channel(inbox::current_settings(&store, &defaults, config.commands.allow_exec));
        let settings_tx = Arc::new(settings_tx);
        let defaults: settings::Defaults = Arc::new(std::sync::RwLock::new(defaults));
        let (state_tx, state_rx) = watch::channel(LinkState::Starting);
        let (relay_tx, relay_rx) = tokio::sync::mpsc::channel(16);
        let peer_table = PeerTable::default();
        let params = LinkParams {
            hub: config.uplink.hub.clone().unwrap_or_else(|| identity.hub.clone()),
            config: config.uplink.clone(),
            name: device_name(&config, &identity),
            identity,
            trying_next: false,
            live: live.clone(),
            data_dir: config.data_dir.clone(),
            renewal_refused: Arc::default(),
            store: store.clone(),
            state: Arc::new(state_tx),
            relay: Arc::new(tokio::sync::Mutex::new(relay_rx)),
        };
        let peer_params = PeerParams {
            config: config.peers.clone(),
            identity: live,
            store: store.clone(),
            link: state_rx.clone(),
            relay_tx,
            table: peer_table.clone(),
            max_frame: config.uplink.max_frame,
            ack_timeout: config.uplink.idle_timeout,
        };
        let stats = store.stats();
        tracing::info!(
            device = %params.identity.device_id,
            hub = %params.hub,
            outbox_records = stats.records,
            next_seq = stats.next_seq,
            "Agent starting."
        );
        let cgroups = match cgroup::Subtree::delegated() {
            Ok(subtree) => {
                tracing::info!(cgroup = %subtree.path().display(), "Each job run gets a cgroup of its own.");
                Some(subtree)
            }
            Err(why) => {
                tracing::info!(%why, "Job runs are tracked by process group and marker (no delegated cgroup).");
                None
            }
        };
        let jobs = Jobs::new(store.clone(), config.data_dir.clone(), tasks.clone(), stop.clone(), cgroups);
        let (jobs_at_stop, stop_grace) = (jobs.clone(), config.stop_grace);
        let parts = Parts { tasks: tasks.clone(), stop: stop.clone() };
        // Each child is a function that makes a fresh actor: the supervisor
        // calls it again for each restart, so each keeps its own handles.
        let uplink = move |cancel| uplink::link_loop(params.clone(), cancel);
        let commands = {
            let (store, commands, jobs) = (store.clone(), config.commands.clone(), jobs.clone());
            let (defaults, settings) = (defaults.clone(), settings_tx.clone());
            move |cancel| {
                let (store, commands, jobs) = (store.clone(), commands.clone(), jobs.clone());
                inbox::executor(store, commands, jobs, defaults.clone(), settings.clone(), cancel)
            }
        };
        let scheduler = {
            let (jobs, settings) = (jobs.clone(), settings_rx.clone());
            move || SchedulerActor::new(jobs.clone(), settings.clone())
        };
        let control = {
            let (dir, jobs, peers) = (config.data_dir.clone(), jobs.clone(), peer_table.clone());
            move |cancel| control::serve(dir.clone(), jobs.clone(), peers.clone(), cancel)
        };
        let telemetry = {
            let store = store.clone();
            move || TelemetryActor::new(store.clone(), sampler.clone(), settings_rx.clone())
        };
        let status = {
            let (link, store) = (state_rx.clone(), store.clone());
            move || status_line(&link.borrow(), &store.stats())
        };
        let mut supervisor = SupervisorActor::new(RestartPolicy::default())
            .child("uplink", parts.task("uplink", uplink))
            .child("commands", parts.task("commands", commands))
            .child("scheduler", scheduler)
            .child("control", parts.task("control", control))
            .child("telemetry", telemetry)
            .status_from(state_rx.clone(), status);
        if config.peers.enabled {
            let peers = move |cancel| peers::run(peer_params.clone(), cancel);
            supervisor = supervisor.child("peers", parts.task("peers", peers));
        }
        if let Some(listen) = config.metrics.listen {
            let sources = exporter::Sources {
                store: store.clone(),
                link: state_rx.clone(),
                peers: peer_table.clone(),
                transport: match config.uplink.transport {
                    config::Transport::Quic => "quic",
                    config::Transport::Mqtt(_) => "mqtt",
                },
            };
            let serve = move |cancel| exporter::serve(listen, sources.clone(), cancel);
            supervisor = supervisor.child("metrics", parts.task("metrics", serve));
        }
        if let Some(argv) = backup::upload_command(&config) {
            let flag = config.backup_repo.dir.join("upload-pending");
            let (link, timeout) = (state_rx.clone(), config.backup_repo.timeout);
            let upload = move |cancel| {
                backup::upload_task(argv.clone(), flag.clone(), link.clone(), timeout, UPLOAD_RETRY, cancel)
            };
            supervisor = supervisor.child("backup-upload", parts.task("backup-upload", upload));
        }
        let supervisor = actix::Actor::start(supervisor);
        extra(&store);
        let reloads = reload_on_hangup(config.clone(), store.clone(), defaults.clone(), settings_tx.clone());
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = reloads => shutdown.await,
        }
        tracing::info!("Agent stopping.");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        stop.cancel();
        drop(supervisor);
        // Runs in progress may finish within the grace (their results are
        // stored, for the hub at the next start), then are killed and
        // recorded interrupted.
        jobs_at_stop.finish(stop_grace).await;
        actix::System::current().stop();
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_LIMIT, tasks.wait()).await.is_err() {
            tracing::warn!("Shutdown exceeded its time limit.");
        }
        if let Err(e) = store.flush() {
            tracing::error!(error = %e, "Final store flush failed.");
        }
    });
    Ok(())
}
