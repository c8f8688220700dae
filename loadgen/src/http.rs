//! HTTP drivers (`max` and `fleet` writes, `read` with optional writes) and `--verify`.
//!
//! A deliberately small HTTP/1.1 keep-alive client over a raw socket: one request in
//! flight per connection, request bytes built in a reused buffer, responses parsed in
//! place. Tokens are minted with the server's HS256 secret and cached per profile.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use playhead::http::DeviceNames;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::fleet::{Fleet, TICK};
use crate::report::{latency_start, Live, TaskStats, Verification, Window};
use crate::workload::{Expected, LoadTitle, Outcome};
use crate::{Args, Workload};

/// Largest response we accept.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// One keep-alive connection.
pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: BytesMut,
    request: Vec<u8>,
}

/// A response: status and body.
pub struct Response {
    pub status: u16,
    pub body: bytes::Bytes,
}

impl HttpConn {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: BytesMut::with_capacity(8 * 1024),
            request: Vec::with_capacity(1024),
        }
    }

    /// Sends one request (reconnecting if the server closed the connection) and reads the
    /// response.
    pub async fn send(
        &mut self,
        method: &str,
        target: &str,
        token: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        self.request.clear();
        write!(
            self.request,
            "{method} {target} HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer {token}\r\n"
        )?;
        if let Some(body) = body {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )?;
            self.request.extend_from_slice(body);
        } else {
            self.request.extend_from_slice(b"\r\n");
        }
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        let result = self.exchange().await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self) -> anyhow::Result<Response> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(&self.request).await?;
        loop {
            if let Some((response, used, close)) = parse(&self.buf)? {
                self.buf.advance(used);
                if close {
                    self.stream = None;
                }
                return Ok(response);
            }
            if self.buf.len() > MAX_RESPONSE_BYTES {
                bail!("response larger than {MAX_RESPONSE_BYTES} bytes");
            }
            self.buf.reserve(8 * 1024);
            if stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }
}

/// Parses one response from the front of `buf`: (response, bytes used, connection closes).
fn parse(buf: &[u8]) -> anyhow::Result<Option<(Response, usize, bool)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let mut length = 0usize;
    let mut close = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("bad content-length")?;
            } else if name.eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let total = head_end + 4 + length;
    if buf.len() < total {
        return Ok(None);
    }
    let body = bytes::Bytes::copy_from_slice(&buf[head_end + 4..total]);
    Ok(Some((Response { status, body }, total, close)))
}

/// Tokens per profile, minted on first use.
struct Tokens {
    secret: String,
    cache: HashMap<(u64, u64), String>,
}

impl Tokens {
    fn new(secret: &str) -> Self {
        Self {
            secret: secret.to_string(),
            cache: HashMap::new(),
        }
    }

    fn get(&mut self, account_id: u64, profile_id: u64) -> anyhow::Result<&str> {
        if !self.cache.contains_key(&(account_id, profile_id)) {
            if self.cache.len() >= 1_000_000 {
                self.cache.clear();
            }
            let token =
                playhead::auth::mint_hs256(&self.secret, account_id, profile_id, 24 * 3600)?;
            self.cache.insert((account_id, profile_id), token);
        }
        Ok(&self.cache[&(account_id, profile_id)])
    }
}

fn device_name(device_id: u32) -> String {
    format!("d{device_id}")
}

/// Runs an HTTP workload on `--connections` connections.
pub async fn run(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    live: &Arc<Live>,
    window: Window,
) -> anyhow::Result<Outcome> {
    let connections = args.connections.max(1) as u64;
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let (args, titles, live) = (args.clone(), Arc::clone(titles), Arc::clone(live));
        tasks.spawn(async move { connection(&args, &titles, &live, window, c, connections).await });
    }
    crate::workload::gather(tasks, "request").await
}

