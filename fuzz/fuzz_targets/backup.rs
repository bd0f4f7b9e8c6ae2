//! The backup parsers, fed plaintext as after decryption: a manifest file
//! (a head of format 4 or 3, or an older whole snapshot, zstd or plain) and
//! a head's entry chunks cut anywhere. Decoded or refused, never a panic,
//! and never more memory than the manifest bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which & 1 == 0 {
        outpost_agent::backup::fuzz::manifest(rest);
    } else {
        outpost_agent::backup::fuzz::entries(rest);
    }
});
