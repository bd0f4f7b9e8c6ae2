//! The hub's Prometheus metrics, served at `GET /metrics` in the Prometheus
//! text format (0.0.4) by `web::http::metrics`.
//!
//! One set per process ([`METRICS`]): counters move where things happen
//! (ingest, sessions, commands, HTTP requests, store calls); the fleet's
//! gauges (devices by state, alarmed, overdue backups) are read from the
//! store at scrape time ([`HubMetrics::set_fleet`]). A leaf module: what
//! counts here imports it, it imports nothing of the hub. No label names a
//! device: 10,000 devices would be 10,000 series. With several hubs each
//! counts its own traffic; the fleet gauges are the same on every hub.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::LazyLock;
use std::time::Instant;

/// The process's metrics.
pub static METRICS: LazyLock<HubMetrics> = LazyLock::new(HubMetrics::new);

/// A label `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// A label `transport` (`quic`, `mqtt`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Transport {
    /// The transport.
    pub transport: &'static str,
}

/// A label `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// The state.
    pub state: &'static str,
}

/// Labels of an HTTP request: the route's pattern (never the raw path, whose
/// values are unbounded), the method and the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    /// The matched route (`/api/v1/devices/{id}`), or `other`.
    pub route: String,
    /// The method.
    pub method: String,
    /// The status code.
    pub code: u16,
}

/// A label `route`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    /// The matched route, or `other`.
    pub route: String,
}

/// Labels of a notification: the receiver (from the config) and how its
/// delivery ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Notification {
    /// The receiver's name.
    pub receiver: String,
    /// `sent`, `retrying` or `failed`.
    pub result: &'static str,
}

/// A label `operation` (a store method).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    /// The store method.
    pub operation: &'static str,
}

/// The fleet's figures the gauges show (from the overview).
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetCounts {
    /// Devices heard from within the heartbeat timeout.
    pub online: usize,
    /// Heard from before, silent now.
    pub offline: usize,
    /// Never connected.
    pub never_connected: usize,
    /// With an alarm raised.
    pub alarmed: usize,
    /// With a scheduled backup overdue.
    pub overdue_backups: usize,
    /// With a failed job attempt in the last 24 hours.
    pub failing_jobs: usize,
    /// That refused their latest desired state.
    pub desired_refused: usize,
}

/// The hub's metrics.
pub struct HubMetrics {
    registry: Registry,
    /// Records stored (not counting duplicates).
    pub records: Counter,
    /// Bytes of the batches whose records were stored.
    pub bytes: Counter,
    /// Records received again after a lost ack, acknowledged, not stored.
    pub duplicates: Counter,
    /// Batches refused, by reason.
    pub batches_refused: Family<Reason, Counter>,
    /// Sessions opened, by transport.
    pub sessions: Family<Transport, Counter>,
    /// Sessions open now, by transport.
    pub sessions_open: Family<Transport, Gauge>,
    /// New QUIC connections turned away at the door (`busy`: past the
    /// accept rate, told when to come back; `handshakes`: past the cap on
    /// handshakes in flight, refused before the handshake).
    pub turned_away: Family<Reason, Counter>,
    /// Commands by what happened to them: `queued`, then `succeeded`,
    /// `failed`, `interrupted`, `rejected` or `expired`.
    pub commands: Family<State, Counter>,
    /// HTTP requests answered.
    pub http_requests: Family<Request, Counter>,
    /// HTTP request durations.
    pub http_seconds: Family<Route, Histogram>,
    /// Store call durations.
    pub store_seconds: Family<Operation, Histogram>,
    /// Console live streams open.
    pub live_streams: Gauge,
    /// Alerts by state (pending, firing), on the hub that evaluates them.
    pub alerts: Family<State, Gauge>,
    /// Alert notifications by receiver and result.
    pub notifications: Family<Notification, Counter>,
    /// Time of the rounds of alert evaluation this hub made (it holds the
    /// lease): the fleet read, the rules, the book written; not the
    /// deliveries.
    pub evaluation_seconds: Histogram,
    devices: Family<State, Gauge>,
    alarmed: Gauge,
    overdue_backups: Gauge,
    failing_jobs: Gauge,
    desired_refused: Gauge,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

impl HubMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_hub");
        let m = HubMetrics {
            records: Counter::default(),
            bytes: Counter::default(),
            duplicates: Counter::default(),
            batches_refused: Family::default(),
            sessions: Family::default(),
            sessions_open: Family::default(),
            turned_away: Family::default(),
            commands: Family::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(seconds_histogram),
            store_seconds: Family::new_with_constructor(seconds_histogram),
            live_streams: Gauge::default(),
            alerts: Family::default(),
            notifications: Family::default(),
            evaluation_seconds: seconds_histogram(),
            devices: Family::default(),
            alarmed: Gauge::default(),
            overdue_backups: Gauge::default(),
            failing_jobs: Gauge::default(),
            desired_refused: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("build", "The hub's version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        registry.register("ingested_records", "Records from devices stored", m.records.clone());
        registry.register_with_unit("ingested", "Bytes of device batches stored", Unit::Bytes, m.bytes.clone());
        registry.register(
            "duplicate_records",
            "Records received again after a lost acknowledgement (acknowledged, not stored again)",
            m.duplicates.clone(),
        );
        registry.register("batches_refused", "Device batches refused, by reason", m.batches_refused.clone());
        registry.register("sessions", "Device sessions opened, by transport", m.sessions.clone());
        registry.register("sessions_open", "Device sessions open now, by transport", m.sessions_open.clone());
        registry.register(
            "connections_turned_away",
            "New QUIC connections turned away at the door: busy (past [quic] accept_rate, told when to come back) \
             or handshakes (past [quic] max_handshakes, refused before the handshake)",
            m.turned_away.clone(),
        );
        registry.register(
            "commands",
            "Commands by what happened to them (queued, then succeeded, failed, interrupted, rejected or expired)",
            m.commands.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status code",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer HTTP requests, by route",
            Unit::Seconds,
            m.http_seconds.clone(),
        );
        registry.register_with_unit(
            "store_operation_duration",
            "Time of store calls, by operation",
            Unit::Seconds,
            m.store_seconds.clone(),
        );
        registry.register("console_live_streams", "Console live-update streams open", m.live_streams.clone());
        registry.register("alerts", "Alerts by state, on the hub that evaluates them", m.alerts.clone());
        registry.register_with_unit(
            "alert_evaluation_duration",
            "Time of the rounds of alert evaluation made by this hub (deliveries not included)",
            Unit::Seconds,
            m.evaluation_seconds.clone(),
        );
        registry.register(
            "alert_notifications",
            "Alert notifications by receiver and result (sent, retrying, failed)",
            m.notifications.clone(),
        );
        registry.register(
            "devices",
            "Enrolled devices by state (online, offline, never_connected), read at scrape",
            m.devices.clone(),
        );
        registry.register("devices_alarmed", "Devices with an alarm raised and not cleared", m.alarmed.clone());
        registry.register(
            "devices_backup_overdue",
            "Devices with a scheduled backup overdue",
            m.overdue_backups.clone(),
        );
        registry.register(
            "devices_failing_jobs",
            "Devices with a failed job attempt in the last 24 hours",
            m.failing_jobs.clone(),
        );
        registry.register(
            "devices_desired_refused",
            "Devices that refused their latest desired state",
            m.desired_refused.clone(),
        );
        HubMetrics { registry, ..m }
    }

    /// Sets the fleet's gauges, read at scrape time.
    pub fn set_fleet(&self, f: &FleetCounts) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in [("online", f.online), ("offline", f.offline), ("never_connected", f.never_connected)] {
            self.devices.get_or_create(&State { state }).set(gauge(n));
        }
        self.alarmed.set(gauge(f.alarmed));
        self.overdue_backups.set(gauge(f.overdue_backups));
        self.failing_jobs.set(gauge(f.failing_jobs));
        self.desired_refused.set(gauge(f.desired_refused));
    }

