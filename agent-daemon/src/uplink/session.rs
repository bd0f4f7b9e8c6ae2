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
            let count = batch.len_hint();
            channel.send(Message::Batch(batch)).await?;
            crate::metrics::METRICS.records_sent.inc_by(count);
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

    /// A session's two ends in memory, as quinn-proto tests its connections:
    /// the agent's end is a [`Channel`], the test plays the hub.
    mod in_memory {
        use super::super::*;
        use crate::config::AgentConfig;
        use crate::identity::Live;
        use crate::identity::testing::{Ca, enrolled};
        use crate::store::AgentStore;
        use outpost_shared::config::ConfigFile;
        use outpost_shared::protocol::{Ack, Alarm, AlarmKind, RecordBody, Welcome};
        use std::sync::Arc;
        use tokio::sync::{mpsc, watch};

        struct AgentEnd {
            to_hub: mpsc::UnboundedSender<Message>,
            from_hub: mpsc::UnboundedReceiver<Message>,
        }

        impl Channel for AgentEnd {
            async fn send(&mut self, message: Message) -> Result<(), LinkError> {
                self.to_hub.send(message).map_err(|_| LinkError::Protocol("the hub's end is gone".into()))
            }
            async fn recv(&mut self) -> Result<Option<Message>, LinkError> {
                Ok(self.from_hub.recv().await)
            }
            async fn prove(&mut self, _: &LinkParams, _: &Identity) -> Result<bool, LinkError> {
                Ok(false)
            }
        }

        struct HubEnd {
            to_agent: mpsc::UnboundedSender<Message>,
            from_agent: mpsc::UnboundedReceiver<Message>,
        }

        impl HubEnd {
            /// The next message of the agent other than heartbeats, within 10 s.
            async fn next(&mut self) -> Option<Message> {
                loop {
                    let got = tokio::time::timeout(Duration::from_secs(10), self.from_agent.recv()).await;
                    match got.expect("the agent said nothing for 10 s") {
                        Some(Message::Heartbeat(_)) => continue,
                        other => return other,
                    }
                }
            }

            fn say(&self, message: Message) {
                let _ = self.to_agent.send(message);
            }

            /// Reads the hello, welcomes the agent with `acked_seq`, and
            /// takes its `TrustHave`.
            async fn welcome(&mut self, device: &DeviceId, acked_seq: u64) {
                assert!(matches!(self.next().await, Some(Message::Hello(_))));
                self.say(Message::Welcome(Welcome {
                    device_id: device.clone(),
                    hub_version: "test".into(),
                    server_time: Timestamp::now(),
                    acked_seq,
                }));
                assert!(matches!(self.next().await, Some(Message::TrustHave(_))));
            }

            /// The sequence numbers of the next batch.
            async fn batch(&mut self) -> Vec<u64> {
                match self.next().await {
                    Some(Message::Batch(batch)) => batch.records().unwrap().iter().map(|r| r.seq).collect(),
                    other => panic!("expected a batch, got {other:?}"),
                }
            }
        }

        fn pair() -> (AgentEnd, HubEnd) {
            let (to_hub, from_agent) = mpsc::unbounded_channel();
            let (to_agent, from_hub) = mpsc::unbounded_channel();
            (AgentEnd { to_hub, from_hub }, HubEnd { to_agent, from_agent })
        }

        struct Setup {
            _dir: tempfile::TempDir,
            params: LinkParams,
        }

        /// An enrolled device with `records` alarms waiting in its outbox;
        /// `uplink` is added to its `[uplink]` table.
        async fn device(records: usize, uplink: &str) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let identity = enrolled(dir.path(), &Ca::new());
            let text = format!("data_dir = {:?}\n[uplink]\n{uplink}", dir.path().display().to_string());
            let config = AgentConfig::parse(std::path::Path::new("agent.toml"), &text).unwrap();
            let store = AgentStore::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            // A store that met the hub before: it resumes after the hub's mark.
            store.known_new().unwrap();
            let alarm = |n: usize| {
                RecordBody::Alarm(Alarm { kind: AlarmKind::OutboxFull, raised: true, message: format!("record {n}") })
            };
            store.append((1..=records).map(alarm).collect()).await.unwrap();
            let (_relay_tx, relay_rx) = mpsc::channel(1);
            let params = LinkParams {
                config: config.uplink,
                hub: "hub:1".into(),
                identity: identity.clone(),
                trying_next: false,
                live: Live::new(identity).unwrap(),
                data_dir: dir.path().to_owned(),
                renewal_refused: Arc::default(),
                name: "test".into(),
                store,
                state: Arc::new(watch::channel(LinkState::Starting).0),
                relay: Arc::new(tokio::sync::Mutex::new(relay_rx)),
            };
            Setup { _dir: dir, params }
        }

        async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn start(params: &LinkParams, window: usize) -> (tokio::task::JoinHandle<Result<bool, LinkError>>, HubEnd) {
            let (mut agent, hub) = pair();
            let params = params.clone();
            let session = tokio::spawn(async move {
                let mut connected = false;
                serve(&params, &mut agent, window, &mut connected).await.map(|()| connected)
            });
            (session, hub)
        }

        #[tokio::test]
        async fn batches_go_in_order_and_an_ack_empties_the_outbox() {
            let s = device(5, "").await;
            let (session, mut hub) = start(&s.params, 1);
            hub.welcome(&s.params.identity.device_id, 0).await;
            assert_eq!(hub.batch().await, [1, 2, 3, 4, 5]);
            assert_eq!(s.params.store.stats().records, 5, "nothing leaves the outbox before the hub's ack");
            hub.say(Message::Ack(Ack { upto: 5 }));
            wait_until("the ack to trim the outbox", || s.params.store.stats().records == 0).await;
            assert_eq!(s.params.store.stats().acked_seq, 5);
            // Later records follow in the same session, numbered on.
            let more = RecordBody::Alarm(Alarm { kind: AlarmKind::OutboxFull, raised: false, message: "6".into() });
            s.params.store.append(vec![more]).await.unwrap();
            assert_eq!(hub.batch().await, [6]);
            drop(hub);
            assert!(session.await.unwrap().is_ok_and(|connected| connected), "the hub's end closing ends the session");
        }

        #[tokio::test]
        async fn a_session_resumes_after_what_the_hub_holds() {
            let s = device(5, "").await;
            let (_session, mut hub) = start(&s.params, 1);
            hub.welcome(&s.params.identity.device_id, 3).await;
            assert_eq!(hub.batch().await, [4, 5], "the hub's records are not sent again");
            assert_eq!(s.params.store.stats().acked_seq, 3);
            assert_eq!(s.params.store.stats().records, 2, "what the hub holds left the outbox");
        }

        #[tokio::test]
        async fn an_unacknowledged_batch_ends_the_session_and_loses_nothing() {
            let s = device(3, "keepalive = \"100ms\"\nidle_timeout = \"300ms\"\nheartbeat = \"1s\"\n").await;
            let (session, mut hub) = start(&s.params, 1);
            hub.welcome(&s.params.identity.device_id, 0).await;
            assert_eq!(hub.batch().await, [1, 2, 3]);
            let ended =
                tokio::time::timeout(Duration::from_secs(10), session).await.expect("no end after idle_timeout");
            let ended = ended.unwrap();
            assert!(
                matches!(&ended, Err(LinkError::Protocol(why)) if why.contains("did not acknowledge")),
                "{ended:?}"
            );
            assert_eq!(s.params.store.stats().records, 3, "the records wait for the next session");
            // The next session sends them again from the hub's mark.
            let (_session, mut hub) = start(&s.params, 1);
            hub.welcome(&s.params.identity.device_id, 1).await;
            assert_eq!(hub.batch().await, [2, 3]);
        }

        #[tokio::test]
        async fn a_welcome_for_another_device_ends_the_session_unconnected() {
            let s = device(1, "").await;
            let (session, mut hub) = start(&s.params, 1);
            assert!(matches!(hub.next().await, Some(Message::Hello(_))));
            hub.say(Message::Welcome(Welcome {
                device_id: "dev-someone-else".parse().unwrap(),
                hub_version: "test".into(),
                server_time: Timestamp::now(),
                acked_seq: 0,
            }));
            assert!(matches!(session.await.unwrap(), Err(LinkError::Protocol(_))));
            assert_eq!(*s.params.state.borrow(), LinkState::Starting, "never shown as connected");
        }
    }
}
