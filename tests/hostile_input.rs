//! Hostile input the other suites do not already send (tests/http_api.rs covers malformed,
//! nested and oversized JSON, wrong content type, invalid UTF-8 bodies, slow headers and
//! the connection cap; tests/binary_protocol.rs every malformed frame kind, a batch before
//! the handshake and a client that never reads its acks). Each case gets a 4xx or a
//! protocol error, stores nothing, and leaves the server serving.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Response, TestServer};
use playhead::ingest::binary::codec::{self as protocol, ErrorCode, WireRecord};
use playhead::resume::catalog::title_id_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_ms() -> u64 {
    playhead::model::now_ms()
}

async fn post_raw(s: &TestServer, token: &str, content_type: &str, body: &[u8]) -> Response {
    let mut raw = format!(
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    s.raw(&raw).await
}

/// The server still answers and `account` has not been written on inception.
async fn still_serving_and_clean(s: &TestServer, account: u64) {
    let t = s.token(account, 1);
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 0, "{r}");
    assert!(r.get("updated_at_ms").is_none(), "nothing stored: {r}");
}

#[tokio::test]
async fn numbers_out_of_range_are_refused_or_clamped() {
    let s = TestServer::start().await;
    let t = s.token(31, 1);
    let cases: &[(&str, u16, &str)] = &[
        (
            r#"{"movie_id":"inception","position_seconds":1e308}"#,
            422,
            "position_out_of_range",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":-1e308}"#,
            422,
            "invalid_position",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":-0.5}"#,
            422,
            "invalid_position",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":4294967296}"#,
            422,
            "position_out_of_range",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"timestamp_ms":18446744073709551616}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"timestamp_ms":-1}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"timestamp_ms":1.5}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"timestamp_ms":0}"#,
            422,
            "timestamp_too_old",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"timestamp_ms":"now"}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"position_seconds":2}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":null}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"movie_id":"incep\u0000tion","position_seconds":1}"#,
            404,
            "unknown_movie",
        ),
        (
            r#"{"movie_id":"inception","position_seconds":1,"device_id":"tv\u0007"}"#,
            422,
            "invalid_device_id",
        ),
    ];
    for (body, status, code) in cases {
        let r = s.post_progress(&t, body).await;
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        assert_eq!(r.error_code(), *code, "{body}");
    }
    // A 100 000-digit number in a body the limit lets through.
    let s2 = TestServer::start_with(|c| c.http.max_body_bytes = 1 << 20).await;
    let t2 = s2.token(31, 1);
    let body = format!(
        r#"{{"movie_id":"inception","position_seconds":1{}}}"#,
        "0".repeat(100_000)
    );
    let r = s2.post_progress(&t2, &body).await;
    assert!(matches!(r.status, 400 | 422), "{}", r.body);
    still_serving_and_clean(&s2, 31).await;
    s2.stop().await;
    still_serving_and_clean(&s, 31).await;

    // The largest timestamp is accepted but clamped to now + the allowed skew.
    let before = now_ms();
    let r = s
        .post_progress(
            &t,
            &format!(
                r#"{{"movie_id":"inception","position_seconds":5,"timestamp_ms":{}}}"#,
                u64::MAX
            ),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let at = s.resume(&t, "inception").await["updated_at_ms"]
        .as_u64()
        .unwrap();
    assert!(
        at <= now_ms() + s.config.ingest.max_clock_skew_ms && at >= before,
        "{at}"
    );
    s.stop().await;
}

