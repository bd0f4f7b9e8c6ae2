//! The agent's Prometheus metrics, served on a loopback address when
//! `[metrics] listen` is set (off by default): `GET /metrics`, Prometheus
//! text format 0.0.4.
//!
//! Counters move where things happen ([`METRICS`]: records sent and
//! acknowledged, reconnects by reason, job and backup runs by outcome,
//! collector durations); the outbox, uplink and peer gauges are read when
//! scraped ([`Sources`]). The server is a listener task of its own: it
//! accepts at most [`MAX_CLIENTS`] connections at once, reads one request
//! head of at most [`MAX_HEAD`] bytes within [`READ_TIMEOUT`] (parsed by
//! httparse), answers and closes. Nothing runs between scrapes.

use crate::link::LinkState;
use crate::peers::PeerTable;
use crate::store::AgentStore;
use outpost_shared::job::{JobRun, RunOutcome};
use outpost_shared::peers::PeerState;
use outpost_shared::time::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The process's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// Most scrapes served at once; more connections are closed at once.
pub const MAX_CLIENTS: usize = 4;
/// Longest request head read.
pub const MAX_HEAD: usize = 8192;
/// A client must send its request within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A label `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// A label `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// How it ended.
    pub outcome: &'static str,
}

/// A label `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// The state.
    pub state: &'static str,
}

/// A label `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Transport {
    /// `quic` or `mqtt`.
    pub transport: &'static str,
}

/// A label `collector`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Collector {
    /// What was collected (`telemetry`).
    pub collector: &'static str,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Records sent to the hub in batches (again after a reconnect, too).
    pub records_sent: Counter,
    /// Records the hub acknowledged (trimmed from the outbox).
    pub records_acked: Counter,
    /// Ends of hub sessions and failed attempts, by reason.
    pub reconnects: Family<Reason, Counter>,
    /// Job attempts by outcome.
    pub job_runs: Family<Outcome, Counter>,
    /// Backup runs (the `backup-*` jobs) by outcome.
    pub backup_runs: Family<Outcome, Counter>,
    /// When a backup last succeeded, Unix seconds (0: not since start).
    pub backup_last_success: Gauge<f64, AtomicU64>,
    /// Time of the collectors.
    pub collector_seconds: Family<Collector, Histogram>,
    connected: Family<Transport, Gauge>,
    outbox_records: Gauge,
    outbox_bytes: Gauge,
    outbox_oldest: Gauge<f64, AtomicU64>,
    peers: Family<State, Gauge>,
}

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_agent");
        let m = AgentMetrics {
            registry: Registry::default(),
            records_sent: Counter::default(),
            records_acked: Counter::default(),
            reconnects: Family::default(),
            job_runs: Family::default(),
            backup_runs: Family::default(),
            backup_last_success: Gauge::default(),
            collector_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 7))),
            connected: Family::default(),
            outbox_records: Gauge::default(),
            outbox_bytes: Gauge::default(),
            outbox_oldest: Gauge::default(),
            peers: Family::default(),
        };
        registry.register("build", "The agent's version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        registry.register(
            "uplink_connected",
            "1 while a session with the hub is open, by the configured transport",
            m.connected.clone(),
        );
        registry.register("outbox_records", "Records waiting for the hub", m.outbox_records.clone());
        registry.register_with_unit(
            "outbox",
            "Bytes of records waiting for the hub",
            Unit::Bytes,
            m.outbox_bytes.clone(),
        );
        registry.register_with_unit(
            "outbox_oldest_record_age",
            "Age of the oldest record waiting (0 when none waits)",
            Unit::Seconds,
            m.outbox_oldest.clone(),
        );
        registry.register(
            "records_sent",
            "Records sent to the hub (again after a reconnect, too)",
            m.records_sent.clone(),
        );
        registry.register("records_acknowledged", "Records the hub acknowledged", m.records_acked.clone());
        registry.register("reconnects", "Hub sessions ended and attempts failed, by reason", m.reconnects.clone());
        registry.register("job_runs", "Job attempts by outcome", m.job_runs.clone());
        registry.register("backup_runs", "Backup runs by outcome", m.backup_runs.clone());
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When a backup last succeeded, Unix time (0: none since the agent started)",
            m.backup_last_success.clone(),
        );
        registry.register("peers", "LAN peers by state", m.peers.clone());
        registry.register_with_unit(
            "collector_duration",
            "Time to collect, by collector",
            Unit::Seconds,
            m.collector_seconds.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    /// Counts a job attempt that ended.
    pub fn job_ended(&self, run: &JobRun) {
        let outcome = run_outcome(&run.outcome);
        self.job_runs.get_or_create(&Outcome { outcome }).inc();
        if run.job.starts_with(outpost_shared::job::BACKUP_JOB_PREFIX) {
            self.backup_runs.get_or_create(&Outcome { outcome }).inc();
            if run.outcome.succeeded() {
                self.backup_last_success.set(run.ended.0 as f64 / 1000.0);
            }
        }
    }

    /// Sets the gauges read at scrape time.
    fn set_from(&self, s: &Sources) {
        let connected = matches!(*s.link.borrow(), LinkState::Connected);
        self.connected.get_or_create(&Transport { transport: s.transport }).set(i64::from(connected));
        let stats = s.store.stats();
        self.outbox_records.set(i64::try_from(stats.records).unwrap_or(i64::MAX));
        self.outbox_bytes.set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let oldest =
            s.store.peek(stats.acked_seq.saturating_add(1), 1, usize::MAX).ok().and_then(|r| r.first().map(|r| r.at));
        self.outbox_oldest.set(oldest_age(oldest, Timestamp::now()));
        let mut counts = [0i64; 5];
        for peer in s.peers.snapshot() {
            counts[peer_state_index(&peer.state)] += 1;
        }
        for (state, n) in PEER_STATES.iter().zip(counts) {
            self.peers.get_or_create(&State { state }).set(n);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

const PEER_STATES: [&str; 5] = ["unverified", "trusted", "foreign", "untrusted", "gone"];

fn peer_state_index(state: &PeerState) -> usize {
    match state {
        PeerState::Unverified => 0,
        PeerState::Trusted => 1,
        PeerState::Foreign => 2,
        PeerState::Untrusted { .. } => 3,
        PeerState::Gone => 4,
    }
}

/// The `outcome` label of a job attempt: `succeeded`, `failed` (a non-zero
/// exit or a built-in task's failure), else the outcome's kind. Pure.
pub fn run_outcome(outcome: &RunOutcome) -> &'static str {
    match outcome {
        RunOutcome::Exited { code: 0 } => "succeeded",
        RunOutcome::Exited { .. } => "failed",
        other => other.kind(),
    }
}

/// Seconds since the oldest waiting record was made (0 if none, or if the
/// device's clock says it is from the future). Pure.
pub fn oldest_age(oldest: Option<Timestamp>, now: Timestamp) -> f64 {
    oldest.map_or(0.0, |at| now.0.saturating_sub(at.0) as f64 / 1000.0)
}

/// Times a collector until dropped.
pub struct CollectorTimer(&'static str, Instant);

impl CollectorTimer {
    /// Starts timing `collector`.
    pub fn start(collector: &'static str) -> Self {
        CollectorTimer(collector, Instant::now())
    }
}

impl Drop for CollectorTimer {
    fn drop(&mut self) {
        METRICS
            .collector_seconds
            .get_or_create(&Collector { collector: self.0 })
            .observe(self.1.elapsed().as_secs_f64());
    }
}

/// What the scrape-time gauges are read from.
#[derive(Clone)]
pub struct Sources {
    /// The outbox.
    pub store: AgentStore,
    /// The uplink's state.
    pub link: watch::Receiver<LinkState>,
    /// The LAN peers.
    pub peers: PeerTable,
    /// The configured transport, `quic` or `mqtt`.
    pub transport: &'static str,
}

/// What to answer a request head: status, reason, body. Pure.
pub fn answer(head: &[u8]) -> (u16, &'static str, Option<&'static str>) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some("GET" | "HEAD"), Some("/metrics")) => (200, "OK", None),
            (Some(_), Some("/metrics")) => (405, "Method Not Allowed", Some("only GET\n")),
            _ => (404, "Not Found", Some("only /metrics is served here\n")),
        },
        Ok(httparse::Status::Partial) | Err(_) => (400, "Bad Request", Some("not an HTTP/1.x request head\n")),
    }
}

