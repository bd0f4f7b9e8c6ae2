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

use crate::service::ca::{FleetCa, device_id_of, public_key_of};
use crate::service::enroll;
use crate::service::fleet::{Fleet, Link};
use crate::transport::session::{self, DeviceSession, Inbound, SessionEnd, Transport, WhenFenced};
use outpost_shared::DeviceId;
use outpost_shared::identity::{ALPN, ALPN_BULK};
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{Message, Refusal, RefusalReason};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub use crate::service::fleet::{CLOSE_OK, CLOSE_PROTOCOL, CLOSE_REFUSED};

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The hub's TLS identity could not be made.
    #[error(transparent)]
    Ca(#[from] crate::service::ca::CaError),
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
    /// Bulk requests being read or served at once, hub-wide and per
    /// device: each may hold a chunk of up to 8 MiB in memory (see
    /// [`crate::transport::bulk`]).
    pub bulk: Arc<crate::transport::bulk::Limits>,
}

/// The endpoint's server config: the hub's certificate as `identity` has
/// it at each handshake (renewed while the hub runs), client certificates
/// verified against the fleet CA (optional, for enrollment; an expired one
/// of a re-admitted device is let in, see [`crate::service::admission`]).
pub fn server_config(
    ca: &FleetCa,
    identity: Arc<crate::service::ca::HubIdentity>,
    admissions: Arc<crate::service::admission::Admissions>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let tls_err = |e: &dyn std::fmt::Display| QuicSetupError::Tls(e.to_string());
    let verifier_of = |cas: &[CertificateDer<'static>]| {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots.add(ca.clone()).map_err(|e| tls_err(&e))?;
        }
        WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().map_err(|e| tls_err(&e))
    };
    // During a CA rotation both CAs until the overlap ends, then the new one.
    let now = std::time::SystemTime::now();
    let inner = verifier_of(&ca.trusted(now))?;
    let after_overlap = match ca.overlap_until(now) {
        Some(until) => Some((verifier_of(std::slice::from_ref(ca.cert_der()))?, until)),
        None => None,
    };
    let verifier = Arc::new(crate::service::admission::DeviceVerifier { inner, after_overlap, admissions });
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.resolver());
    tls.alpn_protocols = vec![ALPN.to_vec(), ALPN_BULK.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into().map_err(|e| tls_err(&e))?));
    transport.max_concurrent_bidi_streams(8u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Without segmentation offload quinn's send buffer holds one packet per
    // connection instead of up to ten, from its first flight on: 49.4 ->
    // 45.6 KiB per connection with 2,000 devices; restores through the hub
    // measured no slower (docs/BENCHMARKS.md, issue 28).
    transport.enable_segmentation_offload(false);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts connections until `shutdown`, at the rate `door` admits (see
/// [`crate::transport::door`]), then closes the endpoint and waits (at most
/// 5 s) for connection tasks to finish.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<QuicContext>,
    door: crate::transport::door::DoorLimits,
    shutdown: CancellationToken,
) {
    use crate::transport::door::{Door, Entry};
    let mut tasks = JoinSet::new();
    let mut door = Door::new(door, std::time::Instant::now());
    let mut tally = crate::transport::door::Tally::new(crate::transport::door::TALLY_EVERY, std::time::Instant::now());
    let handshaking = Arc::new(AtomicUsize::new(0));
    let metrics = &crate::metrics::METRICS;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let now = std::time::Instant::now();
                let entry = door.arrive(now, handshaking.load(Ordering::Relaxed), rand::random());
                if let Some((busy, refused)) = tally.note(entry, now) {
                    info!(
                        told_to_come_back = busy,
                        refused_before_handshake = refused,
                        "Connections turned away at the door since the last such line (past [quic] accept_rate or max_handshakes)."
                    );
                }
                if entry == Entry::Refuse {
                    metrics.turned_away.get_or_create(&crate::metrics::Reason { reason: "handshakes" }).inc();
                    debug!(%remote, "Too many handshakes in flight: connection refused before its handshake.");
                    incoming.refuse();
                    continue;
                }
                let ctx = ctx.clone();
                let handshake = Handshake::start(&handshaking);
                tasks.spawn(handle(incoming, ctx, entry, handshake).instrument(info_span!("conn", %remote)));
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

/// One handshake in flight, counted until dropped.
struct Handshake(Arc<AtomicUsize>);

impl Handshake {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Handshake(count.clone())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    incoming: quinn::Incoming,
    ctx: Arc<QuicContext>,
    entry: crate::transport::door::Entry,
    handshake: Handshake,
) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            info!(error = %e, "TLS handshake refused.");
            return;
        }
    };
    drop(handshake);
    if let crate::transport::door::Entry::Busy(retry_after) = entry {
        crate::metrics::METRICS.turned_away.get_or_create(&crate::metrics::Reason { reason: "busy" }).inc();
        debug!(?retry_after, "Past the accept rate: told to come back later.");
        let reason = outpost_shared::protocol::busy_reason(retry_after);
        connection.close(outpost_shared::protocol::CLOSE_BUSY.into(), reason.as_bytes());
        return;
    }
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
                let (fleet, limits) = (ctx.fleet.clone(), ctx.bulk.clone());
                let serve = crate::transport::bulk::serve(connection.clone(), id.clone(), fleet, limits);
                until_revoked(serve, &connection, &id, &ctx).instrument(span).await
            }
            (Some(id), Some(key)) => {
                let span = info_span!("session", device = %id);
                let expires = outpost_shared::identity::validity_of(&cert)
                    .map(|(_, not_after)| outpost_shared::time::Timestamp::from_system(not_after));
                let serve = session(connection.clone(), id.clone(), key, expires, &ctx);
                until_revoked(serve, &connection, &id, &ctx).instrument(span).await
            }
            _ => {
                warn!("Client certificate from the fleet CA has no valid device id.");
                connection.close(CLOSE_REFUSED.into(), b"certificate names no device");
            }
        },
    }
}

