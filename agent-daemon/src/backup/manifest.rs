//! Snapshot manifests. A snapshot's file (`snapshots/<name>`) is a small
//! sealed head: the snapshot's name, set, times, paths, problems and
//! counts, and the ids of the chunks that hold its entries. The entries
//! themselves, encoded one after another, are cut by content-defined
//! chunking into ordinary chunks, stored, deduplicated, uploaded and
//! pruned like file content: the unchanged parts of a tree cost nothing in
//! the next snapshot, on the device and at the hub, and the hub learns
//! which chunks a snapshot needs (its list includes these) without the key.
//!
//! Older manifests (format 3's heads with entries of their time, and the
//! whole snapshot in the file, zstd-compressed or not) are still read,
//! through `legacy`.

use super::*;

/// First byte of a head's plaintext (format 4: entries with attributes,
/// hard links, special files and holes). An older agent takes no other
/// first byte than its own for a head, so it refuses this one as corrupt
/// instead of misreading it.
pub(crate) const HEAD_V4: u8 = 0xFD;
/// First byte of a format-3 head, whose entries are `legacy::Entry3`. A
/// compressed whole manifest starts with [`COMPRESSED_MANIFEST`], an
/// uncompressed one (the first format) with the length of the snapshot's
/// name, never this large.
pub(crate) const CHUNKED_MANIFEST: u8 = 0xFE;

/// How a head's entry chunks encode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryFormat {
    /// [`Entry`], today's.
    #[default]
    V4,
    /// `legacy::Entry3`.
    V3,
}

/// Chunk size bounds for the entries (bytes): about 140 entries a chunk,
/// so a change in one directory stores a few chunks again, not the list.
pub(crate) const ENTRY_MIN_CHUNK: usize = 8 << 10;
pub(crate) const ENTRY_AVG_CHUNK: usize = 32 << 10;
pub(crate) const ENTRY_MAX_CHUNK: usize = 128 << 10;

/// A snapshot without its entries: what its file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Its name.
    pub name: String,
    /// The backup set.
    pub set: String,
    /// When it started.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
    /// The set's paths at the time.
    pub paths: Vec<String>,
    /// What could not be backed up.
    pub problems: Vec<String>,
    /// What was passed over on purpose.
    pub notes: Vec<String>,
    /// Owners' names by id.
    pub users: BTreeMap<u32, String>,
    /// Groups' names by id.
    pub groups: BTreeMap<u32, String>,
    /// Bytes of file content.
    pub bytes: u64,
    /// Files read.
    pub files_read: u64,
    /// Chunks added.
    pub new_chunks: u64,
    /// Bytes those take.
    pub new_stored_bytes: u64,
    /// How many entries.
    pub entries: u64,
    /// What the entries carry beside content.
    pub carries: Carries,
    /// The chunks holding the entries, in order (none for an older,
    /// whole manifest).
    pub entry_chunks: Vec<ChunkId>,
    /// How those chunks encode entries (by the head's first byte).
    #[serde(skip)]
    pub entry_format: EntryFormat,
}

/// What a snapshot's entries carry beside file content, counted (for
/// `backup list` and `verify`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carries {
    /// Names that are hard links to an earlier entry.
    pub hard_links: u64,
    /// Entries with extended attributes (ACLs among them).
    pub with_xattrs: u64,
    /// FIFOs and devices.
    pub special: u64,
    /// Sparse files.
    pub sparse: u64,
}

impl Carries {
    /// Counts what `entries` carry.
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Carries {
        let mut c = Carries::default();
        for e in entries {
            c.with_xattrs += u64::from(!e.xattrs.is_empty());
            match &e.kind {
                EntryKind::HardLink { .. } => c.hard_links += 1,
                EntryKind::Fifo | EntryKind::Device { .. } => c.special += 1,
                EntryKind::File { data: Some(_), .. } => c.sparse += 1,
                _ => {}
            }
        }
        c
    }
}

impl std::fmt::Display for Carries {
    /// `3 hard links, 2 with attributes, 1 special, 1 sparse`, or `-`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            (self.hard_links, "hard link", "hard links"),
            (self.with_xattrs, "with attributes", "with attributes"),
            (self.special, "special", "special"),
            (self.sparse, "sparse", "sparse"),
        ]
        .into_iter()
        .filter(|(n, ..)| *n > 0)
        .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
        .collect();
        if parts.is_empty() { f.write_str("-") } else { f.write_str(&parts.join(", ")) }
    }
}

