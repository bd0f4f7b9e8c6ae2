//! Bulk connections: a device's backup transfers, apart from its session.
//!
//! The device connects with its certificate and the bulk ALPN and opens a
//! bidirectional stream per transfer (several at once). On a stream, each
//! request gets one answer, in order, until the device finishes the stream.
//! A refused request (bad name, missing chunk, no grant, corrupt data at the
//! hub) is answered with `Refused` and the stream goes on; a malformed frame
//! ends that stream only.
//!
//! Memory is bounded: at most [`MAX_REQUESTS`] requests are read or served
//! at once across all devices (each may carry an 8 MiB frame), at most
//! `[fleet] device_bulk_turns` (default [`TURNS_PER_DEVICE`]) of one device
//! whatever number of bulk connections it opens (at most `[fleet]
//! device_bulk_connections`, [`Limits`]), and a request must arrive whole
//! within [`REQUEST_TIMEOUT`] once its turn came, so a slow, stalled or
//! greedy device cannot hold the turns of others.

use crate::service::backups::{BackupStoreError, Backups};
use crate::service::fleet::{CLOSE_OK, CLOSE_REFUSED, Fleet};
use outpost_shared::DeviceId;
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{ChunkIds, MAX_BULK_FRAME, Message, Refusal, RefusalReason};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

/// Bulk requests read or served at once, hub-wide.
pub const MAX_REQUESTS: usize = 32;
/// Streams (requests) one device may have open at once on its bulk
/// connection (a session connection keeps the endpoint's 8): over a link
/// with a round trip of 50 ms, a device sends at most this many chunks per
/// round trip, and a tree of small files is tens of thousands of chunks.
/// The hub-wide bound on memory stays [`MAX_REQUESTS`].
pub const STREAMS_PER_DEVICE: u32 = 32;
/// Requests of one device read or served at once, at most: a device on a
/// thin link, whose requests trickle in, holds at most this many (half) of
/// the hub-wide turns. On loopback, where the hub's file writes are the
/// bound, a first upload of a 45 000-file tree took 7.8 s with 16 and
/// 9.2–9.7 s with 8 (docs/BENCHMARKS.md).
pub const TURNS_PER_DEVICE: usize = 16;
/// Time a request may take to arrive once it holds a turn.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bulk connections one device may hold at once, unless configured.
pub const CONNECTIONS_PER_DEVICE: usize = 4;

/// `[fleet] device_bulk_turns` and `device_bulk_connections`: what one
/// device may hold of the bulk service, across all its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBulk {
    /// Requests read or served at once.
    pub turns: usize,
    /// Bulk connections open at once.
    pub connections: usize,
}

impl Default for DeviceBulk {
    fn default() -> Self {
        DeviceBulk { turns: TURNS_PER_DEVICE, connections: CONNECTIONS_PER_DEVICE }
    }
}

/// The hub's bulk turns and what each device holds of them: a device's
/// turns are one semaphore shared by all its bulk connections, so opening
/// more connections gains it nothing but a refusal past the limit.
#[derive(Debug)]
pub struct Limits {
    hub: Arc<Semaphore>,
    per_device: DeviceBulk,
    held: std::sync::Mutex<std::collections::HashMap<DeviceId, Held>>,
}

#[derive(Debug)]
struct Held {
    connections: usize,
    turns: Arc<Semaphore>,
}

/// One open bulk connection of a device: its share of the turns. Dropped
/// when the connection ends.
#[derive(Debug)]
pub struct Lease {
    limits: Arc<Limits>,
    device: DeviceId,
    turns: Arc<Semaphore>,
}

impl Limits {
    /// [`MAX_REQUESTS`] turns hub-wide, `per_device` for each device.
    pub fn new(per_device: DeviceBulk) -> Arc<Self> {
        Arc::new(Limits { hub: Arc::new(Semaphore::new(MAX_REQUESTS)), per_device, held: Default::default() })
    }

    /// A new bulk connection of `device`; `None` if it holds its limit of
    /// connections already.
    pub fn open(self: &Arc<Self>, device: &DeviceId) -> Option<Lease> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let entry = held
            .entry(device.clone())
            .or_insert_with(|| Held { connections: 0, turns: Arc::new(Semaphore::new(self.per_device.turns)) });
        if entry.connections >= self.per_device.connections {
            return None;
        }
        entry.connections += 1;
        Some(Lease { limits: self.clone(), device: device.clone(), turns: entry.turns.clone() })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = self.limits.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = held.get_mut(&self.device) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                held.remove(&self.device);
            }
        }
    }
}

/// Serves a bulk connection of `device` until it closes, within `limits`.
pub async fn serve(connection: quinn::Connection, device: DeviceId, fleet: Arc<Fleet>, limits: Arc<Limits>) {
    let Some(lease) = limits.open(&device) else {
        info!(
            limit = limits.per_device.connections,
            "Bulk connection refused: the device holds its limit ([fleet] device_bulk_connections)."
        );
        connection.close(CLOSE_REFUSED.into(), b"too many bulk connections");
        return;
    };
    match fleet.store().device(&device).await {
        Ok(Some(_)) => {}
        _ => {
            warn!("Bulk connection of a device that is not registered.");
            connection.close(CLOSE_REFUSED.into(), b"unknown device");
            return;
        }
    }
    connection.set_max_concurrent_bi_streams(STREAMS_PER_DEVICE.into());
    debug!("Bulk connection open.");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let backups = fleet.backups().clone();
                    let (device, turns) = (device.clone(), [lease.turns.clone(), limits.hub.clone()]);
                    streams.spawn(stream(send, recv, device, backups, turns).in_current_span());
                }
                Err(e) => {
                    debug!(reason = %e, "Bulk connection ended.");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    streams.abort_all();
    connection.close(CLOSE_OK.into(), b"");
}

