//! Alerts: rules over the fleet views, their states, and webhook
//! notifications grouped the way Alertmanager groups them.
//!
//! Every `evaluate_every`, the hub holding the lease `alerts` (one hub of
//! several; the store decides) reads the fleet views and the book of alert
//! states ([`Book`], a JSON document in the store, so a restart neither
//! forgets nor repeats an alert), and decides with pure functions:
//! [`evaluate`] moves each (rule, device) alert between pending, firing and
//! resolved; [`due`] says which groups (one per receiver and rule) are to be
//! notified now (`group_wait` after a group's first alert, then at most
//! every `group_interval` when it changed, every `repeat_interval` while it
//! fires unchanged); [`webhook_body`] writes Alertmanager's webhook payload
//! (version 4) or a Slack-style `text`. A delivery that fails with a 5xx,
//! a 429 or no answer is tried again with a capped backoff; any other 4xx
//! is given up (logged and written to the audit log). A device that is
//! offline inhibits its other alerts. The book is written after every
//! round that changed it, before the next notification is sent: what a
//! receiver was told is known after a crash (at worst one notification is
//! sent twice, never lost).

use crate::api::DeviceView;
use crate::service::listing::{Brief, Selector};
use crate::store::FleetRow;
use outpost_shared::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a rule looks for in a device's view.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Not heard from for longer than this (devices that never connected
    /// are not offline).
    Offline(Duration),
    /// A job whose latest runs failed, at least this many in a row (the
    /// retries of one run count once).
    JobFailing(u32),
    /// A scheduled backup is overdue (two periods without a success).
    BackupOverdue,
    /// The newest record the hub holds is older than this.
    Behind(Duration),
    /// A disk of the device is fuller than this share (percent).
    DiskAbove(f64),
    /// An alarm record stands (outbox full, telemetry thinned, store reset).
    Alarm,
    /// The device's certificate expired.
    CertificateExpired,
    /// The device's certificate expires within this (it was not renewed
    /// in time: the agent renews at two thirds of its life).
    CertificateExpiring(Duration),
}

impl Condition {
    /// Parses `kind` with its `threshold` (a duration, a count or a
    /// percentage, as the kind needs).
    pub fn parse(kind: &str, threshold: Option<&str>) -> Result<Condition, String> {
        let need = |what: &str| threshold.ok_or_else(|| format!("condition {kind:?} needs a threshold ({what})"));
        let duration = |t: &str| outpost_shared::config::parse_duration(t, Duration::from_secs(366 * 86400));
        match kind {
            "offline" => Ok(Condition::Offline(duration(need("a duration, e.g. \"10m\"")?)?)),
            "behind" => Ok(Condition::Behind(duration(need("a duration, e.g. \"1h\"")?)?)),
            "job_failing" => {
                let n: u32 = need("a count of failed runs")?.parse().map_err(|e| format!("threshold: {e}"))?;
                if n == 0 {
                    return Err("threshold: at least 1 failed run".into());
                }
                Ok(Condition::JobFailing(n))
            }
            "disk_above" => {
                let p: f64 = need("a percentage")?
                    .trim_end_matches('%')
                    .trim()
                    .parse()
                    .map_err(|e| format!("threshold: {e}"))?;
                if !(0.0..100.0).contains(&p) {
                    return Err("threshold: a percentage from 0 to 100".into());
                }
                Ok(Condition::DiskAbove(p))
            }
            "backup_overdue" => Ok(Condition::BackupOverdue),
            "alarm" => Ok(Condition::Alarm),
            "certificate_expired" => Ok(Condition::CertificateExpired),
            "certificate_expiring" => Ok(Condition::CertificateExpiring(duration(need("a duration, e.g. \"14d\"")?)?)),
            other => Err(format!(
                "unknown condition {other:?}: offline, behind, job_failing, disk_above, backup_overdue, alarm, \
                 certificate_expired or certificate_expiring"
            )),
        }
    }

    /// Why the condition holds for `v` at `now`, or `None`.
    pub fn holds(&self, v: &DeviceView, now: Timestamp) -> Option<String> {
        match self {
            Condition::Offline(after) => {
                let seen = v.last_seen_ms?;
                let silent = Duration::from_millis(now.0.saturating_sub(seen));
                let why = v.offline.as_ref().map(|o| format!(" ({})", o.reason)).unwrap_or_default();
                (!v.online && silent > *after).then(|| format!("offline for {}{why}", human(silent)))
            }
            Condition::Behind(more) => {
                let behind = Duration::from_secs(v.behind_secs?);
                (behind > *more).then(|| format!("{} behind", human(behind)))
            }
            Condition::JobFailing(n) => {
                let worst = v.failing_jobs.iter().max_by_key(|f| f.runs)?;
                (worst.runs >= *n).then(|| format!("job {} failed {} runs in a row", worst.job, worst.runs))
            }
            Condition::BackupOverdue => {
                (!v.overdue_backups.is_empty()).then(|| format!("backup overdue: {}", v.overdue_backups.join(", ")))
            }
            Condition::DiskAbove(p) => {
                let fullest = fullest_disk(v.telemetry.as_ref()?)?;
                (fullest.0 > *p).then(|| format!("{} is {:.0} % full", fullest.1, fullest.0))
            }
            Condition::Alarm => v.alarmed.then(|| {
                let kinds: Vec<&str> = v.alarms.iter().map(|a| a.alarm.as_str()).collect();
                format!("alarm raised: {}", kinds.join(", "))
            }),
            Condition::CertificateExpired => {
                v.certificate_expired.as_ref().map(|at| format!("certificate expired at {at}"))
            }
            Condition::CertificateExpiring(within) => {
                let at = v.certificate_expires.as_deref()?;
                let expires = Timestamp::from_system(humantime::parse_rfc3339_weak(at).ok()?);
                let left = Duration::from_millis(expires.0.saturating_sub(now.0));
                (v.revoked.is_none() && left < *within).then(|| match left {
                    Duration::ZERO => format!("certificate expired at {at}"),
                    left => format!("certificate expires in {} (at {at})", human(left)),
                })
            }
        }
    }

    /// Whether the condition can hold for a device, read from its fleet row
    /// and brief without building its view: a round of evaluation builds
    /// views only for the devices some rule may alert on. Never false where
    /// [`Condition::holds`] is true for the same row (unit test).
    pub fn may_hold(&self, row: &FleetRow, brief: &Brief<'_>, now: Timestamp) -> bool {
        match self {
            Condition::Offline(after) => {
                !brief.online
                    && brief.last_seen_ms.is_some_and(|seen| Duration::from_millis(now.0.saturating_sub(seen)) > *after)
            }
            Condition::Behind(more) => brief.behind_secs.is_some_and(|b| Duration::from_secs(b) > *more),
            Condition::JobFailing(_) => brief.failing,
            Condition::BackupOverdue => brief.overdue,
            Condition::DiskAbove(p) => {
                row.record.last_sample.as_ref().and_then(fullest_disk).is_some_and(|(share, _)| share > *p)
            }
            Condition::Alarm => brief.alarmed,
            Condition::CertificateExpired => {
                crate::api::expired_since(&row.admission, brief.last_seen_ms.map(Timestamp)).is_some()
            }
            // The view says when to the second: a second's slack.
            Condition::CertificateExpiring(within) => row.cert_expires.is_some_and(|at| {
                Duration::from_millis(at.0.saturating_sub(now.0)) < within.saturating_add(Duration::from_secs(1))
            }),
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A rule (`[[alerts.rule]]`).
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name: the alert's `alertname`.
    pub name: String,
    /// What it looks for.
    pub condition: Condition,
    /// Only devices whose labels match (all devices without one).
    pub selector: Option<Selector>,
    /// How long the condition must hold before the alert fires.
    pub hold: Duration,
    /// The `severity` label.
    pub severity: String,
    /// The summary annotation; `{device}` is replaced by the device's name.
    pub summary: String,
}

/// A receiver (`[[alerts.receiver]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    /// Its name (the payload's `receiver`).
    pub name: String,
    /// The webhook URL.
    pub url: String,
    /// The payload's format.
    pub format: Format,
}

/// A webhook payload format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    /// Alertmanager's webhook payload, version 4.
    Alertmanager,
    /// `{"text": ...}`, as Slack's and Mattermost's incoming webhooks take.
    Slack,
    /// The alerts themselves, as Alertmanager's `POST /api/v2/alerts` takes
    /// them (what Prometheus sends): firing ones are sent again at least
    /// every [`API_RESEND`] with an `endsAt` four of those ahead, so
    /// Alertmanager keeps them firing until told they resolved.
    AlertmanagerApi,
}

