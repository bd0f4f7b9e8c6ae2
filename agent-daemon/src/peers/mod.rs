//! LAN peers: discovery by mDNS (mdns-sd), authenticated peer links (QUIC
//! with mutual TLS against the fleet CA), and relay of the outbox through a
//! peer while this device's own uplink is down.
//!
//! - Every agent advertises `_outpost._udp.local.` (instance = device id)
//!   with TXT `v` (protocol version), `fleet` (from the CA fingerprint),
//!   `port` (peer port) and `uplink` (`up`/`down`), and browses for the
//!   same service.
//! - What a peer advertises is a claim. A peer of another fleet is listed as
//!   foreign and ignored. A peer claiming this fleet is dialled: the
//!   handshake must show a certificate from the fleet CA issued to the
//!   advertised device id (its SAN), and the dialler presents its own
//!   certificate. Only then is the peer trusted. The link's keep-alive
//!   (`probe_interval`) and idle timeout (`gone_after`) tell when it went
//!   silent; goodbye packets and mDNS expiry tell the rest.
//! - Relay: while the uplink has not been connected for `relay_after` and a
//!   trusted peer advertises an uplink, the outbox goes to that peer one
//!   signed batch at a time; the peer hands it to its own hub session as a
//!   `Relay`, and the hub's acknowledgement for this device comes back the
//!   same way. The hub checks the batch with this device's key and
//!   de-duplicates it by sequence number, so records sent both ways are
//!   stored once. One batch in flight, starting after what the hub
//!   acknowledged, keeps the hub's view in order whichever path wins.
//! - Bounds: anyone on the LAN can announce the fleet's TXT values (every
//!   agent broadcasts them), so what announcements cost is bounded: the
//!   table holds `max_peers` entries (a newcomer replaces the entry least
//!   worth keeping, never a trusted peer: `peers::evictee`), entries not
//!   trusted are forgotten after `10 × gone_after` unseen, `max_dials`
//!   proofs run at once, lines about peers not trusted are logged 10 a
//!   minute (`peers::LogBudget`), and the report to the hub is the bounded
//!   table, sent at once when the trusted peers change and otherwise at most
//!   once a minute.
//!
//! Where it lives: [`discovery`] (mDNS), [`table`] (the peer table and
//! every decision over it, pure where it can be), [`link`] (the endpoint
//! and proving a peer), [`relay`] (both directions), and this file: the
//! task that ties them together. The task sleeps until something happens
//! (an announcement, a dial's end, a link lost, the uplink's state, a new
//! trust bundle) or the table's next deadline (`table::next_look`).

mod discovery;
mod link;
mod relay;
mod table;

pub use link::PEER_ALPN;
pub use table::PeerTable;

use crate::config::PeersConfig;
use crate::identity::Live;
use crate::link::LinkState;
use crate::store::AgentStore;
use crate::uplink::RelayRequest;
use discovery::{Browser, advertise, mdns_daemon, on_event};
use outpost_shared::Fingerprint;
use outpost_shared::peers::{PeerState, PeersReport, fleet_id};
use outpost_shared::protocol::RecordBody;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the peers task cannot run (it is restarted after a pause).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The mDNS daemon refused a step.
    #[error("mDNS {step}: {source}")]
    Mdns {
        /// What was being done.
        step: &'static str,
        /// The cause.
        source: mdns_sd::Error,
    },
    /// The peer endpoint cannot be set up.
    #[error("peer endpoint on {bind}: {source}")]
    Bind {
        /// The address.
        bind: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS or the transport could not be configured.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The endpoint stopped accepting.
    #[error("peer endpoint closed")]
    Closed,
}

/// Everything the peers task needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerParams {
    /// `[peers]`.
    pub config: PeersConfig,
    /// The device's identity (renewed while it runs).
    pub identity: Live,
    /// The outbox, for relaying it.
    pub store: AgentStore,
    /// The uplink's state.
    pub link: watch::Receiver<LinkState>,
    /// Where relayed batches go to the uplink.
    pub relay_tx: mpsc::Sender<RelayRequest>,
    /// The table.
    pub table: PeerTable,
    /// Frame limit.
    pub max_frame: usize,
    /// How long to wait for a relayed batch's acknowledgement.
    pub ack_timeout: Duration,
}

