//! Per-device allowance at the hub: how many records and bytes a device's
//! batches may bring per second (`[fleet] device_records_per_sec`,
//! `device_bytes_per_sec`). A device over it is slowed, not refused: its
//! session waits before storing the batch (so before the acknowledgement),
//! which holds back the device alone (its stream's flow control, or its one
//! batch in flight over MQTT) and leaves the store's time to the others.
//! The decision is a pure function of the time it is given.

use std::time::{Duration, Instant};

/// `[fleet] device_records_per_sec` and `device_bytes_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceRate {
    /// Records per second (default 20 000).
    pub records_per_sec: u64,
    /// Bytes of batch payload per second (default 16 MiB).
    pub bytes_per_sec: u64,
}

impl Default for DeviceRate {
    fn default() -> Self {
        DeviceRate { records_per_sec: 20_000, bytes_per_sec: 16 << 20 }
    }
}

/// A token bucket holding one second's worth; a charge beyond what it
/// holds puts it in debt, paid by waiting.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `rate` per second.
    pub fn new(rate: u64, now: Instant) -> Self {
        Bucket { rate: rate.max(1) as f64, level: rate.max(1) as f64, at: now }
    }

    /// Takes `cost` at `now`; returns how long to wait before acting on it
    /// (zero while the bucket holds enough).
    pub fn charge(&mut self, cost: u64, now: Instant) -> Duration {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.level = (self.level + refill).min(self.rate) - cost as f64;
        self.at = now;
        if self.level >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.level / self.rate) }
    }
}

/// A device session's allowance: records and bytes.
#[derive(Debug, Clone)]
pub struct Pace {
    records: Bucket,
    bytes: Bucket,
}

impl Pace {
    /// The allowance `rate`, full at `now`.
    pub fn new(rate: DeviceRate, now: Instant) -> Self {
        Pace { records: Bucket::new(rate.records_per_sec, now), bytes: Bucket::new(rate.bytes_per_sec, now) }
    }

    /// Charges a batch of `records` and `bytes` at `now`; how long to wait
    /// before storing it.
    pub fn charge(&mut self, records: u64, bytes: u64, now: Instant) -> Duration {
        self.records.charge(records, now).max(self.bytes.charge(bytes, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_within_its_allowance_never_waits_and_one_over_it_waits_its_debt() {
        let rate = DeviceRate { records_per_sec: 1000, bytes_per_sec: 1 << 20 };
        let start = Instant::now();
        let mut pace = Pace::new(rate, start);
        // 500 records every half second: exactly the rate.
        for i in 0..10 {
            assert_eq!(pace.charge(500, 1000, start + Duration::from_millis(500 * i)), Duration::ZERO, "batch {i}");
        }
        // A burst: a second's worth is held; 3000 at once waits two seconds.
        let later = start + Duration::from_secs(10);
        assert_eq!(pace.charge(3000, 1000, later), Duration::from_secs(2));
        // The next batch at once waits for its own share too.
        assert_eq!(pace.charge(500, 1000, later), Duration::from_millis(2500));
        // Having waited, the debt is paid.
        assert_eq!(pace.charge(0, 0, later + Duration::from_millis(2500)), Duration::ZERO);
    }

    #[test]
    fn bytes_slow_a_device_too() {
        let rate = DeviceRate { records_per_sec: 1_000_000, bytes_per_sec: 1000 };
        let start = Instant::now();
        let mut pace = Pace::new(rate, start);
        assert_eq!(pace.charge(1, 1000, start), Duration::ZERO);
        assert_eq!(pace.charge(1, 500, start), Duration::from_millis(500));
    }
}
