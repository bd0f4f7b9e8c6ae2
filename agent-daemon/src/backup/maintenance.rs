//! Keeping a repository sound: verify every chunk, apply retention and drop
//! what no snapshot needs, recover after an interrupted run.

use super::*;

impl Repository {
    /// Re-reads every chunk the snapshots name (and any other chunk in the
    /// repository) and checks it. Returns the problems found, each naming
    /// the chunk and the snapshots and files that need it.
    pub fn verify(&self) -> Result<Vec<String>, BackupError> {
        let mut users: BTreeMap<ChunkId, Vec<String>> = BTreeMap::new();
        let mut problems = Vec::new();
        let snapshots = match self.snapshots() {
            Ok(s) => s,
            Err(e) => {
                problems.push(e.to_string());
                Vec::new()
            }
        };
        for s in &snapshots {
            for e in &s.entries {
                if let EntryKind::File { chunks, .. } = &e.kind {
                    for id in chunks {
                        users.entry(*id).or_default().push(format!("{}:{}", s.name, e.path));
                    }
                }
            }
        }
        for id in self.stored_chunks()? {
            users.entry(id).or_default();
        }
        for (id, needed_by) in &users {
            if let Err(e) = self.chunk(id) {
                let mut who: Vec<&String> = needed_by.iter().collect();
                who.dedup();
                let shown: Vec<String> = who.iter().take(3).map(|s| s.to_string()).collect();
                let more = if who.len() > 3 { format!(" and {} more", who.len() - 3) } else { String::new() };
                let needed = if who.is_empty() {
                    "unreferenced".into()
                } else {
                    format!("needed by {}{more}", shown.join(", "))
                };
                problems.push(format!("{e} ({needed})"));
            }
        }
        Ok(problems)
    }

    /// Every file under `chunks/`: chunks, and `<id>.tmp` files a crash
    /// left half-written.
    pub(super) fn chunk_files(&self) -> Result<Vec<PathBuf>, BackupError> {
        let dir = self.root.join("chunks");
        let mut files = Vec::new();
        for sub in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let sub = sub.path();
            files.extend(fs::read_dir(&sub).map_err(io(&sub))?.flatten().map(|e| e.path()));
        }
        Ok(files)
    }

    pub(super) fn stored_chunks(&self) -> Result<Vec<ChunkId>, BackupError> {
        Ok(self
            .chunk_files()?
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| parse_id(&n.to_string_lossy())))
            .collect())
    }

    /// Applies each set's retention to its snapshots, then deletes chunks
    /// no remaining snapshot needs. Returns (snapshots removed, chunks
    /// removed).
    pub fn prune(&self, sets: &[BackupSet]) -> Result<(Vec<String>, usize), BackupError> {
        let snapshots = self.snapshots()?;
        let mut removed = Vec::new();
        for set in sets {
            let mine: Vec<&Snapshot> = snapshots.iter().filter(|s| s.set == set.name).collect();
            let keep = set.retention.keep(&mine.iter().map(|s| s.started).collect::<Vec<_>>());
            for (i, s) in mine.iter().enumerate() {
                if !keep.contains(&i) {
                    let path = self.root.join("snapshots").join(&s.name);
                    fs::remove_file(&path).map_err(io(&path))?;
                    removed.push(s.name.clone());
                }
            }
        }
        let mut needed = BTreeSet::new();
        for s in self.snapshots()? {
            for e in s.entries {
                if let EntryKind::File { chunks, .. } = e.kind {
                    needed.extend(chunks);
                }
            }
        }
        // Chunk files a crash left half-written.
        for leftover in self.chunk_files()?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "tmp")) {
            let _ = fs::remove_file(leftover);
        }
        let mut chunks_removed = 0;
        for id in self.stored_chunks()? {
            if !needed.contains(&id) {
                let path = self.chunk_path(&id);
                fs::remove_file(&path).map_err(io(&path))?;
                chunks_removed += 1;
            }
        }
        Ok((removed, chunks_removed))
    }

    /// After a run that ended before its sync (see the module docs): checks
    /// the chunks written since it began (a minute of slack for the clock)
    /// and deletes those that do not decrypt and hash to their id.
    pub(super) fn recover_interrupted_run(&self) -> Result<(), BackupError> {
        let marker = self.root.join(UNSYNCED);
        let started = match fs::read_to_string(&marker) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&marker)(e)),
        };
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(started.saturating_sub(60_000));
        let (mut checked, mut removed) = (0usize, 0usize);
        for path in self.chunk_files()? {
            let Some(id) = path.file_name().and_then(|n| parse_id(&n.to_string_lossy())) else {
                // A half-written `<id>.tmp`.
                let _ = fs::remove_file(&path);
                continue;
            };
            if fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|m| m < since) {
                continue;
            }
            checked += 1;
            if let Err(e) = self.chunk(&id) {
                eprintln!("removing a chunk an interrupted backup left damaged: {e}");
                fs::remove_file(&path).map_err(io(&path))?;
                removed += 1;
            }
        }
        self.sync_all()?;
        fs::remove_file(&marker).map_err(io(&marker))?;
        eprintln!(
            "an earlier backup was interrupted: checked the {checked} chunk(s) it may have written, removed {removed}"
        );
        Ok(())
    }
}
