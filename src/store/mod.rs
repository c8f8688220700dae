//! Stores: where deduplicated batches land after the coalescer.
//!
//! A new store is one file implementing [`Store`]. Every store enforces last-write-wins by
//! [`Value::version`] itself, so an older write that reaches it after a newer one (a retried
//! batch, a second ingest node, a replayed log) can never overwrite the newer value, and a
//! tombstone hides every older value but loses to a later heartbeat.
//!
//! Every store must pass the one conformance suite in `tests/store_conformance.rs`.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::model::{Key, Record, Value};
use crate::telemetry::metrics::{DescriptorEncoder, Encoded};

pub mod breaker;
pub mod cassandra;
pub mod config;
pub mod embedded;
pub mod faulty;

pub use cassandra::CassandraStore;
pub use embedded::{EmbeddedStore, LwwReads};
pub use faulty::{FaultSwitch, FaultyStore};

/// What can go wrong talking to a store. Callers treat every variant as retryable for
/// writes (the data stays in memory and in the log) and as "degrade" for reads.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    #[error("store request timed out after {0} ms")]
    Timeout(u64),
    #[error("store holds a malformed row for {key:?}: {detail}")]
    Corrupt { key: Option<Key>, detail: String },
}

/// Failed store writes and syncs (since the last successful sync) after which a store counts
/// as failing: `/readyz` answers `degraded` with the last error, and `playhead_store_healthy`
/// is 0. Three, so one refused batch that its first retry lands does not flap readiness.
pub const FAILING_AFTER_FAILURES: u64 = 3;

/// How a store's recent writes and syncs went, for `/readyz` and `/metrics`. A store that
/// keeps one returns it from [`Store::write_health`] and records every write and sync in it.
/// Only a successful *sync* clears the failures: a batch applied to a store that cannot make
/// it durable is no progress (a full disk lets fjall buffer a batch, then fails its sync).
#[derive(Debug, Default)]
pub struct WriteHealth {
    /// Writes and syncs that failed since the last sync that succeeded.
    consecutive_failures: AtomicU64,
    /// The latest failure's message (kept after a success, read only while failing).
    last_error: Mutex<String>,
}

impl WriteHealth {
    /// Records one write's outcome: a failure counts, a success changes nothing.
    pub fn record_write<T>(&self, outcome: &Result<T, StoreError>) {
        if let Err(e) = outcome {
            self.record_failure(e);
        }
    }

    /// Records one sync's outcome: a failure counts, a success clears the failures.
    pub fn record_sync<T>(&self, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => self.consecutive_failures.store(0, Ordering::Relaxed),
            Err(e) => self.record_failure(e),
        }
    }

    fn record_failure(&self, error: &StoreError) {
        *self.last_error.lock() = error.to_string();
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed writes and syncs since the last successful sync.
    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The latest error, once [`FAILING_AFTER_FAILURES`] writes or syncs failed since the
    /// last successful sync.
    pub fn failing(&self) -> Option<String> {
        (self.consecutive_failures() >= FAILING_AFTER_FAILURES)
            .then(|| self.last_error.lock().clone())
    }
}

/// A row as the flush writes it and a point read returns it: a key's newest value and its
/// alternative, if one is known ([`crate::resume::alternative`]). A store that does not keep
/// alternatives uses [`Store`]'s defaults and stores the value alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredRow {
    pub key: Key,
    pub value: Value,
    pub alternative: Option<Value>,
}

impl StoredRow {
    /// A row without an alternative.
    pub const fn plain(record: Record) -> Self {
        Self {
            key: record.key,
            value: record.value,
            alternative: None,
        }
    }

    pub const fn record(&self) -> Record {
        Record::new(self.key, self.value)
    }

    /// The row's value and alternative, as [`crate::resume::alternative::merge`] takes them.
    pub const fn summary(&self) -> crate::resume::alternative::Summary {
        crate::resume::alternative::Summary {
            value: self.value,
            alternative: self.alternative,
        }
    }
}

/// One profile's title as a store lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TitleEntry {
    pub title_id: u64,
    pub value: Value,
}

impl TitleEntry {
    /// The "most recent" order of a profile's titles: greater is more recent. By
    /// [`Value::version`] (the last-write-wins order, so a tombstone ranks by its own
    /// timestamp), then the lower title id, so no two titles of a profile tie.
    pub fn recency(&self) -> (u64, u32, u32, std::cmp::Reverse<u64>) {
        let (at, device, position) = self.value.version();
        (at, device, position, std::cmp::Reverse(self.title_id))
    }
}

/// A profile's most recent titles as a store lists them ([`Store::recent_titles`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecentTitles {
    /// Most recent first ([`TitleEntry::recency`]), at most the `limit` asked for.
    pub titles: Vec<TitleEntry>,
    /// Rows the profile has in the store (every one was read to choose `titles`).
    pub total: usize,
}

impl RecentTitles {
    /// Whether `titles` holds every row of the profile.
    pub fn is_complete(&self) -> bool {
        self.titles.len() >= self.total
    }
}

