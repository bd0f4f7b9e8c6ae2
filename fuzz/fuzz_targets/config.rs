//! Config files of both daemons: read and validated, every problem reported,
//! never a panic. The first byte picks the agent's or the hub's reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::config::ConfigFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if which & 1 == 0 {
        let _ = outpost_agent::config::AgentConfig::parse(Path::new("agent.toml"), text);
    } else {
        let _ = outpost_hub::config::HubConfig::parse(Path::new("hub.toml"), text);
    }
});
