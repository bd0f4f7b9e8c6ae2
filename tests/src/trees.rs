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

/// What a tree walker sees of one path beside its name, field by field:
/// `kind`, `mode`, `owner`, `group` (numeric), `mtime` (ns), `size`,
/// `content` (a hash), `target` (of a symlink), `links` (the first name of
/// its inode among the tree's paths, when it has several), `rdev`,
/// `xattrs` (every attribute but ACLs, hex), `acl` (`getfacl` of access
/// and default ACLs) and `allocated` (of a sparse file: whether it still
/// allocates less than half its size).
pub type Node = BTreeMap<&'static str, String>;

/// Every path under `root` (relative; the root itself is `.`) with what a
/// restore must keep of it. Sockets are left out (no backup tool restores
/// them).
pub fn walk(root: &Path) -> BTreeMap<String, Node> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let mut paths = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        }
        paths.push((path, meta));
    }
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    // Link groups within the tree: a name whose other names lie outside it
    // is no link a restore of this tree could keep.
    let mut names: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for (_, meta) in &paths {
        *names.entry((meta.dev(), meta.ino())).or_default() += 1;
    }
    let mut first_names: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (path, meta) in paths {
        let rel = match path.strip_prefix(root).unwrap().display().to_string() {
            r if r.is_empty() => ".".to_owned(),
            r => r,
        };
        let ft = meta.file_type();
        if ft.is_socket() {
            continue;
        }
        let kind = if ft.is_symlink() {
            "symlink"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char device"
        } else {
            "block device"
        };
        let mut node = Node::new();
        node.insert("kind", kind.into());
        node.insert("owner", meta.uid().to_string());
        node.insert("group", meta.gid().to_string());
        if !ft.is_symlink() {
            node.insert("mode", format!("{:o}", meta.mode() & 0o7777));
            node.insert("mtime", (meta.mtime() * 1_000_000_000 + meta.mtime_nsec()).to_string());
        }
        if ft.is_symlink() {
            node.insert("target", fs::read_link(&path).unwrap().display().to_string());
        }
        if ft.is_file() {
            node.insert("size", meta.len().to_string());
            node.insert("content", content_hash(&path));
            if meta.blocks() * 512 < meta.len() {
                let sparse = meta.blocks() * 512 < meta.len() / 2;
                node.insert("allocated", if sparse { "sparse".into() } else { "dense".into() });
            }
        }
        if ft.is_char_device() || ft.is_block_device() {
            node.insert("rdev", meta.rdev().to_string());
        }
        if names[&(meta.dev(), meta.ino())] > 1 && !ft.is_dir() {
            let first = first_names.entry((meta.dev(), meta.ino())).or_insert_with(|| rel.clone());
            node.insert("links", first.clone());
        }
        let (acl, xattrs) = xattrs(&path);
        if !xattrs.is_empty() {
            node.insert("xattrs", xattrs);
        }
        if acl && !ft.is_symlink() {
            let out = std::process::Command::new("getfacl")
                .args(["--omit-header", "--absolute-names", "--numeric"])
                .arg(&path)
                .output()
                .unwrap();
            node.insert("acl", String::from_utf8_lossy(&out.stdout).trim().replace('\n', " "));
        }
        out.insert(rel, node);
    }
    out
}

/// A hash of a file's bytes (holes read as zeros).
fn content_hash(path: &Path) -> String {
    use std::hash::Hasher;
    use std::io::Read;
    let mut hasher = std::hash::DefaultHasher::new();
    let mut file = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.write(&buf[..n]);
    }
    format!("{:016x}", hasher.finish())
}

/// Whether `path` has an ACL, and its other extended attributes
/// (`name=hex` joined by spaces), read without following a link.
fn xattrs(path: &Path) -> (bool, String) {
    let mut names = vec![0u8; 64 << 10];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(_) => return (false, String::new()),
    };
    let mut acl = false;
    let mut shown = Vec::new();
    let mut value = vec![0u8; 64 << 10];
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("system.posix_acl_") {
            acl = true;
            continue;
        }
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]).unwrap_or(0);
        let hex: String = value[..len].iter().map(|b| format!("{b:02x}")).collect();
        shown.push(format!("{name}={hex}"));
    }
    shown.sort();
    (acl, shown.join(" "))
}

