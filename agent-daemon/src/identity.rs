//! The device's identity on disk, under `<data_dir>/identity/`:
//! `device.key` (mode 0600, made on the device, never sent anywhere),
//! `device.crt` and `ca.crt` (PEM), and `device.toml` (id, hub address).
//!
//! `ca.crt` is the trust bundle's list of CAs (one, or two during a CA
//! rotation, the one that issues new certificates first) and `revoked` its
//! list of revoked devices: both as the hub last sent them
//! ([`Identity::store_trust`]).
//!
//! Renewal (see [`crate::uplink::session`]) adds `next.key` (made before the
//! request leaves) and `next.crt` (the hub's answer). The pair replaces
//! `device.key` and `device.crt` only once the hub has accepted it in a
//! handshake ([`Identity::promote`]); until then both identities work, so a
//! crash at any step leaves a device that can connect with one of them.

use outpost_shared::DeviceId;
use outpost_shared::fsutil::write_atomic;
pub use outpost_shared::identity::Signer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors reading or writing the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The device has not enrolled.
    #[error("not enrolled: {0} has no identity; run `outpost-agent enroll --token T --data-dir {0}`")]
    NotEnrolled(PathBuf),
    /// The device is already enrolled; enrolling again would replace its key.
    #[error("already enrolled as {0}; remove the identity directory to enroll again")]
    AlreadyEnrolled(DeviceId),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    device_id: DeviceId,
    hub: String,
    #[serde(default)]
    name: Option<String>,
}

/// A loaded identity.
pub struct Identity {
    /// The device id.
    pub device_id: DeviceId,
    /// The hub address from enrollment.
    pub hub: String,
    /// The name the device enrolled with.
    pub name: Option<String>,
    /// The device certificate.
    pub cert: CertificateDer<'static>,
    /// The fleet's CA certificates this device trusts, the one that issues
    /// new certificates first.
    pub cas: Vec<CertificateDer<'static>>,
    /// Devices revoked, sorted: LAN peers refuse them.
    pub revoked: std::sync::Arc<Vec<DeviceId>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            device_id: self.device_id.clone(),
            hub: self.hub.clone(),
            name: self.name.clone(),
            cert: self.cert.clone(),
            cas: self.cas.clone(),
            revoked: self.revoked.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("device_id", &self.device_id).field("hub", &self.hub).finish_non_exhaustive()
    }
}

/// Written at enrollment, removed once the identity's first store exists.
const NEW_MARKER: &str = "new";
/// The key and certificate of a renewal, until the hub accepted them.
const NEXT_KEY: &str = "next.key";
const NEXT_CRT: &str = "next.crt";
/// The trust bundle: CAs and revoked devices.
const CA_CRT: &str = "ca.crt";
const REVOKED: &str = "revoked";

/// The CA certificates of `path` (a PEM bundle).
fn read_cas(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let cas = CertificateDer::pem_slice_iter(read(path)?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, e))?;
    if cas.is_empty() {
        return Err(invalid(path, "no CA certificate"));
    }
    Ok(cas)
}

/// The revoked devices in `path` (one id a line; none if it is missing).
fn read_revoked(path: &Path) -> Result<Vec<DeviceId>, IdentityError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(IdentityError::Io { path: path.to_owned(), source }),
    };
    text.lines().filter(|l| !l.is_empty()).map(|l| l.parse().map_err(|e| invalid(path, e))).collect()
}

/// Why the hub's trust bundle cannot be taken, if it cannot: no CA, or an
/// entry that is not a CA certificate.
pub fn check_bundle(bundle: &outpost_shared::protocol::TrustBundle) -> Result<(), String> {
    if bundle.cas.is_empty() {
        return Err("the trust bundle has no CA".into());
    }
    for (i, der) in bundle.cas.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("CA {i}: {e}"))?;
        if !cert.is_ca() {
            return Err(format!("CA {i} is not a CA certificate"));
        }
    }
    Ok(())
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Io { path: path.to_owned(), source })
}

fn invalid(path: &Path, message: impl ToString) -> IdentityError {
    IdentityError::Invalid { path: path.to_owned(), message: message.to_string() }
}

