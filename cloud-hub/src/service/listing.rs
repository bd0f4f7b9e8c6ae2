//! What the fleet views select, decided without I/O: label rules, label
//! selectors, the device list's filters, sort and cursor pages, and the
//! overview's counts. The API, the console and `outpostctl` all go through
//! these, so a selector means the same everywhere.

use crate::api::DeviceView;
use crate::store::Labels;
use base64::Engine as _;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Most labels on one device.
pub const MAX_LABELS: usize = 32;
/// Most devices in one page of the device list.
pub const MAX_PAGE: usize = 1000;
/// Devices in a page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;

/// Checks a device's labels: keys of lower-case letters, digits and
/// `._/-` (starting with a letter or digit, at most 63), values of letters,
/// digits and `._-` (at most 63), at most [`MAX_LABELS`]. Every problem is
/// listed.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    let mut problems = Vec::new();
    if labels.len() > MAX_LABELS {
        problems.push(format!("at most {MAX_LABELS} labels, not {}", labels.len()));
    }
    for (key, value) in labels {
        if !valid_key(key) {
            problems.push(format!(
                "label key {key:?}: 1-63 characters of a-z, 0-9 and ._/-, starting with a letter or digit"
            ));
        }
        if value.len() > 63 || !value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            problems
                .push(format!("label {key:?}: value {value:?} must be at most 63 characters of A-Z, a-z, 0-9 and ._-"));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

fn valid_key(key: &str) -> bool {
    let first = key.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first && key.len() <= 63 && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c))
}

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// `key=value`
    Is(String, String),
    /// `key!=value` (also true where the key is absent)
    IsNot(String, String),
    /// `key`: the label is present
    Has(String),
    /// `!key`: the label is absent
    HasNot(String),
}

impl Term {
    fn key(&self) -> &str {
        match self {
            Term::Is(k, _) | Term::IsNot(k, _) | Term::Has(k) | Term::HasNot(k) => k,
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Term::Is(k, v) => labels.get(k) == Some(v),
            Term::IsNot(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
            Term::HasNot(k) => !labels.contains_key(k),
        }
    }
}

/// A label selector: terms joined by commas, all of which must hold
/// (`env=prod,site=berlin`, `tier!=db`, `gpu`, `!retired`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
    text: String,
}

impl Selector {
    /// Parses a selector. An empty one is refused: a selector never means
    /// "every device" by accident.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the selector is empty; name at least one label (env=prod)".into());
        }
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim) {
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::IsNot(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once('=') {
                Term::Is(k.trim().into(), v.trim().trim_start_matches('=').into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::HasNot(k.trim().into())
            } else {
                Term::Has(raw.into())
            };
            if !valid_key(term.key()) {
                return Err(format!("selector term {raw:?}: {:?} is not a label key", term.key()));
            }
            terms.push(term);
        }
        Ok(Selector { terms, text: text.to_owned() })
    }

    /// True if `labels` satisfy every term.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|t| t.matches(labels))
    }

    /// Keys the selector names that no device in `fleet` carries: a typo
    /// that would otherwise match nothing (or, with `!=`, everything).
    pub fn unknown_keys<'a>(&'a self, mut fleet: impl Iterator<Item = &'a Labels>) -> Vec<&'a str> {
        let mut unknown: Vec<&str> = self.terms.iter().map(Term::key).collect();
        unknown.dedup();
        while !unknown.is_empty() {
            let Some(labels) = fleet.next() else { break };
            unknown.retain(|k| !labels.contains_key(*k));
        }
        unknown
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Picks the devices a bulk action acts on: refuses a selector naming a
/// label no device has, and one that matches nothing.
pub fn bulk_targets<'a, 'b, T: Listed<'a>>(selector: &Selector, items: &'b [T]) -> Result<Vec<&'b T>, String> {
    let unknown = selector.unknown_keys(items.iter().map(|v| v.brief().labels));
    if !unknown.is_empty() {
        return Err(format!("selector {:?}: no device has the label {}", selector.text(), unknown.join(", ")));
    }
    let matched: Vec<&T> = items.iter().filter(|v| selector.matches(v.brief().labels)).collect();
    if matched.is_empty() {
        return Err(format!("selector {:?} matches no device", selector.text()));
    }
    Ok(matched)
}

