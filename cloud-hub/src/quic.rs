//! The hub's QUIC endpoint (quinn + rustls, mutual TLS).
//!
//! Clients with a certificate from the fleet CA open a session; the device id
//! is read from that certificate, never from a message. Clients without a
//! certificate may only enroll. A certificate from any other CA fails the
//! TLS handshake. Each connection runs as a task owned by the accept loop;
//! bad input (malformed, truncated or oversized frames, unknown versions,
//! unexpected messages) closes that one connection with a logged reason.

use crate::ca::{FleetCa, device_id_of, public_key_of};
use crate::enroll;
use crate::fleet::Fleet;
use crate::store::CommandState;
use outpost_shared::DeviceId;
use outpost_shared::identity::ALPN;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::{Ack, Command, Deliver, Desired, Message, Refusal, RefusalReason, Welcome};
use outpost_shared::time::Timestamp;
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
    pub ca: FleetCa,
    /// The enrollment token key.
    pub token_key: Vec<u8>,
    /// Hard maximum frame size.
    pub max_frame: usize,
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
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
    match identity {
        None => enrollment(connection, &ctx).await,
        Some(cert) => match (device_id_of(&cert), public_key_of(&cert)) {
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
                    match enroll::redeem(&ctx.ca, &ctx.token_key, ctx.fleet.store(), &request) {
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

/// Why a session ended.
enum SessionEnd {
    /// The peer closed or the connection dropped.
    Closed(String),
    /// The peer broke the protocol; close with a reason.
    Protocol(String),
}

impl From<StreamError> for SessionEnd {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Io(io) => SessionEnd::Closed(io.to_string()),
            other => SessionEnd::Protocol(other.to_string()),
        }
    }
}

/// An authenticated session: hello, then heartbeats and telemetry.
async fn session(connection: quinn::Connection, id: DeviceId, key: Vec<u8>, ctx: &QuicContext) {
    let end = run_session(&connection, &id, &key, ctx).await;
    ctx.fleet.disconnected(&id, &connection);
    match end {
        SessionEnd::Closed(reason) => info!(%reason, "Session ended."),
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
    let known = store.update_device(id, |r| {
        r.name.clone_from(&hello.name);
        r.agent_version = Some(hello.agent_version.clone());
        r.last_seen = Some(Timestamp::now());
        r.last_addr = Some(addr.clone());
    });
    match known {
        Ok(Some(_)) => {}
        Ok(None) => {
            let refusal = Refusal { reason: RefusalReason::UnknownDevice, message: "device is not registered".into() };
            let _ = write_message(&mut send, Message::Refused(refusal), ctx.max_frame).await;
            let _ = send.finish();
            warn!("Certificate is valid but the device is not registered.");
            return SessionEnd::Closed("unknown device".into());
        }
        Err(e) => {
            tracing::error!(error = %e, "Device record could not be updated.");
            return SessionEnd::Closed("store error".into());
        }
    }
    if let Err(e) = store.put_device_key(id, key) {
        tracing::error!(error = %e, "Device key could not be stored.");
        return SessionEnd::Closed("store error".into());
    }
    let downlink = ctx.fleet.connected(id, connection.clone());
    let acked_seq = match store.high_water(id) {
        Ok(seq) => seq,
        Err(e) => {
            tracing::error!(error = %e, "High-water mark could not be read.");
            return SessionEnd::Closed("store error".into());
        }
    };
    let welcome = Welcome {
        device_id: id.clone(),
        hub_version: env!("CARGO_PKG_VERSION").into(),
        server_time: Timestamp::now(),
        acked_seq,
    };
    if let Err(e) = write_message(&mut send, Message::Welcome(welcome), ctx.max_frame).await {
        return e.into();
    }
    info!(name = %hello.name, version = %hello.agent_version, %addr, resume_after = acked_seq, "Session opened.");
    let mut outbound = Outbound::default();
    // Look for work to deliver at session start and when the API pokes the
    // session, not on every incoming message.
    let mut check_downlink = true;
    loop {
        if check_downlink {
            check_downlink = false;
            if let Some(deliver) = outbound.pending(store, id, ctx.max_frame / 2) {
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
                if batch.origin != *id {
                    return SessionEnd::Protocol(format!("batch of device {} on {id}'s session", batch.origin));
                }
                if !batch.verify(key) {
                    return SessionEnd::Protocol(
                        "batch signature does not verify with the device's certificate".into(),
                    );
                }
                let records = match batch.records() {
                    Ok(records) => records,
                    Err(e) => return SessionEnd::Protocol(format!("signed batch does not decode: {e}")),
                };
                if !records.windows(2).all(|w| w[0].seq < w[1].seq) || records.first().is_some_and(|r| r.seq == 0) {
                    return SessionEnd::Protocol("batch sequence numbers are not increasing from 1".into());
                }
                let device = id.clone();
                let ingested = match store.writer().run(move |s| s.ingest(&device, &records)).await {
                    Ok(Ok(ingested)) => ingested,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "Ingest failed; the agent will resend.");
                        return SessionEnd::Closed("store error".into());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Ingest could not be made durable; the agent will resend.");
                        return SessionEnd::Closed("store error".into());
                    }
                };
                for (from, to) in &ingested.gaps {
                    info!(from, to, "Sequence gap (records the device thinned).");
                }
                if ingested.duplicates > 0 {
                    debug!(duplicates = ingested.duplicates, "Duplicate records acknowledged again.");
                }
                let ack = Ack { upto: ingested.upto };
                if let Err(e) = write_message(&mut send, Message::Ack(ack), ctx.max_frame).await {
                    return e.into();
                }
            }
            Message::Received(received) => {
                let (device, ids) = (id.clone(), received.commands);
                let marked = store
                    .writer()
                    .run(move |s| {
                        s.transition_commands(
                            &device,
                            &ids,
                            |st| *st == CommandState::Queued,
                            CommandState::Delivered { at: Timestamp::now() },
                        )
                    })
                    .await;
                match marked {
                    Ok(Ok(ids)) if !ids.is_empty() => info!(commands = ?ids, "Commands delivered."),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "Delivery could not be recorded."),
                    Err(e) => tracing::error!(error = %e, "Delivery could not be recorded."),
                }
            }
            other => {
                return SessionEnd::Protocol(format!("unexpected {} in a session", other.kind()));
            }
        }
    }
}

