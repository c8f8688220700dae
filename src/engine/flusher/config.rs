//! The `[flush]` section: moving deduplicated batches from the coalescer to the store.

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// Moving deduplicated batches from the coalescer to the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Cadence of flush cycles: each one writes the dirty keys that are due (see
    /// `crate::engine::flusher`).
    pub interval_ms: u64,
    /// A dirty key not written for this long is idle (its viewer paused, stopped or left):
    /// the next cycle writes it and, once stored, forgets it. Bounds how long the last
    /// position of a stopped viewer takes to reach the store, and how much commit log is
    /// kept. 0: every key written before a cycle began is written by that cycle.
    pub idle_ms: u64,
    /// A key that keeps playing is written once per this period (a checkpoint, at a phase
    /// fixed by its key). Bounds how stale the store is for a key that never goes idle.
    /// 0: every dirty key is written by every cycle.
    pub checkpoint_ms: u64,
    /// Most rows one cycle writes; idle keys left over wait for the next cycle (and keep
    /// their log segments), checkpoints left over for their next period. Bounds the
    /// cycle's copy of the rows (40 bytes each).
    pub max_rows_per_cycle: usize,
    /// Rows per store write.
    pub batch_rows: usize,
    /// Store writes in flight at once.
    pub max_concurrency: usize,
    /// First retry delay after a failed store write; doubles up to `retry_max_ms`, with
    /// random jitter.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// On shutdown, how long to keep trying to flush before exiting with the rest safe in
    /// the commit log.
    pub shutdown_timeout_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            idle_ms: 10_000,
            checkpoint_ms: 300_000,
            max_rows_per_cycle: 2_000_000,
            batch_rows: 8_192,
            max_concurrency: 4,
            retry_initial_ms: 50,
            retry_max_ms: 10_000,
            shutdown_timeout_ms: 30_000,
        }
    }
}

impl FlushConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = self;
        check(
            "flush.interval_ms",
            f.interval_ms,
            (1..=3_600_000).contains(&f.interval_ms),
            "between 1 and 3600000",
        )?;
        check(
            "flush.idle_ms",
            f.idle_ms,
            f.idle_ms <= 3_600_000,
            "at most 3600000",
        )?;
        check(
            "flush.checkpoint_ms",
            f.checkpoint_ms,
            f.checkpoint_ms <= 86_400_000,
            "at most 86400000 (a day)",
        )?;
        check(
            "flush.max_rows_per_cycle",
            f.max_rows_per_cycle,
            (1..=100_000_000).contains(&f.max_rows_per_cycle),
            "between 1 and 100000000",
        )?;
        check(
            "flush.batch_rows",
            f.batch_rows,
            (1..=1_000_000).contains(&f.batch_rows),
            "between 1 and 1000000",
        )?;
        check(
            "flush.max_concurrency",
            f.max_concurrency,
            (1..=1_024).contains(&f.max_concurrency),
            "between 1 and 1024",
        )?;
        check(
            "flush.retry_initial_ms",
            f.retry_initial_ms,
            f.retry_initial_ms >= 1,
            "at least 1",
        )?;
        check(
            "flush.retry_max_ms",
            f.retry_max_ms,
            f.retry_max_ms >= f.retry_initial_ms,
            "at least flush.retry_initial_ms",
        )?;
        Ok(())
    }
}
