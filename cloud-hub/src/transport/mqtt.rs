//! The hub's MQTT bridge: devices whose uplink is MQTT reach the hub through
//! any broker.
//!
//! The hub is one client of the broker. It subscribes to every device's up
//! topics (as an MQTT 5 shared subscription when `shared_group` is set, so
//! several hubs split the load) and publishes to each device's down topic.
//! Topic layout and payloads are in [`outpost_shared::mqtt`].
//!
//! Messages are handed to one task per device, which keeps each device's
//! messages in order and lets devices proceed in parallel; the event loop
//! itself never waits on a device. Each message is checked before it has any
//! effect: the device named by the topic must be the one that signed it,
//! with the key of its certificate. A rejected message is logged and
//! dropped; nothing a client publishes can close another device's session.
//! Everything else is the same code as the QUIC sessions ([`crate::transport::session`]):
//! batches are ingested idempotently and acknowledged after the durable
//! write, so an agent resends what the broker lost and the hub stores it once.
//!
//! Freshness (protocol 11): every message either way is a `Fresh` inside a
//! `Signed`. Up, the hub takes a message only if no hub of the fleet took
//! its number in its session (kept in the store: [`outpost_shared::mqtt::UpNumbers`],
//! [`crate::store::Store::take_up_number`]) and, but for a `Hello`, it carries a ticket
//! this fleet's hubs made for that session within [`TICKET_LIFETIME`]
//! ([`Tickets`]); down, every message names the session it answers, counts
//! in it, and carries a new ticket. A device that has heard nothing from
//! the hub for half the lifetime gets an empty `Deliver` with a new ticket.
//! What each side remembers outlives the device's task (a device quiet for
//! a heartbeat timeout keeps its numbers). Agents before version 11 send
//! plain `Signed` messages: refused unless `[mqtt] legacy_agents = true`
//! (during an upgrade), and answered plainly.

use crate::service::ca::FleetCa;
use crate::service::fleet::{Fleet, Link};
use crate::transport::session::{self, DeviceSession, Inbound, SessionEnd, Transport, WhenFenced};
use outpost_shared::DeviceId;
use outpost_shared::mqtt::{BrokerUrl, UpKind, down_topic, parse_up_topic, up_filter};
use outpost_shared::protocol::{Deliver, Direction, Envelope, Fresh, Message, Signed};
use outpost_shared::time::Timestamp;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// `[mqtt]` of the hub's config.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// The broker.
    pub broker: BrokerUrl,
    /// PEM file with the CA that signed the broker's certificate. Default:
    /// the fleet CA.
    pub ca_file: Option<PathBuf>,
    /// User name, for brokers that check passwords. Default: none (the
    /// broker takes the name from the hub's certificate: `hub.outpost`).
    pub username: Option<String>,
    /// Password for `username`.
    pub password: Option<String>,
    /// Shared subscription group; empty for a plain subscription (one hub,
    /// or brokers without shared subscriptions). Default `outpost-hub`.
    pub shared_group: String,
    /// MQTT keep-alive. Default 30s.
    pub keep_alive: Duration,
    /// `legacy_agents`: take messages without freshness from agents older
    /// than protocol 11 (replayable; for the time of an upgrade). Default
    /// false.
    pub legacy_agents: bool,
}

/// How long a ticket lets a device's messages in: a message replayed later
/// than this is refused even by a hub that never saw its session.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(600);

/// How far ahead of this hub's clock another hub's ticket may be.
const TICKET_SKEW: Duration = Duration::from_secs(30);

/// How long the fleet keeps the numbers of a session it no longer hears
/// ([`crate::store::Store::prune_up_numbers`]): a replayed message of it is
/// older than the last one taken, so by then its ticket refuses it (a
/// minute's margin beyond the lifetime and the hubs' skew).
pub const NUMBERS_KEPT: Duration = TICKET_LIFETIME.saturating_add(TICKET_SKEW).saturating_add(Duration::from_secs(60));

/// Tickets: the hub's clock when it answered a session, MAC'd with a key
/// every hub of the fleet derives from the shared `quic-reset.key`, so any
/// of them checks what another made.
#[derive(Debug)]
pub struct Tickets {
    key: ring::hmac::Key,
}

