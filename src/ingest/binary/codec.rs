//! The binary ingest protocol, version 1: frames on a TCP stream. Specification:
//! docs/protocol.md; this module is the codec only (no I/O), so it is unit-testable and
//! fuzzable (`fuzz/fuzz_targets/frame_decoder.rs`).
//!
//! Every frame is a 12-byte header and a payload, little-endian:
//!
//! ```text
//! offset 0  u16  magic 0x5048 ("PH" read as little-endian bytes 48 50)
//!        2  u8   version (1)
//!        3  u8   type
//!        4  u32  payload length in bytes
//!        8  u32  CRC32C of the payload
//!       12  ...  payload
//! ```
//!
//! Napkin math: a heartbeat record is 40 bytes; a batch of 1024 records is a 40 KiB frame
//! with one CRC (≈ 2 µs at 20 GB/s) and one header, so framing costs well under 1 % of the
//! bytes and CPU of a batch.

use bytes::{Buf, BufMut, BytesMut};

/// The frame magic, `b"PH"` as a little-endian u16.
pub const MAGIC: u16 = u16::from_le_bytes(*b"PH");
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 12;
/// Bytes of one heartbeat record in a batch.
pub const RECORD_BYTES: usize = 40;
/// Bytes of a batch payload before its records: sequence number and record count.
pub const BATCH_PREFIX_BYTES: usize = 12;
/// Bytes of one rejection in an acknowledgement.
pub const REJECTION_BYTES: usize = 8;
/// Longest error message the server sends (longer ones are cut).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Longest authentication secret a HELLO may carry.
pub const MAX_SECRET_BYTES: usize = 1024;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// client → server, first frame: authenticate.
    Hello = 1,
    /// server → client: the handshake succeeded; carries the server's limits.
    HelloOk = 2,
    /// client → server: a batch of heartbeats.
    Batch = 3,
    /// server → client: a batch is acknowledged (durable per the sync mode).
    Ack = 4,
    /// server → client: a batch was refused because the server is overloaded; retry it.
    Busy = 5,
    /// server → client: a protocol error; the server closes the connection after it.
    Error = 6,
}

impl FrameType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloOk,
            3 => Self::Batch,
            4 => Self::Ack,
            5 => Self::Busy,
            6 => Self::Error,
            _ => return None,
        })
    }
}

/// Protocol error codes, carried by ERROR frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    BadMagic = 1,
    UnsupportedVersion = 2,
    UnknownType = 3,
    FrameTooLarge = 4,
    BadCrc = 5,
    Malformed = 6,
    NotAuthenticated = 7,
    AuthFailed = 8,
    TooManyRecords = 9,
    Timeout = 10,
    UnexpectedFrame = 11,
    TooManyConnections = 12,
    ShuttingDown = 13,
    Truncated = 14,
}

impl ErrorCode {
    /// The label used in metrics, logs and docs/protocol.md.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadMagic => "bad_magic",
            UnsupportedVersion => "unsupported_version",
            UnknownType => "unknown_type",
            FrameTooLarge => "frame_too_large",
            BadCrc => "bad_crc",
            Malformed => "malformed",
            NotAuthenticated => "not_authenticated",
            AuthFailed => "auth_failed",
            TooManyRecords => "too_many_records",
            Timeout => "timeout",
            UnexpectedFrame => "unexpected_frame",
            TooManyConnections => "too_many_connections",
            ShuttingDown => "shutting_down",
            Truncated => "truncated",
        }
    }

    pub fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadMagic,
            2 => UnsupportedVersion,
            3 => UnknownType,
            4 => FrameTooLarge,
            5 => BadCrc,
            6 => Malformed,
            7 => NotAuthenticated,
            8 => AuthFailed,
            9 => TooManyRecords,
            10 => Timeout,
            11 => UnexpectedFrame,
            12 => TooManyConnections,
            13 => ShuttingDown,
            14 => Truncated,
            _ => return None,
        })
    }
}

