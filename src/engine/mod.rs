//! The engine: one handle over the commit log, the coalescer, the flusher and the store.
//!
//! Write path, in this order (the order is what makes log truncation safe, see [`crate::engine::wal`]):
//! 1. upsert every record into the coalescer (last-write-wins);
//! 2. append them to the commit log;
//! 3. in `group` mode, wait for the fsync that covers them;
//! 4. acknowledge.
//!
//! Read path: coalescer (its value whether dirty or clean), then the store within
//! `store.read_timeout_ms`; a store that errs or is slow degrades the answer instead of
//! failing it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod coalescer;
pub mod flusher;
pub mod wal;

use crate::config::{Config, SyncMode};
use crate::events::Publisher;
use crate::model::{self, Key, Record, Value};
use crate::resume::alternative;
use crate::store::{Store, StoreError, TitleEntry, WriteHealth};
use crate::telemetry::metrics::{
    self, counter, counters, gauge, load, DescriptorEncoder, Encoded, Registry,
};
use coalescer::{Coalescer, CoalescerStats, Overloaded};
use flusher::{FlushError, FlushReport};
use wal::{ReplayReport, Wal, WalError, WalOptions, WalStats};

/// Log records gathered before a parallel replay step: large enough to amortise the thread
/// hand-off, small enough (10 MB) not to matter for memory.
const REPLAY_CHUNK_RECORDS: usize = 262_144;

/// The longest `/readyz` waits for its store probe, whatever `store.read_timeout_ms` says.
/// A balancer's health check must get its answer — `degraded` included — before its own
/// timeout: HAProxy's is the check interval, 2 s in deploy/haproxy.cfg, and a check that
/// times out three times marks the node down and cuts its connections, while a node whose
/// store is slow still takes writes. With the probe as long as a 2 s read budget, a slow
/// Cassandra did exactly that (bench/cluster-failover.sh, docs/deploy.md).
pub const PROBE_STORE_MAX_MS: u64 = 500;

/// Why a write was not acknowledged. Nothing here was acknowledged; a retry is safe
/// because writes are idempotent under last-write-wins.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The coalescer or the log buffer is full: retry after a short delay.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Log(#[from] WalError),
}

impl WriteError {
    /// True when waiting a little is the remedy (HTTP 503 + Retry-After, binary BUSY).
    pub fn is_overload(&self) -> bool {
        matches!(
            self,
            WriteError::Overloaded(_) | WriteError::Log(WalError::BufferFull(_))
        )
    }
}

/// A submitted write: in memory and appended to the log, maybe not yet fsynced.
#[derive(Clone, Copy, Debug)]
#[must_use = "a submitted write may only be acknowledged after `durable`"]
pub struct PendingWrite {
    pub receipt: WriteReceipt,
    /// The log position to wait for before acknowledging (`group` mode), if any.
    pub wait_for: Option<crate::engine::wal::Lsn>,
}

impl PendingWrite {
    /// Waits until the write may be acknowledged.
    pub async fn durable(self, engine: &Engine) -> Result<WriteReceipt, WriteError> {
        if let Some(lsn) = self.wait_for {
            engine.shared.wal.wait_durable(lsn).await?;
        }
        Ok(self.receipt)
    }
}

/// What [`Engine::write`] did with an acknowledged call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteReceipt {
    /// Records that became the newest value of their key.
    pub applied: usize,
    /// Records that were older than (or equal to) what was already held: no-ops.
    pub stale: usize,
}

/// Where a read's answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// The coalescer held the newest value.
    Memory,
    /// The store answered.
    Store,
    /// The store failed or timed out: the answer is "nothing known".
    Degraded,
}

/// A read's answer: `value` is `None` for never written, deleted, or degraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub value: Option<Value>,
    pub source: ReadSource,
    /// `value`'s alternative: the newest value before it from another device, as memory
    /// and the store know it merged ([`crate::resume::alternative`]); whether an answer
    /// offers it is the resume rule's call ([`crate::resume::alternative::offer`]).
    pub alternative: Option<Value>,
}

