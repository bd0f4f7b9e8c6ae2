//! `[metrics] listen`: serves the agent's Prometheus metrics
//! ([`crate::metrics`]) on a loopback address, `GET /metrics`, Prometheus
//! text format 0.0.4. A listener task of its own: it accepts at most
//! [`MAX_CLIENTS`] connections at once, reads one request head of at most
//! [`MAX_HEAD`] bytes within [`READ_TIMEOUT`] (parsed by httparse), answers
//! and closes. The gauges are read from the store, the uplink's state and
//! the peer table when scraped; nothing runs between scrapes.

use crate::link::LinkState;
use crate::metrics::{Gauges, METRICS};
use crate::peers::PeerTable;
use crate::store::AgentStore;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Most scrapes served at once; more connections are closed at once.
pub const MAX_CLIENTS: usize = 4;
/// Longest request head read.
pub const MAX_HEAD: usize = 8192;
/// A client must send its request within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the scrape-time gauges are read from.
#[derive(Clone)]
pub struct Sources {
    /// The outbox.
    pub store: AgentStore,
    /// The uplink's state.
    pub link: watch::Receiver<LinkState>,
    /// The LAN peers.
    pub peers: PeerTable,
    /// The configured transport, `quic` or `mqtt`.
    pub transport: &'static str,
}

/// What to answer a request head: status, reason, body. Pure.
pub fn answer(head: &[u8]) -> (u16, &'static str, Option<&'static str>) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some("GET" | "HEAD"), Some("/metrics")) => (200, "OK", None),
            (Some(_), Some("/metrics")) => (405, "Method Not Allowed", Some("only GET\n")),
            _ => (404, "Not Found", Some("only /metrics is served here\n")),
        },
        Ok(httparse::Status::Partial) | Err(_) => (400, "Bad Request", Some("not an HTTP/1.x request head\n")),
    }
}

/// Serves `/metrics` on `listen` until `cancel`.
pub async fn serve(listen: SocketAddr, sources: Sources, cancel: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "Cannot serve metrics.");
            // Ending lets the supervisor retry later.
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
    };
    tracing::info!(listen = %listener.local_addr().unwrap_or(listen), "Serving metrics at /metrics.");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "Metrics connection not accepted.");
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = tokio::time::timeout(READ_TIMEOUT, respond(stream, &sources)).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within the time allowed"))
            }) {
                tracing::debug!(error = %e, "Metrics request not answered.");
            }
        });
    }
}

async fn respond(mut stream: tokio::net::TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, reason, fixed) = answer(&head);
    let (kind, body) = match fixed {
        Some(text) => ("text/plain; charset=utf-8", text.to_owned()),
        None => {
            METRICS.set_gauges(&sources.gauges());
            let text = METRICS.encode().map_err(std::io::Error::other)?;
            (prometheus_client::encoding::prometheus_text::CONTENT_TYPE, text)
        }
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

impl Sources {
    /// The gauges as they stand.
    fn gauges(&self) -> Gauges {
        let stats = self.store.stats();
        let oldest = self
            .store
            .peek(stats.acked_seq.saturating_add(1), 1, usize::MAX)
            .ok()
            .and_then(|r| r.first().map(|r| r.at));
        Gauges {
            transport: self.transport,
            connected: matches!(*self.link.borrow(), LinkState::Connected),
            outbox_records: stats.records,
            outbox_bytes: stats.bytes,
            oldest_record: oldest,
            peers: self.peers.snapshot().into_iter().map(|p| p.state).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_of_metrics_is_answered_with_metrics() {
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0, 200);
        assert_eq!(answer(b"HEAD /metrics HTTP/1.0\r\n\r\n").0, 200);
        assert_eq!(answer(b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(answer(b"GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\n").0, 400, "an incomplete head");
        assert_eq!(answer(b"\x16\x03\x01 binary").0, 400);
    }
}
