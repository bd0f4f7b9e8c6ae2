//! A LAN of network namespaces for tests with real multicast: `n`
//! namespaces, each with one veth into a bridge in the root namespace. The
//! bridge has the addresses `.254` of the LAN's /24, where a hub can
//! listen, and `.253`; namespace `i` has `.i+1`. Everything is deleted on drop, also when the
//! test fails. Needs root (`ip netns`, `ip link`).

use anyhow::{Context, Result, bail};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The namespaces, the bridge, and their addresses.
#[derive(Debug)]
pub struct Lan {
    prefix: String,
    subnet: String,
    namespaces: Vec<String>,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Fails with a clear message unless the tests run as root.
pub fn require_root() {
    assert!(
        crate::is_root(),
        "this test needs root: it creates network namespaces and veth pairs (run tests/run.sh as root)"
    );
}

impl Lan {
    /// Creates `n` namespaces joined by a bridge.
    pub fn new(n: usize) -> Result<Self> {
        require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = (std::process::id() * 7 + k) % 200;
        let prefix = format!("op{}x{k}", std::process::id() % 100_000);
        let lan = Lan {
            subnet: format!("10.77.{}", tag + 20),
            bridge: format!("{prefix}br"),
            namespaces: (0..n).map(|i| format!("{prefix}n{i}")).collect(),
            prefix,
        };
        lan.build().inspect_err(|_| lan.teardown())?;
        Ok(lan)
    }

    fn build(&self) -> Result<()> {
        let br = self.bridge.as_str();
        ip(&["link", "add", br, "type", "bridge"])?;
        // Multicast snooping would hold mDNS back until someone sends IGMP
        // reports; a plain hub-like bridge floods it.
        let _ = std::fs::write(format!("/sys/class/net/{br}/bridge/multicast_snooping"), "0");
        ip(&["addr", "add", &format!("{}/24", self.hub_ip()), "dev", br])?;
        ip(&["addr", "add", &format!("{}/24", self.root_ip()), "dev", br])?;
        ip(&["link", "set", br, "up"])?;
        for (i, ns) in self.namespaces.iter().enumerate() {
            let (outer, inner) = (format!("{}v{i}", self.prefix), format!("{}p{i}", self.prefix));
            ip(&["netns", "add", ns])?;
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", ns])?;
            ip(&["link", "set", &outer, "master", br, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}.{}/24", self.subnet, i + 1), "dev", &inner])?;
            ip(&["-n", ns, "link", "set", &inner, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn teardown(&self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }

    /// The bridge's address in the root namespace (where the hub listens).
    pub fn hub_ip(&self) -> String {
        format!("{}.254", self.subnet)
    }

    /// A second address of the bridge, not affected by [`Lan::cut`] (for a
    /// fake peer run by the test itself).
    pub fn root_ip(&self) -> String {
        format!("{}.253", self.subnet)
    }

    /// Name of namespace `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Takes away namespace `i`'s route to the hub.
    pub fn cut(&self, i: usize) -> Result<()> {
        ip(&["-n", self.ns(i), "route", "add", "unreachable", &format!("{}/32", self.hub_ip())])
    }

    /// Gives namespace `i` its route to the hub back.
    pub fn restore(&self, i: usize) -> Result<()> {
        ip(&["-n", self.ns(i), "route", "del", "unreachable", &format!("{}/32", self.hub_ip())])
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.teardown();
    }
}
