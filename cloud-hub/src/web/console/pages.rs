//! The console's pages and forms. Each page reads through the fleet views
//! and the store like the API; each action goes through [`crate::service`]
//! after a confirmation page, and the audit middleware records it.

use super::{ConsoleError, Nav, User, html, series};
use crate::api::SnapshotView;
use crate::api::{CommandRequest, DesiredView, DeviceView, EventKindView, EventView, PeerView};
use crate::human::{ago, ahead_text, duration, utc, utc_text};
use crate::service;
use crate::service::fleet::Fleet;
use crate::store::{AuditQuery, Labels, Role, TelemetryRange};
use crate::web::http::{AuditNote, DevicesQuery, note, url_with};
use actix_web::http::{StatusCode, header};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use askama::Template;
use outpost_shared::DeviceId;
use outpost_shared::protocol::CommandKind;
use outpost_shared::time::Timestamp;
use serde::Deserialize;
use std::time::Duration;

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((header::LOCATION, to.to_owned())).finish()
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    nav: Option<Nav>,
    notice: Option<String>,
    status: String,
    message: &'a str,
}

/// A page that says what went wrong.
pub fn error_page(status: StatusCode, message: &str) -> HttpResponse {
    let page = ErrorPage { nav: None, notice: None, status: status.to_string(), message };
    let body = page.render().unwrap_or_else(|_| message.to_owned());
    HttpResponse::build(status).content_type("text/html; charset=utf-8").body(body)
}

/// Data less old than this is "up to date" (a few telemetry intervals).
pub const UP_TO_DATE_SECS: u64 = 120;

/// One device as a table row and the device page's header show it.
pub struct Row {
    id: String,
    name: String,
    state: &'static str,
    labels: Labels,
    version: String,
    last_seen: String,
    seen_ago: String,
    cpu: String,
    mem: String,
    behind: String,
    alarmed: bool,
    failed_runs: usize,
    overdue: bool,
    address: String,
    transport: String,
    /// Why the device cannot connect, or its re-admission (empty: neither).
    certificate: String,
    /// Until when its certificate is valid ("-" unknown).
    cert_until: String,
    /// While offline: since when (ago, and the time for the title) and why.
    offline: Option<(String, String, String)>,
    /// The last figures known, for the title of a figure not shown because
    /// the device is offline.
    stale: String,
    /// Why it refused its desired state.
    desired_error: Option<String>,
    /// Its worst failing job and how many runs in a row.
    failing: Option<(String, u32)>,
}

/// The "behind" cell: how far the hub's copy lags while the device is
/// online; unknown while it is offline (it may hold more than the hub
/// has). Pure.
pub fn behind_text(online: bool, behind_secs: Option<u64>) -> String {
    match behind_secs {
        _ if !online => "-".into(),
        None => "-".into(),
        Some(s) if s < UP_TO_DATE_SECS => "up to date".into(),
        Some(s) => duration(s),
    }
}

impl Row {
    fn new(v: &DeviceView, now: Timestamp) -> Row {
        let state = v.state();
        Row {
            id: v.id.clone(),
            name: v.name.clone(),
            state,
            labels: v.labels.clone(),
            version: v.agent_version.clone().unwrap_or_else(|| "-".into()),
            last_seen: v.last_seen.as_deref().map(utc_text).unwrap_or_default(),
            // Coarse under a minute, so a live row changes when its data
            // does, not every time it is looked at.
            seen_ago: match v.last_seen_ms.map(Timestamp) {
                Some(t) if t.until(now) < Duration::from_secs(60) => "just now".into(),
                other => ago(other, now),
            },
            // An offline device's last figures are not its figures now.
            cpu: match v.cpu_percent {
                Some(c) if v.online => format!("{c:.0}"),
                _ => "-".into(),
            },
            mem: match v.mem_percent {
                Some(m) if v.online => format!("{m:.0}"),
                _ => "-".into(),
            },
            stale: match (v.online, v.cpu_percent, v.mem_percent) {
                (false, Some(c), Some(m)) => format!("offline; last known CPU {c:.0} %, memory {m:.0} %"),
                _ => String::new(),
            },
            behind: behind_text(v.online, v.behind_secs),
            offline: v
                .offline
                .as_ref()
                .map(|o| (ago(Some(Timestamp(o.since_ms)), now), utc(Timestamp(o.since_ms)), o.reason.clone())),
            desired_error: v.desired_error.clone(),
            failing: v.failing_jobs.iter().max_by_key(|f| f.runs).map(|f| (f.job.clone(), f.runs)),
            alarmed: v.alarmed,
            failed_runs: v.failed_runs_24h,
            overdue: !v.overdue_backups.is_empty(),
            address: v.address.clone().unwrap_or_else(|| "-".into()),
            transport: v.transport.clone().unwrap_or_default(),
            cert_until: v.certificate_expires.as_deref().map_or_else(|| "-".into(), utc_text),
            certificate: match (&v.certificate_expired, &v.readmitted_until) {
                _ if v.revoked.is_some() => format!(
                    "Revoked at {}: refused on every path. It comes back only by enrolling anew.",
                    utc_text(v.revoked.as_deref().unwrap_or_default())
                ),
                (_, Some(until)) => format!(
                    "Re-admitted until {}: it may connect with its expired certificate to renew it.",
                    utc_text(until)
                ),
                (Some(at), None) => format!(
                    "Its certificate expired: the hub refused it at {}. An admin lets it renew with `outpostctl readmit {}`.",
                    utc_text(at),
                    v.id
                ),
                (None, None) => String::new(),
            },
        }
    }
}

#[derive(Template)]
#[template(path = "console/row.html")]
struct RowHtml<'a> {
    d: &'a Row,
}

/// The inner HTML of a device's table row (the page and the live updates
/// render it with one template).
pub fn row_html(v: &DeviceView, now: Timestamp) -> String {
    RowHtml { d: &Row::new(v, now) }.render().unwrap_or_default()
}

struct Line {
    at: String,
    ago: String,
    id: String,
    name: String,
    text: String,
}

struct AuditLine {
    at: String,
    ago: String,
    /// The name of the device it targets, if it targets one.
    target_name: String,
    who: String,
    action: String,
    target: String,
    matched: String,
    from: String,
    outcome: &'static str,
    status: u16,
    detail: String,
}

