//! The MQTT transport: the hub is reached through a broker (MQTT 3.1.1, so
//! any broker will do). Topic layout and payloads are in
//! [`outpost_shared::mqtt`]; the session on top is the same as over QUIC.
//!
//! The broker proves nothing about who publishes, so every message carries
//! a signature: up messages a `Signed` wrapper made with the device key
//! (batches keep their own inside it), and down messages are accepted only
//! if signed with the fleet CA's key for this device. The broker can also
//! replay what it carried, so every message is a `Fresh` (protocol 11):
//! this connection draws a random session number, numbers what it sends
//! and sends the newest ticket the hub gave it; a down message must name
//! this session with a number its hub process has not used
//! ([`DownWindow`]). A down message that fails a check is logged and
//! ignored.
//!
//! One batch is in flight at a time: a broker may hand a device's messages
//! to different hubs (shared subscription), and sending the next batch only
//! after the hub acknowledged the previous one keeps them in order whoever
//! ingests them.

use super::session::{self, Channel};
use super::{LinkError, LinkParams};
use crate::config::MqttConfig;
use outpost_shared::DeviceId;
use outpost_shared::identity::{Signer, public_key_of};
use outpost_shared::mqtt::{DownWindow, UpKind, down_topic, up_topic};
use outpost_shared::protocol::{Direction, Envelope, Fresh, Message, Signed};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use std::time::Duration;
use tokio::sync::mpsc;

/// Batches sent but not yet acknowledged (see the module documentation).
pub const WINDOW: usize = 1;

/// A session through the broker; remembers whether the hub welcomed it.
#[derive(Debug)]
pub struct Session {
    config: MqttConfig,
    connected: bool,
    client: Option<AsyncClient>,
    pump: Option<tokio::task::JoinHandle<()>>,
}

/// What the event loop task reports.
#[derive(Debug)]
enum Pumped {
    /// The broker accepted the subscription to the down topic.
    Subscribed,
    /// A message on the down topic.
    Down(bytes::Bytes),
    /// The connection failed; the task has ended.
    Failed(String),
}

impl Session {
    /// A session with the broker in `config`.
    pub fn new(config: MqttConfig) -> Self {
        Session { config, connected: false, client: None, pump: None }
    }

    /// True if the hub welcomed this session.
    pub fn was_connected(&self) -> bool {
        self.connected
    }

    /// Disconnects politely, waiting at most one second.
    pub async fn close(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.try_disconnect();
        }
        if let Some(mut pump) = self.pump.take()
            && tokio::time::timeout(Duration::from_secs(1), &mut pump).await.is_err()
        {
            pump.abort();
        }
    }

    /// Connects to the broker and serves the session until it fails.
    pub async fn run(&mut self, p: &LinkParams) -> Result<(), LinkError> {
        let cfg = &p.config;
        let id = &p.identity.device_id;
        // The hub signs with the key of the CA that authenticates it: the
        // previous one during a CA rotation's overlap, the new one after.
        let ca_keys: Vec<Vec<u8>> = p.identity.cas.iter().filter_map(|ca| public_key_of(ca)).collect();
        if ca_keys.is_empty() {
            return Err(LinkError::Protocol("the fleet CA certificate has no public key".into()));
        }
        let (client, mut eventloop) = AsyncClient::new(self.options(p)?, 16);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(network);
        let down = down_topic(id);
        let (tx, mut rx) = mpsc::channel(64);
        self.pump = Some(tokio::spawn(pump(eventloop, tx, down.clone())));
        self.client = Some(client.clone());
        client.subscribe(down, QoS::AtLeastOnce).await.map_err(|e| LinkError::Mqtt(e.to_string()))?;
        let subscribed = async {
            match rx.recv().await {
                Some(Pumped::Subscribed) => Ok(()),
                Some(Pumped::Failed(reason)) => Err(LinkError::Mqtt(reason)),
                Some(Pumped::Down(_)) | None => Err(LinkError::Mqtt("broker connection ended".into())),
            }
        };
        tokio::time::timeout(cfg.connect_timeout, subscribed)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        tracing::debug!(broker = %self.config.broker, "Subscribed at the MQTT broker.");
        let signer = p.identity.signer().map_err(|e| LinkError::Protocol(format!("cannot sign: {e}")))?;
        let mut channel = MqttChannel {
            id: id.clone(),
            client,
            rx,
            signer,
            ca_keys,
            max_frame: cfg.max_frame,
            window: DownWindow::new(rand::random()),
            sent: 0,
            ticket: Vec::new(),
        };
        session::serve(p, &mut channel, WINDOW, &mut self.connected).await
    }

    fn options(&self, p: &LinkParams) -> Result<MqttOptions, LinkError> {
        let broker = &self.config.broker;
        let mut options = MqttOptions::new(p.identity.device_id.as_str(), broker.host.clone(), broker.port);
        options.set_keep_alive(self.config.keep_alive);
        options.set_clean_session(true);
        let max_packet = p.config.max_frame + 4096;
        options.set_max_packet_size(max_packet, max_packet);
        if broker.tls {
            let roots = match &self.config.ca_file {
                Some(path) => outpost_shared::mqtt::read_pem_certs(path).map_err(LinkError::Mqtt)?,
                None => p.identity.cas.clone(),
            };
            let chain = vec![p.identity.cert.clone()];
            let tls = outpost_shared::mqtt::tls_client_config(&roots, chain, p.identity.key())
                .map_err(|e| LinkError::Mqtt(format!("TLS: {e}")))?;
            options.set_transport(rumqttc::Transport::tls_with_config(tls.into()));
        }
        Ok(options)
    }
}

