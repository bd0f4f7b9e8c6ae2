//! The agent's Prometheus metrics (served by [`crate::exporter`] when
//! `[metrics] listen` is set).
//!
//! Counters move where things happen ([`METRICS`]: records sent and
//! acknowledged, reconnects by reason, job and backup runs by outcome,
//! collector durations); the outbox, uplink and peer gauges are set when
//! scraped ([`AgentMetrics::set_gauges`]). A leaf module: the store, the
//! uplink and the jobs count here without this module knowing them.

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
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// The process's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

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
    pub fn set_gauges(&self, g: &Gauges) {
        self.connected.get_or_create(&Transport { transport: g.transport }).set(i64::from(g.connected));
        self.outbox_records.set(i64::try_from(g.outbox_records).unwrap_or(i64::MAX));
        self.outbox_bytes.set(i64::try_from(g.outbox_bytes).unwrap_or(i64::MAX));
        self.outbox_oldest.set(oldest_age(g.oldest_record, Timestamp::now()));
        let mut counts = [0i64; 5];
        for state in &g.peers {
            counts[peer_state_index(state)] += 1;
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

/// What the scrape-time gauges show.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// The configured transport, `quic` or `mqtt`.
    pub transport: &'static str,
    /// A session with the hub is open.
    pub connected: bool,
    /// Records waiting.
    pub outbox_records: u64,
    /// Their bytes.
    pub outbox_bytes: u64,
    /// When the oldest of them was made.
    pub oldest_record: Option<Timestamp>,
    /// The LAN peers' states.
    pub peers: Vec<PeerState>,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;

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
