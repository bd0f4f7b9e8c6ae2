//! The HTTP API (actix-web): `/api/v1/...` behind bearer tokens, `/healthz`
//! open.
//!
//! A bearer token is looked up by its SHA-256; the secret itself is never
//! stored. Every request under `/api/v1` is authenticated before anything
//! else of it is read ([`bearer`]): missing or wrong tokens get 401, a
//! source that failed too often 429 ([`crate::service::throttle`]). Every error is a
//! JSON `{"error": ...}`, including those of malformed paths, queries and
//! bodies and of methods a path does not have (405 with `Allow`).

use crate::api::SnapshotView;
use crate::api::{ApiError, CommandView, EventView};
use crate::api::{
    AuditPage, BulkCommandRequest, BulkView, DeviceView, LinkRequest, LinkView, ReadmitRequest, TokenRequest,
    TokenView, encode_component,
};
use crate::api::{BackupsDeleted, BackupsView, GrantRequest, GrantView};
use crate::api::{
    CommandRequest, DesiredPut, DesiredView, JobRunView, JobView, JobsView, LimitQuery, MetricsQuery, MetricsView,
    PeersView, SampleView,
};
use crate::service;
use crate::service::backups::BackupStoreError;
use crate::service::fleet::Fleet;
use crate::service::listing::{DEFAULT_PAGE, DeviceQuery, MAX_PAGE, Overview, Selector, Sort, Status};
use crate::store::AuditQuery;
use crate::store::{ApiToken, AuditEntry, Role, StoreError, TelemetryRange, TokenKind};
use actix_web::HttpMessage;
use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use std::sync::Arc;

/// An API failure, rendered as `{"error": "..."}` with a status.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// This source failed to authenticate too often; it may try again
    /// after the time given.
    #[error("too many failed attempts from this address; retry in {} s", .0.as_secs())]
    Throttled(std::time::Duration),
    /// The path, query or body could not be read.
    #[error("{0}")]
    BadRequest(String),
    /// The body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// The body is not of a type this call reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The caller's role does not allow this.
    #[error("this call needs the {0:?} role")]
    Forbidden(Role),
    /// No such thing.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is well-formed but its content is not acceptable.
    #[error("{0}")]
    Unprocessable(String),
    /// The desired state changed since the caller read it.
    #[error("desired state is at version {current}; read it again and retry")]
    Conflict {
        /// The version in force.
        current: u64,
    },
    /// The thing to make exists already.
    #[error("{0} exists already")]
    Exists(String),
    /// The hub's store cannot answer or make the change durable now.
    #[error("the hub cannot store this now; retry later ({0})")]
    Unavailable(String),
    /// The hub's store failed.
    #[error("internal error")]
    Internal(crate::store::StoreError),
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::VersionConflict { current, .. } => HttpError::Conflict { current },
            StoreError::Unavailable(e) => HttpError::Unavailable(e),
            other => HttpError::Internal(other),
        }
    }
}

impl From<service::ServiceError> for HttpError {
    fn from(e: service::ServiceError) -> Self {
        match e {
            service::ServiceError::NotFound(what) => HttpError::NotFound(what),
            service::ServiceError::Invalid(why) => HttpError::Unprocessable(why),
            service::ServiceError::Conflict { current } => HttpError::Conflict { current },
            service::ServiceError::Exists(what) => HttpError::Exists(what),
            service::ServiceError::Store(e) => e.into(),
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match self {
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            HttpError::Conflict { .. } | HttpError::Exists(_) => StatusCode::CONFLICT,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let HttpError::Internal(e) = self {
            tracing::error!(error = %e, "API call failed.");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            HttpError::Unauthorized => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            HttpError::Throttled(wait) => {
                response.insert_header(("Retry-After", wait.as_secs().to_string()));
            }
            _ => {}
        }
        response.json(ApiError { error: self.to_string() })
    }
}

/// An authenticated API caller.
#[derive(Debug)]
pub struct Caller {
    /// The token's record.
    pub token: ApiToken,
    /// The SHA-256 of its secret.
    pub hash: [u8; 32],
}

impl Caller {
    /// Fails unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), HttpError> {
        if self.token.role >= role { Ok(()) } else { Err(HttpError::Forbidden(role)) }
    }
}

/// Who made a request, for the audit log (set once a token was checked).
#[derive(Debug, Clone)]
pub struct AuditWho(pub String);

/// What a request acted on, for the audit log, when the path does not say
/// it all (a selector and its matches, a token, what was refused).
#[derive(Debug, Clone, Default)]
pub struct AuditNote {
    /// A device id, `selector ...`, `token ...`.
    pub target: Option<String>,
    /// Devices a selector matched.
    pub matched: Option<u64>,
    /// Anything else worth keeping.
    pub detail: String,
}

/// Attaches an audit note to the request being answered.
pub fn note(req: &HttpRequest, note: AuditNote) {
    req.extensions_mut().insert(note);
}

/// The caller's address as the hub saw it.
pub fn peer(req: &HttpRequest) -> String {
    req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default()
}

/// The caller's address, for the per-source limits (unspecified when
/// unknown).
fn source(req: &HttpRequest) -> std::net::IpAddr {
    req.peer_addr().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip())
}

/// `Err(Throttled)` if the caller's address failed to authenticate too
/// often to try again now.
pub fn admit(fleet: &Fleet, req: &HttpRequest) -> Result<(), HttpError> {
    fleet.throttle().admit(source(req), std::time::Instant::now()).map_err(HttpError::Throttled)
}

/// Counts a failed authentication (a wrong token, a bad sign-in link)
/// against the caller's address.
pub fn failed(fleet: &Fleet, req: &HttpRequest) {
    fleet.throttle().failed(source(req), std::time::Instant::now());
}

/// Checks a token secret presented as `kind`: an API token as a bearer
/// token, a console session as the console's cookie (never the other way
/// round, and a sign-in link as neither). A session made with a token ends
/// with that token. Records who it is on the request and, at most once a
/// minute, its use in the store. A source that failed too often is refused
/// before the store is asked; each failure counts against it.
pub async fn authenticate(
    fleet: &Fleet,
    req: &HttpRequest,
    secret: &str,
    kind: TokenKind,
) -> Result<Caller, HttpError> {
    admit(fleet, req)?;
    let hash = crate::service::token_hash(secret);
    let now = Timestamp::now();
    let Some(mut token) = service::live_token(fleet, &hash, kind, now).await? else {
        failed(fleet, req);
        return Err(HttpError::Unauthorized);
    };
    req.extensions_mut().insert(AuditWho(token.name.clone()));
    if fleet.token_use_due(&hash, now) {
        token.last_used = Some((now, peer(req)));
        if let Err(e) = service::token_used(fleet, &hash, &token).await {
            tracing::debug!(error = %e, "Token use not recorded.");
        }
    }
    Ok(Caller { token, hash })
}

/// The caller [`bearer`] authenticated.
impl FromRequest for Caller {
    type Error = HttpError;
    type Future = std::future::Ready<Result<Self, HttpError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(req.extensions_mut().remove::<Caller>().ok_or(HttpError::Unauthorized))
    }
}

