//! LAN peers over real multicast: agents in separate network namespaces
//! joined by a bridge ([`outpost_tests::netns::Lan`]) find each other by
//! mDNS, trust only members of their fleet, and relay for each other. These
//! tests need root; they create and delete their own namespaces.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_shared::peers::{PeerEntry, PeerState};
use outpost_tests::netns::Lan;
use outpost_tests::{Agent, Hub, Scratch, Timings, assert_exactly_once_in_order, wait_all, wait_for, wait_progress};
use std::time::{Duration, Instant};

/// Peer settings of the test agents: quick probes, gone after 3 s.
const PEERS: &str = "[peers]\nenabled = true\nprobe_interval = \"500ms\"\ngone_after = \"3s\"\nrelay_after = \"1s\"\n";

fn agent_in(scratch: &Scratch, hub: &Hub, lan: &Lan, i: usize, name: &str) -> Agent {
    let mut agent = Agent::enroll_with(scratch.path(), hub, name, &Timings::default(), PEERS).unwrap();
    agent.netns = Some(lan.ns(i).to_owned());
    agent
}

fn state_of<'a>(peers: &'a [PeerEntry], id: &str) -> Option<&'a PeerState> {
    peers.iter().find(|p| p.id == id).map(|p| &p.state)
}

/// Waits until `agent` lists every id of `others` in a state `want` accepts.
fn wait_states(agent: &Agent, others: &[&str], limit: Duration, what: &str, want: impl Fn(&PeerState) -> bool) {
    wait_for(limit, &format!("{} to see {others:?} {what}", agent.name), || {
        let peers = agent.peers().ok()?;
        others.iter().all(|id| state_of(&peers, id).is_some_and(&want)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; it lists {:?}", agent.peers().ok()));
}

#[test]
fn three_agents_discover_and_trust_each_other_and_notice_one_leaving() {
    let lan = Lan::new(3).unwrap();
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start_on(scratch.path(), Timings::default(), &format!("{}:0", lan.hub_ip())).unwrap();
    let mut agents: Vec<Agent> = (0..3).map(|i| agent_in(&scratch, &hub, &lan, i, &format!("lan-{i}"))).collect();
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let started = Instant::now();
    for agent in &mut agents {
        agent.start().unwrap();
    }
    for (i, agent) in agents.iter().enumerate() {
        let others: Vec<&str> = ids.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, id)| id.as_str()).collect();
        wait_states(agent, &others, Duration::from_secs(20), "trusted", |s| *s == PeerState::Trusted);
    }
    eprintln!("three agents trust each other {:?} after start", started.elapsed());

    // The hub shows the LAN topology each device reported.
    for id in &ids {
        wait_for(Duration::from_secs(15), &format!("the hub to show {id}'s two trusted peers"), || {
            let view = hub.client().peers(id).ok()?;
            (view.peers.iter().filter(|p| p.state == "trusted").count() == 2).then_some(())
        })
        .unwrap();
    }
    let out = std::process::Command::new(outpost_tests::bin("outpostctl"))
        .args(["--hub", &hub.api, "--token", &hub.admin_token, "peers", &ids[0]])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.starts_with("ID"), "{table}");
    for id in &ids[1..] {
        let row = table.lines().find(|l| l.starts_with(id.as_str())).unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains("trusted") && row.contains(" up "), "{row}");
    }
    let peers = agents[0].peers().unwrap();
    let other = peers.iter().find(|p| p.id == ids[1]).unwrap();
    assert!(other.uplink, "peer should advertise its uplink: {other:?}");
    assert!(other.addresses.iter().any(|a| a.starts_with(&lan.hub_ip()[..lan.hub_ip().len() - 3])), "{other:?}");

    // A peer that dies without a goodbye is gone within gone_after (3 s)
    // plus a probe.
    agents[2].proc.as_mut().unwrap().kill();
    let killed = Instant::now();
    for agent in &agents[..2] {
        wait_states(agent, &[&ids[2]], Duration::from_secs(10), "gone", |s| *s == PeerState::Gone);
    }
    let gone_after = killed.elapsed();
    eprintln!("a SIGKILLed peer was marked gone {gone_after:?} after it died (gone_after 3s)");
    assert!(gone_after < Duration::from_secs(6), "took {gone_after:?}");
    // The survivors still trust each other.
    wait_states(&agents[0], &[&ids[1]], Duration::from_secs(5), "trusted", |s| *s == PeerState::Trusted);
}

