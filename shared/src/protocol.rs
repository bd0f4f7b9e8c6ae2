//! The one envelope every Outpost peer exchanges, and its messages.
//!
//! An envelope is `postcard(version: u16, message: Message)`. The version is
//! decoded first, on its own, so a peer speaking a version we do not know is
//! told apart from a corrupt frame. Framing (length prefixes and the size
//! limit) is in [`crate::frame`]. The byte layout is documented in
//! `docs/PROTOCOL.md` and pinned by the golden vectors in the tests below.
//!
//! Conversation on a QUIC control stream:
//! - enrollment (no client certificate yet): `Enroll` → `Enrolled` | `Refused`;
//! - session (client certificate from the fleet CA): `Hello` → `Welcome`
//!   (carrying the last sequence number the hub holds) | `Refused`; then the
//!   agent sends `Heartbeat` and `Batch`es of outbox records, the hub answers
//!   each batch with a cumulative `Ack` after its durable write, and sends
//!   `Deliver` (commands, desired state), which the agent confirms with
//!   `Received` once it has persisted them.

use crate::identity::DeviceId;
use crate::job::{JobRun, JobsReport};
use crate::peers::PeersReport;
use crate::telemetry::Sample;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Version 2 replaced v1's
/// fire-and-forget `Telemetry` message with sequenced, acknowledged batches;
/// version 3 added the `JobRun` and `JobsReport` records; version 4 signs
/// each `Batch` with the origin device's key; version 5 added `Signed`
/// messages for carriers that do not authenticate the sender (MQTT);
/// version 6 added LAN relay (`Relay`, `RelayAck`) and the `PeersReport`
/// record; version 7 added the backup transfer messages of bulk connections
/// (`HaveChunks` ... `Chunk`); version 10 added certificate renewal over
/// the session (`Renew`, `Renewed`); version 11 added `Fresh`, which binds
/// a message through a broker to one session and numbers it, so a replay
/// is refused; version 12 added the trust bundle (`TrustHave`, `Trust`):
/// the CAs a device trusts (CA rotation) and the devices its LAN peers must
/// no longer trust (revocation).
pub const PROTOCOL_VERSION: u16 = 12;

/// The oldest version this build still reads. Messages are only ever
/// appended, and an envelope carries the version that introduced its
/// message ([`Message::since`]), so an older peer reads every message it
/// knows: a hub upgraded first keeps every older agent connected (agents of
/// version 9 simply never renew).
pub const MIN_PROTOCOL_VERSION: u16 = 9;

/// A versioned message, as carried in one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version of the sender; always [`PROTOCOL_VERSION`] when made
    /// by [`Envelope::new`].
    pub version: u16,
    /// The message itself.
    pub message: Message,
}

/// Every message of the protocol. New variants are only ever appended, so
/// existing discriminants keep their encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Agent → hub, on a connection without a client certificate: redeem an
    /// enrollment token for a certificate.
    Enroll(EnrollRequest),
    /// Hub → agent: the signed certificate.
    Enrolled(Enrolled),
    /// Agent → hub: first message of a session.
    Hello(Hello),
    /// Hub → agent: the session is accepted.
    Welcome(Welcome),
    /// Either side: the request is refused; the connection closes after it.
    Refused(Refusal),
    /// Agent → hub: liveness, sent every heartbeat interval.
    Heartbeat(Heartbeat),
    /// Agent → hub: outbox records in sequence order.
    Batch(Batch),
    /// Hub → agent: every record up to `upto` is durably stored.
    Ack(Ack),
    /// Hub → agent: commands and desired state.
    Deliver(Deliver),
    /// Agent → hub: these commands are persisted on the device.
    Received(Received),
    /// Either way, through a carrier that does not prove who sent a message
    /// (an MQTT broker): a message signed by its sender.
    Signed(Signed),
    /// Agent → hub: another device's batch, carried for it (LAN relay).
    Relay(Batch),
    /// Hub → agent: the relayed batch's origin is stored up to `upto`.
    RelayAck(RelayAck),
    /// Agent → hub, bulk: which of these chunks of mine do you lack?
    HaveChunks(ChunkIds),
    /// Hub → agent, bulk: these (of the ones asked about) are missing.
    MissingChunks(ChunkIds),
    /// Agent → hub, bulk: store this chunk of mine. Answered with `Done`.
    PutChunk(ChunkBlob),
    /// Agent → hub, bulk: catalog this snapshot (every chunk it names was
    /// sent before). Answered with `Done`.
    PutSnapshot(SnapshotData),
    /// Hub → agent, bulk: the request was carried out durably.
    Done,
    /// Agent → hub, bulk: the backup catalog of a device.
    ListBackups(DeviceId),
    /// Hub → agent, bulk: the catalog asked for, oldest first.
    Backups(Vec<SnapshotSummary>),
    /// Agent → hub, bulk: a device's snapshot manifest.
    GetSnapshot(SnapshotRef),
    /// Hub → agent, bulk: the manifest asked for.
    Snapshot(SnapshotData),
    /// Agent → hub, bulk: one of a device's chunks.
    GetChunk(ChunkRef),
    /// Hub → agent, bulk: the chunk asked for.
    Chunk(ChunkBlob),
    /// Agent → hub, bulk: ids of chunks a snapshot about to be uploaded
    /// needs (in parts of at most 16 Ki ids; `first` starts the list
    /// again). Sent before its chunks, so the hub never prunes them while
    /// the upload runs, and kept with the snapshot, so the hub's retention
    /// knows what each snapshot needs without the backup key. Answered
    /// with `Done`.
    SnapshotChunks(SnapshotChunkList),
    /// Agent → hub, in a session: sign a new certificate for this key (the
    /// device's certificate is at two thirds of its life). Answered with
    /// `Renewed` or `Refused` (the session goes on after either).
    Renew(RenewRequest),
    /// Hub → agent: the new certificate.
    Renewed(Renewed),
    /// Either way, inside a `Signed` through a broker: a message bound to
    /// one session of the device and numbered in it (see [`Fresh`]).
    Fresh(Fresh),
    /// Agent → hub, in a session, after `Welcome`: the digest of the trust
    /// bundle the device holds. The hub answers with `Trust` when its own
    /// differs, and sends `Trust` again whenever its bundle changes.
    TrustHave(TrustHave),
    /// Hub → agent: the trust bundle (see [`TrustBundle`]).
    Trust(TrustBundle),
}