/// Runs `serve` (a device's session or bulk connection) until it ends or
/// the device is revoked, which closes the connection.
async fn until_revoked(
    serve: impl Future<Output = ()>,
    connection: &quinn::Connection,
    id: &DeviceId,
    ctx: &QuicContext,
) {
    tokio::select! {
        () = serve => {}
        () = ctx.fleet.admissions().revoked_wait(id) => {
            warn!("Device revoked: closing its connection.");
            connection.close(CLOSE_REFUSED.into(), b"certificate revoked");
            ctx.fleet.ended(id, &Link::Quic(connection.clone()), "revoked: the hub closed the connection").await;
        }
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
                            info!(device = %enrolled.device_id, name = ?request.name, "Device enrolled.");
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
async fn session(
    connection: quinn::Connection,
    id: DeviceId,
    key: Vec<u8>,
    expires: Option<outpost_shared::time::Timestamp>,
    ctx: &QuicContext,
) {
    let end = run_session(&connection, &id, &key, expires, ctx).await;
    let reason = end_reason(&end, connection.close_reason().as_ref());
    ctx.fleet.ended(&id, &Link::Quic(connection.clone()), &reason).await;
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

/// Why a device's QUIC session ended, in words for its page: how the
/// session ended and, once the connection is closed, how it closed. Pure.
pub fn end_reason(end: &SessionEnd, closed: Option<&quinn::ConnectionError>) -> String {
    use quinn::ConnectionError as E;
    let words = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(100).collect::<String>();
        if text.is_empty() { String::new() } else { format!(" ({text})") }
    };
    match (end, closed) {
        (SessionEnd::Refused(refusal), _) => format!("refused by the hub: {}", refusal.message),
        (SessionEnd::Protocol(detail), _) => format!("closed by the hub: protocol error: {detail}"),
        (SessionEnd::Closed(_), Some(E::TimedOut)) => "timed out: the device stopped answering".to_owned(),
        (SessionEnd::Closed(_), Some(E::ApplicationClosed(close))) => {
            format!("closed by the device{}", words(&close.reason))
        }
        (SessionEnd::Closed(_), Some(E::ConnectionClosed(close))) => {
            format!("aborted by the device: {}{}", close.error_code, words(&close.reason))
        }
        (SessionEnd::Closed(_), Some(E::Reset)) => "reset by the device (it restarted?)".to_owned(),
        (SessionEnd::Closed(detail), Some(E::LocallyClosed)) => format!("closed by the hub: {detail}"),
        (SessionEnd::Closed(_), Some(other)) => format!("connection lost: {other}"),
        (SessionEnd::Closed(detail), None) => format!("closed by the hub: {detail}"),
    }
}

/// A QUIC session's control stream, as a [`Transport`].
struct QuicTransport {
    send: quinn::SendStream,
    connection: quinn::Connection,
    max_frame: usize,
}

impl Transport for QuicTransport {
    async fn send(&mut self, message: Message) -> Result<(), SessionEnd> {
        write_message(&mut self.send, message, self.max_frame).await.map_err(SessionEnd::from)
    }

    fn link(&self) -> Link {
        Link::Quic(self.connection.clone())
    }

    fn addr(&self) -> String {
        self.connection.remote_address().to_string()
    }
}

async fn run_session(
    connection: &quinn::Connection,
    id: &DeviceId,
    key: &[u8],
    expires: Option<outpost_shared::time::Timestamp>,
    ctx: &QuicContext,
) -> SessionEnd {
    let (send, recv) = match connection.accept_bi().await {
        Ok(streams) => streams,
        Err(e) => return SessionEnd::Closed(e.to_string()),
    };
    let mut reader = FrameReader::new(recv, ctx.max_frame);
    let mut transport = QuicTransport { send, connection: connection.clone(), max_frame: ctx.max_frame };
    let hello = match reader.next().await {
        Ok(Some(env)) => match env.message {
            Message::Hello(hello) => hello,
            other => return SessionEnd::Protocol(format!("expected Hello, got {}", other.kind())),
        },
        Ok(None) => return SessionEnd::Closed("stream finished before hello".into()),
        Err(e) => return e.into(),
    };
    // The certificate of this connection says which key the device signs with.
    let keys = crate::store::DeviceKeys::only(key.to_vec());
    let mut session =
        DeviceSession::new(ctx.fleet.clone(), ctx.ca.clone(), id.clone(), keys, ctx.max_frame, WhenFenced::End);
    match session.handle(Message::Hello(hello), &mut transport).await {
        Ok(_) => {}
        Err(SessionEnd::Refused(_)) => {
            warn!("Certificate is valid but the device is not registered.");
            let _ = transport.send.finish();
            return SessionEnd::Closed("unknown device".into());
        }
        Err(end) => return end,
    }
    if let Err(e) = ctx.fleet.store().put_device_key(id, key).await {
        session::log_store_error(&e, "Device key could not be stored.");
        return SessionEnd::Closed("store error".into());
    }
    // The certificate of this connection: when it stops being valid.
    if let Some(expires) = expires
        && let Err(e) = ctx.fleet.store().set_cert_expires(id, expires).await
    {
        session::log_store_error(&e, "Certificate expiry not stored.");
    }
    // Work waiting for the device goes out at once.
    session.serve(&mut transport, &mut ControlStream(reader), true).await
}

/// The device's side of a QUIC session: the frames of its control stream.
struct ControlStream(FrameReader<quinn::RecvStream>);

impl Inbound<QuicTransport> for ControlStream {
    type Item = Message;

    async fn next(&mut self) -> Result<Message, SessionEnd> {
        match self.0.next().await {
            Ok(Some(envelope)) => Ok(envelope.message),
            Ok(None) => Err(SessionEnd::Closed("agent finished the control stream".into())),
            Err(e) => Err(e.into()),
        }
    }

    async fn handle(
        &mut self,
        message: Message,
        session: &mut DeviceSession,
        transport: &mut QuicTransport,
    ) -> Result<bool, SessionEnd> {
        session.handle(message, transport).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_end_is_told_in_words() {
        let closed = |detail: &str| SessionEnd::Closed(detail.into());
        let by_agent = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: 0u32.into(),
            reason: b"agent stopping\n".to_vec().into(),
        });
        assert_eq!(end_reason(&closed("connection lost"), Some(&by_agent)), "closed by the device (agent stopping)");
        let timed_out = quinn::ConnectionError::TimedOut;
        assert_eq!(end_reason(&closed("x"), Some(&timed_out)), "timed out: the device stopped answering");
        assert_eq!(
            end_reason(&closed("x"), Some(&quinn::ConnectionError::Reset)),
            "reset by the device (it restarted?)"
        );
        let local = quinn::ConnectionError::LocallyClosed;
        assert_eq!(end_reason(&closed("store error"), Some(&local)), "closed by the hub: store error");
        assert_eq!(end_reason(&closed("unknown device"), None), "closed by the hub: unknown device");
        let refusal = Refusal { reason: RefusalReason::NotAuthorised, message: "device revoked".into() };
        assert_eq!(end_reason(&SessionEnd::Refused(refusal), Some(&local)), "refused by the hub: device revoked");
        let protocol = SessionEnd::Protocol("expected Hello, got Batch".into());
        assert_eq!(end_reason(&protocol, Some(&local)), "closed by the hub: protocol error: expected Hello, got Batch");
    }
}
