//! The hub's fleet state behind one async interface, with two backends:
//! sled ([`sled`], embedded, one hub, the default) and PostgreSQL
//! ([`postgres`], several hubs on one database).
//!
//! [`Store`] is an enum over the backends rather than a trait object: the
//! set of backends is closed and known at build time, every call is a
//! static dispatch without boxed futures, and `async fn` stays plain. Each
//! backend has the same methods; [`Store`] only forwards. No backend type
//! appears in this surface or in [`StoreError`].
//!
//! What ingest decides (duplicate, gap, which record goes where, the new
//! high-water mark) is the pure [`ingest::plan`]; each backend applies a
//! plan in one transaction, with the device's high-water mark.
//!
//! A backend that fails to make writes durable (disk full, I/O error,
//! database gone) reports it in [`Store::health`], refuses writes with
//! [`StoreError::Unavailable`] and recovers by itself when the cause goes:
//! sled by reopening its files, PostgreSQL by its pool's new connections.

pub mod digest;
pub mod ingest;
pub mod pgtls;
pub mod postgres;
pub mod sled;

use outpost_shared::DeviceId;
use outpost_shared::Fingerprint;
use outpost_shared::job::{JobRun, JobSource, JobSpec};
use outpost_shared::mqtt::Stale;
use outpost_shared::protocol::{Alarm, Outcome, Record, RecordBody};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The public keys a device may sign with (uncompressed P-256 points).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceKeys {
    /// The key of the certificate it was last seen using.
    pub current: Vec<u8>,
    /// The key of a certificate the hub signed when it renewed, until it is
    /// seen using it (over MQTT or through a LAN relay, the hub only learns
    /// this from a signature that verifies with it).
    pub next: Option<Vec<u8>>,
}

impl DeviceKeys {
    /// Only `current`.
    pub fn only(current: Vec<u8>) -> Self {
        DeviceKeys { current, next: None }
    }

    /// The key `verify` accepts, trying the current key first.
    pub fn verifying(&self, verify: impl Fn(&[u8]) -> bool) -> Option<&[u8]> {
        std::iter::once(&self.current).chain(self.next.as_ref()).map(Vec::as_slice).find(|key| verify(key))
    }
}

/// What the hub knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The id (certificate common name).
    pub id: DeviceId,
    /// Name the device gave at enrollment or in its last hello.
    pub name: String,
    /// When it enrolled.
    pub enrolled_at: Timestamp,
    /// Fingerprint of the certificate issued at enrollment.
    pub cert_fingerprint: Fingerprint,
    /// Agent version from the last hello.
    pub agent_version: Option<String>,
    /// Last time any message arrived from it.
    pub last_seen: Option<Timestamp>,
    /// Address of its last connection.
    pub last_addr: Option<String>,
    /// The latest telemetry sample.
    pub last_sample: Option<Sample>,
}

/// A non-telemetry record of a device, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The record's sequence number.
    pub seq: u64,
    /// When the device made it.
    pub at: Timestamp,
    /// The record.
    pub body: RecordBody,
}

/// A device's job list as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsRecord {
    /// When the device made the report.
    pub at: Timestamp,
    /// Each job and where it came from.
    pub jobs: Vec<(JobSpec, JobSource)>,
}

/// A device's LAN peer table as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersRecord {
    /// When the device made the report.
    pub at: Timestamp,
    /// The peers.
    pub peers: Vec<outpost_shared::peers::PeerEntry>,
}

/// A snapshot in the hub's backup catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// What the device said about it.
    pub summary: outpost_shared::protocol::SnapshotSummary,
    /// When its upload completed.
    pub uploaded_at: Timestamp,
}

/// Permission for one device to read another's backups (to restore a dead
/// device's data onto its replacement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// When an operator granted it.
    pub granted_at: Timestamp,
    /// When it ends.
    pub expires_at: Timestamp,
    /// The name of the API token that granted it.
    pub by: String,
}

/// Attempts kept per job and device.
pub const MAX_RUNS_PER_JOB: usize = 1000;

/// MQTT sessions per device whose numbers the fleet keeps
/// ([`Store::take_up_number`]); a new one past this forgets the least
/// recently heard. An agent draws a session per connection to the broker.
pub const UP_SESSIONS: usize = 64;

/// An alarm a device raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmRecord {
    /// The record's sequence number.
    pub seq: u64,
    /// When the device raised it.
    pub at: Timestamp,
    /// The alarm.
    pub alarm: Alarm,
}

/// The desired-state version a device reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedState {
    /// Version in force on the device.
    pub applied_version: u64,
    /// Why the latest version was refused, if it was.
    pub error: Option<String>,
    /// When the device reported it.
    pub at: Timestamp,
}

/// A device's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Version, from 1.
    pub version: u64,
    /// The document (JSON).
    pub doc: String,
    /// When it was set.
    pub updated_at: Timestamp,
}

/// Where a command stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandState {
    /// Waiting for the device.
    Queued,
    /// The device holds it durably.
    Delivered {
        /// When it confirmed.
        at: Timestamp,
    },
    /// The device reported its outcome.
    Completed {
        /// When the result arrived.
        at: Timestamp,
        /// How it ended.
        outcome: Outcome,
        /// Captured output.
        output: String,
    },
    /// Its expiry passed before delivery; it will never run.
    Expired {
        /// When it was found expired.
        at: Timestamp,
    },
}

