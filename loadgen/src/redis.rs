//! The Redis peers of the comparison (issue 7), driven by the same `max`, `fleet` and
//! `read` workloads so the numbers compare like for like:
//!
//! - `redis-lww`: the same last-write-wins upsert Playhead does, as a Lua script run with
//!   EVALSHA per heartbeat (compare `(timestamp, device, position)`, write if newer);
//! - `redis-set`: a plain SET per heartbeat, the no-semantics ceiling;
//! - reads: GET per resume read.
//!
//! Commands are pipelined `--batch` at a time with `--in-flight` batches outstanding per
//! connection: the same depth as the binary protocol's batches. Keys are
//! `ph:<account>:<profile>:<title>`; values `<timestamp_ms>:<device>:<position>`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::fleet::{Fleet, Sent, TICK};
use crate::report::{Live, TaskStats, Window};
use crate::workload::{LoadTitle, Outcome};
use crate::{Args, Protocol, Workload};

/// Last-write-wins by (timestamp, device, position), like Playhead's coalescer and stores.
pub const LWW_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ts, dev, pos = string.match(cur, '^(%d+):(%d+):(%d+)$')
  ts, dev, pos = tonumber(ts), tonumber(dev), tonumber(pos)
  local nts, ndev, npos = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  if nts < ts or (nts == ts and (ndev < dev or (ndev == dev and npos <= pos))) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3])
return 1
"#;

fn bulk(out: &mut Vec<u8>, s: &[u8]) {
    let _ = write!(out, "${}\r\n", s.len());
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// Reads one RESP reply from `buf`; returns its length, or None if incomplete. Errors
/// (`-...`) are returned as `Err`.
fn reply_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    match buf.first() {
        Some(b'+' | b':') => Ok(Some(end + 2)),
        Some(b'-') => bail!("redis error: {}", String::from_utf8_lossy(&buf[1..end])),
        Some(b'$') => {
            let n: i64 = std::str::from_utf8(&buf[1..end])?.parse()?;
            if n < 0 {
                return Ok(Some(end + 2));
            }
            let total = end + 2 + n as usize + 2;
            Ok((buf.len() >= total).then_some(total))
        }
        other => bail!("unexpected redis reply {other:?}"),
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(args: &Args) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(args.redis_addr)
            .await
            .with_context(|| format!("connecting to redis at {}", args.redis_addr))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Reads `n` replies.
    async fn replies(&mut self, n: usize) -> anyhow::Result<()> {
        let mut left = n;
        while left > 0 {
            match reply_len(&self.buf)? {
                Some(len) => {
                    self.buf.advance(len);
                    left -= 1;
                }
                None => {
                    self.buf.reserve(64 * 1024);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        bail!("redis closed the connection");
                    }
                }
            }
        }
        Ok(())
    }

    async fn call(&mut self, command: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.stream.write_all(command).await?;
        loop {
            if let Some(len) = reply_len(&self.buf)? {
                let reply = self.buf[..len].to_vec();
                self.buf.advance(len);
                return Ok(reply);
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("redis closed the connection");
            }
        }
    }
}

/// Loads the LWW script and returns its SHA1.
async fn load_script(args: &Args) -> anyhow::Result<String> {
    let mut conn = Conn::connect(args).await?;
    let mut cmd = b"*3\r\n".to_vec();
    bulk(&mut cmd, b"SCRIPT");
    bulk(&mut cmd, b"LOAD");
    bulk(&mut cmd, LWW_SCRIPT.as_bytes());
    let reply = conn.call(&cmd).await?;
    let text = String::from_utf8(reply)?;
    let sha = text.lines().nth(1).context("SCRIPT LOAD answered no SHA")?;
    Ok(sha.to_string())
}

pub async fn run(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    live: &Arc<Live>,
    window: Window,
) -> anyhow::Result<Outcome> {
    let sha = if args.protocol == Protocol::RedisLww {
        load_script(args).await?
    } else {
        String::new()
    };
    let connections = args.connections.max(1) as u64;
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let (args, titles, live, sha) = (
            args.clone(),
            Arc::clone(titles),
            Arc::clone(live),
            sha.clone(),
        );
        tasks.spawn(async move {
            let stats = if args.workload == Workload::Fleet {
                let fleet = Fleet::for_connection(&args, c, connections, &titles);
                fleet_connection(&args, &titles, &live, window, fleet, &sha).await?
            } else {
                connection(&args, &titles, &live, window, c, connections, &sha).await?
            };
            Ok((stats, Vec::new(), 0))
        });
    }
    crate::workload::gather(tasks, "batch").await
}

/// Appends one heartbeat as the peer's command: the LWW script, or a plain SET.
fn command(
    out: &mut Vec<u8>,
    args: &Args,
    sha: &str,
    key: &str,
    ts: u64,
    device: u32,
    position: u32,
) {
    if args.protocol == Protocol::RedisLww {
        out.extend_from_slice(b"*7\r\n");
        bulk(out, b"EVALSHA");
        bulk(out, sha.as_bytes());
        bulk(out, b"1");
        bulk(out, key.as_bytes());
        bulk(out, ts.to_string().as_bytes());
        bulk(out, device.to_string().as_bytes());
        bulk(out, position.to_string().as_bytes());
    } else {
        out.extend_from_slice(b"*3\r\n");
        bulk(out, b"SET");
        bulk(out, key.as_bytes());
        bulk(out, format!("{ts}:{device}:{position}").as_bytes());
    }
}

