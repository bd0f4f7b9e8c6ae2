//! The uplink: the agent's one link to the hub.
//!
//! [`link_loop`] runs as the task of the "uplink" [`crate::task_actor::TaskActor`].
//! It connects over the configured transport ([`quic`] straight to the hub,
//! or [`mqtt`] through a broker), holds a [`session`] that drains the outbox
//! in acknowledged batches and takes deliveries into the inbox, and on any
//! failure reconnects with exponential backoff and full jitter. Its state is
//! published on a watch channel that the supervisor turns into systemd
//! `STATUS=` lines.

pub mod mqtt;
pub mod quic;
pub mod session;

use crate::backoff::Backoff;
use crate::config::{Transport, UplinkConfig};
use crate::identity::{Identity, Live};
use crate::store::AgentStore;
use crate::tls;
use outpost_shared::io::StreamError;
use outpost_shared::time::Timestamp;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::link::LinkState;

/// Why a session attempt or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The hub address does not resolve.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No QUIC connection could be made.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed or was closed by the hub.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The control stream broke: I/O, framing or a malformed message.
    #[error("control stream: {0}")]
    Stream(#[from] StreamError),
    /// The hub refused the session.
    #[error("hub refused: {0:?}: {1}")]
    Refused(outpost_shared::protocol::RefusalReason, String),
    /// The hub sent something out of place.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The hub did not answer in time.
    #[error("hub did not answer within {0:?}")]
    Timeout(Duration),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The MQTT broker connection failed or refused us.
    #[error("MQTT broker: {0}")]
    Mqtt(String),
    /// The session ended to reconnect with the renewed certificate (a
    /// transport that cannot prove it to the hub beside the session).
    #[error("reconnecting with the renewed certificate")]
    SwitchIdentity,
}

impl LinkError {
    /// The kind of failure, as the `reason` label of
    /// `outpost_agent_reconnects_total`. Pure.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Resolve { .. } => "resolve",
            LinkError::Connect(_) => "connect",
            LinkError::Connection(_) => "connection_lost",
            LinkError::Stream(_) => "stream",
            LinkError::Refused(..) => "refused",
            LinkError::Protocol(_) => "protocol",
            LinkError::Timeout(_) => "timeout",
            LinkError::Tls(_) => "tls",
            LinkError::Store(_) => "store",
            LinkError::Mqtt(_) => "mqtt",
            LinkError::SwitchIdentity => "renewed_certificate",
        }
    }

    /// What the hub's TLS stack said when it refused this device's
    /// certificate (an expired, revoked or foreign one); `None` for every
    /// other failure. QUIC carries the TLS alert as the connection's close
    /// code (`0x100 + alert`, RFC 9001 §20.1).
    pub fn certificate_refused(&self) -> Option<&'static str> {
        let LinkError::Connection(quinn::ConnectionError::ConnectionClosed(close)) = self else { return None };
        certificate_alert(u64::from(close.error_code))
    }
}

/// The hub turned this connection away before serving it (see the hub's
/// `transport::door`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnedAway {
    /// Past the hub's accept rate: come back after this long (close code
    /// `CLOSE_BUSY`).
    Busy(Duration),
    /// Refused before the handshake (QUIC `CONNECTION_REFUSED`: too many
    /// handshakes in flight), which costs the hub nothing: come back after
    /// the backoff, as after any failure.
    AtTheDoor,
}

impl LinkError {
    /// How the hub turned this connection away, if it did.
    pub fn turned_away(&self) -> Option<TurnedAway> {
        match self {
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == outpost_shared::protocol::CLOSE_BUSY.into() =>
            {
                // A busy close that does not say when: as long as the door.
                Some(
                    outpost_shared::protocol::retry_after_of(&close.reason)
                        .map_or(TurnedAway::AtTheDoor, TurnedAway::Busy),
                )
            }
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(close))
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                Some(TurnedAway::AtTheDoor)
            }
            _ => None,
        }
    }
}

