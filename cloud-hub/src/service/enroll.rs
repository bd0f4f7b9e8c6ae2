//! Enrollment: issuing one-time tokens and redeeming them for certificates.
//!
//! The token key (`enroll.key`, mode 0600) is made by `init`. A token is
//! self-contained and tagged with that key (see `outpost_shared::token`), so
//! `token create` works while the hub is serving (sled is locked by the
//! serving process); only redemptions are counted, in the store.

use crate::service::ca::{CaError, FleetCa, public_key_of};
use crate::store::{DeviceRecord, Store, StoreError};
use outpost_shared::fsutil::write_atomic;
use outpost_shared::protocol::{EnrollRequest, Enrolled, RefusalReason};
use outpost_shared::time::Timestamp;
use outpost_shared::token::{self, TokenClaims};
use outpost_shared::{DeviceId, Fingerprint};

use std::path::{Path, PathBuf};
use std::time::Duration;

const KEY_FILE: &str = "enroll.key";
/// File where `serve` records the address agents should dial.
pub const ADVERTISE_FILE: &str = "quic.advertise";
/// File where `serve` records the address its HTTP API is bound to, for
/// scripts and tests that let the OS pick the port.
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenCreateError {
    /// The data dir has no CA or key.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The enrollment key cannot be read.
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Nobody said where the hub is.
    #[error("no hub address: pass --hub-addr HOST:PORT, or start `outpost-hub serve` once so it records its address")]
    NoAddress,
    /// Zero uses or a zero lifetime.
    #[error("a token needs at least one use and a lifetime above zero")]
    Useless,
}

/// Makes the token key; called once by `init`.
pub fn init_key(data_dir: &Path) -> std::io::Result<()> {
    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    write_atomic(&data_dir.join(KEY_FILE), &key, 0o600)
}

fn read_key(data_dir: &Path) -> Result<Vec<u8>, TokenCreateError> {
    let path = data_dir.join(KEY_FILE);
    std::fs::read(&path).map_err(|source| TokenCreateError::Key { path, source })
}

/// Makes an enrollment token valid for `ttl` and `uses` redemptions. The hub
/// address is `hub_addr`, or the one `serve` last recorded.
pub fn create_token(
    data_dir: &Path,
    ttl: Duration,
    uses: u32,
    hub_addr: Option<String>,
) -> Result<String, TokenCreateError> {
    if uses == 0 || ttl.is_zero() {
        return Err(TokenCreateError::Useless);
    }
    let ca = FleetCa::load(data_dir)?;
    let key = read_key(data_dir)?;
    let hub = match hub_addr {
        Some(addr) => addr,
        None => std::fs::read_to_string(data_dir.join(ADVERTISE_FILE))
            .map(|s| s.trim().to_owned())
            .map_err(|_| TokenCreateError::NoAddress)?,
    };
    let mut id = [0u8; 16];
    rand::fill(&mut id[..]);
    let claims = TokenClaims {
        id,
        hub,
        ca: ca.fingerprint(),
        expires_at: Timestamp::now().as_secs().saturating_add(ttl.as_secs().max(1)),
        uses,
    };
    Ok(token::issue(&claims, &key))
}

/// A refused enrollment, as told to the device.
#[derive(Debug)]
pub struct Refused {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// Explanation for the operator.
    pub message: String,
}

fn refuse(reason: RefusalReason, message: impl Into<String>) -> Refused {
    Refused { reason, message: message.into() }
}

/// Checks a token and signs the device's CSR. Writes to the store only when
/// everything checks out, in one transaction.
pub async fn redeem(ca: &FleetCa, key: &[u8], store: &Store, request: &EnrollRequest) -> Result<Enrolled, Refused> {
    let parsed = token::parse(&request.token).map_err(|e| refuse(RefusalReason::UnknownToken, e.to_string()))?;
    if !parsed.verify(key) {
        return Err(refuse(RefusalReason::UnknownToken, "enrollment token was not issued by this hub"));
    }
    // A token pins the CA that authenticated the hub when it was made: during
    // a CA rotation's overlap, the previous one still does.
    let Some(ca_der) = ca.trusted_by_fingerprint(&parsed.claims.ca) else {
        return Err(refuse(
            RefusalReason::UnknownToken,
            "enrollment token pins a CA this hub no longer trusts (made before a CA rotation): make a new one",
        ));
    };
    let claims = &parsed.claims;
    if Timestamp::now().as_secs() >= claims.expires_at {
        return Err(refuse(RefusalReason::ExpiredToken, "enrollment token has expired"));
    }
    let mut random = [0u8; 8];
    rand::fill(&mut random[..]);
    let id = DeviceId::from_random(random);
    let cert = ca.sign_device(&request.csr_der, &id).map_err(|e| refuse(RefusalReason::BadCsr, e.to_string()))?;
    let name: String = request.name.chars().filter(|c| !c.is_control()).take(64).collect();
    let record = DeviceRecord {
        id: id.clone(),
        name,
        enrolled_at: Timestamp::now(),
        cert_fingerprint: Fingerprint::of_der(&cert),
        agent_version: None,
        last_seen: None,
        last_addr: None,
        last_sample: None,
    };
    let public_key = public_key_of(&cert)
        .ok_or_else(|| refuse(RefusalReason::BadCsr, "the signed certificate has no public key"))?;
    match store.enroll(&claims.id, claims.uses, &record, &public_key).await {
        Ok(()) => {
            if let Some((_, not_after)) = outpost_shared::identity::validity_of(&cert)
                && let Err(e) = store.set_cert_expires(&id, Timestamp::from_system(not_after)).await
            {
                // Learnt again at the device's first session.
                tracing::debug!(error = %e, "Certificate expiry not stored.");
            }
            Ok(Enrolled { device_id: id, cert_der: cert.to_vec(), ca_der: ca_der.to_vec() })
        }
        Err(StoreError::UsedUp { used, allowed }) => {
            Err(refuse(RefusalReason::UsedUpToken, format!("enrollment token is used up ({used} of {allowed} uses)")))
        }
        Err(e) => {
            tracing::error!(error = %e, "Enrollment could not be stored.");
            Err(refuse(RefusalReason::Internal, "the hub could not store the enrollment; try again"))
        }
    }
}

/// Loads the token key for a serving hub.
pub fn load_key(data_dir: &Path) -> Result<Vec<u8>, TokenCreateError> {
    read_key(data_dir)
}
