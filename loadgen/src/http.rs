//! HTTP drivers (`max` and `fleet` writes, `read` with optional writes) and `--verify`.
//!
//! A deliberately small HTTP/1.1 keep-alive client over a raw socket, built to cost the
//! generator as little as possible per request so that it measures the server:
//!
//! - request bytes are assembled by copying fixed pieces (method line, the key's cached
//!   token, the body) into one reused buffer; no `format!` machinery per request;
//! - responses are parsed in place with `httparse`; only the status is looked at during
//!   the run (a resume body is decoded by `--verify`, which checks every field);
//! - `--pipeline N` keeps up to N requests in flight per connection (HTTP/1.1
//!   pipelining); requests due together go out in one write. Depth 1, the default, sends
//!   the next request only after the previous answer, as a player does.
//!
//! Napkin math (2 cores, loopback): a depth-1 request costs the client ~9 µs of kernel
//! time (send, which also runs the server's TCP receive on loopback, epoll, recv); the
//! user-space part is kept under ~1 µs so the kernel part is what remains.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use playhead::resume::DeviceNames;
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
/// Headers a response may carry (the server sends 3–5).
const MAX_RESPONSE_HEADERS: usize = 16;
/// Answers still awaited when the run ends are given up after this (counted as errors).
const DRAIN: Duration = Duration::from_secs(10);
/// The request target of a resume read, up to the movie id.
const GET_PREFIX: &[u8] = b"GET /api/v1/stream?movie_id=";
/// What follows the movie id of a read, up to the token.
const GET_AFTER_TARGET: &[u8] = b" HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer ";
/// A progress write, up to the token.
const POST_PREFIX: &[u8] =
    b"POST /api/v1/stream/progress HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer ";
/// What follows a write's token, up to its content length.
const POST_AFTER_TOKEN: &[u8] = b"\r\nContent-Type: application/json\r\nContent-Length: ";

