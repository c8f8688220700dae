//! Moving the coalescer's dirty keys to the store, key by key when it matters.
//!
//! Every `flush.interval_ms` one cycle: seal the log segment (`rotate`), open the next
//! flush epoch, and *pick* the dirty keys that are due ([`crate::engine::coalescer`]):
//! - **idle** keys — not written for `flush.idle_ms` (the viewer paused, stopped or left):
//!   their last position reaches the store within `idle_ms + interval_ms` plus the write;
//! - **checkpoints** — a key that keeps playing is written once per `flush.checkpoint_ms`,
//!   at a phase fixed by its key, so a period's checkpoints spread evenly over it;
//! - on a manual flush or the final flush at shutdown, every dirty key.
//!
//! The pick is written in batches of `flush.batch_rows` with at most
//! `flush.max_concurrency` in flight, failed batches retried with exponential backoff and
//! jitter until they land, made durable with one store sync (retried likewise); then the
//! stored entries become clean (idle ones leave memory) and the log drops every segment
//! before the first segment of the oldest epoch a dirty key still has. Keys that keep
//! playing are rewritten every heartbeat, so their epoch keeps moving forward: they never
//! hold the log back, though the store sees them only at checkpoints. The log keeps about
//! `idle_ms + interval_ms` of segments.
//!
//! Napkin math for the real fleet (30 M viewers, a heartbeat every 4 s = 7.5 M/s): with the
//! default 300 s checkpoint the store takes 30 M / 300 s = 100 k rows/s plus one row per
//! session end (60 s: 500 k rows/s), against 7.5 M rows/s if every heartbeat were written.
//!
//! While the store is down a cycle simply keeps retrying: new heartbeats keep coalescing in
//! memory (bounded by `coalescer.max_keys`) and [`log_guard_loop`] keeps the log bounded
//! with snapshots.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::task::JoinSet;

pub mod config;

use crate::config::FlushConfig;
use crate::engine::coalescer::{Checkpoint, Pick, Picked, FIRST_EPOCH};
use crate::engine::{EngineStats, Shared};
use crate::model::{self, Record};
use crate::store::{Store, StoreError, StoredRow};
use crate::telemetry::metrics::{counter, counters, histogram, load, DescriptorEncoder, Encoded};

/// How often the log guard looks at the log's size.
const LOG_GUARD_EVERY: Duration = Duration::from_millis(500);
/// The log guard calls the flusher stalled when no cycle completed for this long, or for
/// two flush intervals if that is longer.
const STALLED_AFTER: Duration = Duration::from_secs(10);
/// A snapshot replaces the log only when the log is at least this many times the size the
/// snapshot would have (40 bytes per dirty key): at 30 M keys held a snapshot is 1.2 GB,
/// and writing one every few seconds to replace a few GB of log would cost more disk than
/// it saves.
const SNAPSHOT_GAIN: u64 = 4;

/// The `playhead_flush_*` families (docs/metrics.md), from the engine's counters.
pub fn encode_metrics(stats: &EngineStats, e: &mut DescriptorEncoder<'_>) -> Encoded {
    counter(
        e,
        "playhead_flush_cycles_total",
        "Completed flush cycles.",
        load(&stats.flush_cycles),
    )?;
    counter(
        e,
        "playhead_flush_batches_total",
        "Store batches written by flushes.",
        load(&stats.flush_batches),
    )?;
    counter(
        e,
        "playhead_flush_rows_total",
        "Rows written to the store (one per dirty key per cycle).",
        load(&stats.flush_rows),
    )?;
    counter(
        e,
        "playhead_flush_errors_total",
        "Store batch writes that failed (each is retried).",
        load(&stats.flush_errors),
    )?;
    counter(
        e,
        "playhead_flush_retries_total",
        "Store batch writes retried.",
        load(&stats.flush_retries),
    )?;
    counter(
        e,
        "playhead_flush_panics_total",
        "Flush cycles failed by a panicking flush task (the keys stay dirty; the next cycle retries).",
        load(&stats.flush_panics),
    )?;
    counters(
        e,
        "playhead_flush_requests_total",
        "Full flushes asked for by an operator (SIGUSR1) that ended, by outcome.",
        [
            ([("outcome", "done")], load(&stats.flush_requests_done)),
            ([("outcome", "failed")], load(&stats.flush_requests_failed)),
        ],
    )?;
    histogram(
        e,
        "playhead_flush_duration_seconds",
        "Duration of flush cycles.",
        &stats.flush_seconds,
    )
}

