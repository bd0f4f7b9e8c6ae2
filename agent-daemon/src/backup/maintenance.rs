//! Keeping a repository sound: verify every chunk, apply retention and drop
//! what no snapshot needs, recover after an interrupted run.

use super::*;

impl Repository {
    /// Re-reads every chunk the snapshots name (and any other chunk in the
    /// repository) and checks it. Returns the problems found, each naming
    /// the chunk and the snapshots and files that need it. One manifest is
    /// decoded at a time; who needs a chunk is looked up again only for the
    /// chunks that failed.
    pub fn verify(&self) -> Result<Vec<String>, BackupError> {
        let mut problems = Vec::new();
        let mut ids: BTreeSet<ChunkId> = BTreeSet::new();
        // A manifest that cannot be read is reported, and the others are
        // still checked.
        let names = self.snapshot_names()?;
        for name in &names {
            match self.snapshot(name) {
                Ok(s) => {
                    ids.extend(s.manifest_chunks);
                    ids.extend(s.entries.into_iter().filter_map(file_chunks).flatten());
                }
                Err(e) => {
                    problems.push(e.to_string());
                    // The chunks of its entries are checked (and named) below.
                    ids.extend(self.snapshot_head(name).map(|h| h.entry_chunks).unwrap_or_default());
                }
            }
        }
        ids.extend(self.stored_chunks()?);
        for segment in self.index.read().unwrap_or_else(|p| p.into_inner()).iter() {
            ids.extend(segment.records()?.into_iter().map(|(id, _)| id));
        }
        let failed: Vec<(ChunkId, BackupError)> =
            ids.into_iter().filter_map(|id| self.chunk(&id).err().map(|e| (id, e))).collect();
        if failed.is_empty() {
            return Ok(problems);
        }
        let mut users: BTreeMap<ChunkId, Vec<String>> = failed.iter().map(|(id, _)| (*id, Vec::new())).collect();
        // Problems reading a manifest were reported above.
        for head in names.iter().filter_map(|name| self.snapshot_head(name).ok()) {
            for id in &head.entry_chunks {
                if let Some(who) = users.get_mut(id) {
                    who.push(format!("{}'s list of entries", head.name));
                }
            }
        }
        for s in names.iter().filter_map(|name| self.snapshot(name).ok()) {
            for e in &s.entries {
                if let EntryKind::File { chunks, .. } = &e.kind {
                    for id in chunks {
                        if let Some(who) = users.get_mut(id) {
                            who.push(format!("{}:{}", s.name, e.path));
                        }
                    }
                }
            }
        }
        for (id, e) in failed {
            let mut who = users.remove(&id).unwrap_or_default();
            who.dedup();
            let shown: Vec<String> = who.iter().take(3).cloned().collect();
            let more = if who.len() > 3 { format!(" and {} more", who.len() - 3) } else { String::new() };
            let needed =
                if who.is_empty() { "unreferenced".into() } else { format!("needed by {}{more}", shown.join(", ")) };
            problems.push(format!("{e} ({needed})"));
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
        // What retention needs of each snapshot: its set and start.
        let mut all: Vec<(String, String, Timestamp)> = Vec::new();
        for name in self.snapshot_names()? {
            let head = self.snapshot_head(&name)?;
            all.push((head.name, head.set, head.started));
        }
        let mut removed = Vec::new();
        for set in sets {
            let mine: Vec<&(String, String, Timestamp)> = all.iter().filter(|s| s.1 == set.name).collect();
            let keep = set.retention.keep(&mine.iter().map(|s| s.2).collect::<Vec<_>>());
            for (i, (name, _, _)) in mine.iter().enumerate() {
                if !keep.contains(&i) {
                    let path = self.root.join("snapshots").join(name);
                    fs::remove_file(&path).map_err(io(&path))?;
                    removed.push(name.clone());
                }
            }
        }
        let mut needed = BTreeSet::new();
        self.each_snapshot(|s| {
            needed.extend(s.manifest_chunks);
            needed.extend(s.entries.into_iter().filter_map(file_chunks).flatten());
            Ok(())
        })?;
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
        chunks_removed += self.prune_packs(&needed)?;
        Ok((removed, chunks_removed))
    }

    /// Drops the chunks of packs no snapshot in `needed` uses: packs with
    /// nothing needed go, packs mostly garbage are repacked (their needed
    /// chunks copied into new packs), the rest stay with their garbage. The
    /// new packs are synced, then one new index segment naming every
    /// needed chunk is written durably, then the old segments and every
    /// pack the new index does not name (repacked ones, and leftovers of
    /// interrupted runs) are deleted: a crash at any point leaves an index
    /// whose every entry is in a pack on disk. Returns the chunks dropped.
    pub(super) fn prune_packs(&self, needed: &BTreeSet<ChunkId>) -> Result<usize, BackupError> {
        let old_segments: Vec<PathBuf> =
            self.index.read().unwrap_or_else(|p| p.into_inner()).iter().map(|s| s.path.clone()).collect();
        let mut records = Vec::new();
        for segment in self.index.read().unwrap_or_else(|p| p.into_inner()).iter() {
            records.extend(segment.records()?);
        }
        let plan = repack_plan(&records, needed);
        let packs = self.root.join("packs");
        let mut keep: Vec<pack::Record> =
            records.iter().filter(|(id, at)| needed.contains(id) && !plan.repack.contains(&at.pack)).copied().collect();
        let mut writer = pack::PackWriter::new(&self.root)?;
        for (id, at) in records.iter().filter(|(id, at)| needed.contains(id) && plan.repack.contains(&at.pack)) {
            if writer.add(*id, &pack::read_blob(&packs, at)?)? {
                keep.extend(std::mem::replace(&mut writer, pack::PackWriter::new(&self.root)?).finish()?);
            }
        }
        keep.extend(writer.finish()?);
        let dropped = records.len().saturating_sub(keep.len());
        let unchanged = plan.repack.is_empty() && dropped == 0 && old_segments.len() <= 1;
        if !unchanged {
            self.sync_all()?;
            let name = format!("{}-prune-{}", Timestamp::now().0, unique_suffix());
            let new_segment = self.root.join("index").join(&name);
            self.add_segment(&name, keep.clone())?;
            for path in old_segments.iter().filter(|p| **p != new_segment) {
                fs::remove_file(path).map_err(io(path))?;
            }
            self.reload_index()?;
        }
        // Every pack file the index does not name: emptied or repacked ones,
        // and those of runs that ended before writing their index.
        let named: HashSet<[u8; 32]> = keep.iter().map(|(_, at)| at.pack).collect();
        for sub in fs::read_dir(&packs).map_err(io(&packs))?.flatten() {
            for file in fs::read_dir(sub.path()).map_err(io(&sub.path()))?.flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                if outpost_shared::identity::parse_hex32(&name).is_none_or(|id| !named.contains(&id)) {
                    fs::remove_file(file.path()).map_err(io(&file.path()))?;
                }
            }
        }
        Ok(dropped)
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
                tracing::warn!(error = %e, "Removing a chunk an interrupted backup left damaged.");
                fs::remove_file(&path).map_err(io(&path))?;
                removed += 1;
            }
        }
        self.sync_all()?;
        fs::remove_file(&marker).map_err(io(&marker))?;
        tracing::warn!(checked, removed, "An earlier backup was interrupted: checked the chunks it may have written.");
        Ok(())
    }
}

