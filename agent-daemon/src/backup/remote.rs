//! The hub's side of backups as the device sees it: upload of what the hub
//! lacks, and restore of a snapshot fetched from the hub.

use super::repo::lock_exclusive;
use super::*;

/// What one upload did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadReport {
    /// Snapshots catalogued at the hub.
    pub snapshots: Vec<String>,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Bytes of chunks sent.
    pub bytes_sent: u64,
    /// Chunks the hub already had.
    pub chunks_present: u64,
}

/// The hub's connection for this device: identity from the data dir, hub
/// address from the config or enrollment.
pub struct HubLink {
    client: BulkClient,
    device: DeviceId,
    runtime: tokio::runtime::Runtime,
    /// Upload budget in bytes per second (`[backups] upload_rate`); 0 is
    /// unlimited.
    upload_rate: u64,
}

/// Whether a transfer with `streams` streams and about `bytes` of chunks
/// in flight (or fetched and not yet used) may open another: many at once,
/// but never more than [`BYTES_IN_FLIGHT`] (one stream always, however
/// large its chunks). Pure.
pub fn may_send_more(streams: usize, bytes: u64) -> bool {
    streams < STREAMS_IN_FLIGHT && (streams == 0 || bytes < BYTES_IN_FLIGHT)
}

/// Whether a batch of `count` chunks of `bytes` on one stream is full (see
/// [`CHUNKS_PER_STREAM`]). Pure.
pub fn batch_full(count: usize, bytes: u64) -> bool {
    count >= CHUNKS_PER_STREAM || (count > 0 && bytes >= BYTES_PER_STREAM)
}

/// How long to wait before a send that brings the bytes sent since `start`
/// to `total`, so that they stay within `rate` bytes per second (0: no
/// limit). Pure.
pub fn pace(total: u64, rate: u64, elapsed: std::time::Duration) -> std::time::Duration {
    if rate == 0 {
        return std::time::Duration::ZERO;
    }
    let due = std::time::Duration::try_from_secs_f64(total as f64 / rate as f64).unwrap_or(std::time::Duration::MAX);
    due.saturating_sub(elapsed)
}

impl HubLink {
    /// Connects to the hub over a bulk connection.
    pub fn connect(data_dir: &Path, uplink: &crate::config::UplinkConfig) -> Result<Self, BackupError> {
        let identity = crate::identity::Identity::load(data_dir)
            .map_err(|e| BackupError::Setup(format!("this device's identity (is it enrolled?): {e}")))?;
        let hub = uplink.hub.clone().unwrap_or_else(|| identity.hub.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| BackupError::Setup(format!("cannot start the tokio runtime: {e}")))?;
        let timings = crate::tls::Timings { keepalive: uplink.keepalive, idle_timeout: uplink.idle_timeout };
        // Several hubs of one fleet share the chunk directory: any answers.
        let hubs =
            outpost_shared::config::hub_order(&outpost_shared::config::hub_addresses(&hub), None, rand::random());
        let client = runtime.block_on(async {
            let mut last = None;
            for addr in &hubs {
                match BulkClient::connect(&identity, addr, uplink.connect_timeout, timings).await {
                    Ok(client) => return Ok(client),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| BulkError::Connect { addr: hub.clone(), reason: "no hub address".into() }))
        })?;
        Ok(HubLink { client, device: identity.device_id, runtime, upload_rate: 0 })
    }

    /// Limits uploads to `bytes_per_sec` (0: no limit).
    pub fn with_upload_rate(mut self, bytes_per_sec: u64) -> Self {
        self.upload_rate = bytes_per_sec;
        self
    }

    pub(super) fn request(&self, message: Message) -> Result<Message, BulkError> {
        self.runtime.block_on(self.client.request(message))
    }

    /// The snapshots the hub holds of `device`, oldest first.
    pub(super) fn catalog(&self, device: &DeviceId) -> Result<Vec<SnapshotSummary>, BackupError> {
        match self.request(Message::ListBackups(device.clone()))? {
            Message::Backups(list) => Ok(list),
            other => Err(BulkError::Unexpected(other.kind(), "ListBackups").into()),
        }
    }

    /// The ids among `ids` the hub lacks.
    pub(super) fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, BackupError> {
        let mut missing = Vec::new();
        for part in ids.chunks(IDS_PER_QUERY) {
            match self.request(Message::HaveChunks(ChunkIds { ids: part.to_vec() }))? {
                Message::MissingChunks(m) => missing.extend(m.ids),
                other => return Err(BulkError::Unexpected(other.kind(), "HaveChunks").into()),
            }
        }
        Ok(missing)
    }

    /// Closes the connection.
    pub fn close(self) {
        let HubLink { client, runtime, .. } = self;
        runtime.block_on(client.close());
    }
}