/// Why a flush cycle stopped before the store took everything. The data is safe: it is
/// still dirty in the coalescer and still in the commit log.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("flush gave up at its deadline with {rows} rows unwritten (last error: {last_error})")]
    Deadline { rows: usize, last_error: String },
    #[error("flush interrupted by shutdown")]
    Shutdown,
    #[error("a flush task panicked: {0}")]
    Panicked(String),
}

/// What one cycle wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Distinct keys written (one store row each).
    pub rows: usize,
    pub batches: usize,
    pub retries: usize,
    pub duration: Duration,
    /// The log segment this cycle sealed.
    pub segment: u64,
    /// Segments up to this one are now dropped (`None`: none could be).
    pub dropped_through: Option<u64>,
    /// Events the change stream acknowledged (one per row when `[events]` is on, else 0).
    pub published: usize,
}

/// Which keys a cycle writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The cadence: idle keys and due checkpoints.
    KeyAware,
    /// Every dirty key (a manual flush, shutdown).
    All,
}

/// When each flush epoch began and where its records start in the log: what turns an
/// entry's epoch into "idle for `idle_ms`" and into "segments that may go".
#[derive(Debug)]
pub struct Epochs {
    /// Oldest first. Entries older than every dirty key's epoch are pruned.
    started: VecDeque<EpochStart>,
    /// The flusher's clock origin for checkpoint windows.
    origin: Instant,
    /// Where the next checkpoint window starts, in ms since `origin`.
    checkpoint_from_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct EpochStart {
    epoch: u32,
    at: Instant,
    /// Every value tagged with this epoch was appended to this segment or a later one.
    first_segment: u64,
}

impl Epochs {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            // The first epoch's values (and replayed ones) may be anywhere in the log.
            started: VecDeque::from([EpochStart {
                epoch: FIRST_EPOCH,
                at: now,
                first_segment: 0,
            }]),
            origin: now,
            checkpoint_from_ms: 0,
        }
    }

    /// Records that `epoch` began now, its values in segments from `first_segment` on, and
    /// says what the cycle picks.
    fn begin(&mut self, epoch: u32, first_segment: u64, cfg: &FlushConfig, policy: Policy) -> Pick {
        let now = Instant::now();
        self.started.push_back(EpochStart {
            epoch,
            at: now,
            first_segment,
        });
        let idle_since = now.checked_sub(Duration::from_millis(cfg.idle_ms));
        // The newest epoch that began at least idle_ms ago: a key last written before it
        // has been idle for at least that long.
        let idle_before = match policy {
            Policy::All => epoch,
            Policy::KeyAware => idle_since
                .and_then(|since| self.started.iter().rev().find(|s| s.at <= since))
                .map_or(FIRST_EPOCH, |s| s.epoch),
        };
        let to_ms = now.duration_since(self.origin).as_millis() as u64;
        Pick {
            idle_before,
            all: policy == Policy::All,
            checkpoint: Checkpoint {
                period_ms: cfg.checkpoint_ms,
                from_ms: self.checkpoint_from_ms,
                to_ms,
            },
            max_rows: cfg.max_rows_per_cycle,
        }
    }

    /// A cycle stored its pick: the next checkpoint window starts where this one ended.
    /// (A pick cut short by `flush.max_rows_per_cycle` leaves some checkpoints of its
    /// window to their next period: taking the window again would pick the same keys —
    /// rewritten since, so dirty and due again — before the ones it left.) Returns the
    /// last segment the log may drop, and forgets epochs no dirty key can have any more.
    fn stored(&mut self, pick: &Pick, picked: &Picked) -> Option<u64> {
        self.checkpoint_from_ms = pick.checkpoint.to_ms;
        let oldest = picked.oldest_dirty_after();
        while self.started.len() > 1 && self.started[1].epoch <= oldest {
            self.started.pop_front();
        }
        let first = self
            .started
            .iter()
            .find(|s| s.epoch >= oldest)
            .map_or(0, |s| s.first_segment);
        first.checked_sub(1)
    }
}

