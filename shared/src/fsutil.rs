//! Writing files so that a crash leaves either the old or the new content,
//! never a torn file, and secrets are never readable by others.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename,
/// fsync of the directory) with permission bits `mode` (e.g. `0o600`).
///
/// The temporary file's name is this writer's own (`.<name>.<pid>.<n>.tmp`:
/// the process id and a counter), so writers of the same path, in one
/// process or several, never write into or rename each other's file: the
/// last rename wins and every reader sees one whole version. A crash may
/// leave such a file behind; [`is_temporary`] recognises it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::File::open(dir)?.sync_all()
}

/// Checks that a secret file (a private key, a token key) is not open to
/// group or others: `Err` says which mode it has and how to fix it. A
/// missing file passes (whoever needs it reports that).
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(format!(
            "{} holds a secret and is open to group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        )),
        _ => Ok(()),
    }
}

/// True for a temporary file [`write_atomic`] makes (a crash's leftover if
/// it is old).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Bytes an unprivileged writer may still use on the file system of `path`
/// (or of its nearest existing ancestor); `None` if it cannot be read.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let fs = path.ancestors().find(|d| d.is_dir())?;
    let vfs = rustix::fs::statvfs(fs).ok()?;
    Some(vfs.f_bavail.saturating_mul(vfs.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_open_to_others_are_named_with_their_mode() {
        let dir = std::env::temp_dir().join(format!("outpost-fsutil-private-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        assert!(check_private(&p).is_ok(), "a missing file is someone else's error");
        write_atomic(&p, b"k", 0o600).unwrap();
        assert!(check_private(&p).is_ok());
        for mode in [0o640, 0o604, 0o644, 0o660] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = check_private(&p).unwrap_err();
            assert!(e.contains(&format!("mode {mode:o}")) && e.contains("chmod 600"), "{e}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(check_private(&p).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = std::env::temp_dir().join(format!("outpost-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret.key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Two uploads of one chunk at once (a cloned device image, a re-run
    /// upload) used to share one temporary name: one writer could rename
    /// the other's half-written file into place.
    #[test]
    fn concurrent_writers_of_one_path_never_tear_it() {
        let dir = tempfile_dir("concurrent");
        let path = dir.join("chunk");
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..40 {
                        write_atomic(path, &vec![t; 64 << 10], 0o600).unwrap();
                        let now = fs::read(path).unwrap();
                        assert!(now.len() == 64 << 10 && now.iter().all(|b| *b == now[0]), "a torn file was read");
                    }
                });
            }
        });
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["chunk"], "temporary files left behind");
        assert!(is_temporary(".chunk.123.4.tmp") && !is_temporary("chunk"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("outpost-fsutil-{what}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