/// The secret of an `Authorization: Bearer` header, if any.
fn bearer_secret(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get("authorization")?.to_str().ok()?;
    Some(header.strip_prefix("Bearer ")?.trim().to_owned())
}

/// Authenticates a request under `/api/v1` before its path, query or body
/// is read, so that a caller without a valid token learns nothing but 401
/// (or 429); the handler takes the [`Caller`] it found.
pub async fn bearer(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let secret = bearer_secret(req.request());
    let fleet = req.app_data::<web::Data<Fleet>>().cloned();
    let checked = match (fleet, secret) {
        (Some(fleet), Some(secret)) => authenticate(&fleet, req.request(), &secret, TokenKind::Api).await,
        (Some(fleet), None) => admit(&fleet, req.request()).and_then(|()| {
            failed(&fleet, req.request());
            Err(HttpError::Unauthorized)
        }),
        (None, _) => Err(HttpError::Unauthorized),
    };
    match checked {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

/// A request's id: taken from the caller's `X-Request-Id` when it is a
/// plain token (a proxy in front may have set it), else made here. It names
/// the request's tracing span, so every log line of the request carries it,
/// and goes back in the answer's `X-Request-Id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The header carrying [`RequestId`].
pub const REQUEST_ID: &str = "x-request-id";

/// Whether a request id given by the caller is kept: 1 to 64 letters,
/// digits, `-`, `_` or `.` (anything else could forge log lines).
pub fn request_id_acceptable(given: &str) -> bool {
    (1..=64).contains(&given.len()) && given.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Runs every HTTP request (API, console, health) in a span `http` with its
/// id, method and path, and answers with the id.
pub async fn request_span(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use tracing::Instrument;
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|h| h.to_str().ok())
        .filter(|given| request_id_acceptable(given))
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("http", id = %id, method = %req.method(), path = %req.path());
    let started = std::time::Instant::now();
    let mut res = next.call(req).instrument(span).await?;
    count_request(res.request(), res.status().as_u16(), started.elapsed());
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&id) {
        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static(REQUEST_ID), value);
    }
    Ok(res)
}

/// Counts an answered request in the hub's metrics, by its route's pattern
/// (never the raw path) and method (others than the usual as `other`):
/// callers cannot make new series.
fn count_request(req: &HttpRequest, code: u16, took: std::time::Duration) {
    use crate::metrics::{METRICS, Request, Route};
    let route = req.match_pattern().unwrap_or_else(|| "other".to_owned());
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    METRICS.http_requests.get_or_create(&Request { route: route.clone(), method, code }).inc();
    METRICS.http_seconds.get_or_create(&Route { route }).observe(took.as_secs_f64());
}

/// Writes an audit entry for every change (any method but GET and HEAD)
/// and every refused request, whatever its outcome; `GET` reads that
/// succeed are not logged. One mechanism for the API and the console.
pub async fn audit(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    let method = res.request().method().clone();
    let read = method == actix_web::http::Method::GET || method == actix_web::http::Method::HEAD;
    let refused = matches!(status, 401 | 403 | 429);
    if read && !refused {
        return Ok(res);
    }
    let request = res.request();
    let Some(fleet) = request.app_data::<web::Data<Fleet>>().cloned() else { return Ok(res) };
    let note = request.extensions().get::<AuditNote>().cloned().unwrap_or_default();
    let who = request.extensions().get::<AuditWho>().map_or_else(|| "-".to_owned(), |w| w.0.clone());
    // Refusals of callers without a valid token past the first of their
    // source in a window are counted, not written one by one (see
    // `crate::service::throttle`); a token's refusals are its own, each written.
    if refused && who == "-" && !fleet.throttle().refused(source(request), status, std::time::Instant::now()) {
        return Ok(res);
    }
    let pattern = request.match_pattern().unwrap_or_else(|| request.path().to_owned());
    // A device named by its name in the path is logged by its id (names
    // change; ids do not).
    let target = match note.target {
        Some(target) => target,
        None => match request.match_info().get("id").map(str::to_owned) {
            Some(raw) if request.match_pattern().is_some_and(|p| p.contains("/devices/{id}")) => {
                service::device(&fleet, &raw).await.map_or(raw, |id| id.to_string())
            }
            Some(raw) => raw,
            None => String::new(),
        },
    };
    let entry = AuditEntry {
        id: 0,
        at: Timestamp::now(),
        who,
        action: format!("{method} {pattern}"),
        target,
        matched: note.matched,
        from: peer(request),
        status,
        detail: note.detail,
    };
    // The journal's line of the same entry: inside the request's span, so it
    // carries the request id the caller was answered with.
    tracing::info!(who = %entry.who, action = %entry.action, target = %entry.target, status, "Audited.");
    if let Err(e) = service::record_audit(&fleet, &entry).await {
        tracing::error!(error = %e, action = %entry.action, who = %entry.who, status, "Audit entry not stored.");
    }
    Ok(res)
}

/// Writes the rows that count refusals not written one by one
/// ([`crate::service::throttle::Throttle::due`]); `None` at shutdown writes all.
pub async fn write_tallies(fleet: &Fleet, now: Option<std::time::Instant>) {
    let rows = fleet.throttle().due(now);
    for row in rows {
        let source = match row.source {
            std::net::IpAddr::V6(v6) => format!("{v6}/64"),
            v4 => v4.to_string(),
        };
        let entry = AuditEntry {
            id: 0,
            at: Timestamp::now(),
            who: "-".into(),
            action: "refused requests".into(),
            target: String::new(),
            matched: None,
            from: source,
            status: row.status,
            detail: format!(
                "{} more answered {} in the {} s after the first (written above)",
                row.more,
                row.status,
                row.over.as_secs()
            ),
        };
        if let Err(e) = service::record_audit(fleet, &entry).await {
            tracing::error!(error = %e, from = %entry.from, count = row.more, "Audit count of refusals not stored.");
        }
    }
}

/// `/healthz`: the process serves, and its store's state as last seen: 200
/// `ok`, or 503 naming the store's fault (a full disk, the database gone),
/// so monitoring and systemd see a hub that cannot store.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "200 ok, or 503 naming the store's fault", body = String, content_type = "text/plain"), (status = 503, body = String, content_type = "text/plain")))]
async fn healthz(fleet: web::Data<Fleet>) -> HttpResponse {
    health_response(service::reads::health(&fleet))
}

/// `/readyz`: whether the hub can make a write durable now (a small write
/// and its sync, or a database round trip); 503 while it cannot.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "200 when a write can be made durable now, else 503", body = String, content_type = "text/plain"), (status = 503, body = String, content_type = "text/plain")))]
async fn readyz(fleet: web::Data<Fleet>) -> HttpResponse {
    health_response(service::reads::probe(&fleet).await)
}