/// What a device holds of the fleet's trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrustHave {
    /// [`TrustBundle::digest`] of the device's bundle.
    pub digest: [u8; 32],
}

/// What a device trusts, as the hub says: the fleet's CA certificates and
/// the devices revoked. Sent only over an authenticated link (the QUIC
/// session, or signed by the fleet CA through a broker).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// The CA certificates (DER) the fleet trusts, the one that issues new
    /// device certificates first. During a CA rotation there are two: a
    /// device whose certificate is not from the first renews at once.
    pub cas: Vec<Vec<u8>>,
    /// Devices revoked (sorted): LAN peers refuse their links and carry
    /// nothing for them.
    pub revoked: Vec<DeviceId>,
}

impl TrustBundle {
    /// SHA-256 of the bundle's encoding: what `TrustHave` carries.
    pub fn digest(&self) -> [u8; 32] {
        crate::identity::Fingerprint::of_der(&postcard::to_stdvec(self).unwrap_or_default()).0
    }
}

/// A message through a carrier that can replay what it carried (an MQTT
/// broker), bound to one session and numbered, inside a [`Signed`] so that
/// none of it can be changed:
///
/// - `session`: a random number the agent draws at each connection to the
///   broker; down messages name the session they answer, and the agent
///   refuses any other (an old `Welcome` or `Deliver` replayed).
/// - `sender` and `seq`: up, `sender` is 0 and `seq` counts the agent's
///   messages in the session from 1; down, `sender` is the hub process's
///   random number and `seq` counts its messages to this session. Each
///   receiver refuses a `seq` it has passed (a replay within the session).
/// - `ticket`: down, the hub's proof of the time it answered (its clock,
///   MAC'd with a key the hubs share); up, the newest ticket the agent got,
///   empty in `Hello`. A hub refuses any up message but `Hello` whose ticket
///   is not its fleet's, not for this session, or too old (a replay of a
///   session the hub no longer tracks, after a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fresh {
    /// The agent's number for this connection.
    pub session: u64,
    /// 0 up; the hub process's number down.
    pub sender: u64,
    /// The sender's count of its messages in the session, from 1.
    pub seq: u64,
    /// See above.
    pub ticket: Vec<u8>,
    /// The message (never `Signed` or `Fresh`).
    pub message: Box<Message>,
}

/// A device asks for a new certificate: a PKCS#10 request for a key it
/// made. The hub signs it for the session's device whatever it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// The CSR (DER), self-signed with the new key.
    pub csr_der: Vec<u8>,
}

/// The hub's answer to [`RenewRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renewed {
    /// The new device certificate (DER), from the fleet CA.
    pub cert_der: Vec<u8>,
}

/// Part of the list of chunks a snapshot needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotChunkList {
    /// The snapshot's name.
    pub name: String,
    /// True for the first part: the hub forgets any earlier list.
    pub first: bool,
    /// Chunk ids.
    pub ids: Vec<ChunkId>,
}

/// A backup chunk id: keyed BLAKE3 of the chunk's plaintext (the key is
/// derived from the fleet backup key, which the hub never has).
pub type ChunkId = [u8; 32];

/// Chunk ids, in the order asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkIds {
    /// The ids.
    pub ids: Vec<ChunkId>,
}

/// One encrypted chunk, exactly as the device's repository stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkBlob {
    /// Its id.
    pub id: ChunkId,
    /// `nonce || ciphertext`; opaque to the hub.
    pub blob: Vec<u8>,
}

/// What the hub's catalog says about a snapshot (the device's own account;
/// the manifest itself is encrypted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// Its name, unique on the device: `<start ms>-<set>-<random hex>`.
    pub name: String,
    /// The backup set.
    pub set: String,
    /// When it started.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
    /// Files, directories and links.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Distinct chunks it needs.
    pub chunks: u64,
    /// Problems the snapshot's report lists.
    pub problems: u64,
}

