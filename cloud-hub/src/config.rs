//! The hub's config file (TOML). See `configs/hub.toml` for the annotated
//! reference; every key there is read here.

use crate::store::StoreConfig;
use crate::transport::mqtt::MqttConfig;
use outpost_shared::config::{ByteSize, ConfigError, ConfigFile, Section};
use outpost_shared::frame::DEFAULT_MAX_FRAME;
use outpost_shared::mqtt::BrokerUrl;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Where the CA, enrollment key and database live. Required.
    pub data_dir: PathBuf,
    /// QUIC endpoint for agents.
    pub quic: QuicConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// MQTT bridge; off unless `[mqtt]` names a broker.
    pub mqtt: Option<MqttConfig>,
    /// A device is shown offline when nothing arrived from it for this long.
    /// Default 15s.
    pub heartbeat_timeout: Duration,
    /// `[fleet] device_records_per_sec`, `device_bytes_per_sec`: what one
    /// device's batches may bring per second before its session slows it.
    pub device_rate: crate::service::pace::DeviceRate,
    /// `[fleet] device_bulk_turns`, `device_bulk_connections`: what one
    /// device may hold of the bulk service (backup transfers).
    pub device_bulk: crate::transport::bulk::DeviceBulk,
    /// Telemetry history is kept this long. Default 30 days.
    pub telemetry_retention: Duration,
    /// `[audit] retention`: audit entries are kept this long. Default 400
    /// days; at least 1 day.
    pub audit_retention: Duration,
    /// Log filter (`info`, `outpost_hub=debug`, ...). Default `info`.
    pub log: String,
    /// `[backups]`: the hub's own retention of uploaded snapshots.
    pub backups: BackupsConfig,
    /// `[store]`: where the fleet's state lives. Default: sled under
    /// `data_dir/db`.
    pub store: StoreConfig,
    /// `[alerts]`: rules, receivers and when they are told.
    pub alerts: crate::service::alerts::AlertsConfig,
}

/// `[backups]`
#[derive(Debug, Clone, PartialEq)]
pub struct BackupsConfig {
    /// `[backups.retention]`: which uploaded snapshots of each device's
    /// backup set the hub keeps (`last`, `hourly`, `daily`, `weekly`,
    /// `monthly`, counted as the device counts its own). Default: all.
    /// The hub's, never the device's: a device cannot shorten its history.
    pub retention: outpost_shared::retention::Retention,
    /// How often the retention is applied to every device. Default 1h.
    pub prune_every: Duration,
    /// `device_quota` and `min_free`: what backups may take of the disk.
    pub room: crate::service::backups::Room,
}

/// `[quic]`
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// Address to bind. Default `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// `host:port` agents dial, written into enrollment tokens. Default: the
    /// bound address.
    pub advertise: Option<String>,
    /// Hard maximum frame size. Default 1 MiB.
    pub max_frame: usize,
    /// Close a connection silent for this long. Default 30s.
    pub idle_timeout: Duration,
    /// Lifetime of the hub's own TLS certificate (serving QUIC, and its
    /// client certificate at an MQTT broker), renewed while the hub runs at
    /// two thirds of it. Default 90d; at least 10s (short ones are for
    /// tests), at most 397d.
    pub cert_lifetime: Duration,
    /// Lifetime of the device certificates the hub signs (at enrollment and
    /// when a device renews over its session, at two thirds of it by
    /// default). Default 365d; at least 30s (short ones are for tests), at
    /// most 825d.
    pub device_cert_lifetime: Duration,
    /// `accept_rate`, `accept_burst`, `max_handshakes`, `max_retry_after`:
    /// how fast new connections are admitted (see
    /// [`crate::transport::door`]).
    pub door: crate::transport::door::DoorLimits,
}

