//! The HTTP API (actix-web): `/api/v1/...` behind bearer tokens, `/healthz`
//! open.
//!
//! A bearer token is looked up by its SHA-256; the secret itself is never
//! stored. Missing or wrong tokens get 401 with a JSON body.

use crate::api::DeviceView;
use crate::api::{ApiError, CommandView, EventView};
use crate::api::{BackupsDeleted, BackupsView, GrantRequest, GrantView};
use crate::api::{
    CommandRequest, DesiredPut, DesiredView, JobRunView, JobView, JobsView, LimitQuery, MetricsQuery, MetricsView,
    PeersView, SampleView,
};
use crate::backups::{BackupStoreError, SnapshotView};
use crate::fleet::Fleet;
use crate::service;
use crate::store::{ApiToken, Role, StoreError, TelemetryRange};
use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use std::sync::Arc;

/// SHA-256 of a bearer token, the key it is stored under.
pub fn token_hash(secret: &str) -> [u8; 32] {
    outpost_shared::Fingerprint::of_der(secret.as_bytes()).0
}

/// An API failure, rendered as `{"error": "..."}` with a status.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
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
            service::ServiceError::Store(e) => e.into(),
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match self {
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            HttpError::Conflict { .. } => StatusCode::CONFLICT,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let HttpError::Internal(e) = self {
            tracing::error!(error = %e, "API call failed.");
        }
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, HttpError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(ApiError { error: self.to_string() })
    }
}

/// An authenticated API caller.
#[derive(Debug)]
pub struct Caller {
    /// The token's record.
    pub token: ApiToken,
}

impl Caller {
    /// Fails unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), HttpError> {
        if self.token.role >= role { Ok(()) } else { Err(HttpError::Forbidden(role)) }
    }
}

impl FromRequest for Caller {
    type Error = HttpError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, HttpError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let fleet = req.app_data::<web::Data<Fleet>>().cloned();
        let secret = req
            .headers()
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|s| s.trim().to_owned());
        Box::pin(async move {
            let (Some(fleet), Some(secret)) = (fleet, secret) else {
                return Err(HttpError::Unauthorized);
            };
            let token = fleet.store().api_token(&token_hash(&secret)).await?;
            token.map(|token| Caller { token }).ok_or(HttpError::Unauthorized)
        })
    }
}

/// `/healthz`: the process serves, and its store's state as last seen: 200
/// `ok`, or 503 naming the store's fault (a full disk, the database gone),
/// so monitoring and systemd see a hub that cannot store.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "200 ok, or 503 naming the store's fault", body = String, content_type = "text/plain"), (status = 503, body = String, content_type = "text/plain")))]
async fn healthz(fleet: web::Data<Fleet>) -> HttpResponse {
    health_response(fleet.store().health())
}

/// `/readyz`: whether the hub can make a write durable now (a small write
/// and its sync, or a database round trip); 503 while it cannot.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "200 when a write can be made durable now, else 503", body = String, content_type = "text/plain"), (status = 503, body = String, content_type = "text/plain")))]
async fn readyz(fleet: web::Data<Fleet>) -> HttpResponse {
    health_response(fleet.store().probe().await)
}

fn health_response(health: crate::store::Health) -> HttpResponse {
    match health.error {
        None => HttpResponse::Ok().content_type("text/plain").body("ok\n"),
        Some(error) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("store ({}) cannot make writes durable: {error}\n", health.backend)),
    }
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", responses((status = 200, body = [DeviceView]), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn list_devices(caller: Caller, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    Ok(HttpResponse::Ok().json(fleet.devices().await?))
}

/// Parses a device id from the path and checks the device exists.
async fn known_device(fleet: &Fleet, raw: &str) -> Result<DeviceId, HttpError> {
    Ok(service::device(fleet, raw).await?)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceView), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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

