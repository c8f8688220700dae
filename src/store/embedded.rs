//! The embedded store: one fjall LSM keyspace on local disk, the single-machine default.
//!
//! Row layout: key = [`Key::to_bytes`] (24 bytes, big-endian, so one profile's titles are
//! one contiguous key range and listing is a prefix scan); value = [`Value::to_bytes`]
//! (16 bytes), followed, in a row that has one, by its alternative's [`Value::to_bytes`]
//! (16 more: [`encode_row`]). The length is the row's format version: 16 bytes is a plain
//! row — every row written before alternatives existed — and 32 one with an alternative,
//! so old rows read unchanged. Tombstones are ordinary rows with the tombstone marker, so
//! they take part in last-write-wins like any value and are removed only by retention.
//!
//! The read-compare-write below also merges alternatives exactly
//! ([`crate::resume::alternative::merge`] of the stored row and the written one): a key
//! that left memory still gets its alternative when another device writes it next.
//!
//! Last-write-wins needs read-compare-write. fjall has no conditional write (and no merge
//! operator), so every write batch runs under one writer mutex: read the current rows, keep
//! each incoming value only if it supersedes its row, commit the batch to fjall's journal
//! without an fsync. Readers never take the mutex (they read fjall's snapshot-consistent
//! state). [`Store::sync`] fsyncs the journal once per flush cycle: a cycle of 1 M rows is
//! 123 batches, and an fsync per batch cost each one a journal commit of the filesystem
//! that the commit log's own fsync then queued behind (BENCHMARKS.md).
//!
//! Reading the current rows: the batch is sorted by key and read in runs of
//! [`MERGE_RUN_ROWS`]. A run first tries a *merge-join*: one range iterator over
//! `first..=last` of the run, walked alongside the run's keys. That is right when the run is
//! dense in the store's key space (the flusher sends key-ordered batches, see
//! [`Store::prefers_key_ordered_batches`]): a row costs one iterator step instead of a point
//! read's memtable skiplist search and one bloom filter probe per table. When the range
//! holds far more rows than the run (a sparse batch over a large store), the walk stops
//! after [`MERGE_EXTRA_ROWS_PER_KEY`] foreign rows per key and the rest of the run falls
//! back to point reads, so the detour costs a bounded fraction of a run's point reads.
//! Napkin math (BENCHMARKS.md): a point read ~2–3 µs on this VM, an iterator step ~0.1 µs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::{MostRecent, RecentTitles, Store, StoreError, StoredRow, TitleEntry, WriteHealth};
use crate::model::{Key, Record, Value};
use crate::resume::alternative::{self, Summary};

/// Bytes of a row without an alternative (the format before alternatives).
pub const PLAIN_ROW_BYTES: usize = Value::ENCODED_BYTES;
/// Bytes of a row with an alternative.
pub const ROW_WITH_ALTERNATIVE_BYTES: usize = 2 * Value::ENCODED_BYTES;

/// A row's stored bytes: the value, then the alternative when there is one.
pub fn encode_row(summary: &Summary) -> Vec<u8> {
    let mut out = Vec::with_capacity(ROW_WITH_ALTERNATIVE_BYTES);
    out.extend_from_slice(&summary.value.to_bytes());
    if let Some(alternative) = summary.alternative {
        out.extend_from_slice(&alternative.to_bytes());
    }
    out
}

/// Inverse of [`encode_row`] for either format; `None` for any other length.
pub fn decode_row(bytes: &[u8]) -> Option<Summary> {
    match bytes.len() {
        PLAIN_ROW_BYTES => Some(Summary::single(Value::from_bytes(bytes)?)),
        ROW_WITH_ALTERNATIVE_BYTES => Some(Summary {
            value: Value::from_bytes(&bytes[..PLAIN_ROW_BYTES])?,
            alternative: Some(Value::from_bytes(&bytes[PLAIN_ROW_BYTES..])?),
        }),
        _ => None,
    }
}

/// The value of a row of either format.
fn decode_value(bytes: &[u8]) -> Option<Value> {
    decode_row(bytes).map(|s| s.value)
}
use crate::telemetry::metrics::{counters, gauge, DescriptorEncoder, Encoded};

/// The embedded fjall store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedStoreConfig {
    /// Directory of the LSM tree; empty means `<data_dir>/store`.
    pub dir: PathBuf,
    /// Block cache size.
    pub cache_bytes: u64,
}

impl Default for EmbeddedStoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            cache_bytes: 64 << 20,
        }
    }
}

/// Rows examined per purge step; the writer mutex is held for one step at a time so a purge
/// of a large store never stalls flushes for long.
const PURGE_CHUNK_ROWS: usize = 4096;

/// Keys per merge-join attempt: one range iterator is opened per run, and a run that turns
/// out sparse falls back to point reads on its own, so dense and sparse parts of one batch
/// each get the cheaper read.
const MERGE_RUN_ROWS: usize = 512;

/// Rows in a run's range that are *not* in the batch, per batch key, before the merge-join
/// gives up on the run. An iterator step costs a few percent of a point read, so at 4 the
/// wasted walk of a sparse run stays well below the point reads it then does anyway.
const MERGE_EXTRA_ROWS_PER_KEY: usize = 4;