async fn connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    c: u64,
    connections: u64,
) -> anyhow::Result<(TaskStats, Vec<Expected>, u64)> {
    let mut conn = HttpConn::new(args.http_addr);
    let mut tokens = Tokens::new(&args.hs256_secret);
    let mut stats = TaskStats::new();
    let mut rng = SmallRng::seed_from_u64(0xbeef ^ c);
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(connections as f64 / args.rate));
    let lo = args.keys * c / connections;
    let hi = (args.keys * (c + 1) / connections).max(lo + 1);
    let mut body = Vec::with_capacity(256);
    let mut target = String::with_capacity(128);
    // `max` over HTTP: the newest acknowledged position per key index.
    let mut written: HashMap<u64, u32> = HashMap::new();
    let mut unknown: HashMap<u64, u32> = HashMap::new();
    let mut fleet = (args.workload == Workload::Fleet).then(|| {
        Fleet::new(
            c,
            connections,
            args.viewers,
            args.profiles_per_household,
            Duration::from_secs_f64(args.heartbeat_secs),
            args.account_base,
            titles,
        )
    });
    let title_index: HashMap<u64, u32> = titles
        .iter()
        .enumerate()
        .map(|(i, t)| (t.title_id, i as u32))
        .collect();
    let mut next_due = window.start;
    let mut round = 0u32;
    let mut tick = 0u64;
    let mut due = Vec::new();

    while Instant::now() < window.end {
        if let Some(fleet) = fleet.as_mut() {
            // One tick of the fleet: every due heartbeat as its own POST.
            let intended = window.start + TICK * tick as u32;
            tokio::time::sleep_until(intended.into()).await;
            due.clear();
            fleet.due(tick, playhead::model::now_ms(), titles, |r| due.push(r));
            tick += 1;
            for r in &due {
                let title = &titles[title_index[&r.title_id] as usize];
                body.clear();
                write!(
                    body,
                    r#"{{"movie_id":"{}","position_seconds":{},"device_id":"{}","timestamp_ms":{}}}"#,
                    title.movie_id,
                    r.position_seconds,
                    device_name(r.device_id),
                    r.timestamp_ms
                )?;
                let token = tokens.get(r.account_id, r.profile_id)?;
                let start = latency_start(intended, Instant::now());
                let result = conn
                    .send("POST", "/api/v1/stream/progress", token, Some(&body))
                    .await;
                let at = Instant::now();
                // The server orders ties by its own device id: the hash of our name.
                let as_server = playhead::protocol::WireRecord {
                    device_id: DeviceNames::id_of(&device_name(r.device_id)),
                    ..*r
                };
                let ok = count(&result, live, &mut stats, window, at);
                if ok {
                    fleet.acknowledged(&as_server, title_index[&r.title_id]);
                } else {
                    fleet.unacknowledged(&as_server, title_index[&r.title_id]);
                }
                if window.measuring(intended) {
                    stats.record_latency(at - start);
                }
            }
            continue;
        }

        let intended = match interval {
            Some(i) => {
                let t = next_due;
                next_due += i;
                tokio::time::sleep_until(t.into()).await;
                t
            }
            None => Instant::now(),
        };
        let k = rng.random_range(lo..hi);
        let account = args.account_base + k;
        let title = &titles[(k % titles.len() as u64) as usize];
        let write =
            args.workload == Workload::Max || rng.random_bool(args.write_ratio.clamp(0.0, 1.0));
        let token = tokens.get(account, 1)?;
        let start = latency_start(intended, Instant::now());
        let result = if write {
            round += 1;
            let position = (round / 64 + 1).min(title.max_position);
            body.clear();
            write!(
                body,
                r#"{{"movie_id":"{}","position_seconds":{position},"device_id":"loadgen"}}"#,
                title.movie_id
            )?;
            let result = conn
                .send("POST", "/api/v1/stream/progress", token, Some(&body))
                .await;
            if matches!(&result, Ok(r) if r.status == 204) {
                written.insert(k, position);
                unknown.remove(&k);
            } else {
                unknown.insert(k, position);
            }
            result
        } else {
            target.clear();
            target.push_str("/api/v1/stream?movie_id=");
            target.push_str(&title.movie_id);
            let result = conn.send("GET", &target, token, None).await;
            if window.measuring(Instant::now()) && matches!(&result, Ok(r) if r.status == 200) {
                stats.reads += 1;
            }
            result
        };
        let at = Instant::now();
        count(&result, live, &mut stats, window, at);
        if window.measuring(intended) {
            stats.record_latency(at - start);
        }
    }

    if let Some(fleet) = fleet {
        let (expected, unverifiable) = fleet.expected();
        return Ok((stats, expected, unverifiable));
    }
    let expected = written
        .iter()
        .filter(|(k, _)| !unknown.contains_key(k))
        .map(|(&k, &position)| Expected {
            account_id: args.account_base + k,
            profile_id: 1,
            title: (k % titles.len() as u64) as u32,
            position_seconds: position,
        })
        .collect();
    Ok((stats, expected, unknown.len() as u64))
}