/// Most commands per `Deliver`. A delivery also stops at half the frame
/// limit; the API caps one command at [`crate::http::MAX_COMMAND_BYTES`] and
/// frames are at least 256 KiB, so one command always fits.
const MAX_COMMANDS_PER_DELIVERY: usize = 100;

/// What this session has already sent the device, so a wake-up sends only
/// what is new.
#[derive(Debug, Default)]
struct Outbound {
    sent_commands: std::collections::HashSet<u64>,
    sent_desired: u64,
}

impl Outbound {
    /// Commands queued and unexpired, and a desired state newer than the
    /// device reported, that this session has not sent yet.
    fn pending(&mut self, store: &crate::store::Store, id: &DeviceId, max_bytes: usize) -> Option<Deliver> {
        let now = Timestamp::now();
        let mut bytes = 0;
        let commands: Vec<Command> = match store.device_commands(id) {
            Ok(all) => all
                .into_iter()
                .filter(|c| {
                    c.state == CommandState::Queued && c.expires_at > now && !self.sent_commands.contains(&c.id)
                })
                .take(MAX_COMMANDS_PER_DELIVERY)
                .map(|c| Command { id: c.id, kind: c.kind, args: c.args, expires_at: c.expires_at })
                .take_while(|c| {
                    bytes += c.kind.len() + c.args.iter().map(|a| a.len() + 5).sum::<usize>() + 32;
                    bytes <= max_bytes
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "Pending commands could not be read.");
                Vec::new()
            }
        };
        let reported = store.reported(id).ok().flatten().map_or(0, |r| r.applied_version);
        let desired = store
            .desired(id)
            .ok()
            .flatten()
            .filter(|d| d.version > reported.max(self.sent_desired))
            .map(|d| Desired { version: d.version, doc: d.doc });
        if commands.is_empty() && desired.is_none() {
            return None;
        }
        self.sent_commands.extend(commands.iter().map(|c| c.id));
        if let Some(d) = &desired {
            self.sent_desired = d.version;
        }
        Some(Deliver { commands, desired })
    }
}