/// Memtable size. Every write reads its key first (last-write-wins), and a point read of a
/// key missing from a large memtable walks a long skiplist; sealed memtables become
/// bloom-filtered tables quickly. Measured in benches/flush.rs (BENCHMARKS.md).
const MEMTABLE_BYTES: u64 = 4 << 20;

/// fjall background workers: one. With two, fjall 3.1.13's worker 0 never compacts; it puts
/// every `Compact` message it receives back on the queue ("let one worker prioritize
/// flushing", `worker_pool.rs`), and it spins doing so for as long as the other worker is
/// compacting. Under `max` that spin was 28 % of fjall's CPU (BENCHMARKS.md). With one
/// worker, flushes and compactions simply take turns. Measured A/B, `max`, six pairs: 5.69
/// M heartbeats/s on average against 5.31 M/s with two (ahead in 5 of 6), fjall's CPU
/// 4.9–5.6 s against 6.6–9.2 s per 15 s run.
///
/// One worker is only safe because fjall never rotates the memtable by itself here (see
/// [`NEVER_BY_SIZE`]). fjall asks for a rotation on *every* write past the memtable limit
/// (`try_send`, so the queue of 1 000 fills up while the worker is busy compacting), and
/// the lone worker then blocks sending a `Flush` to its own full queue (fjall-rs/fjall PR
/// #323). We rotate instead, from the writer, after a commit ([`Fjall::rotate_if_full`]),
/// so the queue only ever holds a few messages: one `Flush` per rotation, one `Compact`
/// per flush, and writes halt at 4 sealed memtables, which bounds the rotations that can
/// wait.
const FJALL_WORKERS: usize = 1;

/// fjall's own memtable limit, set so high that fjall never asks for a rotation itself:
/// the writer rotates at [`MEMTABLE_BYTES`] instead (see [`FJALL_WORKERS`]).
const NEVER_BY_SIZE: u64 = 1 << 40;

/// Level-0 tables gathered before they are compacted into level 1 (fjall's default: 4).
/// Every flush rewrites each dirty key, so under heavy ingest the whole data set is
/// rewritten every few seconds and compaction takes a large share of the CPU; gathering
/// more small tables per compaction rewrites level 1 less often. `max` with 1 M keys,
/// alternated in one run: 3.26–3.53 M heartbeats/s at 12 vs 2.50–2.68 M/s at 4, reads
/// unchanged (BENCHMARKS.md). fjall stalls writes at 20 level-0 tables; 12 leaves room.
const L0_THRESHOLD: u8 = 12;

/// How a write batch reads the rows it compares against. Only tests and benches choose;
/// the server always runs [`LwwReads::Adaptive`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LwwReads {
    /// Merge-join each run of the sorted batch, falling back to point reads for runs whose
    /// key range holds far more stored rows than the run.
    #[default]
    Adaptive,
    /// Merge-join every run, however sparse (no fallback): lets tests check the merge-join
    /// on its own.
    MergeJoin,
    /// One point read per row: the path before merge-joins, kept as the reference the
    /// others must agree with and as the A/B peer in `benches/flush.rs`.
    Point,
}

/// Rows applied since the last successful sync that the store keeps to apply again after a
/// reopen (see [`Writer::unsynced`]): 16 M rows, 1 GiB at 64 bytes a row, the shipped
/// `coalescer.max_keys`, so a flush cycle (at most every key in memory, synced once) always
/// fits. Past it the rows are dropped, and a reopen that would need them refuses to sync
/// (the commit log still holds them; a restart replays it).
const UNSYNCED_MAX_ROWS: usize = 16 << 20;

/// Point reads and listings in flight on the blocking pool at once. A read that blocks (a
/// stalled disk) holds a blocking thread until it returns, whatever the caller's timeout;
/// the bound keeps such reads from taking every thread of tokio's pool (512), which the
/// flush writes need too. Readers past it wait for a slot within their read budget.
const MAX_READS_IN_FLIGHT: usize = 64;

/// How long a reopen waits for readers still holding the failed database to finish (each
/// holds it for one read) before it tries to open anyway; an open that finds the database
/// still locked fails, and the next write or sync tries again.
const REOPEN_DRAIN: Duration = Duration::from_secs(2);

/// Cheap-to-clone handle on the fjall database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// One open fjall database and its keyspace. Replaced as a whole when the store reopens
/// after a failed write ([`Inner::reopen`]); each read holds an `Arc` of it for one read.
struct Fjall {
    db: Database,
    positions: Keyspace,
}

