//! The fleet's certificate authority, kept in the hub's data dir.
//!
//! `init` makes a self-signed CA (ECDSA P-256, ten years) and writes
//! `ca.crt` and `ca.key` (mode 0600). The CA signs device certificates from
//! CSRs (the device keeps its key) and the hub's own TLS certificate, which
//! names [`HUB_SERVER_NAME`] so agents verify it whatever address they dial.

use outpost_shared::fsutil::write_atomic;
use outpost_shared::identity::{HUB_SERVER_NAME, Signer};
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

/// Lifetime of device certificates.
pub const DEVICE_CERT_LIFETIME: Duration = Duration::days(365);

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
        Ok(FleetCa { cert_der: cert.der().clone(), issuer: Issuer::new(params, key_pair), signer })
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
        Ok(FleetCa { cert_der, issuer, signer })
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

    /// Signs a device certificate for the key in `csr_der`. The subject is
    /// the hub's choice (`CN = device id`); whatever the CSR asks for besides
    /// its public key is ignored.
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
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + DEVICE_CERT_LIFETIME;
        let request = CertificateSigningRequestParams { params, public_key: csr.public_key };
        Ok(request.signed_by(&self.issuer)?.der().clone())
    }

    /// Makes a fresh TLS identity for the hub: the chain (hub certificate,
    /// CA) and its key. It serves the QUIC endpoint and is the hub's client
    /// certificate at an MQTT broker, where its common name
    /// [`HUB_MQTT_USER`] is the user the broker's ACL grants the fleet's
    /// topics.
    pub fn hub_identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let mut params = CertificateParams::new(vec![HUB_SERVER_NAME.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, HUB_MQTT_USER);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(90);
        let key_pair = KeyPair::generate()?;
        let cert = params.signed_by(&key_pair, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key))
    }
}

pub use outpost_shared::identity::{device_id_of, public_key_of};

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ca_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        FleetCa::init(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
