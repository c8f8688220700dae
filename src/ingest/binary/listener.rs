//! The binary ingest listener (docs/protocol.md): HELLO, then pipelined batches, each
//! acknowledged in order once its records are in the coalescer and the commit log (after the
//! covering fsync in `group` mode).
//!
//! One connection is two tasks joined by a bounded channel of `binary.max_in_flight_batches`:
//! - the *reader* decodes frames, validates records and submits them to the engine
//!   (upsert + append, synchronous); it never waits for an fsync, so batches pipeline;
//! - the *writer* waits for each batch's durability in order and writes the acks, several
//!   per syscall when they are ready together.
//!
//! A client that stops reading acks fills its socket, then the channel, then the reader
//! stops reading: memory per connection is bounded by the read buffer (one frame) plus the
//! in-flight acks, and `binary.write_timeout_ms` disconnects it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::codec::{self, ErrorCode, Frame, RejectCode, ServerLimits, WireRecord};
use super::config::BinaryConfig;
use crate::engine::wal::WalError;
use crate::engine::{PendingWrite, WriteError};
use crate::ingest::listener::{next_connection, ConnectionLimit};
use crate::ingest::{Ingest, RejectReason};
use crate::model::{Key, Record};

/// Binds the listener with the configured backlog and socket options.
pub fn bind(config: &BinaryConfig) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = config
        .listen
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(config.backlog as i32)?;
    TcpListener::from_std(socket.into())
}

/// Serves `listener` until `shutdown` flips, then lets every connection finish the batches
/// it has read (they are acknowledged) and returns when all connections are closed or after
/// `binary.write_timeout_ms`.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = ingest.engine().config().binary.clone();
    let limit = ConnectionLimit::new(config.max_connections);
    let counters = Arc::clone(&ingest.metrics().binary_connections);
    while let Some(stream) = next_connection(&listener, &mut shutdown, "binary").await {
        let Some(admitted) = limit.admit(&counters) else {
            tokio::spawn(refuse(stream, config.max_connections));
            continue;
        };
        configure(&stream, &config);
        let ingest = Arc::clone(&ingest);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            Connection::run(stream, ingest, shutdown).await;
            drop(admitted);
        });
    }
    drop(listener);
    let grace = Duration::from_millis(config.write_timeout_ms);
    if !limit.drain(grace).await {
        tracing::warn!(
            "binary connections still open {} ms after shutdown; closed",
            grace.as_millis()
        );
    }
}

fn configure(stream: &TcpStream, config: &BinaryConfig) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    if config.recv_buffer_bytes > 0 {
        let _ = socket.set_recv_buffer_size(config.recv_buffer_bytes);
    }
    if config.send_buffer_bytes > 0 {
        let _ = socket.set_send_buffer_size(config.send_buffer_bytes);
    }
}

