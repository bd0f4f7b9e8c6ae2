//! Restore: confined to its target, keeping files that differ unless asked,
//! one temporary file per restored file, one sync at the end.

use super::*;

impl Repository {
    /// Restores `snapshot` (or the entries under `to.only`) into
    /// `to.target`. Each file is written to a temporary name and renamed
    /// only once every chunk checked out; a file that cannot be restored is
    /// reported and the restore fails at the end. Files are restored by one
    /// worker per CPU (at most four).
    pub fn restore(&self, snapshot: &Snapshot, to: &RestoreTo<'_>) -> Result<u64, BackupError> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        self.restore_with(snapshot, to, workers, &|id| self.chunk(id))
    }

    /// Like [`Repository::restore`], with chunks from `chunk` (checked
    /// plaintext by id; e.g. fetched from the hub in the order of a single
    /// worker) and `workers` threads writing files.
    ///
    /// A manifest is not trusted (every device holds the fleet's key, so a
    /// compromised one can write any manifest): each entry's path is
    /// confined to the target ([`confined_path`]), an entry at or under a
    /// symbolic link of the snapshot is refused, symbolic links are made
    /// only after every file is written (so no write goes through one), and
    /// an existing file that differs is kept unless `to.overwrite`.
    /// Durability: one `syncfs` of the target's file system at the end, not
    /// one sync per file.
    pub(super) fn restore_with(
        &self,
        snapshot: &Snapshot,
        to: &RestoreTo<'_>,
        workers: usize,
        chunk: &(dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError> + Sync),
    ) -> Result<u64, BackupError> {
        let target = to.target;
        fs::create_dir_all(target).map_err(io(target))?;
        let selected: Vec<&Entry> = snapshot.selected(to.only).collect();
        // Every link of the snapshot, by its place under the target.
        let links: BTreeSet<PathBuf> = selected
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Symlink { .. }))
            .filter_map(|e| relative_path(&e.path).ok())
            .collect();
        let failed = std::sync::atomic::AtomicUsize::new(0);
        let restored = std::sync::atomic::AtomicU64::new(0);
        let report = |entry: &Entry, result: Result<(), BackupError>| match result {
            Ok(()) => {
                restored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(path = %entry.path, error = %e, "Not restored.");
                eprintln!("not restored: {}: {e}", entry.path);
            }
        };
        // Directories first, in order; files and links are only listed.
        let (mut dirs, mut files, mut symlinks) = (Vec::new(), Vec::new(), Vec::new());
        for entry in selected {
            let checked = match &entry.kind {
                EntryKind::Symlink { .. } => relative_path(&entry.path).and_then(|rel| {
                    let mut ancestors = rel.ancestors().skip(1);
                    match ancestors.find(|a| links.contains(*a)) {
                        Some(link) => Err(format!(
                            "{:?} lies under {}, a symbolic link of this snapshot",
                            entry.path,
                            link.display()
                        )),
                        None => Ok(rel),
                    }
                }),
                _ => confined_path(&entry.path, &links),
            };
            let dest = match checked.map_err(BackupError::Refused).and_then(|rel| {
                let dest = target.join(rel);
                match existing(&dest, entry) {
                    Existing::Same => Ok(None),
                    Existing::Differs if !to.overwrite => Err(BackupError::Refused(format!(
                        "{} exists and differs from the backup (--overwrite replaces it)",
                        dest.display()
                    ))),
                    Existing::Differs | Existing::Absent => Ok(Some(dest)),
                }
            }) {
                Ok(Some(dest)) => dest,
                Ok(None) => {
                    report(entry, Ok(()));
                    continue;
                }
                Err(e) => {
                    report(entry, Err(e));
                    continue;
                }
            };
            match &entry.kind {
                EntryKind::Dir => {
                    report(entry, fs::create_dir_all(&dest).map_err(io(&dest)));
                    dirs.push((dest, entry));
                }
                // Only the entry is kept (its path is computed again by the
                // worker): no second path per file held for the whole restore.
                EntryKind::File { chunks, .. } => files.push((entry, chunks)),
                EntryKind::Symlink { target: link } => symlinks.push((dest, entry, link)),
            }
        }
        // Files, by `workers` threads taking the next one in order.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..workers.max(1) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((entry, chunks)) = files.get(i) else { break };
                        let dest = relative_path(&entry.path).map(|rel| target.join(rel));
                        report(
                            entry,
                            dest.map_err(BackupError::Refused)
                                .and_then(|dest| restore_file(&dest, entry, chunks, chunk)),
                        );
                    }
                });
            }
        });
        // Links once no file remains to be written.
        for (dest, entry, link) in symlinks {
            let made = (|| {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(io(parent))?;
                }
                let _ = fs::remove_file(&dest);
                std::os::unix::fs::symlink(link, &dest).map_err(io(&dest))
            })();
            report(entry, made);
        }
        // Directory times last, after their contents were written.
        for (dest, entry) in dirs.iter().rev() {
            if let Err(e) = apply_meta(dest, entry) {
                tracing::warn!(path = %entry.path, error = %e, "Directory metadata not restored.");
            }
        }
        syncfs(target)?;
        let failed = failed.into_inner();
        if failed > 0 {
            return Err(BackupError::RestoreIncomplete(failed));
        }
        Ok(restored.into_inner())
    }
}

