//! What an embedded store costs the agent's outbox pattern, sled against
//! redb, each in a process of its own:
//!
//!   cargo run --release --manifest-path tests/store-probe/Cargo.toml -- sled|redb [DIR]
//!
//! In a fresh directory under DIR (default: the system's temporary
//! directory): 2,000 durable commits of 100 records of 94 bytes (the size
//! of an encoded telemetry sample) under increasing 8-byte keys, as the
//! agent's outbox appends; then all of them read back in order and removed
//! in commits of 2,000 (what acknowledged batches do); then 20 s idle.
//! Prints one Markdown row: durable appends a second, the drain's time, the
//! files' size after the appends, resident memory, threads and wake-ups a
//! second while idle (context switches of all threads).
//! sled is opened as the agent opens it (4 MiB cache, flush every 10 s);
//! redb with its defaults (every commit durable).

use std::path::Path;
use std::time::{Duration, Instant};

const COMMITS: u64 = 2_000;
const PER_COMMIT: u64 = 100;
const RECORD: usize = 94;
const DRAIN_BATCH: u64 = 2_000;
const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("outbox");

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[path = "../../../agent-daemon/examples/common/proc.rs"]
mod proc_counters;
use proc_counters::{status, switches};

fn size_of(path: &Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => size_of(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// The outbox pattern on one engine.
trait Outbox {
    fn append(&mut self, first: u64, records: &[Vec<u8>]) -> Result<()>;
    /// Reads the `n` oldest records and removes them in one commit;
    /// returns how many there were.
    fn take(&mut self, n: u64) -> Result<u64>;
}

struct Sled(sled::Db);

impl Outbox for Sled {
    fn append(&mut self, first: u64, records: &[Vec<u8>]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (i, r) in records.iter().enumerate() {
            batch.insert(&(first + i as u64).to_be_bytes(), r.as_slice());
        }
        self.0.apply_batch(batch)?;
        self.0.flush()?;
        Ok(())
    }

    fn take(&mut self, n: u64) -> Result<u64> {
        let mut batch = sled::Batch::default();
        let mut taken = 0;
        for item in self.0.iter().take(n as usize) {
            let (key, value) = item?;
            std::hint::black_box(value);
            batch.remove(key);
            taken += 1;
        }
        self.0.apply_batch(batch)?;
        self.0.flush()?;
        Ok(taken)
    }
}

struct Redb(redb::Database);

impl Outbox for Redb {
    fn append(&mut self, first: u64, records: &[Vec<u8>]) -> Result<()> {
        let txn = self.0.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for (i, r) in records.iter().enumerate() {
                table.insert(first + i as u64, r.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn take(&mut self, n: u64) -> Result<u64> {
        use redb::ReadableTable;
        let txn = self.0.begin_write()?;
        let taken;
        {
            let mut table = txn.open_table(TABLE)?;
            let keys: Vec<u64> = table
                .iter()?
                .take(n as usize)
                .map(|item| {
                    item.map(|(k, v)| {
                        std::hint::black_box(v.value());
                        k.value()
                    })
                })
                .collect::<std::result::Result<_, _>>()?;
            taken = keys.len() as u64;
            for k in keys {
                table.remove(k)?;
            }
        }
        txn.commit()?;
        Ok(taken)
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let engine = args.next().unwrap_or_else(|| "sled".into());
    let parent = args.next().map_or_else(std::env::temp_dir, Into::into);
    let dir = parent.join(format!("store-probe-{engine}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut store: Box<dyn Outbox> = match engine.as_str() {
        "sled" => Box::new(Sled(
            sled::Config::new().path(dir.join("db")).cache_capacity(4 << 20).flush_every_ms(Some(10_000)).open()?,
        )),
        "redb" => Box::new(Redb(redb::Database::create(dir.join("outbox.redb"))?)),
        other => return Err(format!("unknown engine {other}: sled or redb").into()),
    };
    let records: Vec<Vec<u8>> = (0..PER_COMMIT).map(|i| vec![(i % 251) as u8; RECORD]).collect();
    let started = Instant::now();
    for c in 0..COMMITS {
        store.append(1 + c * PER_COMMIT, &records)?;
    }
    let appends = (COMMITS * PER_COMMIT) as f64 / started.elapsed().as_secs_f64();
    let size = size_of(&dir);
    let started = Instant::now();
    let mut left = COMMITS * PER_COMMIT;
    while left > 0 {
        let taken = store.take(DRAIN_BATCH)?;
        if taken == 0 {
            return Err(format!("{left} records missing").into());
        }
        left -= taken;
    }
    let drain = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let before = switches();
    std::thread::sleep(Duration::from_secs(20));
    let wakes = (switches() - before) as f64 / 20.0;
    println!(
        "| {engine} | {appends:.0} records/s | {:.1} s | {:.1} MiB | {} | {} | {wakes:.1} |",
        drain.as_secs_f64(),
        size as f64 / (1 << 20) as f64,
        status("VmRSS:"),
        status("Threads:"),
    );
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
