//! A session with the hub, whatever carries it: hello/welcome, then until
//! something fails: outbox batches out (up to a window of unacknowledged
//! ones), trimmed as the hub acknowledges them; deliveries in, persisted
//! before `Received` goes back; heartbeats.
//!
//! Certificate renewal rides on the session: once the certificate is past
//! `renew_at` of its life by the hub's clock ([`renewal_in`]), the agent
//! sends a CSR for a new key (kept in `next.key` first), keeps the hub's
//! answer in `next.crt`, and switches to it once the hub has accepted it in
//! a handshake: beside the session where the transport can
//! ([`Channel::prove`], QUIC), else by reconnecting with it (MQTT). Until
//! then the old identity stays on disk, so a crash at any step leaves a
//! device that connects with one of the two.
//!
//! The transports ([`super::quic`], [`super::mqtt`]) only move messages;
//! they implement [`Channel`].

use super::{LinkError, LinkParams};
use crate::identity::Identity;
use crate::link::LinkState;
use outpost_shared::DeviceId;
use outpost_shared::protocol::{Heartbeat, Hello, Message, Received, Refusal, RenewRequest, TrustHave};
use outpost_shared::time::Timestamp;
use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// Relayed batches (of different peers) in flight at once.
const MAX_RELAYED: usize = 8;

/// Moves messages between the session and the hub.
pub trait Channel {
    /// Sends one message to the hub.
    fn send(&mut self, message: Message) -> impl Future<Output = Result<(), LinkError>>;
    /// The next message from the hub; `None` once the hub ended the session.
    /// Must be cancel-safe: the session selects on it.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Message>, LinkError>>;
    /// Shows the hub, beside this session, the renewed identity `next` (a
    /// handshake and one round trip with it): `Ok(true)` once the hub has
    /// accepted it; `Ok(false)` if this transport cannot, and the session
    /// must end to reconnect with it.
    fn prove(&mut self, p: &LinkParams, next: &Identity) -> impl Future<Output = Result<bool, LinkError>>;
}

/// After a refused renewal, the next request waits this long.
const RENEWAL_RETRY: Duration = Duration::from_secs(3600);

/// How long until a certificate valid over `validity` is past `renew_at`
/// of its life, at `hub_now` (zero: now); `None` for a certificate that
/// does not parse. The hub's clock decides, not the device's: a device
/// whose clock restarted at 1970 or runs a year ahead still renews when it
/// should. A certificate from a CA being retired (`retiring_ca`, a CA
/// rotation) is renewed now.
pub fn renewal_in(
    validity: Option<(SystemTime, SystemTime)>,
    retiring_ca: bool,
    hub_now: SystemTime,
    renew_at: f64,
) -> Option<Duration> {
    let (from, until) = validity?;
    if retiring_ca {
        return Some(Duration::ZERO);
    }
    Some(outpost_shared::identity::renewal_due(from, until, renew_at).duration_since(hub_now).unwrap_or_default())
}

/// The renewal check looks again at least this often (the hub's clock is
/// followed by this process's monotonic clock in between).
const RENEWAL_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Makes the renewed identity the device's own: the hub accepted it. A
/// failure (a full disk) is logged and leaves both identities as they
/// were: the next connection tries the renewed one again.
fn switch_to(p: &LinkParams, next: Identity) {
    let not_after = next.validity().map(|(_, until)| Timestamp::from_system(until).rfc3339()).unwrap_or_default();
    match Identity::promote(&p.data_dir).and_then(|()| p.live.set(next)) {
        Ok(()) => tracing::info!(%not_after, "Switched to the renewed certificate."),
        Err(e) => tracing::warn!(error = %e, "Could not switch to the renewed certificate; trying again later."),
    }
}

/// Notes a renewal that failed or was refused: the next request waits
/// [`RENEWAL_RETRY`].
fn renewal_failed(p: &LinkParams) {
    *p.renewal_refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
}

