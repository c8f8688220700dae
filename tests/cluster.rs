//! A Playhead cluster on the embedded store: account-affine routing over HTTP through the
//! real HAProxy with `deploy/haproxy.cfg`, over the binary protocol through
//! `playhead::ingest::binary::client::ClusterClient`, what happens when a node dies, and the
//! pieces of a handover (docs/deploy.md): a node's full flush on SIGUSR1, HAProxy's runtime
//! API.
//!
//! The HAProxy test needs the `haproxy` binary (Debian's package, installed by `.ci/run`).
//! Where it is missing the test says so on stderr (uncaptured, so `cargo test` shows it) and
//! returns; under `CI` it fails instead, because CI installs it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{http_request, metric, try_http_request, HttpAnswer, Process};
use common::TestServer;
use playhead::ingest::auth;
use playhead::ingest::binary::client::ring::{
    Ring, RingNode, DEFAULT_WEIGHT, MAX_HAPROXY_ACCOUNT_ID,
};
use playhead::ingest::binary::client::{ClusterClient, ClusterError, ClusterNode, ClusterOptions};
use playhead::ingest::binary::codec::WireRecord;
use playhead::model::{now_ms, Key};
use playhead::resume::catalog::title_id_of;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
const NODES: usize = 3;
/// Health checks every 200 ms, down after 2 failures, up after 2 successes: a dead node
/// is out within ~0.5 s.
const CHECK_INTER_MS: u64 = 200;

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// HAProxy running `deploy/haproxy.cfg` in the foreground, in front of `nodes` (HTTP
/// addresses, in server order); killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    stats: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    fn start(binary: &Path, nodes: &[SocketAddr]) -> Self {
        Self::start_with_admin(binary, nodes, None)
    }

    /// [`Haproxy::start`], with the runtime API on the Unix socket `admin` when given.
    /// Returns once every node is up on its health checks.
    fn start_with_admin(binary: &Path, nodes: &[SocketAddr], admin: Option<&Path>) -> Self {
        // `free_port` only says a port was free a moment ago: another test of this file,
        // running in parallel, may have bound it since. HAProxy then exits at once saying
        // it cannot bind, and a second pair of ports is tried.
        for _ in 0..3 {
            let mut proxy = Self::spawn(binary, nodes, admin);
            let deadline = Instant::now() + Duration::from_secs(10);
            while proxy.child.try_wait().unwrap().is_none()
                && stats_csv(proxy.stats).is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            if proxy.child.try_wait().unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(50)); // the log's last lines
                if proxy.log().contains("cannot bind") {
                    continue;
                }
            }
            proxy.wait_for(Duration::from_secs(10), "every node up", |states| {
                states.iter().all(|s| s == "UP")
            });
            return proxy;
        }
        panic!("haproxy could not bind a free port in 3 tries");
    }

    /// Starts HAProxy on two ports that were free a moment ago; does not wait for it.
    fn spawn(binary: &Path, nodes: &[SocketAddr], admin: Option<&Path>) -> Self {
        let (addr, stats) = (free_port(), free_port());
        let mut cmd = Command::new(binary);
        if let Some(admin) = admin {
            cmd.env("PLAYHEAD_LB_ADMIN_SOCKET", admin);
        }
        cmd.args(["-db", "-f", CONFIG])
            .env("PLAYHEAD_LB_BIND", addr.to_string())
            .env("PLAYHEAD_LB_STATS", stats.to_string())
            .env("PLAYHEAD_LB_CHECK_INTER", format!("{CHECK_INTER_MS}ms"))
            .env("PLAYHEAD_LB_CHECK_FALL", "2")
            .env("PLAYHEAD_LB_CHECK_RISE", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (i, node) in nodes.iter().enumerate() {
            cmd.env(format!("PLAYHEAD_LB_NODE{}", i + 1), node.to_string());
        }
        let mut child = cmd.spawn().expect("spawn haproxy");
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Self {
            child,
            addr,
            stats,
            log,
        }
    }

    /// SIGKILL, as a crashed or lost load balancer: its connections are cut, nothing is
    /// handed over.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL haproxy");
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Each server's status (`UP`, `DOWN`, `UP 1/2`, …) from the stats CSV, in order.
    fn states(&mut self) -> Vec<String> {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("haproxy exited ({status}):\n{}", self.log());
        }
        let mut states = vec![String::new(); NODES];
        let Some(csv) = stats_csv(self.stats) else {
            return states; // not listening yet, right after the start
        };
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let (Some(px), Some(sv), Some(status)) =
            (column("pxname"), column("svname"), column("status"))
        else {
            return states;
        };
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.get(px) != Some(&"playhead") {
                continue;
            }
            let name = fields.get(sv).copied().unwrap_or_default();
            if let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<usize>().ok())
            {
                states[n - 1] = fields[status].to_string();
            }
        }
        states
    }

    /// Polls the stats until `ready` holds, up to `limit`; returns how long it took.
    fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        ready: impl Fn(&[String]) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let states = self.states();
            if ready(&states) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "haproxy: not {what} within {limit:?}: {states:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> Served {
        let answer = http_request(self.addr, method, path, Some(token), body);
        let node = answer
            .header("x-playhead-node")
            .and_then(|n| n.strip_prefix("node").and_then(|n| n.parse::<usize>().ok()))
            .unwrap_or_else(|| panic!("no X-Playhead-Node header: {answer:?}\n{}", self.log()));
        Served {
            node: node - 1,
            answer,
        }
    }
}