impl Tickets {
    /// Tickets under a key derived from `secret` (the hubs' shared secret).
    pub fn new(secret: &ring::hmac::Key) -> Self {
        let derived = ring::hmac::sign(secret, b"outpost mqtt ticket key v1");
        Tickets { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()) }
    }

    fn input(device: &DeviceId, session: u64, at: Timestamp) -> Vec<u8> {
        let mut input = b"outpost ticket v1\0".to_vec();
        input.extend_from_slice(device.as_str().as_bytes());
        input.push(0);
        input.extend_from_slice(&session.to_be_bytes());
        input.extend_from_slice(&at.0.to_be_bytes());
        input
    }

    /// A ticket for `device`'s `session`, made at `now`: 8 bytes of time
    /// and 32 of MAC.
    pub fn issue(&self, device: &DeviceId, session: u64, now: Timestamp) -> Vec<u8> {
        let mut ticket = now.0.to_be_bytes().to_vec();
        ticket.extend_from_slice(ring::hmac::sign(&self.key, &Self::input(device, session, now)).as_ref());
        ticket
    }

    /// `Ok` if `ticket` was made for `device`'s `session` by a hub of this
    /// fleet within [`TICKET_LIFETIME`] before `now`; otherwise why not.
    pub fn check(&self, device: &DeviceId, session: u64, ticket: &[u8], now: Timestamp) -> Result<(), String> {
        let Some((at, tag)) = ticket.split_first_chunk::<8>() else {
            return Err("no ticket from a hub of this fleet".into());
        };
        let at = Timestamp(u64::from_be_bytes(*at));
        ring::hmac::verify(&self.key, &Self::input(device, session, at), tag)
            .map_err(|_| "its ticket is not for this session or not from a hub of this fleet".to_owned())?;
        if at.0 > now.saturating_add(TICKET_SKEW).0 {
            return Err("its ticket is from the future".into());
        }
        if at.until(now) > TICKET_LIFETIME {
            return Err(format!("its ticket is {} s old: a replay", at.until(now).as_secs()));
        }
        Ok(())
    }
}

/// What the bridge remembers of a device's sessions through the broker;
/// outlives the device's task.
#[derive(Debug, Default)]
struct Freshness {
    /// The session the device last spoke in: down messages answer it.
    session: Option<u64>,
    /// This hub's count of messages sent to that session.
    down_seq: u64,
    /// When this hub last gave that session a ticket.
    ticketed: Option<Timestamp>,
    /// The device speaks protocol 11 (down messages are `Fresh`).
    fresh: bool,
}

/// Errors setting the bridge up.
#[derive(Debug, thiserror::Error)]
#[error("MQTT bridge: {0}")]
pub struct BridgeError(String);

/// What the bridge shares with the rest of the hub.
#[derive(Debug)]
pub struct BridgeContext {
    /// Fleet state.
    pub fleet: Arc<Fleet>,
    /// The fleet CA: signs what the hub publishes.
    pub ca: Arc<FleetCa>,
    /// The hub's own certificate: its client certificate at the broker.
    pub identity: Arc<crate::service::ca::HubIdentity>,
    /// Largest envelope accepted or sent.
    pub max_frame: usize,
    /// A device's MQTT session ends after this long without a message.
    pub heartbeat_timeout: Duration,
    /// Tickets of this fleet's hubs.
    pub tickets: Tickets,
    /// This hub process's number in the `Fresh` messages it sends.
    pub sender: u64,
    /// `[mqtt] legacy_agents`.
    pub legacy_agents: bool,
    /// What each device's sessions are at (see [`Freshness`]).
    freshness: std::sync::Mutex<HashMap<DeviceId, Freshness>>,
}

impl BridgeContext {
    /// The bridge's context: `tickets` from the hubs' shared secret.
    pub fn new(
        fleet: Arc<Fleet>,
        ca: Arc<FleetCa>,
        identity: Arc<crate::service::ca::HubIdentity>,
        max_frame: usize,
        heartbeat_timeout: Duration,
        tickets: Tickets,
        legacy_agents: bool,
    ) -> Self {
        BridgeContext {
            fleet,
            ca,
            identity,
            max_frame,
            heartbeat_timeout,
            tickets,
            sender: rand::random(),
            legacy_agents,
            freshness: std::sync::Mutex::default(),
        }
    }