fn health_response(health: crate::store::Health) -> HttpResponse {
    match health.error {
        None => HttpResponse::Ok().content_type("text/plain").body("ok\n"),
        Some(error) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("store ({}) cannot make writes durable: {error}\n", health.backend)),
    }
}

/// Who may read `/metrics` without a token: anyone who reaches it when the
/// HTTP listener is bound to loopback only (`[http] listen` on 127.0.0.1 or
/// ::1), nobody otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsAccess {
    /// `/metrics` answers without a token.
    pub open: bool,
}

/// `/metrics`: the hub's Prometheus metrics (text format 0.0.4); the
/// fleet's gauges are read from the store now. A viewer token, or none when
/// the HTTP listener is bound to loopback only.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 503, body = ApiError)), security((), ("bearer" = [])))]
async fn prometheus_metrics(req: HttpRequest, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    let secret = bearer_secret(&req);
    let open = req.app_data::<web::Data<MetricsAccess>>().is_some_and(|a| a.open);
    match secret {
        Some(secret) => authenticate(&fleet, &req, &secret, TokenKind::Api).await?.require(Role::Viewer)?,
        None if open => {}
        None => {
            admit(&fleet, &req)?;
            failed(&fleet, &req);
            return Err(HttpError::Unauthorized);
        }
    }
    let metrics = &crate::metrics::METRICS;
    let o = fleet.overview(0).await?;
    metrics.set_fleet(&crate::metrics::FleetCounts {
        online: o.online,
        offline: o.offline,
        never_connected: o.never_connected,
        alarmed: o.alarmed,
        overdue_backups: o.overdue_backups,
        failing_jobs: o.devices_with_failed_runs,
        desired_refused: o.desired_refused,
    });
    let text = metrics
        .encode()
        .map_err(|e| HttpError::Internal(crate::store::StoreError::Unavailable(format!("metrics not encoded: {e}"))))?;
    Ok(HttpResponse::Ok().content_type(prometheus_client::encoding::prometheus_text::CONTENT_TYPE).body(text))
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only `firing`, `pending` or `resolved` alerts.
    pub state: Option<String>,
    /// Only this device's (id or name).
    pub device: Option<String>,
    /// The cursor from the previous page's `Link: <...>; rel="next"`.
    pub after: Option<String>,
}

/// `GET /api/v1/alerts`: firing, then pending, then recently resolved
/// alerts, newest first within each; a page, with the next one in the
/// `Link` header and the count in all in `X-Total-Count`.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", params(AlertsQuery), responses((status = 200, description = "a page of alerts; the next page is in the Link header", body = [crate::api::AlertView]), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn list_alerts(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    query: web::Query<AlertsQuery>,
) -> Result<HttpResponse, HttpError> {
    use crate::service::alerts::{AlertQuery, State};
    caller.require(Role::Viewer)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(HttpError::Unprocessable("limit: 1 to 1000".into()));
    }
    let state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some("firing") => Some(State::Firing),
        Some("pending") => Some(State::Pending),
        Some("resolved") => Some(State::Resolved),
        Some(other) => return Err(HttpError::Unprocessable(format!("state {other:?}: firing, pending or resolved"))),
    };
    let device = match query.device.as_deref().filter(|d| !d.is_empty()) {
        Some(d) => Some(known_device(&fleet, d).await?.to_string()),
        None => None,
    };
    let after = query.after.clone().filter(|a| !a.is_empty());
    let q = AlertQuery { state, device, after, limit };
    let page = crate::service::alerts::list_page(fleet.store(), &q).await?.map_err(HttpError::Unprocessable)?;
    let views: Vec<crate::api::AlertView> =
        page.alerts.iter().map(|(a, s)| crate::service::alerts::alert_view(a, *s)).collect();
    Ok(paged(&req, page.total, page.next.as_deref()).json(views))
}

/// An answer of one page: `X-Total-Count` says how many match in all, and
/// `Link: <...>; rel="next"` names the next page (this request with `after`
/// set to `next`), if there is one.
fn paged(req: &HttpRequest, total: usize, next: Option<&str>) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    response.insert_header(("X-Total-Count", total.to_string()));
    if let Some(next) = next {
        let url = url_with(req.path(), req.query_string(), "after", next);
        response.insert_header(("Link", format!("<{url}>; rel=\"next\"")));
    }
    response
}

/// `GET /api/v1/silences`: silences in force and those ended in the last day.
#[utoipa::path(get, path = "/api/v1/silences", tag = "alerts", responses((status = 200, body = [crate::api::SilenceView])), security(("bearer" = [])))]
async fn list_silences(caller: Caller, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let now = Timestamp::now();
    let list = crate::service::alerts::silences(fleet.store()).await?;
    let views: Vec<crate::api::SilenceView> =
        list.iter().map(|s| crate::service::alerts::silence_view(s, now)).collect();
    Ok(HttpResponse::Ok().json(views))
}

/// `POST /api/v1/silences`: alerts whose labels match are not notified
/// until the silence ends.
#[utoipa::path(post, path = "/api/v1/silences", tag = "alerts", request_body = crate::api::SilenceRequest, responses((status = 201, body = crate::api::SilenceView), (status = 403, body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn create_silence(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    body: web::Json<crate::api::SilenceRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let body = body.into_inner();
    let target = body.matchers.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    note(&req, AuditNote { target: Some(format!("silence {target}")), ..AuditNote::default() });
    let duration =
        crate::service::alerts::check_silence(&body.matchers, &body.duration).map_err(HttpError::Unprocessable)?;
    if body.comment.len() > 1024 {
        return Err(HttpError::Unprocessable("comment: at most 1024 bytes".into()));
    }
    let silence =
        crate::service::alerts::add_silence(&fleet, &caller.token.name, body.matchers, duration, body.comment).await?;
    Ok(HttpResponse::Created().json(crate::service::alerts::silence_view(&silence, Timestamp::now())))
}

/// `DELETE /api/v1/silences/{id}`: ends a silence now.
#[utoipa::path(delete, path = "/api/v1/silences/{id}", tag = "alerts", params(("id" = String, Path, description = "silence id (sil-...)")), responses((status = 200, body = crate::api::SilenceView), (status = 403, body = ApiError), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn end_silence(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    note(&req, AuditNote { target: Some(format!("silence {path}")), ..AuditNote::default() });
    caller.require(Role::Operator)?;
    match crate::service::alerts::end_silence(&fleet, &path).await? {
        Some(s) => Ok(HttpResponse::Ok().json(crate::service::alerts::silence_view(&s, Timestamp::now()))),
        None => Err(HttpError::NotFound(format!("silence {path:?}"))),
    }
}

/// Query of `GET /api/v1/devices`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DevicesQuery {
    /// Label selector: `env=prod,site=berlin`, `tier!=db`, `gpu`, `!retired`.
    pub selector: Option<String>,
    /// `online`, `offline`, `never`, `alarmed`, `expired` (certificate expired), `revoked`, `refused`
    /// (desired state) or `failing` (a job).
    pub status: Option<String>,
    /// Only this agent version.
    pub version: Option<String>,
    /// Text in the name, id or address.
    pub q: Option<String>,
    /// `name` (default), `last_seen`, `version` or `behind`.
    pub sort: Option<String>,
    /// Devices in the page (default 100, at most 1000).
    pub limit: Option<usize>,
    /// The cursor from the previous page's `Link: <...>; rel="next"`.
    pub after: Option<String>,
}