impl Default for Epochs {
    fn default() -> Self {
        Self::new()
    }
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
/// retries until it succeeds or shutdown is signalled. How it ended goes into the
/// engine's [`FlushHealth`](crate::engine::FlushHealth) (and a panic is counted), whichever
/// step failed.
pub async fn flush_cycle(
    shared: &Arc<Shared>,
    policy: Policy,
    deadline: Option<tokio::time::Instant>,
) -> Result<FlushReport, FlushError> {
    let outcome = cycle(shared, policy, deadline).await;
    if matches!(outcome, Err(FlushError::Panicked(_))) {
        shared.stats.flush_panics.fetch_add(1, Ordering::Relaxed);
    }
    shared.stats.flush_health.record(&outcome);
    outcome
}

async fn cycle(
    shared: &Arc<Shared>,
    policy: Policy,
    deadline: Option<tokio::time::Instant>,
) -> Result<FlushReport, FlushError> {
    let give = deadline.map_or(Give::UpOnShutdown, Give::UpAt);
    let _one_at_a_time = shared.flush_lock.lock().await;
    let started = Instant::now();
    let segment = shared.wal.rotate();
    let epoch = shared.coalescer.advance_epoch();
    let pick = shared
        .epochs
        .lock()
        .begin(epoch, segment + 1, &shared.config.flush, policy);
    let picked = pick_records(shared, pick).await?;
    let picked_in = started.elapsed();
    let mut report = FlushReport {
        segment,
        ..FlushReport::default()
    };
    let mut stored = write_picked(shared, &picked, give, &mut report).await;
    let written_in = started.elapsed();
    if stored.is_ok() {
        // Published after the sync and before the keys count as stored (and the log may
        // drop them): a crash in between replays them, and the next flush publishes again.
        stored = publish_picked(shared, &picked.records, give, &mut report).await;
    }
    match stored {
        Ok(()) => {
            shared.coalescer.mark_stored(&picked);
            report.dropped_through = shared.epochs.lock().stored(&pick, &picked);
            if let Some(through) = report.dropped_through {
                shared.wal.mark_flushed(through);
            }
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
                    pick_ms = picked_in.as_millis() as u64,
                    write_ms = (written_in - picked_in).as_millis() as u64,
                    published = report.published,
                    ms = report.duration.as_millis() as u64,
                    "flushed"
                );
            }
            Ok(report)
        }
        Err(e) => {
            // Nothing to undo: the pick only copied, the values are still dirty in memory
            // and in the log, and the next cycle (or the next start) writes them.
            shared.coalescer.abandon(picked);
            Err(e)
        }
    }
}

/// Picks the cycle's records on a blocking thread (a pass over every key held: 50–70 ms
/// at 3.5 M keys in the 4 M-viewer fleet, too long for a runtime worker), sorted by key
/// when the store prefers it.
async fn pick_records(shared: &Arc<Shared>, pick: Pick) -> Result<Picked, FlushError> {
    let for_pick = Arc::clone(shared);
    let sort = shared.store.prefers_key_ordered_batches();
    tokio::task::spawn_blocking(move || {
        let mut picked = for_pick.coalescer.pick(&pick);
        if sort {
            // Key order turns every batch into one dense key range, which the embedded
            // store merge-joins against its rows (BENCHMARKS.md).
            picked.records.sort_unstable_by_key(|r| r.key);
        }
        picked
    })
    .await
    .map_err(|e| FlushError::Panicked(e.to_string()))
}

/// Writes the picked rows, each with its alternative ([`Picked::rows`]), in batches of
/// `flush.batch_rows`, then syncs the store once.
async fn write_picked(
    shared: &Shared,
    picked: &Picked,
    give: Give,
    report: &mut FlushReport,
) -> Result<(), FlushError> {
    let cfg = &shared.config.flush;
    let mut in_flight: JoinSet<Result<usize, FlushError>> = JoinSet::new();
    let mut records = picked.rows();
    loop {
        let batch: Vec<StoredRow> = records.by_ref().take(cfg.batch_rows).collect();
        let exhausted = batch.len() < cfg.batch_rows;
        if !batch.is_empty() {
            report.rows += batch.len();
            report.batches += 1;
            in_flight.spawn(with_retry(shared, StoreOp::Write(batch), give));
        }
        while in_flight.len() >= cfg.max_concurrency || (exhausted && !in_flight.is_empty()) {
            let joined = in_flight.join_next().await.expect("set is not empty");
            // A panicking store write must not end the flush loop: the cycle fails like
            // any other (its keys stay dirty), is counted, and the next one retries.
            let retries = match joined {
                Ok(result) => result?,
                Err(e) => return Err(FlushError::Panicked(e.to_string())),
            };
            report.retries += retries;
        }
        if exhausted {
            break;
        }
    }
    if report.batches > 0 {
        // The cycle's batches are applied; make them durable before the log drops them.
        let sync = StoreOp::Sync { rows: report.rows };
        report.retries += with_retry(shared, sync, give).await?;
    }
    let stats = &shared.stats;
    stats
        .flush_batches
        .fetch_add(report.batches as u64, Ordering::Relaxed);
    Ok(())
}

