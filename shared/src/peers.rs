//! LAN peers: what a device advertises by mDNS, and the peer table it keeps
//! and reports to the hub.
//!
//! Advertised facts are claims: a peer is trusted only after a QUIC
//! connection with mutual TLS proved it holds a certificate from the same
//! fleet CA naming the advertised device id.

use crate::identity::Fingerprint;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The mDNS service type every agent advertises and browses.
pub const SERVICE_TYPE: &str = "_outpost._udp.local.";

/// TXT keys: protocol version, fleet id, peer port, uplink state.
pub const TXT_VERSION: &str = "v";
/// TXT key of the fleet id ([`fleet_id`]).
pub const TXT_FLEET: &str = "fleet";
/// TXT key of the peer QUIC port.
pub const TXT_PORT: &str = "port";
/// TXT key of the uplink state: `up` or `down`.
pub const TXT_UPLINK: &str = "uplink";

/// The fleet id devices advertise: the first 8 bytes of the fleet CA's
/// SHA-256 fingerprint, in hex. Tells fleets apart on a shared LAN; proves
/// nothing (the TLS handshake does).
pub fn fleet_id(ca: &Fingerprint) -> String {
    crate::identity::hex(&ca.0[..8])
}

/// What the device knows about one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The advertised device id (the instance name).
    pub id: String,
    /// Addresses it advertised, with the peer port.
    pub addresses: Vec<String>,
    /// First time it was seen (this agent's run).
    pub first_seen: Timestamp,
    /// Last advertisement or successful contact.
    pub last_seen: Timestamp,
    /// Its advertised uplink state (a claim).
    pub uplink: bool,
    /// What the device made of it.
    pub state: PeerState,
    /// Round-trip time of the peer link, once trusted.
    pub rtt_ms: Option<u32>,
}

/// Trust and liveness of a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Advertised; the proof is under way.
    Unverified,
    /// Proved membership of this fleet and its advertised id over mutual TLS.
    Trusted,
    /// Advertises another fleet; ignored.
    Foreign,
    /// Claims this fleet but failed the proof.
    Untrusted {
        /// Why.
        reason: String,
    },
    /// Left (goodbye, expiry, or its link went silent).
    Gone,
}

impl PeerState {
    /// Short name, for tables.
    pub fn as_str(&self) -> &'static str {
        match self {
            PeerState::Unverified => "unverified",
            PeerState::Trusted => "trusted",
            PeerState::Foreign => "foreign",
            PeerState::Untrusted { .. } => "untrusted",
            PeerState::Gone => "gone",
        }
    }
}

/// The peer table, reported to the hub when it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersReport {
    /// Every peer seen since the agent started, by id.
    pub peers: Vec<PeerEntry>,
}

/// A table of peers, for `outpost-agent peers` and `outpostctl peers`.
pub fn render(peers: &[PeerEntry]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let state = match &p.state {
                PeerState::Untrusted { reason } => format!("untrusted: {reason}"),
                other => other.as_str().to_owned(),
            };
            vec![
                p.id.clone(),
                state,
                if p.uplink { "up" } else { "down" }.to_owned(),
                p.addresses.join(" "),
                p.rtt_ms.map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                p.last_seen.rfc3339(),
            ]
        })
        .collect();
    crate::table::render(&["ID", "STATE", "UPLINK", "ADDRESSES", "RTT", "LAST SEEN"], &rows)
}
