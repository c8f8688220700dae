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

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::SyncMode;
use crate::model::Record;

const SEGMENT_MAGIC: &[u8; 8] = b"PHWALSEG";
const SNAPSHOT_MAGIC: &[u8; 8] = b"PHWALSNP";
const FILE_HEADER_BYTES: usize = 16;
const FRAME_MAGIC: u32 = 0x3152_4850;
const FRAME_HEADER_BYTES: usize = 12;
/// Upper bound on one frame's records: bounds what a corrupt length can make replay read
/// and keeps a single append's frame reasonable. Larger appends are split.
pub const MAX_RECORDS_PER_FRAME: usize = 65_536;
const MAX_FRAME_PAYLOAD: usize = MAX_RECORDS_PER_FRAME * Record::ENCODED_BYTES;
/// In periodic mode the writer drains the buffer at least this often.
const PERIODIC_WRITE_EVERY: Duration = Duration::from_millis(2);
/// How long the writer sleeps with nothing to do before looking again. Every event that
/// gives it work wakes it, so this is only a safety net.
const IDLE_WAIT: Duration = Duration::from_secs(5);
/// After an I/O error the writer retries on a fresh file this often.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(200);

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

/// What replay found, for the start-up log and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records replayed from the snapshot and the segments.
    pub records: u64,
    pub frames: u64,
    pub segments: u64,
    /// The snapshot replay started from, if any.
    pub snapshot: Option<u64>,
    /// Damaged regions skipped in the middle of files (intact frames followed them).
    pub corrupt_regions: u64,
    pub corrupt_bytes: u64,
    /// Bytes cut off torn or corrupt tails.
    pub truncated_bytes: u64,
    /// One line per problem, naming the file and offset.
    pub problems: Vec<String>,
}

/// Counters of the log, read by metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    pub appended_bytes: AtomicU64,
    pub appended_records: AtomicU64,
    pub written_bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Latency of every fsync of the log.
    pub fsync_seconds: crate::metrics::Histogram,
    pub fsync_nanos_max: AtomicU64,
    pub write_errors: AtomicU64,
    pub refused_appends: AtomicU64,
    /// Bytes of segment files on disk (snapshots excluded).
    pub segment_bytes_on_disk: AtomicU64,
    pub segments_on_disk: AtomicU64,
    pub snapshot_bytes_on_disk: AtomicU64,
    pub snapshots_written: AtomicU64,
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
        create_private_dir(&opts.dir)?;
        let files = list_dir(&opts.dir)?;
        let mut report = ReplayReport::default();
        let stats = WalStats::default();

        let newest_snapshot = files.snapshots.iter().map(|s| s.0).max();
        if let Some(snap) = newest_snapshot {
            let path = opts.dir.join(snapshot_name(snap));
            replay_file(&path, SNAPSHOT_MAGIC, &mut report, &mut apply)?;
            report.snapshot = Some(snap);
            stats
                .snapshot_bytes_on_disk
                .store(file_len(&path), Ordering::Relaxed);
        }
        for (id, path) in &files.snapshots {
            if Some(*id) != newest_snapshot {
                remove_file_logged(path);
            }
        }
        let mut max_segment = newest_snapshot.unwrap_or(0);
        for seg in &files.segments {
            max_segment = max_segment.max(seg.segment);
            if newest_snapshot.is_some_and(|s| seg.segment <= s) {
                // Covered by the snapshot: the crash came between writing it and deleting these.
                remove_file_logged(&seg.path);
                continue;
            }
            if !replay_segment(seg, &mut report, &mut apply)? {
                continue;
            }
            report.segments += 1;
            stats
                .segment_bytes_on_disk
                .fetch_add(file_len(&seg.path), Ordering::Relaxed);
            stats.segments_on_disk.fetch_add(1, Ordering::Relaxed);
        }
        for tmp in &files.temporary {
            remove_file_logged(tmp);
        }

        let first_segment = max_segment + 1;
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

    /// Writes a snapshot covering every segment `<= segment` (which must come from
    /// [`Wal::rotate`], called *before* `fill` reads the coalescer), then drops those
    /// segments and older snapshots. `fill` is handed a sink for the records to keep.
    pub fn write_snapshot(
        &self,
        segment: u64,
        fill: impl FnOnce(&mut dyn FnMut(&[Record])),
    ) -> io::Result<u64> {
        let dir = &self.shared.opts.dir;
        let tmp = dir.join(format!("snapshot-{segment:020}.tmp"));
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        write_file_header(&mut out, SNAPSHOT_MAGIC, segment)?;
        let mut frame = Vec::with_capacity(MAX_FRAME_PAYLOAD + FRAME_HEADER_BYTES);
        let mut result = Ok(());
        let mut records = 0u64;
        fill(&mut |batch: &[Record]| {
            for chunk in batch.chunks(MAX_RECORDS_PER_FRAME) {
                frame.clear();
                encode_frame(&mut frame, chunk);
                records += chunk.len() as u64;
                if result.is_ok() {
                    result = out.write_all(&frame);
                }
            }
        });
        result?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        drop(file);
        let path = dir.join(snapshot_name(segment));
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        let stats = &self.shared.stats;
        stats.snapshot_bytes_on_disk.store(bytes, Ordering::Relaxed);
        stats.snapshots_written.fetch_add(1, Ordering::Relaxed);
        self.shared
            .segments_obsolete
            .fetch_max(segment, Ordering::AcqRel);
        self.shared
            .snapshots_obsolete
            .fetch_max(segment.saturating_sub(1), Ordering::AcqRel);
        self.shared.files_obsolete();
        tracing::info!(segment, records, bytes, "commit-log snapshot written");
        Ok(records)
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

fn encode_frame(out: &mut Vec<u8>, records: &[Record]) {
    debug_assert!(records.len() <= MAX_RECORDS_PER_FRAME);
    let len = (records.len() * Record::ENCODED_BYTES) as u32;
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for r in records {
        r.encode_into(out);
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&len.to_le_bytes()),
        &out[start + FRAME_HEADER_BYTES..],
    );
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Outcome of decoding one frame at an offset.
enum Frame<'a> {
    Ok {
        payload: &'a [u8],
        next: usize,
    },
    /// Not enough bytes left for the header or the payload its length announces.
    Truncated,
    /// Bad magic, impossible length or checksum mismatch.
    Corrupt,
}