/// How often firing alerts are sent again to an `alertmanager_api`
/// receiver (Prometheus' resend delay).
pub const API_RESEND: Duration = Duration::from_secs(60);

/// When groups are notified.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// How often the rules are evaluated.
    pub evaluate_every: Duration,
    /// A new group waits this long for more alerts before its first
    /// notification.
    pub group_wait: Duration,
    /// A group that changed is notified at most this often.
    pub group_interval: Duration,
    /// A group that fires unchanged is notified again after this.
    pub repeat_interval: Duration,
    /// Resolved alerts are notified.
    pub send_resolved: bool,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            evaluate_every: Duration::from_secs(15),
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(300),
            repeat_interval: Duration::from_secs(4 * 3600),
            send_resolved: true,
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, Default)]
pub struct AlertsConfig {
    /// The rules.
    pub rules: Vec<Rule>,
    /// Where notifications go.
    pub receivers: Vec<Receiver>,
    /// When.
    pub timing: Timing,
    /// The hub's address as people reach it, for links in notifications.
    pub external_url: String,
}

impl AlertsConfig {
    /// Reads `[alerts]` with its `[[alerts.rule]]` and `[[alerts.receiver]]`
    /// tables; every problem is reported on the section.
    pub fn read(t: &outpost_shared::config::Section<'_>) -> Self {
        let default = Timing::default();
        let timing = Timing {
            evaluate_every: t.get_or("evaluate_every", default.evaluate_every),
            group_wait: t.get_or("group_wait", default.group_wait),
            group_interval: t.get_or("group_interval", default.group_interval),
            repeat_interval: t.get_or("repeat_interval", default.repeat_interval),
            send_resolved: t.get_or("send_resolved", default.send_resolved),
        };
        t.check("evaluate_every", timing.evaluate_every >= Duration::from_millis(100), "must be at least 100ms");
        t.check("group_interval", !timing.group_interval.is_zero(), "must be more than zero");
        t.check(
            "repeat_interval",
            timing.repeat_interval >= timing.group_interval,
            "must not be less than group_interval",
        );
        let mut rules = Vec::new();
        for r in t.array("rule") {
            let name: String = r.require("name").unwrap_or_default();
            r.check("name", valid_name(&name), "must be 1 to 64 letters, digits, '-' or '_'");
            let kind: String = r.require("condition").unwrap_or_default();
            let threshold: Option<String> = r.get("threshold");
            let condition = match Condition::parse(&kind, threshold.as_deref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    r.error("condition", e);
                    None
                }
            };
            let selector = r.get::<String>("selector").and_then(|s| match Selector::parse(&s) {
                Ok(s) => Some(s),
                Err(e) => {
                    r.error("selector", e);
                    None
                }
            });
            let rule = Rule {
                summary: r.get_or("summary", format!("{name} on {{device}}")),
                hold: r.get_or("for", Duration::ZERO),
                severity: r.get_or("severity", "warning".to_owned()),
                selector,
                condition: condition.unwrap_or(Condition::Alarm),
                name,
            };
            r.check("severity", valid_name(&rule.severity), "must be 1 to 64 letters, digits, '-' or '_'");
            if rules.iter().any(|o: &Rule| o.name == rule.name) {
                r.error("name", "another rule has this name");
            }
            r.finish();
            rules.push(rule);
        }
        let mut receivers = Vec::new();
        for r in t.array("receiver") {
            let receiver = Receiver {
                name: r.require("name").unwrap_or_default(),
                url: r.require("url").unwrap_or_default(),
                format: match r.get_or("format", "alertmanager".to_owned()).as_str() {
                    "alertmanager" => Format::Alertmanager,
                    "slack" => Format::Slack,
                    "alertmanager_api" => Format::AlertmanagerApi,
                    other => {
                        r.error(
                            "format",
                            format!(
                                "unknown format {other:?}; use \"alertmanager\", \"alertmanager_api\" or \"slack\""
                            ),
                        );
                        Format::Alertmanager
                    }
                },
            };
            r.check("name", valid_name(&receiver.name), "must be 1 to 64 letters, digits, '-' or '_'");
            let url_ok = receiver.url.starts_with("http://") || receiver.url.starts_with("https://");
            r.check("url", url_ok, "must be an http:// or https:// URL");
            r.finish();
            receivers.push(receiver);
        }
        if !rules.is_empty() && receivers.is_empty() {
            t.error("receiver", "rules are set but no [[alerts.receiver]] to tell");
        }
        let external_url = t.get_or("external_url", String::new());
        AlertsConfig { rules, receivers, timing, external_url }
    }
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The condition holds, not yet for the rule's `for`.
    Pending,
    /// It fires.
    Firing,
    /// It fired and the condition ended.
    Resolved,
}

/// One alert: a rule for a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule.
    pub rule: String,
    /// The device's id.
    pub device: String,
    /// Its name when last seen.
    pub name: String,
    /// The rule's severity.
    pub severity: String,
    /// The summary, with the device named.
    pub summary: String,
    /// Why it holds (or held), in words.
    pub description: String,
    /// Where it stands.
    pub state: State,
    /// When the condition was first seen to hold.
    pub since: Timestamp,
    /// When it started firing.
    pub fired_at: Option<Timestamp>,
    /// When it resolved.
    pub resolved_at: Option<Timestamp>,
    /// Its device is offline (an offline rule fires for it): held back
    /// from notifications while that lasts.
    #[serde(default)]
    pub inhibited: bool,
}

impl Alert {
    /// The alert's fingerprint: 16 hex digits of SHA-256 over its rule and
    /// device (what Alertmanager calls the fingerprint of its label set).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.rule, &self.device)
    }

    /// Its labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("alertname".to_owned(), self.rule.clone()),
            ("device".to_owned(), self.device.clone()),
            ("device_name".to_owned(), self.name.clone()),
            ("severity".to_owned(), self.severity.clone()),
        ])
    }
}

/// The fingerprint of the alert of `rule` for `device`.
pub fn fingerprint(rule: &str, device: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{rule}\u{0}{device}").as_bytes());
    outpost_shared::identity::hex(&digest.as_ref()[..8])
}

/// What a receiver last heard of a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// When its first alert fired (group_wait counts from here).
    pub started: Option<Timestamp>,
    /// When it was last notified.
    pub sent_at: Option<Timestamp>,
    /// The alerts (fingerprints) the receiver was last told fire.
    pub told_firing: Vec<String>,
    /// A failed delivery is tried again from here.
    pub retry_at: Option<Timestamp>,
    /// Failed deliveries in a row.
    pub failures: u32,
}

/// The alerts and what each receiver was told, as kept in the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Book {
    /// Alerts by fingerprint.
    pub alerts: BTreeMap<String, Alert>,
    /// Groups by `receiver/rule`.
    pub groups: BTreeMap<String, Group>,
}

/// Resolved alerts are kept this long for `GET /api/v1/alerts` once every
/// receiver was told.
pub const KEEP_RESOLVED: Duration = Duration::from_secs(3600);

