//! Fleet harness: starts a hub and agents as real processes with throw-away
//! data dirs and certificates, on ports the OS picks.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing behind. Each process logs to a file in the test's temporary
//! directory; when a test fails, the tail of every log is printed and the
//! directory is kept.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the
//! test executable (`target/<profile>/`).

pub mod netns;
pub mod postgres;
pub mod trees;

use anyhow::{Context, Result, bail};
use outpost_hub::api::{DeviceView, SampleView};
use outpost_hub::client::Client;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, built by `cargo test --workspace` or
/// `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Sample time of the load generator's record 0 in this test process: a day
/// ago, well inside the hub's retention and apart from real samples.
pub fn loadgen_base_ms() -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| outpost_shared::time::Timestamp::now().0 - 86_400_000)
}

/// Polls `probe` every 50 ms until it returns `Some`, failing after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop, logging to a file.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output to `log`; killed when dropped.
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let out = fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Proc { child, log })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for exit (SIGKILL after that).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: plain kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: plain kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion, output captured.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))
}

/// Timings the tests use: short, so failures show within seconds.
#[derive(Debug, Clone)]
pub struct Timings {
    /// Hub: offline after this much silence.
    pub heartbeat_timeout: &'static str,
    /// Agent: heartbeat interval.
    pub heartbeat: &'static str,
    /// Agent: telemetry interval.
    pub telemetry: &'static str,
}

impl Default for Timings {
    fn default() -> Self {
        Timings { heartbeat_timeout: "2s", heartbeat: "250ms", telemetry: "500ms" }
    }
}

/// A hub process and its data dir.
#[derive(Debug)]
pub struct Hub {
    /// Data dir.
    pub data_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Admin API token from `init`.
    pub admin_token: String,
    /// QUIC address.
    pub quic_addr: String,
    /// API base URL.
    pub api: String,
    /// The serving process, if running.
    pub proc: Option<Proc>,
    /// TOML tables appended to its config at each (re)start.
    pub extra_config: String,
    /// Keys added to its `[quic]` table at each (re)start.
    pub quic_extra: String,
    /// Keys added to its `[http]` table at each (re)start.
    pub http_extra: String,
    /// Its `[http] listen` (default `127.0.0.1:0`).
    pub http_listen: String,
    /// Keys added to its `[fleet]` table at each (re)start.
    pub fleet_extra: String,
    /// The hub's database when the tests run on PostgreSQL
    /// (`OUTPOST_TEST_STORE=postgres`, see [`postgres::selected`]).
    pub postgres: Option<postgres::Postgres>,
    /// The `[store]` table of its config (empty: sled).
    pub store_config: String,
    /// The hub addresses its enrollment tokens name (default: its own).
    pub token_hubs: Option<String>,
    /// Environment of the serving process (libfaketime, see [`faketime`]).
    pub env: Vec<(String, String)>,
    timings: Timings,
    root: PathBuf,
}

impl Hub {
    /// Initialises a data dir under `root` and starts serving (QUIC on
    /// loopback).
    pub fn start(root: &Path, timings: Timings) -> Result<Self> {
        Self::start_on(root, timings, "127.0.0.1:0")
    }

    /// Like [`Hub::start`], with QUIC bound to `listen` (which it keeps
    /// across restarts; tokens carry the bound address).
    pub fn start_on(root: &Path, timings: Timings, listen: &str) -> Result<Self> {
        Self::start_with(root, timings, listen, postgres::selected())
    }

