//! The peer table: what this device knows of each LAN peer, and the
//! decisions over it — whom to dial and when, what to forget, whom to
//! relay through, and when the table next needs a look (nothing polls it).

use super::PeerParams;
use super::escape;
use super::link::{Dialled, dial};
use mdns_sd::ServiceDaemon;
use outpost_shared::DeviceId;
use outpost_shared::peers::{LogBudget, PeerEntry, PeerState, forgotten};
use outpost_shared::time::Timestamp;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One peer as this agent knows it.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) entry: PeerEntry,
    /// mDNS full name, for verification queries.
    pub(super) fullname: String,
    /// Where its peer endpoint listens.
    pub(super) targets: Vec<SocketAddr>,
    /// The trusted link, once proved.
    pub(super) connection: Option<quinn::Connection>,
    /// A dial is under way.
    pub(super) dialling: bool,
    /// No new dial before this.
    pub(super) retry_at: Option<Instant>,
}

/// Lines a minute about LAN peers that are not trusted.
const DISTRUST_LINES: u32 = 10;

/// The peer table, shared with the control socket.
#[derive(Debug, Clone)]
pub struct PeerTable(Arc<Mutex<BTreeMap<String, Peer>>>, Arc<Mutex<LogBudget>>);

impl Default for PeerTable {
    fn default() -> Self {
        PeerTable(Arc::default(), Arc::new(Mutex::new(LogBudget::new(DISTRUST_LINES))))
    }
}

impl PeerTable {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `log` (a line about a peer not trusted) if the minute's budget
    /// allows; logs the count of the lines a past minute left out.
    pub(super) fn distrust(&self, log: impl FnOnce()) {
        let (allowed, left_out) = self.1.lock().unwrap_or_else(|p| p.into_inner()).take(std::time::Instant::now());
        if let Some(n) = left_out {
            tracing::warn!(lines = n, "LAN peers not trusted: lines left out in the last minute.");
        }
        if allowed {
            log();
        }
    }

    /// Every peer seen since start, by id.
    pub fn snapshot(&self) -> Vec<PeerEntry> {
        self.lock()
            .values()
            .map(|p| {
                let mut entry = p.entry.clone();
                if p.connection.as_ref().is_some_and(|c| c.close_reason().is_none()) {
                    // Its link is alive: seen now.
                    entry.last_seen = Timestamp::now();
                }
                entry.rtt_ms = p.connection.as_ref().map(|c| c.rtt().as_millis().min(u32::MAX as u128) as u32);
                entry
            })
            .collect()
    }

    /// When the table next needs a look if nothing happens before: the
    /// earliest dial due (while a dial slot is free; a dial's end is an
    /// event) and the earliest entry to forget.
    pub(super) fn next_look(&self, now: Instant, cfg: &crate::config::PeersConfig) -> Option<Instant> {
        let table = self.lock();
        let free = table.values().filter(|peer| peer.dialling).count() < cfg.max_dials;
        let wall = Timestamp::now();
        table
            .values()
            .filter(|peer| !peer.dialling && peer.connection.is_none())
            .filter_map(|peer| {
                let dial = free.then(|| dial_due(&peer.entry, !peer.targets.is_empty(), peer.retry_at, now)).flatten();
                let forget = forget_at(&peer.entry, wall, now, cfg.gone_after * FORGET_AFTER_GONE);
                dial.into_iter().chain(forget).min()
            })
            .min()
    }
}

/// Entries not trusted are forgotten after this many `gone_after` unseen.
const FORGET_AFTER_GONE: u32 = 10;

/// When a peer without a link or a dial under way should be dialled:
/// `None` if it needs none (trusted, gone, foreign, or no address).
fn dial_due(entry: &PeerEntry, has_targets: bool, retry_at: Option<Instant>, now: Instant) -> Option<Instant> {
    let wants = matches!(entry.state, PeerState::Unverified | PeerState::Untrusted { .. });
    (wants && has_targets).then(|| retry_at.map_or(now, |t| t.max(now)))
}