/// The fullest disk of a sample: its share in percent and its mount.
fn fullest_disk(sample: &outpost_shared::telemetry::Sample) -> Option<(f64, &str)> {
    sample
        .disks
        .iter()
        .filter(|d| d.total_bytes > 0)
        .map(|d| (d.used_bytes as f64 * 100.0 / d.total_bytes as f64, d.mount.as_str()))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Whether some rule may alert on a device ([`Condition::may_hold`] and the
/// rule's selector): the devices whose views a round builds.
pub fn may_alert(rules: &[Rule], row: &FleetRow, brief: &Brief<'_>, now: Timestamp) -> bool {
    rules
        .iter()
        .any(|r| r.selector.as_ref().is_none_or(|s| s.matches(brief.labels)) && r.condition.may_hold(row, brief, now))
}

/// Evaluates `rules` over `views` at `now`: new alerts pending, pending
/// ones firing once they held for the rule's `for`, ones whose condition
/// ended resolved (pending ones dropped), and the inhibition of alerts of
/// offline devices. Pure.
pub fn evaluate(book: &mut Book, rules: &[Rule], views: &[DeviceView], now: Timestamp) {
    let mut seen = std::collections::BTreeSet::new();
    for rule in rules {
        for v in views {
            if rule.selector.as_ref().is_some_and(|s| !s.matches(&v.labels)) {
                continue;
            }
            let Some(why) = rule.condition.holds(v, now) else { continue };
            let fp = fingerprint(&rule.name, &v.id);
            seen.insert(fp.clone());
            let alert = book.alerts.entry(fp).or_insert_with(|| Alert {
                rule: rule.name.clone(),
                device: v.id.clone(),
                name: v.name.clone(),
                severity: rule.severity.clone(),
                summary: String::new(),
                description: String::new(),
                state: State::Pending,
                since: now,
                fired_at: None,
                resolved_at: None,
                inhibited: false,
            });
            if alert.state == State::Resolved {
                // It came back: a new alert of the same identity.
                *alert = Alert {
                    state: State::Pending,
                    since: now,
                    fired_at: None,
                    resolved_at: None,
                    description: String::new(),
                    ..alert.clone()
                };
            }
            let firing_now = alert.state == State::Pending
                && Duration::from_millis(now.0.saturating_sub(alert.since.0)) >= rule.hold;
            // Why, as of when it started and when it fired: not rewritten
            // each round ("offline for 61s", "62s"...), so a firing alert
            // leaves the book unchanged and it is not written again.
            if alert.description.is_empty() || firing_now {
                alert.description = why;
            }
            if firing_now {
                alert.state = State::Firing;
                alert.fired_at = Some(now);
            }
            // Written only when they change (a rename, a reloaded rule).
            let summary = rule.summary.replace("{device}", &v.name);
            if alert.summary != summary {
                alert.summary = summary;
            }
            if alert.name != v.name {
                alert.name.clone_from(&v.name);
            }
            if alert.severity != rule.severity {
                alert.severity.clone_from(&rule.severity);
            }
        }
    }
    // Every fingerprint some receiver was told fires (a set: the book may
    // hold an alert for each device of the fleet).
    let told: std::collections::HashSet<&str> =
        book.groups.values().flat_map(|g| g.told_firing.iter().map(String::as_str)).collect();
    book.alerts.retain(|fp, alert| {
        if seen.contains(fp) {
            return true;
        }
        match alert.state {
            State::Pending => false,
            // A rule taken out of the config resolves its alerts too.
            State::Firing => {
                alert.state = State::Resolved;
                alert.resolved_at = Some(now);
                true
            }
            // Kept while a receiver is still to be told, and for a while
            // after, for the API.
            State::Resolved => {
                let told = !told.contains(fp.as_str());
                let old =
                    alert.resolved_at.is_some_and(|t| Duration::from_millis(now.0.saturating_sub(t.0)) > KEEP_RESOLVED);
                !(told && old)
            }
        }
    });
    let offline_rules: std::collections::BTreeSet<&str> =
        rules.iter().filter(|r| matches!(r.condition, Condition::Offline(_))).map(|r| r.name.as_str()).collect();
    let offline: std::collections::BTreeSet<String> = book
        .alerts
        .values()
        .filter(|a| a.state == State::Firing && offline_rules.contains(a.rule.as_str()))
        .map(|a| a.device.clone())
        .collect();
    for alert in book.alerts.values_mut() {
        alert.inhibited = !offline_rules.contains(alert.rule.as_str()) && offline.contains(&alert.device);
    }
}

/// A notification to send: a receiver, a rule's group, and its alerts.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// The group's key in [`Book::groups`] (`receiver/rule`).
    pub key: String,
    /// The receiver (an index into the config's receivers).
    pub receiver: usize,
    /// The rule.
    pub rule: String,
    /// Firing alerts, then newly resolved ones the receiver was told fire.
    pub alerts: Vec<Alert>,
}

/// The groups to notify now: a group waits `group_wait` after its first
/// alert fired; then it is notified when its firing set changed (at most
/// every `group_interval`), or every `repeat_interval` while it fires; a
/// failed delivery waits for its retry. `silenced` alerts and inhibited
/// ones are left out. Pure.
pub fn due(
    book: &mut Book,
    receivers: &[Receiver],
    timing: &Timing,
    now: Timestamp,
    silenced: &dyn Fn(&Alert) -> bool,
) -> Vec<Due> {
    let elapsed = |t: Timestamp| Duration::from_millis(now.0.saturating_sub(t.0));
    let mut rules: Vec<&str> = book.alerts.values().map(|a| a.rule.as_str()).collect();
    rules.sort_unstable();
    rules.dedup();
    let rules: Vec<String> = rules.into_iter().map(str::to_owned).collect();
    let mut out = Vec::new();
    for (index, receiver) in receivers.iter().enumerate() {
        for rule in &rules {
            let key = format!("{}/{rule}", receiver.name);
            // The book is keyed by fingerprint, in order: `fps` is sorted.
            let (fps, firing): (Vec<&String>, Vec<&Alert>) = book
                .alerts
                .iter()
                .filter(|(_, a)| &a.rule == rule && a.state == State::Firing && !a.inhibited && !silenced(a))
                .unzip();
            let group = book.groups.entry(key.clone()).or_default();
            // Sets, not lists: one lookup per alert, whatever the fleet's size.
            let firing_now: std::collections::HashSet<&str> = fps.iter().map(|f| f.as_str()).collect();
            let told: std::collections::HashSet<&str> = group.told_firing.iter().map(String::as_str).collect();
            let resolved: Vec<&Alert> = book
                .alerts
                .iter()
                .filter(|(fp, a)| {
                    &a.rule == rule
                        && told.contains(fp.as_str())
                        && !firing_now.contains(fp.as_str())
                        && (a.state == State::Resolved || silenced(a) || a.inhibited)
                })
                .map(|(_, a)| a)
                .collect();
            if firing.is_empty() && resolved.is_empty() && told.iter().all(|f| firing_now.contains(f)) {
                if firing.is_empty() {
                    group.started = None;
                }
                continue;
            }
            if group.started.is_none() {
                group.started = firing.iter().filter_map(|a| a.fired_at).min();
            }
            if group.retry_at.is_some_and(|t| now < t) {
                continue;
            }
            let changed = !fps.iter().copied().eq(group.told_firing.iter());
            let repeat = match receiver.format {
                Format::AlertmanagerApi => timing.repeat_interval.min(API_RESEND),
                _ => timing.repeat_interval,
            };
            let notify = match group.sent_at {
                _ if group.retry_at.is_some() => true,
                None => changed && group.started.is_some_and(|s| elapsed(s) >= timing.group_wait),
                Some(sent) if changed => elapsed(sent) >= timing.group_interval,
                Some(sent) => !firing.is_empty() && elapsed(sent) >= repeat,
            };
            let tell_resolved = timing.send_resolved && !resolved.is_empty();
            if !notify || (firing.is_empty() && !tell_resolved) {
                if notify && firing.is_empty() {
                    // Only resolutions the receiver is not to be told of.
                    group.told_firing.clear();
                    group.sent_at = Some(now);
                }
                continue;
            }
            let mut alerts: Vec<Alert> = firing.into_iter().cloned().collect();
            if timing.send_resolved {
                alerts.extend(resolved.into_iter().map(|a| Alert { state: State::Resolved, ..a.clone() }));
            }
            out.push(Due { key, receiver: index, rule: rule.clone(), alerts });
        }
    }
    book.groups.retain(|_, g| g.started.is_some() || !g.told_firing.is_empty() || g.retry_at.is_some());
    out
}

/// Least and most time between retries of a failed delivery.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// See [`RETRY_FIRST`].
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// 2xx.
    Sent,
    /// A 5xx, 429 or no answer: tried again.
    Retry(String),
    /// Any other answer: given up.
    Failed(String),
}

