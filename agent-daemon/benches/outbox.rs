//! Outbox durable appends per second: one record per commit (sequential, and
//! 64 producers at once, which group commit serves with shared fsyncs) and
//! 100 records per commit; next to the disk's own ceiling, a plain file
//! append + fdatasync loop in the same directory, measured in the same run.
//!
//!   cargo bench -p outpost-agent --bench outbox [-- DIR]
//!
//! DIR defaults to a temporary directory under /tmp.

use outpost_agent::store::AgentStore;
use outpost_agent::telemetry::Sampler;
use outpost_shared::protocol::RecordBody;
use std::io::Write;
use std::time::{Duration, Instant};

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let base = std::env::args().nth(1).filter(|a| !a.starts_with('-')).map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let sample = Sampler::new().unwrap_or_else(|e| panic!("sysinfo: {e}")).sample();
    let record = RecordBody::Telemetry(sample);
    let size = postcard::to_stdvec(&record).map(|v| v.len()).unwrap_or(0);
    println!("record: one real telemetry sample of this machine, {size} bytes encoded");
    println!("directory: {}", dir.path().display());

    // The disk's ceiling: append the same bytes to a file, fdatasync each.
    let path = dir.path().join("raw");
    let mut file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
    let bytes = vec![7u8; size];
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        file.write_all(&bytes).unwrap_or_else(|e| panic!("{e}"));
        file.sync_data().unwrap_or_else(|e| panic!("{e}"));
    }
    println!("| plain file append + fdatasync (reference) | 1 | {:.0} |", rate(n, t.elapsed()));

    let store = AgentStore::open(dir.path(), 8 << 30, 64 << 20).unwrap_or_else(|e| panic!("{e}"));

    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        store.append(vec![record.clone()]).await.unwrap_or_else(|e| panic!("{e}"));
    }
    println!("| outbox, 1 record per commit, one producer | 1 | {:.0} |", rate(n, t.elapsed()));

    let producers = 64;
    let per = 200;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..producers {
        let (store, record) = (store.clone(), record.clone());
        tasks.spawn(async move {
            for _ in 0..per {
                store.append(vec![record.clone()]).await.unwrap_or_else(|e| panic!("{e}"));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "| outbox, 1 record per commit, {producers} producers at once | 1 | {:.0} |",
        rate(producers * per, t.elapsed())
    );

    let batch = 100;
    let commits = 1000;
    let t = Instant::now();
    for _ in 0..commits {
        store.append(vec![record.clone(); batch]).await.unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "| outbox, {batch} records per commit, one producer | {batch} | {:.0} |",
        rate(commits * batch as u64, t.elapsed())
    );
}
