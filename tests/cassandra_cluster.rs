//! Playhead nodes on a shared, multi-node Cassandra cluster (issue 18; docs/deploy.md): a
//! Cassandra node killed under load, a second datacenter's reads, handover by a full flush,
//! and the staleness a Playhead node's death exposes. Each test is `#[ignore]`d, so a plain
//! `cargo test` lists them as ignored; they run against a real cluster named by:
//!
//! | variable | what | default |
//! | --- | --- | --- |
//! | `PLAYHEAD_TEST_CASSANDRA` | `host:port` of a node in the local DC; the one `_STOP` and `_START` kill and restart | — (required) |
//! | `PLAYHEAD_TEST_CASSANDRA_NODES` | the local DC's nodes, comma-separated (contact points) | `PLAYHEAD_TEST_CASSANDRA` |
//! | `PLAYHEAD_TEST_CASSANDRA_DC` | the local DC's name | `datacenter1` |
//! | `PLAYHEAD_TEST_CASSANDRA_DC2` / `_DC2_NODES` | a second DC and its nodes (RF 1 there) | none: one DC |
//! | `PLAYHEAD_TEST_CASSANDRA_STOP` / `_START` | shell commands that kill and restart that node | — (the node-kill test only) |
//! | `PLAYHEAD_TEST_CASSANDRA_DC2_STOP` / `_DC2_START` | the same for the second DC's first node | — (the DC-down test only) |
//! | `PLAYHEAD_TEST_CASSANDRA_CLUSTER_KEYSPACE` | keyspace, created if missing | `playhead_cluster_test` |
//!
//! The keyspace is `NetworkTopologyStrategy` with 3 replicas in the local DC (and 1 in the
//! second), writes at `LOCAL_QUORUM`, reads at `LOCAL_ONE` (the defaults). Asked for with
//! `--ignored` but without what it needs, a test fails naming the variable. Every test
//! uses fresh random accounts and prints a `RESULT` line:
//!
//! ```sh
//! PLAYHEAD_TEST_CASSANDRA=127.0.0.3:9042 \
//! PLAYHEAD_TEST_CASSANDRA_NODES=127.0.0.2:9042,127.0.0.3:9042,127.0.0.4:9042 \
//! PLAYHEAD_TEST_CASSANDRA_DC=dc1 PLAYHEAD_TEST_CASSANDRA_DC2=dc2 \
//! PLAYHEAD_TEST_CASSANDRA_DC2_NODES=127.0.0.5:9042 \
//! PLAYHEAD_TEST_CASSANDRA_STOP='kill -9 …' PLAYHEAD_TEST_CASSANDRA_START='…' \
//! PLAYHEAD_TEST_CASSANDRA_DC2_STOP='kill -9 …' PLAYHEAD_TEST_CASSANDRA_DC2_START='…' \
//! cargo test --test cassandra_cluster -- --ignored --nocapture --test-threads 1
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{metric, Process};
use playhead::ingest::binary::client::{ClusterClient, ClusterNode, ClusterOptions};
use playhead::ingest::binary::codec::WireRecord;
use playhead::model::{now_ms, Key};
use playhead::resume::catalog::title_id_of;
use playhead::store::Store;

const MOVIE: &str = "inception";
const ROWS: &str = "playhead_cassandra_rows_written_total";

/// The cluster under test, from the environment.
struct Cluster {
    /// The local-DC node the kill test stops and starts.
    victim: String,
    nodes: Vec<String>,
    dc: String,
    dc2: Option<(String, Vec<String>)>,
    keyspace: String,
}

fn need(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "this test needs a Cassandra cluster: {name} is not set (see the table at the top \
                 of tests/cassandra_cluster.rs)"
            )
        })
}

fn list(value: &str) -> Vec<String> {
    value.split(',').map(|s| s.trim().to_string()).collect()
}

