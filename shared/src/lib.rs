//! Outpost's shared vocabulary: the wire protocol (envelope, messages,
//! framing), identities, the enrollment token format, telemetry samples and
//! the config reader both daemons use.
//!
//! Nothing here opens a socket or needs a runtime: every function takes bytes
//! (or text) and returns values, so it is all tested without I/O. The optional
//! `io` feature adds two small helpers that read and write frames on any tokio
//! `AsyncRead`/`AsyncWrite`, so both sides share one framing loop.

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "io")]
pub mod commit;
pub mod config;
pub mod desired;
pub mod frame;
pub mod fsutil;
pub mod identity;
#[cfg(feature = "io")]
pub mod io;
pub mod job;
#[cfg(feature = "io")]
pub mod logging;
pub mod mqtt;
pub mod peers;
pub mod protocol;
pub mod reopen;
pub mod retention;
pub mod table;
pub mod telemetry;
pub mod time;
pub mod token;

pub use frame::{FrameDecoder, FrameError, encode_frame};
pub use identity::{DeviceId, Fingerprint};
pub use protocol::{Envelope, Message, PROTOCOL_VERSION, ProtocolError};
