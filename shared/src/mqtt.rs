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
//!
//! Since protocol version 11 every message is a
//! [`crate::protocol::Fresh`] inside a `Signed` (batches too), so that a
//! message captured at the broker and published again is refused:
//! [`DownWindow`] is the agent's rule, [`UpWindow`] the hub's (with the
//! hub's tickets, which bound how old a replay can be).

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
    /// `TrustHave`: the digest of the device's trust bundle.
    Trust,
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
            UpKind::Trust => "trust",
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
            Message::TrustHave(_) => Some(UpKind::Trust),
            _ => None,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [UpKind::Hello, UpKind::Batch, UpKind::Heartbeat, UpKind::Received, UpKind::Relay, UpKind::Renew, UpKind::Trust]
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

/// Why a message through the broker was refused as stale.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// Down: it answers another session of this device (an old `Welcome`
    /// or `Deliver` replayed).
    #[error("it belongs to session {got:016x}, not this one ({current:016x}): a replay")]
    OtherSession {
        /// The session it names.
        got: u64,
        /// This connection's.
        current: u64,
    },
    /// Its number was passed already in its session.
    #[error("message {seq} of its session came after {last}: a replay")]
    Replayed {
        /// Its number.
        seq: u64,
        /// The highest number taken from that sender in that session.
        last: u64,
    },
}

/// The highest number taken from each of at most `N` keys (senders or
/// sessions); a new key evicts the least recently heard.
#[derive(Debug, Clone, Default)]
struct Numbers<const N: usize> {
    /// (key, last number), most recently heard last.
    last: Vec<(u64, u64)>,
}

impl<const N: usize> Numbers<N> {
    /// Takes number `seq` of `key` if it is above the last one taken.
    fn take(&mut self, key: u64, seq: u64) -> Result<(), Stale> {
        let last = match self.last.iter().position(|(k, _)| *k == key) {
            Some(i) => self.last.remove(i).1,
            None => 0,
        };
        if seq <= last {
            self.last.push((key, last));
            return Err(Stale::Replayed { seq, last });
        }
        if self.last.len() >= N {
            self.last.remove(0);
        }
        self.last.push((key, seq));
        Ok(())
    }
}

/// Senders (hub processes) a device tracks per session; more evict the
/// least recently heard.
pub const DOWN_SENDERS: usize = 16;

/// The agent's rule for down messages of one connection: they must name
/// its session, and each hub process's numbers must grow.
#[derive(Debug, Clone)]
pub struct DownWindow {
    session: u64,
    senders: Numbers<DOWN_SENDERS>,
}

impl DownWindow {
    /// The window of a new connection whose session is `session`.
    pub fn new(session: u64) -> Self {
        DownWindow { session, senders: Numbers::default() }
    }

    /// This connection's session.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Takes message `seq` of `sender` for `session`, or says why not.
    pub fn admit(&mut self, session: u64, sender: u64, seq: u64) -> Result<(), Stale> {
        if session != self.session {
            return Err(Stale::OtherSession { got: session, current: self.session });
        }
        self.senders.take(sender, seq)
    }
}

/// Sessions of one device a hub remembers the numbers of; more evict the
/// least recently heard.
pub const UP_SESSIONS: usize = 8;

/// A hub's rule for one device's up messages: in each session the numbers
/// grow. A session it does not know starts with a `Hello`, or with any
/// message whose ticket the hub made recently for that session (a session
/// another hub of a shared subscription welcomed, or one from before a
/// restart); the caller checks the ticket.
#[derive(Debug, Clone, Default)]
pub struct UpWindow {
    sessions: Numbers<UP_SESSIONS>,
}

impl UpWindow {
    /// Takes message `seq` of `session`, or says why not.
    pub fn admit(&mut self, session: u64, seq: u64) -> Result<(), Stale> {
        self.sessions.take(session, seq)
    }
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
    fn down_messages_must_name_the_session_and_grow_per_sender() {
        let mut w = DownWindow::new(7);
        assert_eq!(w.admit(6, 1, 1), Err(Stale::OtherSession { got: 6, current: 7 }), "an old session's Welcome");
        assert_eq!(w.admit(7, 1, 1), Ok(()));
        assert_eq!(w.admit(7, 1, 1), Err(Stale::Replayed { seq: 1, last: 1 }), "the same message again");
        assert_eq!(w.admit(7, 2, 1), Ok(()), "another hub process counts on its own");
        assert_eq!(w.admit(7, 1, 5), Ok(()), "gaps are fine (messages for other hubs' sessions)");
        assert_eq!(w.admit(7, 1, 3), Err(Stale::Replayed { seq: 3, last: 5 }));
        // Many senders: the least recently heard is forgotten, not the others.
        for sender in 10..10 + DOWN_SENDERS as u64 {
            w.admit(7, sender, 1).unwrap();
        }
        assert_eq!(w.admit(7, 10 + DOWN_SENDERS as u64 - 1, 1), Err(Stale::Replayed { seq: 1, last: 1 }));
    }

    #[test]
    fn up_messages_grow_per_session_and_an_unknown_session_does_not_end_the_current() {
        let mut w = UpWindow::default();
        assert_eq!(w.admit(100, 1), Ok(()));
        assert_eq!(w.admit(100, 2), Ok(()));
        assert_eq!(w.admit(100, 2), Err(Stale::Replayed { seq: 2, last: 2 }), "a replayed heartbeat");
        assert_eq!(w.admit(100, 1), Err(Stale::Replayed { seq: 1, last: 2 }), "a replayed hello of this session");
        // A replayed hello of an old session the hub forgot is taken (its
        // Welcome names a session the device does not have), and the
        // current session goes on.
        assert_eq!(w.admit(50, 1), Ok(()));
        assert_eq!(w.admit(100, 3), Ok(()));
        for old in 0..UP_SESSIONS as u64 {
            w.admit(old, 1).unwrap();
        }
        // The current session was pushed out by a flood of old hellos: its
        // next message starts it again (the hub checked its ticket).
        assert_eq!(w.admit(100, 4), Ok(()));
        assert_eq!(w.admit(100, 4), Err(Stale::Replayed { seq: 4, last: 4 }));
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
