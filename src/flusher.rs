//! Moving the coalescer's dirty keys to the store on a fixed cadence.
//!
//! A flush cycle: seal the log segment (`rotate`), freeze every shard's dirty map, write the
//! frozen maps to the store in batches of `flush.batch_rows` with at most
//! `flush.max_concurrency` in flight, retry failed batches with exponential backoff and
//! jitter until they land, then release the frozen maps and let the log drop the sealed
//! segments. One store row per dirty key per cycle: the coalescing factor is heartbeats per
//! key per interval.
//!
//! While the store is down a cycle simply keeps retrying: new heartbeats keep coalescing in
//! the active maps (memory bounded by live keys) and [`log_guard_loop`] keeps the log
//! bounded with snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::coalescer::Frozen;
use crate::engine::Shared;
use crate::model::{self, Record};
use crate::store::{Store, StoreError};

/// How often the log guard looks at the log's size.
const LOG_GUARD_EVERY: Duration = Duration::from_millis(500);

/// Why a flush cycle stopped before the store took everything. The data is safe: it went
/// back into the coalescer and is still in the commit log.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("flush gave up at its deadline with {rows} rows unwritten (last error: {last_error})")]
    Deadline { rows: usize, last_error: String },
    #[error("flush interrupted by shutdown")]
    Shutdown,
}

/// What one cycle wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Distinct keys written (one store row each).
    pub rows: usize,
    pub batches: usize,
    pub retries: usize,
    pub duration: Duration,
    /// The log segment this cycle covered; segments up to it are now dropped.
    pub segment: u64,
}

/// When a cycle stops retrying.
#[derive(Clone, Copy)]
enum Give {
    /// Never: the background cadence, until shutdown is signalled.
    UpOnShutdown,
    /// The final flush on shutdown.
    UpAt(tokio::time::Instant),
}

/// Runs one cycle; `deadline` bounds the retrying (the final flush on shutdown), `None`
/// retries until it succeeds or shutdown is signalled.
pub async fn flush_cycle(
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
) -> Result<FlushReport, FlushError> {
    let give = deadline.map_or(Give::UpOnShutdown, Give::UpAt);
    let _one_at_a_time = shared.flush_lock.lock().await;
    let started = Instant::now();
    let segment = shared.wal.rotate();
    let frozen = shared.coalescer.freeze();
    let mut report = FlushReport {
        segment,
        ..FlushReport::default()
    };
    match write_frozen(shared, &frozen, give, &mut report).await {
        Ok(()) => {
            shared.coalescer.release(frozen);
            shared.wal.mark_flushed(segment);
            report.duration = started.elapsed();
            let stats = &shared.stats;
            stats.flush_cycles.fetch_add(1, Ordering::Relaxed);
            stats
                .flush_rows
                .fetch_add(report.rows as u64, Ordering::Relaxed);
            stats.flush_seconds.observe(report.duration);
            if report.rows > 0 {
                tracing::debug!(
                    rows = report.rows,
                    batches = report.batches,
                    ms = report.duration.as_millis() as u64,
                    "flushed"
                );
            }
            Ok(report)
        }
        Err(e) => {
            // Put the unacknowledged values back so the next cycle (or the next start, via
            // the log) writes them; keys rewritten meanwhile keep their newer value.
            shared.coalescer.thaw(frozen);
            Err(e)
        }
    }
}

async fn write_frozen(
    shared: &Shared,
    frozen: &Frozen,
    give: Give,
    report: &mut FlushReport,
) -> Result<(), FlushError> {
    let cfg = &shared.config.flush;
    let mut in_flight: JoinSet<Result<usize, FlushError>> = JoinSet::new();
    // Key order turns every batch into one dense key range, which the embedded store
    // merge-joins against its rows (BENCHMARKS.md); otherwise the coalescer's hash order.
    let mut records: Box<dyn Iterator<Item = Record> + Send + '_> =
        if shared.store.prefers_key_ordered_batches() {
            Box::new(frozen.records_in_key_order().await.into_iter())
        } else {
            Box::new(frozen.records())
        };
    loop {
        let batch: Vec<Record> = records.by_ref().take(cfg.batch_rows).collect();
        let exhausted = batch.len() < cfg.batch_rows;
        if !batch.is_empty() {
            report.rows += batch.len();
            report.batches += 1;
            let store = Arc::clone(&shared.store);
            let backoff = Backoff::new(cfg.retry_initial_ms, cfg.retry_max_ms);
            let shutdown = shared.shutdown.subscribe();
            let failures = FailureCounters {
                errors: Arc::clone(&shared.stats.flush_errors),
                retries: Arc::clone(&shared.stats.flush_retries),
            };
            in_flight.spawn(write_with_retry(
                store, batch, backoff, give, shutdown, failures,
            ));
        }
        while in_flight.len() >= cfg.max_concurrency || (exhausted && !in_flight.is_empty()) {
            let joined = in_flight.join_next().await.expect("set is not empty");
            let retries = match joined {
                Ok(result) => result?,
                Err(e) => panic!("flush task panicked: {e}"),
            };
            report.retries += retries;
        }
        if exhausted {
            break;
        }
    }
    let stats = &shared.stats;
    stats
        .flush_batches
        .fetch_add(report.batches as u64, Ordering::Relaxed);
    Ok(())
}