/// `[http]`
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address to bind. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Worker threads. Default 2.
    pub workers: usize,
    /// `failed_auth_burst` and `failed_auth_window`: failed
    /// authentications one source address may make before it is answered
    /// 429 (default 20 per 1m).
    pub failed_auth: crate::service::throttle::AuthLimit,
    /// `tls_cert` and `tls_key`: PEM files; with them the listener speaks
    /// HTTPS only (reloaded on SIGHUP). Default: plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl HubConfig {
    /// Defaults for a hub whose state lives in `data_dir`, listening on
    /// loopback ports the OS picks (tests, the demo).
    pub fn ephemeral(data_dir: PathBuf) -> Self {
        HubConfig {
            data_dir,
            quic: QuicConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                max_frame: DEFAULT_MAX_FRAME,
                idle_timeout: Duration::from_secs(30),
                cert_lifetime: crate::service::ca::HUB_CERT_LIFETIME,
                device_cert_lifetime: crate::service::ca::DEVICE_CERT_LIFETIME,
                door: crate::transport::door::DoorLimits::default(),
            },
            http: HttpConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                workers: 1,
                failed_auth: Default::default(),
                tls: None,
            },
            mqtt: None,
            heartbeat_timeout: Duration::from_secs(15),
            device_rate: Default::default(),
            device_bulk: Default::default(),
            telemetry_retention: Duration::from_secs(30 * 86400),
            audit_retention: AUDIT_RETENTION,
            log: "info".into(),
            backups: BackupsConfig {
                retention: Default::default(),
                prune_every: Duration::from_secs(3600),
                room: Default::default(),
            },
            store: StoreConfig::Sled,
            alerts: Default::default(),
        }
    }
}

/// Default `[audit] retention`: a little over a year, so a yearly review
/// finds the whole year.
pub const AUDIT_RETENTION: Duration = Duration::from_secs(400 * 86400);