fn decode_frame(buf: &[u8], at: usize) -> Frame<'_> {
    let Some(header) = buf.get(at..at + FRAME_HEADER_BYTES) else {
        return Frame::Truncated;
    };
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC
        || len == 0
        || len > MAX_FRAME_PAYLOAD
        || !len.is_multiple_of(Record::ENCODED_BYTES)
    {
        return Frame::Corrupt;
    }
    let start = at + FRAME_HEADER_BYTES;
    let Some(payload) = buf.get(start..start + len) else {
        return Frame::Truncated;
    };
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header[4..8]), payload);
    if actual != crc {
        return Frame::Corrupt;
    }
    Frame::Ok {
        payload,
        next: start + len,
    }
}

/// Finds the next offset after `from` where an intact frame starts.
fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let magic = FRAME_MAGIC.to_le_bytes();
    let mut at = from;
    while at + FRAME_HEADER_BYTES <= buf.len() {
        let rel = buf[at..].windows(4).position(|w| w == magic)?;
        at += rel;
        if matches!(decode_frame(buf, at), Frame::Ok { .. }) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Replays a snapshot into `apply`; damaged regions are skipped and reported, a damaged tail
/// is truncated. Returns an error only when the file cannot be read or repaired.
fn replay_file(
    path: &Path,
    magic: &[u8; 8],
    report: &mut ReplayReport,
    apply: &mut impl FnMut(&[Record]),
) -> io::Result<()> {
    let buf = fs::read(path)?;
    let name = path.display();
    if buf.len() < FILE_HEADER_BYTES || &buf[0..8] != magic {
        let msg = format!(
            "{name}: missing or bad file header ({} bytes); the file is set aside as .corrupt",
            buf.len()
        );
        tracing::warn!("{msg}");
        report.problems.push(msg);
        report.truncated_bytes += buf.len() as u64;
        let mut aside = path.as_os_str().to_owned();
        aside.push(".corrupt");
        fs::rename(path, PathBuf::from(aside))?;
        return Ok(());
    }
    if let Some(at) = scan_frames(&buf, FILE_HEADER_BYTES, &name.to_string(), report, apply) {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(at as u64)?;
        file.sync_all()?;
    }
    Ok(())
}

/// Replays one segment file and returns whether it is kept. A file whose header is missing
/// or damaged is one of two things. If its bytes are no more than the start of a header
/// (empty included), the writer created it and then died or met a full disk before the
/// header was written: it holds no record, and it is deleted. Otherwise its intact frames
/// are replayed like any segment's and it is set aside as `.wal.corrupt`, for inspection:
/// the remover deletes it with its segment once that is flushed, when every record replayed
/// from it is in the store. Until then every start replays it again (LWW makes that
/// harmless), so a crash before that flush loses nothing it held.
fn replay_segment(
    seg: &SegmentFile,
    report: &mut ReplayReport,
    apply: &mut impl FnMut(&[Record]),
) -> io::Result<bool> {
    let buf = fs::read(&seg.path)?;
    let name = seg.path.display().to_string();
    let header_ok = buf.len() >= FILE_HEADER_BYTES && &buf[0..8] == SEGMENT_MAGIC;
    if header_ok && !seg.set_aside {
        if let Some(at) = scan_frames(&buf, FILE_HEADER_BYTES, &name, report, apply) {
            let file = OpenOptions::new().write(true).open(&seg.path)?;
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        return Ok(true);
    }
    let magic_part = buf.len().min(SEGMENT_MAGIC.len());
    if buf.len() < FILE_HEADER_BYTES && buf[..magic_part] == SEGMENT_MAGIC[..magic_part] {
        let msg = format!(
            "{name}: {} bytes, no more than the start of a file header (created, never \
             written: a crash or a full disk); it holds no record and is deleted",
            buf.len()
        );
        tracing::warn!("{msg}");
        report.problems.push(msg);
        report.truncated_bytes += buf.len() as u64;
        fs::remove_file(&seg.path)?;
        return Ok(false);
    }
    let mut scan = ReplayReport::default();
    scan_frames(&buf, 0, &name, &mut scan, apply);
    report.records += scan.records;
    report.frames += scan.frames;
    report.corrupt_regions += 1;
    report.corrupt_bytes += scan.corrupt_bytes + scan.truncated_bytes;
    let msg = format!(
        "{name}: missing or bad file header ({} bytes); its {} intact frames are replayed and \
         the file is kept aside as .corrupt until its segment is flushed",
        buf.len(),
        scan.frames
    );
    tracing::warn!("{msg}");
    report.problems.push(msg);
    if !seg.set_aside {
        let mut aside = seg.path.as_os_str().to_owned();
        aside.push(".corrupt");
        fs::rename(&seg.path, PathBuf::from(aside))?;
    }
    Ok(true)
}

/// Decodes the frames of a commit-log file's bytes from offset `from` (past the file
/// header) into `apply`: damaged regions followed by intact frames are skipped and
/// reported; returns the offset of a damaged tail to truncate at, if any. Pure (no I/O),
/// so replay's parsing is fuzzable (`fuzz/fuzz_targets/wal_frames.rs`).
pub fn scan_frames(
    buf: &[u8],
    from: usize,
    name: &str,
    report: &mut ReplayReport,
    apply: &mut impl FnMut(&[Record]),
) -> Option<usize> {
    let mut records = Vec::with_capacity(MAX_RECORDS_PER_FRAME);
    let mut at = from;
    while at < buf.len() {
        match decode_frame(buf, at) {
            Frame::Ok { payload, next } => {
                records.clear();
                records.extend(
                    payload
                        .chunks_exact(Record::ENCODED_BYTES)
                        .filter_map(Record::decode),
                );
                apply(&records);
                report.records += records.len() as u64;
                report.frames += 1;
                at = next;
            }
            Frame::Truncated | Frame::Corrupt => match resync(buf, at + 1) {
                Some(next) => {
                    let msg = format!(
                        "{name}: skipped {} damaged bytes at offset {at}; intact frames follow",
                        next - at
                    );
                    tracing::warn!("{msg}");
                    report.problems.push(msg);
                    report.corrupt_regions += 1;
                    report.corrupt_bytes += (next - at) as u64;
                    at = next;
                }
                None => {
                    let cut = buf.len() - at;
                    let msg = format!(
                        "{name}: torn or corrupt tail of {cut} bytes at offset {at}; truncated"
                    );
                    tracing::warn!("{msg}");
                    report.problems.push(msg);
                    report.truncated_bytes += cut as u64;
                    return Some(at);
                }
            },
        }
    }
    None
}

struct SegmentFile {
    segment: u64,
    part: u32,
    path: PathBuf,
    /// A `.wal.corrupt` file: its header was damaged when replay first found it.
    set_aside: bool,
}

#[derive(Default)]
struct DirListing {
    /// Sorted by (segment, part).
    segments: Vec<SegmentFile>,
    snapshots: Vec<(u64, PathBuf)>,
    temporary: Vec<PathBuf>,
}

fn segment_name(segment: u64, part: u32) -> String {
    format!("{segment:020}-{part:04}.wal")
}

fn snapshot_name(segment: u64) -> String {
    format!("snapshot-{segment:020}.snap")
}

fn list_dir(dir: &Path) -> io::Result<DirListing> {
    let mut out = DirListing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let segment_stem = name
            .strip_suffix(".wal")
            .map(|stem| (stem, false))
            .or_else(|| name.strip_suffix(".wal.corrupt").map(|stem| (stem, true)));
        if let Some((stem, set_aside)) = segment_stem {
            if let Some((seg, part)) = stem.split_once('-') {
                if let (Ok(segment), Ok(part)) = (seg.parse(), part.parse()) {
                    out.segments.push(SegmentFile {
                        segment,
                        part,
                        path,
                        set_aside,
                    });
                }
            }
        } else if let Some(id) = name
            .strip_prefix("snapshot-")
            .and_then(|n| n.strip_suffix(".snap"))
        {
            if let Ok(id) = id.parse() {
                out.snapshots.push((id, path));
            }
        } else if name.ends_with(".tmp") {
            out.temporary.push(path);
        }
    }
    out.segments.sort_by_key(|s| (s.segment, s.part));
    Ok(out)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn remove_file_logged(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove obsolete commit-log file");
    }
}

fn write_file_header(out: &mut impl Write, magic: &[u8; 8], segment: u64) -> io::Result<()> {
    out.write_all(magic)?;
    out.write_all(&segment.to_le_bytes())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// An fsync handed to the syncer thread: the log directory (when a file was created since
/// the last job), then `files` in order; after all of them every byte below `lsn` is
/// durable. A record is durable only once both its bytes and its file's directory entry
/// are, so the directory's fsync belongs to the job that covers the new file's first bytes.
struct SyncJob {
    dir: Option<Arc<File>>,
    files: Vec<Arc<File>>,
    lsn: Lsn,
}

impl SyncJob {
    fn run(&self, shared: &Shared) -> io::Result<()> {
        if let Some(dir) = &self.dir {
            timed_sync(shared, || dir.sync_all())?;
        }
        self.files
            .iter()
            .try_for_each(|f| timed_sync(shared, || f.sync_data()))
    }
}

/// What the syncer reports back to the writer (through [`AppendState::sync_done`]).
struct SyncDone {
    lsn: Lsn,
    result: io::Result<()>,
}

/// The syncer thread: fsyncs what the writer hands it while the writer goes on writing, so
/// a slow fsync does not stop the buffer from draining. Ends when the writer drops its
/// sender.
fn run_syncer(shared: &Shared, jobs: crossbeam::channel::Receiver<SyncJob>) {
    for job in jobs {
        let result = job.run(shared);
        shared.state.lock().sync_done = Some(SyncDone {
            lsn: job.lsn,
            result,
        });
        shared.wake_writer.notify_one();
    }
}

/// Runs one fsync (of a file or of the directory) and records its latency.
fn timed_sync(shared: &Shared, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let started = Instant::now();
    sync()?;
    let elapsed = started.elapsed();
    let stats = &shared.stats;
    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
    stats.fsync_seconds.observe(elapsed);
    stats
        .fsync_nanos_max
        .fetch_max(elapsed.as_nanos() as u64, Ordering::Relaxed);
    Ok(())
}

/// The segment file the writer appends to.
struct OpenFile {
    segment: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Chunks written to it in full. A file that failed before holding one holds no record
    /// (only its header, perhaps a partial frame of chunks that are rewritten elsewhere),
    /// so a write error deletes it instead of leaving it behind.
    chunks: u64,
}

/// The writer thread's own state: the open file and what it has made durable.
struct Writer {
    shared: Arc<Shared>,
    file: Option<OpenFile>,
    /// The log directory, fsynced by the next sync job after a file is created in it.
    dir: Arc<File>,
    /// A file was created since the last sync job: that job fsyncs the directory too.
    dir_unsynced: bool,
    /// Files the writer moved on from whose last bytes no fsync has covered yet.
    unsynced_files: Vec<Arc<File>>,
    /// Written chunks no finished fsync covers yet, in order: rewritten on a fresh file if
    /// the fsync fails. At most `max_buffer_bytes` (the writer waits beyond that).
    unsynced: VecDeque<Chunk>,
    unsynced_bytes: usize,
    /// The LSN the fsync in flight will cover.
    syncing: Option<Lsn>,
    jobs: Option<crossbeam::channel::Sender<SyncJob>>,
    syncer: Option<JoinHandle<()>>,
    /// Part number for the next file of a segment after a write error.
    next_part: u32,
    written_lsn: Lsn,
    synced_lsn: Lsn,
    last_sync: Instant,
    failures: u64,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        dir: File,
        jobs: crossbeam::channel::Sender<SyncJob>,
        syncer: JoinHandle<()>,
    ) -> Self {
        Self {
            shared,
            file: None,
            dir: Arc::new(dir),
            dir_unsynced: false,
            unsynced_files: Vec::new(),
            unsynced: VecDeque::new(),
            unsynced_bytes: 0,
            syncing: None,
            jobs: Some(jobs),
            syncer: Some(syncer),
            next_part: 0,
            written_lsn: 0,
            synced_lsn: 0,
            last_sync: Instant::now(),
            failures: 0,
        }
    }

    /// Returns the LSN it handed to write(2) last.
    fn run(mut self) -> Lsn {
        self.write_loop();
        drop(self.jobs.take());
        if let Some(syncer) = self.syncer.take() {
            if syncer.join().is_err() {
                tracing::error!("commit-log syncer thread panicked");
            }
        }
        self.written_lsn
    }

    fn write_loop(&mut self) {
        let sync_interval = Duration::from_millis(self.shared.opts.sync_interval_ms);
        let group = self.shared.opts.sync_mode == SyncMode::Group;
        let max_unsynced = self.shared.opts.max_buffer_bytes;
        let mut retry_pending = false;
        loop {
            if retry_pending {
                std::thread::sleep(RETRY_AFTER_ERROR);
                retry_pending = false;
            }
            let can_write = self.unsynced_bytes < max_unsynced;
            let (chunks, closed, done) = {
                let mut st = self.shared.state.lock();
                let has_chunks = !st.queue.is_empty() || !st.buf.is_empty();
                let sync_due = self.syncing.is_none() && self.written_lsn > self.synced_lsn;
                let work = st.sync_done.is_some()
                    || (can_write && has_chunks)
                    || (st.closed && self.syncing.is_none());
                if !work && !has_chunks && !sync_due && self.syncing.is_none() {
                    // Everything written is durable: sleep until the next append or close
                    // wakes us (a rotation does too, with nothing to do), instead of
                    // polling every 2 ms.
                    st.writer_idle = true;
                    self.shared.wake_writer.wait_for(&mut st, IDLE_WAIT);
                    st.writer_idle = false;
                } else if !work {
                    let wait = if group && !sync_due {
                        sync_interval.max(Duration::from_millis(10))
                    } else {
                        PERIODIC_WRITE_EVERY
                    };
                    self.shared.wake_writer.wait_for(&mut st, wait);
                } else if !group
                    && !st.closed
                    && st.sync_done.is_none()
                    && st.pending_bytes < self.shared.opts.max_buffer_bytes / 4
                {
                    // Periodic mode: let frames accumulate so each write(2) is large.
                    self.shared
                        .wake_writer
                        .wait_for(&mut st, PERIODIC_WRITE_EVERY);
                }
                if st.crashed {
                    // `Wal::crash`: stop as a SIGKILL would, writing and syncing nothing more.
                    return;
                }
                let done = st.sync_done.take();
                let mut chunks = Vec::new();
                if can_write {
                    queue_buffer(&mut st);
                    // Take what keeps the unsynced rounds within the bound (at least one).
                    let mut room = max_unsynced - self.unsynced_bytes;
                    while let Some(next) = st.queue.front() {
                        if !chunks.is_empty() && next.bytes.len() > room {
                            break;
                        }
                        room = room.saturating_sub(next.bytes.len());
                        chunks.push(st.queue.pop_front().expect("front exists"));
                    }
                }
                (chunks, st.closed, done)
            };
            if let Some(done) = done {
                if let Err(e) = self.sync_finished(done) {
                    self.fail(e, chunks);
                    retry_pending = true;
                    if closed {
                        return self.abandon();
                    }
                    continue;
                }
            }
            if let Err((e, unwritten)) = self.write_chunks(chunks) {
                // Let the fsync in flight finish first: its outcome decides what is durable.
                if let Some(done) = self.wait_for_sync() {
                    if let Err(sync_error) = self.sync_finished(done) {
                        tracing::warn!(error = %sync_error, "commit-log fsync failed too");
                    }
                }
                self.fail(e, unwritten);
                retry_pending = true;
                if closed {
                    return self.abandon();
                }
                continue;
            }
            let sync_due = self.syncing.is_none()
                && self.written_lsn > self.synced_lsn
                && (group || closed || self.last_sync.elapsed() >= sync_interval);
            if sync_due && !group {
                self.start_sync();
            } else if sync_due {
                // Group mode fsyncs on this thread: its callers wait for every round's
                // fsync anyway, and a hop to the syncer and back cost them latency (one
                // pair of 20 s runs: p99 82 ms and 3.9 M/s against 32 ms and 5.1 M/s).
                let job = self.sync_job();
                self.syncing = Some(job.lsn);
                let result = job.run(&self.shared);
                if let Err(e) = self.sync_finished(SyncDone {
                    lsn: job.lsn,
                    result,
                }) {
                    self.fail(e, Vec::new());
                    retry_pending = true;
                    if closed {
                        return self.abandon();
                    }
                    continue;
                }
            }
            if closed && self.syncing.is_none() && self.written_lsn == self.synced_lsn {
                let st = self.shared.state.lock();
                if st.queue.is_empty() && st.buf.is_empty() {
                    return;
                }
            }
        }
    }

    /// Writes `chunks` in order; each one written leaves the buffer's budget and joins the
    /// unsynced rounds. On an error, returns it with the chunks not yet written.
    fn write_chunks(&mut self, chunks: Vec<Chunk>) -> Result<(), (io::Error, Vec<Chunk>)> {
        let mut chunks = chunks.into_iter();
        while let Some(chunk) = chunks.next() {
            if let Err(e) = self.write_chunk(&chunk) {
                let mut unwritten = vec![chunk];
                unwritten.extend(chunks);
                return Err((e, unwritten));
            }
            self.shared.state.lock().pending_bytes -= chunk.bytes.len();
            self.unsynced_bytes += chunk.bytes.len();
            self.unsynced.push_back(chunk);
        }
        Ok(())
    }

    fn write_chunk(&mut self, chunk: &Chunk) -> io::Result<()> {
        let needs_new = match &self.file {
            Some(open) => open.segment != chunk.segment,
            None => true,
        };
        if needs_new {
            self.open_segment(chunk.segment)?;
        }
        let open = self.file.as_mut().expect("opened above");
        (&*open.file).write_all(&chunk.bytes)?;
        open.chunks += 1;
        self.written_lsn = chunk.end_lsn;
        let stats = &self.shared.stats;
        stats
            .written_bytes
            .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        stats
            .segment_bytes_on_disk
            .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Creates the file for `segment` and writes its header. Its directory entry is
    /// fsynced by the next sync job (with the data that makes its records durable), not
    /// here: a directory fsync takes tens of ms on this VM's disk, and the writer must keep
    /// draining the buffer meanwhile. If the header cannot be written (disk full), the file
    /// is deleted again, so a writer retrying on a full disk does not leave a file per try.
    fn open_segment(&mut self, segment: u64) -> io::Result<()> {
        if let Some(old) = self.file.take() {
            // Its last bytes become durable with the next fsync, which covers it first.
            self.unsynced_files.push(old.file);
        }
        let path = self
            .shared
            .opts
            .dir
            .join(segment_name(segment, self.next_part));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        self.dir_unsynced = true;
        let mut header = Vec::with_capacity(FILE_HEADER_BYTES);
        write_file_header(&mut header, SEGMENT_MAGIC, segment)?;
        if let Err(e) = file.write_all(&header) {
            drop(file);
            self.discard(&path);
            return Err(e);
        }
        let stats = &self.shared.stats;
        stats.segments_on_disk.fetch_add(1, Ordering::Relaxed);
        stats
            .segment_bytes_on_disk
            .fetch_add(FILE_HEADER_BYTES as u64, Ordering::Relaxed);
        self.file = Some(OpenFile {
            segment,
            path,
            file: Arc::new(file),
            chunks: 0,
        });
        self.shared.open_segment.store(segment, Ordering::Release);
        Ok(())
    }

    /// Deletes the open file that holds no record yet (its header only, perhaps part of a
    /// chunk that is rewritten elsewhere).
    fn discard_unwritten(&mut self, open: OpenFile) {
        debug_assert_eq!(open.chunks, 0);
        drop(open.file);
        self.discard(&open.path);
        let stats = &self.shared.stats;
        let _ = stats
            .segments_on_disk
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        let _ =
            stats
                .segment_bytes_on_disk
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(FILE_HEADER_BYTES as u64))
                });
    }

    /// Deletes a file that holds no record; if that fails, the part number moves on so the
    /// next file does not collide with it.
    fn discard(&mut self, path: &Path) {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an unwritten commit-log file");
            self.next_part += 1;
        }
    }

    /// An fsync of everything written so far.
    fn sync_job(&mut self) -> SyncJob {
        let mut files = std::mem::take(&mut self.unsynced_files);
        if let Some(open) = &self.file {
            files.push(Arc::clone(&open.file));
        }
        let dir = std::mem::take(&mut self.dir_unsynced).then(|| Arc::clone(&self.dir));
        self.last_sync = Instant::now();
        SyncJob {
            dir,
            files,
            lsn: self.written_lsn,
        }
    }

    /// Hands an fsync of everything written so far to the syncer (periodic mode).
    fn start_sync(&mut self) {
        let job = self.sync_job();
        self.syncing = Some(job.lsn);
        let jobs = self
            .jobs
            .as_ref()
            .expect("the syncer runs while the writer does");
        // The channel holds one job and none is in flight, so this never waits.
        jobs.send(job).expect("the syncer outlives the writer");
    }

    /// Blocks until the fsync in flight (if any) reports back.
    fn wait_for_sync(&mut self) -> Option<SyncDone> {
        self.syncing?;
        let mut st = self.shared.state.lock();
        loop {
            if let Some(done) = st.sync_done.take() {
                return Some(done);
            }
            self.shared
                .wake_writer
                .wait_for(&mut st, PERIODIC_WRITE_EVERY);
        }
    }

    /// A finished fsync: publish what it made durable and recycle the rounds it covers.
    fn sync_finished(&mut self, done: SyncDone) -> io::Result<()> {
        self.syncing = None;
        done.result?;
        self.synced_lsn = done.lsn;
        self.shared.durable.send_modify(|d| d.synced = done.lsn);
        let mut covered = Vec::new();
        while self.unsynced.front().is_some_and(|c| c.end_lsn <= done.lsn) {
            let chunk = self.unsynced.pop_front().expect("front exists");
            self.unsynced_bytes -= chunk.bytes.len();
            covered.push(chunk);
        }
        self.recover_if_failing();
        self.recycle(covered);
        Ok(())
    }

    /// A write or fsync failed: whatever was written but not fsynced may be lost, so start
    /// a fresh file (next part) and requeue every unsynced round, then `unwritten`, in
    /// order. Those rounds were not fsynced (the file is abandoned unsynced), and
    /// `synced_lsn` will pass their LSNs once the rewrite is synced, so a late group-commit
    /// waiter would otherwise be acknowledged for them. A chunk that reached the old file
    /// as well is replayed twice: harmless (LWW).
    fn fail(&mut self, e: io::Error, unwritten: Vec<Chunk>) {
        self.failures += 1;
        self.shared
            .stats
            .write_errors
            .fetch_add(1, Ordering::Relaxed);
        let reason = format!("{e} (in {})", self.shared.opts.dir.display());
        tracing::error!(error = %reason, "commit-log write failed; refusing appends until the disk recovers");
        // Files left behind keep their names, so the rewrite needs a new part number; a file
        // that holds no record is deleted instead, and its name reused, so a writer retrying
        // on a full disk every `RETRY_AFTER_ERROR` does not leave a file per try.
        let mut new_part = !self.unsynced_files.is_empty();
        self.unsynced_files.clear();
        if let Some(open) = self.file.take() {
            if open.chunks == 0 {
                self.discard_unwritten(open);
            } else {
                new_part = true;
            }
        }
        if new_part {
            self.next_part += 1;
        }
        self.shared.open_segment.store(0, Ordering::Release);
        self.written_lsn = self.synced_lsn;
        let mut st = self.shared.state.lock();
        st.pending_bytes += self.unsynced_bytes;
        self.unsynced_bytes = 0;
        for chunk in unwritten.into_iter().rev() {
            st.queue.push_front(chunk);
        }
        while let Some(chunk) = self.unsynced.pop_back() {
            st.queue.push_front(chunk);
        }
        st.failing = Some(reason);
        drop(st);
        let failures = self.failures;
        self.shared.durable.send_modify(|d| d.failures = failures);
    }

    /// The log closes after a write error: what is still queued is not on disk.
    fn abandon(&mut self) {
        tracing::error!(
            "commit log closed with unwritten records after a write error; \
             acknowledged records in periodic mode may be lost"
        );
    }

    fn recover_if_failing(&mut self) {
        let mut st = self.shared.state.lock();
        if st.failing.take().is_some() {
            tracing::info!("commit log writable again; accepting appends");
        }
    }

    fn recycle(&mut self, chunks: Vec<Chunk>) {
        let mut st = self.shared.state.lock();
        for mut chunk in chunks {
            if st.spare.len() < 4 && chunk.bytes.capacity() <= 16 << 20 {
                chunk.bytes.clear();
                st.spare.push(chunk.bytes);
            }
        }
    }
}

