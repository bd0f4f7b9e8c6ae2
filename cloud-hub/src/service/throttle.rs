//! What a source address's refused requests may cost the hub.
//!
//! Two decisions, kept here as pure functions of the time they are given:
//!
//! - **Failed authentication** (a wrong, expired or missing token, a bad
//!   sign-in link) is limited per source: a leaky bucket of
//!   [`AuthLimit::burst`] failures that drains over [`AuthLimit::window`].
//!   A source whose bucket is full is answered 429 with `Retry-After`
//!   before its token is even looked up, so guessing costs the store
//!   nothing.
//! - **Refused requests without a valid token** (401, 429, a forged form's
//!   403) are audited as one full row for
//!   the first of each source and status in an interval (the same
//!   [`AuthLimit::window`]), and one row counting the rest when the
//!   interval ends. A flood writes a bounded number of rows however fast
//!   it comes.
//!
//! Sources are addresses, IPv6 ones by their /64 (what one host is given).
//! Both tables are bounded ([`MAX_SOURCES`]); sources beyond that share one
//! entry, so a flood from many addresses is still limited as a whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Sources tracked each for limits and for tallies.
pub const MAX_SOURCES: usize = 10_000;

/// `[http] failed_auth_burst` failures of one source per
/// `[http] failed_auth_window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuthLimit {
    /// Failures allowed at once (default 20).
    pub burst: u32,
    /// The time a full bucket takes to drain (default 1m): after the burst,
    /// one failure each `window / burst`. Refusals are also counted for the
    /// audit log over this long.
    pub window: Duration,
}

impl Default for AuthLimit {
    fn default() -> Self {
        AuthLimit { burst: 20, window: Duration::from_secs(60) }
    }
}

/// The key a source is counted under: its address, an IPv6 address by its
/// /64, IPv4-mapped IPv6 as IPv4.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Where sources beyond [`MAX_SOURCES`] are counted.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// A source's failures not yet drained.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

/// Refusals of one source and status in the current interval.
#[derive(Debug, Clone)]
struct Tally {
    since: Instant,
    /// Refusals after the first (which was written in full).
    more: u64,
}

/// A row that counts refusals: `more` answers of `status` to `source`
/// after the first, over `over`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The source (an address, or a /64).
    pub source: IpAddr,
    /// 401, 403 or 429.
    pub status: u16,
    /// Refusals not written one by one.
    pub more: u64,
    /// How long they were counted.
    pub over: Duration,
}

/// The limits and tallies of every source.
#[derive(Debug)]
pub struct Throttle {
    limit: AuthLimit,
    buckets: HashMap<IpAddr, Bucket>,
    tallies: HashMap<(IpAddr, u16), Tally>,
    /// When drained buckets were last dropped to make room: at most once a
    /// second, so a flood from many addresses does not scan the table on
    /// every request.
    pruned: Option<Instant>,
}

impl Throttle {
    /// No failures counted yet.
    pub fn new(limit: AuthLimit) -> Self {
        Throttle { limit, buckets: HashMap::new(), tallies: HashMap::new(), pruned: None }
    }

    /// Failures drained per second.
    fn rate(&self) -> f64 {
        f64::from(self.limit.burst) / self.limit.window.as_secs_f64()
    }

    /// The bucket's level at `now`, drained since it was last touched.
    fn drained(&self, b: &Bucket, now: Instant) -> f64 {
        (b.level - now.saturating_duration_since(b.at).as_secs_f64() * self.rate()).max(0.0)
    }

