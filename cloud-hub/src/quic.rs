//! The hub's QUIC endpoint (quinn + rustls, mutual TLS).
//!
//! Clients with a certificate from the fleet CA open a session; the device id
//! is read from that certificate, never from a message. Clients without a
//! certificate may only enroll. A certificate from any other CA fails the
//! TLS handshake. A device connecting with the bulk ALPN opens a bulk
//! connection instead of a session: backup transfers, one request per
//! stream, several streams at once, apart from the session's control stream. Each connection runs as a task owned by the accept loop;
//! bad input (malformed, truncated or oversized frames, unknown versions,
//! unexpected messages) closes that one connection with a logged reason.

use crate::ca::{FleetCa, device_id_of, public_key_of};
use crate::enroll;
use crate::fleet::{Fleet, Link};
use crate::session::{self, MAX_COMMANDS_PER_DELIVERY, Outbound, SessionEnd};
use outpost_shared::DeviceId;
use outpost_shared::identity::{ALPN, ALPN_BULK};
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{Message, Refusal, RefusalReason};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Close code: the session ended normally.
pub const CLOSE_OK: u32 = 0;
/// Close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: u32 = 1;
/// Close code: the request was refused.
pub const CLOSE_REFUSED: u32 = 2;

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The hub's TLS identity could not be made.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Shared context of all connections.
#[derive(Debug)]
pub struct QuicContext {
    /// Fleet state.
    pub fleet: Arc<Fleet>,
    /// The CA, for enrollment.
    pub ca: Arc<FleetCa>,
    /// The enrollment token key.
    pub token_key: Vec<u8>,
    /// Hard maximum frame size.
    pub max_frame: usize,
    /// Bulk requests being read or served at once, hub-wide: each may hold
    /// a chunk of up to 8 MiB in memory (see [`crate::bulk`]).
    pub bulk_requests: Arc<tokio::sync::Semaphore>,
}

/// The endpoint's server config: hub certificate from the fleet CA, client
/// certificates verified against the same CA (optional, for enrollment).
pub fn server_config(ca: &FleetCa, idle_timeout: Duration) -> Result<quinn::ServerConfig, QuicSetupError> {
    let tls_err = |e: &dyn std::fmt::Display| QuicSetupError::Tls(e.to_string());
    let (chain, key) = ca.hub_identity()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).map_err(|e| tls_err(&e))?;
    let verifier =
        WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().map_err(|e| tls_err(&e))?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    tls.alpn_protocols = vec![ALPN.to_vec(), ALPN_BULK.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into().map_err(|e| tls_err(&e))?));
    transport.max_concurrent_bidi_streams(8u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts connections until `shutdown`, then closes the endpoint and waits
/// (at most 5 s) for connection tasks to finish.
pub async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<QuicContext>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ctx = ctx.clone();
                let remote = incoming.remote_address();
                tasks.spawn(handle(incoming, ctx).instrument(info_span!("conn", %remote)));
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "Connection task panicked.");
                }
            }
        }
    }
    endpoint.close(CLOSE_OK.into(), b"hub shutting down");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        tasks.abort_all();
    }
    endpoint.wait_idle().await;
}

async fn handle(incoming: quinn::Incoming, ctx: Arc<QuicContext>) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            info!(error = %e, "TLS handshake refused.");
            return;
        }
    };
    let identity = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let bulk = connection
        .handshake_data()
        .and_then(|any| any.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == ALPN_BULK);
    match identity {
        None => enrollment(connection, &ctx).await,
        Some(cert) => match (device_id_of(&cert), public_key_of(&cert)) {
            (Some(id), Some(_)) if bulk => {
                let span = info_span!("bulk", device = %id);
                crate::bulk::serve(connection, id, ctx).instrument(span).await
            }
            (Some(id), Some(key)) => {
                let span = info_span!("session", device = %id);
                session(connection, id, key, &ctx).instrument(span).await
            }
            _ => {
                warn!("Client certificate from the fleet CA has no valid device id.");
                connection.close(CLOSE_REFUSED.into(), b"certificate names no device");
            }
        },
    }
}

/// A connection without a client certificate: one enrollment request.
async fn enrollment(connection: quinn::Connection, ctx: &QuicContext) {
    let result = async {
        let (mut send, recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new(recv, ctx.max_frame);
        let reply = match reader.next().await.map_err(|e| e.to_string())? {
            Some(envelope) => match envelope.message {
                Message::Enroll(request) => {
                    match enroll::redeem(&ctx.ca, &ctx.token_key, ctx.fleet.store(), &request).await {
                        Ok(enrolled) => {
                            info!(device = %enrolled.device_id, name = %request.name, "Device enrolled.");
                            Message::Enrolled(enrolled)
                        }
                        Err(refused) => {
                            info!(reason = ?refused.reason, message = %refused.message, "Enrollment refused.");
                            Message::Refused(Refusal { reason: refused.reason, message: refused.message })
                        }
                    }
                }
                _ => Message::Refused(Refusal {
                    reason: RefusalReason::UnexpectedMessage,
                    message: "a connection without a certificate may only enroll".into(),
                }),
            },
            None => return Ok(()),
        };
        write_message(&mut send, reply, ctx.max_frame).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        // Let the peer read the reply before the connection goes away.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        Ok::<(), String>(())
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "Enrollment connection ended with an error.");
    }
    connection.close(CLOSE_OK.into(), b"");
}

