//! `outpost-swarm`: many agents in one process, for the hub's scale
//! benchmark (issue 28, `tests/bench-scale.sh`). Each simulated agent is a
//! real QUIC connection with mutual TLS and a certificate the hub issued at
//! a real enrollment (kept in `--dir`, so later runs against the same hub
//! reuse them). It says hello, sends heartbeats and signed telemetry batches
//! at the chosen intervals (each agent at its own random phase), answers
//! the commands the hub delivers with a result, and reconnects after the
//! hub's retry-after or its backoff, as the real agent does
//! (`outpost_agent::uplink::wait_before_retry`). The connections are spread
//! over `--sockets` client UDP sockets; loopback only.
//!
//! All agents dial at once (a storm). Once every one is connected, it sends
//! `--commands-per-sec` echo commands through the HTTP API to random agents
//! for `--duration` and reports, on stdout: connect times, the hub's turning
//! away, records acknowledged per second, the command round trip (API
//! request to the hub's durable acknowledgement of the result, p50, p99,
//! max), and the hub's CPU and resident memory (from /proc, `--hub-pid`).
//! `--watch` prints the count of connected agents each second on stderr.

use clap::Parser;
use outpost_agent::backoff::Backoff;
use outpost_agent::identity::Identity;
use outpost_agent::uplink::LinkError;
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{
    Batch, CommandResult, Heartbeat, Hello, Message, Outcome, Received, Record, RecordBody,
};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAX_FRAME: usize = 1 << 20;

#[derive(Parser, Clone)]
struct Cli {
    /// The hub's QUIC address.
    #[arg(long)]
    hub: SocketAddr,
    /// The hub's HTTP base URL (for commands).
    #[arg(long)]
    api: String,
    /// An API token allowed to send commands.
    #[arg(long)]
    admin: String,
    /// An enrollment token with a use for every agent not yet enrolled.
    #[arg(long)]
    token: Option<String>,
    /// Where the agents' identities are kept.
    #[arg(long)]
    dir: PathBuf,
    /// Agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Client UDP sockets the connections are spread over.
    #[arg(long, default_value_t = 16)]
    sockets: usize,
    /// Heartbeat interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Telemetry interval (one batch of `--records` samples).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    telemetry: Duration,
    /// Telemetry samples per batch.
    #[arg(long, default_value_t = 1)]
    records: usize,
    /// QUIC keep-alive.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// How long to measure once every agent is connected.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Echo commands per second through the API while measuring (0: none).
    #[arg(long, default_value_t = 20.0)]
    commands_per_sec: f64,
    /// The hub's process id, to sample its CPU and memory.
    #[arg(long)]
    hub_pid: Option<u32>,
    /// Enrollments at once.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Print the connected count each second on stderr.
    #[arg(long)]
    watch: bool,
    /// After measuring, run this shell command, which must restart the hub
    /// (kill it, start it again) and print the new hub's process id as its
    /// last line; then measure how the fleet comes back.
    #[arg(long)]
    restart: Option<String>,
    /// The peer: after Outpost's figures, every agent also connects to this
    /// MQTT broker over TLS with its own certificate (as MQTT agents do),
    /// keep-alive 30 s, subscribed to a topic of its own; the broker's
    /// resident memory per connection is reported beside the hub's.
    #[arg(long)]
    mqtt_peer: Option<SocketAddr>,
    /// The broker's process id.
    #[arg(long)]
    mqtt_peer_pid: Option<u32>,
    /// The CA of the broker's server certificate (PEM).
    #[arg(long)]
    mqtt_peer_ca: Option<PathBuf>,
}

/// What all agents share with the reporting.
#[derive(Default)]
struct Shared {
    connected: AtomicUsize,
    sessions: AtomicU64,
    busy: AtomicU64,
    at_the_door: AtomicU64,
    failures: AtomicU64,
    acked: AtomicU64,
    /// Time from each agent's first dial to its first welcome.
    first_connect: Mutex<Vec<Duration>>,
    /// Command id → when the API was asked, or when the result was acked.
    posted: Mutex<HashMap<u64, Instant>>,
    done: Mutex<HashMap<u64, Instant>>,
    trips: Mutex<Vec<Duration>>,
}