/// A command for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Fleet-unique id.
    pub id: u64,
    /// The device.
    pub device: DeviceId,
    /// Kind (`echo`, `exec`).
    pub kind: String,
    /// Arguments.
    pub args: Vec<String>,
    /// When it was queued.
    pub created_at: Timestamp,
    /// Not to be started after this.
    pub expires_at: Timestamp,
    /// Who queued it (API token name).
    pub created_by: String,
    /// Where it stands.
    pub state: CommandState,
}

/// What one ingested batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// The device's high-water mark before the batch.
    pub before: u64,
    /// The device's high-water mark after the batch: the ack to send.
    pub upto: u64,
    /// Records stored.
    pub stored: usize,
    /// Records already held (re-sent after a lost ack).
    pub duplicates: usize,
    /// Sequence ranges skipped (telemetry the device thinned).
    pub gaps: Vec<(u64, u64)>,
}

/// Roles of API callers, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads fleet state.
    Viewer,
    /// Also sends commands and changes desired state.
    Operator,
    /// Also manages tokens.
    Admin,
}

impl Role {
    /// Every role, least powerful first, with its name.
    pub const ALL: [(Role, &'static str); 3] =
        [(Role::Viewer, "viewer"), (Role::Operator, "operator"), (Role::Admin, "admin")];

    /// `viewer`, `operator` or `admin`.
    pub fn name(self) -> &'static str {
        Role::ALL.iter().find(|(r, _)| *r == self).map_or("viewer", |(_, n)| n)
    }

    /// The role called `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.iter().find(|(_, n)| *n == name).map(|(r, _)| *r)
    }
}

/// Whether removing the token `hash` from `tokens` at `now` is refused.
pub type RefuseTake = fn(&[([u8; 32], ApiToken)], &[u8; 32], Timestamp) -> bool;

/// True if a token among `tokens` that has not expired by `now` is named
/// `name`: token names are unique among live tokens.
pub fn name_taken<'a>(mut tokens: impl Iterator<Item = &'a ApiToken>, name: &str, now: Timestamp) -> bool {
    tokens.any(|t| t.name == name && !t.expired(now))
}

/// A stored API token (its hash is the key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    /// What the caller may do.
    pub role: Role,
    /// Label for the audit log (unique among tokens).
    pub name: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working (`None` only for the initial admin token that
    /// `init` prints).
    pub expires_at: Option<Timestamp>,
    /// When and from where it was last used (written at most once a minute).
    pub last_used: Option<(Timestamp, String)>,
    /// What it is for.
    pub kind: TokenKind,
    /// For a sign-in link or a console session: who made it.
    pub made_by: Option<MadeBy>,
}

/// A console session of `name` is named `name` + this + a short random
/// part + `)`.
pub const SESSION_OF: &str = " (console ";

/// Whose sign-in link or console session a token is: the audit log names
/// that person, and the session ends when their token does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeBy {
    /// The name of the token that made the link, or signed in.
    pub name: String,
    /// That token's hash: the session is refused once it is gone or expired.
    /// `None` when the maker was not an API token (`outpost-hub` on the hub
    /// machine).
    pub token: Option<[u8; 32]>,
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// A bearer token made by an admin (or `init`).
    Api,
    /// A one-time console sign-in link: exchanged for a console session at
    /// its first use, never a bearer token.
    SignInLink,
    /// A console session, made at sign-in with a link or an API token:
    /// only ever a cookie, never a bearer token (revoked at sign-out).
    ConsoleSession,
}

impl TokenKind {
    /// `api`, `sign_in_link` or `console_session`.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Api => "api",
            TokenKind::SignInLink => "sign_in_link",
            TokenKind::ConsoleSession => "console_session",
        }
    }
}

/// Expired API tokens stay listed (as expired) this long, then go.
pub const EXPIRED_TOKENS_KEPT: Duration = Duration::from_secs(30 * 86400);

impl ApiToken {
    /// True once the token should be removed from the store: a link or a
    /// console session as soon as it expired, an API token
    /// [`EXPIRED_TOKENS_KEPT`] after.
    pub fn to_drop(&self, now: Timestamp) -> bool {
        match (self.kind, self.expires_at) {
            (_, None) => false,
            (TokenKind::Api, Some(at)) => at.saturating_add(EXPIRED_TOKENS_KEPT) <= now,
            (_, Some(at)) => at <= now,
        }
    }
}

/// The stored form of tokens made before expiry existed.
#[derive(Deserialize)]
struct TokenV1 {
    role: Role,
    name: String,
    created_at: Timestamp,
}

/// The stored form of tokens made before sessions knew who made them.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct TokenV2 {
    pub(crate) role: Role,
    pub(crate) name: String,
    pub(crate) created_at: Timestamp,
    pub(crate) expires_at: Option<Timestamp>,
    pub(crate) last_used: Option<(Timestamp, String)>,
    pub(crate) kind: TokenKind,
}