/// Engine-wide counters, read by metrics. Relaxed atomics bumped once per call or batch,
/// never per record on the hot path.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub write_calls: AtomicU64,
    pub write_records: AtomicU64,
    pub write_refused: AtomicU64,
    pub reads_memory: AtomicU64,
    pub reads_store: AtomicU64,
    pub reads_degraded: AtomicU64,
    pub flush_cycles: AtomicU64,
    pub flush_batches: AtomicU64,
    pub flush_rows: AtomicU64,
    /// Shared with in-flight store writes, which count each failure as it happens, so an
    /// ongoing store outage shows in /metrics (not only once the cycle finally succeeds).
    pub flush_errors: Arc<AtomicU64>,
    pub flush_retries: Arc<AtomicU64>,
    pub flush_seconds: crate::telemetry::metrics::Histogram,
    /// Flush cycles that failed because a flush task panicked (the next cycle retries).
    pub flush_panics: AtomicU64,
    /// Full flushes asked for by an operator ([`Engine::request_flush`]) that ended with
    /// every key dirty at the request in the store, and those that failed.
    pub flush_requests_done: AtomicU64,
    pub flush_requests_failed: AtomicU64,
    /// Whether the latest flush cycles failed: `/readyz` says so while they do.
    pub flush_health: FlushHealth,
    pub purged_rows: AtomicU64,
    pub purge_errors: AtomicU64,
}

impl EngineStats {
    /// The `playhead_store_reads_total` family: where point reads were answered from.
    fn encode_read_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        counters(
            e,
            "playhead_store_reads_total",
            "Point reads by where the answer came from.",
            [
                ([("source", "memory")], load(&self.reads_memory)),
                ([("source", "store")], load(&self.reads_store)),
                ([("source", "degraded")], load(&self.reads_degraded)),
            ],
        )
    }
}

/// The store's families: the purge, the write health (when the store keeps one), and the
/// store's own ([`Store::encode_metrics`]).
fn encode_store_metrics(
    store: &dyn Store,
    stats: &EngineStats,
    e: &mut DescriptorEncoder<'_>,
) -> Encoded {
    counter(
        e,
        "playhead_store_purged_rows_total",
        "Rows removed by the retention purge.",
        load(&stats.purged_rows),
    )?;
    if let Some(health) = store.write_health() {
        gauge(
            e,
            "playhead_store_healthy",
            "1 while the store takes writes and syncs, 0 once several failed in a row.",
            u32::from(health.failing().is_none()),
        )?;
        gauge(
            e,
            "playhead_store_consecutive_failures",
            "Store writes and syncs that failed since the last successful sync.",
            health.consecutive_failures(),
        )?;
    }
    store.encode_metrics(e)
}

/// How the latest flush cycles ended. A cycle retries store errors until they pass, so
/// one that *fails* is abnormal — a flush task panicked, or the final flush hit its
/// deadline — and the data stays in memory and in the log, waiting for the next cycle.
/// While the latest cycle failed, flushing counts as failing (`/readyz`: `degraded`); the
/// next cycle that stores its pick clears it.
#[derive(Debug, Default)]
pub struct FlushHealth {
    failed_in_a_row: AtomicU64,
    /// The latest failure's message (kept after a success, read only while failing).
    last_error: parking_lot::Mutex<String>,
}

