//! The log's files on disk: their names, listing the directory, and the remover thread
//! that deletes segments and snapshots once the store (or a newer snapshot) covers them.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::writer::RETRY_AFTER_ERROR;
use super::Shared;

pub(super) struct SegmentFile {
    pub(super) segment: u64,
    pub(super) part: u32,
    pub(super) path: PathBuf,
    /// A `.wal.corrupt` file: its header was damaged when replay first found it.
    pub(super) set_aside: bool,
}

#[derive(Default)]
pub(super) struct DirListing {
    /// Sorted by (segment, part).
    pub(super) segments: Vec<SegmentFile>,
    pub(super) snapshots: Vec<(u64, PathBuf)>,
    pub(super) temporary: Vec<PathBuf>,
}

pub(super) fn segment_name(segment: u64, part: u32) -> String {
    format!("{segment:020}-{part:04}.wal")
}

pub(super) fn snapshot_name(segment: u64) -> String {
    format!("snapshot-{segment:020}.snap")
}

pub(super) fn list_dir(dir: &Path) -> io::Result<DirListing> {
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

pub(super) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub(super) fn remove_file_logged(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove obsolete commit-log file");
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
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

/// The remover thread: deletes obsolete files whenever some are announced, until the log
/// closes (after a last pass, if one is due).
pub(super) fn run_remover(shared: &Shared) {
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