/// When an entry not trusted is forgotten (see `forgotten`), on the
/// monotonic clock; `None` for a trusted one.
fn forget_at(entry: &PeerEntry, wall: Timestamp, now: Instant, forget_after: Duration) -> Option<Instant> {
    (entry.state != PeerState::Trusted).then(|| now + forget_after.saturating_sub(entry.last_seen.until(wall)))
}

/// Tells the peers task when a proved link ends (silent for `gone_after`,
/// closed by the peer or by this device), so that nothing polls links.
fn watch_link(connection: quinn::Connection, lost: &mpsc::UnboundedSender<()>) {
    let lost = lost.clone();
    tokio::spawn(async move {
        connection.closed().await;
        let _ = lost.send(());
    });
}

/// Dials peers that need proving (at most `max_dials` at once), notices
/// silent links, forgets what is not trusted and was not seen for
/// `10 × gone_after`.
pub(super) fn housekeeping(
    p: &PeerParams,
    mdns: &ServiceDaemon,
    endpoint: &quinn::Endpoint,
    dialled: &mpsc::Sender<Dialled>,
    now: Instant,
) {
    let mut table = p.table.lock();
    let (wall, forget_after) = (Timestamp::now(), p.config.gone_after * FORGET_AFTER_GONE);
    table.retain(|_, peer| peer.dialling || !forgotten(&peer.entry, wall, forget_after));
    let mut dials = table.values().filter(|peer| peer.dialling).count();
    for peer in table.values_mut() {
        if let Some(connection) = &peer.connection {
            if let Some(reason) = connection.close_reason() {
                tracing::info!(peer = %peer.entry.id, %reason, "LAN peer link lost; peer gone.");
                peer.connection = None;
                peer.entry.state = PeerState::Gone;
                // Alive until it went silent; listed as gone from now.
                peer.entry.last_seen = wall;
                // Ask the LAN; a peer that does not answer is flushed from
                // the mDNS cache, one that does is dialled again.
                let _ = mdns.verify(peer.fullname.clone(), Duration::from_secs(1));
                peer.retry_at = Some(now + p.config.probe_interval);
            } else {
                peer.entry.last_seen = wall;
            }
            continue;
        }
        let due = dial_due(&peer.entry, !peer.targets.is_empty(), peer.retry_at, now);
        if peer.dialling || due.is_none_or(|at| at > now) || dials >= p.config.max_dials {
            continue;
        }
        dials += 1;
        peer.dialling = true;
        let (id, targets, tx, endpoint) =
            (peer.entry.id.clone(), peer.targets.clone(), dialled.clone(), endpoint.clone());
        let limit = p.config.gone_after;
        tokio::spawn(async move {
            let result = dial(&endpoint, &id, &targets, limit).await;
            let _ = tx.send(Dialled { id, result }).await;
        });
    }
}

/// Takes the end of a dial into the table; a proved link is watched.
pub(super) fn on_dialled(p: &PeerParams, done: Dialled, lost: &mpsc::UnboundedSender<()>) {
    let mut table = p.table.lock();
    let Some(peer) = table.get_mut(&done.id) else { return };
    peer.dialling = false;
    match done.result {
        Ok(connection) if peer.entry.state != PeerState::Foreign && peer.entry.state != PeerState::Gone => {
            tracing::info!(peer = %done.id, addr = %connection.remote_address(), "LAN peer trusted.");
            peer.entry.state = PeerState::Trusted;
            peer.entry.last_seen = Timestamp::now();
            watch_link(connection.clone(), lost);
            peer.connection = Some(connection);
        }
        Ok(connection) => connection.close(0u32.into(), b"not wanted"),
        Err(error) => {
            let reason = error.to_string();
            let new = !matches!(&peer.entry.state, PeerState::Untrusted { reason: old } if *old == reason);
            peer.entry.state = PeerState::Untrusted { reason: reason.clone() };
            peer.retry_at = Some(Instant::from_std(outpost_shared::time::instant_after(
                std::time::Instant::now(),
                p.config.gone_after,
            )));
            drop(table);
            if new {
                p.table.distrust(|| tracing::warn!(peer = %escape(&done.id), %reason, "LAN peer not trusted."));
            }
        }
    }
}

