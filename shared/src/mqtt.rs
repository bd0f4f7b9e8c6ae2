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
//! [`DownWindow`] is the agent's rule, [`UpNumbers`] the hubs' (kept in the
//! fleet's store, with the hubs' tickets, which bound how old a replay can
//! be).

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
    /// Its number was taken already in its session.
    #[error("message {seq} of its session was taken already: a replay")]
    Again {
        /// Its number.
        seq: u64,
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

/// How far below the highest number taken in a session a message is still
/// taken (once): a device's messages reach the hubs of a shared
/// subscription in parallel, so they may be taken out of order.
pub const UP_REORDER: u64 = 64;

/// The fleet's rule for one session's up messages: each number is taken
/// once, and none more than [`UP_REORDER`] below the highest taken (a
/// sliding window, as DTLS and IPsec keep against replays). The state is
/// two numbers, so the hubs of a fleet keep it in their shared store and
/// change it by compare-and-swap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpNumbers {
    /// The highest number taken (0: none yet).
    pub last: u64,
    /// Bit `i` set: number `last - 1 - i` was taken.
    pub below: u64,
}

impl UpNumbers {
    /// The state after taking message `seq`, or why it is refused.
    pub fn admit(self, seq: u64) -> Result<UpNumbers, Stale> {
        if seq > self.last {
            let shift = seq - self.last;
            // The old highest becomes bit `shift - 1`, unless it slid out.
            let moved = u32::try_from(shift).ok().and_then(|s| self.below.checked_shl(s)).unwrap_or(0);
            let old_last = if self.last > 0 && shift <= UP_REORDER { 1 << (shift - 1) } else { 0 };
            return Ok(UpNumbers { last: seq, below: moved | old_last });
        }
        let back = self.last - seq;
        if seq == 0 || back > UP_REORDER {
            return Err(Stale::Replayed { seq, last: self.last });
        }
        let bit = if back == 0 { 0 } else { 1 << (back - 1) };
        if back == 0 || self.below & bit != 0 {
            return Err(Stale::Again { seq });
        }
        Ok(UpNumbers { last: self.last, below: self.below | bit })
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
    fn up_numbers_are_taken_once_in_any_order_within_the_window() {
        let take = |n: UpNumbers, seq| n.admit(seq);
        let n = UpNumbers::default();
        assert_eq!(take(n, 0), Err(Stale::Replayed { seq: 0, last: 0 }), "numbers start at 1");
        let n = take(n, 1).unwrap();
        assert_eq!(n, UpNumbers { last: 1, below: 0 });
        assert_eq!(take(n, 1), Err(Stale::Again { seq: 1 }), "a replayed hello");
        // 3 before 2 (two hubs took them at once): both taken, each once.
        let n = take(n, 3).unwrap();
        assert_eq!(n, UpNumbers { last: 3, below: 0b10 }, "1 taken, 2 not yet");
        let n = take(n, 2).unwrap();
        assert_eq!(n, UpNumbers { last: 3, below: 0b11 });
        for seq in 1..=3 {
            assert_eq!(take(n, seq), Err(Stale::Again { seq }));
        }
        // The window's far edge: 64 below the highest is taken, 65 is not.
        let n = take(n, 3 + UP_REORDER).unwrap();
        assert_eq!(n.below, 1 << (UP_REORDER - 1), "3 at the edge; 1 and 2 slid out");
        assert_eq!(take(n, 3), Err(Stale::Again { seq: 3 }));
        assert_eq!(take(n, 2), Err(Stale::Replayed { seq: 2, last: 3 + UP_REORDER }));
        assert_eq!(take(n, 4).map(|n| n.below), Ok(1 << (UP_REORDER - 1) | 1 << (UP_REORDER - 2)), "4 is open");
        // A jump past the window forgets everything below it.
        let far = take(n, n.last + 1000).unwrap();
        assert_eq!(far, UpNumbers { last: n.last + 1000, below: 0 });
        assert!(take(far, far.last - 1).is_ok(), "the numbers just below a jump are still open");
    }

    #[test]
    fn every_number_is_taken_once_whatever_the_order_and_repeats() {
        // Every order of a shuffled, repeated stream within the window:
        // each number is taken exactly once.
        let mut seqs: Vec<u64> = (1..=200).flat_map(|s| [s, s]).collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in (1..seqs.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Shuffle within a small distance only, as a broker reorders.
            let j = i.saturating_sub(usize::try_from(state % 8).unwrap_or(0));
            seqs.swap(i, j);
        }
        let mut n = UpNumbers::default();
        let mut taken = Vec::new();
        for seq in seqs {
            if let Ok(next) = n.admit(seq) {
                n = next;
                taken.push(seq);
            }
        }
        taken.sort_unstable();
        assert_eq!(taken, (1..=200).collect::<Vec<_>>());
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