impl Shared {
    fn command_done(&self, id: u64, at: Instant) {
        let posted = self.posted.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match posted {
            Some(start) => {
                self.trips.lock().unwrap_or_else(|e| e.into_inner()).push(at.saturating_duration_since(start))
            }
            None => {
                self.done.lock().unwrap_or_else(|e| e.into_inner()).insert(id, at);
            }
        }
    }

    fn command_posted(&self, id: u64, start: Instant) {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match done {
            Some(at) => self.trips.lock().unwrap_or_else(|e| e.into_inner()).push(at.saturating_duration_since(start)),
            None => {
                self.posted.lock().unwrap_or_else(|e| e.into_inner()).insert(id, start);
            }
        }
    }
}

/// One simulated agent.
struct Sim {
    identity: Identity,
    config: quinn::ClientConfig,
    signer: outpost_shared::identity::Signer,
    name: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost-swarm: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-swarm: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let started = Instant::now();
    let sims = identities(&cli).await?;
    println!("identities: {} ready in {:.1} s", sims.len(), started.elapsed().as_secs_f64());
    let template = outpost_agent::telemetry::Sampler::new().map_err(|e| e.to_string())?.sample();
    let shared = Arc::new(Shared::default());
    let mut endpoints = Vec::new();
    for _ in 0..cli.sockets.max(1) {
        // One socket stands for many devices: as large buffers as the hub's.
        let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
        outpost_hub::udp_buffers(&socket);
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime);
        endpoints.push(endpoint.map_err(|e| e.to_string())?);
    }
    let hub_before = cli.hub_pid.map(sample_process);
    let ids: Arc<Vec<String>> = Arc::new(sims.iter().map(|s| s.identity.device_id.to_string()).collect());
    let dial = Instant::now();
    for (i, sim) in sims.into_iter().enumerate() {
        let endpoint = endpoints[i % endpoints.len()].clone();
        tokio::spawn(agent(Arc::new(sim), endpoint, cli.clone(), shared.clone(), template.clone()));
    }
    if cli.watch {
        let shared = shared.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "t={:>5.1}s connected={} busy={} refused={}",
                    start.elapsed().as_secs_f64(),
                    shared.connected.load(Ordering::Relaxed),
                    shared.busy.load(Ordering::Relaxed),
                    shared.at_the_door.load(Ordering::Relaxed)
                );
            }
        });
    }
    // Every agent connected, within ten minutes.
    let deadline = Instant::now() + Duration::from_secs(600);
    while shared.connected.load(Ordering::Relaxed) < cli.agents {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} agents connected in 10 minutes",
                shared.connected.load(Ordering::Relaxed),
                cli.agents
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_in = dial.elapsed();
    let mut connects = shared.first_connect.lock().unwrap_or_else(|e| e.into_inner()).clone();
    connects.sort();
    println!(
        "connected: {} agents over {} sockets in {:.2} s; first connect p50 {} p99 {} max {}; told to come back {}, refused at the door {}, failed attempts {}",
        cli.agents,
        endpoints.len(),
        all_in.as_secs_f64(),
        ms(percentile(&connects, 0.5)),
        ms(percentile(&connects, 0.99)),
        ms(connects.last().copied().unwrap_or_default()),
        shared.busy.load(Ordering::Relaxed),
        shared.at_the_door.load(Ordering::Relaxed),
        shared.failures.load(Ordering::Relaxed),
    );
    if let (Some(pid), Some(before)) = (cli.hub_pid, hub_before) {
        let now = sample_process(pid);
        println!(
            "hub: {:.1} MiB resident before the agents, {:.1} MiB with them connected ({:.1} KiB per connection)",
            mib(before.rss),
            mib(now.rss),
            (now.rss.saturating_sub(before.rss)) as f64 / 1024.0 / cli.agents as f64
        );
    }

    // Steady state: commands through the API while the agents talk.
    let acked_before = shared.acked.load(Ordering::Relaxed);
    let sessions_before = shared.sessions.load(Ordering::Relaxed);
    let hub_start = cli.hub_pid.map(sample_process);
    let swarm_start = sample_process(std::process::id());
    let window = Instant::now();
    let driver = (cli.commands_per_sec > 0.0).then(|| {
        let (shared, ids, cli) = (shared.clone(), ids.clone(), cli.clone());
        std::thread::spawn(move || drive_commands(&cli, &ids, &shared))
    });
    let mut rss_max = 0u64;
    while window.elapsed() < cli.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(pid) = cli.hub_pid {
            rss_max = rss_max.max(sample_process(pid).rss);
        }
    }
    let elapsed = window.elapsed().as_secs_f64();
    let sent = match driver {
        Some(d) => d.join().unwrap_or(0),
        None => 0,
    };
    // Results still on their way get a moment.
    let settle = Instant::now();
    while !shared.posted.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
        && settle.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = shared.acked.load(Ordering::Relaxed) - acked_before;
    println!(
        "steady state over {elapsed:.0} s: {acked} records acknowledged ({:.0}/s), {} sessions lost and made again, {} agents connected at the end",
        acked as f64 / elapsed,
        shared.sessions.load(Ordering::Relaxed) - sessions_before,
        shared.connected.load(Ordering::Relaxed)
    );
    let mut trips = shared.trips.lock().unwrap_or_else(|e| e.into_inner()).clone();
    trips.sort();
    let lost = shared.posted.lock().unwrap_or_else(|e| e.into_inner()).len();
    println!(
        "commands: {sent} sent, {} round trips (API request to the result durably held): p50 {} p99 {} max {}; {lost} without a result",
        trips.len(),
        ms(percentile(&trips, 0.5)),
        ms(percentile(&trips, 0.99)),
        ms(trips.last().copied().unwrap_or_default()),
    );
    if let (Some(pid), Some(start)) = (cli.hub_pid, hub_start) {
        let end = sample_process(pid);
        println!(
            "hub: CPU {:.1} % of one core on average, resident {:.1} MiB at the end, {:.1} MiB at most",
            (end.cpu_secs - start.cpu_secs) / elapsed * 100.0,
            mib(end.rss),
            mib(rss_max.max(end.rss))
        );
    }
    let swarm_end = sample_process(std::process::id());
    println!(
        "swarm: CPU {:.1} % of one core, resident {:.1} MiB",
        (swarm_end.cpu_secs - swarm_start.cpu_secs) / elapsed * 100.0,
        mib(swarm_end.rss)
    );
    if let Some(command) = &cli.restart {
        restart_storm(command, &cli, &shared).await?;
    }
    if let (Some(broker), Some(pid), Some(ca)) = (cli.mqtt_peer, cli.mqtt_peer_pid, &cli.mqtt_peer_ca) {
        mqtt_peer(broker, pid, ca, &identity_dirs(&cli)).await?;
    }
    Ok(())
}

