//! Snapshots: when the store is down for long, a compact copy of the dirty set (one record
//! per key, O(keys) not O(writes)) replaces the segments it covers, so the log stays bounded.

use std::fs::{self, File};
use std::io::{self, Write};
use std::sync::atomic::Ordering;

use super::format::{
    encode_frame, write_file_header, FRAME_HEADER_BYTES, MAX_FRAME_PAYLOAD, MAX_RECORDS_PER_FRAME,
    SNAPSHOT_MAGIC,
};
use super::segments::{snapshot_name, sync_dir};
use super::Wal;
use crate::model::Record;

impl Wal {
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
}
