//! The Outpost hub: fleet registry, enrollment CA, QUIC endpoint for agents
//! and HTTP API for fleet managers.
//!
//! Data flow: agents dial the QUIC endpoint ([`quic`]); enrollment redeems a
//! token ([`enroll`]) for a certificate from the fleet CA ([`ca`]); sessions
//! update [`fleet::Fleet`], which keeps presence in memory and facts in the
//! sled [`store`]. The HTTP API ([`http`]) reads the same `Fleet`.
//! [`client`] is the API client `outpostctl` and the demo use.

pub mod api;
pub mod client;
pub mod config;
pub mod human;
pub mod metrics;
pub mod service;
pub mod store;
pub mod transport;
pub mod web;

use crate::config::HubConfig;
use crate::service::ca::FleetCa;
use crate::service::fleet::Fleet;
use crate::service::{backups, ca, enroll};
use crate::store::{ApiToken, Role, Store, StoreConfig};
use crate::transport::quic::QuicContext;
use crate::transport::{bulk, mqtt, quic};
use crate::web::{console, http};
use outpost_shared::fsutil::write_atomic;
use outpost_shared::time::Timestamp;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Errors starting or initialising a hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The CA could not be made or loaded.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The enrollment key could not be made or read.
    #[error(transparent)]
    Token(#[from] enroll::TokenCreateError),
    /// The QUIC endpoint could not be configured.
    #[error(transparent)]
    QuicSetup(#[from] quic::QuicSetupError),
    /// The MQTT bridge could not be configured.
    #[error(transparent)]
    Mqtt(#[from] mqtt::BridgeError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HubError {
    let what = what.into();
    move |source| HubError::Io { what, source }
}

/// Initialises a data dir: fleet CA, enrollment key, sled store, and a
/// first admin API token, which is returned (and stored only as a hash).
/// Blocks: call it outside any async runtime ([`init_with`] inside one).
pub fn init(data_dir: &Path) -> Result<String, HubError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("start a runtime"))?;
    runtime.block_on(init_with(data_dir, &StoreConfig::Sled))
}

/// Initialises a data dir (fleet CA, enrollment key) and the store `store`
/// (migrated, for PostgreSQL), and stores a first admin API token, which is
/// returned. With several hubs, the first one's data dir is copied to the
/// others (see docs/SCALING.md); running this again on a database that
/// serves a fleet only adds another admin token.
pub async fn init_with(data_dir: &Path, store: &StoreConfig) -> Result<String, HubError> {
    std::fs::create_dir_all(data_dir).map_err(io(format!("create {}", data_dir.display())))?;
    FleetCa::init(data_dir)?;
    enroll::init_key(data_dir).map_err(io("write enroll.key"))?;
    let store = Store::open(store, data_dir).await?;
    let token = admin_token(&store, "initial admin".into(), None).await?;
    store.close().await?;
    Ok(token)
}

/// Stores a new admin API token named `name`, expiring at `expires_at`;
/// returns its secret (stored only as a hash).
async fn admin_token(store: &Store, name: String, expires_at: Option<Timestamp>) -> Result<String, HubError> {
    let token = service::new_secret();
    let record = ApiToken {
        role: Role::Admin,
        name,
        created_at: Timestamp::now(),
        expires_at,
        last_used: None,
        kind: crate::store::TokenKind::Api,
        made_by: None,
    };
    store.put_api_token(&service::token_hash(&token), &record).await?;
    Ok(token)
}