impl Cluster {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let victim = need("PLAYHEAD_TEST_CASSANDRA");
        let dc2 = var("PLAYHEAD_TEST_CASSANDRA_DC2")
            .map(|dc| (dc, list(&need("PLAYHEAD_TEST_CASSANDRA_DC2_NODES"))));
        Self {
            nodes: list(&var("PLAYHEAD_TEST_CASSANDRA_NODES").unwrap_or(victim.clone())),
            victim,
            dc: var("PLAYHEAD_TEST_CASSANDRA_DC").unwrap_or("datacenter1".into()),
            dc2,
            keyspace: var("PLAYHEAD_TEST_CASSANDRA_CLUSTER_KEYSPACE")
                .unwrap_or("playhead_cluster_test".into()),
        }
    }

    /// `{dc1=3,dc2=1}`, the form `store.cassandra.datacenter_replication` takes from the
    /// environment.
    fn replication(&self) -> String {
        match &self.dc2 {
            Some((dc2, _)) => format!("{{{}=3,{dc2}=1}}", self.dc),
            None => format!("{{{}=3}}", self.dc),
        }
    }

    /// A Playhead node's settings for this cluster, in the local DC or (`in_dc2`) the
    /// second one.
    fn overrides(&self, in_dc2: bool) -> Vec<(&'static str, String)> {
        let (dc, nodes) = match (&self.dc2, in_dc2) {
            (Some((dc2, nodes)), true) => (dc2.clone(), nodes.clone()),
            (None, true) => panic!("a second-DC node needs PLAYHEAD_TEST_CASSANDRA_DC2"),
            (_, false) => (self.dc.clone(), self.nodes.clone()),
        };
        let points: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
        vec![
            o("STORE__KIND", "cassandra"),
            o(
                "STORE__CASSANDRA__CONTACT_POINTS",
                format!("[{}]", points.join(",")),
            ),
            o("STORE__CASSANDRA__LOCAL_DATACENTER", dc),
            o("STORE__CASSANDRA__KEYSPACE", &self.keyspace),
            o("STORE__CASSANDRA__REPLICATION", "NetworkTopologyStrategy"),
            o(
                "STORE__CASSANDRA__DATACENTER_REPLICATION",
                self.replication(),
            ),
            o("STORE__CASSANDRA__CREATE_SCHEMA", true),
            o("WAL__SYNC_MODE", "group"),
            // This machine runs the whole cluster on two cores: reads checked by the
            // tests must not degrade at the 70 ms production budget.
            o("STORE__READ_TIMEOUT_MS", 2_000),
        ]
    }

    /// A second client of the keyspace in the local DC, reading at `LOCAL_QUORUM`.
    async fn store(&self) -> playhead::store::CassandraStore {
        use playhead::config::{Config, ConsistencyLevel, StoreKind};
        let mut config = Config::default();
        config.store.kind = StoreKind::Cassandra;
        let c = &mut config.store.cassandra;
        c.contact_points = self.nodes.clone();
        c.keyspace = self.keyspace.clone();
        c.local_datacenter = self.dc.clone();
        c.datacenter_replication = [(self.dc.clone(), 3)].into_iter().collect();
        if let Some((dc2, _)) = &self.dc2 {
            c.datacenter_replication.insert(dc2.clone(), 1);
        }
        c.read_consistency = ConsistencyLevel::LocalQuorum;
        c.request_timeout_ms = 20_000;
        config.validate().unwrap();
        playhead::store::CassandraStore::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connecting to {:?}: {e}", self.nodes))
    }
}

fn o(key: &'static str, value: impl ToString) -> (&'static str, String) {
    (key, value.to_string())
}

fn token(account_id: u64) -> String {
    playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, account_id, 1, 600)
        .unwrap()
}

/// Fresh accounts for one run: `count` ids from a random base below 2^53.
fn fresh_accounts(count: u64) -> Vec<u64> {
    let base = (rand::random::<u64>() >> 12) + 1;
    (base..base + count).collect()
}

