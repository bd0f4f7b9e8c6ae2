//! `outpost-loadgen`: the real agent (store, outbox, uplink, actors) with an
//! extra producer that appends synthetic records as fast as asked. Fault
//! tests kill it at random moments and check that the hub ends with every
//! record exactly once, in order.
//!
//! Record `i` (from 0) is a copy of a real telemetry sample of this machine with `at = base + i` ms (`--base-ms`,
//! so tests can tell these samples from real ones) and `uptime_secs = i`; with `--precious-every K`, every K-th record is
//! instead a command result with id `1_000_000 + i` and `--precious-bytes`
//! of output. The number produced so far is committed in the same
//! transaction as the records, so a restarted loadgen continues exactly
//! where the killed one stopped.

use clap::Parser;
use outpost_agent::config::AgentConfig;
use outpost_agent::store::{AgentStore, Changes};
use outpost_shared::config::ConfigFile;
use outpost_shared::protocol::{CommandResult, Outcome, RecordBody};
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const PRODUCED: &str = "loadgen.produced";

#[derive(Parser, Clone)]
struct Cli {
    /// Agent config file.
    #[arg(long)]
    config: PathBuf,
    /// Sample time of record 0, ms since the epoch.
    #[arg(long)]
    base_ms: u64,
    /// Records to produce in all (across restarts).
    #[arg(long)]
    records: u64,
    /// Records per durable append.
    #[arg(long, default_value_t = 50)]
    batch: u64,
    /// Appends per second (0: as fast as the store allows).
    #[arg(long, default_value_t = 0)]
    appends_per_sec: u64,
    /// Every K-th record is a precious command result (0: none).
    #[arg(long, default_value_t = 0)]
    precious_every: u64,
    /// Output bytes of each precious record.
    #[arg(long, default_value_t = 16)]
    precious_bytes: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match AgentConfig::load_or_exit(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    outpost_shared::logging::init(&config.log);
    let producer = cli.clone();
    let result = outpost_agent::run_with(config, outpost_shared::logging::wait_for_signal(), move |store| {
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = produce(&store, &producer).await {
                tracing::error!(error = %e, "Load generator failed.");
            }
        });
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn record(i: u64, cli: &Cli, template: &Sample) -> RecordBody {
    if cli.precious_every > 0 && i % cli.precious_every == cli.precious_every - 1 {
        return RecordBody::CommandResult(CommandResult {
            id: 1_000_000 + i,
            outcome: Outcome::Succeeded,
            output: "p".repeat(cli.precious_bytes),
        });
    }
    RecordBody::Telemetry(Sample { at: Timestamp(cli.base_ms + i), uptime_secs: i, ..template.clone() })
}

async fn produce(store: &AgentStore, cli: &Cli) -> Result<(), outpost_agent::store::StoreError> {
    let mut produced = produced_so_far(store).await;
    tracing::info!(produced, total = cli.records, "Load generator resuming.");
    // Real-sized samples: this machine's own, renumbered.
    let template = outpost_agent::telemetry::Sampler::new()
        .map(|mut s| s.sample())
        .map_err(|e| outpost_agent::store::StoreError::Sled(sled_io(e.to_string())))?;
    let pause = (cli.appends_per_sec > 0).then(|| Duration::from_secs_f64(1.0 / cli.appends_per_sec as f64));
    while produced < cli.records {
        let end = (produced + cli.batch).min(cli.records);
        let records = (produced..end).map(|i| record(i, cli, &template)).collect();
        let kv = vec![(PRODUCED.to_owned(), end.to_be_bytes().to_vec())];
        match store.commit(Changes { records, kv, ..Changes::default() }).await {
            Ok(_) => produced = end,
            Err(e) => {
                // As a real producer does: the store refuses while it cannot
                // write (a full disk) and comes back by itself. Whether the
                // failed append reached the disk is in the store: the count
                // is committed with the records.
                tracing::debug!(error = %e, "Load generator append failed; retrying.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                produced = produced_so_far(store).await;
                continue;
            }
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    tracing::info!(produced, "Load generator done.");
    Ok(())
}

/// The number of records produced so far, as stored; waits while the store
/// cannot be read.
async fn produced_so_far(store: &AgentStore) -> u64 {
    loop {
        match store.get(PRODUCED) {
            Ok(bytes) => return bytes.and_then(|b| b.try_into().ok().map(u64::from_be_bytes)).unwrap_or(0),
            Err(e) => tracing::debug!(error = %e, "Load generator cannot read its count yet."),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sled_io(message: String) -> sled::Error {
    sled::Error::Io(std::io::Error::other(message))
}
