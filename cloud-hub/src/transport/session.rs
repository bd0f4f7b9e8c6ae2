//! What a device session does, whatever carries it: [`DeviceSession`]
//! holds one device's session and handles every message from it, over a
//! [`Transport`] that only moves messages (the QUIC endpoint,
//! [`crate::transport::quic`], and the MQTT bridge, [`crate::transport::mqtt`]).
//!
//! - [`hello`]: the device says who it is; the hub answers with a `Welcome`
//!   carrying the last sequence number it holds.
//! - [`ingest`]: a signed batch is checked (origin, signature, order) and
//!   stored idempotently per `(device, seq)`; the `Ack` is made only after
//!   the durable write.
//! - [`received`]: the device persisted some commands.
//! - [`Outbound`]: what to deliver next (commands, desired state).

use crate::metrics::{METRICS, Reason};
use crate::service::ca::FleetCa;
use crate::service::fleet::{Fleet, Link};
use crate::store::{AuditEntry, DeviceKeys, HelloRecord, Ingested, Store, StoreError};
use outpost_shared::DeviceId;
use outpost_shared::protocol::Record;
use outpost_shared::protocol::{
    Ack, Batch, Command, Deliver, Desired, Hello, Message, Refusal, RefusalReason, RelayAck, RenewRequest, Renewed,
    Welcome,
};
use outpost_shared::time::Timestamp;
use std::time::Duration;
use tracing::{debug, info};

/// Why a session (or, over MQTT, one message) ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The peer closed, the connection dropped, or the hub could not go on.
    Closed(String),
    /// The peer broke the protocol.
    Protocol(String),
    /// The hub refuses the device.
    Refused(Refusal),
}

impl From<outpost_shared::io::StreamError> for SessionEnd {
    fn from(e: outpost_shared::io::StreamError) -> Self {
        match e {
            outpost_shared::io::StreamError::Io(io) => SessionEnd::Closed(io.to_string()),
            other => SessionEnd::Protocol(other.to_string()),
        }
    }
}

/// Records a device's hello (name, version, address). Refuses devices the
/// store does not know.
async fn record_hello(store: &Store, id: &DeviceId, hello: &Hello, addr: &str) -> Result<(), SessionEnd> {
    let record = HelloRecord {
        id: id.clone(),
        name: hello.name.clone(),
        agent_version: hello.agent_version.clone(),
        addr: addr.to_owned(),
        at: Timestamp::now(),
    };
    match store.record_hello(&record).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(SessionEnd::Refused(Refusal {
                reason: RefusalReason::UnknownDevice,
                message: "device is not registered".into(),
            }));
        }
        Err(e) => {
            log_store_error(&e, "Device record could not be updated.");
            return Err(SessionEnd::Closed("store error".into()));
        }
    }
    Ok(())
}

/// The `Welcome` that answers a device's hello: where its records resume.
async fn welcome(store: &Store, id: &DeviceId) -> Result<Welcome, SessionEnd> {
    let acked_seq = store.high_water(id).await.map_err(|e| {
        log_store_error(&e, "High-water mark could not be read.");
        SessionEnd::Closed("store error".into())
    })?;
    Ok(Welcome {
        device_id: id.clone(),
        hub_version: env!("CARGO_PKG_VERSION").into(),
        server_time: Timestamp::now(),
        acked_seq,
    })
}

/// Logs a failed store call: an unavailable store is logged by the store
/// itself (once, then at a bounded rate), so only at debug level here.
pub(crate) fn log_store_error(e: &StoreError, what: &'static str) {
    match e {
        StoreError::Unavailable(_) => debug!(error = %e, "{what}"),
        _ => tracing::error!(error = %e, "{what}"),
    }
}