/// Appends a resume read of `movie_id` (GET, no body).
fn push_get(out: &mut Vec<u8>, movie_id: &str, token: &str) {
    out.extend_from_slice(GET_PREFIX);
    out.extend_from_slice(movie_id.as_bytes());
    out.extend_from_slice(GET_AFTER_TARGET);
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a progress write (POST) carrying `body`.
fn push_post(out: &mut Vec<u8>, token: &str, body: &[u8]) {
    out.extend_from_slice(POST_PREFIX);
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(POST_AFTER_TOKEN);
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Appends `n` in decimal (the formatting machinery costs more than the digits).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The body of the `max`/`read` workloads' writes.
fn push_progress_body(out: &mut Vec<u8>, movie_id: &str, position_seconds: u32) {
    out.extend_from_slice(br#"{"movie_id":""#);
    out.extend_from_slice(movie_id.as_bytes());
    out.extend_from_slice(br#"","position_seconds":"#);
    push_u64(out, u64::from(position_seconds));
    out.extend_from_slice(br#","device_id":"loadgen"}"#);
}

/// The head of one parsed response; its body is `body` within the buffer parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub body: Range<usize>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Parses one response from the front of `buf`: its head and the bytes it occupies, or
/// `None` while incomplete.
fn parse(buf: &[u8]) -> anyhow::Result<Option<(Head, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf).context("malformed HTTP response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.context("response without a status")?;
    let mut length = 0usize;
    let mut close = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .context("bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            close = true;
        }
    }
    if length > MAX_RESPONSE_BYTES {
        bail!("response body of {length} bytes, more than {MAX_RESPONSE_BYTES}");
    }
    let total = head_len + length;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Head {
            status,
            body: head_len..total,
            close,
        },
        total,
    )))
}

/// One keep-alive connection.
pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    /// Bytes received and not yet parsed.
    buf: BytesMut,
    /// Requests assembled and not yet written.
    out: Vec<u8>,
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
            buf: BytesMut::with_capacity(16 * 1024),
            out: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends one request (reconnecting if the server closed the connection) and reads the
    /// response, body included (`fleet` and `--verify`).
    pub async fn send(
        &mut self,
        method: &str,
        target: &str,
        token: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        self.out.clear();
        write!(
            self.out,
            "{method} {target} HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer {token}\r\n"
        )?;
        if let Some(body) = body {
            self.out
                .extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
            push_u64(&mut self.out, body.len() as u64);
            self.out.extend_from_slice(b"\r\n\r\n");
            self.out.extend_from_slice(body);
        } else {
            self.out.extend_from_slice(b"\r\n");
        }
        let result = async {
            self.flush().await?;
            let head = self.next_response().await?;
            let body = bytes::Bytes::copy_from_slice(&self.buf[head.body.clone()]);
            self.consume(&head);
            Ok(Response {
                status: head.status,
                body,
            })
        }
        .await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// Writes every assembled request (`out`), connecting first if needed.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Waits for the next complete response; it stays in `buf` until [`Self::consume`].
    /// Cancel-safe: bytes read are kept in `buf`.
    async fn next_response(&mut self) -> anyhow::Result<Head> {
        loop {
            if let Some((head, used)) = parse(&self.buf)? {
                debug_assert_eq!(head.body.end, used);
                return Ok(head);
            }
            if self.buf.len() > MAX_RESPONSE_BYTES {
                bail!("response larger than {MAX_RESPONSE_BYTES} bytes");
            }
            let stream = self.stream.as_mut().context("not connected")?;
            self.buf.reserve(16 * 1024);
            if stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// Drops a response returned by [`Self::next_response`] from the buffer.
    fn consume(&mut self, head: &Head) {
        self.buf.advance(head.body.end);
        if head.close {
            self.reset();
        }
    }

    /// Forgets the connection (the next request reconnects) and anything half-done on it.
    fn reset(&mut self) {
        self.stream = None;
        self.buf.clear();
        self.out.clear();
    }
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
            let token = mint(&self.secret, account_id, profile_id)?;
            self.cache.insert((account_id, profile_id), token);
        }
        Ok(&self.cache[&(account_id, profile_id)])
    }
}

/// A token for one profile, valid for a day: longer than any run.
fn mint(secret: &str, account_id: u64, profile_id: u64) -> anyhow::Result<String> {
    Ok(playhead::ingest::auth::mint_hs256(
        secret,
        account_id,
        profile_id,
        24 * 3600,
    )?)
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
    if args.workload == Workload::Fleet {
        let fleet = Fleet::for_connection(args, c, connections, titles);
        return fleet_connection(args, titles, live, window, fleet).await;
    }
    keyed_connection(args, titles, live, window, c, connections).await
}

/// `fleet` over HTTP: every due heartbeat of a tick as its own POST, one at a time.
async fn fleet_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    mut fleet: Fleet,
) -> anyhow::Result<(TaskStats, Vec<Expected>, u64)> {
    let mut conn = HttpConn::new(args.http_addr);
    let mut tokens = Tokens::new(&args.hs256_secret);
    let mut stats = TaskStats::new();
    let mut body = Vec::with_capacity(256);
    let mut tick = 0u64;
    let mut due = Vec::new();
    while Instant::now() < window.end {
        let intended = window.start + TICK * tick as u32;
        tokio::time::sleep_until(intended.into()).await;
        due.clear();
        fleet.due(tick, playhead::model::now_ms(), titles, |s| due.push(s));
        tick += 1;
        if window.measuring(intended) {
            stats.due += due.len() as u64;
        }
        for s in &due {
            let r = &s.record;
            let title = &titles[s.title as usize];
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
            let mut as_server = *s;
            as_server.record.device_id = DeviceNames::id_of(&device_name(r.device_id));
            let ok = count(result.ok().map(|r| r.status), live, &mut stats, window, at);
            if ok {
                fleet.acknowledged(&as_server);
            } else {
                fleet.unacknowledged(&as_server);
            }
            if window.measuring(intended) {
                if ok {
                    stats.due_acked += 1;
                }
                stats.record_latency(at - start);
            }
        }
    }
    stats.due += fleet.owed_from(tick, window);
    let (expected, unverifiable) = fleet.expected();
    Ok((stats, expected, unverifiable))
}