/// The engine's flush-failure counters, bumped by each store write as it fails.
struct FailureCounters {
    errors: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
}

/// Writes one batch, retrying until the store takes it; returns how many retries it took.
async fn write_with_retry(
    store: Arc<dyn Store>,
    batch: Vec<Record>,
    mut backoff: Backoff,
    give: Give,
    mut shutdown: watch::Receiver<bool>,
    failures: FailureCounters,
) -> Result<usize, FlushError> {
    let mut retries = 0;
    loop {
        let error: StoreError = match store.write_batch(&batch).await {
            Ok(()) => return Ok(retries),
            Err(e) => e,
        };
        failures.errors.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        if retries == 0 || retries % 20 == 0 {
            tracing::warn!(
                rows = batch.len(),
                retries,
                next_retry_ms = delay.as_millis() as u64,
                "store write failed: {error}"
            );
        }
        retries += 1;
        failures.retries.fetch_add(1, Ordering::Relaxed);
        match give {
            Give::UpAt(deadline) => {
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(FlushError::Deadline {
                        rows: batch.len(),
                        last_error: error.to_string(),
                    });
                }
                tokio::time::sleep(delay).await;
            }
            Give::UpOnShutdown => {
                if *shutdown.borrow() {
                    return Err(FlushError::Shutdown);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Err(FlushError::Shutdown),
                }
            }
        }
    }
}

/// Exponential backoff with "equal jitter": each delay is drawn from [d/2, d] where d
/// doubles from `initial` up to `max`, so retries from many batches spread out.
#[derive(Clone, Debug)]
pub struct Backoff {
    next_ms: u64,
    max_ms: u64,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Self {
        Self {
            next_ms: initial_ms.max(1),
            max_ms: max_ms.max(initial_ms.max(1)),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next_ms;
        self.next_ms = (self.next_ms.saturating_mul(2)).min(self.max_ms);
        let jittered = rand::rng().random_range(d / 2..=d);
        Duration::from_millis(jittered.max(1))
    }
}

/// The flush cadence: a cycle every `flush.interval_ms` (a slow cycle delays the next one
/// rather than overlapping it).
pub async fn flush_loop(shared: Arc<Shared>) {
    // Each loop waits for the flag itself (`wait_for`), not for a change: a loop that first
    // runs after shutdown was signalled (its runtime starved of CPU, say) subscribes to the
    // already-set flag and would never see a change.
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.flush.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if *shutdown.borrow() {
            return;
        }
        match flush_cycle(&shared, None).await {
            Ok(_) => {}
            Err(FlushError::Shutdown) => return,
            Err(e) => tracing::error!("flush cycle failed: {e}"),
        }
    }
}

/// Purges store rows older than the retention period, every `store.purge_interval_ms`.
pub async fn purge_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick =
        tokio::time::interval(Duration::from_millis(shared.config.store.purge_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let cutoff = model::now_ms().saturating_sub(shared.config.retention_ms());
        match shared.store.purge_older_than(cutoff).await {
            Ok(n) => {
                shared.stats.purged_rows.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(rows = n, "purged positions past retention");
                }
            }
            Err(e) => {
                shared.stats.purge_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("retention purge failed: {e}");
            }
        }
    }
}

/// Keeps the commit log bounded while flushes cannot complete: when the segments on disk
/// exceed `wal.snapshot_after_bytes`, writes a snapshot of every key in memory (O(keys),
/// not O(writes)) and drops the segments it covers.
pub async fn log_guard_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let limit = shared.config.wal.snapshot_after_bytes;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_GUARD_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let on_disk = shared
            .wal
            .stats()
            .segment_bytes_on_disk
            .load(Ordering::Relaxed);
        if on_disk <= limit {
            continue;
        }
        tracing::warn!(
            on_disk,
            limit,
            "commit log over its limit (store behind?); writing a snapshot"
        );
        let for_snapshot = Arc::clone(&shared);
        match tokio::task::spawn_blocking(move || snapshot(&for_snapshot)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("commit-log snapshot failed: {e}; will retry"),
            Err(e) => tracing::error!("commit-log snapshot task failed: {e}"),
        }
    }
}

/// Writes a snapshot of the coalescer now. Blocking I/O: call it off the async workers.
pub fn snapshot(shared: &Shared) -> std::io::Result<u64> {
    let segment = shared.wal.rotate();
    shared
        .wal
        .write_snapshot(segment, |sink| shared.coalescer.for_each_record(sink))
}