/// A snapshot's summary and its encrypted manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The summary.
    pub summary: SnapshotSummary,
    /// `nonce || ciphertext` of the manifest; opaque to the hub.
    pub manifest: Vec<u8>,
}

/// A snapshot of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// The device that made it.
    pub device: DeviceId,
    /// Its name.
    pub name: String,
}

/// A chunk of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The device that uploaded it.
    pub device: DeviceId,
    /// Its id.
    pub id: ChunkId,
}

/// Hard limit of a frame on a bulk connection: a chunk of at most 4 MiB,
/// its encryption overhead and the envelope, with room to spare.
pub const MAX_BULK_FRAME: usize = 8 << 20;

/// QUIC application close code: the connection ended normally.
pub const CLOSE_OK: u32 = 0;
/// QUIC application close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: u32 = 1;
/// QUIC application close code: the request was refused.
pub const CLOSE_REFUSED: u32 = 2;
/// QUIC application close code: replaced by a newer connection of the same
/// device.
pub const CLOSE_REPLACED: u32 = 3;
/// QUIC application close code: the hub admits new connections at a
/// configured rate and this one came past it; the reason ([`busy_reason`])
/// says when to come back.
pub const CLOSE_BUSY: u32 = 4;

/// The reason text of a [`CLOSE_BUSY`] close: `busy; retry-after-ms=N`.
pub fn busy_reason(retry_after: std::time::Duration) -> String {
    format!("busy; retry-after-ms={}", retry_after.as_millis())
}

/// The delay a [`CLOSE_BUSY`] close's reason asks for (at most a day);
/// `None` if the reason does not say.
pub fn retry_after_of(reason: &[u8]) -> Option<std::time::Duration> {
    let text = std::str::from_utf8(reason).ok()?;
    let ms = text.split(';').find_map(|part| part.trim().strip_prefix("retry-after-ms="))?;
    let ms: u64 = ms.parse().ok()?;
    Some(std::time::Duration::from_millis(ms.min(86_400_000)))
}

/// Answer to a relayed batch, for its origin. A refused relay does not end
/// the carrier's session: the carrier only passes the refusal on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayAck {
    /// The device whose records were relayed.
    pub origin: DeviceId,
    /// The hub durably holds every record of `origin` up to here.
    pub upto: u64,
    /// Why the batch was not stored (unknown origin, bad signature, ...).
    pub refused: Option<String>,
}

/// Which way a [`Signed`] message travels. It is part of what is signed, so
/// a signature made for one direction is worthless in the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device → hub, signed with the device's key.
    Up,
    /// Hub → device, signed with the fleet CA's key.
    Down,
}

/// A message with its sender's signature. Up, `device` is the sender and
/// the key is the one in its certificate; down, `device` is the addressee and
/// the key is the fleet CA's, so a message for one device cannot be replayed
/// to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The device the message is from (up) or for (down).
    pub device: DeviceId,
    /// `postcard(Message)`, exactly the bytes signed; never itself `Signed`
    /// or a `Batch` (which carries its own signature).
    pub body: Vec<u8>,
    /// ECDSA P-256 with SHA-256 (ASN.1 DER) over [`Signed::signing_input`].
    pub signature: Vec<u8>,
}

impl Signed {
    /// What the signature covers: a context string naming the direction,
    /// the device, the body.
    pub fn signing_input(direction: Direction, device: &DeviceId, body: &[u8]) -> Vec<u8> {
        let context: &[u8] = match direction {
            Direction::Up => b"outpost up v1\0",
            Direction::Down => b"outpost down v1\0",
        };
        signing_input(context, device, body)
    }

    /// `message`, signed by `sign`.
    pub fn new(direction: Direction, device: DeviceId, message: &Message, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Self {
        let body = postcard::to_stdvec(message).unwrap_or_default();
        let signature = sign(&Self::signing_input(direction, &device, &body));
        Signed { device, body, signature }
    }

    /// True if the signature verifies with `public_key` (an uncompressed
    /// P-256 point).
    pub fn verify(&self, direction: Direction, public_key: &[u8]) -> bool {
        verify_p256(public_key, &Self::signing_input(direction, &self.device, &self.body), &self.signature)
    }

    /// The message (check the signature first). Nested `Signed` messages and
    /// batches are refused; a `Fresh` may carry a batch (its freshness is
    /// signed, the batch keeps its own signature) but no `Signed` or
    /// `Fresh`.
    pub fn message(&self) -> Result<Message, ProtocolError> {
        let (message, rest) = postcard::take_from_bytes::<Message>(&self.body).map_err(ProtocolError::Malformed)?;
        if !rest.is_empty() {
            return Err(ProtocolError::TrailingBytes(rest.len()));
        }
        match message {
            Message::Signed(_) | Message::Batch(_) => Err(ProtocolError::NotSignable(message.kind())),
            Message::Fresh(fresh) => match *fresh.message {
                Message::Signed(_) | Message::Fresh(_) => Err(ProtocolError::NotSignable(fresh.message.kind())),
                _ => Ok(Message::Fresh(fresh)),
            },
            message => Ok(message),
        }
    }
}

fn signing_input(context: &[u8], device: &DeviceId, payload: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(context.len() + device.as_str().len() + 1 + payload.len());
    input.extend_from_slice(context);
    input.extend_from_slice(device.as_str().as_bytes());
    input.push(0);
    input.extend_from_slice(payload);
    input
}

/// True if `signature` (ECDSA P-256 SHA-256, ASN.1 DER) over `input`
/// verifies with `public_key` (an uncompressed P-256 point).
pub fn verify_p256(public_key: &[u8], input: &[u8], signature: &[u8]) -> bool {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key);
    key.verify(input, signature).is_ok()
}