/// Takes the hub's answer to a renewal request: keeps the certificate and
/// switches to it once the hub accepts it. Returns an error only to end
/// the session (to reconnect with the new identity, or on a local fault).
async fn renewed(p: &LinkParams, channel: &mut impl Channel, cert_der: Vec<u8>) -> Result<(), LinkError> {
    let next = match p.identity.store_renewed(&p.data_dir, cert_der) {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "The hub's renewed certificate is unusable; discarded.");
            Identity::discard_next(&p.data_dir);
            renewal_failed(p);
            return Ok(());
        }
    };
    crate::crash::point("renew-after-cert");
    match channel.prove(p, &next).await {
        Ok(true) => {
            crate::crash::point("renew-after-proof");
            switch_to(p, next);
            Ok(())
        }
        Ok(false) => Err(LinkError::SwitchIdentity),
        Err(e) if e.certificate_refused().is_some() => {
            tracing::warn!(error = %e, "The hub refused the renewed certificate; discarded.");
            Identity::discard_next(&p.data_dir);
            Ok(())
        }
        Err(e) => {
            tracing::info!(error = %e, "The renewed certificate could not be tried yet; the next connection uses it.");
            Ok(())
        }
    }
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
    let (acked, hub_clock, hub_now) = match reply {
        Some(Message::Welcome(welcome)) if welcome.device_id == p.identity.device_id => (
            welcome.acked_seq,
            crate::link::HubClock::new(welcome.server_time),
            std::time::UNIX_EPOCH + Duration::from_millis(welcome.server_time.0),
        ),
        Some(Message::Welcome(welcome)) => {
            return Err(LinkError::Protocol(format!("hub welcomed {} instead of us", welcome.device_id)));
        }
        Some(Message::Refused(Refusal { reason, message })) => return Err(LinkError::Refused(reason, message)),
        Some(other) => return Err(LinkError::Protocol(format!("expected Welcome, got {}", other.kind()))),
        None => return Err(LinkError::Protocol("hub closed the session before welcoming".into())),
    };
    *connected = true;
    if p.trying_next {
        // The hub accepted the renewed identity.
        switch_to(p, p.identity.clone());
    }
    p.state.send_replace(LinkState::Connected);
    let store = &p.store;
    store.resume(acked).await?;
    let mut next_seq = store.stats().acked_seq + 1;
    tracing::info!(device = %p.identity.device_id, resume_after = acked, "Connected to the hub.");

    // What this device trusts: the hub answers with its bundle if it differs.
    let digest = p.live.get().trust_bundle().digest();
    channel.send(Message::TrustHave(TrustHave { digest })).await?;

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
    // Renewal: checked now and whenever the certificate in use falls due
    // by the hub's clock (its time at the welcome, plus the time elapsed
    // here since), while no request is open.
    let welcomed = tokio::time::Instant::now();
    let mut renewing = false;
    let renewal_check = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(renewal_check);
    loop {
        while in_flight.len() < window {
            let Some((batch, last)) = store.next_batch(&p.identity.device_id, &signer, next_seq, cfg.max_frame).await?
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
            () = &mut renewal_check, if !renewing => {
                let refused = *p.renewal_refused.lock().unwrap_or_else(|e| e.into_inner());
                let wait = match refused.map(|at| at.elapsed()) {
                    Some(since) if since < RENEWAL_RETRY => Some(RENEWAL_RETRY - since),
                    _ => {
                        let live = p.live.get();
                        let validity = live.validity();
                        renewal_in(validity, live.from_retiring_ca(), hub_now + welcomed.elapsed(), cfg.renew_at)
                    }
                };
                match wait {
                    Some(Duration::ZERO) => match p.identity.renewal_request(&p.data_dir) {
                        Ok(csr_der) => {
                            crate::crash::point("renew-before-csr");
                            channel.send(Message::Renew(RenewRequest { csr_der })).await?;
                            renewing = true;
                            tracing::info!("Asking the hub to renew this device's certificate.");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Could not make a key to renew the certificate; trying again in an hour.");
                            renewal_failed(p);
                            renewal_check.as_mut().reset(tokio::time::Instant::now() + RENEWAL_RETRY);
                        }
                    },
                    wait => {
                        let wait = wait.unwrap_or(RENEWAL_CHECK_EVERY).min(RENEWAL_CHECK_EVERY);
                        renewal_check.as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                }
            }
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
                Some(Message::Trust(bundle)) => {
                    match p.live.set_trust(&p.data_dir, &bundle) {
                        Ok(()) => tracing::info!(
                            cas = bundle.cas.len(),
                            revoked = bundle.revoked.len(),
                            "Trust bundle from the hub kept."
                        ),
                        Err(e) => tracing::warn!(error = %e, "Trust bundle from the hub not kept."),
                    }
                    // A certificate from a CA being retired is renewed now.
                    if !renewing {
                        renewal_check.as_mut().reset(tokio::time::Instant::now());
                    }
                }
                Some(Message::Renewed(answer)) if renewing => {
                    renewing = false;
                    renewed(p, channel, answer.cert_der).await?;
                    renewal_check.as_mut().reset(tokio::time::Instant::now());
                }
                Some(Message::Refused(Refusal { reason, message })) if renewing => {
                    renewing = false;
                    renewal_check.as_mut().reset(tokio::time::Instant::now());
                    tracing::warn!(?reason, %message, "The hub refused to renew this device's certificate; asking again in an hour.");
                    renewal_failed(p);
                }
                Some(Message::Refused(Refusal { reason, message })) => return Err(LinkError::Refused(reason, message)),
                Some(other) => return Err(LinkError::Protocol(format!("unexpected {} from the hub", other.kind()))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn renewal_follows_the_hubs_clock() {
        let day = |d: u64| UNIX_EPOCH + Duration::from_secs(d * 86_400);
        let days = |d: u64| Some(Duration::from_secs(d * 86_400));
        let cert = Some((day(1000), day(1365)));
        let third = 2.0 / 3.0;
        assert_eq!(renewal_in(cert, false, day(1000), third), Some(Duration::from_secs(243 * 86_400 + 28_800)));
        assert_eq!(renewal_in(cert, false, day(1242), third), Some(Duration::from_secs(86_400 + 28_800)));
        assert_eq!(renewal_in(cert, false, day(1244), third), Some(Duration::ZERO));
        assert_eq!(renewal_in(cert, false, day(1000), 0.25), Some(Duration::from_secs(91 * 86_400 + 21_600)));
        assert_eq!(renewal_in(cert, false, day(1100), 0.2), days(0));
        // Long expired: still asked for (the hub decides whether to sign).
        assert_eq!(renewal_in(cert, false, day(2000), third), Some(Duration::ZERO));
        assert_eq!(renewal_in(None, false, day(2000), third), None, "an unreadable certificate is not renewed blindly");
    }
}