/// An authenticated session: hello, then batches, heartbeats and
/// deliveries until the connection ends.
async fn session(connection: quinn::Connection, id: DeviceId, key: Vec<u8>, ctx: &QuicContext) {
    let end = run_session(&connection, &id, &key, ctx).await;
    ctx.fleet.disconnected(&id, &Link::Quic(connection.clone()));
    match end {
        SessionEnd::Closed(reason) => info!(%reason, "Session ended."),
        SessionEnd::Refused(refusal) => {
            warn!(message = %refusal.message, "Session refused.");
            connection.close(CLOSE_REFUSED.into(), refusal.message.as_bytes());
        }
        SessionEnd::Protocol(reason) => {
            warn!(%reason, "Closing session: protocol violation.");
            let mut bytes = reason.into_bytes();
            bytes.truncate(200);
            connection.close(CLOSE_PROTOCOL.into(), &bytes);
        }
    }
}

async fn run_session(connection: &quinn::Connection, id: &DeviceId, key: &[u8], ctx: &QuicContext) -> SessionEnd {
    let (mut send, recv) = match connection.accept_bi().await {
        Ok(streams) => streams,
        Err(e) => return SessionEnd::Closed(e.to_string()),
    };
    let mut reader = FrameReader::new(recv, ctx.max_frame);
    let hello = match reader.next().await {
        Ok(Some(env)) => match env.message {
            Message::Hello(hello) => hello,
            other => return SessionEnd::Protocol(format!("expected Hello, got {}", other.kind())),
        },
        Ok(None) => return SessionEnd::Closed("stream finished before hello".into()),
        Err(e) => return e.into(),
    };
    let addr = connection.remote_address().to_string();
    let store = ctx.fleet.store();
    let welcome = match session::hello(store, id, &hello, &addr).await {
        Ok(welcome) => welcome,
        Err(SessionEnd::Refused(refusal)) => {
            warn!("Certificate is valid but the device is not registered.");
            let _ = write_message(&mut send, Message::Refused(refusal), ctx.max_frame).await;
            let _ = send.finish();
            return SessionEnd::Closed("unknown device".into());
        }
        Err(end) => return end,
    };
    if let Err(e) = store.put_device_key(id, key).await {
        session::log_store_error(&e, "Device key could not be stored.");
        return SessionEnd::Closed("store error".into());
    }
    // A QUIC session is never refused by the fleet (only MQTT ones wait).
    let link = Link::Quic(connection.clone());
    let Some(downlink) = ctx.fleet.connected(id, link.clone()) else {
        return SessionEnd::Closed("session not registered".into());
    };
    let epoch = match ctx.fleet.claim(id, &link).await {
        Ok(epoch) => epoch,
        Err(e) => {
            session::log_store_error(&e, "Session could not be recorded.");
            return SessionEnd::Closed("store error".into());
        }
    };
    let resume_after = welcome.acked_seq;
    if let Err(e) = write_message(&mut send, Message::Welcome(welcome), ctx.max_frame).await {
        return e.into();
    }
    info!(name = %hello.name, version = %hello.agent_version, %addr, resume_after, "Session opened.");
    let mut outbound = Outbound::new(ctx.fleet.hub_id(), epoch);
    // Look for work to deliver at session start and when the API pokes the
    // session, not on every incoming message.
    let mut check_downlink = true;
    loop {
        if check_downlink {
            check_downlink = false;
            let pending = match outbound.pending(store, id, ctx.max_frame / 2).await {
                Ok(pending) => pending,
                Err(end) => return end,
            };
            if let Some(deliver) = pending {
                // A full delivery may have left more behind: look again.
                check_downlink = deliver.commands.len() >= MAX_COMMANDS_PER_DELIVERY;
                if let Err(e) = write_message(&mut send, Message::Deliver(deliver), ctx.max_frame).await {
                    return e.into();
                }
                continue;
            }
        }
        let envelope = tokio::select! {
            () = downlink.notified() => {
                check_downlink = true;
                continue;
            }
            next = reader.next() => match next {
                Ok(Some(env)) => env,
                Ok(None) => return SessionEnd::Closed("agent finished the control stream".into()),
                Err(e) => return e.into(),
            },
        };
        ctx.fleet.seen(id);
        match envelope.message {
            Message::Heartbeat(_) => {}
            Message::Batch(batch) => {
                let ack = match session::ingest(store, id, key, batch).await {
                    Ok(ack) => ack,
                    Err(end) => return end,
                };
                if let Err(e) = write_message(&mut send, Message::Ack(ack), ctx.max_frame).await {
                    return e.into();
                }
            }
            Message::Received(received) => session::received(store, id, received.commands).await,
            Message::Relay(batch) => {
                let ack = match session::relay(store, id, batch).await {
                    Ok(ack) => ack,
                    Err(end) => return end,
                };
                if let Err(e) = write_message(&mut send, Message::RelayAck(ack), ctx.max_frame).await {
                    return e.into();
                }
            }
            other => {
                return SessionEnd::Protocol(format!("unexpected {} in a session", other.kind()));
            }
        }
    }
}
