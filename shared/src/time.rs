//! Wall-clock timestamps as they travel on the wire: milliseconds since the
//! Unix epoch, UTC.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    /// Time elapsed from `self` to `later`, zero if `later` is earlier.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }

    /// RFC 3339 in UTC, to the second (`2026-11-21T10:00:00Z`).
    pub fn rfc3339(self) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(self.0)).to_string()
    }

    /// Seconds since the epoch.
    pub fn as_secs(self) -> u64 {
        self.0 / 1000
    }
}
