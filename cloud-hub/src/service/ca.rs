//! The fleet's certificate authority, kept in the hub's data dir.
//!
//! `init` makes a self-signed CA (ECDSA P-256, ten years) and writes
//! `ca.crt` and `ca.key` (mode 0600). The CA signs device certificates from
//! CSRs (the device keeps its key) and the hub's own TLS certificate, which
//! names [`HUB_SERVER_NAME`] so agents verify it whatever address they dial.

use outpost_shared::fsutil::write_atomic;
use outpost_shared::identity::{CertSlot, HUB_SERVER_NAME, Signer};
use outpost_shared::time::Timestamp;
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

/// One CA certificate with its key.
struct Authority {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The CA key as a signer of messages to devices over carriers that do
    /// not authenticate the hub (MQTT).
    signer: Signer,
}

impl Authority {
    fn load(crt: &Path, key: &Path) -> Result<Self, CaError> {
        let crt_pem = std::fs::read_to_string(crt).map_err(io_err(crt))?;
        let key_pem = std::fs::read_to_string(key).map_err(io_err(key))?;
        let key_pair = KeyPair::from_pem(&key_pem)?;
        let cert_der: CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(crt_pem.as_bytes())
            .map_err(|e| CaError::BadCsr(format!("{}: {e}", crt.display())))?;
        let signer = signer_of(&key_pair)?;
        if outpost_shared::identity::public_key_of(&cert_der).as_deref() != Some(signer.public_key()) {
            return Err(CaError::BadCsr(format!("{} is not the certificate of {}", crt.display(), key.display())));
        }
        let issuer = Issuer::from_ca_cert_pem(&crt_pem, key_pair)?;
        Ok(Authority { cert_der, issuer, signer })
    }

    /// A new self-signed CA named `name`, valid ten years from `now`,
    /// written to `crt` and `key` (0600).
    fn make(name: &str, now: OffsetDateTime, crt: &Path, key: &Path) -> Result<Self, CaError> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key_pair = KeyPair::generate()?;
        let cert = params.self_signed(&key_pair)?;
        write_atomic(key, key_pair.serialize_pem().as_bytes(), 0o600).map_err(io_err(key))?;
        write_atomic(crt, cert.pem().as_bytes(), 0o644).map_err(io_err(crt))?;
        let signer = signer_of(&key_pair)?;
        Ok(Authority { cert_der: cert.der().clone(), issuer: Issuer::new(params, key_pair), signer })
    }
}

/// The CA a rotation replaced, trusted until `until`.
struct Previous {
    authority: Authority,
    until: std::time::SystemTime,
}

/// Files of the CA: the current one, and during a rotation the previous
/// one with the end of its overlap, and the new one while a rotation is
/// being written.
const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const PREVIOUS_CRT: &str = "ca-previous.crt";
const PREVIOUS_KEY: &str = "ca-previous.key";
const PREVIOUS_UNTIL: &str = "ca-previous.until";
const NEXT_CRT: &str = "ca-next.crt";
const NEXT_KEY: &str = "ca-next.key";