impl Head {
    /// The head of `snapshot` (entries counted, its entry chunks named).
    pub fn of(snapshot: &Snapshot) -> Head {
        Head {
            name: snapshot.name.clone(),
            set: snapshot.set.clone(),
            started: snapshot.started,
            ended: snapshot.ended,
            paths: snapshot.paths.clone(),
            problems: snapshot.problems.clone(),
            notes: snapshot.notes.clone(),
            users: snapshot.users.clone(),
            groups: snapshot.groups.clone(),
            bytes: snapshot.bytes,
            files_read: snapshot.files_read,
            new_chunks: snapshot.new_chunks,
            new_stored_bytes: snapshot.new_stored_bytes,
            entries: snapshot.entries.len() as u64,
            carries: Carries::of(&snapshot.entries),
            entry_chunks: snapshot.manifest_chunks.clone(),
            entry_format: EntryFormat::V4,
        }
    }

    /// The snapshot, given its entries.
    fn with(self, entries: Vec<Entry>) -> Snapshot {
        Snapshot {
            name: self.name,
            set: self.set,
            started: self.started,
            ended: self.ended,
            paths: self.paths,
            entries,
            problems: self.problems,
            notes: self.notes,
            users: self.users,
            groups: self.groups,
            bytes: self.bytes,
            files_read: self.files_read,
            new_chunks: self.new_chunks,
            new_stored_bytes: self.new_stored_bytes,
            manifest_chunks: self.entry_chunks,
        }
    }
}

/// A manifest as read from its file.
pub(super) enum Manifest {
    /// Format 3: the entries are in chunks.
    Chunked(Head),
    /// Older formats: everything in the file.
    Whole(Snapshot),
}

impl Manifest {
    /// The head (counted from the entries for an older manifest).
    pub(super) fn head(&self) -> Head {
        match self {
            Manifest::Chunked(head) => head.clone(),
            Manifest::Whole(snapshot) => Head::of(snapshot),
        }
    }
}

/// Cuts `entries`, encoded one after another, into content-defined chunks
/// and hands each to `store` (id, plaintext), in order; returns the ids.
/// At most two of the largest chunks are held: the cuts are those one
/// FastCDC pass over the whole encoding would make (a cut depends only on
/// the bytes from its chunk's start to at most the largest size after it).
pub(super) fn cut_entries<E: Serialize>(
    entries: &[E],
    id_key: &[u8; 32],
    mut store: impl FnMut(ChunkId, Vec<u8>) -> Result<(), BackupError>,
) -> Result<Vec<ChunkId>, BackupError> {
    let mut ids = Vec::new();
    let mut pending = Vec::with_capacity(2 * ENTRY_MAX_CHUNK + 4096);
    let mut cut = |pending: &mut Vec<u8>, all: bool| -> Result<(), BackupError> {
        let mut used = 0;
        for piece in fastcdc::v2020::FastCDC::new(pending, ENTRY_MIN_CHUNK, ENTRY_AVG_CHUNK, ENTRY_MAX_CHUNK) {
            if !all && piece.offset + ENTRY_MAX_CHUNK > pending.len() {
                break;
            }
            let bytes = &pending[piece.offset..piece.offset + piece.length];
            let id = *blake3::keyed_hash(id_key, bytes).as_bytes();
            store(id, bytes.to_vec())?;
            ids.push(id);
            used = piece.offset + piece.length;
        }
        pending.drain(..used);
        Ok(())
    };
    for (i, entry) in entries.iter().enumerate() {
        pending = postcard::to_extend(entry, pending)
            .map_err(|e| BackupError::Corrupt { what: format!("entry {i}"), why: e.to_string() })?;
        if pending.len() >= 2 * ENTRY_MAX_CHUNK {
            cut(&mut pending, false)?;
        }
    }
    cut(&mut pending, true)?;
    Ok(ids)
}

/// The entries `head` names, read chunk by chunk through `get` (from the
/// repository, or fetched from the hub): at most one chunk's worth of
/// undecoded bytes is held. Bounded: a manifest from the hub may have
/// been written by a compromised device.
pub(super) fn read_entries(
    head: Head,
    get: impl FnMut(&ChunkId) -> Result<Vec<u8>, BackupError>,
) -> Result<Snapshot, BackupError> {
    match head.entry_format {
        EntryFormat::V4 => read_entries_as::<Entry>(head, get),
        EntryFormat::V3 => read_entries_as::<legacy::Entry3>(head, get),
    }
}

