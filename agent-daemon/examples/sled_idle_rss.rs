//! Measures what a dependency alone costs an idle process: opens a store the
//! way the agent does (or not at all with `none`), or starts
//! tokio-cron-scheduler with one daily job (`cron`); idles 20 s, prints
//! VmRSS, the thread count and the wake-ups a second (context switches of all
//! threads over the idle time).
//!
//!   cargo run --release -p outpost-agent --example sled_idle_rss -- [none|agent|written|lowspace|cron]
//!
//! `written` is `agent` after one flushed write: sled starts its I/O thread
//! pool on the first write, as it does in the agent.

use std::time::Duration;

#[path = "common/proc.rs"]
mod proc_counters;
use proc_counters::{status, switches};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "agent".into());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let agent = || sled::Config::new().path(dir.path().join("db")).cache_capacity(4 << 20).flush_every_ms(Some(10_000));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _held: Box<dyn std::any::Any> = match mode.as_str() {
        "none" => Box::new(()),
        "agent" => Box::new(agent().open()),
        "written" => {
            let db = agent().open().unwrap_or_else(|e| panic!("{e}"));
            db.insert(b"k", b"v".as_slice()).unwrap_or_else(|e| panic!("{e}"));
            db.flush().unwrap_or_else(|e| panic!("{e}"));
            Box::new(db)
        }
        "cron" => Box::new(runtime.block_on(async {
            use tokio_cron_scheduler::{Job, JobScheduler};
            let cron = JobScheduler::new().await.unwrap_or_else(|e| panic!("{e:?}"));
            let job = Job::new("0 17 3 * * *", |_, _| {}).unwrap_or_else(|e| panic!("{e:?}"));
            cron.add(job).await.unwrap_or_else(|e| panic!("{e:?}"));
            cron.start().await.unwrap_or_else(|e| panic!("{e:?}"));
            cron
        })),
        _ => Box::new(
            sled::Config::new()
                .path(dir.path().join("db"))
                .cache_capacity(256 << 10)
                .mode(sled::Mode::LowSpace)
                .flush_every_ms(None)
                .open(),
        ),
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = switches();
    std::thread::sleep(Duration::from_secs(20));
    let wakes = (switches() - before) as f64 / 20.0;
    println!("| {mode} | {} | {} threads | {wakes:.1} wake-ups/s |", status("VmRSS:"), status("Threads:"));
}