/// Checks and stores a batch from device `id`, which signs with one of
/// `keys`: the origin must be `id`, the signature must verify, and sequence
/// numbers must increase from 1. Returns the acknowledgement to send once
/// the records are durable.
pub async fn ingest(store: &Store, id: &DeviceId, keys: &mut DeviceKeys, batch: Batch) -> Result<Ack, SessionEnd> {
    let refused = |reason: &'static str, message: String| {
        METRICS.batches_refused.get_or_create(&Reason { reason }).inc();
        SessionEnd::Protocol(message)
    };
    if batch.origin != *id {
        return Err(refused("origin", format!("batch of device {} on {id}'s session", batch.origin)));
    }
    match check_signature(store, id, keys, |key| batch.verify(key)).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(refused("signature", "batch signature does not verify with the device's certificate".into()));
        }
        Err(end) => {
            METRICS.batches_refused.get_or_create(&Reason { reason: "store_unavailable" }).inc();
            return Err(end);
        }
    }
    let records = batch.records().map_err(|e| refused("malformed", format!("signed batch does not decode: {e}")))?;
    if !records.windows(2).all(|w| w[0].seq < w[1].seq) || records.first().is_some_and(|r| r.seq == 0) {
        return Err(refused("sequence", "batch sequence numbers are not increasing from 1".into()));
    }
    let ingested = ingest_retrying(store, id, &records).await.inspect_err(|_| {
        METRICS.batches_refused.get_or_create(&Reason { reason: "store_unavailable" }).inc();
    })?;
    METRICS.records.inc_by(ingested.stored as u64);
    METRICS.duplicates.inc_by(ingested.duplicates as u64);
    if ingested.stored > 0 {
        METRICS.bytes.inc_by(batch.payload.len() as u64);
    }
    for (from, to) in &ingested.gaps {
        info!(from, to, "Sequence gap (records the device thinned).");
    }
    if ingested.duplicates > 0 {
        debug!(duplicates = ingested.duplicates, "Duplicate records acknowledged again.");
    }
    Ok(Ack { upto: ingested.upto })
}

/// True if `verify` accepts one of the device's `keys`. The key of a
/// certificate the hub signed at the device's renewal becomes its current
/// key the first time it verifies (the device has switched to it), in the
/// store and in `keys`.
pub async fn check_signature(
    store: &Store,
    id: &DeviceId,
    keys: &mut DeviceKeys,
    verify: impl Fn(&[u8]) -> bool,
) -> Result<bool, SessionEnd> {
    let mut key = keys.verifying(&verify).map(<[u8]>::to_vec);
    if key.is_none() {
        // The keys may have changed since they were read (a renewal on
        // another link of the device, or at another hub).
        let stored = store.device_keys(id).await.map_err(|e| {
            log_store_error(&e, "Device key could not be read.");
            SessionEnd::Closed("store error".into())
        })?;
        if let Some(stored) = stored.filter(|s| s != keys) {
            *keys = stored;
            key = keys.verifying(&verify).map(<[u8]>::to_vec);
        }
    }
    let Some(key) = key else { return Ok(false) };
    if key != keys.current {
        store.put_device_key(id, &key).await.map_err(|e| {
            log_store_error(&e, "Renewed device key could not be stored.");
            SessionEnd::Closed("store error".into())
        })?;
        info!(device = %id, "Device signs with its renewed certificate's key.");
        *keys = DeviceKeys::only(key);
    }
    Ok(true)
}

/// How long a session waits for its store to come back (a full disk, the
/// database restarting) before it gives up and closes; the agent then
/// reconnects and resends from the hub's mark.
pub const STORE_RETRY_FOR: Duration = Duration::from_secs(60);

/// Stores a checked batch, retrying while the store is unavailable: the
/// session keeps its connection and reads nothing further meanwhile, so the
/// batches behind this one wait (no gap can form) and the ack goes out once
/// the records are durable.
async fn ingest_retrying(store: &Store, id: &DeviceId, records: &[Record]) -> Result<Ingested, SessionEnd> {
    let give_up = tokio::time::Instant::now() + STORE_RETRY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match store.ingest(id, records).await {
            Ok(ingested) => return Ok(ingested),
            Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() + pause < give_up => {
                // Logged by the store (once, then at a bounded rate).
                debug!(error = %e, "Store unavailable; the batch waits.");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Ingest failed; closing the session (the agent resends).");
                return Err(SessionEnd::Closed("store error".into()));
            }
        }
    }
}