/// The fleet CA: the current CA certificate and key, which sign device
/// certificates, and during a rotation ([`FleetCa::rotate`]) the previous
/// one, still trusted until the overlap ends.
///
/// Until then the previous CA also *authenticates the hub* (its TLS
/// certificate, its signature on messages through a broker, the pin of new
/// enrollment tokens): devices that have not yet heard of the new CA still
/// know the hub, and devices that have trust both. At the end of the
/// overlap the current CA takes over and the previous one is trusted no
/// more.
pub struct FleetCa {
    current: Authority,
    previous: Option<Previous>,
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

/// The name of a CA made at `now`, with a random tag: CAs of successive
/// rotations never share a name (a verifier picks the CA by name, and two
/// of one name fail as a bad signature instead of an unknown CA).
fn ca_name(now: OffsetDateTime) -> String {
    let tag: u32 = rand::random();
    format!("Outpost fleet CA {} {tag:08x}", Timestamp::from_system(now.into()).rfc3339())
}

/// Renames `from` to `to` (if `from` is still there) and syncs the
/// directory.
fn rename_durable(dir: &Path, from: &str, to: &str) -> Result<(), CaError> {
    let (from, to) = (dir.join(from), dir.join(to));
    if from.exists() {
        std::fs::rename(&from, &to).map_err(io_err(&from))?;
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Completes or undoes a rotation a crash interrupted: once
/// `ca-previous.until` is written the rotation happened, and the new CA's
/// files are moved into place; before that it did not, and they are
/// removed.
fn finish_rotation(dir: &Path) -> Result<(), CaError> {
    if !dir.join(NEXT_CRT).exists() && !dir.join(NEXT_KEY).exists() {
        return Ok(());
    }
    if dir.join(PREVIOUS_UNTIL).exists() {
        rename_durable(dir, NEXT_KEY, CA_KEY)?;
        rename_durable(dir, NEXT_CRT, CA_CRT)
    } else {
        for name in [NEXT_CRT, NEXT_KEY] {
            let path = dir.join(name);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(io_err(&path)(e));
            }
        }
        Ok(())
    }
}

/// Which CA authenticates the hub at `now`: the previous one while its
/// overlap lasts.
pub fn hub_authority_is_previous(previous_until: Option<std::time::SystemTime>, now: std::time::SystemTime) -> bool {
    previous_until.is_some_and(|until| now < until)
}

impl FleetCa {
    /// Makes a new CA in `data_dir`, refusing to replace an existing one.
    pub fn init(data_dir: &Path) -> Result<Self, CaError> {
        let (crt, key) = (data_dir.join(CA_CRT), data_dir.join(CA_KEY));
        if crt.exists() || key.exists() {
            return Err(CaError::AlreadyInitialised(crt));
        }
        let now = OffsetDateTime::now_utc();
        let current = Authority::make(&ca_name(now), now, &crt, &key)?;
        Ok(FleetCa { current, previous: None, device_lifetime: DEVICE_CERT_LIFETIME })
    }

    /// Loads the CA from `data_dir` (completing a rotation a crash
    /// interrupted), with the previous CA of a rotation if there is one.
    pub fn load(data_dir: &Path) -> Result<Self, CaError> {
        let (crt, key) = (data_dir.join(CA_CRT), data_dir.join(CA_KEY));
        if !crt.exists() {
            return Err(CaError::NotInitialised(data_dir.to_owned()));
        }
        finish_rotation(data_dir)?;
        let current = Authority::load(&crt, &key)?;
        let until_path = data_dir.join(PREVIOUS_UNTIL);
        let previous = match std::fs::read_to_string(&until_path) {
            Ok(text) => {
                let until = humantime::parse_rfc3339(text.trim())
                    .map_err(|e| CaError::BadCsr(format!("{}: {e}", until_path.display())))?;
                let authority = Authority::load(&data_dir.join(PREVIOUS_CRT), &data_dir.join(PREVIOUS_KEY))?;
                Some(Previous { authority, until })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&until_path)(e)),
        };
        Ok(FleetCa { current, previous, device_lifetime: DEVICE_CERT_LIFETIME })
    }

    /// Rotates the CA in `data_dir`: a new CA signs device certificates
    /// from now on; the current one becomes the previous one, trusted for
    /// `overlap` more. Refused while an earlier rotation's overlap lasts.
    /// Each step is a durable file operation; [`FleetCa::load`] completes
    /// or undoes one a crash interrupted. Returns the end of the overlap.
    pub fn rotate(data_dir: &Path, overlap: std::time::Duration) -> Result<std::time::SystemTime, CaError> {
        let ca = FleetCa::load(data_dir)?;
        let now = std::time::SystemTime::now();
        if let Some(until) = ca.previous.as_ref().map(|p| p.until).filter(|until| now < *until) {
            return Err(CaError::BadCsr(format!(
                "a rotation is under way: the previous CA is trusted until {}; rotate again after that",
                Timestamp::from_system(until).rfc3339()
            )));
        }
        let at = OffsetDateTime::now_utc();
        let (next_crt, next_key) = (data_dir.join(NEXT_CRT), data_dir.join(NEXT_KEY));
        Authority::make(&ca_name(at), at, &next_crt, &next_key)?;
        let until_path = data_dir.join(PREVIOUS_UNTIL);
        let _ = std::fs::remove_file(&until_path);
        for (from, to, mode) in [(CA_KEY, PREVIOUS_KEY, 0o600), (CA_CRT, PREVIOUS_CRT, 0o644)] {
            let (from, to) = (data_dir.join(from), data_dir.join(to));
            let bytes = std::fs::read(&from).map_err(io_err(&from))?;
            write_atomic(&to, &bytes, mode).map_err(io_err(&to))?;
        }
        // Whole seconds, as the file keeps it.
        let end = (now + overlap).duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_secs(end);
        write_atomic(&until_path, Timestamp::from_system(until).rfc3339().as_bytes(), 0o644)
            .map_err(io_err(&until_path))?;
        finish_rotation(data_dir)?;
        Ok(until)
    }

    fn previous_at(&self, now: std::time::SystemTime) -> Option<&Previous> {
        self.previous.as_ref().filter(|p| hub_authority_is_previous(Some(p.until), now))
    }

    /// The CA that authenticates the hub at `now` (see [`FleetCa`]).
    fn hub_authority(&self, now: std::time::SystemTime) -> &Authority {
        self.previous_at(now).map_or(&self.current, |p| &p.authority)
    }

    /// Signs messages to devices (see [`outpost_shared::protocol::Signed`])
    /// with the key of the CA that authenticates the hub now.
    pub fn signer(&self) -> &Signer {
        &self.hub_authority(std::time::SystemTime::now()).signer
    }

    /// The CA certificates trusted at `now`: the current one first, then
    /// the previous one while its overlap lasts.
    pub fn trusted(&self, now: std::time::SystemTime) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.current.cert_der.clone())
            .chain(self.previous_at(now).map(|p| p.authority.cert_der.clone()))
            .collect()
    }

    /// The end of a rotation's overlap still to come at `now`.
    pub fn overlap_until(&self, now: std::time::SystemTime) -> Option<std::time::SystemTime> {
        self.previous_at(now).map(|p| p.until)
    }

    /// The certificate of the CA that signs device certificates.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.current.cert_der
    }

    /// The fingerprint new enrollment tokens pin: the CA that authenticates
    /// the hub now.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.hub_authority(std::time::SystemTime::now()).cert_der)
    }

    /// The trusted CA certificate with fingerprint `pin` (an enrollment
    /// token's), if any.
    pub fn trusted_by_fingerprint(&self, pin: &Fingerprint) -> Option<CertificateDer<'static>> {
        self.trusted(std::time::SystemTime::now()).into_iter().find(|c| Fingerprint::of_der(c) == *pin)
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
        Ok(request.signed_by(&self.current.issuer)?.der().clone())
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
        let authority = self.hub_authority(now.into());
        let cert = params.signed_by(&key_pair, &authority.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let chain = vec![cert.der().clone(), authority.cert_der.clone()];
        // Issued under the previous CA, it is replaced when the overlap ends.
        let replace_at = self.overlap_until(now.into());
        Ok(IssuedIdentity { chain, key, not_before, not_after, replace_at })
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
    /// Issued by a CA whose overlap ends then: replaced at that time.
    pub replace_at: Option<std::time::SystemTime>,
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
    validity: std::sync::RwLock<Validity>,
}