/// Break glass: makes an admin API token valid for `valid_for` straight in
/// the store `config` names, on the hub machine, for when no admin token is
/// left (lost, expired). With sled the hub must be stopped (the store is
/// locked while it runs); with PostgreSQL it may run. Written to the audit
/// log.
pub async fn break_glass(config: &HubConfig, valid_for: Duration) -> Result<(String, String), HubError> {
    let store = Store::open(&config.store, &config.data_dir).await?;
    let now = Timestamp::now();
    let name = format!("break-glass {}", now.rfc3339());
    let token = admin_token(&store, name.clone(), Some(now.saturating_add(valid_for))).await?;
    let entry = store::AuditEntry {
        id: 0,
        at: now,
        who: "outpost-hub admin-token (on the hub machine)".into(),
        action: "make admin token".into(),
        target: format!("token {name}"),
        matched: None,
        from: "local".into(),
        status: 201,
        detail: format!("valid for {}", humantime::format_duration(valid_for)),
    };
    store.append_audit(&entry).await?;
    store.close().await?;
    Ok((token, name))
}

/// Reads a 32-byte secret from `path`, creating it (mode 0600) if absent.
fn secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => Ok(bytes),
        Ok(_) => Err(std::io::Error::other(format!("{} is not a 32-byte key", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::fill(&mut key[..]);
            write_atomic(path, &key, 0o600)?;
            Ok(key.to_vec())
        }
        Err(e) => Err(e),
    }
}

/// A running hub.
#[derive(Debug)]
pub struct RunningHub {
    /// Where the QUIC endpoint listens.
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    quic_task: tokio::task::JoinHandle<()>,
    mqtt_task: Option<tokio::task::JoinHandle<()>>,
    maintenance_task: tokio::task::JoinHandle<()>,
    identity_task: tokio::task::JoinHandle<()>,
    admissions_task: tokio::task::JoinHandle<()>,
    wakeup_task: tokio::task::JoinHandle<()>,
    alerts_task: tokio::task::JoinHandle<()>,
    alerts_config: tokio::sync::watch::Sender<service::alerts::AlertsConfig>,
    retentions: tokio::sync::watch::Sender<Retentions>,
    http: actix_web::dev::ServerHandle,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Store,
    fleet: Arc<Fleet>,
    https: Option<Arc<web::tls::HttpsFiles>>,
}