impl Identity {
    /// Loads the identity from `data_dir` (completing a promotion a crash
    /// interrupted).
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let dir = dir(data_dir);
        finish_promotion(&dir)?;
        let meta_path = dir.join("device.toml");
        if !meta_path.exists() {
            return Err(IdentityError::NotEnrolled(data_dir.to_owned()));
        }
        let meta: Meta = toml::from_str(&read(&meta_path)?).map_err(|e| invalid(&meta_path, e))?;
        let cert_path = dir.join("device.crt");
        let cert = CertificateDer::from_pem_slice(read(&cert_path)?.as_bytes()).map_err(|e| invalid(&cert_path, e))?;
        let cas = read_cas(&dir.join(CA_CRT))?;
        let revoked = std::sync::Arc::new(read_revoked(&dir.join(REVOKED))?);
        let key_path = dir.join("device.key");
        let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|e| invalid(&key_path, e))?;
        Ok(Identity { device_id: meta.device_id, hub: meta.hub, name: meta.name, cert, cas, revoked, key })
    }

    /// The renewed identity waiting for the hub to accept it, if any.
    pub fn load_next(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let current = Identity::load(data_dir)?;
        let dir = dir(data_dir);
        let (key_path, cert_path) = (dir.join(NEXT_KEY), dir.join(NEXT_CRT));
        if !key_path.exists() || !cert_path.exists() {
            return Ok(None);
        }
        let cert = CertificateDer::from_pem_slice(read(&cert_path)?.as_bytes()).map_err(|e| invalid(&cert_path, e))?;
        let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|e| invalid(&key_path, e))?;
        Ok(Some(Identity { cert, key, ..current }))
    }

    /// A certificate signing request for the key of the renewed
    /// certificate. The key is made now and kept in `next.key` (0600)
    /// before the request leaves, so the answer always finds its key; a
    /// key kept from an earlier request that got no answer is used again.
    pub fn renewal_request(&self, data_dir: &Path) -> Result<Vec<u8>, IdentityError> {
        let key_path = dir(data_dir).join(NEXT_KEY);
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| invalid(&key_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate().map_err(|e| invalid(&key_path, e))?;
                write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(|source| IdentityError::Io { path: key_path.clone(), source })?;
                key
            }
            Err(source) => return Err(IdentityError::Io { path: key_path, source }),
        };
        let mut params = rcgen::CertificateParams::new(Vec::new()).map_err(|e| invalid(&key_path, e))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, self.device_id.as_str());
        let csr = params.serialize_request(&key).map_err(|e| invalid(&key_path, e))?;
        Ok(csr.der().to_vec())
    }

    /// Keeps the certificate the hub signed at renewal in `next.crt` (0600),
    /// once it names this device and holds the key in `next.key`; returns
    /// the renewed identity. (It arrived over the authenticated session, or
    /// signed by the fleet CA over MQTT; the hub's handshake checks the
    /// chain before the identity is promoted.)
    pub fn store_renewed(&self, data_dir: &Path, cert_der: Vec<u8>) -> Result<Identity, IdentityError> {
        let dir = dir(data_dir);
        let key_path = dir.join(NEXT_KEY);
        let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|e| invalid(&key_path, e))?;
        let public = Signer::from_pkcs8(key.secret_der()).map_err(|e| invalid(&key_path, e))?.public_key().to_vec();
        let cert_path = dir.join(NEXT_CRT);
        if outpost_shared::identity::device_id_of(&cert_der).as_ref() != Some(&self.device_id) {
            return Err(invalid(&cert_path, "the renewed certificate names another device"));
        }
        if outpost_shared::identity::public_key_of(&cert_der) != Some(public) {
            return Err(invalid(&cert_path, "the renewed certificate is not for the key this device made"));
        }
        let cert = CertificateDer::from(cert_der);
        write_atomic(&cert_path, pem("CERTIFICATE", &cert).as_bytes(), 0o600)
            .map_err(|source| IdentityError::Io { path: cert_path, source })?;
        Ok(Identity { cert, key, ..self.clone() })
    }

    /// Makes the renewed identity the device's own, after the hub accepted
    /// it: `next.key` becomes `device.key`, then `next.crt` becomes
    /// `device.crt` (a crash between the two is completed by the next
    /// [`Identity::load`]).
    pub fn promote(data_dir: &Path) -> Result<(), IdentityError> {
        let dir = dir(data_dir);
        rename_durable(&dir.join(NEXT_KEY), &dir.join("device.key"))?;
        crate::crash::point("renew-mid-promotion");
        finish_promotion(&dir)
    }

    /// Forgets a renewed identity the hub refused (the next renewal makes a
    /// new key).
    pub fn discard_next(data_dir: &Path) {
        let dir = dir(data_dir);
        let _ = std::fs::remove_file(dir.join(NEXT_CRT));
        let _ = std::fs::remove_file(dir.join(NEXT_KEY));
    }

    /// True if a renewed identity waits to be tried.
    pub fn has_next(data_dir: &Path) -> bool {
        let dir = dir(data_dir);
        dir.join(NEXT_KEY).exists() && dir.join(NEXT_CRT).exists()
    }

    /// The files of the identity that hold secrets (each must be 0600).
    pub fn secret_files(data_dir: &Path) -> [PathBuf; 2] {
        let dir = dir(data_dir);
        [dir.join("device.key"), dir.join(NEXT_KEY)]
    }

    /// The certificate's validity, `(not_before, not_after)`.
    pub fn validity(&self) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        outpost_shared::identity::validity_of(&self.cert)
    }

    /// Fails if `data_dir` already holds an identity.
    pub fn ensure_absent(data_dir: &Path) -> Result<(), IdentityError> {
        match Identity::load(data_dir) {
            Ok(existing) => Err(IdentityError::AlreadyEnrolled(existing.device_id)),
            Err(IdentityError::NotEnrolled(_)) => Ok(()),
            Err(_) if dir(data_dir).join("device.toml").exists() => {
                Err(invalid(&dir(data_dir), "damaged identity present"))
            }
            Err(_) => Ok(()),
        }
    }

    /// Writes a new identity; the metadata file goes last, so a crash midway
    /// leaves the device not enrolled rather than half enrolled.
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        data_dir: &Path,
        device_id: DeviceId,
        hub: String,
        name: Option<String>,
        key_pem: String,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Self, IdentityError> {
        let dir = dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(|source| IdentityError::Io { path: dir.clone(), source })?;
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.join(name);
            write_atomic(&path, bytes, mode).map_err(|source| IdentityError::Io { path, source })
        };
        write("device.key", key_pem.as_bytes(), 0o600)?;
        write("device.crt", pem("CERTIFICATE", &cert).as_bytes(), 0o600)?;
        write(CA_CRT, pem("CERTIFICATE", &ca).as_bytes(), 0o644)?;
        let meta = Meta { device_id: device_id.clone(), hub: hub.clone(), name: name.clone() };
        let text = toml::to_string(&meta).map_err(|e| invalid(&dir, e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid(&dir.join("device.key"), e))?;
        // A new identity has no records at the hub: see `is_new`.
        write(NEW_MARKER, b"", 0o644)?;
        write("device.toml", text.as_bytes(), 0o644)?;
        Ok(Identity { device_id, hub, name, cert, cas: vec![ca], revoked: Default::default(), key })
    }

    /// The trust bundle this device holds, as the hub sent it.
    pub fn trust_bundle(&self) -> outpost_shared::protocol::TrustBundle {
        outpost_shared::protocol::TrustBundle {
            cas: self.cas.iter().map(|c| c.to_vec()).collect(),
            revoked: self.revoked.as_ref().clone(),
        }
    }

    /// Keeps the trust bundle the hub sent (checked with [`check_bundle`]):
    /// `ca.crt`, then `revoked`, each replaced atomically (a crash between
    /// the two leaves a bundle whose digest the hub does not know, and it
    /// sends the bundle again). Returns this identity with it.
    pub fn store_trust(
        &self,
        data_dir: &Path,
        bundle: &outpost_shared::protocol::TrustBundle,
    ) -> Result<Identity, IdentityError> {
        let dir = dir(data_dir);
        check_bundle(bundle).map_err(|e| invalid(&dir.join(CA_CRT), e))?;
        let mut revoked = bundle.revoked.clone();
        revoked.sort();
        revoked.dedup();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            write_atomic(&path, bytes, 0o644).map_err(|source| IdentityError::Io { path, source })
        };
        let cas_pem: String = bundle.cas.iter().map(|der| pem("CERTIFICATE", der)).collect();
        write(CA_CRT, cas_pem.as_bytes())?;
        let lines: String = revoked.iter().map(|id| format!("{id}\n")).collect();
        write(REVOKED, lines.as_bytes())?;
        let cas = bundle.cas.iter().map(|der| CertificateDer::from(der.clone())).collect();
        Ok(Identity { cas, revoked: std::sync::Arc::new(revoked), ..self.clone() })
    }

    /// True if the certificate was not issued by the CA that issues new
    /// ones (a CA rotation is under way): it is renewed at once.
    pub fn from_retiring_ca(&self) -> bool {
        self.cas.first().is_some_and(|ca| !outpost_shared::identity::issued_by(&self.cert, ca))
    }

    /// True if the hub said `id` is revoked.
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.revoked.binary_search(id).is_ok()
    }

    /// The CA the fleet's LAN announcements name: the oldest trusted, which
    /// every device of the fleet holds during a rotation.
    pub fn fleet_ca(&self) -> &[u8] {
        self.cas.last().map_or(&[], |c| c.as_ref())
    }

    /// True from enrollment until [`Identity::settle_new`]: the hub holds no
    /// record of this id yet, so a store made now may number from 1 and
    /// need not wait for the hub's mark (`store::resume_plan`) before it
    /// relays through a peer. A store deleted later finds no marker.
    pub fn is_new(data_dir: &Path) -> bool {
        dir(data_dir).join(NEW_MARKER).exists()
    }

    /// The first store of this identity exists: forget that it is new.
    pub fn settle_new(data_dir: &Path) {
        let _ = std::fs::remove_file(dir(data_dir).join(NEW_MARKER));
    }

    /// The private key, for TLS.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// A signer with the device key, for what the hub must be able to
    /// attribute to this device whoever carries it.
    pub fn signer(&self) -> Result<Signer, IdentityError> {
        Signer::from_pkcs8(self.key.secret_der())
            .map_err(|message| IdentityError::Invalid { path: PathBuf::from("device.key"), message })
    }
}

