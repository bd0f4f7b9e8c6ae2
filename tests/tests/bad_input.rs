//! Bad input never crashes a peer and never writes anything: malformed
//! frames, foreign certificates, bad tokens, bad config, missing API tokens.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_agent::identity::Identity;
use outpost_agent::tls::{self, Timings as TlsTimings};
use outpost_hub::service::ca::FleetCa;
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::protocol::{Batch, Envelope, Hello, Message, PROTOCOL_VERSION, Record, RecordBody, StateReport};
use outpost_shared::time::Timestamp;
use outpost_shared::{encode_frame, token};
use outpost_tests::{Agent, Hub, Scratch, Timings, bin, fleet, http_from, run, wait_for, wait_online};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TLS: TlsTimings = TlsTimings { keepalive: Duration::from_secs(1), idle_timeout: Duration::from_secs(5) };

fn hello_frame() -> Vec<u8> {
    let hello = Hello { agent_version: "test".into(), name: "raw".into(), started_at: Timestamp::now() };
    encode_frame(&Envelope::new(Message::Hello(hello)).encode(), 1 << 20).unwrap()
}

/// Opens a session as `identity`, sends `hello` (if set) then `bytes`
/// (finishing the stream if `finish`), and returns how the hub closed the
/// connection.
async fn send_raw(hub: &str, identity: &Identity, hello: bool, bytes: &[u8], finish: bool) -> quinn::ConnectionError {
    let remote = hub.parse().unwrap();
    let mut endpoint = tls::client_endpoint(remote).unwrap();
    endpoint.set_default_client_config(tls::session_config(identity, TLS).unwrap());
    let connection = endpoint.connect(remote, HUB_SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    if hello {
        send.write_all(&hello_frame()).await.unwrap();
        // The welcome proves the session was accepted before the bad bytes.
        let mut header = [0u8; 4];
        recv.read_exact(&mut header).await.unwrap();
    }
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    tokio::time::timeout(Duration::from_secs(10), connection.closed()).await.expect("hub did not close")
}

fn protocol_close_reason(err: &quinn::ConnectionError) -> String {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, outpost_hub::transport::quic::CLOSE_PROTOCOL.into(), "{close:?}");
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("expected an application close with a reason, got {other:?}"),
    }
}

#[test]
fn malformed_truncated_and_oversized_frames_close_only_that_connection() {
    let scratch = Scratch::new().unwrap();
    let (hub, agents) = fleet(&scratch, 1, Timings::default()).unwrap();
    let good = agents[0].id.as_str();
    wait_online(&hub, &[good], true, Duration::from_secs(10)).unwrap();
    let raw = Agent::enroll(scratch.path(), &hub, "raw", &Timings::default()).unwrap();
    let identity = Identity::load(&raw.data_dir).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    // Batches: one with a signature that is not the device's, one signed
    // properly then altered, one passed off as another device's.
    let record = Record {
        seq: 1,
        at: Timestamp::now(),
        body: RecordBody::StateReport(StateReport { applied_version: 1, error: None }),
    };
    let signer = identity.signer().unwrap();
    let frame = |batch: Batch| encode_frame(&Envelope::new(Message::Batch(batch)).encode(), 1 << 20).unwrap();
    let forged = frame(Batch::new(identity.device_id.clone(), std::slice::from_ref(&record), |_| vec![0x30, 0x00]));
    let mut altered = Batch::new(identity.device_id.clone(), std::slice::from_ref(&record), |i| signer.sign(i));
    *altered.payload.last_mut().unwrap() ^= 1;
    let altered = frame(altered);
    let other = frame(Batch::new(good.parse().unwrap(), std::slice::from_ref(&record), |i| signer.sign(i)));
    let cases: Vec<(&str, bool, Vec<u8>, bool, &str)> = vec![
        ("forged signature", true, forged, false, "signature does not verify"),
        ("altered batch", true, altered, false, "signature does not verify"),
        ("another device's batch", true, other, false, "on dev-"),
        ("oversized", true, (2u32 << 20).to_be_bytes().to_vec(), false, "exceeds the limit"),
        ("malformed", true, vec![0, 0, 0, 3, PROTOCOL_VERSION as u8, 0xEE, 0xFF], false, "malformed envelope"),
        // 200 as a postcard varint; far from any version this project will reach soon.
        ("unknown version", true, vec![0, 0, 0, 4, 0xC8, 0x01, 5, 2], false, "unsupported protocol version 200"),
        ("truncated", true, vec![0, 0, 0, 100, 1, 2, 3], true, "stream ended inside a frame"),
        ("garbage instead of hello", false, b"GET / HTTP/1.1\r\n\r\n".to_vec(), false, "exceeds the limit"),
        ("empty frame", true, vec![0, 0, 0, 0], false, "empty frame"),
    ];
    for (name, hello, bytes, finish, expect) in cases {
        let closed = rt.block_on(send_raw(&hub.quic_addr, &identity, hello, &bytes, finish));
        let reason = protocol_close_reason(&closed);
        assert!(reason.contains(expect), "{name}: close reason {reason:?} lacks {expect:?}");
    }
    // Nothing of the refused batches was stored.
    assert_eq!(hub.device(&raw.id).unwrap().last_seq, 0, "a refused batch was stored");
    // The hub is still serving: the good agent is online and a new session works.
    assert!(hub.proc.as_ref().is_some(), "hub handle gone");
    wait_online(&hub, &[good], true, Duration::from_secs(5)).unwrap();
    let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap();
    assert!(log.contains("Closing session: protocol violation."), "no logged reason in the hub log");
}

