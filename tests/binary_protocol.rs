//! The binary ingest protocol end to end: the library client against the server on
//! 127.0.0.1 port 0, with the real engine and store. Every protocol error of
//! docs/protocol.md gets an error frame naming it, then the connection closes, and neither
//! the server nor the stored data is affected.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::TestServer;
use playhead::config::SyncMode;
use playhead::ingest::binary::client::{Client, ClientError, Reply};
use playhead::ingest::binary::codec::{
    self as protocol, ErrorCode, FrameType, RejectCode, WireRecord,
};
use playhead::resume::catalog::title_id_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn record(account: u64, movie: &str, position: u32, timestamp_ms: u64) -> WireRecord {
    WireRecord {
        account_id: account,
        profile_id: 1,
        title_id: title_id_of(movie),
        position_seconds: position,
        device_id: 7,
        timestamp_ms,
    }
}

fn now_ms() -> u64 {
    playhead::model::now_ms()
}

async fn resume(s: &TestServer, account: u64, movie: &str) -> u64 {
    let t = s.token(account, 1);
    s.resume(&t, movie).await["resume_position_seconds"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn batches_are_acknowledged_and_readable() {
    let s = TestServer::start().await;
    let mut c = s.binary_client().await;
    assert_eq!(
        c.limits().max_records_per_batch,
        s.config.binary.max_records_per_batch
    );
    let base = now_ms() - 10_000;
    let batch: Vec<_> = (0..100)
        .map(|a| record(a, "inception", a as u32 * 10, base))
        .collect();
    let reply = c.write_batch(&batch).await.unwrap();
    assert_eq!(
        reply,
        Reply::Ack {
            seq: 1,
            accepted: 100,
            rejections: vec![]
        }
    );
    // Last write wins by timestamp within and across batches.
    let newer = [
        record(5, "inception", 1, base + 1),
        record(6, "inception", 999, base - 1),
    ];
    c.write_batch(&newer).await.unwrap();
    assert_eq!(resume(&s, 5, "inception").await, 1);
    assert_eq!(resume(&s, 6, "inception").await, 60);
    assert_eq!(resume(&s, 99, "inception").await, 990);
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("playhead_heartbeats_accepted_total{protocol=\"binary\"} 102"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_records_are_rejected_one_by_one() {
    let s = TestServer::start().await;
    let mut c = s.binary_client().await;
    let now = now_ms();
    let batch = [
        record(1, "inception", 100, 0),
        record(2, "no-such-title", 100, 0),
        record(3, "inception", 7_861, 0),
        record(4, "inception", u32::MAX, 0),
        record(5, "inception", 100, now - 200 * 86_400_000),
        record(6, "dark-s01e01", 5, 0),
    ];
    let Reply::Ack {
        accepted,
        rejections,
        ..
    } = c.write_batch(&batch).await.unwrap()
    else {
        panic!("expected an ack")
    };
    assert_eq!(accepted, 2);
    assert_eq!(
        rejections,
        vec![
            (1, Some(RejectCode::UnknownTitle)),
            (2, Some(RejectCode::PositionOutOfRange)),
            (3, Some(RejectCode::PositionOutOfRange)),
            (4, Some(RejectCode::TimestampTooOld)),
        ]
    );
    assert_eq!(resume(&s, 1, "inception").await, 100);
    assert_eq!(resume(&s, 3, "inception").await, 0);
    assert_eq!(resume(&s, 6, "dark-s01e01").await, 5);
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(metrics.contains("playhead_heartbeats_rejected_total{protocol=\"binary\",reason=\"position_out_of_range\"} 2"), "{metrics}");
    s.stop().await;
}

async fn pipelining(mode: SyncMode) {
    let s = TestServer::start_with(|c| c.wal.sync_mode = mode).await;
    let (mut tx, mut rx, _) = s.binary_client().await.into_split();
    let base = now_ms() - 10_000;
    const BATCHES: u64 = 200;
    let sender = tokio::spawn(async move {
        for b in 0..BATCHES {
            let batch: Vec<_> = (0..50)
                .map(|i| record(i, "heat", (b * 10) as u32, base + b))
                .collect();
            tx.send_batch(&batch).await.unwrap();
        }
        tx
    });
    for expected in 1..=BATCHES {
        match rx.recv_timeout(Duration::from_secs(10)).await.unwrap() {
            Reply::Ack { seq, accepted, .. } => {
                assert_eq!(seq, expected, "acks come in order");
                assert_eq!(accepted, 50);
            }
            other => panic!("{other:?}"),
        }
    }
    let _tx = sender.await.unwrap();
    assert_eq!(resume(&s, 49, "heat").await, (BATCHES - 1) * 10);
    s.stop().await;
}

#[tokio::test]
async fn pipelined_batches_are_acknowledged_in_order_periodic() {
    pipelining(SyncMode::Periodic).await;
}

#[tokio::test]
async fn pipelined_batches_are_acknowledged_in_order_group() {
    pipelining(SyncMode::Group).await;
}

/// Connects without the library's handshake.
async fn raw(s: &TestServer) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(s.binary_addr).await.unwrap()
}

async fn authenticated_raw(s: &TestServer) -> tokio::net::TcpStream {
    let mut stream = raw(s).await;
    let mut out = BytesMut::new();
    protocol::encode_hello(&mut out, s.config.binary.secret.as_bytes());
    stream.write_all(&out).await.unwrap();
    let mut reply = vec![0u8; protocol::HEADER_BYTES + 12];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[3], FrameType::HelloOk as u8);
    stream
}

/// Reads until the server closes; returns the error frame it sent before closing.
async fn error_then_close(stream: &mut tokio::net::TcpStream) -> (ErrorCode, String) {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection")
        .ok();
    let (frame, used) = protocol::decode_frame(&bytes, 1 << 20)
        .unwrap()
        .expect("an error frame before the close");
    assert_eq!(used, bytes.len(), "nothing after the error frame");
    match frame {
        protocol::Frame::Error { code, message } => {
            (ErrorCode::from_u16(code).unwrap(), message.to_string())
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn valid_batch(seq: u64, n: usize) -> BytesMut {
    let mut out = BytesMut::new();
    let records: Vec<_> = (0..n as u64)
        .map(|i| record(1_000 + i, "inception", 1, 0))
        .collect();
    protocol::encode_batch(&mut out, seq, &records);
    out
}

fn with_crc(mut frame: BytesMut) -> BytesMut {
    let crc = crc32c::crc32c(&frame[protocol::HEADER_BYTES..]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
    frame
}

#[tokio::test]
async fn handshake_failures_close_with_an_error() {
    let s = TestServer::start_with(|c| c.binary.handshake_timeout_ms = 300).await;
    match Client::connect(s.binary_addr, b"wrong secret").await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, Some(ErrorCode::AuthFailed));
            assert!(message.contains("secret"), "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a wrong secret must not connect"),
    }
    // A batch before the handshake writes nothing.
    let mut stream = raw(&s).await;
    stream.write_all(&valid_batch(1, 3)).await.unwrap();
    assert_eq!(
        error_then_close(&mut stream).await.0,
        ErrorCode::NotAuthenticated
    );
    assert_eq!(resume(&s, 1_000, "inception").await, 0);
    // Silence after connecting.
    let mut stream = raw(&s).await;
    let (code, message) = error_then_close(&mut stream).await;
    assert_eq!(code, ErrorCode::Timeout, "{message}");
    s.stop().await;
}

#[tokio::test]
async fn every_malformed_frame_gets_its_error_and_harms_nothing() {
    let s = TestServer::start_with(|c| {
        c.binary.read_timeout_ms = 300;
        c.binary.max_records_per_batch = 100;
        c.binary.max_frame_bytes = 64 * 1024;
    })
    .await;
    // A value stored before the attacks, which must survive them.
    let mut good = s.binary_client().await;
    good.write_batch(&[record(77, "inception", 4242, 0)])
        .await
        .unwrap();

    let mut cases: Vec<(&str, Vec<u8>, ErrorCode)> = Vec::new();
    let mut m = valid_batch(1, 2);
    m[0] = b'X';
    cases.push(("bad magic", m.to_vec(), ErrorCode::BadMagic));
    let mut m = valid_batch(1, 2);
    m[2] = 2;
    cases.push(("future version", m.to_vec(), ErrorCode::UnsupportedVersion));
    let mut m = valid_batch(1, 2);
    m[3] = 99;
    cases.push(("unknown type", m.to_vec(), ErrorCode::UnknownType));
    let mut m = valid_batch(1, 2);
    m[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push((
        "oversized length",
        m[..protocol::HEADER_BYTES].to_vec(),
        ErrorCode::FrameTooLarge,
    ));
    let mut m = valid_batch(1, 2);
    let last = m.len() - 1;
    m[last] ^= 0x40;
    cases.push(("bad crc", m.to_vec(), ErrorCode::BadCrc));
    let mut m = valid_batch(1, 2);
    m[protocol::HEADER_BYTES + 8..protocol::HEADER_BYTES + 12].copy_from_slice(&5u32.to_le_bytes());
    cases.push(("count mismatch", with_crc(m).to_vec(), ErrorCode::Malformed));
    cases.push((
        "too many records",
        valid_batch(1, 101).to_vec(),
        ErrorCode::TooManyRecords,
    ));
    let mut m = BytesMut::new();
    protocol::encode_hello(&mut m, b"again");
    cases.push(("second hello", m.to_vec(), ErrorCode::UnexpectedFrame));
    let mut m = BytesMut::new();
    protocol::encode_ack(&mut m, 1, 1, &[]);
    cases.push((
        "server frame from a client",
        m.to_vec(),
        ErrorCode::UnexpectedFrame,
    ));

    for (name, bytes, expected) in cases {
        let mut stream = authenticated_raw(&s).await;
        stream.write_all(&bytes).await.unwrap();
        let (code, message) = error_then_close(&mut stream).await;
        assert_eq!(code, expected, "{name}: {message}");
        assert!(!message.is_empty());
    }

    // Truncated: half a frame, then the client closes its side.
    let mut stream = authenticated_raw(&s).await;
    let frame = valid_batch(1, 10);
    stream.write_all(&frame[..frame.len() / 2]).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(error_then_close(&mut stream).await.0, ErrorCode::Truncated);

    // Stalled mid-frame.
    let mut stream = authenticated_raw(&s).await;
    stream.write_all(&frame[..20]).await.unwrap();
    assert_eq!(error_then_close(&mut stream).await.0, ErrorCode::Timeout);

    // Nothing from the broken frames was stored; the earlier value and the server are fine.
    assert_eq!(resume(&s, 1_000, "inception").await, 0);
    assert_eq!(resume(&s, 77, "inception").await, 4242);
    let reply = good
        .write_batch(&[record(78, "inception", 5, 0)])
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Ack { accepted: 1, .. }));
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("playhead_binary_protocol_errors_total{code=\"bad_crc\"} 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn overload_answers_busy_and_the_cap_refuses_connections() {
    let s = TestServer::start_with(|c| {
        c.coalescer.shards = 1;
        c.coalescer.max_keys = 10;
        c.binary.max_connections = 2;
    })
    .await;
    let mut c = s.binary_client().await;
    let batch: Vec<_> = (0..20).map(|a| record(a, "inception", 1, 0)).collect();
    match c.write_batch(&batch).await.unwrap() {
        Reply::Busy {
            seq,
            retry_after_ms,
        } => {
            assert_eq!(seq, 1);
            assert_eq!(retry_after_ms, s.config.binary.busy_retry_after_ms);
        }
        other => panic!("expected BUSY, got {other:?}"),
    }
    // The connection stays usable; a batch that fits is acknowledged after a flush.
    s.engine.flush().await.unwrap();
    assert!(matches!(
        c.write_batch(&batch[..5]).await.unwrap(),
        Reply::Ack { accepted: 5, .. }
    ));

    let _second = s.binary_client().await;
    let mut third = raw(&s).await;
    assert_eq!(
        error_then_close(&mut third).await.0,
        ErrorCode::TooManyConnections
    );
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_acks_is_cut_off() {
    let s = TestServer::start_with(|c| {
        c.binary.write_timeout_ms = 500;
        c.binary.max_in_flight_batches = 4;
        c.binary.send_buffer_bytes = 4096;
    })
    .await;
    // A small receive window, so the acks we never read back up quickly.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(s.binary_addr).await.unwrap();
    let mut hello = BytesMut::new();
    protocol::encode_hello(&mut hello, s.config.binary.secret.as_bytes());
    stream.write_all(&hello).await.unwrap();
    let frame = valid_batch(1, 1);
    // Keep sending; never read. The server must stop reading (bounded memory) and then
    // drop the connection, so our writes eventually fail.
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        let mut sent = 0u64;
        loop {
            if stream.write_all(&frame).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    })
    .await;
    let sent = outcome.expect("the server cuts the connection");
    assert!(sent > 4, "sent {sent}");
    // Others are unaffected.
    let mut c = s.binary_client().await;
    assert!(matches!(
        c.write_batch(&[record(5, "heat", 1, 0)]).await.unwrap(),
        Reply::Ack { .. }
    ));
    s.stop().await;
}

#[tokio::test]
async fn shutdown_acknowledges_what_was_read_then_closes() {
    let s = TestServer::start_with(|c| c.wal.sync_mode = SyncMode::Group).await;
    let mut c = s.binary_client().await;
    c.write_batch(&[record(9, "heat", 33, 0)]).await.unwrap();
    let engine = s.engine.clone();
    let report = s.stop().await;
    assert_eq!(report.left_in_log, 0);
    assert!(c.write_batch(&[record(9, "heat", 34, 0)]).await.is_err());
    let _ = engine;
}