impl DevicesQuery {
    /// The listing query it means, or what is wrong with it.
    pub fn parse(&self) -> Result<DeviceQuery, String> {
        Ok(DeviceQuery {
            selector: self.selector.as_deref().filter(|s| !s.trim().is_empty()).map(Selector::parse).transpose()?,
            status: self.status.as_deref().filter(|s| !s.is_empty()).map(Status::parse).transpose()?,
            version: self.version.clone().filter(|s| !s.is_empty()),
            text: self.q.clone().filter(|s| !s.trim().is_empty()),
            sort: self.sort.as_deref().filter(|s| !s.is_empty()).map(Sort::parse).transpose()?.unwrap_or_default(),
            after: self.after.clone().filter(|s| !s.is_empty()),
            limit: self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
        })
    }
}

/// One page of devices: a JSON array; `Link: <...>; rel="next"` names the
/// next page and `X-Total-Count` the devices matching in all.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DevicesQuery), responses((status = 200, description = "a page of devices; the next page is in the Link header", body = [DeviceView]), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn list_devices(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    query: web::Query<DevicesQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let parsed = query.parse().map_err(HttpError::Unprocessable)?;
    let page = fleet.list(&parsed).await?.map_err(HttpError::Unprocessable)?;
    Ok(paged(&req, page.total, page.next.as_deref()).json(page.rows))
}

/// `path?query` with `key` set to `value` (replacing it if present).
pub fn url_with(path: &str, query: &str, key: &str, value: &str) -> String {
    let mut pairs: Vec<(String, String)> = web::Query::<Vec<(String, String)>>::from_query(query)
        .map(web::Query::into_inner)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != key)
        .collect();
    pairs.push((key.to_owned(), value.to_owned()));
    let encoded: Vec<String> =
        pairs.iter().map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v))).collect();
    format!("{path}?{}", encoded.join("&"))
}

/// `GET /api/v1/overview`: the fleet at a glance.
#[utoipa::path(get, path = "/api/v1/overview", tag = "devices", responses((status = 200, body = Overview)), security(("bearer" = [])))]
async fn get_overview(caller: Caller, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    Ok(HttpResponse::Ok().json(fleet.overview(10).await?))
}

/// `PUT /api/v1/devices/{id}/labels`: replaces the device's labels.
#[utoipa::path(put, path = "/api/v1/devices/{id}/labels", tag = "devices", params(("id" = String, Path, description = "device id or name")), request_body(content = std::collections::BTreeMap<String, String>, description = "every label of the device"), responses((status = 200, body = DeviceView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn put_labels(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<crate::store::Labels>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let detail = service::set_labels(&fleet, &caller.token.name, &id, &body).await?;
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail });
    let view = fleet.device(&id).await?.ok_or_else(|| HttpError::NotFound(format!("device {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

/// Lets a device whose certificate expired connect once more, within
/// `within`, to renew it: its id, outbox, jobs and backups stay as they are.
/// The hub still checks that the certificate was signed by the fleet CA; the
/// first renewal ends the re-admission. Admin only; audited.
#[utoipa::path(post, path = "/api/v1/devices/{id}/readmit", tag = "devices", params(("id" = String, Path, description = "device id or name")), request_body = ReadmitRequest, responses((status = 200, body = DeviceView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn readmit_device(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<ReadmitRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Admin)?;
    let id = known_device(&fleet, &path).await?;
    let within = service::readmit_window(body.within.as_deref()).map_err(HttpError::Unprocessable)?;
    let until = service::readmit(&fleet, &id, within).await?;
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail: format!("until {}", until.rfc3339()) });
    let view = fleet.device(&id).await?.ok_or_else(|| HttpError::NotFound(format!("device {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

/// Revokes a device for good: the hub refuses its certificate on every path
/// from now on (QUIC, MQTT, relay through a LAN peer) and closes its open
/// connections; its records and backups stay (a replacement reads them
/// through a grant). It comes back only by enrolling anew. Admin only;
/// audited.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices", params(("id" = String, Path, description = "device id or name")), responses((status = 200, body = DeviceView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn revoke_device(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Admin)?;
    let id = known_device(&fleet, &path).await?;
    let at = service::revoke(&fleet, &id).await?;
    note(
        &req,
        AuditNote { target: Some(id.to_string()), matched: None, detail: format!("revoked at {}", at.rfc3339()) },
    );
    let view = fleet.device(&id).await?.ok_or_else(|| HttpError::NotFound(format!("device {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /api/v1/commands`: one command for every device a selector
/// matches (`dry_run` only counts them).
#[utoipa::path(post, path = "/api/v1/commands", tag = "commands", request_body = BulkCommandRequest, responses((status = 201, body = BulkView), (status = 200, description = "dry run: the devices it would reach", body = BulkView), (status = 403, body = ApiError), (status = 422, description = "empty or unknown selector, no match, bad command", body = ApiError)), security(("bearer" = [])))]
async fn post_bulk_command(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    body: web::Json<BulkCommandRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let BulkCommandRequest { selector, command, dry_run } = body.into_inner();
    note(&req, AuditNote { target: Some(format!("selector {selector}")), matched: None, detail: command.kind.clone() });
    let detail = if dry_run { format!("{} (dry run)", command.kind) } else { command.kind.clone() };
    let action = service::BulkAction::Command(command);
    let plan = service::plan_bulk(&fleet, &selector, &action).await?;
    note(
        &req,
        AuditNote {
            target: Some(format!("selector {}", plan.selector.text())),
            matched: Some(plan.ids.len() as u64),
            detail,
        },
    );
    if dry_run {
        return Ok(HttpResponse::Ok().json(plan.view()));
    }
    Ok(HttpResponse::Created().json(plan.apply(&fleet, &caller.token.name, &action).await?))
}

/// Query of bulk desired-state changes.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SelectorQuery {
    /// Label selector; empty or naming a label no device has is refused.
    pub selector: String,
    /// Only count the devices it would reach.
    #[serde(default)]
    pub dry_run: bool,
}

/// Largest request body the API reads (JSON and merge patches).
pub const MAX_BODY: usize = 256 << 10;

/// A JSON merge patch body (RFC 7396): sent as
/// `application/merge-patch+json` (or `application/json`), at most
/// [`MAX_BODY`], a JSON object.
#[derive(Debug)]
pub struct MergePatch(pub serde_json::Value);

impl FromRequest for MergePatch {
    type Error = HttpError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, HttpError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let kind = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let essence = kind.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if !["application/merge-patch+json", "application/json"].contains(&essence.as_str()) {
            let error = HttpError::UnsupportedMediaType(format!(
                "a merge patch is sent as application/merge-patch+json, not {:?}",
                if kind.is_empty() { "nothing" } else { kind }
            ));
            return Box::pin(std::future::ready(Err(error)));
        }
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let body = bytes.await.map_err(|e| match e.as_response_error().status_code() {
                StatusCode::PAYLOAD_TOO_LARGE => HttpError::TooLarge(format!("the body is over {MAX_BODY} bytes")),
                _ => HttpError::BadRequest(format!("the body could not be read: {e}")),
            })?;
            let patch = serde_json::from_slice(&body)
                .map_err(|e| HttpError::BadRequest(format!("the patch is not JSON: {e}")))?;
            Ok(MergePatch(patch))
        })
    }
}

/// `PATCH /api/v1/desired?selector=...`: one JSON merge patch applied to
/// every matching device's desired state. Checked on every device's
/// document first: if it makes one invalid, nothing changes (422).
#[utoipa::path(patch, path = "/api/v1/desired", tag = "desired", params(SelectorQuery), request_body(content = Object, content_type = "application/merge-patch+json", description = "JSON merge patch (RFC 7396)"), responses((status = 200, body = BulkView), (status = 403, body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn patch_bulk_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    query: web::Query<SelectorQuery>,
    MergePatch(patch): MergePatch,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    note(&req, AuditNote { target: Some(format!("selector {}", query.selector)), ..AuditNote::default() });
    let action = service::BulkAction::Desired(patch);
    let plan = service::plan_bulk(&fleet, &query.selector, &action).await?;
    note(
        &req,
        AuditNote {
            target: Some(format!("selector {}", plan.selector.text())),
            matched: Some(plan.ids.len() as u64),
            detail: if query.dry_run { "dry run".into() } else { String::new() },
        },
    );
    plan.check(&fleet, &action).await?;
    if query.dry_run {
        return Ok(HttpResponse::Ok().json(plan.view()));
    }
    Ok(HttpResponse::Ok().json(plan.apply(&fleet, &caller.token.name, &action).await?))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, body = [TokenView]), (status = 403, body = ApiError)), security(("bearer" = [])))]