/// Polls the event loop (which also sends what the client queued) until
/// the connection fails, reporting what the session needs.
async fn pump(mut eventloop: rumqttc::EventLoop, tx: mpsc::Sender<Pumped>, down: String) {
    loop {
        let report = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                match ack.return_codes.iter().find(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    Some(_) => Pumped::Failed("the broker refused the subscription to the down topic".into()),
                    None => Pumped::Subscribed,
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == down => Pumped::Down(publish.payload),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                tracing::warn!(topic = %publish.topic, "Ignored a message on a topic not subscribed to.");
                continue;
            }
            Ok(_) => continue,
            Err(e) => Pumped::Failed(e.to_string()),
        };
        let failed = matches!(report, Pumped::Failed(_));
        if tx.send(report).await.is_err() || failed {
            return;
        }
    }
}

struct MqttChannel {
    id: DeviceId,
    client: AsyncClient,
    rx: mpsc::Receiver<Pumped>,
    signer: Signer,
    /// The public keys of the CAs the device trusts.
    ca_keys: Vec<Vec<u8>>,
    max_frame: usize,
    /// This connection's session and what it took of each hub process.
    window: DownWindow,
    /// Messages sent in the session.
    sent: u64,
    /// The newest ticket a hub gave this session (empty until the Welcome).
    ticket: Vec<u8>,
}

impl MqttChannel {
    /// The message inside a down payload, if the hub signed it for us.
    fn open(&mut self, payload: &[u8]) -> Result<Message, String> {
        if payload.len() > self.max_frame {
            return Err(format!("{} bytes exceed the frame limit", payload.len()));
        }
        let signed = match Envelope::decode(payload).map_err(|e| e.to_string())?.message {
            Message::Signed(signed) => signed,
            other => return Err(format!("expected a Signed message, got {}", other.kind())),
        };
        if signed.device != self.id {
            return Err(format!("message for device {}", signed.device));
        }
        if !self.ca_keys.iter().any(|key| signed.verify(Direction::Down, key)) {
            return Err("signature does not verify with the fleet CA's key".into());
        }
        let fresh = match signed.message().map_err(|e| e.to_string())? {
            Message::Fresh(fresh) => fresh,
            other => {
                return Err(format!(
                    "a {} without freshness (a hub before protocol 11, or a replay); upgrade the hub",
                    other.kind()
                ));
            }
        };
        self.window
            .admit(fresh.session, fresh.sender, fresh.seq)
            .map_err(|e| format!("stale {}: {e}", fresh.message.kind()))?;
        if !fresh.ticket.is_empty() {
            self.ticket = fresh.ticket;
        }
        Ok(*fresh.message)
    }
}

impl Channel for MqttChannel {
    async fn send(&mut self, message: Message) -> Result<(), LinkError> {
        let kind = UpKind::of(&message)
            .ok_or_else(|| LinkError::Protocol(format!("a {} cannot be sent over MQTT", message.kind())))?;
        self.sent += 1;
        let fresh = Message::Fresh(Fresh {
            session: self.window.session(),
            sender: 0,
            seq: self.sent,
            ticket: self.ticket.clone(),
            message: Box::new(message),
        });
        let signed = Signed::new(Direction::Up, self.id.clone(), &fresh, |input| self.signer.sign(input));
        let payload = Envelope::new(Message::Signed(signed)).encode();
        self.client
            .publish(up_topic(&self.id, kind), QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| LinkError::Mqtt(e.to_string()))
    }

    /// The broker knows one connection per client id: the session ends and
    /// the next connection presents the renewed certificate.
    async fn prove(&mut self, _p: &LinkParams, _next: &crate::identity::Identity) -> Result<bool, LinkError> {
        Ok(false)
    }

    async fn recv(&mut self) -> Result<Option<Message>, LinkError> {
        loop {
            match self.rx.recv().await {
                None => return Err(LinkError::Mqtt("broker connection ended".into())),
                Some(Pumped::Failed(reason)) => return Err(LinkError::Mqtt(reason)),
                Some(Pumped::Subscribed) => {}
                Some(Pumped::Down(payload)) => match self.open(&payload) {
                    Ok(message) => return Ok(Some(message)),
                    Err(reason) => tracing::warn!(%reason, "Ignored a down message that is not the hub's."),
                },
            }
        }
    }
}