/// Starts a hub. Must be called inside an actix System running on a tokio
/// runtime (see `outpost-hub serve`).
pub async fn start(config: &HubConfig) -> Result<RunningHub, HubError> {
    let data_dir = &config.data_dir;
    let ca = FleetCa::load(data_dir)?.with_device_lifetime(config.quic.device_cert_lifetime);
    let token_key = enroll::load_key(data_dir)?;
    let store = Store::open(&config.store, data_dir).await?;
    let backups = backups::Backups::new(data_dir, store.clone()).with_retention(config.backups.retention);
    backups.set_room(config.backups.room);
    let fleet = Arc::new(Fleet::new(
        store.clone(),
        backups,
        config.heartbeat_timeout,
        config.http.failed_auth,
        config.device_rate,
    ));

    let ca = Arc::new(ca);
    // The hub's own certificate, renewed while it runs (by `identity_task`).
    let identity = Arc::new(ca::HubIdentity::new(ca.clone(), config.quic.cert_lifetime)?);
    let server_config =
        quic::server_config(&ca, identity.clone(), fleet.admissions().clone(), config.quic.idle_timeout)?;
    // Stateless resets signed with a key that survives restarts: after a hub
    // crash, the new process tells agents at once that their connection is
    // gone, instead of leaving them to wait for the idle timeout.
    let reset_key = secret_file(&data_dir.join("quic-reset.key")).map_err(io("read or create quic-reset.key"))?;
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key);
    // MQTT tickets are MAC'd with a key from the same shared secret (see
    // `mqtt::Tickets`).
    let ticket_secret = hmac.clone();
    // Connection ids are checked with a key too; it must survive restarts
    // as well, or the new process drops old connections' packets silently
    // instead of resetting them.
    let cid_tag = ring::hmac::sign(&hmac, b"outpost connection id key");
    let cid_key = u64::from_be_bytes(cid_tag.as_ref()[..8].try_into().unwrap_or([0; 8]));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(hmac));
    // quinn sends at most one stateless reset per 20 ms by default: after a
    // restart, 10,000 devices would learn their connection is gone over
    // 200 s. A reset is always smaller than the packet that drew it (no
    // amplification) and costs one HMAC, so up to 10,000 a second.
    endpoint_config.min_reset_interval(Duration::from_micros(100));
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let socket =
        std::net::UdpSocket::bind(config.quic.listen).map_err(io(format!("bind QUIC on {}", config.quic.listen)))?;
    udp_buffers(&socket);
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
        .map_err(io(format!("start QUIC on {}", config.quic.listen)))?;
    let quic_addr = endpoint.local_addr().map_err(io("read QUIC address"))?;
    let advertise = config.quic.advertise.clone().unwrap_or_else(|| quic_addr.to_string());
    write_atomic(&data_dir.join(enroll::ADVERTISE_FILE), advertise.as_bytes(), 0o644)
        .map_err(io("record the advertised address"))?;

    let ctx = Arc::new(QuicContext {
        fleet: fleet.clone(),
        ca: ca.clone(),
        token_key,
        max_frame: config.quic.max_frame,
        bulk: bulk::Limits::new(config.device_bulk),
    });
    let shutdown = CancellationToken::new();
    let quic_task = tokio::spawn(quic::accept_loop(endpoint, ctx, config.quic.door, shutdown.clone()));
    let mqtt_task = match &config.mqtt {
        Some(mqtt) => {
            let ctx = Arc::new(mqtt::BridgeContext::new(
                fleet.clone(),
                ca,
                identity.clone(),
                config.quic.max_frame,
                config.heartbeat_timeout,
                mqtt::Tickets::new(&ticket_secret),
                mqtt.legacy_agents,
            ));
            // Fail at start on settings that cannot work (CA file, TLS).
            let task = mqtt::Bridge::new(mqtt.clone(), ctx)?;
            Some(tokio::spawn(task.run(shutdown.clone())))
        }
        None => None,
    };
    let wakeup_task = tokio::spawn(wakeups(fleet.clone(), shutdown.clone()));
    let identity_task = tokio::spawn(identity.run(shutdown.clone(), {
        let admissions = fleet.admissions().clone();
        move || admissions.trust_changed()
    }));
    let admissions_task = tokio::spawn(fleet.admissions().clone().run(store.clone(), shutdown.clone()));
    let (retentions, retentions_rx) = tokio::sync::watch::channel(Retentions::of(config));
    let maintenance_task = tokio::spawn(maintenance(fleet.clone(), retentions_rx, shutdown.clone()));

    let (alerts_config, alerts_rx) = tokio::sync::watch::channel(config.alerts.clone());
    let alerts_task = tokio::spawn(service::alerts::run(fleet.clone(), alerts_rx, shutdown.clone()));
    let routes_fleet = fleet.clone();
    let metrics_access = http::MetricsAccess { open: config.http.listen.ip().is_loopback() };
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(actix_web::web::Data::new(metrics_access))
            .configure(http::routes(routes_fleet.clone()))
            .configure(console::routes)
            .wrap(actix_web::middleware::from_fn(http::request_span))
    })
    .workers(config.http.workers)
    .disable_signals()
    .shutdown_timeout(5);
    let https = match &config.http.tls {
        Some((cert, key)) => Some(Arc::new(web::tls::HttpsFiles::open(cert, key).map_err(|e| HubError::Io {
            what: "load [http] tls_cert and tls_key".into(),
            source: std::io::Error::other(e),
        })?)),
        None => None,
    };
    let server = match &https {
        Some(files) => {
            let tls = files.server_config().map_err(|e| HubError::Io {
                what: "make the HTTPS configuration".into(),
                source: std::io::Error::other(e),
            })?;
            server.bind_rustls_0_23(config.http.listen, tls)
        }
        None => server.bind(config.http.listen),
    }
    .map_err(io(format!("bind HTTP on {}", config.http.listen)))?;
    let http_addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| HubError::Io { what: "bind HTTP".into(), source: std::io::Error::other("no address bound") })?;
    write_atomic(&data_dir.join(enroll::HTTP_ADDR_FILE), http_addr.to_string().as_bytes(), 0o644)
        .map_err(io("record the HTTP address"))?;
    let server = server.run();
    let http = server.handle();
    let http_task = tokio::spawn(server);
    tracing::info!(quic = %quic_addr, http = %http_addr, %advertise, store = store.backend(), hub = fleet.hub_id(), "Hub serving.");
    Ok(RunningHub {
        quic_addr,
        http_addr,
        shutdown,
        quic_task,
        mqtt_task,
        maintenance_task,
        identity_task,
        admissions_task,
        wakeup_task,
        alerts_task,
        alerts_config,
        retentions,
        http,
        http_task,
        store,
        fleet,
        https,
    })
}