fn record(account: u64, position: u32, timestamp_ms: u64) -> WireRecord {
    WireRecord {
        account_id: account,
        profile_id: 1,
        title_id: title_id_of(MOVIE),
        position_seconds: position,
        device_id: 7,
        timestamp_ms,
    }
}

fn client(node: &Process) -> ClusterClient {
    let secret = playhead::config::BINARY_DEV_SECRET;
    ClusterClient::new(
        &ClusterNode::numbered(&[node.binary]),
        secret.as_bytes(),
        ClusterOptions::default(),
    )
    .unwrap()
}

/// One heartbeat for each of `accounts` at `position`, stamped `at_ms`; all acknowledged.
fn beat(rt: &tokio::runtime::Runtime, c: &mut ClusterClient, accounts: &[u64], at_ms: u64) {
    let batch: Vec<WireRecord> = accounts
        .iter()
        .map(|&a| record(a, position_of(at_ms), at_ms))
        .collect();
    let reply = rt.block_on(c.write_batch(&batch)).unwrap();
    assert_eq!(reply.accepted as usize, accounts.len(), "{reply:?}");
}

/// Positions follow the stamp (a second of playback per second), below inception's 95 %.
fn position_of(at_ms: u64) -> u32 {
    (at_ms / 1_000 % 7_000) as u32
}

/// The resume answer of `account` on `node`: (updated_at_ms, position, source).
fn resume(node: &Process, account: u64) -> (Option<u64>, u64, String) {
    let v = node
        .http(
            "GET",
            &format!("/api/v1/stream?movie_id={MOVIE}"),
            Some(&token(account)),
            None,
        )
        .json();
    (
        v["updated_at_ms"].as_u64(),
        v["resume_position_seconds"].as_u64().unwrap(),
        v["source"].as_str().unwrap_or_default().to_string(),
    )
}

fn sh(command: &str) -> std::process::ExitStatus {
    std::process::Command::new("sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"))
}

fn answers(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs().is_ok_and(|mut a| {
        a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
    })
}

/// A steady load in the background: every `pace` one heartbeat for each of `accounts`,
/// stamped with the time; `acked_ms` is the stamp of the newest fully acknowledged batch.
struct Load {
    stop: Arc<AtomicBool>,
    acked_ms: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(node: &Process, accounts: Vec<u64>, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked_ms = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let (s, a, b) = (stop.clone(), acked_ms.clone(), batches.clone());
        let mut c = client(node);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            while !s.load(Ordering::SeqCst) {
                let at = now_ms();
                beat(&rt, &mut c, &accounts, at);
                a.store(at, Ordering::SeqCst);
                b.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(pace);
            }
        });
        Self {
            stop,
            acked_ms,
            batches,
            thread: Some(thread),
        }
    }

    /// Stops the load; returns the newest acknowledged stamp.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.acked_ms.load(Ordering::SeqCst)
    }
}

/// Rows the node wrote to Cassandra, sampled every second for `secs` seconds; returns the
/// per-second increases.
fn rows_per_second(node: &Process, secs: u64) -> Vec<u64> {
    let mut last = metric(&node.metrics(), ROWS);
    (0..secs)
        .map(|_| {
            std::thread::sleep(Duration::from_secs(1));
            let now = metric(&node.metrics(), ROWS);
            let d = (now - last) as u64;
            last = now;
            d
        })
        .collect()
}