/// Outbox records of one device, in increasing sequence order, signed with
/// that device's own key, so that whoever carries them (the direct
/// link, an MQTT broker, later a LAN peer) cannot forge or alter them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The device whose records these are.
    pub origin: DeviceId,
    /// `postcard(Vec<Record>)`, exactly the bytes signed.
    pub payload: Vec<u8>,
    /// ECDSA P-256 with SHA-256 (ASN.1 DER) over [`Batch::signing_input`],
    /// by the key of `origin`'s certificate.
    pub signature: Vec<u8>,
}

impl Batch {
    /// How many records the payload says it holds (its leading length),
    /// without decoding them; 0 if it does not even say.
    pub fn len_hint(&self) -> u64 {
        postcard::take_from_bytes::<u64>(&self.payload).map_or(0, |(n, _)| n)
    }

    /// What the signature covers: a context string, the origin, the payload.
    pub fn signing_input(origin: &DeviceId, payload: &[u8]) -> Vec<u8> {
        signing_input(b"outpost batch v1\0", origin, payload)
    }

    /// A batch of `records`, signed by `sign`.
    pub fn new(origin: DeviceId, records: &[Record], sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Self {
        let payload = postcard::to_stdvec(records).unwrap_or_default();
        let signature = sign(&Self::signing_input(&origin, &payload));
        Batch { origin, payload, signature }
    }

    /// True if the signature verifies with `public_key` (an uncompressed
    /// P-256 point, as in the certificate).
    pub fn verify(&self, public_key: &[u8]) -> bool {
        verify_p256(public_key, &Self::signing_input(&self.origin, &self.payload), &self.signature)
    }

    /// The records (check the signature first).
    pub fn records(&self) -> Result<Vec<Record>, ProtocolError> {
        postcard::from_bytes(&self.payload).map_err(ProtocolError::Malformed)
    }
}

/// One durable record from a device's outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Per-device sequence number, from 1, increasing by one per record
    /// (gaps only where the device thinned telemetry).
    pub seq: u64,
    /// When the record was made (device clock).
    pub at: Timestamp,
    /// What it says.
    pub body: RecordBody,
}

/// Kinds of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    /// A telemetry sample (may be thinned when the outbox is full).
    Telemetry(Sample),
    /// The outcome of a command (never dropped).
    CommandResult(CommandResult),
    /// Which desired-state version the device applied (never dropped).
    StateReport(StateReport),
    /// Something needs attention (never dropped).
    Alarm(Alarm),
    /// One attempt of a scheduled job (never dropped).
    JobRun(JobRun),
    /// The jobs in force, sent when they change (never dropped).
    JobsReport(JobsReport),
    /// The LAN peer table, sent when it changes (never dropped).
    PeersReport(PeersReport),
}

impl RecordBody {
    /// True for records that may be thinned under pressure.
    pub fn is_telemetry(&self) -> bool {
        matches!(self, RecordBody::Telemetry(_))
    }
}

/// Cumulative acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The hub durably holds every record of this device up to here.
    pub upto: u64,
}

/// Work for the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deliver {
    /// Commands to run, each once.
    pub commands: Vec<Command>,
    /// The latest desired state, if any.
    pub desired: Option<Desired>,
}

/// A command from a fleet manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Hub-assigned id, unique in the fleet.
    pub id: u64,
    /// What to do (`echo`, `exec`).
    pub kind: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Not to be started after this time.
    pub expires_at: Timestamp,
}

/// The kinds of command a device runs (the wire carries the name, so an
/// older agent answers a newer kind with `Rejected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// Answers with its arguments joined: a round trip through the device.
    Echo,
    /// Runs a program (argv); only where `[commands] allow_exec` is on.
    Exec,
    /// Starts a configured job now; one argument, the job's name.
    RunJob,
    /// A backup subcommand (`run SET`, `list`, `restore ...`).
    Backup,
}