impl ApiToken {
    /// Decodes a stored token, in its current or an earlier form.
    pub fn decode(bytes: &[u8]) -> Result<ApiToken, StoreError> {
        postcard::from_bytes::<ApiToken>(bytes)
            .or_else(|_| {
                postcard::from_bytes::<TokenV2>(bytes).map(|t| ApiToken {
                    role: t.role,
                    name: t.name,
                    created_at: t.created_at,
                    expires_at: t.expires_at,
                    last_used: t.last_used,
                    kind: t.kind,
                    made_by: None,
                })
            })
            .or_else(|_| {
                postcard::from_bytes::<TokenV1>(bytes).map(|t| ApiToken {
                    role: t.role,
                    name: t.name,
                    created_at: t.created_at,
                    expires_at: None,
                    last_used: None,
                    kind: TokenKind::Api,
                    made_by: None,
                })
            })
            .map_err(|e| StoreError::Corrupt { what: "api_tokens", message: e.to_string() })
    }

    /// True once past its expiry.
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// True unless it was made by an API token that is gone or expired at
    /// `now` (`maker`: the token its `made_by` names, as the store has it
    /// now, with its hash). Pure.
    pub fn maker_holds(&self, maker: Option<&([u8; 32], ApiToken)>, now: Timestamp) -> bool {
        match self.made_by.as_ref().and_then(|m| m.token) {
            None => true,
            Some(hash) => maker.is_some_and(|(h, m)| *h == hash && m.kind == TokenKind::Api && !m.expired(now)),
        }
    }

    /// Its public id: `tok-` and the first 6 bytes of its hash in hex.
    pub fn id_of(hash: &[u8; 32]) -> String {
        let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("tok-{hex}")
    }
}

/// A device's labels (`env=prod`, `site=berlin`), set through the API.
pub type Labels = std::collections::BTreeMap<String, String>;

/// One device with everything the fleet views need, read in one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRow {
    /// The device's record.
    pub record: DeviceRecord,
    /// Its labels.
    pub labels: Labels,
    /// Its digest.
    pub digest: digest::DeviceDigest,
    /// Its ingest high-water mark.
    pub high_water: u64,
    /// The hub that holds its session, if any did.
    pub session: Option<SessionRecord>,
    /// Its certificate's expiry as the hub met it, and a re-admission.
    pub admission: Admission,
    /// When the certificate it uses (or was last given) stops being valid.
    pub cert_expires: Option<Timestamp>,
}

/// What the hub knows of a device's certificate beyond its validity: when
/// the hub last refused it as expired, an operator's re-admission, and a
/// revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Admission {
    /// When the hub last refused the device's certificate as expired.
    pub expired_seen: Option<Timestamp>,
    /// Until when the hub takes the device's expired (but CA-signed)
    /// certificate, so that it can renew it once.
    pub readmit_until: Option<Timestamp>,
    /// When an admin revoked the device: refused on every path for good.
    pub revoked_at: Option<Timestamp>,
}

/// One entry of the audit log: a change, a command, a sign-in or a refused
/// attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id (0 until stored).
    pub id: u64,
    /// When.
    pub at: Timestamp,
    /// The token's name (`-` when none was given or it was not valid).
    pub who: String,
    /// What: `METHOD /path/pattern` or a console action.
    pub action: String,
    /// A device id, `selector ...`, a token, or empty.
    pub target: String,
    /// Devices a selector matched.
    pub matched: Option<u64>,
    /// The caller's address.
    pub from: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// What else is worth keeping (the error given, a command's kind).
    pub detail: String,
}

