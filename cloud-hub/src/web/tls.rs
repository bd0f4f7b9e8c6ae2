//! HTTPS for the API and the console: the certificate and key from
//! `[http] tls_cert` and `tls_key` (PEM), presented through a
//! [`CertSlot`] so that SIGHUP can replace them without a restart
//! ([`HttpsFiles::reload`]); connections already open keep theirs.

use outpost_shared::identity::CertSlot;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files and the slot that presents what they hold.
#[derive(Debug)]
pub struct HttpsFiles {
    cert: PathBuf,
    key: PathBuf,
    slot: Arc<CertSlot>,
}

/// Reads a PEM certificate chain and private key; the error names the
/// file and the problem.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertSlot::certified(chain, private).map_err(|e| format!("{}: {e}", key.display()))?;
    certified.keys_match().map_err(|e| format!("{} does not belong to {}: {e}", key.display(), cert.display()))?;
    Ok(certified)
}

impl HttpsFiles {
    /// Loads the files.
    pub fn open(cert: &Path, key: &Path) -> Result<Self, String> {
        let slot = Arc::new(CertSlot::new(load(cert, key)?));
        Ok(HttpsFiles { cert: cert.to_owned(), key: key.to_owned(), slot })
    }

    /// The TLS configuration of the HTTP listener (TLS 1.2 and 1.3, ring).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, String> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.slot.clone());
        Ok(config)
    }

    /// Reads the files again and presents what they hold from the next
    /// handshake on; on an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        self.slot.set(load(&self.cert, &self.key)?);
        Ok(())
    }
}