impl CommandKind {
    /// Every kind, in the order the API lists them.
    pub const ALL: [CommandKind; 4] = [CommandKind::Echo, CommandKind::Exec, CommandKind::RunJob, CommandKind::Backup];

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Its name on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Echo => "echo",
            CommandKind::Exec => "exec",
            CommandKind::RunJob => "run_job",
            CommandKind::Backup => "backup",
        }
    }

    /// Checks the arguments' shape (what the hub can know before the
    /// device sees them).
    pub fn check_args(self, args: &[String]) -> Result<(), String> {
        match (self, args.len()) {
            (CommandKind::RunJob, 1) => Ok(()),
            (CommandKind::RunJob, _) => Err("run_job takes one argument: the job's name".into()),
            (CommandKind::Exec, 0) => Err("exec takes the program and its arguments".into()),
            (CommandKind::Backup, 0) => Err("backup takes a subcommand (run SET, list, restore ...)".into()),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A versioned desired-state document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// Version; higher replaces lower.
    pub version: u64,
    /// The document as JSON (see [`crate::desired::DesiredDoc`]).
    pub doc: String,
}

/// Confirms that commands are persisted on the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Received {
    /// Their ids.
    pub commands: Vec<u64>,
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command's id.
    pub id: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Captured output (capped).
    pub output: String,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed (exit status, or -1 if killed).
    Failed {
        /// Exit status.
        code: i32,
    },
    /// Its expiry passed before it could start.
    Expired,
    /// The agent stopped while it ran; it is not run again.
    Interrupted,
    /// The device does not run this kind of command.
    Rejected,
}

/// The desired-state version a device applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    /// The version now in force.
    pub applied_version: u64,
    /// Why the latest version was not applied, if it was not.
    pub error: Option<String>,
}

/// A condition that needs a human.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// What kind.
    pub kind: AlarmKind,
    /// True when raised, false when cleared.
    pub raised: bool,
    /// Explanation.
    pub message: String,
}

/// Kinds of alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlarmKind {
    /// Records that are never dropped alone exceed the outbox budget.
    OutboxFull,
    /// Telemetry was thinned to stay within the outbox budget.
    TelemetryThinned,
    /// The device's store started over under a kept identity (deleted,
    /// restored, rolled back); its waiting records were renumbered after
    /// the hub's mark so none is taken for a duplicate.
    StoreReset,
}

/// Redeems an enrollment token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The token as the operator got it from `outpost-hub token create`.
    pub token: String,
    /// PKCS#10 certificate signing request (DER) for a key made on the device.
    pub csr_der: Vec<u8>,
    /// Human-readable name the device asks for (its hostname by default).
    pub name: String,
}

/// The hub's answer to a valid [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The id the hub assigned; also the certificate's common name.
    pub device_id: DeviceId,
    /// The device certificate (DER), signed by the fleet CA.
    pub cert_der: Vec<u8>,
    /// The fleet CA certificate (DER).
    pub ca_der: Vec<u8>,
}

/// Opens a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's software version.
    pub agent_version: String,
    /// The device's human-readable name.
    pub name: String,
    /// When this agent process started.
    pub started_at: Timestamp,
}

/// Accepts a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The device id the hub read from the client certificate.
    pub device_id: DeviceId,
    /// The hub's software version.
    pub hub_version: String,
    /// The hub's clock when it answered.
    pub server_time: Timestamp,
    /// The highest sequence number of this device the hub holds; the agent
    /// resumes after it.
    pub acked_seq: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The enrollment token is not one this hub issued, or is damaged.
    UnknownToken,
    /// The enrollment token's lifetime is over.
    ExpiredToken,
    /// The enrollment token has been redeemed as often as it allows.
    UsedUpToken,
    /// The certificate signing request could not be used.
    BadCsr,
    /// A message arrived that is not valid at this point of the conversation.
    UnexpectedMessage,
    /// The device is not (or no longer) registered.
    UnknownDevice,
    /// The hub failed internally; the request may be retried later.
    Internal,
    /// The thing asked for does not exist.
    NotFound,
    /// The device may not read another device's backups (no grant).
    NotAuthorised,
    /// Stored data failed its integrity check.
    Corrupt,
    /// The request is malformed or incomplete (a bad name, missing chunks).
    BadRequest,
}

/// A refusal with a human-readable explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// What an operator should read.
    pub message: String,
}

/// Liveness signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's clock when it was sent.
    pub at: Timestamp,
}