    fn freshness(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Freshness>> {
        self.freshness.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Messages queued per device before the bridge drops new ones (the agent
/// resends what is not acknowledged). An agent has one batch in flight.
const DEVICE_QUEUE: usize = 16;

/// A configured bridge, not yet connected.
#[derive(Debug)]
pub struct Bridge {
    config: MqttConfig,
    ctx: Arc<BridgeContext>,
    options: MqttOptions,
}

impl Bridge {
    /// Checks the settings (CA file, TLS identity) and prepares the client.
    pub fn new(config: MqttConfig, ctx: Arc<BridgeContext>) -> Result<Self, BridgeError> {
        let options = options(&config, &ctx)?;
        Ok(Bridge { config, ctx, options })
    }

    /// Connects to the broker and serves until `shutdown`; reconnects by
    /// itself.
    pub async fn run(self, shutdown: CancellationToken) {
        let Bridge { config, ctx, options } = self;
        serve(config, ctx, options, shutdown).await;
    }
}

async fn serve(config: MqttConfig, ctx: Arc<BridgeContext>, options: MqttOptions, shutdown: CancellationToken) {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let filter = match config.shared_group.as_str() {
        "" => up_filter(),
        group => format!("$share/{group}/{}", up_filter()),
    };
    let mut devices: HashMap<DeviceId, mpsc::Sender<(UpKind, Publish)>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut last_error = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(id) = done
                    && devices.get(&id).is_some_and(mpsc::Sender::is_closed)
                {
                    devices.remove(&id);
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!(broker = %config.broker, %filter, "Connected to the MQTT broker.");
                    last_error.clear();
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        warn!(error = %e, "Cannot subscribe to the up topics.");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    for code in &ack.return_codes {
                        if !matches!(code, SubscribeReasonCode::Success(_)) {
                            tracing::error!(?code, %filter, "The broker refused the subscription to the up topics.");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    route(publish, &mut devices, &mut tasks, &ctx, &client);
                }
                Ok(_) => {}
                Err(e) => {
                    let error = e.to_string();
                    if error != last_error {
                        warn!(broker = %config.broker, %error, "MQTT broker unreachable; retrying.");
                        last_error = error;
                    }
                    // The next poll reconnects; pause so a dead broker is not
                    // hammered.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    let _ = client.try_disconnect();
    // Let the disconnect go out, then stop the device tasks.
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    tasks.abort_all();
}

fn options(config: &MqttConfig, ctx: &BridgeContext) -> Result<MqttOptions, BridgeError> {
    let mut random = [0u8; 6];
    rand::fill(&mut random[..]);
    let client_id = format!("outpost-hub-{}", outpost_shared::identity::hex(&random));
    let mut options = MqttOptions::new(client_id, config.broker.host.clone(), config.broker.port);
    options.set_keep_alive(config.keep_alive);
    options.set_clean_start(true);
    options.set_max_packet_size(Some(ctx.max_frame as u32 + 4096));
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(10);
    options.set_network_options(network);
    if config.broker.tls {
        let roots = match &config.ca_file {
            Some(path) => outpost_shared::mqtt::read_pem_certs(path).map_err(BridgeError)?,
            None => ctx.ca.trusted(std::time::SystemTime::now()),
        };
        // The hub's current certificate at every (re)connection: renewed
        // while the hub runs.
        let tls =
            outpost_shared::mqtt::tls_client_config_resolved(&roots, ctx.identity.resolver()).map_err(BridgeError)?;
        options.set_transport(rumqttc::Transport::tls_with_config(tls.into()));
    }
    Ok(options)
}

/// Hands a publish to its device's task, starting one if needed. Never waits.
fn route(
    publish: Publish,
    devices: &mut HashMap<DeviceId, mpsc::Sender<(UpKind, Publish)>>,
    tasks: &mut JoinSet<DeviceId>,
    ctx: &Arc<BridgeContext>,
    client: &AsyncClient,
) {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let Some((id, kind)) = parse_up_topic(&topic) else {
        warn!(%topic, "Rejected MQTT message: not an Outpost up topic.");
        return;
    };
    let sender = devices.entry(id.clone()).or_insert_with(|| spawn_device(&id, tasks, ctx, client));
    if sender.is_closed() {
        *sender = spawn_device(&id, tasks, ctx, client);
    }
    match sender.try_send((kind, publish)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!(device = %id, %topic, "Device queue full; message dropped (the agent resends).");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            debug!(device = %id, "Device task ended while routing; message dropped (the agent resends).");
        }
    }
}

fn spawn_device(
    id: &DeviceId,
    tasks: &mut JoinSet<DeviceId>,
    ctx: &Arc<BridgeContext>,
    client: &AsyncClient,
) -> mpsc::Sender<(UpKind, Publish)> {
    let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
    let device = DeviceTask { id: id.clone(), ctx: ctx.clone(), client: client.clone(), rx, hello_session: None };
    let span = info_span!("mqtt", device = %id);
    tasks.spawn(device.run().instrument(span));
    tx
}

/// Numbers MQTT sessions so the fleet can tell them apart.
static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// The bridge's view of one device: its messages in order.
struct DeviceTask {
    id: DeviceId,
    ctx: Arc<BridgeContext>,
    client: AsyncClient,
    /// The device's messages, as the event loop routes them.
    rx: mpsc::Receiver<(UpKind, Publish)>,
    /// The session of the hello answered last, until a fresh message shows
    /// whether it was the device's.
    hello_session: Option<u64>,
}

/// A device's down topic, as a [`Transport`]: messages are signed with the
/// fleet CA's key and published.
struct MqttTransport {
    id: DeviceId,
    ctx: Arc<BridgeContext>,
    client: AsyncClient,
}

impl Transport for MqttTransport {
    async fn send(&mut self, message: Message) -> Result<(), SessionEnd> {
        let signer = self.ctx.ca.signer();
        let kind = message.kind();
        let message = {
            let mut all = self.ctx.freshness();
            match all.get_mut(&self.id) {
                Some(f) if f.fresh => {
                    let session = f.session.unwrap_or_default();
                    let now = Timestamp::now();
                    f.down_seq += 1;
                    f.ticketed = Some(now);
                    Message::Fresh(Fresh {
                        session,
                        sender: self.ctx.sender,
                        seq: f.down_seq,
                        ticket: self.ctx.tickets.issue(&self.id, session, now),
                        message: Box::new(message),
                    })
                }
                _ => message,
            }
        };
        let signed = Signed::new(Direction::Down, self.id.clone(), &message, |input| signer.sign(input));
        let payload = Envelope::new(Message::Signed(signed)).encode();
        if let Err(e) = self.client.publish(down_topic(&self.id), QoS::AtLeastOnce, false, payload).await {
            // The broker lost it; the agent asks again (it resends its hello
            // or its batch when no answer comes).
            warn!(error = %e, kind, "Cannot publish to the device.");
        }
        Ok(())
    }

    fn link(&self) -> Link {
        Link::Mqtt(SESSIONS.fetch_add(1, Ordering::Relaxed))
    }

    fn addr(&self) -> String {
        "mqtt".into()
    }

    fn hello_needs_proof(&self) -> bool {
        // A fresh hello carries no ticket: it may be an old one replayed
        // to a hub that forgot its session.
        self.ctx.freshness().get(&self.id).is_some_and(|f| f.fresh)
    }
}

impl DeviceTask {
    async fn run(mut self) -> DeviceId {
        let store = self.ctx.fleet.store().clone();
        let keys = match store.device_keys(&self.id).await {
            Ok(Some(keys)) => keys,
            Ok(None) => {
                warn!("Rejected MQTT message: no such device (or its key is unknown).");
                return self.id;
            }
            Err(e) => {
                session::log_store_error(&e, "Device key could not be read.");
                return self.id;
            }
        };
        let mut transport = MqttTransport { id: self.id.clone(), ctx: self.ctx.clone(), client: self.client.clone() };
        // One broker subscription serves every session of the device: a
        // fenced-off task stops delivering but keeps taking messages.
        let mut session = DeviceSession::new(
            self.ctx.fleet.clone(),
            self.ctx.ca.clone(),
            self.id.clone(),
            keys,
            self.ctx.max_frame,
            WhenFenced::Detach,
        );
        // Nothing is delivered before the device's first message opens a
        // session. Delivery never ends an MQTT session: publishing errors
        // are logged and a fenced session detaches.
        let end = session.serve(&mut transport, &mut self, false).await;
        if session.attached() {
            let reason = match &end {
                SessionEnd::Closed(reason) | SessionEnd::Protocol(reason) => reason.clone(),
                SessionEnd::Refused(refusal) => refusal.message.clone(),
            };
            session.end(&reason).await;
            info!(%reason, "MQTT session ended.");
        }
        self.id
    }

    /// Handles one publish: opened ([`Self::open_message`]), a hello's
    /// session proven or not, handed to the session, the ticket refreshed.
    async fn take(
        &mut self,
        kind: UpKind,
        publish: &Publish,
        session: &mut DeviceSession,
        transport: &mut MqttTransport,
    ) -> Result<bool, SessionEnd> {
        let (message, fresh) = self.open_message(kind, &publish.payload, session).await?;
        let mut new_session = false;
        match (&message, fresh) {
            (Message::Hello(_), Some(number)) => self.hello_session = Some(number),
            (_, Some(number)) if self.hello_session.is_some() => {
                if self.hello_session.take() == Some(number) {
                    new_session = session.proven(transport).await?;
                } else {
                    session.unproven();
                }
            }
            _ => {}
        }
        new_session |= session.handle(message, transport).await?;
        self.refresh_ticket(transport).await?;
        Ok(new_session)
    }

    /// The message a publish carries, once its size, envelope, topic and
    /// signature check out, with the session it is fresh in (`None` for an
    /// agent before protocol 11).
    /// Sends the device a new ticket (an empty `Deliver`) if this hub gave
    /// its session none for half of [`TICKET_LIFETIME`].
    async fn refresh_ticket(&self, transport: &mut MqttTransport) -> Result<(), SessionEnd> {
        let due =
            self.ctx.freshness().get(&self.id).is_some_and(|f| {
                f.fresh && f.ticketed.is_none_or(|at| at.until(Timestamp::now()) >= TICKET_LIFETIME / 2)
            });
        if due {
            transport.send(Message::Deliver(Deliver { commands: Vec::new(), desired: None })).await?;
        }
        Ok(())
    }

    async fn open_message(
        &self,
        kind: UpKind,
        payload: &[u8],
        session: &mut DeviceSession,
    ) -> Result<(Message, Option<u64>), SessionEnd> {
        if payload.len() > self.ctx.max_frame {
            return Err(SessionEnd::Protocol(format!("{} bytes exceed the frame limit", payload.len())));
        }
        let message = Envelope::decode(payload).map_err(|e| SessionEnd::Protocol(e.to_string()))?.message;
        let (message, fresh) = match (kind, message) {
            (UpKind::Batch, Message::Batch(batch)) => (self.legacy(Message::Batch(batch))?, None),
            (UpKind::Relay, Message::Relay(batch)) => (self.legacy(Message::Relay(batch))?, None),
            (_, Message::Signed(signed)) => match self.open(&signed, session).await? {
                Message::Fresh(fresh) => {
                    let number = fresh.session;
                    (self.admit(fresh).await?, Some(number))
                }
                plain => (self.legacy(plain)?, None),
            },
            (_, other) => {
                return Err(SessionEnd::Protocol(format!("expected a Signed message, got {}", other.kind())));
            }
        };
        if UpKind::of(&message) != Some(kind) {
            return Err(SessionEnd::Protocol(format!("a {} on the {} topic", message.kind(), kind.as_str())));
        }
        Ok((message, fresh))
    }

    /// The message inside `signed`, if the device signed it.
    async fn open(&self, signed: &Signed, session: &mut DeviceSession) -> Result<Message, SessionEnd> {
        if signed.device != self.id {
            return Err(SessionEnd::Protocol(format!("message of device {} on {}'s topic", signed.device, self.id)));
        }
        if !session.verify(|key| signed.verify(Direction::Up, key)).await? {
            return Err(SessionEnd::Protocol("signature does not verify with the device's certificate".into()));
        }
        signed.message().map_err(|e| SessionEnd::Protocol(e.to_string()))
    }

    /// The message of a `Fresh`, if it is fresh: its ticket (but for a
    /// `Hello`) and its number in its session, taken once for the whole
    /// fleet ([`crate::store::Store::take_up_number`]). When the store
    /// cannot say, the message is not processed (the agent resends).
    async fn admit(&self, fresh: Fresh) -> Result<Message, SessionEnd> {
        let stale = |why: String| SessionEnd::Protocol(format!("stale message ({}): {why}", fresh.message.kind()));
        let now = Timestamp::now();
        if !matches!(*fresh.message, Message::Hello(_)) {
            self.ctx.tickets.check(&self.id, fresh.session, &fresh.ticket, now).map_err(stale)?;
        }
        match self.ctx.fleet.store().take_up_number(&self.id, fresh.session, fresh.seq, now).await {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => return Err(stale(refused.to_string())),
            Err(e) => return Err(SessionEnd::Closed(format!("its number could not be taken: {e}"))),
        }
        let mut all = self.ctx.freshness();
        let f = all.entry(self.id.clone()).or_default();
        if f.session != Some(fresh.session) {
            f.session = Some(fresh.session);
            f.ticketed = None;
        }
        f.fresh = true;
        Ok(*fresh.message)
    }

    /// A message without freshness (an agent before protocol 11): taken
    /// only with `[mqtt] legacy_agents = true`.
    fn legacy(&self, message: Message) -> Result<Message, SessionEnd> {
        if !self.ctx.legacy_agents {
            return Err(SessionEnd::Protocol(format!(
                "a {} without freshness (an agent before protocol 11; it could be a replay): upgrade the agent, \
                 or set [mqtt] legacy_agents = true while agents are upgraded",
                message.kind()
            )));
        }
        self.ctx.freshness().entry(self.id.clone()).or_default().fresh = false;
        Ok(message)
    }
}

/// A device's up topics, as the session's inbound side: a message that
/// does not check out is logged and dropped, and the session goes on.
impl Inbound<MqttTransport> for DeviceTask {
    type Item = (UpKind, Publish);

    async fn next(&mut self) -> Result<(UpKind, Publish), SessionEnd> {
        match tokio::time::timeout(self.ctx.heartbeat_timeout, self.rx.recv()).await {
            Ok(Some(item)) => Ok(item),
            Ok(None) => Err(SessionEnd::Closed("the hub's MQTT bridge stopped".into())),
            Err(_) => Err(SessionEnd::Closed("timed out: no message within the heartbeat timeout".into())),
        }
    }

    async fn handle(
        &mut self,
        (kind, publish): (UpKind, Publish),
        session: &mut DeviceSession,
        transport: &mut MqttTransport,
    ) -> Result<bool, SessionEnd> {
        if self.ctx.fleet.admissions().revoked(&self.id) {
            // Logged once, at the revocation; a stolen device's traffic
            // costs no more than this lookup.
            debug!("Dropped a message of a revoked device.");
            return Ok(false);
        }
        match self.take(kind, &publish, session, transport).await {
            Ok(new_session) => return Ok(new_session),
            Err(SessionEnd::Protocol(reason)) => {
                warn!(topic = %String::from_utf8_lossy(&publish.topic), %reason, "Rejected MQTT message.");
            }
            Err(SessionEnd::Refused(refusal)) => warn!(message = %refusal.message, "Session refused."),
            Err(SessionEnd::Closed(reason)) => debug!(%reason, "MQTT message not processed; the agent resends."),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_hold_for_their_session_and_lifetime_on_every_hub_of_the_fleet() {
        let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"fleet secret");
        let (here, there) = (Tickets::new(&secret), Tickets::new(&secret));
        let device: DeviceId = "dev-01".parse().unwrap_or_else(|_| unreachable!());
        let now = Timestamp(1_000_000_000);
        let ticket = here.issue(&device, 7, now);
        assert_eq!(there.check(&device, 7, &ticket, now), Ok(()), "another hub of the fleet takes it");
        assert_eq!(there.check(&device, 7, &ticket, now.saturating_add(TICKET_LIFETIME)), Ok(()));
        let late = there.check(&device, 7, &ticket, now.saturating_add(TICKET_LIFETIME + Duration::from_secs(1)));
        assert!(late.is_err_and(|e| e.contains("a replay")), "an old session's message after the lifetime");
        assert!(there.check(&device, 8, &ticket, now).is_err(), "another session");
        let other: DeviceId = "dev-02".parse().unwrap_or_else(|_| unreachable!());
        assert!(there.check(&other, 7, &ticket, now).is_err(), "another device");
        let stranger = Tickets::new(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another fleet"));
        assert!(stranger.check(&device, 7, &ticket, now).is_err(), "another fleet");
        let future = here.issue(&device, 7, now.saturating_add(Duration::from_secs(60)));
        assert!(there.check(&device, 7, &future, now).is_err_and(|e| e.contains("future")));
        let mut forged = ticket.clone();
        forged[7] ^= 1;
        assert!(there.check(&device, 7, &forged, now).is_err(), "a changed time");
        for garbage in [&[][..], &[1, 2, 3], &ticket[..20]] {
            assert!(there.check(&device, 7, garbage, now).is_err());
        }
    }
}
