//! `outpost-fleetgen`: writes a large fleet straight into a hub's store
//! (sled data dir or PostgreSQL), for the console and API benchmarks:
//! devices enrolled through the store's own `enroll`, labels, and two
//! ingested batches each (a telemetry sample, and for some devices an alarm
//! or a failed job run), so every digest is filled as a real hub fills it.
//! The hub must not be running on a sled data dir while this writes.

use clap::Parser;
use outpost_hub::store::{DeviceRecord, Labels, Store, StoreConfig};
use outpost_shared::Fingerprint;
use outpost_shared::job::{JobRun, RunOutcome, Trigger};
use outpost_shared::protocol::{Alarm, AlarmKind, Record, RecordBody};
use outpost_shared::telemetry::{DiskSample, NetSample, Sample};
use outpost_shared::time::Timestamp;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
struct Cli {
    /// The hub's data dir (sled's files are under it).
    #[arg(long)]
    data_dir: PathBuf,
    /// A PostgreSQL connection string instead of sled.
    #[arg(long)]
    postgres: Option<String>,
    /// Devices to make.
    #[arg(long, default_value_t = 10_000)]
    devices: u32,
}

fn sample(at: u64, i: u32) -> Sample {
    Sample {
        at: Timestamp(at),
        cpu_percent: (i % 100) as f32,
        mem_used_bytes: 1 << 30,
        mem_total_bytes: 4 << 30,
        swap_used_bytes: 0,
        load: [0.5, 0.4, 0.3],
        uptime_secs: 3600,
        disks: vec![DiskSample { mount: "/".into(), used_bytes: 10 << 30, total_bytes: 32 << 30 }],
        net: vec![NetSample { iface: "eth0".into(), rx_bytes: u64::from(i) << 20, tx_bytes: u64::from(i) << 18 }],
        temperatures: Vec::new(),
    }
}

async fn generate(cli: Cli) -> anyhow::Result<()> {
    let config = match &cli.postgres {
        Some(url) => StoreConfig::Postgres { url: url.clone(), pool_size: 8, listen: false },
        None => StoreConfig::Sled,
    };
    let store = Store::open(&config, &cli.data_dir).await?;
    let now = Timestamp::now().0;
    let versions = ["0.9.3", "0.10.0", "0.10.1"];
    let started = std::time::Instant::now();
    for i in 0..cli.devices {
        let id = format!("dev-{:016x}", 0x5eed_0000_0000_u64 + u64::from(i));
        let record = DeviceRecord {
            id: id.parse()?,
            name: format!("edge-{i:05}"),
            enrolled_at: Timestamp(now - 86_400_000),
            cert_fingerprint: Fingerprint([7; 32]),
            agent_version: Some(versions[(i % 3) as usize].into()),
            last_seen: Some(Timestamp(now - u64::from(i % 600) * 1000)),
            last_addr: Some(format!("10.{}.{}.{}:4433", i >> 16, (i >> 8) & 255, i & 255)),
            last_sample: Some(sample(now - 10_000, i)),
        };
        let mut token = [0u8; 16];
        token[..4].copy_from_slice(&(i / 1000).to_be_bytes());
        store.enroll(&token, 1000, &record, b"key").await?;
        let env = ["prod", "staging", "dev"][(i % 10).min(2) as usize];
        let labels: Labels =
            [("env".to_owned(), env.to_owned()), ("site".to_owned(), format!("site-{:02}", i % 40))].into();
        store.set_labels(&record.id, &labels).await?;
        let mut records =
            vec![Record { seq: 1, at: Timestamp(now - 10_000), body: RecordBody::Telemetry(sample(now - 10_000, i)) }];
        if i % 33 == 0 {
            let alarm = Alarm { kind: AlarmKind::OutboxFull, raised: true, message: "outbox over budget".into() };
            records.push(Record { seq: 2, at: Timestamp(now - 5000), body: RecordBody::Alarm(alarm) });
        } else if i % 20 == 0 {
            let run = JobRun {
                run_id: 1,
                job: "report".into(),
                trigger: Trigger::Schedule,
                attempt: 1,
                started: Timestamp(now - 6000),
                ended: Timestamp(now - 5000),
                outcome: RunOutcome::Exited { code: 1 },
                output: "failed".into(),
                output_bytes: 6,
            };
            records.push(Record { seq: 2, at: Timestamp(now - 5000), body: RecordBody::JobRun(run) });
        }
        store.ingest(&record.id, &records).await?;
        if (i + 1) % 2000 == 0 {
            eprintln!("{} devices in {:.1} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    store.close().await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost-fleetgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(generate(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-fleetgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
