//! Devices whose certificate expired while they were away: the hub's TLS
//! stack refuses them, this module says so and lets an operator re-admit
//! one without a visit.
//!
//! [`DeviceVerifier`] wraps the fleet CA's client verifier. A certificate
//! refused only because it expired, and which was signed by the fleet CA
//! (checked as at its last valid second), names its device: the refusal is
//! noted ([`Admissions::note_expired`], written to the store by
//! [`Admissions::run`]) so the API, CLI and console show `certificate
//! expired` instead of plain offline. If an operator re-admitted that device
//! (`POST /api/v1/devices/{id}/readmit`, `outpostctl readmit`), the
//! handshake is let through until the re-admission's end; the device then
//! renews at once (its certificate is past due) and the renewal ends the
//! re-admission ([`Admissions::renewed`]). Re-admissions live in the store
//! and are re-read every second, so every hub of the fleet honours them.
//!
//! Revocation (`POST /api/v1/devices/{id}/revoke`, `outpostctl revoke`) is
//! for good: the verifier refuses the device's certificates however valid
//! (alert `certificate_revoked`), every open QUIC connection of the device
//! (session and bulk) is closed ([`Admissions::revoked_wait`]: at once on
//! the hub that took the call, within a second on the others), MQTT
//! messages and relayed batches of the device are dropped.

use crate::store::{Admission, Store};
use outpost_shared::DeviceId;
use outpost_shared::time::Timestamp;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How often re-admissions and revocations are re-read and noted refusals
/// written.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// A refusal of the same device is written at most this often.
const NOTE_EVERY: Duration = Duration::from_secs(60);

/// Re-admissions in force and refusals of expired certificates not yet
/// written, shared by the TLS verifier (synchronous) and the store.
#[derive(Debug)]
pub struct Admissions {
    readmit: RwLock<HashMap<DeviceId, Timestamp>>,
    noted: Mutex<HashMap<DeviceId, (Timestamp, bool)>>,
    /// Revoked devices, and when.
    revoked: RwLock<HashMap<DeviceId, Timestamp>>,
    /// Bumped whenever `revoked` grows or the trusted CAs change:
    /// connections look again (and sessions send the new trust bundle).
    revocations: tokio::sync::watch::Sender<u64>,
    /// The trust bundle and its digest as of a change count, made once per
    /// change and shared by every session (see [`Admissions::trust_bundle`]).
    bundle: Mutex<Option<(u64, SharedBundle)>>,
}

/// A trust bundle and its digest.
pub type SharedBundle = Arc<(outpost_shared::protocol::TrustBundle, [u8; 32])>;

impl Default for Admissions {
    fn default() -> Self {
        Admissions {
            readmit: RwLock::default(),
            noted: Mutex::default(),
            revoked: RwLock::default(),
            revocations: tokio::sync::watch::Sender::new(0),
            bundle: Mutex::default(),
        }
    }
}

/// At most this many revoked devices go to each device (the newest).
pub const MAX_REVOKED_SENT: usize = 10_000;

/// The revoked devices LAN peers are told of: those revoked within one
/// device certificate lifetime of `now` (any certificate of an older
/// revocation has expired, and peers refuse it for that), newest first up
/// to [`MAX_REVOKED_SENT`], sorted by id.
pub fn revoked_list(
    revoked: &HashMap<DeviceId, Timestamp>,
    now: Timestamp,
    device_lifetime: Duration,
) -> Vec<DeviceId> {
    let since = now.saturating_sub(device_lifetime);
    let mut recent: Vec<(&DeviceId, Timestamp)> =
        revoked.iter().filter(|(_, at)| **at >= since).map(|(id, at)| (id, *at)).collect();
    recent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    recent.truncate(MAX_REVOKED_SENT);
    let mut ids: Vec<DeviceId> = recent.into_iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    ids
}

/// What to do with a certificate that is CA-signed but expired.
pub fn decide(readmit_until: Option<Timestamp>, now: Timestamp) -> bool {
    readmit_until.is_some_and(|until| now < until)
}

