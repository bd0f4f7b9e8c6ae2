//! A small blocking client of the hub's HTTP API, and the fleet table both
//! `outpostctl` and the demo print.

use crate::api::{ApiError, CommandRequest, DesiredPut, DesiredView, DeviceView, JobRunView, JobsView, MetricsView};
use crate::api::{CommandView, EventView, PeerView};
use std::time::Duration;

/// A path segment or query value, percent-encoded.
pub fn seg(text: &str) -> String {
    crate::api::encode_component(text)
}

/// The hub's base URL from what a user typed: `http://` is added when no
/// scheme is given, a trailing `/` dropped.
pub fn base_url(text: &str) -> String {
    let text = text.trim().trim_end_matches('/');
    if text.contains("://") { text.to_owned() } else { format!("http://{text}") }
}

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub could not be reached or answered garbage.
    #[error("request to {url} failed: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// The cause.
        source: Box<ureq::Error>,
    },
    /// The hub's answer does not have the expected shape.
    #[error("{url}: unexpected answer: {message}")]
    Decode {
        /// The URL.
        url: String,
        /// What did not fit.
        message: String,
    },
    /// The hub answered with an error status.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The hub's explanation.
        message: String,
    },
}

/// API client for one hub and one bearer token.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the hub at `base` (`http://127.0.0.1:8080`; without a
    /// scheme, `hub.example:8080`, http is meant).
    pub fn new(base: &str, token: &str) -> Self {
        // An https:// hub with a certificate from a public CA: the
        // system's CAs (Debian's ca-certificates, or SSL_CERT_FILE), read
        // only when they can be needed.
        let roots = if base_url(base).starts_with("https://") {
            let system = rustls_native_certs::load_native_certs().certs;
            system.iter().map(|der| ureq::tls::Certificate::from_der(der).to_owned()).collect()
        } else {
            Vec::new()
        };
        Self::build(base, token, roots)
    }

    /// A client of a hub that serves HTTPS with a certificate from a
    /// private CA: `ca_file` holds that CA (PEM). Without it, an `https://`
    /// hub must have a certificate the public web trusts.
    pub fn with_ca(base: &str, token: &str, ca_file: &std::path::Path) -> Result<Self, String> {
        let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => roots.push(cert),
                Ok(_) => {}
                Err(e) => return Err(format!("{}: {e}", ca_file.display())),
            }
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate in the file", ca_file.display()));
        }
        Ok(Self::build(base, token, roots))
    }

    fn build(base: &str, token: &str, roots: Vec<ureq::tls::Certificate<'static>>) -> Self {
        let tls = ureq::tls::TlsConfig::builder()
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::from(roots))
            .build();
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .tls_config(tls)
            .build();
        Client { base: base_url(base), token: token.to_owned(), agent: config.into() }
    }

    /// The hub's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/overview`
    pub fn overview(&self) -> Result<crate::service::listing::Overview, ClientError> {
        self.get("/api/v1/overview")
    }

    /// `PUT /api/v1/devices/{id}/labels`
    pub fn set_labels(&self, id: &str, labels: &crate::store::Labels) -> Result<DeviceView, ClientError> {
        let body = serde_json::to_value(labels).unwrap_or_default();
        self.call("PUT", &format!("/api/v1/devices/{}/labels", seg(id)), Some(body))
    }

    /// `POST /api/v1/devices/{id}/readmit`: lets a device whose certificate
    /// expired in to renew it, within `within` (default 7 days).
    pub fn readmit(&self, id: &str, within: Option<&str>) -> Result<DeviceView, ClientError> {
        let body =
            serde_json::to_value(crate::api::ReadmitRequest { within: within.map(str::to_owned) }).unwrap_or_default();
        self.call("POST", &format!("/api/v1/devices/{}/readmit", seg(id)), Some(body))
    }

    /// `POST /api/v1/devices/{id}/revoke`: refuses the device for good and
    /// closes its connections.
    pub fn revoke(&self, id: &str) -> Result<DeviceView, ClientError> {
        self.call("POST", &format!("/api/v1/devices/{}/revoke", seg(id)), Some(serde_json::json!({})))
    }

    /// `POST /api/v1/commands`: one command per device `selector` matches.
    pub fn bulk_command(
        &self,
        selector: &str,
        request: &CommandRequest,
        dry_run: bool,
    ) -> Result<crate::api::BulkView, ClientError> {
        let body = serde_json::to_value(crate::api::BulkCommandRequest {
            selector: selector.to_owned(),
            command: request.clone(),
            dry_run,
        })
        .unwrap_or_default();
        self.call("POST", "/api/v1/commands", Some(body))
    }

    /// `PATCH /api/v1/desired?selector=...`
    pub fn bulk_desired(
        &self,
        selector: &str,
        patch: serde_json::Value,
        dry_run: bool,
    ) -> Result<crate::api::BulkView, ClientError> {
        self.call("PATCH", &format!("/api/v1/desired?selector={}&dry_run={dry_run}", seg(selector)), Some(patch))
    }

    /// `GET /api/v1/tokens`
    pub fn tokens(&self) -> Result<Vec<crate::api::TokenView>, ClientError> {
        self.get("/api/v1/tokens")
    }

    /// `GET /api/v1/alerts?limit=`
    pub fn alerts(&self, limit: usize) -> Result<Vec<crate::api::AlertView>, ClientError> {
        self.alerts_where(limit, None, None)
    }

    /// `GET /api/v1/alerts?limit=&state=&device=`: only alerts in `state`
    /// (`firing`, `pending`, `resolved`) and of `device` (id or name).
    pub fn alerts_where(
        &self,
        limit: usize,
        state: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<crate::api::AlertView>, ClientError> {
        let mut path = format!("/api/v1/alerts?limit={limit}");
        if let Some(state) = state {
            path.push_str(&format!("&state={}", seg(state)));
        }
        if let Some(device) = device {
            path.push_str(&format!("&device={}", seg(device)));
        }
        self.get(&path)
    }

    /// `GET /api/v1/silences`
    pub fn silences(&self) -> Result<Vec<crate::api::SilenceView>, ClientError> {
        self.get("/api/v1/silences")
    }

    /// `POST /api/v1/silences`
    pub fn silence(&self, request: &crate::api::SilenceRequest) -> Result<crate::api::SilenceView, ClientError> {
        self.call("POST", "/api/v1/silences", Some(serde_json::to_value(request).unwrap_or_default()))
    }

    /// `DELETE /api/v1/silences/{id}`
    pub fn end_silence(&self, id: &str) -> Result<crate::api::SilenceView, ClientError> {
        self.call("DELETE", &format!("/api/v1/silences/{}", seg(id)), None)
    }

    /// `POST /api/v1/tokens`: the answer holds the secret, once.
    pub fn create_token(&self, name: &str, role: &str, expires_in: &str) -> Result<crate::api::TokenView, ClientError> {
        let body = serde_json::json!({"name": name, "role": role, "expires_in": expires_in});
        self.call("POST", "/api/v1/tokens", Some(body))
    }

    /// `DELETE /api/v1/tokens/{id}` (id or name).
    pub fn revoke_token(&self, which: &str) -> Result<crate::api::TokenView, ClientError> {
        self.call("DELETE", &format!("/api/v1/tokens/{}", seg(which)), None)
    }

    /// `GET /api/v1/audit?...` (`query` already encoded).
    pub fn audit(&self, query: &str) -> Result<crate::api::AuditPage, ClientError> {
        self.get(&format!("/api/v1/audit?{query}"))
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let (status, value) = self.raw(method, path, body)?;
        if !(200..300).contains(&status) {
            let message =
                serde_json::from_value::<ApiError>(value).map(|e| e.error).unwrap_or_else(|_| "no explanation".into());
            return Err(ClientError::Status { url, status, message });
        }
        serde_json::from_value(value).map_err(|e| ClientError::Decode { url, message: e.to_string() })
    }

    /// `GET /healthz` or `/readyz` (`check`): the status and the hub's text.
    pub fn health(&self, check: &str) -> Result<(u16, String), ClientError> {
        let url = format!("{}/{check}", self.base);
        let transport = |e: ureq::Error| ClientError::Transport { url: url.clone(), source: Box::new(e) };
        let mut response = self.agent.get(&url).call().map_err(transport)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(transport)?;
        Ok((status, text))
    }

    /// Any call, answered as its status and JSON body (`null` if the body
    /// is not JSON): for scripts and the API's own tests.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let transport = |e: ureq::Error| ClientError::Transport { url: url.clone(), source: Box::new(e) };
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("PUT", Some(b)) => self.agent.put(&url).header("Authorization", &auth).send_json(b),
            ("PATCH", Some(b)) => self
                .agent
                .patch(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/merge-patch+json")
                .send(b.to_string()),
            (_, b) => self.agent.post(&url).header("Authorization", &auth).send_json(b.unwrap_or_default()),
        };
        let mut response = result.map_err(transport)?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(256 << 20).read_to_string().map_err(transport)?;
        Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None)
    }

    /// `GET /api/v1/devices/{id}/metrics`
    pub fn metrics(
        &self,
        id: &str,
        since: Option<&str>,
        until: Option<&str>,
        limit: Option<usize>,
    ) -> Result<MetricsView, ClientError> {
        let want = limit.unwrap_or(usize::MAX);
        let mut all = MetricsView { device: id.to_owned(), samples: Vec::new(), next: None };
        self.metrics_pages(id, since, until, |page| {
            let room = want - all.samples.len();
            let done = page.samples.len() >= room;
            all.samples.extend(page.samples.into_iter().take(room));
            all.next = page.next;
            !done
        })?;
        Ok(all)
    }

    /// Reads a device's telemetry page by page (at most
    /// [`crate::api::MAX_METRICS_PAGE`] samples each), handing each page to
    /// `page` until it returns false or the history ends: memory stays one
    /// page however long the history.
    pub fn metrics_pages(
        &self,
        id: &str,
        since: Option<&str>,
        until: Option<&str>,
        mut page: impl FnMut(MetricsView) -> bool,
    ) -> Result<(), ClientError> {
        let mut query = Vec::new();
        if let Some(s) = since {
            query.push(format!("since={}", seg(s)));
        }
        if let Some(u) = until {
            query.push(format!("until={}", seg(u)));
        }
        let mut after: Option<String> = None;
        loop {
            let mut q = query.clone();
            if let Some(cursor) = &after {
                q.push(format!("after={}", seg(cursor)));
            }
            let view: MetricsView = self.get(&format!("/api/v1/devices/{}/metrics?{}", seg(id), q.join("&")))?;
            let next = view.next.clone();
            if !page(view) {
                return Ok(());
            }
            match next {
                Some(cursor) => after = Some(cursor),
                None => return Ok(()),
            }
        }
    }

    /// `GET /api/v1/devices/{id}/events`
    pub fn events(&self, id: &str, limit: usize) -> Result<Vec<EventView>, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}/events?limit={limit}"))
    }

    /// `GET /api/v1/devices/{id}/jobs`
    pub fn jobs(&self, id: &str) -> Result<JobsView, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}/jobs"))
    }

    /// `GET /api/v1/devices/{id}/peers`.
    pub fn peers(&self, id: &str) -> Result<crate::api::PeersView, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}/peers"))
    }

    /// `GET /api/v1/devices/{id}/backups`.
    pub fn backups(&self, id: &str) -> Result<crate::api::BackupsView, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}/backups"))
    }

    /// `DELETE /api/v1/devices/{id}/backups`.
    pub fn delete_backups(&self, id: &str) -> Result<crate::api::BackupsDeleted, ClientError> {
        let id = &seg(id);
        self.call("DELETE", &format!("/api/v1/devices/{id}/backups"), None)
    }

    /// `POST /api/v1/devices/{id}/backups/prune[?dry_run=true]`.
    pub fn prune_backups(&self, id: &str, dry_run: bool) -> Result<crate::service::backups::PruneReport, ClientError> {
        let id = &seg(id);
        self.call("POST", &format!("/api/v1/devices/{id}/backups/prune?dry_run={dry_run}"), None)
    }

    /// `POST /api/v1/devices/{id}/backups/verify`.
    pub fn verify_backups(&self, id: &str) -> Result<crate::service::backups::VerifyReport, ClientError> {
        let id = &seg(id);
        self.call("POST", &format!("/api/v1/devices/{id}/backups/verify"), None)
    }

    /// `POST /api/v1/devices/{id}/backups/grants`: `to` may fetch `id`'s backups.
    pub fn grant_backups(
        &self,
        id: &str,
        to: &str,
        valid_for: Option<&str>,
    ) -> Result<crate::api::GrantView, ClientError> {
        let id = &seg(id);
        let body = serde_json::to_value(crate::api::GrantRequest {
            to: to.to_owned(),
            valid_for: valid_for.map(str::to_owned),
        })
        .unwrap_or_default();
        self.call("POST", &format!("/api/v1/devices/{id}/backups/grants"), Some(body))
    }

    /// `GET /api/v1/devices/{id}/jobs/{name}/runs`, newest first.
    pub fn job_runs(&self, id: &str, job: &str, limit: usize) -> Result<Vec<JobRunView>, ClientError> {
        self.get(&format!("/api/v1/devices/{}/jobs/{}/runs?limit={limit}", seg(id), seg(job)))
    }

    /// `GET /api/v1/devices/{id}/desired`
    pub fn desired(&self, id: &str) -> Result<DesiredView, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}/desired"))
    }

    /// `PUT /api/v1/devices/{id}/desired`
    pub fn put_desired(&self, id: &str, version: u64, doc: serde_json::Value) -> Result<DesiredView, ClientError> {
        let id = &seg(id);
        let body = serde_json::to_value(DesiredPut { version, doc }).unwrap_or_default();
        self.call("PUT", &format!("/api/v1/devices/{id}/desired"), Some(body))
    }

    /// `PATCH /api/v1/devices/{id}/desired`: a JSON merge patch (RFC 7396).
    pub fn patch_desired(&self, id: &str, patch: serde_json::Value) -> Result<DesiredView, ClientError> {
        let id = &seg(id);
        self.call("PATCH", &format!("/api/v1/devices/{id}/desired"), Some(patch))
    }

    /// `POST /api/v1/devices/{id}/commands`
    pub fn send_command(&self, id: &str, request: &CommandRequest) -> Result<CommandView, ClientError> {
        let id = &seg(id);
        let body = serde_json::to_value(request).unwrap_or_default();
        self.call("POST", &format!("/api/v1/devices/{id}/commands"), Some(body))
    }

    /// `GET /api/v1/devices/{id}/commands`: every command of the device,
    /// oldest first, following the pages' `Link` headers.
    pub fn commands(&self, id: &str) -> Result<Vec<CommandView>, ClientError> {
        let id = &seg(id);
        self.every_page(format!("/api/v1/devices/{id}/commands?limit={}", crate::service::listing::MAX_PAGE))
    }

    /// `GET /api/v1/commands/{id}`
    pub fn command(&self, id: u64) -> Result<CommandView, ClientError> {
        self.get(&format!("/api/v1/commands/{id}"))
    }

    /// `GET /api/v1/devices`
    /// Every device matching `query` (`selector=...&status=...`, may be
    /// empty), following the pages' `Link` headers.
    pub fn devices_where(&self, query: &str) -> Result<Vec<DeviceView>, ClientError> {
        self.every_page(if query.contains("limit=") {
            format!("/api/v1/devices?{query}")
        } else {
            format!("/api/v1/devices?limit={}&{query}", crate::service::listing::MAX_PAGE)
        })
    }

    /// Every item of a paged list from `path` on, following the pages'
    /// `Link: <...>; rel="next"` headers.
    fn every_page<T: serde::de::DeserializeOwned>(&self, mut path: String) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        loop {
            let url = format!("{}{path}", self.base);
            let transport = |e: ureq::Error| ClientError::Transport { url: url.clone(), source: Box::new(e) };
            let mut response = self
                .agent
                .get(&url)
                .header("Authorization", &format!("Bearer {}", self.token))
                .call()
                .map_err(transport)?;
            let status = response.status().as_u16();
            let next = response
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix('<'))
                .and_then(|v| v.split_once('>'))
                .map(|(next, _)| next.to_owned());
            let text = response.body_mut().with_config().limit(256 << 20).read_to_string().map_err(transport)?;
            if !(200..300).contains(&status) {
                let message = serde_json::from_str::<ApiError>(&text).map(|e| e.error).unwrap_or(text);
                return Err(ClientError::Status { url, status, message });
            }
            let page: Vec<T> = serde_json::from_str(&text)
                .map_err(|e| ClientError::Decode { url: url.clone(), message: e.to_string() })?;
            all.extend(page);
            match next {
                Some(next) => path = next,
                None => return Ok(all),
            }
        }
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        self.devices_where("")
    }

    /// A one-time console sign-in link for a session of `role`.
    pub fn sign_in_link(&self, role: &str, expires_in: &str) -> Result<crate::api::LinkView, ClientError> {
        self.call("POST", "/api/v1/console/links", Some(serde_json::json!({"role": role, "expires_in": expires_in})))
    }

    /// `GET /api/v1/devices/{id}`
    pub fn device(&self, id: &str) -> Result<DeviceView, ClientError> {
        let id = &seg(id);
        self.get(&format!("/api/v1/devices/{id}"))
    }
}

