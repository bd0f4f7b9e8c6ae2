//! Telemetry: the sampler (sysinfo) and the actor that samples on an
//! interval into the durable outbox.
//!
//! Sampling reads `/proc` and `/sys` and runs on tokio's blocking pool, never
//! on the actor's thread. The interval comes from [`Settings`], which the
//! hub's desired state can change while the agent runs.

use crate::settings::Settings;
use crate::store::AgentStore;
use actix::prelude::*;
use outpost_shared::protocol::RecordBody;
use outpost_shared::telemetry::{DiskSample, NetSample, Sample, TempSample};
use outpost_shared::time::Timestamp;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sysinfo::{Components, Disks, Networks, System};
use tokio::sync::watch;

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
        let load = System::load_average().map_or([0.0; 3], |l| [l.one as f32, l.five as f32, l.fifteen as f32]);
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
            .filter_map(|c| Some(TempSample { label: c.label().to_owned(), celsius: c.temperature()? }))
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

/// Samples the device on an interval into the outbox.
#[derive(Debug)]
pub struct TelemetryActor {
    store: AgentStore,
    sampler: Arc<Mutex<Sampler>>,
    settings: watch::Receiver<Settings>,
    ticker: Option<SpawnHandle>,
    /// The interval the schedule runs at.
    interval: Duration,
}

impl TelemetryActor {
    /// An actor sampling with `sampler` (shared across restarts, so the CPU
    /// baseline survives them) into `store`, at the interval `settings` say.
    pub fn new(store: AgentStore, sampler: Arc<Mutex<Sampler>>, settings: watch::Receiver<Settings>) -> Self {
        TelemetryActor { store, sampler, settings, ticker: None, interval: Duration::ZERO }
    }

    fn take_sample(&self, ctx: &mut Context<Self>) {
        let sampler = self.sampler.clone();
        let store = self.store.clone();
        let work = async move {
            let sampled = tokio::task::spawn_blocking(move || {
                let _timer = crate::metrics::CollectorTimer::start("telemetry");
                sampler.lock().unwrap_or_else(|p| p.into_inner()).sample()
            })
            .await;
            match sampled {
                Ok(sample) => {
                    if let Err(e) = store.append(vec![RecordBody::Telemetry(sample)]).await {
                        tracing::error!(error = %e, "Telemetry sample could not be stored.");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Telemetry sampling failed."),
            }
        };
        ctx.spawn(work.into_actor(self));
    }

    /// (Re)starts the sampling schedule at the current interval.
    fn schedule(&mut self, ctx: &mut Context<Self>, first: Duration) {
        if let Some(handle) = self.ticker.take() {
            ctx.cancel_future(handle);
        }
        let interval = self.settings.borrow().telemetry_interval;
        self.interval = interval;
        self.ticker = Some(ctx.run_later(first.min(interval), move |act, ctx| {
            act.take_sample(ctx);
            act.ticker = Some(ctx.run_interval(interval, |act, ctx| act.take_sample(ctx)));
        }));
    }

    /// Reschedules when the interval changes.
    fn settings_changed(&mut self, ctx: &mut Context<Self>) {
        let interval = self.settings.borrow().telemetry_interval;
        if self.interval != interval {
            tracing::info!(interval_ms = outpost_shared::time::millis(interval), "Telemetry interval changed.");
            self.schedule(ctx, interval);
        }
    }
}

impl Actor for TelemetryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The first sample soon after start, so a new device shows figures
        // without waiting a whole interval.
        self.schedule(ctx, Duration::from_secs(1));
        crate::settings::follow_settings(ctx, self.settings.clone(), Self::settings_changed);
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
        assert!(!s.net.is_empty(), "no network interfaces seen (lo should be there)");
    }
}