/// Counts one response; true when it was a success.
fn count(
    result: &anyhow::Result<Response>,
    live: &Live,
    stats: &mut TaskStats,
    window: Window,
    at: Instant,
) -> bool {
    let measuring = window.measuring(at);
    match result {
        Ok(r) if r.status < 300 => {
            live.acked.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.acked += 1;
            }
            true
        }
        Ok(r) if r.status == 503 => {
            live.busy.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.busy += 1;
            }
            false
        }
        Ok(r) if r.status < 500 => {
            live.errors.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.rejected += 1;
            }
            false
        }
        _ => {
            live.errors.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.errors += 1;
            }
            false
        }
    }
}

/// Reads every key in `sample` back (HTTP resume) and compares with the expected position.
pub async fn verify(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    sample: &[Expected],
) -> anyhow::Result<Verification> {
    let connections = args.connections.max(1);
    let chunk = sample.len().div_ceil(connections).max(1);
    let mut tasks = JoinSet::new();
    for part in sample.chunks(chunk) {
        let part = part.to_vec();
        let (args, titles) = (args.clone(), Arc::clone(titles));
        tasks.spawn(async move {
            let mut conn = HttpConn::new(args.http_addr);
            let mut tokens = Tokens::new(&args.hs256_secret);
            let mut result = Verification::default();
            let mut target = String::new();
            for e in part {
                let title = &titles[e.title as usize];
                target.clear();
                target.push_str("/api/v1/stream?movie_id=");
                target.push_str(&title.movie_id);
                let token = tokens.get(e.account_id, e.profile_id)?.to_string();
                let response = conn.send("GET", &target, &token, None).await?;
                result.checked += 1;
                let answer: serde_json::Value =
                    serde_json::from_slice(&response.body).unwrap_or_default();
                let got = answer["resume_position_seconds"].as_u64();
                let same_title = answer["movie_id"].as_str() == Some(title.movie_id.as_str());
                if response.status != 200
                    || !same_title
                    || got != Some(u64::from(e.position_seconds))
                    || answer["source"] == "degraded"
                {
                    result.mismatches += 1;
                    if result.examples.len() < 5 {
                        result.examples.push(format!(
                            "account {} profile {} {}: expected {} s, server said {} {}",
                            e.account_id,
                            e.profile_id,
                            title.movie_id,
                            e.position_seconds,
                            response.status,
                            String::from_utf8_lossy(&response.body)
                        ));
                    }
                }
            }
            anyhow::Ok(result)
        });
    }
    let mut total = Verification::default();
    while let Some(done) = tasks.join_next().await {
        let part = done??;
        total.checked += part.checked;
        total.mismatches += part.mismatches;
        total.examples.extend(part.examples);
    }
    total.examples.truncate(5);
    Ok(total)
}