fn identity_dirs(cli: &Cli) -> Vec<PathBuf> {
    (0..cli.agents).map(|i| cli.dir.join(format!("a{i}"))).collect()
}

/// The peer figure: as many MQTT connections to `broker`, mutual TLS with
/// each agent's certificate, each subscribed to its own topic; the broker's
/// resident memory before and with them.
async fn mqtt_peer(broker: SocketAddr, pid: u32, ca: &Path, dirs: &[PathBuf]) -> Result<(), String> {
    let roots = outpost_shared::mqtt::read_pem_certs(ca)?;
    let before = sample_process(pid);
    let connected = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut clients = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let identity = Identity::load(dir).map_err(|e| e.to_string())?;
        let tls = outpost_shared::mqtt::tls_client_config(&roots, vec![identity.cert.clone()], identity.key())?;
        let mut options = rumqttc::MqttOptions::new(format!("swarm-{i}"), broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_transport(rumqttc::Transport::tls_with_config(tls.into()));
        let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
        let topic = format!("outpost/v1/{}/down", identity.device_id);
        let connected = connected.clone();
        tokio::spawn(async move {
            let mut counted = false;
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) if !counted => {
                        counted = true;
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500 + rand::random_range(0..1000))).await,
                }
            }
        });
        client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        clients.push(client);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while connected.load(Ordering::Relaxed) < dirs.len() {
        if Instant::now() > deadline {
            return Err(format!("only {} MQTT clients subscribed in 10 minutes", connected.load(Ordering::Relaxed)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = began.elapsed().as_secs_f64();
    // Let the broker settle (its buffers after the handshakes), then read.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let with = sample_process(pid);
    println!(
        "peer, Mosquitto over TLS with the same certificates: {} connections subscribed in {took:.1} s; broker {:.1} MiB resident before, {:.1} MiB with them ({:.1} KiB per connection), CPU {:.1} s in all",
        dirs.len(),
        mib(before.rss),
        mib(with.rss),
        (with.rss.saturating_sub(before.rss)) as f64 / 1024.0 / dirs.len() as f64,
        with.cpu_secs - before.cpu_secs
    );
    drop(clients);
    Ok(())
}

/// Restarts the hub with `command` and measures the fleet coming back: the
/// time until every agent has a session again, what the hub turned away on
/// the way, and its CPU and memory meanwhile.
async fn restart_storm(command: &str, cli: &Cli, shared: &Shared) -> Result<(), String> {
    let (busy, door, failures) = (
        shared.busy.load(Ordering::Relaxed),
        shared.at_the_door.load(Ordering::Relaxed),
        shared.failures.load(Ordering::Relaxed),
    );
    let sessions = shared.sessions.load(Ordering::Relaxed);
    let out = tokio::process::Command::new("sh").arg("-c").arg(command).output().await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("the restart command printed no process id: {text:?}"))?;
    let back = Instant::now();
    let start = sample_process(pid);
    let probe = ApiProbe::start(&cli.api, &cli.admin);
    // The old sessions end as the new hub's stateless resets reach them:
    // first every agent must have lost its session, then all come back.
    let new_sessions = || shared.sessions.load(Ordering::Relaxed) - sessions;
    let mut rss_max = 0u64;
    let deadline = back + Duration::from_secs(900);
    while new_sessions() < cli.agents as u64 || shared.connected.load(Ordering::Relaxed) < cli.agents {
        if Instant::now() > deadline {
            return Err(format!("after the restart only {} agents came back in 15 minutes", new_sessions()));
        }
        rss_max = rss_max.max(sample_process(pid).rss);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = back.elapsed().as_secs_f64();
    let end = sample_process(pid);
    println!("{}", probe.finish(back));
    println!(
        "hub restart: {} agents back in {took:.1} s ({} sessions); on the way {} told to come back, {} refused at the door, {} failed attempts; hub CPU {:.0} % of one core meanwhile, resident {:.1} MiB at most",
        cli.agents,
        new_sessions(),
        shared.busy.load(Ordering::Relaxed) - busy,
        shared.at_the_door.load(Ordering::Relaxed) - door,
        shared.failures.load(Ordering::Relaxed) - failures,
        (end.cpu_secs - start.cpu_secs) / took * 100.0,
        mib(rss_max.max(end.rss))
    );
    Ok(())
}

/// The API asked for the overview every 100 ms while the fleet comes back
/// (one request at a time, with the client's timeouts), from a thread of
/// its own.
struct ApiProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Result<Duration, String>)>>,
}

impl ApiProbe {
    fn start(api: &str, token: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, until) = (outpost_hub::client::Client::new(api, token), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !until.load(Ordering::Relaxed) {
                let at = Instant::now();
                let answer = client.overview();
                seen.push((at, answer.map(|_| at.elapsed()).map_err(|e| e.to_string())));
                std::thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
            seen
        });
        ApiProbe { stop, thread }
    }

    /// What the API did from `since` on: when it first answered, then its
    /// latency and the requests that failed.
    fn finish(self, since: Instant) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.join().unwrap_or_default();
        let Some(first) = seen.iter().position(|(_, r)| r.is_ok()) else {
            return format!("API during the storm: no answer to {} requests", seen.len());
        };
        let after = &seen[first..];
        let mut times: Vec<Duration> = after.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
        times.sort();
        let failed = after.len() - times.len();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "API during the storm (GET /overview every 100 ms): first answer {:.1} s after the restart began; \
             then {} requests: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {failed} failed",
            seen[first].0.saturating_duration_since(since).as_secs_f64(),
            after.len(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(times.last().copied().unwrap_or_default()),
        )
    }
}