#[test]
fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();

    // A complete identity from a different fleet CA.
    let foreign_dir = scratch.path().join("foreign-hub");
    outpost_hub::init(&foreign_dir).unwrap();
    let foreign = FleetCa::load(&foreign_dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::new()).unwrap().serialize_request(&key).unwrap();
    let id = "dev-impostor".parse().unwrap();
    let cert = foreign.sign_device(csr.der(), &id).unwrap();
    // It trusts the real hub's CA, so only the client side is foreign.
    let real_ca = FleetCa::load(&hub.data_dir).unwrap().cert_der().clone();
    let identity = Identity::store(
        &scratch.path().join("impostor"),
        id,
        hub.quic_addr.clone(),
        None,
        key.serialize_pem(),
        cert,
        real_ca,
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let remote = hub.quic_addr.parse().unwrap();
        let mut endpoint = tls::client_endpoint(remote).unwrap();
        endpoint.set_default_client_config(tls::session_config(&identity, TLS).unwrap());
        // TLS 1.3: the client believes the handshake done; the refusal
        // arrives on the first exchange.
        let connection = endpoint.connect(remote, HUB_SERVER_NAME).unwrap().await.unwrap();
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        let _ = send.write_all(&hello_frame()).await;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf)).await {
            Ok(Ok(_)) => panic!("the hub answered a foreign certificate"),
            Ok(Err(_)) => connection.closed().await.to_string(),
            Err(_) => panic!("no refusal within 10s"),
        }
    });
    assert!(err.contains("certificate") || err.contains("handshake"), "{err}");
    assert!(hub.devices().unwrap().is_empty());
    let log_has_refusal = wait_for(Duration::from_secs(5), "the refusal in the hub log", || {
        let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
        log.contains("TLS handshake refused").then_some(())
    });
    log_has_refusal.unwrap();
}

fn enroll_cli(token: &str, data_dir: &Path) -> (bool, String) {
    let out = run(Command::new(bin("outpost-agent"))
        .args(["enroll", "--name", "x", "--token", token, "--data-dir"])
        .arg(data_dir))
    .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn expired_unknown_and_used_up_tokens_are_refused_and_nothing_is_written() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    let dir = |n: &str| scratch.path().join(n);

    // Used up: one use, two devices.
    let once = hub.token("10m", 1).unwrap();
    assert!(enroll_cli(&once, &dir("first")).0);
    let (ok, err) = enroll_cli(&once, &dir("second"));
    assert!(!ok && err.contains("used up (1 of 1 uses)"), "{err}");
    assert!(!dir("second").join("identity").exists());

    // Expired.
    let short = hub.token("1s", 5).unwrap();
    let expires = token::parse(&short).unwrap().claims.expires_at;
    wait_for(Duration::from_secs(5), "the token to expire", || (Timestamp::now().as_secs() > expires).then_some(()))
        .unwrap();
    let (ok, err) = enroll_cli(&short, &dir("late"));
    assert!(!ok && err.contains("enrollment token has expired"), "{err}");
    assert!(!dir("late").exists() || !dir("late").join("identity").exists());

    // Unknown: the right CA pin and address, but not tagged by this hub.
    let real = token::parse(&hub.token("10m", 1).unwrap()).unwrap();
    let forged = token::issue(&token::TokenClaims { uses: 1000, ..real.claims }, b"guessed key");
    let (ok, err) = enroll_cli(&forged, &dir("forged"));
    assert!(!ok && err.contains("not issued by this hub"), "{err}");

    // Unknown: a token of another fleet pointing at this hub.
    let other = dir("other-hub");
    outpost_hub::init(&other).unwrap();
    let foreign =
        outpost_hub::service::enroll::create_token(&other, Duration::from_secs(600), 1, Some(hub.quic_addr.clone()))
            .unwrap();
    let (ok, err) = enroll_cli(&foreign, &dir("foreign"));
    assert!(!ok && err.contains("does not hold the fleet CA the token pins"), "{err}");

    // Not a token at all.
    let (ok, err) = enroll_cli("hello", &dir("garbage"));
    assert!(!ok && err.contains("not an Outpost enrollment token"), "{err}");

    for n in ["forged", "foreign", "garbage"] {
        assert!(!dir(n).join("identity").exists(), "{n} wrote an identity");
    }
    assert_eq!(hub.devices().unwrap().len(), 1, "only the first enrollment may be recorded");
}

