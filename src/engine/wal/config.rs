//! The `[wal]` section: the commit log.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// When the commit log makes an appended record durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Acknowledge once the record is in the log's buffer; fsync every `sync_interval_ms`.
    /// A crash can lose at most that window of acknowledged writes.
    Periodic,
    /// Acknowledge only after the fsync that covers the record; fsyncs are shared by every
    /// caller waiting at that moment.
    Group,
}

/// The commit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Directory of the segment files; empty means `<data_dir>/wal`.
    pub dir: PathBuf,
    pub sync_mode: SyncMode,
    /// Periodic mode: the longest an acknowledged record waits for its fsync.
    pub sync_interval_ms: u64,
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Appended bytes not yet written to the file. Past it, appends are refused
    /// ("overloaded") until the writer catches up.
    pub max_buffer_bytes: usize,
    /// When the segments on disk exceed this (the store is down or slow, or ingest outpaces
    /// the flush cadence), a snapshot of the unflushed keys replaces them.
    pub snapshot_after_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            sync_mode: SyncMode::Periodic,
            sync_interval_ms: 10,
            segment_bytes: 64 << 20,
            max_buffer_bytes: 64 << 20,
            snapshot_after_bytes: 1 << 30,
        }
    }
}

impl WalConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = self;
        check(
            "wal.sync_interval_ms",
            w.sync_interval_ms,
            (1..=10_000).contains(&w.sync_interval_ms),
            "between 1 and 10000",
        )?;
        check(
            "wal.segment_bytes",
            w.segment_bytes,
            (64 << 10..=4 << 30).contains(&w.segment_bytes),
            "between 65536 (64 KiB) and 4294967296 (4 GiB)",
        )?;
        check(
            "wal.max_buffer_bytes",
            w.max_buffer_bytes,
            (64 << 10..=1 << 30).contains(&w.max_buffer_bytes),
            "between 65536 (64 KiB) and 1073741824 (1 GiB)",
        )?;
        check(
            "wal.snapshot_after_bytes",
            w.snapshot_after_bytes,
            w.snapshot_after_bytes >= 2 * w.segment_bytes,
            "at least twice wal.segment_bytes",
        )?;
        Ok(())
    }
}