async fn list_tokens(caller: Caller, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Admin)?;
    let now = Timestamp::now();
    let mut tokens: Vec<TokenView> =
        service::reads::tokens(&fleet).await?.iter().map(|(h, t)| TokenView::new(h, t, now)).collect();
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(HttpResponse::Ok().json(tokens))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = TokenRequest, responses((status = 201, description = "made; `secret` is shown only here", body = TokenView), (status = 403, body = ApiError), (status = 409, description = "a token of that name exists", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn create_token(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    body: web::Json<TokenRequest>,
) -> Result<HttpResponse, HttpError> {
    note(&req, AuditNote { target: Some(format!("token {}", body.name)), matched: None, detail: body.role.clone() });
    caller.require(Role::Admin)?;
    let (role, life) = service::check_token(&body.name, &body.role, &body.expires_in, service::MAX_TOKEN_LIFE)
        .map_err(HttpError::Unprocessable)?;
    let (secret, hash, token) =
        service::create_token(&fleet, &caller.token.name, &body.name, role, life, TokenKind::Api, None).await?;
    let mut view = TokenView::new(&hash, &token, Timestamp::now());
    view.secret = Some(secret);
    Ok(HttpResponse::Created().json(view))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "token id (tok-...) or name")), responses((status = 200, body = TokenView), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 422, description = "the last admin token, or a name several tokens share", body = ApiError)), security(("bearer" = [])))]
async fn revoke_token(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    note(&req, AuditNote { target: Some(format!("token {path}")), ..AuditNote::default() });
    caller.require(Role::Admin)?;
    let (hash, token) = service::revoke_token(&fleet, &caller.token.name, &path).await?;
    Ok(HttpResponse::Ok().json(TokenView::new(&hash, &token, Timestamp::now())))
}

#[utoipa::path(post, path = "/api/v1/console/links", tag = "tokens", request_body = LinkRequest, responses((status = 201, body = LinkView), (status = 403, body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn create_link(
    caller: Caller,
    fleet: web::Data<Fleet>,
    body: web::Json<LinkRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Admin)?;
    let maker = crate::store::MadeBy { name: caller.token.name.clone(), token: Some(caller.hash) };
    let (path, expires_at) =
        service::sign_in_link(&fleet, maker, &body.role, body.expires_in.as_deref().unwrap_or("15m")).await?;
    Ok(HttpResponse::Created().json(LinkView { path, expires_at: expires_at.rfc3339() }))
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Entries older than this id (the previous page's `next`).
    pub before: Option<u64>,
    /// Most entries (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only this token name.
    pub who: Option<String>,
    /// Only this target (a device id, `selector ...`, `token ...`).
    pub target: Option<String>,
    /// Only actions containing this text (`POST`, `labels`).
    pub action: Option<String>,
    /// `ok`, `refused` or `failed`.
    pub outcome: Option<String>,
    /// Only entries since (RFC 3339, ms, or a relative time like `1h`).
    pub since: Option<String>,
}

