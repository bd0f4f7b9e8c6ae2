//! The agent's config file (TOML). `configs/agent.toml` is the annotated
//! reference; every key there is read here.

use outpost_shared::config::{ByteSize, ConfigError, ConfigFile, Section};
use outpost_shared::frame::DEFAULT_MAX_FRAME;
use outpost_shared::job::{JobSpec, read_jobs};
use outpost_shared::mqtt::BrokerUrl;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Identity (key, certificates) and local state. Required.
    pub data_dir: PathBuf,
    /// Name shown in the fleet. Default: the host name.
    pub name: Option<String>,
    /// Link to the hub.
    pub uplink: UplinkConfig,
    /// Telemetry sampling.
    pub telemetry: TelemetryConfig,
    /// Local durable store.
    pub store: StoreConfig,
    /// Commands from the hub.
    pub commands: CommandsConfig,
    /// Log filter. Default `info`.
    pub log: String,
    /// On SIGTERM, how long running jobs may go on before their process
    /// groups are killed and they are recorded interrupted. Default 10s.
    pub stop_grace: Duration,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// Scheduled jobs (`[[job]]`); the hub's desired state may add more and
    /// replace these by name.
    pub jobs: Vec<JobSpec>,
    /// LAN peers: discovery and relay.
    pub peers: PeersConfig,
    /// Backup sets (`[[backup]]`).
    pub backups: Vec<BackupSet>,
    /// `[backups]`: the repository and its key.
    pub backup_repo: BackupRepoConfig,
    /// The file this config was read from (set by the caller, not from
    /// TOML); backup jobs and commands run `outpost-agent backup` with it.
    pub config_path: Option<PathBuf>,
}

/// `[backups]`
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRepoConfig {
    /// File with the fleet backup key (64 hex digits), set by the operator.
    /// Required when a backup set exists.
    pub key_file: Option<PathBuf>,
    /// Repository directory. Default `<data_dir>/backups`.
    pub dir: PathBuf,
    /// CPU priority of backup processes (`nice`, 0 to 19). Default 10.
    pub nice: u8,
    /// I/O class of backup processes: `idle` (default), `best-effort`.
    pub io_class: String,
    /// A scheduled or commanded backup operation is killed after this long.
    /// Default 24h.
    pub timeout: Duration,
    /// Most bytes per second an upload to the hub sends (`"512 KiB"`).
    /// Default 0: no limit.
    pub upload_rate: u64,
}

/// One `[[backup]]` set.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupSet {
    /// Its name.
    pub name: String,
    /// Absolute paths backed up (files or directories, recursively).
    pub paths: Vec<String>,
    /// Glob patterns of paths left out (`**/*.tmp`, `/var/cache/**`).
    pub exclude: Vec<String>,
    /// When it runs (cron or `@every`), if scheduled.
    pub schedule: Option<String>,
    /// Which snapshots `prune` keeps.
    pub retention: Retention,
    /// Send new chunks to the hub (not built yet; read and reported).
    pub upload: bool,
}

impl BackupSet {
    /// The exclude patterns, compiled (checked when the config is read).
    pub fn exclude_matcher(&self) -> globset::GlobSet {
        let mut builder = globset::GlobSetBuilder::new();
        for pattern in &self.exclude {
            if let Ok(glob) = globset::Glob::new(pattern) {
                builder.add(glob);
            }
        }
        builder.build().unwrap_or_else(|_| globset::GlobSet::empty())
    }
}

pub use outpost_shared::retention::Retention;

/// `[peers]`
#[derive(Debug, Clone, PartialEq)]
pub struct PeersConfig {
    /// Advertise, discover and relay. Default true.
    pub enabled: bool,
    /// Interfaces to advertise and browse on. Default: every non-loopback
    /// interface with multicast.
    pub interfaces: Vec<String>,
    /// UDP port of the peer endpoint; 0 lets the OS pick. Default 7444.
    pub port: u16,
    /// Keep-alive of peer links. Default 2s.
    pub probe_interval: Duration,
    /// A peer whose link is silent this long is gone. Default 10s.
    pub gone_after: Duration,
    /// Relay the outbox through a trusted peer while the uplink is down.
    /// Default true.
    pub relay: bool,
    /// Start relaying after the uplink has been down this long. Default 5s.
    pub relay_after: Duration,
    /// Most peers in the table (and in the report to the hub); a new
    /// announcement beyond it replaces the entry least worth keeping, never
    /// a trusted peer. Entries not trusted are forgotten after
    /// `10 × gone_after` unseen. Default 64.
    pub max_peers: usize,
    /// Most peer dials under way at once (each a QUIC handshake that may
    /// wait `gone_after`). Default 4.
    pub max_dials: usize,
}

