//! The demo is the first thing a newcomer runs: it must work unattended.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::process::Command;

#[test]
fn demo_brings_three_agents_online_and_exits_zero() {
    let out = Command::new(outpost_tests::bin("outpost-demo")).args(["--agents", "3", "--for", "6s"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Summary: 3 of 3 agents came online."), "{stdout}");
    assert!(stdout.contains("API:   http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("Console: http://127.0.0.1:") && stdout.contains("/console/sign-in?link=opt_"), "{stdout}");
    let runs: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Jobs: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no job summary:\n{stdout}"));
    assert!(runs >= 3, "scheduled jobs did not run on every agent:\n{stdout}");
    let online_rows = stdout.lines().filter(|l| l.starts_with("dev-") && l.contains(" online ")).count();
    assert!(online_rows >= 3, "no table with the agents online:\n{stdout}");
}