/// What a webhook's answer means. Pure.
pub fn delivery(status: Result<u16, String>) -> Delivery {
    match status {
        Ok(200..=299) => Delivery::Sent,
        Ok(code @ (429 | 500..=599)) => Delivery::Retry(format!("HTTP {code}")),
        Ok(code) => Delivery::Failed(format!("HTTP {code}")),
        Err(e) => Delivery::Retry(e),
    }
}

/// Records how the delivery of `due` ended in the book. Pure.
pub fn delivered(book: &mut Book, due: &Due, outcome: &Delivery, now: Timestamp) {
    let group = book.groups.entry(due.key.clone()).or_default();
    match outcome {
        Delivery::Sent | Delivery::Failed(_) => {
            let mut told: Vec<String> =
                due.alerts.iter().filter(|a| a.state == State::Firing).map(Alert::fingerprint).collect();
            told.sort();
            group.told_firing = told;
            group.sent_at = Some(now);
            group.retry_at = None;
            group.failures = 0;
        }
        Delivery::Retry(_) => {
            group.failures = group.failures.saturating_add(1);
            let backoff = RETRY_FIRST.saturating_mul(1u32 << group.failures.min(16).saturating_sub(1)).min(RETRY_MAX);
            group.retry_at = Some(now.saturating_add(backoff));
        }
    }
}

/// The webhook body for `due`, sent to `receiver` at `now`. Pure.
pub fn webhook_body(receiver: &Receiver, due: &Due, external_url: &str, now: Timestamp) -> serde_json::Value {
    let firing = due.alerts.iter().any(|a| a.state == State::Firing);
    match receiver.format {
        Format::AlertmanagerApi => {
            let alerts: Vec<serde_json::Value> = due
                .alerts
                .iter()
                .map(|a| {
                    let ends = match a.resolved_at {
                        Some(t) if a.state == State::Resolved => t,
                        _ => now.saturating_add(API_RESEND * 4),
                    };
                    serde_json::json!({
                        "labels": a.labels(),
                        "annotations": {"summary": a.summary, "description": a.description},
                        "startsAt": a.fired_at.unwrap_or(a.since).rfc3339(),
                        "endsAt": ends.rfc3339(),
                        "generatorURL": format!("{external_url}/console/devices/{}", a.device),
                    })
                })
                .collect();
            serde_json::Value::Array(alerts)
        }
        Format::Alertmanager => {
            let truncated = due.alerts.len().saturating_sub(MAX_ALERTS_PER_NOTIFICATION);
            let alerts: Vec<serde_json::Value> = due
                .alerts
                .iter()
                .take(MAX_ALERTS_PER_NOTIFICATION)
                .map(|a| {
                    let resolved = a.state == State::Resolved;
                    serde_json::json!({
                        "status": if resolved { "resolved" } else { "firing" },
                        "labels": a.labels(),
                        "annotations": {"summary": a.summary, "description": a.description},
                        "startsAt": a.fired_at.unwrap_or(a.since).rfc3339(),
                        "endsAt": match a.resolved_at { Some(t) if resolved => t.rfc3339(), _ => "0001-01-01T00:00:00Z".to_owned() },
                        "generatorURL": format!("{external_url}/console/devices/{}", a.device),
                        "fingerprint": a.fingerprint(),
                    })
                })
                .collect();
            let labels: Vec<BTreeMap<String, String>> = due.alerts.iter().map(Alert::labels).collect();
            let common_labels = common(&labels);
            let annotations: Vec<BTreeMap<String, String>> =
                due.alerts.iter().map(|a| BTreeMap::from([("summary".to_owned(), a.summary.clone())])).collect();
            serde_json::json!({
                "version": "4",
                "groupKey": format!("{{}}:{{alertname=\"{}\"}}", due.rule),
                "truncatedAlerts": truncated,
                "status": if firing { "firing" } else { "resolved" },
                "receiver": receiver.name,
                "groupLabels": {"alertname": due.rule},
                "commonLabels": common_labels,
                "commonAnnotations": common(&annotations),
                "externalURL": external_url,
                "alerts": alerts,
            })
        }
        Format::Slack => {
            let mut text = String::new();
            // A chat message is read, not parsed: the first 50. What a
            // device chose (its name, how it closed its connection) is text,
            // never a mention or a link (`<!channel>`, `<@U123>`, `<url|x>`).
            for a in due.alerts.iter().take(50) {
                let mark = if a.state == State::Resolved { "RESOLVED" } else { "FIRING" };
                let line = format!("{} ({}): {}", a.summary, a.severity, a.description);
                text.push_str(&format!("[{mark}] {}\n", slack_text(&line)));
            }
            if due.alerts.len() > 50 {
                text.push_str(&format!("… and {} more of {}\n", due.alerts.len() - 50, due.rule));
            }
            serde_json::json!({ "text": text.trim_end() })
        }
    }
}

/// `text` as plain text in a Slack (or Mattermost) message: `&`, `<` and
/// `>` escaped as Slack asks, so nothing in it becomes a mention, a channel
/// ping or a link. Pure.
pub fn slack_text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A payload in the `alertmanager` format for one firing alert, as the
/// tests compare it with what a real Alertmanager sends.
pub fn example_payload() -> serde_json::Value {
    let alert = Alert {
        rule: "DeviceOffline".into(),
        device: "dev-0000000000000000".into(),
        name: "example".into(),
        severity: "critical".into(),
        summary: "example is offline".into(),
        description: "offline for 10m".into(),
        state: State::Firing,
        since: Timestamp(0),
        fired_at: Some(Timestamp(0)),
        resolved_at: None,
        inhibited: false,
    };
    let receiver = Receiver { name: "example".into(), url: String::new(), format: Format::Alertmanager };
    let due = Due { key: "example/DeviceOffline".into(), receiver: 0, rule: alert.rule.clone(), alerts: vec![alert] };
    webhook_body(&receiver, &due, "", Timestamp(0))
}