/// `fleet` against Redis: the same viewers and ticks as the binary driver, each tick's
/// heartbeats pipelined in chunks of `--batch`, so Redis is measured at the real traffic
/// shape (due, acknowledged, latency from the tick's intended time).
async fn fleet_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    mut fleet: Fleet,
    sha: &str,
) -> anyhow::Result<TaskStats> {
    let mut stats = TaskStats::new();
    if fleet.len() == 0 {
        return Ok(stats);
    }
    let mut conn = Conn::connect(args).await?;
    let batch = args.batch.max(1);
    let mut out = Vec::with_capacity(batch * 96);
    let mut key = String::with_capacity(64);
    let mut due: Vec<Sent> = Vec::new();
    let mut tick = 0u64;
    while Instant::now() < window.end {
        let intended = window.start + TICK * tick as u32;
        tokio::time::sleep_until(intended.into()).await;
        let start = crate::report::latency_start(intended, Instant::now());
        due.clear();
        fleet.due(tick, playhead::model::now_ms(), titles, |s| due.push(s));
        tick += 1;
        let measured = window.measuring(intended);
        if measured {
            stats.due += due.len() as u64;
        }
        for chunk in due.chunks(batch) {
            out.clear();
            for s in chunk {
                let r = &s.record;
                key.clear();
                let _ = std::fmt::Write::write_fmt(
                    &mut key,
                    format_args!("ph:{}:{}:{}", r.account_id, r.profile_id, r.title_id),
                );
                command(
                    &mut out,
                    args,
                    sha,
                    &key,
                    r.timestamp_ms,
                    r.device_id,
                    r.position_seconds,
                );
            }
            conn.stream
                .write_all(&out)
                .await
                .context("writing to redis")?;
            conn.replies(chunk.len()).await?;
            let at = Instant::now();
            live.acked.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if window.measuring(at) {
                stats.acked += chunk.len() as u64;
            }
            if measured {
                stats.due_acked += chunk.len() as u64;
                stats.record_latency(at - start);
            }
        }
    }
    stats.due += fleet.owed_from(tick, window);
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    c: u64,
    connections: u64,
    sha: &str,
) -> anyhow::Result<TaskStats> {
    let mut conn = Conn::connect(args).await?;
    let mut stats = TaskStats::new();
    let batch = args.batch.max(1);
    let lo = args.keys * c / connections;
    let hi = (args.keys * (c + 1) / connections).max(lo + 1);
    let mut rng = SmallRng::seed_from_u64(0xfeed ^ c);
    let mut next_key = lo;
    let mut round = 0u64;
    let mut out = Vec::with_capacity(batch * 96);
    let mut pending: VecDeque<(Instant, usize)> = VecDeque::new();
    let interval = (args.rate > 0.0)
        .then(|| Duration::from_secs_f64(batch as f64 * connections as f64 / args.rate));
    let mut next_due = window.start;
    let mut key = String::with_capacity(64);
    let mut value = String::with_capacity(64);
    loop {
        let now = Instant::now();
        let running = now < window.end;
        if !running && pending.is_empty() {
            break;
        }
        if running && pending.len() < args.in_flight.max(1) {
            let intended = match interval {
                Some(i) => {
                    let t = next_due;
                    next_due += i;
                    if t > now && pending.is_empty() {
                        tokio::time::sleep_until(t.into()).await;
                    }
                    crate::report::latency_start(t, Instant::now())
                }
                None => now,
            };
            out.clear();
            for _ in 0..batch {
                let k = if args.workload == Workload::Read {
                    rng.random_range(lo..hi)
                } else {
                    let k = next_key;
                    next_key = if next_key + 1 >= hi { lo } else { next_key + 1 };
                    if k == lo {
                        round += 1;
                    }
                    k
                };
                let title = &titles[(k % titles.len() as u64) as usize];
                key.clear();
                let _ = std::fmt::Write::write_fmt(
                    &mut key,
                    format_args!("ph:{}:1:{}", args.account_base + k, title.title_id),
                );
                let position = (round as u32).min(title.max_position);
                value.clear();
                let ts = playhead::model::now_ms();
                match (args.workload, args.protocol) {
                    (Workload::Read, _) => {
                        out.extend_from_slice(b"*2\r\n");
                        bulk(&mut out, b"GET");
                        bulk(&mut out, key.as_bytes());
                    }
                    (_, Protocol::RedisLww) => {
                        out.extend_from_slice(b"*7\r\n");
                        bulk(&mut out, b"EVALSHA");
                        bulk(&mut out, sha.as_bytes());
                        bulk(&mut out, b"1");
                        bulk(&mut out, key.as_bytes());
                        let _ = std::fmt::Write::write_fmt(&mut value, format_args!("{ts}"));
                        bulk(&mut out, value.as_bytes());
                        bulk(&mut out, b"1");
                        value.clear();
                        let _ = std::fmt::Write::write_fmt(&mut value, format_args!("{position}"));
                        bulk(&mut out, value.as_bytes());
                    }
                    _ => {
                        out.extend_from_slice(b"*3\r\n");
                        bulk(&mut out, b"SET");
                        bulk(&mut out, key.as_bytes());
                        let _ = std::fmt::Write::write_fmt(
                            &mut value,
                            format_args!("{ts}:1:{position}"),
                        );
                        bulk(&mut out, value.as_bytes());
                    }
                }
            }
            conn.stream
                .write_all(&out)
                .await
                .context("writing to redis")?;
            pending.push_back((intended, batch));
            continue;
        }
        let (started, n) = pending.pop_front().expect("pending is not empty here");
        conn.replies(n).await?;
        let at = Instant::now();
        live.acked.fetch_add(n as u64, Ordering::Relaxed);
        if window.measuring(at) {
            stats.acked += n as u64;
            if args.workload == Workload::Read {
                stats.reads += n as u64;
            }
        }
        if window.measuring(started) {
            stats.record_latency(at - started);
        }
    }
    Ok(stats)
}
