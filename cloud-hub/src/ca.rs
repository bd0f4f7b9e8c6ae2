//! The fleet's certificate authority, kept in the hub's data dir.
//!
//! `init` makes a self-signed CA (ECDSA P-256, ten years) and writes
//! `ca.crt` and `ca.key` (mode 0600). The CA signs device certificates from
//! CSRs (the device keeps its key) and the hub's own TLS certificate, which
//! names [`HUB_SERVER_NAME`] so agents verify it whatever address they dial.

use outpost_shared::fsutil::write_atomic;
use outpost_shared::identity::{CertSlot, HUB_SERVER_NAME, Signer};
use outpost_shared::{DeviceId, Fingerprint};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Common name of the hub's certificate: its user name at an MQTT broker
/// that takes user names from client certificates. It has a dot, which no
/// [`DeviceId`] may contain, so no device certificate can carry it.
pub const HUB_MQTT_USER: &str = "hub.outpost";

/// Default lifetime of device certificates (`[quic] device_cert_lifetime`);
/// devices renew theirs over their session (see [`FleetCa::sign_device`]).
pub const DEVICE_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(365 * 86400);

/// Default lifetime of the hub's own TLS certificate (`[quic]
/// cert_lifetime`); renewed while the hub runs, see [`HubIdentity`].
pub const HUB_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 86400);

/// How far back a new certificate's `not_before` lies, so a peer whose
/// clock is a few minutes behind still takes it: five minutes, or a tenth
/// of a short lifetime (tests), so the slack never moves the renewal point
/// (a share of the whole validity) to the moment of issue.
fn clock_slack(lifetime: std::time::Duration) -> Duration {
    Duration::try_from(lifetime / 10).unwrap_or(Duration::ZERO).min(Duration::minutes(5))
}

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The data dir already holds a CA; `init` never overwrites one.
    #[error("{0} already exists: this data dir is initialised")]
    AlreadyInitialised(PathBuf),
    /// No CA in the data dir.
    #[error("no CA in {0}: run `outpost-hub init --data-dir {0}` first")]
    NotInitialised(PathBuf),
    /// A certificate or key could not be made, parsed or signed.
    #[error("certificate operation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// A CSR was not acceptable.
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
}

/// The fleet CA: its certificate and signing key.
pub struct FleetCa {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The CA key as a signer of messages to devices over carriers that do
    /// not authenticate the hub (MQTT).
    signer: Signer,
    /// Lifetime of the device certificates it signs.
    device_lifetime: std::time::Duration,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").field("fingerprint", &self.fingerprint().to_string()).finish()
    }
}

fn signer_of(key_pair: &KeyPair) -> Result<Signer, CaError> {
    Signer::from_pkcs8(&key_pair.serialize_der()).map_err(|e| CaError::BadCsr(format!("CA key: {e}")))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_owned(), source }
}