impl Admissions {
    /// True if `id` is re-admitted at `now`.
    pub fn readmitted(&self, id: &DeviceId, now: Timestamp) -> bool {
        decide(self.readmit.read().unwrap_or_else(|p| p.into_inner()).get(id).copied(), now)
    }

    /// True if `id` was revoked.
    pub fn revoked(&self, id: &DeviceId) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    /// `id` was revoked at `at` (this hub learns it at once; others at
    /// their next refresh): connections of the device close.
    pub fn revoke(&self, id: &DeviceId, at: Timestamp) {
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        if revoked.insert(id.clone(), at).is_none() {
            drop(revoked);
            self.trust_changed();
        }
    }

    /// The devices LAN peers must be told are revoked at `now` (see
    /// [`revoked_list`]).
    pub fn revoked_list(&self, now: Timestamp, device_lifetime: Duration) -> Vec<DeviceId> {
        revoked_list(&self.revoked.read().unwrap_or_else(|p| p.into_inner()), now, device_lifetime)
    }

    /// The trust bundle changed (a revocation, the end of a CA rotation's
    /// overlap): every session looks again.
    pub fn trust_changed(&self) {
        self.revocations.send_modify(|n| *n += 1);
    }

    /// Changes of the trust bundle, from now on.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// The trust bundle devices are to hold (the CAs `ca` trusts, the
    /// devices revoked) and its digest. Made at the first call after each
    /// change ([`Admissions::trust_changed`]) and shared, so a revocation
    /// costs one sort of the list, not one per session. A revocation older
    /// than a certificate lifetime leaves the list at the next change.
    pub fn trust_bundle(&self, ca: &crate::service::ca::FleetCa) -> SharedBundle {
        let generation = *self.revocations.borrow();
        let mut cached = self.bundle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bundle)) = cached.as_ref().filter(|(made, _)| *made == generation) {
            return bundle.clone();
        }
        let now = std::time::SystemTime::now();
        let bundle = outpost_shared::protocol::TrustBundle {
            cas: ca.trusted(now).into_iter().map(|c| c.to_vec()).collect(),
            revoked: self.revoked_list(Timestamp::from_system(now), ca.device_lifetime()),
        };
        let digest = bundle.digest();
        let shared = Arc::new((bundle, digest));
        *cached = Some((generation, shared.clone()));
        shared
    }

    /// Resolves once `id` is revoked (at once if it is).
    pub async fn revoked_wait(&self, id: &DeviceId) {
        let mut changes = self.revocations.subscribe();
        while !self.revoked(id) {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The hub refused `id`'s expired certificate at `now`.
    pub fn note_expired(&self, id: &DeviceId, now: Timestamp) {
        let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        match noted.get(id) {
            Some((at, _)) if at.until(now) < NOTE_EVERY => {}
            _ => {
                noted.insert(id.clone(), (now, false));
            }
        }
    }

    /// An operator re-admitted `id` until `until` (this hub learns it at
    /// once; others at their next refresh).
    pub fn readmit(&self, id: &DeviceId, until: Timestamp) {
        self.readmit.write().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), until);
    }

    /// `id` renewed its certificate: its re-admission is used up and its
    /// expiry is history (a revocation, should one have raced the renewal,
    /// stays).
    pub async fn renewed(&self, store: &Store, id: &DeviceId) -> Result<(), crate::store::StoreError> {
        self.readmit.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.noted.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        let known = store.admissions().await?.into_iter().find(|(d, _)| d == id).map(|(_, a)| a);
        if let Some(admission) = known.filter(|a| a.expired_seen.is_some() || a.readmit_until.is_some()) {
            store.set_admission(id, &Admission { revoked_at: admission.revoked_at, ..Admission::default() }).await?;
        }
        Ok(())
    }

    /// Writes noted refusals and re-reads re-admissions, every
    /// [`REFRESH_EVERY`], until `shutdown`.
    pub async fn run(self: Arc<Self>, store: Store, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            if let Err(e) = self.refresh(&store).await {
                tracing::debug!(error = %e, "Admissions not refreshed.");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }

    async fn refresh(&self, store: &Store) -> Result<(), crate::store::StoreError> {
        let now = Timestamp::now();
        let pending: Vec<(DeviceId, Timestamp)> = self
            .noted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (_, written))| !written)
            .map(|(id, (at, _))| (id.clone(), *at))
            .collect();
        let mut known: HashMap<DeviceId, Admission> = store.admissions().await?.into_iter().collect();
        for (id, at) in pending {
            if store.device(&id).await?.is_none() {
                continue;
            }
            let admission = Admission { expired_seen: Some(at), ..known.get(&id).copied().unwrap_or_default() };
            store.set_admission(&id, &admission).await?;
            known.insert(id.clone(), admission);
            if let Some(entry) = self.noted.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                entry.1 = true;
            }
        }
        for (id, at) in known.iter().filter_map(|(id, a)| a.revoked_at.map(|at| (id, at))) {
            self.revoke(id, at);
        }
        let readmit = known.into_iter().filter_map(|(id, a)| a.readmit_until.filter(|&u| now < u).map(|u| (id, u)));
        *self.readmit.write().unwrap_or_else(|p| p.into_inner()) = readmit.collect();
        Ok(())
    }
}

