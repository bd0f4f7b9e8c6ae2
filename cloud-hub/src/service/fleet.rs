//! Live fleet state: the durable store plus who is connected right now.
//!
//! Presence (last message time, current connection) is kept in memory and
//! updated on every message; the store keeps the durable facts and is
//! updated on hello and on telemetry. A device is *online* when something
//! arrived from it within the heartbeat timeout, so a device that vanished
//! without closing its connection (power cut, SIGKILL) turns offline after
//! that timeout, not after QUIC's idle timeout.

use crate::api::DeviceView;
use crate::service::index::{FleetIndex, Listing};
use crate::service::listing::{Brief, DeviceQuery, Overview, Page, Selector, overview, select};
use crate::store::{FleetRow, Store, StoreError};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

pub use outpost_shared::protocol::{CLOSE_OK, CLOSE_PROTOCOL, CLOSE_REFUSED, CLOSE_REPLACED};

/// What carries a device's live session.
#[derive(Debug, Clone)]
pub enum Link {
    /// A QUIC connection to this hub.
    Quic(quinn::Connection),
    /// Messages through an MQTT broker; the number tells sessions apart.
    Mqtt(u64),
}

impl Link {
    fn same(&self, other: &Link) -> bool {
        match (self, other) {
            (Link::Quic(a), Link::Quic(b)) => a.stable_id() == b.stable_id(),
            (Link::Mqtt(a), Link::Mqtt(b)) => a == b,
            _ => false,
        }
    }

    /// `quic` or `mqtt`.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Mqtt(_) => "mqtt",
        }
    }
}

#[derive(Debug)]
struct Presence {
    last_seen: Timestamp,
    link: Option<Link>,
    /// The store's epoch of the session on `link`, once claimed.
    epoch: Option<u64>,
    /// Wakes the device's current session when commands or desired state
    /// change; each session gets its own, so a replaced one is never woken.
    downlink: Arc<Notify>,
}

