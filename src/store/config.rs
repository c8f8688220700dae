//! The `[store]` section: which store backs the coalescer, retention, the read budget;
//! the sub-sections are the stores' own (`store.embedded`, `store.cassandra`).

use serde::{Deserialize, Serialize};

use super::cassandra::config::CassandraStoreConfig;
use super::embedded::EmbeddedStoreConfig;
use crate::config::{check, ConfigError};

/// Which store backs the coalescer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// fjall, an LSM tree inside this process. No external service.
    Embedded,
    /// A Cassandra or ScyllaDB cluster (docs/cassandra.md): the scale-out path.
    Cassandra,
}

/// The store and its retention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Positions (and deletion markers) untouched for longer are purged. Heartbeats older
    /// than this are refused at ingest, so a purged deletion cannot be undone by them.
    pub retention_days: u64,
    /// How often the retention purge runs.
    pub purge_interval_ms: u64,
    /// A read that the store has not answered by then is answered without it (resume at
    /// 0, or memory only): playback is never blocked by the position store. Default 70 ms:
    /// the product's budget for a resume is 150 ms end to end, and a resume makes at most
    /// two store reads one after the other (the title, then the next episode when the
    /// title is completed), so 2 × 70 = 140 ms leaves 10 ms for the rest of the request.
    pub read_timeout_ms: u64,
    pub embedded: EmbeddedStoreConfig,
    pub cassandra: CassandraStoreConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Embedded,
            retention_days: 180,
            purge_interval_ms: 3_600_000,
            read_timeout_ms: 70,
            embedded: EmbeddedStoreConfig::default(),
            cassandra: CassandraStoreConfig::default(),
        }
    }
}

impl StoreConfig {
    /// Range checks that types alone cannot express, `store.cassandra` included; the first bad
    /// value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        check(
            "store.retention_days",
            s.retention_days,
            (1..=36_500).contains(&s.retention_days),
            "between 1 and 36500",
        )?;
        check(
            "store.purge_interval_ms",
            s.purge_interval_ms,
            s.purge_interval_ms >= 1_000,
            "at least 1000",
        )?;
        check(
            "store.read_timeout_ms",
            s.read_timeout_ms,
            (1..=60_000).contains(&s.read_timeout_ms),
            "between 1 and 60000",
        )?;
        self.cassandra.validate(self.retention_days)?;
        Ok(())
    }

    /// Retention as milliseconds.
    pub fn retention_ms(&self) -> u64 {
        self.retention_days.saturating_mul(86_400_000)
    }
}
