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

/// One line of the peer table, from whichever shape holds the peer.
#[derive(Debug, Clone)]
pub struct PeerRow<'a> {
    /// The peer's id.
    pub id: &'a str,
    /// Its state's name.
    pub state: &'a str,
    /// Why it is in that state, when the state says.
    pub reason: Option<&'a str>,
    /// It announced a working uplink.
    pub uplink: bool,
    /// Its addresses.
    pub addresses: &'a [String],
    /// Round trip of the last exchange.
    pub rtt_ms: Option<u32>,
    /// Last heard of, RFC 3339.
    pub last_seen: String,
}

/// A table of peers, for `outpost-agent peers` and `outpostctl peers`.
pub fn render_rows<'a>(peers: impl IntoIterator<Item = PeerRow<'a>>) -> String {
    let rows: Vec<Vec<String>> = peers
        .into_iter()
        .map(|p| {
            vec![
                p.id.to_owned(),
                match p.reason {
                    Some(reason) => format!("{}: {reason}", p.state),
                    None => p.state.to_owned(),
                },
                if p.uplink { "up" } else { "down" }.to_owned(),
                p.addresses.join(" "),
                p.rtt_ms.map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                p.last_seen,
            ]
        })
        .collect();
    crate::table::render(&["ID", "STATE", "UPLINK", "ADDRESSES", "RTT", "LAST SEEN"], &rows)
}

/// [`render_rows`] of the agent's own peer entries.
pub fn render(peers: &[PeerEntry]) -> String {
    render_rows(peers.iter().map(|p| PeerRow {
        id: &p.id,
        state: p.state.as_str(),
        reason: match &p.state {
            PeerState::Untrusted { reason } => Some(reason),
            _ => None,
        },
        uplink: p.uplink,
        addresses: &p.addresses,
        rtt_ms: p.rtt_ms,
        last_seen: p.last_seen.rfc3339(),
    }))
}
