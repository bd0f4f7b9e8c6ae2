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

use crate::config::PeersConfig;
use crate::identity::Live;
use crate::link::LinkState;
use crate::store::AgentStore;
use crate::uplink::RelayRequest;
use crate::uplink::session::next_batch;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::peers::{
    LogBudget, PeerEntry, PeerState, PeersReport, SERVICE_TYPE, TXT_FLEET, TXT_PORT, TXT_UPLINK, TXT_VERSION, evictee,
    fleet_id, forgotten,
};
use outpost_shared::protocol::{Ack, Message, PROTOCOL_VERSION, RecordBody, Refusal, RefusalReason};
use outpost_shared::time::Timestamp;
use outpost_shared::{DeviceId, Fingerprint};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// ALPN of peer links.
pub const PEER_ALPN: &[u8] = b"outpost-peer/1";

/// One peer as this agent knows it.
#[derive(Debug)]
struct Peer {
    entry: PeerEntry,
    /// mDNS full name, for verification queries.
    fullname: String,
    /// Where its peer endpoint listens.
    targets: Vec<SocketAddr>,
    /// The trusted link, once proved.
    connection: Option<quinn::Connection>,
    /// A dial is under way.
    dialling: bool,
    /// No new dial before this.
    retry_at: Option<Instant>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `log` (a line about a peer not trusted) if the minute's budget
    /// allows; logs the count of the lines a past minute left out.
    fn distrust(&self, log: impl FnOnce()) {
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
                entry.rtt_ms = p.connection.as_ref().map(|c| c.rtt().as_millis().min(u32::MAX as u128) as u32);
                entry
            })
            .collect()
    }
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

struct Dialled {
    id: String,
    result: Result<quinn::Connection, String>,
}

/// An mDNS daemon on the configured interfaces.
fn mdns_daemon(cfg: &PeersConfig) -> Result<ServiceDaemon, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    let set_up = if cfg.interfaces.is_empty() {
        let _ = daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6]);
        Ok(())
    } else {
        let _ = daemon.disable_interface(IfKind::All);
        let names: Vec<IfKind> = cfg.interfaces.iter().map(|n| IfKind::Name(n.clone())).collect();
        daemon.enable_interface(names).map_err(|e| format!("mDNS interfaces: {e}"))
    };
    match set_up {
        Ok(()) => Ok(daemon),
        Err(e) => {
            let _ = daemon.shutdown();
            Err(e)
        }
    }
}

/// The daemon that browses for peers: one of its own, apart from the one
/// that advertises this device, so that it can be started afresh without
/// the goodbye a daemon sends for what it advertised. mdns-sd ends a
/// browse whose queue (1000 events) fills, as a flood of announcements
/// does; the browser is then started again.
struct Browser {
    daemon: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
}