/// Completes a promotion a crash interrupted: `next.crt` left without
/// `next.key` belongs to `device.key` if it holds its public key (the key
/// was moved, the certificate not yet); otherwise it is a leftover.
fn finish_promotion(dir: &Path) -> Result<(), IdentityError> {
    let (cert_path, key_path) = (dir.join(NEXT_CRT), dir.join("device.key"));
    if !cert_path.exists() || dir.join(NEXT_KEY).exists() {
        return Ok(());
    }
    let cert = CertificateDer::from_pem_slice(read(&cert_path)?.as_bytes()).map_err(|e| invalid(&cert_path, e))?;
    let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|e| invalid(&key_path, e))?;
    let public = Signer::from_pkcs8(key.secret_der()).map_err(|e| invalid(&key_path, e))?.public_key().to_vec();
    if outpost_shared::identity::public_key_of(&cert) == Some(public) {
        rename_durable(&cert_path, &dir.join("device.crt"))
    } else {
        std::fs::remove_file(&cert_path).map_err(|source| IdentityError::Io { path: cert_path, source })
    }
}

/// Renames `from` to `to` and makes the rename durable.
fn rename_durable(from: &Path, to: &Path) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io { path: from.to_owned(), source };
    std::fs::rename(from, to).map_err(io)?;
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The identity the device presents now, shared by everything that
/// presents it (LAN peers, relayed batches' signatures) and replaced when
/// the device switches to a renewed certificate. Its [`Live::resolver`]
/// serves TLS configurations built once: they take the new certificate at
/// their next handshake.
#[derive(Clone)]
pub struct Live {
    identity: std::sync::Arc<std::sync::RwLock<Identity>>,
    slot: std::sync::Arc<outpost_shared::identity::CertSlot>,
    /// Bumped at each new trust bundle.
    trust: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Live").field(&self.get().device_id).finish()
    }
}