/// How long to wait before the next attempt: the hub's time to come back
/// when it gave one (plus up to a tenth more, at most a second, so devices
/// told the same time do not meet again), else the backoff's next delay
/// (full jitter; a refusal at the door too: it cost the hub nothing, and
/// the backoff doubles). `jitter` is uniform in `[0, 1)`. Pure but for the
/// backoff's count, which every failed attempt advances.
pub fn wait_before_retry(turned: Option<TurnedAway>, backoff: &mut Backoff, jitter: f64) -> Duration {
    let delay = backoff.next_delay();
    match turned {
        None | Some(TurnedAway::AtTheDoor) => delay,
        Some(TurnedAway::Busy(after)) => come_back_after(after, jitter),
    }
}

/// When to come back to a hub that said "after `after`": then (at least
/// 100 ms), plus up to a tenth more, at most a second (`jitter` in
/// `[0, 1)`), so devices told the same time do not meet again. Pure.
pub fn come_back_after(after: Duration, jitter: f64) -> Duration {
    let after = after.max(Duration::from_millis(100));
    after + (after / 10).min(Duration::from_secs(1)).mul_f64(jitter.clamp(0.0, 1.0))
}

impl LinkError {
    /// True if this device refused the hub's certificate as from a CA it
    /// does not trust (TLS alert 48 sent by this side): the fleet's CA was
    /// rotated while the device was away past the overlap, or the address
    /// is not its fleet's hub.
    pub fn hub_untrusted(&self) -> bool {
        matches!(self, LinkError::Connection(quinn::ConnectionError::TransportError(t))
            if t.code == quinn::TransportErrorCode::crypto(48))
    }
}

/// The meaning of a QUIC close code that carries a TLS alert about the
/// client's certificate.
fn certificate_alert(code: u64) -> Option<&'static str> {
    match code.checked_sub(0x100)? {
        42 => Some("bad certificate"),
        43 => Some("unsupported certificate"),
        44 => Some("certificate revoked"),
        45 => Some("certificate expired"),
        46 => Some("certificate unknown"),
        48 => Some("unknown CA"),
        49 => Some("access denied"),
        _ => None,
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        LinkError::Stream(StreamError::Io(e.into()))
    }
}

/// A session over either transport.
#[derive(Debug)]
enum Session {
    Quic(quic::Session),
    Mqtt(mqtt::Session),
}

impl Session {
    fn new(config: &UplinkConfig) -> Self {
        match &config.transport {
            Transport::Quic => Session::Quic(quic::Session::default()),
            Transport::Mqtt(mqtt) => Session::Mqtt(mqtt::Session::new(mqtt.clone())),
        }
    }

    /// The transport's name, for the session's span.
    fn transport(&self) -> &'static str {
        match self {
            Session::Quic(_) => "quic",
            Session::Mqtt(_) => "mqtt",
        }
    }

    fn was_connected(&self) -> bool {
        match self {
            Session::Quic(s) => s.was_connected(),
            Session::Mqtt(s) => s.was_connected(),
        }
    }

    async fn run(&mut self, p: &LinkParams) -> Result<(), LinkError> {
        match self {
            Session::Quic(s) => s.run(p).await,
            Session::Mqtt(s) => s.run(p).await,
        }
    }

    async fn close(&mut self) {
        match self {
            Session::Quic(s) => s.close().await,
            Session::Mqtt(s) => s.close().await,
        }
    }
}

/// A batch a LAN peer asked this device to carry to the hub; the reply is
/// the hub's acknowledgement for the batch's origin, or why there is none.
#[derive(Debug)]
pub struct RelayRequest {
    /// The peer's own signed batch.
    pub batch: outpost_shared::protocol::Batch,
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Relay requests waiting for the uplink; successive sessions take turns.
pub type RelayQueue = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<RelayRequest>>>;

/// Everything the link task needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkParams {
    /// Uplink settings.
    pub config: UplinkConfig,
    /// `host:port` of the hub, or of several hubs of the fleet separated by
    /// commas: the link tries them in a shuffled order and stays with the
    /// one that answers.
    pub hub: String,
    /// The identity this attempt presents: the device's, or a renewed one
    /// the hub has not accepted yet.
    pub identity: Identity,
    /// True if `identity` is the renewed one.
    pub trying_next: bool,
    /// The identity LAN peers and bulk connections present; switched when
    /// the hub accepts a renewed one.
    pub live: Live,
    /// The data dir, where the identity's files are.
    pub data_dir: std::path::PathBuf,
    /// When the hub last refused to renew the certificate.
    pub renewal_refused: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// Name sent in the hello.
    pub name: String,
    /// The outbox and inbox.
    pub store: AgentStore,
    /// Where the state is published.
    pub state: Arc<watch::Sender<LinkState>>,
    /// Batches LAN peers ask this device to relay.
    pub relay: RelayQueue,
}