/// Publishes the cycle's rows, already synced to the store, to the change stream (when
/// `[events]` is on): in rounds of `events.max_in_flight`, each published again after a
/// backoff until the stream acknowledges it — for as long as the store's writes are
/// retried ([`Give`]). Until it returns the rows stay dirty, so the log keeps them.
async fn publish_picked(
    shared: &Shared,
    picked: &[Record],
    give: Give,
    report: &mut FlushReport,
) -> Result<(), FlushError> {
    let Some(events) = shared.events.as_deref() else {
        return Ok(());
    };
    if picked.is_empty() {
        return Ok(());
    }
    events.stored(picked.len());
    let mut retry = Retry::new(shared, give);
    let outcome = async {
        for round in picked.chunks(events.max_in_flight()) {
            loop {
                let budget = retry.budget();
                match events.publish_round(round, budget).await {
                    Ok(()) => break,
                    Err(e) => {
                        retry
                            .pause(round.len(), "event publish", &e.to_string())
                            .await?
                    }
                }
            }
            report.published += round.len();
        }
        Ok(())
    }
    .await;
    events.cycle_ended();
    outcome
}

/// One store call of a flush cycle.
enum StoreOp {
    /// Apply one batch of rows (with their alternatives).
    Write(Vec<StoredRow>),
    /// Make the cycle's `rows`, all applied, durable.
    Sync { rows: usize },
}

impl StoreOp {
    fn rows(&self) -> usize {
        match self {
            StoreOp::Write(batch) => batch.len(),
            StoreOp::Sync { rows } => *rows,
        }
    }
}

