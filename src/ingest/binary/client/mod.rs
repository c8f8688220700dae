//! A client of the binary ingest protocol (docs/protocol.md), used by the load generator
//! and the tests.
//!
//! [`Client::connect`] performs the handshake. Batches pipeline: send many with
//! [`Client::send_batch`] (or pre-encoded frames with [`Client::send_frame`]) and read the
//! replies, which come in order, with [`Client::recv`]. [`Client::into_split`] gives a
//! sender and a receiver half for two tasks.
//!
//! For many nodes, [`ClusterClient`] sends each record to its account's node on the
//! consistent-hash [`ring`] that HAProxy uses for the HTTP API (docs/cluster.md).

mod cluster;
pub mod ring;

pub use cluster::{
    ClusterClient, ClusterError, ClusterNode, ClusterOptions, ClusterReply, NodeStatus,
};

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::ingest::binary::codec::{self, ErrorCode, Frame, RejectCode, ServerLimits, WireRecord};

/// Largest frame the client accepts from a server (acks of the largest batches fit).
const MAX_REPLY_BYTES: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Shown as the I/O error itself, whose message already names the reason, so `{:#}`
    /// does not repeat it.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("the server reported {code:?}: {message}")]
    Server {
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("the server sent an invalid frame: {0}")]
    Protocol(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// A server's reply to one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The batch is acknowledged: `accepted` records are durable per the server's sync mode;
    /// the rest were refused, each with its index in the batch and a reason.
    Ack {
        seq: u64,
        accepted: u32,
        rejections: Vec<(u32, Option<RejectCode>)>,
    },
    /// The server was overloaded and took nothing from this batch for sure: send it again
    /// after `retry_after_ms` (writes are idempotent).
    Busy { seq: u64, retry_after_ms: u32 },
}

impl Reply {
    pub fn seq(&self) -> u64 {
        match self {
            Reply::Ack { seq, .. } | Reply::Busy { seq, .. } => *seq,
        }
    }
}

/// A connected, authenticated client.
pub struct Client {
    sender: Sender,
    receiver: Receiver,
    limits: ServerLimits,
}

/// The sending half.
pub struct Sender {
    output: OwnedWriteHalf,
    buf: BytesMut,
    next_seq: u64,
}

/// The receiving half.
pub struct Receiver {
    input: OwnedReadHalf,
    buf: BytesMut,
}

impl Client {
    /// Connects to `addr` and authenticates with `secret`.
    pub async fn connect(addr: SocketAddr, secret: &[u8]) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (input, output) = stream.into_split();
        let mut sender = Sender {
            output,
            buf: BytesMut::with_capacity(64 * 1024),
            next_seq: 1,
        };
        let mut receiver = Receiver {
            input,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        sender.buf.clear();
        codec::encode_hello(&mut sender.buf, secret);
        sender.output.write_all(&sender.buf).await?;
        let limits = receiver
            .next(|frame| match frame {
                Frame::HelloOk(limits) => Ok(limits),
                other => Err(ClientError::Protocol(format!(
                    "expected HELLO_OK, got {other:?}"
                ))),
            })
            .await?;
        Ok(Self {
            sender,
            receiver,
            limits,
        })
    }

    /// The limits the server announced.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Sends one batch and returns its sequence number.
    pub async fn send_batch(&mut self, records: &[WireRecord]) -> Result<u64, ClientError> {
        self.sender.send_batch(records).await
    }

    /// Sends an already-encoded frame as it is (see [`codec::set_batch_seq`]).
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        self.sender.send_frame(frame).await
    }

    /// The next reply, in send order.
    pub async fn recv(&mut self) -> Result<Reply, ClientError> {
        self.receiver.recv().await
    }

    /// Sends a batch and waits for its reply.
    pub async fn write_batch(&mut self, records: &[WireRecord]) -> Result<Reply, ClientError> {
        let seq = self.send_batch(records).await?;
        let reply = self.recv().await?;
        if reply.seq() != seq {
            return Err(ClientError::Protocol(format!(
                "reply for batch {} while waiting for {seq}",
                reply.seq()
            )));
        }
        Ok(reply)
    }

    pub fn into_split(self) -> (Sender, Receiver, ServerLimits) {
        (self.sender, self.receiver, self.limits)
    }
}

impl Sender {
    pub async fn send_batch(&mut self, records: &[WireRecord]) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.buf.clear();
        codec::encode_batch(&mut self.buf, seq, records);
        self.output.write_all(&self.buf).await?;
        Ok(seq)
    }

    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        self.output.write_all(frame).await?;
        Ok(())
    }

    /// Sends raw bytes, valid or not (tests of the server's error handling).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.output.write_all(bytes).await?;
        Ok(())
    }
}

impl Receiver {
    pub async fn recv(&mut self) -> Result<Reply, ClientError> {
        self.next(|frame| match frame {
            Frame::Ack {
                seq,
                accepted,
                rejections,
            } => Ok(Reply::Ack {
                seq,
                accepted,
                rejections: Frame::rejections(rejections)
                    .map(|(i, code)| (i, RejectCode::from_u8(code)))
                    .collect(),
            }),
            Frame::Busy {
                seq,
                retry_after_ms,
            } => Ok(Reply::Busy {
                seq,
                retry_after_ms,
            }),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        })
        .await
    }

    /// Like [`Receiver::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<Reply, ClientError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(limit))?
    }

    /// Reads the next frame and maps it with `f`; an ERROR frame becomes
    /// [`ClientError::Server`].
    async fn next<T>(
        &mut self,
        f: impl FnOnce(Frame<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        loop {
            match codec::decode_frame(&self.buf, MAX_REPLY_BYTES) {
                Ok(Some((frame, used))) => {
                    let result = match frame {
                        Frame::Error { code, message } => Err(ClientError::Server {
                            code: ErrorCode::from_u16(code),
                            message: message.to_string(),
                        }),
                        frame => f(frame),
                    };
                    self.buf.advance(used);
                    return result;
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            self.buf.reserve(64 * 1024);
            if self.input.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_names_its_reason_once() {
        // A port that was just free: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let Err(error) = Client::connect(addr, b"secret").await else {
            panic!("connected to a closed port");
        };
        let shown = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(shown.matches("os error").count(), 1, "{shown}");
    }
}
