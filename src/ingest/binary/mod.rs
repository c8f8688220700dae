//! The binary ingest protocol (docs/protocol.md): the wire format ([`codec`]), the
//! server's listener ([`listener`]) and the gateway-side [`client`].

pub mod client;
pub mod codec;
pub mod config;
pub mod listener;

pub use listener::{bind, serve};
