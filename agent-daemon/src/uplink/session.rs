//! A session with the hub, whatever carries it: hello/welcome, then until
//! something fails: outbox batches out (up to a window of unacknowledged
//! ones), trimmed as the hub acknowledges them; deliveries in, persisted
//! before `Received` goes back; heartbeats.
//!
//! The transports ([`super::quic`], [`super::mqtt`]) only move messages;
//! they implement [`Channel`].

use super::{LinkError, LinkParams, LinkState};
use outpost_shared::DeviceId;
use outpost_shared::protocol::{Batch, Heartbeat, Hello, Message, Received, Refusal};
use outpost_shared::time::Timestamp;
use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use tokio::sync::oneshot;

/// Records per batch.
pub const BATCH_RECORDS: usize = 2000;

/// The next signed batch of this device's outbox from `from` (at most
/// [`BATCH_RECORDS`] records, within `max_frame`), and its last sequence
/// number; `None` when nothing is waiting. The direct session and the LAN
/// relay both send what this makes.
pub async fn next_batch(
    store: &crate::store::AgentStore,
    device: &DeviceId,
    signer: &outpost_shared::identity::Signer,
    from: u64,
    max_frame: usize,
) -> Result<Option<(Batch, u64)>, LinkError> {
    let max_bytes = max_frame.saturating_sub(4096).max(1024);
    let s = store.clone();
    let records = tokio::task::spawn_blocking(move || s.peek(from, BATCH_RECORDS, max_bytes))
        .await
        .map_err(|e| LinkError::Protocol(format!("outbox read task failed: {e}")))??;
    let Some(last) = records.last().map(|r| r.seq) else { return Ok(None) };
    Ok(Some((Batch::new(device.clone(), &records, |input| signer.sign(input)), last)))
}

/// Relayed batches (of different peers) in flight at once.
const MAX_RELAYED: usize = 8;

/// Moves messages between the session and the hub.
pub trait Channel {
    /// Sends one message to the hub.
    fn send(&mut self, message: Message) -> impl Future<Output = Result<(), LinkError>>;
    /// The next message from the hub; `None` once the hub ended the session.
    /// Must be cancel-safe: the session selects on it.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Message>, LinkError>>;
}

fn started_at() -> Timestamp {
    static STARTED: OnceLock<Timestamp> = OnceLock::new();
    *STARTED.get_or_init(Timestamp::now)
}

/// Serves a session over `channel` with at most `window` batches
/// unacknowledged. Sets `connected` once the hub welcomed us.
pub async fn serve(
    p: &LinkParams,
    channel: &mut impl Channel,
    window: usize,
    connected: &mut bool,
) -> Result<(), LinkError> {
    let cfg = &p.config;
    let hello =
        Hello { agent_version: env!("CARGO_PKG_VERSION").into(), name: p.name.clone(), started_at: started_at() };
    channel.send(Message::Hello(hello)).await?;
    // With TLS 1.3 the client finishes first: a hub that rejects our
    // certificate shows it here, on the first exchange.
    let reply = tokio::time::timeout(cfg.connect_timeout, channel.recv())
        .await
        .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
    let (acked, hub_clock) = match reply {
        Some(Message::Welcome(welcome)) if welcome.device_id == p.identity.device_id => {
            (welcome.acked_seq, crate::inbox::HubClock::new(welcome.server_time))
        }
        Some(Message::Welcome(welcome)) => {
            return Err(LinkError::Protocol(format!("hub welcomed {} instead of us", welcome.device_id)));
        }
        Some(Message::Refused(Refusal { reason, message })) => return Err(LinkError::Refused(reason, message)),
        Some(other) => return Err(LinkError::Protocol(format!("expected Welcome, got {}", other.kind()))),
        None => return Err(LinkError::Protocol("hub closed the session before welcoming".into())),
    };
    *connected = true;
    p.state.send_replace(LinkState::Connected);
    let store = &p.store;
    store.resume(acked).await?;
    let mut next_seq = store.stats().acked_seq + 1;
    tracing::info!(device = %p.identity.device_id, resume_after = acked, "Connected to the hub.");

    let signer = p.identity.signer().map_err(|e| LinkError::Protocol(format!("cannot sign batches: {e}")))?;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The hub acknowledges every batch after its durable write; silence
    // means the batch or its ack was lost (a broker can drop messages when
    // no hub is subscribed), and the session starts over from the hub's
    // high-water mark.
    let ack_deadline = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(ack_deadline);
    // Batches relayed for LAN peers: one in flight per origin, answered
    // when the hub's RelayAck for that origin arrives. Dropped (the peer
    // hears "session ended") if this session ends first.
    let mut relay = p.relay.lock().await;
    let mut relaying: HashMap<DeviceId, oneshot::Sender<Result<u64, String>>> = HashMap::new();
    loop {
        while in_flight.len() < window {
            let Some((batch, last)) =
                next_batch(store, &p.identity.device_id, &signer, next_seq, cfg.max_frame).await?
            else {
                break;
            };
            channel.send(Message::Batch(batch)).await?;
            if in_flight.is_empty() {
                ack_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
            }
            in_flight.push_back(last);
            next_seq = last + 1;
        }
        tokio::select! {
            _ = heartbeat.tick() => {
                channel.send(Message::Heartbeat(Heartbeat { at: Timestamp::now() })).await?;
            }
            () = store.appended(), if in_flight.len() < window => {}
            Some(request) = relay.recv(), if relaying.len() < MAX_RELAYED => {
                match relaying.entry(request.batch.origin.clone()) {
                    std::collections::hash_map::Entry::Occupied(_) => {
                        let _ = request.reply.send(Err("a batch of this device is already being relayed".into()));
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        channel.send(Message::Relay(request.batch)).await?;
                        slot.insert(request.reply);
                    }
                }
            }
            () = &mut ack_deadline, if !in_flight.is_empty() => {
                return Err(LinkError::Protocol(format!(
                    "hub did not acknowledge a batch within {}s", cfg.idle_timeout.as_secs()
                )));
            }
            incoming = channel.recv() => match incoming? {
                None => return Ok(()),
                Some(Message::Ack(ack)) => {
                    if ack.upto >= next_seq {
                        return Err(LinkError::Protocol(format!("hub acknowledged {} before it was sent", ack.upto)));
                    }
                    store.ack(ack.upto).await?;
                    let before = in_flight.len();
                    while in_flight.front().is_some_and(|&last| last <= ack.upto) {
                        in_flight.pop_front();
                    }
                    if in_flight.len() < before {
                        ack_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                    }
                }
                Some(Message::RelayAck(ack)) => {
                    if let Some(reply) = relaying.remove(&ack.origin) {
                        let _ = reply.send(match ack.refused {
                            None => Ok(ack.upto),
                            Some(reason) => Err(format!("hub refused: {reason}")),
                        });
                    }
                }
                Some(Message::Deliver(deliver)) => {
                    let commands = crate::inbox::accept(store, deliver, &hub_clock).await?;
                    if !commands.is_empty() {
                        channel.send(Message::Received(Received { commands })).await?;
                    }
                }
                Some(Message::Refused(Refusal { reason, message })) => return Err(LinkError::Refused(reason, message)),
                Some(other) => return Err(LinkError::Protocol(format!("unexpected {} from the hub", other.kind()))),
            },
        }
    }
}