/// How the agent reaches the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// QUIC straight to the hub (default).
    Quic,
    /// Through an MQTT broker (`[uplink.mqtt]`).
    Mqtt(MqttConfig),
}

/// `[uplink.mqtt]`
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// The broker: `mqtts://host:port` (TLS; the device's certificate is its
    /// client certificate) or `mqtt://host:port`. Required.
    pub broker: BrokerUrl,
    /// PEM file with the CA of the broker's certificate. Default: the fleet
    /// CA.
    pub ca_file: Option<PathBuf>,
    /// MQTT keep-alive. Default 30s.
    pub keep_alive: Duration,
}

/// `[uplink]`
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// `quic` (default) or `mqtt`.
    pub transport: Transport,
    /// `host:port` of the hub's QUIC endpoint. Default: the address in the
    /// enrollment token.
    pub hub: Option<String>,
    /// Give up a connection attempt after this long. Default 10s.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failure, with full jitter.
    /// Default 500ms.
    pub backoff_initial: Duration,
    /// Longest reconnect delay. Default 30s.
    pub backoff_max: Duration,
    /// Heartbeat interval while connected. Default 5s.
    pub heartbeat: Duration,
    /// QUIC keep-alive interval. Default 5s.
    pub keepalive: Duration,
    /// Drop a silent connection after this long. Default 30s.
    pub idle_timeout: Duration,
    /// Hard maximum frame size. Default 1 MiB.
    pub max_frame: usize,
    /// Share of the device certificate's life after which the agent asks
    /// the hub for a new one over its session (by the hub's clock). Default
    /// 2/3; between 0.1 and 0.9.
    pub renew_at: f64,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Where `/metrics` (Prometheus text format) is served: a loopback
    /// address only (`127.0.0.1:9465`). Default: not served.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[telemetry]`
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Sampling interval. Default 10s. The hub's desired state may
    /// override it.
    pub interval: Duration,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes the outbox may hold before telemetry is thinned. Results,
    /// reports and alarms are never dropped. Default 64 MiB.
    pub outbox_budget: u64,
    /// sled page cache. Default 4 MiB.
    pub cache: u64,
    /// Free space kept on the data dir's file system: below it the outbox
    /// stops growing and thins telemetry, whatever its budget. At most a
    /// tenth of the file system is kept. Default 64 MiB.
    pub keep_free: u64,
}

/// `[commands]`
#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// Run `exec` commands (a program with arguments, no shell) from the
    /// hub. Default false.
    pub allow_exec: bool,
    /// Kill an `exec` command's process group after this long. Default 5m.
    pub timeout: Duration,
    /// Captured output kept per command. Default 64 KiB.
    pub max_output: usize,
    /// `outpost-agent backup --config ...` as a low-priority process, for
    /// `backup` commands (set at start from `[backups]`, not read here).
    pub backup_command: Option<Vec<String>>,
    /// Timeout of `backup` commands (`[backups] timeout`).
    pub backup_timeout: Duration,
}

impl AgentConfig {
    /// Defaults for an agent whose state lives in `data_dir`.
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        let path = Path::new("<defaults>");
        let text = format!("data_dir = {}", toml::Value::String(data_dir.display().to_string()));
        // The defaults plus one valid key always read cleanly.
        Self::parse(path, &text).unwrap_or_else(|e| panic!("built-in defaults are invalid: {e}"))
    }
}