fn certified(identity: &Identity) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, IdentityError> {
    outpost_shared::identity::CertSlot::certified(vec![identity.cert.clone()], identity.key())
        .map_err(|e| invalid(Path::new("device.key"), e))
}

impl Live {
    /// Shares `identity`.
    pub fn new(identity: Identity) -> Result<Self, IdentityError> {
        let slot = std::sync::Arc::new(outpost_shared::identity::CertSlot::new(certified(&identity)?));
        let trust = std::sync::Arc::new(tokio::sync::watch::Sender::new(0));
        Ok(Live { identity: std::sync::Arc::new(std::sync::RwLock::new(identity)), slot, trust })
    }

    /// The identity in use.
    pub fn get(&self) -> Identity {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Switches to `identity`'s certificate and key (a promoted renewal);
    /// the trust bundle in use stays.
    pub fn set(&self, identity: Identity) -> Result<(), IdentityError> {
        self.slot.set(certified(&identity)?);
        let mut live = self.identity.write().unwrap_or_else(|p| p.into_inner());
        live.cert = identity.cert;
        live.key = identity.key;
        Ok(())
    }

    /// Keeps and uses the trust bundle the hub sent (see
    /// [`Identity::store_trust`]); LAN peers look again.
    pub fn set_trust(
        &self,
        data_dir: &Path,
        bundle: &outpost_shared::protocol::TrustBundle,
    ) -> Result<(), IdentityError> {
        let mut live = self.identity.write().unwrap_or_else(|p| p.into_inner());
        *live = live.store_trust(data_dir, bundle)?;
        drop(live);
        self.trust.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes of the trust bundle, from now on.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust.subscribe()
    }

    /// How many trust bundles this process took: a verifier built from an
    /// older one is built again.
    pub fn trust_generation(&self) -> u64 {
        *self.trust.borrow()
    }

    /// The rustls resolver (server and client side) of the identity in use.
    pub fn resolver(&self) -> std::sync::Arc<outpost_shared::identity::CertSlot> {
        self.slot.clone()
    }
}

/// PEM text of DER bytes.
fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// A CA and an enrolled identity for unit tests, as the hub makes them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA that signs CSRs for `dev-1`, as the hub does.
    pub(crate) struct Ca(pub(crate) Issuer<'static, KeyPair>, pub(crate) CertificateDer<'static>);

