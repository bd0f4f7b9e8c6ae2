//! Browses `_outpost._udp.local.` with mdns-sd and does nothing else with
//! what it hears but count it: the cost of mdns-sd's own state under a
//! flood of announcements, beside the agent's (tests/tests/peers.rs).
//!
//!   outpost-mdns-browse      (runs until killed; prints a count each second)

#![allow(clippy::print_stdout)] // Its output is its purpose.

use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    let _ = daemon.disable_interface(vec![mdns_sd::IfKind::LoopbackV4, mdns_sd::IfKind::LoopbackV6]);
    let mut events = daemon.browse(outpost_shared::peers::SERVICE_TYPE)?;
    let mut resolved = 0u64;
    loop {
        match events.recv_timeout(Duration::from_secs(1)) {
            Ok(mdns_sd::ServiceEvent::ServiceResolved(_)) => resolved += 1,
            Ok(_) => {}
            // The queue filled and mdns-sd ended the browse: browse again,
            // as the agent does.
            Err(_) if events.is_disconnected() => events = daemon.browse(outpost_shared::peers::SERVICE_TYPE)?,
            Err(_) => println!("resolved {resolved}"),
        }
    }
}
