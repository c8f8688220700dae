//! Playhead keeps every viewer's resume position.
//!
//! The tree follows one heartbeat, sources → engine → sinks:
//! - [`ingest`]: the two listeners ([`ingest::http`] for devices, [`ingest::binary`] for
//!   gateways) and what they share: validating and stamping heartbeats, connection limits,
//!   their metrics, authentication;
//! - [`engine`]: the facade both listeners hold — commit log ([`engine::wal`]) → sharded
//!   [`engine::coalescer`] → [`engine::flusher`] — and the read path (memory, then store);
//! - [`store`]: where flushed positions live (embedded fjall, or Cassandra/ScyllaDB);
//! - [`events`]: the change stream, every flushed row published to NATS JetStream;
//! - [`resume`]: the product's rules on top of reads (completion, next episode,
//!   continue-watching, device names) and the [`resume::catalog`];
//! - [`telemetry`]: metric primitives and the CPU priority of background work;
//! - [`config`] assembles every component's section; [`model`] is the shared vocabulary.

pub mod config;
pub mod engine;
pub mod events;
pub mod ingest;
pub mod model;
pub mod resume;
pub mod store;
pub mod telemetry;