/// Stores a batch that device `carrier` relays for its origin (a LAN peer
/// whose own uplink is down): checked with the origin's key (from
/// enrollment) and ingested exactly as if the origin had sent it, so the
/// same records arriving later on the origin's own link are duplicates.
///
/// A batch that fails a check is refused in the answer (and logged), not by
/// ending the carrier's session: the carrier cannot check another device's
/// signature itself.
pub async fn relay(store: &Store, carrier: &DeviceId, batch: Batch) -> Result<RelayAck, SessionEnd> {
    let origin = batch.origin.clone();
    let refuse = |reason: String| {
        tracing::warn!(%origin, %reason, "Relayed batch refused.");
        Ok(RelayAck { origin: origin.clone(), upto: 0, refused: Some(reason) })
    };
    if origin == *carrier {
        return refuse("a device relayed its own batch".into());
    }
    let mut keys = match store.device_keys(&origin).await {
        Ok(Some(keys)) => keys,
        Ok(None) => return refuse(format!("relayed batch of unknown device {origin}")),
        Err(e) => {
            log_store_error(&e, "Device key could not be read.");
            return Err(SessionEnd::Closed("store error".into()));
        }
    };
    match ingest(store, &origin, &mut keys, batch).await {
        Ok(ack) => {
            info!(%origin, upto = ack.upto, "Relayed batch stored.");
            Ok(RelayAck { origin, upto: ack.upto, refused: None })
        }
        Err(SessionEnd::Protocol(reason)) => refuse(reason),
        Err(end) => Err(end),
    }
}

/// The device persisted these commands: queued ones become delivered.
pub async fn received(store: &Store, id: &DeviceId, commands: Vec<u64>) {
    match store.mark_delivered(id, &commands, Timestamp::now()).await {
        Ok(ids) if !ids.is_empty() => info!(commands = ?ids, "Commands delivered."),
        Ok(_) => {}
        Err(e) => log_store_error(&e, "Delivery could not be recorded."),
    }
}

/// Most commands per `Deliver`. A delivery also stops at half the frame
/// limit; the API caps one command at [`crate::service::MAX_COMMAND_BYTES`] and
/// frames are at least 256 KiB, so one command always fits.
pub const MAX_COMMANDS_PER_DELIVERY: usize = 100;

/// What this session has already sent the device, so a wake-up sends only
/// what is new; and which session it is, so that a newer session of the
/// device (on any hub) stops this one from delivering.
#[derive(Debug, Default)]
pub struct Outbound {
    sent_commands: std::collections::HashSet<u64>,
    sent_desired: u64,
    hub: String,
    epoch: u64,
}

impl Outbound {
    /// A session of hub `hub` with `epoch` (from [`crate::service::fleet::Fleet::claim`]).
    pub fn new(hub: &str, epoch: u64) -> Self {
        Outbound { hub: hub.to_owned(), epoch, ..Outbound::default() }
    }

    /// Commands queued and unexpired, and a desired state newer than the
    /// device reported, that this session has not sent yet. Fails with
    /// `Closed` once a newer session of the device holds it.
    pub async fn pending(
        &mut self,
        store: &Store,
        id: &DeviceId,
        max_bytes: usize,
    ) -> Result<Option<Deliver>, SessionEnd> {
        match store.holds_session(id, &self.hub, self.epoch).await {
            Ok(true) => {}
            Ok(false) => return Err(SessionEnd::Closed("a newer session of the device took over".into())),
            Err(e) => {
                log_store_error(&e, "Session ownership could not be checked.");
                return Ok(None);
            }
        }
        let mut bytes = 0;
        // Commands sent on this session stay queued until the device says
        // it holds them; look past those.
        let limit = MAX_COMMANDS_PER_DELIVERY + self.sent_commands.len();
        let commands: Vec<Command> = match store.queued_commands(id, limit).await {
            Ok(all) => all
                .into_iter()
                .filter(|c| !self.sent_commands.contains(&c.id))
                .take(MAX_COMMANDS_PER_DELIVERY)
                .map(|c| Command { id: c.id, kind: c.kind, args: c.args, expires_at: c.expires_at })
                .take_while(|c| {
                    bytes += c.kind.len() + c.args.iter().map(|a| a.len() + 5).sum::<usize>() + 32;
                    bytes <= max_bytes
                })
                .collect(),
            Err(e) => {
                log_store_error(&e, "Pending commands could not be read.");
                Vec::new()
            }
        };
        let reported = store.reported(id).await.ok().flatten().map_or(0, |r| r.applied_version);
        let desired = store
            .desired(id)
            .await
            .ok()
            .flatten()
            .filter(|d| d.version > reported.max(self.sent_desired))
            .map(|d| Desired { version: d.version, doc: d.doc });
        if commands.is_empty() && desired.is_none() {
            return Ok(None);
        }
        self.sent_commands.extend(commands.iter().map(|c| c.id));
        if let Some(d) = &desired {
            self.sent_desired = d.version;
        }
        Ok(Some(Deliver { commands, desired }))
    }
}

