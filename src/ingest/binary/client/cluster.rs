//! A client of a cluster of Playhead nodes: each record goes to its account's node.
//!
//! An edge gateway forwards the heartbeats of many households. With many nodes, every
//! record must reach the node that owns its account ([`super::ring`], the same mapping
//! HAProxy applies to the HTTP API), so that node's memory holds the account's newest
//! positions for every device. [`ClusterClient::write_batch`] splits a batch per node,
//! sends the parts to their nodes concurrently (one connection per node, parts larger than
//! a node's `max_records_per_batch` sent as several pipelined batches), and merges the
//! replies, indexes mapped back to the caller's batch.
//!
//! **Down nodes.** A node that cannot be reached, fails the handshake, breaks the
//! connection, sends garbage, or does not answer within `reply_timeout` is marked down for
//! `down_retry`: its connection is dropped and the records it was sent go, in the same
//! call, to the nodes the ring now names for them (those accounts' next-nearest points),
//! as HAProxy sends them when its health checks mark the server down. Writes are
//! idempotent (last write wins), so a record that reached the failed node before it broke
//! and is sent again elsewhere changes nothing it should not. Once `down_retry` has passed,
//! the next call that has records for the node's accounts tries it again (a connection
//! and a handshake, within `connect_timeout`): success brings its accounts back, failure
//! marks it down for another `down_retry`. There is no background task: a client that
//! sends nothing probes nothing.
//!
//! Bounded: each round of a call marks at least one more node down or ends the call, so a
//! call makes at most `nodes + 1` rounds; every wait has a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::ring::{Ring, RingError, RingNode, DEFAULT_WEIGHT};
use super::{Client, ClientError, Reply};
use crate::ingest::binary::codec::{RejectCode, WireRecord};

/// One node: where its binary listener is, and its place on the ring — the `id` and
/// `weight` of its `server` line in the HAProxy config, so HTTP and binary agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub addr: SocketAddr,
    pub id: u32,
    pub weight: u32,
}

impl ClusterNode {
    /// `addrs` in order as ids 1, 2, … at the default weight: `deploy/haproxy.cfg`'s
    /// servers `node1`, `node2`, … when listed in the same order.
    pub fn numbered(addrs: &[SocketAddr]) -> Vec<ClusterNode> {
        addrs
            .iter()
            .zip(1..)
            .map(|(&addr, id)| ClusterNode {
                addr,
                id,
                weight: DEFAULT_WEIGHT,
            })
            .collect()
    }
}

/// Timeouts of a [`ClusterClient`].
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// Connecting and the handshake, per attempt.
    pub connect_timeout: Duration,
    /// Sending a node its part of a batch and reading every reply.
    pub reply_timeout: Duration,
    /// How long a node stays marked down before a call tries it again.
    pub down_retry: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            reply_timeout: Duration::from_secs(10),
            down_retry: Duration::from_secs(1),
        }
    }
}

/// What the cluster did with one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterReply {
    /// Records acknowledged, by whichever node took them.
    pub accepted: u32,
    /// Refused records: their index in the batch given and the reason.
    pub rejections: Vec<(u32, Option<RejectCode>)>,
    /// Records a node answered BUSY for (indexes in the batch): nothing of them is taken
    /// for sure; send them again after `retry_after_ms`.
    pub busy: Vec<u32>,
    /// The longest `retry_after_ms` of those BUSY answers.
    pub retry_after_ms: u32,
    /// Records sent again to another node because theirs failed during this call.
    pub rerouted: u32,
}

/// Why a batch could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("no node is up for {records} records; last failure: {last_error}")]
    AllDown { records: usize, last_error: String },
}

/// How one node is doing, for logs, metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: ClusterNode,
    /// False while marked down (until its retry succeeds).
    pub up: bool,
    /// Records it acknowledged.
    pub accepted: u64,
    /// Times it was marked down.
    pub failures: u64,
    /// Why it was last marked down.
    pub last_error: Option<String>,
}

/// One node's connection and health.
struct Member {
    node: ClusterNode,
    conn: Option<Client>,
    /// Marked down until then; `None` when up.
    down_until: Option<Instant>,
    accepted: u64,
    failures: u64,
    last_error: Option<String>,
}