impl FleetCa {
    /// Makes a new CA in `data_dir`, refusing to replace an existing one.
    pub fn init(data_dir: &Path) -> Result<Self, CaError> {
        let (crt, key) = (data_dir.join("ca.crt"), data_dir.join("ca.key"));
        if crt.exists() || key.exists() {
            return Err(CaError::AlreadyInitialised(crt));
        }
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, "Outpost fleet CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key_pair = KeyPair::generate()?;
        let cert = params.self_signed(&key_pair)?;
        write_atomic(&key, key_pair.serialize_pem().as_bytes(), 0o600).map_err(io_err(&key))?;
        write_atomic(&crt, cert.pem().as_bytes(), 0o644).map_err(io_err(&crt))?;
        let signer = signer_of(&key_pair)?;
        Ok(FleetCa {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key_pair),
            signer,
            device_lifetime: DEVICE_CERT_LIFETIME,
        })
    }

    /// Loads the CA from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, CaError> {
        let (crt, key) = (data_dir.join("ca.crt"), data_dir.join("ca.key"));
        if !crt.exists() {
            return Err(CaError::NotInitialised(data_dir.to_owned()));
        }
        let crt_pem = std::fs::read_to_string(&crt).map_err(io_err(&crt))?;
        let key_pem = std::fs::read_to_string(&key).map_err(io_err(&key))?;
        let key_pair = KeyPair::from_pem(&key_pem)?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(crt_pem.as_bytes())
            .map_err(|e| CaError::BadCsr(format!("{}: {e}", crt.display())))?;
        let signer = signer_of(&key_pair)?;
        let issuer = Issuer::from_ca_cert_pem(&crt_pem, key_pair)?;
        Ok(FleetCa { cert_der, issuer, signer, device_lifetime: DEVICE_CERT_LIFETIME })
    }

    /// Signs messages to devices (see [`outpost_shared::protocol::Signed`]).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The fingerprint enrollment tokens pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    /// Device certificates it signs from now on live `lifetime`.
    pub fn with_device_lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.device_lifetime = lifetime;
        self
    }

    /// The lifetime of the device certificates it signs.
    pub fn device_lifetime(&self) -> std::time::Duration {
        self.device_lifetime
    }

    /// Signs a device certificate for the key in `csr_der` (whose signature
    /// proves the requester holds that key), at enrollment and at each
    /// renewal. The subject is the hub's choice (`CN = device id`); whatever
    /// the CSR asks for besides its public key is ignored.
    pub fn sign_device(&self, csr_der: &[u8], id: &DeviceId) -> Result<CertificateDer<'static>, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, id.as_str());
        let san = outpost_shared::identity::device_server_name(id.as_str());
        params.subject_alt_names = vec![SanType::DnsName(san.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - clock_slack(self.device_lifetime);
        params.not_after = now + Duration::try_from(self.device_lifetime).unwrap_or(Duration::days(365));
        let request = CertificateSigningRequestParams { params, public_key: csr.public_key };
        Ok(request.signed_by(&self.issuer)?.der().clone())
    }

    /// Makes a fresh TLS identity for the hub, valid for `lifetime`: the
    /// chain (hub certificate, CA), its key and its validity. It serves the
    /// QUIC endpoint and is the hub's client certificate at an MQTT broker,
    /// where its common name [`HUB_MQTT_USER`] is the user the broker's ACL
    /// grants the fleet's topics.
    pub fn hub_identity(&self, lifetime: std::time::Duration) -> Result<IssuedIdentity, CaError> {
        let mut params = CertificateParams::new(vec![HUB_SERVER_NAME.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, HUB_MQTT_USER);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - clock_slack(lifetime);
        params.not_after = now + Duration::try_from(lifetime).unwrap_or(Duration::days(90));
        let (not_before, not_after) = (params.not_before.into(), params.not_after.into());
        let key_pair = KeyPair::generate()?;
        let cert = params.signed_by(&key_pair, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        Ok(IssuedIdentity { chain: vec![cert.der().clone(), self.cert_der.clone()], key, not_before, not_after })
    }
}

/// A TLS identity the CA issued: chain, key and validity.
#[derive(Debug)]
pub struct IssuedIdentity {
    /// The certificate, then the CA's.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// Valid from.
    pub not_before: std::time::SystemTime,
    /// Valid until.
    pub not_after: std::time::SystemTime,
}

/// The hub's own TLS identity, renewed while the hub runs ([`HubIdentity::run`]):
/// a rustls certificate resolver for the QUIC endpoint (sessions and bulk
/// connections alike) and for the MQTT bridge's client side. Each new
/// handshake takes the current certificate; a connection made with the
/// previous one is not touched (TLS checks a certificate at the handshake
/// only), so a renewal drops no session.
pub struct HubIdentity {
    ca: std::sync::Arc<FleetCa>,
    lifetime: std::time::Duration,
    slot: std::sync::Arc<CertSlot>,
    validity: std::sync::RwLock<(std::time::SystemTime, std::time::SystemTime)>,
}

impl std::fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubIdentity").field("not_after", &self.not_after()).finish()
    }
}

impl HubIdentity {
    /// Issues the hub's first certificate of `lifetime` from `ca`.
    pub fn new(ca: std::sync::Arc<FleetCa>, lifetime: std::time::Duration) -> Result<Self, CaError> {
        let (key, validity) = Self::issue(&ca, lifetime)?;
        Ok(HubIdentity {
            ca,
            lifetime,
            slot: std::sync::Arc::new(CertSlot::new(key)),
            validity: std::sync::RwLock::new(validity),
        })
    }

    #[allow(clippy::type_complexity)]
    fn issue(
        ca: &FleetCa,
        lifetime: std::time::Duration,
    ) -> Result<(std::sync::Arc<rustls::sign::CertifiedKey>, (std::time::SystemTime, std::time::SystemTime)), CaError>
    {
        let issued = ca.hub_identity(lifetime)?;
        let key = CertSlot::certified(issued.chain, issued.key).map_err(CaError::BadCsr)?;
        Ok((key, (issued.not_before, issued.not_after)))
    }

    /// Replaces the certificate with a new one (a new key too).
    pub fn renew(&self) -> Result<(), CaError> {
        let (key, validity) = Self::issue(&self.ca, self.lifetime)?;
        self.slot.set(key);
        *self.validity.write().unwrap_or_else(|p| p.into_inner()) = validity;
        Ok(())
    }

    /// The current certificate's end of validity.
    pub fn not_after(&self) -> std::time::SystemTime {
        self.validity.read().unwrap_or_else(|p| p.into_inner()).1
    }

    /// When the current certificate is to be renewed.
    pub fn due(&self) -> std::time::SystemTime {
        let (from, until) = *self.validity.read().unwrap_or_else(|p| p.into_inner());
        outpost_shared::identity::renewal_due(from, until, outpost_shared::identity::RENEW_AT)
    }

    /// The current certificate and key.
    pub fn certified_key(&self) -> std::sync::Arc<rustls::sign::CertifiedKey> {
        self.slot.get()
    }

    /// The rustls resolver (server and client side) that presents the
    /// current certificate at each handshake.
    pub fn resolver(&self) -> std::sync::Arc<CertSlot> {
        self.slot.clone()
    }