impl FlushHealth {
    /// Records how one cycle ended. Stopping for shutdown is neither a failure nor a success.
    pub fn record(&self, outcome: &Result<FlushReport, FlushError>) {
        match outcome {
            Ok(_) => self.failed_in_a_row.store(0, Ordering::Relaxed),
            Err(FlushError::Shutdown) => {}
            Err(e) => {
                *self.last_error.lock() = e.to_string();
                self.failed_in_a_row.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// While the latest cycle failed: how many failed in a row, and the latest error.
    pub fn failing(&self) -> Option<(u64, String)> {
        let failed = self.failed_in_a_row.load(Ordering::Relaxed);
        (failed > 0).then(|| (failed, self.last_error.lock().clone()))
    }
}

/// Everything the engine's handles share. Its fields are private to the engine and its
/// parts (coalescer, log, flusher): callers go through [`Engine`]'s methods, so the write
/// order (upsert, then append, then fsync) and the read merge cannot be bypassed.
pub struct Shared {
    config: Config,
    coalescer: Coalescer,
    wal: Wal,
    store: Arc<dyn Store>,
    stats: EngineStats,
    /// Serialises flush cycles (each one opens an epoch and picks from what the last one
    /// left).
    flush_lock: tokio::sync::Mutex<()>,
    /// When each flush epoch began and where in the log its values start.
    epochs: parking_lot::Mutex<flusher::Epochs>,
    /// Flipped once on shutdown; background loops watch it.
    shutdown: watch::Sender<bool>,
    /// An operator asked for a full flush ([`Engine::request_flush`]); the flush loop
    /// waits for it next to its tick. A `Notify` keeps one permit, so a request made while
    /// a cycle runs is served after it, and requests made meanwhile are served together.
    flush_requested: tokio::sync::Notify,
    /// Wall-clock time for heartbeat stamps ([`Engine::now_ms`]).
    clock: model::Clock,
    /// The change stream, when `[events]` is on: each cycle publishes its rows through it
    /// after the store sync and before they count as stored ([`flusher`]).
    events: Option<Arc<Publisher>>,
}

/// The engine handle: cheap to clone, shared by every server task.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// One profile's most recent titles ([`Engine::recent_titles`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileTitles {
    /// Visible titles, most recent first ([`TitleEntry::recency`]).
    pub titles: Vec<TitleEntry>,
    /// Whether `titles` holds every visible title of the profile; otherwise only those
    /// among its most recent `count`, and a caller needing more asks for a larger count.
    pub complete: bool,
    /// [`ReadSource::Store`], or [`ReadSource::Degraded`] when only memory was listed.
    pub source: ReadSource,
}

/// What start-up replay found, plus how long it took.
#[derive(Clone, Debug)]
pub struct OpenReport {
    pub replay: ReplayReport,
    pub replay_duration: Duration,
}

/// What a graceful shutdown achieved.
#[derive(Clone, Debug, Default)]
pub struct ShutdownReport {
    pub flushed_rows: usize,
    /// Keys still only in the commit log because the store did not take them in time.
    pub left_in_log: usize,
}

impl Engine {
    /// Opens the commit log, replays it into a fresh coalescer, and returns the engine.
    /// Background work (flush cadence, retention, log snapshots) starts with
    /// [`Engine::spawn_background`].
    pub fn open(config: Config, store: Arc<dyn Store>) -> std::io::Result<(Self, OpenReport)> {
        Self::open_with_clock(config, store, model::Clock::System)
    }

    /// [`Engine::open`] stamping heartbeats with `clock`'s time (tests move a manual one).
    pub fn open_with_clock(
        config: Config,
        store: Arc<dyn Store>,
        clock: model::Clock,
    ) -> std::io::Result<(Self, OpenReport)> {
        Self::open_with(config, store, clock, None)
    }

    /// [`Engine::open_with_clock`] with the change stream `events` (`None`: off), which
    /// every flush cycle publishes its rows to before they count as stored.
    pub fn open_with(
        config: Config,
        store: Arc<dyn Store>,
        clock: model::Clock,
        events: Option<Publisher>,
    ) -> std::io::Result<(Self, OpenReport)> {
        let coalescer = Coalescer::new(config.coalescer.shards, config.coalescer.max_keys)
            .with_max_titles_per_profile(config.coalescer.max_titles_per_profile)
            .with_alternatives(
                config.coalescer.max_alternatives,
                config.api.alternative_window_ms,
                clock.clone(),
            );
        let opts = WalOptions {
            dir: config.wal_dir(),
            sync_mode: config.wal.sync_mode,
            sync_interval_ms: config.wal.sync_interval_ms,
            segment_bytes: config.wal.segment_bytes,
            max_buffer_bytes: config.wal.max_buffer_bytes,
        };
        let started = std::time::Instant::now();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut pending: Vec<Record> = Vec::with_capacity(REPLAY_CHUNK_RECORDS);
        let (wal, replay) = Wal::open(opts, |records| {
            pending.extend_from_slice(records);
            if pending.len() >= REPLAY_CHUNK_RECORDS {
                coalescer.replay_parallel(&pending, threads);
                pending.clear();
            }
        })?;
        coalescer.replay_parallel(&pending, threads);
        drop(pending);
        let replay_duration = started.elapsed();
        for problem in &replay.problems {
            tracing::warn!("commit-log replay: {problem}");
        }
        tracing::info!(
            records = replay.records,
            segments = replay.segments,
            snapshot = ?replay.snapshot,
            keys = coalescer.len(),
            ms = replay_duration.as_millis() as u64,
            "commit log replayed"
        );
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            coalescer,
            wal,
            store,
            stats: EngineStats::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            epochs: parking_lot::Mutex::new(flusher::Epochs::new()),
            shutdown,
            flush_requested: tokio::sync::Notify::new(),
            clock,
            events: events.map(Arc::new),
        });
        Ok((
            Self { shared },
            OpenReport {
                replay,
                replay_duration,
            },
        ))
    }

