//! What the uplink knows that other parts of the agent read: the state of
//! the link to the hub ([`LinkState`], a watch the uplink publishes: LAN
//! peers advertise it, the backup task waits for it, the control socket
//! shows it) and the hub's clock as the last session saw it ([`HubClock`],
//! which decides when a command expired). A leaf module: it depends on
//! nothing of the agent, so every reader can depend on it.

use outpost_shared::time::Timestamp;
use std::time::Duration;

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

/// The hub's clock as the device last saw it: the hub's time in `Welcome`
/// and when it arrived on the device's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct HubClock {
    hub: Timestamp,
    at: std::time::Instant,
}

impl HubClock {
    /// The hub said its clock read `hub` just now.
    pub fn new(hub: Timestamp) -> Self {
        HubClock { hub, at: std::time::Instant::now() }
    }

    /// The hub's time now.
    pub fn now(&self) -> Timestamp {
        self.hub.saturating_add(self.at.elapsed())
    }
}