impl AuditLine {
    /// The line of `e`; `names` names the devices it may target.
    fn new(e: crate::store::AuditEntry, names: &std::collections::HashMap<String, String>, now: Timestamp) -> Self {
        // A preview answers 200 but changes nothing: it says so.
        let preview = e.detail.starts_with("preview: ");
        AuditLine {
            at: utc(e.at),
            ago: ago(Some(e.at), now),
            outcome: if preview && e.outcome() == "ok" { "preview" } else { e.outcome() },
            target_name: names.get(&e.target).cloned().unwrap_or_default(),
            who: e.who,
            action: e.action,
            target: e.target,
            matched: e.matched.map(|m| m.to_string()).unwrap_or_default(),
            from: e.from,
            status: e.status,
            detail: e.detail,
        }
    }
}

/// The lines of `entries`, the devices they target named (one read).
async fn audit_lines(
    fleet: &Fleet,
    entries: Vec<crate::store::AuditEntry>,
    now: Timestamp,
) -> Result<Vec<AuditLine>, ConsoleError> {
    let mut ids: Vec<DeviceId> = entries.iter().filter_map(|e| e.target.parse().ok()).collect();
    ids.sort();
    ids.dedup();
    let names = fleet.views(Some(&ids)).await?.into_iter().map(|v| (v.id, v.name)).collect();
    Ok(entries.into_iter().map(|e| AuditLine::new(e, &names, now)).collect())
}

/// An alert as the console lists it.
struct AlertLine {
    rule: String,
    device: String,
    name: String,
    severity: String,
    state: &'static str,
    since: String,
    ago: String,
    why: String,
    held: &'static str,
}

impl AlertLine {
    fn new(a: &crate::service::alerts::Alert, silenced: bool, now: Timestamp) -> Self {
        let since = a.fired_at.unwrap_or(a.since);
        AlertLine {
            rule: a.rule.clone(),
            device: a.device.clone(),
            name: a.name.clone(),
            severity: a.severity.clone(),
            state: crate::service::alerts::state_name(a.state),
            since: utc(since),
            ago: ago(Some(since), now),
            why: a.description.clone(),
            held: match (silenced, a.inhibited) {
                (true, _) => "silenced",
                (_, true) => "held back: the device is offline",
                _ => "",
            },
        }
    }
}

/// The firing and pending alerts, firing first, at most `limit`; only
/// `device`'s when given.
async fn alert_lines(
    fleet: &Fleet,
    device: Option<&str>,
    limit: usize,
    now: Timestamp,
) -> Result<Vec<AlertLine>, ConsoleError> {
    let all = crate::service::alerts::list(fleet.store(), 1000).await?;
    Ok(all
        .iter()
        .filter(|(a, _)| a.state != crate::service::alerts::State::Resolved)
        .filter(|(a, _)| device.is_none_or(|d| a.device == d))
        .take(limit)
        .map(|(a, silenced)| AlertLine::new(a, *silenced, now))
        .collect())
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    nav: Option<Nav>,
    notice: Option<String>,
    o: crate::service::listing::Overview,
    alerts: Vec<AlertLine>,
    alarms: Vec<Line>,
    changes: Vec<AuditLine>,
}

#[derive(Deserialize)]
struct OverviewQuery {
    #[serde(default)]
    done: Option<String>,
}

async fn overview_page(
    user: User,
    fleet: web::Data<Fleet>,
    query: web::Query<OverviewQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let alarmed = fleet.views_where(|l| l.brief.alarmed).await?;
    let now = Timestamp::now();
    let mut alarms: Vec<(Timestamp, Line)> = alarmed
        .iter()
        .flat_map(|v| {
            v.alarms.iter().take(3).map(|a| {
                let at = humantime::parse_rfc3339_weak(&a.at).map(Timestamp::from_system).unwrap_or(now);
                let state = if a.raised { "raised" } else { "cleared" };
                (
                    at,
                    Line {
                        at: utc_text(&a.at),
                        ago: ago(Some(at), now),
                        id: v.id.clone(),
                        name: v.name.clone(),
                        text: format!("{} {state}: {}", a.alarm, a.message),
                    },
                )
            })
        })
        .collect();
    alarms.sort_by_key(|a| std::cmp::Reverse(a.0));
    alarms.truncate(10);
    let changes = if user.operator() {
        let q = AuditQuery { limit: 10, ..AuditQuery::default() };
        audit_lines(&fleet, service::reads::audit(&fleet, &q).await?, now).await?
    } else {
        Vec::new()
    };
    let notice = match query.done.as_deref() {
        Some("silence") => Some("Silence set: the alert is not told until it ends.".to_owned()),
        _ => None,
    };
    html(&OverviewPage {
        nav: Some((&user).into()),
        notice,
        alerts: alert_lines(&fleet, None, 20, now).await?,
        o: fleet.overview(10).await?,
        alarms: alarms.into_iter().map(|(_, l)| l).collect(),
        changes,
    })
}

#[derive(Deserialize)]
struct SilenceForm {
    csrf: String,
    alertname: String,
    device: String,
    duration: String,
    #[serde(default)]
    comment: String,
}

/// `POST /console/alerts/silence`: silences one alert (its rule on its
/// device) for the duration chosen; operators.
async fn silence(
    user: User,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    form: web::Form<SilenceForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    note(
        &req,
        AuditNote {
            target: Some(format!("silence alertname={},device={}", form.alertname, form.device)),
            matched: None,
            detail: "console: silence".into(),
        },
    );
    user.may_act(Role::Operator, &form.csrf)?;
    let matchers = std::collections::BTreeMap::from([
        ("alertname".to_owned(), form.alertname),
        ("device".to_owned(), form.device),
    ]);
    let duration = crate::service::alerts::check_silence(&matchers, &form.duration).map_err(ConsoleError::Invalid)?;
    let comment = if form.comment.trim().is_empty() { "from the console".to_owned() } else { form.comment };
    crate::service::alerts::add_silence(&fleet, user.name(), matchers, duration, comment).await?;
    Ok(see_other("/console/?done=silence"))
}

/// The device list's filters as the form shows them.
#[derive(Debug, Default, Deserialize)]
struct ListForm {
    #[serde(default)]
    q: String,
    #[serde(default)]
    selector: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    after: String,
    /// A bulk change of desired state before the redirect, with how many
    /// devices it changed.
    #[serde(default)]
    done: String,
    #[serde(default)]
    n: Option<u64>,
}

#[derive(Template)]
#[template(path = "console/devices.html")]
struct DevicesPage {
    nav: Option<Nav>,
    notice: Option<String>,
    q: ListForm,
    statuses: [(&'static str, &'static str); 9],
    sorts: [(&'static str, &'static str); 4],
    operator: bool,
    error: Option<String>,
    rows: Vec<Row>,
    total: usize,
    next: Option<String>,
    prev: Option<String>,
    /// "51–100 of 1,234" (empty: nothing to page).
    position: String,
    /// Why a selector matches nothing, if it names a label no device has.
    hint: Option<String>,
}