/// [`read_entries`] of entries encoded as `E`.
fn read_entries_as<E: serde::de::DeserializeOwned + Into<Entry>>(
    head: Head,
    mut get: impl FnMut(&ChunkId) -> Result<Vec<u8>, BackupError>,
) -> Result<Snapshot, BackupError> {
    let corrupt = |why: String| BackupError::Corrupt { what: format!("snapshot {}", head.name), why };
    let mut entries = Vec::with_capacity(usize::try_from(head.entries).unwrap_or(usize::MAX).min(1 << 16));
    let (mut pending, mut total) = (Vec::new(), 0u64);
    let last = head.entry_chunks.len();
    for (i, id) in head.entry_chunks.iter().enumerate() {
        let plain = get(id)?;
        total += plain.len() as u64;
        if total > MAX_MANIFEST {
            return Err(corrupt("larger than any manifest may be".into()));
        }
        if pending.is_empty() {
            pending = plain
        } else {
            pending.extend_from_slice(&plain)
        }
        let mut rest = pending.as_slice();
        while (entries.len() as u64) < head.entries && !rest.is_empty() {
            match postcard::take_from_bytes::<E>(rest) {
                Ok((entry, after)) => {
                    entries.push(entry.into());
                    rest = after;
                }
                // An entry cut between chunks: the next chunk completes it.
                Err(_) if i + 1 < last => break,
                Err(e) => return Err(corrupt(format!("entry {}: {e}", entries.len()))),
            }
        }
        let used = pending.len() - rest.len();
        pending.drain(..used);
    }
    if entries.len() as u64 != head.entries || !pending.is_empty() {
        return Err(corrupt(format!(
            "{} entries and {} bytes left in its chunks, the head says {}",
            entries.len(),
            pending.len(),
            head.entries
        )));
    }
    Ok(head.with(entries))
}

impl Repository {
    /// A head's sealed bytes: [`HEAD_V4`], then its postcard
    /// encoding. The entry chunks it names must be stored already.
    pub(super) fn encode_head(&self, head: &Head) -> Result<Vec<u8>, BackupError> {
        let mut plain = vec![HEAD_V4];
        plain = postcard::to_extend(head, plain)
            .map_err(|e| BackupError::Corrupt { what: format!("snapshot {}", head.name), why: e.to_string() })?;
        self.seal(&plain, head.name.as_bytes())
    }

    /// Decrypts a manifest (from this repository or the hub) and decodes
    /// what its file holds.
    pub(super) fn open_manifest(&self, name: &str, blob: &[u8]) -> Result<Manifest, BackupError> {
        let plain = self.open_blob(blob, name.as_bytes(), &format!("snapshot {name}"))?;
        decode_manifest(name, &plain)
    }
}

/// Decodes what a manifest file holds once decrypted: a head (format 4 or
/// 3) or a whole snapshot (zstd or plain, older agents), checked to carry
/// `name`.
pub(super) fn decode_manifest(name: &str, plain: &[u8]) -> Result<Manifest, BackupError> {
    let what = format!("snapshot {name}");
    let corrupt = |why: String| BackupError::Corrupt { what: what.clone(), why };
    let manifest = match plain.split_first() {
        Some((&HEAD_V4, head)) => Manifest::Chunked(postcard::from_bytes(head).map_err(|e| corrupt(e.to_string()))?),
        Some((&CHUNKED_MANIFEST, head)) => {
            Manifest::Chunked(postcard::from_bytes::<legacy::Head3>(head).map_err(|e| corrupt(e.to_string()))?.into())
        }
        Some((&COMPRESSED_MANIFEST, compressed)) => {
            let mut out = Vec::new();
            zstd::stream::read::Decoder::new(compressed)
                .and_then(|d| d.take(MAX_MANIFEST + 1).read_to_end(&mut out))
                .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
            if out.len() as u64 > MAX_MANIFEST {
                return Err(corrupt("larger than any manifest may be".into()));
            }
            Manifest::Whole(postcard::from_bytes::<legacy::Snapshot3>(&out).map_err(|e| corrupt(e.to_string()))?.into())
        }
        _ => Manifest::Whole(
            postcard::from_bytes::<legacy::Snapshot3>(plain).map_err(|e| corrupt(e.to_string()))?.into(),
        ),
    };
    match &manifest {
        Manifest::Chunked(Head { name: inside, .. }) | Manifest::Whole(Snapshot { name: inside, .. })
            if inside != name =>
        {
            Err(corrupt(format!("names itself {inside}")))
        }
        _ => Ok(manifest),
    }
}

