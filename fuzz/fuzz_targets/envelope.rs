//! An envelope as an MQTT payload or a frame carries it; a `Signed` one is
//! opened as the hub and the agent open it (its message, a `Fresh` inside,
//! a batch's records): never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::protocol::{Direction, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = outpost_shared::Envelope::decode(data) else { return };
    let _ = envelope.encode();
    let open = |message: &Message| match message {
        Message::Batch(batch) | Message::Relay(batch) => {
            let _ = batch.len_hint();
            let _ = batch.records();
        }
        _ => {}
    };
    match &envelope.message {
        Message::Signed(signed) => {
            let _ = signed.verify(Direction::Up, &[4; 65]);
            if let Ok(message) = signed.message() {
                if let Message::Fresh(fresh) = &message {
                    open(&fresh.message);
                }
                open(&message);
            }
        }
        other => open(other),
    }
});