/// Issue 18 item 3: with `NetworkTopologyStrategy` RF 3 in the local DC and writes at
/// `LOCAL_QUORUM`, a Playhead node keeps writing rows while one of the three Cassandra
/// nodes is `kill -9`'d and after it returns, and every acknowledged newest value is in
/// the cluster at the end (read at `LOCAL_QUORUM` by a second client).
#[test]
#[ignore = "kills a Cassandra node: needs PLAYHEAD_TEST_CASSANDRA(_NODES, _DC, _STOP, _START)"]
fn local_quorum_writes_keep_flowing_while_a_cassandra_node_is_killed() {
    let cluster = Cluster::from_env();
    let (stop, start) = (
        need("PLAYHEAD_TEST_CASSANDRA_STOP"),
        need("PLAYHEAD_TEST_CASSANDRA_START"),
    );
    assert!(cluster.nodes.len() >= 3, "needs 3 local nodes (RF 3)");
    assert!(
        answers(&cluster.victim),
        "{} does not answer",
        cluster.victim
    );
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = cluster.overrides(false);
    // Every dirty key in every cycle: 1 000 rows a second while the load runs.
    overrides.extend([o("FLUSH__CHECKPOINT_MS", 0), o("FLUSH__IDLE_MS", 1_000)]);
    let mut node = Process::start(dir.path(), &overrides);
    let accounts = fresh_accounts(1_000);
    let load = Load::start(&node, accounts.clone(), Duration::from_millis(250));
    let warm = Instant::now();
    while metric(&node.metrics(), ROWS) < 2_000.0 {
        assert!(
            warm.elapsed() < Duration::from_secs(60),
            "{}",
            node.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = rows_per_second(&node, 5);
    let errors = |n: &Process| {
        metric(
            &n.metrics(),
            "playhead_cassandra_errors_total{op=\"write\"}",
        )
    };
    let errors_before = errors(&node);

    let killed = Instant::now();
    assert!(sh(&stop).success(), "`{stop}` failed");
    let down = rows_per_second(&node, 15);
    let errors_down = errors(&node) - errors_before;
    assert!(sh(&start).success(), "`{start}` failed");
    while !answers(&cluster.victim) {
        assert!(
            killed.elapsed() < Duration::from_secs(300),
            "the node never came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let returned_after = killed.elapsed();
    let errors_at_return = errors(&node);
    let back = rows_per_second(&node, 15);
    let errors_back = errors(&node) - errors_at_return;
    let newest = load.stop();
    let dirty = |n: &Process| {
        let m = n.metrics();
        metric(&m, "playhead_coalescer_keys{state=\"dirty\"}")
            + metric(&m, "playhead_coalescer_keys{state=\"flushing\"}")
    };
    let drained = Instant::now();
    while dirty(&node) > 0.0 {
        assert!(
            drained.elapsed() < Duration::from_secs(30),
            "{}",
            node.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = node.metrics();
    node.stop_clean();

    // Rows went on while the node was down and after it returned: a second or two may
    // pass without a row (the driver noticing the dead node, or sending to the returning
    // one before it serves), no more, and each phase wrote at least half its 1 000 rows/s.
    let stalled = |v: &[u64]| -> Vec<usize> {
        v.iter()
            .enumerate()
            .filter(|(_, &r)| r == 0)
            .map(|(i, _)| i)
            .collect()
    };
    let (stalled_down, stalled_back) = (stalled(&down), stalled(&back));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(cluster.store());
    let mut lost = 0;
    for &a in &accounts {
        let v = rt
            .block_on(store.get(Key::new(a, 1, title_id_of(MOVIE))))
            .unwrap();
        if v.map(|v| v.updated_at_ms) != Some(newest) {
            lost += 1;
        }
    }
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    println!(
        "RESULT cassandra_local_quorum_node_killed: rows_per_s_before={before:?} \
         rows_per_s_while_down={down:?} (total {}, seconds without a row {stalled_down:?}) \
         write_errors_while_down={errors_down} node_answered_again_after_s={:.1} \
         rows_per_s_after_return={back:?} (total {}, seconds without a row {stalled_back:?}) \
         write_errors_after_return={errors_back} write_breaker_opened={} flush_errors={} \
         checked={} lost={lost}",
        sum(&down),
        returned_after.as_secs_f64(),
        sum(&back),
        metric(
            &m,
            "playhead_cassandra_breaker_opened_total{breaker=\"write\"}"
        ),
        metric(&m, "playhead_flush_errors_total"),
        accounts.len(),
    );
    for (phase, rows, stalls) in [
        ("while down", &down, &stalled_down),
        ("after the return", &back, &stalled_back),
    ] {
        assert!(
            stalls.len() <= 2,
            "{phase}: seconds without a row {stalls:?}"
        );
        let expected = 1_000 * rows.len() as u64;
        assert!(2 * sum(rows) >= expected, "{phase}: {rows:?}");
    }
    assert_eq!(
        lost, 0,
        "acknowledged newest values missing at LOCAL_QUORUM"
    );
}

/// Issue 18 item 3: a Playhead node in the second DC (`local_datacenter` there, reading at
/// `LOCAL_ONE` from its one replica) answers the positions a local-DC node flushed.
#[test]
#[ignore = "needs a two-DC Cassandra cluster: PLAYHEAD_TEST_CASSANDRA(_NODES, _DC, _DC2, _DC2_NODES)"]
fn a_second_dc_node_reading_local_one_sees_what_the_first_dc_flushed() {
    let cluster = Cluster::from_env();
    need("PLAYHEAD_TEST_CASSANDRA_DC2");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Process::start(dir_a.path(), &cluster.overrides(false));
    let b = Process::start(dir_b.path(), &cluster.overrides(true));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let accounts = fresh_accounts(500);
    let mut c = client(&a);
    let at = now_ms() - 10_000;
    beat(&rt, &mut c, &accounts, at - 5_000);
    beat(&rt, &mut c, &accounts, at);
    let flushed_in = a.flush_now(Duration::from_secs(30));
    let flushed = Instant::now();
    // Replication to the other DC is asynchronous: poll until every key is seen.
    let mut first_pass_seen = None;
    let mut pending: Vec<u64> = accounts.clone();
    while !pending.is_empty() {
        pending.retain(|&acc| {
            let (updated, position, source) = resume(&b, acc);
            if updated == Some(at) {
                assert_eq!(
                    (position, source.as_str()),
                    (u64::from(position_of(at)), "store")
                );
                false
            } else {
                true
            }
        });
        first_pass_seen.get_or_insert(accounts.len() - pending.len());
        assert!(
            flushed.elapsed() < Duration::from_secs(30),
            "{} of {} keys not seen in the second DC 30 s after the flush",
            pending.len(),
            accounts.len()
        );
    }
    let all_seen = flushed.elapsed();
    let m = b.metrics();
    assert_eq!(
        metric(&m, "playhead_store_reads_total{source=\"degraded\"}"),
        0.0
    );
    a.stop_clean();
    println!(
        "RESULT cassandra_second_dc_reads: keys={} dc1_flush_ms={} seen_in_dc2_on_first_pass={} \
         all_seen_in_dc2_after_ms={} (reads at LOCAL_ONE; each pass reads every unseen key once)",
        accounts.len(),
        flushed_in.as_millis(),
        first_pass_seen.unwrap(),
        all_seen.as_millis(),
    );
}

/// Issue 18 item 3, the second datacenter lost: its node is `kill -9`'d while a first-DC
/// Playhead node writes at `LOCAL_QUORUM` (every key every second). The first DC's rows
/// keep flowing with no write error; the load ends and is flushed while the second DC is
/// still down, so its newest positions reach the second DC only by the hints the first
/// DC's nodes kept. Once the node is back — with no `nodetool repair` — a Playhead node in
/// the second DC, reading at `LOCAL_ONE`, answers every one of them. While it was down,
/// that node's reads answered (HTTP 200, never a wrong position); how (degraded or from
/// another DC's coordinator) is printed, not asserted: it is the driver's choice.
#[test]
#[ignore = "kills the second DC's node: needs PLAYHEAD_TEST_CASSANDRA(_NODES, _DC, _DC2, \
            _DC2_NODES, _DC2_STOP, _DC2_START)"]
fn first_dc_writes_flow_while_the_second_dc_is_down_and_it_catches_up_after() {
    let cluster = Cluster::from_env();
    need("PLAYHEAD_TEST_CASSANDRA_DC2");
    let (stop, start) = (
        need("PLAYHEAD_TEST_CASSANDRA_DC2_STOP"),
        need("PLAYHEAD_TEST_CASSANDRA_DC2_START"),
    );
    let dc2_node = cluster.dc2.as_ref().unwrap().1[0].clone();
    assert!(answers(&dc2_node), "{dc2_node} does not answer");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut overrides = cluster.overrides(false);
    overrides.extend([o("FLUSH__CHECKPOINT_MS", 0), o("FLUSH__IDLE_MS", 1_000)]);
    let mut a = Process::start(dir_a.path(), &overrides);
    let b = Process::start(dir_b.path(), &cluster.overrides(true));
    let accounts = fresh_accounts(1_000);
    let load = Load::start(&a, accounts.clone(), Duration::from_millis(250));
    let warm = Instant::now();
    while metric(&a.metrics(), ROWS) < 2_000.0 {
        assert!(warm.elapsed() < Duration::from_secs(60), "{}", a.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let write_errors = |n: &Process| {
        metric(
            &n.metrics(),
            "playhead_cassandra_errors_total{op=\"write\"}",
        )
    };
    let before = rows_per_second(&a, 5);
    let errors_before = write_errors(&a);

    let killed = Instant::now();
    assert!(sh(&stop).success(), "`{stop}` failed");
    let down = rows_per_second(&a, 15);
    // The last heartbeats, flushed while the second DC is down.
    let newest = load.stop();
    let drained = Instant::now();
    loop {
        let m = a.metrics();
        let dirty = metric(&m, "playhead_coalescer_keys{state=\"dirty\"}")
            + metric(&m, "playhead_coalescer_keys{state=\"flushing\"}");
        if dirty == 0.0 {
            break;
        }
        assert!(drained.elapsed() < Duration::from_secs(30), "{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let errors_down = write_errors(&a) - errors_before;
    let breaker = metric(
        &a.metrics(),
        "playhead_cassandra_breaker_opened_total{breaker=\"write\"}",
    );
    // Meanwhile, in the dead DC: every read answers, and never a wrong position.
    let mut while_down = std::collections::BTreeMap::<String, u32>::new();
    for &acc in &accounts[..50] {
        let (updated, position, source) = resume(&b, acc);
        if let Some(at) = updated {
            assert!(at <= newest && position == u64::from(position_of(at)));
        } else {
            assert_eq!(position, 0);
        }
        *while_down.entry(source).or_default() += 1;
    }
    a.stop_clean();

    assert!(sh(&start).success(), "`{start}` failed");
    while !answers(&dc2_node) {
        assert!(
            killed.elapsed() < Duration::from_secs(300),
            "the second DC's node never came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let returned_after = killed.elapsed();
    let back = Instant::now();
    let (mut passes, mut first_pass_seen) = (0, None);
    let mut pending = accounts.clone();
    while !pending.is_empty() {
        pending.retain(|&acc| resume(&b, acc).0 != Some(newest));
        passes += 1;
        first_pass_seen.get_or_insert(accounts.len() - pending.len());
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "{} of {} newest positions not in the second DC 120 s after its return",
            pending.len(),
            accounts.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let all_seen = back.elapsed();
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let stalled = down.iter().filter(|&&r| r == 0).count();
    println!(
        "RESULT cassandra_second_dc_down: rows_per_s_before={before:?} \
         rows_per_s_while_dc2_down={down:?} (total {}, seconds without a row {stalled}) \
         write_errors_while_down={errors_down} write_breaker_opened={breaker} \
         dc2_reads_while_down={while_down:?} dc2_node_answered_again_after_s={:.1} \
         newest_in_dc2_on_first_pass={}/{} all_in_dc2_after_ms={} passes={passes} \
         (LOCAL_ONE, no repair)",
        sum(&down),
        returned_after.as_secs_f64(),
        first_pass_seen.unwrap(),
        accounts.len(),
        all_seen.as_millis(),
    );
    assert_eq!(errors_down, 0.0, "write errors with the second DC down");
    assert!(stalled <= 2, "seconds without a row: {down:?}");
    assert!(2 * sum(&down) >= 1_000 * down.len() as u64, "{down:?}");
}

/// Issue 18 item 4, "flush first, switch second" (docs/deploy.md): node A takes a profile's
/// heartbeats; its cadence would not write them for minutes, so node B (same Cassandra)
/// cannot know them — checked on 100 of them, that is what a ring change without the flush exposes. After
/// SIGUSR1 on A, B's first read answers the newest position of every key, from the store;
/// B then takes the accounts' new heartbeats, and A's SIGTERM writes nothing older over them.
#[test]
#[ignore = "needs a Cassandra cluster: PLAYHEAD_TEST_CASSANDRA(_NODES, _DC)"]
fn handover_by_a_full_flush_lets_the_new_owner_answer_the_newest_position() {
    let cluster = Cluster::from_env();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut slow_cadence = cluster.overrides(false);
    slow_cadence.extend([
        o("FLUSH__IDLE_MS", 600_000),
        o("FLUSH__CHECKPOINT_MS", 86_400_000),
    ]);
    let mut a = Process::start(dir_a.path(), &slow_cadence);
    let b = Process::start(dir_b.path(), &slow_cadence);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let accounts = fresh_accounts(1_000);
    let mut c = client(&a);
    let newest = now_ms() - 1_000;
    for i in (0..10).rev() {
        beat(&rt, &mut c, &accounts, newest - i * 4_000);
    }
    std::thread::sleep(Duration::from_millis(1_500));
    // A checkpoint falls at a phase fixed by its key: a key or two may have been written.
    let by_cadence = metric(&a.metrics(), ROWS);
    assert!(by_cadence <= 5.0, "A's cadence wrote {by_cadence} rows");
    // Without the flush, the new owner knows (nearly) nothing of the accounts.
    let unknown = accounts[..100]
        .iter()
        .filter(|&&acc| resume(&b, acc).0.is_none())
        .count();
    assert!(
        unknown as f64 >= 100.0 - by_cadence,
        "{unknown} of 100 unknown"
    );

    let flushed_in = a.flush_now(Duration::from_secs(30));
    assert_eq!(metric(&a.metrics(), ROWS), accounts.len() as f64);
    let switched = Instant::now();
    for &acc in &accounts {
        assert_eq!(
            resume(&b, acc),
            (Some(newest), u64::from(position_of(newest)), "store".into()),
            "account {acc}"
        );
    }
    let read_all_in = switched.elapsed();
    // The switch: B takes the accounts on, then A stops.
    let later = newest + 4_000;
    beat(&rt, &mut client(&b), &accounts, later);
    let took = a.stop_clean();
    let done = a.wait_for_line("shutdown complete", Duration::from_secs(1));
    assert!(done.contains("flushed_rows=0"), "{done}");
    for &acc in &accounts[..50] {
        assert_eq!(resume(&b, acc).0, Some(later), "account {acc}");
    }
    println!(
        "RESULT cassandra_handover: keys={} sigusr1_to_done_ms={} new_owner_read_all_ms={} \
         unknown_to_new_owner_before_the_flush={unknown}/100 old_owner_sigterm_ms={} \
         (its final flush: 0 rows)",
        accounts.len(),
        flushed_in.as_millis(),
        read_all_in.as_millis(),
        took.as_millis(),
    );
}

/// Issue 18 item 2: the staleness a Playhead node's death exposes on a shared store. Node A
/// (1 s cycles, idle after 2 s, checkpoints every 8 s) takes 500 viewers who stopped and
/// 500 who keep playing (a heartbeat a second), then is `kill -9`'d. Node B answers the
/// stopped viewers' last positions exactly (flushed once idle) and the playing ones'
/// last checkpoint: at most `checkpoint_ms + interval_ms` (+ the write) behind. A
/// restarted from its commit log flushes the rest, and B then answers every newest value.
#[test]
#[ignore = "needs a Cassandra cluster: PLAYHEAD_TEST_CASSANDRA(_NODES, _DC)"]
fn a_dead_nodes_accounts_are_stale_by_at_most_the_flush_bounds_on_the_next_node() {
    const INTERVAL_MS: u64 = 1_000;
    const IDLE_MS: u64 = 2_000;
    const CHECKPOINT_MS: u64 = 8_000;
    let cluster = Cluster::from_env();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cadence = cluster.overrides(false);
    cadence.extend([
        o("FLUSH__INTERVAL_MS", INTERVAL_MS),
        o("FLUSH__IDLE_MS", IDLE_MS),
        o("FLUSH__CHECKPOINT_MS", CHECKPOINT_MS),
    ]);
    let mut a = Process::start(dir_a.path(), &cadence);
    let b = Process::start(dir_b.path(), &cadence);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let viewers = fresh_accounts(1_000);
    let (stopped, playing) = viewers.split_at(500);
    let mut c = client(&a);
    let stopped_at = now_ms();
    beat(&rt, &mut c, stopped, stopped_at - 4_000);
    beat(&rt, &mut c, stopped, stopped_at);
    let load = Load::start(&a, playing.to_vec(), Duration::from_millis(1_000));
    // Two and a half checkpoint periods of play; the stopped viewers went idle long ago.
    std::thread::sleep(Duration::from_millis(CHECKPOINT_MS * 5 / 2));
    let batches = load.batches.load(Ordering::SeqCst);
    let newest = load.stop();
    a.kill9();
    let killed_at = now_ms();

    let mut exact_stopped = 0;
    for &acc in stopped {
        if resume(&b, acc).0 == Some(stopped_at) {
            exact_stopped += 1;
        }
    }
    let mut behind_ms: Vec<u64> = playing
        .iter()
        .map(|&acc| match resume(&b, acc).0 {
            Some(at) => newest.saturating_sub(at),
            None => u64::MAX,
        })
        .collect();
    behind_ms.sort_unstable();
    let (median, max) = (
        behind_ms[behind_ms.len() / 2],
        behind_ms[behind_ms.len() - 1],
    );
    assert_eq!(exact_stopped, stopped.len(), "stopped viewers: exact on B");
    assert!(
        max <= CHECKPOINT_MS + INTERVAL_MS + 2_000,
        "playing viewers up to {max} ms behind on B (median {median})"
    );

    // A comes back: its commit log replays and the late flush (last write wins) lands.
    let mut a = Process::start(dir_a.path(), &cadence);
    let back_after = now_ms() - killed_at;
    a.flush_now(Duration::from_secs(30));
    let fresh = playing
        .iter()
        .filter(|&&acc| resume(&b, acc).0 == Some(newest))
        .count();
    assert_eq!(fresh, playing.len(), "after A's replay and flush");
    a.stop_clean();
    println!(
        "RESULT cassandra_failover_staleness: interval_ms={INTERVAL_MS} idle_ms={IDLE_MS} \
         checkpoint_ms={CHECKPOINT_MS} stopped_exact_on_heir={exact_stopped}/{} \
         playing_behind_on_heir_ms median={median} max={max} (bound {}) play_batches={batches} \
         owner_restarted_after_ms={back_after} newest_on_heir_after_replay={fresh}/{}",
        stopped.len(),
        CHECKPOINT_MS + INTERVAL_MS,
        playing.len(),
    );
}
