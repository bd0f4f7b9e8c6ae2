//! Chart series of a device page, from the hub's telemetry: CPU, memory,
//! the fullest disk and network throughput, averaged into at most
//! [`MAX_POINTS`] buckets so a week of 1-second samples is still a small
//! answer, and the periods whose samples arrived late (backfilled after an
//! outage). Pure.

use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use serde::Serialize;

/// Most points per series.
pub const MAX_POINTS: usize = 600;

/// What the device page's charts draw. Times are seconds since the epoch
/// (uPlot's unit); a missing value is `null` (a gap in the line).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Bucket times.
    pub t: Vec<f64>,
    /// CPU busy, percent.
    pub cpu: Vec<Option<f64>>,
    /// Memory in use, percent.
    pub mem: Vec<Option<f64>>,
    /// The fullest file system, percent used.
    pub disk: Vec<Option<f64>>,
    /// Received, bytes per second (all interfaces).
    pub rx: Vec<Option<f64>>,
    /// Sent, bytes per second.
    pub tx: Vec<Option<f64>>,
    /// Periods (seconds, from-to) whose samples arrived late.
    pub late: Vec<(f64, f64)>,
    /// Samples read.
    pub samples: usize,
}

#[derive(Default, Clone, Copy)]
struct Sum {
    n: u32,
    cpu: f64,
    mem: f64,
    disk: f64,
    rate_n: u32,
    rx: f64,
    tx: f64,
}

fn disk_percent(s: &Sample) -> f64 {
    s.disks
        .iter()
        .filter(|d| d.total_bytes > 0)
        .map(|d| d.used_bytes as f64 * 100.0 / d.total_bytes as f64)
        .fold(0.0, f64::max)
}

fn net_totals(s: &Sample) -> (u64, u64) {
    s.net.iter().fold((0, 0), |(rx, tx), n| (rx + n.rx_bytes, tx + n.tx_bytes))
}

/// Builds the series of `samples` (in time order) over `[since, until)`.
pub fn build(samples: &[Sample], since: Timestamp, until: Timestamp, late: &[(Timestamp, Timestamp)]) -> Series {
    let span = until.0.saturating_sub(since.0).max(1);
    let width = span.div_ceil(MAX_POINTS as u64).max(1000);
    let buckets = usize::try_from(span.div_ceil(width)).unwrap_or(MAX_POINTS).min(MAX_POINTS);
    let mut sums = vec![Sum::default(); buckets];
    let mut prev: Option<(u64, (u64, u64))> = None;
    for s in samples.iter().filter(|s| s.at >= since && s.at < until) {
        let i = usize::try_from((s.at.0 - since.0) / width).unwrap_or(0).min(buckets - 1);
        let b = &mut sums[i];
        b.n += 1;
        b.cpu += f64::from(s.cpu_percent);
        b.mem += f64::from(s.mem_percent());
        b.disk += disk_percent(s);
        let totals = net_totals(s);
        if let Some((at, before)) = prev {
            let secs = (s.at.0.saturating_sub(at)) as f64 / 1000.0;
            // Counters since boot: a drop means a reboot, not traffic.
            if secs > 0.0 && totals.0 >= before.0 && totals.1 >= before.1 {
                b.rate_n += 1;
                b.rx += (totals.0 - before.0) as f64 / secs;
                b.tx += (totals.1 - before.1) as f64 / secs;
            }
        }
        prev = Some((s.at.0, totals));
    }
    let mut out = Series { samples: samples.len(), ..Series::default() };
    let avg = |sum: f64, n: u32| (n > 0).then(|| (sum / f64::from(n) * 10.0).round() / 10.0);
    for (i, b) in sums.iter().enumerate() {
        out.t.push((since.0 + i as u64 * width) as f64 / 1000.0);
        out.cpu.push(avg(b.cpu, b.n));
        out.mem.push(avg(b.mem, b.n));
        out.disk.push(avg(b.disk, b.n));
        out.rx.push(avg(b.rx, b.rate_n));
        out.tx.push(avg(b.tx, b.rate_n));
    }
    out.late = late
        .iter()
        .filter(|(a, b)| *b >= since && *a < until)
        .map(|(a, b)| (a.0 as f64 / 1000.0, b.0 as f64 / 1000.0))
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::telemetry::{DiskSample, NetSample};

    fn sample(at: u64, cpu: f32, rx: u64) -> Sample {
        Sample {
            at: Timestamp(at),
            cpu_percent: cpu,
            mem_used_bytes: 1,
            mem_total_bytes: 4,
            swap_used_bytes: 0,
            load: [0.0; 3],
            uptime_secs: 1,
            disks: vec![
                DiskSample { mount: "/".into(), used_bytes: 1, total_bytes: 10 },
                DiskSample { mount: "/data".into(), used_bytes: 9, total_bytes: 10 },
            ],
            net: vec![NetSample { iface: "eth0".into(), rx_bytes: rx, tx_bytes: 0 }],
            temperatures: Vec::new(),
        }
    }

    #[test]
    fn a_week_of_samples_becomes_a_few_hundred_points() {
        let day = 86_400_000u64;
        let samples: Vec<Sample> = (0..7 * 8640u64).map(|i| sample(i * 10_000, 50.0, i * 1000)).collect();
        let s = build(&samples, Timestamp(0), Timestamp(7 * day), &[]);
        assert_eq!(s.t.len(), MAX_POINTS);
        assert!(s.cpu.iter().all(|c| *c == Some(50.0)));
        assert_eq!(s.disk[0], Some(90.0), "the fullest disk");
        assert_eq!(s.mem[0], Some(25.0));
        assert_eq!(s.rx[5], Some(100.0), "1000 bytes per 10 s");
    }

    #[test]
    fn empty_buckets_are_gaps_and_reboots_are_not_traffic() {
        let samples = vec![sample(0, 10.0, 5000), sample(1000, 20.0, 6000), sample(50_000, 30.0, 10)];
        let s = build(&samples, Timestamp(0), Timestamp(60_000), &[(Timestamp(40_000), Timestamp(90_000))]);
        assert_eq!(s.t.len(), 60);
        assert_eq!((s.cpu[0], s.cpu[1], s.cpu[2]), (Some(10.0), Some(20.0), None));
        assert_eq!(s.rx[1], Some(1000.0));
        assert_eq!(s.rx[50], None, "counters went back: no rate");
        assert_eq!(s.late, [(40.0, 90.0)]);
    }
}