/// The fleet CA's client verifier, which also lets re-admitted devices in
/// with an expired certificate and notes the others (see the module).
/// During a CA rotation it trusts both CAs until the overlap ends, then the
/// current one only.
#[derive(Debug)]
pub struct DeviceVerifier {
    /// The verifier of the CAs trusted during the overlap (or the current
    /// CA's when there is none).
    pub inner: Arc<dyn ClientCertVerifier>,
    /// The current CA's verifier, once the overlap ended, and when it ends.
    pub after_overlap: Option<(Arc<dyn ClientCertVerifier>, std::time::SystemTime)>,
    /// Re-admissions and refusals.
    pub admissions: Arc<Admissions>,
}

impl DeviceVerifier {
    /// The verifier of the CAs trusted at `now`.
    fn at(&self, now: UnixTime) -> &Arc<dyn ClientCertVerifier> {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        match &self.after_overlap {
            Some((current, until)) if now >= *until => current,
            _ => &self.inner,
        }
    }
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let revoked =
            || outpost_shared::identity::device_id_of(end_entity).is_some_and(|id| self.admissions.revoked(&id));
        let inner = self.at(now);
        let refused = match inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(_) if revoked() => return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) if revoked() => return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => rustls::Error::InvalidCertificate(CertificateError::Expired),
            other => return other,
        };
        // Signed by the fleet CA? Checked as at its last valid second.
        let last_valid = outpost_shared::identity::validity_of(end_entity)
            .and_then(|(_, until)| until.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| UnixTime::since_unix_epoch(d.saturating_sub(Duration::from_secs(1))));
        let genuine = last_valid.is_some_and(|at| inner.verify_client_cert(end_entity, intermediates, at).is_ok());
        let Some(id) = outpost_shared::identity::device_id_of(end_entity).filter(|_| genuine) else {
            return Err(refused);
        };
        let now = Timestamp::from_system(std::time::UNIX_EPOCH + Duration::from_secs(now.as_secs()));
        if self.admissions.readmitted(&id, now) {
            tracing::info!(device = %id, "Expired certificate let in: the device is re-admitted to renew it.");
            return Ok(ClientCertVerified::assertion());
        }
        tracing::info!(device = %id, "Expired device certificate refused (`outpostctl readmit` lets it renew).");
        self.admissions.note_expired(&id, now);
        Err(refused)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readmission_holds_until_its_end_and_refusals_are_noted_once_a_minute() {
        let (t, id): (Timestamp, DeviceId) = (Timestamp(1_000_000), "dev-1".parse().unwrap());
        assert!(!decide(None, t));
        assert!(decide(Some(Timestamp(1_000_001)), t));
        assert!(!decide(Some(t), t), "the end is exclusive");
        let a = Admissions::default();
        assert!(!a.readmitted(&id, t));
        a.readmit(&id, Timestamp(2_000_000));
        assert!(a.readmitted(&id, t) && !a.readmitted(&id, Timestamp(2_000_000)));
        a.note_expired(&id, t);
        a.note_expired(&id, Timestamp(1_030_000));
        assert_eq!(a.noted.lock().unwrap().get(&id), Some(&(t, false)), "within a minute: one note");
        a.note_expired(&id, Timestamp(1_061_000));
        assert_eq!(a.noted.lock().unwrap().get(&id), Some(&(Timestamp(1_061_000), false)));
    }

    #[tokio::test]
    async fn a_revocation_wakes_the_connections_of_that_device_only() {
        let a = std::sync::Arc::new(Admissions::default());
        let (one, two): (DeviceId, DeviceId) = ("dev-1".parse().unwrap(), "dev-2".parse().unwrap());
        let waiter = tokio::spawn({
            let a = a.clone();
            let one = one.clone();
            async move { a.revoked_wait(&one).await }
        });
        a.revoke(&two, Timestamp(1));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "another device's revocation woke it");
        a.revoke(&one, Timestamp(2));
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        assert!(a.revoked(&one) && a.revoked(&two));
        // Already revoked: resolves at once.
        tokio::time::timeout(Duration::from_millis(100), a.revoked_wait(&one)).await.unwrap();
    }

    /// One bundle per change, shared; a revocation makes a new one.
    #[test]
    fn the_trust_bundle_is_made_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::service::ca::FleetCa::init(dir.path()).unwrap();
        let a = Admissions::default();
        let first = a.trust_bundle(&ca);
        assert!(Arc::ptr_eq(&first, &a.trust_bundle(&ca)), "made again without a change");
        assert_eq!(first.0.cas, vec![ca.cert_der().to_vec()]);
        assert!(first.0.revoked.is_empty());
        let id: DeviceId = "dev-1".parse().unwrap();
        a.revoke(&id, Timestamp::now());
        let second = a.trust_bundle(&ca);
        assert_eq!(second.0.revoked, vec![id]);
        assert_eq!(second.1, second.0.digest());
        assert_ne!(second.1, first.1);
    }

    #[test]
    fn devices_hear_of_revocations_within_a_certificate_lifetime_newest_first() {
        let day = Duration::from_secs(86_400);
        let at = |d: u64| Timestamp(d * 86_400_000);
        let ids: Vec<DeviceId> = (0..5).map(|i| format!("dev-{i}").parse().unwrap()).collect();
        let revoked: HashMap<DeviceId, Timestamp> =
            [(ids[3].clone(), at(10)), (ids[1].clone(), at(400)), (ids[4].clone(), at(500)), (ids[0].clone(), at(499))]
                .into_iter()
                .collect();
        // At day 500 with 365-day certificates: the one of day 10 is out.
        assert_eq!(revoked_list(&revoked, at(500), day * 365), vec![ids[0].clone(), ids[1].clone(), ids[4].clone()]);
        assert_eq!(revoked_list(&revoked, at(500), day * 50), vec![ids[0].clone(), ids[4].clone()]);
        let many: HashMap<DeviceId, Timestamp> =
            (0..MAX_REVOKED_SENT as u64 + 5).map(|i| (format!("d-{i}").parse().unwrap(), Timestamp(i))).collect();
        let sent = revoked_list(&many, Timestamp(MAX_REVOKED_SENT as u64 + 5), day);
        assert_eq!(sent.len(), MAX_REVOKED_SENT);
        assert!(
            !sent.contains(&"d-0".parse().unwrap()) && sent.contains(&"d-5".parse().unwrap()),
            "the newest are kept"
        );
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "sorted: the digest does not depend on the order");
    }
}