fn common(sets: &[BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let Some((first, rest)) = sets.split_first() else { return BTreeMap::new() };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|s| s.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The API's view of `alert`.
pub fn alert_view(alert: &Alert, silenced: bool) -> crate::api::AlertView {
    crate::api::AlertView {
        fingerprint: alert.fingerprint(),
        rule: alert.rule.clone(),
        device: alert.device.clone(),
        device_name: alert.name.clone(),
        severity: alert.severity.clone(),
        state: state_name(alert.state).into(),
        summary: alert.summary.clone(),
        description: alert.description.clone(),
        since: alert.since.rfc3339(),
        fired_at: alert.fired_at.map(Timestamp::rfc3339),
        resolved_at: alert.resolved_at.map(Timestamp::rfc3339),
        inhibited: alert.inhibited,
        silenced,
    }
}

/// The API's view of silence `s` at `now`.
pub fn silence_view(s: &Silence, now: Timestamp) -> crate::api::SilenceView {
    crate::api::SilenceView {
        id: s.id.clone(),
        matchers: s.matchers.clone(),
        ends_at: s.ends_at.rfc3339(),
        comment: s.comment.clone(),
        created_by: s.created_by.clone(),
        created_at: s.created_at.rfc3339(),
        active: now < s.ends_at,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;

    fn view(id: &str, online: bool, last_seen: Option<u64>) -> DeviceView {
        let mut v: DeviceView = serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("{id}-name"), "online": online, "connected": online,
            "enrolled_at": "2026-01-01T00:00:00Z", "alarms": [], "last_seq": 0, "labels": {},
            "alarmed": false, "failed_runs_24h": 0, "overdue_backups": []
        }))
        .unwrap();
        v.last_seen_ms = last_seen;
        v
    }

    /// The pre-filter never drops a device a rule would alert on: for rows
    /// in every state (with a disk sample, a certificate expiring or
    /// expired, long silent...), online and not, each condition that holds
    /// for the row's view may hold for its row and brief; and a plain,
    /// online, healthy device is left out by every condition.
    #[test]
    fn a_condition_that_holds_for_a_view_may_hold_for_its_row() {
        use crate::service::listing::Listed;
        let now = Timestamp(10 * 86_400_000);
        let ago = |secs: u64| Timestamp(now.0 - secs * 1000);
        let later = |secs: u64| Timestamp(now.0 + secs * 1000);
        let disks = |used: u64| outpost_shared::telemetry::Sample {
            disks: vec![
                outpost_shared::telemetry::DiskSample { mount: "/".into(), used_bytes: 10, total_bytes: 100 },
                outpost_shared::telemetry::DiskSample { mount: "/data".into(), used_bytes: used, total_bytes: 100 },
            ],
            ..crate::store::ingest::tests::quiet_sample(ago(5).0)
        };
        let mut rows = Vec::new();
        for base in crate::service::listing::tests::sample_rows(now) {
            rows.push(base.clone());
            for used in [40, 89, 91, 99] {
                let mut r = base.clone();
                r.record.last_sample = Some(disks(used));
                rows.push(r);
            }
            for expires in [later(60), later(2 * 3600), later(40 * 86_400), ago(60)] {
                let mut r = base.clone();
                r.cert_expires = Some(expires);
                rows.push(r);
            }
            for silent in [20, 70, 4000, 90_000] {
                let mut r = base.clone();
                r.record.last_seen = Some(ago(silent));
                r.digest.newest_at = Some(ago(silent));
                rows.push(r);
            }
        }
        let conditions = [
            Condition::Offline(Duration::from_secs(60)),
            Condition::Offline(Duration::from_secs(3600)),
            Condition::Behind(Duration::from_secs(60)),
            Condition::Behind(Duration::from_secs(86_400)),
            Condition::JobFailing(1),
            Condition::JobFailing(3),
            Condition::JobFailing(4),
            Condition::BackupOverdue,
            Condition::DiskAbove(90.0),
            Condition::DiskAbove(50.0),
            Condition::Alarm,
            Condition::CertificateExpired,
            Condition::CertificateExpiring(Duration::from_secs(86_400)),
            Condition::CertificateExpiring(Duration::from_secs(30 * 86_400)),
        ];
        let mut held = 0;
        for row in &rows {
            for online in [true, false] {
                let seen = row.record.last_seen;
                let view = DeviceView::new(row.clone(), seen, online, None, now);
                let brief = crate::service::listing::Brief::of_row(row, seen, online, now);
                assert_eq!(brief, (&view).brief());
                for c in &conditions {
                    if let Some(why) = c.holds(&view, now) {
                        held += 1;
                        assert!(
                            c.may_hold(row, &brief, now),
                            "{c:?} holds ({why}) but the pre-filter drops {row:?} online={online}"
                        );
                    }
                }
            }
        }
        assert!(held > 50, "the rows should make most conditions hold somewhere ({held})");
        let plain = &crate::service::listing::tests::sample_rows(now)[0];
        let brief = crate::service::listing::Brief::of_row(plain, plain.record.last_seen, true, now);
        for c in &conditions {
            assert!(!c.may_hold(plain, &brief, now), "{c:?} should leave a healthy online device out");
        }
    }

    fn offline_rule(hold: u64) -> Rule {
        Rule {
            name: "DeviceOffline".into(),
            condition: Condition::Offline(Duration::from_secs(60)),
            selector: None,
            hold: Duration::from_secs(hold),
            severity: "critical".into(),
            summary: "{device} is offline".into(),
        }
    }

    fn receiver() -> Receiver {
        Receiver { name: "ops".into(), url: "http://x".into(), format: Format::Alertmanager }
    }

    const T: Timing = Timing {
        evaluate_every: Duration::from_secs(1),
        group_wait: Duration::from_secs(10),
        group_interval: Duration::from_secs(60),
        repeat_interval: Duration::from_secs(3600),
        send_resolved: true,
    };

    #[test]
    fn an_alert_pends_for_its_rule_then_fires_then_resolves() {
        let rules = [offline_rule(30)];
        let mut book = Book::default();
        let never = view("d0", false, None);
        let silent = view("d1", false, Some(0));
        evaluate(&mut book, &rules, &[never.clone(), silent.clone()], Timestamp(61_000));
        assert_eq!(book.alerts.len(), 1, "a device never seen is not offline");
        let a = book.alerts.values().next().unwrap().clone();
        assert_eq!(
            (a.state, a.summary.as_str(), a.description.as_str()),
            (State::Pending, "d1-name is offline", "offline for 61s")
        );
        evaluate(&mut book, &rules, std::slice::from_ref(&silent), Timestamp(90_000));
        assert_eq!(book.alerts.values().next().unwrap().state, State::Pending);
        evaluate(&mut book, &rules, std::slice::from_ref(&silent), Timestamp(91_000));
        assert_eq!(book.alerts.values().next().unwrap().state, State::Firing);
        // Firing on, round after round: the book does not change (nothing
        // to write to the store).
        let firing = book.clone();
        evaluate(&mut book, &rules, std::slice::from_ref(&silent), Timestamp(150_000));
        assert_eq!(book, firing, "a firing alert changed the book");
        assert_eq!(book.alerts.values().next().unwrap().description, "offline for 91s", "why, as of when it fired");
        let back = view("d1", true, Some(92_000));
        evaluate(&mut book, &rules, &[back], Timestamp(92_000));
        let a = book.alerts.values().next().unwrap();
        assert_eq!((a.state, a.resolved_at), (State::Resolved, Some(Timestamp(92_000))));
        // A pending one that ends is dropped without a trace.
        let mut book = Book::default();
        evaluate(&mut book, &rules, &[silent], Timestamp(61_000));
        evaluate(&mut book, &rules, &[view("d1", true, Some(62_000))], Timestamp(62_000));
        assert!(book.alerts.is_empty());
    }

    #[test]
    fn a_group_waits_then_is_told_once_until_it_changes_or_repeats_and_is_told_of_the_resolution() {
        let rules = [offline_rule(0)];
        let recv = [receiver()];
        let mut book = Book::default();
        let none = |_: &Alert| false;
        let silent = |id| view(id, false, Some(0));
        evaluate(&mut book, &rules, &[silent("d1")], Timestamp(100_000));
        assert!(due(&mut book, &recv, &T, Timestamp(100_000), &none).is_empty(), "group_wait");
        evaluate(&mut book, &rules, &[silent("d1"), silent("d2")], Timestamp(105_000));
        assert!(due(&mut book, &recv, &T, Timestamp(105_000), &none).is_empty());
        let sent = due(&mut book, &recv, &T, Timestamp(110_000), &none);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].alerts.len(), 2, "both devices in one notification");
        delivered(&mut book, &sent[0], &Delivery::Sent, Timestamp(110_000));
        assert!(due(&mut book, &recv, &T, Timestamp(111_000), &none).is_empty(), "told already");
        // d1 comes back: told at the next group_interval, as resolved.
        evaluate(&mut book, &rules, &[silent("d2"), view("d1", true, Some(120_000))], Timestamp(120_000));
        assert!(due(&mut book, &recv, &T, Timestamp(120_000), &none).is_empty(), "group_interval");
        let sent = due(&mut book, &recv, &T, Timestamp(170_000), &none);
        let states: Vec<(String, State)> = sent[0].alerts.iter().map(|a| (a.device.clone(), a.state)).collect();
        assert_eq!(states, [("d2".to_owned(), State::Firing), ("d1".to_owned(), State::Resolved)]);
        delivered(&mut book, &sent[0], &Delivery::Sent, Timestamp(170_000));
        // Unchanged: again only after repeat_interval.
        assert!(due(&mut book, &recv, &T, Timestamp(1_000_000), &none).is_empty());
        assert_eq!(due(&mut book, &recv, &T, Timestamp(3_770_000), &none).len(), 1);
    }

    #[test]
    fn alert_pages_neither_skip_nor_repeat_while_alerts_come_and_go() {
        let alert = |rule: &str, device: &str, state, since| Alert {
            rule: rule.into(),
            device: device.into(),
            name: device.into(),
            severity: "warning".into(),
            summary: String::new(),
            description: String::new(),
            state,
            since: Timestamp(since),
            fired_at: None,
            resolved_at: None,
            inhibited: false,
        };
        let mut all: Vec<Alert> = (0..25u64)
            .map(|i| {
                let state = [State::Firing, State::Pending, State::Resolved][(i % 3) as usize];
                alert("R", &format!("d{i:02}"), state, 1_000 + i / 2)
            })
            .collect();
        let q = |after: Option<String>, state| AlertQuery { state, device: None, after, limit: 4 };
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let (shown, total, next) = page(all.clone(), &q(after.clone(), None)).unwrap();
            assert_eq!(total, all.len());
            seen.extend(shown.iter().map(|a| (order(a).0, a.device.clone())));
            // Between pages one alert resolves and a new one fires: neither
            // shifts what is still to come.
            if seen.len() == 8 {
                all.push(alert("R", "new", State::Firing, 5_000));
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25, "{seen:?}");
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 25, "no repeats");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "firing, then pending, then resolved: {seen:?}");
        let (firing, total, _) = page(all.clone(), &q(None, Some(State::Firing))).unwrap();
        assert_eq!((firing.len(), total), (4, 10));
        assert_eq!(firing[0].device, "new", "newest first");
        assert!(page(all, &q(Some("nope".into()), None)).is_err());
    }

    #[test]
    fn a_device_cannot_ping_a_chat_channel_through_its_name() {
        assert_eq!(slack_text("<!channel> & <@U1|x>"), "&lt;!channel&gt; &amp; &lt;@U1|x&gt;");
        let mut hostile = view("d", false, Some(0));
        hostile.name = "<!channel>".into();
        let mut book = Book::default();
        evaluate(&mut book, &[offline_rule(0)], &[hostile], Timestamp(100_000));
        let sent = due(&mut book, &[receiver()], &T, Timestamp(110_000), &|_| false);
        let body = webhook_body(&Receiver { format: Format::Slack, ..receiver() }, &sent[0], "", Timestamp(110_000));
        let text = body["text"].as_str().unwrap();
        assert!(text.contains("&lt;!channel&gt; is offline") && !text.contains("<!"), "{text}");
    }

    #[test]
    fn conditions_say_why_in_words() {
        let now = Timestamp(1_000_000);
        let mut v = view("d", false, Some(1_000));
        v.offline = Some(crate::api::OfflineView {
            since: String::new(),
            since_ms: 1_000,
            reason: "closed by the device (agent stopping)".into(),
        });
        let why = Condition::Offline(Duration::from_secs(60)).holds(&v, now).unwrap();
        assert_eq!(why, "offline for 16m (closed by the device (agent stopping))");
        let failing = |runs| crate::api::FailingJobView { job: "report".into(), runs, since: String::new() };
        v.failing_jobs = vec![failing(2)];
        assert_eq!(Condition::JobFailing(3).holds(&v, now), None, "two in a row are not three");
        v.failing_jobs.push(failing(3));
        assert_eq!(Condition::JobFailing(3).holds(&v, now).unwrap(), "job report failed 3 runs in a row");
        v.failing_jobs.clear();
        v.failed_runs_24h = 50;
        assert_eq!(Condition::JobFailing(1).holds(&v, now), None, "failures followed by a success are over");
        // 1_000_000 ms is 1970-01-01T00:16:40Z.
        let expiring = Condition::CertificateExpiring(Duration::from_secs(3600));
        assert_eq!(expiring.holds(&v, now), None, "no expiry known");
        v.certificate_expires = Some("1970-01-01T00:46:40Z".into());
        assert_eq!(expiring.holds(&v, now).unwrap(), "certificate expires in 30m (at 1970-01-01T00:46:40Z)");
        v.certificate_expires = Some("1970-01-01T02:00:00Z".into());
        assert_eq!(expiring.holds(&v, now), None, "more than an hour left");
        v.certificate_expires = Some("1970-01-01T00:00:01Z".into());
        assert!(expiring.holds(&v, now).unwrap().contains("expired"));
        v.revoked = Some("1970-01-01T00:00:00Z".into());
        assert_eq!(expiring.holds(&v, now), None, "a revoked device's certificate does not matter");
        assert!(Condition::parse("certificate_expiring", None).unwrap_err().contains("needs a threshold"));
        assert_eq!(
            Condition::parse("certificate_expiring", Some("14d")).unwrap(),
            Condition::CertificateExpiring(Duration::from_secs(14 * 86400))
        );
    }

    #[test]
    fn a_failed_delivery_is_retried_with_a_capped_backoff_and_a_refusal_is_given_up() {
        assert_eq!(delivery(Ok(200)), Delivery::Sent);
        assert_eq!(delivery(Ok(503)), Delivery::Retry("HTTP 503".into()));
        assert_eq!(delivery(Ok(429)), Delivery::Retry("HTTP 429".into()));
        assert_eq!(delivery(Ok(404)), Delivery::Failed("HTTP 404".into()));
        assert!(matches!(delivery(Err("timed out".into())), Delivery::Retry(_)));
        let rules = [offline_rule(0)];
        let recv = [receiver()];
        let mut book = Book::default();
        let none = |_: &Alert| false;
        evaluate(&mut book, &rules, &[view("d1", false, Some(0))], Timestamp(100_000));
        let first = due(&mut book, &recv, &T, Timestamp(110_000), &none);
        delivered(&mut book, &first[0], &Delivery::Retry("HTTP 500".into()), Timestamp(110_000));
        assert!(due(&mut book, &recv, &T, Timestamp(110_500), &none).is_empty(), "waits for its retry");
        let again = due(&mut book, &recv, &T, Timestamp(111_000), &none);
        assert_eq!(again, first);
        delivered(&mut book, &again[0], &Delivery::Retry("HTTP 500".into()), Timestamp(111_000));
        assert_eq!(book.groups["ops/DeviceOffline"].retry_at, Some(Timestamp(113_000)), "1 s, then 2 s");
        for _ in 0..20 {
            delivered(&mut book, &again[0], &Delivery::Retry("HTTP 500".into()), Timestamp(111_000));
        }
        assert_eq!(book.groups["ops/DeviceOffline"].retry_at, Some(Timestamp(111_000 + 300_000)), "capped");
        delivered(&mut book, &again[0], &Delivery::Sent, Timestamp(500_000));
        assert!(due(&mut book, &recv, &T, Timestamp(501_000), &none).is_empty(), "sent once");
    }

    #[test]
    fn silenced_and_inhibited_alerts_are_not_told() {
        let alarm = Rule { name: "Alarm".into(), condition: Condition::Alarm, ..offline_rule(0) };
        let rules = [offline_rule(0), alarm];
        let recv = [receiver()];
        let mut v = view("d1", false, Some(0));
        v.alarmed = true;
        let mut book = Book::default();
        evaluate(&mut book, &rules, &[v.clone()], Timestamp(100_000));
        assert!(book.alerts.values().any(|a| a.rule == "Alarm" && a.inhibited), "an offline device's alarm");
        let silenced = |a: &Alert| a.rule == "DeviceOffline";
        assert!(due(&mut book, &recv, &T, Timestamp(200_000), &silenced).is_empty());
        // Back online, the alarm still stands: no longer inhibited.
        v.online = true;
        v.last_seen_ms = Some(300_000);
        evaluate(&mut book, &rules, &[v], Timestamp(300_000));
        let sent = due(&mut book, &recv, &T, Timestamp(310_000), &|_| false);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].rule, "Alarm");
    }

    #[test]
    fn the_payload_is_alertmanagers_webhook_version_4() {
        let rules = [offline_rule(0)];
        let mut book = Book::default();
        evaluate(&mut book, &rules, &[view("d1", false, Some(0))], Timestamp(100_000));
        let sent = due(&mut book, &[receiver()], &T, Timestamp(110_000), &|_| false);
        let body = webhook_body(&receiver(), &sent[0], "https://hub.example", Timestamp(110_000));
        assert_eq!(body["version"], "4");
        assert_eq!(body["status"], "firing");
        assert_eq!(body["receiver"], "ops");
        assert_eq!(body["groupLabels"]["alertname"], "DeviceOffline");
        assert_eq!(body["commonLabels"]["severity"], "critical");
        let a = &body["alerts"][0];
        assert_eq!(a["labels"]["device"], "d1");
        assert_eq!(a["annotations"]["summary"], "d1-name is offline");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
        assert!(a["startsAt"].as_str().unwrap().starts_with("1970-01-01T00:01:40"));
        let slack = webhook_body(&Receiver { format: Format::Slack, ..receiver() }, &sent[0], "", Timestamp(110_000));
        assert_eq!(slack["text"], "[FIRING] d1-name is offline (critical): offline for 100s");
        // A group of 1,200 devices: 1,000 listed, the rest counted.
        let many: Vec<DeviceView> = (0..1200).map(|i| view(&format!("d{i:04}"), false, Some(0))).collect();
        let mut big = Book::default();
        evaluate(&mut big, &rules, &many, Timestamp(100_000));
        let sent_big = due(&mut big, &[receiver()], &T, Timestamp(110_000), &|_| false);
        let body_big = webhook_body(&receiver(), &sent_big[0], "", Timestamp(110_000));
        assert_eq!(
            (body_big["alerts"].as_array().unwrap().len(), &body_big["truncatedAlerts"]),
            (1000, &serde_json::json!(200))
        );
        let slack_big = webhook_body(&Receiver { format: Format::Slack, ..receiver() }, &sent_big[0], "", Timestamp(0));
        assert!(slack_big["text"].as_str().unwrap().ends_with("… and 1150 more of DeviceOffline"));
        // Alertmanager's API: the alerts, ending four resend delays ahead.
        let api =
            webhook_body(&Receiver { format: Format::AlertmanagerApi, ..receiver() }, &sent[0], "", Timestamp(110_000));
        assert_eq!(api[0]["labels"]["alertname"], "DeviceOffline");
        assert_eq!(api[0]["endsAt"], Timestamp(350_000).rfc3339());
    }
}