    /// Counts the command results among newly stored `records`.
    pub fn count_results<'a>(&self, records: impl Iterator<Item = &'a outpost_shared::protocol::Record>) {
        for record in records {
            if let outpost_shared::protocol::RecordBody::CommandResult(result) = &record.body {
                self.commands.get_or_create(&State { state: outcome_state(&result.outcome) }).inc();
            }
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `state` label of a command that ended with `outcome`. Pure.
pub fn outcome_state(outcome: &outpost_shared::protocol::Outcome) -> &'static str {
    use outpost_shared::protocol::Outcome;
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed { .. } => "failed",
        Outcome::Expired => "expired",
        Outcome::Interrupted => "interrupted",
        Outcome::Rejected => "rejected",
    }
}

/// Observes a store call's duration when dropped (so a call that fails or
/// is cancelled is counted too).
pub struct StoreTimer {
    operation: &'static str,
    started: Instant,
}

impl StoreTimer {
    /// Starts timing `operation`.
    pub fn start(operation: &'static str) -> Self {
        StoreTimer { operation, started: Instant::now() }
    }
}

impl Drop for StoreTimer {
    fn drop(&mut self) {
        METRICS
            .store_seconds
            .get_or_create(&Operation { operation: self.operation })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Counts a session open on `transport` while it lives.
#[derive(Debug)]
pub struct OpenSession(&'static str);

impl OpenSession {
    /// A session opened on `transport`.
    pub fn new(transport: &'static str) -> Self {
        METRICS.sessions.get_or_create(&Transport { transport }).inc();
        METRICS.sessions_open.get_or_create(&Transport { transport }).inc();
        OpenSession(transport)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        METRICS.sessions_open.get_or_create(&Transport { transport: self.0 }).dec();
    }
}

/// Counts a console live stream while it lives.
#[derive(Debug)]
pub struct LiveStream(());

impl LiveStream {
    /// A stream opened.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        METRICS.live_streams.inc();
        LiveStream(())
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        METRICS.live_streams.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;

    #[test]
    fn names_follow_prometheus_practice_and_no_label_names_a_device() {
        METRICS.records.inc_by(3);
        METRICS.batches_refused.get_or_create(&Reason { reason: "signature" }).inc();
        drop(StoreTimer::start("ingest"));
        let text = METRICS.encode().unwrap();
        assert!(text.contains("# TYPE outpost_hub_ingested_records_total counter"), "{text}");
        assert!(text.contains("outpost_hub_batches_refused_total{reason=\"signature\"} 1"), "{text}");
        assert!(text.contains("outpost_hub_ingested_bytes_total 0"), "{text}");
        assert!(text.contains("outpost_hub_store_operation_duration_seconds_count{operation=\"ingest\"} 1"), "{text}");
        assert!(text.contains("outpost_hub_build_info{version=\""), "{text}");
        assert!(!text.contains("device="), "{text}");
    }
}