/// What the device list's filters and sorts and the overview look at, in
/// one device: borrowed from its view, or from its fleet row and presence
/// (so that a list of 100,000 devices builds views for its page only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Brief<'a> {
    /// Device id.
    pub id: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
    /// Agent version.
    pub version: Option<&'a str>,
    /// Where it last connected from.
    pub address: Option<&'a str>,
    /// Heard from within the heartbeat timeout.
    pub online: bool,
    /// When it was last heard from (ms since the epoch).
    pub last_seen_ms: Option<u64>,
    /// How far its newest stored record lags behind now.
    pub behind_secs: Option<u64>,
    /// Alarms raised and not cleared.
    pub alarmed: bool,
    /// One word for its state ([`crate::api::state_word`]).
    pub state: &'static str,
    /// It refused its latest desired state.
    pub refused: bool,
    /// A job's latest runs failed.
    pub failing: bool,
    /// Failed job attempts in the last 24 hours.
    pub failed_runs_24h: usize,
    /// A scheduled backup is overdue.
    pub overdue: bool,
}

impl<'a> Brief<'a> {
    /// The brief of a fleet row, with its presence (when it was last heard
    /// from, whether it is online) at `now`: what [`DeviceView::new`] would
    /// show, without building the view.
    pub fn of_row(row: &'a crate::store::FleetRow, last_seen: Option<Timestamp>, online: bool, now: Timestamp) -> Self {
        let digest = &row.digest;
        let expired = crate::api::expired_since(&row.admission, last_seen);
        Brief {
            id: row.record.id.as_str(),
            name: &row.record.name,
            labels: &row.labels,
            version: row.record.agent_version.as_deref(),
            address: row.record.last_addr.as_deref(),
            online,
            last_seen_ms: last_seen.map(|t| t.0),
            behind_secs: digest.behind(now).map(|d| d.as_secs()),
            alarmed: digest.alarmed(),
            state: crate::api::state_word(
                row.admission.revoked_at.is_some(),
                online,
                expired.is_some(),
                last_seen.is_some(),
            ),
            refused: digest.desired_error.is_some(),
            failing: !digest.failing.is_empty(),
            failed_runs_24h: digest.failed_runs_in_a_day(now),
            overdue: !digest.overdue_backups(now).is_empty(),
        }
    }
}

/// Something the device list can filter, sort and count, with a brief
/// borrowed for `'a`.
pub trait Listed<'a> {
    /// What the list looks at.
    fn brief(&self) -> Brief<'a>;
}

impl<'a> Listed<'a> for &'a DeviceView {
    fn brief(&self) -> Brief<'a> {
        Brief {
            id: &self.id,
            name: &self.name,
            labels: &self.labels,
            version: self.agent_version.as_deref(),
            address: self.address.as_deref(),
            online: self.online,
            last_seen_ms: self.last_seen_ms,
            behind_secs: self.behind_secs,
            alarmed: self.alarmed,
            state: self.state(),
            refused: self.desired_error.is_some(),
            failing: !self.failing_jobs.is_empty(),
            failed_runs_24h: self.failed_runs_24h,
            overdue: !self.overdue_backups.is_empty(),
        }
    }
}

/// A device's state for the status filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Heard from within the heartbeat timeout.
    Online,
    /// Connected before, silent now.
    Offline,
    /// Enrolled, never connected.
    Never,
    /// Has alarms raised and not cleared.
    Alarmed,
    /// Offline, and the hub refused its expired certificate since.
    Expired,
    /// Revoked by an admin.
    Revoked,
    /// Refused its latest desired state.
    Refused,
    /// A job's latest run failed.
    Failing,
}

