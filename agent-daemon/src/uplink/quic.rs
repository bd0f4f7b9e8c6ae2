//! The QUIC transport: one connection to the hub with mutual TLS, one
//! bidirectional control stream carrying length-prefixed envelopes.

use super::session::{self, Channel};
use super::{LinkError, LinkParams};
use crate::identity::Identity;
use crate::tls::{self, Timings};
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{ChunkIds, MAX_BULK_FRAME, Message};
use std::time::Duration;

/// Batches sent but not yet acknowledged. One stream keeps them in order.
pub const WINDOW: usize = 4;

/// A session; remembers whether it got as far as the hub's welcome.
#[derive(Debug, Default)]
pub struct Session {
    connected: bool,
    endpoint: Option<quinn::Endpoint>,
    connection: Option<quinn::Connection>,
}

struct QuicChannel {
    send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    connection: quinn::Connection,
    max_frame: usize,
}

impl Channel for QuicChannel {
    async fn send(&mut self, message: Message) -> Result<(), LinkError> {
        Ok(write_message(&mut self.send, message, self.max_frame).await?)
    }

    async fn recv(&mut self) -> Result<Option<Message>, LinkError> {
        tokio::select! {
            next = self.reader.next() => Ok(next?.map(|envelope| envelope.message)),
            reason = self.connection.closed() => Err(reason.into()),
        }
    }

    /// A bulk connection with `next` and one cheap request: the hub
    /// answers only on a connection whose certificate it accepted.
    async fn prove(&mut self, p: &LinkParams, next: &Identity) -> Result<bool, LinkError> {
        let cfg = &p.config;
        let remote = self.connection.remote_address();
        let timings = Timings { keepalive: cfg.keepalive, idle_timeout: cfg.idle_timeout };
        let mut endpoint = tls::client_endpoint(remote).map_err(|e| LinkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(tls::bulk_config(next, timings)?);
        let exchange = async {
            let connecting =
                endpoint.connect(remote, HUB_SERVER_NAME).map_err(|e| LinkError::Connect(e.to_string()))?;
            let connection = connecting.await?;
            let (mut send, recv) = connection.open_bi().await?;
            write_message(&mut send, Message::HaveChunks(ChunkIds { ids: Vec::new() }), MAX_BULK_FRAME).await?;
            let _ = send.finish();
            let answer = FrameReader::new(recv, MAX_BULK_FRAME).next().await;
            connection.close(0u32.into(), b"renewed certificate tried");
            match answer {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(LinkError::Protocol("the hub closed the stream without answering".into())),
                // A refusal of the certificate shows as the connection's close.
                Err(e) => Err(connection.close_reason().map_or(LinkError::Stream(e), LinkError::Connection)),
            }
        };
        let result = tokio::time::timeout(cfg.connect_timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))
            .and_then(|r| r);
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        result.map(|()| true)
    }
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
        let (send, recv) = connection.open_bi().await?;
        let reader = FrameReader::new(recv, cfg.max_frame);
        let mut channel = QuicChannel { send, reader, connection: connection.clone(), max_frame: cfg.max_frame };
        tracing::debug!(hub = %p.hub, "QUIC connection open.");
        match session::serve(p, &mut channel, WINDOW, &mut self.connected).await {
            // A stream broken by the connection's end: the close says why
            // (with TLS 1.3 the hub's refusal of our certificate arrives
            // after our first write).
            Err(LinkError::Stream(e)) => {
                Err(connection.close_reason().map_or(LinkError::Stream(e), LinkError::Connection))
            }
            other => other,
        }
    }
}