#[tokio::test]
async fn huge_and_deep_json_within_a_large_body_limit_is_refused_quickly() {
    let s = TestServer::start_with(|c| c.http.max_body_bytes = 1 << 20).await;
    let t = s.token(32, 1);
    let big_string = format!(
        r#"{{"movie_id":"inception","position_seconds":1,"device_id":"{}"}}"#,
        "x".repeat(1_000_000)
    );
    let many_numbers = format!("[{}1]", "1,".repeat(400_000));
    let deep_objects = format!("{}{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    let long_key = format!(r#"{{"{}":1}}"#, "k".repeat(900_000));
    for (name, body, status) in [
        ("1 MB string", big_string, 422),
        ("400 000-element array", many_numbers, 422),
        ("100 000 nested objects", deep_objects, 422),
        ("900 KB key", long_key, 422),
    ] {
        let started = Instant::now();
        let r = post_raw(&s, &t, "application/json", body.as_bytes()).await;
        assert_eq!(r.status, status, "{name}: {}", r.body);
        assert!(
            r.body.len() < 2_048,
            "{name}: the error does not echo the input"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            started.elapsed()
        );
    }
    still_serving_and_clean(&s, 32).await;
    s.stop().await;
}

#[tokio::test]
async fn wrong_content_types_and_bodies_on_other_routes() {
    let s = TestServer::start().await;
    let t = s.token(33, 1);
    let json = br#"{"movie_id":"inception","position_seconds":1}"#;
    for ct in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "",
    ] {
        let r = post_raw(&s, &t, ct, json).await;
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
    }
    // Content-Type with parameters and odd case is still JSON.
    let r = post_raw(&s, &t, "Application/JSON; charset=utf-8", json).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Invalid UTF-8 in the query string and in the Authorization header.
    let r = s
        .raw(b"GET /api/v1/stream?movie_id=%FF%FE HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer x\r\n\r\n")
        .await;
    assert_eq!(r.status, 401);
    let mut raw = b"GET /api/v1/stream?movie_id=inception HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n".to_vec();
    let r = s.raw(&raw).await;
    assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
    raw = format!("GET /api/v1/stream?movie_id=%FF%FE HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\n\r\n").into_bytes();
    let r = s.raw(&raw).await;
    assert!(matches!(r.status, 400 | 404), "{}", r.body);
    // A query string far beyond any title id.
    let long = format!("GET /api/v1/stream?movie_id={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\n\r\n", "a".repeat(10_000));
    let r = s.raw(long.as_bytes()).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_movie_id")
    );
    s.stop().await;
}

#[tokio::test]
async fn framing_attacks_on_http_are_refused() {
    let s = TestServer::start_with(|c| {
        c.http.max_body_bytes = 512;
        c.http.request_timeout_ms = 500;
    })
    .await;
    let t = s.token(34, 1);
    // A chunked body over the limit.
    let chunk = "x".repeat(400);
    let raw = format!(
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n190\r\n{chunk}\r\n190\r\n{chunk}\r\n0\r\n\r\n"
    );
    let r = s.raw(raw.as_bytes()).await;
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));
    // A Content-Length announcing more than the limit is refused before the body arrives.
    let raw = format!(
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    );
    let started = Instant::now();
    let r = s.raw(raw.as_bytes()).await;
    // Refused without buffering: 413, or 408 at the request deadline while the body never
    // comes (the limit is applied as bytes arrive).
    assert!(matches!(r.status, 408 | 413), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A Content-Length that is not a number.
    let raw = format!(
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: ten\r\n\r\n"
    );
    let r = s.raw(raw.as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // 1 MB of headers: refused (431) or closed, never buffered whole.
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "h".repeat(1_000_000)
    );
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let _ = stream.write_all(raw.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("closed");
    let head = String::from_utf8_lossy(&out);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 431"),
        "{head}"
    );
    // Slowloris on the body: headers complete, then the body trickles and stalls. The
    // request times out (408) instead of holding the connection.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(format!("POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"movie").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("the stalled request is answered");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert_eq!(s.request("GET", "/healthz", None, None).await.status, 200);
    still_serving_and_clean(&s, 34).await;
    s.stop().await;
}

fn record(account: u64, position: u32, timestamp_ms: u64) -> WireRecord {
    WireRecord {
        account_id: account,
        profile_id: 1,
        title_id: title_id_of("inception"),
        position_seconds: position,
        device_id: 7,
        timestamp_ms,
    }
}

