//! How the agent's store uses a small disk: appends real-sized telemetry
//! samples (this machine's, as the telemetry actor takes them) in groups of
//! 100 to an `AgentStore` in DIR, with the given outbox budget and free-space
//! floor, and prints what the outbox holds beside what the file system has
//! used, every 250 groups. Run it on a small tmpfs to see the floor at work:
//!
//! ```text
//! mkdir -p /tmp/small && mount -t tmpfs -o size=16m tmpfs /tmp/small
//! cargo run --release -p outpost-agent --example store_small_disk -- /tmp/small 64000000 67108864 5000
//! umount /tmp/small
//! ```
//!
//! Arguments: DIR BUDGET KEEP_FREE GROUPS (bytes, bytes, count).

use outpost_agent::store::AgentStore;
use outpost_shared::protocol::RecordBody;
use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use std::error::Error;

fn arg(args: &[String], i: usize, what: &str) -> Result<u64, Box<dyn Error>> {
    let text = args.get(i).ok_or_else(|| format!("missing {what}"))?;
    Ok(text.parse().map_err(|e| format!("{what} {text:?}: {e}"))?)
}

fn used(dir: &std::path::Path) -> Result<u64, Box<dyn Error>> {
    let vfs = rustix::fs::statvfs(dir)?;
    Ok((vfs.f_blocks - vfs.f_bavail) * vfs.f_frsize)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: DIR BUDGET KEEP_FREE GROUPS")?);
    let (budget, keep_free, groups) = (arg(&args, 2, "BUDGET")?, arg(&args, 3, "KEEP_FREE")?, arg(&args, 4, "GROUPS")?);
    let store = AgentStore::open(&dir, budget, 4 << 20)?;
    store.set_keep_free(keep_free);
    let template = outpost_agent::telemetry::Sampler::new()?.sample();
    let (mut max_used, mut failures) = (0u64, 0u64);
    for group in 0..groups {
        let records = (0..100)
            .map(|i| RecordBody::Telemetry(Sample { at: Timestamp(group * 100 + i), ..template.clone() }))
            .collect();
        if let Err(e) = store.append(records).await {
            failures += 1;
            println!("group {group}: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        max_used = max_used.max(used(&dir)?);
        if group % 250 == 0 || group + 1 == groups {
            let s = store.stats();
            let cap = s.space_cap.map_or("none".to_owned(), |c| c.bytes.to_string());
            println!(
                "group {group}: outbox {} records, {} bytes; cap {cap}; file system used {}",
                s.records,
                s.bytes,
                used(&dir)?
            );
        }
    }
    println!("most used {max_used} bytes; failed appends {failures}");
    Ok(())
}
