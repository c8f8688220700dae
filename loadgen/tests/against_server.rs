//! Runs the real `playhead-loadgen` binary against an in-process Playhead (real engine,
//! fjall store, HTTP and binary listeners on 127.0.0.1 port 0), with `--verify`, for each
//! workload and protocol. Short and bounded: these check behaviour, not speed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::ingest::auth::Verifier;
use playhead::ingest::http::AppState;
use playhead::ingest::Ingest;
use playhead::resume::catalog::Catalog;
use playhead::store::EmbeddedStore;

struct Server {
    http: SocketAddr,
    binary: SocketAddr,
    engine: Engine,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.api.catalog_path = catalog();
    config.binary.listen = "127.0.0.1:0".into();
    let store = EmbeddedStore::open(&config.embedded_store_dir(), 8 << 20).unwrap();
    let (engine, _) = Engine::open(config.clone(), Arc::new(store)).unwrap();
    let _background = engine.spawn_background();
    let catalog = Catalog::load(&config.api.catalog_path).unwrap();
    let ingest = Arc::new(Ingest::new(engine.clone(), catalog));
    let state = Arc::new(AppState::new(
        Arc::clone(&ingest),
        Verifier::from_config(&config.auth).unwrap(),
    ));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let binary = playhead::ingest::binary::bind(&config.binary).unwrap();
    let binary_addr = binary.local_addr().unwrap();
    tokio::spawn(playhead::ingest::http::serve(
        http,
        Arc::clone(&state),
        stopped.clone(),
    ));
    tokio::spawn(playhead::ingest::binary::serve(binary, ingest, stopped));
    std::mem::forget(_stop);
    Server {
        http: http_addr,
        binary: binary_addr,
        engine,
        _dir: dir,
    }
}

fn catalog() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/catalog.toml")
}

/// Runs the load generator and returns its JSON report.
async fn loadgen(s: &Server, extra: &[&str]) -> serde_json::Value {
    loadgen_at(s.binary, s.http, extra).await
}