impl AuditEntry {
    /// `ok`, `refused` (401, 403, 429) or `failed`.
    pub fn outcome(&self) -> &'static str {
        match self.status {
            200..=399 => "ok",
            401 | 403 | 429 => "refused",
            _ => "failed",
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditQuery {
    /// Entries with ids below this (the previous page's last id).
    pub before: Option<u64>,
    /// Most entries.
    pub limit: usize,
    /// Only this token name (and the console sessions of that name:
    /// `name (console …)`).
    pub who: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only actions containing this text.
    pub action: Option<String>,
    /// Only `ok`, `refused` or `failed`.
    pub outcome: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Timestamp>,
}

impl AuditQuery {
    /// True if `entry` passes the filters (the paging bounds aside).
    pub fn matches(&self, entry: &AuditEntry) -> bool {
        self.who.as_ref().is_none_or(|w| *w == entry.who || entry.who.starts_with(&format!("{w}{SESSION_OF}")))
            && self.target.as_ref().is_none_or(|t| *t == entry.target)
            && self.action.as_ref().is_none_or(|a| entry.action.contains(a.as_str()))
            && self.outcome.as_ref().is_none_or(|o| o == entry.outcome())
            && self.since.is_none_or(|s| entry.at >= s)
    }
}

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot make writes durable or cannot be reached right now
    /// (disk full, I/O error, database down); retry later.
    #[error("hub store unavailable: {0}")]
    Unavailable(String),
    /// A stored value does not decode.
    #[error("hub store: corrupt value in {what}: {message}")]
    Corrupt {
        /// Where.
        what: &'static str,
        /// The cause.
        message: String,
    },
    /// The store was made by a newer hub, or cannot be set up.
    #[error("hub store: {0}")]
    Setup(String),
    /// The desired state changed since the caller read it.
    #[error("desired state is at version {current}, not {expected}")]
    VersionConflict {
        /// Version the caller based its change on.
        expected: u64,
        /// Version in the store.
        current: u64,
    },
    /// The enrollment token has no redemptions left.
    #[error("enrollment token has been used {used} of {allowed} times")]
    UsedUp {
        /// Redemptions so far.
        used: u32,
        /// Redemptions allowed.
        allowed: u32,
    },
}

impl From<outpost_shared::commit::CommitError> for StoreError {
    fn from(e: outpost_shared::commit::CommitError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Which backend, and how to reach it (`[store]` in hub.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// sled files under `<data_dir>/db`.
    Sled,
    /// A PostgreSQL database.
    Postgres {
        /// `postgres://user@host:port/db` or a key=value connection string
        /// (`host=/run/postgresql dbname=outpost`).
        url: String,
        /// Connections in the pool.
        pool_size: usize,
        /// Wake other hubs with LISTEN/NOTIFY (off for engines and poolers
        /// without it: hubs then find changes by polling, within a second).
        listen: bool,
    },
}

/// The hub's store. Cheap to clone; clones share one database and one
/// record of the devices whose fleet rows this process changed.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    changed: Arc<Changed>,
}

#[derive(Debug, Clone)]
enum Backend {
    /// Embedded sled.
    Sled(sled::SledStore),
    /// PostgreSQL.
    Postgres(postgres::PgStore),
}

/// Devices whose fleet rows (record, labels, digest, mark, session,
/// admission, certificate expiry) a write through this process changed
/// since the fleet index last took them: the index reads those rows again,
/// and only those.
#[derive(Debug, Default)]
struct Changed(std::sync::Mutex<std::collections::HashSet<DeviceId>>);

impl Changed {
    fn ids(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<DeviceId>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether the store can make writes durable now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// True when the last write was durable (or none failed since start).
    pub ok: bool,
    /// The backend: `sled` or `postgres`.
    pub backend: String,
    /// Why not, when not.
    pub error: Option<String>,
}

/// Runs a store call on whichever backend, timed as `$op` in
/// `outpost_hub_store_operation_duration_seconds`.
macro_rules! each {
    ($self:ident, $op:literal, $b:ident => $e:expr) => {{
        let _timer = crate::metrics::StoreTimer::start($op);
        match &$self.backend {
            Backend::Sled($b) => $e,
            Backend::Postgres($b) => $e,
        }
    }};
}

impl Store {
    /// Opens the configured backend (sled under `data_dir/db`). For
    /// PostgreSQL, applies pending migrations first.
    pub async fn open(config: &StoreConfig, data_dir: &std::path::Path) -> Result<Self, StoreError> {
        match config {
            StoreConfig::Sled => {
                let dir = data_dir.to_owned();
                let store = tokio::task::spawn_blocking(move || sled::SledStore::open(&dir))
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))??;
                Ok(Store::new(Backend::Sled(store)))
            }
            StoreConfig::Postgres { url, pool_size, listen } => {
                Ok(Store::new(Backend::Postgres(postgres::PgStore::open(url, *pool_size, *listen).await?)))
            }
        }
    }

    /// Opens sled under `data_dir/db`, from a thread outside any runtime.
    pub fn open_sled(data_dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Store::new(Backend::Sled(sled::SledStore::open(data_dir)?)))
    }

    fn new(backend: Backend) -> Self {
        Store { backend, changed: Arc::default() }
    }

