//! The annotated reference config parses and validates, so it never rots.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use outpost_agent::config::AgentConfig;
use outpost_shared::config::ConfigFile;
use std::path::Path;
use std::time::Duration;

#[test]
fn configs_agent_toml_is_valid_and_documents_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
    let config = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let defaults = AgentConfig::with_data_dir(config.data_dir.clone());
    assert_eq!(config.uplink.heartbeat, defaults.uplink.heartbeat);
    assert_eq!(config.uplink.backoff_max, defaults.uplink.backoff_max);
    assert_eq!(config.uplink.max_frame, defaults.uplink.max_frame);
    assert_eq!(config.telemetry.interval, defaults.telemetry.interval);
    assert_eq!(config.store.outbox_budget, defaults.store.outbox_budget);
    assert_eq!(config.store.cache, defaults.store.cache);
    assert_eq!(config.commands.allow_exec, defaults.commands.allow_exec);
    assert_eq!(config.commands.timeout, defaults.commands.timeout);
    assert_eq!(config.commands.max_output, defaults.commands.max_output);
    assert_eq!(config.uplink.idle_timeout, Duration::from_secs(30));
}

/// The reference file's commented-out `[uplink.mqtt]` example, switched on.
#[test]
fn the_mqtt_example_in_configs_agent_toml_is_valid() {
    use outpost_agent::config::Transport;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
    let text = outpost_shared::config::uncomment_block(&std::fs::read_to_string(&path).unwrap(), "[uplink.mqtt]")
        .replace("transport = \"quic\"", "transport = \"mqtt\"");
    let config = AgentConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let Transport::Mqtt(mqtt) = config.uplink.transport else { panic!("the example does not select MQTT") };
    assert_eq!(mqtt.broker.to_string(), "mqtts://broker.example.com:8883");
    assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
}

/// The reference file's commented-out backup example, switched on.
#[test]
fn the_backup_example_in_configs_agent_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = outpost_shared::config::uncomment_block(&text, "[backups]");
    let text = outpost_shared::config::uncomment_block(&text, "[[backup]]");
    let config = AgentConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.backups.len(), 1);
    let set = &config.backups[0];
    assert_eq!((set.name.as_str(), set.paths.len(), set.retention.daily), ("data", 2, 7));
    assert!(set.exclude_matcher().is_match("/srv/data/cache/x/y"));
    assert_eq!(config.backup_repo.key_file.as_deref(), Some(Path::new("/etc/outpost/backup.key")));
    assert_eq!(config.backup_repo.upload_rate, 256 << 10);
}

/// The reference file's commented-out `[metrics]` example, switched on.
#[test]
fn the_metrics_example_in_configs_agent_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
    let text = outpost_shared::config::uncomment_block(&std::fs::read_to_string(&path).unwrap(), "[metrics]");
    let config = AgentConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.metrics.listen, Some(([127, 0, 0, 1], 9465).into()));
    let plain = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plain.metrics.listen, None, "metrics are off unless switched on");
}