/// One thing a restore lost or changed: a path's field (`missing` for the
/// path itself), with what was expected and found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loss {
    pub path: String,
    pub field: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.path, self.field, self.detail)
    }
}

/// What `got` lost or changed of `expected`.
pub fn lost(expected: &BTreeMap<String, Node>, got: &BTreeMap<String, Node>) -> Vec<Loss> {
    let mut out = Vec::new();
    for (path, want) in expected {
        let Some(have) = got.get(path) else {
            out.push(Loss { path: path.clone(), field: "missing", detail: String::new() });
            continue;
        };
        for (field, value) in want {
            let other = have.get(field).map_or("(none)", String::as_str);
            if other != value {
                let detail = format!("expected {value:?}, got {other:?}");
                out.push(Loss { path: path.clone(), field, detail });
            }
        }
        for (field, value) in have.iter().filter(|(f, _)| !want.contains_key(*f)) {
            out.push(Loss { path: path.clone(), field, detail: format!("expected none, got {value:?}") });
        }
    }
    out
}

/// A tree with everything a restore must keep beside content: hard links
/// (three names of one inode in two directories), extended attributes on
/// a file and a directory, an access ACL and a default ACL (`setfacl`), a
/// FIFO, a character device (as root), a socket, a sparse file of
/// `sparse_mib` MiB with two data regions, other owners (as root), a
/// setgid directory and nanosecond times. Needs `setfattr` and `setfacl`
/// (Debian's attr and acl).
pub fn populate_fidelity(src: &Path, sparse_mib: u64) {
    use std::os::unix::fs::FileExt;
    let root = crate::is_root();
    fs::create_dir_all(src.join("links/sub")).unwrap();
    fs::write(src.join("links/one"), b"one inode, three names\n").unwrap();
    fs::hard_link(src.join("links/one"), src.join("links/sub/two")).unwrap();
    fs::hard_link(src.join("links/one"), src.join("three")).unwrap();
    fs::write(src.join("attrs.txt"), b"coloured\n").unwrap();
    fs::create_dir_all(src.join("shared")).unwrap();
    fs::write(src.join("shared/report.txt"), b"shared with nobody\n").unwrap();
    let sh = |cmd: &str, args: &[&str]| {
        let status = std::process::Command::new(cmd).args(args).status().unwrap();
        assert!(status.success(), "{cmd} {args:?}");
    };
    let p = |rel: &str| src.join(rel).display().to_string();
    sh("setfattr", &["-n", "user.color", "-v", "blue", &p("attrs.txt")]);
    sh("setfattr", &["-n", "user.binary", "-v", "0x00ff10", &p("attrs.txt")]);
    sh("setfattr", &["-n", "user.dir", "-v", "kept", &p("shared")]);
    sh("setfacl", &["-m", "u:nobody:r--,g:nogroup:rw-", &p("shared/report.txt")]);
    sh("setfacl", &["-d", "-m", "u:nobody:rwx", &p("shared")]);
    sh("mkfifo", &["-m", "0620", &p("pipe")]);
    let _ = std::os::unix::net::UnixListener::bind(src.join("socket")).unwrap();
    let sparse = fs::File::create(src.join("disk.img")).unwrap();
    sparse.write_all_at(&noise(64 << 10, 9), 1 << 20).unwrap();
    sparse.write_all_at(b"the end", (sparse_mib << 20) - 7).unwrap();
    drop(sparse);
    fs::create_dir_all(src.join("setgid")).unwrap();
    fs::set_permissions(src.join("setgid"), fs::Permissions::from_mode(0o2775)).unwrap();
    if root {
        sh("mknod", &["-m", "0640", &p("null"), "c", "1", "3"]);
        std::os::unix::fs::lchown(src.join("attrs.txt"), Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::lchown(src.join("setgid"), Some(4242), Some(4343)).unwrap();
    }
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_650_000_000, 987_654_321);
    for rel in ["attrs.txt", "links/one", "disk.img"] {
        fs::File::options().write(true).open(src.join(rel)).unwrap().set_modified(when).unwrap();
    }
}
