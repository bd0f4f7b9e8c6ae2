//! A byte stream as a peer sends it, cut into frames with a small limit, each
//! frame decoded as an envelope: never a panic, never more than the limit
//! buffered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::frame::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = usize::from(split).min(rest.len());
    let mut decoder = FrameDecoder::new(4096);
    for piece in [&rest[..at], &rest[at..]] {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= 4096);
                    let _ = outpost_shared::Envelope::decode(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