/// Where and how a restore writes.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTo<'a> {
    /// The directory the snapshot's absolute paths are restored under
    /// (`/` restores in place).
    pub target: &'a Path,
    /// Only these paths and what is under them (all if empty).
    pub only: &'a [String],
    /// Replace existing files that differ from the backup.
    pub overwrite: bool,
}

/// The path under the target where a manifest entry goes: its absolute
/// path made relative. Refused (with why) if it has a `..`, `.` or empty
/// name, or lies under a symbolic link made earlier in the same restore
/// (`links`, relative), since the restore would then write wherever the
/// link points.
pub fn confined_path(path: &str, links: &BTreeSet<PathBuf>) -> Result<PathBuf, String> {
    let relative = relative_path(path)?;
    if let Some(link) = relative.ancestors().find(|a| links.contains(*a)) {
        return Err(if link == relative {
            format!("{path:?} is a symbolic link this restore made")
        } else {
            format!("{path:?} lies under {}, a symbolic link this restore made", link.display())
        });
    }
    Ok(relative)
}

/// An absolute manifest path made relative, refused if it has a `..`, `.`
/// or empty name or a NUL byte.
fn relative_path(path: &str) -> Result<PathBuf, String> {
    if path.contains('\0') {
        return Err(format!("{path:?}: a path with a NUL byte"));
    }
    let mut relative = PathBuf::new();
    for name in path.trim_start_matches('/').split('/') {
        if name.is_empty() || name == "." || name == ".." {
            return Err(format!("{path:?} does not name a place under the target ({name:?} in it)"));
        }
        relative.push(name);
    }
    Ok(relative)
}

/// What is already where an entry is restored.
pub(super) enum Existing {
    /// Nothing (or a directory where a directory goes).
    Absent,
    /// The same (a file of the same size and modification time, a link to
    /// the same target): left as it is.
    Same,
    /// Something else.
    Differs,
}

pub(super) fn existing(dest: &Path, entry: &Entry) -> Existing {
    let Ok(meta) = fs::symlink_metadata(dest) else { return Existing::Absent };
    if matches!(entry.kind, EntryKind::Dir) && meta.is_dir() {
        // An existing directory is used as it is; its metadata is still
        // restored after its contents.
        return Existing::Absent;
    }
    let same_time = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()) == entry.mtime_ns;
    let same = match &entry.kind {
        EntryKind::Dir => false,
        EntryKind::File { size, .. } => meta.is_file() && meta.len() == *size && same_time,
        EntryKind::Symlink { target } => {
            meta.file_type().is_symlink() && fs::read_link(dest).is_ok_and(|t| t.as_os_str() == target.as_str())
        }
    };
    if same { Existing::Same } else { Existing::Differs }
}

/// Writes a file from its chunks through a temporary name, renamed into
/// place only once every chunk checked out.
pub(super) fn restore_file(
    dest: &Path,
    entry: &Entry,
    chunks: &[ChunkId],
    chunk: &(dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError> + Sync),
) -> Result<(), BackupError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = dest.with_file_name(format!(
        ".{}.{}.outpost-restore",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        unique_suffix()
    ));
    let result = (|| {
        // create_new: never through a link or onto a file someone put there.
        let mut file = fs::File::create_new(&tmp).map_err(io(&tmp))?;
        for id in chunks {
            let plain = chunk(id)?;
            file.write_all(&plain).map_err(io(&tmp))?;
        }
        // Owner, mode and time on the open file, before it takes its name.
        let _ = std::os::unix::fs::fchown(&file, Some(entry.uid), Some(entry.gid));
        file.set_permissions(fs::Permissions::from_mode(entry.mode & 0o7777)).map_err(io(&tmp))?;
        file.set_modified(mtime_of(entry)).map_err(io(&tmp))?;
        // Synced with the whole restore (one syncfs at its end).
        fs::rename(&tmp, dest).map_err(io(dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Sets mode, owner (when permitted) and mtime.
pub(super) fn apply_meta(dest: &Path, entry: &Entry) -> Result<(), BackupError> {
    fs::set_permissions(dest, fs::Permissions::from_mode(entry.mode & 0o7777)).map_err(io(dest))?;
    let _ = std::os::unix::fs::chown(dest, Some(entry.uid), Some(entry.gid));
    let file = fs::File::open(dest).map_err(io(dest))?;
    file.set_modified(mtime_of(entry)).map_err(io(dest))
}

fn mtime_of(entry: &Entry) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(entry.mtime_ns).unwrap_or(0))
}
