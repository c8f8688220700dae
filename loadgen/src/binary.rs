//! Binary-protocol drivers: `max` and `fleet`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use playhead::ingest::binary::client::{
    Client, ClusterClient, ClusterNode, ClusterOptions, ClusterReply, Receiver, Reply, Sender,
};
use playhead::ingest::binary::codec::{self, WireRecord};
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use crate::fleet::{Fleet, Sent, TICK};
use crate::report::{latency_start, Live, TaskStats, Window};
use crate::workload::{Expected, LoadTitle, Outcome};
use crate::Args;

/// Resolves at `due`; at once when `due` is not after `now`. A tokio sleep always waits for
/// the timer's next millisecond tick, even for a deadline already passed — which capped a
/// closed-loop connection at one batch per millisecond.
async fn until(due: Instant, now: Instant) {
    if due > now {
        sleep_until(due.into()).await;
    }
}

/// Replies still awaited after the run ends are given up after this.
const DRAIN: Duration = Duration::from_secs(10);

/// Byte offset of record `i`'s position in an encoded batch frame.
fn position_offset(i: usize) -> usize {
    codec::HEADER_BYTES + codec::BATCH_PREFIX_BYTES + i * codec::RECORD_BYTES + 24
}

async fn connect(args: &Args) -> anyhow::Result<(Sender, Receiver)> {
    let client = Client::connect(args.binary_addr, args.secret.as_bytes())
        .await
        .with_context(|| format!("connecting to the binary listener {}", args.binary_addr))?;
    let (tx, rx, _) = client.into_split();
    Ok((tx, rx))
}

/// One batch sent and not yet answered.
struct Pending {
    intended: Instant,
    frame: usize,
    round: u32,
}

/// `max`: every connection owns a slice of the keys, pre-encoded as frames of `--batch`
/// records; round `r` of a frame carries position `min(r + 1, cap)` for all its keys, so
/// the newest acknowledged position of a key is known from the frame's last acked round.
pub async fn run_max(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    live: &Arc<Live>,
    window: Window,
) -> anyhow::Result<Outcome> {
    let connections = args.connections.max(1) as u64;
    let cap = titles
        .iter()
        .map(|t| t.max_position)
        .min()
        .unwrap_or(1)
        .max(1);
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let lo = args.keys * c / connections;
        let hi = args.keys * (c + 1) / connections;
        let (args, titles, live) = (args.clone(), Arc::clone(titles), Arc::clone(live));
        tasks
            .spawn(async move { max_connection(&args, &titles, &live, window, lo, hi, cap).await });
    }
    crate::workload::gather(tasks, "batch").await
}

