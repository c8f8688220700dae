//! Playhead keeps every viewer's resume position.
//!
//! Heartbeats flow ingest → commit log ([`wal`]) → sharded [`coalescer`] → [`flusher`] →
//! [`store`]; reads go coalescer → store. [`engine::Engine`] ties the pieces together and is
//! what the servers (HTTP, binary) hold.

pub mod auth;
pub mod binary;
pub mod catalog;
pub mod client;
pub mod coalescer;
pub mod config;
pub mod engine;
pub mod flusher;
pub mod http;
pub mod keymap;
pub mod metrics;
pub mod model;
pub mod priority;
pub mod protocol;
pub mod store;
pub mod wal;