impl ConfigFile for AgentConfig {
    fn read(root: &Section<'_>) -> Self {
        let uplink = root.table("uplink");
        let telemetry = root.table("telemetry");
        let store = root.table("store");
        let commands = root.table("commands");
        let peers = root.table("peers");
        let backups_section = root.table("backups");
        let metrics = root.table("metrics");
        let mqtt = uplink.table("mqtt");
        let transport = match uplink.get_or("transport", "quic".to_owned()).as_str() {
            "quic" => Transport::Quic,
            "mqtt" => Transport::Mqtt(MqttConfig {
                broker: mqtt.require("broker").unwrap_or_else(|| BrokerUrl { tls: true, host: String::new(), port: 0 }),
                ca_file: mqtt.get("ca_file"),
                keep_alive: mqtt.get_or("keep_alive", Duration::from_secs(30)),
            }),
            _ => {
                uplink.error("transport", "unknown transport; write \"quic\" or \"mqtt\"");
                Transport::Quic
            }
        };
        if let Transport::Mqtt(m) = &transport {
            mqtt.check("keep_alive", m.keep_alive >= Duration::from_secs(1), "must be at least 1s");
        }
        let config = AgentConfig {
            data_dir: root.require("data_dir").unwrap_or_default(),
            name: root.get("name"),
            uplink: UplinkConfig {
                transport,
                hub: uplink.get("hub"),
                connect_timeout: uplink.get_or("connect_timeout", Duration::from_secs(10)),
                backoff_initial: uplink.get_or("backoff_initial", Duration::from_millis(500)),
                backoff_max: uplink.get_or("backoff_max", Duration::from_secs(30)),
                heartbeat: uplink.get_or("heartbeat", Duration::from_secs(5)),
                keepalive: uplink.get_or("keepalive", Duration::from_secs(5)),
                idle_timeout: uplink.get_or("idle_timeout", Duration::from_secs(30)),
                max_frame: uplink.get_or("max_frame", ByteSize(DEFAULT_MAX_FRAME as u64)).0 as usize,
                renew_at: uplink.get_or("renew_at", outpost_shared::identity::RENEW_AT),
            },
            telemetry: TelemetryConfig { interval: telemetry.get_or("interval", Duration::from_secs(10)) },
            store: StoreConfig {
                outbox_budget: store.get_or("outbox_budget", ByteSize(64 << 20)).0,
                cache: store.get_or("cache", ByteSize(4 << 20)).0,
                keep_free: store.get_or("keep_free", ByteSize(crate::store::DEFAULT_KEEP_FREE)).0,
            },
            commands: CommandsConfig {
                allow_exec: commands.get_or("allow_exec", false),
                timeout: commands.get_or("timeout", Duration::from_secs(300)),
                max_output: commands.get_or("max_output", ByteSize(64 << 10)).0 as usize,
                backup_command: None,
                backup_timeout: Duration::from_secs(86_400),
            },
            log: root.get_or("log", "info".to_owned()),
            stop_grace: root.get_or("stop_grace", Duration::from_secs(10)),
            metrics: MetricsConfig { listen: metrics.get("listen") },
            jobs: read_jobs(root, "job"),
            backups: root.array("backup").iter().map(read_backup_set).collect(),
            backup_repo: BackupRepoConfig {
                key_file: backups_section.get("key_file"),
                dir: backups_section
                    .get("dir")
                    .unwrap_or_else(|| root.get::<PathBuf>("data_dir").unwrap_or_default().join("backups")),
                nice: backups_section.get_or("nice", 10u8),
                io_class: backups_section.get_or("io_class", "idle".to_owned()),
                timeout: backups_section.get_or("timeout", Duration::from_secs(86_400)),
                upload_rate: backups_section.get_or("upload_rate", ByteSize(0)).0,
            },
            config_path: None,
            peers: PeersConfig {
                enabled: peers.get_or("enabled", true),
                interfaces: peers.get_or("interfaces", Vec::new()),
                port: peers.get_or("port", 7444u16),
                probe_interval: peers.get_or("probe_interval", Duration::from_secs(2)),
                gone_after: peers.get_or("gone_after", Duration::from_secs(10)),
                relay: peers.get_or("relay", true),
                relay_after: peers.get_or("relay_after", Duration::from_secs(5)),
                max_peers: peers.get_or("max_peers", 64usize),
                max_dials: peers.get_or("max_dials", 4usize),
            },
        };
        let pc = &config.peers;
        peers.check("probe_interval", pc.probe_interval >= Duration::from_millis(100), "must be at least 100ms");
        peers.check("gone_after", pc.gone_after > pc.probe_interval, "must be longer than probe_interval");
        peers.check("max_peers", (1..=4096).contains(&pc.max_peers), "must be between 1 and 4096");
        peers.check("max_dials", (1..=64).contains(&pc.max_dials), "must be between 1 and 64");
        let u = &config.uplink;
        for (key, value) in [
            ("connect_timeout", u.connect_timeout),
            ("backoff_initial", u.backoff_initial),
            ("heartbeat", u.heartbeat),
            ("keepalive", u.keepalive),
        ] {
            uplink.check(key, !value.is_zero(), "must be more than zero");
        }
        uplink.check("backoff_max", u.backoff_max >= u.backoff_initial, "must not be less than backoff_initial");
        uplink.check("idle_timeout", u.idle_timeout > u.keepalive, "must be longer than keepalive");
        uplink.check("renew_at", (0.1..=0.9).contains(&u.renew_at), "must be between 0.1 and 0.9");
        uplink.check("max_frame", (256 << 10..=64 << 20).contains(&u.max_frame), "must be between 256 KiB and 64 MiB");
        root.check("stop_grace", config.stop_grace <= Duration::from_secs(600), "must be at most 10m");
        if let Some(listen) = config.metrics.listen {
            metrics.check(
                "listen",
                listen.ip().is_loopback(),
                "must be a loopback address (127.0.0.1:PORT or [::1]:PORT): the agent's metrics have no authentication",
            );
        }
        if let Some(name) = &config.name {
            root.check("name", !name.trim().is_empty() && name.len() <= 64, "must be 1 to 64 characters");
        }
        outpost_shared::desired::check_telemetry_interval(&telemetry, "interval", config.telemetry.interval);
        store.check("outbox_budget", config.store.outbox_budget >= 64 << 10, "must be at least 64 KiB");
        store.check("cache", config.store.cache >= 256 << 10, "must be at least 256 KiB");
        commands.check("timeout", !config.commands.timeout.is_zero(), "must be more than zero");
        commands.check("max_output", config.commands.max_output <= 1 << 20, "must be at most 1 MiB");
        if matches!(config.uplink.transport, Transport::Mqtt(_)) {
            mqtt.finish();
        }
        let mut names = std::collections::BTreeSet::new();
        for set in &config.backups {
            if !names.insert(set.name.clone()) {
                root.error(&format!("backup[{}].name", set.name), "another backup set has this name");
            }
        }
        let b = &config.backup_repo;
        backups_section.check("nice", b.nice <= 19, "must be 0 to 19");
        backups_section.check(
            "io_class",
            ["idle", "best-effort"].contains(&b.io_class.as_str()),
            "must be \"idle\" or \"best-effort\"",
        );
        backups_section.check("timeout", !b.timeout.is_zero(), "must be more than zero");
        if !config.backups.is_empty() && config.backup_repo.key_file.is_none() {
            backups_section.error("key_file", "required when [[backup]] sets exist");
        }
        if let Some(Err(e)) = config.uplink.hub.as_deref().map(outpost_shared::config::check_hub_addresses) {
            uplink.error("hub", e);
        }
        for section in [uplink, telemetry, store, commands, peers, backups_section, metrics] {
            section.finish();
        }
        config
    }

