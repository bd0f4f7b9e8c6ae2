//! Restore: confined to its target, keeping files that differ unless asked,
//! one temporary file per restored file, one sync at the end.

use super::*;
use meta::On;
use std::os::unix::fs::FileTypeExt;

impl Repository {
    /// Restores `snapshot` (or the entries under `to.only`) into
    /// `to.target`. Each file is written to a temporary name and renamed
    /// only once every chunk checked out; a file that cannot be restored is
    /// reported and the restore fails at the end. Files are restored by one
    /// worker per CPU (at most four).
    pub fn restore(&self, snapshot: &Snapshot, to: &RestoreTo<'_>) -> Result<Restored, BackupError> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        self.restore_with(snapshot, to, workers, &|id| self.chunk(id))
    }

    /// Like [`Repository::restore`], with chunks from `chunk` (checked
    /// plaintext by id; e.g. fetched from the hub in the order of a single
    /// worker, which is the order of [`plan`]'s files) and `workers`
    /// threads writing files.
    ///
    /// A manifest is not trusted (every device holds the fleet's key, so a
    /// compromised one can write any manifest): each entry's path is
    /// confined to the target ([`confined_path`]), an entry at or under a
    /// symbolic link of the snapshot is refused, a hard link only joins a
    /// file this restore wrote, symbolic links are made only after every
    /// file is written (so no write goes through one), and an existing
    /// file that differs is kept unless `to.overwrite`.
    /// Metadata (owner, extended attributes and ACLs, mode, time) that
    /// cannot be set is listed in [`Restored::problems`], by path.
    /// Durability: one `syncfs` of the target's file system at the end, not
    /// one sync per file.
    pub(super) fn restore_with(
        &self,
        snapshot: &Snapshot,
        to: &RestoreTo<'_>,
        workers: usize,
        chunk: &(dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError> + Sync),
    ) -> Result<Restored, BackupError> {
        let target = to.target;
        fs::create_dir_all(target).map_err(io(target))?;
        let steps = plan(snapshot, to.only);
        // Every link of the snapshot, by its place under the target.
        let links: BTreeSet<PathBuf> = steps
            .iter()
            .filter_map(|step| match step {
                Step::Make { path, entry } if matches!(entry.kind, EntryKind::Symlink { .. }) => Some(*path),
                _ => None,
            })
            .filter_map(|path| relative_path(path).ok())
            .collect();
        let failed = std::sync::Mutex::new(Vec::new());
        let restored = std::sync::atomic::AtomicU64::new(0);
        let problems = std::sync::Mutex::new(Vec::new());
        // Paths whose file (or special file) is in place: what a hard link
        // may join.
        let in_place = std::sync::Mutex::new(HashSet::new());
        let owners = Owners { snapshot, names: std::sync::Mutex::new(meta::Names::default()) };
        let report = |path: &str, result: Result<(), BackupError>| match result {
            Ok(()) => {
                restored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                failed.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{}: {e}", path.escape_debug()));
            }
        };
        let note = |more: Vec<String>| {
            if !more.is_empty() {
                problems.lock().unwrap_or_else(|p| p.into_inner()).extend(more);
            }
        };
        let mark_in_place = |path: &str| {
            in_place.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_owned());
        };
        // Directories and special files first, in order; files and links
        // are only listed.
        let (mut dirs, mut files, mut hard_links, mut symlinks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for step in steps {
            let (path, entry) = match step {
                Step::Refuse { path, why } => {
                    report(path, Err(BackupError::Refused(why)));
                    continue;
                }
                Step::Link { path, to: first } => {
                    match confined_path(path, &links) {
                        Ok(rel) => hard_links.push((path, target.join(rel), first)),
                        Err(why) => report(path, Err(BackupError::Refused(why))),
                    }
                    continue;
                }
                Step::Make { path, entry } => (path, entry),
            };
            let checked = match &entry.kind {
                EntryKind::Symlink { .. } => relative_path(path).and_then(|rel| {
                    let mut ancestors = rel.ancestors().skip(1);
                    match ancestors.find(|a| links.contains(*a)) {
                        Some(link) => {
                            Err(format!("{path:?} lies under {}, a symbolic link of this snapshot", link.display()))
                        }
                        None => Ok(rel),
                    }
                }),
                _ => confined_path(path, &links),
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
                    mark_in_place(path);
                    report(path, Ok(()));
                    continue;
                }
                Err(e) => {
                    report(path, Err(e));
                    continue;
                }
            };
            match &entry.kind {
                EntryKind::Dir => {
                    report(path, fs::create_dir_all(&dest).map_err(io(&dest)));
                    dirs.push((dest, entry));
                }
                // Only the entry is kept (its path is computed again by the
                // worker): no second path per file held for the whole restore.
                EntryKind::File { chunks, data, .. } => files.push((path, entry, chunks, data)),
                EntryKind::Symlink { target: link } => symlinks.push((path, dest, entry, link)),
                EntryKind::Fifo | EntryKind::Device { .. } => match make_special(&dest, entry, to.overwrite) {
                    Ok(()) => {
                        note(owners.apply(On::Path(&dest), &dest, entry));
                        mark_in_place(path);
                        report(path, Ok(()));
                    }
                    // A device as another user than root: kept out, said.
                    Err(e)
                        if matches!(entry.kind, EntryKind::Device { .. }) && e.raw_os_error() == Some(libc::EPERM) =>
                    {
                        note(vec![format!("{}: a device, not made: only root may make one", dest.display())])
                    }
                    Err(e) => report(path, Err(io(&dest)(e))),
                },
                EntryKind::HardLink { .. } => {
                    report(path, Err(BackupError::Refused("a hard link out of place".into())))
                }
            }
        }
        // Files, by `workers` threads taking the next one in order.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..workers.max(1) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((path, entry, chunks, data)) = files.get(i) else { break };
                        let dest = relative_path(path).map(|rel| target.join(rel));
                        let written = dest
                            .map_err(BackupError::Refused)
                            .and_then(|dest| restore_file(&dest, entry, chunks, data.as_deref(), chunk, &owners));
                        match written {
                            Ok(more) => {
                                note(more);
                                mark_in_place(path);
                                report(path, Ok(()));
                            }
                            Err(e) => report(path, Err(e)),
                        }
                    }
                });
            }
        });
        // Hard links, once the files they join are written.
        let in_place = in_place.into_inner().unwrap_or_else(|p| p.into_inner());
        for (path, dest, first) in hard_links {
            report(path, hard_link(target, &dest, first, &in_place, to.overwrite));
        }
        // Links once no file remains to be written.
        for (path, dest, entry, link) in symlinks {
            let made = (|| {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(io(parent))?;
                }
                let _ = fs::remove_file(&dest);
                std::os::unix::fs::symlink(link, &dest).map_err(io(&dest))
            })();
            if made.is_ok() {
                note(owners.apply(On::Path(&dest), &dest, entry));
            }
            report(path, made);
        }
        // Directory metadata last, after their contents were written (a
        // default ACL set earlier would be inherited by what the restore
        // makes in it, and the time would change).
        for (dest, entry) in dirs.iter().rev() {
            note(owners.apply(On::Path(dest), dest, entry));
        }
        syncfs(target)?;
        let mut problems = problems.into_inner().unwrap_or_else(|p| p.into_inner());
        problems.sort();
        let mut failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
        if !failed.is_empty() {
            failed.sort();
            return Err(BackupError::RestoreIncomplete(failed));
        }
        Ok(Restored { entries: restored.into_inner(), problems })
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// Entries restored (or found in place already).
    pub entries: u64,
    /// What was restored without all it carried, one line each, by path:
    /// an attribute, ACL or owner the target could not take, a device this
    /// user may not make. The command exits 3 when there are any.
    pub problems: Vec<String>,
}

