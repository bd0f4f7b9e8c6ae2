//! Snapshots of repository formats 1 to 3, still read: their entries knew
//! no extended attributes, hard links, special files or holes, and their
//! heads no owner names. Each type decodes exactly as it was written and
//! becomes today's type; nothing is written in these formats any more.

use super::*;

/// An entry as formats 1 to 3 encoded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Entry3 {
    path: String,
    kind: EntryKind3,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum EntryKind3 {
    Dir,
    File { size: u64, inode: u64, chunks: Vec<ChunkId> },
    Symlink { target: String },
}

impl From<Entry3> for Entry {
    fn from(e: Entry3) -> Entry {
        let kind = match e.kind {
            EntryKind3::Dir => EntryKind::Dir,
            EntryKind3::File { size, inode, chunks } => EntryKind::File { size, inode, chunks, data: None },
            EntryKind3::Symlink { target } => EntryKind::Symlink { target },
        };
        Entry { path: e.path, kind, mode: e.mode, uid: e.uid, gid: e.gid, mtime_ns: e.mtime_ns, xattrs: Vec::new() }
    }
}

impl Entry3 {
    /// The format-3 form of `entry` (tests write old snapshots with it);
    /// `None` for what format 3 could not hold.
    #[cfg(test)]
    pub(super) fn of(entry: &Entry) -> Option<Entry3> {
        let kind = match &entry.kind {
            EntryKind::Dir => EntryKind3::Dir,
            EntryKind::File { size, inode, chunks, data: None } => {
                EntryKind3::File { size: *size, inode: *inode, chunks: chunks.clone() }
            }
            EntryKind::Symlink { target } => EntryKind3::Symlink { target: target.clone() },
            _ => return None,
        };
        Some(Entry3 {
            path: entry.path.clone(),
            kind,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime_ns: entry.mtime_ns,
        })
    }
}

/// A whole manifest of formats 1 and 2: the snapshot with its entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Snapshot3 {
    pub(super) name: String,
    pub(super) set: String,
    pub(super) started: Timestamp,
    pub(super) ended: Timestamp,
    pub(super) paths: Vec<String>,
    pub(super) entries: Vec<Entry3>,
    pub(super) problems: Vec<String>,
    pub(super) bytes: u64,
    pub(super) files_read: u64,
    pub(super) new_chunks: u64,
    pub(super) new_stored_bytes: u64,
}

impl From<Snapshot3> for Snapshot {
    fn from(s: Snapshot3) -> Snapshot {
        Snapshot {
            name: s.name,
            set: s.set,
            started: s.started,
            ended: s.ended,
            paths: s.paths,
            entries: s.entries.into_iter().map(Entry::from).collect(),
            problems: s.problems,
            notes: Vec::new(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            bytes: s.bytes,
            files_read: s.files_read,
            new_chunks: s.new_chunks,
            new_stored_bytes: s.new_stored_bytes,
            manifest_chunks: Vec::new(),
        }
    }
}

/// A head of format 3 (entries in chunks, encoded as [`Entry3`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Head3 {
    pub(super) name: String,
    set: String,
    started: Timestamp,
    ended: Timestamp,
    paths: Vec<String>,
    problems: Vec<String>,
    bytes: u64,
    files_read: u64,
    new_chunks: u64,
    new_stored_bytes: u64,
    entries: u64,
    entry_chunks: Vec<ChunkId>,
}

impl From<Head3> for Head {
    fn from(h: Head3) -> Head {
        Head {
            name: h.name,
            set: h.set,
            started: h.started,
            ended: h.ended,
            paths: h.paths,
            problems: h.problems,
            notes: Vec::new(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            bytes: h.bytes,
            files_read: h.files_read,
            new_chunks: h.new_chunks,
            new_stored_bytes: h.new_stored_bytes,
            entries: h.entries,
            carries: Carries::default(),
            entry_chunks: h.entry_chunks,
            entry_format: manifest::EntryFormat::V3,
        }
    }
}

impl Head3 {
    /// The format-3 head of `head` (tests write old snapshots with it).
    #[cfg(test)]
    pub(super) fn of(head: &Head) -> Head3 {
        Head3 {
            name: head.name.clone(),
            set: head.set.clone(),
            started: head.started,
            ended: head.ended,
            paths: head.paths.clone(),
            problems: head.problems.clone(),
            bytes: head.bytes,
            files_read: head.files_read,
            new_chunks: head.new_chunks,
            new_stored_bytes: head.new_stored_bytes,
            entries: head.entries,
            entry_chunks: head.entry_chunks.clone(),
        }
    }
}