/// The hub's `STATUS=` line. Pure: unit-tested below.
pub fn status_line(sessions: usize, store: &store::Health, dead: Option<&str>) -> String {
    let mut line = format!("{sessions} device session{}", if sessions == 1 { "" } else { "s" });
    match &store.error {
        None => line.push_str(&format!("; store ({}) ok", store.backend)),
        Some(e) => line.push_str(&format!("; ALARM store ({}) cannot make writes durable: {e}", store.backend)),
    }
    if let Some(part) = dead {
        line.push_str(&format!("; ALARM {part} stopped"));
    }
    line
}

/// How often a hub writes when it last heard from its sessions' devices
/// and looks for changes another hub made to them (the fallback behind
/// notifications).
const PRESENCE_EVERY: Duration = Duration::from_millis(500);

/// Changes made on other hubs to devices whose session is here: woken by
/// the store's notifications and, in case one was lost (or the engine has
/// no LISTEN/NOTIFY), found by polling every [`PRESENCE_EVERY`]; the
/// command table is the truth, a notification only saves time. Also writes
/// this hub's sessions' presence, so every hub answers the same.
async fn wakeups(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut notes = fleet.store().listen(fleet.hub_id(), shutdown.clone());
    let several_hubs = fleet.store().shared();
    let mut tick = tokio::time::interval(PRESENCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // This hub says it is alive to the others (their fleet indexes then
    // read what it writes: see `service::index`).
    let lease = format!("{}{}", service::index::HUB_LEASE, fleet.hub_id());
    let mut lease_taken: Option<std::time::Instant> = None;
    loop {
        let woken = async {
            match notes.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {
                if lease_taken.is_some() && let Err(e) = fleet.store().release_lease(&lease, fleet.hub_id()).await {
                    tracing::debug!(error = %e, "This hub's lease was not given back; it expires by itself.");
                }
                return;
            }
            Some(device) = woken => fleet.poke(&device),
            _ = tick.tick() => {
                let local = fleet.local_sessions();
                if let Err(e) = fleet.store().touch_sessions(fleet.hub_id(), &local).await {
                    tracing::debug!(error = %e, "Session presence not written.");
                }
                if several_hubs && lease_taken.is_none_or(|t| t.elapsed() >= service::index::RESYNC) {
                    match fleet.store().take_lease(&lease, fleet.hub_id(), service::index::HUB_LEASE_TTL).await {
                        Ok(_) => lease_taken = Some(std::time::Instant::now()),
                        Err(e) => tracing::debug!(error = %e, "This hub's lease was not renewed."),
                    }
                }
                if several_hubs {
                    let ids: Vec<_> = local.into_iter().map(|(id, _)| id).collect();
                    let since = Timestamp::now().saturating_sub(Duration::from_secs(10));
                    match fleet.store().pending_devices(&ids, since).await {
                        Ok(devices) => devices.iter().for_each(|d| fleet.poke(d)),
                        Err(e) => tracing::debug!(error = %e, "Polling for changes failed."),
                    }
                }
            }
        }
    }
}

/// How long the hub keeps telemetry and audit entries, and how often it
/// prunes backups (a watch: SIGHUP replaces them).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Retentions {
    telemetry: Duration,
    audit: Duration,
    prune_backups: Duration,
}

