//! Time for the scheduler: noticing the wall clock step back, and the
//! rhythm of `@every` jobs on the monotonic clock. Pure.

use outpost_shared::job::Schedule;
use outpost_shared::time::{Timestamp, instant_after, millis};
use std::time::{Duration, Instant};

/// How often the wall clock is compared with the monotonic clock.
pub(super) const CLOCK_CHECK: Duration = Duration::from_secs(2);
/// A backward step of the wall clock larger than this reschedules cron jobs.
pub(super) const CLOCK_STEP: Duration = Duration::from_secs(1);

/// The wall clock as last seen, beside the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClockWatch {
    wall: Timestamp,
    mono: Instant,
}

impl ClockWatch {
    /// Starts watching from this look.
    pub(super) fn new(wall: Timestamp, mono: Instant) -> Self {
        ClockWatch { wall, mono }
    }

    /// How far the wall clock stepped back since the last look, if by more
    /// than [`CLOCK_STEP`]; this look becomes the last. A forward step or
    /// a small correction is `None`.
    pub(super) fn stepped_back(&mut self, wall: Timestamp, mono: Instant) -> Option<Duration> {
        let expected = self.wall.saturating_add(mono.duration_since(self.mono));
        *self = ClockWatch { wall, mono };
        (wall.saturating_add(CLOCK_STEP) < expected).then(|| wall.until(expected))
    }
}

/// How long until the first fire of an `@every` job whose last fire (or
/// set-up) was at `base`, keeping its rhythm: the first multiple of
/// `interval` after `base` that lies after `now`.
pub(super) fn first_every_delay(interval: Duration, base: Timestamp, now: Timestamp) -> Duration {
    let due = Schedule::next_every(interval, base);
    if due > now {
        return now.until(due);
    }
    let step = millis(interval).max(1);
    let behind = now.0.saturating_sub(base.0);
    let due = base.0.saturating_add((behind / step).saturating_add(1).saturating_mul(step));
    Duration::from_millis(due.saturating_sub(now.0))
}

/// The next fire of an `@every` job after the one due at `due`: one
/// interval later, or, if the agent fell behind by more than an interval,
/// the first multiple after `now` (no burst of fires). Never overflows.
pub(super) fn next_every_instant(due: Instant, interval: Duration, now: Instant) -> Instant {
    let next = instant_after(due, interval);
    if next > now {
        return next;
    }
    let step = interval.as_nanos().max(1);
    let behind = now.duration_since(due).as_nanos();
    let skip = (behind / step + 1).saturating_mul(step);
    instant_after(due, Duration::from_nanos(u64::try_from(skip).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delays_keep_the_rhythm_and_never_overflow() {
        let s = Duration::from_secs;
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(3_000)), s(7));
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(25_000)), s(5));
        assert_eq!(first_every_delay(s(10), Timestamp(0), Timestamp(30_000)), s(10));
        let huge = Duration::from_secs(u64::MAX);
        assert!(first_every_delay(huge, Timestamp(5), Timestamp(6)) > s(1 << 40));
        let now = Instant::now();
        assert_eq!(next_every_instant(now, s(10), now), now + s(10));
        assert_eq!(next_every_instant(now, s(10), now + s(25)), now + s(30));
        assert!(next_every_instant(now, huge, now) > now + s(1 << 30));
    }

    #[test]
    fn only_a_backward_step_beyond_a_second_counts() {
        let (t0, m0) = (Timestamp(1_000_000), Instant::now());
        let s = Duration::from_secs;
        let mut watch = ClockWatch::new(t0, m0);
        // Both clocks advance together: nothing.
        assert_eq!(watch.stepped_back(Timestamp(1_002_000), m0 + s(2)), None);
        // Forward by an hour: nothing (cron catches up by itself).
        assert_eq!(watch.stepped_back(Timestamp(4_604_000), m0 + s(4)), None);
        // Back by half a second (a slew, an NTP nudge): nothing.
        assert_eq!(watch.stepped_back(Timestamp(4_605_500), m0 + s(6)), None);
        // Back by 10 s: noticed, by how much.
        assert_eq!(watch.stepped_back(Timestamp(4_597_500), m0 + s(8)), Some(s(10)));
        // The next look starts from there.
        assert_eq!(watch.stepped_back(Timestamp(4_599_500), m0 + s(10)), None);
    }
}