    /// `Ok` if `ip` may try to authenticate at `now`; otherwise how long it
    /// must wait.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut key = source_of(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES {
            key = OVERFLOW;
        }
        let Some(bucket) = self.buckets.get(&key) else { return Ok(()) };
        let level = self.drained(bucket, now);
        let burst = f64::from(self.limit.burst);
        if level + 1.0 <= burst {
            return Ok(());
        }
        // Whole seconds, at least one: what `Retry-After` can say.
        Err(Duration::from_secs(((level + 1.0 - burst) / self.rate()).ceil().max(1.0) as u64))
    }

    /// `ip` failed to authenticate at `now`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        let key = source_of(ip);
        let prune_due = self.pruned.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES && prune_due {
            self.pruned = Some(now);
            let rate = self.rate();
            self.buckets.retain(|_, b| b.level - now.saturating_duration_since(b.at).as_secs_f64() * rate > 0.0);
        }
        let key = if self.buckets.contains_key(&key) || self.buckets.len() < MAX_SOURCES { key } else { OVERFLOW };
        let level = self.buckets.get(&key).map_or(0.0, |b| self.drained(b, now));
        self.buckets.insert(key, Bucket { level: (level + 1.0).min(f64::from(self.limit.burst) + 1.0), at: now });
    }

    /// A request of `ip` was refused with `status` at `now`: true if it is
    /// to be audited in full (the first of its source and status in this
    /// interval), false if it was counted for [`Throttle::due`].
    pub fn refused(&mut self, ip: IpAddr, status: u16, now: Instant) -> bool {
        let mut key = (source_of(ip), status);
        if !self.tallies.contains_key(&key) && self.tallies.len() >= MAX_SOURCES {
            key.0 = OVERFLOW;
        }
        match self.tallies.get_mut(&key) {
            Some(tally) => {
                tally.more += 1;
                false
            }
            None => {
                self.tallies.insert(key, Tally { since: now, more: 0 });
                true
            }
        }
    }

    /// Tallies whose interval ended by `now` (all of them with `None`, at
    /// shutdown), taken out: the rows that count what was not written
    /// one by one. A source refused once in an interval needs none.
    pub fn due(&mut self, now: Option<Instant>) -> Vec<Summary> {
        let every = self.limit.window;
        let ended = |t: &Tally| now.is_none_or(|now| now.saturating_duration_since(t.since) >= every);
        let keys: Vec<(IpAddr, u16)> = self.tallies.iter().filter(|(_, t)| ended(t)).map(|(k, _)| *k).collect();
        let mut rows = Vec::new();
        for key in keys {
            if let Some(t) = self.tallies.remove(&key)
                && t.more > 0
            {
                let over = now.map_or(t.since.elapsed(), |now| now.saturating_duration_since(t.since));
                rows.push(Summary { source: key.0, status: key.1, more: t.more, over });
            }
        }
        rows.sort_by_key(|r| (r.source, r.status));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(OVERFLOW)
    }

    #[test]
    fn a_source_is_refused_after_its_burst_and_admitted_as_it_drains() {
        let limit = AuthLimit { burst: 5, window: Duration::from_secs(10) };
        let mut t = Throttle::new(limit);
        let start = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..5 {
            assert_eq!(t.admit(a, start), Ok(()));
            t.failed(a, start);
        }
        // The sixth waits for one failure to drain: 10 s / 5 = 2 s.
        assert_eq!(t.admit(a, start), Err(Duration::from_secs(2)));
        assert_eq!(t.admit(a, start + Duration::from_millis(1500)), Err(Duration::from_secs(1)));
        assert_eq!(t.admit(a, start + Duration::from_secs(2)), Ok(()));
        // Another address is not touched by it.
        assert_eq!(t.admit(ip("10.0.0.2"), start), Ok(()));
        // Failing on while refused does not dig a deeper hole than one.
        for _ in 0..100 {
            t.failed(a, start);
        }
        assert_eq!(t.admit(a, start), Err(Duration::from_secs(4)));
        assert_eq!(t.admit(a, start + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn ipv6_hosts_are_counted_by_their_64_and_mapped_v4_as_v4() {
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), source_of(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(source_of(ip("2001:db8:1:2::1")), source_of(ip("2001:db8:1:3::1")));
        assert_eq!(source_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let mut t = Throttle::new(AuthLimit { burst: 1, window: Duration::from_secs(60) });
        let now = Instant::now();
        t.failed(ip("2001:db8:1:2::1"), now);
        assert!(t.admit(ip("2001:db8:1:2::ffff"), now).is_err(), "one /64 is one source");
    }

    #[test]
    fn sources_beyond_the_bound_share_one_bucket() {
        let mut t = Throttle::new(AuthLimit { burst: 2, window: Duration::from_secs(60) });
        let now = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            t.failed(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), now);
        }
        assert_eq!(t.buckets.len(), MAX_SOURCES);
        let (x, y) = (ip("192.168.1.1"), ip("192.168.1.2"));
        t.failed(x, now);
        t.failed(y, now);
        assert_eq!(t.buckets.len(), MAX_SOURCES + 1, "the overflow entry");
        assert!(t.admit(ip("192.168.1.3"), now).is_err(), "new sources share the spent overflow bucket");
        // Once the old ones drained they make room again.
        let later = now + Duration::from_secs(61);
        t.failed(x, later);
        assert!(t.buckets.len() < 10, "{}", t.buckets.len());
        assert_eq!(t.admit(x, later), Ok(()));
    }

    #[test]
    fn refusals_are_written_once_then_counted_per_interval() {
        let mut t = Throttle::new(AuthLimit::default());
        let now = Instant::now();
        let every = AuthLimit::default().window;
        let a = ip("10.0.0.1");
        assert!(t.refused(a, 401, now), "the first is written in full");
        for _ in 0..999 {
            assert!(!t.refused(a, 401, now));
        }
        assert!(t.refused(a, 429, now), "another status is its own tally");
        assert!(t.refused(ip("10.0.0.2"), 401, now));
        assert!(t.due(Some(now + Duration::from_secs(59))).is_empty(), "nothing before the interval ends");
        let rows = t.due(Some(now + every));
        assert_eq!(rows, [Summary { source: a, status: 401, more: 999, over: every }]);
        assert!(t.tallies.is_empty(), "single refusals need no count and are forgotten");
        assert!(t.refused(a, 401, now + every), "a new interval starts with a full row");
        assert_eq!(t.due(None), [], "one refusal, nothing to count at shutdown");
    }
}