#[allow(clippy::too_many_arguments)]
async fn max_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    lo: u64,
    hi: u64,
    cap: u32,
) -> anyhow::Result<(TaskStats, Vec<Expected>, u64)> {
    let batch = args.batch.max(1);
    let key = |i: u64| WireRecord {
        account_id: args.account_base + i,
        profile_id: 1,
        title_id: titles[(i % titles.len() as u64) as usize].title_id,
        position_seconds: 0,
        device_id: 1,
        timestamp_ms: 0,
    };
    // Pre-encode every frame once; rounds only patch positions, seq and CRC in place.
    let mut frames: Vec<(BytesMut, u64)> = Vec::new();
    let mut records = Vec::with_capacity(batch);
    let mut start = lo;
    while start < hi {
        let end = (start + batch as u64).min(hi);
        records.clear();
        records.extend((start..end).map(key));
        let mut frame = BytesMut::new();
        codec::encode_batch(&mut frame, 0, &records);
        frames.push((frame, start));
        start = end;
    }
    let mut stats = TaskStats::new();
    if frames.is_empty() {
        return Ok((stats, Vec::new(), 0));
    }
    let (mut tx, mut rx) = connect(args).await?;
    // Open loop: one batch per connection every `interval`.
    let interval = (args.rate > 0.0)
        .then(|| Duration::from_secs_f64(batch as f64 * args.connections as f64 / args.rate));
    let mut next_due = window.start;
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(args.in_flight);
    let mut resend: VecDeque<(usize, u32)> = VecDeque::new();
    let mut last_acked = vec![0u32; frames.len()];
    let mut last_sent = vec![0u32; frames.len()];
    let mut counter = 0u64;
    let mut seq = 0u64;
    let in_flight = args.in_flight.max(1);

    loop {
        let now = Instant::now();
        let running = now < window.end;
        if !running && pending.is_empty() && resend.is_empty() {
            break;
        }
        if !running && now > window.end + DRAIN {
            break;
        }
        let can_send = pending.len() < in_flight && (running || !resend.is_empty());
        let due = if !resend.is_empty() || interval.is_none() {
            now
        } else {
            next_due
        };
        tokio::select! {
            biased;
            reply = rx.recv(), if !pending.is_empty() => {
                let reply = reply.context("reading replies")?;
                let p = pending.pop_front().context("a reply nobody waited for")?;
                let at = Instant::now();
                match reply {
                    Reply::Ack { accepted, rejections, .. } => {
                        last_acked[p.frame] = p.round;
                        live.acked.fetch_add(u64::from(accepted), Ordering::Relaxed);
                        if window.measuring(at) {
                            stats.acked += u64::from(accepted);
                            stats.rejected += rejections.len() as u64;
                        }
                        if window.measuring(p.intended) {
                            stats.record_latency(at - p.intended);
                        }
                    }
                    Reply::Busy { retry_after_ms, .. } => {
                        live.busy.fetch_add(1, Ordering::Relaxed);
                        if window.measuring(at) {
                            stats.busy += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms))).await;
                        resend.push_back((p.frame, p.round));
                    }
                }
            }
            _ = until(due, now), if can_send => {
                let (frame_index, round, intended) = match resend.pop_front() {
                    Some((f, r)) => (f, r, Instant::now()),
                    None => {
                        let f = (counter % frames.len() as u64) as usize;
                        let r = (counter / frames.len() as u64) as u32 + 1;
                        counter += 1;
                        let intended = if interval.is_some() { latency_start(next_due, Instant::now()) } else { Instant::now() };
                        if let Some(i) = interval {
                            next_due += i;
                        }
                        (f, r, intended)
                    }
                };
                let (frame, _) = &mut frames[frame_index];
                let position = round.min(cap).to_le_bytes();
                let count = (frame.len() - codec::HEADER_BYTES - codec::BATCH_PREFIX_BYTES) / codec::RECORD_BYTES;
                for i in 0..count {
                    let at = position_offset(i);
                    frame[at..at + 4].copy_from_slice(&position);
                }
                seq += 1;
                codec::set_batch_seq(frame, seq);
                tx.send_frame(frame).await.context("sending a batch")?;
                last_sent[frame_index] = last_sent[frame_index].max(round);
                pending.push_back(Pending { intended, frame: frame_index, round });
            }
        }
    }

    // What the server must show: each frame's last acknowledged round, unless a later
    // send of that frame was never answered.
    let mut expected = Vec::new();
    let mut unverifiable = 0u64;
    let unanswered: Vec<usize> = pending
        .iter()
        .map(|p| p.frame)
        .chain(resend.iter().map(|r| r.0))
        .collect();
    for (f, (frame, first_key)) in frames.iter().enumerate() {
        let count = ((frame.len() - codec::HEADER_BYTES - codec::BATCH_PREFIX_BYTES)
            / codec::RECORD_BYTES) as u64;
        if unanswered.contains(&f) {
            unverifiable += count;
            continue;
        }
        if last_acked[f] == 0 {
            continue;
        }
        for i in *first_key..first_key + count {
            expected.push(Expected {
                account_id: args.account_base + i,
                profile_id: 1,
                title: (i % titles.len() as u64) as u32,
                position_seconds: last_acked[f].min(cap),
            });
        }
    }
    if !pending.is_empty() {
        live.errors
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        stats.errors += pending.len() as u64;
    }
    Ok((stats, expected, unverifiable))
}

/// `fleet`: the viewers of each connection report on their ticks; a tick's heartbeats go
/// as one batch, latency measured from the tick's scheduled time.
pub async fn run_fleet(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    live: &Arc<Live>,
    window: Window,
) -> anyhow::Result<Outcome> {
    let connections = args.connections.max(1) as u64;
    // Every connection's viewers first (seconds at tens of millions of viewers), so no
    // connection sits in its handshake while another task builds its fleet.
    let fleets: Vec<Fleet> = (0..connections)
        .map(|c| Fleet::for_connection(args, c, connections, titles))
        .collect();
    let mut tasks = JoinSet::new();
    for fleet in fleets {
        let (args, titles, live) = (args.clone(), Arc::clone(titles), Arc::clone(live));
        tasks.spawn(async move { fleet_connection(&args, &titles, &live, window, fleet).await });
    }
    let mut done = Vec::with_capacity(connections as usize);
    while let Some(joined) = tasks.join_next().await {
        done.push(joined??);
    }
    // Only now, with every connection's last answer in: see [`FleetDone`].
    let mut outcome = Outcome::new("batch");
    for FleetDone {
        mut stats,
        fleet,
        tick,
    } in done
    {
        stats.due += fleet.owed_from(tick, window);
        let (expected, unverifiable) = fleet.expected();
        outcome.add(&stats, expected, unverifiable);
    }
    Ok(outcome)
}

