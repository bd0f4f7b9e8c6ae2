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
//! Everything else is the same code as the QUIC sessions ([`crate::session`]):
//! batches are ingested idempotently and acknowledged after the durable
//! write, so an agent resends what the broker lost and the hub stores it once.

use crate::ca::FleetCa;
use crate::fleet::{Fleet, Link};
use crate::session::{self, MAX_COMMANDS_PER_DELIVERY, Outbound, SessionEnd};
use outpost_shared::DeviceId;
use outpost_shared::mqtt::{BrokerUrl, UpKind, down_topic, parse_up_topic, up_filter};
use outpost_shared::protocol::{Direction, Envelope, Message, Signed};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
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
    /// Largest envelope accepted or sent.
    pub max_frame: usize,
    /// A device's MQTT session ends after this long without a message.
    pub heartbeat_timeout: Duration,
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
            None => vec![ctx.ca.cert_der().clone()],
        };
        let (chain, key) = ctx.ca.hub_identity().map_err(|e| BridgeError(e.to_string()))?;
        let tls = outpost_shared::mqtt::tls_client_config(&roots, chain, key).map_err(BridgeError)?;
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
    let device = DeviceTask {
        id: id.clone(),
        ctx: ctx.clone(),
        client: client.clone(),
        link: None,
        downlink: Arc::new(Notify::new()),
        outbound: Outbound::default(),
    };
    let span = info_span!("mqtt", device = %id);
    tasks.spawn(device.run(rx).instrument(span));
    tx
}

/// Numbers MQTT sessions so the fleet can tell them apart.
static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// The bridge's view of one device: its messages in order, its downlink.
struct DeviceTask {
    id: DeviceId,
    ctx: Arc<BridgeContext>,
    client: AsyncClient,
    /// The fleet's session, once a valid message arrived.
    link: Option<Link>,
    downlink: Arc<Notify>,
    outbound: Outbound,
}

impl DeviceTask {
    async fn run(mut self, mut rx: mpsc::Receiver<(UpKind, Publish)>) -> DeviceId {
        let store = self.ctx.fleet.store().clone();
        let key = match store.device_key(&self.id).await {
            Ok(Some(key)) => key,
            Ok(None) => {
                warn!("Rejected MQTT message: no such device (or its key is unknown).");
                return self.id;
            }
            Err(e) => {
                session::log_store_error(&e, "Device key could not be read.");
                return self.id;
            }
        };
        let mut check_downlink = false;
        loop {
            if check_downlink {
                check_downlink = false;
                let pending = match self.outbound.pending(&store, &self.id, self.ctx.max_frame / 2).await {
                    Ok(pending) => pending,
                    Err(end) => {
                        // Another session (QUIC, or another hub) holds the
                        // device now: stop delivering, keep ingesting.
                        debug!(?end, "MQTT session fenced off.");
                        if let Some(link) = self.link.take() {
                            self.ctx.fleet.disconnected(&self.id, &link);
                        }
                        None
                    }
                };
                if let Some(deliver) = pending {
                    check_downlink = deliver.commands.len() >= MAX_COMMANDS_PER_DELIVERY;
                    self.publish(Message::Deliver(deliver)).await;
                    continue;
                }
            }
            let downlink = self.downlink.clone();
            let next = tokio::select! {
                () = downlink.notified() => {
                    check_downlink = true;
                    continue;
                }
                next = tokio::time::timeout(self.ctx.heartbeat_timeout, rx.recv()) => next,
            };
            let Ok(Some((kind, publish))) = next else {
                break;
            };
            match self.handle(kind, &publish.payload, &key).await {
                Ok(deliver) => check_downlink |= deliver,
                Err(SessionEnd::Protocol(reason)) => {
                    warn!(topic = %String::from_utf8_lossy(&publish.topic), %reason, "Rejected MQTT message.");
                }
                Err(SessionEnd::Refused(refusal)) => {
                    warn!(message = %refusal.message, "Session refused.");
                    self.publish(Message::Refused(refusal)).await;
                }
                Err(SessionEnd::Closed(reason)) => debug!(%reason, "MQTT message not processed; the agent resends."),
            }
        }
        if let Some(link) = &self.link {
            self.ctx.fleet.disconnected(&self.id, link);
            info!("MQTT session ended (no message within the heartbeat timeout).");
        }
        self.id
    }