/// The stats page as CSV (HAProxy sends it chunked); `None` while nothing listens.
fn stats_csv(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /stats;csv HTTP/1.0\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, mut chunked) = text.split_once("\r\n\r\n")?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(chunked.to_string());
    }
    let mut body = String::new();
    loop {
        let (size, rest) = chunked.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(rest.get(..size)?);
        chunked = rest.get(size + 2..)?;
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer through HAProxy and the node (0-based, server order) that gave it.
struct Served {
    node: usize,
    answer: HttpAnswer,
}

/// The ring HAProxy's servers form: ids 1, 2, 3 at the weight of `deploy/haproxy.cfg`.
fn haproxy_ring() -> Ring {
    let nodes: Vec<RingNode> = (1..=NODES as u32)
        .map(|id| RingNode {
            id,
            weight: DEFAULT_WEIGHT,
        })
        .collect();
    Ring::new(&nodes).unwrap()
}

fn token(account_id: u64, profile_id: u64, ttl_seconds: u64) -> String {
    auth::mint_hs256(auth::DEV_SECRET, account_id, profile_id, ttl_seconds).unwrap()
}

/// A Playhead node of the cluster: its own data directory, the commit log in `group` mode
/// (so kill -9 loses nothing acknowledged), and, when restarted, the same HTTP address.
fn start_node(dir: &Path, http: Option<SocketAddr>) -> Process {
    let mut overrides = vec![("WAL__SYNC_MODE", "group".to_string())];
    if let Some(addr) = http {
        overrides.push(("HTTP__LISTEN", addr.to_string()));
    }
    Process::start(dir, &overrides)
}

/// `count` of a route's answers with `status` on one node, read from its own /metrics.
fn answered(node: &Process, route: &str, status: u16) -> f64 {
    metric(
        &node.metrics(),
        &format!("playhead_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
    )
}

/// The node HAProxy sends `account`'s requests to, by asking it.
fn haproxy_node_of(proxy: &Haproxy, account: u64) -> usize {
    let served = proxy.request(
        "GET",
        "/api/v1/stream?movie_id=inception",
        &token(account, 1, 600),
        None,
    );
    assert_eq!(served.answer.status, 200, "{:?}", served.answer);
    served.node
}

/// Accounts to compare HAProxy's choice with the ring's: small ids, large ones, and the
/// largest HAProxy reads as an integer.
fn sample_accounts() -> Vec<u64> {
    (1..=150)
        .chain((0..40).map(|i| 1_000_000_007 + i * 7_919))
        .chain((0..10).map(|i| MAX_HAPROXY_ACCOUNT_ID - i * 1_000_003))
        .collect()
}

#[test]
fn one_accounts_devices_share_a_node_through_haproxy_and_move_when_it_dies() {
    let Some(haproxy) = common::system_tool("haproxy", "haproxy") else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Process> = dirs.iter().map(|d| start_node(d.path(), None)).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let mut proxy = Haproxy::start(&haproxy, &addrs);

    // One profile watched on two devices, each with its own token.
    let (account, profile) = (42, 1);
    let phone = token(account, profile, 600);
    let tv = token(account, profile, 900);
    assert_ne!(phone, tv);
    let base_ms = now_ms() - 120_000;
    let beat = |position: u32, device: &str, at_ms: u64| {
        format!(
            r#"{{"movie_id":"inception","position_seconds":{position},"device_id":"{device}","timestamp_ms":{at_ms}}}"#
        )
    };
    let mut served_by = Vec::new();
    let post = |token: &str, body: String, served_by: &mut Vec<usize>| {
        let s = proxy.request("POST", "/api/v1/stream/progress", token, Some(&body));
        assert_eq!(s.answer.status, 204, "{:?}", s.answer);
        served_by.push(s.node);
    };
    // The phone plays 100 → 136 s, then the TV goes on from 1 000 s, 40 s later.
    for i in 0..10 {
        post(
            &phone,
            beat(100 + 4 * i, "phone", base_ms + 4_000 * u64::from(i)),
            &mut served_by,
        );
    }
    for i in 0..10 {
        let at = base_ms + 40_000 + 4_000 * u64::from(i);
        post(&tv, beat(1_000 + 4 * i, "tv", at), &mut served_by);
    }
    let tv_last_ms = base_ms + 40_000 + 36_000;
    // A phone heartbeat that arrives last but was seen first (a retry) changes nothing.
    post(&phone, beat(136, "phone", base_ms + 36_000), &mut served_by);
    let read = proxy.request("GET", "/api/v1/stream?movie_id=inception", &phone, None);
    served_by.push(read.node);
    let owner = served_by[0];
    assert!(
        served_by.iter().all(|&n| n == owner),
        "the account's requests were spread: {served_by:?}"
    );
    let resume = read.answer.json();
    assert_eq!(resume["resume_position_seconds"], 1_036, "{resume}");
    assert_eq!(resume["updated_at_ms"], tv_last_ms, "{resume}");
    assert_eq!(resume["last_device_id"], "tv", "{resume}");
    assert_eq!(resume["source"], "memory", "{resume}");
    // The nodes' own counters agree with HAProxy's header: 21 heartbeats, 1 read, all on
    // the owner.
    for (i, node) in nodes.iter().enumerate() {
        let expect = if i == owner { (21.0, 1.0) } else { (0.0, 0.0) };
        let got = (
            answered(node, "post_progress", 204),
            answered(node, "get_stream", 200),
        );
        assert_eq!(got, expect, "node {i} (owner {owner})");
    }

    // The ring of playhead::ingest::binary::client picks HAProxy's node for every account.
    let ring = haproxy_ring();
    let accounts = sample_accounts();
    for &a in &accounts {
        let expect = ring.node_of(a, |_| true).unwrap();
        assert_eq!(haproxy_node_of(&proxy, a), expect, "account {a}");
    }
    assert_eq!(ring.node_of(account, |_| true), Some(owner));

    // kill -9 the owner: once the health checks mark it down, another node answers.
    nodes[owner].kill9();
    // Before the checks notice, a request that finds the node's port closed is retried on
    // the account's next node (`retries 1`, `option redispatch`).
    let asked = Instant::now();
    let early = proxy.request("GET", "/api/v1/stream?movie_id=inception", &tv, None);
    assert_eq!(early.answer.status, 200, "{:?}", early.answer);
    assert_ne!(early.node, owner);
    eprintln!(
        "right after the kill: answered by node {} in {:?}",
        early.node,
        asked.elapsed()
    );
    let marked = proxy.wait_for(Duration::from_secs(10), "marking the node down", |s| {
        s[owner].starts_with("DOWN")
    });
    eprintln!("node {owner} killed; marked down after {:?}", marked);
    let read = proxy.request("GET", "/api/v1/stream?movie_id=inception", &tv, None);
    assert_ne!(read.node, owner);
    assert_eq!(read.answer.status, 200, "{:?}", read.answer);
    let heir = read.node;
    eprintln!("after the checks: answered by node {heir}");
    // Each node has its own embedded store: the heir knows nothing of the account yet.
    let resume = read.answer.json();
    assert_eq!(resume["resume_position_seconds"], 0, "{resume}");
    assert!(resume.get("updated_at_ms").is_none(), "{resume}");
    // It takes the account's new heartbeats and answers them.
    let later = base_ms + 100_000;
    let s = proxy.request(
        "POST",
        "/api/v1/stream/progress",
        &tv,
        Some(&beat(1_100, "tv", later)),
    );
    assert_eq!((s.answer.status, s.node), (204, heir), "{:?}", s.answer);
    let read = proxy.request("GET", "/api/v1/stream?movie_id=inception", &phone, None);
    assert_eq!(read.node, heir);
    assert_eq!(read.answer.json()["resume_position_seconds"], 1_100);
    // With the owner down, the ring and HAProxy still agree on every account.
    for &a in &accounts {
        let expect = ring.node_of(a, |n| n != owner).unwrap();
        assert_eq!(
            haproxy_node_of(&proxy, a),
            expect,
            "account {a}, node {owner} down"
        );
    }
    assert_eq!(ring.node_of(account, |n| n != owner), Some(heir));

    // The owner comes back on its address, replays its commit log, and gets the account
    // back: it answers what it had acknowledged before it died, not what the heir took
    // meanwhile (the heir's write is in the heir's store only).
    nodes[owner] = start_node(dirs[owner].path(), Some(addrs[owner]));
    proxy.wait_for(Duration::from_secs(10), "marking the node up", |s| {
        s[owner] == "UP"
    });
    let read = proxy.request("GET", "/api/v1/stream?movie_id=inception", &phone, None);
    assert_eq!(read.node, owner);
    let resume = read.answer.json();
    assert_eq!(resume["resume_position_seconds"], 1_036, "{resume}");
    assert_eq!(resume["updated_at_ms"], tv_last_ms, "{resume}");
    // Device names live in memory only (docs/api.md, `api.max_device_names`).
    assert!(resume.get("last_device_id").is_none(), "{resume}");
}

/// What one client of [`two_haproxies_route_alike_and_losing_one_loses_nothing_acknowledged`]
/// saw.
#[derive(Debug, Default)]
struct ClientRun {
    account: u64,
    /// Heartbeats acknowledged (204), in order; the last is the newest.
    acked: u32,
    /// Acknowledged after the client had switched proxies.
    acked_after_switch: u32,
    /// Requests that got no answer (connection refused or cut) and were sent again.
    failed: u32,
    /// On switching: what the other proxy's first read answered, and the newest heartbeat
    /// acknowledged before (the position), and the one in flight when the proxy died.
    switch_read: Option<(u64, u32, u32)>,
}

/// One heartbeat of a two-device client: position `100 + seq`, stamped `seq` seconds after
/// `base_ms`, from the phone on even and the TV on odd numbers (each with its own token).
fn device_beat(seq: u32, base_ms: u64) -> (String, bool) {
    let from_phone = seq.is_multiple_of(2);
    let device = if from_phone { "phone" } else { "tv" };
    let body = format!(
        r#"{{"movie_id":"inception","position_seconds":{},"device_id":"{device}","timestamp_ms":{}}}"#,
        100 + seq,
        base_ms + 1_000 * u64::from(seq)
    );
    (body, from_phone)
}

/// A request through one proxy: the node that answered, or `None` when the proxy did not
/// answer at all (refused, cut, or no header: the connection died).
fn through(
    proxy: SocketAddr,
    method: &str,
    token: &str,
    body: Option<&str>,
) -> Option<(usize, HttpAnswer)> {
    let path = if method == "POST" {
        "/api/v1/stream/progress"
    } else {
        "/api/v1/stream?movie_id=inception"
    };
    let answer = try_http_request(proxy, method, path, Some(token), body).ok()?;
    let node = answer
        .header("x-playhead-node")
        .and_then(|n| n.strip_prefix("node").and_then(|n| n.parse::<usize>().ok()))?;
    Some((node - 1, answer))
}

/// A device client that knows two proxy addresses (as DNS with two records gives it) and
/// goes to the other one when its proxy does not answer, sending the unanswered request
/// again (a heartbeat is idempotent). After each acknowledged heartbeat it reads the
/// position back; every answer must come from `owner` and be the newest acknowledged
/// heartbeat. Runs until `stop`, bounded by 60 s.
fn device_client(
    proxies: [SocketAddr; 2],
    first: usize,
    account: u64,
    owner: usize,
    acked: &std::sync::atomic::AtomicU32,
    stop: &std::sync::atomic::AtomicBool,
) -> ClientRun {
    use std::sync::atomic::Ordering;
    let (phone, tv) = (token(account, 1, 600), token(account, 1, 900));
    let base_ms = now_ms() - 600_000;
    let mut run = ClientRun {
        account,
        ..ClientRun::default()
    };
    let mut current = first;
    let mut switched = false;
    let started = Instant::now();
    let mut seq = 0u32;
    while !stop.load(Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(60), "{run:?}");
        let (body, from_phone) = device_beat(seq, base_ms);
        let token = if from_phone { &phone } else { &tv };
        let Some((node, answer)) = through(proxies[current], "POST", token, Some(&body)) else {
            run.failed += 1;
            assert!(run.failed <= 20, "no proxy answers: {run:?}");
            if !switched {
                // The other proxy's first answer: the newest acknowledged heartbeat (or
                // the one in flight, had the dead proxy passed it on before dying).
                switched = true;
                current = 1 - current;
                let (node, read) = through(proxies[current], "GET", &tv, None)
                    .unwrap_or_else(|| panic!("the other proxy does not answer: {run:?}"));
                assert_eq!((node, read.status), (owner, 200), "{run:?}");
                let position = read.json()["resume_position_seconds"].as_u64().unwrap();
                let newest_acked = if run.acked > 0 { 100 + seq - 1 } else { 0 };
                run.switch_read = Some((position, newest_acked, 100 + seq));
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue; // the same heartbeat again
        };
        assert_eq!((node, answer.status), (owner, 204), "{answer:?}");
        run.acked += 1;
        run.acked_after_switch += u32::from(switched);
        acked.fetch_add(1, Ordering::SeqCst);
        // Read it back through the same proxy (a device asking where to resume).
        let Some((node, read)) = through(proxies[current], "GET", token, None) else {
            seq += 1;
            continue; // the proxy died in between: the next heartbeat notices
        };
        assert_eq!((node, read.status), (owner, 200), "{read:?}");
        let v = read.json();
        assert_eq!(v["resume_position_seconds"], 100 + seq, "{run:?}: {v}");
        assert_eq!(
            v["updated_at_ms"],
            base_ms + 1_000 * u64::from(seq),
            "{run:?}: {v}"
        );
        seq += 1;
    }
    run
}

/// Two HAProxy instances from the same `deploy/haproxy.cfg` (what docs/deploy.md tells
/// operators to run) send every account to the same node, the ring's; when one is
/// `kill -9`'d mid-run, the devices that were using it go to the other and are answered
/// by their account's node, with the newest position they had been acknowledged.
#[test]
fn two_haproxies_route_alike_and_losing_one_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let Some(haproxy) = common::system_tool("haproxy", "haproxy") else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Process> = dirs.iter().map(|d| start_node(d.path(), None)).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let mut first = Haproxy::start(&haproxy, &addrs);
    let second = Haproxy::start(&haproxy, &addrs);

    // The mapping is a function of the file and the token: both instances agree with
    // each other and with the ring on every sampled account.
    let ring = haproxy_ring();
    for &a in &sample_accounts() {
        let expect = ring.node_of(a, |_| true).unwrap();
        let got = (haproxy_node_of(&first, a), haproxy_node_of(&second, a));
        assert_eq!(got, (expect, expect), "account {a}");
    }

    // Two accounts per node; of each node's two, one starts on each proxy.
    let mut accounts: Vec<(u64, usize)> = Vec::new();
    for owner in 0..NODES {
        accounts.extend(
            (10_000..)
                .filter(|&a| ring.node_of(a, |_| true) == Some(owner))
                .take(2)
                .map(|a| (a, owner)),
        );
    }
    let proxies = [first.addr, second.addr];
    let acked: Vec<AtomicU32> = accounts.iter().map(|_| AtomicU32::new(0)).collect();
    let stop = AtomicBool::new(false);
    let runs: Vec<ClientRun> = std::thread::scope(|scope| {
        let clients: Vec<_> = accounts
            .iter()
            .zip(&acked)
            .enumerate()
            .map(|(i, (&(account, owner), acked))| {
                let stop = &stop;
                scope.spawn(move || device_client(proxies, i % 2, account, owner, acked, stop))
            })
            .collect();
        // Mid-run: once every client has 10 heartbeats acknowledged, the first proxy dies;
        // the run goes on until every client has 10 more.
        let wait_all = |at_least: u32| {
            let started = Instant::now();
            while acked.iter().any(|a| a.load(Ordering::SeqCst) < at_least) {
                let stuck = clients.iter().any(|c| c.is_finished());
                assert!(
                    !stuck && started.elapsed() < Duration::from_secs(30),
                    "clients stuck or failed below {at_least} heartbeats: {acked:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_all(10);
        let before: Vec<u32> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        first.kill9();
        wait_all(before.iter().max().unwrap() + 10);
        stop.store(true, Ordering::SeqCst);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(
        try_http_request(first.addr, "GET", "/healthz", None, None).is_err(),
        "the killed proxy still answers"
    );

    for (i, run) in runs.iter().enumerate() {
        eprintln!("client {i} (first proxy {}): {run:?}", i % 2);
        assert!(run.acked_after_switch >= 10 || i % 2 == 1, "{run:?}");
        if i % 2 == 0 {
            // It was on the killed proxy: it noticed, switched once, and the other proxy's
            // first answer was its newest acknowledged heartbeat — or the one in flight,
            // when the proxy had passed it on before it died.
            let (read, newest_acked, in_flight) = run.switch_read.expect("never switched");
            assert!(
                read == u64::from(newest_acked) || read == u64::from(in_flight),
                "{run:?}"
            );
        } else {
            assert_eq!((run.failed, run.switch_read), (0, None), "{run:?}");
        }
    }
    // At the end, the survivor and each owner itself answer every account's newest
    // acknowledged position.
    for (run, &(account, owner)) in runs.iter().zip(&accounts) {
        assert_eq!(run.account, account);
        let newest = u64::from(100 + run.acked - 1);
        let (node, read) = through(second.addr, "GET", &token(account, 1, 600), None).unwrap();
        assert_eq!(node, owner);
        assert_eq!(read.json()["resume_position_seconds"], newest, "{run:?}");
        let direct = nodes[owner].http(
            "GET",
            "/api/v1/stream?movie_id=inception",
            Some(&token(account, 1, 600)),
            None,
        );
        assert_eq!(direct.json()["resume_position_seconds"], newest, "{run:?}");
    }
    // Every heartbeat reached its account's node and no other: each node counted those of
    // its own accounts, plus at most one per request the dead proxy left unanswered (it
    // may have passed it on), sent again.
    for (n, node) in nodes.iter().enumerate() {
        let own = runs.iter().zip(&accounts).filter(|(_, &(_, o))| o == n);
        let (acked, failed) = own.fold((0, 0), |(a, f), (r, _)| (a + r.acked, f + r.failed));
        let counted = answered(node, "post_progress", 204) as u32;
        assert!(
            (acked..=acked + failed).contains(&counted),
            "node {n}: counted {counted}, clients acked {acked} (+ {failed} unanswered)"
        );
    }
}

/// The runbook's commands (docs/deploy.md, leave and lost node), as an operator types them;
/// the test runs them with its own socket in place of this path.
const RUNBOOK_SOCKET: &str = "/run/haproxy/playhead-admin.sock";
const RUNBOOK_MAINT: &str = r#"echo "set server playhead/node3 state maint" | socat stdio /run/haproxy/playhead-admin.sock"#;
const RUNBOOK_READY: &str = r#"echo "set server playhead/node3 state ready" | socat stdio /run/haproxy/playhead-admin.sock"#;

/// One of the runbook's commands through `sh`, on `socket`; returns what it printed.
fn runbook_command(command: &str, socket: &Path) -> String {
    let command = command.replace(RUNBOOK_SOCKET, &socket.display().to_string());
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    assert!(
        out.status.success(),
        "`{command}`: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The leave and join procedures of docs/deploy.md move accounts with HAProxy's runtime API,
/// by the runbook's own `socat` commands: `set server playhead/node3 state maint` sends
/// exactly the accounts of node 3 to the ring's next nodes (what a gateway's ring without
/// node 3 computes), and `state ready` gives them back.
#[test]
fn the_admin_socket_takes_a_node_out_and_back_as_the_ring_does() {
    let deploy = std::fs::read_to_string("docs/deploy.md").unwrap();
    for command in [RUNBOOK_MAINT, RUNBOOK_READY] {
        assert!(
            deploy.contains(command),
            "docs/deploy.md no longer says `{command}`"
        );
    }
    let Some(haproxy) = common::system_tool("haproxy", "haproxy") else {
        return;
    };
    if common::system_tool("socat", "socat").is_none() {
        return;
    }
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Process> = dirs.iter().map(|d| start_node(d.path(), None)).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("admin.sock");
    let mut proxy = Haproxy::start_with_admin(&haproxy, &addrs, Some(&socket));
    let ring = haproxy_ring();
    let accounts = sample_accounts();
    let leaving = 2;
    let answer = runbook_command(RUNBOOK_MAINT, &socket);
    assert!(answer.trim().is_empty(), "{answer}");
    proxy.wait_for(Duration::from_secs(5), "node 3 in maintenance", |s| {
        s[leaving].starts_with("MAINT")
    });
    for &a in &accounts {
        let expect = ring.node_of(a, |n| n != leaving).unwrap();
        assert_eq!(
            haproxy_node_of(&proxy, a),
            expect,
            "account {a}, node 3 out"
        );
    }
    let answer = runbook_command(RUNBOOK_READY, &socket);
    assert!(answer.trim().is_empty(), "{answer}");
    proxy.wait_for(Duration::from_secs(5), "node 3 back", |s| {
        s[leaving] == "UP"
    });
    for &a in &accounts {
        let expect = ring.node_of(a, |_| true).unwrap();
        assert_eq!(
            haproxy_node_of(&proxy, a),
            expect,
            "account {a}, node 3 back"
        );
    }
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

/// Which of `servers` hold `account`'s key at `position` (by their engines' reads).
async fn holders(servers: &[Option<&TestServer>], account: u64, position: u32) -> Vec<usize> {
    let key = Key::new(account, 1, title_id_of("inception"));
    let mut found = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        if let Some(server) = server {
            let value = server.engine.get(key).await.value;
            if value.is_some_and(|v| v.position_seconds == position) {
                found.push(i);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_client_splits_batches_per_node_and_reroutes_around_down_nodes() {
    let accounts = 1..=600u64;
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    // The third node is not running yet: its port refuses connections.
    let c_addr = free_port();
    let nodes = ClusterNode::numbered(&[a.binary_addr, b.binary_addr, c_addr]);
    let options = ClusterOptions {
        connect_timeout: Duration::from_secs(2),
        reply_timeout: Duration::from_secs(10),
        down_retry: Duration::from_millis(300),
    };
    let secret = a.config.binary.secret.clone();
    let mut client = ClusterClient::new(&nodes, secret.as_bytes(), options).unwrap();
    let ring = haproxy_ring();
    let owned_by = |n: usize, up: &dyn Fn(usize) -> bool| {
        accounts
            .clone()
            .filter(|&acc| ring.node_of(acc, up) == Some(n))
            .count() as u32
    };
    let batch = |position: u32| -> Vec<WireRecord> {
        let at = now_ms() - 60_000 + u64::from(position);
        accounts
            .clone()
            .map(|acc| record(acc, position, at))
            .collect()
    };

    // Node 3 is down: its accounts' records go to their next node in the same call.
    let reply = client.write_batch(&batch(10)).await.unwrap();
    assert_eq!(reply.accepted, 600);
    assert!(reply.rejections.is_empty() && reply.busy.is_empty());
    assert_eq!(reply.rerouted, owned_by(2, &|_| true));
    assert!(reply.rerouted > 150, "{}", reply.rerouted);
    let status = client.status();
    assert!(status[0].up && status[1].up && !status[2].up, "{status:?}");
    assert!(status[2]
        .last_error
        .as_deref()
        .unwrap()
        .contains(&c_addr.to_string()));
    for acc in accounts.clone() {
        let expect = ring.node_of(acc, |n| n != 2).unwrap();
        assert_eq!(
            holders(&[Some(&a), Some(&b), None], acc, 10).await,
            vec![expect]
        );
    }

    // Node 3 starts; after `down_retry` the next batch tries it and its accounts return.
    let c = TestServer::start_with(|config| config.binary.listen = c_addr.to_string()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply = client.write_batch(&batch(20)).await.unwrap();
    assert_eq!((reply.accepted, reply.rerouted), (600, 0));
    assert!(client.status().iter().all(|s| s.up));
    let all = [Some(&a), Some(&b), Some(&c)];
    for acc in accounts.clone() {
        let expect = ring.node_of(acc, |_| true).unwrap();
        assert_eq!(holders(&all, acc, 20).await, vec![expect], "account {acc}");
    }
    assert_eq!(
        client.node_of(7).map(|n| n.id),
        ring.node_of(7, |_| true).map(|n| n as u32 + 1)
    );

    // Node 1 stops while connected: the batch's records for it go to their next nodes.
    a.stop().await;
    let reply = client.write_batch(&batch(30)).await.unwrap();
    assert_eq!(reply.accepted, 600);
    assert_eq!(reply.rerouted, owned_by(0, &|_| true));
    assert!(!client.status()[0].up);
    let rest = [None, Some(&b), Some(&c)];
    for acc in accounts.clone() {
        let expect = ring.node_of(acc, |n| n != 0).unwrap();
        assert_eq!(holders(&rest, acc, 30).await, vec![expect], "account {acc}");
    }

    // With every node gone the call fails and says why, within the timeouts.
    b.stop().await;
    c.stop().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let error = client.write_batch(&batch(40)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    let ClusterError::AllDown {
        records,
        last_error,
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(*records, 600);
    assert!(!last_error.is_empty(), "{error}");
    assert!(client.status().iter().all(|s| !s.up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_is_not_tried_again_within_the_same_call() {
    // With no pause before retrying a down node, each call still gives up on it for the
    // rest of the call and delivers everything to the live one.
    let live = TestServer::start().await;
    let nodes = ClusterNode::numbered(&[free_port(), live.binary_addr]);
    let options = ClusterOptions {
        down_retry: Duration::ZERO,
        ..ClusterOptions::default()
    };
    let secret = live.config.binary.secret.clone();
    let mut client = ClusterClient::new(&nodes, secret.as_bytes(), options).unwrap();
    let at = now_ms() - 1_000;
    let records: Vec<WireRecord> = (1..=200).map(|acc| record(acc, 5, at)).collect();
    for _ in 0..3 {
        let reply = client.write_batch(&records).await.unwrap();
        assert_eq!(reply.accepted, 200);
        assert!(reply.rerouted > 0);
    }
    assert_eq!(client.status()[0].failures, 3, "tried again once per call");
}

/// Handover, "flush first, switch second" (docs/deploy.md): SIGUSR1 makes a running node
/// write every key it acknowledged to its store. The cadence would write (almost) none of
/// them within the test (idle after 10 min, checkpoints once a day); after the signal, with the commit log deleted (what the next owner of the accounts
/// has is the store alone), a restart answers every key, newest value, from the store.
#[test]
fn sigusr1_flushes_every_acknowledged_key_to_the_store() {
    const ACCOUNTS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let overrides = [
        ("WAL__SYNC_MODE", "group".to_string()),
        ("FLUSH__IDLE_MS", "600000".to_string()),
        ("FLUSH__CHECKPOINT_MS", "86400000".to_string()),
    ];
    let mut node = Process::start(dir.path(), &overrides);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nodes = ClusterNode::numbered(&[node.binary]);
    let secret = playhead::config::BINARY_DEV_SECRET;
    let mut client =
        ClusterClient::new(&nodes, secret.as_bytes(), ClusterOptions::default()).unwrap();
    let base_ms = now_ms() - 60_000;
    // Three heartbeats per key; the last (position 300 + account) is the newest.
    for round in 1..=3u32 {
        let batch: Vec<WireRecord> = (1..=ACCOUNTS)
            .map(|a| record(a, round * 100 + a as u32, base_ms + u64::from(round)))
            .collect();
        let reply = rt.block_on(client.write_batch(&batch)).unwrap();
        assert_eq!(reply.accepted, ACCOUNTS as u32, "{reply:?}");
    }
    std::thread::sleep(Duration::from_millis(1_500));
    // A checkpoint falls at a phase fixed by its key, so a key or two may be written by
    // the cadence within the test (each with a chance of 2.5 s in a day).
    let by_cadence = metric(&node.metrics(), "playhead_flush_rows_total");
    assert!(by_cadence <= 5.0, "the cadence wrote {by_cadence} rows");
    let took = node.flush_now(Duration::from_secs(20));
    let m = node.metrics();
    assert_eq!(metric(&m, "playhead_flush_rows_total"), ACCOUNTS as f64);
    assert_eq!(metric(&m, "playhead_coalescer_keys{state=\"dirty\"}"), 0.0);
    eprintln!("SIGUSR1: {ACCOUNTS} keys stored in {took:?}");

    // The node dies without its final flush and its commit log is gone: only the store
    // holds the accounts now.
    node.kill9();
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    let node = Process::start(dir.path(), &overrides);
    for a in 1..=ACCOUNTS {
        let answer = node.http(
            "GET",
            "/api/v1/stream?movie_id=inception",
            Some(&token(a, 1, 600)),
            None,
        );
        let v = answer.json();
        assert_eq!(v["source"], "store", "account {a}: {v}");
        assert_eq!(v["resume_position_seconds"], 300 + a, "account {a}: {v}");
        assert_eq!(v["updated_at_ms"], base_ms + 3, "account {a}: {v}");
    }
}
