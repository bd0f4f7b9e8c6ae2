//! The PostgreSQL backend: several hubs on one database.
//!
//! tokio-postgres with a deadpool pool, hand-written SQL, no compile-time
//! query macros. The schema is versioned ([`MIGRATIONS`]); `outpost-hub
//! migrate` and every start apply what is missing under an advisory lock,
//! and a hub refuses a database whose schema is newer than it knows.
//!
//! Tables (values the hub never queries by are postcard in `bytea`, as in
//! the sled backend):
//! - `devices`: one row a device, with its certificate key and its ingest
//!   high-water mark (`high_water`), which ingest locks (`FOR UPDATE`) and
//!   moves in the transaction that stores the records: exactly once however
//!   many hubs receive the same resent batch.
//! - `telemetry`: partitioned by sample time, one partition a UTC day
//!   (`telemetry_YYYYMMDD`, made on demand), plus a default partition for
//!   samples far from now (a device clock at 1970); retention drops whole
//!   partitions. Samples arrive by binary `COPY`.
//! - `events`, `job_runs`, `reports` (the newest job list, peer table and
//!   desired-state report of each device), `desired`, `commands`,
//!   `catalog`, `restore_grants`, `api_tokens`, `enroll_uses`.
//!
//! Commands are a durable queue: every state change is one `UPDATE ...
//! WHERE state = 'queued'` (or a `FOR UPDATE SKIP LOCKED` pick for
//! expiry), so two hubs never both move one command.

use super::digest::DeviceDigest;
use super::ingest;
use super::pgtls;
use super::{
    Admission, ApiToken, AuditEntry, AuditQuery, CatalogEntry, CommandRecord, CommandState, DesiredRecord, DeviceKeys,
    DeviceRecord, EventRecord, FleetRow, Grant, HelloRecord, Ingested, JobsRecord, Labels, MAX_RUNS_PER_JOB,
    NewCommand, PeersRecord, ReportedState, SessionRecord, StoreError, TelemetryRange, UP_SESSIONS,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use outpost_shared::job::JobRun;
use outpost_shared::mqtt::{Stale, UpNumbers};
use outpost_shared::protocol::Record;
use outpost_shared::reopen::FaultLog;
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use outpost_shared::{DeviceId, Fingerprint};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

/// The schema, one entry a version, applied in order.
pub const MIGRATIONS: &[&str] = &[
    // 1: the fleet's state.
    "CREATE TABLE devices (
        id text PRIMARY KEY,
        name text NOT NULL,
        enrolled_at bigint NOT NULL,
        cert_fingerprint bytea NOT NULL,
        agent_version text,
        last_seen bigint,
        last_addr text,
        last_sample bytea,
        last_sample_at bigint,
        public_key bytea,
        high_water bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE api_tokens (hash bytea PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE enroll_uses (token_id bytea PRIMARY KEY, used integer NOT NULL);
    CREATE TABLE telemetry (
        device text NOT NULL,
        at bigint NOT NULL,
        seq bigint NOT NULL,
        sample bytea NOT NULL,
        PRIMARY KEY (device, at, seq)
    ) PARTITION BY RANGE (at);
    CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
    CREATE TABLE events (device text NOT NULL, seq bigint NOT NULL, record bytea NOT NULL, PRIMARY KEY (device, seq));
    CREATE TABLE job_runs (
        device text NOT NULL,
        job text NOT NULL,
        run_id bigint NOT NULL,
        attempt integer NOT NULL,
        run bytea NOT NULL,
        PRIMARY KEY (device, job, run_id, attempt)
    );
    CREATE TABLE reports (device text NOT NULL, kind text NOT NULL, record bytea NOT NULL, PRIMARY KEY (device, kind));
    CREATE TABLE desired (device text PRIMARY KEY, version bigint NOT NULL, doc text NOT NULL, updated_at bigint NOT NULL);
    CREATE TABLE commands (
        id bigserial PRIMARY KEY,
        device text NOT NULL,
        state text NOT NULL,
        expires_at bigint NOT NULL,
        record bytea NOT NULL
    );
    CREATE INDEX commands_device ON commands (device, id);
    CREATE INDEX commands_queued ON commands (expires_at) WHERE state = 'queued';
    CREATE TABLE catalog (device text NOT NULL, name text NOT NULL, entry bytea NOT NULL, PRIMARY KEY (device, name));
    CREATE TABLE restore_grants (reader text NOT NULL, owner text NOT NULL, grant_record bytea NOT NULL, PRIMARY KEY (reader, owner));
    CREATE TABLE probe (id integer PRIMARY KEY, at bigint NOT NULL);",
    // 2: which hub holds each device's session (several hubs).
    "CREATE TABLE sessions (
        device text PRIMARY KEY,
        hub text NOT NULL,
        epoch bigint NOT NULL,
        transport text NOT NULL,
        since bigint NOT NULL,
        seen bigint NOT NULL
    );
    CREATE INDEX sessions_hub ON sessions (hub);",
    // 3: leases for work two hubs must not do at once.
    "CREATE TABLE leases (name text PRIMARY KEY, holder text NOT NULL, until bigint NOT NULL);",
    // 4: labels, each device's digest (written with its batches), the audit log.
    "ALTER TABLE devices ADD COLUMN labels text NOT NULL DEFAULT '{}', ADD COLUMN digest bytea;
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        at bigint NOT NULL,
        who text NOT NULL,
        action text NOT NULL,
        target text NOT NULL,
        outcome text NOT NULL,
        entry bytea NOT NULL
    );
    CREATE INDEX audit_who ON audit (who, id);
    CREATE INDEX audit_target ON audit (target, id);",
    // 5: the key of a device's renewed certificate, until the device uses it;
    // an expired certificate met (ms), a re-admission (until, ms), a
    // revocation (ms).
    "ALTER TABLE devices ADD COLUMN next_key bytea, ADD COLUMN expired_seen bigint, ADD COLUMN readmit_until bigint,
        ADD COLUMN revoked_at bigint;",
    // 6: small documents of the hub's own (the alerts' states).
    "CREATE TABLE hub_state (name text PRIMARY KEY, value bytea NOT NULL);",
    // 7: when and why a device's session ended (ms, text), until its next one.
    "ALTER TABLE sessions ADD COLUMN ended_at bigint, ADD COLUMN end_reason text;",
    // 8: when a device's certificate stops being valid (ms).
    "ALTER TABLE devices ADD COLUMN cert_expires bigint;",
    // 9: the numbers taken in each device's MQTT sessions, shared by the
    // hubs of a shared subscription (`last`, `below` and `session` are
    // u64 bit patterns; `at`: last heard, ms).
    "CREATE TABLE up_numbers (
        device text NOT NULL,
        session bigint NOT NULL,
        last bigint NOT NULL,
        below bigint NOT NULL,
        at bigint NOT NULL,
        PRIMARY KEY (device, session)
    );
    CREATE INDEX up_numbers_at ON up_numbers (at);",
];

/// Key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;

/// Key of the advisory lock a token creation holds for its transaction.
const TOKENS_LOCK: i64 = 0x6f75_7470_6f73_7402;

const DAY_MS: u64 = 86_400_000;