/// What a fleet connection hands back once its last answer is in: its stats, its viewers
/// and the tick it stopped at. What the window owed from that tick on and the keys to
/// verify are computed from them after *every* connection is done: sorting one
/// connection's millions of keys takes hundreds of milliseconds on the generator's thread,
/// and done inside the task it held back the answers of the connections still running,
/// which then counted 0.4–2 s of latency in the window's last second (BENCHMARKS.md).
struct FleetDone {
    stats: TaskStats,
    fleet: Fleet,
    tick: u64,
}

async fn fleet_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    mut fleet: Fleet,
) -> anyhow::Result<FleetDone> {
    let mut stats = TaskStats::new();
    if fleet.len() == 0 {
        return Ok(FleetDone {
            stats,
            fleet,
            tick: 0,
        });
    }
    if !args.servers.is_empty() {
        return fleet_cluster_connection(args, titles, live, window, fleet).await;
    }
    let (mut tx, mut rx) = connect(args).await?;
    let max_batch = args.batch.max(1);
    // In-flight batches keep what they sent (reused buffers) until answered: the intended
    // send time, and each heartbeat with its viewer.
    let mut pending: VecDeque<(Instant, Vec<Sent>)> = VecDeque::new();
    let mut pool: Vec<Vec<Sent>> = Vec::new();
    let mut frame = BytesMut::with_capacity(64 * 1024);
    let mut wire: Vec<WireRecord> = Vec::with_capacity(max_batch);
    let mut seq = 0u64;
    let mut tick = 0u64;
    let in_flight = args.in_flight.max(1);
    let mut due_now: Vec<Sent> = Vec::new();
    loop {
        let now = Instant::now();
        let running = now < window.end;
        if (!running && pending.is_empty()) || now > window.end + DRAIN {
            break;
        }
        let intended = window.start + TICK * tick as u32;
        let can_send = running && pending.len() < in_flight;
        tokio::select! {
            biased;
            reply = rx.recv(), if !pending.is_empty() => {
                let reply = reply.context("reading replies")?;
                let (intended, sent) = pending.pop_front().context("a reply nobody waited for")?;
                let at = Instant::now();
                let due = window.measuring(intended);
                match reply {
                    Reply::Ack { accepted, rejections, .. } => {
                        live.acked.fetch_add(u64::from(accepted), Ordering::Relaxed);
                        for (i, s) in sent.iter().enumerate() {
                            if rejections.is_empty() || !rejections.iter().any(|(j, _)| *j as usize == i) {
                                fleet.acknowledged(s);
                            }
                        }
                        if window.measuring(at) {
                            stats.acked += u64::from(accepted);
                            stats.rejected += rejections.len() as u64;
                        }
                        if due {
                            stats.due_acked += u64::from(accepted);
                        }
                        // A generator far behind its schedule still reports what its
                        // answers took from their intended time.
                        if due || window.measuring(at) {
                            stats.record_latency(at.saturating_duration_since(intended));
                        }
                    }
                    Reply::Busy { retry_after_ms, .. } => {
                        // Heartbeats are periodic: a refused one is superseded by the
                        // viewer's next; it is simply not acknowledged.
                        live.busy.fetch_add(1, Ordering::Relaxed);
                        if window.measuring(at) {
                            stats.busy += 1;
                        }
                        for s in &sent {
                            fleet.unacknowledged(s);
                        }
                        tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms))).await;
                    }
                }
                pool.push(sent);
            }
            _ = until(intended, now), if can_send => {
                let now_ms = playhead::model::now_ms();
                let sent_at = Instant::now();
                let start = latency_start(intended, sent_at);
                stats.record_lateness(sent_at.saturating_duration_since(intended));
                due_now.clear();
                fleet.due(tick, now_ms, titles, |s| due_now.push(s));
                tick += 1;
                if window.measuring(intended) {
                    stats.due += due_now.len() as u64;
                }
                for chunk in due_now.chunks(max_batch) {
                    let mut kept = pool.pop().unwrap_or_default();
                    kept.clear();
                    kept.extend_from_slice(chunk);
                    wire.clear();
                    wire.extend(chunk.iter().map(|s| s.record));
                    seq += 1;
                    frame.clear();
                    codec::encode_batch(&mut frame, seq, &wire);
                    tx.send_frame(&frame).await.context("sending a batch")?;
                    pending.push_back((start, kept));
                }
            }
        }
    }
    for (_, sent) in &pending {
        for s in sent {
            fleet.unacknowledged(s);
        }
    }
    // Ticks inside the window that the generator never reached were due all the same:
    // counted by `run_fleet`, from `tick`.
    Ok(FleetDone { stats, fleet, tick })
}