/// One step of a restore.
#[derive(Debug)]
pub(super) enum Step<'a> {
    /// Make what `entry` describes at `path`, with its metadata. `path`
    /// differs from `entry.path` for a hard link whose first name lies
    /// outside the restored paths: that name's entry is restored here.
    Make {
        /// Where (the snapshot's absolute path).
        path: &'a str,
        /// What.
        entry: &'a Entry,
    },
    /// Join `path` to the file the restore made at `to`.
    Link {
        /// The new name.
        path: &'a str,
        /// The name the file got in this restore.
        to: &'a str,
    },
    /// Not restored, and why.
    Refuse {
        /// The entry's path.
        path: &'a str,
        /// Why.
        why: String,
    },
}

/// The steps of restoring `only` (all if empty) of `snapshot`, in order.
/// A hard link whose first name is restored too joins it; one whose first
/// name is not becomes the file itself (the first such name), and the
/// later names join that one, so `--path` keeps the links inside it.
pub(super) fn plan<'a>(snapshot: &'a Snapshot, only: &'a [String]) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    // Each first name of an inode, and where the restore makes it.
    let mut made: HashMap<&'a str, &'a str> = HashMap::new();
    let mut all: Option<HashMap<&'a str, &'a Entry>> = None;
    for entry in snapshot.selected(only) {
        let path = entry.path.as_str();
        match &entry.kind {
            EntryKind::HardLink { target } => {
                if let Some(to) = made.get(target.as_str()) {
                    steps.push(Step::Link { path, to });
                    continue;
                }
                let all = all.get_or_insert_with(|| snapshot.entries.iter().map(|e| (e.path.as_str(), e)).collect());
                match all.get(target.as_str()) {
                    Some(first) if links_to(first) => {
                        made.insert(target.as_str(), path);
                        steps.push(Step::Make { path, entry: first });
                    }
                    _ => steps.push(Step::Refuse {
                        path,
                        why: format!("{path:?} is a hard link to {target:?}, which this snapshot holds as no file"),
                    }),
                }
            }
            _ => {
                if links_to(entry) {
                    made.insert(path, path);
                }
                steps.push(Step::Make { path, entry });
            }
        }
    }
    steps
}