/// A device's presence on this hub: when it was last heard from, and the
/// transport of its live session here, if it has one.
type Local = (Timestamp, Option<&'static str>);

/// Fleet state shared by the QUIC endpoint and the HTTP API.
#[derive(Debug)]
pub struct Fleet {
    /// This hub process's name in the store's session table (and its
    /// wake-up channel): `hub-` and 12 random hex digits.
    hub_id: String,
    store: Store,
    backups: crate::service::backups::Backups,
    presence: Mutex<HashMap<DeviceId, Presence>>,
    heartbeat_timeout: Duration,
    /// When each token's use was last written to the store.
    token_uses: Mutex<HashMap<[u8; 32], Timestamp>>,
    /// Expired device certificates met, and re-admissions.
    admissions: std::sync::Arc<crate::service::admission::Admissions>,
    /// Failed authentication and refused requests per source address.
    throttle: Mutex<crate::service::throttle::Throttle>,
    /// Records and bytes per second a device's batches may bring.
    device_rate: crate::service::pace::DeviceRate,
    /// Every device's fleet row, in memory.
    index: Arc<FleetIndex>,
}

/// A token's last use is written at most this often.
pub const TOKEN_USE_EVERY: Duration = Duration::from_secs(60);

impl Fleet {
    /// Fleet state over `store`.
    pub fn new(
        store: Store,
        backups: crate::service::backups::Backups,
        heartbeat_timeout: Duration,
        failed_auth: crate::service::throttle::AuthLimit,
        device_rate: crate::service::pace::DeviceRate,
    ) -> Self {
        let mut random = [0u8; 6];
        rand::fill(&mut random[..]);
        let hub_id = format!("hub-{}", outpost_shared::identity::hex(&random));
        Fleet {
            hub_id,
            store,
            backups,
            presence: Mutex::default(),
            heartbeat_timeout,
            token_uses: Mutex::default(),
            admissions: std::sync::Arc::default(),
            throttle: Mutex::new(crate::service::throttle::Throttle::new(failed_auth)),
            device_rate,
            index: Arc::default(),
        }
    }

    /// Records and bytes per second a device's batches may bring.
    pub fn device_rate(&self) -> crate::service::pace::DeviceRate {
        self.device_rate
    }

    /// Failed authentication and refused requests per source address.
    pub fn throttle(&self) -> std::sync::MutexGuard<'_, crate::service::throttle::Throttle> {
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expired device certificates met, and re-admissions.
    pub fn admissions(&self) -> &std::sync::Arc<crate::service::admission::Admissions> {
        &self.admissions
    }

    /// This hub process's name among the hubs of the fleet.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// Makes `link` the device's session in the store too; returns its
    /// epoch, which fences off any older session of the device, on this hub
    /// or another.
    pub async fn claim(&self, id: &DeviceId, link: &Link) -> Result<u64, StoreError> {
        let epoch = self.store.claim_session(id, &self.hub_id, link.transport()).await?;
        if let Some(p) = self.presence().get_mut(id).filter(|p| p.link.as_ref().is_some_and(|l| l.same(link))) {
            p.epoch = Some(epoch);
        }
        Ok(epoch)
    }

    /// The session on `link` ended for `reason` (in words): the
    /// fleet forgets the link and, if it was the device's current session,
    /// the store keeps when and why, for the device's page.
    pub async fn ended(&self, id: &DeviceId, link: &Link, reason: &str) {
        let epoch =
            self.presence().get(id).filter(|p| p.link.as_ref().is_some_and(|l| l.same(link))).and_then(|p| p.epoch);
        // Written first, so that whoever sees the link gone sees why.
        if let Some(epoch) = epoch
            && let Err(e) = self.store.end_session(id, &self.hub_id, epoch, Timestamp::now(), reason).await
        {
            tracing::debug!(device = %id, error = %e, "Why the session ended was not recorded.");
        }
        self.disconnected(id, link);
    }

    /// Commands or desired state of `id` changed: wake its session, here or
    /// on the hub that holds it.
    pub async fn changed(&self, id: &DeviceId) {
        self.poke(id);
        if let Err(e) = self.store.notify(id, &self.hub_id).await {
            // The other hub's polling finds the change within a second.
            tracing::debug!(device = %id, error = %e, "Wake-up for another hub not sent.");
        }
    }

    /// Devices with a live session on this hub, and when each was last
    /// heard from.
    pub fn local_sessions(&self) -> Vec<(DeviceId, Timestamp)> {
        self.presence().iter().filter(|(_, p)| p.link.is_some()).map(|(id, p)| (id.clone(), p.last_seen)).collect()
    }

    /// True if the use of token `hash` at `now` should be written (it was
    /// not within [`TOKEN_USE_EVERY`]).
    pub fn token_use_due(&self, hash: &[u8; 32], now: Timestamp) -> bool {
        let mut uses = self.token_uses.lock().unwrap_or_else(|p| p.into_inner());
        let due = uses.get(hash).is_none_or(|t| t.until(now) >= TOKEN_USE_EVERY);
        if due {
            uses.insert(*hash, now);
        }
        due
    }

    /// Devices' backups at the hub.
    pub fn backups(&self) -> &crate::service::backups::Backups {
        &self.backups
    }

    /// The durable store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Presence>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device opened a session on `link`; an older QUIC connection of the
    /// same device is closed. Returns the notifier that [`Fleet::poke`]
    /// wakes for this session, or `None` for an MQTT session while a QUIC
    /// session of the device is open: a QUIC session proved the device's
    /// identity in its handshake, while a signed MQTT hello may be a replay,
    /// so MQTT takes over only once the QUIC session has ended.
    pub fn connected(&self, id: &DeviceId, link: Link) -> Option<Arc<Notify>> {
        let mut presence = self.presence();
        let entry = presence.entry(id.clone()).or_insert_with(|| Presence {
            last_seen: Timestamp::now(),
            link: None,
            epoch: None,
            downlink: Arc::default(),
        });
        if matches!((&link, &entry.link), (Link::Mqtt(_), Some(Link::Quic(_)))) {
            return None;
        }
        entry.last_seen = Timestamp::now();
        if let Some(Link::Quic(old)) = entry.link.replace(link) {
            old.close(CLOSE_REPLACED.into(), b"replaced by a newer session");
        }
        entry.epoch = None;
        entry.downlink = Arc::default();
        Some(entry.downlink.clone())
    }

    /// True while `link` is the device's current session.
    pub fn is_current(&self, id: &DeviceId, link: &Link) -> bool {
        self.presence().get(id).and_then(|p| p.link.as_ref()).is_some_and(|l| l.same(link))
    }

    /// Tells the device's session (if any) that there is something to deliver.
    pub fn poke(&self, id: &DeviceId) {
        if let Some(p) = self.presence().get(id) {
            p.downlink.notify_one();
        }
    }

    /// The session on `link` ended.
    pub fn disconnected(&self, id: &DeviceId, link: &Link) {
        if let Some(p) = self.presence().get_mut(id)
            && p.link.as_ref().is_some_and(|l| l.same(link))
        {
            p.link = None;
            p.epoch = None;
        }
    }

    /// Something arrived from the device.
    pub fn seen(&self, id: &DeviceId) {
        if let Some(p) = self.presence().get_mut(id) {
            p.last_seen = Timestamp::now();
        }
    }

    /// When the device of `row` was last heard from, whether it is online,
    /// and what carries its session now (if one is live): from this hub's
    /// presence, else from the hub that holds its session.
    fn facts<'a>(
        &self,
        local: Option<Local>,
        row: &'a FleetRow,
        now: Timestamp,
    ) -> (Option<Timestamp>, bool, Option<&'a str>) {
        let (last_seen, transport) = match local {
            Some((seen, Some(transport))) => (Some(seen.max(row.record.last_seen.unwrap_or(seen))), Some(transport)),
            // Not here: the hub that holds its session says when it last
            // heard from it (every hub answers the same).
            _ => {
                let session = row.session.as_ref();
                let seen =
                    [row.record.last_seen, local.map(|(s, _)| s), session.map(|s| s.seen)].into_iter().flatten().max();
                let live = session.filter(|s| {
                    s.seen.until(now) < self.heartbeat_timeout && s.hub != self.hub_id && s.ended.is_none()
                });
                (seen, live.map(|s| s.transport.as_str()))
            }
        };
        // A session that ended (the device closed it, it timed out, the hub
        // refused it) is news at once, not after the heartbeat timeout,
        // unless something arrived since (a batch relayed by a LAN peer).
        let ended = transport.is_none()
            && row.session.as_ref().and_then(|s| s.ended.as_ref()).is_some_and(|(at, _)| last_seen <= Some(*at));
        let online = !ended && last_seen.is_some_and(|t| t.until(now) < self.heartbeat_timeout);
        (last_seen, online, transport)
    }

    /// This hub's presence of `id`: when it was last heard from, and what
    /// carries its session here, if one does.
    fn local(&self, id: &DeviceId) -> Option<Local> {
        self.presence().get(id).map(|p| (p.last_seen, p.link.as_ref().map(Link::transport)))
    }

    /// The API's view of one fleet row, with this hub's presence: no store
    /// call.
    pub fn view(&self, row: FleetRow, now: Timestamp) -> DeviceView {
        let (last_seen, online, transport) = {
            let (seen, online, transport) = self.facts(self.local(&row.record.id), &row, now);
            (seen, online, transport.map(str::to_owned))
        };
        DeviceView::new(row, last_seen, online, transport.as_deref(), now)
    }

    /// Every device (or those in `only`), as the API shows them, ordered by
    /// id, from the fleet index.
    pub async fn views(&self, only: Option<&[DeviceId]>) -> Result<Vec<DeviceView>, StoreError> {
        self.index.refresh(&self.store, &self.hub_id).await?;
        let rows: Vec<Arc<FleetRow>> = {
            let held = self.index.rows();
            match only {
                Some(ids) => {
                    let mut ids = ids.to_vec();
                    ids.sort();
                    ids.dedup();
                    ids.iter().filter_map(|id| held.get(id).cloned()).collect()
                }
                None => held.values().cloned().collect(),
            }
        };
        Ok(self.views_of(rows))
    }

    /// The views of rows taken from the index, at one `now`.
    fn views_of(&self, rows: Vec<Arc<FleetRow>>) -> Vec<DeviceView> {
        let now = Timestamp::now();
        rows.into_iter().map(|row| self.view(FleetRow::clone(&row), now)).collect()
    }

    /// One device, as the API shows it.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<DeviceView>, StoreError> {
        Ok(self.views(Some(std::slice::from_ref(id))).await?.pop())
    }

    /// Runs `f` over every device's brief (id order), from the fleet index
    /// brought up to date: what the list, the overview and bulk actions
    /// decide by, without building a view per device. The index and this
    /// hub's presence are read-locked meanwhile: `f` computes, no more.
    pub async fn with_briefs<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = Listing<'_>>) -> R,
    ) -> Result<R, StoreError> {
        self.index.refresh(&self.store, &self.hub_id).await?;
        let now = Timestamp::now();
        // A copy, so that sessions do not wait for the presence lock while
        // `f` runs.
        let presence: HashMap<DeviceId, Local> = self
            .presence()
            .iter()
            .map(|(id, p)| (id.clone(), (p.last_seen, p.link.as_ref().map(Link::transport))))
            .collect();
        let rows = self.index.rows();
        let mut items = rows.values().map(|row| {
            let (seen, online, _) = self.facts(presence.get(&row.record.id).copied(), row, now);
            Listing { brief: Brief::of_row(row, seen, online, now), row }
        });
        Ok(f(&mut items))
    }

    /// One page of the device list (`Err` with the reason for a bad
    /// cursor): views are built for its rows only.
    pub async fn list(&self, query: &DeviceQuery) -> Result<Result<Page, String>, StoreError> {
        let page = self.with_briefs(|items| select(items, query).map(|p| p.map(|l| l.row.clone()))).await?;
        Ok(page.map(|p| {
            let Page { rows, total, next, start, prev } = p;
            Page { rows: self.views_of(rows), total, next, start, prev }
        }))
    }

    /// The fleet at a glance, `worst` devices in the behind list.
    pub async fn overview(&self, worst: usize) -> Result<Overview, StoreError> {
        self.with_briefs(|items| overview(items, worst)).await
    }

    /// Keys `selector` names that no device carries (most likely a typo).
    pub async fn unknown_keys(&self, selector: &Selector) -> Result<Vec<String>, StoreError> {
        self.index.refresh(&self.store, &self.hub_id).await?;
        let rows = self.index.rows();
        Ok(selector.unknown_keys(rows.values().map(|r| &r.labels)).into_iter().map(str::to_owned).collect())
    }

    /// Views of the devices whose listing (brief and row) passes `keep`,
    /// ordered by id.
    pub async fn views_where(&self, keep: impl Fn(&Listing<'_>) -> bool) -> Result<Vec<DeviceView>, StoreError> {
        let rows: Vec<Arc<FleetRow>> =
            self.with_briefs(|items| items.filter(|l| keep(l)).map(|l| l.row.clone()).collect()).await?;
        Ok(self.views_of(rows))
    }
}
