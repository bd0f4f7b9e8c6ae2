//! The uplink: the agent's one link to the hub.
//!
//! [`link_loop`] runs as the task of the "uplink" [`crate::task_actor::TaskActor`].
//! It connects, holds a session (see [`quic`]) that drains the outbox in
//! acknowledged batches and takes deliveries into the inbox, and on any
//! failure reconnects with exponential backoff and full jitter. Its state is
//! published on a watch channel that the supervisor turns into systemd
//! `STATUS=` lines.

pub mod quic;

use crate::backoff::Backoff;
use crate::config::UplinkConfig;
use crate::identity::Identity;
use crate::store::AgentStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the uplink is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkState {
    /// Not started yet.
    Starting,
    /// Dialing the hub.
    Connecting {
        /// Attempts since the last session.
        attempt: u32,
    },
    /// A session is open.
    Connected,
    /// Waiting before the next attempt.
    Waiting {
        /// Why the last attempt or session ended.
        reason: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkState::Starting => f.write_str("starting"),
            LinkState::Connecting { attempt } => write!(f, "connecting to hub (attempt {attempt})"),
            LinkState::Connected => f.write_str("connected to hub"),
            LinkState::Waiting { reason, retry_in } => {
                write!(f, "hub unreachable ({reason}); retrying in {}s", retry_in.as_secs())
            }
        }
    }
}

/// Everything the link task needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkParams {
    /// Uplink settings.
    pub config: UplinkConfig,
    /// `host:port` of the hub.
    pub hub: String,
    /// The device's identity.
    pub identity: Identity,
    /// Name sent in the hello.
    pub name: String,
    /// The outbox and inbox.
    pub store: AgentStore,
    /// Where the state is published.
    pub state: Arc<watch::Sender<LinkState>>,
}

/// Connects, serves sessions and reconnects until `cancel`.
pub async fn link_loop(params: LinkParams, cancel: CancellationToken) {
    let mut backoff = Backoff::new(params.config.backoff_initial, params.config.backoff_max);
    let mut attempt = 0u32;
    let mut last_error = String::new();
    loop {
        attempt += 1;
        params.state.send_replace(LinkState::Connecting { attempt });
        let mut session = quic::Session::default();
        let result = tokio::select! {
            () = cancel.cancelled() => None,
            result = session.run(&params) => Some(result),
        };
        let Some(result) = result else {
            session.close().await;
            return;
        };
        let reason = match result {
            Ok(()) => "hub closed the session".to_owned(),
            Err(e) => e.to_string(),
        };
        if session.was_connected() {
            backoff.reset();
            attempt = 0;
            tracing::warn!(%reason, "Hub session ended.");
        } else if reason != last_error {
            tracing::warn!(%reason, attempt, "Cannot reach the hub.");
        } else {
            tracing::debug!(%reason, attempt, "Cannot reach the hub.");
        }
        last_error = reason.clone();
        let delay = backoff.next_delay();
        params.state.send_replace(LinkState::Waiting { reason, retry_in: delay });
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
