//! The Outpost agent: an actix System of actors under one supervisor.
//!
//! Data flow: [`telemetry::TelemetryActor`] samples the OS into the
//! [`telemetry::TelemetryQueue`]; [`uplink::UplinkActor`]'s link task drains
//! it to the hub over QUIC with mutual TLS and sends heartbeats; the
//! [`supervisor::SupervisorActor`] restarts whichever stops and reports
//! health to systemd. [`enroll`] turns a token into the [`identity`] on disk.

pub mod backoff;
pub mod config;
pub mod enroll;
pub mod identity;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod uplink;

use crate::config::AgentConfig;
use crate::identity::{Identity, IdentityError};
use crate::supervisor::{RestartPolicy, SupervisorActor};
use crate::telemetry::{Sampler, TelemetryActor, TelemetryQueue};
use crate::uplink::{LinkParams, LinkState, UplinkActor};
use actix::Actor;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// How long shutdown may take before remaining tasks are abandoned.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// Errors that stop the agent from running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The identity is missing or unreadable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The OS offers no system information.
    #[error("cannot read system information: {0}")]
    Telemetry(#[from] sysinfo::Error),
}

/// The name a device reports: from config, else the host name.
pub fn device_name(config: &AgentConfig) -> String {
    config
        .name
        .clone()
        .or_else(|| sysinfo::System::host_name().ok())
        .unwrap_or_else(|| "unnamed".into())
}

/// Runs the agent until `shutdown` resolves. Blocks the calling thread: it
/// owns one actix System on a tokio runtime.
pub fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), AgentError> {
    let identity = Identity::load(&config.data_dir)?;
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
        let shutdown_token = tokio_util::sync::CancellationToken::new();
        let queue = TelemetryQueue::new(config.telemetry.queue);
        let (state_tx, state_rx) = watch::channel(LinkState::Starting);
        let params = LinkParams {
            hub: config
                .uplink
                .hub
                .clone()
                .unwrap_or_else(|| identity.hub.clone()),
            config: config.uplink.clone(),
            name: device_name(&config),
            identity,
            queue: queue.clone(),
            state: Arc::new(state_tx),
        };
        tracing::info!(device = %params.identity.device_id, hub = %params.hub, "Agent starting.");
        let interval = config.telemetry.interval;
        let uplink_tasks = tasks.clone();
        let uplink_shutdown = shutdown_token.clone();
        let supervisor = SupervisorActor::new(RestartPolicy::default())
            .child("uplink", move || {
                UplinkActor::new(
                    params.clone(),
                    uplink_tasks.clone(),
                    uplink_shutdown.clone(),
                )
                .start()
            })
            .child("telemetry", move || {
                TelemetryActor::new(interval, queue.clone(), sampler.clone()).start()
            })
            .status_from(state_rx)
            .start();
        shutdown.await;
        tracing::info!("Agent stopping.");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        shutdown_token.cancel();
        drop(supervisor);
        actix::System::current().stop();
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_LIMIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Shutdown exceeded its time limit.");
        }
    });
    Ok(())
}