    /// The state behind the handle, for the engine's own parts (the flusher's tests).
    #[cfg(test)]
    fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The time heartbeats are stamped with and the skew clamp measures from.
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// The engine's counters (writes, reads by source, flush cycles), for metrics.
    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// The coalescer's counters and key gauges, summed over its shards.
    pub fn coalescer_stats(&self) -> CoalescerStats {
        self.shared.coalescer.stats()
    }

    /// The configured bound on keys in memory (`coalescer.max_keys`).
    pub fn max_keys(&self) -> usize {
        self.shared.coalescer.max_keys()
    }

    /// Keys in memory (dirty, being flushed, or clean and kept while their viewer plays).
    pub fn keys_in_memory(&self) -> usize {
        self.shared.coalescer.len()
    }

    /// The log position of the newest append ([`Engine::crash`] says up to where records
    /// reached the log's files).
    pub fn appended_lsn(&self) -> wal::Lsn {
        self.shared.wal.appended_lsn()
    }

    /// What the store alone holds for `key` (memory not consulted, no read budget): for
    /// tests and tools that check what flushes wrote. Serving reads use [`Engine::get`].
    pub async fn get_stored(&self, key: Key) -> Result<Option<Value>, StoreError> {
        self.shared.store.get(key).await
    }

    /// The commit log's counters and disk gauges.
    pub fn wal_stats(&self) -> &WalStats {
        self.shared.wal.stats()
    }

    /// Why the commit log refuses appends, while its disk is failing.
    pub fn log_failing(&self) -> Option<String> {
        self.shared.wal.failing()
    }