/// Where a page of `shown` rows starting after `start` of `total` is:
/// "51–100 of 1234" (empty when there is nothing). Pure.
pub fn position(start: usize, shown: usize, total: usize) -> String {
    if shown == 0 { String::new() } else { format!("{}–{} of {total}", start + 1, start + shown) }
}

/// Rows of one console page of devices.
pub const CONSOLE_PAGE: usize = 50;

async fn devices_page(
    user: User,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    form: web::Query<ListForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    let query = DevicesQuery {
        selector: Some(form.selector.clone()),
        status: Some(form.status.clone()),
        version: Some(form.version.clone()),
        q: Some(form.q.clone()),
        sort: Some(form.sort.clone()),
        limit: Some(CONSOLE_PAGE),
        after: Some(form.after.clone()),
    };
    let now = Timestamp::now();
    let mut page = crate::service::listing::Page::default();
    let mut hint = None;
    let error = match query.parse() {
        Ok(parsed) => {
            // A selector naming a label no device has is most likely a typo.
            if let Some(selector) = &parsed.selector {
                let keys = fleet.unknown_keys(selector).await?;
                if !keys.is_empty() {
                    hint = Some(format!("No device has the label {}: check the selector for a typo.", keys.join(", ")));
                }
            }
            match fleet.list(&parsed).await? {
                Ok(p) => {
                    page = p;
                    None
                }
                Err(e) => Some(e),
            }
        }
        Err(e) => Some(e),
    };
    let link = |after: &str| url_with(req.path(), req.query_string(), "after", after);
    let notice = (form.done == "desired_bulk")
        .then(|| format!("Desired state changed on {} devices.", form.n.unwrap_or_default()));
    html(&DevicesPage {
        nav: Some((&user).into()),
        notice,
        position: position(page.start, page.rows.len(), page.total),
        next: page.next.as_deref().map(link),
        prev: page.prev.as_deref().map(link),
        hint,
        q: form,
        statuses: [
            ("", "any state"),
            ("online", "online"),
            ("offline", "offline"),
            ("never", "never connected"),
            ("alarmed", "with alarms"),
            ("expired", "certificate expired"),
            ("revoked", "revoked"),
            ("failing", "with a failing job"),
            ("refused", "refused desired state"),
        ],
        sorts: [
            ("name", "by name"),
            ("last_seen", "last seen"),
            ("version", "by version"),
            ("behind", "furthest behind"),
        ],
        operator: user.operator(),
        error,
        rows: page.rows.iter().map(|v| Row::new(v, now)).collect(),
        total: page.total,
    })
}

#[derive(Deserialize)]
struct StreamQuery {
    ids: String,
}