/// Runs `op` until the store takes it; resolves to how many retries it took. Owns what it
/// needs, so a batch can run as a task of its own.
fn with_retry(
    shared: &Shared,
    op: StoreOp,
    give: Give,
) -> impl std::future::Future<Output = Result<usize, FlushError>> + Send + 'static {
    let store = Arc::clone(&shared.store);
    let mut retry = Retry::new(shared, give);
    let failed_attempts = Arc::clone(&shared.stats.flush_errors);
    let retried_attempts = Arc::clone(&shared.stats.flush_retries);
    async move {
        loop {
            let outcome = match &op {
                StoreOp::Write(batch) => store.write_rows(batch).await,
                StoreOp::Sync { .. } => store.sync().await,
            };
            let error: StoreError = match outcome {
                Ok(()) => return Ok(retry.retries),
                Err(e) => e,
            };
            failed_attempts.fetch_add(1, Ordering::Relaxed);
            let what = match op {
                StoreOp::Write(_) => "store write",
                StoreOp::Sync { .. } => "store sync",
            };
            retry.pause(op.rows(), what, &error.to_string()).await?;
            retried_attempts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The retrying of one step of a cycle (a store write or sync, a round of events): the
/// backoff between attempts, and when to give up ([`Give`]).
struct Retry {
    backoff: Backoff,
    give: Give,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Attempts retried so far.
    retries: usize,
}

impl Retry {
    fn new(shared: &Shared, give: Give) -> Self {
        let cfg = &shared.config.flush;
        Self {
            backoff: Backoff::new(cfg.retry_initial_ms, cfg.retry_max_ms),
            give,
            shutdown: shared.shutdown.subscribe(),
            retries: 0,
        }
    }

    /// The time left before the deadline, if the step has one.
    fn budget(&self) -> Option<Duration> {
        match self.give {
            Give::UpOnShutdown => None,
            Give::UpAt(deadline) => {
                Some(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
        }
    }

    /// After a failed attempt of `what` (for `rows` rows): logs it (the first and every
    /// 20th time), waits the next backoff delay and returns, or says why not to try again —
    /// the deadline would pass first, or shutdown was signalled.
    async fn pause(&mut self, rows: usize, what: &str, error: &str) -> Result<(), FlushError> {
        let delay = self.backoff.next_delay();
        if self.retries.is_multiple_of(20) {
            tracing::warn!(
                rows,
                retries = self.retries,
                next_retry_ms = delay.as_millis() as u64,
                "{what} failed: {error}"
            );
        }
        self.retries += 1;
        match self.give {
            Give::UpAt(deadline) => {
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(FlushError::Deadline {
                        rows,
                        last_error: error.to_string(),
                    });
                }
                tokio::time::sleep(delay).await;
            }
            Give::UpOnShutdown => {
                if *self.shutdown.borrow() {
                    return Err(FlushError::Shutdown);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.changed() => return Err(FlushError::Shutdown),
                }
            }
        }
        Ok(())
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
/// rather than overlapping it), and the full flushes an operator asks for in between.
pub async fn flush_loop(shared: Arc<Shared>) {
    // Each loop waits for the flag itself (`wait_for`), not for a change: a loop that first
    // runs after shutdown was signalled (its runtime starved of CPU, say) subscribes to the
    // already-set flag and would never see a change.
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.flush.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let requested = tokio::select! {
            _ = tick.tick() => false,
            _ = shared.flush_requested.notified() => true,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        if *shutdown.borrow() {
            return;
        }
        if requested {
            if let Err(FlushError::Shutdown) = requested_flush(&shared).await {
                return;
            }
            continue;
        }
        match flush_cycle(&shared, Policy::KeyAware, None).await {
            Ok(_) => {}
            Err(FlushError::Shutdown) => return,
            Err(e) => tracing::error!("flush cycle failed: {e}; the next cycle retries"),
        }
    }
}

/// A full flush an operator asked for ([`crate::engine::Engine::request_flush`]): cycles of
/// [`Policy::All`] until one writes fewer than `flush.max_rows_per_cycle` rows, so when it
/// ends every key that was dirty at the request is in the store and synced. Like any cycle
/// it retries store errors until they pass; shutdown interrupts it (the final flush then
/// writes the rest). Logged, and counted when it ends.
async fn requested_flush(shared: &Arc<Shared>) -> Result<(), FlushError> {
    let started = Instant::now();
    let (mut rows, mut cycles) = (0_usize, 0_u32);
    loop {
        match flush_cycle(shared, Policy::All, None).await {
            Ok(report) => {
                rows += report.rows;
                cycles += 1;
                if report.rows < shared.config.flush.max_rows_per_cycle {
                    break;
                }
            }
            Err(FlushError::Shutdown) => return Err(FlushError::Shutdown),
            Err(e) => {
                let stats = &shared.stats;
                stats.flush_requests_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("requested full flush failed: {e}; ask again");
                return Err(e);
            }
        }
    }
    shared
        .stats
        .flush_requests_done
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        rows,
        cycles,
        ms = started.elapsed().as_millis() as u64,
        "requested full flush done: every key dirty at the request is in the store"
    );
    Ok(())
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

/// What the log guard weighs before a snapshot ([`worth_a_snapshot`]).
#[derive(Clone, Copy, Debug)]
struct LogState {
    /// Segment bytes on disk.
    on_disk: u64,
    /// `wal.snapshot_after_bytes`.
    limit: u64,
    /// What the snapshot would write: 40 bytes per dirty key.
    snapshot_bytes: u64,
    /// Bytes appended to the log over the last `flush.idle_ms + 2 × flush.interval_ms`:
    /// about what a healthy flusher keeps, since every key written longer ago than that is
    /// idle and stored by now, or rewritten since (its older records superseded).
    recent_bytes: u64,
    /// Whether flush cycles keep completing at their pace: the last one completed within
    /// three times the longer of `flush.interval_ms` and the time between the last two
    /// (capped at [`STALLED_AFTER`]): cycles of 3–8 s at 10 M viewers are healthy, a store
    /// outage completes none.
    flushing_well: bool,
}

/// Whether the log guard should snapshot. Past the limit, and only where the snapshot is
/// much smaller than the log it replaces ([`SNAPSHOT_GAIN`]) — and not while the flusher
/// keeps up and the log holds no more than twice its recent ingest: that log is the one a
/// healthy flusher keeps, it drops its oldest segments within a cycle or two by itself, and
/// it comes back to the same size a few seconds after a snapshot. At 10 M viewers (2.3 M
/// heartbeats/s, 8.6 M dirty keys) that log is 1.05–1.6 GB, across the 1.38 GB the rule
/// without this clause snapshots at: two 5-minute runs wrote 13 and 22 snapshots of 345 MB
/// (with it: 4 and 5), and every 60 s run with one inside its window had a batch p99 of
/// 161–1 650 ms, against 44–125 ms without (BENCHMARKS.md, "The 10 M tail, third look").
fn worth_a_snapshot(log: LogState) -> bool {
    log.on_disk > log.limit
        && log.on_disk >= SNAPSHOT_GAIN.saturating_mul(log.snapshot_bytes)
        && !(log.flushing_well && log.on_disk <= 2 * log.recent_bytes)
}

/// Keeps the commit log within `wal.snapshot_after_bytes`: when the segments on disk
/// exceed it, writes a snapshot of every key in memory (O(keys), not O(writes)) and drops
/// the segments it covers ([`worth_a_snapshot`] says when).
///
/// Two things take the log past the limit. The store is down or behind, so flush cycles
/// stop completing and the log would grow without bound: that is worth a warning. Or
/// ingest outpaces the cadence — at 10 M heartbeats/s a healthy flusher's two cycles in
/// flight hold more than 1 GiB of log — and the snapshot is routine compaction: said at
/// debug level, so that operators are not told the store is behind when it is not.
pub async fn log_guard_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let limit = shared.config.wal.snapshot_after_bytes;
    // Cycles stretch under load (background work runs at low priority), so "stalled"
    // means none completed for a while, not within one check.
    let stalled_after =
        Duration::from_millis(2 * shared.config.flush.interval_ms).max(STALLED_AFTER);
    let interval = Duration::from_millis(shared.config.flush.interval_ms.max(1));
    let kept_window =
        Duration::from_millis(shared.config.flush.idle_ms + 2 * shared.config.flush.interval_ms);
    let cycles = || shared.stats.flush_cycles.load(Ordering::Relaxed);
    let appended = || shared.wal.stats().appended_bytes.load(Ordering::Relaxed);
    let (mut cycles_seen, mut progressed_at) = (cycles(), Instant::now());
    // How long the last cycles took, as the guard saw them complete.
    let mut pace = interval;
    // (when, bytes appended by then), one per check, covering `kept_window`.
    let mut appended_at: VecDeque<(Instant, u64)> = VecDeque::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_GUARD_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = Instant::now();
        let appended_now = appended();
        appended_at.push_back((now, appended_now));
        while appended_at
            .get(1)
            .is_some_and(|&(at, _)| now.duration_since(at) >= kept_window)
        {
            appended_at.pop_front();
        }
        let on_disk = shared
            .wal
            .stats()
            .segment_bytes_on_disk
            .load(Ordering::Relaxed);
        let completed = cycles();
        if completed != cycles_seen {
            // At most STALLED_AFTER: a first cycle long after the start (an idle node) must
            // not make a later outage look healthy for minutes.
            pace = now.duration_since(progressed_at).min(STALLED_AFTER);
            (cycles_seen, progressed_at) = (completed, now);
        }
        let log = LogState {
            on_disk,
            limit,
            snapshot_bytes: shared.coalescer.dirty_len() as u64 * Record::ENCODED_BYTES as u64,
            recent_bytes: appended_now - appended_at.front().map_or(appended_now, |&(_, b)| b),
            flushing_well: progressed_at.elapsed() < 3 * pace.max(interval),
        };
        if !worth_a_snapshot(log) {
            continue;
        }
        let stalled = progressed_at.elapsed();
        if stalled < stalled_after {
            tracing::debug!(
                on_disk,
                limit,
                "commit log over its limit between flushes (ingest outpaces the cadence); writing a snapshot"
            );
        } else {
            tracing::warn!(
                on_disk,
                limit,
                stalled_secs = stalled.as_secs(),
                "commit log over its limit and no flush cycle completed lately (store down or behind?); writing a snapshot"
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Engine;
    use crate::model::{Key, Value};
    use crate::store::{EmbeddedStore, FaultSwitch, FaultyStore};

    /// An engine on the embedded store behind a [`FaultyStore`] whose next `failures`
    /// syncs fail.
    fn open(dir: &std::path::Path, failures: u64) -> (Engine, Arc<FaultSwitch>) {
        let mut config = Config::default();
        config.server.data_dir = dir.to_path_buf();
        config.flush.batch_rows = 10;
        config.flush.retry_initial_ms = 1;
        config.flush.retry_max_ms = 5;
        config.flush.shutdown_timeout_ms = 200;
        let store =
            FaultyStore::new(EmbeddedStore::open(&config.embedded_store_dir(), 1 << 20).unwrap());
        let switch = store.switch();
        switch.fail_next_syncs(failures);
        let (engine, _) = Engine::open(config, Arc::new(store)).unwrap();
        (engine, switch)
    }

    /// The 10 M-viewer fleet's log (BENCHMARKS.md): 8.6 M dirty keys, 2.3 M heartbeats/s
    /// of 40 bytes over `idle_ms + 2 × interval_ms` = 12 s, and a healthy flusher keeping
    /// 1.4 GB of it (1.05–1.6 GB measured), past both the 1 GiB limit and four times the
    /// 344 MB snapshot.
    const FLEET_10M: LogState = LogState {
        on_disk: 1_400_000_000,
        limit: 1 << 30,
        snapshot_bytes: 8_600_000 * 40,
        recent_bytes: 2_300_000 * 40 * 12,
        flushing_well: true,
    };

    #[test]
    fn a_healthy_flushers_log_is_not_snapshotted_but_a_stuck_one_is() {
        assert!(!worth_a_snapshot(FLEET_10M));
        // The store went down: no cycle completes, and the log grows from there.
        let stuck = LogState {
            flushing_well: false,
            ..FLEET_10M
        };
        assert!(worth_a_snapshot(stuck));
        // Cycles complete but fall behind (a capped pick, a slow store): the log outgrows
        // twice what a healthy flusher keeps.
        let behind = LogState {
            on_disk: 2 * FLEET_10M.recent_bytes + 1,
            ..FLEET_10M
        };
        assert!(worth_a_snapshot(behind));
        // Within the limit, or where the snapshot would be nearly as large as the log:
        // never, healthy or not.
        for log in [
            LogState {
                on_disk: 1 << 30,
                ..stuck
            },
            LogState {
                snapshot_bytes: 400_000_000,
                ..stuck
            },
        ] {
            assert!(!worth_a_snapshot(log), "{log:?}");
        }
    }

    fn records(n: u64) -> Vec<Record> {
        (0..n)
            .map(|t| Record::new(Key::new(7, 1, t), Value::new(10, 1_760_000_000_000 + t, 1)))
            .collect()
    }

    /// A cycle syncs the store once, after its last batch, and retries a failed sync
    /// before the log may drop what the cycle wrote.
    #[tokio::test]
    async fn a_cycle_syncs_once_after_its_batches_and_retries_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, switch) = open(dir.path(), 2);
        engine.write(&records(35)).await.unwrap();
        let report = engine.flush().await.unwrap();
        assert_eq!((report.rows, report.batches, report.retries), (35, 4, 2));
        assert_eq!(switch.write_attempts(), 4);
        assert_eq!(switch.sync_attempts(), 3);
        assert_eq!(
            switch.rows_written_before_last_sync(),
            35,
            "the sync came after every batch"
        );
        assert!(engine.shared().coalescer.is_empty());
    }

    /// The key-aware cadence, end to end on the real embedded store: a viewer who stops is
    /// in the store within the idle bound and leaves memory; a viewer who keeps playing is
    /// not written before its checkpoint, yet the commit log behind it is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_viewers_reach_the_store_soon_playing_ones_at_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        config.wal.segment_bytes = 64 << 10;
        config.flush.interval_ms = 100;
        config.flush.idle_ms = 800;
        config.flush.checkpoint_ms = 3_600_000;
        let store = Arc::new(EmbeddedStore::open(&config.embedded_store_dir(), 1 << 20).unwrap());
        let (engine, _) = Engine::open(config, Arc::clone(&store) as Arc<dyn Store>).unwrap();
        let background = engine.spawn_background().unwrap();
        let (stopped, playing) = (Key::new(1, 1, 1), Key::new(2, 1, 1));
        let at = model::now_ms();
        engine
            .write(&[Record::new(stopped, Value::new(30, at, 1))])
            .await
            .unwrap();
        // `playing` gets a heartbeat every 50 ms (with 1 000 other keys, to fill segments)
        // while `stopped` stays silent.
        let started = Instant::now();
        let mut reached = None;
        let mut position = 0;
        while started.elapsed() < Duration::from_secs(4) {
            position += 1;
            let now = model::now_ms();
            let mut batch: Vec<Record> = (0..1_000)
                .map(|a| Record::new(Key::new(1_000 + a, 1, 1), Value::new(position, now, 1)))
                .collect();
            batch.push(Record::new(playing, Value::new(position, now, 1)));
            engine.write(&batch).await.unwrap();
            if reached.is_none() && store.get(stopped).await.unwrap().is_some() {
                reached = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reached = reached.expect("the stopped viewer's position never reached the store");
        // Idle after 800 ms, picked by a cycle every 100 ms: generous slack for a busy box.
        assert!(
            reached < Duration::from_secs(3),
            "reached the store after {reached:?}"
        );
        assert_eq!(
            engine.shared().coalescer.get(&stopped),
            None,
            "stored idle key left memory"
        );
        assert_eq!(
            store.get(playing).await.unwrap(),
            None,
            "a key that keeps playing is not written before its checkpoint"
        );
        let wal = engine.shared().wal.stats();
        assert!(
            wal.segment_bytes_on_disk.load(Ordering::Relaxed) < 1 << 20,
            "segments behind the playing keys were dropped ({} bytes left)",
            wal.segment_bytes_on_disk.load(Ordering::Relaxed)
        );
        // Shutdown writes what is still dirty.
        let report = engine.shutdown(Some(background)).await;
        assert_eq!(report.left_in_log, 0);
        assert_eq!(
            store
                .get(playing)
                .await
                .unwrap()
                .map(|v| v.position_seconds),
            Some(position)
        );
    }

    /// The final flush stops at its deadline even when every cycle succeeds (a cycle is
    /// capped by `flush.max_rows_per_cycle`, so storing millions of keys takes many): the
    /// rest stays in the log and comes back at the next start.
    #[tokio::test]
    async fn the_final_flush_stops_at_its_deadline_between_successful_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        config.flush.max_rows_per_cycle = 10;
        config.flush.shutdown_timeout_ms = 1;
        let store = EmbeddedStore::open(&config.embedded_store_dir(), 1 << 20).unwrap();
        let (engine, _) = Engine::open(config.clone(), Arc::new(store)).unwrap();
        engine.write(&records(100)).await.unwrap();
        let report = engine.shutdown(None).await;
        assert!(report.flushed_rows < 100, "{report:?}");
        assert_eq!(report.left_in_log, 100 - report.flushed_rows);
        drop(engine);
        let store = EmbeddedStore::open(&config.embedded_store_dir(), 1 << 20).unwrap();
        let (reopened, _) = Engine::open(config, Arc::new(store)).unwrap();
        assert_eq!(
            reopened.shared().coalescer.dirty_len(),
            100,
            "replayed from the log"
        );
    }

    /// A flush task that panics fails its cycle — counted, the keys still dirty and in
    /// the log — and the next cycle stores them: the flusher is not stalled by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_flush_task_fails_its_cycle_and_the_next_one_stores_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, switch) = open(dir.path(), 0);
        switch.panic_next_writes(1);
        engine.write(&records(20)).await.unwrap();
        let failed = engine.flush().await;
        assert!(matches!(failed, Err(FlushError::Panicked(_))), "{failed:?}");
        assert_eq!(
            engine.shared().stats.flush_panics.load(Ordering::Relaxed),
            1
        );
        assert_eq!(
            engine.shared().coalescer.dirty_len(),
            20,
            "nothing was lost from memory"
        );
        let report = engine.flush().await.unwrap();
        assert_eq!(report.rows, 20);
        assert_eq!(engine.shared().coalescer.dirty_len(), 0);
        assert_eq!(engine.shutdown(None).await.left_in_log, 0);
    }

    /// When the sync never succeeds before the final flush's deadline, nothing leaves the
    /// commit log: the next start replays every record.
    #[tokio::test]
    async fn a_sync_that_never_succeeds_keeps_every_record_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, switch) = open(dir.path(), u64::MAX);
        engine.write(&records(35)).await.unwrap();
        let report = engine.shutdown(None).await;
        assert_eq!(report.left_in_log, 35, "the failed cycle's keys went back");
        assert!(switch.sync_attempts() > 0);
        drop((engine, switch));
        let (reopened, _) = open(dir.path(), 0);
        assert_eq!(reopened.shared().coalescer.len(), 35);
    }
}