/// Why bytes could not be read as an envelope.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer speaks a protocol version this build does not know.
    #[error("unsupported protocol version {got} (this build speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u16,
    },
    /// The bytes are not a valid envelope.
    #[error("malformed envelope: {0}")]
    Malformed(#[source] postcard::Error),
    /// A valid envelope was followed by extra bytes.
    #[error("malformed envelope: {0} trailing bytes")]
    TrailingBytes(usize),
    /// A `Signed` message wraps a message that may not be wrapped.
    #[error("a {0} cannot travel inside a Signed message")]
    NotSignable(&'static str),
}

impl Message {
    /// The variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Enroll(_) => "Enroll",
            Message::Enrolled(_) => "Enrolled",
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::Heartbeat(_) => "Heartbeat",
            Message::Batch(_) => "Batch",
            Message::Ack(_) => "Ack",
            Message::Deliver(_) => "Deliver",
            Message::Received(_) => "Received",
            Message::Signed(_) => "Signed",
            Message::Relay(_) => "Relay",
            Message::RelayAck(_) => "RelayAck",
            Message::HaveChunks(_) => "HaveChunks",
            Message::MissingChunks(_) => "MissingChunks",
            Message::PutChunk(_) => "PutChunk",
            Message::PutSnapshot(_) => "PutSnapshot",
            Message::Done => "Done",
            Message::ListBackups(_) => "ListBackups",
            Message::Backups(_) => "Backups",
            Message::GetSnapshot(_) => "GetSnapshot",
            Message::Snapshot(_) => "Snapshot",
            Message::GetChunk(_) => "GetChunk",
            Message::Chunk(_) => "Chunk",
            Message::SnapshotChunks(_) => "SnapshotChunks",
            Message::Renew(_) => "Renew",
            Message::Renewed(_) => "Renewed",
            Message::Fresh(_) => "Fresh",
            Message::TrustHave(_) => "TrustHave",
            Message::Trust(_) => "Trust",
        }
    }

    /// The protocol version that introduced this message: the version its
    /// envelope carries, so a peer of that version or newer reads it.
    pub fn since(&self) -> u16 {
        match self {
            Message::Renew(_) | Message::Renewed(_) => 10,
            Message::Fresh(_) => 11,
            Message::TrustHave(_) | Message::Trust(_) => 12,
            _ => MIN_PROTOCOL_VERSION,
        }
    }
}

impl Envelope {
    /// Wraps `message` in an envelope of the version that introduced it
    /// ([`Message::since`]).
    pub fn new(message: Message) -> Self {
        Envelope { version: message.since(), message }
    }