/// Most rows one live stream follows.
pub const MAX_STREAM_ROWS: usize = 200;
/// How often a stream looks for changed rows.
pub const STREAM_EVERY: Duration = Duration::from_secs(2);
/// A comment line at least this often keeps proxies from closing an idle
/// stream and finds closed browsers.
pub const STREAM_KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /console/devices/stream?ids=a,b,c`: server-sent events, one `row`
/// event (`{"id": ..., "html": ...}`) each time a visible row changes. Only
/// the rows named are read, one store read every [`STREAM_EVERY`].
async fn stream(
    _user: User,
    fleet: web::Data<Fleet>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let ids: Vec<DeviceId> = query.ids.split(',').filter_map(|s| s.trim().parse().ok()).take(MAX_STREAM_ROWS).collect();
    let fleet = fleet.into_inner();
    // Counted in `outpost_hub_console_live_streams` until the stream is dropped.
    let live = crate::metrics::LiveStream::new();
    let state = (fleet, ids, std::collections::HashMap::<String, u64>::new(), tokio::time::Instant::now(), true);
    let events = futures_util::stream::unfold(state, |(fleet, ids, mut sent, mut last_write, first)| async move {
        loop {
            if !first {
                tokio::time::sleep(STREAM_EVERY).await;
            }
            let now = Timestamp::now();
            let mut out = String::new();
            if first {
                out.push_str("retry: 3000\n\n");
            }
            match fleet.views(Some(&ids)).await {
                Ok(views) => {
                    for v in &views {
                        let html = row_html(v, now);
                        let hash = u64::from_le_bytes(
                            blake3::hash(html.as_bytes()).as_bytes()[..8].try_into().unwrap_or_default(),
                        );
                        if sent.insert(v.id.clone(), hash) != Some(hash) && !first {
                            let data = serde_json::json!({"id": v.id, "html": html});
                            out.push_str(&format!("event: row\ndata: {data}\n\n"));
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "Live rows not read this time."),
            }
            if out.is_empty() && last_write.elapsed() >= STREAM_KEEPALIVE {
                out.push_str(": keep-alive\n\n");
            }
            if !out.is_empty() {
                last_write = tokio::time::Instant::now();
                let chunk = Ok::<_, actix_web::Error>(web::Bytes::from(out));
                return Some((chunk, (fleet, ids, sent, last_write, false)));
            }
            if first {
                return Some((Ok(web::Bytes::from_static(b": open\n\n")), (fleet, ids, sent, last_write, false)));
            }
        }
    });
    let events = futures_util::StreamExt::map(events, move |chunk| {
        let _counted = &live;
        chunk
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(events))
}

#[derive(Deserialize)]
struct WindowQuery {
    #[serde(default)]
    window: Option<String>,
    /// What the action before the redirect did (`command`, `desired`,
    /// `labels`), with its number: the page words the notice itself, so a
    /// link cannot put text of its own on the page.
    #[serde(default)]
    done: Option<String>,
    #[serde(default)]
    n: Option<u64>,
}

impl WindowQuery {
    fn notice(&self) -> Option<String> {
        match (self.done.as_deref(), self.n) {
            (Some("command"), Some(id)) => Some(format!("Command {id} queued; it is listed under Commands below.")),
            (Some("desired"), Some(version)) => Some(format!("Desired state version {version} set.")),
            (Some("labels"), _) => Some("Labels set.".into()),
            (Some("revoke"), _) => Some("Device revoked.".into()),
            (Some("readmit"), _) => Some("Device re-admitted; it renews at its next connection.".into()),
            _ => None,
        }
    }
}

/// Chart windows the device page offers.
const WINDOWS: [&str; 5] = ["1h", "6h", "24h", "7d", "30d"];

fn window_of(q: &WindowQuery) -> (String, Duration) {
    let w = q.window.as_deref().filter(|w| WINDOWS.contains(w)).unwrap_or("1h");
    (w.to_owned(), humantime::parse_duration(w).unwrap_or(Duration::from_secs(3600)))
}

/// Most samples a chart answer reads (then averaged into buckets).
pub const MAX_CHART_SAMPLES: usize = 200_000;

/// `GET /console/devices/{id}/series?window=6h`: the charts' data.
async fn device_series(
    _user: User,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<WindowQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let id = service::device(&fleet, &path).await?;
    let (_, span) = window_of(&query);
    let until = Timestamp::now();
    let since = Timestamp(until.0.saturating_sub(span.as_millis() as u64));
    let mut samples = Vec::new();
    let mut range = TelemetryRange::between(since, until, 10_000);
    loop {
        let page = service::reads::telemetry(&fleet, &id, &range).await?;
        let full = page.len() == range.limit;
        range.after = page.last().map(|(seq, s)| (s.at, *seq));
        samples.extend(page.into_iter().map(|(_, s)| s));
        if !full || samples.len() >= MAX_CHART_SAMPLES {
            break;
        }
    }
    let late = service::reads::late(&fleet, &id).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(series::build(&samples, since, until, &late)))
}

struct JobRow {
    name: String,
    kind: String,
    source: String,
    schedule: String,
    enabled: bool,
    next_run: String,
    runs: Vec<RunRow>,
}

struct RunRow {
    run_id: u64,
    attempt: u32,
    trigger: String,
    started: String,
    ago: String,
    outcome: String,
    ok: bool,
    output: String,
}

struct EventRow {
    seq: u64,
    at: String,
    ago: String,
    kind: &'static str,
    text: String,
}

impl EventRow {
    /// The row of `e`; `commands` says what each command of the device was
    /// (`kind args`).
    fn new(e: EventView, commands: &std::collections::HashMap<u64, String>, now: Timestamp) -> Self {
        let at = humantime::parse_rfc3339_weak(&e.at).map(Timestamp::from_system).ok();
        let (kind, text) = match e.event {
            EventKindView::CommandResult { command, outcome, exit_code, output } => (
                "command",
                format!(
                    "command {command} ({}): {}{}\n{output}",
                    commands.get(&command).map_or("?", String::as_str),
                    serde_json::to_value(outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                    exit_code.map(|c| format!(" (exit {c})")).unwrap_or_default()
                ),
            ),
            EventKindView::StateReport { applied_version, error } => (
                "desired state",
                match error {
                    Some(e) => format!("refused the latest version, runs {applied_version}: {e}"),
                    None => format!("runs version {applied_version}"),
                },
            ),
            EventKindView::Alarm { alarm, raised, message } => {
                ("alarm", format!("{alarm} {}: {message}", if raised { "raised" } else { "cleared" }))
            }
            EventKindView::Other { record } => ("other", record),
        };
        EventRow { seq: e.seq, at: utc_text(&e.at), ago: ago(at, now), kind, text }
    }
}

#[derive(Template)]
#[template(path = "console/device.html")]
struct DevicePage {
    nav: Option<Nav>,
    notice: Option<String>,
    d: Row,
    windows: [&'static str; 5],
    window: String,
    operator: bool,
    admin: bool,
    csrf: String,
    jobs: Vec<JobRow>,
    snapshots: Vec<SnapshotView>,
    backup_sets: Vec<String>,
    peers: Vec<PeerView>,
    alerts: Vec<AlertLine>,
    alarms: Vec<Line>,
    desired_version: u64,
    reported_version: u64,
    in_sync: bool,
    reported_error: Option<String>,
    desired_text: String,
    /// Why the action just tried was refused, shown at the top.
    form_error: Option<String>,
    labels_text: String,
    /// The command form as it was sent, when it was refused.
    command_kind: String,
    command_args: String,
    kinds: Vec<&'static str>,
    events: Vec<EventRow>,
    commands: Vec<super::commands::CommandLine>,
}

/// Runs shown per job on the device page: the newest, and besides them
/// the runs made on purpose (a `run_job` command, `outpost-agent run-job`)
/// of the last day, so a run someone asked for stays in sight however
/// often the job runs on its schedule.
const RUNS_SHOWN: usize = 5;
/// Runs read per job to find those.
const RUNS_READ: usize = 200;
/// Commands shown on the device page, newest first.
const COMMANDS_SHOWN: usize = 20;

/// The runs the device page shows of `runs` (newest first) at `now`: the
/// newest [`RUNS_SHOWN`], then those asked for in the last day, at most
/// as many again. Pure.
pub fn runs_shown(runs: Vec<outpost_shared::job::JobRun>, now: Timestamp) -> Vec<outpost_shared::job::JobRun> {
    use outpost_shared::job::Trigger;
    let day_ago = Timestamp(now.0.saturating_sub(86_400_000));
    let asked = |r: &outpost_shared::job::JobRun| matches!(r.trigger, Trigger::Manual | Trigger::Command { .. });
    let mut shown = 0;
    let mut extra = 0;
    runs.into_iter()
        .filter(|r| {
            shown += 1;
            if shown <= RUNS_SHOWN {
                return true;
            }
            let keep = extra < RUNS_SHOWN && asked(r) && r.ended >= day_ago;
            extra += usize::from(keep);
            keep
        })
        .collect()
}

async fn device_page(
    user: User,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<WindowQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let id = service::device(&fleet, &path).await?;
    let page = device_view(&user, &fleet, &id, &query, None).await?;
    html(&page)
}

/// What an action form held when it was refused: shown again, with why,
/// at the top of the page.
#[derive(Debug, Default)]
struct Draft {
    error: String,
    labels: Option<String>,
    doc: Option<String>,
    kind: String,
    args: String,
}

async fn device_view(
    user: &User,
    fleet: &Fleet,
    id: &DeviceId,
    query: &WindowQuery,
    draft: Option<Draft>,
) -> Result<DevicePage, ConsoleError> {
    let draft = draft.unwrap_or_default();
    let now = Timestamp::now();
    let view = fleet.device(id).await?.ok_or_else(|| ConsoleError::NotFound(format!("device {id} not found")))?;
    let mut jobs = Vec::new();
    for (spec, source, runs) in service::reads::jobs(fleet, id, RUNS_READ).await?.jobs {
        let runs = runs_shown(runs, now);
        let summary = crate::api::JobView::new(&spec, source, runs.first().cloned(), now);
        jobs.push(JobRow {
            name: summary.name,
            kind: summary.kind,
            source: summary.source,
            schedule: summary.schedule,
            enabled: summary.enabled,
            next_run: summary.next_run.map_or_else(|| "-".into(), |t| ahead_text(&t, now)),
            runs: runs
                .into_iter()
                .map(|r| {
                    let r = crate::api::JobRunView::from(r);
                    let started = humantime::parse_rfc3339_weak(&r.started).map(Timestamp::from_system).ok();
                    RunRow {
                        run_id: r.run_id,
                        attempt: r.attempt,
                        trigger: r.trigger,
                        ago: ago(started, now),
                        started: utc_text(&r.started),
                        outcome: r.outcome,
                        ok: r.succeeded,
                        output: r.output,
                    }
                })
                .collect(),
        });
    }
    let backup_sets = jobs
        .iter()
        .filter_map(|j| j.name.strip_prefix(crate::store::digest::BACKUP_JOB_PREFIX).map(str::to_owned))
        .collect();
    let snapshots = service::reads::catalog(fleet, id)
        .await?
        .iter()
        .rev()
        .take(20)
        .map(|entry| {
            let view = SnapshotView::from(entry);
            SnapshotView { ended: utc_text(&view.ended), ..view }
        })
        .collect();
    let peers = service::reads::peers(fleet, id).await?.map(|r| r.peers).unwrap_or_default();
    let peers = peers.into_iter().map(PeerView::from).collect();
    let (desired, reported) = service::reads::desired(fleet, id).await?;
    let desired = DesiredView::new(desired, reported);
    let desired_text = draft.doc.unwrap_or_else(|| serde_json::to_string_pretty(&desired.doc).unwrap_or_default());
    // The newest commands, and those the newest events name: a device's
    // page reads a bounded number of commands, whatever its history.
    let commands = service::device_commands(fleet, id, COMMANDS_SHOWN).await?;
    let events = service::reads::events(fleet, id, 50).await?;
    let mut what: std::collections::HashMap<u64, String> =
        commands.iter().map(|c| (c.id, service::describe::typed(&c.kind, &c.args))).collect();
    for event in &events {
        if let outpost_shared::protocol::RecordBody::CommandResult(result) = &event.body
            && !what.contains_key(&result.id)
            && let Some(c) = service::reads::command(fleet, result.id).await?.filter(|c| &c.device == id)
        {
            what.insert(c.id, service::describe::typed(&c.kind, &c.args));
        }
    }
    let events = events.into_iter().map(|e| EventRow::new(EventView::from(e), &what, now)).collect();
    let commands = super::commands::lines(fleet, commands).await?;
    let alarms = view
        .alarms
        .iter()
        .map(|a| {
            let at = humantime::parse_rfc3339_weak(&a.at).map(Timestamp::from_system).ok();
            Line {
                at: utc_text(&a.at),
                ago: ago(at, now),
                id: view.id.clone(),
                name: view.name.clone(),
                text: format!("{} {}: {}", a.alarm, if a.raised { "raised" } else { "cleared" }, a.message),
            }
        })
        .collect();
    let (window, _) = window_of(query);
    Ok(DevicePage {
        alerts: alert_lines(fleet, Some(view.id.as_str()), 50, now).await?,
        nav: Some(user.into()),
        notice: query.notice(),
        labels_text: draft.labels.unwrap_or_else(|| view.labels.iter().map(|(k, v)| format!("{k}={v}\n")).collect()),
        d: Row::new(&view, now),
        windows: WINDOWS,
        window,
        operator: user.operator(),
        admin: user.admin(),
        csrf: user.csrf.clone(),
        jobs,
        snapshots,
        backup_sets,
        peers,
        alarms,
        desired_version: desired.version,
        reported_version: desired.reported_version,
        in_sync: desired.in_sync,
        reported_error: desired.reported_error,
        desired_text,
        form_error: Some(draft.error).filter(|e| !e.is_empty()),
        command_kind: draft.kind,
        command_args: draft.args,
        kinds: CommandKind::ALL.iter().map(|k| k.as_str()).collect(),
        events,
        commands,
    })
}

/// A device action form.
#[derive(Debug, Default, Deserialize)]
struct ActForm {
    csrf: String,
    action: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    set: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    args: String,
    #[serde(default)]
    doc: String,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    labels: String,
    #[serde(default)]
    selector: String,
    #[serde(default)]
    patch: String,
    /// `readmit`: how long the expired device may come back (`7d`).
    #[serde(default)]
    within: String,
}

impl ActForm {
    /// The fields a confirmation page posts back.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![("csrf", self.csrf.clone()), ("action", self.action.clone())];
        for (name, value) in [
            ("job", &self.job),
            ("set", &self.set),
            ("kind", &self.kind),
            ("args", &self.args),
            ("doc", &self.doc),
            ("labels", &self.labels),
            ("selector", &self.selector),
            ("patch", &self.patch),
            ("within", &self.within),
        ] {
            if !value.is_empty() {
                f.push((name, value.clone()));
            }
        }
        if self.action == "desired" {
            f.push(("version", self.version.to_string()));
        }
        f
    }

    /// The command the form asks for, if it asks for one.
    fn command(&self) -> Option<CommandRequest> {
        let lines = |text: &str| text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
        match self.action.as_str() {
            "run_job" => {
                Some(CommandRequest { kind: "run_job".into(), args: vec![self.job.clone()], expires_in: None })
            }
            "backup" => Some(CommandRequest {
                kind: "backup".into(),
                args: vec!["run".into(), self.set.clone()],
                expires_in: None,
            }),
            "command" => Some(CommandRequest { kind: self.kind.clone(), args: lines(&self.args), expires_in: None }),
            _ => None,
        }
    }
}

/// Parses `key=value` lines into labels.
fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=').ok_or_else(|| format!("{line:?}: write labels as key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    crate::service::listing::check_labels(&labels)?;
    Ok(labels)
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
struct ConfirmPage {
    nav: Option<Nav>,
    notice: Option<String>,
    summary: String,
    detail: String,
    targets: Vec<String>,
    matched: usize,
    action: String,
    fields: Vec<(&'static str, String)>,
    button: String,
    cancel: String,
}

/// `POST /console/devices/{id}/act`: the first post shows what will happen,
/// the second (with `confirm=yes`) does it.
async fn act(
    user: User,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<ActForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    // Revoking and re-admitting decide who belongs to the fleet: admins.
    let needs = if matches!(form.action.as_str(), "revoke" | "readmit") { Role::Admin } else { Role::Operator };
    user.may_act(needs, &form.csrf)?;
    let id = service::device(&fleet, &path).await?;
    let back = format!("/console/devices/{}", crate::api::encode_component(id.as_str()));
    let name = service::reads::name(&fleet, &id).await?;
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail: format!("console: {}", form.action) });
    let (summary, detail) = match form.action.as_str() {
        "run_job" => (format!("Run job {} on {name} now?", form.job), String::new()),
        "backup" => (format!("Back up set {} on {name} now?", form.set), String::new()),
        "command" => (format!("Send a {} command to {name}?", form.kind), form.args.clone()),
        "desired" => {
            (format!("Replace the desired state of {name} (version {}) with:", form.version), form.doc.clone())
        }
        "labels" => (format!("Set the labels of {name} to:"), form.labels.clone()),
        "revoke" => (
            format!("Revoke {name} for good?"),
            "Its connections close at once and the hub refuses it on every path (QUIC, MQTT, relay). Its records \
             and backups stay. It comes back only by enrolling anew."
                .to_owned(),
        ),
        "readmit" => {
            let within = service::readmit_window(Some(&form.within)).map_err(ConsoleError::Invalid)?;
            (
                format!("Re-admit {name} with its expired certificate for {}?", humantime::format_duration(within)),
                "It may connect once more within that time and renews its certificate over the session.".to_owned(),
            )
        }
        other => return Err(ConsoleError::Invalid(format!("unknown action {other:?}"))),
    };
    // A refused form comes back as it was sent, with why at the top.
    let refused = match form.action.as_str() {
        "labels" => parse_labels(&form.labels).err(),
        "desired" => serde_json::from_str::<serde_json::Value>(&form.doc)
            .map_err(|e| format!("not valid JSON: {e}"))
            .and_then(|doc| service::check_desired(&doc))
            .err()
            .map(|e| format!("desired state: {e}")),
        _ => form.command().and_then(|c| service::check_command(&c).err()),
    };
    if let Some(error) = refused {
        let draft = Draft {
            error,
            labels: (form.action == "labels").then(|| form.labels.clone()),
            doc: (form.action == "desired").then(|| form.doc.clone()),
            kind: if form.action == "command" { form.kind.clone() } else { String::new() },
            args: if form.action == "command" { form.args.clone() } else { String::new() },
        };
        let q = WindowQuery { window: None, done: None, n: None };
        let page = device_view(&user, &fleet, &id, &q, Some(draft)).await?;
        let body = page.render().map_err(|e| ConsoleError::Internal(e.to_string()))?;
        return Ok(HttpResponse::UnprocessableEntity().content_type("text/html; charset=utf-8").body(body));
    }
    if form.confirm != "yes" {
        // A preview changes nothing; the audit log says what it would do.
        let would = match form.action.as_str() {
            "labels" => {
                let before = fleet.device(&id).await?.map(|v| v.labels).unwrap_or_default();
                service::describe::labels(&before, &parse_labels(&form.labels).map_err(ConsoleError::Invalid)?)
            }
            "desired" => {
                let current = service::desired_record(&fleet, &id).await?;
                let old = current.and_then(|c| serde_json::from_str(&c.doc).ok()).unwrap_or_default();
                let new = serde_json::from_str(&form.doc).unwrap_or_default();
                service::describe::desired(form.version, &old, form.version + 1, &new)
            }
            _ => match form.command() {
                Some(c) => service::describe::command(&c.kind, &c.args, None),
                None => form.action.clone(),
            },
        };
        note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail: format!("preview: {would}") });
        return html(&ConfirmPage {
            nav: Some((&user).into()),
            notice: None,
            summary,
            detail,
            targets: Vec::new(),
            matched: 1,
            action: format!("{back}/act"),
            fields: form.fields(),
            button: "Yes, do it".into(),
            cancel: back,
        });
    }
    let by = user.name().to_owned();
    let done_note = |detail| note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail });
    let done = if let Some(command) = form.command() {
        let view = service::send_command(&fleet, &by, &id, command).await?;
        done_note(service::describe::command(&view.kind, &view.args, Some(view.id)));
        format!("done=command&n={}", view.id)
    } else if form.action == "revoke" {
        let at = service::revoke(&fleet, &id).await?;
        note(
            &req,
            AuditNote {
                target: Some(id.to_string()),
                matched: None,
                detail: format!("console: revoked at {}", at.rfc3339()),
            },
        );
        "done=revoke".to_owned()
    } else if form.action == "readmit" {
        let within = service::readmit_window(Some(&form.within)).map_err(ConsoleError::Invalid)?;
        let until = service::readmit(&fleet, &id, within).await?;
        note(
            &req,
            AuditNote {
                target: Some(id.to_string()),
                matched: None,
                detail: format!("console: readmitted until {}", until.rfc3339()),
            },
        );
        "done=readmit".to_owned()
    } else if form.action == "desired" {
        let doc: serde_json::Value =
            serde_json::from_str(&form.doc).map_err(|e| ConsoleError::Invalid(e.to_string()))?;
        let (set, change) = service::set_desired(&fleet, &by, &id, form.version, &doc).await?;
        done_note(change);
        format!("done=desired&n={}", set.version)
    } else {
        let labels = parse_labels(&form.labels).map_err(ConsoleError::Invalid)?;
        done_note(service::set_labels(&fleet, &by, &id, &labels).await?);
        "done=labels".to_owned()
    };
    Ok(see_other(&format!("{back}?{done}")))
}

#[derive(Deserialize)]
struct BulkQuery {
    #[serde(default)]
    selector: String,
}

#[derive(Template)]
#[template(path = "console/bulk.html")]
struct BulkPage {
    nav: Option<Nav>,
    notice: Option<String>,
    selector: String,
    matched: usize,
    error: Option<String>,
    csrf: String,
    kinds: Vec<&'static str>,
    /// The forms as they were sent, when refused.
    kind: String,
    args: String,
    patch: String,
}

impl BulkPage {
    /// The page for `selector`, with `draft`'s forms and error.
    async fn new(user: &User, fleet: &Fleet, selector: &str, draft: Draft) -> Result<BulkPage, ConsoleError> {
        let (matched, error) = match service::bulk_targets(fleet, selector).await {
            Ok((_, ids)) => (ids.len(), None),
            Err(service::ServiceError::Invalid(e)) => (0, Some(e)),
            Err(e) => return Err(e.into()),
        };
        Ok(BulkPage {
            nav: Some(user.into()),
            notice: None,
            selector: selector.to_owned(),
            matched,
            error: Some(draft.error).filter(|e| !e.is_empty()).or(error),
            csrf: user.csrf.clone(),
            kinds: CommandKind::ALL.iter().map(|k| k.as_str()).collect(),
            kind: draft.kind,
            args: draft.args,
            patch: draft.doc.unwrap_or_default(),
        })
    }
}

/// `GET /console/bulk?selector=...`: how many devices match, and the forms.
async fn bulk_page(
    user: User,
    fleet: web::Data<Fleet>,
    query: web::Query<BulkQuery>,
) -> Result<HttpResponse, ConsoleError> {
    if !user.operator() {
        return Err(ConsoleError::Forbidden("acting on devices needs the operator role".into()));
    }
    html(&BulkPage::new(&user, &fleet, &query.selector, Draft::default()).await?)
}

/// `POST /console/bulk`: confirm with the match count, then act on each. A
/// refused form comes back as it was sent, with why at the top.
async fn bulk_act(
    user: User,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    form: web::Form<ActForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    user.may_act(Role::Operator, &form.csrf)?;
    match bulk_try(&user, &fleet, &req, &form).await {
        Err(ConsoleError::Invalid(error)) => {
            let draft = Draft {
                error,
                labels: None,
                doc: (form.action == "desired").then(|| form.patch.clone()),
                kind: form.kind.clone(),
                args: form.args.clone(),
            };
            let page = BulkPage::new(&user, &fleet, &form.selector, draft).await?;
            let body = page.render().map_err(|e| ConsoleError::Internal(e.to_string()))?;
            Ok(HttpResponse::UnprocessableEntity().content_type("text/html; charset=utf-8").body(body))
        }
        other => other,
    }
}

async fn bulk_try(user: &User, fleet: &Fleet, req: &HttpRequest, form: &ActForm) -> Result<HttpResponse, ConsoleError> {
    note(
        req,
        AuditNote {
            target: Some(format!("selector {}", form.selector)),
            matched: None,
            detail: format!("console: {}", form.action),
        },
    );
    let action = match form.action.as_str() {
        "command" => service::BulkAction::Command(
            form.command().ok_or_else(|| ConsoleError::Invalid("no command given".into()))?,
        ),
        "desired" => service::BulkAction::Desired(
            serde_json::from_str(&form.patch)
                .map_err(|e| ConsoleError::Invalid(format!("the patch is not JSON: {e}")))?,
        ),
        other => return Err(ConsoleError::Invalid(format!("unknown bulk action {other:?}"))),
    };
    let plan = service::plan_bulk(fleet, &form.selector, &action).await?;
    let (selector, ids) = (&plan.selector, &plan.ids);
    note(
        req,
        AuditNote {
            target: Some(format!("selector {}", selector.text())),
            matched: Some(ids.len() as u64),
            detail: {
                let what = match &action {
                    service::BulkAction::Command(c) => service::describe::command(&c.kind, &c.args, None),
                    service::BulkAction::Desired(patch) => format!("desired state patch {patch}"),
                };
                if form.confirm == "yes" { what } else { format!("preview: {what}") }
            },
        },
    );
    plan.check(fleet, &action).await?;
    let (summary, detail) = match &action {
        service::BulkAction::Command(_) => {
            (format!("Send a {} command to each of {} devices?", form.kind, ids.len()), form.args.clone())
        }
        service::BulkAction::Desired(_) => {
            (format!("Apply this change to the desired state of each of {} devices?", ids.len()), form.patch.clone())
        }
    };
    let cancel = format!("/console/devices?selector={}", crate::api::encode_component(selector.text()));
    if form.confirm != "yes" {
        let views = fleet.views(Some(ids)).await?;
        return html(&ConfirmPage {
            nav: Some(user.into()),
            notice: None,
            summary,
            detail,
            targets: views.iter().take(20).map(|v| format!("{} ({})", v.name, v.id)).collect(),
            matched: ids.len(),
            action: "/console/bulk".into(),
            fields: form.fields(),
            button: format!("Yes, act on {} devices", ids.len()),
            cancel,
        });
    }
    let done = plan.apply(fleet, user.name(), &action).await?;
    let ids = done.commands.iter().map(|c| c.id);
    match (ids.clone().min(), ids.max()) {
        // Where each command stands, live until all are done.
        (Some(from), Some(to)) => {
            let by = crate::api::encode_component(user.name());
            Ok(see_other(&format!("/console/commands?from={from}&to={to}&by={by}")))
        }
        _ => Ok(see_other(&format!("{cancel}&done=desired_bulk&n={}", done.versions.len()))),
    }
}

#[derive(Debug, Default, Deserialize)]
struct AuditForm {
    #[serde(default)]
    who: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    before: Option<u64>,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPageHtml {
    nav: Option<Nav>,
    notice: Option<String>,
    q: AuditForm,
    entries: Vec<AuditLine>,
    next: Option<String>,
}

async fn audit_page(
    user: User,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    form: web::Query<AuditForm>,
) -> Result<HttpResponse, ConsoleError> {
    if !user.operator() {
        return Err(ConsoleError::Forbidden("the audit log needs the operator role".into()));
    }
    let form = form.into_inner();
    // A device may be looked for by its name as well as its id.
    let target = match form.target.trim() {
        t if t.is_empty() || t.contains(' ') => t.to_owned(),
        t => service::device(&fleet, t).await.map_or_else(|_| t.to_owned(), |id| id.to_string()),
    };
    let params = crate::web::http::AuditParams {
        before: form.before,
        limit: Some(100),
        who: Some(form.who.clone()),
        target: Some(target),
        action: Some(form.action.clone()),
        outcome: Some(form.outcome.clone()).filter(|o| !o.is_empty()),
        since: None,
    };
    let q = params.parse().map_err(ConsoleError::Invalid)?;
    let entries = service::reads::audit(&fleet, &q).await?;
    let next = (entries.len() == q.limit)
        .then(|| entries.last().map(|e| url_with(req.path(), req.query_string(), "before", &e.id.to_string())))
        .flatten();
    let now = Timestamp::now();
    html(&AuditPageHtml {
        nav: Some((&user).into()),
        notice: None,
        q: form,
        entries: audit_lines(&fleet, entries, now).await?,
        next,
    })
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    nav: Option<Nav>,
    notice: Option<String>,
    error: Option<String>,
    next: String,
    link: Option<String>,
}

#[derive(Deserialize)]
struct SignInQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    link: Option<String>,
}

/// Where to go after signing in: a console path, never another site, and
/// only visible ASCII (what a `Location` header may carry unchanged).
fn safe_next(next: &str) -> &str {
    let plain = next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    if plain && next.starts_with("/console/") && !next.contains("//") { next } else { "/console/" }
}

async fn sign_in_page(query: web::Query<SignInQuery>) -> Result<HttpResponse, ConsoleError> {
    html(&SignInPage {
        nav: None,
        notice: None,
        error: None,
        next: safe_next(&query.next).to_owned(),
        link: query.link.clone(),
    })
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    link: String,
    #[serde(default)]
    next: String,
}

/// `POST /console/sign-in`: an API token, or a one-time link, opens a
/// console session whose own secret becomes the cookie.
async fn sign_in(
    req: HttpRequest,
    fleet: web::Data<Fleet>,
    form: web::Form<SignInForm>,
) -> Result<HttpResponse, ConsoleError> {
    let next = safe_next(&form.next).to_owned();
    let secret = if !form.link.is_empty() {
        note(&req, AuditNote { target: Some("console".into()), matched: None, detail: "sign-in link".into() });
        crate::web::http::admit(&fleet, &req)?;
        match service::redeem_link(&fleet, form.link.trim()).await {
            Ok((secret, token)) => {
                req.extensions_mut().insert(crate::web::http::AuditWho(token.name.clone()));
                Ok(secret)
            }
            Err(service::ServiceError::Invalid(e)) => {
                crate::web::http::failed(&fleet, &req);
                Err(e)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        note(&req, AuditNote { target: Some("console".into()), matched: None, detail: "sign-in with a token".into() });
        match crate::web::http::authenticate(&fleet, &req, form.token.trim(), crate::store::TokenKind::Api).await {
            Ok(caller) => Ok(service::token_session(&fleet, &caller.token, caller.hash).await?),
            Err(crate::web::http::HttpError::Unauthorized) => {
                Err("that token is not valid (wrong, expired or revoked)".to_owned())
            }
            Err(e) => return Err(e.into()),
        }
    };
    match secret {
        Ok(secret) => Ok(HttpResponse::SeeOther()
            .cookie(super::session_cookie(&req, Some(&secret)))
            .insert_header((header::LOCATION, next))
            .finish()),
        Err(error) => {
            let page = SignInPage { nav: None, notice: None, error: Some(error), next, link: None };
            let body = page.render().map_err(|e| ConsoleError::Internal(e.to_string()))?;
            Ok(HttpResponse::Unauthorized().content_type("text/html; charset=utf-8").body(body))
        }
    }
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: String,
}

/// `POST /console/sign-out`: drops the cookie and revokes the session.
async fn sign_out(
    user: User,
    req: HttpRequest,
    fleet: web::Data<Fleet>,
    form: web::Form<SignOutForm>,
) -> Result<HttpResponse, ConsoleError> {
    user.may_act(Role::Viewer, &form.csrf)?;
    service::sign_out(&fleet, &user.caller.hash).await?;
    Ok(HttpResponse::SeeOther()
        .cookie(super::session_cookie(&req, None))
        .insert_header((header::LOCATION, "/console/sign-in"))
        .finish())
}

/// The console's pages.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(overview_page))
        .route("/sign-in", web::get().to(sign_in_page))
        .route("/sign-in", web::post().to(sign_in))
        .route("/sign-out", web::post().to(sign_out))
        .route("/devices", web::get().to(devices_page))
        .route("/devices/stream", web::get().to(stream))
        .route("/devices/{id}", web::get().to(device_page))
        .route("/devices/{id}/series", web::get().to(device_series))
        .route("/devices/{id}/act", web::post().to(act))
        .route("/bulk", web::get().to(bulk_page))
        .route("/bulk", web::post().to(bulk_act))
        .route("/audit", web::get().to(audit_page))
        .route("/alerts/silence", web::post().to(silence));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_worded_by_the_page_not_the_link() {
        let q = |done: &str, n| WindowQuery { window: None, done: Some(done.into()), n };
        assert_eq!(q("command", Some(7)).notice().unwrap(), "Command 7 queued; it is listed under Commands below.");
        assert_eq!(q("Your session expired, call 555", Some(1)).notice(), None);
        assert_eq!(q("command", None).notice(), None);
    }

    #[test]
    fn a_run_someone_asked_for_stays_in_sight() {
        use outpost_shared::job::{JobRun, RunOutcome, Trigger};
        let run = |id: u64, trigger| JobRun {
            run_id: id,
            job: "j".into(),
            trigger,
            attempt: 1,
            started: Timestamp(id * 1000),
            ended: Timestamp(id * 1000),
            outcome: RunOutcome::Exited { code: 0 },
            output: String::new(),
            output_bytes: 0,
        };
        // Newest first: 30 scheduled runs, a command's run among them, and
        // a manual run two days old.
        let now = Timestamp(3 * 86_400_000);
        let mut runs: Vec<JobRun> = (0..30).rev().map(|i| run(now.0 / 1000 - i, Trigger::Schedule)).collect();
        runs[12] = run(runs[12].run_id, Trigger::Command { id: 7 });
        runs.push(run(1, Trigger::Manual));
        let shown = runs_shown(runs, now);
        assert_eq!(shown.len(), RUNS_SHOWN + 1, "the newest five and the command's run");
        assert!(matches!(shown[RUNS_SHOWN].trigger, Trigger::Command { id: 7 }));
        assert_eq!(runs_shown(Vec::new(), now).len(), 0);
    }

    #[test]
    fn a_page_says_where_it_is() {
        assert_eq!(position(0, 50, 1234), "1–50 of 1234");
        assert_eq!(position(50, 50, 1234), "51–100 of 1234");
        assert_eq!(position(1200, 34, 1234), "1201–1234 of 1234");
        assert_eq!(position(0, 0, 0), "");
    }

    #[test]
    fn behind_means_something_only_while_online() {
        assert_eq!(behind_text(false, Some(5)), "-", "an offline device is out, not up to date");
        assert_eq!(behind_text(true, Some(5)), "up to date");
        assert_eq!(behind_text(true, None), "-");
        assert_eq!(behind_text(true, Some(3 * 3600)), duration(3 * 3600));
    }

    #[test]
    fn next_never_leaves_the_console() {
        assert_eq!(safe_next("/console/devices?status=online"), "/console/devices?status=online");
        let crafted = ["/console/\r\nSet-Cookie:x", "/console/ x", "/console/\u{e9}", "/console/\\evil", "/console/\t"];
        for bad in ["https://evil.example/", "//evil.example/console/", "/console/..//evil", "/other", ""]
            .into_iter()
            .chain(crafted)
        {
            assert_eq!(safe_next(bad), "/console/", "{bad}");
        }
    }

    #[test]
    fn labels_read_from_lines_and_are_checked() {
        let l = parse_labels("env=prod\n\n site = berlin \n").unwrap();
        assert_eq!(l.get("site").map(String::as_str), Some("berlin"));
        assert!(parse_labels("justakey").is_err());
        assert!(parse_labels("Env=x").is_err());
    }

    #[test]
    fn markup_in_a_device_name_is_text() {
        let mut v: DeviceView = serde_json::from_value(serde_json::json!({
            "id": "dev-1", "name": "<script>alert(1)</script>", "online": true, "connected": true,
            "last_seen": null, "last_seen_ms": null, "agent_version": "\"><img src=x>", "enrolled_at": "",
            "address": null, "cpu_percent": null, "mem_percent": null, "telemetry": null
        }))
        .unwrap();
        v.labels.insert("k".into(), "<b>".into());
        let html = row_html(&v, Timestamp(0));
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>"), "{html}");
        assert!(html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"), "{html}");
    }
}