/// A silence: alerts whose labels match every matcher are not notified
/// until `ends_at` (`outpostctl alerts silence`, `POST /api/v1/silences`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// `sil-` and 12 hex digits.
    pub id: String,
    /// Label names and the values they must have (`alertname`, `device`,
    /// `device_name`, `severity`).
    pub matchers: BTreeMap<String, String>,
    /// When it ends (ms since the epoch).
    pub ends_at: Timestamp,
    /// Why.
    pub comment: String,
    /// The token that made it.
    pub created_by: String,
    /// When.
    pub created_at: Timestamp,
}

impl Silence {
    /// True if it is in force at `now` and matches `alert`. Pure.
    pub fn silences(&self, alert: &Alert, now: Timestamp) -> bool {
        let labels = alert.labels();
        now < self.ends_at && self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Names of the documents in the store.
pub const BOOK: &str = "alerts";
/// See [`BOOK`].
pub const SILENCES: &str = "silences";

/// The silences in force or ended within the last day (older ones are
/// dropped when the list is next written).
pub async fn silences(store: &crate::store::Store) -> Result<Vec<Silence>, crate::store::StoreError> {
    let raw = store.hub_state(SILENCES).await?;
    Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()).unwrap_or_default())
}

/// Changes the silences under the lease `silences` (several hubs may take
/// requests at once); `change` returns what to answer.
pub async fn change_silences<T>(
    fleet: &crate::service::fleet::Fleet,
    change: impl FnOnce(&mut Vec<Silence>, Timestamp) -> T,
) -> Result<T, crate::store::StoreError> {
    let store = fleet.store();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.take_lease("silences", fleet.hub_id(), Duration::from_secs(10)).await? {
        if std::time::Instant::now() > deadline {
            return Err(crate::store::StoreError::Unavailable("the silences are being changed by another hub".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = async {
        let mut list = silences(store).await?;
        let now = Timestamp::now();
        let out = change(&mut list, now);
        list.retain(|s| now.0.saturating_sub(s.ends_at.0) < 86_400_000);
        store.put_hub_state(SILENCES, serde_json::to_vec(&list).unwrap_or_default()).await?;
        Ok(out)
    }
    .await;
    let _ = store.release_lease("silences", fleet.hub_id()).await;
    result
}

/// Evaluates the rules every `evaluate_every` while this hub holds the
/// lease `alerts`, and sends what is due, until `shutdown`. A new config on
/// `configs` (SIGHUP) takes effect at once; while it has no rule, nothing
/// runs.
pub async fn run(
    fleet: std::sync::Arc<crate::service::fleet::Fleet>,
    mut configs: tokio::sync::watch::Receiver<AlertsConfig>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let config = configs.borrow_and_update().clone();
        if !config.rules.is_empty() {
            tracing::info!(rules = config.rules.len(), receivers = config.receivers.len(), "Alert rules in force.");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = configs.changed() => if changed.is_err() {
                shutdown.cancelled().await;
                break;
            },
            () = rounds(&fleet, &config, &shutdown), if !config.rules.is_empty() => break,
        }
    }
    let _ = fleet.store().release_lease(BOOK, fleet.hub_id()).await;
}

/// The rounds under one config, until `shutdown`.
async fn rounds(
    fleet: &crate::service::fleet::Fleet,
    config: &AlertsConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    use crate::metrics::METRICS;
    let timing = config.timing;
    let lease_ttl = (timing.evaluate_every * 4).max(Duration::from_secs(10));
    let mut tick = tokio::time::interval(timing.evaluate_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut book: Option<Book> = None;
    let http = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .unversioned_rustls_crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build();
    let http: ureq::Agent = http.into();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = fleet.store();
        match store.take_lease(BOOK, fleet.hub_id(), lease_ttl).await {
            Ok(true) => {}
            Ok(false) => {
                // Another hub evaluates; read the book afresh if this one
                // takes over.
                book = None;
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "Alerts not evaluated this time.");
                continue;
            }
        }
        let mut current = match book.take() {
            Some(b) => b,
            None => match store.hub_state(BOOK).await {
                Ok(raw) => raw.and_then(|r| serde_json::from_slice(&r).ok()).unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(error = %e, "Alerts not evaluated this time.");
                    continue;
                }
            },
        };
        let started = std::time::Instant::now();
        // Views only of the devices some rule may alert on (the rest
        // cannot: `may_alert`), from the fleet index.
        let now = Timestamp::now();
        let rules = &config.rules;
        let candidates = fleet.views_where(|l| may_alert(rules, l.row, &l.brief, now)).await;
        let (views, silenced) = match (candidates, silences(store).await) {
            (Ok(v), Ok(s)) => (v, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "Alerts not evaluated this time.");
                book = Some(current);
                continue;
            }
        };
        let before = current.clone();
        evaluate(&mut current, &config.rules, &views, now);
        log_changes(&before, &current);
        let is_silenced = |a: &Alert| silenced.iter().any(|s| s.silences(a, now));
        let dues = due(&mut current, &config.receivers, &timing, now, &is_silenced);
        if current != before
            && let Err(e) = store.put_hub_state(BOOK, serde_json::to_vec(&current).unwrap_or_default()).await
        {
            tracing::debug!(error = %e, "Alert states not written; evaluated again next time.");
            continue;
        }
        METRICS.evaluation_seconds.observe(started.elapsed().as_secs_f64());
        for d in dues {
            let receiver = &config.receivers[d.receiver];
            let body = webhook_body(receiver, &d, &config.external_url, now);
            let (agent, url) = (http.clone(), receiver.url.clone());
            let status = tokio::task::spawn_blocking(move || {
                agent.post(&url).send_json(&body).map(|r| r.status().as_u16()).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let outcome = delivery(status);
            let result = match &outcome {
                Delivery::Sent => "sent",
                Delivery::Retry(_) => "retrying",
                Delivery::Failed(_) => "failed",
            };
            METRICS
                .notifications
                .get_or_create(&crate::metrics::Notification { receiver: receiver.name.clone(), result })
                .inc();
            match &outcome {
                Delivery::Sent => {
                    tracing::info!(receiver = %receiver.name, rule = %d.rule, alerts = d.alerts.len(), "Alert notification sent.");
                }
                Delivery::Retry(e) | Delivery::Failed(e) => {
                    tracing::warn!(receiver = %receiver.name, rule = %d.rule, error = %e, result, "Alert notification not delivered.");
                    let entry = crate::store::AuditEntry {
                        id: 0,
                        at: now,
                        who: "alerts".into(),
                        action: format!("notify {}", receiver.name),
                        target: d.rule.clone(),
                        matched: Some(d.alerts.len() as u64),
                        from: String::new(),
                        status: e.strip_prefix("HTTP ").and_then(|c| c.parse().ok()).unwrap_or(0),
                        detail: format!("{result}: {e}"),
                    };
                    if let Err(e) = store.append_audit(&entry).await {
                        tracing::debug!(error = %e, "Audit entry not written.");
                    }
                }
            }
            delivered(&mut current, &d, &outcome, Timestamp::now());
            if let Err(e) = store.put_hub_state(BOOK, serde_json::to_vec(&current).unwrap_or_default()).await {
                tracing::debug!(error = %e, "Alert states not written.");
            }
        }
        for state in [State::Pending, State::Firing] {
            let n = current.alerts.values().filter(|a| a.state == state).count();
            METRICS.alerts.get_or_create(&crate::metrics::State { state: state_name(state) }).set(n as i64);
        }
        book = Some(current);
    }
}

/// The state's name as the API and metrics show it.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Pending => "pending",
        State::Firing => "firing",
        State::Resolved => "resolved",
    }
}