impl Repository {
    /// A snapshot whole, its entries read through `get`.
    pub(super) fn decode_snapshot_with(
        &self,
        name: &str,
        blob: &[u8],
        get: impl FnMut(&ChunkId) -> Result<Vec<u8>, BackupError>,
    ) -> Result<Snapshot, BackupError> {
        match self.open_manifest(name, blob)? {
            Manifest::Chunked(head) => read_entries(head, get),
            Manifest::Whole(snapshot) => Ok(snapshot),
        }
    }

    /// A snapshot's head alone: no entry is read.
    pub fn snapshot_head(&self, name: &str) -> Result<Head, BackupError> {
        Ok(self.open_manifest(name, &self.snapshot_blob(name)?)?.head())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            path: format!("/srv/data/dir{:03}/file-{i:06}.txt", i / 100),
            kind: EntryKind::File {
                size: i as u64 * 37,
                inode: i as u64,
                chunks: vec![[(i % 251) as u8; 32]],
                data: None,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            xattrs: Vec::new(),
        }
    }

    fn cut(entries: &[Entry]) -> (Vec<ChunkId>, HashMap<ChunkId, Vec<u8>>) {
        let mut stored = HashMap::new();
        let ids = cut_entries(entries, &[9; 32], |id, bytes| {
            stored.insert(id, bytes);
            Ok(())
        })
        .unwrap();
        (ids, stored)
    }

    fn head(name: &str, entries: usize, entry_chunks: Vec<ChunkId>) -> Head {
        Head {
            name: name.into(),
            set: "s".into(),
            started: Timestamp(1),
            ended: Timestamp(2),
            paths: vec![],
            problems: vec![],
            notes: vec![],
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            bytes: 0,
            files_read: 0,
            new_chunks: 0,
            new_stored_bytes: 0,
            entries: entries as u64,
            carries: Carries::default(),
            entry_chunks,
            entry_format: EntryFormat::V4,
        }
    }

    #[test]
    fn entries_round_trip_through_chunks_cut_as_one_pass_would() {
        let entries: Vec<Entry> = (0..20_000).map(entry).collect();
        let (ids, stored) = cut(&entries);
        assert!(ids.len() > 10, "{} chunks", ids.len());
        // The same cuts as one pass over the whole encoding.
        let mut whole = Vec::new();
        for e in &entries {
            whole = postcard::to_extend(e, whole).unwrap();
        }
        let one_pass: Vec<ChunkId> =
            fastcdc::v2020::FastCDC::new(&whole, ENTRY_MIN_CHUNK, ENTRY_AVG_CHUNK, ENTRY_MAX_CHUNK)
                .map(|c| *blake3::keyed_hash(&[9; 32], &whole[c.offset..c.offset + c.length]).as_bytes())
                .collect();
        assert_eq!(ids, one_pass);
        let back = read_entries(head("n", entries.len(), ids.clone()), |id| Ok(stored[id].clone())).unwrap();
        assert_eq!(back.entries, entries);
        assert_eq!(back.manifest_chunks, ids);
        // Nothing at all: no chunk.
        assert!(cut(&[]).0.is_empty());
        assert!(read_entries(head("n", 0, vec![]), |_| unreachable!()).unwrap().entries.is_empty());
    }

    #[test]
    fn a_change_in_one_place_stores_a_few_entry_chunks_again() {
        let mut entries: Vec<Entry> = (0..20_000).map(entry).collect();
        let (before, _) = cut(&entries);
        entries[10_000].mtime_ns += 1;
        entries.insert(12_000, entry(99_999));
        let (after, _) = cut(&entries);
        let old: HashSet<ChunkId> = before.iter().copied().collect();
        let new = after.iter().filter(|id| !old.contains(*id)).count();
        assert!(new <= 4, "{new} of {} chunks are new", after.len());
    }

    #[test]
    fn entry_chunks_that_do_not_match_the_head_are_refused() {
        let entries: Vec<Entry> = (0..3_000).map(entry).collect();
        let (ids, stored) = cut(&entries);
        let get = |id: &ChunkId| Ok(stored[id].clone());
        // Fewer entries than the head says, more, a chunk left out.
        for (count, chunks) in [(3_001, ids.clone()), (2_999, ids.clone()), (3_000, ids[..ids.len() - 1].to_vec())] {
            let err = read_entries(head("n", count, chunks), get).unwrap_err().to_string();
            assert!(err.contains("corrupt snapshot n"), "{err}");
        }
        // A chunk of garbage.
        let err = read_entries(head("n", 3_000, ids.clone()), |_| Ok(vec![0xFF; 64])).unwrap_err().to_string();
        assert!(err.contains("corrupt snapshot n"), "{err}");
    }
}
