//! What a device's certificate renewal costs the hub: the CA's work (CSR
//! signature check, signing, parsing the result) in CPU time per renewal,
//! and the two durable writes that follow (the next key and the audit
//! entry) on sled, sequential and 64 at once (group commit). From these:
//! the share of one core 10,000 devices renewing within one hour take.
//!
//!   cargo bench -p outpost-hub --bench renewal [-- N]
//!
//! N (default 2000) CSRs are made first (device side, not timed).

use outpost_hub::service::ca::FleetCa;
use outpost_hub::store::{AuditEntry, Store};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use rcgen::{CertificateParams, KeyPair};
use std::time::{Duration, Instant};

/// CPU time of this process so far, every thread (the scheduler's own
/// account, in nanoseconds: `/proc/self/schedstat` covers only the main
/// thread, so the threads' are summed).
fn cpu() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap_or_else(|e| panic!("/proc/self/task: {e}"));
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    Duration::from_nanos(ns)
}

fn audit(id: &DeviceId) -> AuditEntry {
    AuditEntry {
        id: 0,
        at: Timestamp::now(),
        who: format!("device {id}"),
        action: "renew certificate".into(),
        target: id.to_string(),
        matched: None,
        from: "127.0.0.1:1".into(),
        status: 200,
        detail: "valid until 2027-12-06T00:00:00Z, key sha256:…".into(),
    }
}

fn main() {
    let n: usize = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let ca = FleetCa::init(dir.path()).unwrap_or_else(|e| panic!("CA: {e}"));
    let csrs: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
            let params = CertificateParams::new(Vec::new()).unwrap_or_else(|e| panic!("params: {e}"));
            params.serialize_request(&key).unwrap_or_else(|e| panic!("CSR: {e}")).der().to_vec()
        })
        .collect();
    let ids: Vec<DeviceId> =
        (0..n).map(|i| format!("dev-{i:016x}").parse().unwrap_or_else(|e| panic!("{e}"))).collect();

    // The CA's part: what `DeviceSession::renew` does before it writes.
    let (cpu0, wall0) = (cpu(), Instant::now());
    let mut keys = Vec::with_capacity(n);
    for (csr, id) in csrs.iter().zip(&ids) {
        let cert = ca.sign_device(csr, id).unwrap_or_else(|e| panic!("sign: {e}"));
        let key = outpost_shared::identity::public_key_of(&cert).unwrap_or_default();
        let _ = outpost_shared::identity::validity_of(&cert);
        keys.push(key);
    }
    let (sign_cpu, sign_wall) = (cpu() - cpu0, wall0.elapsed());
    let per = sign_cpu / n as u32;
    println!(
        "| CA: check CSR, sign, parse | {n} renewals | {:.0} µs CPU each | {:.0} µs wall each |",
        per.as_secs_f64() * 1e6,
        (sign_wall / n as u32).as_secs_f64() * 1e6
    );

    // The store's part, on sled: the next key and the audit entry.
    let store = Store::open_sled(dir.path()).unwrap_or_else(|e| panic!("store: {e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (write_cpu, write_wall, concurrent_wall) = runtime.block_on(async {
        let half = n / 2;
        let (cpu0, wall0) = (cpu(), Instant::now());
        for (id, key) in ids.iter().zip(&keys).take(half) {
            store.put_next_device_key(id, key).await.unwrap_or_else(|e| panic!("write: {e}"));
            store.append_audit(&audit(id)).await.unwrap_or_else(|e| panic!("audit: {e}"));
        }
        let (write_cpu, write_wall) = (cpu() - cpu0, wall0.elapsed());
        let wall1 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in ids.iter().zip(&keys).skip(half).collect::<Vec<_>>().chunks(half.div_ceil(64).max(1)) {
            let (store, chunk): (Store, Vec<(DeviceId, Vec<u8>)>) =
                (store.clone(), chunk.iter().map(|(i, k)| ((*i).clone(), (*k).clone())).collect());
            tasks.spawn(async move {
                for (id, key) in chunk {
                    store.put_next_device_key(&id, &key).await.unwrap_or_else(|e| panic!("write: {e}"));
                    store.append_audit(&audit(&id)).await.unwrap_or_else(|e| panic!("audit: {e}"));
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        (write_cpu / half as u32, write_wall / half as u32, wall1.elapsed() / (n - half) as u32)
    });
    println!(
        "| store: next key + audit entry, sequential | {} renewals | {:.0} µs CPU each | {:.0} µs wall each |",
        n / 2,
        write_cpu.as_secs_f64() * 1e6,
        write_wall.as_secs_f64() * 1e6
    );
    println!(
        "| store: the same, 64 at once | {} renewals | | {:.0} µs wall each |",
        n - n / 2,
        concurrent_wall.as_secs_f64() * 1e6
    );
    let total = per + write_cpu;
    let share = total.as_secs_f64() * 10_000.0 / 3600.0;
    println!(
        "10,000 renewals within an hour: {:.2} s of CPU, {:.3} % of one core",
        total.as_secs_f64() * 10_000.0,
        share * 100.0
    );
}