/// The fleet as a text table: id, name, online, last seen, version, CPU %,
/// memory %.
pub fn render_table(devices: &[DeviceView]) -> String {
    let now = outpost_shared::time::Timestamp::now();
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let state = d.state();
            let mut problems = Vec::new();
            if d.alarmed {
                problems.push("alarm".to_owned());
            }
            if d.failed_runs_24h > 0 {
                problems.push(format!("{} failed", d.failed_runs_24h));
            }
            if !d.overdue_backups.is_empty() {
                problems.push("backup overdue".into());
            }
            if d.desired_error.is_some() {
                problems.push("desired state refused".into());
            }
            if let Some(worst) = d.failing_jobs.iter().max_by_key(|f| f.runs) {
                problems.push(format!("{} failing ({} in a row)", worst.job, worst.runs));
            }
            vec![
                d.id.clone(),
                d.name.clone(),
                state.into(),
                crate::human::ago_text(d.last_seen.as_deref(), now),
                d.agent_version.clone().unwrap_or_else(|| "-".into()),
                d.cpu_percent.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                d.mem_percent.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                problems.join(", "),
            ]
        })
        .collect();
    outpost_shared::table::render(
        &["ID", "NAME", "STATE", "LAST SEEN", "VERSION", "CPU %", "MEM %", "LABELS", "PROBLEMS"],
        &rows,
    )
}