/// The remover thread: deletes obsolete files whenever some are announced, until the log
/// closes (after a last pass, if one is due).
fn run_remover(shared: &Shared) {
    loop {
        {
            let mut removal = shared.removal.lock();
            while !removal.pending && !removal.closed {
                shared.wake_remover.wait(&mut removal);
            }
            if !removal.pending {
                return;
            }
            removal.pending = false;
        }
        if let Err(e) = remove_obsolete(shared) {
            tracing::warn!(error = %e, "could not list the commit-log directory; will retry");
            let mut removal = shared.removal.lock();
            if !removal.closed {
                removal.pending = true;
                drop(removal);
                std::thread::sleep(RETRY_AFTER_ERROR);
            }
        }
    }
}

/// Deletes the segments and snapshots marked obsolete, except the writer's open segment.
/// The segment gauges go down by what it deleted rather than being recounted: the writer
/// adds to them meanwhile, and a recount would lose what it wrote during the deletions
/// (an `unlink` can take a third of a second here), so the log guard would see too small
/// a log. A marked segment the writer opens during the pass (it lags behind the flush) may
/// go too: harmless, since every record of a marked segment is in the store or a snapshot.
fn remove_obsolete(shared: &Shared) -> io::Result<()> {
    let segments_upto = shared.segments_obsolete.load(Ordering::Acquire);
    let snapshots_upto = shared.snapshots_obsolete.load(Ordering::Acquire);
    let open = shared.open_segment.load(Ordering::Acquire);
    let listing = list_dir(&shared.opts.dir)?;
    let (mut removed_bytes, mut removed) = (0, 0);
    for seg in listing.segments {
        if seg.segment <= segments_upto && seg.segment != open {
            let len = file_len(&seg.path);
            match fs::remove_file(&seg.path) {
                Ok(()) => {
                    removed_bytes += len;
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %seg.path.display(), error = %e, "could not remove obsolete commit-log file")
                }
            }
        }
    }
    let mut snapshot_bytes = 0;
    for (id, path) in listing.snapshots {
        if id <= snapshots_upto {
            remove_file_logged(&path);
        } else {
            snapshot_bytes += file_len(&path);
        }
    }
    let stats = &shared.stats;
    let minus = |gauge: &AtomicU64, by: u64| {
        let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(by))
        });
    };
    minus(&stats.segment_bytes_on_disk, removed_bytes);
    minus(&stats.segments_on_disk, removed);
    stats
        .snapshot_bytes_on_disk
        .store(snapshot_bytes, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, Value};

    fn opts(dir: &Path, mode: SyncMode) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            sync_mode: mode,
            sync_interval_ms: 5,
            segment_bytes: 64 << 10,
            max_buffer_bytes: 1 << 20,
        }
    }

    fn recs(n: u64, salt: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record::new(Key::new(salt, 1, i), Value::new(i as u32, 1_000 + i, 1)))
            .collect()
    }

    fn reopen(dir: &Path) -> (Vec<Record>, ReplayReport) {
        let mut seen = Vec::new();
        let (wal, report) =
            Wal::open(opts(dir, SyncMode::Group), |rs| seen.extend_from_slice(rs)).unwrap();
        wal.close();
        (seen, report)
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        list_dir(dir)
            .unwrap()
            .segments
            .into_iter()
            .map(|s| s.path)
            .collect()
    }

    #[tokio::test]
    async fn group_commit_waits_for_fsync_and_replays_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Group), |_| {}).unwrap();
        let mut all = Vec::new();
        for salt in 0..20 {
            let batch = recs(100, salt);
            let lsn = wal.append(&batch).unwrap();
            wal.wait_durable(lsn).await.unwrap();
            assert!(wal.synced_lsn() >= lsn);
            all.extend(batch);
        }
        wal.close();
        let (seen, report) = reopen(dir.path());
        assert_eq!(seen, all);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.segments > 1, "64 KiB segments must have rotated");
    }

    /// With everything durable the writer sleeps (no 2 ms polling), and an append wakes
    /// it: the record is written and fsynced long before the sleep would have ended.
    #[test]
    fn an_append_wakes_the_idle_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        for salt in 1..=3 {
            // Let the writer write, sync and fall asleep.
            std::thread::sleep(Duration::from_millis(50));
            let started = Instant::now();
            let lsn = wal.append(&recs(10, salt)).unwrap();
            while wal.synced_lsn() < lsn {
                assert!(
                    started.elapsed() < IDLE_WAIT / 2,
                    "append {salt} did not wake the idle writer"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        wal.close();
        assert_eq!(reopen(dir.path()).0.len(), 30);
    }

    #[test]
    fn periodic_mode_close_writes_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        wal.append(&recs(10, 1)).unwrap();
        wal.close();
        assert_eq!(wal.append(&recs(1, 1)), Err(WalError::Closed));
        assert_eq!(reopen(dir.path()).0, recs(10, 1));
    }

    #[test]
    fn torn_tail_is_reported_truncated_and_the_rest_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        wal.append(&recs(10, 1)).unwrap();
        wal.append(&recs(10, 2)).unwrap();
        wal.close();
        let file = segment_files(dir.path()).pop().unwrap();
        let len = file_len(&file);
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let (seen, report) = reopen(dir.path());
        assert_eq!(seen, recs(10, 1));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.truncated_bytes > 0);
        let expected_len = (FILE_HEADER_BYTES + FRAME_HEADER_BYTES + 10 * 40) as u64;
        assert_eq!(
            file_len(&file),
            expected_len,
            "tail truncated at the last good frame"
        );
        // A second start finds a clean log.
        let (again, report) = reopen(dir.path());
        assert_eq!(again, recs(10, 1));
        assert!(report.problems.is_empty());
    }

    #[test]
    fn flipped_bits_in_the_middle_skip_exactly_that_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        for salt in 0..3 {
            wal.append(&recs(10, salt)).unwrap();
        }
        wal.close();
        let file = segment_files(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&file).unwrap();
        let frame = FRAME_HEADER_BYTES + 400;
        bytes[FILE_HEADER_BYTES + frame + 100] ^= 0x10;
        fs::write(&file, &bytes).unwrap();
        let (seen, report) = reopen(dir.path());
        let mut expected = recs(10, 0);
        expected.extend(recs(10, 2));
        assert_eq!(seen, expected);
        assert_eq!(report.corrupt_regions, 1);
        assert_eq!(report.corrupt_bytes, frame as u64);
        assert_eq!(report.truncated_bytes, 0);
    }

    #[test]
    fn garbage_file_header_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(segment_name(3, 0)), b"not a wal").unwrap();
        let (seen, report) = reopen(dir.path());
        assert!(seen.is_empty());
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(dir
            .path()
            .join("00000000000000000003-0000.wal.corrupt")
            .exists());
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Files that hold no record (empty, or a torn header: what a crash or a full disk
    /// between creating a file and writing its header leaves, and what older versions set
    /// aside by the thousand) are deleted at start. A file with a damaged header is kept
    /// aside as `.corrupt`, its intact frames replayed at every start, until its segment is
    /// flushed; then the remover deletes it.
    #[test]
    fn unwritten_files_go_at_start_and_set_aside_files_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join(segment_name(3, 0)), b"").unwrap();
        fs::write(d.join(segment_name(4, 0)), &SEGMENT_MAGIC[..5]).unwrap();
        let mut header = Vec::new();
        write_file_header(&mut header, SEGMENT_MAGIC, 4).unwrap();
        fs::write(d.join(segment_name(4, 1)), &header[..12]).unwrap();
        fs::write(d.join("00000000000000000005-0000.wal.corrupt"), b"").unwrap();
        // Segment 6: a damaged header, then two intact frames.
        let mut damaged = b"garbage!garbage!".to_vec();
        encode_frame(&mut damaged, &recs(10, 6));
        encode_frame(&mut damaged, &recs(5, 7));
        fs::write(d.join(segment_name(6, 0)), &damaged).unwrap();
        fs::write(d.join(segment_name(7, 0)), b"not a wal").unwrap();

        let (seen, report) = reopen(d);
        let mut expected = recs(10, 6);
        expected.extend(recs(5, 7));
        assert_eq!(seen, expected, "{:?}", report.problems);
        assert_eq!(report.problems.len(), 6, "{:?}", report.problems);
        assert_eq!(
            names(d),
            [
                "00000000000000000006-0000.wal.corrupt",
                "00000000000000000007-0000.wal.corrupt"
            ]
        );
        // Kept aside, replayed again at the next start (no flush covered it yet).
        let (again, _) = reopen(d);
        assert_eq!(again, expected);

        let (wal, _) = Wal::open(opts(d, SyncMode::Periodic), |_| {}).unwrap();
        assert!(
            wal.rotate() > 7,
            "new segments number past the set-aside ones"
        );
        wal.mark_flushed(6);
        wait_until("segment 6 removed", || names(d).len() == 1);
        assert_eq!(names(d), ["00000000000000000007-0000.wal.corrupt"]);
        wal.mark_flushed(7);
        wait_until("segment 7 removed", || names(d).is_empty());
        assert_eq!(wal.stats().segments_on_disk.load(Ordering::Relaxed), 0);
        wal.close();
    }

    #[test]
    fn flushed_segments_are_deleted_and_new_segments_continue_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        wal.append(&recs(10, 1)).unwrap();
        let sealed = wal.rotate();
        wal.append(&recs(10, 2)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        wal.mark_flushed(sealed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while segment_files(dir.path()).len() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        wal.close();
        assert_eq!(reopen(dir.path()).0, recs(10, 2));
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        assert!(wal.rotate() > sealed + 1);
    }

    /// The remover deletes what is obsolete, leaves the file the writer has open even
    /// when its segment is marked, recounts the gauges, and stops when the log closes.
    #[test]
    fn the_remover_spares_the_open_segment_and_recounts_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Group), |_| {}).unwrap();
        wal.append(&recs(10, 1)).unwrap();
        let sealed = wal.rotate();
        let lsn = wal.append(&recs(10, 2)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while wal.synced_lsn() < lsn && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(segment_files(dir.path()).len(), 2);
        // The open segment is marked too, as when the writer lags behind a flush.
        wal.mark_flushed(sealed + 1);
        let stats = wal.stats();
        while (segment_files(dir.path()).len() != 1
            || stats.segments_on_disk.load(Ordering::Relaxed) != 1)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = segment_files(dir.path());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0]
            .to_string_lossy()
            .contains(&format!("{:020}", sealed + 1)));
        assert_eq!(
            stats.segment_bytes_on_disk.load(Ordering::Relaxed),
            file_len(&left[0])
        );
        wal.close();
        assert_eq!(reopen(dir.path()).0, recs(10, 2));
    }

    #[test]
    fn snapshot_replaces_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        for salt in 0..5 {
            wal.append(&recs(500, salt)).unwrap();
        }
        let covered = wal.rotate();
        let kept = recs(3, 99);
        wal.write_snapshot(covered, |sink| sink(&kept)).unwrap();
        wal.append(&recs(2, 7)).unwrap();
        wal.close();
        let (seen, report) = reopen(dir.path());
        assert_eq!(report.snapshot, Some(covered));
        let mut expected = kept.clone();
        expected.extend(recs(2, 7));
        assert_eq!(seen, expected);
    }

    #[test]
    fn full_buffer_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), SyncMode::Periodic);
        o.max_buffer_bytes = 64 << 10;
        let (wal, _) = Wal::open(o, |_| {}).unwrap();
        let big = recs(2_000, 1); // 80 KB > 64 KiB
        assert_eq!(wal.append(&big), Err(WalError::BufferFull(64 << 10)));
        assert_eq!(wal.stats().refused_appends.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn frames_split_past_the_per_frame_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), SyncMode::Periodic);
        o.max_buffer_bytes = 64 << 20;
        o.segment_bytes = 64 << 20;
        let (wal, _) = Wal::open(o, |_| {}).unwrap();
        let many = recs(MAX_RECORDS_PER_FRAME as u64 + 5, 1);
        wal.append(&many).unwrap();
        wal.close();
        let (seen, report) = reopen(dir.path());
        assert_eq!(report.frames, 2);
        assert_eq!(seen, many);
    }
}
