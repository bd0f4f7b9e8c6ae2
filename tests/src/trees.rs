//! Trees of files for backup tests: generated content, and comparison of
//! two trees byte for byte with modes, mtimes and symlinks.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Random bytes (incompressible), deterministic per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn populate(src: &Path) {
    fs::create_dir_all(src.join("logs/old")).unwrap();
    fs::write(src.join("big.bin"), noise(6 << 20, 1)).unwrap();
    fs::write(src.join("logs/app.log"), "line of a log that compresses well\n".repeat(50_000)).unwrap();
    fs::write(src.join("logs/old/empty"), b"").unwrap();
    fs::write(src.join("secret.conf"), b"password=1\n").unwrap();
    fs::set_permissions(src.join("secret.conf"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("logs/app.log", src.join("current.log")).unwrap();
    fs::write(src.join("scratch.tmp"), b"excluded").unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    fs::File::open(src.join("logs/old/empty")).unwrap().set_modified(old).unwrap();
}

/// Relative path → (kind, mode, mtime ns, content or link target).
pub fn describe(root: &Path) -> BTreeMap<String, (char, u32, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            let mode = meta.mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap().display().to_string().into_bytes();
                out.insert(rel, ('l', 0, 0, target));
            } else if meta.is_dir() {
                out.insert(rel, ('d', mode, mtime, Vec::new()));
                stack.push(path);
            } else {
                out.insert(rel, ('f', mode, mtime, fs::read(&path).unwrap()));
            }
        }
    }
    out
}

pub fn assert_same_tree(expected: &Path, got: &Path) {
    let (a, b) = (describe(expected), describe(got));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "different entries");
    for (path, (kind, mode, mtime, data)) in &a {
        let (k2, m2, t2, d2) = &b[path];
        assert_eq!((kind, mode), (k2, m2), "{path}: kind or mode");
        assert!(data == d2, "{path}: content differs");
        if *kind == 'f' {
            assert_eq!(mtime, t2, "{path}: mtime");
        }
    }
}