async fn stream(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    device: DeviceId,
    backups: Backups,
    [own_turns, turns]: [Arc<Semaphore>; 2],
) {
    let mut reader = FrameReader::new(recv, MAX_BULK_FRAME);
    loop {
        // The device's own turn first: waiting for it holds no hub-wide one.
        let Ok(_own) = own_turns.acquire().await else { return };
        let Ok(_turn) = turns.acquire().await else { return };
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(envelope))) => envelope.message,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                warn!(error = %e, "Bulk stream dropped: bad frame.");
                let _ = send.reset(1u32.into());
                return;
            }
            Err(_) => {
                warn!(timeout = ?REQUEST_TIMEOUT, "Bulk stream dropped: request too slow.");
                let _ = send.reset(2u32.into());
                return;
            }
        };
        let backups = backups.clone();
        let device = device.clone();
        let answer = tokio::task::spawn_blocking(move || answer(&backups, &device, request))
            .await
            .unwrap_or_else(|e| refused(RefusalReason::Internal, format!("request failed: {e}")));
        if let Err(e) = write_message(&mut send, answer, MAX_BULK_FRAME).await {
            debug!(error = %e, "Bulk stream closed by the device.");
            return;
        }
    }
    let _ = send.finish();
}

fn refused(reason: RefusalReason, message: String) -> Message {
    Message::Refused(Refusal { reason, message })
}

/// Answers one request of `device`.
fn answer(backups: &Backups, device: &DeviceId, request: Message) -> Message {
    let kind = request.kind();
    let result = (|| match request {
        Message::HaveChunks(ChunkIds { ids }) => {
            Ok(Message::MissingChunks(ChunkIds { ids: backups.missing(device, &ids)? }))
        }
        Message::PutChunk(chunk) => {
            if !backups.put_chunk(device, &chunk)? {
                // The device asks before it sends; this is a resend after a
                // lost answer, or a bug worth seeing.
                info!(chunk = %outpost_shared::identity::hex(&chunk.id), "Chunk was already stored.");
            }
            Ok(Message::Done)
        }
        Message::SnapshotChunks(list) => {
            backups.put_chunk_list(device, &list)?;
            Ok(Message::Done)
        }
        Message::PutSnapshot(data) => {
            backups.put_snapshot(device, &data)?;
            info!(snapshot = %data.summary.name, set = %data.summary.set, "Backup snapshot catalogued.");
            Ok(Message::Done)
        }
        Message::ListBackups(owner) => {
            backups.authorise(device, &owner)?;
            Ok(Message::Backups(backups.catalog(&owner)?.into_iter().map(|e| e.summary).collect()))
        }
        Message::GetSnapshot(r) => {
            backups.authorise(device, &r.device)?;
            if &r.device != device {
                info!(owner = %r.device, snapshot = %r.name, "Snapshot fetched under a restore grant.");
            }
            Ok(Message::Snapshot(backups.snapshot(&r.device, &r.name)?))
        }
        Message::GetChunk(r) => {
            backups.authorise(device, &r.device)?;
            Ok(Message::Chunk(outpost_shared::protocol::ChunkBlob { id: r.id, blob: backups.chunk(&r.device, &r.id)? }))
        }
        other => Err(BackupStoreError::BadRequest(format!("{} is not a bulk request", other.kind()))),
    })();
    result.unwrap_or_else(|e: BackupStoreError| {
        match e.reason() {
            RefusalReason::Internal | RefusalReason::Corrupt => {
                warn!(request = kind, error = %e, "Bulk request failed.")
            }
            _ => info!(request = kind, error = %e, "Bulk request refused."),
        }
        refused(e.reason(), e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device's turns are one pool across its connections, which are
    /// limited; another device has its own; the pool goes with the last
    /// connection.
    #[test]
    fn a_device_shares_its_turns_across_its_connections_and_is_refused_past_the_limit() {
        let limits = Limits::new(DeviceBulk { turns: 3, connections: 2 });
        let (one, two): (DeviceId, DeviceId) = ("dev-1".parse().unwrap(), "dev-2".parse().unwrap());
        let a = limits.open(&one).unwrap();
        let b = limits.open(&one).unwrap();
        assert!(limits.open(&one).is_none(), "a third connection");
        assert!(Arc::ptr_eq(&a.turns, &b.turns), "one pool of turns for the device");
        assert_eq!(a.turns.available_permits(), 3);
        let other = limits.open(&two).unwrap();
        assert!(!Arc::ptr_eq(&a.turns, &other.turns));
        drop(b);
        let c = limits.open(&one).unwrap();
        assert!(Arc::ptr_eq(&a.turns, &c.turns));
        drop((a, c, other));
        assert!(limits.held.lock().unwrap().is_empty(), "nothing held once every connection ended");
    }
}
