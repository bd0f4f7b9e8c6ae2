//! How devices reach the hub: the QUIC endpoint ([`quic`]: sessions,
//! enrollment, bulk transfers in [`bulk`]) and the MQTT bridge ([`mqtt`]),
//! both running the one device session logic of [`session`]. Transports
//! only move messages; what they mean is decided in [`session`] and the
//! service layer ([`crate::service`]).

pub mod bulk;
pub mod door;
pub mod mqtt;
pub mod quic;
pub mod session;