#[test]
fn bad_config_lists_every_error_with_its_path_and_exits_64() {
    let scratch = Scratch::new().unwrap();
    let agent_cfg = scratch.path().join("agent.toml");
    std::fs::write(&agent_cfg, "nmae = \"x\"\n[uplink]\nheartbeat = \"5 parsecs\"\n").unwrap();
    let hub_cfg = scratch.path().join("hub.toml");
    std::fs::write(&hub_cfg, "[quic]\nidle_timeout = \"forever\"\nlisten_on = \"x\"\n").unwrap();
    let cases = [
        (
            "outpost-agent",
            "validate",
            &agent_cfg,
            vec!["data_dir: missing required key", "uplink.heartbeat: invalid duration", "nmae: unknown key"],
        ),
        (
            "outpost-agent",
            "run",
            &agent_cfg,
            vec!["data_dir: missing required key", "uplink.heartbeat: invalid duration", "nmae: unknown key"],
        ),
        (
            "outpost-hub",
            "validate",
            &hub_cfg,
            vec![
                "data_dir: missing required key",
                "quic.idle_timeout: invalid duration",
                "quic.listen_on: unknown key",
            ],
        ),
        (
            "outpost-hub",
            "serve",
            &hub_cfg,
            vec![
                "data_dir: missing required key",
                "quic.idle_timeout: invalid duration",
                "quic.listen_on: unknown key",
            ],
        ),
    ];
    for (binary, verb, cfg, expected) in cases {
        let out = run(Command::new(bin(binary)).arg(verb).arg("--config").arg(cfg)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{binary} {verb}: {stderr}");
        assert!(stderr.contains("3 errors"), "{binary} {verb}: {stderr}");
        for e in expected {
            assert!(stderr.contains(e), "{binary} {verb}: {e:?} missing from {stderr}");
        }
    }
}

fn raw_get(api: &str, auth: Option<&str>) -> u16 {
    let addr = api.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET /api/v1/devices HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn api_calls_without_a_valid_token_get_401() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    assert_eq!(raw_get(&hub.api, None), 401);
    assert_eq!(raw_get(&hub.api, Some("Bearer opa_wrong")), 401);
    assert_eq!(raw_get(&hub.api, Some("Basic YWRtaW46YWRtaW4=")), 401);
    assert_eq!(raw_get(&hub.api, Some(&format!("Bearer {}", hub.admin_token))), 200);
    let addr = hub.api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

#[test]
fn failed_authentication_is_limited_per_address_and_audited_as_counts() {
    let scratch = Scratch::new().unwrap();
    let mut hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    hub.http_extra = "failed_auth_burst = 5\nfailed_auth_window = \"3s\"\n".into();
    hub.kill();
    hub.serve().unwrap();
    let (attacker, honest, other) =
        (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let admin = format!("Authorization: Bearer {}", hub.admin_token);
    let get = |from, auth: &str, path: &str| http_from(from, &hub.api, "GET", path, &[auth], b"").unwrap();

    // Authentication comes before anything else of a request is read: a
    // wrong token with a malformed query, a body that is not JSON, an
    // unknown path or method is 401, never the parser's detail.
    let wrong = "Authorization: Bearer opt_wrong";
    for (method, path, body) in [
        ("GET", "/api/v1/devices?limit=many", &b""[..]),
        ("POST", "/api/v1/tokens", b"{not json"),
        ("GET", "/api/v1/commands/-1", b""),
        ("GET", "/api/v1/nowhere", b""),
        ("HEAD", "/api/v1/devices", b""),
    ] {
        let answer =
            http_from(other, &hub.api, method, path, &[wrong, "Content-Type: application/json"], body).unwrap();
        assert_eq!(answer.status, 401, "{method} {path}: {answer:?}");
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"), "{answer:?}");
    }

    // Five failures, then 429 with Retry-After, before the token is looked
    // up: a flood gets little more than one 401 per drained slot (3 s / 5).
    for n in 0..5 {
        assert_eq!(get(attacker, wrong, "/api/v1/devices").status, 401, "failure {n}");
    }
    let refused = get(attacker, wrong, "/api/v1/devices");
    assert_eq!(refused.status, 429, "{refused:?}");
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&wait), "{refused:?}");
    assert!(refused.json()["error"].as_str().unwrap().contains("too many failed attempts"), "{refused:?}");
    // A valid token from the same address waits too (guessing cannot be
    // told apart from it); another address is not touched.
    assert_eq!(get(attacker, &admin, "/api/v1/devices").status, 429);
    let started = std::time::Instant::now();
    let (mut unauthorized, mut throttled) = (0u32, 1u32);
    while started.elapsed() < Duration::from_secs(2) {
        match get(attacker, wrong, "/api/v1/devices").status {
            401 => unauthorized += 1,
            429 => throttled += 1,
            other => panic!("answered {other}"),
        }
        assert_eq!(get(honest, &admin, "/api/v1/overview").status, 200, "another address is served");
    }
    let slots = started.elapsed().as_secs_f64() / 0.6;
    assert!(f64::from(unauthorized) <= slots + 1.0, "{unauthorized} failures let through in 2 s");
    assert!(throttled > 20, "only {throttled} refused with 429");
    assert_eq!(get(honest, wrong, "/api/v1/devices").status, 401, "each address has its own limit");

    // Audited: the first refusal of each address and status in full, the
    // rest as one count when the interval (3 s) ends.
    let client = hub.client();
    let rows = wait_for(Duration::from_secs(15), "the count of 429s in the audit log", || {
        let page = client.raw("GET", "/api/v1/audit?outcome=refused&limit=1000", None).ok()?.1;
        let rows = page["entries"].as_array()?.clone();
        rows.iter()
            .any(|r| r["action"] == "refused requests" && r["status"] == 429 && r["from"] == "127.0.0.1")
            .then_some(rows)
    })
    .unwrap();
    let from_attacker: Vec<_> = rows.iter().filter(|r| r["from"] == "127.0.0.1").collect();
    assert!(from_attacker.len() <= 8, "{} rows for one address: {from_attacker:#?}", from_attacker.len());
    let counted: u64 = from_attacker
        .iter()
        .filter(|r| r["action"] == "refused requests")
        .filter_map(|r| r["detail"].as_str()?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(counted + 4 >= u64::from(throttled + unauthorized), "{counted} counted: {from_attacker:#?}");
}

#[test]
fn bad_bulk_requests_are_refused_one_by_one_and_write_nothing() {
    use outpost_agent::bulk::{BulkClient, BulkError};
    use outpost_shared::protocol::{
        ChunkBlob, ChunkIds, ChunkRef, MAX_BULK_FRAME, RefusalReason, SnapshotChunkList, SnapshotData, SnapshotSummary,
    };
    let scratch = Scratch::new().unwrap();
    let (hub, agents) = fleet(&scratch, 1, Timings::default()).unwrap();
    let other = agents[0].id.clone();
    let raw = Agent::enroll(scratch.path(), &hub, "raw-bulk", &Timings::default()).unwrap();
    let identity = Identity::load(&raw.data_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = BulkClient::connect(&identity, &hub.quic_addr, Duration::from_secs(10), TLS).await.unwrap();
        let refused = |r: Result<Message, BulkError>| match r {
            Err(BulkError::Refused { reason, message }) => (reason, message),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let summary = |name: &str| SnapshotSummary {
            name: name.into(),
            set: "s".into(),
            started: Timestamp(1),
            ended: Timestamp(2),
            entries: 0,
            bytes: 0,
            chunks: 0,
            problems: 0,
        };
        for name in ["../../escape", ".hidden", "a/b", ""] {
            let put = Message::PutSnapshot(SnapshotData { summary: summary(name), manifest: vec![1; 64] });
            let (reason, message) = refused(client.request(put).await);
            assert_eq!(reason, RefusalReason::BadRequest, "{name:?}: {message}");
        }
        // A snapshot is catalogued only with its complete chunk list, every
        // chunk of it at the hub.
        let list = |name: &str, ids: Vec<[u8; 32]>| {
            Message::SnapshotChunks(SnapshotChunkList { name: name.into(), first: true, ids })
        };
        let (reason, _) = refused(client.request(list("../up", vec![])).await);
        assert_eq!(reason, RefusalReason::BadRequest, "a list for a path-escaping name");
        let claims = SnapshotSummary { chunks: 1, ..summary("1-s-nolist") };
        let put = Message::PutSnapshot(SnapshotData { summary: claims.clone(), manifest: vec![1; 64] });
        let (reason, message) = refused(client.request(put).await);
        assert!(reason == RefusalReason::BadRequest && message.contains("chunk list"), "{message}");
        assert!(matches!(client.request(list("1-s-nolist", vec![[9; 32]])).await, Ok(Message::Done)));
        let put = Message::PutSnapshot(SnapshotData { summary: claims, manifest: vec![1; 64] });
        let (reason, message) = refused(client.request(put).await);
        assert!(reason == RefusalReason::BadRequest && message.contains("does not hold"), "{message}");
        let (reason, _) = refused(client.request(Message::PutChunk(ChunkBlob { id: [1; 32], blob: vec![0; 8] })).await);
        assert_eq!(reason, RefusalReason::BadRequest, "a blob too short to be a chunk");
        let (reason, _) = refused(client.request(Message::HaveChunks(ChunkIds { ids: vec![[0; 32]; 20_000] })).await);
        assert_eq!(reason, RefusalReason::BadRequest, "too many ids");
        // Another device's backups, without a grant.
        let other_id = other.parse().unwrap();
        let (reason, message) = refused(client.request(Message::ListBackups(other_id)).await);
        assert_eq!(reason, RefusalReason::NotAuthorised, "{message}");
        let get = Message::GetChunk(ChunkRef { device: other.parse().unwrap(), id: [2; 32] });
        assert_eq!(refused(client.request(get).await).0, RefusalReason::NotAuthorised);
        // Session messages are not bulk requests.
        let hello = Message::Hello(Hello { agent_version: "x".into(), name: "x".into(), started_at: Timestamp(1) });
        assert_eq!(refused(client.request(hello).await).0, RefusalReason::BadRequest);
        // A malformed frame and an oversized one end their stream only.
        let remote = hub.quic_addr.parse().unwrap();
        let mut endpoint = tls::client_endpoint(remote).unwrap();
        endpoint.set_default_client_config(tls::bulk_config(&identity, TLS).unwrap());
        let connection = endpoint.connect(remote, HUB_SERVER_NAME).unwrap().await.unwrap();
        for bytes in [
            vec![0, 0, 0, 3, PROTOCOL_VERSION as u8, 0xEE, 0xFF],
            u32::try_from(MAX_BULK_FRAME + 1).unwrap().to_be_bytes().to_vec(),
        ] {
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            let _ = send.finish();
            let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20)).await;
            assert!(matches!(read, Ok(Err(_))), "the stream is reset: {read:?}");
        }
        // The same connection still serves a good request.
        let (mut send, recv) = connection.open_bi().await.unwrap();
        let ask = Message::HaveChunks(ChunkIds { ids: vec![[3; 32]] });
        send.write_all(&encode_frame(&Envelope::new(ask).encode(), MAX_BULK_FRAME).unwrap()).await.unwrap();
        send.finish().unwrap();
        let mut reader = outpost_shared::io::FrameReader::new(recv, MAX_BULK_FRAME);
        let answer = reader.next().await.unwrap().unwrap().message;
        assert_eq!(answer, Message::MissingChunks(ChunkIds { ids: vec![[3; 32]] }));
        client.close().await;
    });
    // Nothing was written: no snapshot, no chunk, nothing outside the tree.
    assert!(hub.client().backups(&identity.device_id.to_string()).unwrap().snapshots.is_empty());
    assert_eq!(hub.client().backups(&identity.device_id.to_string()).unwrap().stored_chunks, 0);
    for escaped in ["escape", "backups/escape", "backups/raw-bulk/escape"] {
        assert!(!hub.data_dir.join(escaped).exists(), "{escaped}");
    }
}

/// A device name with terminal control sequences (a hostile or broken
/// device) is logged escaped: nothing it sends reaches the hub's log raw.
#[test]
fn control_characters_in_device_names_do_not_reach_the_log() {
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    let token = hub.token("1h", 1).unwrap();
    let out = run(Command::new(bin("outpost-agent"))
        .args(["enroll", "--name", "evil\u{1b}[31mred\u{7}", "--token", &token, "--data-dir"])
        .arg(scratch.path().join("evil")))
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap();
    assert!(log.contains(r#"name="evil\u{1b}[31mred\u{7}""#), "{log}");
    assert!(!log.contains('\u{1b}') && !log.contains('\u{7}'), "a control character reached the log");
}
