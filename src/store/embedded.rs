//! The embedded store: one fjall LSM keyspace on local disk, the single-machine default.
//!
//! Row layout: key = [`Key::to_bytes`] (24 bytes, big-endian, so one profile's titles are
//! one contiguous key range and listing is a prefix scan); value = [`Value::to_bytes`]
//! (16 bytes). Tombstones are ordinary rows with the tombstone marker, so they take part in
//! last-write-wins like any value and are removed only by retention.
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

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;

use super::{Store, StoreError, TitleEntry};
use crate::model::{Key, Record, Value};

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
/// #323). We rotate instead, from the writer, after a commit ([`Inner::rotate_if_full`]),
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

/// Cheap-to-clone handle on the fjall database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    positions: Keyspace,
    /// Serialises read-compare-commit so two concurrent batches (or a batch and a purge)
    /// cannot both read an old row and the older value land last. A parking_lot mutex, not
    /// a tokio one: it is only taken inside `spawn_blocking`, never across an `.await`.
    writer: Mutex<()>,
    reads: LwwReads,
}

fn io_error(context: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{context}: {error}"))
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
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                positions,
                writer: Mutex::new(()),
                reads,
            }),
        })
    }

    /// Bytes the store occupies on disk (tables and journal).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.db.disk_space().unwrap_or(0)
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
}

impl Inner {
    fn read(&self, key: &Key) -> Result<Option<Value>, StoreError> {
        let Some(bytes) = self
            .positions
            .get(key.to_bytes())
            .map_err(|e| io_error("reading a row", e))?
        else {
            return Ok(None);
        };
        Value::from_bytes(&bytes)
            .map(Some)
            .ok_or(StoreError::Corrupt {
                key: Some(*key),
                detail: format!(
                    "value is {} bytes, expected {}",
                    bytes.len(),
                    Value::ENCODED_BYTES
                ),
            })
    }

    /// Writes `records` (sorted by key, distinct keys) with last-write-wins.
    fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        debug_assert!(records.windows(2).all(|w| w[0].key < w[1].key));
        let _writer = self.writer.lock();
        // No fsync here: `sync` makes the cycle's batches durable at once. A journal sealed
        // meanwhile (the memtable rotated) was fsynced by fjall when it was sealed.
        let mut batch = self.db.batch().durability(None);
        for run in records.chunks(MERGE_RUN_ROWS) {
            let merged = match self.reads {
                LwwReads::Point => 0,
                LwwReads::Adaptive => {
                    self.merge_run(run, MERGE_EXTRA_ROWS_PER_KEY * run.len(), &mut batch)?
                }
                LwwReads::MergeJoin => self.merge_run(run, usize::MAX, &mut batch)?,
            };
            for record in &run[merged..] {
                let current = match self.read(&record.key) {
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

    /// Stages `record` into `batch` when it supersedes `current` (or there is none).
    fn stage(&self, record: &Record, current: Option<&Value>, batch: &mut fjall::OwnedWriteBatch) {
        if current.is_none_or(|current| record.value.supersedes(current)) {
            batch.insert(
                &self.positions,
                record.key.to_bytes(),
                record.value.to_bytes(),
            );
        }
    }

    /// Merge-joins a sorted run against one range iterator over its key range and stages
    /// the winners. Stops early once the range has yielded more than `max_extra_rows` rows
    /// that are not in the run; returns how many records of the run it resolved (the rest
    /// need point reads).
    fn merge_run(
        &self,
        run: &[Record],
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
                .and_then(|(_, value)| Value::from_bytes(&value));
            self.stage(record, current.as_ref(), batch);
        }
        Ok(run.len())
    }

    fn list(&self, prefix: [u8; 16], limit: usize) -> Result<Vec<TitleEntry>, StoreError> {
        let mut entries = Vec::new();
        for guard in self.positions.prefix(prefix) {
            if entries.len() >= limit {
                break;
            }
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
            let Some(value) = Value::from_bytes(&value) else {
                // Skip one malformed row rather than hide the whole profile.
                tracing::warn!(?key, "skipping a malformed row in the embedded store");
                continue;
            };
            entries.push(TitleEntry {
                title_id: key.title_id,
                value,
            });
        }
        Ok(entries)
    }

    /// Removes rows older than `cutoff_ms`, one chunk at a time. Candidates are found
    /// without the writer mutex, then re-checked under it: a row rewritten since the scan is
    /// newer than the cutoff and stays.
    fn purge(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0u64;
        let mut resume_after: Option<Vec<u8>> = None;
        loop {
            let mut candidates = Vec::with_capacity(PURGE_CHUNK_ROWS);
            let mut scanned = 0usize;
            let mut last_key = None;
            let iter = match &resume_after {
                Some(after) => self.positions.range::<&[u8], _>((
                    std::ops::Bound::Excluded(after.as_slice()),
                    std::ops::Bound::Unbounded,
                )),
                None => self.positions.iter(),
            };
            for guard in iter {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| io_error("scanning for retention", e))?;
                scanned += 1;
                if Value::from_bytes(&value).is_none_or(|v| v.updated_at_ms < cutoff_ms) {
                    candidates.push(key.clone());
                }
                last_key = Some(key);
                if scanned >= PURGE_CHUNK_ROWS {
                    break;
                }
            }
            if !candidates.is_empty() {
                let _writer = self.writer.lock();
                let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
                for key in candidates {
                    let still_old = match self.positions.get(&key) {
                        Ok(Some(v)) => {
                            Value::from_bytes(&v).is_none_or(|v| v.updated_at_ms < cutoff_ms)
                        }
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
            }
            if scanned < PURGE_CHUNK_ROWS {
                return Ok(removed);
            }
            resume_after = last_key.map(|k| k.to_vec());
        }
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
        if records.is_empty() {
            return Ok(());
        }
        let mut records = records.to_vec();
        // Key order: merge-joins need it, and consecutive point reads share search paths.
        // Already-sorted input (the flusher's batches) is recognised in one pass.
        records.sort_unstable_by_key(|r| r.key);
        self.blocking(move |inner| inner.write(&records)).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking(|inner| {
            inner
                .db
                .persist(PersistMode::SyncData)
                .map_err(|e| io_error("syncing the journal", e))
        })
        .await
    }

    /// Runs on the caller's thread: a point read is a bloom-filtered lookup that is almost
    /// always served from the memtable or block cache, far cheaper than a thread hop.
    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError> {
        self.inner.read(&key)
    }

    async fn list_profile(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<Vec<TitleEntry>, StoreError> {
        let prefix = Key::profile_prefix(account_id, profile_id);
        self.blocking(move |inner| inner.list(prefix, limit)).await
    }

    async fn purge_older_than(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        self.blocking(move |inner| inner.purge(cutoff_ms)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// One fjall worker with the writer sealing memtables ([`FJALL_WORKERS`]): writes worth
    /// many memtables (~960 k rows: 18 tables, level 0 compacted away when this was
    /// written) are sealed, flushed into tables and read back. Without
    /// [`Inner::rotate_if_full`] nothing is ever sealed and it fails. It waits a bounded
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
                writer.inner.write(&records).unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(600))
            .expect("the writes did not finish: is fjall's worker stuck?");
        let inner = &store.inner;
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
