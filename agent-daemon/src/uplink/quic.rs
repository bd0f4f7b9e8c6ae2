//! One QUIC session with the hub: connect with mutual TLS, hello/welcome on
//! the control stream, then heartbeats and telemetry until something fails.

use super::{LinkParams, LinkState};
use crate::tls::{self, Timings};
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::{Heartbeat, Hello, Message, Refusal};
use outpost_shared::time::Timestamp;
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
}

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
            .map_err(|e| LinkError::Resolve {
                addr: p.hub.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| LinkError::Resolve {
                addr: p.hub.clone(),
                reason: "no addresses".into(),
            })?;
        let timings = Timings {
            keepalive: cfg.keepalive,
            idle_timeout: cfg.idle_timeout,
        };
        let mut endpoint =
            tls::client_endpoint(remote).map_err(|e| LinkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(tls::session_config(&p.identity, timings)?);
        let endpoint = self.endpoint.insert(endpoint);
        let connecting = endpoint
            .connect(remote, HUB_SERVER_NAME)
            .map_err(|e| LinkError::Connect(e.to_string()))?;
        let connection = tokio::time::timeout(cfg.connect_timeout, connecting)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        self.connection = Some(connection.clone());

        // With TLS 1.3 the client finishes first: a hub that rejects our
        // certificate shows it here, on the first exchange.
        let (mut send, recv) = connection.open_bi().await?;
        let mut reader = FrameReader::new(recv, cfg.max_frame);
        let hello = Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            name: p.name.clone(),
            started_at: started_at(),
        };
        write_message(&mut send, Message::Hello(hello), cfg.max_frame).await?;
        let reply = tokio::time::timeout(cfg.connect_timeout, reader.next())
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        match reply {
            Some(env) => match env.message {
                Message::Welcome(welcome) if welcome.device_id == p.identity.device_id => {}
                Message::Welcome(welcome) => {
                    return Err(LinkError::Protocol(format!(
                        "hub welcomed {} instead of us",
                        welcome.device_id
                    )));
                }
                Message::Refused(Refusal { reason, message }) => {
                    return Err(LinkError::Refused(reason, message));
                }
                other => {
                    return Err(LinkError::Protocol(format!(
                        "expected Welcome, got {}",
                        other.kind()
                    )));
                }
            },
            None => {
                return Err(LinkError::Protocol(
                    "hub closed the stream before welcoming".into(),
                ));
            }
        }
        self.connected = true;
        p.state.send_replace(LinkState::Connected);
        tracing::info!(hub = %p.hub, device = %p.identity.device_id, "Connected to the hub.");

        let mut heartbeat = tokio::time::interval(cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some(sample) = p.queue.front() {
                write_message(&mut send, Message::Telemetry(sample), cfg.max_frame).await?;
                p.queue.pop_front();
            }
            tokio::select! {
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { at: Timestamp::now() };
                    write_message(&mut send, Message::Heartbeat(beat), cfg.max_frame).await?;
                }
                () = p.queue.wait() => {}
                incoming = reader.next() => match incoming? {
                    None => return Ok(()),
                    Some(env) => match env.message {
                        Message::Refused(Refusal { reason, message }) => return Err(LinkError::Refused(reason, message)),
                        other => return Err(LinkError::Protocol(format!("unexpected {} from the hub", other.kind()))),
                    },
                },
                reason = connection.closed() => return Err(reason.into()),
            }
        }
    }
}