pub(super) fn expect_done(answer: Result<Message, BulkError>, request: &'static str) -> Result<(), BackupError> {
    match answer? {
        Message::Done => Ok(()),
        other => Err(BulkError::Unexpected(other.kind(), request).into()),
    }
}

impl Repository {
    pub(super) fn pending_flag(&self) -> PathBuf {
        self.root.join(UPLOAD_PENDING)
    }

    /// Marks that snapshots wait for upload.
    pub fn mark_pending(&self) {
        let flag = self.pending_flag();
        if let Err(e) = fs::write(&flag, b"") {
            tracing::warn!(path = %flag.display(), error = %e, "Cannot mark a pending upload.");
        }
    }

    /// Sends the hub every snapshot of an uploading set it does not have,
    /// oldest first, each after the chunks it lacks. The pending mark goes
    /// only when everything is up and no backup marked it again meanwhile;
    /// a failed or killed upload leaves it, so the daemon tries again. One upload at a time (`upload.lock`): a
    /// second one waits, then finds little left to send.
    pub fn upload(&self, sets: &[BackupSet], hub: &HubLink) -> Result<UploadReport, BackupError> {
        let lock_path = self.root.join("upload.lock");
        let lock =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock_exclusive(&lock).map_err(io(&lock_path))?;
        let flag = self.pending_flag();
        let marked = || fs::metadata(&flag).and_then(|m| m.modified()).ok();
        let before = marked();
        let report = self.upload_all(sets, hub).inspect_err(|_| self.mark_pending())?;
        // Marked again meanwhile (a backup ended): keep the mark.
        if marked() == before {
            let _ = fs::remove_file(&flag);
        }
        Ok(report)
    }

    pub(super) fn upload_all(&self, sets: &[BackupSet], hub: &HubLink) -> Result<UploadReport, BackupError> {
        let uploading: BTreeSet<&str> = sets.iter().filter(|s| s.upload).map(|s| s.name.as_str()).collect();
        let at_hub: BTreeSet<String> = hub.catalog(&hub.device)?.into_iter().map(|s| s.name).collect();
        let mut report = UploadReport::default();
        for name in self.snapshot_names()? {
            if at_hub.contains(&name) {
                continue;
            }
            // The head tells the set; only snapshots to upload are read whole.
            let snapshot = match self.snapshot_head(&name) {
                Ok(head) if !uploading.contains(head.set.as_str()) => continue,
                Ok(_) => self.snapshot(&name),
                Err(e) => Err(e),
            };
            let snapshot = match snapshot {
                Ok(s) => s,
                // Pruned since the listing.
                Err(BackupError::NoSnapshot(_)) => continue,
                Err(e) => return Err(e),
            };
            if self.upload_snapshot(&snapshot, hub, &mut report)? {
                report.snapshots.push(name);
            }
        }
        Ok(report)
    }

