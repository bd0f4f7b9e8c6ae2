//! The fleet index: every device's fleet row, kept in memory so that the
//! device list, its filters, the overview and the console's pages answer
//! without reading every device from the store per request.
//!
//! It is loaded once, then kept current by what this process writes: each
//! store write that changes a fleet row notes the device
//! ([`Store::take_changed`]) and the next read of the index reads those
//! rows again, and only those. When other hubs share the store (PostgreSQL)
//! and are alive (each holds a lease named [`HUB_LEASE`] and its id,
//! renewed while it runs), writes made by them are found by reading every
//! row again in the background, at most every [`RESYNC`], while reads go
//! on answering from the rows held; a device this process changed
//! meanwhile keeps its newer row. A hub alone on its database never reads
//! every row again.

use crate::store::{FleetRow, Store, StoreError};
use outpost_shared::DeviceId;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// With several hubs on one store, how stale other hubs' changes may be
/// (well inside the heartbeat timeout, so a device connected to another hub
/// does not look offline for it).
pub const RESYNC: Duration = Duration::from_secs(5);

/// Each hub on a shared store holds the lease `hub/<its id>` while it runs.
pub const HUB_LEASE: &str = "hub/";

/// How long a hub's lease lasts unless renewed (it is renewed every
/// [`RESYNC`]).
pub const HUB_LEASE_TTL: Duration = Duration::from_secs(30);

/// Every device's fleet row, ordered by id.
pub type Rows = BTreeMap<DeviceId, Arc<FleetRow>>;

#[derive(Debug, Default)]
struct Held {
    rows: Rows,
    /// When every row was last read from the store.
    loaded: Option<Instant>,
    /// A full read is under way; `since` holds the devices whose rows were
    /// read again meanwhile (newer than what the full read may bring).
    reloading: bool,
    since: HashSet<DeviceId>,
}

/// The fleet index (see the module's documentation).
#[derive(Debug, Default)]
pub struct FleetIndex {
    held: RwLock<Held>,
    /// One refresh at a time.
    refresh: tokio::sync::Mutex<()>,
}

impl FleetIndex {
    fn held(&self) -> std::sync::RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rows held, read-locked: keep the guard for a computation, not
    /// across an await.
    pub fn rows(&self) -> RowsGuard<'_> {
        RowsGuard(self.held.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Brings the index up to date with `store`: every row on first use,
    /// then the rows this process changed since; with a shared store, a
    /// full read in the background when the last is older than [`RESYNC`]
    /// and hubs other than `me` are alive.
    pub async fn refresh(self: &Arc<Self>, store: &Store, me: &str) -> Result<(), StoreError> {
        let _one = self.refresh.lock().await;
        let loaded = self.held.read().unwrap_or_else(std::sync::PoisonError::into_inner).loaded;
        let Some(loaded) = loaded else {
            // A full read covers what changed before it started.
            drop(store.take_changed());
            let rows = store.fleet_rows(None).await?;
            let mut held = self.held();
            held.rows = rows.into_iter().map(|r| (r.record.id.clone(), Arc::new(r))).collect();
            held.loaded = Some(Instant::now());
            return Ok(());
        };
        let changed = store.take_changed();
        if !changed.is_empty() {
            match store.fleet_rows(Some(&changed)).await {
                Ok(rows) => self.apply(changed, rows),
                Err(e) => {
                    store.put_back_changed(changed);
                    return Err(e);
                }
            }
        }
        if store.shared() && loaded.elapsed() >= RESYNC && !std::mem::replace(&mut self.held().reloading, true) {
            let (index, store, me) = (self.clone(), store.clone(), me.to_owned());
            tokio::spawn(async move { index.reload(&store, &me).await });
        }
        Ok(())
    }

    /// Puts the rows read again for `changed` in place (a device without a
    /// row is gone).
    fn apply(&self, changed: Vec<DeviceId>, rows: Vec<FleetRow>) {
        let mut held = self.held();
        for id in &changed {
            held.rows.remove(id);
        }
        for row in rows {
            held.rows.insert(row.record.id.clone(), Arc::new(row));
        }
        if held.reloading {
            held.since.extend(changed);
        }
    }

    /// Reads every row again (other hubs' changes) if other hubs are alive,
    /// keeping the rows this process read again meanwhile.
    async fn reload(&self, store: &Store, me: &str) {
        self.held().since.clear();
        let read = match store.other_holders(HUB_LEASE, me).await {
            Ok(0) => Ok(None),
            Ok(_) => store.fleet_rows(None).await.map(Some),
            Err(e) => Err(e),
        };
        let mut held = self.held();
        match read {
            Ok(None) => {}
            Ok(Some(rows)) => {
                let mut fresh: Rows = rows.into_iter().map(|r| (r.record.id.clone(), Arc::new(r))).collect();
                for id in std::mem::take(&mut held.since) {
                    match held.rows.get(&id) {
                        Some(newer) => fresh.insert(id, newer.clone()),
                        None => fresh.remove(&id),
                    };
                }
                held.rows = fresh;
            }
            Err(e) => tracing::debug!(error = %e, "The fleet index was not read again; tried again later."),
        }
        held.loaded = Some(Instant::now());
        held.reloading = false;
    }
}

/// The index's rows, read-locked.
pub struct RowsGuard<'a>(RwLockReadGuard<'a, Held>);

impl std::ops::Deref for RowsGuard<'_> {
    type Target = Rows;

    fn deref(&self) -> &Rows {
        &self.0.rows
    }
}

/// A device as the list sees it: its brief, and the row its view is made
/// from (for the page's rows only).
#[derive(Debug, Clone, Copy)]
pub struct Listing<'a> {
    /// What the list filters, sorts and counts by.
    pub brief: crate::service::listing::Brief<'a>,
    /// Its fleet row.
    pub row: &'a Arc<FleetRow>,
}

impl<'a> crate::service::listing::Listed<'a> for Listing<'a> {
    fn brief(&self) -> crate::service::listing::Brief<'a> {
        self.brief
    }
}