    impl Ca {
        pub(crate) fn new() -> Self {
            Ca::named("test CA")
        }

        pub(crate) fn named(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca(Issuer::new(params, key), cert.der().clone())
        }

        pub(crate) fn sign(&self, csr_der: &[u8]) -> CertificateDer<'static> {
            let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).unwrap();
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, "dev-1");
            let request = CertificateSigningRequestParams { params, public_key: csr.public_key };
            request.signed_by(&self.0).unwrap().der().clone()
        }
    }

    /// Identity `dev-1` in `dir`, issued by `ca`.
    pub(crate) fn enrolled(dir: &Path, ca: &Ca) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "x");
        let cert = ca.sign(params.serialize_request(&key).unwrap().der());
        let id: DeviceId = "dev-1".parse().unwrap();
        Identity::store(dir, id, "hub:1".into(), None, key.serialize_pem(), cert, ca.1.clone()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Ca, enrolled};
    use super::*;
    use rcgen::{CertificateParams, CertificateSigningRequestParams, DnType, KeyPair, PublicKeyData};

    /// The hub's trust bundle is kept as sent, read back after a restart,
    /// and says when the certificate is from a CA being retired; a bundle
    /// without a CA, or with something else than a CA, is refused.
    #[test]
    fn the_trust_bundle_is_kept_and_read_back() {
        use outpost_shared::protocol::TrustBundle;
        let (old_ca, new_ca) = (Ca::named("old CA"), Ca::named("new CA"));
        let dir = tempfile::tempdir().unwrap();
        let id = enrolled(dir.path(), &old_ca);
        assert!(!id.from_retiring_ca());
        let dev = |s: &str| -> DeviceId { s.parse().unwrap() };
        let bundle =
            TrustBundle { cas: vec![new_ca.1.to_vec(), old_ca.1.to_vec()], revoked: vec![dev("dev-9"), dev("dev-3")] };
        let kept = id.store_trust(dir.path(), &bundle).unwrap();
        assert!(kept.from_retiring_ca(), "issued by the old CA, the new one is first");
        assert!(kept.is_revoked(&dev("dev-3")) && kept.is_revoked(&dev("dev-9")) && !kept.is_revoked(&dev("dev-1")));
        let loaded = Identity::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_bundle(), kept.trust_bundle());
        assert_eq!(loaded.fleet_ca(), old_ca.1.as_ref(), "announcements name the oldest CA");
        let mut sorted = bundle.clone();
        sorted.revoked.sort();
        assert_eq!(loaded.trust_bundle().digest(), sorted.digest(), "the hub's digest of what it sent");

        assert!(id.store_trust(dir.path(), &TrustBundle::default()).is_err());
        let not_a_ca = TrustBundle { cas: vec![id.cert.to_vec()], revoked: Vec::new() };
        assert!(id.store_trust(dir.path(), &not_a_ca).is_err());
        assert_eq!(
            Identity::load(dir.path()).unwrap().trust_bundle(),
            kept.trust_bundle(),
            "a refused one changes nothing"
        );
    }

    fn public(identity: &Identity) -> Vec<u8> {
        identity.signer().unwrap().public_key().to_vec()
    }

    /// Every state a crash can leave during a renewal loads as an identity
    /// that can connect: the old one until the new one is complete, then
    /// the new one.
    #[test]
    fn a_renewal_interrupted_at_any_step_leaves_a_usable_identity() {
        let ca = Ca::new();
        let dir = tempfile::tempdir().unwrap();
        let old = enrolled(dir.path(), &ca);

        // Crash after the request left: only next.key. The old identity is
        // in use, and the next request reuses the key.
        let csr = old.renewal_request(dir.path()).unwrap();
        assert!(Identity::load_next(dir.path()).unwrap().is_none());
        assert_eq!(public(&Identity::load(dir.path()).unwrap()), public(&old));
        let again = old.renewal_request(dir.path()).unwrap();
        let key_of = |csr: &[u8]| {
            CertificateSigningRequestParams::from_der(&csr.to_vec().into()).unwrap().public_key.der_bytes().to_vec()
        };
        assert_eq!(key_of(&csr), key_of(&again));
        let mode = std::fs::metadata(dir.path().join("identity/next.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

        // A certificate for another key is refused.
        let foreign_csr = {
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, "dev-1");
            params.serialize_request(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
        };
        assert!(old.store_renewed(dir.path(), ca.sign(&foreign_csr).to_vec()).is_err());

        // Crash after the answer was kept: both pairs on disk; the current
        // one loads, the renewed one is offered first.
        let next = old.store_renewed(dir.path(), ca.sign(&csr).to_vec()).unwrap();
        assert_eq!(public(&Identity::load(dir.path()).unwrap()), public(&old));
        let offered = Identity::load_next(dir.path()).unwrap().unwrap();
        assert_eq!(public(&offered), public(&next));
        assert_eq!(offered.cert, next.cert);

        // Crash in the middle of the promotion: the key moved, the
        // certificate not yet. Loading completes it.
        rename_durable(&dir.path().join("identity/next.key"), &dir.path().join("identity/device.key")).unwrap();
        let loaded = Identity::load(dir.path()).unwrap();
        assert_eq!(public(&loaded), public(&next));
        assert_eq!(loaded.cert, next.cert);
        assert!(Identity::load_next(dir.path()).unwrap().is_none());
        assert!(!Identity::has_next(dir.path()));

        // A whole promotion, then a refused renewal's leftovers discarded.
        let csr = loaded.renewal_request(dir.path()).unwrap();
        let third = loaded.store_renewed(dir.path(), ca.sign(&csr).to_vec()).unwrap();
        Identity::promote(dir.path()).unwrap();
        assert_eq!(public(&Identity::load(dir.path()).unwrap()), public(&third));
        third.renewal_request(dir.path()).unwrap();
        Identity::discard_next(dir.path());
        assert!(!dir.path().join("identity/next.key").exists());
        assert_eq!(public(&Identity::load(dir.path()).unwrap()), public(&third));
    }
}
