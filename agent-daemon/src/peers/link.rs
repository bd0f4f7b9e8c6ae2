//! Peer links: one QUIC endpoint that both serves and dials peers, with
//! mutual TLS against the fleet's trust bundle (configured in
//! [`crate::tls::peer_configs`]), and the dial that proves a peer: the
//! handshake, then one probe round trip.

use super::{PeerError, PeerParams};
use crate::store::StoreError;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::Message;
use outpost_shared::time::Timestamp;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::tls::PEER_ALPN;

/// Why a dial, a probe or a relay over a peer link failed; shown as the
/// reason a peer is not trusted, or logged when a relay stops.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer has no address to dial.
    #[error("no address")]
    NoAddress,
    /// quinn refused to start the connection.
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed or the link closed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// A stream broke: I/O, framing or a malformed message.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// No answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The peer said or did something out of place.
    #[error("{0}")]
    Peer(String),
    /// The outbox could not be read or acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The device's key could not sign.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

pub(super) struct Dialled {
    pub(super) id: String,
    pub(super) result: Result<quinn::Connection, LinkError>,
}

/// Connects to a peer; the handshake proves the fleet and the device id.
pub(super) async fn dial(
    endpoint: &quinn::Endpoint,
    id: &str,
    targets: &[SocketAddr],
    limit: Duration,
) -> Result<quinn::Connection, LinkError> {
    let server_name = outpost_shared::identity::device_server_name(id);
    let mut last = LinkError::NoAddress;
    for target in targets {
        let connecting = match endpoint.connect(*target, &server_name) {
            Ok(c) => c,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(connection)) => {
                // TLS 1.3: the server's verdict on our certificate shows on
                // the first exchange, so make one.
                match tokio::time::timeout(limit, probe(&connection)).await {
                    Ok(Ok(())) => return Ok(connection),
                    Ok(Err(e)) => last = e,
                    Err(_) => last = LinkError::Timeout("no answer to the probe".into()),
                }
            }
            Ok(Err(e)) => last = e.into(),
            Err(_) => last = LinkError::Timeout(format!("no handshake within {limit:?}")),
        }
    }
    Err(last)
}

/// One round trip on a fresh stream: a heartbeat, answered by a heartbeat.
async fn probe(connection: &quinn::Connection) -> Result<(), LinkError> {
    let (mut send, recv) = connection.open_bi().await?;
    let beat = Message::Heartbeat(outpost_shared::protocol::Heartbeat { at: Timestamp::now() });
    write_message(&mut send, beat, 1024).await?;
    let mut reader = FrameReader::new(recv, 1024);
    match reader.next().await? {
        Some(env) if matches!(env.message, Message::Heartbeat(_)) => Ok(()),
        Some(env) => Err(LinkError::Peer(format!("unexpected {} from the peer", env.message.kind()))),
        None => Err(LinkError::Peer("the peer closed the probe".into())),
    }
}

/// One QUIC endpoint for both roles: it serves peers (device certificate,
/// client certificates from the fleet CA required) and dials them
/// (verifying the fleet CA and the advertised device id).
pub(super) fn endpoint(p: &PeerParams) -> Result<quinn::Endpoint, PeerError> {
    let timings = crate::tls::Timings { keepalive: p.config.probe_interval, idle_timeout: p.config.gone_after };
    let (server, client) = crate::tls::peer_configs(&p.identity, timings)?;
    let bind = super::endpoint_bind(&p.config);
    let mut endpoint = quinn::Endpoint::server(server, bind).map_err(|source| PeerError::Bind { bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
