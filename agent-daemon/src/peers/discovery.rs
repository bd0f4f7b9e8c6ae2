//! Discovery: this device's mDNS announcement, and the browse that feeds
//! the peer table. What an announcement says is a claim; only the link's
//! handshake proves it (see [`super::link`]).

use super::table::Peer;
use super::{PeerError, PeerParams, escape};
use crate::config::PeersConfig;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use outpost_shared::DeviceId;
use outpost_shared::peers::{
    PeerEntry, PeerState, SERVICE_TYPE, TXT_FLEET, TXT_PORT, TXT_UPLINK, TXT_VERSION, evictee,
};
use outpost_shared::protocol::PROTOCOL_VERSION;
use outpost_shared::time::Timestamp;
use std::net::{IpAddr, SocketAddr};

/// An mDNS daemon on the configured interfaces.
pub(super) fn mdns_daemon(cfg: &PeersConfig) -> Result<ServiceDaemon, PeerError> {
    let daemon = ServiceDaemon::new().map_err(|source| PeerError::Mdns { step: "daemon", source })?;
    let set_up = if cfg.interfaces.is_empty() {
        let _ = daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6]);
        Ok(())
    } else {
        let _ = daemon.disable_interface(IfKind::All);
        let names: Vec<IfKind> = cfg.interfaces.iter().map(|n| IfKind::Name(n.clone())).collect();
        daemon.enable_interface(names).map_err(|source| PeerError::Mdns { step: "interfaces", source })
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
pub(super) struct Browser {
    pub(super) daemon: ServiceDaemon,
    pub(super) events: mdns_sd::Receiver<ServiceEvent>,
}

impl Browser {
    pub(super) fn start(cfg: &PeersConfig) -> Result<Self, PeerError> {
        let daemon = mdns_daemon(cfg)?;
        match daemon.browse(SERVICE_TYPE) {
            Ok(events) => Ok(Browser { daemon, events }),
            Err(e) => {
                let _ = daemon.shutdown();
                Err(PeerError::Mdns { step: "browse", source: e })
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// (Re-)registers this device's advertisement; returns its full name.
pub(super) fn advertise(
    mdns: &ServiceDaemon,
    me: &str,
    fleet: &str,
    port: u16,
    uplink: bool,
) -> Result<String, PeerError> {
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
        .map_err(|source| PeerError::Mdns { step: "service", source })?
        .enable_addr_auto();
    let fullname = info.get_fullname().to_owned();
    mdns.register(info).map_err(|source| PeerError::Mdns { step: "register", source })?;
    Ok(fullname)
}

/// Takes one mDNS event into the table.
pub(super) fn on_event(p: &PeerParams, me: &str, fleet: &str, event: ServiceEvent) {
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
                if let Some(c) = peer.connection.take() {
                    c.close(0u32.into(), b"foreign");
                }
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