    /// Uploads one snapshot; false if it was pruned meanwhile.
    pub(super) fn upload_snapshot(
        &self,
        snapshot: &Snapshot,
        hub: &HubLink,
        report: &mut UploadReport,
    ) -> Result<bool, BackupError> {
        // Every chunk it needs: those of its entries, then its files'.
        let mut seen = BTreeSet::new();
        let files = snapshot.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => Some(chunks.iter()),
            _ => None,
        });
        let ids: Vec<ChunkId> =
            snapshot.manifest_chunks.iter().chain(files.flatten()).filter(|id| seen.insert(**id)).copied().collect();
        // The list first: the hub keeps every chunk on it while this upload
        // runs, and keeps the list with the snapshot for its retention.
        let parts: Vec<&[ChunkId]> = if ids.is_empty() { vec![&[]] } else { ids.chunks(IDS_PER_QUERY).collect() };
        for (i, part) in parts.into_iter().enumerate() {
            let list = SnapshotChunkList { name: snapshot.name.clone(), first: i == 0, ids: part.to_vec() };
            expect_done(hub.request(Message::SnapshotChunks(list)), "SnapshotChunks")?;
        }
        let missing = hub.missing(&ids)?;
        report.chunks_present += (ids.len() - missing.len()) as u64;
        // Batches of chunks, each on a stream of its own, several streams
        // at once.
        let sent: Result<(u64, u64), BackupError> = hub.runtime.block_on(async {
            let mut in_flight = tokio::task::JoinSet::new();
            let (mut chunks, mut bytes) = (0u64, 0u64);
            let mut next = missing.iter();
            let started = tokio::time::Instant::now();
            let (mut queued, mut bytes_in_flight) = (0u64, 0u64);
            loop {
                while may_send_more(in_flight.len(), bytes_in_flight) {
                    let (mut batch, mut batch_bytes) = (Vec::new(), 0u64);
                    while !batch_full(batch.len(), batch_bytes) {
                        let Some(id) = next.next() else { break };
                        let Some(blob) = self.chunk_blob(id)? else {
                            if !self.root.join("snapshots").join(&snapshot.name).exists() {
                                return Ok((chunks, bytes));
                            }
                            return Err(BackupError::Corrupt {
                                what: format!("chunk {}", hex(id)),
                                why: format!(
                                    "missing in the local repository, needed by {} (run verify)",
                                    snapshot.name
                                ),
                            });
                        };
                        queued += blob.len() as u64;
                        batch_bytes += blob.len() as u64;
                        // No timer when within the budget: tokio's timer has a
                        // millisecond tick, so even a zero sleep waited for the
                        // next one and held an upload to about 850 chunks a second.
                        let wait = pace(queued, hub.upload_rate, started.elapsed());
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        batch.push(Message::PutChunk(ChunkBlob { id: *id, blob }));
                    }
                    if batch.is_empty() {
                        break;
                    }
                    let client = hub.client.clone();
                    bytes_in_flight += batch_bytes;
                    in_flight.spawn(async move { (client.requests(batch).await, batch_bytes) });
                }
                let Some(done) = in_flight.join_next().await else { break };
                let (answers, batch_bytes) =
                    done.map_err(|e| BackupError::Setup(format!("upload task failed: {e}")))?;
                bytes_in_flight -= batch_bytes;
                for answer in answers? {
                    expect_done(answer, "PutChunk")?;
                    chunks += 1;
                }
                bytes += batch_bytes;
            }
            Ok((chunks, bytes))
        });
        let (chunks, bytes) = sent?;
        report.chunks_sent += chunks;
        report.bytes_sent += bytes;
        let manifest = match self.snapshot_blob(&snapshot.name) {
            Ok(m) => m,
            Err(BackupError::NoSnapshot(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let left = hub.missing(&ids)?;
        if !left.is_empty() {
            return Err(BulkError::Transfer(format!(
                "the hub still lacks {} chunk(s) of {}",
                left.len(),
                snapshot.name
            ))
            .into());
        }
        let summary = SnapshotSummary {
            name: snapshot.name.clone(),
            set: snapshot.set.clone(),
            started: snapshot.started,
            ended: snapshot.ended,
            entries: snapshot.entries.len() as u64,
            bytes: snapshot.bytes,
            chunks: ids.len() as u64,
            problems: snapshot.problems.len() as u64,
        };
        expect_done(hub.request(Message::PutSnapshot(SnapshotData { summary, manifest })), "PutSnapshot")?;
        Ok(true)
    }

    /// Restores `owner`'s snapshot (a name or `latest`, of `set` if given)
    /// from the hub into `target`: manifest and chunks are fetched and
    /// checked here, with this repository's key (the fleet backup key).
    pub fn restore_from_hub(
        &self,
        hub: &HubLink,
        owner: &DeviceId,
        name: &str,
        set: Option<&str>,
        to: &RestoreTo<'_>,
    ) -> Result<(String, Restored), BackupError> {
        let only = to.only;
        let catalog = hub.catalog(owner)?;
        let summary = catalog
            .iter()
            .rev()
            .find(|s| if name == "latest" { set.is_none_or(|set| s.set == set) } else { s.name == name })
            .ok_or_else(|| BackupError::NoSnapshot(format!("{name} of {owner} at the hub")))?;
        let data = match hub
            .request(Message::GetSnapshot(SnapshotRef { device: owner.clone(), name: summary.name.clone() }))?
        {
            Message::Snapshot(data) => data,
            other => return Err(BulkError::Unexpected(other.kind(), "GetSnapshot").into()),
        };
        // The entries, then the files' chunks, each fetched ahead.
        let snapshot = match self.open_manifest(&summary.name, &data.manifest)? {
            manifest::Manifest::Whole(snapshot) => snapshot,
            manifest::Manifest::Chunked(head) => {
                let sized = head.entry_chunks.iter().map(|id| (*id, manifest::ENTRY_AVG_CHUNK as u64)).collect();
                let ahead = hub.fetch_ahead(owner, sized);
                manifest::read_entries(head, |id| ahead.get(self, id))?
            }
        };
        // Each chunk in the order the restore reads it.
        let order = restore::chunk_order(&snapshot, only);
        let ahead = hub.fetch_ahead(owner, order);
        // One worker: the fetcher sends chunks in its order.
        let restored = self.restore_with(&snapshot, to, 1, &|id: &ChunkId| ahead.get(self, id));
        Ok((snapshot.name, restored?))
    }
}

/// Chunks of one device fetched from the hub ahead of their use, several
/// at once (see [`may_send_more`]), in the order they are needed: a
/// restore over a slow link is not one round trip per chunk. Dropping it
/// stops the fetching.
pub(super) struct FetchAhead {
    arrived: std::sync::Mutex<tokio::sync::mpsc::Receiver<(ChunkId, Result<Message, BulkError>)>>,
    fetcher: tokio::task::JoinHandle<()>,
}

impl HubLink {
    /// Starts fetching `owner`'s chunks `order` (each with its expected
    /// size), in that order, in batches on streams of their own.
    pub(super) fn fetch_ahead(&self, owner: &DeviceId, order: Vec<(ChunkId, u64)>) -> FetchAhead {
        // Fetched batches wait in `ahead`, counted, until the reader takes
        // their chunks; the channel holds one more chunk.
        let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkId, Result<Message, BulkError>)>(1);
        let (client, device) = (self.client.clone(), owner.clone());
        let fetcher = self.runtime.spawn(async move {
            let mut order = order.into_iter();
            let (mut ahead, mut bytes_ahead) = (std::collections::VecDeque::new(), 0u64);
            loop {
                while may_send_more(ahead.len(), bytes_ahead) {
                    let (mut ids, mut size) = (Vec::new(), 0u64);
                    while !batch_full(ids.len(), size) {
                        let Some((id, expected)) = order.next() else { break };
                        ids.push(id);
                        size += expected;
                    }
                    if ids.is_empty() {
                        break;
                    }
                    let gets =
                        ids.iter().map(|id| Message::GetChunk(ChunkRef { device: device.clone(), id: *id })).collect();
                    let client = client.clone();
                    bytes_ahead += size;
                    ahead.push_back((ids, size, tokio::spawn(async move { client.requests(gets).await })));
                }
                let Some((ids, size, task)) = ahead.pop_front() else { break };
                let answers = task.await.unwrap_or_else(|e| Err(BulkError::Transfer(e.to_string())));
                bytes_ahead -= size;
                let answers: Vec<Result<Message, BulkError>> = match answers {
                    Ok(answers) => answers,
                    // The whole batch failed: each of its chunks says why.
                    Err(e) => ids.iter().map(|_| Err(BulkError::Transfer(e.to_string()))).collect(),
                };
                for (id, answer) in ids.into_iter().zip(answers) {
                    if tx.send((id, answer)).await.is_err() {
                        return;
                    }
                }
            }
        });
        FetchAhead { arrived: std::sync::Mutex::new(rx), fetcher }
    }
}

