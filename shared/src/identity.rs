//! Identities: device ids as the hub assigns them and certificate
//! fingerprints as enrollment tokens pin them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The TLS server name every hub certificate carries. Agents verify the hub
/// against the fleet CA under this name, whatever address they dial.
pub const HUB_SERVER_NAME: &str = "hub.outpost.invalid";

/// ALPN protocol id of the Outpost QUIC protocol.
pub const ALPN: &[u8] = b"outpost/1";

/// ALPN protocol id of a bulk connection: backup transfers, one request
/// per stream, apart from the session so they never hold up control traffic.
pub const ALPN_BULK: &[u8] = b"outpost-bulk/1";

/// A device's id, assigned by the hub at enrollment and carried in the
/// device certificate's common name. Lowercase ASCII letters, digits and
/// `-`, 1 to 64 characters, so it is safe in file names, URLs and MQTT
/// topics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Why a string is not a valid device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device id {0:?}: expected 1-64 characters of a-z, 0-9 and '-'")]
pub struct InvalidDeviceId(pub String);

impl DeviceId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Makes a fresh random id (`dev-` and 16 hex digits) from 8 random bytes.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        DeviceId(format!("dev-{}", hex(&bytes)))
    }
}

impl FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok { Ok(DeviceId(s.to_owned())) } else { Err(InvalidDeviceId(s.to_owned())) }
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a certificate's DER encoding. Shown as `sha256:` and 64 hex
/// digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses 64 hex digits into 32 bytes (chunk ids, keys); `None` for
/// anything else.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_validated() {
        assert!("dev-0123abcd".parse::<DeviceId>().is_ok());
        for bad in ["", "Dev-1", "a/b", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} accepted");
        }
        let id = DeviceId::from_random([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        assert_eq!(id.as_str(), "dev-deadbeef00010203");
    }

    #[test]
    fn device_id_deserialization_validates() {
        let bytes = postcard::to_stdvec(&"../etc".to_string()).unwrap();
        assert!(postcard::from_bytes::<DeviceId>(&bytes).is_err());
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_der(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

/// Signs with an ECDSA P-256 key: SHA-256, ASN.1 DER signatures. Devices
/// sign their batches and MQTT messages with their own key, the hub its MQTT
/// messages with the fleet CA's key.
#[derive(Debug)]
pub struct Signer {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl Signer {
    /// A signer with the PKCS#8 (DER) key `pkcs8`.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, String> {
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8, &rng)
            .map_err(|e| format!("not an ECDSA P-256 key: {e}"))?;
        Ok(Signer { key, rng })
    }

    /// The signature of `input` (empty if the system's randomness fails,
    /// which the verifier then refuses).
    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        self.key.sign(&self.rng, input).map(|s| s.as_ref().to_vec()).unwrap_or_default()
    }

    /// The public key (an uncompressed P-256 point).
    pub fn public_key(&self) -> &[u8] {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref()
    }
}

/// The DNS name in a device certificate's SAN (`<id>.device.outpost.invalid`):
/// the server name a LAN peer dials, so the handshake proves the id.
pub fn device_server_name(id: &str) -> String {
    format!("{id}.device.outpost.invalid")
}

/// The device id in a certificate already verified against the fleet CA:
/// its common name.
pub fn device_id_of(cert_der: &[u8]) -> Option<DeviceId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    cn.parse().ok()
}

/// The public key in a certificate (for P-256: the uncompressed point), as
/// signatures are verified with it.
pub fn public_key_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(parsed.public_key().subject_public_key.data.to_vec())
}

/// True if `cert_der` names `ca_der` as its issuer: the issuer's name is
/// the CA's subject and, when both carry key identifiers, the authority key
/// id is the CA's subject key id (two CAs of a rotation may share a name).
/// Says which CA issued a certificate already verified; it checks no
/// signature.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    use x509_parser::extensions::ParsedExtension;
    let (Ok((_, cert)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(cert_der), x509_parser::parse_x509_certificate(ca_der))
    else {
        return false;
    };
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return false;
    }
    let authority = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    let subject = ca.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
        _ => None,
    });
    match (authority, subject) {
        (Some(a), Some(s)) => a == s,
        _ => true,
    }
}

/// The validity of a certificate: `(not_before, not_after)`.
pub fn validity_of(cert_der: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    Some((at(parsed.validity().not_before), at(parsed.validity().not_after)))
}

/// The share of a certificate's life after which it is renewed, unless
/// configured otherwise: a renewal that fails has a third of the lifetime
/// left to be retried.
pub const RENEW_AT: f64 = 2.0 / 3.0;

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// after `fraction` of its life (clamped to 0.05 ..= 0.95). The hub's own
/// certificate and the devices' follow this one rule.
pub fn renewal_due(
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
    fraction: f64,
) -> std::time::SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(fraction.clamp(0.05, 0.95))
}

/// The certificate and key a process presents now, replaced while it runs
/// (a renewal): a rustls certificate resolver for either side, so a TLS
/// configuration built once takes the current certificate at each
/// handshake, and connections made with the previous one are not touched.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub struct CertSlot(std::sync::RwLock<std::sync::Arc<rustls::sign::CertifiedKey>>);

#[cfg(feature = "tls")]
impl CertSlot {
    /// A slot holding `key`.
    pub fn new(key: std::sync::Arc<rustls::sign::CertifiedKey>) -> Self {
        CertSlot(std::sync::RwLock::new(key))
    }

    /// The certificate chain and key in the slot, with ring's key loader.
    pub fn certified(
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, String> {
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("private key: {e}"))?;
        Ok(std::sync::Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
    }

    /// The current certificate and key.
    pub fn get(&self) -> std::sync::Arc<rustls::sign::CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces them: the next handshake presents `key`.
    pub fn set(&self, key: std::sync::Arc<rustls::sign::CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

#[cfg(feature = "tls")]
impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

#[cfg(feature = "tls")]
impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