/// What carries a session: sends messages to the device and names the
/// session in the fleet's presence.
pub trait Transport {
    /// Sends `message` to the device.
    fn send(&mut self, message: Message) -> impl std::future::Future<Output = Result<(), SessionEnd>> + Send;

    /// A new presence link for a session on this transport.
    fn link(&self) -> Link;

    /// Where the device is, for the device record.
    fn addr(&self) -> String;

    /// True when a hello that came this way may be a replay (it carries no
    /// proof of freshness: MQTT): it is answered but changes nothing until
    /// a fresh message of its session follows ([`DeviceSession::proven`]).
    fn hello_needs_proof(&self) -> bool {
        false
    }
}

/// The device's side of a session: where its messages come from and what
/// the transport does with each before and after [`DeviceSession::handle`].
pub trait Inbound<T: Transport> {
    /// One message as the transport receives it.
    type Item: Send;

    /// The device's next message; `Err` ends the session (the connection
    /// closed, or nothing came within the transport's timeout). Must be
    /// cancel-safe: the loop drops it when there is something to deliver.
    fn next(&mut self) -> impl std::future::Future<Output = Result<Self::Item, SessionEnd>> + Send;

    /// Handles one message. `Ok(true)` when a session began, so the
    /// downlink is looked at; `Err` ends the session (a transport whose
    /// session outlives a bad message logs it and answers `Ok(false)`).
    fn handle(
        &mut self,
        item: Self::Item,
        session: &mut DeviceSession,
        transport: &mut T,
    ) -> impl std::future::Future<Output = Result<bool, SessionEnd>> + Send;
}

/// What a session does when a newer session of its device (on this hub or
/// another) holds the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFenced {
    /// End the session (QUIC: the device has moved to another connection).
    End,
    /// Stop delivering, keep taking messages (MQTT: one broker subscription
    /// serves every session of the device).
    Detach,
}

/// One device's session at this hub: its identity, its place in the
/// fleet's presence and what it has delivered.
#[derive(Debug)]
pub struct DeviceSession {
    fleet: std::sync::Arc<Fleet>,
    ca: std::sync::Arc<FleetCa>,
    id: DeviceId,
    keys: DeviceKeys,
    /// When this session last signed a certificate for the device.
    renewed: Option<tokio::time::Instant>,
    max_frame: usize,
    when_fenced: WhenFenced,
    link: Option<Link>,
    downlink: std::sync::Arc<tokio::sync::Notify>,
    outbound: Outbound,
    /// The device's allowance of records and bytes per second.
    pace: crate::service::pace::Pace,
    /// The session has said that it slows the device.
    slowed: bool,
    /// The digest of the trust bundle the device holds, once it said
    /// (agents of protocol 12 and later; older ones are sent none).
    device_trust: Option<[u8; 32]>,
    /// Counts the session in `outpost_hub_sessions_open` while it lives.
    open: Option<crate::metrics::OpenSession>,
    /// A hello answered and not yet taken (see
    /// [`Transport::hello_needs_proof`]), with the address it came from.
    pending_hello: Option<(Hello, String)>,
}

impl DeviceSession {
    /// A session of device `id`, which signs with one of `keys`; `ca`
    /// signs its renewed certificates.
    pub fn new(
        fleet: std::sync::Arc<Fleet>,
        ca: std::sync::Arc<FleetCa>,
        id: DeviceId,
        keys: DeviceKeys,
        max_frame: usize,
        when_fenced: WhenFenced,
    ) -> Self {
        let fleet_rate = fleet.device_rate();
        DeviceSession {
            fleet,
            ca,
            id,
            keys,
            renewed: None,
            max_frame,
            when_fenced,
            link: None,
            downlink: std::sync::Arc::default(),
            outbound: Outbound::default(),
            pace: crate::service::pace::Pace::new(fleet_rate, std::time::Instant::now()),
            slowed: false,
            device_trust: None,
            open: None,
            pending_hello: None,
        }
    }

