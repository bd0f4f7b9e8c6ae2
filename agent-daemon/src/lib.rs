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
pub mod config;
pub mod control;
pub mod crash;
pub mod enroll;
pub mod identity;
pub mod inbox;
pub mod jobs;
pub mod keyfile;
pub mod link;
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
    if outbox.full {
        line.push_str(&format!(
            "; ALARM outbox full: {} KiB of results, reports and alarms exceed the budget; all kept",
            outbox.precious_bytes / 1024
        ));
    }
    line
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
        let defaults = Settings { telemetry_interval: config.telemetry.interval, hub_jobs: Vec::new() };
        let (settings_tx, settings_rx) =
            watch::channel(inbox::current_settings(&store, &defaults, config.commands.allow_exec));
        let settings_tx = Arc::new(settings_tx);
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
        let jobs = Jobs::new(store.clone(), config.data_dir.clone(), tasks.clone(), stop.clone());
        let (t1, s1) = (tasks.clone(), stop.clone());
        let (t2, s2, store2, commands) = (tasks.clone(), stop.clone(), store.clone(), config.commands.clone());
        let store3 = store.clone();
        let (jobs2, jobs3, jobs4) = (jobs.clone(), jobs.clone(), jobs.clone());
        let mut local_jobs = config.jobs.clone();
        local_jobs.extend(backup::scheduled_jobs(&config));
        let jobs_settings = settings_rx.clone();
        let (t3, s3, control_dir) = (tasks.clone(), stop.clone(), config.data_dir.clone());
        let (t4, s4, control_peers) = (tasks.clone(), stop.clone(), peer_table.clone());
        let upload = backup::upload_command(&config).map(|argv| {
            let flag = config.backup_repo.dir.join("upload-pending");
            (argv, flag, state_rx.clone(), config.backup_repo.timeout, tasks.clone(), stop.clone())
        });
        let status_store = store.clone();
        let mut supervisor = SupervisorActor::new(RestartPolicy::default())
            .child("uplink", move || {
                let params = params.clone();
                TaskActor::new("uplink", t1.clone(), s1.clone(), move |cancel| {
                    uplink::link_loop(params.clone(), cancel)
                })
            })
            .child("commands", move || {
                let (store, commands, defaults, settings, jobs) =
                    (store2.clone(), commands.clone(), defaults.clone(), settings_tx.clone(), jobs2.clone());
                TaskActor::new("commands", t2.clone(), s2.clone(), move |cancel| {
                    let settings = settings.clone();
                    inbox::executor(store.clone(), commands.clone(), jobs.clone(), defaults.clone(), settings, cancel)
                })
            })
            .child("scheduler", move || SchedulerActor::new(jobs3.clone(), local_jobs.clone(), jobs_settings.clone()))
            .child("control", move || {
                let (dir, jobs, peers) = (control_dir.clone(), jobs4.clone(), control_peers.clone());
                TaskActor::new("control", t3.clone(), s3.clone(), move |cancel| {
                    control::serve(dir.clone(), jobs.clone(), peers.clone(), cancel)
                })
            })
            .child("telemetry", move || TelemetryActor::new(store3.clone(), sampler.clone(), settings_rx.clone()))
            .status_from(state_rx.clone(), move || status_line(&state_rx.borrow(), &status_store.stats()));
        if config.peers.enabled {
            supervisor = supervisor.child("peers", move || {
                let params = peer_params.clone();
                TaskActor::new("peers", t4.clone(), s4.clone(), move |cancel| peers::run(params.clone(), cancel))
            });
        }
        if let Some((argv, flag, link, timeout, t5, s5)) = upload {
            supervisor = supervisor.child("backup-upload", move || {
                let (argv, flag, link) = (argv.clone(), flag.clone(), link.clone());
                TaskActor::new("backup-upload", t5.clone(), s5.clone(), move |cancel| {
                    backup::upload_task(argv.clone(), flag.clone(), link.clone(), timeout, UPLOAD_RETRY, cancel)
                })
            });
        }
        let supervisor = actix::Actor::start(supervisor);
        extra(&store);
        shutdown.await;
        tracing::info!("Agent stopping.");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        stop.cancel();
        drop(supervisor);
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