/// Days either side of now that get their own telemetry partition; samples
/// further out land in the default partition.
const PARTITION_PAST_DAYS: u64 = 400;
const PARTITION_FUTURE_DAYS: u64 = 2;

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(&e))
}

/// The database's own message when it has one (tokio-postgres' `Display`
/// says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { what, message: e.to_string() })
}

/// `u64` sequence numbers, times and ids as PostgreSQL's `bigint` (all stay
/// far below 2^63 in practice; larger values saturate).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A u64 as PostgreSQL's bigint, bit for bit (random ids, bit sets).
fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// The u64 [`bits`] stored.
fn unbits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// Compare-and-swap attempts on one session's numbers before giving up
/// (each loss means another hub took a number of the session meanwhile).
const UP_NUMBER_TRIES: usize = 16;

fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The partition of day `day` (days since the epoch).
fn partition_name(day: u64) -> String {
    let date = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(i64::try_from(day).unwrap_or(0));
    format!("telemetry_{:04}{:02}{:02}", date.year(), u8::from(date.month()), date.day())
}

/// Which telemetry partitions the days of `samples` need, given `now`:
/// days within [`PARTITION_PAST_DAYS`] before and [`PARTITION_FUTURE_DAYS`]
/// after now, not yet `known`. Pure, for unit tests.
pub fn partitions_needed(sample_times: &[u64], now: u64, known: &HashSet<u64>) -> Vec<u64> {
    let today = now / DAY_MS;
    let range = today.saturating_sub(PARTITION_PAST_DAYS)..=today + PARTITION_FUTURE_DAYS;
    let mut days: Vec<u64> =
        sample_times.iter().map(|t| t / DAY_MS).filter(|d| range.contains(d) && !known.contains(d)).collect();
    days.sort_unstable();
    days.dedup();
    days
}

/// The PostgreSQL store. Cheap to clone; clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The connection string, for the listening connection.
    url: Arc<str>,
    /// Whether to LISTEN for other hubs' wake-ups.
    listen: bool,
    /// Telemetry partitions known to exist (days since the epoch), or known
    /// not to be makeable (rows for them sit in the default partition).
    partitions: Arc<Mutex<HashSet<u64>>>,
    fault: Arc<FaultLog>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// Where a connection string points, for error messages (no password).
pub fn describe_target(url: &str) -> String {
    match config(url).map(|(config, _)| config) {
        Ok(config) => {
            let hosts: Vec<String> = config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            let port = config.get_ports().first().copied().unwrap_or(5432);
            format!("{}:{port}/{}", hosts.join(","), config.get_dbname().unwrap_or("(default database)"))
        }
        Err(_) => "(unparsable connection string)".into(),
    }
}

/// The tokio-postgres configuration of `url` and the TLS it asks for
/// (libpq's `sslmode` and `sslrootcert`, see [`super::pgtls`]).
pub fn config(url: &str) -> Result<(tokio_postgres::Config, pgtls::Tls), String> {
    let (rest, tls) = pgtls::split(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    if tls != pgtls::Tls::Off {
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok((config, tls))
}

/// Makes a pool of `size` connections to `url` (no connection yet).
fn pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let (mut config, tls) = config(url).map_err(|e| StoreError::Setup(format!("store.url: {e}")))?;
    config.application_name("outpost-hub");
    config.connect_timeout(Duration::from_secs(5));
    let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match tls {
        pgtls::Tls::Off => Manager::from_config(config, NoTls, recycling),
        pgtls::Tls::Verified(root) => {
            let connector =
                pgtls::connector(root.as_deref()).map_err(|e| StoreError::Setup(format!("store.url: {e}")))?;
            Manager::from_config(config, connector, recycling)
        }
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Setup(format!("store: {e}")))
}

/// Applies the migrations `url`'s database lacks; returns the schema
/// version before and after. Refuses a database newer than this hub.
pub async fn migrate(url: &str) -> Result<(usize, usize), StoreError> {
    let pool = pool(url, 1)?;
    let mut client = pool.get().await.map_err(|e| {
        StoreError::Unavailable(format!("cannot reach the database at {}: {}", describe_target(url), pool_message(&e)))
    })?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS outpost_schema (version integer PRIMARY KEY, applied_at bigint NOT NULL)",
            )
            .await
            .map_err(pg)?;
        let row = client.query_one("SELECT coalesce(max(version), 0) FROM outpost_schema", &[]).await.map_err(pg)?;
        let before = usize::try_from(row.get::<_, i32>(0)).unwrap_or(0);
        if before > MIGRATIONS.len() {
            return Err(StoreError::Setup(format!(
                "the database's schema is version {before}, newer than this hub's ({}); upgrade the hub",
                MIGRATIONS.len()
            )));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(before) {
            let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
            let tx = client.transaction().await.map_err(pg)?;
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO outpost_schema (version, applied_at) VALUES ($1, $2)",
                &[&version, &big(Timestamp::now().0)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, "Database schema migrated.");
        }
        Ok((before, MIGRATIONS.len()))
    }
    .await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result
}

/// Checks, from a thread outside any runtime, that `url` reaches a
/// database whose schema this hub can run on (`outpost-hub validate` and
/// the checks before `serve`). The error names the target and the reason.
pub fn check_reachable(url: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let target = describe_target(url);
    runtime.block_on(async {
        let pool = pool(url, 1).map_err(|e| e.to_string())?;
        let client =
            pool.get().await.map_err(|e| format!("cannot reach the database at {target}: {}", pool_message(&e)))?;
        let version = client
            .query_opt("SELECT max(version) FROM outpost_schema", &[])
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .unwrap_or(0);
        if usize::try_from(version).unwrap_or(0) > MIGRATIONS.len() {
            return Err(format!(
                "the database at {target} has schema version {version}, newer than this hub's ({}); upgrade the hub",
                MIGRATIONS.len()
            ));
        }
        Ok(())
    })
}