impl Member {
    fn routable(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|until| now >= until)
    }

    fn mark_down(&mut self, error: &ClientError, down_retry: Duration) {
        if self.down_until.is_none() {
            tracing::warn!("playhead node {} marked down: {error:#}", self.node.addr);
        }
        self.conn = None;
        self.down_until = Some(Instant::now() + down_retry);
        self.failures += 1;
        self.last_error = Some(format!("{}: {error:#}", self.node.addr));
    }

    /// Sends `records` (one node's part of a batch) and returns each reply with the offset
    /// of its first record; connects first when there is no connection.
    async fn exchange(
        &mut self,
        records: &[WireRecord],
        secret: &[u8],
        options: &ClusterOptions,
    ) -> Result<Vec<Answered>, ClientError> {
        if self.conn.is_none() {
            let connect = Client::connect(self.node.addr, secret);
            let client = tokio::time::timeout(options.connect_timeout, connect)
                .await
                .map_err(|_| ClientError::Timeout(options.connect_timeout))??;
            self.conn = Some(client);
            if self.down_until.take().is_some() {
                tracing::info!("playhead node {} is back up", self.node.addr);
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        let exchange = send_in_windows(conn, records);
        tokio::time::timeout(options.reply_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(options.reply_timeout))?
    }
}

/// One batch's reply and the records it answers: `records[offset..offset + len]` of the
/// part sent to the node.
struct Answered {
    offset: usize,
    len: usize,
    reply: Reply,
}

/// Sends `records` as batches within the server's limits, at most its in-flight limit at a
/// time, and collects every reply in order.
async fn send_in_windows(
    conn: &mut Client,
    records: &[WireRecord],
) -> Result<Vec<Answered>, ClientError> {
    let limits = conn.limits();
    let per_batch = limits.max_records_per_batch.max(1) as usize;
    let window = limits.max_in_flight_batches.max(1) as usize;
    let batches: Vec<&[WireRecord]> = records.chunks(per_batch).collect();
    let mut answered = Vec::with_capacity(batches.len());
    for group in batches.chunks(window) {
        let mut seqs = Vec::with_capacity(group.len());
        for batch in group {
            seqs.push((conn.send_batch(batch).await?, batch.len()));
        }
        for (seq, len) in seqs {
            let reply = conn.recv().await?;
            if reply.seq() != seq {
                return Err(ClientError::Protocol(format!(
                    "reply for batch {} while waiting for {seq}",
                    reply.seq()
                )));
            }
            if let Reply::Ack { rejections, .. } = &reply {
                if let Some((index, _)) = rejections.iter().find(|(i, _)| *i as usize >= len) {
                    return Err(ClientError::Protocol(format!(
                        "rejection of record {index} in a batch of {len}"
                    )));
                }
            }
            let offset = answered.len() * per_batch;
            answered.push(Answered { offset, len, reply });
        }
    }
    Ok(answered)
}

/// A connection per node and the ring that routes accounts to them.
pub struct ClusterClient {
    ring: Ring,
    members: Vec<Member>,
    secret: Vec<u8>,
    options: ClusterOptions,
    /// Per node, this round's records for it and their indexes in the caller's batch
    /// (buffers reused from call to call).
    routed: Vec<(Vec<WireRecord>, Vec<u32>)>,
    /// The most recent failure of any node, for [`ClusterError::AllDown`].
    last_error: String,
}

impl ClusterClient {
    /// A client of `nodes`, authenticating with `secret`. Connects lazily, at the first
    /// batch a node gets; every node starts as up.
    pub fn new(
        nodes: &[ClusterNode],
        secret: &[u8],
        options: ClusterOptions,
    ) -> Result<Self, ClusterError> {
        let ring_nodes: Vec<RingNode> = nodes
            .iter()
            .map(|n| RingNode {
                id: n.id,
                weight: n.weight,
            })
            .collect();
        let ring = Ring::new(&ring_nodes)?;
        Ok(Self {
            ring,
            members: nodes
                .iter()
                .map(|&node| Member {
                    node,
                    conn: None,
                    down_until: None,
                    accepted: 0,
                    failures: 0,
                    last_error: None,
                })
                .collect(),
            secret: secret.to_vec(),
            options,
            routed: nodes.iter().map(|_| Default::default()).collect(),
            last_error: "none recorded".into(),
        })
    }

    /// The node `account_id`'s records go to now (down nodes skipped until their retry is
    /// due); `None` when every node is down.
    pub fn node_of(&self, account_id: u64) -> Option<ClusterNode> {
        let now = Instant::now();
        self.ring
            .node_of(account_id, |n| self.members[n].routable(now))
            .map(|n| self.members[n].node)
    }

    /// Every node's state, in the order given to [`ClusterClient::new`].
    pub fn status(&self) -> Vec<NodeStatus> {
        self.members
            .iter()
            .map(|m| NodeStatus {
                node: m.node,
                up: m.down_until.is_none(),
                accepted: m.accepted,
                failures: m.failures,
                last_error: m.last_error.clone(),
            })
            .collect()
    }

    /// Sends every record to its account's node and merges the answers; records of a
    /// node that fails go to the next node of their account within this call. Fails only
    /// when no node is left for some record.
    pub async fn write_batch(
        &mut self,
        records: &[WireRecord],
    ) -> Result<ClusterReply, ClusterError> {
        assert!(
            records.len() <= u32::MAX as usize,
            "a batch is counted in u32"
        );
        let mut reply = ClusterReply::default();
        let mut pending: Vec<u32> = (0..records.len() as u32).collect();
        // Nodes that failed during this call are not tried again in it, whatever
        // `down_retry` says, so every round has one node fewer or is the last.
        let mut failed_nodes = vec![false; self.members.len()];
        for round in 0..=self.members.len() {
            if pending.is_empty() {
                return Ok(reply);
            }
            if round > 0 {
                reply.rerouted += pending.len() as u32;
            }
            self.route(records, &pending, &failed_nodes)?;
            pending.clear();
            self.deliver(&mut reply, &mut pending, &mut failed_nodes)
                .await;
        }
        if pending.is_empty() {
            return Ok(reply);
        }
        Err(ClusterError::AllDown {
            records: pending.len(),
            last_error: self.last_error.clone(),
        })
    }

    /// Fills `routed` with the records at `indexes`, each under its account's node among
    /// the routable ones that are not `excluded`.
    fn route(
        &mut self,
        records: &[WireRecord],
        indexes: &[u32],
        excluded: &[bool],
    ) -> Result<(), ClusterError> {
        let now = Instant::now();
        let routable: Vec<bool> = (self.members.iter().zip(excluded))
            .map(|(m, &excluded)| !excluded && m.routable(now))
            .collect();
        for (part, origins) in &mut self.routed {
            part.clear();
            origins.clear();
        }
        for &i in indexes {
            let record = records[i as usize];
            let Some(node) = self.ring.node_of(record.account_id, |n| routable[n]) else {
                return Err(ClusterError::AllDown {
                    records: indexes.len(),
                    last_error: self.last_error.clone(),
                });
            };
            self.routed[node].0.push(record);
            self.routed[node].1.push(i);
        }
        Ok(())
    }

    /// Sends every node its routed part, concurrently; merges the replies into `reply`,
    /// puts the indexes of records whose node failed into `failed` and flags the node in
    /// `failed_nodes`.
    async fn deliver(
        &mut self,
        reply: &mut ClusterReply,
        failed: &mut Vec<u32>,
        failed_nodes: &mut [bool],
    ) {
        let (secret, options) = (&self.secret, &self.options);
        let exchanges = (self.members.iter_mut().enumerate())
            .zip(&self.routed)
            .filter(|(_, (part, _))| !part.is_empty())
            .map(|((index, member), (part, origins))| async move {
                let outcome = member.exchange(part, secret, options).await;
                (index, member, origins, outcome)
            });
        for (index, member, origins, outcome) in futures::future::join_all(exchanges).await {
            match outcome {
                Ok(replies) => merge(member, origins, replies, reply),
                Err(error) => {
                    failed_nodes[index] = true;
                    member.mark_down(&error, options.down_retry);
                    self.last_error = member.last_error.clone().unwrap_or_default();
                    failed.extend_from_slice(origins);
                }
            }
        }
    }
}

/// Adds one node's replies to `reply`, mapping batch indexes back through `origins`.
fn merge(member: &mut Member, origins: &[u32], answered: Vec<Answered>, reply: &mut ClusterReply) {
    for Answered {
        offset,
        len,
        reply: answer,
    } in answered
    {
        let batch = &origins[offset..offset + len];
        match answer {
            Reply::Ack {
                accepted,
                rejections,
                ..
            } => {
                reply.accepted += accepted;
                member.accepted += u64::from(accepted);
                for (index, code) in rejections {
                    reply.rejections.push((batch[index as usize], code));
                }
            }
            Reply::Busy { retry_after_ms, .. } => {
                reply.busy.extend_from_slice(batch);
                reply.retry_after_ms = reply.retry_after_ms.max(retry_after_ms);
            }
        }
    }
}
