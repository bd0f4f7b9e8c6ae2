//! TLS settings of the agent's QUIC client.
//!
//! - Session: the hub must present a certificate from the fleet CA for
//!   [`HUB_SERVER_NAME`]; the agent presents its device certificate.
//! - Enrollment: the agent has no CA yet, only the fingerprint the token
//!   pins. The hub's chain must contain a CA certificate with exactly that
//!   fingerprint, and the hub certificate must verify against it.

use crate::identity::Identity;
use outpost_shared::Fingerprint;
use outpost_shared::identity::{ALPN, ALPN_BULK};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsError(String);

fn tls_err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport timings of a client.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Keep-alive interval.
    pub keepalive: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
}

fn quic_client(mut tls: rustls::ClientConfig, timings: Timings, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(timings.keepalive));
    transport.max_idle_timeout(Some(timings.idle_timeout.try_into().map_err(tls_err)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Client config for an authenticated session.
pub fn session_config(identity: &Identity, timings: Timings) -> Result<quinn::ClientConfig, TlsError> {
    device_config(identity, timings, ALPN)
}

/// Client config for a bulk connection (backup transfers).
pub fn bulk_config(identity: &Identity, timings: Timings) -> Result<quinn::ClientConfig, TlsError> {
    device_config(identity, timings, ALPN_BULK)
}

fn device_config(identity: &Identity, timings: Timings, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone()).map_err(tls_err)?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())
        .map_err(tls_err)?;
    quic_client(tls, timings, alpn)
}

/// Set when the hub presented a chain without the pinned CA, so the caller
/// can say so plainly instead of quoting a TLS alert.
#[derive(Debug, Clone, Default)]
pub struct PinOutcome(Arc<AtomicBool>);

impl PinOutcome {
    /// True if the hub's chain did not hold the pinned CA.
    pub fn mismatched(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Client config for enrollment: no client certificate, hub pinned by the
/// CA fingerprint from the token.
pub fn enrollment_config(pin: Fingerprint, timings: Timings) -> Result<(quinn::ClientConfig, PinOutcome), TlsError> {
    let outcome = PinOutcome::default();
    let verifier = Arc::new(PinnedCa { pin, provider: provider(), outcome: outcome.clone() });
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((quic_client(tls, timings, ALPN)?, outcome))
}

/// Accepts a server whose chain holds the pinned CA and verifies against it.
#[derive(Debug)]
struct PinnedCa {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    outcome: PinOutcome,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| Fingerprint::of_der(c) == self.pin) else {
            self.outcome.0.store(true, Ordering::SeqCst);
            return Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(remote: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}
