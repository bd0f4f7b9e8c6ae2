//! Telemetry: the sampler (sysinfo), the queue of samples waiting for the
//! uplink, and the actor that samples on an interval.
//!
//! Sampling reads `/proc` and `/sys` and runs on tokio's blocking pool, never
//! on the actor's thread. Samples go into the [`TelemetryQueue`], which the
//! uplink drains while connected. The queue outlives both actors, so a
//! restart of either loses nothing queued. It is bounded and in memory: the
//! oldest samples are dropped when it is full.

use actix::prelude::*;
use outpost_shared::telemetry::{DiskSample, NetSample, Sample, TempSample};
use outpost_shared::time::Timestamp;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sysinfo::{Components, Disks, Networks, System};
use tokio::sync::Notify;

/// Reads the device's health from the OS.
pub struct Sampler {
    system: System,
    disks: Disks,
    networks: Networks,
    components: Components,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampler")
    }
}

impl Sampler {
    /// A sampler with a first CPU reading taken, so the first sample's CPU
    /// share covers the time since construction. Fails only on an OS that
    /// sysinfo does not support.
    pub fn new() -> Result<Self, sysinfo::Error> {
        let mut system = System::new()?;
        system.refresh_cpu_usage();
        Ok(Sampler {
            system,
            disks: Disks::new_with_refreshed_list()?,
            networks: Networks::new_with_refreshed_list()?,
            components: Components::new_with_refreshed_list()?,
        })
    }

    /// Takes one sample.
    pub fn sample(&mut self) -> Sample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        self.components.refresh(true);
        let load = System::load_average().map_or([0.0; 3], |l| {
            [l.one as f32, l.five as f32, l.fifteen as f32]
        });
        let mut disks: Vec<DiskSample> = self
            .disks
            .iter()
            .map(|d| DiskSample {
                mount: d.mount_point().display().to_string(),
                used_bytes: d.total_space().saturating_sub(d.available_space()),
                total_bytes: d.total_space(),
            })
            .collect();
        disks.sort_by(|a, b| a.mount.cmp(&b.mount));
        let mut net: Vec<NetSample> = self
            .networks
            .iter()
            .map(|(name, data)| NetSample {
                iface: name.to_string_lossy().into_owned(),
                rx_bytes: data.total_received(),
                tx_bytes: data.total_transmitted(),
            })
            .collect();
        net.sort_by(|a, b| a.iface.cmp(&b.iface));
        let temperatures = self
            .components
            .iter()
            .filter_map(|c| {
                Some(TempSample {
                    label: c.label().to_owned(),
                    celsius: c.temperature()?,
                })
            })
            .collect();
        let total = self.system.total_memory();
        Sample {
            at: Timestamp::now(),
            cpu_percent: self.system.global_cpu_usage(),
            mem_used_bytes: total.saturating_sub(self.system.available_memory()),
            mem_total_bytes: total,
            swap_used_bytes: self.system.used_swap(),
            load,
            uptime_secs: System::uptime().unwrap_or(0),
            disks,
            net,
            temperatures,
        }
    }
}

/// Samples waiting for the uplink; bounded, oldest dropped first.
#[derive(Debug, Clone)]
pub struct TelemetryQueue {
    inner: Arc<Mutex<QueueState>>,
    ready: Arc<Notify>,
}

#[derive(Debug)]
struct QueueState {
    samples: VecDeque<Sample>,
    capacity: usize,
    dropped: u64,
}

impl TelemetryQueue {
    /// A queue holding at most `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        let state = QueueState {
            samples: VecDeque::new(),
            capacity: capacity.max(1),
            dropped: 0,
        };
        TelemetryQueue {
            inner: Arc::new(Mutex::new(state)),
            ready: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a sample, dropping the oldest if full.
    pub fn push(&self, sample: Sample) {
        let mut state = self.state();
        if state.samples.len() >= state.capacity {
            state.samples.pop_front();
            state.dropped += 1;
        }
        state.samples.push_back(sample);
        drop(state);
        self.ready.notify_one();
    }

    /// The oldest sample, left in the queue.
    pub fn front(&self) -> Option<Sample> {
        self.state().samples.front().cloned()
    }

    /// Removes the oldest sample once it has been sent.
    pub fn pop_front(&self) {
        self.state().samples.pop_front();
    }

    /// Samples waiting.
    pub fn len(&self) -> usize {
        self.state().samples.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Resolves once a sample is pushed after the last wake-up.
    pub async fn wait(&self) {
        self.ready.notified().await;
    }
}

/// Samples the device on an interval into the queue.
#[derive(Debug)]
pub struct TelemetryActor {
    interval: Duration,
    queue: TelemetryQueue,
    sampler: Arc<Mutex<Sampler>>,
}

impl TelemetryActor {
    /// An actor sampling every `interval` into `queue` with `sampler`
    /// (shared across restarts, so the CPU baseline survives them).
    pub fn new(interval: Duration, queue: TelemetryQueue, sampler: Arc<Mutex<Sampler>>) -> Self {
        TelemetryActor {
            interval,
            queue,
            sampler,
        }
    }

    fn take_sample(&self, ctx: &mut Context<Self>) {
        let sampler = self.sampler.clone();
        let queue = self.queue.clone();
        let work = async move {
            let result = tokio::task::spawn_blocking(move || {
                sampler.lock().unwrap_or_else(|p| p.into_inner()).sample()
            })
            .await;
            match result {
                Ok(sample) => queue.push(sample),
                Err(e) => tracing::warn!(error = %e, "Telemetry sampling failed."),
            }
        };
        ctx.spawn(work.into_actor(self));
    }
}

impl Actor for TelemetryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The first sample soon after start, so a new device shows figures
        // without waiting a whole interval.
        let first = self.interval.min(Duration::from_secs(1));
        ctx.run_later(first, |act, ctx| {
            act.take_sample(ctx);
            ctx.run_interval(act.interval, |act, ctx| act.take_sample(ctx));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_reads_this_machine() {
        let mut sampler = Sampler::new().unwrap();
        let s = sampler.sample();
        assert!(s.mem_total_bytes > 0);
        assert!(s.mem_used_bytes <= s.mem_total_bytes);
        assert!(s.uptime_secs > 0);
        assert!((0.0..=100.0).contains(&s.cpu_percent));
        assert!(
            !s.net.is_empty(),
            "no network interfaces seen (lo should be there)"
        );
    }

    #[test]
    fn queue_drops_oldest_when_full() {
        let mut sampler = Sampler::new().unwrap();
        let q = TelemetryQueue::new(2);
        let mut samples = Vec::new();
        for i in 0..3 {
            let mut s = sampler.sample();
            s.at = Timestamp(i);
            samples.push(s.clone());
            q.push(s);
        }
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.front().map(|s| s.at), Some(Timestamp(1)));
    }
}