/// Alerts that change state in one round are logged one by one up to
/// this many; the rest are counted in one line (a hub that lost its
/// network sees every device go offline at once).
pub const LOGGED_CHANGES: usize = 20;

fn log_changes(before: &Book, after: &Book) {
    let mut more = BTreeMap::<(&str, &str), usize>::new();
    let mut logged = 0;
    for (fp, a) in &after.alerts {
        let was = before.alerts.get(fp).map(|b| b.state);
        if was == Some(a.state) || a.state == State::Pending {
            continue;
        }
        if logged < LOGGED_CHANGES {
            logged += 1;
            tracing::warn!(rule = %a.rule, device = %a.device, state = state_name(a.state), description = %a.description, "Alert.");
        } else {
            *more.entry((a.rule.as_str(), state_name(a.state))).or_default() += 1;
        }
    }
    for ((rule, state), n) in more {
        tracing::warn!(rule, state, alerts = n, "More alerts changed state in this round.");
    }
}

/// Most alerts one `alertmanager` or `slack` notification lists; the rest
/// are counted (`truncatedAlerts`), as Alertmanager's `max_alerts` does.
pub const MAX_ALERTS_PER_NOTIFICATION: usize = 1000;

/// The alerts as last evaluated (firing, pending and recently resolved),
/// firing first, then newest first, at most `limit`; each with whether a
/// silence holds it back now.
pub async fn list(store: &crate::store::Store, limit: usize) -> Result<Vec<(Alert, bool)>, crate::store::StoreError> {
    let query = AlertQuery { limit, ..AlertQuery::default() };
    Ok(list_page(store, &query).await?.map_or_else(|_| Vec::new(), |p| p.alerts))
}

