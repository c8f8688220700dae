//! The `[binary]` section: the binary ingest listener (docs/protocol.md) and its limits.

use serde::{Deserialize, Serialize};

use super::codec;
use crate::config::{check, ConfigError};

/// The binary ingest listener (docs/protocol.md) and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BinaryConfig {
    /// Serve the binary protocol at all.
    pub enabled: bool,
    /// Address of the binary listener.
    pub listen: String,
    /// The shared secret a client presents in its HELLO (compared in constant time). Empty
    /// refuses every client.
    pub secret: String,
    /// Largest frame payload accepted; larger frames are a protocol error.
    pub max_frame_bytes: u32,
    /// Most records in one batch.
    pub max_records_per_batch: u32,
    /// Batches a connection may have submitted but not yet acknowledged; past it the server
    /// stops reading that connection (TCP back-pressure), so memory stays bounded.
    pub max_in_flight_batches: u32,
    /// Open connections at most; further ones get a TOO_MANY_CONNECTIONS error frame.
    pub max_connections: usize,
    /// The HELLO must arrive within this after connecting.
    pub handshake_timeout_ms: u64,
    /// A connection with no frame for this long is closed.
    pub idle_timeout_ms: u64,
    /// Once a frame has started, the rest of it must arrive within this.
    pub read_timeout_ms: u64,
    /// A client that reads no acknowledgements for this long is disconnected.
    pub write_timeout_ms: u64,
    /// Delay suggested in BUSY replies.
    pub busy_retry_after_ms: u32,
    /// Listen backlog.
    pub backlog: u32,
    /// Kernel socket buffer sizes for accepted connections (0 = system default).
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
}

impl Default for BinaryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:7070".into(),
            secret: BINARY_DEV_SECRET.into(),
            max_frame_bytes: 1 << 20,
            max_records_per_batch: 16_384,
            max_in_flight_batches: 64,
            max_connections: 1_024,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            busy_retry_after_ms: 100,
            backlog: 1_024,
            recv_buffer_bytes: 4 << 20,
            send_buffer_bytes: 1 << 20,
        }
    }
}

/// The binary listener's shipped secret. The server warns when it is in use on a
/// non-loopback address.
pub const BINARY_DEV_SECRET: &str = "playhead-binary-development-secret";

impl BinaryConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = self;
        check(
            "binary.listen",
            &b.listen,
            b.listen.parse::<std::net::SocketAddr>().is_ok(),
            "an IP address and port such as 127.0.0.1:7070",
        )?;
        check(
            "binary.secret",
            b.secret.len(),
            b.secret.len() <= codec::MAX_SECRET_BYTES,
            "at most 1024 bytes",
        )?;
        check(
            "binary.max_frame_bytes",
            b.max_frame_bytes,
            (1_024..=64 << 20).contains(&b.max_frame_bytes),
            "between 1024 and 67108864",
        )?;
        check(
            "binary.max_records_per_batch",
            b.max_records_per_batch,
            b.max_records_per_batch >= 1
                && (b.max_records_per_batch as usize) * codec::RECORD_BYTES
                    + codec::BATCH_PREFIX_BYTES
                    <= b.max_frame_bytes as usize,
            "at least 1, and small enough that a full batch fits in binary.max_frame_bytes (40 bytes a record + 12)",
        )?;
        check(
            "binary.max_in_flight_batches",
            b.max_in_flight_batches,
            (1..=4_096).contains(&b.max_in_flight_batches),
            "between 1 and 4096",
        )?;
        check(
            "binary.max_connections",
            b.max_connections,
            (1..=1_000_000).contains(&b.max_connections),
            "between 1 and 1000000",
        )?;
        for (key, value) in [
            ("binary.handshake_timeout_ms", b.handshake_timeout_ms),
            ("binary.idle_timeout_ms", b.idle_timeout_ms),
            ("binary.read_timeout_ms", b.read_timeout_ms),
            ("binary.write_timeout_ms", b.write_timeout_ms),
        ] {
            check(
                key,
                value,
                (1..=3_600_000).contains(&value),
                "between 1 and 3600000",
            )?;
        }
        check(
            "binary.backlog",
            b.backlog,
            (1..=65_535).contains(&b.backlog),
            "between 1 and 65535",
        )?;
        for (key, value) in [
            ("binary.recv_buffer_bytes", b.recv_buffer_bytes),
            ("binary.send_buffer_bytes", b.send_buffer_bytes),
        ] {
            check(
                key,
                value,
                value <= 256 << 20,
                "between 0 (system default) and 268435456",
            )?;
        }
        Ok(())
    }
}