impl Retentions {
    fn of(config: &HubConfig) -> Self {
        Retentions {
            telemetry: config.telemetry_retention,
            audit: config.audit_retention,
            prune_backups: config.backups.prune_every,
        }
    }
}

/// Expires undelivered commands and writes the counts of refused requests
/// every second, prunes telemetry and audit
/// entries past their `retention` and expired tokens every minute, and
/// applies the backup retention every `prune_backups`, until `shutdown`.
async fn maintenance(
    fleet: Arc<Fleet>,
    retentions: tokio::sync::watch::Receiver<Retentions>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut last_backup_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                http::write_tallies(&fleet, None).await;
                return;
            }
            _ = tick.tick() => {}
        }
        http::write_tallies(&fleet, Some(std::time::Instant::now())).await;
        let now = Timestamp::now();
        let retention = *retentions.borrow();
        match fleet.store().expire_commands(now).await {
            Ok(expired) => {
                for cmd in expired {
                    tracing::info!(device = %cmd.device, command = cmd.id, "Command expired before delivery.");
                }
            }
            // A store fault is logged by the store, at a bounded rate.
            Err(e) => tracing::debug!(error = %e, "Command expiry failed."),
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            last_prune = Some(tokio::time::Instant::now());
            match service::drop_expired_tokens(&fleet).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(tokens = n, "Expired tokens removed."),
                Err(e) => tracing::debug!(error = %e, "Expired tokens not removed this time."),
            }
            match fleet.store().prune_telemetry(now.saturating_sub(retention.telemetry)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(samples = n, "Telemetry past its retention pruned."),
                Err(e) => tracing::warn!(error = %e, "Telemetry pruning failed."),
            }
            match fleet.store().prune_audit(now.saturating_sub(retention.audit)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "Audit entries past their retention pruned."),
                Err(e) => tracing::warn!(error = %e, "Audit pruning failed."),
            }
            let quiet = now.saturating_sub(transport::mqtt::NUMBERS_KEPT);
            if let Err(e) = fleet.store().prune_up_numbers(quiet).await {
                tracing::warn!(error = %e, "The numbers of quiet MQTT sessions were not pruned.");
            }
        }
        if last_backup_prune.elapsed() >= retention.prune_backups {
            last_backup_prune = tokio::time::Instant::now();
            let backups = fleet.backups().clone();
            let pruned = tokio::task::spawn_blocking(move || -> Result<(), backups::BackupStoreError> {
                for device in backups.devices()? {
                    let report = backups.prune(&device, false)?;
                    if !report.snapshots_removed.is_empty() || report.chunks_removed > 0 {
                        tracing::info!(
                            %device,
                            snapshots = report.snapshots_removed.len(),
                            chunks = report.chunks_removed,
                            bytes = report.bytes_freed,
                            "Backups past the hub's retention pruned."
                        );
                    }
                }
                Ok(())
            });
            match pruned.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Backup pruning failed."),
                Err(e) => tracing::error!(error = %e, "Backup pruning task failed."),
            }
        }
    }
}

impl RunningHub {
    /// Stops accepting, closes sessions, stops the API and flushes the store,
    /// within about `limit`.
    /// The first of its parts that ended while the hub runs (a task that
    /// panicked or returned), if any: the watchdog is not pinged then.
    pub fn dead_part(&self) -> Option<&'static str> {
        let parts: [(&'static str, bool); 8] = [
            ("HTTP server", self.http_task.is_finished()),
            ("QUIC listener", self.quic_task.is_finished()),
            ("MQTT bridge", self.mqtt_task.as_ref().is_some_and(|t| t.is_finished())),
            ("maintenance", self.maintenance_task.is_finished()),
            ("hub certificate renewal", self.identity_task.is_finished()),
            ("admissions", self.admissions_task.is_finished()),
            ("wake-ups", self.wakeup_task.is_finished()),
            ("alerts", self.alerts_task.is_finished()),
        ];
        parts.into_iter().find(|(_, ended)| *ended).map(|(name, _)| name)
    }