/// Why one record of a batch was refused (the rest of the batch is unaffected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectCode {
    /// `title_id` is not in the catalog.
    UnknownTitle = 1,
    /// `position_seconds` is beyond the title's duration plus the allowance, or reserved.
    PositionOutOfRange = 2,
    /// `timestamp_ms` is older than the retention period.
    TimestampTooOld = 3,
}

impl RejectCode {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::UnknownTitle,
            2 => Self::PositionOutOfRange,
            3 => Self::TimestampTooOld,
            _ => return None,
        })
    }

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownTitle => "unknown_movie",
            Self::PositionOutOfRange => "position_out_of_range",
            Self::TimestampTooOld => "timestamp_too_old",
        }
    }
}

/// One heartbeat as it travels in a batch (40 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireRecord {
    pub account_id: u64,
    pub profile_id: u64,
    /// The catalog's compact title id ([`crate::resume::catalog::title_id_of`] of the movie id).
    pub title_id: u64,
    pub position_seconds: u32,
    pub device_id: u32,
    /// When the client saw the position, ms since the epoch; 0 = let the server stamp it.
    pub timestamp_ms: u64,
}

impl WireRecord {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64_le(self.account_id);
        out.put_u64_le(self.profile_id);
        out.put_u64_le(self.title_id);
        out.put_u32_le(self.position_seconds);
        out.put_u32_le(self.device_id);
        out.put_u64_le(self.timestamp_ms);
    }

    /// Decodes one record; `bytes` must hold at least [`RECORD_BYTES`].
    pub fn decode(mut bytes: &[u8]) -> Self {
        debug_assert!(bytes.len() >= RECORD_BYTES);
        Self {
            account_id: bytes.get_u64_le(),
            profile_id: bytes.get_u64_le(),
            title_id: bytes.get_u64_le(),
            position_seconds: bytes.get_u32_le(),
            device_id: bytes.get_u32_le(),
            timestamp_ms: bytes.get_u64_le(),
        }
    }
}

/// The server's limits, announced in HELLO_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_frame_bytes: u32,
    pub max_records_per_batch: u32,
    pub max_in_flight_batches: u32,
}

/// A decoded frame. Batch records stay as bytes (decoded one at a time by the consumer,
/// no per-record allocation).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello {
        secret: &'a [u8],
    },
    HelloOk(ServerLimits),
    Batch {
        seq: u64,
        records: &'a [u8],
    },
    Ack {
        seq: u64,
        accepted: u32,
        rejections: &'a [u8],
    },
    Busy {
        seq: u64,
        retry_after_ms: u32,
    },
    Error {
        code: u16,
        message: &'a str,
    },
}

impl Frame<'_> {
    /// Iterates a batch's records.
    pub fn records(records: &[u8]) -> impl Iterator<Item = WireRecord> + '_ {
        records.chunks_exact(RECORD_BYTES).map(WireRecord::decode)
    }

    /// Iterates an ack's rejections as (record index, reason code byte).
    pub fn rejections(rejections: &[u8]) -> impl Iterator<Item = (u32, u8)> + '_ {
        rejections
            .chunks_exact(REJECTION_BYTES)
            .map(|mut c| (c.get_u32_le(), c[0]))
    }
}

/// Why bytes are not a valid frame. Each maps to the [`ErrorCode`] the server answers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {0:#06x}, expected {MAGIC:#06x}")]
    BadMagic(u16),
    #[error("unsupported protocol version {0}, this server speaks {VERSION}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("payload CRC32C mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("malformed {kind:?} frame: {detail}")]
    Malformed { kind: FrameType, detail: String },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadMagic(_) => ErrorCode::BadMagic,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::UnknownType(_) => ErrorCode::UnknownType,
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::BadCrc { .. } => ErrorCode::BadCrc,
            Self::Malformed { .. } => ErrorCode::Malformed,
        }
    }
}

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameType,
    pub payload_bytes: u32,
    pub crc: u32,
}