/// Reads a time bound: milliseconds since the epoch, or RFC 3339.
fn time_bound(text: &str) -> Result<Timestamp, HttpError> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(Timestamp(ms));
    }
    humantime::parse_rfc3339_weak(text).map(Timestamp::from_system).map_err(|_| {
        HttpError::Unprocessable(format!("invalid time {text:?}: use RFC 3339 or milliseconds since the epoch"))
    })
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/metrics", tag = "devices", params(("id" = String, Path, description = "device id"), MetricsQuery), responses((status = 200, body = MetricsView), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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
    let samples: Vec<SampleView> = fleet
        .store()
        .telemetry(&id, &range)
        .await?
        .into_iter()
        .map(|(seq, sample)| SampleView::new(seq, sample))
        .collect();
    let next = (samples.len() == limit).then(|| samples.last().map(crate::api::metrics_cursor)).flatten();
    Ok(HttpResponse::Ok().json(MetricsView { device: id.to_string(), samples, next }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", params(("id" = String, Path, description = "device id"), LimitQuery), responses((status = 200, description = "newest first", body = [EventView]), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn get_events(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    query: web::Query<LimitQuery>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let limit = query.limit.unwrap_or(1000).min(1_000_000);
    let events: Vec<EventView> = fleet.store().events(&id, limit).await?.into_iter().map(EventView::from).collect();
    Ok(HttpResponse::Ok().json(events))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/jobs", tag = "jobs", params(("id" = String, Path, description = "device id")), responses((status = 200, body = JobsView), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn get_jobs(caller: Caller, fleet: web::Data<Fleet>, path: web::Path<String>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let store = fleet.store();
    let record = store.jobs(&id).await?;
    let now = Timestamp::now();
    let mut jobs = Vec::new();
    for (spec, source) in record.as_ref().map(|r| r.jobs.as_slice()).unwrap_or_default() {
        let last = store.job_runs(&id, &spec.name, 1).await?.pop();
        jobs.push(JobView::new(spec, *source, last, now));
    }
    Ok(HttpResponse::Ok().json(JobsView { device: id.to_string(), reported_at: record.map(|r| r.at.rfc3339()), jobs }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/peers", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = PeersView), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn get_peers(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let record = fleet.store().peers(&id).await?;
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
    work: impl FnOnce(&crate::backups::Backups, &DeviceId) -> Result<T, BackupStoreError> + Send + 'static,
) -> Result<T, HttpError> {
    let (backups, id) = (fleet.backups().clone(), id.clone());
    web::block(move || work(&backups, &id))
        .await
        .map_err(|e| HttpError::Unprocessable(format!("request failed: {e}")))?
        .map_err(Into::into)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/backups", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = BackupsView), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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

#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/verify", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = crate::backups::VerifyReport), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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

#[utoipa::path(delete, path = "/api/v1/devices/{id}/backups", tag = "backups", params(("id" = String, Path, description = "device id")), responses((status = 200, body = BackupsDeleted), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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
#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/prune", tag = "backups", params(("id" = String, Path, description = "device id"), PruneQuery), responses((status = 200, body = crate::backups::PruneReport), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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

#[utoipa::path(post, path = "/api/v1/devices/{id}/backups/grants", tag = "backups", params(("id" = String, Path, description = "device id")), request_body = GrantRequest, responses((status = 201, body = GrantView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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

#[utoipa::path(get, path = "/api/v1/devices/{id}/jobs/{name}/runs", tag = "jobs", params(("id" = String, Path, description = "device id"), ("name" = String, Path, description = "job name"), LimitQuery), responses((status = 200, description = "newest first", body = [JobRunView]), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
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
        fleet.store().job_runs(&id, &job, limit).await?.into_iter().map(JobRunView::from).collect();
    Ok(HttpResponse::Ok().json(runs))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DesiredView), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn get_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let store = fleet.store();
    Ok(HttpResponse::Ok().json(DesiredView::new(store.desired(&id).await?, store.reported(&id).await?)))
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), request_body = DesiredPut, responses((status = 200, body = DesiredView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 409, description = "changed since the version given", body = ApiError), (status = 422, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn put_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    body: web::Json<DesiredPut>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let DesiredPut { version, doc } = body.into_inner();
    Ok(HttpResponse::Ok().json(service::set_desired(&fleet, &caller.token.name, &id, version, &doc).await?))
}

/// `PATCH /devices/{id}/desired`: a JSON merge patch (RFC 7396) on the
/// current document (`null` removes a key), validated like `PUT`, stored as
/// the next version. Retried on a concurrent change, so a patch never
/// undoes another caller's change to keys it does not name.
#[utoipa::path(patch, path = "/api/v1/devices/{id}/desired", tag = "desired", params(("id" = String, Path, description = "device id")), request_body(content = Object, content_type = "application/merge-patch+json", description = "JSON merge patch (RFC 7396)"), responses((status = 200, body = DesiredView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn patch_desired(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let patch: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| HttpError::Unprocessable(format!("the patch is not JSON: {e}")))?;
    Ok(HttpResponse::Ok().json(service::patch_desired(&fleet, &caller.token.name, &id, &patch).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "device id")), request_body = CommandRequest, responses((status = 201, body = CommandView), (status = 403, body = ApiError), (status = 404, description = "no such device", body = ApiError), (status = 422, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn post_command(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
    body: web::Json<CommandRequest>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Operator)?;
    let id = known_device(&fleet, &path).await?;
    let view = service::send_command(&fleet, &caller.token.name, &id, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(view))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "device id")), responses((status = 200, description = "oldest first", body = [CommandView]), (status = 404, description = "no such device", body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn list_commands(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = known_device(&fleet, &path).await?;
    let commands: Vec<CommandView> =
        fleet.store().device_commands(&id).await?.into_iter().map(CommandView::from).collect();
    Ok(HttpResponse::Ok().json(commands))
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands", params(("id" = u64, Path, description = "command id")), responses((status = 200, body = CommandView), (status = 404, body = ApiError), (status = 401, description = "no or wrong bearer token", body = ApiError), (status = 503, description = "the store is unavailable", body = ApiError)), security(("bearer" = [])))]
async fn get_command(caller: Caller, fleet: web::Data<Fleet>, path: web::Path<u64>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let id = path.into_inner();
    let record = fleet.store().command(id).await?.ok_or_else(|| HttpError::NotFound(format!("command {id}")))?;
    Ok(HttpResponse::Ok().json(CommandView::from(record)))
}

/// The API's OpenAPI document, generated from the handlers and views.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Outpost hub API", description = "Fleet state and actions. Bearer token in `Authorization`."),
    paths(
        healthz, readyz, list_devices, get_device, get_metrics, get_events, get_jobs, get_job_runs, get_peers,
        get_backups, delete_backups, verify_backups, prune_backups, grant_backups, get_desired, put_desired,
        patch_desired, list_commands, post_command, get_command
    ),
    components(schemas(crate::api::SampleSchema, crate::api::CommandStateView, crate::api::OutcomeView)),
    modifiers(&BearerAuth)
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

/// `GET /api/v1/openapi.json` (open: it holds no fleet data).
async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// Registers the routes on an actix-web app.
pub fn routes(fleet: Arc<Fleet>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(fleet))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/api/v1/openapi.json", web::get().to(openapi))
            .service(
                web::scope("/api/v1")
                    .app_data(web::JsonConfig::default().limit(256 << 10).error_handler(|err, _| {
                        let message = err.to_string();
                        actix_web::error::InternalError::from_response(
                            err,
                            HttpResponse::BadRequest().json(crate::api::ApiError { error: message }),
                        )
                        .into()
                    }))
                    .route("/devices", web::get().to(list_devices))
                    .route("/devices/{id}", web::get().to(get_device))
                    .route("/devices/{id}/metrics", web::get().to(get_metrics))
                    .route("/devices/{id}/events", web::get().to(get_events))
                    .route("/devices/{id}/jobs", web::get().to(get_jobs))
                    .route("/devices/{id}/jobs/{name}/runs", web::get().to(get_job_runs))
                    .route("/devices/{id}/peers", web::get().to(get_peers))
                    .route("/devices/{id}/backups", web::get().to(get_backups))
                    .route("/devices/{id}/backups", web::delete().to(delete_backups))
                    .route("/devices/{id}/backups/verify", web::post().to(verify_backups))
                    .route("/devices/{id}/backups/prune", web::post().to(prune_backups))
                    .route("/devices/{id}/backups/grants", web::post().to(grant_backups))
                    .route("/devices/{id}/desired", web::get().to(get_desired))
                    .route("/devices/{id}/desired", web::put().to(put_desired))
                    .route("/devices/{id}/desired", web::patch().to(patch_desired))
                    .route("/devices/{id}/commands", web::get().to(list_commands))
                    .route("/devices/{id}/commands", web::post().to(post_command))
                    .route("/commands/{id}", web::get().to(get_command)),
            );
    }
}