/// Serves `/metrics` on `listen` until `cancel`.
pub async fn serve(listen: SocketAddr, sources: Sources, cancel: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "Cannot serve metrics.");
            // Ending lets the supervisor retry later.
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
    };
    tracing::info!(listen = %listener.local_addr().unwrap_or(listen), "Serving metrics at /metrics.");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "Metrics connection not accepted.");
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = tokio::time::timeout(READ_TIMEOUT, respond(stream, &sources)).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within the time allowed"))
            }) {
                tracing::debug!(error = %e, "Metrics request not answered.");
            }
        });
    }
}

async fn respond(mut stream: tokio::net::TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, reason, fixed) = answer(&head);
    let (kind, body) = match fixed {
        Some(text) => ("text/plain; charset=utf-8", text.to_owned()),
        None => {
            METRICS.set_from(sources);
            let text = METRICS.encode().map_err(std::io::Error::other)?;
            (prometheus_client::encoding::prometheus_text::CONTENT_TYPE, text)
        }
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;

    #[test]
    fn only_get_of_metrics_is_answered_with_metrics() {
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0, 200);
        assert_eq!(answer(b"HEAD /metrics HTTP/1.0\r\n\r\n").0, 200);
        assert_eq!(answer(b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(answer(b"GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\n").0, 400, "an incomplete head");
        assert_eq!(answer(b"\x16\x03\x01 binary").0, 400);
    }

    #[test]
    fn outcomes_and_ages() {
        assert_eq!(run_outcome(&RunOutcome::Exited { code: 0 }), "succeeded");
        assert_eq!(run_outcome(&RunOutcome::Exited { code: 3 }), "failed");
        assert_eq!(run_outcome(&RunOutcome::TimedOut), "timed_out");
        assert_eq!(oldest_age(None, Timestamp(5_000)), 0.0);
        assert_eq!(oldest_age(Some(Timestamp(2_000)), Timestamp(5_500)), 3.5);
        assert_eq!(oldest_age(Some(Timestamp(9_000)), Timestamp(5_000)), 0.0, "a record from the future");
    }

    #[test]
    fn a_backup_run_sets_its_last_success() {
        let run = |job: &str, code| JobRun {
            run_id: 1,
            job: job.into(),
            trigger: outpost_shared::job::Trigger::Manual,
            attempt: 1,
            started: Timestamp(1_000),
            ended: Timestamp(61_000),
            outcome: RunOutcome::Exited { code },
            output: String::new(),
            output_bytes: 0,
        };
        METRICS.job_ended(&run("backup-etc", 0));
        METRICS.job_ended(&run("rotate-logs", 1));
        let text = METRICS.encode().unwrap();
        assert!(text.contains("outpost_agent_backup_last_success_timestamp_seconds 61"), "{text}");
        assert!(text.contains("outpost_agent_backup_runs_total{outcome=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("outpost_agent_job_runs_total{outcome=\"failed\"} 1"), "{text}");
    }
}