    /// SIGHUP: the parts of a config read again that apply without a
    /// restart: the alert rules and receivers (at the next round), the
    /// retention of telemetry, audit entries and backups, how often
    /// backups are pruned (at the next prune), and what backups may take of
    /// the disk (at the next chunk).
    pub fn reload(&self, config: &HubConfig) {
        self.alerts_config.send_replace(config.alerts.clone());
        self.retentions.send_replace(Retentions::of(config));
        self.fleet.backups().set_retention(config.backups.retention);
        self.fleet.backups().set_room(config.backups.room);
    }

    /// SIGHUP: reads the HTTPS certificate and key again (when the hub
    /// serves HTTPS); on an error the certificate in use stays.
    pub fn reload_tls(&self) {
        if let Some(files) = &self.https {
            match files.reload() {
                Ok(()) => tracing::info!("HTTPS certificate reloaded."),
                Err(e) => tracing::error!(error = %e, "HTTPS certificate not reloaded; the one in use stays."),
            }
        }
    }

    /// The line for systemd's `STATUS=`: sessions, the store's health as
    /// last seen, and a part that ended.
    pub fn status(&self) -> String {
        status_line(self.fleet.local_sessions().len(), &self.store.health(), self.dead_part())
    }

    pub async fn stop(self, limit: Duration) {
        self.shutdown.cancel();
        let stop = async {
            self.http.stop(true).await;
            let _ = self.http_task.await;
            let _ = self.quic_task.await;
            if let Some(task) = self.mqtt_task {
                let _ = task.await;
            }
            let _ = self.maintenance_task.await;
            let _ = self.identity_task.await;
            let _ = self.admissions_task.await;
            let _ = self.wakeup_task.await;
            let _ = self.alerts_task.await;
        };
        if tokio::time::timeout(limit, stop).await.is_err() {
            tracing::warn!("Hub shutdown exceeded its time limit.");
        }
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "Final store flush failed.");
        }
    }
}

/// What the hub asks of its QUIC socket's receive and send buffers: a fleet
/// reconnecting at once sends thousands of Initial packets in a moment, and
/// with the kernel's default (208 KiB) most are dropped and retried only
/// after QUIC's loss timers (1 s, then 2, 4, 8...).
pub const UDP_BUFFER: usize = 4 << 20;

/// Grows the socket's buffers to [`UDP_BUFFER`]; warns when the kernel
/// grants less (`net.core.rmem_max` / `wmem_max` cap it).
pub fn udp_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the QUIC socket's state; its buffers stay as they are.");
            return;
        }
    };
    let _ = state.set_recv_buffer_size(socket.into(), UDP_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), UDP_BUFFER);
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    // Linux reports twice what it was set to (room for its own accounting).
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        tracing::warn!(
            recv_bytes = recv,
            send_bytes = send,
            wanted = UDP_BUFFER,
            "The kernel granted the QUIC socket smaller buffers than asked: a fleet reconnecting at once may see \
             its handshakes dropped and retried. Raise net.core.rmem_max and net.core.wmem_max (sysctl) to at least \
             4194304."
        );
    } else {
        tracing::debug!(recv_bytes = recv, send_bytes = send, "QUIC socket buffers set.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_sessions_the_store_and_a_stopped_part() {
        let ok = store::Health { ok: true, backend: "sled".into(), error: None };
        assert_eq!(status_line(1, &ok, None), "1 device session; store (sled) ok");
        let full = store::Health { ok: false, backend: "sled".into(), error: Some("No space left on device".into()) };
        assert_eq!(
            status_line(3, &full, Some("QUIC listener")),
            "3 device sessions; ALARM store (sled) cannot make writes durable: No space left on device; \
             ALARM QUIC listener stopped"
        );
    }
}
