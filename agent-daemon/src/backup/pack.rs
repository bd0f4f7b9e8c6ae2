//! Pack files and their on-disk index.
//!
//! Chunks are not stored one file each (on a tree of small files that
//! costs a file, a rename and half a block per chunk) but appended to pack
//! files: `packs/<2 hex>/<64 hex>`, the name being the BLAKE3 hash of the
//! pack's bytes, the content the chunks' blobs one after another. Each
//! writer thread fills its own pack (a temporary file of its own) up to
//! [`PACK_TARGET`] and renames it into place when full or at the end of
//! the run.
//!
//! Where each chunk is: index segments `index/<name>`, each a sorted array
//! of fixed-size records (chunk id, pack id, offset, length) after a magic
//! line. A run writes one segment for the chunks it stored, after the
//! `syncfs` that made its packs durable and before its manifest: a chunk is
//! in the index only once its pack is on disk whole, so a crash leaves at
//! most packs no segment names, which prune deletes. Lookups keep only
//! every [`FENCE`]th id of a segment in memory and read one block of
//! records from the file, so the index is never held whole in memory.

use super::*;
use std::os::unix::fs::FileExt;

/// A pack is closed once it holds this many bytes.
pub(super) const PACK_TARGET: u64 = 16 << 20;
/// One id of this many records is kept in memory per segment.
const FENCE: usize = 64;
/// Records read at once when a segment is read through (a multiple of
/// [`FENCE`], so every block starts at a fence).
const BLOCK_RECORDS: usize = FENCE * 64;
const MAGIC: &[u8; 8] = b"OPIDX01\n";
const RECORD: usize = 32 + 32 + 4 + 4;

/// Where a chunk's blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// The pack's id (its file name).
    pub pack: [u8; 32],
    /// Offset of the blob in the pack.
    pub offset: u32,
    /// Length of the blob.
    pub len: u32,
}

/// One index record.
pub(super) type Record = (ChunkId, Location);

fn encode_record((id, at): &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(id);
    out.extend_from_slice(&at.pack);
    out.extend_from_slice(&at.offset.to_le_bytes());
    out.extend_from_slice(&at.len.to_le_bytes());
}

fn decode_record(bytes: &[u8]) -> Option<Record> {
    let id: ChunkId = bytes.get(..32)?.try_into().ok()?;
    let pack: [u8; 32] = bytes.get(32..64)?.try_into().ok()?;
    let offset = u32::from_le_bytes(bytes.get(64..68)?.try_into().ok()?);
    let len = u32::from_le_bytes(bytes.get(68..72)?.try_into().ok()?);
    Some((id, Location { pack, offset, len }))
}

/// The bytes of a segment holding `records` (sorted here).
pub(super) fn encode_segment(mut records: Vec<Record>) -> Vec<u8> {
    records.sort_unstable_by_key(|r| r.0);
    records.dedup_by(|a, b| a.0 == b.0);
    let mut out = Vec::with_capacity(MAGIC.len() + records.len() * RECORD);
    out.extend_from_slice(MAGIC);
    for r in &records {
        encode_record(r, &mut out);
    }
    out
}

/// An open index segment: its file and every [`FENCE`]th id.
pub(super) struct Segment {
    pub(super) path: PathBuf,
    file: fs::File,
    records: usize,
    fences: Vec<ChunkId>,
}

impl Segment {
    /// Opens a segment, reading its ids once to keep the fences.
    pub(super) fn open(path: &Path) -> Result<Self, BackupError> {
        let file = fs::File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len() as usize;
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0).map_err(io(path))?;
        if &magic != MAGIC || len < MAGIC.len() || !(len - MAGIC.len()).is_multiple_of(RECORD) {
            return Err(BackupError::Corrupt {
                what: format!("index {}", path.display()),
                why: "not an index segment".into(),
            });
        }
        let records = (len - MAGIC.len()) / RECORD;
        let mut fences = Vec::with_capacity(records / FENCE + 1);
        // Read in large blocks, in order: a 32-byte read per fence (one
        // every 4.5 KiB) is a separate disk read each on a cold cache, which
        // cost 67 ms for a 3 MB segment at the start of every run.
        let mut buf = vec![0u8; BLOCK_RECORDS * RECORD];
        let mut at = 0;
        while at < records {
            let n = BLOCK_RECORDS.min(records - at);
            file.read_exact_at(&mut buf[..n * RECORD], (MAGIC.len() + at * RECORD) as u64).map_err(io(path))?;
            for record in buf[..n * RECORD].chunks_exact(RECORD).step_by(FENCE) {
                fences.push(record[..32].try_into().unwrap_or([0u8; 32]));
            }
            at += n;
        }
        Ok(Segment { path: path.to_owned(), file, records, fences })
    }

    /// Where `id` is, if this segment has it: one block read.
    pub(super) fn lookup(&self, id: &ChunkId) -> Result<Option<Location>, BackupError> {
        let block = match self.fences.binary_search(id) {
            Ok(i) => i,
            Err(0) => return Ok(None),
            Err(i) => i - 1,
        };
        let first = block * FENCE;
        let count = FENCE.min(self.records - first);
        let mut buf = vec![0u8; count * RECORD];
        self.file.read_exact_at(&mut buf, (MAGIC.len() + first * RECORD) as u64).map_err(io(&self.path))?;
        let found = buf
            .chunks_exact(RECORD)
            .map(|r| r[..32].try_into().unwrap_or([0u8; 32]))
            .collect::<Vec<ChunkId>>()
            .binary_search(id);
        Ok(found.ok().and_then(|i| decode_record(&buf[i * RECORD..(i + 1) * RECORD]).map(|r| r.1)))
    }

    /// Every record, in id order (verify, prune), read in blocks.
    pub(super) fn records(&self) -> Result<Vec<Record>, BackupError> {
        let mut out = Vec::with_capacity(self.records);
        let mut buf = vec![0u8; BLOCK_RECORDS * RECORD];
        let mut at = 0;
        while at < self.records {
            let n = BLOCK_RECORDS.min(self.records - at);
            self.file
                .read_exact_at(&mut buf[..n * RECORD], (MAGIC.len() + at * RECORD) as u64)
                .map_err(io(&self.path))?;
            out.extend(buf[..n * RECORD].chunks_exact(RECORD).filter_map(decode_record));
            at += n;
        }
        Ok(out)
    }
}