/// The agents' identities: loaded from `--dir`, enrolled with `--token`
/// where missing.
async fn identities(cli: &Cli) -> Result<Vec<Sim>, String> {
    let timings = outpost_agent::tls::Timings { keepalive: cli.keepalive, idle_timeout: Duration::from_secs(30) };
    let gate = Arc::new(tokio::sync::Semaphore::new(cli.enroll_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cli.agents {
        let (dir, name, token, gate) =
            (cli.dir.join(format!("a{i}")), format!("swarm-{i}"), cli.token.clone(), gate.clone());
        tasks.spawn(async move {
            let _turn = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let identity = load_or_enroll(&dir, &name, token.as_deref()).await?;
            Ok::<_, String>((i, identity, name))
        });
    }
    let mut sims = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, identity, name) = done.map_err(|e| e.to_string())??;
        let config = outpost_agent::tls::session_config(&identity, timings).map_err(|e| e.to_string())?;
        let signer = identity.signer().map_err(|e| e.to_string())?;
        sims.push((i, Sim { identity, config, signer, name }));
    }
    sims.sort_by_key(|(i, _)| *i);
    Ok(sims.into_iter().map(|(_, s)| s).collect())
}

async fn load_or_enroll(dir: &Path, name: &str, token: Option<&str>) -> Result<Identity, String> {
    if dir.join("device.crt").exists() {
        return Identity::load(dir).map_err(|e| format!("{}: {e}", dir.display()));
    }
    let token = token.ok_or_else(|| format!("{} is not enrolled and no --token was given", dir.display()))?;
    let mut last = String::new();
    for _ in 0..20 {
        let _ = std::fs::remove_dir_all(dir);
        match outpost_agent::enroll::enroll(token, dir, name).await {
            Ok(identity) => return Ok(identity),
            // A hub busy admitting the others: try again a moment later.
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500 + rand::random_range(0..1000))).await;
    }
    Err(format!("{name}: enrollment failed 20 times: {last}"))
}

