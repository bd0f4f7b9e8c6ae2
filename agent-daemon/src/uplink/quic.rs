//! One QUIC session with the hub: connect with mutual TLS, hello/welcome on
//! the control stream, then until something fails: outbox batches out (up
//! to [`WINDOW`] unacknowledged), trimmed as the hub acknowledges them;
//! deliveries in, persisted before `Received` goes back; heartbeats.

use super::{LinkParams, LinkState};
use crate::tls::{self, Timings};
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::{Batch, Heartbeat, Hello, Message, Received, Refusal};
use outpost_shared::time::Timestamp;
use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Duration;

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
}

/// Batches sent but not yet acknowledged.
pub const WINDOW: usize = 4;
/// Records per batch.
pub const BATCH_RECORDS: usize = 2000;

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        LinkError::Stream(StreamError::Io(e.into()))
    }
}

fn started_at() -> Timestamp {
    static STARTED: OnceLock<Timestamp> = OnceLock::new();
    *STARTED.get_or_init(Timestamp::now)
}

/// A session; remembers whether it got as far as the hub's welcome.
#[derive(Debug, Default)]
pub struct Session {
    connected: bool,
    endpoint: Option<quinn::Endpoint>,
    connection: Option<quinn::Connection>,
}

impl Session {
    /// True if the hub welcomed this session.
    pub fn was_connected(&self) -> bool {
        self.connected
    }

    /// Closes the connection politely, waiting at most one second.
    pub async fn close(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.close(0u32.into(), b"agent stopping");
        }
        if let Some(endpoint) = self.endpoint.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// Connects and serves the session until it fails.
    pub async fn run(&mut self, p: &LinkParams) -> Result<(), LinkError> {
        let cfg = &p.config;
        let remote = tokio::net::lookup_host(&p.hub)
            .await
            .map_err(|e| LinkError::Resolve { addr: p.hub.clone(), reason: e.to_string() })?
            .next()
            .ok_or_else(|| LinkError::Resolve { addr: p.hub.clone(), reason: "no addresses".into() })?;
        let timings = Timings { keepalive: cfg.keepalive, idle_timeout: cfg.idle_timeout };
        let mut endpoint = tls::client_endpoint(remote).map_err(|e| LinkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(tls::session_config(&p.identity, timings)?);
        let endpoint = self.endpoint.insert(endpoint);
        let connecting = endpoint.connect(remote, HUB_SERVER_NAME).map_err(|e| LinkError::Connect(e.to_string()))?;
        let connection = tokio::time::timeout(cfg.connect_timeout, connecting)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        self.connection = Some(connection.clone());

        // With TLS 1.3 the client finishes first: a hub that rejects our
        // certificate shows it here, on the first exchange.
        let (mut send, recv) = connection.open_bi().await?;
        let mut reader = FrameReader::new(recv, cfg.max_frame);
        let hello =
            Hello { agent_version: env!("CARGO_PKG_VERSION").into(), name: p.name.clone(), started_at: started_at() };
        write_message(&mut send, Message::Hello(hello), cfg.max_frame).await?;
        let reply = tokio::time::timeout(cfg.connect_timeout, reader.next())
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        let acked = match reply {
            Some(env) => match env.message {
                Message::Welcome(welcome) if welcome.device_id == p.identity.device_id => welcome.acked_seq,
                Message::Welcome(welcome) => {
                    return Err(LinkError::Protocol(format!("hub welcomed {} instead of us", welcome.device_id)));
                }
                Message::Refused(Refusal { reason, message }) => {
                    return Err(LinkError::Refused(reason, message));
                }
                other => {
                    return Err(LinkError::Protocol(format!("expected Welcome, got {}", other.kind())));
                }
            },
            None => {
                return Err(LinkError::Protocol("hub closed the stream before welcoming".into()));
            }
        };
        self.connected = true;
        p.state.send_replace(LinkState::Connected);
        let store = &p.store;
        store.ack(acked).await?;
        let mut next_seq = acked.max(store.stats().acked_seq) + 1;
        tracing::info!(hub = %p.hub, device = %p.identity.device_id, resume_after = acked, "Connected to the hub.");

        let signer = p.identity.signer().map_err(|e| LinkError::Protocol(format!("cannot sign batches: {e}")))?;
        let max_bytes = cfg.max_frame.saturating_sub(4096).max(1024);
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut heartbeat = tokio::time::interval(cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while in_flight.len() < WINDOW {
                let s = store.clone();
                let records = tokio::task::spawn_blocking(move || s.peek(next_seq, BATCH_RECORDS, max_bytes))
                    .await
                    .map_err(|e| LinkError::Protocol(format!("outbox read task failed: {e}")))??;
                let Some(last) = records.last().map(|r| r.seq) else {
                    break;
                };
                let batch = Batch::new(p.identity.device_id.clone(), &records, |input| signer.sign(input));
                write_message(&mut send, Message::Batch(batch), cfg.max_frame).await?;
                in_flight.push_back(last);
                next_seq = last + 1;
            }
            tokio::select! {
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { at: Timestamp::now() };
                    write_message(&mut send, Message::Heartbeat(beat), cfg.max_frame).await?;
                }
                () = store.appended(), if in_flight.len() < WINDOW => {}
                incoming = reader.next() => match incoming? {
                    None => return Ok(()),
                    Some(env) => match env.message {
                        Message::Ack(ack) => {
                            if ack.upto >= next_seq {
                                return Err(LinkError::Protocol(format!("hub acknowledged {} before it was sent", ack.upto)));
                            }
                            store.ack(ack.upto).await?;
                            while in_flight.front().is_some_and(|&last| last <= ack.upto) {
                                in_flight.pop_front();
                            }
                        }
                        Message::Deliver(deliver) => {
                            let commands = crate::inbox::accept(store, deliver).await?;
                            if !commands.is_empty() {
                                write_message(&mut send, Message::Received(Received { commands }), cfg.max_frame).await?;
                            }
                        }
                        Message::Refused(Refusal { reason, message }) => return Err(LinkError::Refused(reason, message)),
                        other => return Err(LinkError::Protocol(format!("unexpected {} from the hub", other.kind()))),
                    },
                },
                reason = connection.closed() => return Err(reason.into()),
            }
        }
    }
}