    /// Like [`Hub::start_on`], on PostgreSQL (a private cluster the hub
    /// owns) if `on_postgres`, else on sled, whatever the environment says.
    pub fn start_with(root: &Path, timings: Timings, listen: &str, on_postgres: bool) -> Result<Self> {
        let (pg, store_config) = if on_postgres {
            let pg = postgres::Postgres::start(true)?;
            let url = pg.create_db("outpost")?;
            (Some(pg), format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\npool_size = 8\n"))
        } else {
            (None, String::new())
        };
        Self::start_on_store(root, timings, listen, pg, store_config)
    }

    /// Like [`Hub::start_with`], with the `[store]` table given (and the
    /// cluster it names, kept with the hub).
    pub fn start_on_store(
        root: &Path,
        timings: Timings,
        listen: &str,
        pg: Option<postgres::Postgres>,
        store_config: String,
    ) -> Result<Self> {
        fs::create_dir_all(root)?;
        let data_dir = root.join("hub");
        let config = root.join("hub.toml");
        fs::write(&config, format!("data_dir = {:?}\n{store_config}", data_dir.display().to_string()))?;
        let out = match &pg {
            Some(_) => run(Command::new(bin("outpost-hub")).arg("init").arg("--config").arg(&config))?,
            None => run(Command::new(bin("outpost-hub")).arg("init").arg("--data-dir").arg(&data_dir))?,
        };
        if !out.status.success() {
            bail!("hub init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let admin_token = stdout.lines().last().unwrap_or_default().trim().to_owned();
        let mut hub = Hub {
            config,
            data_dir,
            admin_token,
            quic_addr: listen.into(),
            api: String::new(),
            proc: None,
            extra_config: String::new(),
            quic_extra: String::new(),
            http_extra: String::new(),
            http_listen: "127.0.0.1:0".into(),
            fleet_extra: String::new(),
            postgres: pg,
            store_config,
            token_hubs: None,
            env: Vec::new(),
            timings,
            root: root.to_owned(),
        };
        hub.serve()?;
        Ok(hub)
    }

    /// A second hub of `first`'s fleet under `root`: its data dir is a copy
    /// of the first's (CA, enrollment and reset keys), its backups directory
    /// is the first's (shared storage), its store the same database.
    pub fn join(root: &Path, first: &Hub) -> Result<Self> {
        if first.store_config.is_empty() {
            bail!("several hubs need a shared database: start the first on PostgreSQL");
        }
        fs::create_dir_all(root)?;
        let data_dir = root.join("hub");
        fs::create_dir_all(&data_dir)?;
        for name in ["ca.crt", "ca.key", "enroll.key", "quic-reset.key"] {
            fs::copy(first.data_dir.join(name), data_dir.join(name)).with_context(|| format!("copy {name}"))?;
        }
        fs::create_dir_all(first.data_dir.join("backups"))?;
        std::os::unix::fs::symlink(first.data_dir.join("backups"), data_dir.join("backups"))?;
        let mut hub = Hub {
            config: root.join("hub.toml"),
            data_dir,
            admin_token: first.admin_token.clone(),
            quic_addr: "127.0.0.1:0".into(),
            api: String::new(),
            proc: None,
            extra_config: String::new(),
            quic_extra: String::new(),
            http_extra: String::new(),
            http_listen: "127.0.0.1:0".into(),
            fleet_extra: String::new(),
            postgres: None,
            store_config: first.store_config.clone(),
            token_hubs: None,
            env: Vec::new(),
            timings: first.timings.clone(),
            root: root.to_owned(),
        };
        hub.serve()?;
        Ok(hub)
    }

    /// (Re)starts `serve` on the same data dir and QUIC port.
    pub fn serve(&mut self) -> Result<()> {
        let text = format!(
            "data_dir = {:?}\n[quic]\nlisten = {:?}\n{}[http]\nlisten = {:?}\nworkers = 1\n{}[fleet]\nheartbeat_timeout = {:?}\n{}",
            self.data_dir.display().to_string(),
            self.quic_addr,
            self.quic_extra,
            self.http_listen,
            self.http_extra,
            self.timings.heartbeat_timeout,
            self.fleet_extra,
        );
        fs::write(&self.config, format!("{text}{}{}", self.store_config, self.extra_config))?;
        let http_file = self.data_dir.join("http.addr");
        let _ = fs::remove_file(&http_file);
        let mut proc = Proc::spawn(
            Command::new(bin("outpost-hub")).arg("serve").arg("--config").arg(&self.config).envs(self.env.clone()),
            self.root.join("hub.log"),
        )?;
        let http = wait_for(Duration::from_secs(20), "the hub to record its HTTP address", || {
            if !proc.running() {
                return Some(Err(anyhow::anyhow!("hub exited; see {}", proc.log.display())));
            }
            fs::read_to_string(&http_file).ok().map(Ok)
        })??;
        self.quic_addr = fs::read_to_string(self.data_dir.join("quic.advertise"))?.trim().to_owned();
        self.api = format!("http://{}", http.trim());
        self.proc = Some(proc);
        Ok(())
    }

    /// Kills the serving process (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// One device, as the API shows it.
    pub fn device(&self, id: &str) -> Result<DeviceView> {
        Ok(self.client().device(id)?)
    }

    /// An API client with the admin token.
    pub fn client(&self) -> Client {
        Client::new(&self.api, &self.admin_token)
    }

    /// Its log so far (every run of it in this scratch directory).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.root.join("hub.log")).unwrap_or_default()
    }

    /// `outpost-hub token create` output.
    pub fn token(&self, ttl: &str, uses: u32) -> Result<String> {
        let mut cmd = Command::new(bin("outpost-hub"));
        cmd.args(["token", "create", "--ttl", ttl, "--uses", &uses.to_string(), "--data-dir"]).arg(&self.data_dir);
        if let Some(hubs) = &self.token_hubs {
            cmd.args(["--hub-addr", hubs]);
        }
        let out = run(&mut cmd)?;
        if !out.status.success() {
            bail!("token create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits (20 s at most) until command `id` is in a state `done` accepts.
    pub fn wait_command(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&outpost_hub::api::CommandStateView) -> bool,
    ) -> outpost_hub::api::CommandView {
        wait_for(Duration::from_secs(20), what, || self.client().command(id).ok().filter(|c| done(&c.state)))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// All devices, as the API lists them.
    pub fn devices(&self) -> Result<Vec<DeviceView>> {
        Ok(self.client().devices()?)
    }
}

/// An enrolled agent and, when running, its process.
#[derive(Debug)]
pub struct Agent {
    /// Data dir.
    pub data_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// The id the hub assigned.
    pub id: String,
    /// Name given at enrollment.
    pub name: String,
    /// The daemon, if running.
    pub proc: Option<Proc>,
    /// Extra environment for the processes it starts.
    pub env: Vec<(String, String)>,
    /// Network namespace its processes run in (`ip netns exec`).
    pub netns: Option<String>,
    log: PathBuf,
}

impl Agent {
    /// Enrolls a new agent called `name` under `root` with a fresh token.
    pub fn enroll(root: &Path, hub: &Hub, name: &str, timings: &Timings) -> Result<Self> {
        Self::enroll_with(root, hub, name, timings, "")
    }

    /// Like [`Agent::enroll`], appending `extra` (TOML tables) to its config.
    pub fn enroll_with(root: &Path, hub: &Hub, name: &str, timings: &Timings, extra: &str) -> Result<Self> {
        let data_dir = root.join(name);
        let token = hub.token("10m", 1)?;
        let out = run(Command::new(bin("outpost-agent"))
            .args(["enroll", "--name", name, "--token", &token, "--data-dir"])
            .arg(&data_dir))?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let meta = fs::read_to_string(data_dir.join("identity/device.toml"))?;
        let id = meta
            .lines()
            .find_map(|l| l.strip_prefix("device_id = "))
            .map(|v| v.trim_matches('"').to_owned())
            .context("no device id in identity")?;
        let config = root.join(format!("{name}.toml"));
        let text = format!(
            "data_dir = {:?}\nname = {name:?}\n[uplink]\nheartbeat = {:?}\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nkeepalive = \"1s\"\nidle_timeout = \"5s\"\n[telemetry]\ninterval = {:?}\n",
            data_dir.display().to_string(),
            timings.heartbeat,
            timings.telemetry,
        );
        // LAN peers are off unless a test asks: agents of unrelated tests
        // would otherwise find each other on this host's interfaces.
        let peers = if extra.contains("[peers]") { "" } else { "[peers]\nenabled = false\n" };
        fs::write(&config, format!("{text}{peers}{extra}"))?;
        Ok(Agent {
            data_dir,
            config,
            id,
            name: name.to_owned(),
            proc: None,
            env: Vec::new(),
            netns: None,
            log: root.join(format!("{name}.log")),
        })
    }

    /// Starts the load generator (the real agent plus a synthetic
    /// producer) instead of the daemon, with `args`; its samples are dated
    /// from [`loadgen_base_ms`].
    pub fn start_loadgen(&mut self, args: &[&str]) -> Result<()> {
        let proc = Proc::spawn(
            self.command(bin("outpost-loadgen"))
                .arg("--config")
                .arg(&self.config)
                .args(args)
                .arg("--base-ms")
                .arg(loadgen_base_ms().to_string())
                .envs(self.env.clone()),
            self.log.clone(),
        )?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Runs `outpost-agent ARGS --config <its config>` (the local CLI that
    /// talks to the running daemon).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run(Command::new(bin("outpost-agent")).args(args).arg("--config").arg(&self.config))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A command for `program`, inside the agent's namespace if it has one.
    fn command(&self, program: PathBuf) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// The peers the running daemon lists (`outpost-agent peers --json`).
    pub fn peers(&self) -> Result<Vec<outpost_shared::peers::PeerEntry>> {
        let out = self.cli(&["peers", "--json"])?;
        if !out.status.success() {
            bail!("peers: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Rewrites its config to reach the hub through `broker` (MQTT over
    /// TLS), or straight over QUIC when `None`. Takes effect at the next
    /// start.
    pub fn use_transport(&self, broker: Option<&Broker>) -> Result<()> {
        let text = fs::read_to_string(&self.config)?;
        let mut text = match text.split_once("\n[uplink.mqtt]\n") {
            Some((before, _)) => before.to_owned() + "\n",
            None => text,
        };
        text = text.replace("[uplink]\ntransport = \"mqtt\"\n", "[uplink]\n");
        if let Some(broker) = broker {
            text = text.replace("[uplink]\n", "[uplink]\ntransport = \"mqtt\"\n");
            text.push_str(&format!(
                "\n[uplink.mqtt]\nbroker = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\nkeep_alive = \"5s\"\n",
                broker.tls_port,
                broker.ca_file.display().to_string()
            ));
        }
        fs::write(&self.config, text)?;
        Ok(())
    }

    /// Starts the daemon inside `cgroup`, as systemd starts a unit with
    /// `Delegate=yes` (the shell moves itself in, then becomes the agent).
    pub fn start_in(&mut self, cgroup: &DelegatedCgroup) -> Result<()> {
        if self.netns.is_some() {
            bail!("start_in: not in a network namespace");
        }
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&cgroup.path)
            .arg(bin("outpost-agent"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.clone());
        self.proc = Some(Proc::spawn(&mut command, self.log.clone())?);
        Ok(())
    }

    /// Starts the daemon.
    pub fn start(&mut self) -> Result<()> {
        let proc = Proc::spawn(
            self.command(bin("outpost-agent")).arg("run").arg("--config").arg(&self.config).envs(self.env.clone()),
            self.log.clone(),
        )?;
        self.proc = Some(proc);
        Ok(())
    }
}

/// The environment that runs a process under libfaketime (Debian's
/// `libfaketime`, installed by tests/run.sh) with the clock offset written
/// in `offset_file` (`+250d`, `@1970-01-02 00:00:00`; read at every call,
/// so a test moves the clock by rewriting it). Monotonic time is real.
pub fn faketime(offset_file: &Path) -> Vec<(String, String)> {
    let found = ["/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime"]
        .iter()
        .map(|d| Path::new(d).join("libfaketimeMT.so.1"))
        .find(|p| p.exists());
    let library = found.expect("libfaketime is missing: run the tests through tests/run.sh, which installs it");
    vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), offset_file.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Runs `outpostctl ARGS` against `hub` with its admin token.
pub fn outpostctl(hub: &Hub, args: &[&str]) -> Output {
    run(Command::new(bin("outpostctl")).args(["--hub", &hub.api, "--token", &hub.admin_token]).args(args))
        .unwrap_or_else(|e| panic!("outpostctl: {e}"))
}

/// A hub whose MQTT bridge uses a fresh broker (which checks client
/// certificates), with `quic_extra` in its `[quic]` table, and the broker.
pub fn hub_with_broker(root: &Path, timings: &Timings, quic_extra: &str) -> Result<(Hub, Broker)> {
    let mut hub = Hub::start(root, timings.clone())?;
    let broker = Broker::start(root, &hub)?;
    hub.extra_config = broker.hub_config();
    hub.quic_extra = quic_extra.to_owned();
    hub.kill();
    hub.serve()?;
    Ok((hub, broker))
}

/// Two hubs of one fleet on one PostgreSQL database (under `root/a` and
/// `root/b`), both clients of one broker in the same shared subscription,
/// so the broker hands each device's messages to either; returned once
/// both are subscribed.
pub fn two_hubs_with_broker(root: &Path, timings: &Timings) -> Result<(Hub, Hub, Broker)> {
    let mut a = Hub::start_with(&root.join("a"), timings.clone(), "127.0.0.1:0", true)?;
    let broker = Broker::start(root, &a)?;
    a.extra_config = broker.hub_config();
    a.kill();
    a.serve()?;
    let mut b = Hub::join(&root.join("b"), &a)?;
    b.extra_config = broker.hub_config();
    b.kill();
    b.serve()?;
    for hub in [&a, &b] {
        wait_for(Duration::from_secs(15), "both hubs on the broker", || {
            hub.log_text().contains("Connected to the MQTT broker.").then_some(())
        })?;
    }
    Ok((a, b, broker))
}

/// True when the tests run as root.
pub fn is_root() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// A tmpfs of a given size mounted for a test (a small disk to fill),
/// unmounted when dropped, also when the test fails. Needs root.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

/// A cgroup (v2) marked delegated the way systemd marks a unit's with
/// `Delegate=yes` (`trusted.delegate`), for an agent to run in
/// (`Agent::start_in`); on drop, everything in it and under it is killed
/// and it is removed. Needs root and the unified hierarchy.
#[derive(Debug)]
pub struct DelegatedCgroup {
    /// Its directory.
    pub path: PathBuf,
}

impl DelegatedCgroup {
    /// Makes one under the cgroup v2 mount.
    pub fn new() -> Result<Self> {
        if !is_root() {
            bail!("this test makes a cgroup: run tests/run.sh as root");
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mountinfo
            .lines()
            .find(|l| l.contains(" - cgroup2 "))
            .and_then(|l| l.split_whitespace().nth(4))
            .ok_or_else(|| anyhow::anyhow!("no cgroup v2 hierarchy is mounted"))?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = Path::new(mount).join(format!("outpost-test-{}-{n}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let status = Command::new("setfattr").args(["-n", "trusted.delegate", "-v", "1"]).arg(&path).status()?;
        if !status.success() {
            let _ = fs::remove_dir(&path);
            bail!("setfattr trusted.delegate on {}", path.display());
        }
        Ok(DelegatedCgroup { path })
    }

    /// The cgroups made under it now.
    pub fn children(&self) -> Vec<String> {
        fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for DelegatedCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            for child in self.children() {
                let _ = fs::remove_dir(self.path.join(child));
            }
            if fs::remove_dir(&self.path).is_ok() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` ("16m") on `path`, made if missing.
    pub fn mount(path: &Path, size: &str) -> Result<Self> {
        if !is_root() {
            bail!("this test mounts a tmpfs: run tests/run.sh as root");
        }
        fs::create_dir_all(path)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .status()?;
        if !status.success() {
            bail!("mount a tmpfs on {}", path.display());
        }
        Ok(Tmpfs { path: path.to_owned() })
    }

    /// Gives it a new size.
    pub fn resize(&self, size: &str) -> Result<()> {
        let status = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.path).status()?;
        if !status.success() {
            bail!("remount {}", self.path.display());
        }
        Ok(())
    }

    /// Bytes free on it.
    pub fn free(&self) -> Result<u64> {
        let vfs = rustix::fs::statvfs(&self.path)?;
        Ok(vfs.f_bavail * vfs.f_frsize)
    }

    /// Fills it up with a file `name` of zeros, until the file system
    /// refuses (ENOSPC); returns the file's path.
    pub fn fill(&self, name: &str) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.path.join(name);
        let mut file = fs::File::create(&path)?;
        let block = vec![0u8; 64 << 10];
        loop {
            match file.write(&block) {
                Ok(0) => return Ok(path),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(path),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A temporary directory that is kept, with process logs printed, when the
/// test fails.
#[derive(Debug)]
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    /// A new scratch directory.
    pub fn new() -> Result<Self> {
        Ok(Scratch { dir: Some(tempfile::Builder::new().prefix("outpost-test-").tempdir()?) })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new("/nonexistent"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(dir) = self.dir.take() else { return };
        let path = dir.keep();
        eprintln!("test failed; scratch directory kept at {}", path.display());
        if let Ok(entries) = fs::read_dir(&path) {
            for entry in entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "log")) {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(30).collect();
                eprintln!("--- {} (last {} lines)", entry.path().display(), tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A private Mosquitto for a test, on free ports:
/// - a TLS listener that takes client certificates from the fleet CA as
///   identities (`use_identity_as_username`) and enforces
///   `configs/mosquitto-acl`, as a production broker would;
/// - a plain, permissive listener (anonymous, no ACL) for clients that play
///   an attacker on a careless broker.
#[derive(Debug)]
pub struct Broker {
    /// The devices' TLS listener's port (client id = certificate name).
    pub tls_port: u16,
    /// The hubs' TLS listener's port (certificate and password).
    pub hub_port: u16,
    /// The permissive listener's port.
    pub plain_port: u16,
    /// CA of the broker's own certificate (for `ca_file` settings).
    pub ca_file: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A certificate authority made for a test, and server certificates from
/// it (a broker's, an HTTPS hub's).
pub struct TestCa {
    /// Its certificate, PEM.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa { pem, issuer: rcgen::Issuer::new(params, key) })
    }

    /// Writes a server certificate for `names` (host names or IP
    /// addresses) to `cert` and its key to `key`, both PEM.
    pub fn leaf(&self, names: &[&str], cert: &Path, key: &Path) -> Result<()> {
        let pair = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("server"));
        fs::write(cert, params.signed_by(&pair, &self.issuer)?.pem())?;
        fs::write(key, pair.serialize_pem())?;
        Ok(())
    }
}

impl Broker {
    /// Writes a broker certificate (from its own CA) and config under `root`
    /// and starts Mosquitto. Client certificates are checked against the
    /// hub's fleet CA.
    pub fn start(root: &Path, hub: &Hub) -> Result<Self> {
        let dir = root.join("broker");
        fs::create_dir_all(&dir)?;
        let ca = TestCa::new("test broker CA")?;
        let ca_file = dir.join("broker-ca.crt");
        fs::write(&ca_file, &ca.pem)?;
        ca.leaf(&["localhost", "127.0.0.1"], &dir.join("broker.crt"), &dir.join("broker.key"))?;
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let passwd = dir.join("hubs.passwd");
        let made = run(Command::new(mosquitto_tool("mosquitto_passwd")?)
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .args(["hub.outpost", HUB_BROKER_PASSWORD]))?;
        if !made.status.success() {
            bail!("mosquitto_passwd: {}", String::from_utf8_lossy(&made.stderr));
        }
        // The shipped config, on free loopback ports and this test's files;
        // `user root`: started as root, Mosquitto would switch to its own
        // user, which may not read the test's files. Then a permissive
        // listener, for playing an attacker on a careless broker.
        let shipped = fs::read_to_string(configs.join("mosquitto.conf"))?;
        // Mosquitto cannot listen on port 0 and say which port it got: the
        // ports are picked free here, and another process may take one
        // before Mosquitto binds it; then it starts again on new ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut broker = Self::configure(&dir, hub, &configs, &shipped, &passwd, &ca_file, root)?;
            match broker.restart() {
                Ok(()) => return Ok(broker),
                Err(e) if attempt < 5 && broker.log_text().contains("Address already in use") => {
                    eprintln!("Mosquitto found a port taken ({e}); again on other ports.");
                    fs::remove_file(&broker.log).ok();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the broker's config on free loopback ports.
    fn configure(
        dir: &Path,
        hub: &Hub,
        configs: &Path,
        shipped: &str,
        passwd: &Path,
        ca_file: &Path,
        root: &Path,
    ) -> Result<Self> {
        let (tls_port, hub_port, plain_port) = (free_port()?, free_port()?, free_port()?);
        let replaced = [
            ("listener 8883", format!("listener {tls_port} 127.0.0.1")),
            ("listener 8884", format!("listener {hub_port} 127.0.0.1")),
            ("/etc/mosquitto/outpost-fleet-ca.crt", hub.data_dir.join("ca.crt").display().to_string()),
            ("/etc/mosquitto/broker.crt", dir.join("broker.crt").display().to_string()),
            ("/etc/mosquitto/broker.key", dir.join("broker.key").display().to_string()),
            ("/etc/mosquitto/outpost-acl", configs.join("mosquitto-acl").canonicalize()?.display().to_string()),
            ("/etc/mosquitto/outpost-hubs.passwd", passwd.display().to_string()),
        ];
        let mut text = String::from("user root\npersistence false\nlog_dest stdout\nlog_type all\n");
        let mut config = shipped.to_owned();
        for (from, to) in &replaced {
            if !shipped.contains(from) {
                bail!("configs/mosquitto.conf no longer says {from:?}");
            }
            config = config.replace(from, to);
        }
        text.push_str(&config);
        text.push_str(&format!("listener {plain_port} 127.0.0.1\nallow_anonymous true\n"));
        let conf = dir.join("mosquitto.conf");
        fs::write(&conf, text)?;
        let (ca_file, log) = (ca_file.to_owned(), root.join("mosquitto.log"));
        Ok(Broker { tls_port, hub_port, plain_port, ca_file, conf, log, proc: None })
    }

    /// (Re)starts Mosquitto on the same ports and waits until both listeners
    /// accept connections.
    pub fn restart(&mut self) -> Result<()> {
        let mut proc = Proc::spawn(Command::new(mosquitto()?).arg("-c").arg(&self.conf), self.log.clone())?;
        let ports = [self.tls_port, self.hub_port, self.plain_port];
        wait_for(Duration::from_secs(10), "Mosquitto to listen", || {
            if !proc.running() {
                return Some(Err(anyhow::anyhow!("mosquitto exited; see {}", self.log.display())));
            }
            ports.iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()).then_some(Ok(()))
        })??;
        self.proc = Some(proc);
        Ok(())
    }

    /// Kills Mosquitto (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The `[mqtt]` table that points a hub at this broker (the hubs'
    /// listener).
    pub fn hub_config(&self) -> String {
        format!(
            "[mqtt]\nbroker = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\nkeep_alive = \"5s\"\nusername = \"hub.outpost\"\npassword = \"{HUB_BROKER_PASSWORD}\"\n",
            self.hub_port,
            self.ca_file.display().to_string()
        )
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The hubs' password at the test broker.
const HUB_BROKER_PASSWORD: &str = "hub-secret";

/// A program of the Mosquitto package (`mosquitto_passwd`).
fn mosquitto_tool(name: &str) -> Result<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .into_iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not installed: run tests/run.sh, which installs Mosquitto"))
}

/// The Mosquitto binary (tests/run.sh installs it).
fn mosquitto() -> Result<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("mosquitto is not installed: run tests/run.sh, which installs it")
}

/// The load generator's samples the hub holds, oldest first.
pub fn synthetic(hub: &Hub, id: &str, n: u64) -> Vec<SampleView> {
    let until = (loadgen_base_ms() + n).to_string();
    hub.client()
        .metrics(id, Some(&loadgen_base_ms().to_string()), Some(&until), Some(1_000_000))
        .unwrap_or_else(|e| panic!("metrics of {id}: {e}"))
        .samples
}

/// Panics unless every synthetic record `0..n` exactly once, in order of both index and
/// sequence number.
pub fn assert_exactly_once_in_order(samples: &[SampleView], n: u64) {
    let markers: Vec<u64> = samples.iter().map(|s| s.sample.uptime_secs).collect();
    let expected: Vec<u64> = (0..n).collect();
    if markers != expected {
        let dups = markers.windows(2).filter(|w| w[0] == w[1]).count();
        let missing = expected.iter().filter(|i| markers.binary_search(i).is_err()).count();
        panic!("{} records at the hub for {n} produced: {dups} duplicated, {missing} missing", markers.len());
    }
    assert!(samples.windows(2).all(|w| w[0].seq < w[1].seq), "sequence numbers out of order");
    assert!(
        samples.iter().all(|s| s.at_ms == loadgen_base_ms() + s.sample.uptime_secs),
        "timestamps changed in transit"
    );
}

/// Waits (panicking after `limit`) for the first `n` synthetic records.
pub fn wait_all(hub: &Hub, id: &str, n: u64, limit: Duration) -> Vec<SampleView> {
    wait_for(limit, &format!("{n} records at the hub"), || {
        let samples = synthetic(hub, id, n);
        (samples.len() as u64 >= n).then_some(samples)
    })
    .unwrap_or_else(|e| {
        let have = synthetic(hub, id, n).len();
        panic!("{e}: the hub holds {have}")
    })
}

/// Waits (panicking after `limit`) until the hub's high-water mark of `id` reaches `target`.
pub fn wait_progress(hub: &Hub, id: &str, target: u64, limit: Duration) -> u64 {
    wait_for(limit, &format!("the hub to reach seq {target}"), || {
        let seq = hub.device(id).ok()?.last_seq;
        (seq >= target).then_some(seq)
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A hub with `n` enrolled, running agents.
pub fn fleet(scratch: &Scratch, n: usize, timings: Timings) -> Result<(Hub, Vec<Agent>)> {
    let hub = Hub::start(scratch.path(), timings.clone())?;
    let mut agents = Vec::new();
    for i in 0..n {
        let mut agent = Agent::enroll(scratch.path(), &hub, &format!("agent-{i}"), &timings)?;
        agent.start()?;
        agents.push(agent);
    }
    Ok((hub, agents))
}

/// Waits until the API shows the devices `ids` with `online == want`.
pub fn wait_online(hub: &Hub, ids: &[&str], want: bool, limit: Duration) -> Result<Vec<DeviceView>> {
    let what = format!("{ids:?} online={want}");
    wait_for(limit, &what, || {
        let devices = hub.devices().ok()?;
        let all = ids.iter().all(|id| devices.iter().any(|d| d.id == *id && d.online == want));
        all.then_some(devices)
    })
}

/// An answer [`http_from`] read: status, header lines, body.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// Header lines, names lowercased: `name: value`.
    pub headers: Vec<String>,
    /// The body (`Connection: close`, so all of it).
    pub body: String,
}

impl RawAnswer {
    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| h.strip_prefix(name)?.strip_prefix(": "))
    }

    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 request to `api` from the loopback address `source` (any
/// of 127.0.0.0/8, so a test can be several clients): `method path`,
/// `headers` (each `Name: value`), `body`.
pub fn http_from(
    source: std::net::Ipv4Addr,
    api: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Result<RawAnswer> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = api.trim_start_matches("http://").parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        socket.connect(addr).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut stream = stream;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    // The hub may answer (413, 401) before reading all of a large body.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    let Some(status) = status else { bail!("no HTTP answer to {method} {path}: {text:?}") };
    let headers = lines
        .map(|l| match l.split_once(':') {
            Some((name, value)) => format!("{}: {}", name.to_ascii_lowercase(), value.trim()),
            None => l.to_owned(),
        })
        .collect();
    Ok(RawAnswer { status, headers, body: body.to_owned() })
}

/// A device that grabs every bulk turn it can: `connections` bulk
/// connections of `streams` streams, each starting a 1 MiB request and
/// never finishing it (each holds a turn at the hub until its request
/// timeout). Held until dropped.
pub struct BulkHog {
    // Dropped before the runtime that drives them.
    held: Option<Hogged>,
    _runtime: tokio::runtime::Runtime,
}

/// The streams and connections a [`BulkHog`] holds.
type Hogged = (Vec<(quinn::SendStream, quinn::RecvStream)>, Vec<(quinn::Endpoint, quinn::Connection)>);

impl BulkHog {
    /// Starts hogging the hub's bulk service as `agent` (enrolled, not
    /// necessarily running).
    pub fn start(hub: &Hub, agent: &Agent, connections: usize, streams: usize) -> Result<Self> {
        let runtime = tokio::runtime::Runtime::new()?;
        let identity = outpost_agent::identity::Identity::load(&agent.data_dir)?;
        let addr: std::net::SocketAddr = hub.quic_addr.parse()?;
        let quic =
            outpost_agent::tls::Timings { keepalive: Duration::from_secs(1), idle_timeout: Duration::from_secs(90) };
        let held = runtime.block_on(async {
            let (mut held_streams, mut held_connections) = (Vec::new(), Vec::new());
            for _ in 0..connections {
                let mut endpoint = outpost_agent::tls::client_endpoint(addr)?;
                endpoint.set_default_client_config(outpost_agent::tls::bulk_config(&identity, quic)?);
                let Ok(connecting) = endpoint.connect(addr, outpost_shared::identity::HUB_SERVER_NAME) else {
                    continue;
                };
                let Ok(connection) = connecting.await else { continue };
                for _ in 0..streams {
                    let Ok((mut send, recv)) = connection.open_bi().await else { break };
                    // A frame header announcing 1 MiB, then 10 bytes of it.
                    let _ = send.write_all(&(1u32 << 20).to_be_bytes()).await;
                    let _ = send.write_all(&[0u8; 10]).await;
                    held_streams.push((send, recv));
                }
                held_connections.push((endpoint, connection));
            }
            anyhow::Ok((held_streams, held_connections))
        })?;
        Ok(BulkHog { held: Some(held), _runtime: runtime })
    }
}

impl Drop for BulkHog {
    fn drop(&mut self) {
        let _guard = self._runtime.enter();
        self.held.take();
    }
}

/// A webhook receiver on loopback, as an alert receiver would run: each
/// POST's JSON body is kept with the status it was answered; the statuses
/// in `script` are answered in turn, then 200.
#[derive(Debug)]
pub struct Webhook {
    /// Its URL.
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(u16, serde_json::Value)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    addr: std::net::SocketAddr,
}

impl Webhook {
    /// Starts it.
    pub fn start(script: Vec<u16>) -> Result<Self> {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let received: std::sync::Arc<std::sync::Mutex<Vec<(u16, serde_json::Value)>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kept, stopping) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for stream in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone a socket"));
                let (mut length, mut chunked, mut line) = (0usize, false, String::new());
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
                    line.clear();
                }
                let mut body = Vec::new();
                if chunked {
                    loop {
                        let mut size = String::new();
                        if reader.read_line(&mut size).unwrap_or(0) == 0 {
                            break;
                        }
                        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                        let mut chunk = vec![0u8; n + 2];
                        if n == 0 || reader.read_exact(&mut chunk).is_err() {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                } else {
                    body.resize(length, 0);
                    let _ = reader.read_exact(&mut body);
                }
                let status = script.next().unwrap_or(200);
                let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                kept.lock().unwrap_or_else(|p| p.into_inner()).push((status, value));
                let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        Ok(Webhook { url: format!("http://{addr}/hook"), received, stop, addr })
    }

    /// Every POST so far: the status answered and the body.
    pub fn received(&self) -> Vec<(u16, serde_json::Value)> {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The bodies answered with 200.
    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.received().into_iter().filter(|(s, _)| *s == 200).map(|(_, b)| b).collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
