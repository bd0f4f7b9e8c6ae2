//! The annotated reference config parses and validates, so it never rots.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_hub::config::HubConfig;
use outpost_shared::config::ConfigFile;
use std::path::Path;
use std::time::Duration;

#[test]
fn configs_hub_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/hub.toml");
    let config = HubConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.quic.listen.port(), 7443);
    assert_eq!(config.http.listen.port(), 8080);
    assert_eq!(config.heartbeat_timeout, Duration::from_secs(15));
    assert_eq!(config.device_rate, outpost_hub::service::pace::DeviceRate::default());
    assert_eq!(config.http.failed_auth, outpost_hub::service::throttle::AuthLimit::default());
    assert_eq!(config.quic.max_frame, 1 << 20);
    assert_eq!((config.backups.retention.daily, config.backups.retention.weekly), (7, 4));
    // What the file says is what a hub without it does.
    assert_eq!(config.quic.door, outpost_hub::transport::door::DoorLimits::default());
    assert_eq!(config.backups.room, outpost_hub::service::backups::Room::default());
}

/// The reference file's commented-out `[mqtt]` example, switched on.
#[test]
fn the_mqtt_example_in_configs_hub_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/hub.toml");
    let text = outpost_shared::config::uncomment_block(&std::fs::read_to_string(&path).unwrap(), "[mqtt]");
    let config = HubConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let mqtt = config.mqtt.expect("the example does not switch the bridge on");
    // The hubs' listener of configs/mosquitto.conf: certificate and password.
    assert_eq!(mqtt.broker.to_string(), "mqtts://broker.example.com:8884");
    assert_eq!((mqtt.username.as_deref(), mqtt.password.as_deref()), (Some("hub.outpost"), Some("...")));
    assert_eq!((mqtt.shared_group.as_str(), mqtt.keep_alive), ("outpost-hub", Duration::from_secs(30)));
    assert!(!mqtt.legacy_agents, "agents without freshness are refused unless the operator says otherwise");
}

/// The reference file's commented-out `[alerts]` example, switched on.
#[test]
fn the_alerts_example_in_configs_hub_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/hub.toml");
    let text = outpost_shared::config::uncomment_block(&std::fs::read_to_string(&path).unwrap(), "[alerts]");
    let config = HubConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let alerts = config.alerts;
    assert_eq!(alerts.timing, outpost_hub::service::alerts::Timing::default());
    assert_eq!((alerts.rules.len(), alerts.receivers.len()), (1, 1));
    assert_eq!(alerts.rules[0].condition, outpost_hub::service::alerts::Condition::Offline(Duration::from_secs(600)));
    assert_eq!(alerts.receivers[0].format, outpost_hub::service::alerts::Format::Alertmanager);
}