/// Runs discovery, the peer endpoint and relay until `cancel`.
pub async fn run(p: PeerParams, cancel: CancellationToken) {
    if let Err(e) = serve(&p, &cancel).await {
        tracing::error!(error = %e, "LAN peers stopped; retrying.");
        // Ending lets the supervisor restart the task after its backoff.
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn serve(p: &PeerParams, cancel: &CancellationToken) -> Result<(), PeerError> {
    let cfg = &p.config;
    let endpoint = link::endpoint(p)?;
    let port = endpoint.local_addr().map_err(|source| PeerError::Bind { bind: endpoint_bind(cfg), source })?.port();
    let identity = p.identity.get();
    let mut fleet = fleet_id(&Fingerprint::of_der(identity.fleet_ca()));
    let mut trust = p.identity.trust_changes();
    let me = identity.device_id.to_string();
    let mut uplink = *p.link.borrow() == LinkState::Connected;
    let advertiser = mdns_daemon(cfg)?;
    let fullname = match advertise(&advertiser, &me, &fleet, port, uplink) {
        Ok(name) => name,
        Err(e) => {
            let _ = advertiser.shutdown();
            return Err(e);
        }
    };
    let mut browser = match Browser::start(cfg) {
        Ok(b) => b,
        Err(e) => {
            let _ = advertiser.shutdown();
            return Err(e);
        }
    };
    tracing::info!(port, %fleet, "LAN peers: advertising and browsing.");
    let (dialled_tx, mut dialled_rx) = mpsc::channel::<link::Dialled>(16);
    let mut link = p.link.clone();
    // Links proved by a dial report their end here (quinn knows when a link
    // went silent; `table::watch_link`).
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<()>();
    let mut wake = Some(Instant::now());
    let mut down_since = (!uplink).then(Instant::now);
    let mut relay: Option<(String, CancellationToken)> = None;
    let mut reported = Reported::default();
    let mut servers = tokio::task::JoinSet::new();
    let result = loop {
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            event = browser.events.recv_async() => {
                // What is queued is taken in one go: mdns-sd ends a browse
                // whose queue (1000 events) fills.
                let events = event.into_iter().chain(std::iter::from_fn(|| browser.events.try_recv().ok())).take(1000);
                for e in events {
                    on_event(p, &me, &fleet, e);
                }
                if browser.events.is_disconnected() {
                    tracing::warn!("LAN peers: the mDNS browse ended (its queue filled: a flood?); browsing again.");
                    browser = match Browser::start(cfg) {
                        Ok(b) => b,
                        Err(e) => break Err(e),
                    };
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break Err(PeerError::Closed) };
                servers.spawn(relay::relay_server(incoming, p.clone()));
                continue;
            }
            Some(_) = servers.join_next(), if !servers.is_empty() => continue,
            Some(done) = dialled_rx.recv() => table::on_dialled(p, done, &lost_tx),
            Some(()) = lost_rx.recv() => {}
            () = wait_until(wake) => {}
            () = relay_ended(&relay) => relay = None,
            changed = link.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let now_up = *link.borrow() == LinkState::Connected;
                if now_up != uplink {
                    uplink = now_up;
                    down_since = (!uplink).then(Instant::now);
                    if let Err(e) = advertise(&advertiser, &me, &fleet, port, uplink) {
                        break Err(e);
                    }
                    if uplink && let Some((peer, stop)) = relay.take() {
                        tracing::info!(%peer, "Uplink back: relay through the peer stops.");
                        stop.cancel();
                    }
                }
            }
            Ok(()) = trust.changed() => {
                // A new trust bundle: revoked peers lose their links, and
                // the fleet's announcement follows the oldest CA trusted.
                let identity = p.identity.get();
                table::distrust_revoked(p, &identity);
                let now = fleet_id(&Fingerprint::of_der(identity.fleet_ca()));
                if now != fleet {
                    fleet = now;
                    if let Err(e) = advertise(&advertiser, &me, &fleet, port, uplink) {
                        break Err(e);
                    }
                }
            }
        }
        // Something happened or a deadline came: one look over the table.
        let now = Instant::now();
        table::housekeeping(p, &browser.daemon, &endpoint, &dialled_tx, now);
        // A store that has not met the hub since it was made does not know
        // where its numbers must start (see `store::resume_plan`): it waits
        // for a direct session.
        let relay_at = (cfg.relay && relay.is_none() && !p.store.stats().fresh)
            .then(|| down_since.map(|t| t + cfg.relay_after))
            .flatten();
        if relay_at.is_some_and(|at| at <= now)
            && let Some((peer, connection)) = table::relay_peer(&p.table)
        {
            tracing::info!(%peer, "Uplink down: relaying the outbox through a LAN peer.");
            let stop = cancel.child_token();
            let span = tracing::info_span!("relay", through = %peer);
            tokio::spawn(tracing::Instrument::instrument(
                relay::relay_client(p.clone(), peer.clone(), connection, stop.clone()),
                span,
            ));
            relay = Some((peer, stop));
        }
        let report_at = report(p, &mut reported).await;
        let relay_at = relay_at.filter(|&at| at > now && relay.is_none());
        wake = [p.table.next_look(now, cfg), relay_at, report_at].into_iter().flatten().min();
    };
    if let Some((_, stop)) = relay.take() {
        stop.cancel();
    }
    drop(browser);
    // Links in the table hold the endpoint's socket: close them, so that a
    // restart can bind the port again.
    for peer in p.table.lock().values_mut() {
        if let Some(c) = peer.connection.take() {
            c.close(0u32.into(), b"agent stopping");
            peer.entry.state = PeerState::Gone;
        }
    }
    if result.is_ok()
        && let Ok(done) = advertiser.unregister(&fullname)
    {
        // The goodbye packets go out before the daemon stops.
        let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
    }
    let _ = advertiser.shutdown();
    endpoint.close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// What the last report said, and when it was sent.
#[derive(Debug, Default)]
struct Reported {
    peers: Vec<(String, &'static str, bool)>,
    at: Option<Instant>,
}

/// The trusted peers and their uplinks among `peers`.
fn trusted<'a>(peers: &'a [(String, &'static str, bool)]) -> Vec<&'a (String, &'static str, bool)> {
    peers.iter().filter(|(_, state, _)| *state == PeerState::Trusted.as_str()).collect()
}

/// An announced name as it may be logged: control characters escaped (a
/// LAN stranger chooses it).
fn escape(text: &str) -> String {
    text.escape_debug().to_string()
}

/// Least time between two reports whose trusted peers are the same.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// When the table as it is now (`peers`) should be reported, given the last
/// report: `None` if it says the same; at once if the trusted peers
/// changed; otherwise a minute after the last report, so churn on the LAN
/// costs the outbox little.
fn report_at(peers: &[(String, &'static str, bool)], last: &Reported, now: Instant) -> Option<Instant> {
    if peers == last.peers.as_slice() {
        return None;
    }
    let urgent = trusted(peers) != trusted(&last.peers);
    match last.at {
        Some(at) if !urgent => Some((at + REPORT_EVERY).max(now)),
        _ => Some(now),
    }
}

/// Sends a `PeersReport` (the bounded table) through the outbox when
/// [`report_at`] says it is time; returns when to look again.
async fn report(p: &PeerParams, last: &mut Reported) -> Option<Instant> {
    let peers = p.table.snapshot();
    let summary: Vec<(String, &'static str, bool)> =
        peers.iter().map(|e| (e.id.clone(), e.state.as_str(), e.uplink)).collect();
    let now = Instant::now();
    let at = report_at(&summary, last, now)?;
    if at > now {
        return Some(at);
    }
    let changes =
        crate::store::Changes { records: vec![RecordBody::PeersReport(PeersReport { peers })], ..Default::default() };
    match p.store.commit(changes).await {
        Ok(_) => {
            *last = Reported { peers: summary, at: Some(now) };
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "Peer table could not be reported.");
            Some(now + p.config.probe_interval)
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the relay under way has stopped (never if there is none).
async fn relay_ended(relay: &Option<(String, CancellationToken)>) {
    match relay {
        Some((_, stop)) => stop.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Where the peer endpoint binds.
fn endpoint_bind(cfg: &PeersConfig) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], cfg.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(list: &[(&str, PeerState, bool)]) -> Vec<(String, &'static str, bool)> {
        list.iter().map(|(id, state, up)| (id.to_string(), state.as_str(), *up)).collect()
    }

    #[test]
    fn reports_trust_changes_at_once_and_other_churn_once_a_minute() {
        let now = Instant::now();
        let one = peers(&[("a", PeerState::Trusted, true)]);
        assert_eq!(report_at(&[], &Reported::default(), now), None, "nothing new, nothing sent");
        assert_eq!(report_at(&one, &Reported::default(), now), Some(now), "the first table goes at once");
        let last = Reported { peers: one.clone(), at: Some(now - Duration::from_secs(10)) };
        assert_eq!(report_at(&one, &last, now), None);
        // A stranger appears: churn, sent a minute after the last report.
        let churn = peers(&[("a", PeerState::Trusted, true), ("x", PeerState::Unverified, false)]);
        assert_eq!(report_at(&churn, &last, now), Some(now + Duration::from_secs(50)));
        // The trusted peer loses its uplink: at once.
        let down = peers(&[("a", PeerState::Trusted, false)]);
        assert_eq!(report_at(&down, &last, now), Some(now));
        // Churn after a quiet minute: at once.
        let quiet = Reported { peers: one, at: Some(now - Duration::from_secs(61)) };
        assert_eq!(report_at(&churn, &quiet, now), Some(now));
    }
}
