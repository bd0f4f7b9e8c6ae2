//! TLS around the hub (issue 25). The API and console over HTTPS: `[http]
//! tls_cert` and
//! `tls_key` make the listener speak TLS only; outpostctl reaches it with
//! the CA file and refuses it without; a plain HTTP request to the TLS port
//! gets no answer and harms nothing; the console's session cookie is
//! `Secure`; SIGHUP loads a new certificate without a restart, and a broken
//! one on SIGHUP is refused while the old one stays. PostgreSQL over TLS:
//! libpq's `sslmode=verify-full` and `sslrootcert` in `store.url`; a server
//! that refuses plain TCP is reached only that way, and a certificate from
//! another CA is refused.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_tests::postgres::Postgres;
use outpost_tests::{Agent, Hub, Scratch, TestCa, Timings, bin, run, wait_for, wait_online};
use std::process::Command;
use std::time::Duration;

fn outpostctl(hub: &Hub, url: &str, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("outpostctl")).args(["--hub", url, "--token", &hub.admin_token]).args(extra)).unwrap()
}

#[test]
fn the_hub_serves_https_with_its_certificate_and_reloads_it_on_sighup() {
    let scratch = Scratch::new().unwrap();
    let ca = TestCa::new("test HTTPS CA").unwrap();
    let (cert, key, ca_file) =
        (scratch.path().join("hub.crt"), scratch.path().join("hub.key"), scratch.path().join("ca.pem"));
    std::fs::write(&ca_file, &ca.pem).unwrap();
    ca.leaf(&["localhost", "127.0.0.1"], &cert, &key).unwrap();
    let mut hub = Hub::start(scratch.path(), Timings::default()).unwrap();
    hub.kill();
    hub.http_extra =
        format!("tls_cert = {:?}\ntls_key = {:?}\n", cert.display().to_string(), key.display().to_string());
    hub.serve().unwrap();
    let https = hub.api.replace("http://", "https://");
    let ca_arg = ca_file.display().to_string();

    let out = outpostctl(&hub, &https, &["--ca-file", &ca_arg, "overview"]);
    assert!(out.status.success(), "outpostctl over HTTPS with the CA: {out:?}");
    let out = outpostctl(&hub, &https, &["overview"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.to_lowercase().contains("certificate"), "without the CA: {err}");
    // Without --ca-file the system's CAs are used (SSL_CERT_FILE here
    // stands for a CA the machine trusts).
    let out = run(Command::new(bin("outpostctl"))
        .args(["--hub", &https, "--token", &hub.admin_token, "overview"])
        .env("SSL_CERT_FILE", &ca_file))
    .unwrap();
    assert!(out.status.success(), "outpostctl with the CA among the system's: {out:?}");

    // Plain HTTP to the TLS port: no HTTP answer, and the hub serves on.
    let plain = ureq::get(&format!("{}/healthz", hub.api)).call();
    assert!(plain.is_err(), "plain HTTP answered on the TLS port: {plain:?}");
    let client = outpost_hub::client::Client::with_ca(&https, &hub.admin_token, &ca_file).unwrap();
    assert_eq!(client.health("healthz").unwrap().0, 200);

    // The console's session cookie is Secure over HTTPS.
    let roots = ureq::tls::RootCerts::from(vec![ureq::tls::Certificate::from_pem(ca.pem.as_bytes()).unwrap()]);
    let tls = ureq::tls::TlsConfig::builder()
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(roots)
        .build();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().tls_config(tls).max_redirects(0).http_status_as_error(false).build().into();
    let origin = https.clone();
    let answer = agent
        .post(&format!("{https}/console/sign-in"))
        .header("Origin", &origin)
        .send_form([("token", hub.admin_token.as_str()), ("next", "/console/")])
        .unwrap();
    let cookie = answer.headers().get("set-cookie").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
    assert!(cookie.contains("Secure"), "session cookie without Secure over HTTPS: {cookie:?} ({})", answer.status());

    // SIGHUP with a certificate for another name: the next connection gets
    // it (so 127.0.0.1 no longer matches), without a restart.
    let pid = hub.proc.as_ref().unwrap().pid();
    ca.leaf(&["other.example"], &cert, &key).unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the reloaded certificate in use", || {
        (!outpostctl(&hub, &https, &["--ca-file", &ca_arg, "overview"]).status.success()).then_some(())
    })
    .unwrap();
    assert!(hub.log_text().contains("HTTPS certificate reloaded."));
    // A broken pair on SIGHUP: refused, the one in use stays; then a good
    // one again.
    std::fs::write(&key, "not a key").unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the broken certificate refused", || {
        hub.log_text().contains("HTTPS certificate not reloaded; the one in use stays.").then_some(())
    })
    .unwrap();
    ca.leaf(&["localhost", "127.0.0.1"], &cert, &key).unwrap();
    hub.proc.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for(Duration::from_secs(10), "the good certificate back", || {
        outpostctl(&hub, &https, &["--ca-file", &ca_arg, "overview"]).status.success().then_some(())
    })
    .unwrap();
    assert_eq!(hub.proc.as_mut().unwrap().pid(), pid, "the hub was restarted");
    hub.kill();
}

#[test]
fn the_hub_reaches_postgresql_over_verified_tls() {
    let scratch = Scratch::new().unwrap();
    let ca = TestCa::new("test PostgreSQL CA").unwrap();
    let ca_file = scratch.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let mut pg = Postgres::start(true).unwrap();
    pg.create_db("outpost").unwrap();
    pg.serve_tls(&ca).unwrap();
    let tcp = pg.tcp_url("outpost");
    let store = |url: &str| format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\npool_size = 4\n");
    let verified = format!("{tcp} sslmode=verify-full sslrootcert={}", ca_file.display());
    let timings = Timings::default();
    let hub = Hub::start_on_store(scratch.path(), timings.clone(), "127.0.0.1:0", Some(pg), store(&verified)).unwrap();
    let mut agent = Agent::enroll(scratch.path(), &hub, "over-tls", &timings).unwrap();
    agent.start().unwrap();
    wait_online(&hub, &[&agent.id], true, Duration::from_secs(15)).unwrap();

    // The same database without TLS (the server refuses plain TCP), and
    // with TLS but without the CA that issued the server's certificate:
    // `validate` says why and exits 69.
    let other_ca = scratch.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::new("another CA").unwrap().pem).unwrap();
    for (url, why) in [
        (tcp.clone(), "no encryption"),
        (format!("{tcp} sslmode=verify-full sslrootcert={}", other_ca.display()), "certificate"),
    ] {
        let config = scratch.path().join("check.toml");
        let text = format!("data_dir = {:?}\n{}", hub.data_dir.display().to_string(), store(&url));
        std::fs::write(&config, text).unwrap();
        let out = run(Command::new(bin("outpost-hub")).arg("validate").arg("--config").arg(&config)).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{url}: {err}");
        assert!(err.contains("store.url") && err.to_lowercase().contains(why), "{url}: {err}");
    }
}