/// `fleet --servers`: each tick's heartbeats go through a [`ClusterClient`], which sends
/// every record to its account's node (the parts to the nodes concurrently) and re-routes
/// the records of a node that fails. One call per tick, answered before the next tick is
/// sent, so a slow node delays this connection's later ticks (their latency shows it).
async fn fleet_cluster_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    mut fleet: Fleet,
) -> anyhow::Result<FleetDone> {
    let mut stats = TaskStats::new();
    let nodes = ClusterNode::numbered(&args.servers);
    let mut cluster =
        ClusterClient::new(&nodes, args.secret.as_bytes(), ClusterOptions::default())?;
    let max_batch = args.batch.max(1);
    let mut due_now: Vec<Sent> = Vec::new();
    let mut wire: Vec<WireRecord> = Vec::with_capacity(max_batch);
    let mut rerouted = 0u64;
    let mut tick = 0u64;
    while Instant::now() < window.end {
        let intended = window.start + TICK * tick as u32;
        until(intended, Instant::now()).await;
        let start = latency_start(intended, Instant::now());
        due_now.clear();
        fleet.due(tick, playhead::model::now_ms(), titles, |s| due_now.push(s));
        tick += 1;
        if window.measuring(intended) {
            stats.due += due_now.len() as u64;
        }
        for chunk in due_now.chunks(max_batch) {
            wire.clear();
            wire.extend(chunk.iter().map(|s| s.record));
            let reply = cluster
                .write_batch(&wire)
                .await
                .context("writing to the cluster")?;
            rerouted += u64::from(reply.rerouted);
            cluster_answered(&reply, chunk, start, window, live, &mut stats, &mut fleet);
            if !reply.busy.is_empty() {
                let pause = u64::from(reply.retry_after_ms);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
    if rerouted > 0 {
        for node in cluster.status().iter().filter(|n| n.failures > 0) {
            eprintln!(
                "cluster node {} (id {}): marked down {} times, {} records acknowledged, last: {}",
                node.node.addr,
                node.node.id,
                node.failures,
                node.accepted,
                node.last_error.as_deref().unwrap_or("-")
            );
        }
        eprintln!("cluster: {rerouted} records re-routed to another node");
    }
    Ok(FleetDone { stats, fleet, tick })
}

/// Books one [`ClusterClient::write_batch`] answer for the heartbeats in `sent`.
fn cluster_answered(
    reply: &ClusterReply,
    sent: &[Sent],
    start: Instant,
    window: Window,
    live: &Live,
    stats: &mut TaskStats,
    fleet: &mut Fleet,
) {
    let at = Instant::now();
    let mut refused = vec![false; sent.len()];
    for &(i, _) in &reply.rejections {
        refused[i as usize] = true;
    }
    for &i in &reply.busy {
        refused[i as usize] = true;
        // Not taken for sure: the server may show it, or not.
        fleet.unacknowledged(&sent[i as usize]);
    }
    for (s, _) in sent.iter().zip(&refused).filter(|(_, refused)| !**refused) {
        fleet.acknowledged(s);
    }
    live.acked
        .fetch_add(u64::from(reply.accepted), Ordering::Relaxed);
    if !reply.busy.is_empty() {
        live.busy.fetch_add(1, Ordering::Relaxed);
    }
    if window.measuring(at) {
        stats.acked += u64::from(reply.accepted);
        stats.rejected += reply.rejections.len() as u64;
        stats.busy += u64::from(!reply.busy.is_empty());
    }
    let due = window.measuring(start);
    if due {
        stats.due_acked += u64::from(reply.accepted);
    }
    if due || window.measuring(at) {
        stats.record_latency(at.saturating_duration_since(start));
    }
}
