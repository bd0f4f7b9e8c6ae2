//! Which snapshots a backup set keeps: one rule, applied by the device to
//! its repository (`[[backup]] retention`) and by the hub to what devices
//! uploaded (`[backups] retention` in hub.toml), so the two read and count
//! alike.

use crate::config::Section;

/// Which snapshots of a backup set to keep, counted as restic's
/// `forget` does: the newest `last`, and the newest of each of the latest
/// `hourly` hours, `daily` days, `weekly` weeks and `monthly` months that
/// have one. A snapshot kept by any rule stays. All zero keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Newest snapshots kept.
    pub last: usize,
    /// Hours with a snapshot kept.
    pub hourly: usize,
    /// Days.
    pub daily: usize,
    /// Weeks (from Monday, UTC).
    pub weekly: usize,
    /// Months.
    pub monthly: usize,
}

impl Retention {
    /// Indexes (into `times`, oldest first) of the snapshots to keep.
    pub fn keep(&self, times: &[crate::time::Timestamp]) -> std::collections::BTreeSet<usize> {
        use chrono::Datelike;
        let mut keep = std::collections::BTreeSet::new();
        if *self == Retention::default() {
            keep.extend(0..times.len());
            return keep;
        }
        let newest_first: Vec<usize> = (0..times.len()).rev().collect();
        keep.extend(newest_first.iter().take(self.last));
        /// Maps a time (ms) to its hour, day, week or month.
        type Bucket = fn(i64) -> i64;
        let rules: [(usize, Bucket); 4] = [
            (self.hourly, |ms| ms.div_euclid(3_600_000)),
            (self.daily, |ms| ms.div_euclid(86_400_000)),
            (self.weekly, |ms| (ms.div_euclid(86_400_000) + 3).div_euclid(7)),
            (self.monthly, |ms| {
                let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
                i64::from(t.year()) * 12 + i64::from(t.month0())
            }),
        ];
        for (count, bucket) in rules {
            let mut seen = std::collections::BTreeSet::new();
            for &i in &newest_first {
                if seen.len() >= count {
                    break;
                }
                if seen.insert(bucket(i64::try_from(times[i].0).unwrap_or(i64::MAX))) {
                    keep.insert(i);
                }
            }
        }
        keep
    }
}

impl Retention {
    /// Reads a `retention` table (`last`, `hourly`, `daily`, `weekly`,
    /// `monthly`; absent keys are 0) and finishes it.
    pub fn read(r: &Section<'_>) -> Retention {
        let retention = Retention {
            last: r.get_or("last", 0usize),
            hourly: r.get_or("hourly", 0usize),
            daily: r.get_or("daily", 0usize),
            weekly: r.get_or("weekly", 0usize),
            monthly: r.get_or("monthly", 0usize),
        };
        r.finish();
        retention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_per_rule_and_everything_when_empty() {
        use crate::time::Timestamp;
        const H: u64 = 3_600_000;
        // 2026-11-01 00:00 UTC, then snapshots at +0h, +1h, +1h30, +25h,
        // +26h, +24 days (another week, same month), +31 days (next month).
        let base = 1_793_491_200_000u64;
        let times: Vec<Timestamp> =
            [0, H, H + H / 2, 25 * H, 26 * H, 24 * 24 * H, 31 * 24 * H].iter().map(|d| Timestamp(base + d)).collect();
        let keep = |r: Retention| r.keep(&times).into_iter().collect::<Vec<_>>();
        assert_eq!(keep(Retention::default()), (0..7).collect::<Vec<_>>());
        assert_eq!(keep(Retention { last: 2, ..Default::default() }), [5, 6]);
        // The newest of each of the last 3 hours that have one: 6, 5, 4.
        assert_eq!(keep(Retention { hourly: 3, ..Default::default() }), [4, 5, 6]);
        // Days: 6 (day 31), 5 (day 24), 4 (day 1, newest of 3 and 4), 2 (day 0).
        assert_eq!(keep(Retention { daily: 4, ..Default::default() }), [2, 4, 5, 6]);
        assert_eq!(keep(Retention { monthly: 2, ..Default::default() }), [5, 6]);
        assert_eq!(keep(Retention { last: 1, daily: 2, ..Default::default() }), [5, 6]);
    }
}
