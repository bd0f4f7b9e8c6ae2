//! The API is what its OpenAPI document says: real answers of a running hub
//! (success and error statuses) are checked against the schemas the hub
//! serves at `/api/v1/openapi.json`, and the views speak plain JSON (RFC 3339
//! times, snake_case states with their fields beside them).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::api::{CommandRequest, CommandStateView};
use outpost_tests::{Agent, Hub, Scratch, Timings, wait_for, wait_online};
use serde_json::{Value, json};
use std::time::Duration;

/// Checks `body`, answered with `status` to `method` on `path`, against the
/// document's schema for `template`; panics naming every mismatch.
fn check(doc: &Value, method: &str, template: &str, status: u16, body: &Value) {
    let errors = mismatches(doc, method, template, status, body);
    assert!(errors.is_empty(), "{method} {template} {status}: {errors:#?}\nbody: {body:#}");
}

/// What in `body` the document's schema does not allow.
fn mismatches(doc: &Value, method: &str, template: &str, status: u16, body: &Value) -> Vec<String> {
    let operation = &doc["paths"][template][method.to_lowercase()];
    assert!(operation.is_object(), "{method} {template} is not in the OpenAPI document");
    let response = &operation["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {template} answered {status}, which the document does not list");
    let schema = &response["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{method} {template} {status} has no JSON schema");
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema of {template}: {e}"));
    validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn real_answers_match_the_openapi_document() {
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "spec", &timings).unwrap();
    agent.start().unwrap();
    let id = agent.id.clone();
    wait_online(&hub, &[&id], true, Duration::from_secs(15)).unwrap();
    let client = hub.client();

    let (status, doc) = client.raw("GET", "/api/v1/openapi.json", None).unwrap();
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);

    // A command, answered at creation and once completed.
    let request = json!({"kind": "echo", "args": ["spec"]});
    let (status, created) = client.raw("POST", &format!("/api/v1/devices/{id}/commands"), Some(request)).unwrap();
    check(&doc, "POST", "/api/v1/devices/{id}/commands", status, &created);
    assert_eq!(created["state"], "queued", "{created:#}");
    // The check can fail: a state the document does not know, a time that
    // is a number.
    let template = "/api/v1/devices/{id}/commands";
    let mut wrong = created.clone();
    wrong["state"] = json!("lost");
    assert!(!mismatches(&doc, "POST", template, 201, &wrong).is_empty(), "an unknown state passed");
    wrong = created.clone();
    wrong["created_at"] = json!(1_796_048_472_054u64);
    assert!(!mismatches(&doc, "POST", template, 201, &wrong).is_empty(), "a millisecond time passed");
    let command = created["id"].as_u64().unwrap();
    hub.wait_command(command, "the echo to complete", CommandStateView::is_final);
    let (status, done) = client.raw("GET", &format!("/api/v1/commands/{command}"), None).unwrap();
    check(&doc, "GET", "/api/v1/commands/{id}", status, &done);
    assert_eq!((done["state"].as_str(), done["outcome"].as_str()), (Some("completed"), Some("succeeded")), "{done:#}");
    for time in ["created_at", "expires_at", "completed_at"] {
        let text = done[time].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(text).is_ok(), "{time} is not RFC 3339: {done:#}");
    }

    // Desired state, then a stale write (409) and a refused document (422).
    let (status, body) = client
        .raw(
            "PUT",
            &format!("/api/v1/devices/{id}/desired"),
            Some(json!({"version": 0, "doc": {"telemetry_interval": "2s"}})),
        )
        .unwrap();
    check(&doc, "PUT", "/api/v1/devices/{id}/desired", status, &body);
    let (status, body) =
        client.raw("PUT", &format!("/api/v1/devices/{id}/desired"), Some(json!({"version": 0, "doc": {}}))).unwrap();
    assert_eq!(status, 409);
    check(&doc, "PUT", "/api/v1/devices/{id}/desired", status, &body);
    let (status, body) =
        client.raw("PATCH", &format!("/api/v1/devices/{id}/desired"), Some(json!({"colour": "blue"}))).unwrap();
    assert_eq!(status, 422);
    check(&doc, "PATCH", "/api/v1/devices/{id}/desired", status, &body);
    wait_for(Duration::from_secs(10), "the device to report the desired state", || {
        client.desired(&id).ok().filter(|d| d.in_sync && d.version == 1)
    })
    .unwrap();

    wait_for(Duration::from_secs(10), "a telemetry sample", || {
        client.metrics(&id, None, None, Some(1)).ok().filter(|m| !m.samples.is_empty())
    })
    .unwrap();

    // Every read, as a viewer of the fleet sees it.
    let reads = [
        ("/api/v1/devices", "/api/v1/devices".to_owned()),
        ("/api/v1/devices/{id}", format!("/api/v1/devices/{id}")),
        ("/api/v1/devices/{id}/metrics", format!("/api/v1/devices/{id}/metrics?limit=5")),
        ("/api/v1/devices/{id}/events", format!("/api/v1/devices/{id}/events")),
        ("/api/v1/devices/{id}/jobs", format!("/api/v1/devices/{id}/jobs")),
        ("/api/v1/devices/{id}/jobs/{name}/runs", format!("/api/v1/devices/{id}/jobs/none/runs")),
        ("/api/v1/devices/{id}/peers", format!("/api/v1/devices/{id}/peers")),
        ("/api/v1/devices/{id}/backups", format!("/api/v1/devices/{id}/backups")),
        ("/api/v1/devices/{id}/desired", format!("/api/v1/devices/{id}/desired")),
        ("/api/v1/devices/{id}/commands", format!("/api/v1/devices/{id}/commands")),
    ];
    for (template, path) in reads {
        let (status, body) = client.raw("GET", &path, None).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        check(&doc, "GET", template, status, &body);
    }
    let (_, events) = client.raw("GET", &format!("/api/v1/devices/{id}/events"), None).unwrap();
    let kinds: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"command_result") && kinds.contains(&"state_report"), "{events:#}");
    let (_, metrics) = client.raw("GET", &format!("/api/v1/devices/{id}/metrics?limit=1"), None).unwrap();
    assert!(humantime::parse_rfc3339(metrics["samples"][0]["at"].as_str().unwrap()).is_ok(), "{metrics:#}");

    // Errors have their documented shape: 404, 422, 401.
    let (status, body) = client.raw("GET", "/api/v1/devices/dev-0000000000000000", None).unwrap();
    assert_eq!(status, 404);
    check(&doc, "GET", "/api/v1/devices/{id}", status, &body);
    let bad = CommandRequest { kind: "reboot".into(), args: vec![], expires_in: None };
    let (status, body) = client
        .raw("POST", &format!("/api/v1/devices/{id}/commands"), Some(serde_json::to_value(bad).unwrap()))
        .unwrap();
    assert_eq!(status, 422);
    check(&doc, "POST", "/api/v1/devices/{id}/commands", status, &body);
    let stranger = outpost_hub::client::Client::new(&hub.api, "opa_wrong");
    let (status, body) = stranger.raw("GET", "/api/v1/devices", None).unwrap();
    assert_eq!(status, 401);
    check(&doc, "GET", "/api/v1/devices", status, &body);

    // What the parsers refuse is JSON and documented too: a query that
    // does not parse (400), an id that does not (404), a body over the
    // limit (413), a patch not sent as JSON (415); a method a path does not
    // have is 405 naming the ones it has.
    let admin = format!("Authorization: Bearer {}", hub.admin_token);
    let from = std::net::Ipv4Addr::LOCALHOST;
    let big = vec![b' '; 300 << 10];
    let json = "Content-Type: application/json";
    let patch = format!("/api/v1/devices/{id}/desired");
    type Case<'a> = (&'a str, String, &'a str, &'a str, &'a [u8], u16);
    let cases: [Case; 6] = [
        ("GET", "/api/v1/devices?limit=many".into(), "/api/v1/devices", json, b"", 400),
        ("GET", "/api/v1/commands/-1".into(), "/api/v1/commands/{id}", json, b"", 404),
        ("POST", "/api/v1/tokens".into(), "/api/v1/tokens", json, b"{\"name\": ", 400),
        ("POST", "/api/v1/tokens".into(), "/api/v1/tokens", json, &big, 413),
        ("PATCH", patch.clone(), "/api/v1/devices/{id}/desired", "Content-Type: text/plain", b"{}", 415),
        (
            "PATCH",
            patch.clone(),
            "/api/v1/devices/{id}/desired",
            "Content-Type: application/merge-patch+json",
            &big,
            413,
        ),
    ];
    for (method, path, template, kind, body, want) in cases {
        let answer = outpost_tests::http_from(from, &hub.api, method, &path, &[&admin, kind], body).unwrap();
        assert_eq!(answer.status, want, "{method} {path}: {answer:?}");
        check(&doc, method, template, answer.status, &answer.json());
    }
    for (method, path, allow) in
        [("DELETE", "/api/v1/devices".to_owned(), "GET"), ("HEAD", patch.clone(), "GET, PUT, PATCH")]
    {
        let answer = outpost_tests::http_from(from, &hub.api, method, &path, &[&admin], b"").unwrap();
        assert_eq!((answer.status, answer.header("allow")), (405, Some(allow)), "{method} {path}: {answer:?}");
        if method != "HEAD" {
            assert!(answer.json()["error"].is_string(), "{answer:?}");
        }
    }
    let unknown = outpost_tests::http_from(from, &hub.api, "GET", "/api/v1/nowhere", &[&admin], b"").unwrap();
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.json()["error"].is_string(), "{unknown:?}");
    // An identical patch makes no new version.
    let (_, before) = client.raw("GET", &patch, None).unwrap();
    let (status, after) = client.raw("PATCH", &patch, Some(json!({"telemetry_interval": "2s"}))).unwrap();
    assert_eq!((status, &after["version"]), (200, &before["version"]), "{after:#}");
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
                for status in ["400", "401", "429", "503"] {
                    assert!(operation["responses"][status].is_object(), "{method} {path} does not list {status}");
                }
            }
        }
    }

    // Labels, the overview, bulk actions, tokens and the audit log.
    let calls: [(&str, &str, String, Option<Value>, u16); 12] = [
        (
            "PUT",
            "/api/v1/devices/{id}/labels",
            format!("/api/v1/devices/{id}/labels"),
            Some(json!({"env": "prod"})),
            200,
        ),
        (
            "PUT",
            "/api/v1/devices/{id}/labels",
            format!("/api/v1/devices/{id}/labels"),
            Some(json!({"Env": "x y"})),
            422,
        ),
        ("GET", "/api/v1/overview", "/api/v1/overview".into(), None, 200),
        ("GET", "/api/v1/devices", "/api/v1/devices?selector=env%3Dprod&limit=1".into(), None, 200),
        (
            "POST",
            "/api/v1/commands",
            "/api/v1/commands".into(),
            Some(json!({"selector": "env=prod", "kind": "echo", "args": ["b"]})),
            201,
        ),
        (
            "POST",
            "/api/v1/commands",
            "/api/v1/commands".into(),
            Some(json!({"selector": "", "kind": "echo", "args": []})),
            422,
        ),
        (
            "PATCH",
            "/api/v1/desired",
            "/api/v1/desired?selector=env%3Dprod&dry_run=true".into(),
            Some(json!({"telemetry_interval": "3s"})),
            200,
        ),
        (
            "POST",
            "/api/v1/tokens",
            "/api/v1/tokens".into(),
            Some(json!({"name": "spec", "role": "viewer", "expires_in": "1d"})),
            201,
        ),
        (
            "POST",
            "/api/v1/tokens",
            "/api/v1/tokens".into(),
            Some(json!({"name": "spec", "role": "viewer", "expires_in": "1d"})),
            409,
        ),
        ("GET", "/api/v1/tokens", "/api/v1/tokens".into(), None, 200),
        ("POST", "/api/v1/console/links", "/api/v1/console/links".into(), Some(json!({"role": "viewer"})), 201),
        ("GET", "/api/v1/audit", "/api/v1/audit?limit=5".into(), None, 200),
    ];
    for (method, template, path, body, want) in calls {
        let (status, answer) = client.raw(method, &path, body).unwrap();
        assert_eq!(status, want, "{method} {path}: {answer:#}");
        check(&doc, method, template, status, &answer);
    }
    let (status, body) = client.raw("DELETE", "/api/v1/tokens/spec", None).unwrap();
    check(&doc, "DELETE", "/api/v1/tokens/{id}", status, &body);
}

