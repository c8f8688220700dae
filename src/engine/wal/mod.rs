//! The commit log: every accepted heartbeat is appended here before it is acknowledged.
//!
//! ## On disk
//! A directory of segment files `<segment:020>-<part:04>.wal` and at most a few snapshot
//! files `snapshot-<segment:020>.snap`. Both are a 16-byte header (magic `PHWALSEG` or
//! `PHWALSNP`, then the segment number, little-endian u64) followed by *frames*:
//!
//! ```text
//! magic u32 = 0x3152_4850 ("PHR1") | len u32 | crc32c u32 over (len bytes ++ payload) | payload
//! payload = len / 40 records of 40 bytes (key 24 big-endian, value 16 little-endian)
//! ```
//! The per-frame magic lets replay resynchronise after a damaged region: it skips exactly
//! the frames whose checksum fails and recovers every intact frame after them. A damaged
//! region with no intact frame after it is a torn tail: it is reported and truncated.
//!
//! ## Segments and coverage
//! Appends go to the current *segment number*; [`Wal::rotate`] seals it and returns it.
//! Every record appended before `rotate` returned `S` lives in files numbered `<= S`, and
//! (because callers upsert into the coalescer *before* appending) is in the coalescer
//! before the flusher freezes it. So once a flush that began with `rotate() == S` is
//! acknowledged by the store, [`Wal::mark_flushed`]`(S)` drops every file `<= S`.
//! A part number > 0 appears when a write error forced a fresh file for the same segment.
//! A file that fails before holding a whole chunk is deleted instead (its name reused), so a
//! writer retrying on a full disk leaves no file per try. At start, a file with no more than
//! the start of a header is deleted (it holds no record); one with a damaged header is
//! replayed from its intact frames and kept aside as `.wal.corrupt` until its segment is
//! flushed (see `replay_segment`).
//!
//! ## Writing
//! Appenders encode frames into a shared buffer under a mutex (a memcpy and a CRC; no
//! syscall). One writer thread moves the buffer to the file: in `group` mode as soon as
//! anything is there, followed by an fsync on the same thread that acknowledges every
//! caller waiting for it; in `periodic` mode every couple of milliseconds, with an fsync
//! every `sync_interval_ms` run by a syncer thread while the writer goes on writing, so a
//! slow fsync does not stop the buffer from draining. A new segment's directory entry is
//! fsynced by the next sync job (before it reports the bytes it covers durable), never on
//! the writer's path: a directory fsync took tens of ms on this VM's disk, and while the
//! writer sat in it, acknowledged appends piled up unwritten (a SIGKILL lost them).
//! The buffer is bounded (`max_buffer_bytes`); a full buffer refuses appends. Bytes count
//! against it until they are written to the file. The writer keeps what it wrote until an
//! fsync covers it (to rewrite it on a fresh file if the fsync fails), and stops taking
//! more past `max_buffer_bytes` of that: the log holds at most about three times
//! `max_buffer_bytes` in memory. Obsolete files are deleted by a remover thread.
//!
//! Napkin math: 40 bytes/record, so 7.5 M heartbeats/s is 300 MB/s of log; one fsync per
//! group-commit round amortises over every record that arrived during the previous one.
//!
//! ## Where things are
//! - this module: [`Wal`], its append path and the state it shares with its threads;
//! - `format`: frames and file headers (bytes only);
//! - `segments`: file names, the directory listing, the remover thread;
//! - `writer`: the writer and syncer threads;
//! - `replay`: start-up replay and repair ([`scan_frames`], [`ReplayReport`]);
//! - `snapshot`: [`Wal::write_snapshot`].

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::model::Record;
use crate::telemetry::metrics::{counter, gauge, histogram, load, DescriptorEncoder, Encoded};

pub mod config;
mod format;
mod replay;
mod segments;
mod snapshot;
#[cfg(test)]
mod tests;
mod writer;

pub use config::{SyncMode, WalConfig};
pub use format::MAX_RECORDS_PER_FRAME;
pub use replay::{scan_frames, ReplayReport};
pub use segments::create_private_dir;

use format::{encode_frame, FRAME_HEADER_BYTES};
use segments::run_remover;
use writer::{run_syncer, SyncDone, Writer};

/// Log sequence number: the count of bytes ever appended, so "covered by an fsync" is a
/// single comparison.
pub type Lsn = u64;

/// Why an append was refused. Nothing refused is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    #[error("overloaded: the commit log's buffer is full ({0} bytes); retry later")]
    BufferFull(usize),
    #[error("the commit log cannot be written: {0}")]
    Unavailable(String),
    #[error("the commit log is closed")]
    Closed,
}

