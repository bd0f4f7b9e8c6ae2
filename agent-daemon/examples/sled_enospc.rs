//! Does sled 0.34 open again after it ran out of space? Each round writes
//! 2,000 values of 2 KB in flushed groups of 10 into DIR (a small tmpfs),
//! fills the rest of the space with another file, writes until a write or
//! flush fails, drops the database, gives LEAVE bytes of the other file
//! back, tries three opens as the stores' reopen once a second would, then
//! removes the other file and opens once more. With LEAVE 0 (a full disk)
//! an open can leave files no later open reads ("Read corrupted data at
//! file offset None"), which is why the stores wait for
//! `outpost_shared::reopen::room_to_open`.
//!
//! ```text
//! mkdir -p /tmp/small && mount -t tmpfs -o size=16m tmpfs /tmp/small
//! cargo run --release -p outpost-agent --example sled_enospc -- /tmp/small ROUNDS LEAVE
//! cargo run --release -p outpost-agent --example sled_enospc -- cost /tmp/big KEYS
//! umount /tmp/small
//! ```
//!
//! `cost` prints how many bytes opening a store of KEYS 2 KB values wrote.

use std::error::Error;
use std::io::Write;
use std::path::Path;

fn fill(path: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let block = vec![0xa5u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

fn free(dir: &Path) -> Result<u64, Box<dyn Error>> {
    let vfs = rustix::fs::statvfs(dir)?;
    Ok(vfs.f_bavail * vfs.f_frsize)
}

fn round(dir: &Path, round: u32, leave: u64) -> Result<String, Box<dyn Error>> {
    let db_dir = dir.join(format!("db{round}"));
    let junk = dir.join("junk");
    let open = || sled::Config::new().path(&db_dir).cache_capacity(4 << 20).flush_every_ms(Some(10_000)).open();
    let db = open()?;
    let value = vec![7u8; 2000];
    let mut key = 0u64;
    // Some history first, then the junk leaves only a little room.
    for _ in 0..200 {
        for _ in 0..10 {
            db.insert(key.to_be_bytes(), value.clone())?;
            key += 1;
        }
        db.flush()?;
    }
    fill(&junk)?;
    let failed = loop {
        let r = (|| {
            for _ in 0..10 {
                db.insert(key.to_be_bytes(), value.clone())?;
                key += 1;
            }
            db.flush()
        })();
        if let Err(e) = r {
            break e;
        }
    };
    drop(db);
    // Give back `leave` bytes of the junk.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&junk)?;
        let len = f.metadata()?.len();
        f.set_len(len.saturating_sub(leave))?;
    }
    let before = free(dir)?;
    // As the agent does: try to open again (once a second) while the disk
    // is still full.
    let mut tries = Vec::new();
    for _ in 0..3 {
        tries.push(match open() {
            Ok(_) => "opened".to_owned(),
            Err(e) => e.to_string(),
        });
    }
    println!("  opens with {before} bytes free: {tries:?}");
    for e in std::fs::read_dir(&db_dir)? {
        let e = e?;
        println!("  {:?} {}", e.file_name(), e.metadata()?.len());
    }
    std::fs::remove_file(&junk)?;
    let verdict = match open() {
        Ok(db) => {
            let n = db.len();
            format!("reopened after '{failed}': {n} of {key} keys")
        }
        Err(e) => format!("DID NOT REOPEN after '{failed}': {e}"),
    };
    std::fs::remove_dir_all(&db_dir)?;
    Ok(verdict)
}

/// How many bytes opening a database of `keys` 2 KB values writes.
fn open_cost(dir: &Path, keys: u64) -> Result<(), Box<dyn Error>> {
    let db_dir = dir.join("cost");
    let open = || sled::Config::new().path(&db_dir).cache_capacity(4 << 20).flush_every_ms(Some(10_000)).open();
    {
        let db = open()?;
        for key in 0..keys {
            db.insert(key.to_be_bytes(), vec![7u8; 2000])?;
            if key % 1000 == 999 {
                db.flush()?;
            }
        }
        db.flush()?;
    }
    for i in 0..3 {
        let before = free(dir)?;
        let db = open()?;
        let opened = free(dir)?;
        drop(db);
        let after = free(dir)?;
        println!(
            "{keys} keys, open {i}: opening took {} bytes, open and close {} bytes",
            before as i64 - opened as i64,
            before as i64 - after as i64
        );
    }
    std::fs::remove_dir_all(&db_dir)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("cost") {
        let dir = Path::new(args.get(2).ok_or("usage: cost DIR KEYS")?);
        return open_cost(dir, args.get(3).ok_or("usage: cost DIR KEYS")?.parse()?);
    }
    let dir = Path::new(args.get(1).ok_or("usage: DIR ROUNDS")?);
    let rounds: u32 = args.get(2).map_or(Ok(5), |r| r.parse())?;
    let leave: u64 = args.get(3).map_or(Ok(0), |r| r.parse())?;
    for r in 0..rounds {
        println!("round {r}: {}", round(dir, r, leave)?);
    }
    Ok(())
}