/// Runs the load generator against these listeners and returns its JSON report.
async fn loadgen_at(binary: SocketAddr, http: SocketAddr, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let plot = dir.path().join("curve.svg");
    let mut command = Command::new(env!("CARGO_BIN_EXE_playhead-loadgen"));
    command
        .args(extra)
        .args(["--binary-addr", &binary.to_string()])
        .args(["--http-addr", &http.to_string()])
        .args([
            "--duration-secs",
            "1.5",
            "--warmup-secs",
            "0.3",
            "--quiet",
            "--verify",
        ])
        .arg("--catalog")
        .arg(catalog())
        .arg("--json")
        .arg(&report)
        .arg("--plot")
        .arg(&plot);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 mismatches"), "{stdout}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_verifies_clean() {
    let s = server().await;
    let r = loadgen(
        &s,
        &[
            "max",
            "--keys",
            "20000",
            "--connections",
            "2",
            "--batch",
            "256",
        ],
    )
    .await;
    assert!(r["acked"].as_u64().unwrap() > 0);
    assert_eq!(r["verification"]["mismatches"], 0);
    assert_eq!(r["verification"]["keys_written"], 20_000);
    assert!(r["latency"]["p99"].as_f64().unwrap() > 0.0);

    let r = loadgen(
        &s,
        &[
            "max",
            "--keys",
            "5000",
            "--rate",
            "50000",
            "--batch",
            "100",
            "--account-base",
            "5000000",
        ],
    )
    .await;
    let rate = r["acked_per_sec"].as_f64().unwrap();
    assert!(rate < 80_000.0, "open loop holds its rate: {rate}");

    let r = loadgen(
        &s,
        &[
            "fleet",
            "--viewers",
            "20000",
            "--connections",
            "2",
            "--account-base",
            "7000000",
        ],
    )
    .await;
    assert!(
        r["verification"]["checked"].as_u64().unwrap() > 1_000,
        "{r}"
    );

    let r = loadgen(
        &s,
        &[
            "max",
            "--protocol",
            "http",
            "--keys",
            "500",
            "--connections",
            "4",
            "--account-base",
            "9000000",
        ],
    )
    .await;
    assert!(r["verification"]["checked"].as_u64().unwrap() > 100, "{r}");

    let r = loadgen(
        &s,
        &[
            "read",
            "--protocol",
            "http",
            "--keys",
            "500",
            "--write-ratio",
            "0.3",
            "--rate",
            "2000",
            "--account-base",
            "9000000",
        ],
    )
    .await;
    assert!(r["reads"].as_u64().unwrap() > 0, "{r}");

    // Pipelined (several requests in flight per connection), open and closed loop: every
    // answer is still matched to its request and the writes verify clean.
    let r = loadgen(
        &s,
        &[
            "read",
            "--protocol",
            "http",
            "--keys",
            "500",
            "--write-ratio",
            "0.3",
            "--rate",
            "4000",
            "--pipeline",
            "8",
            "--account-base",
            "13000000",
        ],
    )
    .await;
    assert!(r["reads"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let r = loadgen(
        &s,
        &[
            "max",
            "--protocol",
            "http",
            "--keys",
            "500",
            "--connections",
            "2",
            "--pipeline",
            "4",
            "--account-base",
            "15000000",
        ],
    )
    .await;
    assert!(r["verification"]["checked"].as_u64().unwrap() > 100, "{r}");
    assert_eq!(r["errors"], 0, "{r}");

    let r = loadgen(
        &s,
        &[
            "fleet",
            "--protocol",
            "http",
            "--viewers",
            "2000",
            "--connections",
            "2",
            "--account-base",
            "11000000",
        ],
    )
    .await;
    assert!(r["verification"]["checked"].as_u64().unwrap() > 100, "{r}");
    let _ = s.engine.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_fails_the_run() {
    // Write to one server, verify against another that never saw the writes: exactly what a
    // server that lost acknowledged heartbeats looks like to --verify.
    let writer = server().await;
    let other = server().await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_playhead-loadgen"));
    command
        .args([
            "max",
            "--keys",
            "1000",
            "--connections",
            "1",
            "--batch",
            "100",
        ])
        .args(["--binary-addr", &writer.binary.to_string()])
        .args(["--http-addr", &other.http.to_string()])
        .args([
            "--duration-secs",
            "0.5",
            "--warmup-secs",
            "0",
            "--quiet",
            "--verify",
        ])
        .arg("--catalog")
        .arg(catalog());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("1000 mismatches") && stdout.contains("FAILED"),
        "{stdout}"
    );
}

/// HAProxy with the shipped deploy/haproxy.cfg in front of `nodes` (HTTP), killed on drop;
/// `None` (said on stderr) where haproxy is not installed, outside CI.
struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(nodes: &[SocketAddr]) -> Option<(Haproxy, SocketAddr)> {
    let binary = [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file());
    let Some(binary) = binary else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs haproxy (.ci/run)"
        );
        // Past the harness's capture, so that a plain `cargo test` shows the skip.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: haproxy is not installed (apt-get install haproxy)"
        );
        return None;
    };
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    };
    let (bind, stats) = (port(0), port(1));
    let mut command = Command::new(binary);
    command
        .args(["-db", "-f"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg"))
        .env("PLAYHEAD_LB_BIND", bind.to_string())
        .env("PLAYHEAD_LB_STATS", stats.to_string())
        .stdout(std::process::Stdio::null());
    for (i, node) in nodes.iter().enumerate() {
        command.env(format!("PLAYHEAD_LB_NODE{}", i + 1), node.to_string());
    }
    let child = Haproxy(command.spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(bind).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "haproxy is not listening"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Some((child, bind))
}

/// `fleet --servers`: the ring client sends each account's heartbeats to one of three
/// nodes, and `--verify` reads every key back through HAProxy, which must route each
/// account to the node that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_a_cluster_verifies_through_haproxy() {
    let nodes = [server().await, server().await, server().await];
    let http: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let Some((_haproxy, lb)) = haproxy(&http) else {
        return;
    };
    let servers = nodes
        .iter()
        .map(|n| n.binary.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let r = loadgen_at(
        nodes[0].binary,
        lb,
        &[
            "fleet",
            "--viewers",
            "6000",
            "--servers",
            &servers,
            "--connections",
            "2",
            "--verify-sample",
            "0",
        ],
    )
    .await;
    assert!(r["acked"].as_u64().unwrap() > 0);
    assert_eq!(r["verification"]["mismatches"], 0);
    // Every key written is read back (2 446 in a measured run).
    let written = r["verification"]["keys_written"].as_u64().unwrap();
    assert!(written > 1_000, "{}", r["verification"]);
    assert_eq!(r["verification"]["checked"], written);
    // Every node got a share of the accounts.
    for node in &nodes {
        let written = node
            .engine
            .stats()
            .write_records
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(written > 0, "a node took no heartbeat");
    }
}

#[test]
fn an_unreachable_server_fails_loudly() {
    let out = Command::new(env!("CARGO_BIN_EXE_playhead-loadgen"))
        .args([
            "max",
            "--binary-addr",
            "127.0.0.1:1",
            "--duration-secs",
            "0.2",
            "--warmup-secs",
            "0",
            "--quiet",
        ])
        .arg("--catalog")
        .arg(catalog())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
