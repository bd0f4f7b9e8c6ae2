//! TLS settings of the agent's QUIC client.
//!
//! - Session: the hub must present a certificate from the fleet CA for
//!   [`HUB_SERVER_NAME`]; the agent presents its device certificate.
//! - Enrollment: the agent has no CA yet, only the fingerprint the token
//!   pins. The hub's chain must contain a CA certificate with exactly that
//!   fingerprint, and the hub certificate must verify against it.
//!
//! One verifier ([`HubVerifier`]) does both, with the clock rules below.
//!
//! Clocks: a device's clock may have restarted at 1970 (no RTC battery).
//! The hub's certificate is checked against the device's clock, but never
//! earlier than the agent's build time ([`BUILD_TIME`], as systemd floors
//! its clock), and a certificate that is only not valid *yet* by that time
//! is checked as at its own start: a clock behind cannot make a device
//! refuse its hub. A clock ahead of the hub certificate's end is refused
//! (it cannot be told from an expired certificate replayed).

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

fn transport(timings: Timings) -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(timings.keepalive));
    transport.max_idle_timeout(Some(timings.idle_timeout.try_into().map_err(tls_err)?));
    Ok(Arc::new(transport))
}

fn quic_client(mut tls: rustls::ClientConfig, timings: Timings, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(timings)?);
    Ok(config)
}

/// ALPN of LAN peer links.
pub const PEER_ALPN: &[u8] = b"outpost-peer/1";

/// Both sides of LAN peer links: the server and client configs of one
/// endpoint. Each side presents the certificate in use at each handshake
/// and checks the other's against the trust bundle in use (CAs, revoked
/// devices), so a renewal or a new bundle applies to the next handshake.
/// `timings`: the links' keep-alive (`probe_interval`) and idle timeout
/// (`gone_after`).
pub fn peer_configs(
    live: &crate::identity::Live,
    timings: Timings,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let resolver = live.resolver();
    let verifier = PeerVerifier::new(live.clone())?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let transport = transport(timings)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?,
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).map_err(tls_err)?));
    client.transport_config(transport);
    Ok((server, client))
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
    for ca in &identity.cas {
        roots.add(ca.clone()).map_err(tls_err)?;
    }
    let ca = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(tls_err)?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HubVerifier { trust: Trust::Ca(ca), provider: provider() }))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())
        .map_err(tls_err)?;
    quic_client(tls, timings, alpn)
}

/// When this agent was built (seconds since the epoch): the earliest time
/// its clock is taken to show.
pub const BUILD_TIME: u64 = match u64::from_str_radix(env!("OUTPOST_BUILD_TIME"), 10) {
    Ok(secs) => secs,
    Err(_) => 0,
};

/// The time a certificate check uses: the device's clock, floored at
/// `floor`, and for a certificate not valid yet by it, the certificate's
/// own start (`not_before`), when known.
pub fn check_time(now: u64, floor: u64, not_before: Option<u64>, not_yet_valid: bool) -> u64 {
    let now = now.max(floor);
    match not_before {
        Some(start) if not_yet_valid && start > now => start,
        _ => now,
    }
}

/// What the hub's certificate must chain to.
#[derive(Debug)]
enum Trust {
    /// The fleet CA of the device's identity.
    Ca(Arc<WebPkiServerVerifier>),
    /// Enrollment: a CA in the hub's own chain with this fingerprint (from
    /// the token); a chain without it is noted in the outcome.
    Pinned(Fingerprint, PinOutcome),
}

/// Checks the hub's certificate against [`Trust`], with the clock rules of
/// this module.
#[derive(Debug)]
struct HubVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl HubVerifier {
    /// The verifier of the chain `intermediates` came with.
    fn verifier(&self, intermediates: &[CertificateDer<'_>]) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        match &self.trust {
            Trust::Ca(verifier) => Ok(verifier.clone()),
            Trust::Pinned(pin, outcome) => {
                let Some(ca) = intermediates.iter().find(|c| Fingerprint::of_der(c) == *pin) else {
                    outcome.0.store(true, Ordering::SeqCst);
                    return Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
                };
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            }
        }
    }
}