/// Which packs a prune rewrites.
#[derive(Debug, Default, PartialEq)]
pub(super) struct RepackPlan {
    /// Packs whose needed chunks are copied into new packs.
    pub repack: HashSet<[u8; 32]>,
}

/// The packs to repack: those where more than half the bytes belong to
/// chunks no snapshot needs (but not those with nothing needed, which are
/// just deleted). Pure.
pub(super) fn repack_plan(records: &[pack::Record], needed: &BTreeSet<ChunkId>) -> RepackPlan {
    let mut bytes: HashMap<[u8; 32], (u64, u64)> = HashMap::new();
    for (id, at) in records {
        let (live, total) = bytes.entry(at.pack).or_default();
        *total += u64::from(at.len);
        if needed.contains(id) {
            *live += u64::from(at.len);
        }
    }
    RepackPlan {
        repack: bytes.into_iter().filter(|(_, (live, total))| *live > 0 && live * 2 < *total).map(|(p, _)| p).collect(),
    }
}

/// A file entry's chunk list (none for directories and links).
fn file_chunks(entry: Entry) -> Option<Vec<ChunkId>> {
    match entry.kind {
        EntryKind::File { chunks, .. } => Some(chunks),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packs_mostly_garbage_are_repacked() {
        let at = |pack: u8, len: u32| pack::Location { pack: [pack; 32], offset: 0, len };
        let records = vec![
            ([1; 32], at(1, 100)), // pack 1: all needed
            ([2; 32], at(2, 30)),  // pack 2: 30 of 100 needed -> repack
            ([3; 32], at(2, 70)),
            ([4; 32], at(3, 60)), // pack 3: 60 of 100 needed -> stays
            ([5; 32], at(3, 40)),
            ([6; 32], at(4, 10)), // pack 4: nothing needed -> deleted, not repacked
        ];
        let needed: BTreeSet<ChunkId> = [[1; 32], [2; 32], [4; 32]].into();
        let plan = repack_plan(&records, &needed);
        assert_eq!(plan.repack, [[2u8; 32]].into());
    }
}