/// One request sent on a keyed connection and not yet answered.
struct InFlight {
    /// Where its latency starts (see [`latency_start`]).
    start: Instant,
    /// When the schedule wanted it sent (open loop) or when it was sent (closed loop).
    intended: Instant,
    /// A write: the key index and the position it carries.
    write: Option<(u64, u32)>,
}

/// `max` and `read` over HTTP: random keys of this connection's slice, closed loop or one
/// request every `connections / rate` seconds, up to `--pipeline` requests in flight.
async fn keyed_connection(
    args: &Args,
    titles: &[LoadTitle],
    live: &Live,
    window: Window,
    c: u64,
    connections: u64,
) -> anyhow::Result<(TaskStats, Vec<Expected>, u64)> {
    let mut conn = HttpConn::new(args.http_addr);
    let mut stats = TaskStats::new();
    let mut rng = SmallRng::seed_from_u64(0xbeef ^ c);
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(connections as f64 / args.rate));
    let depth = usize::from(args.pipeline.max(1));
    let lo = args.keys * c / connections;
    let hi = (args.keys * (c + 1) / connections).max(lo + 1);
    // One token per key of the slice (profile 1), minted on first use.
    let mut tokens: Vec<Option<Box<str>>> = vec![None; (hi - lo) as usize];
    let mut body = Vec::with_capacity(256);
    // `max` over HTTP: the newest acknowledged position per key index.
    let mut written: HashMap<u64, u32> = HashMap::new();
    let mut unknown: HashMap<u64, u32> = HashMap::new();
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
    let write_ratio = args.write_ratio.clamp(0.0, 1.0);
    let mut next_due = window.start;
    let mut round = 0u32;

    loop {
        let now = Instant::now();
        let running = now < window.end;
        if !running && (in_flight.is_empty() || now > window.end + DRAIN) {
            break;
        }
        // Assemble every request due now, up to the pipeline depth, into one write.
        while running && in_flight.len() < depth {
            let intended = match interval {
                Some(_) if next_due > now => break,
                Some(i) => {
                    let t = next_due;
                    next_due += i;
                    t
                }
                None => now,
            };
            let k = rng.random_range(lo..hi);
            let title = &titles[(k % titles.len() as u64) as usize];
            let token = match &mut tokens[(k - lo) as usize] {
                Some(t) => t,
                slot => slot
                    .insert(mint(&args.hs256_secret, args.account_base + k, 1)?.into_boxed_str()),
            };
            let write = args.workload == Workload::Max || rng.random_bool(write_ratio);
            let write = if write {
                round += 1;
                let position = (round / 64 + 1).min(title.max_position);
                body.clear();
                push_progress_body(&mut body, &title.movie_id, position);
                push_post(&mut conn.out, token, &body);
                Some((k, position))
            } else {
                push_get(&mut conn.out, &title.movie_id, token);
                None
            };
            in_flight.push_back(InFlight {
                start: latency_start(intended, now),
                intended,
                write,
            });
        }
        if !conn.out.is_empty() && conn.flush().await.is_err() {
            fail_all(&mut in_flight, &mut unknown, live, &mut stats, window);
            conn.reset();
            continue;
        }
        if in_flight.is_empty() {
            // Open loop, nothing outstanding: wait for the next send time.
            tokio::time::sleep_until(next_due.min(window.end).into()).await;
            continue;
        }
        // Wait for an answer; or for the next send time if the pipeline has room; or,
        // after the run, for the end of the drain.
        let wake = if !running {
            Some(window.end + DRAIN)
        } else if interval.is_some() && in_flight.len() < depth {
            Some(next_due.min(window.end))
        } else {
            None
        };
        let head = tokio::select! {
            biased;
            head = conn.next_response() => head,
            _ = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() => continue,
        };
        let head = match head {
            Ok(head) => head,
            Err(_) => {
                fail_all(&mut in_flight, &mut unknown, live, &mut stats, window);
                conn.reset();
                continue;
            }
        };
        let at = Instant::now();
        let sent = in_flight.pop_front().expect("a request awaits this answer");
        conn.consume(&head);
        if head.close {
            // Requests pipelined behind this answer are lost with the connection.
            fail_all(&mut in_flight, &mut unknown, live, &mut stats, window);
        }
        let ok = count(Some(head.status), live, &mut stats, window, at);
        match sent.write {
            Some((k, position)) if head.status == 204 => {
                written.insert(k, position);
                unknown.remove(&k);
            }
            Some((k, position)) => {
                unknown.insert(k, position);
            }
            None => {
                if ok && head.status == 200 && window.measuring(at) {
                    stats.reads += 1;
                }
            }
        }
        if window.measuring(sent.intended) {
            stats.record_latency(at - sent.start);
        }
    }
    // Answers never received: the writes among them may or may not have landed.
    fail_all(&mut in_flight, &mut unknown, live, &mut stats, window);

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