#[test]
fn relay_through_a_peer_delivers_exactly_once_in_order_and_the_direct_link_can_return_mid_stream() {
    const RECORDS: u64 = 20_000;
    let lan = Lan::new(2).unwrap();
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start_on(scratch.path(), Timings::default(), &format!("{}:0", lan.hub_ip())).unwrap();
    let mut cut = agent_in(&scratch, &hub, &lan, 0, "cut-off");
    let mut carrier = agent_in(&scratch, &hub, &lan, 1, "carrier");
    lan.cut(0).unwrap();
    carrier.start().unwrap();
    cut.start_loadgen(&["--records", "20000", "--batch", "20", "--appends-per-sec", "40"]).unwrap();
    // Only the relay can bring records now.
    let relayed = wait_progress(&hub, &cut.id, RECORDS / 3, Duration::from_secs(60));
    let hub_log = std::fs::read_to_string(scratch.path().join("hub.log")).unwrap();
    assert!(
        hub_log.lines().any(|l| l.contains("Relayed batch stored") && l.contains(&cut.id)),
        "records arrived, but not relayed?"
    );
    eprintln!("{relayed} records reached the hub through the peer; restoring the direct link");
    lan.restore(0).unwrap();
    wait_for(Duration::from_secs(20), "the direct link back", || {
        hub.device(&cut.id).ok().filter(|d| d.transport.as_deref() == Some("quic"))
    })
    .unwrap();
    let samples = wait_all(&hub, &cut.id, RECORDS, Duration::from_secs(120));
    assert_exactly_once_in_order(&samples, RECORDS);
}