impl AuditParams {
    /// The store query it means.
    pub fn parse(&self) -> Result<AuditQuery, String> {
        if let Some(o) = &self.outcome
            && !["ok", "refused", "failed"].contains(&o.as_str())
        {
            return Err(format!("outcome {o:?}: use ok, refused or failed"));
        }
        let non_empty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        Ok(AuditQuery {
            before: self.before,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
            who: non_empty(&self.who),
            target: non_empty(&self.target),
            action: non_empty(&self.action),
            outcome: non_empty(&self.outcome),
            since: non_empty(&self.since).map(|t| relative_or_absolute(&t, Timestamp::now())).transpose()?,
        })
    }
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams), responses((status = 200, body = AuditPage), (status = 403, body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn get_audit(
    caller: Caller,
    fleet: web::Data<Fleet>,
    query: web::Query<AuditParams>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let q = query.parse().map_err(HttpError::Unprocessable)?;
    let entries = service::reads::audit(&fleet, &q).await?;
    let next = (entries.len() == q.limit).then(|| entries.last().map(|e| e.id)).flatten();
    Ok(HttpResponse::Ok().json(AuditPage { entries: entries.into_iter().map(Into::into).collect(), next }))
}

/// A time given as RFC 3339, milliseconds since the epoch, or an age
/// before `now` (`90s`, `1h`, `2d`).
pub fn relative_or_absolute(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(Timestamp(ms));
    }
    if let Ok(age) = humantime::parse_duration(text) {
        return Ok(Timestamp(now.0.saturating_sub(age.as_millis().try_into().unwrap_or(u64::MAX))));
    }
    humantime::parse_rfc3339_weak(text)
        .map(Timestamp::from_system)
        .map_err(|_| format!("invalid time {text:?}: use RFC 3339, milliseconds since the epoch, or an age like 1h"))
}

/// Parses a device id from the path and checks the device exists.
async fn known_device(fleet: &Fleet, raw: &str) -> Result<DeviceId, HttpError> {
    Ok(service::device(fleet, raw).await?)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceView), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_device(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let view = fleet.device(&id).await?.ok_or_else(|| HttpError::NotFound(format!("device {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

/// Most samples in one page of `GET .../metrics`: an answer stays a few
/// MiB however long the history; clients follow `next`.
pub const MAX_METRICS_PAGE: usize = 10_000;

/// Reads a time bound: milliseconds since the epoch, RFC 3339, or an age
/// before now (`1h`).
fn time_bound(text: &str) -> Result<Timestamp, HttpError> {
    relative_or_absolute(text, Timestamp::now()).map_err(HttpError::Unprocessable)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/metrics", tag = "devices", params(("id" = String, Path, description = "device id"), MetricsQuery), responses((status = 200, body = MetricsView), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn get_metrics(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<MetricsQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let since = query.since.as_deref().map(time_bound).transpose()?.unwrap_or(Timestamp(0));
    let until = query.until.as_deref().map(time_bound).transpose()?.unwrap_or(Timestamp(u64::MAX));
    let limit = query.limit.unwrap_or(MAX_METRICS_PAGE).clamp(1, MAX_METRICS_PAGE);
    let after = match query.after.as_deref() {
        Some(text) => Some(crate::api::parse_metrics_cursor(text).ok_or_else(|| {
            HttpError::Unprocessable(format!("after: {text:?} is not a cursor of this API (use a page's `next`)"))
        })?),
        None => None,
    };
    let range = TelemetryRange { since, until, after: after.map(|(at, seq)| (Timestamp(at), seq)), limit };
    let samples: Vec<SampleView> = service::reads::telemetry(&fleet, &id, &range)
        .await?
        .into_iter()
        .map(|(seq, sample)| SampleView::new(seq, sample))
        .collect();
    let next = (samples.len() == limit).then(|| samples.last().map(crate::api::metrics_cursor)).flatten();
    Ok(HttpResponse::Ok().json(MetricsView { device: id.to_string(), samples, next }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", params(("id" = String, Path, description = "device id"), LimitQuery), responses((status = 200, description = "newest first", body = [EventView]), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_events(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<LimitQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let limit = query.limit.unwrap_or(1000).min(1_000_000);
    let events: Vec<EventView> =
        service::reads::events(&fleet, &id, limit).await?.into_iter().map(EventView::from).collect();
    Ok(HttpResponse::Ok().json(events))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/jobs", tag = "jobs", params(("id" = String, Path, description = "device id")), responses((status = 200, body = JobsView), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_jobs(caller: Caller, fleet: web::Data<Fleet>, path: web::Path<String>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let reported = service::reads::jobs(&fleet, &id, 1).await?;
    let now = Timestamp::now();
    let jobs = reported.jobs.into_iter().map(|(spec, source, mut runs)| JobView::new(&spec, source, runs.pop(), now));
    let reported_at = reported.reported_at.map(|at| at.rfc3339());
    Ok(HttpResponse::Ok().json(JobsView { device: id.to_string(), reported_at, jobs: jobs.collect() }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/peers", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = PeersView), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_peers(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let record = service::reads::peers(&fleet, &id).await?;
    let (reported_at, peers) = record.map_or((None, Vec::new()), |r| (Some(r.at.rfc3339()), r.peers));
    let peers = peers.into_iter().map(crate::api::PeerView::from).collect();
    Ok(HttpResponse::Ok().json(PeersView { device: id.to_string(), reported_at, peers }))
}

impl From<BackupStoreError> for HttpError {
    fn from(e: BackupStoreError) -> Self {
        match e {
            BackupStoreError::Store(e) => e.into(),
            BackupStoreError::NotFound(m) => HttpError::NotFound(m),
            BackupStoreError::Busy(m) => HttpError::Unavailable(m),
            other => HttpError::Unprocessable(other.to_string()),
        }
    }
}

/// Runs blocking work on the backups of device `id` off the server's
/// threads.
async fn on_backups<T: Send + 'static>(
    fleet: &Fleet,
    id: &DeviceId,
    work: impl FnOnce(&crate::service::backups::Backups, &DeviceId) -> Result<T, BackupStoreError> + Send + 'static,
) -> Result<T, HttpError> {
    let (backups, id) = (fleet.backups().clone(), id.clone());
    web::block(move || work(&backups, &id))
        .await
        .map_err(|e| HttpError::Unprocessable(format!("request failed: {e}")))?
        .map_err(Into::into)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/backups", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = BackupsView), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_backups(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let (catalog, usage) = on_backups(&fleet, &id, |b, id| Ok((b.catalog(id)?, b.usage(id)?))).await?;
    Ok(HttpResponse::Ok().json(BackupsView {
        device: id.to_string(),
        snapshots: catalog.iter().map(SnapshotView::from).collect(),
        stored_chunks: usage.chunks,
        stored_bytes: usage.bytes,
    }))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/verify", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = crate::service::backups::VerifyReport), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn verify_backups(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let report = on_backups(&fleet, &id, |b, id| b.verify(id)).await?;
    tracing::info!(device = %id, chunks = report.chunks, problems = report.problems.len(), "Backups verified at the hub.");
    Ok(HttpResponse::Ok().json(report))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}/backups", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = BackupsDeleted), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn delete_backups(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Admin)?;
    let id = known_device(&fleet, &path).await?;
    let (snapshots, usage) = on_backups(&fleet, &id, |b, id| b.delete_all(id)).await?;
    tracing::info!(device = %id, snapshots, chunks = usage.chunks, by = %caller.token.name, "Backups deleted.");
    Ok(HttpResponse::Ok().json(BackupsDeleted {
        device: id.to_string(),
        snapshots,
        chunks: usage.chunks,
        bytes: usage.bytes,
    }))
}

/// `?dry_run=true` reports what a prune would remove.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PruneQuery {
    /// Only report what would be removed.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /devices/{id}/backups/prune`: applies the hub's retention now
/// (operator for a dry run, admin to delete).
#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/prune", tag = "backups", params(("id" = String, Path, description = "device id"), PruneQuery), responses((status = 200, body = crate::service::backups::PruneReport), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn prune_backups(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<PruneQuery>,
) -> Result<HttpResponse, HttpError> {
    let dry_run = query.dry_run;
    caller.require(if dry_run { Role::Operator } else { Role::Admin })?;
    let id = known_device(&fleet, &path).await?;
    let report = on_backups(&fleet, &id, move |b, id| b.prune(id, dry_run)).await?;
    tracing::info!(
        device = %id,
        dry_run,
        snapshots = report.snapshots_removed.len(),
        chunks = report.chunks_removed,
        by = %caller.token.name,
        "Backups pruned at the hub."
    );
    Ok(HttpResponse::Ok().json(report))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/grants", tag = "backups", params(("id" = String, Path, description = "device id")), request_body = GrantRequest, responses((status = 201, body = GrantView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn grant_backups(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    body: web::Json<GrantRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let owner = known_device(&fleet, &path).await?;
    let reader = known_device(&fleet, &body.to).await?;
    let valid_for = service::grant_length(body.valid_for.as_deref()).map_err(HttpError::Unprocessable)?;
    let view = service::grant_backups(&fleet, &caller.token.name, &owner, &reader, valid_for).await?;
    Ok(HttpResponse::Created().json(view))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/jobs/{name}/runs", tag = "jobs", params(("id" = String, Path, description = "device id"), ("name" = String, Path, description = "job name"), LimitQuery), responses((status = 200, description = "newest first", body = [JobRunView]), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_job_runs(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<(String, String)>,
    query: web::Query<LimitQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let (raw, job) = path.into_inner();
    let id = known_device(&fleet, &raw).await?;
    let limit = query.limit.unwrap_or(100).min(crate::store::MAX_RUNS_PER_JOB);
    let runs: Vec<JobRunView> =
        service::reads::job_runs(&fleet, &id, &job, limit).await?.into_iter().map(JobRunView::from).collect();
    Ok(HttpResponse::Ok().json(runs))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DesiredView), (status = 404, description = "no such device", body = ApiError)), security(("bearer" = [])))]
async fn get_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let (desired, reported) = service::reads::desired(&fleet, &id).await?;
    Ok(HttpResponse::Ok().json(DesiredView::new(desired, reported)))
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), request_body = DesiredPut, responses((status = 200, body = DesiredView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 409, description = "changed since the version given", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn put_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<DesiredPut>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let DesiredPut { version, doc } = body.into_inner();
    let (view, detail) = service::set_desired(&fleet, &caller.token.name, &id, version, &doc).await?;
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail });
    Ok(HttpResponse::Ok().json(view))
}

/// `PATCH /devices/{id}/desired`: a JSON merge patch (RFC 7396) on the
/// current document (`null` removes a key), validated like `PUT`, stored as
/// the next version. Retried on a concurrent change, so a patch never
/// undoes another caller's change to keys it does not name.
#[utoipa::path(patch, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), request_body(content = Object, content_type = "application/merge-patch+json", description = "JSON merge patch (RFC 7396)"), responses((status = 200, body = DesiredView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn patch_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    MergePatch(patch): MergePatch,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let (view, detail) = service::patch_desired(&fleet, &caller.token.name, &id, &patch).await?;
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail });
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "device id")), request_body = CommandRequest, responses((status = 201, body = CommandView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn post_command(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<CommandRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let view = service::send_command(&fleet, &caller.token.name, &id, body.into_inner()).await?;
    let detail = service::describe::command(&view.kind, &view.args, Some(view.id));
    note(&req, AuditNote { target: Some(id.to_string()), matched: None, detail });
    Ok(HttpResponse::Created().json(view))
}

/// Query of `GET /api/v1/devices/{id}/commands`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandsQuery {
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
    /// The cursor from the previous page's `Link: <...>; rel="next"` (the
    /// id of the last command it held).
    pub after: Option<String>,
}

/// `GET /api/v1/devices/{id}/commands`: a page of the device's commands,
/// oldest first; the next page is in the `Link` header and the count in
/// all in `X-Total-Count`.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "device id"), CommandsQuery), responses((status = 200, description = "a page of the device's commands, oldest first; the next page is in the Link header", body = [CommandView]), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError)), security(("bearer" = [])))]
async fn list_commands(
    caller: Caller,
    fleet: web::Data<Fleet>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<CommandsQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(HttpError::Unprocessable(format!("limit: 1 to {MAX_PAGE}")));
    }
    let after = match query.after.as_deref().filter(|a| !a.is_empty()) {
        None => 0,
        Some(a) => a.parse::<u64>().map_err(|_| {
            HttpError::Unprocessable(format!("after: {a:?} is not a cursor of this list (use a page's next)"))
        })?,
    };
    let id = known_device(&fleet, &path).await?;
    let (mut page, total) = service::reads::commands_page(&fleet, &id, after, limit + 1).await?;
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|c| c.id.to_string())
    });
    let commands: Vec<CommandView> = page.into_iter().map(CommandView::from).collect();
    Ok(paged(&req, total, next.flatten().as_deref()).json(commands))
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands", params(("id" = u64, Path, description = "command id")), responses((status = 200, body = CommandView), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn get_command(caller: Caller, fleet: web::Data<Fleet>, path: web::Path<u64>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = path.into_inner();
    let record =
        service::reads::command(&fleet, id).await?.ok_or_else(|| HttpError::NotFound(format!("command {id}")))?;
    Ok(HttpResponse::Ok().json(CommandView::from(record)))
}

