//! The MQTT side of the protocol, shared by the agent's MQTT uplink and the
//! hub's bridge: topic layout, broker URLs and the TLS client settings.
//!
//! - `outpost/v1/<device>/up/<kind>`: device → hub, QoS 1. `batch` carries
//!   an envelope with a [`crate::protocol::Batch`] (signed by the device);
//!   `relay` one with a `Relay` of another device's batch (signed by that
//!   device);
//!   `hello`, `heartbeat`, `received` and `renew` carry an envelope with a
//!   [`crate::protocol::Signed`] message (direction up, signed by the device).
//! - `outpost/v1/<device>/down`: hub → device, QoS 1, an envelope with a
//!   `Signed` message (direction down, signed by the fleet CA): `Welcome`,
//!   `Ack`, `Deliver`, `Refused`, `Renewed`.
//!
//! The broker's ACL should confine each device to its own topics (see
//! `configs/mosquitto-acl`), but nothing relies on it: the hub checks every
//! up message against its topic and the device's key, the device checks
//! every down message against the CA's key.

use crate::identity::DeviceId;
use crate::protocol::Message;

/// First levels of every Outpost topic.
pub const TOPIC_ROOT: &str = "outpost/v1";

/// Kinds of up topics, one per message a device sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpKind {
    /// `Hello`, at each (re)connection.
    Hello,
    /// `Batch` of outbox records.
    Batch,
    /// `Heartbeat`.
    Heartbeat,
    /// `Received` commands.
    Received,
    /// `Relay`: another device's batch, carried for it.
    Relay,
    /// `Renew`: a request for a new certificate.
    Renew,
}

impl UpKind {
    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            UpKind::Hello => "hello",
            UpKind::Batch => "batch",
            UpKind::Heartbeat => "heartbeat",
            UpKind::Received => "received",
            UpKind::Relay => "relay",
            UpKind::Renew => "renew",
        }
    }

    /// The kind for `message`, if a device may send it over MQTT.
    pub fn of(message: &Message) -> Option<Self> {
        match message {
            Message::Hello(_) => Some(UpKind::Hello),
            Message::Batch(_) => Some(UpKind::Batch),
            Message::Heartbeat(_) => Some(UpKind::Heartbeat),
            Message::Received(_) => Some(UpKind::Received),
            Message::Relay(_) => Some(UpKind::Relay),
            Message::Renew(_) => Some(UpKind::Renew),
            _ => None,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [UpKind::Hello, UpKind::Batch, UpKind::Heartbeat, UpKind::Received, UpKind::Relay, UpKind::Renew]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// `outpost/v1/<device>/up/<kind>`.
pub fn up_topic(device: &DeviceId, kind: UpKind) -> String {
    format!("{TOPIC_ROOT}/{device}/up/{}", kind.as_str())
}

/// `outpost/v1/<device>/down`.
pub fn down_topic(device: &DeviceId) -> String {
    format!("{TOPIC_ROOT}/{device}/down")
}

/// The filter matching every device's up topics: `outpost/v1/+/up/+`.
pub fn up_filter() -> String {
    format!("{TOPIC_ROOT}/+/up/+")
}

/// The device and kind of an up topic; `None` for anything else.
pub fn parse_up_topic(topic: &str) -> Option<(DeviceId, UpKind)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let mut levels = rest.split('/');
    let (device, up, kind) = (levels.next()?, levels.next()?, levels.next()?);
    if up != "up" || levels.next().is_some() {
        return None;
    }
    Some((device.parse().ok()?, UpKind::parse(kind)?))
}

/// A broker address: `mqtts://host[:port]` (TLS, default port 8883) or
/// `mqtt://host[:port]` (plain TCP, default port 1883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS or plain TCP.
    pub tls: bool,
    /// Host name or address (also the name the broker's certificate must
    /// carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("{s:?} is not a broker URL; write mqtts://host:port or mqtt://host:port"));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address in brackets, with or without a port.
            _ if rest.starts_with('[') && rest.ends_with(']') => (rest, default_port),
            Some((host, port)) => (host, port.parse().map_err(|_| format!("{s:?}: invalid port {port:?}"))?),
            None => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("{s:?}: missing or invalid host"));
        }
        Ok(BrokerUrl { tls, host: host.to_owned(), port })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl crate::config::FromConfig for BrokerUrl {
    fn from_config(value: &toml::Value) -> Result<Self, String> {
        value.as_str().ok_or_else(|| "expected a string such as \"mqtts://broker:8883\"".to_owned())?.parse()
    }
}

/// The certificates in a PEM file (a broker's CA file).
#[cfg(feature = "tls")]
pub fn read_pem_certs(path: &std::path::Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// TLS settings for a broker connection: the broker's certificate must
/// chain to one of `roots`, and the client presents `chain` with `key`.
/// TLS 1.2 and 1.3, as brokers vary.
#[cfg(feature = "tls")]
pub fn tls_client_config(
    roots: &[rustls_pki_types::CertificateDer<'static>],
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, String> {
    client_builder(roots)?.with_client_auth_cert(chain, key).map_err(|e| format!("client certificate: {e}"))
}

/// Like [`tls_client_config`], with the client certificate from `resolver`
/// at each handshake (one that is renewed while the process runs).
#[cfg(feature = "tls")]
pub fn tls_client_config_resolved(
    roots: &[rustls_pki_types::CertificateDer<'static>],
    resolver: std::sync::Arc<dyn rustls::client::ResolvesClientCert>,
) -> Result<rustls::ClientConfig, String> {
    Ok(client_builder(roots)?.with_client_cert_resolver(resolver))
}

/// A client config trusting `roots` (the broker's CA), ring as provider.
#[cfg(feature = "tls")]
fn client_builder(
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone()).map_err(|e| format!("broker CA: {e}"))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_strangers_are_refused() {
        let id: DeviceId = "dev-0a".parse().unwrap();
        assert_eq!(up_topic(&id, UpKind::Batch), "outpost/v1/dev-0a/up/batch");
        assert_eq!(down_topic(&id), "outpost/v1/dev-0a/down");
        assert_eq!(parse_up_topic("outpost/v1/dev-0a/up/batch"), Some((id.clone(), UpKind::Batch)));
        assert_eq!(parse_up_topic("outpost/v1/dev-0a/up/hello"), Some((id, UpKind::Hello)));
        for bad in [
            "outpost/v1/dev-0a/down",
            "outpost/v1/dev-0a/up/batch/x",
            "outpost/v1/dev-0a/up/other",
            "outpost/v1/Dev.A/up/batch",
            "outpost/v2/dev-0a/up/batch",
            "outpost/v1/dev-0a/up",
        ] {
            assert_eq!(parse_up_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn broker_urls() {
        let u: BrokerUrl = "mqtts://broker.example:8884".parse().unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "broker.example", 8884));
        let u: BrokerUrl = "mqtt://10.0.0.1".parse().unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "10.0.0.1", 1883));
        let u: BrokerUrl = "mqtts://[::1]:9000".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.to_string().as_str()), ("::1", 9000, "mqtts://[::1]:9000"));
        for bad in ["tcp://x:1", "mqtt://", "mqtts://host:port", "mqtt://a/b"] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }
}