/// What one agent's sessions share.
struct Run<'a> {
    sim: &'a Sim,
    cli: &'a Cli,
    shared: &'a Shared,
    template: &'a Sample,
    /// When it first dialled.
    dialled: Instant,
}

/// What one agent carries from session to session.
struct Progress {
    next_seq: u64,
    /// The current session was welcomed.
    connected: bool,
    /// No session was welcomed yet.
    first: bool,
}

/// An agent: sessions, one after another, until the process ends.
async fn agent(sim: Arc<Sim>, endpoint: quinn::Endpoint, cli: Cli, shared: Arc<Shared>, template: Sample) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let run = Run { sim: &sim, cli: &cli, shared: &shared, template: &template, dialled: Instant::now() };
    let mut progress = Progress { next_seq: 1, connected: false, first: true };
    loop {
        let began = Instant::now();
        progress.connected = false;
        let result = session(&run, &endpoint, &mut progress).await;
        if progress.connected {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            backoff.connection_ended(began.elapsed());
        }
        let turned = result.as_ref().err().and_then(LinkError::turned_away);
        match turned {
            Some(outpost_agent::uplink::TurnedAway::Busy(_)) => shared.busy.fetch_add(1, Ordering::Relaxed),
            Some(outpost_agent::uplink::TurnedAway::AtTheDoor) => shared.at_the_door.fetch_add(1, Ordering::Relaxed),
            None => shared.failures.fetch_add(1, Ordering::Relaxed),
        };
        let wait = outpost_agent::uplink::wait_before_retry(turned, &mut backoff, rand::random());
        tokio::time::sleep(wait).await;
    }
}

async fn session(run: &Run<'_>, endpoint: &quinn::Endpoint, progress: &mut Progress) -> Result<(), LinkError> {
    let connecting = endpoint
        .connect_with(run.sim.config.clone(), run.cli.hub, HUB_SERVER_NAME)
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let connection = connecting.await?;
    match serve(run, &connection, progress).await {
        Err(LinkError::Stream(e)) => Err(connection.close_reason().map_or(LinkError::Stream(e), LinkError::Connection)),
        other => other,
    }
}

