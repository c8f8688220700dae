//! Start-up replay: the newest snapshot, then every segment after it, into the caller's
//! `apply`. Damaged regions are skipped (every intact frame after them is recovered) and
//! torn tails truncated; nothing damaged stops the server from starting.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::format::{
    decode_frame, resync, Frame, FILE_HEADER_BYTES, MAX_RECORDS_PER_FRAME, SEGMENT_MAGIC,
    SNAPSHOT_MAGIC,
};
use super::segments::{
    create_private_dir, file_len, list_dir, remove_file_logged, snapshot_name, SegmentFile,
};
use super::{WalOptions, WalStats};
use crate::model::Record;

/// Replays the log in `opts.dir` into `apply`: the newest snapshot first, then the segments
/// it does not cover, in order. Deletes what is obsolete (older snapshots, segments the
/// snapshot covers, temporary files), repairs torn tails, and returns the first segment
/// number for new appends, the report, and the log's disk gauges as found.
pub(super) fn replay_dir(
    opts: &WalOptions,
    mut apply: impl FnMut(&[Record]),
) -> io::Result<(u64, ReplayReport, WalStats)> {
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

    Ok((max_segment + 1, report, stats))
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

/// Replays a snapshot into `apply`; damaged regions are skipped and reported, a damaged tail
/// is truncated. Returns an error only when the file cannot be read or repaired.
pub(super) fn replay_file(
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
pub(super) fn replay_segment(
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