struct Inner {
    dir: PathBuf,
    cache_bytes: u64,
    /// The open database; `None` while a reopen is under way or after one failed (reads
    /// then fail fast and degrade; the next write or sync tries again).
    fjall: RwLock<Option<Arc<Fjall>>>,
    /// Serialises read-compare-commit so two concurrent batches (or a batch and a purge)
    /// cannot both read an old row and the older value land last, and guards the write
    /// side's recovery state. A parking_lot mutex, not a tokio one: it is only taken inside
    /// `spawn_blocking`, never across an `.await`.
    writer: Mutex<Writer>,
    reads: LwwReads,
    /// Bounds reads on the blocking pool ([`MAX_READS_IN_FLIGHT`]).
    read_slots: Arc<tokio::sync::Semaphore>,
    /// Fault injection ([`EmbeddedStore::set_read_stall_ms`]): every read first sleeps this
    /// long on its thread. 0 (one relaxed load per read) unless a test sets it.
    read_stall_ms: AtomicU64,
    /// `server.background_nice` for fjall's workers, applied again to the workers a reopen
    /// starts ([`EmbeddedStore::lower_worker_priority`]).
    worker_nice: AtomicU64,
    health: WriteHealth,
    reopens_ok: AtomicU64,
    reopens_failed: AtomicU64,
    /// Rows in [`Writer::unsynced`], readable without the writer lock for `/metrics`.
    unsynced_rows: AtomicU64,
}

/// The write side's state, under [`Inner::writer`].
#[derive(Default)]
struct Writer {
    /// A write failed: fjall poisons its database on a failed journal write or fsync (and
    /// when its flush worker fails, e.g. on a full disk), and refuses every later write
    /// until it is reopened. The next write or sync reopens it first.
    needs_reopen: bool,
    /// Every batch applied since the last successful sync, in order. fjall commits batches
    /// to its journal without an fsync, so a database that fails and is reopened may come
    /// back without them while their `write_batch` already returned `Ok`: the flusher then
    /// only retries the *sync*, and must not be told they are durable. A reopen applies
    /// them again (last-write-wins makes that idempotent). Freed by every successful sync:
    /// it holds at most one flush cycle's rows, which the flusher holds in memory anyway.
    unsynced: Vec<Vec<StoredRow>>,
    unsynced_rows: usize,
    /// More than [`UNSYNCED_MAX_ROWS`] were applied without a sync and `unsynced` was
    /// dropped: a reopen can no longer restore them, so syncs fail until a restart.
    unsynced_dropped: bool,
}

fn io_error(context: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{context}: {error}"))
}

impl Fjall {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(&format!("creating {}", dir.display()), e))?;
        let db = Database::builder(dir)
            .worker_threads(FJALL_WORKERS)
            .cache_size(cache_bytes)
            .open()
            .map_err(|e| io_error(&format!("opening fjall database {}", dir.display()), e))?;
        let positions = db
            .keyspace("positions", || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(NEVER_BY_SIZE)
                    .compaction_strategy(Arc::new(
                        fjall::compaction::Leveled::default().with_l0_threshold(L0_THRESHOLD),
                    ))
            })
            .map_err(|e| io_error("opening keyspace `positions`", e))?;
        Ok(Self { db, positions })
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `dir` with a block cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_reads(dir, cache_bytes, LwwReads::default())
    }

    /// Opens the store like [`EmbeddedStore::open`] with a chosen read strategy, for tests
    /// and benches that compare strategies.
    pub fn open_with_reads(
        dir: &Path,
        cache_bytes: u64,
        reads: LwwReads,
    ) -> Result<Self, StoreError> {
        let fjall = Fjall::open(dir, cache_bytes)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                cache_bytes,
                fjall: RwLock::new(Some(Arc::new(fjall))),
                writer: Mutex::new(Writer::default()),
                reads,
                read_slots: Arc::new(tokio::sync::Semaphore::new(MAX_READS_IN_FLIGHT)),
                read_stall_ms: AtomicU64::new(0),
                worker_nice: AtomicU64::new(0),
                health: WriteHealth::default(),
                reopens_ok: AtomicU64::new(0),
                reopens_failed: AtomicU64::new(0),
                unsynced_rows: AtomicU64::new(0),
            }),
        })
    }

    /// Lowers fjall's worker threads by `by` nice levels (`server.background_nice`, see
    /// [`crate::telemetry::priority`]), now and after every reopen, which starts new workers.
    pub fn lower_worker_priority(&self, by: i32) {
        self.inner
            .worker_nice
            .store(by.max(0) as u64, Ordering::Relaxed);
        self.inner.lower_workers();
    }

    /// Fault injection for tests: makes every read (point read or listing) block its thread
    /// for `ms` before it reads, as a read that waits on a slow or failing disk does
    /// (`std::thread::sleep`, not an async sleep). 0 turns it off.
    pub fn set_read_stall_ms(&self, ms: u64) {
        self.inner.read_stall_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes the store occupies on disk (tables and journal); 0 while it is reopening.
    pub fn disk_bytes(&self) -> u64 {
        self.inner
            .handles()
            .map_or(0, |f| f.db.disk_space().unwrap_or(0))
    }

    /// Times the store reopened its database after a failed write: (succeeded, failed).
    pub fn reopens(&self) -> (u64, u64) {
        (
            self.inner.reopens_ok.load(Ordering::Relaxed),
            self.inner.reopens_failed.load(Ordering::Relaxed),
        )
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| io_error("store task", e))?
    }

    /// Runs a read on the blocking pool, so a read that blocks (a cache miss on a stalled
    /// disk) holds a pool thread, never the runtime worker, and the caller's timeout fires.
    /// The slot is moved into the closure: a caller that gives up does not free it while
    /// the read still runs.
    async fn blocking_read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = Arc::clone(&self.inner.read_slots)
            .acquire_owned()
            .await
            .map_err(|e| io_error("read slots", e))?;
        self.blocking(move |inner| {
            let _slot = slot;
            inner.stall_if_asked();
            work(inner)
        })
        .await
    }
}