async fn serve(run: &Run<'_>, connection: &quinn::Connection, progress: &mut Progress) -> Result<(), LinkError> {
    let Run { sim, cli, shared, template, dialled } = *run;
    let (mut send, recv) = connection.open_bi().await?;
    let mut reader = FrameReader::new(recv, MAX_FRAME);
    let hello = Hello { agent_version: "swarm".into(), name: sim.name.clone(), started_at: Timestamp::now() };
    write_message(&mut send, Message::Hello(hello), MAX_FRAME).await?;
    let acked = tokio::select! {
        next = reader.next() => match next?.map(|e| e.message) {
            Some(Message::Welcome(w)) => w.acked_seq,
            Some(other) => return Err(LinkError::Protocol(format!("expected Welcome, got {}", other.kind()))),
            None => return Err(LinkError::Protocol("closed before the welcome".into())),
        },
        reason = connection.closed() => return Err(reason.into()),
    };
    progress.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    shared.sessions.fetch_add(1, Ordering::Relaxed);
    if std::mem::take(&mut progress.first) {
        shared.first_connect.lock().unwrap_or_else(|e| e.into_inner()).push(dialled.elapsed());
    }
    progress.next_seq = progress.next_seq.max(acked + 1);
    // Each agent at its own phase, as a real fleet is.
    let phase = |every: Duration| tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
    let mut heartbeat = tokio::time::interval_at(phase(cli.heartbeat), cli.heartbeat);
    let mut telemetry = tokio::time::interval_at(phase(cli.telemetry), cli.telemetry);
    // Sent, not yet acknowledged: (last seq of the batch, records, command ids).
    let mut in_flight: Vec<(u64, u64, Vec<u64>)> = Vec::new();
    let mut acked_upto = acked;
    loop {
        let mut records = Vec::new();
        let mut commands = Vec::new();
        tokio::select! {
            _ = heartbeat.tick() => {
                write_message(&mut send, Message::Heartbeat(Heartbeat { at: Timestamp::now() }), MAX_FRAME).await?;
            }
            _ = telemetry.tick() => {
                for _ in 0..cli.records.max(1) {
                    let at = Timestamp::now();
                    records.push(Record { seq: progress.next_seq, at, body: RecordBody::Telemetry(Sample { at, ..template.clone() }) });
                    progress.next_seq += 1;
                }
            }
            next = reader.next() => match next?.map(|e| e.message) {
                None => return Ok(()),
                Some(Message::Ack(ack)) => {
                    let now = Instant::now();
                    acked_upto = acked_upto.max(ack.upto);
                    in_flight.retain(|(last, count, ids)| {
                        if *last > acked_upto {
                            return true;
                        }
                        shared.acked.fetch_add(*count, Ordering::Relaxed);
                        for id in ids {
                            shared.command_done(*id, now);
                        }
                        false
                    });
                }
                Some(Message::Deliver(deliver)) => {
                    let ids: Vec<u64> = deliver.commands.iter().map(|c| c.id).collect();
                    if !ids.is_empty() {
                        write_message(&mut send, Message::Received(Received { commands: ids.clone() }), MAX_FRAME).await?;
                    }
                    for command in deliver.commands {
                        let body = RecordBody::CommandResult(CommandResult {
                            id: command.id,
                            outcome: Outcome::Succeeded,
                            output: command.args.join(" "),
                        });
                        records.push(Record { seq: progress.next_seq, at: Timestamp::now(), body });
                        progress.next_seq += 1;
                        commands.push(command.id);
                    }
                }
                Some(Message::Trust(_)) => {}
                Some(other) => return Err(LinkError::Protocol(format!("unexpected {}", other.kind()))),
            },
            reason = connection.closed() => return Err(reason.into()),
        }
        if let Some(last) = records.last().map(|r| r.seq) {
            let count = records.len() as u64;
            let batch = Batch::new(sim.identity.device_id.clone(), &records, |input| sim.signer.sign(input));
            write_message(&mut send, Message::Batch(batch), MAX_FRAME).await?;
            in_flight.push((last, count, commands));
        }
    }
}

/// Sends echo commands to random agents at `--commands-per-sec` for
/// `--duration`, one request at a time; returns how many were sent.
fn drive_commands(cli: &Cli, ids: &[String], shared: &Shared) -> u64 {
    let client = outpost_hub::client::Client::new(&cli.api, &cli.admin);
    let every = Duration::from_secs_f64(1.0 / cli.commands_per_sec);
    let start = Instant::now();
    let mut next = start;
    let mut sent = 0;
    while start.elapsed() < cli.duration {
        let id = &ids[rand::random_range(0..ids.len())];
        let request = outpost_hub::api::CommandRequest {
            kind: "echo".into(),
            args: vec!["swarm".into(), sent.to_string()],
            expires_in: Some("1m".into()),
        };
        let asked = Instant::now();
        match client.send_command(id, &request) {
            Ok(view) => {
                shared.command_posted(view.id, asked);
                sent += 1;
            }
            Err(e) => eprintln!("command to {id} not sent: {e}"),
        }
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    sent
}

/// CPU seconds and resident bytes of a process.
#[derive(Debug, Clone, Copy)]
struct ProcessSample {
    cpu_secs: f64,
    rss: u64,
}

fn sample_process(pid: u32) -> ProcessSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, here 11 and 12 from 0.
    // /proc counts in USER_HZ, 100 on Linux whatever the kernel's HZ.
    let cpu_secs = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    ProcessSample { cpu_secs, rss }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}
