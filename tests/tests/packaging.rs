//! The systemd units are valid for the binaries we build: each unit is
//! checked by `systemd-analyze verify` with its commands pointed at them.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_units_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(analyze.exists(), "systemd-analyze is missing; the test command installs the systemd package");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let scratch = tempfile::tempdir().unwrap();
    for (unit, binary) in [("outpost-agent.service", "outpost-agent"), ("outpost-hub.service", "outpost-hub")] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(text.contains(&format!("/usr/bin/{binary} validate --config")), "{unit} lacks ExecStartPre validate");
        let built = outpost_tests::bin(binary);
        let local = text.replace(&format!("/usr/bin/{binary}"), &built.display().to_string());
        let path = scratch.path().join(unit);
        std::fs::write(&path, local).unwrap();
        let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Complaints about the build host (missing users, no running systemd) are not the unit's.
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(unit) && !l.contains("Failed to connect to bus") && !l.contains("user"))
            .collect();
        assert!(out.status.success() && problems.is_empty(), "{unit}: {stderr}");
    }
}