impl Inner {
    /// The open database, or `Unavailable` while it is being reopened.
    fn handles(&self) -> Result<Arc<Fjall>, StoreError> {
        self.fjall.read().clone().ok_or_else(|| {
            StoreError::Unavailable(
                "the embedded store is reopening its database after a failed write".into(),
            )
        })
    }

    fn stall_if_asked(&self) {
        let ms = self.read_stall_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    fn lower_workers(&self) {
        let by = self.worker_nice.load(Ordering::Relaxed) as i32;
        crate::telemetry::priority::lower_threads_named("fjall:worker", by);
    }

    /// Applies `records` (sorted by key, distinct keys) with last-write-wins, reopening the
    /// database first if an earlier write failed; remembers them until the next sync.
    fn write(&self, records: Vec<StoredRow>) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        self.reopen_if_needed(&mut writer)?;
        let fjall = self.handles()?;
        let applied = fjall.write(&records, self.reads);
        match &applied {
            Ok(()) => writer.remember(records, &self.unsynced_rows),
            Err(_) => writer.needs_reopen = true,
        }
        applied
    }

    /// Makes every applied batch durable (fsyncs fjall's journal), reopening the database
    /// first (and applying the unsynced batches again) if a write or sync failed.
    fn sync(&self) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        self.reopen_if_needed(&mut writer)?;
        let fjall = self.handles()?;
        match fjall.db.persist(PersistMode::SyncData) {
            Ok(()) => {
                writer.forget_unsynced(&self.unsynced_rows);
                Ok(())
            }
            Err(e) => {
                writer.needs_reopen = true;
                Err(io_error("syncing the journal", e))
            }
        }
    }

    fn reopen_if_needed(&self, writer: &mut Writer) -> Result<(), StoreError> {
        if !writer.needs_reopen {
            return Ok(());
        }
        if writer.unsynced_dropped {
            return Err(StoreError::Unavailable(format!(
                "the embedded store failed with more than {UNSYNCED_MAX_ROWS} rows applied \
                 since its last sync; it cannot restore them by reopening: restart Playhead \
                 (the commit log holds them)"
            )));
        }
        let outcome = self.reopen(writer);
        let counter = match outcome {
            Ok(()) => &self.reopens_ok,
            Err(_) => &self.reopens_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    /// Closes the failed database and opens it again from disk: fjall recovers from its
    /// tables and journal, up to the last batch it wrote in full. Then applies every batch
    /// since the last sync again, since the journal's unsynced tail may not have survived.
    /// Called with the writer lock held; on failure the store stays closed (reads fail fast)
    /// and the next write or sync tries again, after the flusher's backoff.
    fn reopen(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let failed = self.fjall.write().take();
        if let Some(failed) = failed {
            drain_and_close(failed);
        }
        let fjall = Fjall::open(&self.dir, self.cache_bytes)
            .map_err(|e| StoreError::Unavailable(format!("reopening after a failure: {e}")))?;
        for batch in &writer.unsynced {
            fjall.write(batch, self.reads)?;
        }
        self.lower_workers();
        tracing::warn!(
            dir = %self.dir.display(),
            replayed_rows = writer.unsynced_rows,
            "the embedded store reopened its database after a failed write"
        );
        *self.fjall.write() = Some(Arc::new(fjall));
        writer.needs_reopen = false;
        Ok(())
    }

    /// Removes rows older than `cutoff_ms`, one chunk at a time. Candidates are found
    /// without the writer mutex, then re-checked under it: a row rewritten since the scan is
    /// newer than the cutoff and stays.
    fn purge(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0u64;
        let mut resume_after: Option<Vec<u8>> = None;
        loop {
            // The scan's handle is dropped before the writer lock: a reopen under the lock
            // waits for every handle on the failed database.
            let (candidates, scanned, last_key) = self
                .handles()?
                .purge_candidates(resume_after.as_deref(), cutoff_ms)?;
            if !candidates.is_empty() {
                let mut writer = self.writer.lock();
                self.reopen_if_needed(&mut writer)?;
                let fjall = self.handles()?;
                match fjall.purge_chunk(candidates, cutoff_ms) {
                    Ok(n) => removed += n,
                    Err(e) => {
                        writer.needs_reopen = true;
                        return Err(e);
                    }
                }
            }
            if scanned < PURGE_CHUNK_ROWS {
                return Ok(removed);
            }
            resume_after = last_key.map(|k| k.to_vec());
        }
    }
}

/// Drops the last handle on a failed database, waiting up to [`REOPEN_DRAIN`] for readers
/// that still hold it. Dropping it stops fjall's workers and releases its lock file.
fn drain_and_close(mut failed: Arc<Fjall>) {
    let deadline = Instant::now() + REOPEN_DRAIN;
    loop {
        match Arc::try_unwrap(failed) {
            Ok(fjall) => {
                drop(fjall);
                return;
            }
            Err(still_shared) if Instant::now() < deadline => {
                failed = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
}

impl Writer {
    fn remember(&mut self, records: Vec<StoredRow>, gauge: &AtomicU64) {
        if self.unsynced_dropped {
            return;
        }
        self.unsynced_rows += records.len();
        if self.unsynced_rows > UNSYNCED_MAX_ROWS {
            tracing::warn!(
                rows = self.unsynced_rows,
                "more rows applied since the last sync than the store keeps for a reopen"
            );
            self.unsynced = Vec::new();
            self.unsynced_rows = 0;
            self.unsynced_dropped = true;
        } else {
            self.unsynced.push(records);
        }
        gauge.store(self.unsynced_rows as u64, Ordering::Relaxed);
    }

    fn forget_unsynced(&mut self, gauge: &AtomicU64) {
        self.unsynced = Vec::new();
        self.unsynced_rows = 0;
        self.unsynced_dropped = false;
        gauge.store(0, Ordering::Relaxed);
    }
}

impl Fjall {
    fn read(&self, key: &Key) -> Result<Option<Value>, StoreError> {
        Ok(self.read_row(key)?.map(|s| s.value))
    }

    fn read_row(&self, key: &Key) -> Result<Option<Summary>, StoreError> {
        let Some(bytes) = self
            .positions
            .get(key.to_bytes())
            .map_err(|e| io_error("reading a row", e))?
        else {
            return Ok(None);
        };
        decode_row(&bytes).map(Some).ok_or(StoreError::Corrupt {
            key: Some(*key),
            detail: format!(
                "row is {} bytes, expected {PLAIN_ROW_BYTES} or {ROW_WITH_ALTERNATIVE_BYTES}",
                bytes.len(),
            ),
        })
    }

    /// Writes `records` (sorted by key, distinct keys) with last-write-wins. The caller
    /// holds the writer lock.
    fn write(&self, records: &[StoredRow], reads: LwwReads) -> Result<(), StoreError> {
        debug_assert!(records.windows(2).all(|w| w[0].key < w[1].key));
        // No fsync here: `sync` makes the cycle's batches durable at once. A journal sealed
        // meanwhile (the memtable rotated) was fsynced by fjall when it was sealed.
        let mut batch = self.db.batch().durability(None);
        for run in records.chunks(MERGE_RUN_ROWS) {
            let merged = match reads {
                LwwReads::Point => 0,
                LwwReads::Adaptive => {
                    self.merge_run(run, MERGE_EXTRA_ROWS_PER_KEY * run.len(), &mut batch)?
                }
                LwwReads::MergeJoin => self.merge_run(run, usize::MAX, &mut batch)?,
            };
            for record in &run[merged..] {
                let current = match self.read_row(&record.key) {
                    Ok(current) => current,
                    // A malformed row carries no version to respect; a valid value replaces it.
                    Err(StoreError::Corrupt { .. }) => None,
                    Err(e) => return Err(e),
                };
                self.stage(record, current.as_ref(), &mut batch);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        batch
            .commit()
            .map_err(|e| io_error("committing a batch", e))?;
        self.rotate_if_full()
    }

    /// Seals the active memtable once it holds [`MEMTABLE_BYTES`], so fjall's worker flushes
    /// it to a table; called with the writer lock held, after each commit. fjall does this
    /// itself by default, but not safely with one worker (see [`FJALL_WORKERS`]).
    ///
    /// fjall only reports the bytes of all unflushed memtables, sealed ones included, so
    /// the active one counts as full when that total exceeds a full memtable per sealed one
    /// plus one more. `Database::write_buffer_size` and `Keyspace::rotate_memtable` are
    /// public but `#[doc(hidden)]` in fjall 3.1.13 (pinned in Cargo.lock): an upgrade must
    /// check them, and `one_worker_seals_flushes_and_compacts_many_memtables` fails if the
    /// memtable stops being sealed.
    fn rotate_if_full(&self) -> Result<(), StoreError> {
        let sealed = self.positions.sealed_memtable_count() as u64;
        if self.db.write_buffer_size() > MEMTABLE_BYTES * (1 + sealed) {
            self.positions
                .rotate_memtable()
                .map_err(|e| io_error("sealing the memtable", e))?;
        }
        Ok(())
    }

    /// Stages `record` merged with `current` into `batch` when that changes the row: its
    /// value supersedes the stored one, or it tells of a newer alternative.
    fn stage(
        &self,
        record: &StoredRow,
        current: Option<&Summary>,
        batch: &mut fjall::OwnedWriteBatch,
    ) {
        let merged = match current {
            Some(current) => alternative::merge(*current, record.summary()),
            None => record.summary(),
        };
        if current != Some(&merged) {
            batch.insert(&self.positions, record.key.to_bytes(), encode_row(&merged));
        }
    }

    /// Merge-joins a sorted run against one range iterator over its key range and stages
    /// the winners. Stops early once the range has yielded more than `max_extra_rows` rows
    /// that are not in the run; returns how many records of the run it resolved (the rest
    /// need point reads).
    fn merge_run(
        &self,
        run: &[StoredRow],
        max_extra_rows: usize,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<usize, StoreError> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(0);
        };
        let mut rows = self
            .positions
            .range(first.key.to_bytes()..=last.key.to_bytes());
        // The next stored row not yet passed: at or after the current record's key.
        let mut row: Option<fjall::KvPair> = None;
        let mut rows_done = false;
        let mut extra_rows = 0usize;
        for (resolved, record) in run.iter().enumerate() {
            let key = record.key.to_bytes();
            loop {
                if row.is_none() && !rows_done {
                    match rows.next() {
                        Some(guard) => {
                            let pair = guard
                                .into_inner()
                                .map_err(|e| io_error("merge-reading rows", e))?;
                            row = Some(pair);
                        }
                        None => rows_done = true,
                    }
                }
                match &row {
                    Some((row_key, _)) if row_key.as_ref() < key.as_slice() => {
                        // A stored row between this run's keys: not ours to compare.
                        extra_rows += 1;
                        if extra_rows > max_extra_rows {
                            return Ok(resolved);
                        }
                        row = None;
                    }
                    _ => break,
                }
            }
            let current = row
                .take_if(|(row_key, _)| row_key.as_ref() == key.as_slice())
                // A malformed row carries no version to respect; a valid value replaces it.
                .and_then(|(_, value)| decode_row(&value));
            self.stage(record, current.as_ref(), batch);
        }
        Ok(run.len())
    }

    /// Reads every row of the profile under `prefix` and keeps the `limit` most recent.
    fn recent(&self, prefix: [u8; 16], limit: usize) -> Result<RecentTitles, StoreError> {
        let mut recent = MostRecent::new(limit);
        for guard in self.positions.prefix(prefix) {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| io_error("listing a profile", e))?;
            let key = Key::from_bytes(&key).ok_or_else(|| StoreError::Corrupt {
                key: None,
                detail: format!(
                    "key is {} bytes, expected {}",
                    key.len(),
                    Key::ENCODED_BYTES
                ),
            })?;
            let Some(value) = decode_value(&value) else {
                // Skip one malformed row rather than hide the whole profile.
                tracing::warn!(?key, "skipping a malformed row in the embedded store");
                continue;
            };
            recent.offer(TitleEntry {
                title_id: key.title_id,
                value,
            });
        }
        Ok(recent.finish())
    }

    /// One purge step's scan, without the writer lock: up to [`PURGE_CHUNK_ROWS`] rows after
    /// `after`; returns the keys older than the cutoff, the rows scanned and the last key.
    #[allow(clippy::type_complexity)]
    fn purge_candidates(
        &self,
        after: Option<&[u8]>,
        cutoff_ms: u64,
    ) -> Result<(Vec<fjall::UserKey>, usize, Option<fjall::UserKey>), StoreError> {
        let mut candidates = Vec::with_capacity(PURGE_CHUNK_ROWS);
        let mut scanned = 0usize;
        let mut last_key = None;
        let iter = match after {
            Some(after) => self
                .positions
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.positions.iter(),
        };
        for guard in iter {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| io_error("scanning for retention", e))?;
            scanned += 1;
            if decode_value(&value).is_none_or(|v| v.updated_at_ms < cutoff_ms) {
                candidates.push(key.clone());
            }
            last_key = Some(key);
            if scanned >= PURGE_CHUNK_ROWS {
                break;
            }
        }
        Ok((candidates, scanned, last_key))
    }

    /// Removes the candidates still older than the cutoff, durably; the caller holds the
    /// writer lock. Returns how many it removed.
    fn purge_chunk(
        &self,
        candidates: Vec<fjall::UserKey>,
        cutoff_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut removed = 0u64;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for key in candidates {
            let still_old = match self.positions.get(&key) {
                Ok(Some(v)) => decode_value(&v).is_none_or(|v| v.updated_at_ms < cutoff_ms),
                Ok(None) => false,
                Err(e) => return Err(io_error("re-reading a purge candidate", e)),
            };
            if still_old {
                batch.remove(&self.positions, key);
                removed += 1;
            }
        }
        if !batch.is_empty() {
            batch
                .commit()
                .map_err(|e| io_error("committing a purge", e))?;
            self.rotate_if_full()?;
        }
        Ok(removed)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    /// Key-ordered batches are contiguous ranges, dense enough for merge-joins; the point
    /// read path is left as it was measured (batches in the coalescer's hash order).
    fn prefers_key_ordered_batches(&self) -> bool {
        self.inner.reads != LwwReads::Point
    }

    async fn write_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        let rows: Vec<StoredRow> = records.iter().copied().map(StoredRow::plain).collect();
        self.write_rows(&rows).await
    }

    /// Merges each row's alternative with the stored one exactly (module docs).
    async fn write_rows(&self, records: &[StoredRow]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut records = records.to_vec();
        // Key order: merge-joins need it, and consecutive point reads share search paths.
        // Already-sorted input (the flusher's batches) is recognised in one pass.
        records.sort_unstable_by_key(|r| r.key);
        let written = self.blocking(move |inner| inner.write(records)).await;
        self.inner.health.record_write(&written);
        written
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let synced = self.blocking(|inner| inner.sync()).await;
        self.inner.health.record_sync(&synced);
        synced
    }

    /// Runs on the blocking pool ([`EmbeddedStore::blocking_read`]): a point read is almost
    /// always a memtable or block-cache hit, but one that misses waits on the disk, and on
    /// the runtime worker that would stall every task on it and outlast the read budget.
    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError> {
        self.blocking_read(move |inner| inner.handles()?.read(&key))
            .await
    }

    async fn get_row(&self, key: Key) -> Result<Option<StoredRow>, StoreError> {
        let row = self
            .blocking_read(move |inner| inner.handles()?.read_row(&key))
            .await?;
        Ok(row.map(|s| StoredRow {
            key,
            value: s.value,
            alternative: s.alternative,
        }))
    }

    async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<RecentTitles, StoreError> {
        let prefix = Key::profile_prefix(account_id, profile_id);
        self.blocking_read(move |inner| inner.handles()?.recent(prefix, limit))
            .await
    }

    async fn purge_older_than(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        self.blocking(move |inner| inner.purge(cutoff_ms)).await
    }

    fn write_health(&self) -> Option<&WriteHealth> {
        Some(&self.inner.health)
    }

    fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        let (ok, failed) = self.reopens();
        counters(
            e,
            "playhead_embedded_reopens_total",
            "Times the embedded store reopened its database after a failed write, by outcome.",
            [([("outcome", "ok")], ok), ([("outcome", "failed")], failed)],
        )?;
        gauge(
            e,
            "playhead_embedded_unsynced_rows",
            "Rows applied since the last journal sync, kept to apply again after a reopen.",
            self.inner.unsynced_rows.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Both row formats read: a 16-byte row (every row before alternatives, and every row
    /// without one) and a 32-byte row with its alternative; other lengths are malformed.
    #[test]
    fn rows_of_either_format_decode() {
        let value = Value::new(8, 9_000, 2);
        let phone = Value::new(2_843, 1_000, 1);
        let plain = encode_row(&Summary::single(value));
        assert_eq!(
            plain,
            value.to_bytes().to_vec(),
            "the format before alternatives"
        );
        assert_eq!(decode_row(&plain), Some(Summary::single(value)));
        let with = encode_row(&Summary {
            value,
            alternative: Some(phone),
        });
        assert_eq!(with.len(), ROW_WITH_ALTERNATIVE_BYTES);
        assert_eq!(decode_row(&with).unwrap().alternative, Some(phone));
        assert_eq!(decode_row(&with[..20]), None);
    }

    /// The store's merge: the phone's stored row was superseded by a TV row that carries
    /// no alternative (memory never saw the phone): the stored phone value becomes the
    /// row's alternative, in both read paths.
    #[tokio::test]
    async fn a_row_of_another_device_keeps_the_stored_value_as_its_alternative() {
        for reads in [LwwReads::Point, LwwReads::MergeJoin] {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open_with_reads(dir.path(), 1 << 20, reads).unwrap();
            let key = Key::new(1, 1, 1);
            let phone = Value::new(2_843, 1_000, 1);
            store.write_batch(&[Record::new(key, phone)]).await.unwrap();
            let tv = Value::new(8, 9_000, 2);
            store.write_batch(&[Record::new(key, tv)]).await.unwrap();
            let row = store.get_row(key).await.unwrap().unwrap();
            assert_eq!((row.value, row.alternative), (tv, Some(phone)), "{reads:?}");
            // The TV's own next heartbeat keeps it; a stale phone write changes nothing.
            let tv_12 = Value::new(12, 13_000, 2);
            store.write_batch(&[Record::new(key, tv_12)]).await.unwrap();
            store.write_batch(&[Record::new(key, phone)]).await.unwrap();
            let row = store.get_row(key).await.unwrap().unwrap();
            assert_eq!(
                (row.value, row.alternative),
                (tv_12, Some(phone)),
                "{reads:?}"
            );
        }
    }

    /// One fjall worker with the writer sealing memtables ([`FJALL_WORKERS`]): writes worth
    /// many memtables (~960 k rows: 18 tables, level 0 compacted away when this was
    /// written) are sealed, flushed into tables and read back. Without
    /// [`Fjall::rotate_if_full`] nothing is ever sealed and it fails. It waits a bounded
    /// time for the writes and the flushes, so a stuck worker fails it rather than hanging
    /// it; it does not provoke fjall's self-deadlock, which needs a flood of rotation
    /// requests during a long compaction (with fjall's own rotation it passes too).
    #[test]
    fn one_worker_seals_flushes_and_compacts_many_memtables() {
        const BATCHES: u64 = 48;
        const ROWS: u64 = 20_000;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 1 << 20).unwrap();
        let writer = store.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for batch in 0..BATCHES {
                // Sorted by key: the account is the batch, the title ascends.
                let records: Vec<Record> = (0..ROWS)
                    .map(|t| Record::new(Key::new(batch, 1, t), Value::new(t as u32, 1_000 + t, 1)))
                    .collect();
                writer
                    .inner
                    .write(records.into_iter().map(StoredRow::plain).collect())
                    .unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(600))
            .expect("the writes did not finish: is fjall's worker stuck?");
        let inner = store.inner.handles().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while inner.positions.sealed_memtable_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "sealed memtables were never flushed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let tables = inner.positions.table_count();
        assert!(tables > 1, "{tables} tables: the memtable was never sealed");
        for batch in [0, BATCHES / 2, BATCHES - 1] {
            for t in [0, ROWS / 3, ROWS - 1] {
                let value = inner.read(&Key::new(batch, 1, t)).unwrap();
                assert_eq!(value, Some(Value::new(t as u32, 1_000 + t, 1)));
            }
        }
    }
}

/// Fault injection against a real filesystem: the store on a small tmpfs that a filler file
/// fills up. Mounting needs root (or CAP_SYS_ADMIN); elsewhere the test says why it skips.
#[cfg(test)]
mod disk_full {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use super::EmbeddedStore;
    use crate::model::{Key, Record, Value};
    use crate::store::Store;

    /// A tmpfs of a fixed size mounted on a fresh temporary directory, unmounted on drop.
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn mount(size_mib: u64) -> Result<Self, String> {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
                .arg(dir.path())
                .output()
                .map_err(|e| format!("cannot run mount: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`mount -t tmpfs` failed (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(Self { dir })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes a filler file until the filesystem is full; returns its path.
        fn fill(&self) -> PathBuf {
            let path = self.path().join("filler.bin");
            let mut file = std::fs::File::create(&path).unwrap();
            let chunk = vec![0xA5u8; 64 << 10];
            while file.write_all(&chunk).is_ok() {}
            // The last bytes, a page at a time.
            while file.write_all(&chunk[..4096]).is_ok() {}
            path
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .output();
        }
    }

    fn batch(n: u64, rows: u64) -> Vec<Record> {
        (0..rows)
            .map(|t| Record::new(Key::new(n, 1, t), Value::new(n as u32, 1_000 + n, 1)))
            .collect()
    }

    /// A full disk makes fjall poison its database (a failed journal write or fsync); once
    /// space is freed, the store's next write or sync reopens it and goes on, and every
    /// batch whose `write_batch` returned `Ok` before or after the failure is in the store
    /// after the later successful sync, read back from disk by a fresh open. Without the
    /// reopen every write returns `Poisoned` until the process restarts.
    #[test]
    fn a_full_disk_poisons_fjall_and_the_store_reopens_once_space_is_freed() {
        const ROWS: u64 = 20;
        let fs = match SmallFs::mount(16) {
            Ok(fs) => fs,
            Err(why) => {
                println!("SKIPPED: cannot mount a small filesystem here: {why}");
                return;
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = fs.path().join("store");
        let store = EmbeddedStore::open(&dir, 1 << 20).unwrap();
        let mut acked: Vec<u64> = Vec::new();
        rt.block_on(store.write_batch(&batch(0, ROWS))).unwrap();
        rt.block_on(store.sync()).unwrap();
        acked.push(0);
        // Applied but not synced when the disk fills: small enough to sit in fjall's 8 KiB
        // journal buffer, which the failed database cannot write out any more.
        for n in 1..=3 {
            rt.block_on(store.write_batch(&batch(n, ROWS))).unwrap();
            acked.push(n);
        }

        let filler = fs.fill();
        // Writes and syncs until the full disk shows, then a few more: all fail.
        let mut n = 4;
        let mut failures = 0;
        let mut first_error = None;
        while failures < 5 {
            assert!(n < 10_000, "the full disk never failed a write or a sync");
            match rt.block_on(store.write_batch(&batch(n, ROWS))) {
                Ok(()) => acked.push(n),
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
            if let Err(e) = rt.block_on(store.sync()) {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
            n += 1;
        }
        println!("full disk: {first_error:?}");

        std::fs::remove_file(&filler).unwrap();
        // What the flusher's retry loop does: try again after a pause until it lands.
        let freed_at = Instant::now();
        loop {
            let written = rt.block_on(store.write_batch(&batch(n, ROWS)));
            if written.is_ok() {
                acked.push(n);
                n += 1;
                if rt.block_on(store.sync()).is_ok() {
                    break;
                }
            }
            assert!(
                freed_at.elapsed() < Duration::from_secs(10),
                "the store did not recover within 10 s of space being freed: {written:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("recovered in {:?}", freed_at.elapsed());
        drop(store);

        let store = EmbeddedStore::open(&dir, 1 << 20).unwrap();
        for &b in &acked {
            for t in [0, ROWS / 2, ROWS - 1] {
                assert_eq!(
                    rt.block_on(store.get(Key::new(b, 1, t))).unwrap(),
                    Some(Value::new(b as u32, 1_000 + b, 1)),
                    "batch {b} (acknowledged) is missing after the recovery"
                );
            }
        }
    }
}
