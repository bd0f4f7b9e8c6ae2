//! Admission of new QUIC connections, so a restarted hub is not kept down
//! by its whole fleet reconnecting at once.
//!
//! New connections are admitted at [`DoorLimits::rate`] per second after a
//! burst of [`DoorLimits::burst`] (a GCRA, the virtual-time form of a token
//! bucket). One that comes past the rate completes its handshake and is
//! closed at once with [`CLOSE_BUSY`](outpost_shared::protocol::CLOSE_BUSY)
//! and a retry-after: the hub hands out return times one `1 / rate` apart
//! after those already handed out, so the devices it turned away come back
//! spread at the rate it serves rather than all at once. Past
//! [`DoorLimits::handshakes`] handshakes in flight a connection is refused
//! before its handshake (a QUIC `CONNECTION_REFUSED`, which costs the hub
//! no cryptography); agents then wait their backoff.
//!
//! [`Door::arrive`] is the decision, pure: it is given the time, the
//! handshakes in flight and a random fraction.

use std::time::{Duration, Instant};

/// `[quic] accept_rate`, `accept_burst`, `max_handshakes`, `max_retry_after`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DoorLimits {
    /// New connections admitted per second once the burst is spent.
    pub rate: u32,
    /// New connections admitted at once after a quiet spell.
    pub burst: u32,
    /// Handshakes in flight at most; past it, connections are refused
    /// before their handshake.
    pub handshakes: u32,
    /// The longest retry-after handed out; past it the return times are
    /// spread over its second half at random.
    pub max_retry_after: Duration,
}

impl Default for DoorLimits {
    fn default() -> Self {
        DoorLimits { rate: 1000, burst: 2000, handshakes: 512, max_retry_after: Duration::from_secs(300) }
    }
}

/// What becomes of one new connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry {
    /// Served.
    Admit,
    /// Handshake, then closed with `CLOSE_BUSY` asking to come back after
    /// this long.
    Busy(Duration),
    /// Refused before the handshake.
    Refuse,
}

/// The door's state.
#[derive(Debug, Clone)]
pub struct Door {
    limits: DoorLimits,
    /// The GCRA's theoretical arrival time: admitting at `t` is allowed
    /// while `tat - t <= (burst - 1) / rate`.
    tat: Instant,
    /// The first return time not yet handed out.
    next_return: Instant,
}

impl Door {
    /// A door that has been quiet until `now`.
    pub fn new(limits: DoorLimits, now: Instant) -> Self {
        let limits = DoorLimits { rate: limits.rate.max(1), burst: limits.burst.max(1), ..limits };
        Door { limits, tat: now, next_return: now }
    }

    /// The limits in force.
    pub fn limits(&self) -> DoorLimits {
        self.limits
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.limits.rate
    }

    /// A connection arrives at `now` with `in_flight` handshakes under way
    /// (not counting it); `spread` in `[0, 1)` places a retry-after past the
    /// cap within its second half.
    pub fn arrive(&mut self, now: Instant, in_flight: usize, spread: f64) -> Entry {
        if in_flight >= self.limits.handshakes as usize {
            return Entry::Refuse;
        }
        let t = self.interval();
        let tolerance = t * self.limits.burst;
        let tat = self.tat.max(now);
        if tat - now <= tolerance - t {
            self.tat = tat + t;
            return Entry::Admit;
        }
        // The earliest time a newcomer would be admitted, or the first
        // return time not yet handed out if later.
        let slot = self.next_return.max(tat - (tolerance - t)).max(now);
        self.next_return = slot + t;
        let wait = slot - now;
        let cap = self.limits.max_retry_after;
        if wait <= cap { Entry::Busy(wait) } else { Entry::Busy(cap.mul_f64(0.5 + 0.5 * spread.clamp(0.0, 1.0))) }
    }
}

/// How often at most the door says in the log how many it turned away.
pub const TALLY_EVERY: Duration = Duration::from_secs(10);

/// Counts the connections the door turns away and says so in the log at
/// most once per `every`, however many arrive: a storm costs a few lines,
/// not one per device. Pure.
#[derive(Debug, Clone)]
pub struct Tally {
    every: Duration,
    last: Instant,
    busy: u64,
    refused: u64,
}

impl Tally {
    /// A tally whose first line comes at the first connection turned away.
    pub fn new(every: Duration, now: Instant) -> Self {
        Tally { every, last: now.checked_sub(every).unwrap_or(now), busy: 0, refused: 0 }
    }