pub fn render_peers(peers: &[PeerView]) -> String {
    outpost_shared::peers::render_rows(peers.iter().map(|p| outpost_shared::peers::PeerRow {
        id: &p.id,
        state: &p.state,
        reason: p.state_reason.as_deref(),
        uplink: p.uplink,
        addresses: &p.addresses,
        rtt_ms: p.rtt_ms,
        last_seen: p.last_seen.clone(),
    }))
}

/// The `outpostctl jobs` table.
pub fn render_jobs(jobs: &JobsView) -> String {
    let rows: Vec<Vec<String>> = jobs
        .jobs
        .iter()
        .map(|j| {
            let next = if j.enabled { j.next_run.clone().unwrap_or_else(|| "-".into()) } else { "disabled".into() };
            let last = j.last_run.as_ref().map_or_else(|| "never".into(), |r| format!("{} ({})", r.ended, r.outcome));
            vec![j.name.clone(), j.source.clone(), j.kind.clone(), j.schedule.clone(), j.overlap.clone(), next, last]
        })
        .collect();
    outpost_shared::table::render(&["NAME", "SOURCE", "KIND", "SCHEDULE", "OVERLAP", "NEXT RUN", "LAST RUN"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_address_without_a_scheme_means_http() {
        assert_eq!(base_url("hub.example:8080"), "http://hub.example:8080");
        assert_eq!(base_url("https://hub.example/"), "https://hub.example");
        assert_eq!(base_url(" 127.0.0.1:8080 "), "http://127.0.0.1:8080");
        assert_eq!(seg("gw one/2"), "gw%20one%2F2");
    }

    #[test]
    fn table_aligns_columns() {
        let d = DeviceView {
            id: "dev-1".into(),
            name: "gateway-long-name".into(),
            online: true,
            connected: true,
            transport: Some("quic".into()),
            last_seen: Some("2026-11-21T05:00:00Z".into()),
            last_seen_ms: Some(1),
            agent_version: Some("0.1.0".into()),
            enrolled_at: "2026-11-21T04:00:00Z".into(),
            address: None,
            cpu_percent: Some(3.125),
            mem_percent: None,
            telemetry: None,
            alarms: vec![],
            last_seq: 0,
            labels: Default::default(),
            alarmed: false,
            failed_runs_24h: 0,
            overdue_backups: vec![],
            behind_secs: None,
            certificate_expired: None,
            readmitted_until: None,
            revoked: None,
            certificate_expires: None,
            offline: None,
            desired_error: None,
            failing_jobs: Vec::new(),
        };
        let table = render_table(&[d]);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID     NAME               STATE"), "{table}");
        assert!(lines[1].contains("online") && lines[1].contains("3.1") && lines[1].contains(" ago "), "{table}");
    }
}