impl Status {
    /// Parses `online`, `offline`, `never`, `alarmed`, `expired`, `revoked`,
    /// `refused` (its desired state) or `failing` (a job).
    pub fn parse(text: &str) -> Result<Status, String> {
        match text {
            "online" => Ok(Status::Online),
            "offline" => Ok(Status::Offline),
            "never" => Ok(Status::Never),
            "alarmed" => Ok(Status::Alarmed),
            "expired" => Ok(Status::Expired),
            "revoked" => Ok(Status::Revoked),
            "refused" => Ok(Status::Refused),
            "failing" => Ok(Status::Failing),
            other => Err(format!(
                "status {other:?}: use online, offline, never, alarmed, expired, revoked, refused or failing"
            )),
        }
    }

    fn holds(self, v: &Brief<'_>) -> bool {
        match self {
            Status::Online => v.online,
            Status::Offline => !v.online && v.last_seen_ms.is_some(),
            Status::Never => v.last_seen_ms.is_none(),
            Status::Alarmed => v.alarmed,
            Status::Expired => v.state == "expired",
            Status::Revoked => v.state == "revoked",
            Status::Refused => v.refused,
            Status::Failing => v.failing,
        }
    }
}

/// Sort orders of the device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// By name, then id.
    #[default]
    Name,
    /// Most recently heard from first.
    LastSeen,
    /// By agent version, newest first.
    Version,
    /// Furthest behind first.
    Behind,
}

impl Sort {
    /// Parses `name`, `last_seen`, `version` or `behind`.
    pub fn parse(text: &str) -> Result<Sort, String> {
        match text {
            "name" => Ok(Sort::Name),
            "last_seen" => Ok(Sort::LastSeen),
            "version" => Ok(Sort::Version),
            "behind" => Ok(Sort::Behind),
            other => Err(format!("sort {other:?}: use name, last_seen, version or behind")),
        }
    }

    /// Its name in queries.
    pub fn name(self) -> &'static str {
        match self {
            Sort::Name => "name",
            Sort::LastSeen => "last_seen",
            Sort::Version => "version",
            Sort::Behind => "behind",
        }
    }

    /// The key rows are ordered by (ascending), ties broken by id.
    fn key<'a>(self, v: &Brief<'a>) -> Key<'a> {
        match self {
            Sort::Name if v.name.chars().any(char::is_uppercase) => Key::Text(Cow::Owned(v.name.to_lowercase())),
            Sort::Name => Key::Text(Cow::Borrowed(v.name)),
            Sort::LastSeen => Key::Number(u64::MAX - v.last_seen_ms.unwrap_or(0)),
            Sort::Version => Key::Text(Cow::Owned(invert(&version_key(v.version.unwrap_or(""))))),
            Sort::Behind => Key::Number(u64::MAX - v.behind_secs.unwrap_or(0)),
        }
    }

    /// A key as a cursor carries it (numbers as 20 digits, so that the
    /// text orders as the number), and back.
    fn key_text(key: &Key<'_>) -> String {
        match key {
            Key::Number(n) => format!("{n:020}"),
            Key::Text(t) => t.to_string(),
        }
    }

    fn parse_key(self, text: &str) -> Option<Key<'static>> {
        match self {
            Sort::Name | Sort::Version => Some(Key::Text(Cow::Owned(text.to_owned()))),
            Sort::LastSeen | Sort::Behind => text.parse().ok().map(Key::Number),
        }
    }
}

/// What one sort orders by: a number, or text (borrowed where it can be).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Number(u64),
    Text(Cow<'a, str>),
}

/// Orders version strings by their numbers (`0.10.0` after `0.9.1`).
fn version_key(version: &str) -> String {
    version
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(|part| match part.parse::<u64>() {
            Ok(n) => format!("{n:020}"),
            Err(_) => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A key that sorts in the opposite order (for "newest first").
fn invert(key: &str) -> String {
    key.chars().map(|c| char::from_u32(0x10_FFFF - u32::from(c)).unwrap_or(c)).collect()
}

/// A device list query.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only devices whose labels match.
    pub selector: Option<Selector>,
    /// Only devices in this state.
    pub status: Option<Status>,
    /// Only this agent version.
    pub version: Option<String>,
    /// Only devices whose name, id or address contains this (any case).
    pub text: Option<String>,
    /// Order.
    pub sort: Sort,
    /// Rows after this cursor (a page's `next`).
    pub after: Option<String>,
    /// Rows in the page.
    pub limit: usize,
}

/// One page of the device list.
#[derive(Debug, Clone)]
pub struct Page<T = DeviceView> {
    /// Its rows.
    pub rows: Vec<T>,
    /// Devices matching the filters in all.
    pub total: usize,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
    /// Matching devices before this page.
    pub start: usize,
    /// The cursor of the previous page (empty: the first page), if this
    /// is not the first.
    pub prev: Option<String>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page { rows: Vec::new(), total: 0, next: None, start: 0, prev: None }
    }
}

impl<T> Page<T> {
    /// The same page with each row made into something else.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        let Page { rows, total, next, start, prev } = self;
        Page { rows: rows.into_iter().map(f).collect(), total, next, start, prev }
    }
}

