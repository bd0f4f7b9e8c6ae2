//! Tokens, roles, labels, selectors and the audit log, through the API of
//! a real hub with real agents: every new endpoint's success and its 401,
//! 403, 404, 409 and 422; bulk actions that refuse an empty or unknown
//! selector; the console's sign-in link, used once; a forged console form.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::CommandStateView;
use outpost_hub::client::Client;
use outpost_tests::{Hub, Scratch, Timings, bin, fleet, run, wait_for, wait_online};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

fn token(admin: &Client, name: &str, role: &str) -> String {
    let (status, body) =
        admin.raw("POST", "/api/v1/tokens", Some(json!({"name": name, "role": role, "expires_in": "1h"}))).unwrap();
    assert_eq!(status, 201, "{body:#}");
    body["secret"].as_str().unwrap().to_owned()
}

fn audit(admin: &Client, query: &str) -> Vec<Value> {
    let (status, body) = admin.raw("GET", &format!("/api/v1/audit?{query}"), None).unwrap();
    assert_eq!(status, 200, "{body:#}");
    body["entries"].as_array().unwrap().clone()
}

#[test]
fn roles_labels_selectors_bulk_actions_and_the_audit_log() {
    let scratch = Scratch::new().unwrap();
    let (hub, agents) = fleet(&scratch, 3, Timings::default()).unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    wait_online(&hub, &ids, true, Duration::from_secs(20)).unwrap();
    let admin = hub.client();
    let nobody = Client::new(&hub.api, "");
    let stranger = Client::new(&hub.api, "opt_not-a-token");

    // Tokens: made by an admin, shown once, named uniquely, bounded.
    let viewer = Client::new(&hub.api, &token(&admin, "wall screen", "viewer"));
    let operator_secret = token(&admin, "ops", "operator");
    let operator = Client::new(&hub.api, &operator_secret);
    let bad = [
        (json!({"name": "ops", "role": "viewer", "expires_in": "1h"}), 409, "exists"),
        (json!({"name": "x", "role": "root", "expires_in": "1h"}), 422, "role"),
        (json!({"name": "x", "role": "viewer", "expires_in": "10y"}), 422, "expires_in"),
        (json!({"name": "", "role": "viewer", "expires_in": "soon"}), 422, "name"),
    ];
    for (request, want, why) in bad {
        let (status, body) = admin.raw("POST", "/api/v1/tokens", Some(request.clone())).unwrap();
        assert_eq!(status, want, "{request}: {body:#}");
        assert!(body["error"].as_str().unwrap().contains(why), "{request}: {body:#}");
    }
    let (status, listed) = admin.raw("GET", "/api/v1/tokens", None).unwrap();
    assert_eq!(status, 200);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"ops") && names.contains(&"wall screen"), "{listed:#}");
    assert!(listed.as_array().unwrap().iter().all(|t| t.get("secret").is_none()), "secrets are shown once");
    let ops = listed.as_array().unwrap().iter().find(|t| t["name"] == "ops").unwrap();
    assert!(ops["expires_at"].is_string() && ops["id"].as_str().unwrap().starts_with("tok-"), "{ops:#}");
    assert_eq!(nobody.raw("GET", "/api/v1/tokens", None).unwrap().0, 401);
    assert_eq!(stranger.raw("GET", "/api/v1/devices", None).unwrap().0, 401);
    assert_eq!(operator.raw("GET", "/api/v1/tokens", None).unwrap().0, 403);
    assert_eq!(viewer.raw("DELETE", "/api/v1/tokens/ops", None).unwrap().0, 403);
    assert_eq!(admin.raw("DELETE", "/api/v1/tokens/nothing-of-that-name", None).unwrap().0, 404);

    // The last use of a token is kept, with where it came from.
    assert_eq!(operator.raw("GET", "/api/v1/devices", None).unwrap().0, 200);
    let (_, listed) = admin.raw("GET", "/api/v1/tokens", None).unwrap();
    let ops = listed.as_array().unwrap().iter().find(|t| t["name"] == "ops").unwrap().clone();
    assert_eq!(ops["last_used_from"], "127.0.0.1", "{ops:#}");

    // A viewer reads and changes nothing; the refusal is in the audit log.
    assert_eq!(viewer.raw("GET", &format!("/api/v1/devices/{}", ids[0]), None).unwrap().0, 200);
    let (status, body) = viewer
        .raw("POST", &format!("/api/v1/devices/{}/commands", ids[0]), Some(json!({"kind": "echo", "args": []})))
        .unwrap();
    assert_eq!(status, 403, "{body:#}");
    let refused = audit(&admin, "outcome=refused&who=wall%20screen&action=commands");
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0]["action"], "POST /api/v1/devices/{id}/commands");
    assert_eq!(refused[0]["target"], ids[0]);
    assert_eq!(refused[0]["status"], 403);

    // Labels: operators set them, checked; a device can be named by name.
    let set = |who: &Client, id: &str, labels: Value| {
        who.raw("PUT", &format!("/api/v1/devices/{id}/labels"), Some(labels)).unwrap()
    };
    assert_eq!(set(&operator, ids[0], json!({"env": "prod", "site": "berlin"})).0, 200);
    assert_eq!(set(&operator, "agent-1", json!({"env": "prod", "site": "paris"})).0, 200, "by name");
    let (status, body) = set(&operator, ids[2], json!({"env": "dev"}));
    assert_eq!((status, body["labels"]["env"].as_str()), (200, Some("dev")), "{body:#}");
    assert_eq!(set(&operator, "dev-nosuchdevice", json!({})).0, 404);
    let (status, body) = set(&operator, ids[0], json!({"Env": "a b"}));
    assert_eq!(status, 422, "{body:#}");
    assert_eq!(set(&viewer, ids[0], json!({})).0, 403);
    assert_eq!(nobody.raw("PUT", &format!("/api/v1/devices/{}/labels", ids[0]), Some(json!({}))).unwrap().0, 401);

    // Listing by selector, status and text, in pages.
    let prod = viewer.devices_where("selector=env%3Dprod").unwrap();
    assert_eq!(prod.len(), 2);
    let berlin = viewer.devices_where("selector=env%3Dprod,site!%3Dparis").unwrap();
    assert_eq!(berlin.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [ids[0]]);
    assert_eq!(viewer.devices_where("q=AGENT-2").unwrap().len(), 1);
    assert_eq!(viewer.devices_where("status=online").unwrap().len(), 3);
    let paged = viewer.devices_where("limit=1&sort=name").unwrap();
    assert_eq!(paged.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["agent-0", "agent-1", "agent-2"]);
    for bad in ["selector=Env%3Dx", "status=sleepy", "sort=size", "after=garbage"] {
        let (status, body) = viewer.raw("GET", &format!("/api/v1/devices?{bad}"), None).unwrap();
        assert_eq!(status, 422, "{bad}: {body:#}");
    }
    let (status, overview) = viewer.raw("GET", "/api/v1/overview", None).unwrap();
    assert_eq!(
        (status, overview["devices"].as_u64(), overview["online"].as_u64()),
        (200, Some(3), Some(3)),
        "{overview:#}"
    );

    // Bulk commands: an empty, unknown or unmatched selector is refused,
    // never taken for "every device".
    for (selector, why) in [
        ("", "empty"),
        ("  ", "empty"),
        ("evn=prod", "no device has the label evn"),
        ("env=staging", "matches no device"),
    ] {
        let request = json!({"selector": selector, "kind": "echo", "args": ["x"]});
        let (status, body) = operator.raw("POST", "/api/v1/commands", Some(request)).unwrap();
        assert_eq!(status, 422, "{selector:?}: {body:#}");
        assert!(body["error"].as_str().unwrap().contains(why), "{selector:?}: {body:#}");
    }
    let (status, dry) = operator
        .raw(
            "POST",
            "/api/v1/commands",
            Some(json!({"selector": "env=prod", "kind": "echo", "args": ["bulk"], "dry_run": true})),
        )
        .unwrap();
    assert_eq!((status, dry["matched"].as_u64()), (200, Some(2)), "{dry:#}");
    assert_eq!(
        viewer
            .raw("POST", "/api/v1/commands", Some(json!({"selector": "env=prod", "kind": "echo", "args": []})))
            .unwrap()
            .0,
        403
    );
    let (status, sent) = operator
        .raw("POST", "/api/v1/commands", Some(json!({"selector": "env=prod", "kind": "echo", "args": ["bulk"]})))
        .unwrap();
    assert_eq!((status, sent["matched"].as_u64()), (201, Some(2)), "{sent:#}");
    for command in sent["commands"].as_array().unwrap() {
        let done = hub.wait_command(command["id"].as_u64().unwrap(), "a bulk echo", CommandStateView::is_final);
        assert!(matches!(done.state, CommandStateView::Completed { .. }), "{done:?}");
        assert_eq!(done.created_by, "ops");
    }
    let bulk = audit(&admin, "who=ops&action=POST%20/api/v1/commands");
    let matched: Vec<(Option<u64>, Option<&str>)> =
        bulk.iter().map(|e| (e["matched"].as_u64(), e["target"].as_str())).collect();
    assert!(matched.contains(&(Some(2), Some("selector env=prod"))), "{bulk:#?}");

    // Bulk desired state: a patch that would make one document invalid
    // changes none.
    let patch = |p: Value, q: &str| operator.raw("PATCH", &format!("/api/v1/desired?{q}"), Some(p)).unwrap();
    let (status, body) = patch(json!({"telemetry_interval": "1000d"}), "selector=env%3Dprod");
    assert_eq!(status, 422, "{body:#}");
    let (_, d0) = viewer.raw("GET", &format!("/api/v1/devices/{}/desired", ids[0]), None).unwrap();
    assert_eq!(d0["version"], 0, "nothing changed: {d0:#}");
    assert_eq!(patch(json!({"telemetry_interval": "1s"}), "selector=").0, 422);
    let (status, body) = patch(json!({"telemetry_interval": "1s"}), "selector=env%3Dprod");
    assert_eq!((status, body["versions"].as_array().map(Vec::len)), (200, Some(2)), "{body:#}");
    wait_for(Duration::from_secs(15), "both prod devices to apply it", || {
        ids[..2]
            .iter()
            .all(|id| {
                let (_, d) = viewer.raw("GET", &format!("/api/v1/devices/{id}/desired"), None).unwrap();
                d["in_sync"] == true && d["version"] == 1
            })
            .then_some(())
    })
    .unwrap();

    // The audit log pages and filters; viewers cannot read it.
    assert_eq!(viewer.raw("GET", "/api/v1/audit", None).unwrap().0, 403);
    let (status, page) = admin.raw("GET", "/api/v1/audit?limit=3", None).unwrap();
    assert_eq!(status, 200);
    let next = page["next"].as_u64().unwrap();
    let older = audit(&admin, &format!("limit=3&before={next}"));
    assert!(older.iter().all(|e| e["id"].as_u64().unwrap() < next), "{older:#?}");
    assert_eq!(admin.raw("GET", "/api/v1/audit?outcome=maybe", None).unwrap().0, 422);
    assert!(audit(&admin, "since=1h").len() > 5);
    let labels = audit(&admin, &format!("target={}&action=labels", ids[0]));
    assert!(labels.iter().any(|e| e["who"] == "ops" && e["outcome"] == "ok"), "{labels:#?}");
    let by_name = audit(&admin, &format!("target={}&action=labels", ids[1]));
    assert!(!by_name.is_empty(), "a device named by name is logged by its id: {by_name:#?}");

    // Revoked: refused at once.
    let (status, body) = admin.raw("DELETE", "/api/v1/tokens/ops", None).unwrap();
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(operator.raw("GET", "/api/v1/devices", None).unwrap().0, 401);

    // Every request runs under its id: given by the caller when plain (a
    // proxy's), made by the hub otherwise (and in place of a hostile one);
    // the answer names it, and the journal's line of the audited change
    // carries it.
    let agent = browser();
    let labels = format!("{}/api/v1/devices/{}/labels", hub.api, ids[0]);
    let put = |id: Option<&str>| {
        let mut request = agent.put(&labels).header("Authorization", &format!("Bearer {}", hub.admin_token));
        if let Some(id) = id {
            request = request.header("X-Request-Id", id);
        }
        let response = request.send_json(json!({"site": "traced"})).unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    assert_eq!(put(Some("req-from-proxy.42")), "req-from-proxy.42");
    let made = put(None);
    assert!(made.len() == 16 && made.bytes().all(|b| b.is_ascii_hexdigit()), "{made:?}");
    let replaced = put(Some("a b\tforged"));
    assert!(replaced.len() == 16 && replaced != made, "{replaced:?}");
    wait_for(Duration::from_secs(10), "the audited changes in the hub's log with their ids", || {
        let log = hub.log_text();
        [made.as_str(), "req-from-proxy.42", replaced.as_str()]
            .iter()
            .all(|id| log.lines().any(|l| l.contains(id) && l.contains("Audited.") && l.contains("/labels")))
            .then_some(())
    })
    .unwrap();
    assert!(!hub.log_text().contains("forged"), "a hostile request id reached the log");
}