impl Browser {
    fn start(cfg: &PeersConfig) -> Result<Self, String> {
        let daemon = mdns_daemon(cfg)?;
        match daemon.browse(SERVICE_TYPE) {
            Ok(events) => Ok(Browser { daemon, events }),
            Err(e) => {
                let _ = daemon.shutdown();
                Err(format!("mDNS browse: {e}"))
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

async fn serve(p: &PeerParams, cancel: &CancellationToken) -> Result<(), String> {
    let cfg = &p.config;
    let endpoint = endpoint(p)?;
    let port = endpoint.local_addr().map_err(|e| e.to_string())?.port();
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
    let (dialled_tx, mut dialled_rx) = mpsc::channel::<Dialled>(16);
    let mut link = p.link.clone();
    // The one period of the task (at most a second): dials due after their
    // retry time, links gone silent (quinn reports it, nothing wakes on it),
    // forgetting stale entries, the relay decision after `relay_after`, and
    // the rate-limited report. Each is a deadline over many peers; one tick
    // serves them all.
    let mut tick = tokio::time::interval(cfg.probe_interval.min(Duration::from_secs(1)));
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
                let Some(incoming) = incoming else { break Err("peer endpoint closed".into()) };
                servers.spawn(relay_server(incoming, p.clone()));
            }
            Some(_) = servers.join_next(), if !servers.is_empty() => {}
            Some(done) = dialled_rx.recv() => on_dialled(p, done),
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
                distrust_revoked(p, &identity);
                let now = fleet_id(&Fingerprint::of_der(identity.fleet_ca()));
                if now != fleet {
                    fleet = now;
                    if let Err(e) = advertise(&advertiser, &me, &fleet, port, uplink) {
                        break Err(e);
                    }
                }
            }
            _ = tick.tick() => {
                housekeeping(p, &browser.daemon, &endpoint, &dialled_tx);
                if relay.as_ref().is_some_and(|(_, stop)| stop.is_cancelled()) {
                    relay = None;
                }
                // A store that has not met the hub since it was made
                // does not know where its numbers must start (see
                // `store::resume_plan`): it waits for a direct session.
                if cfg.relay
                    && relay.is_none()
                    && !p.store.stats().fresh
                    && down_since.is_some_and(|t| t.elapsed() >= cfg.relay_after)
                    && let Some((peer, connection)) = relay_peer(&p.table)
                {
                    tracing::info!(%peer, "Uplink down: relaying the outbox through a LAN peer.");
                    let stop = cancel.child_token();
                    let span = tracing::info_span!("relay", through = %peer);
                    tokio::spawn(tracing::Instrument::instrument(
                        relay_client(p.clone(), peer.clone(), connection, stop.clone()),
                        span,
                    ));
                    relay = Some((peer, stop));
                }
                report(p, &mut reported).await;
            }
        }
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

/// (Re-)registers this device's advertisement; returns its full name.
fn advertise(mdns: &ServiceDaemon, me: &str, fleet: &str, port: u16, uplink: bool) -> Result<String, String> {
    let version = PROTOCOL_VERSION.to_string();
    let port_text = port.to_string();
    let txt = [
        (TXT_VERSION, version.as_str()),
        (TXT_FLEET, fleet),
        (TXT_PORT, port_text.as_str()),
        (TXT_UPLINK, if uplink { "up" } else { "down" }),
    ];
    let host = format!("{me}.local.");
    let info = ServiceInfo::new(SERVICE_TYPE, me, &host, "", port, &txt[..])
        .map_err(|e| format!("mDNS service: {e}"))?
        .enable_addr_auto();
    let fullname = info.get_fullname().to_owned();
    mdns.register(info).map_err(|e| format!("mDNS register: {e}"))?;
    Ok(fullname)
}

/// Takes one mDNS event into the table.
fn on_event(p: &PeerParams, me: &str, fleet: &str, event: ServiceEvent) {
    let now = Timestamp::now();
    match event {
        ServiceEvent::ServiceResolved(service) => {
            let Some(id) = service.fullname.strip_suffix(&format!(".{SERVICE_TYPE}")).map(str::to_owned) else {
                return;
            };
            if id == me {
                return;
            }
            let txt = |key: &str| service.get_property_val_str(key).map(str::to_owned);
            let their_fleet = txt(TXT_FLEET).unwrap_or_default();
            let port: u16 = txt(TXT_PORT).and_then(|p| p.parse().ok()).unwrap_or(service.port);
            let ips: Vec<IpAddr> = service.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
            let targets: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
            let mut table = p.table.lock();
            if !table.contains_key(&id) && table.len() >= p.config.max_peers {
                // Full: the newcomer takes the place of the entry least
                // worth keeping, or waits if every peer is trusted.
                let Some(out) = evictee(table.values().map(|peer| &peer.entry)).map(str::to_owned) else {
                    drop(table);
                    let id = escape(&id);
                    p.table.distrust(
                        || tracing::info!(peer = %id, "LAN peer table full of trusted peers; announcement ignored."),
                    );
                    return;
                };
                table.remove(&out);
            }
            let peer = table.entry(id.clone()).or_insert_with(|| Peer {
                entry: PeerEntry {
                    id: id.clone(),
                    addresses: Vec::new(),
                    first_seen: now,
                    last_seen: now,
                    uplink: false,
                    state: PeerState::Unverified,
                    rtt_ms: None,
                },
                fullname: service.fullname.clone(),
                targets: Vec::new(),
                connection: None,
                dialling: false,
                retry_at: None,
            });
            peer.entry.last_seen = now;
            peer.entry.addresses = targets.iter().map(ToString::to_string).collect();
            peer.entry.uplink = txt(TXT_UPLINK).as_deref() == Some("up");
            peer.targets = targets;
            if their_fleet != fleet || id.parse::<DeviceId>().is_err() {
                let new = peer.entry.state != PeerState::Foreign;
                peer.entry.state = PeerState::Foreign;
                peer.connection = None;
                drop(table);
                if new {
                    let fleet = escape(&their_fleet);
                    p.table.distrust(
                        || tracing::info!(peer = %escape(&id), %fleet, "LAN peer of another fleet (ignored)."),
                    );
                }
                return;
            }
            if matches!(peer.entry.state, PeerState::Gone | PeerState::Foreign) {
                peer.entry.state = PeerState::Unverified;
                peer.retry_at = None;
            }
        }
        ServiceEvent::ServiceRemoved(_, fullname) => {
            let mut table = p.table.lock();
            if let Some(peer) = table.values_mut().find(|peer| peer.fullname == fullname) {
                // A goodbye proves nothing (anyone can send one): a live
                // link stays until it goes silent.
                if peer.connection.as_ref().is_some_and(|c| c.close_reason().is_none()) {
                    tracing::debug!(peer = %escape(&peer.entry.id), "LAN peer withdrew its announcement; its link is alive.");
                    return;
                }
                let was = std::mem::replace(&mut peer.entry.state, PeerState::Gone);
                if let Some(c) = peer.connection.take() {
                    c.close(0u32.into(), b"peer left");
                }
                let id = escape(&peer.entry.id);
                drop(table);
                match was {
                    PeerState::Gone => {}
                    PeerState::Trusted => tracing::info!(peer = %id, "LAN peer left."),
                    _ => p.table.distrust(|| tracing::info!(peer = %id, "LAN peer left.")),
                }
            }
        }
        _ => {}
    }
}

/// Dials peers that need proving (at most `max_dials` at once), notices
/// silent links, forgets what is not trusted and was not seen for
/// `10 × gone_after`.
fn housekeeping(p: &PeerParams, mdns: &ServiceDaemon, endpoint: &quinn::Endpoint, dialled: &mpsc::Sender<Dialled>) {
    let now = Instant::now();
    let mut table = p.table.lock();
    let (wall, forget_after) = (Timestamp::now(), p.config.gone_after * 10);
    table.retain(|_, peer| peer.dialling || !forgotten(&peer.entry, wall, forget_after));
    let mut dials = table.values().filter(|peer| peer.dialling).count();
    for peer in table.values_mut() {
        if let Some(connection) = &peer.connection {
            if let Some(reason) = connection.close_reason() {
                tracing::info!(peer = %peer.entry.id, %reason, "LAN peer link lost; peer gone.");
                peer.connection = None;
                peer.entry.state = PeerState::Gone;
                // Ask the LAN; a peer that does not answer is flushed from
                // the mDNS cache, one that does is dialled again.
                let _ = mdns.verify(peer.fullname.clone(), Duration::from_secs(1));
                peer.retry_at = Some(now + p.config.probe_interval);
            } else {
                peer.entry.last_seen = Timestamp::now();
            }
            continue;
        }
        let wants_dial = matches!(peer.entry.state, PeerState::Unverified | PeerState::Untrusted { .. });
        if !wants_dial || peer.dialling || peer.retry_at.is_some_and(|t| now < t) || peer.targets.is_empty() {
            continue;
        }
        if dials >= p.config.max_dials {
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

/// Connects to a peer; the handshake proves the fleet and the device id.
async fn dial(
    endpoint: &quinn::Endpoint,
    id: &str,
    targets: &[SocketAddr],
    limit: Duration,
) -> Result<quinn::Connection, String> {
    let server_name = outpost_shared::identity::device_server_name(id);
    let mut last = String::from("no address");
    for target in targets {
        let connecting = match endpoint.connect(*target, &server_name) {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(connection)) => {
                // TLS 1.3: the server's verdict on our certificate shows on
                // the first exchange, so make one.
                match tokio::time::timeout(limit, probe(&connection)).await {
                    Ok(Ok(())) => return Ok(connection),
                    Ok(Err(e)) => last = e,
                    Err(_) => last = "no answer to the probe".into(),
                }
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no handshake within {limit:?}"),
        }
    }
    Err(last)
}

/// One round trip on a fresh stream: a heartbeat, answered by a heartbeat.
async fn probe(connection: &quinn::Connection) -> Result<(), String> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let beat = Message::Heartbeat(outpost_shared::protocol::Heartbeat { at: Timestamp::now() });
    write_message(&mut send, beat, 1024).await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv, 1024);
    match reader.next().await.map_err(|e| e.to_string())? {
        Some(env) if matches!(env.message, Message::Heartbeat(_)) => Ok(()),
        Some(env) => Err(format!("unexpected {} from the peer", env.message.kind())),
        None => Err("the peer closed the probe".into()),
    }
}

fn on_dialled(p: &PeerParams, done: Dialled) {
    let mut table = p.table.lock();
    let Some(peer) = table.get_mut(&done.id) else { return };
    peer.dialling = false;
    match done.result {
        Ok(connection) if peer.entry.state != PeerState::Foreign && peer.entry.state != PeerState::Gone => {
            tracing::info!(peer = %done.id, addr = %connection.remote_address(), "LAN peer trusted.");
            peer.entry.state = PeerState::Trusted;
            peer.entry.last_seen = Timestamp::now();
            peer.connection = Some(connection);
        }
        Ok(connection) => connection.close(0u32.into(), b"not wanted"),
        Err(reason) => {
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
fn distrust_revoked(p: &PeerParams, identity: &crate::identity::Identity) {
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

/// An announced name as it may be logged: control characters escaped (a
/// LAN stranger chooses it).
fn escape(text: &str) -> String {
    text.escape_debug().to_string()
}

/// A trusted peer that advertises an uplink, and its link.
fn relay_peer(table: &PeerTable) -> Option<(String, quinn::Connection)> {
    let table = table.lock();
    let peer = table.values().find(|p| p.entry.state == PeerState::Trusted && p.entry.uplink)?;
    Some((peer.entry.id.clone(), peer.connection.clone()?))
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

/// Sends a `PeersReport` (the bounded table) through the outbox when who is
/// there, their trust or their uplink changed: at once if the trusted peers
/// changed, otherwise at most once a minute, so churn on the LAN costs the
/// outbox little.
async fn report(p: &PeerParams, last: &mut Reported) {
    let peers = p.table.snapshot();
    let now: Vec<(String, &'static str, bool)> =
        peers.iter().map(|e| (e.id.clone(), e.state.as_str(), e.uplink)).collect();
    if now == last.peers {
        return;
    }
    let urgent = trusted(&now) != trusted(&last.peers);
    if !urgent && last.at.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
        return;
    }
    let changes =
        crate::store::Changes { records: vec![RecordBody::PeersReport(PeersReport { peers })], ..Default::default() };
    match p.store.commit(changes).await {
        Ok(_) => *last = Reported { peers: now, at: Some(Instant::now()) },
        Err(e) => tracing::warn!(error = %e, "Peer table could not be reported."),
    }
}

/// Relays this device's outbox through `peer` until `stop` or a failure.
async fn relay_client(p: PeerParams, peer: String, connection: quinn::Connection, stop: CancellationToken) {
    let result = tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = relay_batches(&p, &connection) => r,
    };
    if let Err(reason) = result {
        tracing::warn!(%peer, %reason, "Relay through the LAN peer stopped.");
    }
    stop.cancel();
}

async fn relay_batches(p: &PeerParams, connection: &quinn::Connection) -> Result<(), String> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv, p.max_frame);
    loop {
        // Signed with the key in use now (a renewal may have replaced it).
        let identity = p.identity.get();
        let signer = identity.signer().map_err(|e| e.to_string())?;
        let from = p.store.stats().acked_seq + 1;
        let next = next_batch(&p.store, &identity.device_id, &signer, from, p.max_frame).await;
        let Some((batch, last)) = next.map_err(|e| e.to_string())? else {
            // An append between the peek and this wait would go unnoticed
            // until the next one; look again after a second at most.
            let _ = tokio::time::timeout(Duration::from_secs(1), p.store.appended()).await;
            continue;
        };
        write_message(&mut send, Message::Batch(batch), p.max_frame).await.map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(p.ack_timeout, reader.next())
            .await
            .map_err(|_| format!("no acknowledgement within {:?}", p.ack_timeout))?
            .map_err(|e| e.to_string())?;
        match reply.map(|env| env.message) {
            Some(Message::Ack(Ack { upto })) if upto <= last => {
                p.store.ack(upto).await.map_err(|e| e.to_string())?;
                tracing::debug!(upto, "Relayed batch acknowledged by the hub.");
            }
            Some(Message::Ack(Ack { upto })) => return Err(format!("acknowledged {upto}, beyond what was sent")),
            Some(Message::Refused(Refusal { message, .. })) => return Err(format!("peer refused: {message}")),
            Some(other) => return Err(format!("unexpected {} from the peer", other.kind())),
            None => return Err("the peer closed the relay stream".into()),
        }
    }
}

/// Serves one peer's connection: probes are answered, batches of that peer
/// are carried to the hub while this device's uplink is connected.
async fn relay_server(incoming: quinn::Incoming, p: PeerParams) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "LAN peer handshake refused.");
            return;
        }
    };
    let peer = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|c| outpost_shared::identity::device_id_of(c)));
    let Some(peer) = peer else {
        connection.close(2u32.into(), b"certificate names no device");
        return;
    };
    let span = tracing::info_span!("peer", id = %peer);
    tracing::Instrument::instrument(serve_peer(connection, peer, p), span).await;
}