fn cursor(sort: Sort, key: &Key<'_>, id: &str) -> String {
    let text = format!("{}\u{0}{}\u{0}{}", sort.name(), Sort::key_text(key), id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn parse_cursor(sort: Sort, text: &str) -> Result<(Key<'static>, String), String> {
    let bad = || format!("after: {text:?} is not a cursor of this list (use a page's next)");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(3, '\u{0}');
    let (Some(name), Some(key), Some(id)) = (parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
    if name != sort.name() {
        return Err(format!("after: the cursor belongs to a list sorted by {name}"));
    }
    Ok((sort.parse_key(key).ok_or_else(bad)?, id.to_owned()))
}

impl DeviceQuery {
    /// True if the device passes every filter; `text` is the lower-cased
    /// search text.
    fn admits(&self, v: &Brief<'_>, text: Option<&str>) -> bool {
        self.selector.as_ref().is_none_or(|s| s.matches(v.labels))
            && self.status.is_none_or(|s| s.holds(v))
            && self.version.as_deref().is_none_or(|want| v.version == Some(want))
            && text.is_none_or(|t| {
                v.name.to_lowercase().contains(t) || v.id.contains(t) || v.address.is_some_and(|a| a.contains(t))
            })
    }
}

/// Filters, sorts and pages `items` by `query`, in time linear in their
/// number: only the page (and the row that starts the previous one) is
/// put in order, not every matching device.
pub fn select<'a, T: Listed<'a>>(items: impl IntoIterator<Item = T>, query: &DeviceQuery) -> Result<Page<T>, String> {
    let after = query.after.as_deref().map(|a| parse_cursor(query.sort, a)).transpose()?;
    let text = query.text.as_ref().map(|t| t.to_lowercase());
    let limit = query.limit.clamp(1, MAX_PAGE);
    type Row<'a, T> = (Key<'a>, &'a str, T);
    let order = |a: &Row<'a, T>, b: &Row<'a, T>| (&a.0, a.1).cmp(&(&b.0, b.1));
    let rows: Vec<Row<'a, T>> = items
        .into_iter()
        .filter_map(|v| {
            let b = v.brief();
            query.admits(&b, text.as_deref()).then(|| (query.sort.key(&b), b.id, v))
        })
        .collect();
    let total = rows.len();
    // Rows up to the cursor (earlier pages) and after it.
    let (mut before, mut rest): (Vec<_>, Vec<_>) = match &after {
        Some((key, id)) => rows.into_iter().partition(|(k, i, _)| (k, *i) <= (key, id.as_str())),
        None => (Vec::new(), rows),
    };
    let start = before.len();
    let prev = match start {
        0 => None,
        s if s <= limit => Some(String::new()),
        s => {
            // The row just before the previous page: the (limit + 1)th
            // from the end of the earlier rows.
            let (_, (key, id, _), _) = before.select_nth_unstable_by(s - limit - 1, order);
            Some(cursor(query.sort, key, id))
        }
    };
    if rest.len() > limit + 1 {
        rest.select_nth_unstable_by(limit + 1, order);
        rest.truncate(limit + 1);
    }
    rest.sort_unstable_by(order);
    let more = rest.len() > limit;
    rest.truncate(limit);
    let next = if more { rest.last().map(|(key, id, _)| cursor(query.sort, key, id)) } else { None };
    Ok(Page { rows: rest.into_iter().map(|(_, _, v)| v).collect(), total, next, start, prev })
}

/// The fleet at a glance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Overview {
    /// Devices enrolled.
    pub devices: usize,
    /// Heard from within the heartbeat timeout.
    pub online: usize,
    /// Connected before, silent now.
    pub offline: usize,
    /// Enrolled, never connected.
    pub never_connected: usize,
    /// Devices with alarms raised and not cleared.
    pub alarmed: usize,
    /// Failed job attempts in the last 24 hours, fleet-wide.
    pub failed_runs_24h: usize,
    /// Devices with a failed job attempt in the last 24 hours.
    pub devices_with_failed_runs: usize,
    /// Devices with a scheduled backup overdue.
    pub overdue_backups: usize,
    /// Devices that refused their latest desired state.
    #[serde(default)]
    pub desired_refused: usize,
    /// Devices with a job whose latest run failed.
    #[serde(default)]
    pub failing: usize,
    /// The online devices furthest behind (their newest record stored at
    /// the hub is oldest: a backlog they are still sending), furthest
    /// first, with how far in seconds. Offline devices are not behind but
    /// out; they are counted in `offline`.
    pub furthest_behind: Vec<Behind>,
    /// Devices per agent version.
    pub versions: Vec<(String, usize)>,
}

/// One device of the "furthest behind" list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Behind {
    /// Device id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Online now (catching up) or not.
    pub online: bool,
    /// Seconds between its newest stored record and now.
    pub behind_secs: u64,
}

/// Counts the overview of `items`; `worst` devices in the behind list.
pub fn overview<'a, T: Listed<'a>>(items: impl IntoIterator<Item = T>, worst: usize) -> Overview {
    let mut o = Overview::default();
    let mut versions: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut behind: Vec<Brief<'_>> = Vec::new();
    for v in items.into_iter().map(|v| v.brief()) {
        o.devices += 1;
        match (v.online, v.last_seen_ms.is_some()) {
            (true, _) => o.online += 1,
            (false, true) => o.offline += 1,
            (false, false) => o.never_connected += 1,
        }
        o.alarmed += usize::from(v.alarmed);
        o.failed_runs_24h += v.failed_runs_24h;
        o.devices_with_failed_runs += usize::from(v.failed_runs_24h > 0);
        o.overdue_backups += usize::from(v.overdue);
        o.desired_refused += usize::from(v.refused);
        o.failing += usize::from(v.failing);
        *versions.entry(v.version.unwrap_or("-")).or_default() += 1;
        if v.online && v.behind_secs.is_some() {
            behind.push(v);
        }
    }
    let by_lag = |a: &Brief<'_>, b: &Brief<'_>| b.behind_secs.cmp(&a.behind_secs).then_with(|| a.id.cmp(b.id));
    if behind.len() > worst && worst > 0 {
        behind.select_nth_unstable_by(worst - 1, by_lag);
    }
    behind.truncate(worst);
    behind.sort_unstable_by(by_lag);
    o.furthest_behind = behind
        .into_iter()
        .map(|v| Behind {
            id: v.id.to_owned(),
            name: v.name.to_owned(),
            online: v.online,
            behind_secs: v.behind_secs.unwrap_or(0),
        })
        .collect();
    o.versions = versions.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
    o.versions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::FailingJobView;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    fn view(id: &str, name: &str, l: &[(&str, &str)], online: bool, seen: Option<u64>) -> DeviceView {
        DeviceView {
            id: id.into(),
            name: name.into(),
            online,
            connected: online,
            transport: None,
            last_seen: seen.map(|s| s.to_string()),
            last_seen_ms: seen,
            agent_version: Some("0.9.1".into()),
            enrolled_at: String::new(),
            address: None,
            cpu_percent: None,
            mem_percent: None,
            telemetry: None,
            alarms: Vec::new(),
            last_seq: 0,
            labels: labels(l),
            alarmed: false,
            failed_runs_24h: 0,
            overdue_backups: Vec::new(),
            behind_secs: None,
            certificate_expired: None,
            readmitted_until: None,
            revoked: None,
            certificate_expires: None,
            offline: None,
            desired_error: None,
            failing_jobs: Vec::new(),
        }
    }

    /// A device whose expired certificate the hub refused since it was last
    /// seen is `expired`, not plain offline, and the status filter finds it.
    #[test]
    fn expired_devices_are_told_apart() {
        let mut expired = view("e", "old", &[], false, Some(1));
        expired.certificate_expired = Some("2027-12-06T00:00:00Z".into());
        let mut back = expired.clone();
        back.id = "f".into();
        back.online = true;
        let views = vec![view("a", "ok", &[], false, Some(1)), expired.clone(), back.clone()];
        assert_eq!((expired.state(), back.state(), views[0].state()), ("expired", "online", "offline"));
        assert_eq!(view("n", "new", &[], false, None).state(), "never");
        let mut revoked = back.clone();
        revoked.revoked = Some("2027-12-07T00:00:00Z".into());
        assert_eq!(revoked.state(), "revoked", "revoked wins over online");
        let q = DeviceQuery { status: Some(Status::parse("expired").unwrap()), limit: 10, ..Default::default() };
        let ids: Vec<String> = select(&views, &q).unwrap().rows.into_iter().map(|v| v.id.clone()).collect();
        assert_eq!(ids, ["e"]);
    }

    /// A row's brief says what the view made of the same row would say, in
    /// every state the filters and the overview look at: the list decides
    /// by the one and shows the other.
    /// Rows in the states the filters, the overview and the alert rules
    /// look at: plain; alarmed, failing, refused, behind, with failed runs;
    /// an expired certificate; revoked; never seen.
    pub(crate) fn sample_rows(now: Timestamp) -> Vec<crate::store::FleetRow> {
        use crate::store::{Admission, DeviceRecord, FleetRow};
        use outpost_shared::Fingerprint;
        let ago = |secs: u64| Timestamp(now.0 - secs * 1000);
        let record = DeviceRecord {
            id: "dev-a".parse().unwrap(),
            name: "Gate-1".into(),
            enrolled_at: ago(100_000),
            cert_fingerprint: Fingerprint([1; 32]),
            agent_version: Some("0.9.1".into()),
            last_seen: Some(ago(50)),
            last_addr: Some("10.0.0.7:4433".into()),
            last_sample: None,
        };
        let plain = FleetRow {
            record,
            labels: labels(&[("env", "prod")]),
            digest: Default::default(),
            high_water: 7,
            session: None,
            admission: Admission::default(),
            cert_expires: None,
        };
        let mut troubled = plain.clone();
        troubled.digest.newest_at = Some(ago(300));
        troubled.digest.failed_runs = vec![ago(90_000), ago(600), ago(60)];
        troubled.digest.desired_error = Some("jobs[0]: bad schedule".into());
        troubled.digest.failing =
            vec![crate::store::digest::FailingJob { job: "j".into(), runs: 3, last_run: 9, since: ago(600) }];
        troubled.digest.active_alarms = vec![crate::store::AlarmRecord {
            seq: 3,
            at: ago(70),
            alarm: outpost_shared::protocol::Alarm {
                kind: outpost_shared::protocol::AlarmKind::OutboxFull,
                raised: true,
                message: "full".into(),
            },
        }];
        let mut expired = plain.clone();
        expired.admission.expired_seen = Some(ago(10));
        let mut revoked = plain.clone();
        revoked.admission.revoked_at = Some(ago(5));
        let mut never = plain.clone();
        never.record.last_seen = None;
        vec![plain, troubled, expired, revoked, never]
    }

    #[test]
    fn a_rows_brief_agrees_with_its_view() {
        let now = Timestamp(10 * 86_400_000);
        for row in sample_rows(now) {
            for online in [true, false] {
                let seen = row.record.last_seen;
                let view = DeviceView::new(row.clone(), seen, online, None, now);
                assert_eq!(Brief::of_row(&row, seen, online, now), (&view).brief(), "{row:?} online={online}");
            }
        }
    }

    #[test]
    fn selectors_parse_and_match() {
        let s = Selector::parse("env=prod, site!=berlin,gpu,!retired").unwrap();
        assert!(s.matches(&labels(&[("env", "prod"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("env", "prod"), ("gpu", ""), ("site", "berlin")])));
        assert!(!s.matches(&labels(&[("env", "prod"), ("gpu", ""), ("retired", "yes")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert!(Selector::parse("  ").is_err(), "an empty selector is refused");
        assert!(Selector::parse("env=prod,,").is_err(), "an empty term is refused");
        assert!(Selector::parse("Env=prod").is_err());
    }

    #[test]
    fn bulk_targets_refuse_unknown_keys_and_empty_matches() {
        let fleet = [view("a", "a", &[("env", "prod")], true, None), view("b", "b", &[("env", "dev")], true, None)];
        let typo = Selector::parse("evn!=dev").unwrap();
        assert!(
            bulk_targets(&typo, &fleet.iter().collect::<Vec<_>>()).unwrap_err().contains("no device has the label evn")
        );
        let none = Selector::parse("env=staging").unwrap();
        assert!(bulk_targets(&none, &fleet.iter().collect::<Vec<_>>()).unwrap_err().contains("matches no device"));
        let prod = Selector::parse("env=prod").unwrap();
        assert_eq!(bulk_targets(&prod, &fleet.iter().collect::<Vec<_>>()).unwrap().len(), 1);
    }

    #[test]
    fn labels_are_checked_and_every_problem_named() {
        assert!(check_labels(&labels(&[("env", "prod"), ("example.com/site", "ber-1")])).is_ok());
        let err = check_labels(&labels(&[("Env", "x"), ("ok", "a b")])).unwrap_err();
        assert!(err.contains("\"Env\"") && err.contains("\"a b\""), "{err}");
    }

    #[test]
    fn pages_follow_cursors_without_gaps_or_repeats() {
        let views: Vec<DeviceView> =
            (0..250).map(|i| view(&format!("d{i:03}"), &format!("n{}", i % 7), &[], i % 2 == 0, Some(i))).collect();
        for sort in [Sort::Name, Sort::LastSeen, Sort::Version] {
            let mut seen = Vec::new();
            let mut after = None;
            let mut starts = Vec::new();
            loop {
                let q = DeviceQuery { sort, after: after.clone(), limit: 40, ..DeviceQuery::default() };
                let page = select(&views, &q).unwrap();
                assert_eq!(page.total, 250);
                assert_eq!(page.start, seen.len(), "the page says where it starts");
                // Its previous page is the one before it.
                if let Some(prev) = page.prev.clone() {
                    let back = DeviceQuery { after: Some(prev).filter(|p| !p.is_empty()), ..q.clone() };
                    let before = select(&views, &back).unwrap();
                    assert_eq!(before.start, starts.last().copied().unwrap(), "{sort:?}");
                    assert_eq!(before.next, after, "{sort:?}");
                } else {
                    assert_eq!(page.start, 0);
                }
                starts.push(page.start);
                seen.extend(page.rows.iter().map(|v| v.id.clone()));
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            let mut unique = seen.clone();
            unique.sort();
            unique.dedup();
            assert_eq!((seen.len(), unique.len()), (250, 250), "{sort:?}");
        }
        let newest = select(&views, &DeviceQuery { sort: Sort::LastSeen, limit: 1, ..Default::default() });
        assert_eq!(newest.unwrap().rows[0].id, "d249");
        let bad = DeviceQuery { after: Some("nope".into()), limit: 1, ..Default::default() };
        assert!(select(&views, &bad).is_err());
    }

    /// Keyset pages through 100,000 devices (the 10,000 of them a selector
    /// matches) while devices are enrolled into the filter and others leave
    /// it between pages: every device there from first page to last is
    /// listed exactly once, and none twice.
    #[test]
    fn pages_over_100000_devices_neither_skip_nor_repeat_while_the_fleet_changes() {
        let make = |i: usize| {
            let env = if i.is_multiple_of(10) { "prod" } else { "dev" };
            // Names in no relation to ids, with repeats (ties broken by id).
            view(
                &format!("d{i:06}"),
                &format!("Box-{:05}", (i * 7919) % 50_000),
                &[("env", env)],
                i.is_multiple_of(3),
                Some(i as u64),
            )
        };
        for sort in [Sort::Name, Sort::LastSeen] {
            let mut fleet: Vec<DeviceView> = (0..100_000).map(make).collect();
            let selector = Some(Selector::parse("env=prod").unwrap());
            let mut left = std::collections::BTreeSet::new();
            let mut seen = Vec::new();
            let (mut after, mut next_id, mut round) = (None, 100_000usize, 0usize);
            loop {
                let q = DeviceQuery {
                    selector: selector.clone(),
                    sort,
                    after: after.clone(),
                    limit: 1000,
                    ..Default::default()
                };
                let page = select(&fleet, &q).unwrap();
                seen.extend(page.rows.iter().map(|v| v.id.clone()));
                let Some(n) = page.next else { break };
                after = Some(n);
                // Between pages: 30 devices enrolled into the filter
                // (anywhere in the order), 30 leave it.
                for _ in 0..30 {
                    let mut v = make(next_id * 10);
                    v.last_seen_ms = Some((next_id as u64 * 7_777) % 100_000);
                    fleet.push(v);
                    next_id += 1;
                }
                for k in 0..30 {
                    let i = ((round * 30 + k) * 3_337 % 10_000) * 10;
                    fleet[i].labels.insert("env".into(), "dev".into());
                    left.insert(fleet[i].id.clone());
                }
                round += 1;
            }
            let unique: std::collections::BTreeSet<&String> = seen.iter().collect();
            assert_eq!(unique.len(), seen.len(), "{sort:?}: a device listed twice");
            let missed: Vec<String> = (0..100_000)
                .step_by(10)
                .map(|i| format!("d{i:06}"))
                .filter(|id| !left.contains(id) && !unique.contains(id))
                .collect();
            assert!(missed.is_empty(), "{sort:?}: {} devices skipped, as {:?}", missed.len(), missed.first());
            assert!(round >= 9 && !left.is_empty(), "{sort:?}: {round} pages");
        }
    }

    #[test]
    fn filters_combine() {
        let views = vec![
            view("a", "Gateway One", &[("env", "prod")], true, Some(1)),
            view("b", "gateway two", &[("env", "dev")], false, Some(1)),
            view("c", "sensor", &[("env", "prod")], false, None),
        ];
        let q = |status, text: Option<&str>| DeviceQuery {
            selector: Some(Selector::parse("env=prod").unwrap()),
            status,
            text: text.map(Into::into),
            limit: 10,
            ..Default::default()
        };
        let ids = |q| select(&views, &q).unwrap().rows.into_iter().map(|v| v.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(q(None, None)), ["a", "c"]);
        assert_eq!(ids(q(Some(Status::Never), None)), ["c"]);
        assert_eq!(ids(q(None, Some("GATEWAY"))), ["a"]);
    }

    #[test]
    fn versions_sort_by_number() {
        assert!(version_key("0.10.0") > version_key("0.9.1"));
        assert!(invert(&version_key("0.10.0")) < invert(&version_key("0.9.1")));
    }

    #[test]
    fn the_overview_counts_each_state_once() {
        let mut a = view("a", "a", &[], true, Some(1));
        a.alarmed = true;
        a.failed_runs_24h = 3;
        a.behind_secs = Some(5);
        let mut b = view("b", "b", &[], false, Some(1));
        b.overdue_backups = vec!["backup-data".into()];
        b.behind_secs = Some(500);
        b.desired_error = Some("jobs[0]: bad schedule".into());
        let c = view("c", "c", &[], false, None);
        let mut d = view("d", "d", &[], true, Some(1));
        d.behind_secs = Some(50);
        d.failing_jobs = vec![FailingJobView { job: "j".into(), runs: 2, since: String::new() }];
        let o = overview(&[a, b, c, d], 10);
        assert_eq!((o.devices, o.online, o.offline, o.never_connected), (4, 2, 1, 1));
        assert_eq!((o.alarmed, o.failed_runs_24h, o.devices_with_failed_runs, o.overdue_backups), (1, 3, 1, 1));
        assert_eq!((o.desired_refused, o.failing), (1, 1));
        let behind: Vec<&str> = o.furthest_behind.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(behind, ["d", "a"], "an offline device is out, not behind");
    }
}