    /// Waits as long as the device's allowance asks before `batch` is
    /// stored (see [`crate::service::pace`]): the device alone is held back.
    async fn pace(&mut self, batch: &outpost_shared::protocol::Batch) {
        let wait = self.pace.charge(batch.len_hint(), batch.payload.len() as u64, std::time::Instant::now());
        if wait.is_zero() {
            return;
        }
        if !self.slowed {
            self.slowed = true;
            info!(
                wait_ms = wait.as_millis() as u64,
                "Device over its allowance ([fleet] device_records_per_sec, device_bytes_per_sec); its batches are slowed."
            );
        }
        tokio::time::sleep(wait).await;
    }

    /// Woken when there may be something to deliver.
    pub fn downlink(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.downlink.clone()
    }

    /// True once the session holds the device in the fleet.
    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// Handles one message from the device, answering through `transport`.
    /// Returns true if the downlink should be looked at (a new session).
    pub async fn handle(&mut self, message: Message, transport: &mut impl Transport) -> Result<bool, SessionEnd> {
        let store = self.fleet.store().clone();
        let mut new_session = false;
        // A revoked device is heard no more, whatever carries it (over QUIC
        // its connections are closed besides; over MQTT this is the door).
        if self.fleet.admissions().revoked(&self.id) {
            return Err(SessionEnd::Refused(Refusal {
                reason: RefusalReason::NotAuthorised,
                message: "device revoked".into(),
            }));
        }
        match message {
            Message::Hello(hello_msg) if transport.hello_needs_proof() => {
                // Perhaps a replay: answered (a replayed one's answer is
                // ignored by the device), taken only once a fresh message of
                // its session shows the device is there; the agent sends one
                // at once after the Welcome.
                let welcome = welcome(&store, &self.id).await?;
                debug!(resume_after = welcome.acked_seq, "Hello answered; taken at the session's first fresh message.");
                self.pending_hello = Some((hello_msg, transport.addr()));
                transport.send(Message::Welcome(welcome)).await?;
                return Ok(false);
            }
            Message::Hello(hello_msg) => {
                let addr = transport.addr();
                self.take_hello(&hello_msg, &addr, transport).await?;
                new_session = true;
                transport.send(Message::Welcome(welcome(&store, &self.id).await?)).await?;
            }
            Message::Batch(batch) => {
                self.pace(&batch).await;
                // Checks origin and signature before anything is stored.
                let ack = ingest(&store, &self.id, &mut self.keys, batch).await?;
                self.attach(transport, false).await?;
                transport.send(Message::Ack(ack)).await?;
            }
            Message::Relay(batch) if self.fleet.admissions().revoked(&batch.origin) => {
                tracing::warn!(origin = %batch.origin, "Relayed batch of a revoked device refused.");
                let refused = Some("the device is revoked".into());
                self.attach(transport, false).await?;
                transport.send(Message::RelayAck(RelayAck { origin: batch.origin, upto: 0, refused })).await?;
            }
            Message::Relay(batch) => {
                // The batch carries its origin's signature; the carrier is
                // this session's device, and pays for it.
                self.pace(&batch).await;
                let ack = relay(&store, &self.id, batch).await?;
                self.attach(transport, false).await?;
                transport.send(Message::RelayAck(ack)).await?;
            }
            Message::Heartbeat(_) => self.attach(transport, false).await?,
            Message::Renew(request) => {
                self.attach(transport, false).await?;
                let reply = self.renew(&store, &request, &transport.addr()).await?;
                transport.send(reply).await?;
            }
            Message::Received(r) => {
                self.attach(transport, false).await?;
                received(&store, &self.id, r.commands).await;
            }
            Message::TrustHave(have) => {
                self.attach(transport, false).await?;
                self.device_trust = Some(have.digest);
                new_session = true;
            }
            other => return Err(SessionEnd::Protocol(format!("unexpected {} in a session", other.kind()))),
        }
        self.fleet.seen(&self.id);
        Ok(new_session)
    }

    /// Makes a hello the device's session: its record, its place in the
    /// fleet. A device the store does not know is refused.
    async fn take_hello(
        &mut self,
        hello: &Hello,
        addr: &str,
        transport: &mut impl Transport,
    ) -> Result<(), SessionEnd> {
        match record_hello(self.fleet.store(), &self.id, hello, addr).await {
            Ok(()) => {}
            Err(SessionEnd::Refused(refusal)) => {
                transport.send(Message::Refused(refusal.clone())).await?;
                return Err(SessionEnd::Refused(refusal));
            }
            Err(end) => return Err(end),
        }
        info!(name = ?hello.name, version = ?hello.agent_version, %addr, "Session opened.");
        self.attach(transport, true).await?;
        self.open = Some(crate::metrics::OpenSession::new(transport.link().transport()));
        Ok(())
    }