/// Counts every request in flight as failed (the connection broke, or the run ended
/// before they were answered); writes among them become unverifiable.
fn fail_all(
    in_flight: &mut VecDeque<InFlight>,
    unknown: &mut HashMap<u64, u32>,
    live: &Live,
    stats: &mut TaskStats,
    window: Window,
) {
    let at = Instant::now();
    for sent in in_flight.drain(..) {
        count(None, live, stats, window, at);
        if let Some((k, position)) = sent.write {
            unknown.insert(k, position);
        }
    }
}

/// Counts one answer by its status (`None`: no answer); true when it was a success.
fn count(
    status: Option<u16>,
    live: &Live,
    stats: &mut TaskStats,
    window: Window,
    at: Instant,
) -> bool {
    let measuring = window.measuring(at);
    match status {
        Some(s) if s < 300 => {
            live.acked.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.acked += 1;
            }
            true
        }
        Some(503) => {
            live.busy.fetch_add(1, Ordering::Relaxed);
            if measuring {
                stats.busy += 1;
            }
            false
        }
        Some(s) if s < 500 => {
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

/// How often `verify` asks again for a key answered `degraded` (its store read missed the
/// server's budget: the server says it does not know, which is not a wrong answer), as a
/// player would retry; pauses grow by [`VERIFY_RETRY_PAUSE`] each time (3 s in all). A key
/// still degraded after them counts as a mismatch.
const VERIFY_DEGRADED_RETRIES: u32 = 5;
const VERIFY_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often `verify` sends a request again on a new connection when the one it was on
/// failed (cut, refused, closed before the answer): a balancer in front of the nodes cuts
/// the connections of a node it marks down (HAProxy's `on-marked-down shutdown-sessions`),
/// and the next connection reaches the account's node of the moment. Pauses grow by
/// [`VERIFY_RETRY_PAUSE`] each time (3 s in all); past them the verify fails with the
/// error. Not an answer, so nothing is counted right or wrong for it.
const VERIFY_CONNECTION_RETRIES: u32 = 5;

/// Reads every key in `sample` back (HTTP resume) and compares with the expected position;
/// a degraded answer is asked again ([`VERIFY_DEGRADED_RETRIES`]), a wrong one never.
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
                result.checked += 1;
                let mut retries = 0;
                let (response, answer) = loop {
                    let response =
                        send_again_if_cut(&mut conn, &target, &token, &mut result).await?;
                    let answer: serde_json::Value =
                        serde_json::from_slice(&response.body).unwrap_or_default();
                    let degraded = response.status == 200 && answer["source"] == "degraded";
                    if !degraded || retries == VERIFY_DEGRADED_RETRIES {
                        break (response, answer);
                    }
                    retries += 1;
                    tokio::time::sleep(VERIFY_RETRY_PAUSE * retries).await;
                };
                let got = answer["resume_position_seconds"].as_u64();
                let same_title = answer["movie_id"].as_str() == Some(title.movie_id.as_str());
                let right = response.status == 200
                    && same_title
                    && got == Some(u64::from(e.position_seconds))
                    && answer["source"] != "degraded";
                if right && retries > 0 {
                    result.degraded_then_right += 1;
                }
                if !right {
                    result.mismatches += 1;
                    if result.examples.len() < 5 {
                        result.examples.push(format!(
                            "account {} profile {} {}: expected {} s, server said {} {}{}",
                            e.account_id,
                            e.profile_id,
                            title.movie_id,
                            e.position_seconds,
                            response.status,
                            String::from_utf8_lossy(&response.body),
                            if retries > 0 {
                                format!(" (after {retries} retries of a degraded answer)")
                            } else {
                                String::new()
                            }
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
        total.degraded_then_right += part.degraded_then_right;
        total.connection_retries += part.connection_retries;
        total.examples.extend(part.examples);
    }
    total.examples.truncate(5);
    Ok(total)
}

/// One verify request; a failed connection is replaced and the request sent again
/// ([`VERIFY_CONNECTION_RETRIES`]), each time counted in `result.connection_retries`.
async fn send_again_if_cut(
    conn: &mut HttpConn,
    target: &str,
    token: &str,
    result: &mut Verification,
) -> anyhow::Result<Response> {
    let mut retries = 0;
    loop {
        match conn.send("GET", target, token, None).await {
            Ok(response) => return Ok(response),
            Err(e) if retries == VERIFY_CONNECTION_RETRIES => {
                return Err(e.context(format!(
                    "verify: {} connections in a row failed",
                    retries + 1
                )))
            }
            Err(_) => {
                retries += 1;
                result.connection_retries += 1;
                tokio::time::sleep(VERIFY_RETRY_PAUSE * retries).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted peer for the verifier alone (the server's own answers are tested in
    /// tests/): per movie, the bodies it answers in turn (the last one repeated), and how
    /// many requests each movie got.
    async fn scripted_peer(
        script: HashMap<&'static str, Vec<&'static str>>,
    ) -> (SocketAddr, Arc<std::sync::Mutex<HashMap<String, usize>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
        let counts = Arc::clone(&asked);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let (script, counts) = (script.clone(), Arc::clone(&counts));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let movie = head.split("movie_id=").nth(1).unwrap();
                        let movie = movie.split(' ').next().unwrap().to_string();
                        let n = {
                            let mut counts = counts.lock().unwrap();
                            let n = counts.entry(movie.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        let answers = &script[movie.as_str()];
                        let body = answers[(n - 1).min(answers.len() - 1)];
                        if body == CUT {
                            return; // closes the connection without an answer
                        }
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        socket.write_all(reply.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, asked)
    }

    /// A degraded answer is asked again and counted apart when the retry is right; a
    /// wrong answer is a mismatch at once; one degraded on every retry is a mismatch.
    #[tokio::test]
    async fn verify_retries_degraded_answers_only() {
        let script = HashMap::from([
            (
                "slow",
                vec![
                    r#"{"movie_id":"slow","resume_position_seconds":0,"source":"degraded"}"#,
                    r#"{"movie_id":"slow","resume_position_seconds":7,"source":"store"}"#,
                ],
            ),
            (
                "wrong",
                vec![r#"{"movie_id":"wrong","resume_position_seconds":5,"source":"memory"}"#],
            ),
            (
                "down",
                vec![r#"{"movie_id":"down","resume_position_seconds":0,"source":"degraded"}"#],
            ),
        ]);
        let (addr, asked) = scripted_peer(script).await;
        let (args, titles, sample) = verify_setup(addr, &["slow", "wrong", "down"]);
        let v = verify(&args, &titles, &sample).await.unwrap();
        assert_eq!((v.checked, v.mismatches, v.degraded_then_right), (3, 2, 1));
        assert_eq!(v.connection_retries, 0);
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked["slow"], 2, "asked again once");
        assert_eq!(asked["wrong"], 1, "a wrong answer is not asked again");
        assert_eq!(asked["down"], 1 + VERIFY_DEGRADED_RETRIES as usize);
    }

    /// A script's body that makes the peer close the connection without answering.
    const CUT: &str = "CUT";

    /// `--connections 1` to `addr`, one title per movie, and one expected key per title
    /// (account 1, position 7).
    fn verify_setup(
        addr: SocketAddr,
        movies: &[&str],
    ) -> (Args, Arc<Vec<LoadTitle>>, Vec<Expected>) {
        use clap::Parser as _;
        let mut args = Args::parse_from(["playhead-loadgen", "fleet", "--connections", "1"]);
        args.http_addr = addr;
        let titles: Arc<Vec<LoadTitle>> = Arc::new(
            movies
                .iter()
                .enumerate()
                .map(|(i, m)| LoadTitle {
                    movie_id: m.to_string(),
                    title_id: i as u64 + 1,
                    max_position: 100,
                })
                .collect(),
        );
        let sample = (0..movies.len() as u32)
            .map(|title| Expected {
                account_id: 1,
                profile_id: 0,
                title,
                position_seconds: 7,
            })
            .collect();
        (args, titles, sample)
    }

    /// A connection cut before the answer (a balancer marking the node down) is replaced
    /// and the request sent again; the answer on the new connection is judged like any
    /// other (a wrong one is still a mismatch). A peer that cuts every time fails the
    /// verify once the retries are spent.
    #[tokio::test]
    async fn verify_sends_again_on_a_new_connection_when_one_is_cut() {
        let script = HashMap::from([
            (
                "cut",
                vec![
                    CUT,
                    r#"{"movie_id":"cut","resume_position_seconds":7,"source":"memory"}"#,
                ],
            ),
            (
                "wrong",
                vec![
                    CUT,
                    r#"{"movie_id":"wrong","resume_position_seconds":5,"source":"memory"}"#,
                ],
            ),
            ("gone", vec![CUT]),
        ]);
        let (addr, asked) = scripted_peer(script).await;
        let (args, titles, sample) = verify_setup(addr, &["cut", "wrong", "gone"]);
        let v = verify(&args, &titles, &sample[..2]).await.unwrap();
        assert_eq!((v.checked, v.mismatches, v.connection_retries), (2, 1, 2));
        assert_eq!(v.degraded_then_right, 0);
        let Err(err) = verify(&args, &titles, &sample[2..]).await else {
            panic!("a peer that cuts every connection passed the verify");
        };
        assert!(
            format!("{err:#}").contains("connections in a row failed"),
            "{err:#}"
        );
        let asked = asked.lock().unwrap().clone();
        assert_eq!((asked["cut"], asked["wrong"]), (2, 2));
        assert_eq!(asked["gone"], 1 + VERIFY_CONNECTION_RETRIES as usize);
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\ndate: x\r\n\r\n{}";

    #[test]
    fn parses_pipelined_responses_one_at_a_time() {
        let mut buf = OK.to_vec();
        buf.extend_from_slice(b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\nHTTP/1.1 2");
        let (head, used) = parse(&buf).unwrap().unwrap();
        assert_eq!(
            (head.status, &buf[head.body.clone()], head.close),
            (200, &b"{}"[..], false)
        );
        let rest = &buf[used..];
        let (head, used2) = parse(rest).unwrap().unwrap();
        assert_eq!((head.status, head.body.len()), (204, 0));
        assert_eq!(
            parse(&rest[used2..]).unwrap(),
            None,
            "incomplete third answer"
        );
    }

    #[test]
    fn waits_for_the_whole_body_and_sees_close() {
        let full = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 5\r\n\r\nbusy!";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (head, used) = parse(full).unwrap().unwrap();
        assert_eq!((head.status, head.close, used), (503, true, full.len()));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn assembled_requests_are_what_format_would_write() {
        let mut out = Vec::new();
        push_get(&mut out, "inception", "t.o.k");
        assert_eq!(
            out,
            b"GET /api/v1/stream?movie_id=inception HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer t.o.k\r\n\r\n"
        );
        let mut body = Vec::new();
        push_progress_body(&mut body, "up", 1_234_567);
        assert_eq!(
            body,
            br#"{"movie_id":"up","position_seconds":1234567,"device_id":"loadgen"}"#
        );
        out.clear();
        push_post(&mut out, "t", b"{}");
        assert_eq!(
            out,
            b"POST /api/v1/stream/progress HTTP/1.1\r\nHost: playhead\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        for n in [0u64, 9, 10, 4_294_967_295, u64::MAX] {
            out.clear();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