    /// Encodes the envelope (without a frame header).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing into a Vec cannot fail for these types: every field is
        // plain data with a known length.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes one envelope that must fill `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (version, rest) = postcard::take_from_bytes::<u16>(bytes).map_err(ProtocolError::Malformed)?;
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(ProtocolError::UnsupportedVersion { got: version });
        }
        let (message, rest) = postcard::take_from_bytes::<Message>(rest).map_err(ProtocolError::Malformed)?;
        if !rest.is_empty() {
            return Err(ProtocolError::TrailingBytes(rest.len()));
        }
        Ok(Envelope { version, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Action, JobSource, JobSpec, Overlap, RunOutcome, Schedule, Trigger};
    use crate::telemetry::{DiskSample, NetSample};
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn a_busy_close_says_when_to_come_back() {
        let reason = busy_reason(Duration::from_millis(12_345));
        assert_eq!(reason, "busy; retry-after-ms=12345");
        assert_eq!(retry_after_of(reason.as_bytes()), Some(Duration::from_millis(12_345)));
        assert_eq!(retry_after_of(b"retry-after-ms=7"), Some(Duration::from_millis(7)));
        assert_eq!(retry_after_of(b"busy; retry-after-ms=99999999999"), Some(Duration::from_secs(86_400)));
        for garbage in [&b"busy"[..], b"", b"retry-after-ms=", b"retry-after-ms=-1", b"\xff\xfe", b"retry-after-ms=1e3"]
        {
            assert_eq!(retry_after_of(garbage), None, "{garbage:?}");
        }
    }

    fn hexs(bytes: &[u8]) -> String {
        crate::identity::hex(bytes)
    }

    fn sample() -> Sample {
        Sample {
            at: Timestamp(1_700_000_000_000),
            cpu_percent: 12.5,
            mem_used_bytes: 512 << 20,
            mem_total_bytes: 2048 << 20,
            swap_used_bytes: 0,
            load: [0.5, 0.25, 0.125],
            uptime_secs: 3600,
            disks: vec![DiskSample { mount: "/".into(), used_bytes: 10, total_bytes: 20 }],
            net: vec![NetSample { iface: "eth0".into(), rx_bytes: 1, tx_bytes: 2 }],
            temperatures: vec![],
        }
    }

    /// Golden vectors: the exact bytes of one envelope per message kind. If
    /// one of these changes, the wire format changed: bump
    /// [`PROTOCOL_VERSION`] and update `docs/PROTOCOL.md`.
    #[test]
    fn golden_vectors() {
        let id: DeviceId = "dev-01".parse().unwrap();
        let cases: Vec<(Message, &str)> = vec![
            (
                Message::Enroll(EnrollRequest { token: "t".into(), csr_der: vec![0xAA], name: "n".into() }),
                "0900017401aa016e",
            ),
            (
                Message::Enrolled(Enrolled { device_id: id.clone(), cert_der: vec![1], ca_der: vec![2] }),
                "0901066465762d303101010102",
            ),
            (
                Message::Hello(Hello { agent_version: "0.1".into(), name: "gw".into(), started_at: Timestamp(1) }),
                "090203302e3102677701",
            ),
            (
                Message::Welcome(Welcome {
                    device_id: id,
                    hub_version: "0.1".into(),
                    server_time: Timestamp(300),
                    acked_seq: 7,
                }),
                "0903066465762d303103302e31ac0207",
            ),
            (Message::Refused(Refusal { reason: RefusalReason::ExpiredToken, message: "x".into() }), "0904010178"),
            (Message::Heartbeat(Heartbeat { at: Timestamp(2) }), "090502"),
            (
                Message::Batch(Batch::new(
                    "dev-01".parse().unwrap(),
                    &[
                        Record { seq: 1, at: Timestamp(5), body: RecordBody::Telemetry(sample()) },
                        Record {
                            seq: 2,
                            at: Timestamp(6),
                            body: RecordBody::CommandResult(CommandResult {
                                id: 3,
                                outcome: Outcome::Failed { code: -1 },
                                output: "e".into(),
                            }),
                        },
                        Record {
                            seq: 3,
                            at: Timestamp(7),
                            body: RecordBody::StateReport(StateReport { applied_version: 4, error: None }),
                        },
                        Record {
                            seq: 4,
                            at: Timestamp(8),
                            body: RecordBody::Alarm(Alarm {
                                kind: AlarmKind::OutboxFull,
                                raised: true,
                                message: "m".into(),
                            }),
                        },
                        Record {
                            seq: 5,
                            at: Timestamp(9),
                            body: RecordBody::JobRun(JobRun {
                                run_id: 6,
                                job: "j".into(),
                                trigger: Trigger::Command { id: 2 },
                                attempt: 1,
                                started: Timestamp(3),
                                ended: Timestamp(4),
                                outcome: RunOutcome::Exited { code: 1 },
                                output: "o".into(),
                                output_bytes: 1,
                            }),
                        },
                        Record {
                            seq: 6,
                            at: Timestamp(10),
                            body: RecordBody::JobsReport(JobsReport {
                                jobs: vec![(
                                    JobSpec {
                                        name: "j".into(),
                                        schedule: Schedule::Every(Duration::from_secs(30)),
                                        action: Action::Command {
                                            argv: vec!["true".into()],
                                            env: BTreeMap::from([("A".into(), "b".into())]),
                                            working_dir: Some("/tmp".into()),
                                        },
                                        timeout: Duration::from_secs(60),
                                        retries: 2,
                                        retry_backoff: Duration::from_secs(1),
                                        overlap: Overlap::Replace,
                                        catch_up: true,
                                        jitter: Duration::ZERO,
                                        max_output: 100,
                                        enabled: true,
                                    },
                                    JobSource::Hub,
                                )],
                            }),
                        },
                    ],
                    |_| vec![0x5A],
                )),
                GOLDEN_BATCH,
            ),
            (Message::Ack(Ack { upto: 300 }), "0907ac02"),
            (
                Message::Deliver(Deliver {
                    commands: vec![Command {
                        id: 9,
                        kind: "echo".into(),
                        args: vec!["hi".into()],
                        expires_at: Timestamp(10),
                    }],
                    desired: Some(Desired { version: 2, doc: "{}".into() }),
                }),
                "09080109046563686f010268690a0102027b7d",
            ),
            (Message::Received(Received { commands: vec![9, 10] }), "090902090a"),
            (
                Message::Signed(Signed::new(
                    Direction::Up,
                    "dev-01".parse().unwrap(),
                    &Message::Received(Received { commands: vec![9] }),
                    |_| vec![0x5A],
                )),
                "090a066465762d303103090109015a",
            ),
            (
                Message::RelayAck(RelayAck { origin: "dev-01".parse().unwrap(), upto: 300, refused: None }),
                "090c066465762d3031ac0200",
            ),
            (
                Message::HaveChunks(ChunkIds { ids: vec![[7; 32]] }),
                concat!("090d01", "0707070707070707070707070707070707070707070707070707070707070707"),
            ),
            (Message::Done, "0911"),
            (
                Message::SnapshotChunks(SnapshotChunkList { name: "1-s-ab".into(), first: true, ids: vec![[2; 32]] }),
                concat!("091806312d732d61620101", "0202020202020202020202020202020202020202020202020202020202020202"),
            ),
            (
                Message::GetChunk(ChunkRef { device: "dev-01".parse().unwrap(), id: [1; 32] }),
                concat!("0916066465762d3031", "0101010101010101010101010101010101010101010101010101010101010101"),
            ),
            (
                Message::PutSnapshot(SnapshotData {
                    summary: SnapshotSummary {
                        name: "1-s-ab".into(),
                        set: "s".into(),
                        started: Timestamp(1),
                        ended: Timestamp(2),
                        entries: 3,
                        bytes: 4,
                        chunks: 5,
                        problems: 0,
                    },
                    manifest: vec![0xEE],
                }),
                "091006312d732d6162017301020304050001ee",
            ),
            (Message::Renew(RenewRequest { csr_der: vec![0xAA] }), "0a1901aa"),
            (Message::Renewed(Renewed { cert_der: vec![1] }), "0a1a0101"),
            (
                Message::Fresh(Fresh {
                    session: 5,
                    sender: 0,
                    seq: 1,
                    ticket: vec![0xAB],
                    message: Box::new(Message::Heartbeat(Heartbeat { at: Timestamp(2) })),
                }),
                "0b1b05000101ab0502",
            ),
            (
                Message::TrustHave(TrustHave { digest: [7; 32] }),
                "0c1c0707070707070707070707070707070707070707070707070707070707070707",
            ),
            (
                Message::Trust(TrustBundle {
                    cas: vec![vec![0x30], vec![0x31, 0x32]],
                    revoked: vec!["dev-02".parse().unwrap()],
                }),
                "0c1d02013002313201066465762d3032",
            ),
        ];
        for (message, golden) in cases {
            let env = Envelope::new(message);
            let bytes = env.encode();
            if std::env::var_os("PRINT_GOLDEN").is_some() {
                eprintln!("{}", hexs(&bytes));
            }
            assert_eq!(hexs(&bytes), golden, "encoding of {:?}", env.message);
            assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        }
    }

    const GOLDEN_BATCH: &str = "0906066465762d303180010601050080d095ffbc310000484180808080028080808008000000003f\
        0000803e0000003e901c01012f0a1401046574683001020002060103010101650307020400040803\
        0001016d05090406016a03020103040002016f01060a0501016a011e000001047472756501014101\
        6201042f746d703c0002010002010000640101015a";

    #[test]
    fn batches_verify_only_unaltered_and_with_the_origins_key() {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let key = |rng| {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng).unwrap();
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng).unwrap()
        };
        let (mine, other) = (key(&rng), key(&rng));
        let record = Record { seq: 1, at: Timestamp(5), body: RecordBody::Telemetry(sample()) };
        let sign = |input: &[u8]| mine.sign(&rng, input).unwrap().as_ref().to_vec();
        let batch = Batch::new("dev-01".parse().unwrap(), std::slice::from_ref(&record), sign);
        assert!(batch.verify(mine.public_key().as_ref()));
        assert_eq!(batch.records().unwrap(), vec![record.clone()]);
        assert!(!batch.verify(other.public_key().as_ref()), "verified with another device's key");
        let mut altered = batch.clone();
        altered.payload[3] ^= 1;
        assert!(!altered.verify(mine.public_key().as_ref()), "an altered payload verified");
        let mut moved = batch.clone();
        moved.origin = "dev-02".parse().unwrap();
        assert!(!moved.verify(mine.public_key().as_ref()), "a batch passed off as another device's verified");
    }

    #[test]
    fn signed_messages_verify_only_in_their_direction_for_their_device() {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = key.public_key().as_ref();
        let sign = |input: &[u8]| key.sign(&rng, input).unwrap().as_ref().to_vec();
        let message = Message::Ack(Ack { upto: 7 });
        let signed = Signed::new(Direction::Down, "dev-01".parse().unwrap(), &message, sign);
        assert!(signed.verify(Direction::Down, public));
        assert_eq!(signed.message().unwrap(), message);
        assert!(!signed.verify(Direction::Up, public), "a down signature verified up");
        let mut other = signed.clone();
        other.device = "dev-02".parse().unwrap();
        assert!(!other.verify(Direction::Down, public), "a message for dev-01 verified for dev-02");
        let mut altered = signed.clone();
        altered.body[1] ^= 1;
        assert!(!altered.verify(Direction::Down, public), "an altered body verified");
        let nested = Signed::new(Direction::Down, "dev-01".parse().unwrap(), &Message::Signed(signed), sign);
        assert!(matches!(nested.message(), Err(ProtocolError::NotSignable("Signed"))));
    }

    #[test]
    fn unknown_version_is_told_apart_from_garbage() {
        let mut bytes = Envelope::new(Message::Heartbeat(Heartbeat { at: Timestamp(2) })).encode();
        // Any one-byte version but ours (a future one, or an older one).
        bytes[0] = PROTOCOL_VERSION as u8 + 1;
        let got = PROTOCOL_VERSION + 1;
        assert!(matches!(Envelope::decode(&bytes), Err(ProtocolError::UnsupportedVersion { got: g }) if g == got));
        assert!(matches!(Envelope::decode(&[PROTOCOL_VERSION as u8, 0xEE]), Err(ProtocolError::Malformed(_))));
        assert!(matches!(Envelope::decode(&[]), Err(ProtocolError::Malformed(_))));
        // The previous version is still read (messages are only appended);
        // the one before it is not.
        bytes[0] = MIN_PROTOCOL_VERSION as u8;
        assert_eq!(Envelope::decode(&bytes).unwrap().version, MIN_PROTOCOL_VERSION);
        bytes[0] = MIN_PROTOCOL_VERSION as u8 - 1;
        assert!(matches!(Envelope::decode(&bytes), Err(ProtocolError::UnsupportedVersion { .. })));
    }

    #[test]
    fn truncated_and_padded_envelopes_are_rejected() {
        let record = Record { seq: 1, at: Timestamp(5), body: RecordBody::Telemetry(sample()) };
        let bytes =
            Envelope::new(Message::Batch(Batch::new("dev-01".parse().unwrap(), &[record], |_| vec![1]))).encode();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "accepted a cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(Envelope::decode(&padded), Err(ProtocolError::TrailingBytes(1))));
    }
}
