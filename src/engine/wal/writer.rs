//! The writer thread, which moves appended frames from the shared buffer to the segment
//! file, and the syncer thread, which fsyncs behind it in `periodic` mode (`group` mode
//! fsyncs on the writer's thread). Both publish what became durable to group-commit waiters
//! and, on an I/O error, rewrite what no fsync covered on a fresh file.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::format::{write_file_header, FILE_HEADER_BYTES, SEGMENT_MAGIC};
use super::segments::segment_name;
use super::{queue_buffer, Chunk, Lsn, Shared, SyncMode};

/// In periodic mode the writer drains the buffer at least this often.
pub(super) const PERIODIC_WRITE_EVERY: Duration = Duration::from_millis(2);

/// How long the writer sleeps with nothing to do before looking again. Every event that
/// gives it work wakes it, so this is only a safety net.
pub(super) const IDLE_WAIT: Duration = Duration::from_secs(5);

/// After an I/O error the writer retries on a fresh file this often.
pub(super) const RETRY_AFTER_ERROR: Duration = Duration::from_millis(200);

/// An fsync handed to the syncer thread: the log directory (when a file was created since
/// the last job), then `files` in order; after all of them every byte below `lsn` is
/// durable. A record is durable only once both its bytes and its file's directory entry
/// are, so the directory's fsync belongs to the job that covers the new file's first bytes.
pub(super) struct SyncJob {
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
pub(super) struct SyncDone {
    pub(super) lsn: Lsn,
    pub(super) result: io::Result<()>,
}

/// The syncer thread: fsyncs what the writer hands it while the writer goes on writing, so
/// a slow fsync does not stop the buffer from draining. Ends when the writer drops its
/// sender.
pub(super) fn run_syncer(shared: &Shared, jobs: crossbeam::channel::Receiver<SyncJob>) {
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
pub(super) struct Writer {
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
    pub(super) fn new(
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
    pub(super) fn run(mut self) -> Lsn {
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
