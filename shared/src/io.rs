//! Frames on async byte streams (QUIC streams, TCP): one read loop and one
//! write path that agent and hub share.

use crate::frame::{FrameDecoder, FrameError, encode_frame};
use crate::protocol::{Envelope, Message, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read from or written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream failed underneath.
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes break the framing rules.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame's payload is not a valid envelope.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads envelopes from one stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
}

/// Room made for each read: what an idle stream holds (a heartbeat is
/// tens of bytes; larger frames grow the buffer geometrically).
const READ_ROOM: usize = 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads from `inner`, refusing frames over `max_frame` bytes.
    pub fn new(inner: R, max_frame: usize) -> Self {
        FrameReader { inner, decoder: FrameDecoder::new(max_frame) }
    }

    /// The next envelope, or `None` when the peer finished the stream
    /// cleanly between frames. Cancel-safe: bytes read before a cancel stay
    /// buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<Envelope>, StreamError> {
        loop {
            if let Some(payload) = self.decoder.next_frame()? {
                return Ok(Some(Envelope::decode(&payload)?));
            }
            let n = self.inner.read_buf(self.decoder.read_target(READ_ROOM)).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Writes one message as a framed envelope of the current version.
pub async fn write_message<W: AsyncWrite + Unpin>(
    out: &mut W,
    message: Message,
    max_frame: usize,
) -> Result<(), StreamError> {
    let frame = encode_frame(&Envelope::new(message).encode(), max_frame)?;
    out.write_all(&frame).await?;
    Ok(())
}