/// Checks a header. Run it as soon as [`HEADER_BYTES`] have arrived, so an oversized or
/// garbage frame is refused before its payload is read.
pub fn decode_header(
    bytes: &[u8; HEADER_BYTES],
    max_payload_bytes: u32,
) -> Result<Header, DecodeError> {
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[2]));
    }
    let kind = FrameType::from_u8(bytes[3]).ok_or(DecodeError::UnknownType(bytes[3]))?;
    let payload_bytes = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if payload_bytes > max_payload_bytes {
        return Err(DecodeError::TooLarge {
            len: u64::from(payload_bytes),
            max: max_payload_bytes,
        });
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    Ok(Header {
        kind,
        payload_bytes,
        crc,
    })
}

/// Tries to decode one whole frame from the front of `buf`. `Ok(None)`: more bytes are
/// needed. `Ok(Some((frame, consumed)))`: a frame and how many bytes it took.
pub fn decode_frame(
    buf: &[u8],
    max_payload_bytes: u32,
) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    decode(buf, max_payload_bytes, true)
}

/// [`decode_frame`] without the CRC check, for a frame that already passed
/// [`decode_frame`] (a server checks once, then parses: one CRC pass per frame).
pub fn decode_checked_frame(
    buf: &[u8],
    max_payload_bytes: u32,
) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    decode(buf, max_payload_bytes, false)
}

fn decode(
    buf: &[u8],
    max_payload_bytes: u32,
    check_crc: bool,
) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    let Some(head) = buf.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = decode_header(head, max_payload_bytes)?;
    let total = HEADER_BYTES + header.payload_bytes as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &buf[HEADER_BYTES..total];
    if check_crc {
        let actual = crc32c::crc32c(payload);
        if actual != header.crc {
            return Err(DecodeError::BadCrc {
                expected: header.crc,
                actual,
            });
        }
    }
    Ok(Some((decode_payload(header.kind, payload)?, total)))
}

fn malformed(kind: FrameType, detail: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        kind,
        detail: detail.into(),
    }
}

fn decode_payload(kind: FrameType, payload: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut p = payload;
    let need = |n: usize, what: &str| -> Result<(), DecodeError> {
        if payload.len() < n {
            Err(malformed(
                kind,
                format!("{} bytes is too short for {what}", payload.len()),
            ))
        } else {
            Ok(())
        }
    };
    Ok(match kind {
        FrameType::Hello => {
            need(2, "the secret length")?;
            let len = p.get_u16_le() as usize;
            if len > MAX_SECRET_BYTES || p.len() != len {
                return Err(malformed(
                    kind,
                    format!("secret length {len} does not match the {} bytes that follow (max {MAX_SECRET_BYTES})", p.len()),
                ));
            }
            Frame::Hello { secret: p }
        }
        FrameType::HelloOk => {
            need(12, "three limits")?;
            if payload.len() != 12 {
                return Err(malformed(kind, "expected exactly 12 bytes"));
            }
            Frame::HelloOk(ServerLimits {
                max_frame_bytes: p.get_u32_le(),
                max_records_per_batch: p.get_u32_le(),
                max_in_flight_batches: p.get_u32_le(),
            })
        }
        FrameType::Batch => {
            need(BATCH_PREFIX_BYTES, "sequence number and count")?;
            let seq = p.get_u64_le();
            let count = p.get_u32_le() as usize;
            if count == 0 {
                return Err(malformed(kind, "a batch holds at least one record"));
            }
            if p.len() != count.saturating_mul(RECORD_BYTES) {
                return Err(malformed(
                    kind,
                    format!(
                        "count {count} needs {} record bytes, {} follow",
                        count.saturating_mul(RECORD_BYTES),
                        p.len()
                    ),
                ));
            }
            Frame::Batch { seq, records: p }
        }
        FrameType::Ack => {
            need(16, "sequence number and counts")?;
            let seq = p.get_u64_le();
            let accepted = p.get_u32_le();
            let rejected = p.get_u32_le() as usize;
            if p.len() != rejected.saturating_mul(REJECTION_BYTES) {
                return Err(malformed(
                    kind,
                    format!("{rejected} rejections do not match {} bytes", p.len()),
                ));
            }
            Frame::Ack {
                seq,
                accepted,
                rejections: p,
            }
        }
        FrameType::Busy => {
            if payload.len() != 12 {
                return Err(malformed(kind, "expected exactly 12 bytes"));
            }
            Frame::Busy {
                seq: p.get_u64_le(),
                retry_after_ms: p.get_u32_le(),
            }
        }
        FrameType::Error => {
            need(4, "code and message length")?;
            let code = p.get_u16_le();
            let len = p.get_u16_le() as usize;
            if p.len() != len {
                return Err(malformed(kind, "message length does not match the payload"));
            }
            let message =
                std::str::from_utf8(p).map_err(|_| malformed(kind, "message is not UTF-8"))?;
            Frame::Error { code, message }
        }
    })
}