    /// A fresh message of the session of the hello answered last arrived:
    /// the hello is taken now. Returns true if there was one (a new
    /// session: everything pending is offered).
    pub async fn proven(&mut self, transport: &mut impl Transport) -> Result<bool, SessionEnd> {
        let Some((hello, addr)) = self.pending_hello.take() else { return Ok(false) };
        self.take_hello(&hello, &addr, transport).await?;
        Ok(true)
    }

    /// A fresh message of another session arrived: the hello answered last
    /// was not the device's (a replay), and is dropped unseen.
    pub fn unproven(&mut self) {
        if self.pending_hello.take().is_some() {
            debug!("A hello no fresh message of its session followed was dropped (a replay?).");
        }
    }

    /// True if `verify` accepts one of the device's keys (see
    /// [`check_signature`]).
    pub async fn verify(&mut self, verify: impl Fn(&[u8]) -> bool) -> Result<bool, SessionEnd> {
        check_signature(self.fleet.store(), &self.id, &mut self.keys, verify).await
    }

    /// Signs a new certificate for the key the device's CSR holds; its key
    /// is accepted beside the current one until the device uses it. At most
    /// one renewal per session per tenth of the certificate lifetime (an
    /// hour at most), so a device cannot keep the CA busy; a refusal does
    /// not end the session. Written to the audit log.
    async fn renew(&mut self, store: &Store, request: &RenewRequest, addr: &str) -> Result<Message, SessionEnd> {
        let at_most_every = (self.ca.device_lifetime() / 10).min(Duration::from_secs(3600));
        let refuse = |reason, message: String| {
            tracing::warn!(%message, "Certificate renewal refused.");
            Ok(Message::Refused(Refusal { reason, message }))
        };
        if self.renewed.is_some_and(|at| at.elapsed() < at_most_every) {
            let message = format!("a certificate was renewed in this session less than {at_most_every:?} ago");
            return refuse(RefusalReason::BadRequest, message);
        }
        let cert = match self.ca.sign_device(&request.csr_der, &self.id) {
            Ok(cert) => cert,
            Err(e) => return refuse(RefusalReason::BadCsr, e.to_string()),
        };
        let (Some(key), Some((_, not_after))) =
            (outpost_shared::identity::public_key_of(&cert), outpost_shared::identity::validity_of(&cert))
        else {
            return refuse(RefusalReason::Internal, "the signed certificate does not parse".into());
        };
        store.put_next_device_key(&self.id, &key).await.map_err(|e| {
            log_store_error(&e, "Renewed device key could not be stored.");
            SessionEnd::Closed("store error".into())
        })?;
        self.keys.next = Some(key.clone());
        self.renewed = Some(tokio::time::Instant::now());
        // The device uses the new certificate from its next session (over
        // MQTT the hub never sees it: this is how it learns its expiry).
        if let Err(e) = store.set_cert_expires(&self.id, Timestamp::from_system(not_after)).await {
            log_store_error(&e, "Certificate expiry not stored.");
        }
        // A re-admission is for one renewal.
        if let Err(e) = self.fleet.admissions().renewed(store, &self.id).await {
            log_store_error(&e, "Re-admission could not be cleared.");
        }
        let not_after = Timestamp::from_system(not_after).rfc3339();
        info!(%not_after, "Device certificate renewed.");
        let entry = AuditEntry {
            id: 0,
            at: Timestamp::now(),
            who: format!("device {}", self.id),
            action: "renew certificate".into(),
            target: self.id.to_string(),
            matched: None,
            from: addr.to_owned(),
            status: 200,
            detail: format!("valid until {not_after}, key {}", outpost_shared::Fingerprint::of_der(&key)),
        };
        if let Err(e) = store.append_audit(&entry).await {
            log_store_error(&e, "Audit entry could not be written.");
        }
        Ok(Message::Renewed(Renewed { cert_der: cert.to_vec() }))
    }