/// Keeps the `limit` most recent of the entries it is offered ([`TitleEntry::recency`]):
/// a min-heap of at most `limit` entries whose root is the least recent kept, so a whole
/// profile streams through in O(rows × log limit) time and O(limit) memory.
pub struct MostRecent {
    limit: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Ranked>>,
    total: usize,
}

/// A [`TitleEntry`] ordered by [`TitleEntry::recency`].
#[derive(PartialEq, Eq)]
struct Ranked(TitleEntry);

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.recency().cmp(&other.0.recency())
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl MostRecent {
    /// Heap space reserved up front at most: `limit` may be "everything" (`usize::MAX`).
    const RESERVE: usize = 1_024;

    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            heap: std::collections::BinaryHeap::with_capacity(limit.min(Self::RESERVE)),
            total: 0,
        }
    }

    pub fn offer(&mut self, entry: TitleEntry) {
        self.total += 1;
        if self.heap.len() < self.limit {
            self.heap.push(std::cmp::Reverse(Ranked(entry)));
        } else if let Some(mut least) = self.heap.peek_mut() {
            if entry.recency() > least.0 .0.recency() {
                *least = std::cmp::Reverse(Ranked(entry));
            }
        }
    }

    /// The kept entries, most recent first, and how many were offered.
    pub fn finish(self) -> RecentTitles {
        // Ascending order of `Reverse` is descending recency.
        let titles = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse(Ranked(entry))| entry)
            .collect();
        RecentTitles {
            titles,
            total: self.total,
        }
    }
}

/// The contract every position store keeps.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and metrics (`embedded`, `cassandra`, …).
    fn name(&self) -> &'static str;

    /// Applies every record with last-write-wins. `Ok` means every record is applied and
    /// visible to reads (or was superseded by a newer value); it is durable once a later
    /// [`Store::sync`] returns `Ok`, and only then may the commit log drop it. An empty
    /// batch is a no-op. Records in one batch have distinct keys.
    async fn write_batch(&self, records: &[Record]) -> Result<(), StoreError>;

    /// [`Store::write_batch`] of rows that may carry an alternative: a store that keeps
    /// alternatives merges each row's with what it holds (by
    /// [`crate::resume::alternative::merge`], or as close as it can without a read: see
    /// the store's docs); the default drops them and writes the values.
    async fn write_rows(&self, rows: &[StoredRow]) -> Result<(), StoreError> {
        let records: Vec<Record> = rows.iter().map(StoredRow::record).collect();
        self.write_batch(&records).await
    }

    /// [`Store::get`] with the row's alternative, if the store keeps one (the default:
    /// never).
    async fn get_row(&self, key: Key) -> Result<Option<StoredRow>, StoreError> {
        Ok(self.get(key).await?.map(|value| StoredRow {
            key,
            value,
            alternative: None,
        }))
    }

    /// Makes every batch whose [`Store::write_batch`] returned `Ok` durable. The flusher
    /// calls it once per cycle, after the cycle's last batch, so a store with a journal
    /// syncs it once per cycle rather than once per batch. Stores whose writes are durable
    /// when `write_batch` returns (Cassandra: each write is acknowledged at the configured
    /// consistency) keep this default no-op.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The newest stored version of one key, *tombstones included* (`None` only when the key
    /// was never written or has been purged). The engine merges it with memory by
    /// last-write-wins, so it must see a tombstone to know it hides an older value in memory.
    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError>;

    /// The `limit` most recent titles of one profile ([`TitleEntry::recency`]) with their
    /// newest stored version, and how many rows the profile has. Tombstones are rows like
    /// any other here — ranked by their timestamp, returned, counted — for the same reason
    /// as in [`Store::get`]. The store reads the whole profile (paged, where it pages) and
    /// keeps the most recent in a [`MostRecent`], so the answer is exact whatever the
    /// profile's size, in memory bounded by `limit`.
    async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<RecentTitles, StoreError>;

    /// Deletes `key` as of `at_ms` with a tombstone, so a late heartbeat older than the
    /// delete cannot bring the title back.
    async fn delete(&self, key: Key, at_ms: u64) -> Result<(), StoreError> {
        self.write_batch(&[Record::new(key, Value::tombstone(at_ms))])
            .await?;
        self.sync().await
    }

    /// Removes every value and tombstone last updated before `cutoff_ms` and returns how
    /// many rows it removed. Stores with native expiry (TTL) may return `Ok(0)`.
    async fn purge_older_than(&self, cutoff_ms: u64) -> Result<u64, StoreError>;

    /// True when the store writes a batch faster if batches arrive in key order, each one a
    /// contiguous key range (the embedded store merge-joins them against its rows). The
    /// flusher then sorts the whole frozen set before cutting it into batches.
    fn prefers_key_ordered_batches(&self) -> bool {
        false
    }

    /// The store's record of its recent writes and syncs, when it keeps one (`None`: the
    /// store does not track it, and `/readyz` judges it by its reads alone).
    fn write_health(&self) -> Option<&WriteHealth> {
        None
    }

    /// Encodes the store's own metric families (docs/metrics.md) at each scrape; the
    /// engine registers it with the metrics registry. Stores without metrics of their own
    /// keep the default.
    fn encode_metrics(&self, _encoder: &mut DescriptorEncoder<'_>) -> Encoded {
        Ok(())
    }
}
