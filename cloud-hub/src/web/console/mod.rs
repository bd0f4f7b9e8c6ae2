//! The fleet console: server-rendered HTML (askama templates, escaped by
//! default), one small script of ours and uPlot for charts, all embedded in
//! the hub's binary. It goes through the same service layer, roles and
//! audit log as the API; the session is a console session token (its own,
//! made at sign-in) in an HttpOnly,
//! SameSite=Strict cookie and every form carries a token derived from it
//! (CSRF). Pages never hold the whole fleet: the device list is a cursor
//! page, and only its visible rows get live updates (server-sent events
//! carrying changed rows).

mod commands;
mod pages;
pub mod series;

use crate::service::fleet::Fleet;
use crate::store::Role;
use crate::web::http::{AuditWho, Caller, HttpError, authenticate};
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, web};

/// What the page header shows of the signed-in user.
pub struct Nav {
    name: String,
    role: &'static str,
    csrf: String,
    operator: bool,
}

impl From<&User> for Nav {
    fn from(u: &User) -> Self {
        Nav { name: u.name().to_owned(), role: u.role(), csrf: u.csrf.clone(), operator: u.operator() }
    }
}

/// A page's answer: its HTML, never cached.
fn html(t: &impl askama::Template) -> Result<HttpResponse, ConsoleError> {
    let body = t.render().map_err(|e| ConsoleError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body))
}

/// Name of the session cookie.
pub const COOKIE: &str = "outpost_session";

/// Content-Security-Policy of every console answer: scripts and styles only
/// from the hub's own files, no inline script, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Files the console serves, embedded: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("console.js", "text/javascript; charset=utf-8", include_bytes!("../../../assets/console.js")),
    ("console.css", "text/css; charset=utf-8", include_bytes!("../../../assets/console.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_bytes!("../../../assets/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../../../assets/uPlot.min.css")),
];

/// A signed-in console user.
#[derive(Debug)]
pub struct User {
    /// The API caller behind the session.
    pub caller: Caller,
    /// The form token of this session.
    pub csrf: String,
}

impl User {
    /// Token name.
    pub fn name(&self) -> &str {
        &self.caller.token.name
    }

    /// True if the user's role allows acting on devices.
    pub fn operator(&self) -> bool {
        self.caller.token.role >= Role::Operator
    }

    /// True if the user's role is admin.
    pub fn admin(&self) -> bool {
        self.caller.token.role >= Role::Admin
    }

    /// `viewer`, `operator` or `admin`.
    pub fn role(&self) -> &'static str {
        self.caller.token.role.name()
    }

    /// Fails unless the role allows `role`'s actions and the form's token
    /// is this session's.
    pub fn may_act(&self, role: Role, csrf: &str) -> Result<(), ConsoleError> {
        if !same(csrf, &self.csrf) {
            return Err(ConsoleError::Forbidden("the form is stale or forged; reload the page and try again".into()));
        }
        self.caller.require(role).map_err(|e| ConsoleError::Forbidden(e.to_string()))
    }
}

/// The form token of a session: derived from its secret, so it needs no
/// storage and no other site can know it.
pub fn csrf_token(secret: &str) -> String {
    let key = blake3::derive_key("outpost console 2026 form token", secret.as_bytes());
    key[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two strings in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Not signed in: go to the sign-in page.
    #[error("sign in first")]
    SignIn(String),
    /// Signed in, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// Too many failed sign-ins from this address; retry after the time.
    #[error("too many failed attempts from this address; retry in {} s", .0.as_secs())]
    Throttled(std::time::Duration),
    /// No such page or device.
    #[error("{0}")]
    NotFound(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The store cannot answer now.
    #[error("the hub cannot answer now; retry in a moment ({0})")]
    Unavailable(String),
    /// Anything else.
    #[error("internal error")]
    Internal(String),
}

impl From<HttpError> for ConsoleError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Unauthorized => ConsoleError::SignIn(String::new()),
            HttpError::Forbidden(_) => ConsoleError::Forbidden(e.to_string()),
            HttpError::Throttled(wait) => ConsoleError::Throttled(wait),
            HttpError::NotFound(m) => ConsoleError::NotFound(format!("{m} not found")),
            HttpError::Unavailable(m) => ConsoleError::Unavailable(m),
            HttpError::Internal(e) => ConsoleError::Internal(e.to_string()),
            other => ConsoleError::Invalid(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ConsoleError {
    fn from(e: crate::store::StoreError) -> Self {
        HttpError::from(e).into()
    }
}

impl From<crate::service::ServiceError> for ConsoleError {
    fn from(e: crate::service::ServiceError) -> Self {
        HttpError::from(e).into()
    }
}

impl actix_web::ResponseError for ConsoleError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        use actix_web::http::StatusCode;
        match self {
            ConsoleError::SignIn(_) => StatusCode::SEE_OTHER,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ConsoleError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ConsoleError::SignIn(next) = self {
            let to = if next.is_empty() {
                "/console/sign-in".to_owned()
            } else {
                format!("/console/sign-in?next={}", crate::api::encode_component(next))
            };
            return HttpResponse::SeeOther().insert_header((header::LOCATION, to)).finish();
        }
        if let ConsoleError::Internal(e) = self {
            tracing::error!(error = %e, "Console request failed.");
        }
        let mut page = pages::error_page(self.status_code(), &self.to_string());
        if let ConsoleError::Throttled(wait) = self
            && let Ok(value) = header::HeaderValue::from_str(&wait.as_secs().to_string())
        {
            page.headers_mut().insert(header::RETRY_AFTER, value);
        }
        page
    }
}

impl FromRequest for User {
    type Error = ConsoleError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, ConsoleError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let next = match req.query_string() {
                "" => req.path().to_owned(),
                q => format!("{}?{q}", req.path()),
            };
            let Some(fleet) = req.app_data::<web::Data<Fleet>>().cloned() else {
                return Err(ConsoleError::Internal("no fleet".into()));
            };
            let Some(secret) = req.cookie(COOKIE).map(|c| c.value().to_owned()) else {
                return Err(ConsoleError::SignIn(next));
            };
            let caller = authenticate(&fleet, &req, &secret, crate::store::TokenKind::ConsoleSession).await.map_err(
                |e| match e {
                    HttpError::Unauthorized => ConsoleError::SignIn(next),
                    other => other.into(),
                },
            )?;
            Ok(User { caller, csrf: csrf_token(&secret) })
        })
    }
}