/// Commit-log settings (a subset of the `[wal]` config section).
#[derive(Clone, Debug)]
pub struct WalOptions {
    pub dir: PathBuf,
    pub sync_mode: SyncMode,
    pub sync_interval_ms: u64,
    pub segment_bytes: u64,
    pub max_buffer_bytes: usize,
}

/// Counters of the log, read by metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    pub appended_bytes: AtomicU64,
    pub appended_records: AtomicU64,
    pub written_bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Latency of every fsync of the log.
    pub fsync_seconds: crate::telemetry::metrics::Histogram,
    pub fsync_nanos_max: AtomicU64,
    pub write_errors: AtomicU64,
    pub refused_appends: AtomicU64,
    /// Bytes of segment files on disk (snapshots excluded).
    pub segment_bytes_on_disk: AtomicU64,
    pub segments_on_disk: AtomicU64,
    pub snapshot_bytes_on_disk: AtomicU64,
    pub snapshots_written: AtomicU64,
}

impl WalStats {
    /// The `playhead_wal_*` families (docs/metrics.md).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        counter(
            e,
            "playhead_wal_appended_bytes_total",
            "Bytes appended to the commit log.",
            load(&self.appended_bytes),
        )?;
        counter(
            e,
            "playhead_wal_appended_records_total",
            "Records appended to the commit log.",
            load(&self.appended_records),
        )?;
        counter(
            e,
            "playhead_wal_written_bytes_total",
            "Bytes written to segment files.",
            load(&self.written_bytes),
        )?;
        counter(
            e,
            "playhead_wal_fsyncs_total",
            "fsync calls on the commit log.",
            load(&self.fsyncs),
        )?;
        histogram(
            e,
            "playhead_wal_fsync_seconds",
            "Latency of commit-log fsyncs.",
            &self.fsync_seconds,
        )?;
        gauge(
            e,
            "playhead_wal_fsync_max_seconds",
            "Longest fsync since start.",
            load(&self.fsync_nanos_max) as f64 / 1e9,
        )?;
        counter(
            e,
            "playhead_wal_write_errors_total",
            "Failed writes or fsyncs of the commit log.",
            load(&self.write_errors),
        )?;
        counter(
            e,
            "playhead_wal_refused_appends_total",
            "Appends refused (buffer full or disk failing).",
            load(&self.refused_appends),
        )?;
        gauge(
            e,
            "playhead_wal_segment_bytes",
            "Bytes of segment files on disk.",
            load(&self.segment_bytes_on_disk),
        )?;
        gauge(
            e,
            "playhead_wal_segments",
            "Segment files on disk.",
            load(&self.segments_on_disk),
        )?;
        gauge(
            e,
            "playhead_wal_snapshot_bytes",
            "Bytes of snapshot files on disk.",
            load(&self.snapshot_bytes_on_disk),
        )?;
        counter(
            e,
            "playhead_wal_snapshots_total",
            "Snapshots written.",
            load(&self.snapshots_written),
        )
    }
}

/// The state the writer thread publishes to group-commit waiters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Durable {
    /// Every byte below this LSN is fsynced.
    synced: Lsn,
    /// Bumped on each write failure, so waiters give up instead of hanging.
    failures: u64,
}

/// Appended frames the writer has not taken yet, all for one segment.
struct Chunk {
    segment: u64,
    bytes: Vec<u8>,
    end_lsn: Lsn,
}

struct AppendState {
    /// Frames for `segment`, not yet handed to the writer.
    buf: Vec<u8>,
    segment: u64,
    /// Bytes assigned to `segment` so far; past `segment_bytes` the segment is sealed.
    segment_fill: u64,
    /// Sealed chunks waiting for the writer, in order.
    queue: VecDeque<Chunk>,
    /// Total bytes in `buf` and `queue`; bounded by `max_buffer_bytes`.
    pending_bytes: usize,
    lsn: Lsn,
    closed: bool,
    /// Set by [`Wal::crash`]: the writer stops at once, writing and syncing nothing more.
    crashed: bool,
    /// Set by the writer while the disk refuses writes; appends are refused meanwhile.
    failing: Option<String>,
    /// Emptied buffers for reuse, so steady state does not allocate.
    spare: Vec<Vec<u8>>,
    /// Set by the syncer when an fsync it was handed finishes; taken by the writer.
    sync_done: Option<SyncDone>,
    /// The writer sleeps with nothing to write or sync: the next append wakes it. Busy,
    /// it is not woken per append (periodic mode batches for `PERIODIC_WRITE_EVERY`).
    writer_idle: bool,
}