/// Sends `bytes` on a fresh connection and returns the error frame the server closes with.
async fn error_for(s: &TestServer, bytes: &[u8]) -> ErrorCode {
    let mut stream = tokio::net::TcpStream::connect(s.binary_addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("closed");
    match protocol::decode_frame(&out, 1 << 20) {
        Ok(Some((protocol::Frame::Error { code, .. }, _))) => ErrorCode::from_u16(code).unwrap(),
        other => panic!("expected an error frame, got {other:?} from {out:?}"),
    }
}

#[tokio::test]
async fn nothing_is_written_without_a_valid_handshake() {
    let s = TestServer::start_with(|c| c.binary.handshake_timeout_ms = 500).await;
    let mut batch = BytesMut::new();
    protocol::encode_batch(&mut batch, 1, &[record(40, 11, 0)]);
    // A wrong secret followed at once by a batch in the same write: the batch is not read.
    let mut bytes = BytesMut::new();
    protocol::encode_hello(&mut bytes, b"guess");
    bytes.extend_from_slice(&batch);
    assert_eq!(error_for(&s, &bytes).await, ErrorCode::AuthFailed);
    // An empty secret.
    let mut bytes = BytesMut::new();
    protocol::encode_hello(&mut bytes, b"");
    bytes.extend_from_slice(&batch);
    assert_eq!(error_for(&s, &bytes).await, ErrorCode::AuthFailed);
    // The right secret with one byte more or less.
    for secret in [
        format!("{}x", s.config.binary.secret),
        s.config.binary.secret[..s.config.binary.secret.len() - 1].to_string(),
    ] {
        let mut bytes = BytesMut::new();
        protocol::encode_hello(&mut bytes, secret.as_bytes());
        bytes.extend_from_slice(&batch);
        assert_eq!(error_for(&s, &bytes).await, ErrorCode::AuthFailed);
    }
    // Garbage, an ERROR frame, an oversized HELLO, before any handshake.
    assert_eq!(
        error_for(&s, b"GET / HTTP/1.1\r\n\r\n").await,
        ErrorCode::BadMagic
    );
    let mut bytes = BytesMut::new();
    protocol::encode_error(&mut bytes, ErrorCode::AuthFailed, "hello?");
    assert_eq!(error_for(&s, &bytes).await, ErrorCode::NotAuthenticated);
    let mut bytes = BytesMut::new();
    protocol::encode_hello(&mut bytes, &vec![b's'; protocol::MAX_SECRET_BYTES + 1]);
    assert_eq!(error_for(&s, &bytes).await, ErrorCode::Malformed);
    let mut header = BytesMut::new();
    protocol::encode_hello(&mut header, b"x");
    header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        error_for(&s, &header[..protocol::HEADER_BYTES]).await,
        ErrorCode::FrameTooLarge
    );
    // Half a HELLO, then silence: cut off at the handshake deadline.
    let mut hello = BytesMut::new();
    protocol::encode_hello(&mut hello, s.config.binary.secret.as_bytes());
    assert_eq!(error_for(&s, &hello[..5]).await, ErrorCode::Timeout);
    still_serving_and_clean(&s, 40).await;
    s.stop().await;
}

#[tokio::test]
async fn extreme_record_values_are_refused_or_clamped_one_by_one() {
    let s = TestServer::start().await;
    let mut c = s.binary_client().await;
    let mut empty = BytesMut::new();
    protocol::encode_batch(&mut empty, 1, &[]);
    let records = [
        WireRecord {
            title_id: u64::MAX,
            ..record(41, 10, 0)
        },
        WireRecord {
            position_seconds: u32::MAX,
            ..record(42, 10, 0)
        },
        WireRecord {
            timestamp_ms: 1,
            ..record(43, 10, 0)
        },
        WireRecord {
            timestamp_ms: u64::MAX,
            device_id: u32::MAX,
            ..record(44, 10, 0)
        },
        WireRecord {
            account_id: u64::MAX,
            profile_id: u64::MAX,
            ..record(0, 12, 0)
        },
    ];
    match c.write_batch(&records).await.unwrap() {
        playhead::ingest::binary::client::Reply::Ack {
            accepted,
            rejections,
            ..
        } => {
            assert_eq!(accepted, 2);
            let codes: Vec<_> = rejections
                .iter()
                .map(|(i, c)| (*i, c.map(|c| c.name())))
                .collect();
            assert_eq!(
                codes,
                vec![
                    (0, Some("unknown_movie")),
                    (1, Some("position_out_of_range")),
                    (2, Some("timestamp_too_old"))
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    for account in [41, 42, 43] {
        still_serving_and_clean(&s, account).await;
    }
    let t = s.token(44, 1);
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 10);
    assert!(r["updated_at_ms"].as_u64().unwrap() <= now_ms() + s.config.ingest.max_clock_skew_ms);
    let t = s.token(u64::MAX, u64::MAX);
    assert_eq!(
        s.resume(&t, "inception").await["resume_position_seconds"],
        12
    );
    // An empty batch is a protocol error; nothing else on the connection was lost.
    let (mut tx, mut rx, _) = c.into_split();
    tx.send_frame(&empty).await.unwrap();
    match rx.recv().await {
        Err(playhead::ingest::binary::client::ClientError::Server { code, .. }) => {
            assert_eq!(code, Some(ErrorCode::Malformed))
        }
        other => panic!("{other:?}"),
    }
    s.stop().await;
}
