//! The HTTP API (actix-web): `/api/v1/...` behind bearer tokens, `/healthz`
//! open.
//!
//! A bearer token is looked up by its SHA-256; the secret itself is never
//! stored. Missing or wrong tokens get 401 with a JSON body.

use crate::api::ApiError;
use crate::fleet::Fleet;
use crate::store::{ApiToken, Role};
use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use outpost_shared::DeviceId;
use std::future::{Ready, ready};
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
    /// The hub's store failed.
    #[error("internal error")]
    Internal(#[from] crate::store::StoreError),
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match self {
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
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
        response.json(ApiError {
            error: self.to_string(),
        })
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
        if self.token.role >= role {
            Ok(())
        } else {
            Err(HttpError::Forbidden(role))
        }
    }
}

impl FromRequest for Caller {
    type Error = HttpError;
    type Future = Ready<Result<Self, HttpError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let lookup = || {
            let fleet = req
                .app_data::<web::Data<Fleet>>()
                .ok_or(HttpError::Unauthorized)?;
            let header = req
                .headers()
                .get("authorization")
                .ok_or(HttpError::Unauthorized)?;
            let secret = header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or(HttpError::Unauthorized)?;
            let token = fleet.store().api_token(&token_hash(secret.trim()))?;
            token
                .map(|token| Caller { token })
                .ok_or(HttpError::Unauthorized)
        };
        ready(lookup())
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn list_devices(caller: Caller, fleet: web::Data<Fleet>) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    Ok(HttpResponse::Ok().json(fleet.devices()?))
}

async fn get_device(
    caller: Caller,
    fleet: web::Data<Fleet>,
    path: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    caller.require(Role::Viewer)?;
    let raw = path.into_inner();
    let not_found = || HttpError::NotFound(format!("device {raw:?}"));
    let id: DeviceId = raw.parse().map_err(|_| not_found())?;
    let view = fleet.device(&id)?.ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(view))
}

/// Registers the routes on an actix-web app.
pub fn routes(fleet: Arc<Fleet>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(fleet))
            .route("/healthz", web::get().to(healthz))
            .service(
                web::scope("/api/v1")
                    .route("/devices", web::get().to(list_devices))
                    .route("/devices/{id}", web::get().to(get_device)),
            );
    }
}