/// The API's OpenAPI document, generated from the handlers and views.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Outpost hub API", description = "Fleet state and actions. Bearer token in `Authorization`, checked before anything else of a request is read. Every error is JSON (`ApiError`); a method a path does not have is answered 405 with `Allow`, an unknown path 404. Failed authentication is limited per source address (`[http] failed_auth_burst` per `failed_auth_window`, default 20 per minute): past it, 429 with `Retry-After`. Bodies are at most 256 KiB."),
    paths(
        healthz, readyz, prometheus_metrics, list_alerts, list_silences, create_silence, end_silence, list_devices, get_overview, put_labels, readmit_device, revoke_device, post_bulk_command, patch_bulk_desired,
        list_tokens, create_token, revoke_token, create_link, get_audit, get_device, get_metrics, get_events, get_jobs, get_job_runs, get_peers,
        get_backups, delete_backups, verify_backups, prune_backups, grant_backups, get_desired, put_desired,
        patch_desired, list_commands, post_command, get_command
    ),
    components(schemas(
        crate::api::SampleSchema, crate::api::CommandStateView, crate::api::OutcomeView, crate::service::listing::Behind
    )),
    modifiers(&BearerAuth, &CommonErrors)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Adds the answers every operation under `/api/v1` may give to each:
/// 400 (a path, query or body that does not parse), 401, 429 (with
/// `Retry-After`), 503, and 413 and 415 where a body is read. A method a
/// path does not have gets 405 with `Allow` (said in the description, as
/// OpenAPI lists operations, not their absence).
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, header::Header, schema::Type};
        let error = |description: &str, retry: bool| -> RefOr<utoipa::openapi::Response> {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ApiError"))).build();
            let mut response = ResponseBuilder::new().description(description).content("application/json", content);
            if retry {
                let mut header = Header::new(utoipa::openapi::ObjectBuilder::new().schema_type(Type::Integer));
                header.description = Some("seconds to wait before the next attempt".into());
                response = response.header("Retry-After", header);
            }
            response.build().into()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/v1/") || path == "/api/v1/openapi.json" {
                continue;
            }
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                let body = op.request_body.is_some();
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str, retry: bool| {
                    responses.entry(status.to_owned()).or_insert_with(|| error(description, retry));
                };
                add("400", "a path, query or body that does not parse", false);
                add("401", "no or wrong bearer token", false);
                add("429", "too many failed authentications from this address", true);
                add("503", "the store is unavailable", false);
                if body {
                    add("413", "the body is over 256 KiB", false);
                    add("415", "the body is not sent as JSON", false);
                }
            }
        }
    }
}

