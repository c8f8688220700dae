//! The bodies of the fuzz targets, shared by cargo-fuzz (`fuzz/fuzz_targets/*.rs`, nightly)
//! and by the stable replay in `tests/fuzz_corpus.rs`, so CI runs exactly what the fuzzer
//! runs. Each takes arbitrary bytes, must never panic, and checks the invariants its parser
//! promises.

#![allow(dead_code)]

use std::sync::OnceLock;

use playhead::engine::wal::{self, ReplayReport};
use playhead::ingest::auth::{AuthConfig, Verifier};
use playhead::ingest::binary::codec::{self, Frame};
use playhead::model::Record;

/// The binary protocol's frame decoder, fed a byte stream the way the server reads one:
/// frame after frame until it needs more bytes or refuses.
pub fn frame_decoder(data: &[u8]) {
    const MAX: u32 = 1 << 20;
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        if let Some(head) = rest.first_chunk::<{ codec::HEADER_BYTES }>() {
            // The header check alone agrees with the whole-frame decoder on refusals.
            if let Err(e) = codec::decode_header(head, MAX) {
                assert_eq!(codec::decode_frame(rest, MAX).unwrap_err(), e);
                return;
            }
        }
        match codec::decode_frame(rest, MAX) {
            Ok(Some((frame, used))) => {
                assert!((codec::HEADER_BYTES..=rest.len()).contains(&used));
                let (again, used_again) = codec::decode_checked_frame(rest, MAX).unwrap().unwrap();
                assert_eq!((&again, used_again), (&frame, used));
                match frame {
                    Frame::Batch { records, .. } => {
                        assert_eq!(records.len() % codec::RECORD_BYTES, 0);
                        let n = Frame::records(records).count();
                        assert_eq!(n * codec::RECORD_BYTES, records.len());
                    }
                    Frame::Ack { rejections, .. } => {
                        let _ = Frame::rejections(rejections).count();
                    }
                    Frame::Hello { secret } => assert!(secret.len() <= codec::MAX_SECRET_BYTES),
                    Frame::Error { message, .. } => assert!(message.len() <= used),
                    Frame::HelloOk(_) | Frame::Busy { .. } => {}
                }
                at += used;
            }
            Ok(None) => return,
            Err(_) => return,
        }
    }
}

/// The commit log's frame scanner (what replay runs over each file's bytes) and the record
/// decoder: counts add up, a truncation point lies inside the input, and every decodable
/// record re-encodes to the bytes it came from.
pub fn wal_frames(data: &[u8]) {
    let mut report = ReplayReport::default();
    let mut seen = 0u64;
    let cut = wal::scan_frames(data, 0, "fuzz", &mut report, &mut |records: &[Record]| {
        seen += records.len() as u64;
    });
    assert_eq!(report.records, seen);
    assert!(report.records * Record::ENCODED_BYTES as u64 <= data.len() as u64);
    assert!(report.corrupt_bytes + report.truncated_bytes <= data.len() as u64);
    if let Some(at) = cut {
        assert!(at < data.len());
        assert_eq!(report.truncated_bytes, (data.len() - at) as u64);
    }
    for chunk in data.chunks_exact(Record::ENCODED_BYTES) {
        if let Some(r) = Record::decode(chunk) {
            let mut out = Vec::with_capacity(Record::ENCODED_BYTES);
            r.encode_into(&mut out);
            assert_eq!(out, chunk);
        }
    }
}

/// `POST /api/v1/stream/progress` bodies through the same serde type the handler uses.
pub fn json_body(data: &[u8]) {
    let de = &mut serde_json::Deserializer::from_slice(data);
    if let Ok(body) = serde_path_to_error_free(de) {
        assert!(
            body.position_seconds.is_finite(),
            "JSON has no NaN or infinity"
        );
        let _ = body.movie_id.len();
    }
}

fn serde_path_to_error_free(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<playhead::ingest::http::api::ProgressBody, serde_json::Error> {
    let body = serde::Deserialize::deserialize(&mut *de)?;
    de.end()?;
    Ok(body)
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::from_config(&AuthConfig::default()).unwrap())
}

/// JWT handling, two ways: the bytes as a bearer token (must be refused unless they are a
/// token signed with the secret, which random bytes are not), and the bytes as the claims of
/// a token correctly signed with the secret (accepted only with integer ids and a future
/// `exp`).
pub fn jwt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    assert!(
        verifier().verify(&text).is_err(),
        "forged token accepted: {text:?}"
    );
    let _ = verifier().verify_header(Some(&text));

    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let input = format!("{header}.{}", b64(data));
    let key = jsonwebtoken::EncodingKey::from_secret(playhead::ingest::auth::DEV_SECRET.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).unwrap();
    if let Ok(principal) = verifier().verify(&format!("{input}.{signature}")) {
        // (Through the claims type, not `serde_json::Value`: fields the type ignores are
        // skipped leniently, e.g. a lone surrogate escape in an unknown string claim.)
        let claims: playhead::ingest::auth::Claims =
            serde_json::from_slice(data).expect("accepted claims parse as the claims type");
        assert_eq!(claims.account_id, principal.account_id);
        assert_eq!(claims.profile_id, principal.profile_id);
    }
}

/// Base64url without padding (RFC 7515), so the targets need no base64 crate.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