/// Closes the links of peers the hub revoked: they are not trusted (and
/// carried for) any more; a new handshake of theirs is refused.
pub(super) fn distrust_revoked(p: &PeerParams, identity: &crate::identity::Identity) {
    let mut table = p.table.lock();
    for peer in table.values_mut() {
        let Ok(id) = peer.entry.id.parse::<DeviceId>() else { continue };
        if !identity.is_revoked(&id) || matches!(&peer.entry.state, PeerState::Untrusted { .. }) {
            continue;
        }
        tracing::warn!(peer = %id, "LAN peer revoked by the hub: link closed, nothing carried for it.");
        if let Some(connection) = peer.connection.take() {
            connection.close(2u32.into(), b"revoked");
        }
        peer.entry.state = PeerState::Untrusted { reason: "revoked by the hub".into() };
        peer.retry_at = Some(Instant::now() + p.config.gone_after);
    }
}

/// A trusted peer that advertises an uplink, and its link.
pub(super) fn relay_peer(table: &PeerTable) -> Option<(String, quinn::Connection)> {
    let table = table.lock();
    let peer = table.values().find(|p| p.entry.state == PeerState::Trusted && p.entry.uplink)?;
    Some((peer.entry.id.clone(), peer.connection.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: PeerState, last_seen: Timestamp) -> PeerEntry {
        PeerEntry {
            id: "peer".into(),
            addresses: Vec::new(),
            first_seen: last_seen,
            last_seen,
            uplink: false,
            state,
            rtt_ms: None,
        }
    }

    #[test]
    fn dials_only_unproved_peers_with_an_address_and_not_before_their_retry() {
        let (now, wall) = (Instant::now(), Timestamp::now());
        let later = now + Duration::from_secs(7);
        let unverified = entry(PeerState::Unverified, wall);
        let untrusted = entry(PeerState::Untrusted { reason: "bad certificate".into() }, wall);
        assert_eq!(dial_due(&unverified, true, None, now), Some(now));
        assert_eq!(dial_due(&untrusted, true, Some(later), now), Some(later));
        // A retry time already past is due now, never in the past.
        assert_eq!(dial_due(&untrusted, true, Some(now - Duration::from_secs(3)), now), Some(now));
        assert_eq!(dial_due(&unverified, false, None, now), None, "no address: nothing to dial");
        for state in [PeerState::Trusted, PeerState::Gone, PeerState::Foreign] {
            assert_eq!(dial_due(&entry(state.clone(), wall), true, None, now), None, "{state:?}");
        }
    }

    #[test]
    fn forgets_what_is_not_trusted_once_unseen_long_enough() {
        let (now, wall) = (Instant::now(), Timestamp::now());
        let after = Duration::from_secs(100);
        let seen_30s_ago = Timestamp(wall.0 - 30_000);
        let at = forget_at(&entry(PeerState::Foreign, seen_30s_ago), wall, now, after);
        assert_eq!(at, Some(now + Duration::from_secs(70)));
        // Consistent with `forgotten`: not before, yes at that time.
        let e = entry(PeerState::Gone, seen_30s_ago);
        assert!(!forgotten(&e, Timestamp(wall.0 + 69_999), after));
        assert!(forgotten(&e, Timestamp(wall.0 + 70_000), after));
        let long_ago = Timestamp(wall.0 - 500_000);
        assert_eq!(forget_at(&entry(PeerState::Unverified, long_ago), wall, now, after), Some(now));
        assert_eq!(forget_at(&entry(PeerState::Trusted, long_ago), wall, now, after), None, "trusted stay");
    }
}