/// A long history pages through: 300 000 samples of one device read with
/// `outpostctl metrics` (which follows the API's cursors and prints as the
/// pages arrive) come out complete, once each, in order; one API answer
/// holds at most a page.
#[test]
fn a_long_history_pages_through_the_api_and_outpostctl() {
    const N: u64 = 300_000;
    let scratch = Scratch::new().unwrap();
    let timings = Timings::default();
    let hub = Hub::start(scratch.path(), timings.clone()).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "long", &timings).unwrap();
    agent.start_loadgen(&["--records", &N.to_string(), "--batch", "2000"]).unwrap();
    let since = outpost_tests::loadgen_base_ms().to_string();
    let until = (outpost_tests::loadgen_base_ms() + N).to_string();
    // Records arrive in order: once the last synthetic one is there, all are.
    let last = (outpost_tests::loadgen_base_ms() + N - 1).to_string();
    wait_for(Duration::from_secs(180), "the last of the records at the hub", || {
        hub.client().metrics(&agent.id, Some(&last), Some(&until), Some(1)).ok().filter(|m| !m.samples.is_empty())
    })
    .unwrap();
    let (status, page) =
        hub.client().raw("GET", &format!("/api/v1/devices/{}/metrics?since={since}", agent.id), None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        page["samples"].as_array().unwrap().len(),
        outpost_hub::web::http::MAX_METRICS_PAGE,
        "one answer, one page"
    );
    assert!(page["next"].is_string(), "a full page names the next");
    let (status, _) =
        hub.client().raw("GET", &format!("/api/v1/devices/{}/metrics?after=yesterday", agent.id), None).unwrap();
    assert_eq!(status, 422, "a cursor the API did not make is refused");

    let out = outpost_tests::run(std::process::Command::new(outpost_tests::bin("outpostctl")).args([
        "--hub",
        &hub.api,
        "--token",
        &hub.admin_token,
        "--json",
        "metrics",
        &agent.id,
        "--since",
        &since,
        "--until",
        &until,
    ]))
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view: outpost_hub::api::MetricsView = serde_json::from_slice(&out.stdout).unwrap();
    outpost_tests::assert_exactly_once_in_order(&view.samples, N);
}