/// The session cookie holding `secret` (`None`: the cookie that removes it).
pub fn session_cookie(req: &HttpRequest, secret: Option<&str>) -> Cookie<'static> {
    let mut cookie = Cookie::build(COOKIE, secret.unwrap_or_default().to_owned())
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(req.connection_info().scheme() == "https")
        .finish();
    match secret {
        Some(_) => cookie.set_max_age(actix_web::cookie::time::Duration::hours(12)),
        None => cookie.make_removal(),
    }
    cookie
}

/// Refuses a form posted from another origin: the browser names the page's
/// origin on every POST, and it must be this hub's.
async fn same_origin(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let post = req.method() == actix_web::http::Method::POST;
    let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_owned);
    if post && let Some(origin) = origin {
        let host = req.connection_info().host().to_owned();
        let ok = origin.split_once("://").is_some_and(|(_, rest)| rest == host);
        if !ok {
            req.extensions_mut().insert(AuditWho("-".into()));
            let (http_req, _) = req.into_parts();
            let response = pages::error_page(
                actix_web::http::StatusCode::FORBIDDEN,
                &format!("a form from {origin} may not act on this hub"),
            );
            return Ok(actix_web::dev::ServiceResponse::new(http_req, response).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Adds the console's security headers to every answer under it.
async fn security_headers(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let mut res = next.call(req).await?;
    let headers = res.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ] {
        headers.insert(header::HeaderName::from_static(name), header::HeaderValue::from_static(value));
    }
    Ok(res)
}

/// `GET /console/static/{name}`: an embedded file, cached by the browser
/// (revalidated by its ETag).
async fn asset(req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    let Some((_, kind, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == path.as_str()) else {
        return HttpResponse::NotFound().finish();
    };
    let etag = format!("\"{}\"", &blake3::hash(bytes).to_hex()[..16]);
    let fresh = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str());
    let mut response = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600, must-revalidate"));
    if fresh { response.finish() } else { response.content_type(*kind).body(*bytes) }
}

/// Registers the console under `/console` (and `/` sends there).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/",
        web::get().to(|| async { HttpResponse::SeeOther().insert_header((header::LOCATION, "/console/")).finish() }),
    )
    .service(
        web::scope("/console")
            // The last wrap is the outermost: headers on every answer,
            // then the audit log, which sees the origin check's refusals.
            .wrap(actix_web::middleware::from_fn(same_origin))
            .wrap(actix_web::middleware::from_fn(crate::web::http::audit))
            .wrap(actix_web::middleware::from_fn(security_headers))
            .app_data(web::FormConfig::default().limit(256 << 10))
            .route("/static/{name}", web::get().to(asset))
            .configure(pages::routes)
            .configure(commands::routes)
            .default_service(web::route().to(not_found)),
    );
}

/// Any other path under `/console`: a page that says so, inside the
/// console's layout.
async fn not_found(req: HttpRequest) -> HttpResponse {
    pages::error_page(actix_web::http::StatusCode::NOT_FOUND, &format!("No page at {}.", req.path()))
}