/// A pack being filled by one writer: a temporary file of its own.
pub(super) struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: fs::File,
    hasher: blake3::Hasher,
    size: u64,
    chunks: Vec<(ChunkId, u32, u32)>,
}

impl PackWriter {
    /// A new, empty pack under `root`.
    pub(super) fn new(root: &Path) -> Result<Self, BackupError> {
        let tmp = root.join("tmp").join(format!("{}.pack", unique_suffix()));
        let file = fs::File::create_new(&tmp).map_err(io(&tmp))?;
        Ok(PackWriter {
            dir: root.join("packs"),
            tmp,
            file,
            hasher: blake3::Hasher::new(),
            size: 0,
            chunks: Vec::new(),
        })
    }

    /// Appends a chunk's blob. Returns true once the pack is full.
    pub(super) fn add(&mut self, id: ChunkId, blob: &[u8]) -> Result<bool, BackupError> {
        let len = u32::try_from(blob.len())
            .map_err(|_| BackupError::Corrupt { what: format!("chunk {}", hex(&id)), why: "blob too large".into() })?;
        let offset = u32::try_from(self.size)
            .map_err(|_| BackupError::Corrupt { what: "pack".into(), why: "pack too large".into() })?;
        self.file.write_all(blob).map_err(io(&self.tmp))?;
        self.hasher.update(blob);
        self.size += blob.len() as u64;
        self.chunks.push((id, offset, len));
        Ok(self.size >= PACK_TARGET)
    }

    /// Puts the pack in place (not synced: the run syncs the file system
    /// once) and returns its chunks' locations.
    pub(super) fn finish(self) -> Result<Vec<Record>, BackupError> {
        if self.chunks.is_empty() {
            let _ = fs::remove_file(&self.tmp);
            return Ok(Vec::new());
        }
        start_writeback(&self.file);
        let pack: [u8; 32] = *self.hasher.finalize().as_bytes();
        let path = pack_path(&self.dir, &pack);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::rename(&self.tmp, &path).map_err(io(&path))?;
        Ok(self.chunks.into_iter().map(|(id, offset, len)| (id, Location { pack, offset, len })).collect())
    }
}

/// Where pack `id` lives under `packs_dir`.
pub(super) fn pack_path(packs_dir: &Path, id: &[u8; 32]) -> PathBuf {
    let h = hex(id);
    packs_dir.join(&h[..2]).join(h)
}

/// Reads one blob from a pack.
pub(super) fn read_blob(packs_dir: &Path, at: &Location) -> Result<Vec<u8>, BackupError> {
    let path = pack_path(packs_dir, &at.pack);
    let file = fs::File::open(&path).map_err(io(&path))?;
    read_at(&file, at).map_err(io(&path))
}

/// Largest blob a pack can hold: a raw chunk of the largest size, its flag
/// byte, nonce and tag, with room to spare. A record saying more is corrupt.
const MAX_BLOB: u32 = (MAX_CHUNK as u32) + 4096;

/// Reads one blob from an open pack.
pub(super) fn read_at(file: &fs::File, at: &Location) -> std::io::Result<Vec<u8>> {
    if at.len > MAX_BLOB {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("index record says {} bytes, more than any chunk's blob", at.len),
        ));
    }
    let mut blob = vec![0u8; at.len as usize];
    file.read_exact_at(&mut blob, u64::from(at.offset))?;
    Ok(blob)
}

use super::repo::start_writeback;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_find_every_record_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // More than two blocks of the read-through, so fences cross blocks.
        let n = 2 * BLOCK_RECORDS + 1000;
        let records: Vec<Record> = (0..n as u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&(i * 7919 % 100_003).to_be_bytes());
                (id, Location { pack: [i as u8; 32], offset: i, len: i + 1 })
            })
            .collect();
        let path = dir.path().join("seg");
        fs::write(&path, encode_segment(records.clone())).unwrap();
        let seg = Segment::open(&path).unwrap();
        for (id, at) in &records {
            assert_eq!(seg.lookup(id).unwrap().as_ref(), Some(at));
        }
        assert_eq!(seg.lookup(&[0xFF; 32]).unwrap(), None);
        assert_eq!(seg.lookup(&[0; 32]).unwrap().map(|a| a.offset), Some(0), "id 0 is record 0");
        let mut missing = [0u8; 32];
        missing[..4].copy_from_slice(&100_004u32.to_be_bytes());
        assert_eq!(seg.lookup(&missing).unwrap(), None);
        assert_eq!(seg.records().unwrap().len(), n);
        assert_eq!(seg.fences.len(), n.div_ceil(FENCE), "one fence per {FENCE} records");
        fs::write(&path, b"garbage").unwrap();
        assert!(Segment::open(&path).is_err());
    }
}