impl ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let inner = self.verifier(intermediates)?;
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let floored = check_time(now.as_secs(), BUILD_TIME, None, false);
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, at(floored)) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            )) => {
                let start = outpost_shared::identity::validity_of(end_entity)
                    .and_then(|(from, _)| from.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() + 1);
                let when = check_time(floored, BUILD_TIME, start, true);
                tracing::debug!(clock = floored, checked_at = when, "The hub's certificate starts after this clock.");
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, at(when))
            }
            other => other,
        }
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

/// Verifies LAN peers, both ways: a certificate from a CA of the device's
/// trust bundle (as the hub last sent it) whose device the hub has not
/// revoked. Rebuilt from the bundle whenever it changes.
pub struct PeerVerifier {
    live: crate::identity::Live,
    provider: Arc<CryptoProvider>,
    built: std::sync::Mutex<Option<PeerRoots>>,
}

#[derive(Clone)]
struct PeerRoots {
    generation: u64,
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: Arc<Vec<outpost_shared::DeviceId>>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier").finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// A verifier following `live`'s trust bundle.
    pub fn new(live: crate::identity::Live) -> Result<Arc<Self>, TlsError> {
        let verifier = PeerVerifier { live, provider: provider(), built: std::sync::Mutex::new(None) };
        verifier.roots().map_err(tls_err)?;
        Ok(Arc::new(verifier))
    }

    fn roots(&self) -> Result<PeerRoots, rustls::Error> {
        let generation = self.live.trust_generation();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(roots) = built.as_ref().filter(|r| r.generation == generation) {
            return Ok(roots.clone());
        }
        let identity = self.live.get();
        let mut store = RootCertStore::empty();
        for ca in &identity.cas {
            store.add(ca.clone())?;
        }
        let store = Arc::new(store);
        let general = |e: &dyn std::fmt::Display| rustls::Error::General(e.to_string());
        let server = WebPkiServerVerifier::builder_with_provider(store.clone(), self.provider.clone())
            .build()
            .map_err(|e| general(&e))?;
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(store, self.provider.clone())
            .build()
            .map_err(|e| general(&e))?;
        let roots = PeerRoots { generation, server, client, revoked: identity.revoked.clone() };
        *built = Some(roots.clone());
        Ok(roots)
    }

    /// Refuses a certificate of a revoked device.
    fn not_revoked(revoked: &[outpost_shared::DeviceId], end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match outpost_shared::identity::device_id_of(end_entity) {
            Some(id) if revoked.binary_search(&id).is_ok() => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            _ => Ok(()),
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots()?;
        let verified = roots.server.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        Self::not_revoked(&roots.revoked, end_entity)?;
        Ok(verified)
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

impl rustls::server::danger::ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let roots = self.roots()?;
        let verified = roots.client.verify_client_cert(end_entity, intermediates, now)?;
        Self::not_revoked(&roots.revoked, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
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
    let verifier = Arc::new(HubVerifier { trust: Trust::Pinned(pin, outcome.clone()), provider: provider() });
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((quic_client(tls, timings, ALPN)?, outcome))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_checked_no_earlier_than_the_build_or_their_start() {
        let build = 1_790_000_000;
        // A clock ahead of the build is the time.
        assert_eq!(check_time(build + 5, build, None, false), build + 5);
        // A clock at 1970 is taken as the build time.
        assert_eq!(check_time(86_400, build, None, false), build);
        // A certificate issued after that (a hub renewed since the build)
        // is checked as at its start.
        assert_eq!(check_time(86_400, build, Some(build + 1000), true), build + 1000);
        // Only when it is not valid yet, and only forward.
        assert_eq!(check_time(build + 10, build, Some(build + 1000), false), build + 10);
        assert_eq!(check_time(build + 10, build, Some(build), true), build + 10);
        const { assert!(BUILD_TIME > 1_700_000_000, "the build time is recorded") };
    }
}