async fn refuse(mut stream: TcpStream, max: usize) {
    let mut out = BytesMut::new();
    codec::encode_error(
        &mut out,
        ErrorCode::TooManyConnections,
        &format!("the server has {max} connections open; retry later"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// What the reader hands the writer, in submission order.
enum Outgoing {
    Ack {
        seq: u64,
        accepted: u32,
        rejections: Vec<(u32, RejectCode)>,
        /// Acknowledged once durable (in `group` mode: after its fsync).
        pending: PendingWrite,
    },
    Busy {
        seq: u64,
        records: u32,
    },
    HelloOk(ServerLimits),
    /// The last message: write it, then close.
    Error(ErrorCode, String),
}

struct Connection {
    ingest: Arc<Ingest>,
    config: BinaryConfig,
    input: OwnedReadHalf,
    buf: BytesMut,
    /// Reused per batch: no allocation per record or per batch once warm.
    records: Vec<Record>,
}

/// How reading the next frame ended, other than with a frame.
enum ReadEnd {
    /// The client closed between frames.
    Closed,
    /// A protocol violation to report before closing.
    Violation(ErrorCode, String),
}

impl Connection {
    async fn run(stream: TcpStream, ingest: Arc<Ingest>, mut shutdown: watch::Receiver<bool>) {
        let config = ingest.engine().config().binary.clone();
        let (input, output) = stream.into_split();
        let (tx, rx) = mpsc::channel(config.max_in_flight_batches as usize);
        let writer = tokio::spawn(write_loop(output, rx, Arc::clone(&ingest)));
        let mut conn = Connection {
            ingest,
            buf: BytesMut::with_capacity(64 * 1024),
            records: Vec::new(),
            config,
            input,
        };
        let last = conn.read_loop(&tx, &mut shutdown).await;
        if let Some((code, message)) = last {
            conn.ingest.metrics().binary_protocol_error(code);
            tracing::debug!(?code, "binary protocol error: {message}");
            let _ = tx.send(Outgoing::Error(code, message)).await;
        }
        drop(tx);
        let _ = writer.await;
        // Read (and discard) what the client still sends for a moment, so closing does not
        // reset the connection before it has read our last frame.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(n) = conn.input.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Reads frames until the client leaves, breaks the protocol, or the server shuts down;
    /// returns the error to send last, if any.
    async fn read_loop(
        &mut self,
        tx: &mpsc::Sender<Outgoing>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(ErrorCode, String)> {
        let handshake = Duration::from_millis(self.config.handshake_timeout_ms);
        // The whole HELLO must arrive within the handshake deadline, not just its first
        // bytes: else a client trickling a byte per `read_timeout_ms` would hold an
        // unauthenticated connection (and a frame buffer) for as long as it likes.
        match tokio::time::timeout(handshake, self.next_frame(handshake, shutdown)).await {
            Ok(Ok(())) => {}
            Ok(Err(ReadEnd::Closed)) => return None,
            Ok(Err(ReadEnd::Violation(code, message))) => return Some((code, message)),
            Err(_) => {
                return Some((
                    ErrorCode::Timeout,
                    format!("no complete HELLO within {} ms", handshake.as_millis()),
                ))
            }
        }
        if let Err(violation) = self.handshake(tx).await {
            return Some(violation);
        }
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        loop {
            match self.next_frame(idle, shutdown).await {
                Ok(()) => {}
                Err(ReadEnd::Closed) => return None,
                Err(ReadEnd::Violation(code, message)) => return Some((code, message)),
            }
            let outgoing = match self.take_batch() {
                Ok(outgoing) => outgoing,
                Err(violation) => return Some(violation),
            };
            if tx.send(outgoing).await.is_err() {
                return None; // the writer gave up on this client
            }
        }
    }

    /// Waits until `buf` starts with one whole, valid frame. The first bytes of a frame must
    /// come within `wait`; once it has started, the rest within `binary.read_timeout_ms`.
    async fn next_frame(
        &mut self,
        wait: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReadEnd> {
        let max = self.config.max_frame_bytes;
        let mid_frame = Duration::from_millis(self.config.read_timeout_ms);
        loop {
            match codec::decode_frame(&self.buf, max) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Violation(e.code(), e.to_string())),
            }
            let started = !self.buf.is_empty();
            if let Some(head) = self.buf.first_chunk::<{ codec::HEADER_BYTES }>() {
                let header = codec::decode_header(head, max).expect("checked by decode_frame");
                self.buf
                    .reserve(codec::HEADER_BYTES + header.payload_bytes as usize - self.buf.len());
            } else {
                self.buf.reserve(64 * 1024);
            }
            let limit = if started { mid_frame } else { wait };
            let read = tokio::select! {
                read = tokio::time::timeout(limit, self.input.read_buf(&mut self.buf)) => read,
                _ = shutdown.changed(), if !started => {
                    return Err(ReadEnd::Violation(ErrorCode::ShuttingDown, "the server is shutting down".into()));
                }
            };
            match read {
                Ok(Ok(0)) if started => {
                    return Err(ReadEnd::Violation(
                        ErrorCode::Truncated,
                        format!(
                            "the connection ended inside a frame ({} bytes of it arrived)",
                            self.buf.len()
                        ),
                    ))
                }
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadEnd::Closed),
                Ok(Ok(_)) => {}
                Err(_) if started => {
                    return Err(ReadEnd::Violation(
                        ErrorCode::Timeout,
                        format!(
                            "the rest of the frame did not arrive within {} ms",
                            mid_frame.as_millis()
                        ),
                    ))
                }
                Err(_) => {
                    return Err(ReadEnd::Violation(
                        ErrorCode::Timeout,
                        format!("no frame within {} ms", limit.as_millis()),
                    ))
                }
            }
        }
    }

    async fn handshake(&mut self, tx: &mpsc::Sender<Outgoing>) -> Result<(), (ErrorCode, String)> {
        let (frame, used) = codec::decode_checked_frame(&self.buf, self.config.max_frame_bytes)
            .ok()
            .flatten()
            .expect("next_frame returned a whole frame");
        let Frame::Hello { secret } = frame else {
            return Err((
                ErrorCode::NotAuthenticated,
                "the first frame must be HELLO with the shared secret".into(),
            ));
        };
        let expected = self.config.secret.as_bytes();
        let ok = !expected.is_empty() && bool::from(secret.ct_eq(expected));
        self.buf.advance(used);
        if !ok {
            return Err((ErrorCode::AuthFailed, "the shared secret is wrong".into()));
        }
        let limits = ServerLimits {
            max_frame_bytes: self.config.max_frame_bytes,
            max_records_per_batch: self.config.max_records_per_batch,
            max_in_flight_batches: self.config.max_in_flight_batches,
        };
        tx.send(Outgoing::HelloOk(limits))
            .await
            .map_err(|_| (ErrorCode::ShuttingDown, "closing".to_string()))
    }

    /// Validates and submits the batch at the front of `buf`, and says what to answer.
    fn take_batch(&mut self) -> Result<Outgoing, (ErrorCode, String)> {
        let (frame, used) = codec::decode_checked_frame(&self.buf, self.config.max_frame_bytes)
            .ok()
            .flatten()
            .expect("next_frame returned a whole frame");
        let Frame::Batch { seq, records } = frame else {
            return Err((
                ErrorCode::UnexpectedFrame,
                format!("expected BATCH after the handshake, got {frame:?}"),
            ));
        };
        let count = records.len() / codec::RECORD_BYTES;
        if count > self.config.max_records_per_batch as usize {
            return Err((
                ErrorCode::TooManyRecords,
                format!(
                    "batch {seq} holds {count} records, the limit is {}",
                    self.config.max_records_per_batch
                ),
            ));
        }
        let now = self.ingest.engine().now_ms();
        self.records.clear();
        let mut rejections = Vec::new();
        for (index, wire) in Frame::records(records).enumerate() {
            match validate(&self.ingest, &wire, now) {
                Ok(record) => self.records.push(record),
                Err(code) => rejections.push((index as u32, code)),
            }
        }
        self.buf.advance(used);
        for (_, code) in &rejections {
            self.ingest.metrics().rejected("binary", code.name(), 1);
        }
        let accepted = self.records.len() as u32;
        match self.ingest.engine().submit(&self.records) {
            Ok(pending) => Ok(Outgoing::Ack {
                seq,
                accepted,
                rejections,
                pending,
            }),
            Err(WriteError::Log(WalError::Closed)) => Err((
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
            )),
            Err(e) => {
                tracing::debug!("binary batch {seq} refused: {e}");
                Ok(Outgoing::Busy {
                    seq,
                    records: accepted,
                })
            }
        }
    }
}

/// Checks one record against the catalog and the ingest rules ([`Ingest::record`]) and
/// stamps it; a timestamp of 0 means "none given".
fn validate(ingest: &Ingest, wire: &WireRecord, now_ms: u64) -> Result<Record, RejectCode> {
    let title = ingest
        .catalog()
        .by_title_id(wire.title_id)
        .ok_or(RejectCode::UnknownTitle)?;
    if wire.position_seconds > ingest.position_limit(title) {
        return Err(RejectCode::PositionOutOfRange);
    }
    let client = (wire.timestamp_ms != 0).then_some(wire.timestamp_ms);
    let key = Key::new(wire.account_id, wire.profile_id, wire.title_id);
    ingest
        .record(key, wire.position_seconds, wire.device_id, client, now_ms)
        .map_err(|reason| match reason {
            RejectReason::TooOld => RejectCode::TimestampTooOld,
            RejectReason::ReservedPosition => RejectCode::PositionOutOfRange,
        })
}

/// Writes replies in order, each ack after its batch is durable; coalesces replies that are
/// ready together into one write.
async fn write_loop(
    mut output: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    ingest: Arc<Ingest>,
) {
    const COALESCE_BYTES: usize = 64 * 1024;
    let write_timeout = Duration::from_millis(ingest.engine().config().binary.write_timeout_ms);
    let mut out = BytesMut::with_capacity(COALESCE_BYTES);
    while let Some(first) = rx.recv().await {
        out.clear();
        let mut closing = encode_reply(first, &mut out, &ingest).await;
        while !closing && out.len() < COALESCE_BYTES {
            match rx.try_recv() {
                Ok(next) => closing = encode_reply(next, &mut out, &ingest).await,
                Err(_) => break,
            }
        }
        match tokio::time::timeout(write_timeout, output.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!(
                    "binary client read no acks for {} ms; closing",
                    write_timeout.as_millis()
                );
                return;
            }
        }
        if closing {
            let _ = output.shutdown().await;
            return;
        }
    }
    let _ = output.shutdown().await;
}

/// Appends one reply; returns true when it is the last one (an error).
async fn encode_reply(reply: Outgoing, out: &mut BytesMut, ingest: &Ingest) -> bool {
    let metrics = ingest.metrics();
    let busy_retry_after_ms = ingest.engine().config().binary.busy_retry_after_ms;
    match reply {
        Outgoing::HelloOk(limits) => codec::encode_hello_ok(out, limits),
        Outgoing::Ack {
            seq,
            accepted,
            rejections,
            pending,
        } => {
            if pending.durable(ingest.engine()).await.is_ok() {
                metrics.accepted("binary", u64::from(accepted));
                codec::encode_ack(out, seq, accepted, &rejections);
            } else {
                // The fsync covering this batch failed: it is not acknowledged.
                metrics.rejected("binary", "overloaded", u64::from(accepted));
                codec::encode_busy(out, seq, busy_retry_after_ms);
            }
        }
        Outgoing::Busy { seq, records } => {
            metrics.rejected("binary", "overloaded", u64::from(records));
            codec::encode_busy(out, seq, busy_retry_after_ms);
        }
        Outgoing::Error(code, message) => {
            codec::encode_error(out, code, &message);
            return true;
        }
    }
    false
}