impl FetchAhead {
    /// The chunk `id`, checked with `repo`'s key. Chunks fetched before it
    /// (of a file that failed part-way, or was skipped) are passed over.
    pub(super) fn get(&self, repo: &Repository, id: &ChunkId) -> Result<Vec<u8>, BackupError> {
        loop {
            match self.arrived.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv() {
                Some((got, answer)) if got == *id => match answer? {
                    Message::Chunk(chunk) => return repo.open_chunk(id, chunk.blob),
                    other => return Err(BulkError::Unexpected(other.kind(), "GetChunk").into()),
                },
                Some(_) => {}
                None => return Err(BulkError::Transfer("the chunk fetcher stopped".into()).into()),
            }
        }
    }
}

impl Drop for FetchAhead {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn small_chunks_go_many_to_a_stream_and_large_ones_few() {
        // A batch: up to the count of small chunks, up to the bytes of
        // large ones, and one chunk however large.
        assert!(!batch_full(CHUNKS_PER_STREAM - 1, 5_000 * (CHUNKS_PER_STREAM as u64 - 1)));
        assert!(batch_full(CHUNKS_PER_STREAM, 0));
        assert!(!batch_full(0, u64::MAX));
        assert!(batch_full(1, BYTES_PER_STREAM));
        assert!(!batch_full(3, BYTES_PER_STREAM - 1));
        // Streams: up to the count, up to the bytes, one always.
        assert!(may_send_more(STREAMS_IN_FLIGHT - 1, BYTES_IN_FLIGHT - 1));
        assert!(!may_send_more(STREAMS_IN_FLIGHT, 0));
        assert!(!may_send_more(2, BYTES_IN_FLIGHT));
        assert!(may_send_more(0, u64::MAX));
    }

    #[test]
    fn uploads_are_paced_to_the_rate() {
        // 1 MiB/s: 4 MiB queued after 1 s waits 3 s more; within budget, none.
        assert_eq!(pace(4 << 20, 1 << 20, Duration::from_secs(1)), Duration::from_secs(3));
        assert_eq!(pace(1 << 20, 1 << 20, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(pace(u64::MAX, 0, Duration::ZERO), Duration::ZERO, "0 is unlimited");
        assert!(pace(u64::MAX, 1, Duration::ZERO) > Duration::from_secs(1 << 40));
    }
}
