//! The bytes of the commit log: a 16-byte file header (magic, segment number), then frames
//! of `magic u32 | len u32 | crc32c u32 | payload` whose payload is whole 40-byte records.
//! Encoding and decoding only, no I/O: [`super::replay`] reads files with these, the
//! writer and [`super::snapshot`] write them.

use std::io::{self, Write};

use crate::model::Record;

pub(super) const SEGMENT_MAGIC: &[u8; 8] = b"PHWALSEG";

pub(super) const SNAPSHOT_MAGIC: &[u8; 8] = b"PHWALSNP";

pub(super) const FILE_HEADER_BYTES: usize = 16;

const FRAME_MAGIC: u32 = 0x3152_4850;

pub(super) const FRAME_HEADER_BYTES: usize = 12;

/// Upper bound on one frame's records: bounds what a corrupt length can make replay read
/// and keeps a single append's frame reasonable. Larger appends are split.
pub const MAX_RECORDS_PER_FRAME: usize = 65_536;

pub(super) const MAX_FRAME_PAYLOAD: usize = MAX_RECORDS_PER_FRAME * Record::ENCODED_BYTES;

pub(super) fn encode_frame(out: &mut Vec<u8>, records: &[Record]) {
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
pub(super) enum Frame<'a> {
    Ok {
        payload: &'a [u8],
        next: usize,
    },
    /// Not enough bytes left for the header or the payload its length announces.
    Truncated,
    /// Bad magic, impossible length or checksum mismatch.
    Corrupt,
}

pub(super) fn decode_frame(buf: &[u8], at: usize) -> Frame<'_> {
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
pub(super) fn resync(buf: &[u8], from: usize) -> Option<usize> {
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

pub(super) fn write_file_header(
    out: &mut impl Write,
    magic: &[u8; 8],
    segment: u64,
) -> io::Result<()> {
    out.write_all(magic)?;
    out.write_all(&segment.to_le_bytes())
}