/// Connects, serves sessions and reconnects until `cancel`.
pub async fn link_loop(params: LinkParams, cancel: CancellationToken) {
    let mut backoff = Backoff::new(params.config.backoff_initial, params.config.backoff_max);
    let mut attempt = 0u32;
    let mut last_error = String::new();
    let hubs = outpost_shared::config::hub_addresses(&params.hub);
    let mut answered: Option<String> = None;
    let mut untried: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    loop {
        attempt += 1;
        params.state.send_replace(LinkState::Connecting { attempt });
        if untried.is_empty() {
            untried = outpost_shared::config::hub_order(&hubs, answered.as_deref(), rand::random()).into();
        }
        let hub = untried.pop_front().unwrap_or_else(|| params.hub.clone());
        // A renewed identity, once there is one, is tried first: the old one
        // stays on disk until the hub accepts the new one.
        let (identity, trying_next) = match Identity::load_next(&params.data_dir) {
            Ok(Some(next)) => (next, true),
            Ok(None) => (params.live.get(), false),
            Err(e) => {
                tracing::warn!(error = %e, "Renewed certificate unusable; discarded.");
                Identity::discard_next(&params.data_dir);
                (params.live.get(), false)
            }
        };
        let attempt_params = LinkParams { hub: hub.clone(), identity, trying_next, ..params.clone() };
        let mut session = Session::new(&params.config);
        // Every line of the attempt and its session names the hub (or, over
        // MQTT, the hub the device enrolled with) and the transport.
        let span = tracing::info_span!("session", hub = %hub, transport = session.transport());
        let began = std::time::Instant::now();
        let result = tokio::select! {
            () = cancel.cancelled() => None,
            result = tracing::Instrument::instrument(session.run(&attempt_params), span) => Some(result),
        };
        let Some(result) = result else {
            session.close().await;
            return;
        };
        if matches!(result, Err(LinkError::SwitchIdentity)) {
            tracing::info!("Reconnecting with the renewed certificate.");
            backoff.reset();
            continue;
        }
        let refused = result.as_ref().err().and_then(LinkError::certificate_refused);
        if let Some(alert) = refused
            && trying_next
        {
            tracing::warn!(%alert, "The hub refused the renewed certificate; going on with the current one.");
            Identity::discard_next(&params.data_dir);
            continue;
        }
        let untrusted = result.as_ref().err().is_some_and(LinkError::hub_untrusted);
        let turned = result.as_ref().err().and_then(LinkError::turned_away);
        let kind = result.as_ref().err().map_or("closed_by_hub", LinkError::kind);
        crate::metrics::METRICS.reconnects.get_or_create(&crate::metrics::Reason { reason: kind }).inc();
        let reason = match result {
            Ok(()) => "hub closed the session".to_owned(),
            Err(e) => match e.certificate_refused() {
                Some(alert) => format!("the hub refuses this device's certificate: {alert}"),
                None => e.to_string(),
            },
        };
        if session.was_connected() {
            backoff.connection_ended(began.elapsed());
            attempt = 0;
            // Stay with this hub: try it first next time.
            answered = Some(hub);
            untried.clear();
            tracing::warn!(%reason, "Hub session ended.");
        } else if !untried.is_empty() {
            // Another hub of the fleet may answer: try it now.
            tracing::info!(%reason, %hub, "Hub did not answer; trying the next one.");
            continue;
        } else if let Some(turned) = turned {
            match turned {
                TurnedAway::Busy(after) => {
                    tracing::info!(retry_after = ?after, "The hub is busy admitting other devices; coming back when it said.");
                }
                TurnedAway::AtTheDoor => tracing::info!("The hub refused the connection at its door; backing off."),
            }
        } else if reason != last_error
            && let Some(alert) = refused
        {
            let not_after = params.live.get().validity().map(|(_, end)| Timestamp::from_system(end).rfc3339());
            let not_after = not_after.unwrap_or_default();
            if alert == "certificate revoked" {
                tracing::error!(%alert, "The hub revoked this device: it comes back only by enrolling anew.");
            } else {
                tracing::error!(
                    %alert,
                    %not_after,
                    "The hub refuses this device's certificate: an operator must re-admit the device. It keeps \
                     trying, and keeps every record until then."
                );
            }
        } else if reason != last_error && untrusted {
            tracing::error!(
                %reason,
                "The hub's certificate is from a CA this device does not trust: the fleet's CA was rotated while \
                 the device was away past the overlap (or this is not its fleet's hub). Enroll the device again; \
                 it keeps trying, and keeps every record until then."
            );
        } else if reason != last_error {
            tracing::warn!(%reason, attempt, "Cannot reach the hub.");
        } else {
            tracing::debug!(%reason, attempt, "Cannot reach the hub.");
        }
        last_error = reason.clone();
        let delay = wait_before_retry(turned, &mut backoff, rand::random());
        params.state.send_replace(LinkState::Waiting { reason, retry_in: delay });
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alerts_about_the_client_certificate_are_told_apart() {
        assert_eq!(certificate_alert(0x100 + 45), Some("certificate expired"));
        assert_eq!(certificate_alert(0x100 + 44), Some("certificate revoked"));
        assert_eq!(certificate_alert(0x100 + 48), Some("unknown CA"));
        // Other alerts, application codes and transport errors are not.
        assert_eq!(certificate_alert(0x100 + 40), None);
        assert_eq!(certificate_alert(45), None);
        assert_eq!(certificate_alert(0), None);
    }

    #[test]
    fn a_hub_that_turns_the_device_away_is_obeyed() {
        let busy = |code: u32, reason: &[u8]| {
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: reason.to_vec().into(),
            }))
        };
        let told = busy(4, b"busy; retry-after-ms=2500");
        assert_eq!(told.turned_away(), Some(TurnedAway::Busy(Duration::from_millis(2500))));
        assert_eq!(busy(4, b"busy").turned_away(), Some(TurnedAway::AtTheDoor));
        assert_eq!(busy(2, b"retry-after-ms=5").turned_away(), None, "only the busy code carries a time");
        let refused = LinkError::Connection(quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: Vec::new().into(),
        }));
        assert_eq!(refused.turned_away(), Some(TurnedAway::AtTheDoor));
        assert_eq!(LinkError::Timeout(Duration::from_secs(1)).turned_away(), None);

        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        // The hub's time, and up to a tenth more (at most a second), whatever
        // the backoff has grown to.
        for _ in 0..10 {
            backoff.next_delay();
        }
        let after = Some(TurnedAway::Busy(Duration::from_millis(2500)));
        assert_eq!(wait_before_retry(after, &mut backoff, 0.0), Duration::from_millis(2500));
        assert_eq!(wait_before_retry(after, &mut backoff, 1.0), Duration::from_millis(2750));
        let long = Some(TurnedAway::Busy(Duration::from_secs(120)));
        assert_eq!(wait_before_retry(long, &mut backoff, 1.0), Duration::from_secs(121));
        let zero = Some(TurnedAway::Busy(Duration::ZERO));
        assert_eq!(wait_before_retry(zero, &mut backoff, 0.0), Duration::from_millis(100), "never at once");
        // Otherwise the backoff, which every attempt advances, a refusal at
        // the door too.
        let mut fresh = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert!(wait_before_retry(None, &mut fresh, 0.5) <= Duration::from_millis(500));
        assert!(wait_before_retry(Some(TurnedAway::AtTheDoor), &mut fresh, 0.5) <= Duration::from_secs(1));
        assert!(wait_before_retry(None, &mut fresh, 0.5) <= Duration::from_secs(2));
        assert_eq!(fresh.ceiling(), Duration::from_secs(4));
    }
}