    fn check_environment(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = crate::identity::Identity::load(&self.data_dir) {
            errors.push(ConfigError { path: "data_dir".into(), message: e.to_string() });
        }
        if let Some(key_file) = &self.backup_repo.key_file {
            if let Err(e) = crate::keyfile::read_key(key_file) {
                errors.push(ConfigError { path: "backups.key_file".into(), message: e.to_string() });
            } else if let Err(message) = outpost_shared::fsutil::check_private(key_file) {
                errors.push(ConfigError { path: "backups.key_file".into(), message });
            }
        }
        for key in crate::identity::Identity::secret_files(&self.data_dir) {
            if let Err(message) = outpost_shared::fsutil::check_private(&key) {
                errors.push(ConfigError { path: "data_dir".into(), message });
            }
        }
        errors
    }
}
/// Reads one `[[backup]]` table, recording every problem with its path.
fn read_backup_set(t: &Section<'_>) -> BackupSet {
    let name: String = t.require("name").unwrap_or_default();
    let paths: Vec<String> = t.require("paths").unwrap_or_default();
    let exclude: Vec<String> = t.get_or("exclude", Vec::new());
    let name_ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    t.check("name", name_ok, "must be letters, digits, '-' or '_'");
    let paths_ok = !paths.is_empty() && paths.iter().all(|p| p.starts_with('/'));
    t.check("paths", paths_ok, "must be a non-empty list of absolute paths");
    for pattern in &exclude {
        if let Err(e) = globset::Glob::new(pattern) {
            t.error("exclude", format!("{pattern:?}: {e}"));
        }
    }
    let schedule: Option<String> = t.get("schedule");
    if let Some(s) = &schedule
        && let Err(e) = outpost_shared::job::Schedule::parse(s)
    {
        t.error("schedule", e);
    }
    let retention = Retention::read(&t.table("retention"));
    let upload = t.get_or("upload", false);
    t.finish();
    BackupSet { name, paths, exclude, schedule, retention, upload }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = AgentConfig::with_data_dir("/tmp/x".into());
        assert_eq!(c.uplink.heartbeat, Duration::from_secs(5));
        assert_eq!(c.telemetry.interval, Duration::from_secs(10));
    }

    #[test]
    fn backup_sets_are_checked_and_every_problem_listed() {
        let text = "data_dir = \"/x\"\n[[backup]]\nname = \"a b\"\npaths = [\"rel\"]\nexclude = [\"[\"]\nschedule = \"often\"\n[backup.retention]\nyearly = 1\n[[backup]]\nname = \"ok\"\npaths = [\"/srv\"]\n[[backup]]\nname = \"ok\"\npaths = [\"/etc\"]\n";
        let err = AgentConfig::parse(Path::new("agent.toml"), text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "backup[a b].name",
            "backup[a b].paths",
            "backup[a b].exclude",
            "backup[a b].schedule",
            "backup[a b].retention.yearly",
            "backup[ok].name",
            "backups.key_file",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }

    #[test]
    fn mqtt_transport_is_read_and_every_problem_listed() {
        let text =
            "data_dir = \"/x\"\n[uplink]\ntransport = \"mqtt\"\n[uplink.mqtt]\nbroker = \"mqtts://b.example:8884\"\n";
        let c = AgentConfig::parse(Path::new("agent.toml"), text).unwrap();
        let Transport::Mqtt(m) = c.uplink.transport else { panic!("not mqtt") };
        assert_eq!((m.broker.host.as_str(), m.broker.port, m.keep_alive), ("b.example", 8884, Duration::from_secs(30)));
        let text = "data_dir = \"/x\"\n[uplink]\ntransport = \"mqtt\"\n[uplink.mqtt]\nbroker = \"tcp://b\"\nkeep_alive = \"0s\"\nqos = 2\n";
        let err = AgentConfig::parse(Path::new("agent.toml"), text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["uplink.mqtt.broker", "uplink.mqtt.keep_alive", "uplink.mqtt.qos"], "{err}");
        let text = "data_dir = \"/x\"\n[uplink]\ntransport = \"mqtt\"\n";
        let err = AgentConfig::parse(Path::new("agent.toml"), text).unwrap_err();
        assert_eq!(err.errors[0].path, "uplink.mqtt.broker", "{err}");
        let text = "data_dir = \"/x\"\n[uplink]\ntransport = \"carrier pigeon\"\n";
        let err = AgentConfig::parse(Path::new("agent.toml"), text).unwrap_err();
        assert_eq!(err.errors[0].path, "uplink.transport", "{err}");
    }

    #[test]
    fn metrics_are_served_on_loopback_only() {
        let parse = |listen: &str| {
            AgentConfig::parse(Path::new("agent.toml"), &format!("data_dir = \"/x\"\n[metrics]\nlisten = {listen:?}\n"))
        };
        assert_eq!(AgentConfig::with_data_dir("/x".into()).metrics.listen, None, "off by default");
        assert_eq!(parse("127.0.0.1:9465").unwrap().metrics.listen, Some(([127, 0, 0, 1], 9465).into()));
        assert!(parse("[::1]:9465").is_ok());
        for bad in ["0.0.0.0:9465", "192.168.1.10:9465", "localhost"] {
            let err = parse(bad).unwrap_err();
            let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths, ["metrics.listen"], "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_bad_duration_and_missing_field_are_all_reported() {
        let text = "[uplink]\nheartbeat = \"5 parsecs\"\nhubb = \"x\"\n[telemetry]\ninterval = \"0s\"\n";
        let err = AgentConfig::parse(Path::new("agent.toml"), text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["data_dir", "uplink.heartbeat", "telemetry.interval", "uplink.hubb"], "{err}");
    }
}