/// Which alerts to list.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    /// Only those in this state.
    pub state: Option<State>,
    /// Only this device's.
    pub device: Option<String>,
    /// Those after this cursor (a page's `next`).
    pub after: Option<String>,
    /// Most in the page.
    pub limit: usize,
}

/// One page of alerts, each with whether a silence holds it.
#[derive(Debug, Clone)]
pub struct AlertPage {
    /// The page.
    pub alerts: Vec<(Alert, bool)>,
    /// Alerts matching the filters in all.
    pub total: usize,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// The alerts `query` asks for: `Err` names a bad cursor.
pub async fn list_page(
    store: &crate::store::Store,
    query: &AlertQuery,
) -> Result<Result<AlertPage, String>, crate::store::StoreError> {
    let book: Book = store.hub_state(BOOK).await?.and_then(|r| serde_json::from_slice(&r).ok()).unwrap_or_default();
    let silences = silences(store).await?;
    let now = Timestamp::now();
    Ok(page(book.alerts.into_values().collect(), query).map(|(alerts, total, next)| AlertPage {
        alerts: alerts
            .into_iter()
            .map(|a| {
                let silenced = silences.iter().any(|s| s.silences(&a, now));
                (a, silenced)
            })
            .collect(),
        total,
        next,
    }))
}

/// Where an alert stands in the list: firing, then pending, then resolved,
/// newest first within each, then by fingerprint.
fn order(a: &Alert) -> (u8, u64, String) {
    let rank = match a.state {
        State::Firing => 0,
        State::Pending => 1,
        State::Resolved => 2,
    };
    (rank, u64::MAX - a.since.0, a.fingerprint())
}

/// Orders `alerts` (see [`order`]), keeps those `query` filters for, and
/// pages them: the page, how many match in all, and the next page's cursor
/// (the last one's place, so pages neither skip nor repeat while alerts
/// come and go). Pure.
pub fn page(alerts: Vec<Alert>, query: &AlertQuery) -> Result<(Vec<Alert>, usize, Option<String>), String> {
    let after = match &query.after {
        Some(cursor) => {
            let bad = || format!("after: {cursor:?} is not a cursor of this list (use a page's next)");
            let mut parts = cursor.splitn(3, '-');
            let (Some(rank), Some(since), Some(fp)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad());
            };
            Some((rank.parse::<u8>().map_err(|_| bad())?, since.parse::<u64>().map_err(|_| bad())?, fp.to_owned()))
        }
        None => None,
    };
    let mut keyed: Vec<((u8, u64, String), Alert)> = alerts
        .into_iter()
        .filter(|a| query.state.is_none_or(|s| a.state == s))
        .filter(|a| query.device.as_ref().is_none_or(|d| a.device == *d))
        .map(|a| (order(&a), a))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let total = keyed.len();
    let start = after.map_or(0, |cursor| keyed.partition_point(|(k, _)| *k <= cursor));
    let limit = query.limit.max(1);
    let mut rest = keyed.into_iter().skip(start);
    let shown: Vec<((u8, u64, String), Alert)> = rest.by_ref().take(limit).collect();
    let next = match (shown.last(), rest.next()) {
        (Some(((rank, since, fp), _)), Some(_)) => Some(format!("{rank}-{since}-{fp}")),
        _ => None,
    };
    Ok((shown.into_iter().map(|(_, a)| a).collect(), total, next))
}

/// Longest silence.
pub const MAX_SILENCE: Duration = Duration::from_secs(90 * 86400);

/// Checks a silence's matchers and duration: the label names an alert has,
/// at least one matcher, 1 minute to 90 days. Pure.
pub fn check_silence(matchers: &BTreeMap<String, String>, duration: &str) -> Result<Duration, String> {
    const NAMES: [&str; 4] = ["alertname", "device", "device_name", "severity"];
    let mut problems = Vec::new();
    if matchers.is_empty() {
        problems.push("matchers: name at least one label (alertname, device, device_name or severity)".to_owned());
    }
    for (k, v) in matchers {
        if !NAMES.contains(&k.as_str()) {
            problems.push(format!("matchers: {k:?} is not a label of alerts ({})", NAMES.join(", ")));
        }
        if v.is_empty() || v.len() > 256 {
            problems.push(format!("matchers: the value of {k:?} must be 1 to 256 characters"));
        }
    }
    let duration = match outpost_shared::config::parse_duration(duration, MAX_SILENCE) {
        Ok(d) if d >= Duration::from_secs(60) => Some(d),
        Ok(_) => {
            problems.push("duration: at least 1m".into());
            None
        }
        Err(e) => {
            problems.push(format!("duration: {e}"));
            None
        }
    };
    match (problems.is_empty(), duration) {
        (true, Some(d)) => Ok(d),
        _ => Err(problems.join("; ")),
    }
}

/// Makes a silence for `by`.
pub async fn add_silence(
    fleet: &crate::service::fleet::Fleet,
    by: &str,
    matchers: BTreeMap<String, String>,
    duration: Duration,
    comment: String,
) -> Result<Silence, crate::store::StoreError> {
    let mut random = [0u8; 6];
    rand::fill(&mut random[..]);
    let id = format!("sil-{}", outpost_shared::identity::hex(&random));
    change_silences(fleet, |list, now| {
        let silence = Silence {
            id,
            matchers,
            ends_at: now.saturating_add(duration),
            comment,
            created_by: by.to_owned(),
            created_at: now,
        };
        list.push(silence.clone());
        silence
    })
    .await
}

/// Ends the silence `id` now; `None` if there is no such silence.
pub async fn end_silence(
    fleet: &crate::service::fleet::Fleet,
    id: &str,
) -> Result<Option<Silence>, crate::store::StoreError> {
    change_silences(fleet, |list, now| {
        let silence = list.iter_mut().find(|s| s.id == id)?;
        silence.ends_at = silence.ends_at.min(now);
        Some(silence.clone())
    })
    .await
}
