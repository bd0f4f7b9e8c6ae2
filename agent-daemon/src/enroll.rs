//! Enrollment: make a key on the device, send a CSR with the token, store
//! the certificate. Nothing is written unless the hub accepts.

use crate::identity::{Identity, IdentityError};
use crate::tls::{self, Timings};
use outpost_shared::Fingerprint;
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::{EnrollRequest, Message, RefusalReason};
use outpost_shared::token;
use rcgen::{CertificateParams, DnType, KeyPair};
use std::path::Path;
use std::time::Duration;

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token text is not a token.
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// The identity could not be read or written, or already exists.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Key or CSR generation failed.
    #[error("key generation failed: {0}")]
    Key(#[from] rcgen::Error),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The hub address does not resolve.
    #[error("cannot resolve hub address {addr}: {reason}")]
    Resolve {
        /// The address from the token.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The hub could not be reached or the exchange broke off.
    #[error("cannot reach the hub at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The hub's certificate does not come from the CA the token pins.
    #[error(
        "the hub at {addr} does not hold the fleet CA the token pins ({pin}): wrong address, or not the hub that made the token"
    )]
    PinMismatch {
        /// The address dialed.
        addr: String,
        /// The pinned fingerprint.
        pin: Fingerprint,
    },
    /// The hub refused.
    #[error("the hub refused enrollment ({reason:?}): {message}")]
    Refused {
        /// Machine-readable reason.
        reason: RefusalReason,
        /// The hub's explanation.
        message: String,
    },
    /// The hub answered with something that is not an enrollment reply, or a
    /// CA other than the pinned one.
    #[error("the hub's answer is unusable: {0}")]
    BadReply(String),
}

/// Enrolls this device with `token_text`, storing the identity in `data_dir`.
pub async fn enroll(token_text: &str, data_dir: &Path, name: &str) -> Result<Identity, EnrollError> {
    Identity::ensure_absent(data_dir)?;
    let parsed = token::parse(token_text)?;
    let hub = parsed.claims.hub.clone();
    let pin = parsed.claims.ca;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;

    let request =
        EnrollRequest { token: token_text.trim().to_owned(), csr_der: csr.der().to_vec(), name: name.to_owned() };
    // A token may name several hubs of the fleet: try them in a shuffled
    // order until one answers (a refusal is an answer).
    let mut reply = None;
    for addr in outpost_shared::config::hub_order(&outpost_shared::config::hub_addresses(&hub), None, rand::random()) {
        match exchange_at(&addr, pin, request.clone()).await {
            Ok(message) => {
                reply = Some(Ok(message));
                break;
            }
            Err(e @ (EnrollError::Resolve { .. } | EnrollError::Connect { .. })) => {
                tracing::info!(hub = %addr, error = %e, "Hub did not answer the enrollment.");
                reply = Some(Err(e));
            }
            Err(e) => return Err(e),
        }
    }
    let reply = reply.unwrap_or_else(|| Err(EnrollError::BadReply("the token names no hub".into())))?;

    match reply {
        Message::Enrolled(enrolled) => {
            if Fingerprint::of_der(&enrolled.ca_der) != pin {
                return Err(EnrollError::BadReply("the CA sent differs from the one the token pins".into()));
            }
            Ok(Identity::store(
                data_dir,
                enrolled.device_id,
                hub,
                Some(name.to_owned()),
                key.serialize_pem(),
                enrolled.cert_der.into(),
                enrolled.ca_der.into(),
            )?)
        }
        Message::Refused(refusal) => Err(EnrollError::Refused { reason: refusal.reason, message: refusal.message }),
        other => Err(EnrollError::BadReply(format!("unexpected {}", other.kind()))),
    }
}

/// One enrollment exchange with the hub at `addr`.
async fn exchange_at(addr: &str, pin: Fingerprint, request: EnrollRequest) -> Result<Message, EnrollError> {
    let hub = addr.to_owned();
    let remote = tokio::net::lookup_host(&hub)
        .await
        .map_err(|e| EnrollError::Resolve { addr: hub.clone(), reason: e.to_string() })?
        .next()
        .ok_or_else(|| EnrollError::Resolve { addr: hub.clone(), reason: "no addresses".into() })?;
    let connect_err = |reason: String| EnrollError::Connect { addr: hub.clone(), reason };
    let timings = Timings { keepalive: Duration::from_secs(5), idle_timeout: Duration::from_secs(20) };
    let mut endpoint = tls::client_endpoint(remote).map_err(|e| connect_err(e.to_string()))?;
    let (client_config, pin_outcome) = tls::enrollment_config(pin, timings)?;
    endpoint.set_default_client_config(client_config);

    let exchange = async {
        let connection = endpoint
            .connect(remote, HUB_SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut send, recv) = connection.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
        let max = outpost_shared::frame::DEFAULT_MAX_FRAME;
        write_message(&mut send, Message::Enroll(request), max).await.map_err(|e| connect_err(e.to_string()))?;
        let _ = send.finish();
        let reply = FrameReader::new(recv, max).next().await;
        connection.close(0u32.into(), b"");
        match reply {
            Ok(Some(envelope)) => Ok(envelope.message),
            Ok(None) => Err(EnrollError::BadReply("the hub closed the stream without answering".into())),
            Err(StreamError::Io(e)) => Err(connect_err(e.to_string())),
            Err(e) => Err(EnrollError::BadReply(e.to_string())),
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| connect_err("no answer within 30s".into()))
        .and_then(|r| r)
        .map_err(|e| if pin_outcome.mismatched() { EnrollError::PinMismatch { addr: hub.clone(), pin } } else { e })?;
    endpoint.wait_idle().await;
    Ok(reply)
}