    /// Checks and applies one message. Returns true if the downlink should
    /// be checked for something to deliver.
    async fn handle(&mut self, kind: UpKind, payload: &[u8], key: &[u8]) -> Result<bool, SessionEnd> {
        if payload.len() > self.ctx.max_frame {
            return Err(SessionEnd::Protocol(format!("{} bytes exceed the frame limit", payload.len())));
        }
        let message = Envelope::decode(payload).map_err(|e| SessionEnd::Protocol(e.to_string()))?.message;
        let message = match (kind, message) {
            (UpKind::Batch, Message::Batch(batch)) => Message::Batch(batch),
            (UpKind::Relay, Message::Relay(batch)) => Message::Relay(batch),
            (UpKind::Batch | UpKind::Relay, other) => {
                return Err(SessionEnd::Protocol(format!("expected a {}, got {}", kind.as_str(), other.kind())));
            }
            (_, Message::Signed(signed)) => self.open(kind, &signed, key)?,
            (_, other) => return Err(SessionEnd::Protocol(format!("expected a Signed message, got {}", other.kind()))),
        };
        let store = self.ctx.fleet.store().clone();
        let mut hello_now = false;
        match message {
            Message::Batch(batch) => {
                // Checks origin and signature before anything is stored.
                let ack = session::ingest(&store, &self.id, key, batch).await?;
                self.attach(false).await;
                self.publish(Message::Ack(ack)).await;
            }
            Message::Hello(hello) => {
                let welcome = session::hello(&store, &self.id, &hello, "mqtt").await?;
                info!(name = %hello.name, version = %hello.agent_version, resume_after = welcome.acked_seq, "MQTT session opened.");
                self.attach(true).await;
                hello_now = true;
                self.publish(Message::Welcome(welcome)).await;
            }
            Message::Relay(batch) => {
                // The batch carries its origin's signature; the carrier is
                // the topic's device.
                let ack = session::relay(&store, &self.id, batch).await?;
                self.attach(false).await;
                self.publish(Message::RelayAck(ack)).await;
            }
            Message::Heartbeat(_) => self.attach(false).await,
            Message::Received(received) => {
                self.attach(false).await;
                session::received(&store, &self.id, received.commands).await;
            }
            other => return Err(SessionEnd::Protocol(format!("unexpected {}", other.kind()))),
        }
        self.ctx.fleet.seen(&self.id);
        Ok(hello_now)
    }

    /// The message inside `signed`, if this device signed it for this topic.
    fn open(&self, kind: UpKind, signed: &Signed, key: &[u8]) -> Result<Message, SessionEnd> {
        if signed.device != self.id {
            return Err(SessionEnd::Protocol(format!("message of device {} on {}'s topic", signed.device, self.id)));
        }
        if !signed.verify(Direction::Up, key) {
            return Err(SessionEnd::Protocol("signature does not verify with the device's certificate".into()));
        }
        let message = signed.message().map_err(|e| SessionEnd::Protocol(e.to_string()))?;
        if UpKind::of(&message) != Some(kind) {
            return Err(SessionEnd::Protocol(format!("a {} on the {} topic", message.kind(), kind.as_str())));
        }
        Ok(message)
    }

    /// Makes this task the device's session in the fleet: at each hello (a
    /// new session: everything pending is offered again), or at the first
    /// valid message of a device whose hello went to an earlier hub process
    /// or came while its QUIC session was still open (see
    /// [`Fleet::connected`]; each later message tries again).
    async fn attach(&mut self, hello: bool) {
        if !hello && self.link.is_some() {
            // Attached already, or another session took over since (the
            // device moved to QUIC): nothing to do, and no competing.
            return;
        }
        let link = Link::Mqtt(SESSIONS.fetch_add(1, Ordering::Relaxed));
        let Some(downlink) = self.ctx.fleet.connected(&self.id, link.clone()) else {
            debug!("The device's QUIC session is still open; deliveries wait for it to end.");
            return;
        };
        let epoch = match self.ctx.fleet.claim(&self.id, &link).await {
            Ok(epoch) => epoch,
            Err(e) => {
                session::log_store_error(&e, "Session could not be recorded.");
                self.ctx.fleet.disconnected(&self.id, &link);
                return;
            }
        };
        self.downlink = downlink;
        self.link = Some(link);
        self.outbound = Outbound::new(self.ctx.fleet.hub_id(), epoch);
        if !hello {
            self.downlink.notify_one();
        }
    }

    /// Publishes `message` to the device, signed with the fleet CA's key.
    async fn publish(&self, message: Message) {
        let signer = self.ctx.ca.signer();
        let signed = Signed::new(Direction::Down, self.id.clone(), &message, |input| signer.sign(input));
        let payload = Envelope::new(Message::Signed(signed)).encode();
        if let Err(e) = self.client.publish(down_topic(&self.id), QoS::AtLeastOnce, false, payload).await {
            warn!(error = %e, kind = message.kind(), "Cannot publish to the device.");
        }
    }
}
