//! The device's identity on disk, under `<data_dir>/identity/`:
//! `device.key` (mode 0600, made on the device, never sent anywhere),
//! `device.crt` and `ca.crt` (PEM), and `device.toml` (id, hub address).

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
    /// The fleet CA certificate.
    pub ca: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            device_id: self.device_id.clone(),
            hub: self.hub.clone(),
            name: self.name.clone(),
            cert: self.cert.clone(),
            ca: self.ca.clone(),
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
    /// Loads the identity from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let dir = dir(data_dir);
        let meta_path = dir.join("device.toml");
        if !meta_path.exists() {
            return Err(IdentityError::NotEnrolled(data_dir.to_owned()));
        }
        let meta: Meta = toml::from_str(&read(&meta_path)?).map_err(|e| invalid(&meta_path, e))?;
        let cert_path = dir.join("device.crt");
        let ca_path = dir.join("ca.crt");
        let cert = CertificateDer::from_pem_slice(read(&cert_path)?.as_bytes()).map_err(|e| invalid(&cert_path, e))?;
        let ca = CertificateDer::from_pem_slice(read(&ca_path)?.as_bytes()).map_err(|e| invalid(&ca_path, e))?;
        let key_path = dir.join("device.key");
        let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|e| invalid(&key_path, e))?;
        Ok(Identity { device_id: meta.device_id, hub: meta.hub, name: meta.name, cert, ca, key })
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
        write("ca.crt", pem("CERTIFICATE", &ca).as_bytes(), 0o644)?;
        let meta = Meta { device_id: device_id.clone(), hub: hub.clone(), name: name.clone() };
        let text = toml::to_string(&meta).map_err(|e| invalid(&dir, e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid(&dir.join("device.key"), e))?;
        // A new identity has no records at the hub: see `is_new`.
        write(NEW_MARKER, b"", 0o644)?;
        write("device.toml", text.as_bytes(), 0o644)?;
        Ok(Identity { device_id, hub, name, cert, ca, key })
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

/// PEM text of DER bytes.
fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}