    /// Renews the certificate whenever it is due, until `shutdown`. It
    /// wakes at the due time, or after an hour at most, so a wall clock
    /// that jumps (a suspended machine, a corrected clock) is noticed; a
    /// failed renewal is retried a minute later.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        const AT_MOST: std::time::Duration = std::time::Duration::from_secs(3600);
        const RETRY: std::time::Duration = std::time::Duration::from_secs(60);
        let mut wait = std::time::Duration::ZERO;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let now = std::time::SystemTime::now();
            let due = self.due();
            if now < due {
                wait = due.duration_since(now).unwrap_or_default().min(AT_MOST);
                continue;
            }
            wait = match self.renew() {
                Ok(()) => {
                    let not_after = outpost_shared::time::Timestamp::from_system(self.not_after()).rfc3339();
                    tracing::info!(%not_after, "Hub certificate renewed.");
                    std::time::Duration::ZERO
                }
                Err(e) => {
                    tracing::error!(error = %e, "Hub certificate not renewed; retrying in a minute.");
                    RETRY
                }
            };
        }
    }
}

pub use outpost_shared::identity::{device_id_of, public_key_of};

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::identity::{RENEW_AT, renewal_due};

    #[test]
    fn signs_device_certificates_with_the_hub_chosen_id() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::init(dir.path()).unwrap();
        assert!(matches!(FleetCa::init(dir.path()), Err(CaError::AlreadyInitialised(_))));
        let ca = {
            drop(ca);
            FleetCa::load(dir.path()).unwrap()
        };

        let device_key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil".into()]).unwrap();
        asked.distinguished_name.push(DnType::CommonName, "dev-admin");
        let csr = asked.serialize_request(&device_key).unwrap();
        let id: DeviceId = "dev-0001".parse().unwrap();
        let cert = ca.sign_device(csr.der(), &id).unwrap();
        assert_eq!(device_id_of(&cert), Some(id));

        assert!(matches!(ca.sign_device(b"not a csr", &"dev-x".parse().unwrap()), Err(CaError::BadCsr(_))));
    }

    #[test]
    fn the_hub_certificate_is_renewed_at_two_thirds_of_its_life_with_a_new_key() {
        use std::time::{Duration as Std, UNIX_EPOCH};
        let at = |s: u64| UNIX_EPOCH + Std::from_secs(s);
        assert_eq!(renewal_due(at(0), at(90), RENEW_AT), at(60));
        assert_eq!(renewal_due(at(0), at(100), 0.5), at(50));
        assert_eq!(renewal_due(at(0), at(100), 2.0), at(95), "a fraction is clamped below the end");
        assert_eq!(renewal_due(at(1000), at(1000), RENEW_AT), at(1000));
        // A clock that puts the end before the start renews at once.
        assert_eq!(renewal_due(at(50), at(10), RENEW_AT), at(50));
        let dir = tempfile::tempdir().unwrap();
        let ca = std::sync::Arc::new(FleetCa::init(dir.path()).unwrap());
        let identity = HubIdentity::new(ca, Std::from_secs(900)).unwrap();
        let life = identity.not_after().duration_since(std::time::SystemTime::now()).unwrap();
        assert!(life > Std::from_secs(890) && life <= Std::from_secs(900), "{life:?}");
        let before = identity.certified_key();
        identity.renew().unwrap();
        let after = identity.certified_key();
        assert_ne!(before.cert[0], after.cert[0]);
        assert_ne!(before.end_entity_cert().unwrap(), after.end_entity_cert().unwrap());
        assert_eq!(after.cert[1], before.cert[1], "the chain ends in the same CA");
    }

    /// The slack before `not_before` is a tenth of a short lifetime: with a
    /// fixed five minutes, a 12 s certificate would be due for renewal the
    /// moment it is issued, and renewed in a loop.
    #[test]
    fn short_certificates_are_not_due_when_issued() {
        use std::time::{Duration as Std, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let ca = std::sync::Arc::new(FleetCa::init(dir.path()).unwrap());
        let hub = HubIdentity::new(ca.clone(), Std::from_secs(12)).unwrap();
        assert!(hub.due() > SystemTime::now() + Std::from_secs(6), "{:?}", hub.due());
        let ca = FleetCa::load(dir.path()).unwrap().with_device_lifetime(Std::from_secs(30));
        let csr = CertificateParams::new(Vec::new()).unwrap().serialize_request(&KeyPair::generate().unwrap()).unwrap();
        let cert = ca.sign_device(csr.der(), &"dev-1".parse().unwrap()).unwrap();
        let (from, until) = outpost_shared::identity::validity_of(&cert).unwrap();
        assert!(until.duration_since(from).unwrap() <= Std::from_secs(34));
        assert!(renewal_due(from, until, RENEW_AT) > SystemTime::now() + Std::from_secs(15));
        assert_eq!(clock_slack(Std::from_secs(365 * 86400)), Duration::minutes(5));
    }

    #[test]
    fn ca_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        FleetCa::init(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