    /// The store's name (`embedded`, `cassandra`), as `/readyz` reports it.
    pub fn store_name(&self) -> &'static str {
        self.shared.store.name()
    }

    /// Whether the store's writes and syncs succeed, when it tracks that.
    pub fn store_write_health(&self) -> Option<&WriteHealth> {
        self.shared.store.write_health()
    }

    /// The change stream's publisher, when `[events]` is on (its health for `/readyz`).
    pub fn events(&self) -> Option<&Publisher> {
        self.shared.events.as_deref()
    }

    /// Registers the metrics of the engine's parts (docs/metrics.md): the coalescer's, the
    /// flusher's, the reads', the log's, the store's and, when on, the change stream's.
    pub fn register_metrics(&self, registry: &mut Registry) {
        if let Some(events) = &self.shared.events {
            events.register_metrics(registry);
        }
        let shared = Arc::clone(&self.shared);
        metrics::register(registry, "coalescer", move |e| {
            let coalescer = &shared.coalescer;
            coalescer.stats().encode_metrics(e, coalescer.max_keys())
        });
        let shared = Arc::clone(&self.shared);
        metrics::register(registry, "flusher", move |e| {
            flusher::encode_metrics(&shared.stats, e)
        });
        let shared = Arc::clone(&self.shared);
        metrics::register(registry, "reads", move |e| {
            shared.stats.encode_read_metrics(e)
        });
        let shared = Arc::clone(&self.shared);
        metrics::register(registry, "wal", move |e| {
            shared.wal.stats().encode_metrics(e)
        });
        let shared = Arc::clone(&self.shared);
        metrics::register(registry, "store", move |e| {
            encode_store_metrics(shared.store.as_ref(), &shared.stats, e)
        });
    }

    /// Asks the store for one key within the read budget (`store.read_timeout_ms`), but no
    /// longer than [`PROBE_STORE_MAX_MS`]: `Err` says why it did not answer (`unreachable:
    /// …`, `no answer within … ms`).
    pub async fn probe_store(&self) -> Result<(), String> {
        let budget = Duration::from_millis(
            self.shared
                .config
                .store
                .read_timeout_ms
                .min(PROBE_STORE_MAX_MS),
        );
        match tokio::time::timeout(budget, self.shared.store.get(Key::new(0, 0, 0))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("unreachable: {e}")),
            Err(_) => Err(format!("no answer within {} ms", budget.as_millis())),
        }
    }

    /// The tombstone record that deletes `key` now.
    pub fn deletion(&self, key: Key) -> Record {
        Record::new(key, Value::tombstone(self.now_ms()))
    }

    /// Takes `records` into the coalescer and the commit log and returns once they may be
    /// acknowledged (in `group` mode: once fsynced).
    pub async fn write(&self, records: &[Record]) -> Result<WriteReceipt, WriteError> {
        let pending = self.submit(records)?;
        pending.durable(self).await
    }

    /// The synchronous half of [`Engine::write`]: upserts and appends `records`, and says
    /// what must still happen before they may be acknowledged. Lets a pipelining server
    /// take the next batch while this one waits for its fsync; acknowledgements must then
    /// be sent in submission order (log positions only grow).
    pub fn submit(&self, records: &[Record]) -> Result<PendingWrite, WriteError> {
        let shared = &self.shared;
        shared.stats.write_calls.fetch_add(1, Ordering::Relaxed);
        let (applied, stale) = shared.coalescer.upsert_batch(records).inspect_err(|_| {
            shared.stats.write_refused.fetch_add(1, Ordering::Relaxed);
        })?;
        let receipt = WriteReceipt { applied, stale };
        // Stale records are logged too: the newer value that made them stale may not be in
        // the log yet, and this caller's acknowledgement must not depend on another's.
        let lsn = shared.wal.append(records).inspect_err(|_| {
            shared.stats.write_refused.fetch_add(1, Ordering::Relaxed);
        })?;
        shared
            .stats
            .write_records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(PendingWrite {
            receipt,
            wait_for: (shared.config.wal.sync_mode == SyncMode::Group).then_some(lsn),
        })
    }

    /// The newest visible value of `key`: the newer of what memory and the store hold, the
    /// store asked within the read budget. Never fails: when the store errs or is slow the
    /// answer is memory's value, or [`ReadSource::Degraded`] when memory has none.
    ///
    /// Memory alone is not enough: a late heartbeat older than a value already flushed is
    /// held in memory (the coalescer does not read the store on ingest) until the next flush,
    /// where the store's last-write-wins drops it; the merge hides it from reads meanwhile.
    pub async fn get(&self, key: Key) -> ReadResult {
        let shared = &self.shared;
        let in_memory = shared.coalescer.get_summary(&key);
        let budget = Duration::from_millis(shared.config.store.read_timeout_ms);
        let stored = match tokio::time::timeout(budget, shared.store.get_row(key)).await {
            Ok(Ok(stored)) => Ok(stored.map(|row| row.summary())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {} ms", budget.as_millis())),
        };
        // The value by last-write-wins; the alternative from both parts of the history.
        let (summary, source) = match (in_memory, stored) {
            (Some(m), Ok(Some(s))) => {
                let source = if m.value.supersedes(&s.value) {
                    ReadSource::Memory
                } else {
                    ReadSource::Store
                };
                (Some(alternative::merge(m, s)), source)
            }
            (Some(m), Ok(None)) => (Some(m), ReadSource::Memory),
            (None, Ok(s)) => (s, ReadSource::Store),
            (Some(m), Err(why)) => {
                tracing::debug!("store read failed ({why}); answering from memory");
                (Some(m), ReadSource::Memory)
            }
            (None, Err(why)) => return self.degraded(format_args!("{why}")),
        };
        let counter = match source {
            ReadSource::Memory => &shared.stats.reads_memory,
            _ => &shared.stats.reads_store,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let visible = summary.filter(|s| !s.value.is_tombstone());
        ReadResult {
            value: visible.map(|s| s.value),
            source,
            alternative: visible.and_then(|s| s.alternative),
        }
    }

    fn degraded(&self, why: std::fmt::Arguments<'_>) -> ReadResult {
        self.shared
            .stats
            .reads_degraded
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("store read degraded: {why}");
        ReadResult {
            value: None,
            source: ReadSource::Degraded,
            alternative: None,
        }
    }

    /// The visible titles among one profile's `count` most recent ([`TitleEntry::recency`];
    /// deletions count among them), most recent first: the store's `count` most recent
    /// merged with every title memory holds for the profile, newer wins, tombstones then
    /// dropped. Degrades to memory alone when the store fails or is slow.
    ///
    /// Exact, whatever the profile's size: the merged `count` most recent are the true
    /// ones. A title among them whose newest value is in the store is among the store's
    /// `count` most recent (its stored value is its merged value, and every title ranked
    /// above it in the store ranks above it merged too), and one whose newest value is in
    /// memory is in memory's full list. Any other title's merged value can only be
    /// underestimated (its stored value unseen), which keeps it below the true ones. Past
    /// `count`, that no longer holds, so a listing the store cut short is cut at `count`.
    pub async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        count: usize,
    ) -> ProfileTitles {
        let shared = &self.shared;
        let budget = Duration::from_millis(shared.config.store.read_timeout_ms);
        let listed = tokio::time::timeout(
            budget,
            shared.store.recent_titles(account_id, profile_id, count),
        )
        .await;
        let (stored, complete, source) = match listed {
            Ok(Ok(listed)) => {
                let complete = listed.is_complete();
                (listed.titles, complete, ReadSource::Store)
            }
            // Degraded: memory is all there is to list.
            Ok(Err(e)) => (Vec::new(), true, self.degraded(format_args!("{e}")).source),
            Err(_) => (
                Vec::new(),
                true,
                self.degraded(format_args!("list timed out")).source,
            ),
        };
        let mut merged: HashMap<u64, Value, foldhash::fast::RandomState> =
            stored.iter().map(|e| (e.title_id, e.value)).collect();
        for r in shared.coalescer.profile_entries(account_id, profile_id) {
            let held = merged.entry(r.key.title_id).or_insert(r.value);
            if r.value.supersedes(held) {
                *held = r.value;
            }
        }
        let mut titles: Vec<TitleEntry> = merged
            .into_iter()
            .map(|(title_id, value)| TitleEntry { title_id, value })
            .collect();
        titles.sort_unstable_by_key(|e| std::cmp::Reverse(e.recency()));
        if !complete {
            titles.truncate(count);
        }
        titles.retain(|e| !e.value.is_tombstone());
        ProfileTitles {
            titles,
            complete,
            source,
        }
    }

    /// Runs one flush cycle now that writes every dirty key (up to
    /// `flush.max_rows_per_cycle`), retrying store errors until it succeeds.
    pub async fn flush(&self) -> Result<FlushReport, FlushError> {
        flusher::flush_cycle(&self.shared, flusher::Policy::All, None).await
    }

    /// Asks the background flush loop for a full flush and returns at once: cycles that
    /// write every dirty key until the store holds (and has synced) every key that was
    /// dirty when asked — the "flush first, switch second" of a handover (docs/deploy.md;
    /// `playhead serve` calls it on SIGUSR1). The outcome is logged and counted in
    /// `playhead_flush_requests_total{outcome}`. Needs [`Engine::spawn_background`].
    pub fn request_flush(&self) {
        tracing::info!(
            dirty_keys = self.shared.coalescer.dirty_len(),
            "full flush requested"
        );
        self.shared.flush_requested.notify_one();
    }

    /// Runs one cycle of the background cadence now: idle keys and due checkpoints only.
    pub async fn flush_due(&self) -> Result<FlushReport, FlushError> {
        flusher::flush_cycle(&self.shared, flusher::Policy::KeyAware, None).await
    }

    /// Starts the flush cadence, the retention purge and the commit-log guard (snapshots
    /// when the log outgrows `wal.snapshot_after_bytes`) on a runtime of their own whose
    /// threads — its worker and the blocking threads their store writes and sorts run on —
    /// have a lower CPU priority than the request path ([`crate::telemetry::priority`]).
    pub fn spawn_background(&self) -> std::io::Result<Background> {
        let nice = self.shared.config.server.background_nice;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("playhead-bg")
            .on_thread_start(move || crate::telemetry::priority::lower_current_thread(nice))
            // Timers and I/O: the loops await store futures, and a store client may open
            // sockets from within them (the Cassandra driver opens its connections on the
            // runtime that built the session, but nothing guarantees that).
            .enable_all()
            .build()?;
        let handles = vec![
            runtime.spawn(flusher::flush_loop(Arc::clone(&self.shared))),
            runtime.spawn(flusher::purge_loop(Arc::clone(&self.shared))),
            runtime.spawn(flusher::log_guard_loop(Arc::clone(&self.shared))),
        ];
        Ok(Background {
            handles,
            runtime: Some(runtime),
        })
    }

    /// For tests of crash recovery: ends the engine as a SIGKILL would — no final flush, no
    /// snapshot, nothing more written to or fsynced in the commit log ([`Wal::crash`]).
    /// What was appended but not yet handed to write(2) is lost: in `periodic` mode that
    /// can be acknowledged heartbeats (the loss window docs/reliability.md measures); in
    /// `group` mode a heartbeat is acknowledged only after its fsync, so none. The store
    /// keeps what flush cycles wrote. Background loops are told to stop (their runtime is
    /// the caller's [`Background`], dropped with it). Returns the log position up to which
    /// records reached the log's files: those come back at the next [`Engine::open`].
    /// A real crash needs no such call; nothing but tests uses it.
    #[doc(hidden)]
    pub fn crash(self) -> crate::engine::wal::Lsn {
        self.shared.shutdown.send_replace(true);
        self.shared.wal.crash()
    }

    /// Graceful shutdown: stops the background loops, flushes everything the coalescer
    /// holds (giving up after `flush.shutdown_timeout_ms`, with the rest safe in the log),
    /// then writes and fsyncs the commit log and closes it.
    pub async fn shutdown(&self, background: Option<Background>) -> ShutdownReport {
        let shared = &self.shared;
        shared.shutdown.send_replace(true);
        if let Some(bg) = background {
            bg.join().await;
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(shared.config.flush.shutdown_timeout_ms);
        let mut report = ShutdownReport::default();
        while shared.coalescer.dirty_len() > 0 {
            // A cycle that succeeds slowly is not cut by the deadline, so look between
            // cycles too: tens of millions of dirty keys take minutes to store, and what
            // is left is safe in the commit log.
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = shared.coalescer.dirty_len(),
                    "final flush stopped at flush.shutdown_timeout_ms; the rest stays in the commit log"
                );
                break;
            }
            match flusher::flush_cycle(&self.shared, flusher::Policy::All, Some(deadline)).await {
                Ok(r) => report.flushed_rows += r.rows,
                Err(e) => {
                    tracing::error!(
                        "final flush incomplete: {e}; the rest stays in the commit log"
                    );
                    break;
                }
            }
        }
        report.left_in_log = shared.coalescer.dirty_len();
        shared.wal.close();
        report
    }
}

/// The engine's background tasks and their runtime; the tasks end when shutdown is
/// signalled.
pub struct Background {
    handles: Vec<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Background {
    async fn join(mut self) {
        for h in std::mem::take(&mut self.handles) {
            if let Err(e) = h.await {
                tracing::error!("background task failed: {e}");
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks stop, which tokio forbids inside
        // another runtime; this one's tasks have ended (or are abandoned with the engine).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    /// Background loops that first run after shutdown was signalled (their low-priority
    /// runtime starved of CPU, say) still stop: each waits for the flag, not for a change.
    #[tokio::test]
    async fn background_loops_started_after_shutdown_still_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        let store = EmbeddedStore::open(&config.embedded_store_dir(), 1 << 20).unwrap();
        let (engine, _) = Engine::open(config, Arc::new(store)).unwrap();
        engine.shared.shutdown.send_replace(true);
        let background = engine.spawn_background().unwrap();
        tokio::time::timeout(Duration::from_secs(20), engine.shutdown(Some(background)))
            .await
            .expect("shutdown waited for background loops that never saw the flag");
    }
}
