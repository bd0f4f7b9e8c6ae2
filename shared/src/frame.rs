//! Length-prefixed frames with a hard size limit.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload (one
//! encoded [`Envelope`](crate::Envelope)). The limit is checked on the header
//! alone, before any payload is buffered, so an oversized frame costs the
//! receiver four bytes, not a megabyte.

use bytes_buf::Buf;

/// Default hard maximum of a frame's payload: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Size of the length header.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame announces more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame with an empty payload, which no message encodes to.
    #[error("empty frame")]
    Empty,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame received before the end.
        buffered: usize,
    },
}

/// Prefixes `payload` with its length, refusing payloads over `max`.
pub fn encode_frame(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    check_len(payload.len(), max)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // check_len bounds the length by `max`, which callers keep below 4 GiB.
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn check_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len == 0 {
        Err(FrameError::Empty)
    } else if len > max || len > u32::MAX as usize {
        Err(FrameError::TooLarge { len, max })
    } else {
        Ok(())
    }
}

/// Incremental frame reader: feed it bytes as they arrive, take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Buf,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder { buf: Buf::default(), max }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
    }

    /// The buffer to read more bytes into, by appending (`read_buf`), with
    /// room for at least `room` more. Reading straight into it saves a
    /// scratch buffer per stream: an idle session holds only this room.
    pub fn read_target(&mut self, room: usize) -> &mut Vec<u8> {
        self.buf.make_room(room)
    }

    /// Takes the next complete frame's payload, if one is buffered. After an
    /// error the stream is out of step and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let data = self.buf.data();
        let Some(header) = data.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        check_len(len, self.max)?;
        if data.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = data[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.consume(HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Call when the stream has ended: an unfinished frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.data().len() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }
}

mod bytes_buf {
    /// A byte queue that compacts lazily, so taking many small frames from
    /// one large read does not move the remainder each time.
    #[derive(Debug, Default)]
    pub struct Buf {
        bytes: Vec<u8>,
        start: usize,
    }

    impl Buf {
        pub fn data(&self) -> &[u8] {
            &self.bytes[self.start..]
        }

        pub fn consume(&mut self, n: usize) {
            self.start += n;
            if self.start == self.bytes.len() {
                self.start = 0;
                if self.bytes.capacity() > KEEP {
                    // A large frame has gone: give its room back.
                    self.bytes = Vec::new();
                } else {
                    self.bytes.clear();
                }
            }
        }

        fn compact(&mut self) {
            if self.start > 0 && self.start >= self.bytes.len() / 2 {
                self.bytes.drain(..self.start);
                self.start = 0;
            }
        }

        pub fn extend(&mut self, more: &[u8]) {
            self.compact();
            self.bytes.extend_from_slice(more);
        }

        pub fn make_room(&mut self, room: usize) -> &mut Vec<u8> {
            self.compact();
            self.bytes.reserve(room);
            &mut self.bytes
        }
    }

    /// Room kept after the buffered bytes are all taken.
    const KEEP: usize = 64 << 10;

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn room_is_made_after_the_data_and_large_room_is_given_back() {
            let mut buf = Buf::default();
            buf.extend(b"abcdef");
            buf.consume(4);
            buf.make_room(10).extend_from_slice(b"gh");
            assert_eq!(buf.data(), b"efgh");
            buf.make_room(1 << 20).extend_from_slice(&[7; 1 << 20]);
            assert!(buf.bytes.capacity() >= (1 << 20) + 4);
            buf.consume(4 + (1 << 20));
            assert_eq!(buf.bytes.capacity(), 0, "a megabyte kept after its frame went");
            buf.make_room(100).extend_from_slice(b"x");
            buf.consume(1);
            assert!(buf.bytes.capacity() >= 100, "small room is kept for the next read");
            assert!(buf.data().is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let payloads: Vec<Vec<u8>> = (1..40).map(|n| vec![n as u8; n * 7]).collect();
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend(encode_frame(p, 1024).unwrap());
        }
        for chunk in [1, 3, 5, 64, wire.len()] {
            let mut dec = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.extend(piece);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            dec.finish().unwrap();
            assert_eq!(got, payloads, "chunk size {chunk}");
        }
    }

    /// Everything a decoder makes of `pieces` fed one after another: the
    /// frames, then the first error (from a frame or from the end).
    fn decode(pieces: &[&[u8]], max: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut dec = FrameDecoder::new(max);
        let mut frames = Vec::new();
        for piece in pieces {
            dec.extend(piece);
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        (frames, dec.finish().err())
    }

    proptest::proptest! {
        /// Any byte stream, split anywhere, decodes to the same frames and
        /// fails (or not) the same way as in one piece.
        #[test]
        fn any_stream_split_anywhere_decodes_the_same_or_fails_the_same(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64), 0..8),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
            cuts in proptest::collection::vec(0usize..1024, 0..12),
            max in 1usize..96,
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend(p.len().min(u32::MAX as usize).to_be_bytes()[4..].iter());
                wire.extend(p);
            }
            wire.extend(&noise);
            let whole = decode(&[&wire], max);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([wire.len()]) {
                pieces.push(&wire[at..c]);
                at = c;
            }
            proptest::prop_assert_eq!(decode(&pieces, max), whole);
        }

        /// Whatever bytes arrive, an envelope decodes or is refused: never a
        /// panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_envelope_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = crate::Envelope::decode(&bytes);
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut dec = FrameDecoder::new(16);
        dec.extend(&17u32.to_be_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { len: 17, max: 16 }));
        assert_eq!(encode_frame(&[0; 17], 16), Err(FrameError::TooLarge { len: 17, max: 16 }));
    }

    #[test]
    fn empty_and_truncated_frames_are_errors() {
        let mut dec = FrameDecoder::new(16);
        dec.extend(&0u32.to_be_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::Empty));

        let mut dec = FrameDecoder::new(16);
        dec.extend(&[0, 0, 0, 5, 1, 2]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::Truncated { buffered: 6 }));
    }
}