impl ConfigFile for HubConfig {
    fn read(root: &Section<'_>) -> Self {
        let quic = root.table("quic");
        let http = root.table("http");
        let fleet = root.table("fleet");
        let telemetry = root.table("telemetry");
        let audit = root.table("audit");
        let mqtt = root.table("mqtt");
        let backups = root.table("backups");
        let store = root.table("store");
        let alerts = root.table("alerts");
        let store_config = match store.get_or("backend", "sled".to_owned()).as_str() {
            "sled" => StoreConfig::Sled,
            "postgres" => StoreConfig::Postgres {
                url: store.require("url").unwrap_or_default(),
                pool_size: store.get_or("pool_size", 16usize),
                listen: store.get_or("listen", true),
            },
            other => {
                store.error("backend", format!("unknown backend {other:?}; use \"sled\" or \"postgres\""));
                StoreConfig::Sled
            }
        };
        if let StoreConfig::Postgres { url, pool_size, .. } = &store_config {
            store.check("pool_size", (1..=1024).contains(pool_size), "must be between 1 and 1024");
            if !url.is_empty()
                && let Err(e) = crate::store::postgres::config(url)
            {
                store.error("url", format!("not a PostgreSQL connection string: {e}"));
            }
        }
        let config = HubConfig {
            data_dir: root.require("data_dir").unwrap_or_default(),
            quic: QuicConfig {
                listen: socket_addr(&quic, "listen", "0.0.0.0:7443"),
                advertise: quic.get("advertise"),
                max_frame: quic.get_or("max_frame", ByteSize(DEFAULT_MAX_FRAME as u64)).0 as usize,
                idle_timeout: quic.get_or("idle_timeout", Duration::from_secs(30)),
                cert_lifetime: quic.get_or("cert_lifetime", crate::service::ca::HUB_CERT_LIFETIME),
                device_cert_lifetime: quic.get_or("device_cert_lifetime", crate::service::ca::DEVICE_CERT_LIFETIME),
                door: {
                    let default = crate::transport::door::DoorLimits::default();
                    crate::transport::door::DoorLimits {
                        rate: quic.get_or("accept_rate", default.rate),
                        burst: quic.get_or("accept_burst", default.burst),
                        handshakes: quic.get_or("max_handshakes", default.handshakes),
                        max_retry_after: quic.get_or("max_retry_after", default.max_retry_after),
                    }
                },
            },
            http: HttpConfig {
                listen: socket_addr(&http, "listen", "127.0.0.1:8080"),
                workers: http.get_or("workers", 2usize),
                failed_auth: crate::service::throttle::AuthLimit {
                    burst: http.get_or("failed_auth_burst", crate::service::throttle::AuthLimit::default().burst),
                    window: http.get_or("failed_auth_window", crate::service::throttle::AuthLimit::default().window),
                },
                tls: match (http.get::<PathBuf>("tls_cert"), http.get::<PathBuf>("tls_key")) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    (Some(_), None) => {
                        http.error("tls_key", "needed with tls_cert");
                        None
                    }
                    (None, Some(_)) => {
                        http.error("tls_cert", "needed with tls_key");
                        None
                    }
                },
            },
            mqtt: root.has("mqtt").then(|| MqttConfig {
                broker: mqtt.require("broker").unwrap_or_else(|| BrokerUrl { tls: true, host: String::new(), port: 0 }),
                ca_file: mqtt.get("ca_file"),
                username: mqtt.get("username"),
                password: mqtt.get("password"),
                shared_group: mqtt.get_or("shared_group", "outpost-hub".to_owned()),
                keep_alive: mqtt.get_or("keep_alive", Duration::from_secs(30)),
                legacy_agents: mqtt.get_or("legacy_agents", false),
            }),
            heartbeat_timeout: fleet.get_or("heartbeat_timeout", Duration::from_secs(15)),
            device_rate: crate::service::pace::DeviceRate {
                records_per_sec: fleet
                    .get_or("device_records_per_sec", crate::service::pace::DeviceRate::default().records_per_sec),
                bytes_per_sec: fleet
                    .get_or("device_bytes_per_sec", ByteSize(crate::service::pace::DeviceRate::default().bytes_per_sec))
                    .0,
            },
            device_bulk: crate::transport::bulk::DeviceBulk {
                turns: fleet.get_or("device_bulk_turns", crate::transport::bulk::TURNS_PER_DEVICE),
                connections: fleet.get_or("device_bulk_connections", crate::transport::bulk::CONNECTIONS_PER_DEVICE),
            },
            telemetry_retention: telemetry.get_or("retention", Duration::from_secs(30 * 86400)),
            audit_retention: audit.get_or("retention", AUDIT_RETENTION),
            log: root.get_or("log", "info".to_owned()),
            backups: BackupsConfig {
                retention: outpost_shared::retention::Retention::read(&backups.table("retention")),
                prune_every: backups.get_or("prune_every", Duration::from_secs(3600)),
                room: crate::service::backups::Room {
                    device_quota: backups.get::<ByteSize>("device_quota").map(|b| b.0).filter(|&b| b > 0),
                    min_free: backups.get_or("min_free", ByteSize(crate::service::backups::Room::default().min_free)).0,
                },
            },
            store: store_config,
            alerts: crate::service::alerts::AlertsConfig::read(&alerts),
        };
        backups.check("prune_every", config.backups.prune_every >= Duration::from_secs(60), "must be at least 1m");
        quic.check(
            "max_frame",
            (256 << 10..=64 << 20).contains(&config.quic.max_frame),
            "must be between 256 KiB and 64 MiB",
        );
        quic.check("idle_timeout", !config.quic.idle_timeout.is_zero(), "must be more than zero");
        quic.check(
            "cert_lifetime",
            (Duration::from_secs(10)..=Duration::from_secs(397 * 86400)).contains(&config.quic.cert_lifetime),
            "must be between 10s and 397d",
        );
        quic.check(
            "device_cert_lifetime",
            (Duration::from_secs(30)..=Duration::from_secs(825 * 86400)).contains(&config.quic.device_cert_lifetime),
            "must be between 30s and 825d",
        );
        let door = config.quic.door;
        quic.check("accept_rate", (1..=1_000_000).contains(&door.rate), "must be between 1 and 1000000");
        quic.check("accept_burst", (1..=1_000_000).contains(&door.burst), "must be between 1 and 1000000");
        quic.check("max_handshakes", (1..=100_000).contains(&door.handshakes), "must be between 1 and 100000");
        quic.check(
            "max_retry_after",
            (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&door.max_retry_after),
            "must be between 1s and 1h",
        );
        if let Some(Err(e)) = config.quic.advertise.as_deref().map(outpost_shared::config::check_hub_addresses) {
            quic.error("advertise", e);
        }
        http.check("workers", (1..=64).contains(&config.http.workers), "must be between 1 and 64");
        if let Some((cert, key)) = &config.http.tls
            && let Err(e) = crate::web::tls::load(cert, key)
        {
            http.error("tls_cert", e);
        }
        http.check("failed_auth_burst", (1..=100_000).contains(&config.http.failed_auth.burst), "must be 1 to 100000");
        http.check(
            "failed_auth_window",
            (Duration::from_secs(1)..=Duration::from_secs(86400)).contains(&config.http.failed_auth.window),
            "must be between 1s and 1d",
        );
        fleet.check("heartbeat_timeout", !config.heartbeat_timeout.is_zero(), "must be more than zero");
        fleet.check("device_records_per_sec", config.device_rate.records_per_sec >= 100, "must be at least 100");
        fleet.check("device_bytes_per_sec", config.device_rate.bytes_per_sec >= 64 << 10, "must be at least 64 KiB");
        let turns = format!("must be between 1 and {} (the hub's turns)", crate::transport::bulk::MAX_REQUESTS);
        fleet.check(
            "device_bulk_turns",
            (1..=crate::transport::bulk::MAX_REQUESTS).contains(&config.device_bulk.turns),
            &turns,
        );
        fleet.check(
            "device_bulk_connections",
            (1..=64).contains(&config.device_bulk.connections),
            "must be between 1 and 64",
        );
        telemetry.check("retention", config.telemetry_retention >= Duration::from_secs(60), "must be at least 1m");
        if let Some(m) = &config.mqtt {
            mqtt.check("keep_alive", m.keep_alive >= Duration::from_secs(1), "must be at least 1s");
            mqtt.check("shared_group", !m.shared_group.contains(['/', '+', '#']), "must not contain '/', '+' or '#'");
            mqtt.check("password", m.password.is_none() || m.username.is_some(), "needs username");
        }
        audit.check("retention", config.audit_retention >= Duration::from_secs(86400), "must be at least 1d");
        for s in [quic, http, fleet, telemetry, audit, mqtt, backups, store, alerts] {
            s.finish();
        }
        config
    }

    fn check_environment(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let dir = &self.data_dir;
        let needed: &[&str] = match self.store {
            StoreConfig::Sled => &["ca.crt", "ca.key", "enroll.key", "db"],
            StoreConfig::Postgres { .. } => &["ca.crt", "ca.key", "enroll.key"],
        };
        let missing: Vec<&str> = needed.iter().copied().filter(|name| !dir.join(name).exists()).collect();
        if !missing.is_empty() {
            errors.push(ConfigError {
                path: "data_dir".into(),
                message: format!(
                    "{} is not an initialised hub data dir (no {}); run `outpost-hub init --data-dir {}` once",
                    dir.display(),
                    missing.join(", "),
                    dir.display()
                ),
            });
        }
        for secret in ["ca.key", "ca-previous.key", "enroll.key", "quic-reset.key"] {
            if let Err(message) = outpost_shared::fsutil::check_private(&dir.join(secret)) {
                errors.push(ConfigError { path: "data_dir".into(), message });
            }
        }
        errors
    }
}