struct Shared {
    opts: WalOptions,
    state: Mutex<AppendState>,
    wake_writer: Condvar,
    durable: watch::Sender<Durable>,
    /// Segments `<=` this may be deleted; files `<=` `snapshots_obsolete` likewise.
    segments_obsolete: AtomicU64,
    snapshots_obsolete: AtomicU64,
    /// The segment the writer has open (0: none), which the remover leaves alone.
    open_segment: AtomicU64,
    removal: Mutex<Removal>,
    wake_remover: Condvar,
    stats: WalStats,
}

/// Work for the remover thread.
#[derive(Default)]
struct Removal {
    /// Files became obsolete since the remover last looked.
    pending: bool,
    closed: bool,
}

impl Shared {
    fn files_obsolete(&self) {
        self.removal.lock().pending = true;
        self.wake_remover.notify_one();
    }
}

/// The commit log. Cheap to share behind an `Arc`; [`Wal::close`] drains and syncs it.
pub struct Wal {
    shared: Arc<Shared>,
    /// Ends with the LSN the writer handed to write(2) last.
    writer: Mutex<Option<JoinHandle<Lsn>>>,
    remover: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Replays the log in `opts.dir` into `apply` (snapshot first, then segments in order),
    /// repairs torn tails, and opens a new segment for appends. Never refuses to start
    /// because of damaged records; only I/O errors on the directory itself fail.
    pub fn open(
        opts: WalOptions,
        mut apply: impl FnMut(&[Record]),
    ) -> io::Result<(Self, ReplayReport)> {
        let (first_segment, report, stats) = replay::replay_dir(&opts, &mut apply)?;
        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(AppendState {
                buf: Vec::with_capacity(1 << 20),
                segment: first_segment,
                segment_fill: 0,
                queue: VecDeque::new(),
                pending_bytes: 0,
                lsn: 0,
                closed: false,
                crashed: false,
                failing: None,
                spare: Vec::new(),
                sync_done: None,
                writer_idle: false,
            }),
            wake_writer: Condvar::new(),
            durable,
            segments_obsolete: AtomicU64::new(0),
            snapshots_obsolete: AtomicU64::new(0),
            open_segment: AtomicU64::new(0),
            removal: Mutex::new(Removal::default()),
            wake_remover: Condvar::new(),
            stats,
            opts,
        });
        let (jobs, pending_jobs) = crossbeam::channel::bounded(1);
        let syncer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("playhead-wal-sync".into())
                .spawn(move || run_syncer(&shared, pending_jobs))?
        };
        let dir = File::open(&shared.opts.dir)?;
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("playhead-wal".into())
                .spawn(move || Writer::new(shared, dir, jobs, syncer).run())?
        };
        let remover = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("playhead-wal-rm".into())
                .spawn(move || run_remover(&shared))?
        };
        Ok((
            Self {
                shared,
                writer: Mutex::new(Some(writer)),
                remover: Mutex::new(Some(remover)),
            },
            report,
        ))
    }

    /// Appends `records` and returns the LSN that covers them. In `group` mode the caller
    /// must then await [`Wal::wait_durable`] before acknowledging. Refused when the buffer
    /// is full or the disk is failing; nothing refused is written.
    pub fn append(&self, records: &[Record]) -> Result<Lsn, WalError> {
        if records.is_empty() {
            return Ok(self.shared.state.lock().lsn);
        }
        let frames = records.len().div_ceil(MAX_RECORDS_PER_FRAME);
        let bytes = records.len() * Record::ENCODED_BYTES + frames * FRAME_HEADER_BYTES;
        let opts = &self.shared.opts;
        let mut st = self.shared.state.lock();
        if st.closed {
            return Err(WalError::Closed);
        }
        if let Some(reason) = &st.failing {
            self.shared
                .stats
                .refused_appends
                .fetch_add(1, Ordering::Relaxed);
            return Err(WalError::Unavailable(reason.clone()));
        }
        if st.pending_bytes + bytes > opts.max_buffer_bytes {
            self.shared
                .stats
                .refused_appends
                .fetch_add(1, Ordering::Relaxed);
            drop(st);
            self.shared.wake_writer.notify_one();
            return Err(WalError::BufferFull(opts.max_buffer_bytes));
        }
        for chunk in records.chunks(MAX_RECORDS_PER_FRAME) {
            encode_frame(&mut st.buf, chunk);
        }
        st.pending_bytes += bytes;
        st.segment_fill += bytes as u64;
        st.lsn += bytes as u64;
        let lsn = st.lsn;
        if st.segment_fill >= opts.segment_bytes {
            seal(&mut st);
        }
        let wake = opts.sync_mode == SyncMode::Group
            || st.pending_bytes >= opts.max_buffer_bytes / 4
            || std::mem::take(&mut st.writer_idle);
        drop(st);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        let stats = &self.shared.stats;
        stats
            .appended_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        stats
            .appended_records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(lsn)
    }

    /// Waits until every byte below `lsn` is fsynced. Fails if a write error happens first
    /// (the caller must then not acknowledge).
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let mut rx = self.shared.durable.subscribe();
        let failures_before = rx.borrow().failures;
        let state = rx
            .wait_for(|d| d.synced >= lsn || d.failures != failures_before)
            .await
            .map_err(|_| WalError::Closed)?;
        if state.synced >= lsn {
            Ok(())
        } else {
            Err(WalError::Unavailable(
                "a write to the commit log failed before this record was synced".into(),
            ))
        }
    }

    /// Seals the current segment and returns its number: every record appended before this
    /// call lives in files numbered `<=` the result.
    pub fn rotate(&self) -> u64 {
        let mut st = self.shared.state.lock();
        let sealed = st.segment;
        seal(&mut st);
        drop(st);
        self.shared.wake_writer.notify_one();
        sealed
    }

    /// Every record in segments `<= segment` has reached the store: drop those files (and
    /// snapshots `<= segment`). A thread of the log's own deletes them, never the file the
    /// writer has open, and not on the writer's thread: on this machine an `unlink` of a
    /// 64 MiB segment blocked for up to ~0.3 s, and the buffer filled meanwhile.
    pub fn mark_flushed(&self, segment: u64) {
        self.shared
            .segments_obsolete
            .fetch_max(segment, Ordering::AcqRel);
        self.shared
            .snapshots_obsolete
            .fetch_max(segment, Ordering::AcqRel);
        self.shared.files_obsolete();
    }

    /// Writes and fsyncs everything appended so far, stops the writer thread and refuses
    /// further appends. Idempotent.
    pub fn close(&self) {
        {
            let mut st = self.shared.state.lock();
            st.closed = true;
        }
        self.shared.wake_writer.notify_one();
        if let Some(handle) = self.writer.lock().take() {
            if handle.join().is_err() {
                tracing::error!("commit-log writer thread panicked");
            }
        }
        self.shared.removal.lock().closed = true;
        self.shared.wake_remover.notify_one();
        if let Some(handle) = self.remover.lock().take() {
            if handle.join().is_err() {
                tracing::error!("commit-log remover thread panicked");
            }
        }
    }

    /// What a SIGKILL leaves of the log, for tests of crash recovery: records the writer
    /// has handed to write(2) stay in the files (a killed process's writes are in the page
    /// cache), everything still in this process's buffers is lost, nothing more is written
    /// or fsynced. Stops the log's threads and refuses further appends (like
    /// [`Wal::close`], without its final write and fsync). Returns the LSN up to which
    /// records reached the files: every record appended at or below it replays at the next
    /// open, every one above it is gone. A real crash needs no such call; nothing else uses
    /// it.
    #[doc(hidden)]
    pub fn crash(&self) -> Lsn {
        {
            let mut st = self.shared.state.lock();
            st.closed = true;
            st.crashed = true;
            st.buf.clear();
            st.queue.clear();
        }
        self.shared.wake_writer.notify_one();
        let written = match self.writer.lock().take() {
            Some(handle) => handle.join().expect("commit-log writer thread panicked"),
            None => 0,
        };
        self.shared.removal.lock().closed = true;
        self.shared.wake_remover.notify_one();
        if let Some(handle) = self.remover.lock().take() {
            let _ = handle.join();
        }
        written
    }

    /// LSN of the newest append.
    pub fn appended_lsn(&self) -> Lsn {
        self.shared.state.lock().lsn
    }

    /// Every byte below this LSN is fsynced.
    pub fn synced_lsn(&self) -> Lsn {
        self.shared.durable.borrow().synced
    }

    /// The reason appends are refused, while the disk is failing.
    pub fn failing(&self) -> Option<String> {
        self.shared.state.lock().failing.clone()
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.shared.opts.sync_mode
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

fn seal(st: &mut AppendState) {
    queue_buffer(st);
    st.segment += 1;
    st.segment_fill = 0;
}

/// Moves the frames appended so far (if any) onto the writer's queue as one chunk.
fn queue_buffer(st: &mut AppendState) {
    if !st.buf.is_empty() {
        let fresh = st.spare.pop().unwrap_or_default();
        let bytes = std::mem::replace(&mut st.buf, fresh);
        let (segment, end_lsn) = (st.segment, st.lsn);
        st.queue.push_back(Chunk {
            segment,
            bytes,
            end_lsn,
        });
    }
}
