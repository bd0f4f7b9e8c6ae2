//! The agent's bulk connection to the hub: backup transfers on their own
//! QUIC connection (ALPN `outpost-bulk/1`, the device certificate as for a
//! session), one request per stream and several streams at once, so uploads
//! and downloads never hold up the session's control stream. Used by the
//! `outpost-agent backup` process, not by the daemon.

use crate::identity::Identity;
use crate::tls::{self, Timings};
use outpost_shared::identity::HUB_SERVER_NAME;
use outpost_shared::io::{FrameReader, StreamError, write_message};
use outpost_shared::protocol::{MAX_BULK_FRAME, Message, RefusalReason};
use std::time::Duration;

/// Why a bulk request failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// No connection could be made.
    #[error("cannot reach the hub at {addr}: {reason}")]
    Connect {
        /// The hub's address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The hub refused the request.
    #[error("the hub refused: {message}")]
    Refused {
        /// Machine-readable reason.
        reason: RefusalReason,
        /// The hub's explanation.
        message: String,
    },
    /// The connection or a stream broke.
    #[error("transfer to the hub failed: {0}")]
    Transfer(String),
    /// The hub answered with something else than the request calls for.
    #[error("the hub answered {0} to {1}")]
    Unexpected(&'static str, &'static str),
}

impl From<StreamError> for BulkError {
    fn from(e: StreamError) -> Self {
        BulkError::Transfer(e.to_string())
    }
}

/// An open bulk connection; clones share it.
#[derive(Debug, Clone)]
pub struct BulkClient {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl BulkClient {
    /// Connects to `hub` (`host:port`) as the device `identity` names;
    /// gives up after `timeout`, and later when the hub is silent for the
    /// idle timeout of `timings`.
    pub async fn connect(
        identity: &Identity,
        hub: &str,
        timeout: Duration,
        timings: Timings,
    ) -> Result<Self, BulkError> {
        let fail = |reason: String| BulkError::Connect { addr: hub.to_owned(), reason };
        let remote = tokio::net::lookup_host(hub)
            .await
            .map_err(|e| fail(e.to_string()))?
            .next()
            .ok_or_else(|| fail("no addresses".into()))?;
        let mut endpoint = tls::client_endpoint(remote).map_err(|e| fail(e.to_string()))?;
        endpoint.set_default_client_config(tls::bulk_config(identity, timings).map_err(|e| fail(e.to_string()))?);
        let connecting = endpoint.connect(remote, HUB_SERVER_NAME).map_err(|e| fail(e.to_string()))?;
        let connection = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        Ok(BulkClient { endpoint, connection })
    }

    /// Sends one request on a stream of its own and returns the answer; a
    /// `Refused` answer is an error.
    pub async fn request(&self, message: Message) -> Result<Message, BulkError> {
        self.requests(vec![message])
            .await?
            .pop()
            .unwrap_or_else(|| Err(BulkError::Transfer("the hub closed the stream without answering".into())))
    }

    /// Sends `messages` on one stream, one after another, and returns
    /// their answers in order (a `Refused` answer as an error for that
    /// request alone). The hub answers a stream's requests in turn, so a
    /// batch costs about one round trip instead of one (or two: a stream's
    /// slot comes back only once its answer was acknowledged) per request.
    /// Requests are written while answers are read, so neither side waits
    /// on the other's flow control.
    pub async fn requests(&self, messages: Vec<Message>) -> Result<Vec<Result<Message, BulkError>>, BulkError> {
        let broken = |e: &dyn std::fmt::Display| BulkError::Transfer(e.to_string());
        let count = messages.len();
        let (mut send, recv) = self.connection.open_bi().await.map_err(|e| broken(&e))?;
        let write = async {
            for message in messages {
                write_message(&mut send, message, MAX_BULK_FRAME).await?;
            }
            send.finish().map_err(|e| broken(&e))
        };
        let read = async {
            let mut reader = FrameReader::new(recv, MAX_BULK_FRAME);
            let mut answers = Vec::with_capacity(count);
            while answers.len() < count {
                let Some(envelope) = reader.next().await? else {
                    return Err(BulkError::Transfer("the hub closed the stream without answering".into()));
                };
                answers.push(match envelope.message {
                    Message::Refused(r) => Err(BulkError::Refused { reason: r.reason, message: r.message }),
                    other => Ok(other),
                });
            }
            Ok(answers)
        };
        let ((), answers) = tokio::try_join!(write, read)?;
        Ok(answers)
    }

    /// Closes the connection, waiting at most a second for it to go.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