/// True for what a hard link may join: a file or special file.
fn links_to(entry: &Entry) -> bool {
    matches!(entry.kind, EntryKind::File { .. } | EntryKind::Fifo | EntryKind::Device { .. })
}

/// The chunks a restore of `only` reads, in the order a single worker
/// reads them, each with its size as far as the entry tells (a file's
/// data shared among its chunks).
pub(super) fn chunk_order(snapshot: &Snapshot, only: &[String]) -> Vec<(ChunkId, u64)> {
    plan(snapshot, only)
        .into_iter()
        .filter_map(|step| match step {
            Step::Make { entry: Entry { kind: EntryKind::File { chunks, size, data, .. }, .. }, .. } => {
                let bytes = data.as_ref().map_or(*size, |d| d.iter().map(|r| r.1).sum());
                let each = bytes / chunks.len().max(1) as u64;
                Some(chunks.iter().map(move |id| (*id, each)))
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// Owners and metadata of restored entries: names resolved once each.
struct Owners<'a> {
    snapshot: &'a Snapshot,
    names: std::sync::Mutex<meta::Names>,
}

impl Owners<'_> {
    /// The owner and group `entry`'s file gets here (see
    /// [`meta::owner_id`]).
    fn of(&self, entry: &Entry) -> (u32, u32) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let user = self.snapshot.users.get(&entry.uid).map(String::as_str);
        let group = self.snapshot.groups.get(&entry.gid).map(String::as_str);
        (names.uid_for(entry.uid, user), names.gid_for(entry.gid, group))
    }

    /// Sets owner, extended attributes, mode and time, in that order (a
    /// change of owner clears set-id bits and file capabilities; a mode
    /// set after an access ACL keeps it, the group bits being its mask);
    /// returns what could not be set.
    fn apply(&self, on: On<'_>, dest: &Path, entry: &Entry) -> Vec<String> {
        let mut problems = Vec::new();
        let (uid, gid) = self.of(entry);
        let is_link = matches!(entry.kind, EntryKind::Symlink { .. });
        let chowned = match on {
            On::File(file) => std::os::unix::fs::fchown(file, Some(uid), Some(gid)),
            On::Path(path) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        };
        if let Err(e) = chowned {
            // Not a problem when it already has that owner (a user
            // restoring their own files).
            let now = match on {
                On::File(file) => file.metadata(),
                On::Path(path) => fs::symlink_metadata(path),
            };
            let now = now.map(|m| (m.uid(), m.gid())).ok();
            if now != Some((uid, gid)) {
                problems.push(format!("{}: owner {uid}:{gid} not set: {e}", dest.display()));
            }
        }
        problems.extend(meta::set_xattrs(on_again(&on), dest, &entry.xattrs));
        if !is_link {
            let mode = fs::Permissions::from_mode(entry.mode & 0o7777);
            let set = match on {
                On::File(file) => file.set_permissions(mode),
                On::Path(path) => fs::set_permissions(path, mode),
            };
            if let Err(e) = set {
                problems.push(format!("{}: mode {:o} not set: {e}", dest.display(), entry.mode & 0o7777));
            }
        }
        let timed = match on {
            On::File(file) => file.set_modified(mtime_of(entry)),
            On::Path(path) => meta::set_mtime_nofollow(path, entry.mtime_ns),
        };
        if let Err(e) = timed {
            problems.push(format!("{}: modification time not set: {e}", dest.display()));
        }
        problems
    }
}

/// `on` again (it is a pair of references).
fn on_again<'a>(on: &On<'a>) -> On<'a> {
    match on {
        On::File(file) => On::File(file),
        On::Path(path) => On::Path(path),
    }
}