/// Starts a frame of `kind` at the end of `out`; returns the offset to pass to
/// [`finish_frame`] once the payload is written after it.
pub fn start_frame(out: &mut BytesMut, kind: FrameType) -> usize {
    let start = out.len();
    out.put_u16_le(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u32_le(0);
    out.put_u32_le(0);
    start
}

/// Fills in the length and CRC of the frame started at `start`.
pub fn finish_frame(out: &mut BytesMut, start: usize) {
    let payload = &out[start + HEADER_BYTES..];
    let len = payload.len() as u32;
    let crc = crc32c::crc32c(payload);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

pub fn encode_hello(out: &mut BytesMut, secret: &[u8]) {
    let start = start_frame(out, FrameType::Hello);
    out.put_u16_le(secret.len() as u16);
    out.put_slice(secret);
    finish_frame(out, start);
}

pub fn encode_hello_ok(out: &mut BytesMut, limits: ServerLimits) {
    let start = start_frame(out, FrameType::HelloOk);
    out.put_u32_le(limits.max_frame_bytes);
    out.put_u32_le(limits.max_records_per_batch);
    out.put_u32_le(limits.max_in_flight_batches);
    finish_frame(out, start);
}

pub fn encode_batch(out: &mut BytesMut, seq: u64, records: &[WireRecord]) {
    let start = start_frame(out, FrameType::Batch);
    out.reserve(BATCH_PREFIX_BYTES + records.len() * RECORD_BYTES);
    out.put_u64_le(seq);
    out.put_u32_le(records.len() as u32);
    for r in records {
        r.encode(out);
    }
    finish_frame(out, start);
}

/// Rewrites the sequence number of an encoded batch frame in place (and its CRC), so a load
/// generator can send pre-encoded frames without re-encoding the records.
pub fn set_batch_seq(frame: &mut [u8], seq: u64) {
    frame[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&frame[HEADER_BYTES..]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
}

pub fn encode_ack(out: &mut BytesMut, seq: u64, accepted: u32, rejections: &[(u32, RejectCode)]) {
    let start = start_frame(out, FrameType::Ack);
    out.put_u64_le(seq);
    out.put_u32_le(accepted);
    out.put_u32_le(rejections.len() as u32);
    for &(index, code) in rejections {
        out.put_u32_le(index);
        out.put_u8(code as u8);
        out.put_bytes(0, 3);
    }
    finish_frame(out, start);
}

pub fn encode_busy(out: &mut BytesMut, seq: u64, retry_after_ms: u32) {
    let start = start_frame(out, FrameType::Busy);
    out.put_u64_le(seq);
    out.put_u32_le(retry_after_ms);
    finish_frame(out, start);
}

pub fn encode_error(out: &mut BytesMut, code: ErrorCode, message: &str) {
    let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let start = start_frame(out, FrameType::Error);
    out.put_u16_le(code as u16);
    out.put_u16_le(message.len() as u16);
    out.put_slice(message.as_bytes());
    finish_frame(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 20;

    fn record(i: u64) -> WireRecord {
        WireRecord {
            account_id: i,
            profile_id: i + 1,
            title_id: i * 7,
            position_seconds: i as u32,
            device_id: 3,
            timestamp_ms: 1_760_000_000_000 + i,
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let mut out = BytesMut::new();
        encode_hello(&mut out, b"secret");
        let limits = ServerLimits {
            max_frame_bytes: 1,
            max_records_per_batch: 2,
            max_in_flight_batches: 3,
        };
        encode_hello_ok(&mut out, limits);
        let records: Vec<_> = (0..5).map(record).collect();
        encode_batch(&mut out, 42, &records);
        encode_ack(&mut out, 42, 4, &[(3, RejectCode::UnknownTitle)]);
        encode_busy(&mut out, 43, 100);
        encode_error(&mut out, ErrorCode::BadCrc, "bad crc");

        let mut buf = &out[..];
        let mut frames = Vec::new();
        while let Some((frame, used)) = decode_frame(buf, MAX).unwrap() {
            frames.push(format!("{frame:?}"));
            if let Frame::Batch {
                seq,
                records: bytes,
            } = frame
            {
                assert_eq!(seq, 42);
                assert_eq!(Frame::records(bytes).collect::<Vec<_>>(), records);
            }
            if let Frame::Ack { rejections, .. } = frame {
                assert_eq!(
                    Frame::rejections(rejections).collect::<Vec<_>>(),
                    vec![(3, 1)]
                );
            }
            buf = &buf[used..];
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 6);
        assert!(frames[0].contains("Hello"));
        assert!(frames[1].contains("max_in_flight_batches: 3"));
        assert!(frames[5].contains("bad crc"));
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let mut out = BytesMut::new();
        encode_batch(&mut out, 1, &[record(1)]);
        for cut in 0..out.len() {
            assert_eq!(
                decode_frame(&out[..cut], MAX).unwrap(),
                None,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_malformation_is_named() {
        let mut good = BytesMut::new();
        encode_batch(&mut good, 1, &[record(1), record(2)]);

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            decode_frame(&bad_magic, MAX),
            Err(DecodeError::BadMagic(_))
        ));

        let mut bad_version = good.clone();
        bad_version[2] = 9;
        assert_eq!(
            decode_frame(&bad_version, MAX).unwrap_err(),
            DecodeError::UnsupportedVersion(9)
        );

        let mut bad_type = good.clone();
        bad_type[3] = 77;
        assert_eq!(
            decode_frame(&bad_type, MAX).unwrap_err().code(),
            ErrorCode::UnknownType
        );

        // The length is checked from the header alone, before any payload arrives.
        let mut huge = good[..HEADER_BYTES].to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_frame(&huge, MAX).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );

        let mut bad_crc = good.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        assert_eq!(
            decode_frame(&bad_crc, MAX).unwrap_err().code(),
            ErrorCode::BadCrc
        );

        // A count that disagrees with the bytes, with a correct CRC.
        let mut wrong_count = good.clone();
        wrong_count[HEADER_BYTES + 8..HEADER_BYTES + 12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&wrong_count[HEADER_BYTES..]);
        wrong_count[8..12].copy_from_slice(&crc.to_le_bytes());
        let e = decode_frame(&wrong_count, MAX).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Malformed);
        assert!(e.to_string().contains("count 3"), "{e}");

        let mut empty = BytesMut::new();
        encode_batch(&mut empty, 1, &[]);
        assert_eq!(
            decode_frame(&empty, MAX).unwrap_err().code(),
            ErrorCode::Malformed
        );

        let mut short_hello = BytesMut::new();
        let start = start_frame(&mut short_hello, FrameType::Hello);
        short_hello.put_u8(1);
        finish_frame(&mut short_hello, start);
        assert_eq!(
            decode_frame(&short_hello, MAX).unwrap_err().code(),
            ErrorCode::Malformed
        );
    }

    #[test]
    fn resequencing_keeps_the_frame_valid() {
        let mut out = BytesMut::new();
        encode_batch(&mut out, 1, &[record(9)]);
        set_batch_seq(&mut out, 77);
        let (frame, _) = decode_frame(&out, MAX).unwrap().unwrap();
        assert!(matches!(frame, Frame::Batch { seq: 77, .. }));
    }

    #[test]
    fn error_messages_are_cut_on_a_char_boundary() {
        let mut out = BytesMut::new();
        encode_error(&mut out, ErrorCode::Malformed, &"é".repeat(1000));
        let (frame, _) = decode_frame(&out, MAX).unwrap().unwrap();
        let Frame::Error { message, .. } = frame else {
            panic!()
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
    }
}