    /// Makes this session the device's in the fleet: at each hello (a new
    /// session: everything pending is offered again), or at the first valid
    /// message of a session whose hello this process did not see. The
    /// fleet may refuse (an MQTT session while a QUIC one is open); each
    /// later message tries again.
    async fn attach(&mut self, transport: &impl Transport, hello: bool) -> Result<(), SessionEnd> {
        if !hello && self.link.is_some() {
            return Ok(());
        }
        let link = transport.link();
        let Some(downlink) = self.fleet.connected(&self.id, link.clone()) else {
            debug!("Another session of the device is open here; deliveries wait for it to end.");
            return Ok(());
        };
        let epoch = match self.fleet.claim(&self.id, &link).await {
            Ok(epoch) => epoch,
            Err(e) => {
                log_store_error(&e, "Session could not be recorded.");
                self.fleet.disconnected(&self.id, &link);
                return Err(SessionEnd::Closed("store error".into()));
            }
        };
        if let Some(old) = self.link.replace(link) {
            self.fleet.disconnected(&self.id, &old);
        }
        self.downlink = downlink;
        self.outbound = Outbound::new(self.fleet.hub_id(), epoch);
        if !hello {
            self.downlink.notify_one();
        }
        Ok(())
    }

    /// The trust bundle devices are to hold now: the CAs trusted and the
    /// devices revoked.
    pub fn trust_bundle(&self) -> crate::service::admission::SharedBundle {
        self.fleet.admissions().trust_bundle(&self.ca)
    }

    /// Sends what waits for the device (the trust bundle if it changed,
    /// commands, desired state). Returns true if a full delivery may have
    /// left more behind.
    pub async fn deliver(&mut self, transport: &mut impl Transport) -> Result<bool, SessionEnd> {
        if self.link.is_none() {
            return Ok(false);
        }
        if let Some(held) = self.device_trust {
            let shared = self.trust_bundle();
            let (bundle, digest) = &*shared;
            if *digest != held {
                debug!(cas = bundle.cas.len(), revoked = bundle.revoked.len(), "Trust bundle sent.");
                transport.send(Message::Trust(bundle.clone())).await?;
                self.device_trust = Some(*digest);
            }
        }
        let store = self.fleet.store().clone();
        match self.outbound.pending(&store, &self.id, self.max_frame / 2).await {
            Ok(Some(deliver)) => {
                let more = deliver.commands.len() >= MAX_COMMANDS_PER_DELIVERY;
                transport.send(Message::Deliver(deliver)).await?;
                Ok(more)
            }
            Ok(None) => Ok(false),
            Err(end) => match self.when_fenced {
                WhenFenced::End => Err(end),
                WhenFenced::Detach => {
                    debug!(?end, "Session fenced off; deliveries stop here.");
                    if let Some(link) = self.link.take() {
                        self.fleet.disconnected(&self.id, &link);
                    }
                    Ok(false)
                }
            },
        }
    }

    /// The delivery loop of every session, whatever carries it: delivers
    /// what waits (first if `deliver_first`; again when the API pokes the
    /// session, when the fleet's trust changes, after a message that began
    /// a session, and while a full delivery may have left more), otherwise
    /// waits for the device's next message and handles it. Returns why the
    /// session ended; the caller tells the fleet.
    pub async fn serve<T, I>(&mut self, transport: &mut T, inbound: &mut I, deliver_first: bool) -> SessionEnd
    where
        T: Transport + Send,
        I: Inbound<T> + Send,
    {
        let mut check_downlink = deliver_first;
        let mut trust = self.fleet.admissions().trust_changes();
        loop {
            if check_downlink {
                match self.deliver(transport).await {
                    Ok(more) => check_downlink = more,
                    Err(end) => return end,
                }
                if check_downlink {
                    continue;
                }
            }
            let downlink = self.downlink();
            let item = tokio::select! {
                () = downlink.notified() => {
                    check_downlink = true;
                    continue;
                }
                Ok(()) = trust.changed() => {
                    check_downlink = true;
                    continue;
                }
                next = inbound.next() => match next {
                    Ok(item) => item,
                    Err(end) => return end,
                },
            };
            match inbound.handle(item, self, transport).await {
                Ok(new_session) => check_downlink |= new_session,
                Err(end) => return end,
            }
        }
    }

    /// The session is over for `reason`: the fleet forgets its link and
    /// the store keeps why.
    pub async fn end(&mut self, reason: &str) {
        if let Some(link) = self.link.take() {
            self.fleet.ended(&self.id, &link, reason).await;
        }
    }
}
