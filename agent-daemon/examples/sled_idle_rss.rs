//! Measures what sled alone costs an idle process: opens a store the way the
//! agent does (or not at all with `none`), idles 20 s, prints VmRSS and the
//! thread count.
//!
//!   cargo run --release -p outpost-agent --example sled_idle_rss -- [none|agent|lowspace]

fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "agent".into());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let _db = match mode.as_str() {
        "none" => None,
        "agent" => Some(sled::Config::new().path(dir.path().join("db")).cache_capacity(4 << 20).open()),
        _ => Some(
            sled::Config::new()
                .path(dir.path().join("db"))
                .cache_capacity(256 << 10)
                .mode(sled::Mode::LowSpace)
                .flush_every_ms(None)
                .open(),
        ),
    };
    std::thread::sleep(std::time::Duration::from_secs(20));
    println!("| sled {mode} | {} | {} threads |", status("VmRSS:"), status("Threads:"));
}