/// The cause of a failed pool checkout, in words.
fn pool_message(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

impl PgStore {
    /// Connects, migrates, and checks the database answers.
    pub async fn open(url: &str, pool_size: usize, listen: bool) -> Result<Self, StoreError> {
        migrate(url).await?;
        let store = PgStore {
            pool: pool(url, pool_size)?,
            url: url.into(),
            listen,
            partitions: Arc::default(),
            fault: Arc::new(FaultLog::new("Hub store")),
        };
        let client = store.client().await?;
        let rows = client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'",
                &[],
            )
            .await
            .map_err(pg)?;
        let mut known = store.partitions.lock().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let name: String = row.get(0);
            if let Some(day) = name.strip_prefix("telemetry_").and_then(parse_partition_day) {
                known.insert(day);
            }
        }
        drop(known);
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Notes the outcome of a write for [`PgStore::fault`].
    fn track<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => self.fault.ok(),
            Err(StoreError::Unavailable(e)) => self.fault.failed(&format!("postgres: {e}")),
            Err(_) => {}
        }
        result
    }

    pub(super) fn fault(&self) -> Option<String> {
        self.fault.fault()
    }

    pub(super) async fn probe(&self) -> Result<(), StoreError> {
        let result = async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO probe (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                    &[&big(Timestamp::now().0)],
                )
                .await
                .map_err(pg)?;
            Ok(())
        }
        .await;
        self.track(result)
    }

    pub(super) async fn high_water(&self, id: &DeviceId) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row =
            client.query_opt("SELECT high_water FROM devices WHERE id = $1", &[&id.as_str()]).await.map_err(pg)?;
        Ok(row.map_or(0, |r| unbig(r.get(0))))
    }

    /// Makes the daily partitions `times` need (outside the ingest
    /// transaction: two hubs making the same one must not abort a batch).
    async fn ensure_partitions(&self, times: &[u64]) -> Result<(), StoreError> {
        let needed = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            partitions_needed(times, Timestamp::now().0, &known)
        };
        if needed.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        for day in needed {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF telemetry FOR VALUES FROM ({}) TO ({})",
                partition_name(day),
                day * DAY_MS,
                (day + 1) * DAY_MS
            );
            if let Err(e) = client.batch_execute(&sql).await {
                // Another hub made it at the same moment, or the default
                // partition already holds rows of that day: those rows and
                // the day's new ones stay in the default partition.
                tracing::debug!(partition = %partition_name(day), error = %describe(&e), "Telemetry partition not made.");
            }
            self.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(day);
        }
        Ok(())
    }

    pub(super) async fn ingest(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        let times: Vec<u64> = records
            .iter()
            .filter_map(|r| match &r.body {
                outpost_shared::protocol::RecordBody::Telemetry(s) => Some(s.at.0),
                _ => None,
            })
            .collect();
        self.ensure_partitions(&times).await?;
        let result = self.ingest_tx(id, records).await;
        self.track(result)
    }

    async fn ingest_tx(&self, id: &DeviceId, records: &[Record]) -> Result<Ingested, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let device = id.as_str();
        let row = tx
            .query_opt("SELECT high_water, digest FROM devices WHERE id = $1 FOR UPDATE", &[&device])
            .await
            .map_err(pg)?;
        let hwm = row.as_ref().map_or(0, |r| unbig(r.get(0)));
        let plan = ingest::plan(hwm, records);
        if !plan.advances {
            return Ok(Ingested::from(&plan));
        }
        let now = Timestamp::now();
        let mut digest: DeviceDigest = match row.as_ref().and_then(|r| r.get::<_, Option<&[u8]>>(1)) {
            Some(bytes) => DeviceDigest::decode(bytes)?,
            None => DeviceDigest::default(),
        };
        digest.fold(&plan, records, now);
        if !plan.samples.is_empty() {
            let sink = tx.copy_in("COPY telemetry (device, at, seq, sample) FROM STDIN BINARY").await.map_err(pg)?;
            let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::INT8, Type::INT8, Type::BYTEA]);
            let mut writer = std::pin::pin!(writer);
            for (seq, sample) in &plan.samples {
                let (at, seq, bytes) = (big(sample.at.0), big(*seq), encode(*sample));
                writer.as_mut().write(&[&device, &at, &seq, &bytes]).await.map_err(pg)?;
            }
            writer.finish().await.map_err(pg)?;
        }
        if !plan.events.is_empty() {
            let seqs: Vec<i64> = plan.events.iter().map(|e| big(e.seq)).collect();
            let values: Vec<Vec<u8>> = plan.events.iter().map(encode).collect();
            tx.execute(
                "INSERT INTO events (device, seq, record) SELECT $1, * FROM unnest($2::bigint[], $3::bytea[])",
                &[&device, &seqs, &values],
            )
            .await
            .map_err(pg)?;
        }
        if !plan.runs.is_empty() {
            let jobs: Vec<&str> = plan.runs.iter().map(|r| r.job.as_str()).collect();
            let run_ids: Vec<i64> = plan.runs.iter().map(|r| big(r.run_id)).collect();
            let attempts: Vec<i32> = plan.runs.iter().map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX)).collect();
            let values: Vec<Vec<u8>> = plan.runs.iter().map(|r| encode(*r)).collect();
            tx.execute(
                "INSERT INTO job_runs (device, job, run_id, attempt, run)
                 SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::integer[], $5::bytea[])
                 ON CONFLICT (device, job, run_id, attempt) DO UPDATE SET run = excluded.run",
                &[&device, &jobs, &run_ids, &attempts, &values],
            )
            .await
            .map_err(pg)?;
            for job in &plan.touched_jobs {
                tx.execute(
                    "DELETE FROM job_runs WHERE device = $1 AND job = $2 AND (run_id, attempt) NOT IN (
                        SELECT run_id, attempt FROM job_runs WHERE device = $1 AND job = $2
                        ORDER BY run_id DESC, attempt DESC LIMIT $3)",
                    &[&device, job, &big(MAX_RUNS_PER_JOB as u64)],
                )
                .await
                .map_err(pg)?;
            }
        }
        let reports = [
            ("jobs", plan.jobs.as_ref().map(encode)),
            ("peers", plan.peers.as_ref().map(encode)),
            ("reported", plan.reported.as_ref().map(encode)),
        ];
        for (kind, value) in reports {
            if let Some(value) = value {
                tx.execute(
                    "INSERT INTO reports (device, kind, record) VALUES ($1, $2, $3)
                     ON CONFLICT (device, kind) DO UPDATE SET record = excluded.record",
                    &[&device, &kind, &value],
                )
                .await
                .map_err(pg)?;
            }
        }
        for result in &plan.results {
            let row = tx
                .query_opt("SELECT device, record FROM commands WHERE id = $1 FOR UPDATE", &[&big(result.id)])
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                tracing::debug!(%device, command = result.id, "Result for a command this hub does not know (kept in the event log).");
                continue;
            };
            if row.get::<_, &str>(0) != device {
                tracing::warn!(%device, command = result.id, "Result for another device's command ignored.");
                continue;
            }
            let mut cmd: CommandRecord = decode("commands", row.get(1))?;
            cmd.state =
                CommandState::Completed { at: now, outcome: result.outcome.clone(), output: result.output.clone() };
            tx.execute(
                "UPDATE commands SET state = 'completed', record = $2 WHERE id = $1",
                &[&big(result.id), &encode(&cmd)],
            )
            .await
            .map_err(pg)?;
        }
        let (sample, sample_at) = match plan.newest_sample {
            Some(s) => (Some(encode(s)), Some(big(s.at.0))),
            None => (None, None),
        };
        tx.execute(
            "UPDATE devices SET high_water = $2, last_seen = $3,
                last_sample = CASE WHEN $4::bytea IS NOT NULL AND (last_sample_at IS NULL OR last_sample_at <= $5)
                                   THEN $4 ELSE last_sample END,
                last_sample_at = CASE WHEN $4::bytea IS NOT NULL AND (last_sample_at IS NULL OR last_sample_at <= $5)
                                   THEN $5 ELSE last_sample_at END,
                digest = $6
             WHERE id = $1",
            &[&device, &big(plan.upto), &big(now.0), &sample, &sample_at, &encode(&digest)],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(Ingested::from(&plan))
    }

    pub(super) async fn telemetry(
        &self,
        id: &DeviceId,
        range: &TelemetryRange,
    ) -> Result<Vec<(u64, Sample)>, StoreError> {
        let (after_at, after_seq) = range.after.map_or((-1, -1), |(at, seq)| (big(at.0), big(seq)));
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, sample FROM telemetry WHERE device = $1 AND at >= $2 AND at < $3
                 AND (at, seq) > ($4, $5) ORDER BY at, seq LIMIT $6",
                &[
                    &id.as_str(),
                    &big(range.since.0),
                    &big(range.until.0),
                    &after_at,
                    &after_seq,
                    &big(range.limit as u64),
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| Ok((unbig(r.get(0)), decode("telemetry", r.get(1))?))).collect()
    }

    pub(super) async fn prune_telemetry(&self, before: Timestamp) -> Result<usize, StoreError> {
        let client = self.client().await?;
        // Whole days first: dropping a partition costs no row deletes.
        let today = Timestamp::now().0 / DAY_MS;
        let droppable: Vec<u64> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            known.iter().copied().filter(|d| (d + 1) * DAY_MS <= before.0).collect()
        };
        for day in droppable {
            client.batch_execute(&format!("DROP TABLE IF EXISTS {}", partition_name(day))).await.map_err(pg)?;
            self.partitions.lock().unwrap_or_else(|p| p.into_inner()).remove(&day);
            tracing::info!(partition = %partition_name(day), "Telemetry partition past its retention dropped.");
        }
        let deleted = client.execute("DELETE FROM telemetry WHERE at < $1", &[&big(before.0)]).await.map_err(pg)?;
        // Make tomorrow's partition ahead of its first sample.
        self.ensure_partitions(&[(today + 1) * DAY_MS]).await?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    pub(super) async fn events(&self, id: &DeviceId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.many(
            "events",
            "SELECT record FROM events WHERE device = $1 ORDER BY seq DESC LIMIT $2",
            &[&id.as_str(), &big(limit as u64)],
        )
        .await
    }

    async fn write(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<u64, StoreError> {
        let result = async { self.client().await?.execute(sql, params).await.map_err(pg) }.await;
        self.track(result)
    }

    async fn one<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt(sql, params).await.map_err(pg)?;
        row.map(|r| decode(what, r.get(0))).transpose()
    }

    async fn many<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(pg)?;
        rows.iter().map(|r| decode(what, r.get(0))).collect()
    }

    pub(super) async fn put_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        self.write(
            "UPDATE devices SET public_key = $2, next_key = CASE WHEN next_key = $2 THEN NULL ELSE next_key END
             WHERE id = $1 AND (public_key IS DISTINCT FROM $2 OR next_key = $2)",
            &[&id.as_str(), &key],
        )
        .await
        .map(drop)
    }

    pub(super) async fn set_admission(&self, id: &DeviceId, admission: &Admission) -> Result<(), StoreError> {
        let at = |t: Option<Timestamp>| t.map(|t| big(t.0));
        self.write(
            "UPDATE devices SET expired_seen = $2, readmit_until = $3, revoked_at = $4 WHERE id = $1",
            &[&id.as_str(), &at(admission.expired_seen), &at(admission.readmit_until), &at(admission.revoked_at)],
        )
        .await
        .map(drop)
    }

    pub(super) async fn admissions(&self) -> Result<Vec<(DeviceId, Admission)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, expired_seen, readmit_until, revoked_at FROM devices
                 WHERE expired_seen IS NOT NULL OR readmit_until IS NOT NULL OR revoked_at IS NOT NULL ORDER BY id",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let id: &str = row.get(0);
                let id =
                    id.parse().map_err(|_| StoreError::Corrupt { what: "devices.id", message: format!("{id:?}") })?;
                let at = |i| row.get::<_, Option<i64>>(i).map(|v| Timestamp(unbig(v)));
                Ok((id, Admission { expired_seen: at(1), readmit_until: at(2), revoked_at: at(3) }))
            })
            .collect()
    }

    pub(super) async fn put_next_device_key(&self, id: &DeviceId, key: &[u8]) -> Result<(), StoreError> {
        self.write("UPDATE devices SET next_key = $2 WHERE id = $1", &[&id.as_str(), &key]).await.map(drop)
    }

    pub(super) async fn device_keys(&self, id: &DeviceId) -> Result<Option<DeviceKeys>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT public_key, next_key FROM devices WHERE id = $1", &[&id.as_str()])
            .await
            .map_err(pg)?;
        Ok(row.and_then(|r| {
            let current: Option<Vec<u8>> = r.get(0);
            current.map(|current| DeviceKeys { current, next: r.get(1) })
        }))
    }

    pub(super) async fn put_catalog_entry(&self, id: &DeviceId, entry: &CatalogEntry) -> Result<(), StoreError> {
        self.write(
            "INSERT INTO catalog (device, name, entry) VALUES ($1, $2, $3)
             ON CONFLICT (device, name) DO UPDATE SET entry = excluded.entry",
            &[&id.as_str(), &entry.summary.name, &encode(entry)],
        )
        .await
        .map(drop)
    }

    pub(super) async fn catalog(&self, id: &DeviceId) -> Result<Vec<CatalogEntry>, StoreError> {
        self.many("catalog", "SELECT entry FROM catalog WHERE device = $1 ORDER BY name", &[&id.as_str()]).await
    }

    pub(super) async fn catalog_entry(&self, id: &DeviceId, name: &str) -> Result<Option<CatalogEntry>, StoreError> {
        self.one("catalog", "SELECT entry FROM catalog WHERE device = $1 AND name = $2", &[&id.as_str(), &name]).await
    }

    pub(super) async fn delete_catalog(&self, id: &DeviceId) -> Result<usize, StoreError> {
        let n = self.write("DELETE FROM catalog WHERE device = $1", &[&id.as_str()]).await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub(super) async fn delete_catalog_entries(&self, id: &DeviceId, names: &[String]) -> Result<(), StoreError> {
        self.write("DELETE FROM catalog WHERE device = $1 AND name = ANY($2)", &[&id.as_str(), &names]).await.map(drop)
    }

    pub(super) async fn put_grant(&self, reader: &DeviceId, owner: &DeviceId, grant: &Grant) -> Result<(), StoreError> {
        self.write(
            "INSERT INTO restore_grants (reader, owner, grant_record) VALUES ($1, $2, $3)
             ON CONFLICT (reader, owner) DO UPDATE SET grant_record = excluded.grant_record",
            &[&reader.as_str(), &owner.as_str(), &encode(grant)],
        )
        .await
        .map(drop)
    }

    pub(super) async fn grant(&self, reader: &DeviceId, owner: &DeviceId) -> Result<Option<Grant>, StoreError> {
        self.one(
            "restore_grants",
            "SELECT grant_record FROM restore_grants WHERE reader = $1 AND owner = $2",
            &[&reader.as_str(), &owner.as_str()],
        )
        .await
    }

    async fn report<T: for<'de> Deserialize<'de>>(&self, id: &DeviceId, kind: &str) -> Result<Option<T>, StoreError> {
        self.one("reports", "SELECT record FROM reports WHERE device = $1 AND kind = $2", &[&id.as_str(), &kind]).await
    }

    pub(super) async fn peers(&self, id: &DeviceId) -> Result<Option<PeersRecord>, StoreError> {
        self.report(id, "peers").await
    }

    pub(super) async fn jobs(&self, id: &DeviceId) -> Result<Option<JobsRecord>, StoreError> {
        self.report(id, "jobs").await
    }

    pub(super) async fn reported(&self, id: &DeviceId) -> Result<Option<ReportedState>, StoreError> {
        self.report(id, "reported").await
    }

    pub(super) async fn job_runs(&self, id: &DeviceId, job: &str, limit: usize) -> Result<Vec<JobRun>, StoreError> {
        self.many(
            "job_runs",
            "SELECT run FROM job_runs WHERE device = $1 AND job = $2
                 ORDER BY run_id DESC, attempt DESC LIMIT $3",
            &[&id.as_str(), &job, &big(limit as u64)],
        )
        .await
    }

    pub(super) async fn desired(&self, id: &DeviceId) -> Result<Option<DesiredRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT version, doc, updated_at FROM desired WHERE device = $1", &[&id.as_str()])
            .await
            .map_err(pg)?;
        Ok(row.map(|r| DesiredRecord {
            version: unbig(r.get(0)),
            doc: r.get(1),
            updated_at: Timestamp(unbig(r.get(2))),
        }))
    }

    pub(super) async fn put_desired(
        &self,
        id: &DeviceId,
        expected: u64,
        doc: String,
    ) -> Result<DesiredRecord, StoreError> {
        let record = DesiredRecord { version: expected + 1, doc, updated_at: Timestamp::now() };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&id.as_str(), &big(record.version), &record.doc, &big(record.updated_at.0)];
        let changed = if expected == 0 {
            self.write(
                "INSERT INTO desired (device, version, doc, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (device) DO NOTHING",
                &params,
            )
            .await?
        } else {
            self.write(
                "UPDATE desired SET version = $2, doc = $3, updated_at = $4 WHERE device = $1 AND version = $2::bigint - 1",
                &params,
            )
            .await?
        };
        if changed == 1 {
            return Ok(record);
        }
        let current = self.desired(id).await?.map_or(0, |d| d.version);
        Err(StoreError::VersionConflict { expected, current })
    }

    pub(super) async fn create_command(&self, command: NewCommand) -> Result<CommandRecord, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            let row = tx.query_one("SELECT nextval('commands_id_seq')", &[]).await.map_err(pg)?;
            let record = command.queued(unbig(row.get(0)));
            tx.execute(
                "INSERT INTO commands (id, device, state, expires_at, record) VALUES ($1, $2, 'queued', $3, $4)",
                &[&big(record.id), &record.device.as_str(), &big(record.expires_at.0), &encode(&record)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(record)
        }
        .await;
        self.track(result)
    }

    pub(super) async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.one("commands", "SELECT record FROM commands WHERE id = $1", &[&big(id)]).await
    }

    pub(super) async fn device_commands(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<CommandRecord>, usize), StoreError> {
        let page = self
            .many(
                "commands",
                "SELECT record FROM commands WHERE device = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&device.as_str(), &big(after), &big(limit as u64)],
            )
            .await?;
        let client = self.client().await?;
        let total: i64 = client
            .query_one("SELECT count(*) FROM commands WHERE device = $1", &[&device.as_str()])
            .await
            .map_err(pg)?
            .get(0);
        Ok((page, usize::try_from(total).unwrap_or(0)))
    }

    pub(super) async fn newest_device_commands(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.many(
            "commands",
            "SELECT record FROM commands WHERE device = $1 ORDER BY id DESC LIMIT $2",
            &[&device.as_str(), &big(limit as u64)],
        )
        .await
    }

    pub(super) async fn commands_in(
        &self,
        ids: std::ops::RangeInclusive<u64>,
        queued: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.many(
            "commands",
            "SELECT record FROM commands WHERE id BETWEEN $1 AND $2 AND (NOT $3 OR state = 'queued')
                 ORDER BY id DESC LIMIT $4",
            &[&big(*ids.start()), &big(*ids.end()), &queued, &big(limit as u64)],
        )
        .await
    }

    pub(super) async fn queued_commands(
        &self,
        device: &DeviceId,
        limit: usize,
        now: Timestamp,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.many(
            "commands",
            "SELECT record FROM commands WHERE device = $1 AND state = 'queued' AND expires_at > $2
                 ORDER BY id LIMIT $3",
            &[&device.as_str(), &big(now.0), &big(limit as u64)],
        )
        .await
    }

    /// Moves the queued commands among `ids` of `device` to `to`, in one
    /// transaction; returns their records as they were.
    async fn transition(
        &self,
        pick: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        state: &str,
        to: CommandState,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            let rows = tx.query(pick, params).await.map_err(pg)?;
            let mut moved = Vec::new();
            for row in rows {
                let mut cmd: CommandRecord = decode("commands", row.get(0))?;
                let before = cmd.clone();
                cmd.state = to.clone();
                tx.execute(
                    "UPDATE commands SET state = $2, record = $3 WHERE id = $1",
                    &[&big(cmd.id), &state, &encode(&cmd)],
                )
                .await
                .map_err(pg)?;
                moved.push(before);
            }
            tx.commit().await.map_err(pg)?;
            Ok(moved)
        }
        .await;
        self.track(result)
    }

    pub(super) async fn mark_delivered(
        &self,
        device: &DeviceId,
        ids: &[u64],
        at: Timestamp,
    ) -> Result<Vec<u64>, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|i| big(*i)).collect();
        let moved = self
            .transition(
                "SELECT record FROM commands WHERE id = ANY($1) AND device = $2 AND state = 'queued'
                 ORDER BY id FOR UPDATE",
                &[&ids, &device.as_str()],
                "delivered",
                CommandState::Delivered { at },
            )
            .await?;
        Ok(moved.into_iter().map(|c| c.id).collect())
    }

    pub(super) async fn expire_commands(&self, now: Timestamp) -> Result<Vec<CommandRecord>, StoreError> {
        // Several hubs run this every second: each takes the rows no other
        // holds, so a command expires once.
        self.transition(
            "SELECT record FROM commands WHERE state = 'queued' AND expires_at <= $1
             ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
            &[&big(now.0)],
            "expired",
            CommandState::Expired { at: now },
        )
        .await
    }

    pub(super) async fn put_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<(), StoreError> {
        self.write(
            "INSERT INTO api_tokens (hash, record) VALUES ($1, $2)
             ON CONFLICT (hash) DO UPDATE SET record = excluded.record",
            &[&&hash[..], &encode(token)],
        )
        .await
        .map(drop)
    }

    pub(super) async fn insert_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            // One token creation at a time across every hub: the check and
            // the insert are one step.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&TOKENS_LOCK]).await.map_err(pg)?;
            let rows = tx.query("SELECT record FROM api_tokens", &[]).await.map_err(pg)?;
            let tokens = rows.iter().map(|r| ApiToken::decode(r.get(0))).collect::<Result<Vec<_>, _>>()?;
            if super::name_taken(tokens.iter(), &token.name, Timestamp::now()) {
                return Ok(false);
            }
            tx.execute("INSERT INTO api_tokens (hash, record) VALUES ($1, $2)", &[&&hash[..], &encode(token)])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(true)
        }
        .await;
        self.track(result)
    }

    pub(super) async fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT record FROM api_tokens WHERE hash = $1", &[&&hash[..]]).await.map_err(pg)?;
        row.map(|r| ApiToken::decode(r.get(0))).transpose()
    }

    pub(super) async fn update_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<bool, StoreError> {
        let n = self.write("UPDATE api_tokens SET record = $2 WHERE hash = $1", &[&&hash[..], &encode(token)]).await?;
        Ok(n == 1)
    }

    pub(super) async fn take_api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        let result = async {
            let client = self.client().await?;
            let row = client
                .query_opt("DELETE FROM api_tokens WHERE hash = $1 RETURNING record", &[&&hash[..]])
                .await
                .map_err(pg)?;
            row.map(|r| ApiToken::decode(r.get(0))).transpose()
        }
        .await;
        self.track(result)
    }

    pub(super) async fn take_api_token_unless(
        &self,
        hash: &[u8; 32],
        refuse: super::RefuseTake,
    ) -> Result<Result<Option<ApiToken>, ()>, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            // One token change that depends on the others at a time, across
            // every hub (as creation).
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&TOKENS_LOCK]).await.map_err(pg)?;
            let rows = tx.query("SELECT hash, record FROM api_tokens", &[]).await.map_err(pg)?;
            let mut tokens = Vec::with_capacity(rows.len());
            for row in &rows {
                let Ok(h) = <[u8; 32]>::try_from(row.get::<_, &[u8]>(0)) else { continue };
                tokens.push((h, ApiToken::decode(row.get(1))?));
            }
            if refuse(&tokens, hash, Timestamp::now()) {
                return Ok(Err(()));
            }
            let row = tx
                .query_opt("DELETE FROM api_tokens WHERE hash = $1 RETURNING record", &[&&hash[..]])
                .await
                .map_err(pg)?;
            let taken = row.map(|r| ApiToken::decode(r.get(0))).transpose()?;
            tx.commit().await.map_err(pg)?;
            Ok(Ok(taken))
        }
        .await;
        self.track(result)
    }

    pub(super) async fn api_tokens(&self) -> Result<Vec<([u8; 32], ApiToken)>, StoreError> {
        let client = self.client().await?;
        let rows = client.query("SELECT hash, record FROM api_tokens", &[]).await.map_err(pg)?;
        rows.iter()
            .filter_map(|r| Some((<[u8; 32]>::try_from(r.get::<_, &[u8]>(0)).ok()?, r.get::<_, &[u8]>(1))))
            .map(|(hash, record)| Ok((hash, ApiToken::decode(record)?)))
            .collect()
    }

    pub(super) async fn set_labels(&self, id: &DeviceId, labels: &Labels) -> Result<bool, StoreError> {
        let text = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let n = self.write("UPDATE devices SET labels = $2 WHERE id = $1", &[&id.as_str(), &text]).await?;
        Ok(n == 1)
    }

    pub(super) async fn fleet_rows(&self, only: Option<&[DeviceId]>) -> Result<Vec<FleetRow>, StoreError> {
        let client = self.client().await?;
        let columns = Self::DEVICE_COLUMNS.split(", ").map(|c| format!("d.{c}")).collect::<Vec<_>>().join(", ");
        let base = format!(
            "SELECT {columns}, d.labels, d.digest, d.high_water, s.hub, s.epoch, s.transport, s.seen,
                    s.ended_at, s.end_reason, d.expired_seen, d.readmit_until, d.revoked_at, d.cert_expires
             FROM devices d LEFT JOIN sessions s ON s.device = d.id"
        );
        let rows = match only {
            Some(ids) => {
                let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
                client.query(&format!("{base} WHERE d.id = ANY($1) ORDER BY d.id"), &[&ids]).await
            }
            None => client.query(&format!("{base} ORDER BY d.id"), &[]).await,
        }
        .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let labels: &str = row.get(8);
                let digest = row.get::<_, Option<&[u8]>>(9).map(DeviceDigest::decode).transpose()?;
                let hub: Option<String> = row.get(11);
                Ok(FleetRow {
                    record: Self::device_row(row)?,
                    labels: serde_json::from_str(labels)
                        .map_err(|e| StoreError::Corrupt { what: "devices.labels", message: e.to_string() })?,
                    digest: digest.unwrap_or_default(),
                    high_water: unbig(row.get(10)),
                    session: hub.map(|_| Self::session_row(row, 11)),
                    admission: Admission {
                        expired_seen: row.get::<_, Option<i64>>(17).map(|v| Timestamp(unbig(v))),
                        readmit_until: row.get::<_, Option<i64>>(18).map(|v| Timestamp(unbig(v))),
                        revoked_at: row.get::<_, Option<i64>>(19).map(|v| Timestamp(unbig(v))),
                    },
                    cert_expires: row.get::<_, Option<i64>>(20).map(|v| Timestamp(unbig(v))),
                })
            })
            .collect()
    }

    pub(super) async fn prune_audit(&self, before: Timestamp) -> Result<usize, StoreError> {
        let deleted = self.write("DELETE FROM audit WHERE at < $1", &[&big(before.0)]).await?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    pub(super) async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            let id: i64 = tx.query_one("SELECT nextval('audit_id_seq')", &[]).await.map_err(pg)?.get(0);
            let mut entry = entry.clone();
            entry.id = unbig(id);
            tx.execute(
                "INSERT INTO audit (id, at, who, action, target, outcome, entry) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&id, &big(entry.at.0), &entry.who, &entry.action, &entry.target, &entry.outcome(), &encode(&entry)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(entry.id)
        }
        .await;
        self.track(result)
    }

    pub(super) async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let before = big(query.before.unwrap_or(u64::MAX));
        let since = big(query.since.map_or(0, |t| t.0));
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        self.many(
            "audit",
            "SELECT entry FROM audit WHERE id < $1 AND at >= $2
               AND ($3::text IS NULL OR who = $3 OR starts_with(who, $3 || $8))
               AND ($4::text IS NULL OR target = $4)
               AND ($5::text IS NULL OR strpos(action, $5) > 0) AND ($6::text IS NULL OR outcome = $6)
             ORDER BY id DESC LIMIT $7",
            &[&before, &since, &query.who, &query.target, &query.action, &query.outcome, &limit, &super::SESSION_OF],
        )
        .await
    }

    pub(super) async fn enroll(
        &self,
        token_id: &[u8; 16],
        allowed: u32,
        record: &DeviceRecord,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            // One statement counts the use or finds the token used up, so
            // two hubs redeeming the same token at once count both.
            let allowed_i = i32::try_from(allowed).unwrap_or(i32::MAX);
            let counted = tx
                .query_opt(
                    "INSERT INTO enroll_uses (token_id, used) SELECT $1, 1 WHERE $2 > 0
                     ON CONFLICT (token_id) DO UPDATE SET used = enroll_uses.used + 1 WHERE enroll_uses.used < $2
                     RETURNING used",
                    &[&&token_id[..], &allowed_i],
                )
                .await
                .map_err(pg)?;
            if counted.is_none() {
                let used = tx
                    .query_opt("SELECT used FROM enroll_uses WHERE token_id = $1", &[&&token_id[..]])
                    .await
                    .map_err(pg)?
                    .map_or(0, |r| r.get::<_, i32>(0));
                return Err(StoreError::UsedUp { used: u32::try_from(used).unwrap_or(0), allowed });
            }
            tx.execute(
                "INSERT INTO devices (id, name, enrolled_at, cert_fingerprint, public_key) VALUES ($1, $2, $3, $4, $5)",
                &[&record.id.as_str(), &record.name, &big(record.enrolled_at.0), &&record.cert_fingerprint.0[..], &key],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(())
        }
        .await;
        self.track(result)
    }

    const DEVICE_COLUMNS: &'static str =
        "id, name, enrolled_at, cert_fingerprint, agent_version, last_seen, last_addr, last_sample";

    fn device_row(row: &tokio_postgres::Row) -> Result<DeviceRecord, StoreError> {
        let id: &str = row.get(0);
        let fingerprint: &[u8] = row.get(3);
        Ok(DeviceRecord {
            id: id
                .parse()
                .map_err(|_| StoreError::Corrupt { what: "devices", message: format!("device id {id:?}") })?,
            name: row.get(1),
            enrolled_at: Timestamp(unbig(row.get(2))),
            cert_fingerprint: Fingerprint(fingerprint.try_into().unwrap_or([0; 32])),
            agent_version: row.get(4),
            last_seen: row.get::<_, Option<i64>>(5).map(|t| Timestamp(unbig(t))),
            last_addr: row.get(6),
            last_sample: row.get::<_, Option<&[u8]>>(7).map(|b| decode("devices", b)).transpose()?,
        })
    }

    pub(super) async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {} FROM devices WHERE id = $1", Self::DEVICE_COLUMNS);
        let row = client.query_opt(&sql, &[&id.as_str()]).await.map_err(pg)?;
        row.as_ref().map(Self::device_row).transpose()
    }

    pub(super) async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {} FROM devices ORDER BY id", Self::DEVICE_COLUMNS);
        let rows = client.query(&sql, &[]).await.map_err(pg)?;
        rows.iter().map(Self::device_row).collect()
    }

    pub(super) async fn record_hello(&self, hello: &HelloRecord) -> Result<bool, StoreError> {
        let n = self
            .write(
                "UPDATE devices SET name = $2, agent_version = $3, last_seen = $4, last_addr = $5 WHERE id = $1",
                &[&hello.id.as_str(), &hello.name, &hello.agent_version, &big(hello.at.0), &hello.addr],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn claim_session(&self, device: &DeviceId, hub: &str, transport: &str) -> Result<u64, StoreError> {
        let now = big(Timestamp::now().0);
        let result = async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "INSERT INTO sessions (device, hub, epoch, transport, since, seen) VALUES ($1, $2, 1, $3, $4, $4)
                     ON CONFLICT (device) DO UPDATE SET hub = excluded.hub, epoch = sessions.epoch + 1,
                        transport = excluded.transport, since = excluded.since, seen = excluded.seen,
                        ended_at = NULL, end_reason = NULL
                     RETURNING epoch",
                    &[&device.as_str(), &hub, &transport, &now],
                )
                .await
                .map_err(pg)?;
            Ok(unbig(row.get(0)))
        }
        .await;
        self.track(result)
    }

    pub(super) async fn holds_session(&self, device: &DeviceId, hub: &str, epoch: u64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM sessions WHERE device = $1 AND hub = $2 AND epoch = $3",
                &[&device.as_str(), &hub, &big(epoch)],
            )
            .await
            .map_err(pg)?;
        Ok(row.is_some())
    }

    pub(super) async fn set_cert_expires(&self, device: &DeviceId, not_after: Timestamp) -> Result<(), StoreError> {
        self.write(
            "UPDATE devices SET cert_expires = $2 WHERE id = $1 AND cert_expires IS DISTINCT FROM $2",
            &[&device.as_str(), &Some(big(not_after.0))],
        )
        .await
        .map(drop)
    }

    pub(super) async fn end_session(
        &self,
        device: &DeviceId,
        hub: &str,
        epoch: u64,
        at: Timestamp,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.write(
            "UPDATE sessions SET ended_at = $4, end_reason = $5 WHERE device = $1 AND hub = $2 AND epoch = $3",
            &[&device.as_str(), &hub, &big(epoch), &big(at.0), &reason],
        )
        .await
        .map(drop)
    }

    pub(super) async fn session(&self, device: &DeviceId) -> Result<Option<SessionRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT hub, epoch, transport, seen, ended_at, end_reason FROM sessions WHERE device = $1",
                &[&device.as_str()],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| Self::session_row(&r, 0)))
    }

    /// The session record in the six columns of `row` from `at` on: hub,
    /// epoch, transport, seen, ended_at, end_reason.
    fn session_row(row: &tokio_postgres::Row, at: usize) -> SessionRecord {
        let ended_at: Option<i64> = row.get(at + 4);
        let reason: Option<String> = row.get(at + 5);
        SessionRecord {
            hub: row.get(at),
            epoch: unbig(row.get(at + 1)),
            transport: row.get(at + 2),
            seen: Timestamp(unbig(row.get(at + 3))),
            ended: ended_at.map(|t| (Timestamp(unbig(t)), reason.unwrap_or_default())),
        }
    }

    pub(super) async fn touch_sessions(&self, hub: &str, seen: &[(DeviceId, Timestamp)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let devices: Vec<&str> = seen.iter().map(|(d, _)| d.as_str()).collect();
        let times: Vec<i64> = seen.iter().map(|(_, t)| big(t.0)).collect();
        self.write(
            "UPDATE sessions SET seen = greatest(sessions.seen, v.seen)
             FROM unnest($1::text[], $2::bigint[]) AS v(device, seen)
             WHERE sessions.device = v.device AND sessions.hub = $3",
            &[&devices, &times, &hub],
        )
        .await
        .map(drop)
    }

    pub(super) async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Timestamp::now();
        let result = async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                     WHERE leases.until < $4 OR leases.holder = excluded.holder
                     RETURNING holder",
                    &[&name, &holder, &big(now.saturating_add(ttl).0), &big(now.0)],
                )
                .await
                .map_err(pg)?;
            Ok(row.is_some())
        }
        .await;
        self.track(result)
    }

    pub(super) async fn other_holders(&self, prefix: &str, holder: &str) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let pattern = format!("{}%", prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM leases WHERE name LIKE $1 AND holder <> $2 AND until > $3",
                &[&pattern, &holder, &big(Timestamp::now().0)],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub(super) async fn take_up_number(
        &self,
        device: &DeviceId,
        session: u64,
        seq: u64,
        now: Timestamp,
    ) -> Result<Result<(), Stale>, StoreError> {
        let result = async {
            let client = self.client().await?;
            let (device, session, at) = (device.as_str(), bits(session), big(now.0));
            // Compare-and-swap: the state only grows, so an unchanged row
            // means no hub took a number in between. Lost races are retried.
            for _ in 0..UP_NUMBER_TRIES {
                let row = client
                    .query_opt(
                        "SELECT last, below FROM up_numbers WHERE device = $1 AND session = $2",
                        &[&device, &session],
                    )
                    .await
                    .map_err(pg)?;
                let old = row.map(|r| UpNumbers { last: unbits(r.get(0)), below: unbits(r.get(1)) });
                let next = match old.unwrap_or_default().admit(seq) {
                    Ok(next) => next,
                    Err(stale) => return Ok(Some(Err(stale))),
                };
                let (last, below) = (bits(next.last), bits(next.below));
                let changed = match old {
                    Some(old) => client
                        .execute(
                            "UPDATE up_numbers SET last = $3, below = $4, at = $5
                             WHERE device = $1 AND session = $2 AND last = $6 AND below = $7",
                            &[&device, &session, &last, &below, &at, &bits(old.last), &bits(old.below)],
                        )
                        .await
                        .map_err(pg)?,
                    None => {
                        let inserted = client
                            .execute(
                                "INSERT INTO up_numbers (device, session, last, below, at) VALUES ($1, $2, $3, $4, $5)
                                 ON CONFLICT (device, session) DO NOTHING",
                                &[&device, &session, &last, &below, &at],
                            )
                            .await
                            .map_err(pg)?;
                        if inserted == 1 {
                            // A new session: it and the device's most
                            // recently heard others are kept.
                            client
                                .execute(
                                    "DELETE FROM up_numbers WHERE device = $1 AND session IN (
                                         SELECT session FROM up_numbers WHERE device = $1 AND session <> $2
                                         ORDER BY at DESC, session OFFSET $3)",
                                    &[&device, &session, &big(UP_SESSIONS as u64 - 1)],
                                )
                                .await
                                .map_err(pg)?;
                        }
                        inserted
                    }
                };
                if changed == 1 {
                    return Ok(Some(Ok(())));
                }
            }
            Ok(None)
        }
        .await;
        // Lost races are not a fault of the database, which stays healthy:
        // the message is not processed (a batch is sent again unanswered).
        self.track(result)?.ok_or_else(|| {
            StoreError::Unavailable(format!(
                "the numbers of an MQTT session changed under {UP_NUMBER_TRIES} tries in a row"
            ))
        })
    }

    pub(super) async fn prune_up_numbers(&self, before: Timestamp) -> Result<usize, StoreError> {
        let deleted = self.write("DELETE FROM up_numbers WHERE at < $1", &[&big(before.0)]).await?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    pub(super) async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.write("DELETE FROM leases WHERE name = $1 AND holder = $2", &[&name, &holder]).await.map(drop)
    }

    pub(super) async fn hub_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT value FROM hub_state WHERE name = $1", &[&name]).await.map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn put_hub_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.write(
            "INSERT INTO hub_state (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&name, &value],
        )
        .await
        .map(drop)
    }

    pub(super) async fn notify(&self, device: &DeviceId, from: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "SELECT pg_notify('outpost_' || hub, device) FROM sessions WHERE device = $1 AND hub <> $2",
                &[&device.as_str(), &from],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn pending_devices(
        &self,
        devices: &[DeviceId],
        since: Timestamp,
    ) -> Result<Vec<DeviceId>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device FROM commands WHERE state = 'queued' AND device = ANY($1)
                 UNION SELECT device FROM desired WHERE device = ANY($1) AND updated_at >= $2",
                &[&ids, &big(since.0)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().filter_map(|r| r.get::<_, &str>(0).parse().ok()).collect())
    }

    /// Listens on `hub`'s channel on a connection of its own (not the
    /// pool's), forwarding device ids, reconnecting after a failure.
    pub(super) fn listen(
        &self,
        hub: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<DeviceId>> {
        if !self.listen {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (url, channel) = (self.url.clone(), format!("outpost_{hub}"));
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            loop {
                let listened = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = listen_once(&url, &channel, &tx) => r,
                };
                match listened {
                    Ok(()) => return, // the receiver is gone
                    Err(e) => tracing::debug!(error = %e, "Listening connection lost; reconnecting."),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
        Some(rx)
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        // Every write committed before it returned.
        Ok(())
    }

    pub(super) async fn close(self) -> Result<(), StoreError> {
        self.pool.close();
        Ok(())
    }
}

/// One listening connection: `LISTEN channel`, then every notification's
/// payload (a device id) to `tx` until the connection fails (`Err`) or the
/// receiver goes (`Ok`).
async fn listen_once(url: &str, channel: &str, tx: &tokio::sync::mpsc::Sender<DeviceId>) -> Result<(), String> {
    let (config, tls) = config(url)?;
    match tls {
        pgtls::Tls::Off => {
            let (client, connection) = config.connect(NoTls).await.map_err(|e| describe(&e))?;
            listen_on(client, connection, channel, tx).await
        }
        pgtls::Tls::Verified(root) => {
            let connector = pgtls::connector(root.as_deref())?;
            let (client, connection) = config.connect(connector).await.map_err(|e| describe(&e))?;
            listen_on(client, connection, channel, tx).await
        }
    }
}

/// [`listen_once`] on a connection made, plain or TLS.
async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    channel: &str,
    tx: &tokio::sync::mpsc::Sender<DeviceId>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if notes_tx.send(n.payload().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(describe(&e)),
                None => return Err("connection closed".to_owned()),
            }
        }
    });
    // Quoted: hub names are made by the hub (`[a-z0-9-]`), but never trust.
    let quoted = format!("\"{}\"", channel.replace('"', ""));
    client.batch_execute(&format!("LISTEN {quoted}")).await.map_err(|e| describe(&e))?;
    tracing::debug!(%channel, "Listening for wake-ups from other hubs.");
    while let Some(payload) = notes.recv().await {
        if let Ok(id) = payload.parse::<DeviceId>()
            && tx.send(id).await.is_err()
        {
            driver.abort();
            return Ok(());
        }
    }
    drop(client);
    driver.await.map_err(|e| e.to_string())?
}

fn parse_partition_day(date: &str) -> Option<u64> {
    if date.len() != 8 {
        return None;
    }
    let year: i32 = date.get(0..4)?.parse().ok()?;
    let month: u8 = date.get(4..6)?.parse().ok()?;
    let day: u8 = date.get(6..8)?.parse().ok()?;
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    u64::try_from((date - time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?).whole_days()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_days_near_now_once() {
        let now = 20_000 * DAY_MS + 5;
        let known: HashSet<u64> = [20_000].into_iter().collect();
        let times = [now, now + DAY_MS, now + DAY_MS + 1, now - 3 * DAY_MS, 0, now + 30 * DAY_MS];
        assert_eq!(partitions_needed(&times, now, &known), [19_997, 20_001]);
    }

    #[test]
    fn partition_names_round_trip() {
        for day in [0, 20_000, 20_787] {
            let name = partition_name(day);
            assert_eq!(parse_partition_day(name.strip_prefix("telemetry_").unwrap()), Some(day), "{name}");
        }
        assert_eq!(partition_name(20_787), "telemetry_20261130");
    }
}