/// Joins `dest` to the file this restore made at `first` (a path of the
/// snapshot). Only a file or special file the restore put in place is
/// joined, never a directory or a link, nor anything else under the target.
fn hard_link(
    target: &Path,
    dest: &Path,
    first: &str,
    in_place: &HashSet<String>,
    overwrite: bool,
) -> Result<(), BackupError> {
    if !in_place.contains(first) {
        return Err(BackupError::Refused(format!(
            "{}: a hard link to {first:?}, which was not restored",
            dest.display()
        )));
    }
    let source = target.join(relative_path(first).map_err(BackupError::Refused)?);
    let source_meta = fs::symlink_metadata(&source).map_err(io(&source))?;
    if source_meta.is_dir() || source_meta.file_type().is_symlink() {
        return Err(BackupError::Refused(format!("{}: {} is no longer a file", dest.display(), source.display())));
    }
    match fs::symlink_metadata(dest) {
        Ok(m) if (m.dev(), m.ino()) == (source_meta.dev(), source_meta.ino()) => return Ok(()),
        Ok(_) if !overwrite => {
            return Err(BackupError::Refused(format!(
                "{} exists and differs from the backup (--overwrite replaces it)",
                dest.display()
            )));
        }
        Ok(m) if m.is_dir() => fs::remove_dir(dest).map_err(io(dest))?,
        Ok(_) => fs::remove_file(dest).map_err(io(dest))?,
        Err(_) => {}
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    fs::hard_link(&source, dest).map_err(io(dest))
}

/// Makes a FIFO or device at `dest` (replacing what is there when asked).
fn make_special(dest: &Path, entry: &Entry, overwrite: bool) -> std::io::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if overwrite && fs::symlink_metadata(dest).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(dest)?;
    }
    meta::make_special(dest, &entry.kind, entry.mode)
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
    let ft = meta.file_type();
    let same = match &entry.kind {
        EntryKind::Dir | EntryKind::HardLink { .. } => false,
        EntryKind::File { size, .. } => meta.is_file() && meta.len() == *size && same_time,
        EntryKind::Symlink { target } => {
            ft.is_symlink() && fs::read_link(dest).is_ok_and(|t| t.as_os_str() == target.as_str())
        }
        EntryKind::Fifo => ft.is_fifo(),
        EntryKind::Device { block, rdev } => {
            (if *block { ft.is_block_device() } else { ft.is_char_device() }) && meta.rdev() == *rdev
        }
    };
    if same { Existing::Same } else { Existing::Differs }
}

/// Writes a file from its chunks through a temporary name, renamed into
/// place only once every chunk checked out; a sparse file's content goes
/// to its data regions, and its holes stay holes. Returns the metadata
/// that could not be set.
fn restore_file(
    dest: &Path,
    entry: &Entry,
    chunks: &[ChunkId],
    data: Option<&[(u64, u64)]>,
    chunk: &(dyn Fn(&ChunkId) -> Result<Vec<u8>, BackupError> + Sync),
    owners: &Owners<'_>,
) -> Result<Vec<String>, BackupError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let size = match entry.kind {
        EntryKind::File { size, .. } => size,
        _ => 0,
    };
    if let Some(regions) = data {
        meta::check_regions(regions, size).map_err(|why| BackupError::Refused(format!("{}: {why}", entry.path)))?;
    }
    let tmp = dest.with_file_name(format!(
        ".{}.{}.outpost-restore",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        unique_suffix()
    ));
    let result = (|| {
        // create_new: never through a link or onto a file someone put there.
        let mut file = fs::File::create_new(&tmp).map_err(io(&tmp))?;
        match data {
            None => {
                for id in chunks {
                    let plain = chunk(id)?;
                    file.write_all(&plain).map_err(io(&tmp))?;
                }
            }
            Some(regions) => {
                let mut writer = meta::RegionWriter::new(&file, regions);
                for id in chunks {
                    writer.write(&chunk(id)?).map_err(io(&tmp))?;
                }
                if !writer.is_full() {
                    return Err(BackupError::Corrupt {
                        what: entry.path.clone(),
                        why: "less content than its data regions".into(),
                    });
                }
                file.set_len(size).map_err(io(&tmp))?;
            }
        }
        // Owner, attributes, mode and time on the open file, before it
        // takes its name.
        let problems = owners.apply(On::File(&file), dest, entry);
        // Synced with the whole restore (one syncfs at its end).
        fs::rename(&tmp, dest).map_err(io(dest))?;
        Ok(problems)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn mtime_of(entry: &Entry) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(entry.mtime_ns).unwrap_or(0))
}