    /// Notes that `ids`' fleet rows changed (after the write is done, so
    /// whoever takes them reads the change).
    fn mark<'a>(&self, ids: impl IntoIterator<Item = &'a DeviceId>) {
        self.changed.ids().extend(ids.into_iter().cloned());
    }

    /// Takes the devices whose fleet rows a write through this process
    /// changed since the last call (writes made by other hubs sharing the
    /// store are not among them: see [`Store::shared`]).
    pub fn take_changed(&self) -> Vec<DeviceId> {
        self.changed.ids().drain().collect()
    }

    /// Puts back devices taken by [`Store::take_changed`] whose rows could
    /// not be read.
    pub fn put_back_changed(&self, ids: Vec<DeviceId>) {
        self.mark(&ids);
    }

    /// `sled` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Whether writes are durable now, as last seen (no I/O).
    pub fn health(&self) -> Health {
        let error = each!(self, "fault", b => b.fault());
        Health { ok: error.is_none(), backend: self.backend().into(), error }
    }

    /// Checks now that the store can make a write durable (a small write
    /// and its sync, or a round trip to the database).
    pub async fn probe(&self) -> Health {
        let error = each!(self, "probe", b => b.probe().await).err().map(|e| e.to_string());
        Health { ok: error.is_none(), backend: self.backend().into(), error }
    }

    /// The ingest high-water mark of a device.
    pub async fn high_water(&self, id: &DeviceId) -> Result<u64, StoreError> {
        each!(self, "high_water", b => b.high_water(id).await)
    }

    /// Stores a batch of a device's records, each exactly once, durably
    /// before it returns: records at or below the high-water mark are
    /// duplicates and skipped (see [`ingest::plan`]).
    pub async fn ingest(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        let ingested = each!(self, "ingest", b => b.ingest(id, records).await);
        self.mark([id]);
        let ingested = ingested?;
        ingest::log_stored(id, records, ingested.before);
        crate::metrics::METRICS.count_results(records.iter().filter(|r| r.seq > ingested.before));
        Ok(ingested)
    }

    /// Telemetry of a device in `range`, oldest first: `(seq, sample)`.
    pub async fn telemetry(&self, id: &DeviceId, range: &TelemetryRange) -> Result<Vec<(u64, Sample)>, StoreError> {
        each!(self, "telemetry", b => b.telemetry(id, range).await)
    }

    /// Deletes telemetry sampled before `before`; returns how many samples
    /// (PostgreSQL: rows of whole partitions dropped are not counted).
    pub async fn prune_telemetry(&self, before: Timestamp) -> Result<usize, StoreError> {
        each!(self, "prune_telemetry", b => b.prune_telemetry(before).await)
    }

    /// The newest events of a device, newest first.
    pub async fn events(&self, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        each!(self, "events", b => b.events(id, limit).await)
    }

    /// The newest alarms of a device (among its last 1000 events), newest
    /// first.
    pub async fn alarms(&self, id: &DeviceId, limit: usize) -> Result<Vec<AlarmRecord>, StoreError> {
        Ok(self
            .events(id, 1000)
            .await?
            .into_iter()
            .filter_map(|e| match e.body {
                RecordBody::Alarm(alarm) => Some(AlarmRecord { seq: e.seq, at: e.at, alarm }),
                _ => None,
            })
            .take(limit)
            .collect())
    }

    /// Records the public key of the certificate a device uses (unchanged
    /// keys are not rewritten); a renewed key becomes the current one here.
    pub async fn put_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        let done = each!(self, "put_device_key", b => b.put_device_key(id, key).await);
        self.mark([id]);
        done
    }

    /// Records the key of the certificate the hub just signed for a device
    /// renewing its own: accepted beside the current key until the device
    /// is seen using it ([`Store::put_device_key`]).
    pub async fn put_next_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        let done = each!(self, "put_next_device_key", b => b.put_next_device_key(id, key).await);
        self.mark([id]);
        done
    }

    /// Records what the hub knows of a device's expired certificate (the
    /// default removes it).
    pub async fn set_admission(&self, id: &DeviceId, admission: &Admission) -> Result<(), StoreError> {
        let done = each!(self, "set_admission", b => b.set_admission(id, admission).await);
        self.mark([id]);
        done
    }

    /// Every device with an expired certificate met or a re-admission.
    pub async fn admissions(&self) -> Result<Vec<(DeviceId, Admission)>, StoreError> {
        each!(self, "admissions", b => b.admissions().await)
    }

    /// The keys a device may sign with (stored at enrollment, by each QUIC
    /// session from its certificate, and at renewal).
    pub async fn device_keys(&self, id: &DeviceId) -> Result<Option<DeviceKeys>, StoreError> {
        each!(self, "device_keys", b => b.device_keys(id).await)
    }

    /// Adds a snapshot to a device's backup catalog, durably.
    pub async fn put_catalog_entry(&self, id: &DeviceId, entry: &CatalogEntry) -> Result<(), StoreError> {
        each!(self, "put_catalog_entry", b => b.put_catalog_entry(id, entry).await)
    }

    /// A device's backup catalog, oldest first (names start with the start
    /// time in milliseconds, all of the same width for centuries).
    pub async fn catalog(&self, id: &DeviceId) -> Result<Vec<CatalogEntry>, StoreError> {
        each!(self, "catalog", b => b.catalog(id).await)
    }

    /// One snapshot of a device's catalog.
    pub async fn catalog_entry(&self, id: &DeviceId, name: &str) -> Result<Option<CatalogEntry>, StoreError> {
        each!(self, "catalog_entry", b => b.catalog_entry(id, name).await)
    }

    /// Removes a device's whole backup catalog; returns how many snapshots
    /// it listed.
    pub async fn delete_catalog(&self, id: &DeviceId) -> Result<usize, StoreError> {
        each!(self, "delete_catalog", b => b.delete_catalog(id).await)
    }

    /// Removes some snapshots from a device's catalog.
    pub async fn delete_catalog_entries(&self, id: &DeviceId, names: &[String]) -> Result<(), StoreError> {
        each!(self, "delete_catalog_entries", b => b.delete_catalog_entries(id, names).await)
    }

    /// Lets `reader` fetch `owner`'s backups.
    pub async fn put_grant(&self, reader: &DeviceId, owner: &DeviceId, grant: &Grant) -> Result<(), StoreError> {
        each!(self, "put_grant", b => b.put_grant(reader, owner, grant).await)
    }

    /// The grant letting `reader` fetch `owner`'s backups, if any.
    pub async fn grant(&self, reader: &DeviceId, owner: &DeviceId) -> Result<Option<Grant>, StoreError> {
        each!(self, "grant", b => b.grant(reader, owner).await)
    }

    /// The device's latest peer table.
    pub async fn peers(&self, id: &DeviceId) -> Result<Option<PeersRecord>, StoreError> {
        each!(self, "peers", b => b.peers(id).await)
    }

    /// The device's latest job list.
    pub async fn jobs(&self, id: &DeviceId) -> Result<Option<JobsRecord>, StoreError> {
        each!(self, "jobs", b => b.jobs(id).await)
    }

    /// The newest attempts of a device's job, newest first.
    pub async fn job_runs(&self, id: &DeviceId, job: &str, limit: usize) -> Result<Vec<JobRun>, StoreError> {
        each!(self, "job_runs", b => b.job_runs(id, job, limit).await)
    }

    /// What the device last reported about its desired state.
    pub async fn reported(&self, id: &DeviceId) -> Result<Option<ReportedState>, StoreError> {
        each!(self, "reported", b => b.reported(id).await)
    }

    /// The device's desired state.
    pub async fn desired(&self, id: &DeviceId) -> Result<Option<DesiredRecord>, StoreError> {
        each!(self, "desired", b => b.desired(id).await)
    }

    /// Replaces the desired state if it is still at `expected` (0 for none);
    /// the new version is `expected + 1`.
    pub async fn put_desired(&self, id: &DeviceId, expected: u64, doc: String) -> Result<DesiredRecord, StoreError> {
        each!(self, "put_desired", b => b.put_desired(id, expected, doc).await)
    }

    /// Queues a command.
    pub async fn create_command(&self, command: NewCommand) -> Result<CommandRecord, StoreError> {
        let created = each!(self, "create_command", b => b.create_command(command).await)?;
        crate::metrics::METRICS.commands.get_or_create(&crate::metrics::State { state: "queued" }).inc();
        Ok(created)
    }

    /// One command.
    pub async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        each!(self, "command", b => b.command(id).await)
    }

    /// A page of a device's commands: those with ids after `after`, oldest
    /// first, at most `limit`; and how many the device has in all.
    pub async fn device_commands(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<CommandRecord>, usize), StoreError> {
        each!(self, "device_commands", b => b.device_commands(device, after, limit).await)
    }

    /// A device's newest `limit` commands, newest first: read from the
    /// device's index, whatever its history.
    pub async fn newest_device_commands(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        each!(self, "newest_device_commands", b => b.newest_device_commands(device, limit).await)
    }

    /// Commands with ids in `ids` (all devices), newest first, at most
    /// `limit`; only queued ones if `queued`.
    pub async fn commands_in(
        &self,
        ids: std::ops::RangeInclusive<u64>,
        queued: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        each!(self, "commands_in", b => b.commands_in(ids.clone(), queued, limit).await)
    }

    /// A device's queued, unexpired commands, oldest first, at most `limit`.
    pub async fn queued_commands(&self, device: &DeviceId, limit: usize) -> Result<Vec<CommandRecord>, StoreError> {
        each!(self, "queued_commands", b => b.queued_commands(device, limit, Timestamp::now()).await)
    }

    /// Marks those of `ids` that are `device`'s and still queued as
    /// delivered at `at`; returns them.
    pub async fn mark_delivered(&self, device: &DeviceId, ids: &[u64], at: Timestamp) -> Result<Vec<u64>, StoreError> {
        each!(self, "mark_delivered", b => b.mark_delivered(device, ids, at).await)
    }

    /// Marks queued commands whose expiry has passed as expired; returns
    /// them.
    pub async fn expire_commands(&self, now: Timestamp) -> Result<Vec<CommandRecord>, StoreError> {
        let expired = each!(self, "expire_commands", b => b.expire_commands(now).await)?;
        crate::metrics::METRICS
            .commands
            .get_or_create(&crate::metrics::State { state: "expired" })
            .inc_by(expired.len() as u64);
        Ok(expired)
    }

    /// Stores an API token under the SHA-256 of its secret.
    pub async fn put_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<(), StoreError> {
        each!(self, "put_api_token", b => b.put_api_token(hash, token).await)
    }

    /// Stores a new API token unless an unexpired token has its name
    /// (false): checked and written as one step, on every backend, so two
    /// creations of one name at once cannot both succeed.
    pub async fn insert_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        each!(self, "insert_api_token", b => b.insert_api_token(hash, token).await)
    }

    /// Looks up an API token by the SHA-256 of its secret.
    pub async fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        each!(self, "api_token", b => b.api_token(hash).await)
    }

    /// Replaces a token's record if the token still exists (so a use
    /// recorded after a revocation does not bring it back). Returns false
    /// if it does not.
    pub async fn update_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        each!(self, "update_api_token", b => b.update_api_token(hash, token).await)
    }

    /// Removes a token and returns it; of two callers removing the same
    /// token, one gets it (how a one-time sign-in link is spent).
    pub async fn take_api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        each!(self, "take_api_token", b => b.take_api_token(hash).await)
    }

    /// Removes a token unless `refuse` (given every token, the hash and the
    /// time) says no, checked and removed as one step on every backend (so
    /// two revocations of the last two admin tokens cannot both pass):
    /// `Ok(Err(()))` when refused, `Ok(Ok(None))` when there is no such
    /// token.
    pub async fn take_api_token_unless(
        &self,
        hash: &[u8; 32],
        refuse: RefuseTake,
    ) -> Result<Result<Option<ApiToken>, ()>, StoreError> {
        each!(self, "take_api_token_unless", b => b.take_api_token_unless(hash, refuse).await)
    }

    /// Every token with its hash.
    pub async fn api_tokens(&self) -> Result<Vec<([u8; 32], ApiToken)>, StoreError> {
        each!(self, "api_tokens", b => b.api_tokens().await)
    }

    /// Sets a device's labels; false if there is no such device.
    pub async fn set_labels(&self, id: &DeviceId, labels: &Labels) -> Result<bool, StoreError> {
        let done = each!(self, "set_labels", b => b.set_labels(id, labels).await);
        self.mark([id]);
        done
    }

    /// Every device (or those in `only`) with its labels, digest, mark and
    /// session, ordered by id: one read however many devices.
    pub async fn fleet_rows(&self, only: Option<&[DeviceId]>) -> Result<Vec<FleetRow>, StoreError> {
        each!(self, "fleet_rows", b => b.fleet_rows(only).await)
    }

    /// Removes audit entries made before `before` (the retention); returns
    /// how many.
    pub async fn prune_audit(&self, before: Timestamp) -> Result<usize, StoreError> {
        each!(self, "prune_audit", b => b.prune_audit(before).await)
    }

    /// Appends an entry to the audit log, durably; returns its id.
    pub async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        each!(self, "append_audit", b => b.append_audit(entry).await)
    }

    /// A page of the audit log, newest first.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        each!(self, "audit", b => b.audit(query).await)
    }

    /// Enrolls a device with one redemption of token `token_id`, atomically
    /// and durably: either the use is counted and the device recorded, or
    /// nothing is written. `key` is the public key of its new certificate.
    pub async fn enroll(
        &self,
        token_id: &[u8; 16],
        allowed: u32,
        record: &DeviceRecord,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let done = each!(self, "enroll", b => b.enroll(token_id, allowed, record, key).await);
        self.mark([&record.id]);
        done
    }

    /// One device.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        each!(self, "device", b => b.device(id).await)
    }

    /// Every device, ordered by id.
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        each!(self, "devices", b => b.devices().await)
    }

    /// Records a device's hello (name, agent version, address, time).
    /// Returns false if the device is unknown.
    pub async fn record_hello(&self, hello: &HelloRecord) -> Result<bool, StoreError> {
        let done = each!(self, "record_hello", b => b.record_hello(hello).await);
        self.mark([&hello.id]);
        done
    }

    /// Takes number `seq` of `device`'s MQTT session `session`, heard at
    /// `now`, for the whole fleet: `Ok(Err(_))` if any hub of the fleet took it already or
    /// it is too far below the highest taken ([`outpost_shared::mqtt::UpNumbers`]). The numbers
    /// of a device's [`UP_SESSIONS`] most recently heard sessions are kept,
    /// each until [`Store::prune_up_numbers`] (sled: in this process, which
    /// is the fleet's only hub; PostgreSQL: in the database the hubs share,
    /// changed by compare-and-swap).
    pub async fn take_up_number(
        &self,
        device: &DeviceId,
        session: u64,
        seq: u64,
        now: Timestamp,
    ) -> Result<Result<(), Stale>, StoreError> {
        each!(self, "take_up_number", b => b.take_up_number(device, session, seq, now).await)
    }

    /// Forgets the numbers of sessions last heard before `before` (their
    /// messages are refused by their tickets' age by then); returns how
    /// many sessions.
    pub async fn prune_up_numbers(&self, before: Timestamp) -> Result<usize, StoreError> {
        each!(self, "prune_up_numbers", b => b.prune_up_numbers(before).await)
    }

    /// Records that hub `hub` now holds `device`'s session over
    /// `transport`; returns the session's epoch. A later claim (on this hub
    /// or another) fences this one off: see [`Store::holds_session`].
    pub async fn claim_session(&self, device: &DeviceId, hub: &str, transport: &str) -> Result<u64, StoreError> {
        let done = each!(self, "claim_session", b => b.claim_session(device, hub, transport).await);
        self.mark([device]);
        done
    }

    /// True while `(hub, epoch)` is the device's newest session.
    pub async fn holds_session(&self, device: &DeviceId, hub: &str, epoch: u64) -> Result<bool, StoreError> {
        each!(self, "holds_session", b => b.holds_session(device, hub, epoch).await)
    }

    /// Records when `device`'s certificate stops being valid (met in a
    /// handshake, or signed at enrollment or renewal); nothing is written
    /// when the store already has it.
    pub async fn set_cert_expires(&self, device: &DeviceId, not_after: Timestamp) -> Result<(), StoreError> {
        let done = each!(self, "set_cert_expires", b => b.set_cert_expires(device, not_after).await);
        self.mark([device]);
        done
    }

    /// Session `(hub, epoch)` of `device` ended at `at` for `reason`
    /// (nothing happens if a newer session was claimed since).
    pub async fn end_session(
        &self,
        device: &DeviceId,
        hub: &str,
        epoch: u64,
        at: Timestamp,
        reason: &str,
    ) -> Result<(), StoreError> {
        let done = each!(self, "end_session", b => b.end_session(device, hub, epoch, at, reason).await);
        self.mark([device]);
        done
    }

    /// Where the device's newest session is, and when the hub holding it
    /// last heard from the device.
    pub async fn session(&self, device: &DeviceId) -> Result<Option<SessionRecord>, StoreError> {
        each!(self, "session", b => b.session(device).await)
    }

    /// Records when this hub last heard from each of `seen` (only sessions
    /// this hub still holds), in one write.
    pub async fn touch_sessions(&self, hub: &str, seen: &[(DeviceId, Timestamp)]) -> Result<(), StoreError> {
        each!(self, "touch_sessions", b => b.touch_sessions(hub, seen).await)
    }

    /// Wakes the hub that holds `device`'s session if it is not `from`
    /// (PostgreSQL: `NOTIFY` on that hub's channel, carrying the id only;
    /// sled: one hub, nothing to do).
    pub async fn notify(&self, device: &DeviceId, from: &str) -> Result<(), StoreError> {
        each!(self, "notify", b => b.notify(device, from).await)
    }

    /// Of `devices`, those that may have something to deliver: queued
    /// commands, or desired state changed at or after `since` (the polling
    /// fallback behind notifications).
    pub async fn pending_devices(&self, devices: &[DeviceId], since: Timestamp) -> Result<Vec<DeviceId>, StoreError> {
        each!(self, "pending_devices", b => b.pending_devices(devices, since).await)
    }

    /// True when several hubs may share this store (PostgreSQL): changes
    /// made on another hub must be looked for.
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Wake-ups other hubs address to `hub`, as device ids, until
    /// `shutdown`; reconnects by itself. `None` when the backend has one
    /// hub only (sled), where wake-ups stay in the process, or listening is
    /// off (`[store] listen = false`).
    pub fn listen(
        &self,
        hub: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<DeviceId>> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(b) => b.listen(hub, shutdown),
        }
    }

    /// Takes the lease `name` for `holder` for `ttl`, unless another holder
    /// has it unexpired: work that two hubs must not do at once (pruning a
    /// device's backups while another hub catalogues one of its snapshots).
    /// Returns whether `holder` has it now.
    pub async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        each!(self, "take_lease", b => b.take_lease(name, holder, ttl).await)
    }

    /// A small document of the hub's own (the alerts' states), if written.
    pub async fn hub_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, "hub_state", b => b.hub_state(name).await)
    }

    /// Writes a document of the hub's own, durably.
    pub async fn put_hub_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        each!(self, "put_hub_state", b => b.put_hub_state(name, value).await)
    }

    /// How many holders other than `holder` hold an unexpired lease whose
    /// name starts with `prefix` (the other hubs alive: `hub/`).
    pub async fn other_holders(&self, prefix: &str, holder: &str) -> Result<usize, StoreError> {
        each!(self, "other_holders", b => b.other_holders(prefix, holder).await)
    }

    /// Gives a lease back before it expires.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        each!(self, "release_lease", b => b.release_lease(name, holder).await)
    }

    /// Waits until everything written so far is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        each!(self, "flush", b => b.flush().await)
    }

    /// Flushes and releases the database (sled's files can then be opened
    /// again in this process). Other clones must be dropped first.
    pub async fn close(self) -> Result<(), StoreError> {
        let _timer = crate::metrics::StoreTimer::start("close");
        match self.backend {
            Backend::Sled(b) => b.close().await,
            Backend::Postgres(b) => b.close().await,
        }
    }
}

