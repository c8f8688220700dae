//! The commit log against a real directory: group commit, replay, damage, removal.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::format::{
    encode_frame, write_file_header, FILE_HEADER_BYTES, FRAME_HEADER_BYTES, SEGMENT_MAGIC,
};
use super::segments::{file_len, list_dir, segment_name};
use super::writer::IDLE_WAIT;
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
