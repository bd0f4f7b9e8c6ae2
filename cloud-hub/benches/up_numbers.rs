//! What the fleet's replay window costs per MQTT message: how many numbers
//! `Store::take_up_number` takes a second, and how long one take waits,
//! with T tasks at once, each standing for one device sending messages in
//! one session (as the hubs' device tasks do), on sled or PostgreSQL.
//!
//!   cargo bench -p outpost-hub --bench up_numbers -- sled [TASKS] [SECONDS]
//!   cargo bench -p outpost-hub --bench up_numbers -- postgres URL [TASKS] [SECONDS]
//!
//! `tests/bench-numbers.sh` runs both, PostgreSQL on a private cluster.

use outpost_hub::store::{Store, StoreConfig};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (config, rest) = match args.first().map(String::as_str) {
        Some("postgres") => {
            let url = args.get(1).unwrap_or_else(|| panic!("postgres needs a URL"));
            (StoreConfig::Postgres { url: url.clone(), pool_size: 16, listen: false }, &args[2..])
        }
        _ => (StoreConfig::Sled, args.get(1..).unwrap_or_default()),
    };
    let tasks: u64 = rest.first().and_then(|a| a.parse().ok()).unwrap_or(64);
    let seconds: u64 = rest.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(async {
        let store = Store::open(&config, dir.path()).await.unwrap_or_else(|e| panic!("store: {e}"));
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut takers = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let store = store.clone();
            takers.spawn(async move {
                let id: DeviceId = format!("dev-{task:06x}").parse().unwrap_or_else(|e| panic!("device id: {e}"));
                let session = rand::random::<u64>();
                let mut waits = Vec::new();
                let mut seq = 0;
                while Instant::now() < until {
                    seq += 1;
                    let started = Instant::now();
                    match store.take_up_number(&id, session, seq, Timestamp::now()).await {
                        Ok(Ok(())) => waits.push(started.elapsed()),
                        Ok(Err(stale)) => panic!("message {seq} of a new session refused: {stale}"),
                        Err(e) => panic!("store: {e}"),
                    }
                }
                waits
            });
        }
        let mut waits: Vec<Duration> = takers.join_all().await.into_iter().flatten().collect();
        waits.sort_unstable();
        let at = |q: f64| waits[((waits.len() as f64 * q) as usize).min(waits.len() - 1)];
        println!(
            "| {} | {tasks} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
            store.backend(),
            waits.len() as f64 / seconds as f64,
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            waits.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        store.close().await.unwrap_or_else(|e| panic!("close: {e}"));
    });
}
