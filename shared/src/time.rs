//! Wall-clock timestamps as they travel on the wire: milliseconds since the
//! Unix epoch, UTC.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Far enough ahead that nothing is due: what an addition that would
/// overflow the clock's range gives instead.
const FAR_AHEAD: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `now + delay` on the monotonic clock, never panicking: a delay past the
/// clock's range reads as [`FAR_AHEAD`] (or `now` on a clock with no room
/// for that).
pub fn instant_after(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay).or_else(|| now.checked_add(FAR_AHEAD)).unwrap_or(now)
}

/// Whole milliseconds of `d`, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time. A clock set before 1970 reads as the epoch.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Converts a `SystemTime`, clamping times before the epoch to zero.
    pub fn from_system(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// `self + d`, saturating at the end of time instead of wrapping.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(millis(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(millis(d)))
    }

    /// Time elapsed from `self` to `later`, zero if `later` is earlier.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }

    /// RFC 3339 in UTC, to the second (`2026-11-21T10:00:00Z`).
    pub fn rfc3339(self) -> String {
        // Past year 9999 RFC 3339 has no form; such a time (only a corrupt or
        // hostile value) shows as the last second it can name.
        let t = UNIX_EPOCH.checked_add(Duration::from_millis(self.0.min(253_402_300_799_000))).unwrap_or(UNIX_EPOCH);
        humantime::format_rfc3339_seconds(t).to_string()
    }

    /// Seconds since the epoch.
    pub fn as_secs(self) -> u64 {
        self.0 / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_on_times_never_overflows() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(Timestamp(5).saturating_add(huge), Timestamp(u64::MAX));
        assert_eq!(Timestamp(5).saturating_sub(huge), Timestamp(0));
        assert_eq!(millis(huge), u64::MAX);
        let now = Instant::now();
        assert!(instant_after(now, huge) > now);
        assert_eq!(instant_after(now, Duration::from_secs(1)), now + Duration::from_secs(1));
        assert_eq!(Timestamp(u64::MAX).rfc3339(), "9999-12-31T23:59:59Z");
    }
}
