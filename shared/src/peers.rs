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

/// How much of the peer table an entry is worth keeping, lowest first:
/// a peer that left, one of another fleet, one that failed the proof, one
/// not proved yet. A trusted peer is never given up for a newcomer.
fn keep_rank(state: &PeerState) -> Option<u8> {
    match state {
        PeerState::Gone => Some(0),
        PeerState::Foreign => Some(1),
        PeerState::Untrusted { .. } => Some(2),
        PeerState::Unverified => Some(3),
        PeerState::Trusted => None,
    }
}

/// The entry to drop so that a new announcement fits a full table: the
/// lowest ranked ([`keep_rank`]), the longest unseen among those; `None` if
/// every entry is trusted (the newcomer is then not taken). A flood of
/// announcements thus only ever replaces what is not trusted.
pub fn evictee<'a>(entries: impl IntoIterator<Item = &'a PeerEntry>) -> Option<&'a str> {
    entries
        .into_iter()
        .filter_map(|e| keep_rank(&e.state).map(|rank| (rank, e.last_seen, e.id.as_str())))
        .min()
        .map(|(_, _, id)| id)
}

/// True if an entry not trusted is forgotten at `now`: not seen for
/// `forget_after` (a peer that left, a fake that stopped announcing).
pub fn forgotten(entry: &PeerEntry, now: Timestamp, forget_after: std::time::Duration) -> bool {
    entry.state != PeerState::Trusted && entry.last_seen.until(now) >= forget_after
}

/// Lines of one kind a device logs per minute about peers it does not
/// trust; the rest are counted and the count logged once the minute ends.
#[derive(Debug, Clone)]
pub struct LogBudget {
    per_minute: u32,
    window: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// `per_minute` lines a minute.
    pub fn new(per_minute: u32) -> Self {
        LogBudget { per_minute, window: None, used: 0, suppressed: 0 }
    }

    /// Whether one more line may be logged at `now`; `Some(n)` first if a
    /// minute ended in which `n` lines were not logged (log that count).
    pub fn take(&mut self, now: std::time::Instant) -> (bool, Option<u64>) {
        let mut ended = None;
        if self.window.is_none_or(|start| now.saturating_duration_since(start) >= std::time::Duration::from_secs(60)) {
            if self.suppressed > 0 {
                ended = Some(self.suppressed);
            }
            self.window = Some(now);
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.per_minute {
            self.used += 1;
            (true, ended)
        } else {
            self.suppressed += 1;
            (false, ended)
        }
    }
}

/// The peer table, reported to the hub when it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersReport {
    /// The peers in the device's table (at most `[peers] max_peers`), by
    /// id.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn entry(id: &str, state: PeerState, last_seen: u64) -> PeerEntry {
        PeerEntry {
            id: id.into(),
            addresses: Vec::new(),
            first_seen: Timestamp(0),
            last_seen: Timestamp(last_seen),
            uplink: true,
            state,
            rtt_ms: None,
        }
    }

    #[test]
    fn a_full_table_gives_up_the_least_worth_keeping_and_never_a_trusted_peer() {
        let untrusted = PeerState::Untrusted { reason: "x".into() };
        let mut table = vec![
            entry("t1", PeerState::Trusted, 1),
            entry("u-new", PeerState::Unverified, 9),
            entry("u-old", PeerState::Unverified, 5),
            entry("bad", untrusted.clone(), 8),
        ];
        assert_eq!(evictee(&table), Some("bad"), "a failed proof before an untried one");
        table.push(entry("left", PeerState::Gone, 9));
        table.push(entry("other", PeerState::Foreign, 2));
        assert_eq!(evictee(&table), Some("left"));
        table.retain(|e| !matches!(e.state, PeerState::Gone | PeerState::Foreign) && e.id != "bad");
        assert_eq!(evictee(&table), Some("u-old"), "the longest unseen");
        let trusted: Vec<_> = (0..3).map(|i| entry(&format!("t{i}"), PeerState::Trusted, i)).collect();
        assert_eq!(evictee(&trusted), None, "trusted peers stay, the newcomer waits");
    }

    #[test]
    fn entries_not_trusted_age_out() {
        let after = Duration::from_secs(100);
        let now = Timestamp(1_000_000);
        let old = now.0 - 100_000;
        assert!(forgotten(&entry("a", PeerState::Unverified, old), now, after));
        assert!(forgotten(&entry("a", PeerState::Gone, old), now, after));
        assert!(forgotten(&entry("a", PeerState::Untrusted { reason: String::new() }, old), now, after));
        assert!(!forgotten(&entry("a", PeerState::Trusted, old), now, after), "a trusted link stays");
        assert!(!forgotten(&entry("a", PeerState::Unverified, now.0 - 99_000), now, after));
    }

    #[test]
    fn log_lines_are_budgeted_per_minute_and_the_rest_counted() {
        let mut budget = LogBudget::new(3);
        let start = Instant::now();
        let taken: Vec<_> = (0..10).map(|_| budget.take(start)).collect();
        assert_eq!(taken.iter().filter(|(ok, _)| *ok).count(), 3);
        assert!(taken.iter().all(|(_, ended)| ended.is_none()));
        assert_eq!(budget.take(start + Duration::from_secs(60)), (true, Some(7)), "the count of the minute");
        assert_eq!(budget.take(start + Duration::from_secs(61)), (true, None));
    }
}