/// A fake peer in the root namespace, on the LAN's bridge (its second
/// address, which the cut does not affect): it advertises
/// `claimed` (a real device id of the fleet) with the fleet's id and an
/// uplink, but holds a certificate from its own CA. Counts what reaches it.
struct FakePeer {
    _mdns: mdns_sd::ServiceDaemon,
    handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    streams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl FakePeer {
    fn start(lan: &Lan, hub: &Hub, claimed: &str) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let name = outpost_shared::identity::device_server_name(claimed);
        let mut params = rcgen::CertificateParams::new(vec![name]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, claimed);
        let cert = params.self_signed(&key).unwrap();
        let chain = vec![cert.der().clone()];
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![outpost_agent::peers::PEER_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let bind: std::net::SocketAddr = format!("{}:0", lan.root_ip()).parse().unwrap();
        let endpoint = runtime.block_on(async { quinn::Endpoint::server(server, bind) }).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let (handshakes, streams) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (h, s) = (handshakes.clone(), streams.clone());
        runtime.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else { return };
                    h.fetch_add(1, Ordering::SeqCst);
                    while connection.accept_bi().await.is_ok() {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        use rustls_pki_types::pem::PemObject;
        let ca = rustls_pki_types::CertificateDer::from_pem_file(hub.data_dir.join("ca.crt")).unwrap();
        let fleet = outpost_shared::peers::fleet_id(&outpost_shared::Fingerprint::of_der(&ca));
        let mdns = mdns_sd::ServiceDaemon::new().unwrap();
        mdns.disable_interface(mdns_sd::IfKind::All).unwrap();
        mdns.enable_interface(mdns_sd::IfKind::Addr(lan.root_ip().parse().unwrap())).unwrap();
        let port_text = port.to_string();
        let version = outpost_shared::protocol::PROTOCOL_VERSION.to_string();
        let txt = [("v", version.as_str()), ("fleet", fleet.as_str()), ("port", port_text.as_str()), ("uplink", "up")];
        let info = mdns_sd::ServiceInfo::new(
            outpost_shared::peers::SERVICE_TYPE,
            claimed,
            "fake.local.",
            lan.root_ip().as_str(),
            port,
            &txt[..],
        )
        .unwrap();
        mdns.register(info).unwrap();
        FakePeer { _mdns: mdns, handshakes, streams, _runtime: runtime }
    }

    fn received(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (self.handshakes.load(Ordering::SeqCst), self.streams.load(Ordering::SeqCst))
    }
}

#[test]
fn a_fake_peer_with_a_foreign_certificate_is_not_trusted_and_a_foreign_fleet_is_ignored() {
    let lan = Lan::new(2).unwrap();
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start_on(scratch.path(), Timings::default(), &format!("{}:0", lan.hub_ip())).unwrap();
    let mut agent = agent_in(&scratch, &hub, &lan, 0, "honest");
    // A real member of the fleet, never started: the fake claims its id.
    let absent = Agent::enroll(scratch.path(), &hub, "absent", &Timings::default()).unwrap();
    // A device of another fleet on the same LAN.
    let other_root = scratch.path().join("other-fleet");
    let other_hub = Hub::start_on(&other_root, Timings::default(), "127.0.0.1:0").unwrap();
    let mut stranger = Agent::enroll_with(&other_root, &other_hub, "stranger", &Timings::default(), PEERS).unwrap();
    stranger.netns = Some(lan.ns(1).to_owned());
    // The honest agent has no uplink, so it would relay to anyone trusted
    // who claims one; the fake claims one.
    lan.cut(0).unwrap();
    let fake = FakePeer::start(&lan, &hub, &absent.id);
    agent.start().unwrap();
    stranger.start().unwrap();

    wait_states(&agent, &[&absent.id], Duration::from_secs(20), "untrusted", |s| {
        matches!(s, PeerState::Untrusted { .. })
    });
    wait_states(&agent, &[&stranger.id], Duration::from_secs(20), "foreign", |s| *s == PeerState::Foreign);
    let peers = agent.peers().unwrap();
    eprintln!("honest agent lists: {peers:?}");
    let Some(PeerState::Untrusted { reason }) = state_of(&peers, &absent.id) else { unreachable!() };
    assert!(reason.to_lowercase().contains("certificate"), "unexpected reason: {reason}");
    // Watch for a while (the agent re-dials and re-decides on relay every
    // second): the fake never completes a handshake nor gets a stream.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        assert_eq!(fake.received(), (0, 0), "the fake peer got a handshake or a stream");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(hub.device(&agent.id).unwrap().last_seq, 0, "records left the honest agent");
    assert!(agent.log_text().contains("LAN peer not trusted"), "the refusal is not logged");
}

/// Announcements of made-up devices claiming this fleet (its TXT values are
/// public: every agent broadcasts them), all from one host on the LAN's
/// bridge, as a hostile neighbour with a script would make them; their
/// port answers nothing.
struct Flood {
    mdns: mdns_sd::ServiceDaemon,
    fleet: String,
    ip: String,
    made: usize,
}

impl Flood {
    fn new(lan: &Lan, hub: &Hub) -> Self {
        use rustls_pki_types::pem::PemObject;
        let ca = rustls_pki_types::CertificateDer::from_pem_file(hub.data_dir.join("ca.crt")).unwrap();
        let fleet = outpost_shared::peers::fleet_id(&outpost_shared::Fingerprint::of_der(&ca));
        let mdns = mdns_sd::ServiceDaemon::new().unwrap();
        mdns.disable_interface(mdns_sd::IfKind::All).unwrap();
        mdns.enable_interface(mdns_sd::IfKind::Addr(lan.root_ip().parse().unwrap())).unwrap();
        Flood { mdns, fleet, ip: lan.root_ip(), made: 0 }
    }

    /// `n` more announcements; returns when all are registered.
    fn announce(&mut self, n: usize) {
        let version = outpost_shared::protocol::PROTOCOL_VERSION.to_string();
        let txt = [("v", version.as_str()), ("fleet", self.fleet.as_str()), ("port", "9"), ("uplink", "up")];
        for _ in 0..n {
            self.made += 1;
            let id = format!("dev-{:016x}", 0xf1_0000_0000_u64 + self.made as u64);
            let info = mdns_sd::ServiceInfo::new(
                outpost_shared::peers::SERVICE_TYPE,
                &id,
                &format!("{id}.local."),
                self.ip.as_str(),
                9,
                &txt[..],
            )
            .unwrap();
            // The daemon's queue is bounded: when it is full, give it a
            // moment to send what it holds (within a deadline).
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(mdns_sd::Error::Again) = self.mdns.register(info.clone()) {
                assert!(Instant::now() < deadline, "the mDNS daemon took no announcement for 30 s");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A child process killed and reaped when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident and peak memory of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_flood_of_fake_announcements_costs_bounded_memory_and_trusted_peers_keep_relaying() {
    let lan = Lan::new(3).unwrap();
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start_on(scratch.path(), Timings::default(), &format!("{}:0", lan.hub_ip())).unwrap();
    let mut agents: Vec<Agent> = (0..3).map(|i| agent_in(&scratch, &hub, &lan, i, &format!("flooded-{i}"))).collect();
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    lan.cut(0).unwrap();
    for agent in &mut agents {
        agent.start().unwrap();
    }
    wait_states(&agents[0], &[&ids[1], &ids[2]], Duration::from_secs(20), "trusted", |s| *s == PeerState::Trusted);
    let before = wait_progress(&hub, &ids[0], 3, Duration::from_secs(30));
    let pid = agents[0].proc.as_ref().unwrap().pid();
    let (rss_before, _) = memory_kib(pid);
    // Beside the agent, a bare mdns-sd browser: what the library itself
    // keeps of the same announcements.
    let bare = Reaped(
        std::process::Command::new("ip")
            .args(["netns", "exec", lan.ns(0)])
            .arg(outpost_tests::bin("outpost-mdns-browse"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let bare_before = wait_for(Duration::from_secs(10), "the bare browser to run", || {
        Some(memory_kib(bare.0.id()).0).filter(|kib| *kib > 0)
    })
    .unwrap();

    let mut flood = Flood::new(&lan, &hub);
    let mut last_seq = before;
    for wave in [1_000, 9_000] {
        let started = Instant::now();
        flood.announce(wave);
        // The table fills to its bound with fakes the agent tries to prove.
        wait_for(Duration::from_secs(30), "the table to fill with fakes", || {
            let peers = agents[0].peers().ok()?;
            let fakes = peers.iter().filter(|p| p.id.starts_with("dev-000000f1")).count();
            (fakes > 0 && peers.len() == 64).then_some(())
        })
        .unwrap();
        // Relay through the trusted peers goes on meanwhile.
        last_seq = wait_progress(&hub, &ids[0], last_seq + 3, Duration::from_secs(30));
        let peers = agents[0].peers().unwrap();
        assert!(peers.len() <= 64, "{} entries", peers.len());
        for id in &ids[1..] {
            assert_eq!(state_of(&peers, id), Some(&PeerState::Trusted), "a trusted peer was crowded out");
        }
        let (rss, peak) = memory_kib(pid);
        let (bare_rss, bare_peak) = memory_kib(bare.0.id());
        eprintln!(
            "{} announcements ({:?} to make): agent RSS {} -> {} KiB (peak {} KiB), {} entries; \
             bare mdns-sd browser RSS {} -> {} KiB (peak {} KiB)",
            flood.made,
            started.elapsed(),
            rss_before,
            rss,
            peak,
            peers.len(),
            bare_before,
            bare_rss,
            bare_peak
        );
        // mdns-sd keeps about 2 KiB per announced instance until its TTL
        // runs out, with no bound of its own (the bare browser shows it);
        // what the agent adds to that is bounded: its table, dials, logs
        // and reports. Under the big wave mdns-sd may end the agent's browse
        // (its queue fills) and the agent browses again on a new daemon,
        // whose cache fills anew while the allocator keeps some of the
        // first's: up to twice the library's then.
        let (agent_growth, library_growth) = (peak.saturating_sub(rss_before), bare_peak.saturating_sub(bare_before));
        let caches = if flood.made > 1_000 { 2 } else { 1 };
        assert!(
            agent_growth <= caches * library_growth + 6 * 1024,
            "the agent grew {agent_growth} KiB, mdns-sd alone {library_growth} KiB, after {} announcements",
            flood.made
        );
    }
    // The report the hub holds is the bounded table.
    let view = hub.client().peers(&ids[0]).unwrap();
    assert!(view.peers.len() <= 64, "the hub holds {} peers of the device", view.peers.len());
    // Lines about strangers: ten a minute, and counts.
    let log = agents[0].log_text();
    let lines = log.lines().filter(|l| l.contains("LAN peer not trusted") || l.contains("another fleet")).count();
    assert!(lines <= 40, "{lines} lines about untrusted peers");
}

/// Revocation reaches the LAN: a device whose only link is a peer relays
/// through it until an operator revokes it. The carrier learns the
/// revocation from the hub over its own session (the trust bundle), closes
/// the link, refuses the device's handshakes from then on, carries nothing
/// more for it, and keeps the list on disk for when it is offline itself.
#[test]
fn a_revoked_device_loses_its_lan_peers_which_stop_relaying_for_it() {
    let lan = Lan::new(2).unwrap();
    let scratch = Scratch::new().unwrap();
    let hub = Hub::start_on(scratch.path(), Timings::default(), &format!("{}:0", lan.hub_ip())).unwrap();
    let mut stolen = agent_in(&scratch, &hub, &lan, 0, "stolen");
    let mut carrier = agent_in(&scratch, &hub, &lan, 1, "carrier");
    lan.cut(0).unwrap();
    carrier.start().unwrap();
    stolen.start_loadgen(&["--records", "100000", "--batch", "10", "--appends-per-sec", "20"]).unwrap();
    wait_progress(&hub, &stolen.id, 100, Duration::from_secs(60));

    let hub_log = || std::fs::read_to_string(scratch.path().join("hub.log")).unwrap_or_default();
    let refused_at_hub = || hub_log().matches("Relayed batch of a revoked device refused.").count();
    let revoked_at = Instant::now();
    let out = outpost_tests::outpostctl(&hub, &["revoke", &stolen.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_states(
        &carrier,
        &[&stolen.id],
        Duration::from_secs(10),
        "revoked",
        |s| matches!(s, PeerState::Untrusted { reason } if reason.contains("revoked")),
    );
    eprintln!("the carrier distrusted the revoked device {:?} after the revocation", revoked_at.elapsed());
    assert!(carrier.log_text().contains("LAN peer revoked by the hub"), "{}", carrier.log_text());
    let kept = std::fs::read_to_string(carrier.data_dir.join("identity/revoked")).unwrap();
    assert_eq!(kept.trim(), stolen.id, "the carrier keeps the list for when it is offline");

    // Nothing more is carried: the hub stops seeing relayed batches of it.
    let settled = Instant::now() + Duration::from_secs(2);
    wait_for(Duration::from_secs(5), "relays in flight to settle", || (Instant::now() > settled).then_some(()))
        .unwrap();
    let (refused, held) = (refused_at_hub(), hub.device(&stolen.id).unwrap().last_seq);
    let quiet = Instant::now() + Duration::from_secs(4);
    wait_for(Duration::from_secs(6), "a quiet while", || (Instant::now() > quiet).then_some(())).unwrap();
    assert_eq!(refused_at_hub(), refused, "the carrier still forwards the revoked device's batches");
    assert_eq!(hub.device(&stolen.id).unwrap().last_seq, held);
    // The stolen device's own attempts fail at the handshake.
    let log = stolen.log_text();
    assert!(log.contains("Relay through the LAN peer stopped") || log.contains("LAN peer not trusted"), "{log}");
}