/// Reads a socket address, recording a parse failure against `key`.
fn socket_addr(section: &Section<'_>, key: &str, default: &str) -> SocketAddr {
    let text: String = section.get_or(key, default.to_owned());
    text.parse().unwrap_or_else(|_| {
        section.error(key, format!("invalid socket address {text:?}; write e.g. \"0.0.0.0:7443\""));
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn alert_rules_and_receivers_are_read_and_every_problem_listed() {
        let good = "data_dir = \"/x\"\n[alerts]\ngroup_wait = \"10s\"\n\
                    [[alerts.receiver]]\nname = \"ops\"\nurl = \"https://chat.example/hook\"\nformat = \"slack\"\n\
                    [[alerts.rule]]\nname = \"Offline\"\ncondition = \"offline\"\nthreshold = \"10m\"\n\
                    selector = \"site=berlin\"\nfor = \"1m\"\n";
        let a = HubConfig::parse(Path::new("hub.toml"), good).unwrap().alerts;
        assert_eq!(a.timing.group_wait, Duration::from_secs(10));
        assert_eq!(a.receivers[0].format, crate::service::alerts::Format::Slack);
        let rule = &a.rules[0];
        assert_eq!(rule.condition, crate::service::alerts::Condition::Offline(Duration::from_secs(600)));
        assert_eq!((rule.hold, rule.severity.as_str()), (Duration::from_secs(60), "warning"));
        assert!(HubConfig::parse(Path::new("hub.toml"), "data_dir = \"/x\"\n").unwrap().alerts.rules.is_empty());
        let bad = "data_dir = \"/x\"\n[alerts]\nrepeat_interval = \"1s\"\n\
                   [[alerts.receiver]]\nname = \"ops\"\nurl = \"ftp://x\"\nformat = \"email\"\n\
                   [[alerts.rule]]\nname = \"a b\"\ncondition = \"offline\"\n\
                   [[alerts.rule]]\nname = \"X\"\ncondition = \"gone\"\nselector = \"\"\nthreshhold = \"1\"\n";
        let err = HubConfig::parse(Path::new("hub.toml"), bad).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "alerts.repeat_interval",
            "alerts.rule[a b].name",
            "alerts.rule[a b].condition",
            "alerts.rule[X].condition",
            "alerts.rule[X].selector",
            "alerts.rule[X].threshhold",
            "alerts.receiver[ops].format",
            "alerts.receiver[ops].url",
        ] {
            assert!(paths.iter().any(|p| p.starts_with(want)), "{want} missing: {err}");
        }
    }

    #[test]
    fn mqtt_bridge_settings_are_read_and_checked() {
        let c = HubConfig::parse(Path::new("hub.toml"), "data_dir = \"/x\"\n").unwrap();
        assert!(c.mqtt.is_none(), "the bridge must be off by default");
        let text = "data_dir = \"/x\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1\"\nshared_group = \"\"\n";
        let m = HubConfig::parse(Path::new("hub.toml"), text).unwrap().mqtt.unwrap();
        assert_eq!((m.broker.tls, m.broker.port, m.shared_group.as_str()), (false, 1883, ""));
        let text = "data_dir = \"/x\"\n[mqtt]\nshared_group = \"a/b\"\npassword = \"p\"\nkeep_alive = \"0s\"\n";
        let err = HubConfig::parse(Path::new("hub.toml"), text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["mqtt.broker", "mqtt.keep_alive", "mqtt.shared_group", "mqtt.password"], "{err}");
    }

    #[test]
    fn every_error_is_listed() {
        let text = "[quic]\nlisten = \"nowhere\"\nidle_timeout = \"soon\"\n[http]\nworkers = 0\n[extra]\n";
        let err = HubConfig::parse(Path::new("hub.toml"), text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["data_dir", "quic.listen", "quic.idle_timeout", "http.workers", "extra"], "{err}");
    }
}
