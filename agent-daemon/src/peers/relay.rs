//! Relay, both ways: this device's outbox carried through a trusted peer
//! while its own uplink is down, and the batches of trusted peers carried
//! to the hub over this device's uplink (the uplink session sends them as
//! `Relay` and hands back the hub's `RelayAck`).

use super::PeerParams;
use super::link::LinkError;
use crate::link::LinkState;
use crate::uplink::RelayRequest;
use outpost_shared::DeviceId;
use outpost_shared::io::{FrameReader, write_message};
use outpost_shared::protocol::{Ack, Message, Refusal, RefusalReason};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Relays this device's outbox through `peer` until `stop` or a failure.
pub(super) async fn relay_client(p: PeerParams, peer: String, connection: quinn::Connection, stop: CancellationToken) {
    let result = tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = relay_batches(&p, &connection) => r,
    };
    if let Err(reason) = result {
        tracing::warn!(%peer, %reason, "Relay through the LAN peer stopped.");
    }
    stop.cancel();
}

async fn relay_batches(p: &PeerParams, connection: &quinn::Connection) -> Result<(), LinkError> {
    let (mut send, recv) = connection.open_bi().await?;
    let mut reader = FrameReader::new(recv, p.max_frame);
    loop {
        // Signed with the key in use now (a renewal may have replaced it).
        let identity = p.identity.get();
        let signer = identity.signer()?;
        let from = p.store.stats().acked_seq + 1;
        let Some((batch, last)) = p.store.next_batch(&identity.device_id, &signer, from, p.max_frame).await? else {
            // The store keeps the wake of an append made between the peek
            // and this wait (one permit), so nothing is missed; a link that
            // ends meanwhile ends the relay, so another peer can take it.
            tokio::select! {
                () = p.store.appended() => {}
                e = connection.closed() => return Err(e.into()),
            }
            continue;
        };
        write_message(&mut send, Message::Batch(batch), p.max_frame).await?;
        let reply = tokio::time::timeout(p.ack_timeout, reader.next())
            .await
            .map_err(|_| LinkError::Timeout(format!("no acknowledgement within {:?}", p.ack_timeout)))??;
        match reply.map(|env| env.message) {
            Some(Message::Ack(Ack { upto })) if upto <= last => {
                p.store.ack(upto).await?;
                tracing::debug!(upto, "Relayed batch acknowledged by the hub.");
            }
            Some(Message::Ack(Ack { upto })) => {
                return Err(LinkError::Peer(format!("acknowledged {upto}, beyond what was sent")));
            }
            Some(Message::Refused(Refusal { message, .. })) => {
                return Err(LinkError::Peer(format!("peer refused: {message}")));
            }
            Some(other) => return Err(LinkError::Peer(format!("unexpected {} from the peer", other.kind()))),
            None => return Err(LinkError::Peer("the peer closed the relay stream".into())),
        }
    }
}

/// Serves one peer's connection: probes are answered, batches of that peer
/// are carried to the hub while this device's uplink is connected.
pub(super) async fn relay_server(incoming: quinn::Incoming, p: PeerParams) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "LAN peer handshake refused.");
            return;
        }
    };
    let peer = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|c| outpost_shared::identity::device_id_of(c)));
    let Some(peer) = peer else {
        connection.close(2u32.into(), b"certificate names no device");
        return;
    };
    let span = tracing::info_span!("peer", id = %peer);
    tracing::Instrument::instrument(serve_peer(connection, peer, p), span).await;
}

/// The streams of a trusted peer's connection, until it closes or the hub
/// revokes the peer.
async fn serve_peer(connection: quinn::Connection, peer: DeviceId, p: PeerParams) {
    use tracing::Instrument;
    let mut streams = tokio::task::JoinSet::new();
    let mut trust = p.identity.trust_changes();
    loop {
        tokio::select! {
            Ok(()) = trust.changed() => {
                if p.identity.get().is_revoked(&peer) {
                    connection.close(2u32.into(), b"revoked");
                    break;
                }
            }
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(relay_stream(send, recv, peer.clone(), p.clone()).in_current_span());
                }
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn relay_stream(mut send: quinn::SendStream, recv: quinn::RecvStream, peer: DeviceId, p: PeerParams) {
    let mut reader = FrameReader::new(recv, p.max_frame);
    loop {
        let message = match reader.next().await {
            Ok(Some(env)) => env.message,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(%peer, error = %e, "LAN peer stream closed.");
                return;
            }
        };
        let reply = match message {
            Message::Heartbeat(beat) => Message::Heartbeat(beat),
            Message::Batch(batch) if batch.origin != peer => refusal(format!("batch of {} from {peer}", batch.origin)),
            Message::Batch(_) if p.identity.get().is_revoked(&peer) => refusal("the hub revoked this device".into()),
            Message::Batch(_) if *p.link.borrow() != LinkState::Connected => refusal("no uplink here".into()),
            Message::Batch(batch) => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let request = RelayRequest { batch, reply: reply_tx };
                if p.relay_tx.send(request).await.is_err() {
                    return;
                }
                match tokio::time::timeout(p.ack_timeout, reply_rx).await {
                    Ok(Ok(Ok(upto))) => Message::Ack(Ack { upto }),
                    Ok(Ok(Err(reason))) => refusal(reason),
                    Ok(Err(_)) => refusal("the uplink session ended".into()),
                    Err(_) => refusal("the hub did not acknowledge in time".into()),
                }
            }
            other => refusal(format!("unexpected {}", other.kind())),
        };
        if write_message(&mut send, reply, p.max_frame).await.is_err() {
            return;
        }
    }
}

fn refusal(message: String) -> Message {
    Message::Refused(Refusal { reason: RefusalReason::UnexpectedMessage, message })
}