    /// Notes what became of one arrival at `now`; returns the connections
    /// told to come back later and refused before their handshake since
    /// the last line, when a line is due.
    pub fn note(&mut self, entry: Entry, now: Instant) -> Option<(u64, u64)> {
        match entry {
            Entry::Admit => {}
            Entry::Busy(_) => self.busy += 1,
            Entry::Refuse => self.refused += 1,
        }
        if self.busy + self.refused == 0 || now.saturating_duration_since(self.last) < self.every {
            return None;
        }
        self.last = now;
        Some((std::mem::take(&mut self.busy), std::mem::take(&mut self.refused)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, burst: u32) -> DoorLimits {
        DoorLimits { rate, burst, handshakes: 100, max_retry_after: Duration::from_secs(60) }
    }

    #[test]
    fn a_burst_is_admitted_then_the_rest_is_told_when_to_come_back_one_interval_apart() {
        let start = Instant::now();
        let mut door = Door::new(limits(10, 5), start);
        for _ in 0..5 {
            assert_eq!(door.arrive(start, 0, 0.0), Entry::Admit);
        }
        let told: Vec<Duration> = (0..4)
            .map(|_| match door.arrive(start, 0, 0.0) {
                Entry::Busy(d) => d,
                other => panic!("expected busy, got {other:?}"),
            })
            .collect();
        let ms: Vec<u128> = told.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 300, 400]);
        // Each comes back when told and is admitted: the door's rate is
        // exactly what the returning devices use.
        for d in told {
            assert_eq!(door.arrive(start + d, 0, 0.0), Entry::Admit, "returning at {d:?}");
        }
    }

    #[test]
    fn the_rate_is_kept_over_time_and_a_quiet_door_admits_a_burst_again() {
        let start = Instant::now();
        let mut door = Door::new(limits(100, 10), start);
        // 1,000 arrivals a second for 10 s: about 100 a second get in.
        let mut admitted = 0;
        for i in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(i));
            if door.arrive(now, 0, 0.5) == Entry::Admit {
                admitted += 1;
            }
        }
        assert!((1_000..=1_015).contains(&admitted), "admitted {admitted} in 10 s at 100/s with a burst of 10");
        // Once the handed-out return times have passed, a burst again.
        let later = start + Duration::from_secs(120);
        for _ in 0..10 {
            assert_eq!(door.arrive(later, 0, 0.0), Entry::Admit);
        }
        assert!(matches!(door.arrive(later, 0, 0.0), Entry::Busy(_)));
    }

    #[test]
    fn return_times_past_the_cap_are_spread_over_its_second_half() {
        let start = Instant::now();
        let mut door = Door::new(limits(1, 1), start);
        assert_eq!(door.arrive(start, 0, 0.0), Entry::Admit);
        for i in 1..=60 {
            assert_eq!(door.arrive(start, 0, 0.0), Entry::Busy(Duration::from_secs(i)));
        }
        assert_eq!(door.arrive(start, 0, 0.0), Entry::Busy(Duration::from_secs(30)));
        assert_eq!(door.arrive(start, 0, 0.999_999), Entry::Busy(Duration::from_secs(60).mul_f64(0.999_999_5)));
    }

    #[test]
    fn too_many_handshakes_in_flight_are_refused_before_the_handshake() {
        let start = Instant::now();
        let mut door = Door::new(limits(1000, 1000), start);
        assert_eq!(door.arrive(start, 99, 0.0), Entry::Admit);
        assert_eq!(door.arrive(start, 100, 0.0), Entry::Refuse);
        // A refusal spends nothing of the rate.
        let mut door = Door::new(limits(1, 1), start);
        assert_eq!(door.arrive(start, 100, 0.0), Entry::Refuse);
        assert_eq!(door.arrive(start, 0, 0.0), Entry::Admit);
    }

    /// A storm of arrivals turned away is told in a line per period, and
    /// every one of them is counted in some line.
    #[test]
    fn turned_away_connections_are_logged_at_a_bounded_rate() {
        let t0 = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(10), t0);
        let (mut lines, mut counted) = (0, 0);
        for i in 0..30_000u64 {
            let entry = match i % 3 {
                0 => Entry::Admit,
                1 => Entry::Busy(Duration::from_secs(1)),
                _ => Entry::Refuse,
            };
            if let Some((busy, refused)) = tally.note(entry, t0 + Duration::from_millis(i)) {
                lines += 1;
                counted += busy + refused;
            }
        }
        // 30 s of arrivals: a line at the first one turned away, at 10 s
        // and at 20 s.
        assert_eq!(lines, 3);
        assert!((13_000..=20_000).contains(&counted), "{counted}");
        assert_eq!(tally.note(Entry::Admit, t0 + Duration::from_secs(31)).map(|(b, r)| b + r), Some(20_000 - counted));
        assert_eq!(tally.note(Entry::Admit, t0 + Duration::from_secs(45)), None, "nothing turned away: no line");
    }
}
