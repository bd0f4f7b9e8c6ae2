//! Exponential backoff with full jitter (the delay is uniform in
//! `[0, min(max, initial * 2^n)]`), so a fleet that lost its hub does not
//! come back in lockstep.

use rand::RngExt;
use std::time::Duration;

/// Backoff state for one retrying thing.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max: max.max(initial), failures: 0 }
    }

    /// The cap of the delays.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and counts a failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A connection that worked has ended after `stayed_up`: back to the
    /// initial delay only if it stayed up at least as long as the cap, so a
    /// connection that fails soon after it is made (a hub that accepts and
    /// drops, a device whose store cannot write) backs off like one that
    /// cannot connect, instead of reconnecting at the shortest delay.
    pub fn connection_ended(&mut self, stayed_up: Duration) {
        if stayed_up >= self.max {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_to_the_cap_and_delays_stay_under_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        // A connection that ends soon after it was made keeps the backoff;
        // one that stayed up as long as the cap resets it.
        b.connection_ended(Duration::from_millis(300));
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        b.connection_ended(Duration::from_secs(1));
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_out() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            seen.insert(b.next_delay().as_millis() / 1000);
        }
        assert!(seen.len() > 3, "jitter is not spreading delays: {seen:?}");
    }
}