/// Which telemetry to read: sample times in `[since, until)`, after the
/// sample `after` (its time and sequence number: the cursor of the previous
/// page), at most `limit` samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryRange {
    /// Earliest sample time, inclusive.
    pub since: Timestamp,
    /// Latest sample time, exclusive.
    pub until: Timestamp,
    /// Only samples ordered after this `(time, seq)`.
    pub after: Option<(Timestamp, u64)>,
    /// Most samples.
    pub limit: usize,
}

impl TelemetryRange {
    /// Everything in `[since, until)`, up to `limit`.
    pub fn between(since: Timestamp, until: Timestamp, limit: usize) -> Self {
        TelemetryRange { since, until, after: None, limit }
    }
}

/// A command to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    /// The device.
    pub device: DeviceId,
    /// Kind.
    pub kind: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Not to be started after this.
    pub expires_at: Timestamp,
    /// Who queued it (API token name).
    pub created_by: String,
}

/// A device's newest session, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The hub holding it.
    pub hub: String,
    /// Its epoch.
    pub epoch: u64,
    /// `quic` or `mqtt`.
    pub transport: String,
    /// When that hub last heard from the device (written every second or
    /// so, not on every message).
    pub seen: Timestamp,
    /// When and why the session ended, once it has (until the next claim).
    pub ended: Option<(Timestamp, String)>,
}

impl NewCommand {
    /// The record of this command queued now under `id`.
    pub fn queued(self, id: u64) -> CommandRecord {
        let NewCommand { device, kind, args, expires_at, created_by } = self;
        CommandRecord {
            id,
            device,
            kind,
            args,
            created_at: Timestamp::now(),
            expires_at,
            created_by,
            state: CommandState::Queued,
        }
    }
}

/// What a device's hello changes in its record.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloRecord {
    /// The device.
    pub id: DeviceId,
    /// Name it gave.
    pub name: String,
    /// Agent version.
    pub agent_version: String,
    /// Where it connected from.
    pub addr: String,
    /// When.
    pub at: Timestamp,
}