/// The streams of a trusted peer's connection, until it closes or the hub
/// revokes the peer.
async fn serve_peer(connection: quinn::Connection, peer: DeviceId, p: PeerParams) {
    use tracing::Instrument;
    let mut streams = tokio::task::JoinSet::new();
    let mut trust = p.identity.trust_changes();
    loop {
        tokio::select! {
            Ok(()) = trust.changed() => {
                if p.identity.get().is_revoked(&peer) {
                    connection.close(2u32.into(), b"revoked");
                    break;
                }
            }
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(relay_stream(send, recv, peer.clone(), p.clone()).in_current_span());
                }
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn relay_stream(mut send: quinn::SendStream, recv: quinn::RecvStream, peer: DeviceId, p: PeerParams) {
    let mut reader = FrameReader::new(recv, p.max_frame);
    loop {
        let message = match reader.next().await {
            Ok(Some(env)) => env.message,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(%peer, error = %e, "LAN peer stream closed.");
                return;
            }
        };
        let reply = match message {
            Message::Heartbeat(beat) => Message::Heartbeat(beat),
            Message::Batch(batch) if batch.origin != peer => refusal(format!("batch of {} from {peer}", batch.origin)),
            Message::Batch(_) if p.identity.get().is_revoked(&peer) => refusal("the hub revoked this device".into()),
            Message::Batch(_) if *p.link.borrow() != LinkState::Connected => refusal("no uplink here".into()),
            Message::Batch(batch) => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let request = RelayRequest { batch, reply: reply_tx };
                if p.relay_tx.send(request).await.is_err() {
                    return;
                }
                match tokio::time::timeout(p.ack_timeout, reply_rx).await {
                    Ok(Ok(Ok(upto))) => Message::Ack(Ack { upto }),
                    Ok(Ok(Err(reason))) => refusal(reason),
                    Ok(Err(_)) => refusal("the uplink session ended".into()),
                    Err(_) => refusal("the hub did not acknowledge in time".into()),
                }
            }
            other => refusal(format!("unexpected {}", other.kind())),
        };
        if write_message(&mut send, reply, p.max_frame).await.is_err() {
            return;
        }
    }
}

fn refusal(message: String) -> Message {
    Message::Refused(Refusal { reason: RefusalReason::UnexpectedMessage, message })
}

/// One QUIC endpoint for both roles: it serves peers (device certificate,
/// client certificates from the fleet CA required) and dials them
/// (verifying the fleet CA and the advertised device id).
fn endpoint(p: &PeerParams) -> Result<quinn::Endpoint, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Both sides present the certificate in use at each handshake, and
    // check the other's against the trust bundle in use (CAs, revoked
    // devices).
    let resolver = p.identity.resolver();
    let verifier = crate::tls::PeerVerifier::new(p.identity.clone()).map_err(|e| e.to_string())?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(p.config.probe_interval));
    transport.max_idle_timeout(Some(p.config.gone_after.try_into().map_err(|e| format!("gone_after: {e}"))?));
    let transport = Arc::new(transport);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).map_err(|e| e.to_string())?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).map_err(|e| e.to_string())?));
    client.transport_config(transport);
    let bind = SocketAddr::from(([0, 0, 0, 0], p.config.port));
    let mut endpoint = quinn::Endpoint::server(server, bind).map_err(|e| format!("peer endpoint on {bind}: {e}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
