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
    /// The hub is admitting connections at its rate and asked to come back
    /// later (close code 4).
    #[error("the hub at {addr} is busy admitting other devices and asked to come back in {retry_after:?}")]
    Busy {
        /// The address.
        addr: String,
        /// When to come back.
        retry_after: Duration,
    },
}

/// Times a busy hub is asked again before enrollment gives up.
const BUSY_TRIES: u32 = 20;

/// How long to wait before asking a busy hub again, after `tries` busy
/// answers: as a session would ([`crate::uplink::come_back_after`]), at
/// most a minute; `None` once [`BUSY_TRIES`] answers were busy. Pure.
fn busy_wait(retry_after: Duration, tries: u32, jitter: f64) -> Option<Duration> {
    (tries < BUSY_TRIES).then(|| crate::uplink::come_back_after(retry_after.min(Duration::from_secs(60)), jitter))
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
        let mut answer = exchange_at(&addr, pin, request.clone()).await;
        let mut tries = 0;
        while let Err(EnrollError::Busy { retry_after, .. }) = &answer {
            tries += 1;
            let Some(wait) = busy_wait(*retry_after, tries, rand::random()) else { break };
            tracing::info!(hub = %addr, ?wait, "The hub is busy admitting other devices; asking again when it said.");
            tokio::time::sleep(wait).await;
            answer = exchange_at(&addr, pin, request.clone()).await;
        }
        match answer {
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
        // A hub past its accept rate closes the connection with a time to
        // come back: that, rather than the broken stream, is the answer.
        let busy = |connection: &quinn::Connection| {
            let turned = connection.close_reason().map(crate::uplink::LinkError::Connection)?.turned_away();
            match turned? {
                crate::uplink::TurnedAway::Busy(retry_after) => {
                    Some(EnrollError::Busy { addr: hub.clone(), retry_after })
                }
                // Refused before the handshake: the connect itself failed.
                crate::uplink::TurnedAway::AtTheDoor => None,
            }
        };
        let (mut send, recv) =
            connection.open_bi().await.map_err(|e| busy(&connection).unwrap_or_else(|| connect_err(e.to_string())))?;
        let max = outpost_shared::frame::DEFAULT_MAX_FRAME;
        write_message(&mut send, Message::Enroll(request), max)
            .await
            .map_err(|e| busy(&connection).unwrap_or_else(|| connect_err(e.to_string())))?;
        let _ = send.finish();
        let reply = FrameReader::new(recv, max).next().await;
        // Read before our own close, which replaces the reason.
        let turned_away = busy(&connection);
        connection.close(0u32.into(), b"");
        match (reply, turned_away) {
            (Ok(Some(envelope)), _) => Ok(envelope.message),
            (_, Some(busy)) => Err(busy),
            (Ok(None), None) => Err(EnrollError::BadReply("the hub closed the stream without answering".into())),
            (Err(StreamError::Io(e)), None) => Err(connect_err(e.to_string())),
            (Err(e), None) => Err(EnrollError::BadReply(e.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_hub_is_asked_again_when_it_said_a_bounded_number_of_times() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(busy_wait(ms(2500), 1, 0.0), Some(ms(2500)));
        assert_eq!(busy_wait(ms(2500), 1, 1.0), Some(ms(2750)));
        assert_eq!(busy_wait(Duration::ZERO, 1, 0.0), Some(ms(100)), "never at once");
        assert_eq!(busy_wait(Duration::from_secs(3600), 1, 0.0), Some(Duration::from_secs(60)), "at most a minute");
        assert_eq!(busy_wait(Duration::from_secs(3600), 1, 1.0), Some(Duration::from_secs(61)));
        assert_eq!(busy_wait(ms(2500), BUSY_TRIES - 1, 0.0), Some(ms(2500)));
        assert_eq!(busy_wait(ms(2500), BUSY_TRIES, 0.0), None);
    }
}