/// The current certificate's validity and when a CA rotation's overlap
/// ends, if it was issued by the previous CA.
type Validity = (std::time::SystemTime, std::time::SystemTime, Option<std::time::SystemTime>);

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

    fn issue(
        ca: &FleetCa,
        lifetime: std::time::Duration,
    ) -> Result<(std::sync::Arc<rustls::sign::CertifiedKey>, Validity), CaError> {
        let issued = ca.hub_identity(lifetime)?;
        let key = CertSlot::certified(issued.chain, issued.key).map_err(CaError::BadCsr)?;
        Ok((key, (issued.not_before, issued.not_after, issued.replace_at)))
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

    /// When the current certificate is to be renewed: at two thirds of its
    /// life, or when the overlap of the CA that issued it ends.
    pub fn due(&self) -> std::time::SystemTime {
        let (from, until, replace_at) = *self.validity.read().unwrap_or_else(|p| p.into_inner());
        let due = outpost_shared::identity::renewal_due(from, until, outpost_shared::identity::RENEW_AT);
        replace_at.map_or(due, |at| at.min(due))
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
    /// `ca_changed` is called when a renewal moved the hub to the current
    /// CA at the end of a rotation's overlap.
    pub async fn run(
        self: std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
        ca_changed: impl Fn() + Send + 'static,
    ) {
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
            let overlap_ended = self.validity.read().unwrap_or_else(|p| p.into_inner()).2.is_some_and(|at| now >= at);
            wait = match self.renew() {
                Ok(()) if overlap_ended => {
                    tracing::info!(
                        "The CA rotation's overlap ended: the hub's certificate is now from the new CA, the previous CA is trusted no more."
                    );
                    ca_changed();
                    std::time::Duration::ZERO
                }
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

    fn csr() -> Vec<u8> {
        CertificateParams::new(Vec::new())
            .unwrap()
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    /// A rotation: the new CA signs devices, the previous one authenticates
    /// the hub and is trusted until the overlap ends; then only the new one.
    #[test]
    fn a_rotation_overlaps_then_hands_over_to_the_new_ca() {
        use outpost_shared::identity::issued_by;
        use std::time::{Duration as Std, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let old = FleetCa::init(dir.path()).unwrap();
        let old_der = old.cert_der().clone();
        let before = old.sign_device(&csr(), &"dev-1".parse().unwrap()).unwrap();
        let until = FleetCa::rotate(dir.path(), Std::from_secs(3600)).unwrap();
        let refused = FleetCa::rotate(dir.path(), Std::from_secs(3600)).unwrap_err();
        assert!(refused.to_string().contains("rotation is under way"), "{refused}");

        let ca = FleetCa::load(dir.path()).unwrap();
        let now = SystemTime::now();
        let new_der = ca.cert_der().clone();
        assert_ne!(new_der, old_der);
        assert_eq!(ca.trusted(now), vec![new_der.clone(), old_der.clone()]);
        assert_eq!(ca.overlap_until(now), Some(until));
        // Devices are signed by the new CA; the hub still shows the old one.
        let after = ca.sign_device(&csr(), &"dev-2".parse().unwrap()).unwrap();
        assert!(issued_by(&after, &new_der) && !issued_by(&after, &old_der));
        assert!(issued_by(&before, &old_der) && !issued_by(&before, &new_der));
        assert_eq!(ca.fingerprint(), Fingerprint::of_der(&old_der), "new tokens pin the CA devices know");
        assert!(ca.trusted_by_fingerprint(&Fingerprint::of_der(&old_der)).is_some());
        let hub = ca.hub_identity(Std::from_secs(86_400)).unwrap();
        assert_eq!(hub.chain[1], old_der);
        assert!(issued_by(&hub.chain[0], &old_der));
        assert_eq!(hub.replace_at, Some(until), "replaced when the overlap ends");
        assert_eq!(ca.signer().public_key(), outpost_shared::identity::public_key_of(&old_der).unwrap());

        // After the overlap: the new CA alone.
        let later = until + Std::from_secs(1);
        assert_eq!(ca.trusted(later), vec![new_der.clone()]);
        assert_eq!(ca.overlap_until(later), None);
        assert!(hub_authority_is_previous(Some(until), now) && !hub_authority_is_previous(Some(until), later));
        assert!(!hub_authority_is_previous(None, now));
    }

    /// A crash while a rotation writes its files leaves either the old CA
    /// (nothing rotated) or the complete rotation.
    #[test]
    fn a_rotation_interrupted_is_undone_or_completed() {
        use std::time::Duration as Std;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = FleetCa::init(d).unwrap().cert_der().clone();
        // Crash after the new CA was written, before the overlap was: undone.
        Authority::make("x", OffsetDateTime::now_utc(), &d.join(NEXT_CRT), &d.join(NEXT_KEY)).unwrap();
        let ca = FleetCa::load(d).unwrap();
        assert_eq!(ca.trusted(std::time::SystemTime::now()), vec![old.clone()]);
        assert!(!d.join(NEXT_CRT).exists() && !d.join(NEXT_KEY).exists());
        // Crash after the overlap was written and the key moved: completed.
        FleetCa::rotate(d, Std::from_secs(60)).unwrap();
        let rotated = FleetCa::load(d).unwrap().cert_der().clone();
        std::fs::rename(d.join(CA_CRT), d.join(NEXT_CRT)).unwrap();
        std::fs::copy(d.join(PREVIOUS_CRT), d.join(CA_CRT)).unwrap();
        let ca = FleetCa::load(d).unwrap();
        assert_eq!(ca.cert_der(), &rotated);
        assert_eq!(ca.trusted(std::time::SystemTime::now()), vec![rotated, old]);
        // A certificate that is not the key's is refused, not used.
        std::fs::copy(d.join(PREVIOUS_CRT), d.join(CA_CRT)).unwrap();
        assert!(FleetCa::load(d).is_err());
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