/// `GET /api/v1/openapi.json` (open: it holds no fleet data).
async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// A resource answering `routes` (each a method and its handler); any
/// other method gets 405 naming the ones it has in `Allow`.
fn resource(path: &str, routes: Vec<(actix_web::http::Method, actix_web::Route)>) -> actix_web::Resource {
    let allow = routes.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", ");
    let mut resource = web::resource(path);
    for (method, route) in routes {
        resource = resource.route(route.method(method));
    }
    resource.default_service(web::to(move || {
        let allow = allow.clone();
        async move {
            HttpResponse::MethodNotAllowed()
                .insert_header(("Allow", allow.clone()))
                .json(ApiError { error: format!("this path answers {allow} only") })
        }
    }))
}

/// JSON answers for what actix-web's extractors refuse: a path part that
/// does not parse is no such thing (404), a query or body that does not
/// parse is 400, a body over [`MAX_BODY`] 413, a body not sent as JSON 415.
fn extractor_errors(cfg: &mut web::ServiceConfig) {
    use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
    let render = |e: HttpError, cause: actix_web::Error| -> actix_web::Error {
        let response = e.error_response();
        actix_web::error::InternalError::from_response(cause, response).into()
    };
    cfg.app_data(web::JsonConfig::default().limit(MAX_BODY).error_handler(move |err, _| {
        let e = match &err {
            JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
                HttpError::TooLarge(format!("the body is over {MAX_BODY} bytes"))
            }
            JsonPayloadError::ContentType => {
                HttpError::UnsupportedMediaType("send the body as application/json".into())
            }
            other => HttpError::BadRequest(other.to_string()),
        };
        render(e, err.into())
    }))
    .app_data(web::PayloadConfig::new(MAX_BODY))
    .app_data(web::QueryConfig::default().error_handler(move |err: QueryPayloadError, _| {
        render(HttpError::BadRequest(format!("the query is not understood: {err}")), err.into())
    }))
    .app_data(web::PathConfig::default().error_handler(move |err: PathError, req| {
        render(HttpError::NotFound(format!("{:?} ({err})", req.path())), err.into())
    }));
}

/// Registers the routes on an actix-web app.
pub fn routes(fleet: Arc<Fleet>) -> impl FnOnce(&mut web::ServiceConfig) {
    use actix_web::http::Method;
    move |cfg| {
        cfg.app_data(web::Data::from(fleet))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .service(resource("/metrics", vec![(Method::GET, web::route().to(prometheus_metrics))]))
            .route("/api/v1/openapi.json", web::get().to(openapi))
            .service(
                web::scope("/api/v1")
                    .configure(extractor_errors)
                    // The last wrap is the outermost: the audit log sees
                    // what authentication refused.
                    .wrap(actix_web::middleware::from_fn(bearer))
                    .wrap(actix_web::middleware::from_fn(audit))
                    .service(resource("/devices", vec![(Method::GET, web::route().to(list_devices))]))
                    .service(resource("/alerts", vec![(Method::GET, web::route().to(list_alerts))]))
                    .service(resource(
                        "/silences",
                        vec![
                            (Method::GET, web::route().to(list_silences)),
                            (Method::POST, web::route().to(create_silence)),
                        ],
                    ))
                    .service(resource("/silences/{id}", vec![(Method::DELETE, web::route().to(end_silence))]))
                    .service(resource("/overview", vec![(Method::GET, web::route().to(get_overview))]))
                    .service(resource("/devices/{id}/labels", vec![(Method::PUT, web::route().to(put_labels))]))
                    .service(resource("/devices/{id}/readmit", vec![(Method::POST, web::route().to(readmit_device))]))
                    .service(resource("/devices/{id}/revoke", vec![(Method::POST, web::route().to(revoke_device))]))
                    .service(resource("/commands", vec![(Method::POST, web::route().to(post_bulk_command))]))
                    .service(resource("/desired", vec![(Method::PATCH, web::route().to(patch_bulk_desired))]))
                    .service(resource(
                        "/tokens",
                        vec![
                            (Method::GET, web::route().to(list_tokens)),
                            (Method::POST, web::route().to(create_token)),
                        ],
                    ))
                    .service(resource("/tokens/{id}", vec![(Method::DELETE, web::route().to(revoke_token))]))
                    .service(resource("/console/links", vec![(Method::POST, web::route().to(create_link))]))
                    .service(resource("/audit", vec![(Method::GET, web::route().to(get_audit))]))
                    .service(resource("/devices/{id}", vec![(Method::GET, web::route().to(get_device))]))
                    .service(resource("/devices/{id}/metrics", vec![(Method::GET, web::route().to(get_metrics))]))
                    .service(resource("/devices/{id}/events", vec![(Method::GET, web::route().to(get_events))]))
                    .service(resource("/devices/{id}/jobs", vec![(Method::GET, web::route().to(get_jobs))]))
                    .service(resource(
                        "/devices/{id}/jobs/{name}/runs",
                        vec![(Method::GET, web::route().to(get_job_runs))],
                    ))
                    .service(resource("/devices/{id}/peers", vec![(Method::GET, web::route().to(get_peers))]))
                    .service(resource(
                        "/devices/{id}/backups",
                        vec![
                            (Method::GET, web::route().to(get_backups)),
                            (Method::DELETE, web::route().to(delete_backups)),
                        ],
                    ))
                    .service(resource(
                        "/devices/{id}/backups/verify",
                        vec![(Method::POST, web::route().to(verify_backups))],
                    ))
                    .service(resource(
                        "/devices/{id}/backups/prune",
                        vec![(Method::POST, web::route().to(prune_backups))],
                    ))
                    .service(resource(
                        "/devices/{id}/backups/grants",
                        vec![(Method::POST, web::route().to(grant_backups))],
                    ))
                    .service(resource(
                        "/devices/{id}/desired",
                        vec![
                            (Method::GET, web::route().to(get_desired)),
                            (Method::PUT, web::route().to(put_desired)),
                            (Method::PATCH, web::route().to(patch_desired)),
                        ],
                    ))
                    .service(resource(
                        "/devices/{id}/commands",
                        vec![
                            (Method::GET, web::route().to(list_commands)),
                            (Method::POST, web::route().to(post_command)),
                        ],
                    ))
                    .service(resource("/commands/{id}", vec![(Method::GET, web::route().to(get_command))]))
                    .default_service(web::to(|| async {
                        HttpError::NotFound("no such API path; see /api/v1/openapi.json".into()).error_response()
                    })),
            );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_from_the_caller_is_kept_only_when_plain() {
        for good in ["abc", "0f3a-77_x.y", &"a".repeat(64)] {
            assert!(request_id_acceptable(good), "{good}");
        }
        for bad in ["", &"a".repeat(65), "a b", "x\r\nSet-Cookie: y", "id\u{1b}[31m", "ü"] {
            assert!(!request_id_acceptable(bad), "{bad:?}");
        }
    }
}