/// A plain HTTP client that keeps cookies, like a browser without script.
fn browser() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn post_form(agent: &ureq::Agent, url: &str, origin: &str, cookie: &str, form: &[(&str, &str)]) -> (u16, String) {
    let mut request = agent.post(url).header("Origin", origin);
    if !cookie.is_empty() {
        request = request.header("Cookie", cookie);
    }
    let mut response = request.send_form(form.iter().copied()).unwrap();
    let status = response.status().as_u16();
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (status, if status == 303 { cookie } else { body })
}

#[test]
fn console_sign_in_links_work_once_and_forms_need_the_session_and_the_origin() {
    let scratch = Scratch::new().unwrap();
    let (hub, agents) = fleet(&scratch, 1, Timings::default()).unwrap();
    wait_online(&hub, &[&agents[0].id], true, Duration::from_secs(20)).unwrap();
    let admin = hub.client();
    let web = browser();
    let origin = hub.api.clone();

    // A sign-in link opens one session; the second use is refused.
    let link = admin.sign_in_link("viewer", "10m").unwrap();
    let secret = link.path.split("link=").nth(1).unwrap().to_owned();
    let sign_in = format!("{}/console/sign-in", hub.api);
    let (status, cookie) = post_form(&web, &sign_in, &origin, "", &[("link", &secret), ("next", "/console/")]);
    assert_eq!(status, 303);
    assert!(cookie.starts_with("outpost_session=opt_"), "{cookie}");
    let (status, _) = post_form(&web, &sign_in, &origin, "", &[("link", &secret)]);
    assert_eq!(status, 401, "a link works once");
    let viewer_link = admin.sign_in_link("nobody", "10m");
    assert!(viewer_link.is_err(), "an unknown role is refused");
    // A bearer token given as a link is refused and keeps working.
    let (status, _) = post_form(&web, &sign_in, &origin, "", &[("link", &hub.admin_token)]);
    assert_eq!(status, 401);
    assert_eq!(admin.raw("GET", "/api/v1/overview", None).unwrap().0, 200, "the admin token is untouched");

    // Pages answer with the security headers, and a viewer sees no forms.
    let mut page =
        web.get(&format!("{}/console/devices/{}", hub.api, agents[0].id)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers().get("content-security-policy").unwrap().to_str().unwrap().to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers().get("x-content-type-options").unwrap(), "nosniff");
    assert_eq!(page.headers().get("x-frame-options").unwrap(), "DENY");
    let html = page.body_mut().read_to_string().unwrap();
    assert!(!html.contains("/act\""), "a viewer sees no action forms");
    let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();

    // A forged form: the viewer's own session and form token, an action it
    // may not do. 403, and the audit log has it.
    let act = format!("{}/console/devices/{}/act", hub.api, agents[0].id);
    let form = [("csrf", csrf.as_str()), ("action", "run_job"), ("job", "x"), ("confirm", "yes")];
    let (status, body) = post_form(&web, &act, &origin, &cookie, &form);
    assert_eq!(status, 403, "{body}");
    // Without the session's form token, or from another site: refused too.
    let (status, _) = post_form(&web, &act, &origin, &cookie, &[("csrf", "0000"), ("action", "run_job"), ("job", "x")]);
    assert_eq!(status, 403);
    let (status, _) = post_form(&web, &act, "https://evil.example", &cookie, &form);
    assert_eq!(status, 403);
    let refused = admin.raw("GET", "/api/v1/audit?outcome=refused&action=%2Fconsole", None).unwrap().1;
    let entries = refused["entries"].as_array().unwrap();
    assert!(entries.len() >= 3, "{refused:#}");
    assert!(
        entries.iter().any(|e| e["who"].as_str().unwrap().starts_with("initial admin (console ")
            && e["target"] == agents[0].id.as_str()),
        "{refused:#}"
    );

    // Revoking from the console: not for an operator; an admin reviews,
    // then confirms, and the device is revoked.
    let session = |role: &str| {
        let link = admin.sign_in_link(role, "10m").unwrap();
        let secret = link.path.split("link=").nth(1).unwrap().to_owned();
        let (status, cookie) = post_form(&web, &sign_in, &origin, "", &[("link", &secret)]);
        assert_eq!(status, 303);
        let mut page =
            web.get(&format!("{}/console/devices/{}", hub.api, agents[0].id)).header("Cookie", &cookie).call().unwrap();
        let html = page.body_mut().read_to_string().unwrap();
        let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        (cookie, csrf, html)
    };
    let (op_cookie, op_csrf, op_html) = session("operator");
    assert!(!op_html.contains("id=\"revoke\""), "an operator is offered no revoke button");
    let (status, _) =
        post_form(&web, &act, &origin, &op_cookie, &[("csrf", &op_csrf), ("action", "revoke"), ("confirm", "yes")]);
    assert_eq!(status, 403, "an operator revoked a device");
    let (admin_cookie, admin_csrf, admin_html) = session("admin");
    assert!(admin_html.contains("id=\"revoke\""), "an admin is offered the revoke button");
    let (status, review) =
        post_form(&web, &act, &origin, &admin_cookie, &[("csrf", &admin_csrf), ("action", "revoke")]);
    assert_eq!(status, 200);
    assert!(review.contains("Revoke") && review.contains("enrolling anew"), "{review}");
    assert_eq!(admin.device(&agents[0].id).unwrap().state(), "online", "the review changed nothing");
    let (status, _) = post_form(
        &web,
        &act,
        &origin,
        &admin_cookie,
        &[("csrf", &admin_csrf), ("action", "revoke"), ("confirm", "yes")],
    );
    assert_eq!(status, 303);
    assert_eq!(admin.device(&agents[0].id).unwrap().state(), "revoked");

    // Signing out ends a link's session.
    let (status, _) = post_form(&web, &format!("{}/console/sign-out", hub.api), &origin, &cookie, &[("csrf", &csrf)]);
    assert_eq!(status, 303);
    let again = web.get(&format!("{}/console/", hub.api)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(again.status().as_u16(), 303, "signed out: back to the sign-in page");

    // Signing in with an API token opens a session of its own: the cookie
    // is not the token, works only as a cookie, ends at sign-out and ends
    // with the token. A crafted `next` signs in to the overview.
    let ops = token(&admin, "ops-carol", "operator");
    let crafted = "/console/\r\nSet-Cookie:x";
    let (status, cookie) = post_form(&web, &sign_in, &origin, "", &[("token", &ops), ("next", crafted)]);
    assert_eq!(status, 303, "{cookie}");
    let session = cookie.trim_start_matches("outpost_session=").split(';').next().unwrap().to_owned();
    assert!(session.starts_with("opt_") && session != ops, "the session is its own token: {cookie}");
    let answer =
        web.post(&sign_in).header("Origin", &origin).send_form([("token", ops.as_str()), ("next", crafted)]).unwrap();
    assert_eq!(answer.headers().get("location").unwrap(), "/console/", "an unsafe next becomes the overview");
    let bearer = |secret: &str| {
        let overview = format!("{}/api/v1/overview", hub.api);
        web.get(&overview).header("Authorization", &format!("Bearer {secret}")).call().unwrap().status().as_u16()
    };
    assert_eq!(bearer(&session), 401, "a console session is never a bearer token");
    assert_eq!(bearer(&ops), 200);
    let mut page =
        web.get(&format!("{}/console/devices/{}", hub.api, agents[0].id)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.body_mut().read_to_string().unwrap();
    let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let form = [("csrf", csrf.as_str()), ("action", "labels"), ("labels", "site=lab"), ("confirm", "yes")];
    let (status, _) = post_form(&web, &act, &origin, &cookie, &form);
    assert_eq!(status, 303);
    let done = audit(&admin, "action=%2Fconsole");
    let mine = done.iter().find(|e| e["who"].as_str().unwrap().starts_with("ops-carol (console ")).unwrap();
    assert_eq!(mine["detail"], "labels: +site=lab", "the audit log says what changed: {mine:#}");
    // A preview is an entry of its own, marked as such; the audit page
    // names the device and finds it by its name.
    let (status, _) =
        post_form(&web, &act, &origin, &cookie, &[("csrf", &csrf), ("action", "labels"), ("labels", "site=berlin")]);
    assert_eq!(status, 200, "a review page");
    let previews = audit(&admin, "who=ops-carol");
    assert_eq!(previews[0]["detail"], "preview: labels: site=lab→berlin", "{previews:#?}");
    let name = admin.device(&agents[0].id).unwrap().name;
    let mut page =
        web.get(&format!("{}/console/audit?target={}", hub.api, name)).header("Cookie", &cookie).call().unwrap();
    let html = page.body_mut().read_to_string().unwrap();
    assert!(html.contains("labels: +site=lab") && html.contains(&format!(">{name}</a>")), "{html}");
    assert!(html.contains("<td class=\"preview\">preview (200)</td>"), "{html}");
    // A refused form comes back with its input and why, at the top.
    let bad = [("csrf", csrf.as_str()), ("action", "labels"), ("labels", "site=lab\nBad Key=x")];
    let (status, html) = post_form(&web, &act, &origin, &cookie, &bad);
    assert_eq!(status, 422);
    let error = html.find("id=\"form-error\"").expect("the error is shown");
    assert!(error < html.find("<h2>Telemetry").unwrap(), "the error is at the top");
    assert!(html.contains("site=lab\nBad Key=x</textarea>") && html.contains("class=\"top\""), "input or layout lost");
    let bulk = format!("{}/console/bulk", hub.api);
    let patch = [("csrf", csrf.as_str()), ("action", "desired"), ("selector", "site=lab"), ("patch", "{not json")];
    let (status, html) = post_form(&web, &bulk, &origin, &cookie, &patch);
    assert_eq!(status, 422);
    assert!(html.contains("the patch is not JSON") && html.contains("{not json</textarea>"), "{html}");
    // A hostile range of a bulk result page: nothing, not an error.
    let mut page =
        web.get(&format!("{}/console/commands?from=9&to=1&by=x", hub.api)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.body_mut().read_to_string().unwrap().contains("No commands."));
    // Any other console path: a page that says so.
    let mut missing = web.get(&format!("{}/console/nope", hub.api)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let html = missing.body_mut().read_to_string().unwrap();
    assert!(html.contains("No page at /console/nope.") && html.contains("/console/static/console.css"), "{html}");
    let (status, _) = post_form(&web, &format!("{}/console/sign-out", hub.api), &origin, &cookie, &[("csrf", &csrf)]);
    assert_eq!(status, 303);
    let again = web.get(&format!("{}/console/", hub.api)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(again.status().as_u16(), 303, "signed out: the session is gone");
    assert_eq!(bearer(&ops), 200, "signing out leaves the API token alone");
    let (_, cookie) = post_form(&web, &sign_in, &origin, "", &[("token", &ops)]);
    assert_eq!(
        web.get(&format!("{}/console/", hub.api)).header("Cookie", &cookie).call().unwrap().status().as_u16(),
        200
    );
    admin.revoke_token("ops-carol").unwrap();
    let again = web.get(&format!("{}/console/", hub.api)).header("Cookie", &cookie).call().unwrap();
    assert_eq!(again.status().as_u16(), 303, "a session ends with the token it was signed in with");
}

/// `outpostctl` as an operator's script uses it.
#[test]
fn outpostctl_behaves_as_scripts_expect() {
    use outpost_tests::{bin, run};
    let scratch = Scratch::new().unwrap();
    let (hub, mut agents) = fleet(&scratch, 2, Timings::default()).unwrap();
    wait_online(&hub, &[&agents[0].id, &agents[1].id], true, Duration::from_secs(20)).unwrap();
    // OUTPOST_HUB without a scheme; the token from the environment.
    let ctl = |args: &[&str]| {
        let out = run(std::process::Command::new(bin("outpostctl"))
            .env("OUTPOST_HUB", hub.api.trim_start_matches("http://"))
            .env("OUTPOST_TOKEN", &hub.admin_token)
            .args(args))
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text, String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // Devices named by name; a command's output printed as the text it is.
    let (code, text, err) = ctl(&["command", "send", "agent-0", "echo", "two\nlines", "--wait", "20s"]);
    assert_eq!(code, Some(0), "{text}{err}");
    assert!(text.contains("succeeded\ntwo\nlines\n"), "{text}");
    // A failed command exits non-zero; so does a --wait that runs out.
    let (code, text, _) = ctl(&["command", "send", "agent-0", "exec", "/bin/false", "--wait", "20s"]);
    assert_eq!(code, Some(1), "a refused or failed command: {text}");
    agents[1].proc.as_mut().unwrap().kill();
    wait_online(&hub, &[&agents[1].id], false, Duration::from_secs(20)).unwrap();
    let (code, text, err) = ctl(&["command", "send", "agent-1", "echo", "later", "--wait", "1s"]);
    assert_eq!(code, Some(124), "{text}{err}");
    assert!(text.contains(": queued") && err.contains("no outcome within 1s"), "{text}{err}");
    let (code, _, err) = ctl(&["device", "no-such-device"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404"), "{err}");

    // Human-readable listings, JSON on request; relative times.
    let (code, text, _) = ctl(&["devices", "--status", "online"]);
    assert_eq!(code, Some(0));
    assert!(text.starts_with("ID") && text.contains("agent-0") && !text.contains("agent-1"), "{text}");
    let (_, text, _) = ctl(&["--json", "devices"]);
    let listed: Vec<outpost_hub::api::DeviceView> = serde_json::from_str(&text).unwrap();
    assert_eq!(listed.len(), 2);
    let (code, text, err) = ctl(&["metrics", "agent-0", "--since", "1h", "--limit", "3"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(text.lines().count(), 4, "a header and three samples: {text}");
    let (code, text, _) = ctl(&["labels", "add", "agent-0", "env=prod", "rack=r1"]);
    assert_eq!((code, text.as_str()), (Some(0), "env=prod\nrack=r1\n"));
    let (_, text, _) = ctl(&["labels", "remove", "agent-0", "rack"]);
    assert_eq!(text, "env=prod\n");
    let (code, text, _) = ctl(&["command", "bulk", "--selector", "env=prod", "echo", "hi", "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("matched 1 device"), "{text}");
    let (code, _, err) = ctl(&["command", "bulk", "--selector", "", "echo", "hi"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("empty"), "{err}");

    // Tokens: made with an expiry, shown once, listed, revoked.
    let (code, _, err) = ctl(&["tokens", "create", "robot", "--role", "viewer"]);
    assert_eq!(code, Some(2), "an expiry is required: {err}");
    let (code, text, err) = ctl(&["tokens", "create", "robot", "--role", "viewer", "--expires", "7d"]);
    assert_eq!(code, Some(0), "{err}");
    let secret = text.lines().next().unwrap().to_owned();
    assert!(secret.starts_with("opt_"), "{text}");
    let (_, text, _) = ctl(&["tokens", "list"]);
    assert!(text.lines().any(|l| l.contains("robot") && l.contains("viewer")) && !text.contains(&secret), "{text}");
    let (code, text, _) = ctl(&["audit", "--who", "initial admin", "--action", "tokens", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("token robot") && text.contains("ok (201)"), "{text}");
    let (code, text, err) = ctl(&["tokens", "revoke", "robot"]);
    assert_eq!(code, Some(0), "{text}{err}");

    // Completions and a man page, generated from the same definition.
    let (code, text, _) = ctl(&["completions", "bash"]);
    assert!(code == Some(0) && text.contains("outpostctl") && text.contains("tokens"), "{text}");
    let (code, text, _) = ctl(&["man"]);
    assert!(code == Some(0) && text.contains(".TH outpostctl 1"), "{text}");
}

/// The last admin token cannot be revoked (the fleet would be unmanageable
/// short of a new hub); when admin access is lost anyway, the hub machine
/// makes a new admin token from the store (`outpost-hub admin-token`), which
/// works, expires, and is in the audit log.
#[test]
fn the_last_admin_token_is_kept_and_the_hub_machine_can_make_another() {
    let scratch = Scratch::new().unwrap();
    let mut hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    let admin = hub.client();
    let refused = admin.revoke_token("initial admin").unwrap_err().to_string();
    assert!(refused.contains("422") && refused.contains("last admin token"), "{refused}");
    // With a second admin token, the first may go.
    let second = admin.create_token("second admin", "admin", "1h").unwrap();
    let second = Client::new(&hub.api, second.secret.as_deref().unwrap());
    second.revoke_token("initial admin").unwrap();
    assert!(second.revoke_token("second admin").unwrap_err().to_string().contains("last admin token"));

    // Lost anyway (say it expired): on the hub machine, with the hub
    // stopped (sled is locked while it runs).
    hub.kill();
    let out =
        run(Command::new(bin("outpost-hub")).args(["admin-token", "--valid-for", "2h", "--config"]).arg(&hub.config))
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let secret = stdout.lines().last().unwrap().trim().to_owned();
    hub.serve().unwrap();
    let rescued = Client::new(&hub.api, &secret);
    let tokens = rescued.tokens().unwrap();
    let made = tokens.iter().find(|t| t.name.starts_with("break-glass")).unwrap();
    assert_eq!(made.role, "admin");
    assert!(made.expires_at.is_some(), "{made:?}");
    let audit = rescued.audit("action=make%20admin%20token").unwrap();
    assert_eq!(audit.entries.len(), 1, "{:?}", audit.entries);
}
