//! The real `playhead` binary, started the way a user starts it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use playhead::config::SyncMode;
use playhead::engine::wal::{Wal, WalOptions};
use playhead::model::{Key, Record, Value};
use playhead::store::{EmbeddedStore, Store};

const BIN: &str = env!("CARGO_BIN_EXE_playhead");

/// Starts `playhead serve` with its data under `dir` and returns once it says it runs,
/// with a channel of its remaining log lines and the HTTP address it listens on.
fn start(dir: &Path) -> (Child, mpsc::Receiver<String>) {
    let (child, rx, _) = start_http(dir);
    (child, rx)
}

fn start_http(dir: &Path) -> (Child, mpsc::Receiver<String>, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PLAYHEAD_SERVER__DATA_DIR", dir)
        .env("PLAYHEAD_SERVER__WORKER_THREADS", "2")
        .env("PLAYHEAD_HTTP__LISTEN", "127.0.0.1:0")
        .env("PLAYHEAD_BINARY__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn playhead");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let running = wait_for_line(&rx, "playhead running");
    let addr = running
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .expect("the running line names the HTTP address")
        .to_string();
    (child, rx, addr)
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line containing {needle:?}: {e}"),
        }
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    panic!("playhead did not exit within 30 s of SIGTERM");
}

#[test]
fn serve_replays_the_log_and_flushes_everything_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Leave acknowledged heartbeats in the commit log, as a crash would.
    let records: Vec<Record> = (0..5_000u64)
        .map(|i| Record::new(Key::new(i, 1, 7), Value::new(42, 1_760_000_000_000 + i, 3)))
        .collect();
    {
        let (wal, _) = Wal::open(
            WalOptions {
                dir: dir.path().join("wal"),
                sync_mode: SyncMode::Group,
                sync_interval_ms: 10,
                segment_bytes: 64 << 20,
                max_buffer_bytes: 64 << 20,
            },
            |_| {},
        )
        .unwrap();
        wal.append(&records).unwrap();
        wal.close();
    }

    let (mut child, rx) = start(dir.path());
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status}");
    let done = wait_for_line(&rx, "shutdown complete");
    assert!(done.contains("left_in_log=0"), "{done}");

    let wal_files: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    assert!(
        wal_files.len() <= 1,
        "flushed segments are dropped: {wal_files:?}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store"), 1 << 20).unwrap();
    for r in records.iter().step_by(97) {
        assert_eq!(rt.block_on(store.get(r.key)).unwrap(), Some(r.value));
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("wal"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "data directories are owner-only");
    }
}

#[test]
fn bad_configuration_fails_at_start_naming_key_value_and_expectation() {
    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PLAYHEAD_FLUSH__BATCH_ROWS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flush.batch_rows") && err.contains("`0`") && err.contains("between 1 and"),
        "{err}"
    );
}

#[test]
fn config_subcommand_prints_the_effective_configuration() {
    let out = Command::new(BIN)
        .arg("config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PLAYHEAD_WAL__SYNC_MODE", "group")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sync_mode = \"group\""), "{text}");
}

/// `playhead config` is safe to paste into a ticket: every secret (the HS256 secret, the
/// binary listener's secret, the Cassandra password) prints as `"<redacted>"`, set or
/// defaulted, while the other settings print as they are.
#[test]
fn config_subcommand_redacts_secrets() {
    let out = Command::new(BIN)
        .arg("config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PLAYHEAD_AUTH__HS256_SECRET", "hs256-secret-do-not-print")
        .env("PLAYHEAD_BINARY__SECRET", "binary-secret-do-not-print")
        .env("PLAYHEAD_STORE__CASSANDRA__USERNAME", "playhead")
        .env(
            "PLAYHEAD_STORE__CASSANDRA__PASSWORD",
            "cassandra-password-do-not-print",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("do-not-print"), "{text}");
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(parsed["auth"]["hs256_secret"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["binary"]["secret"].as_str(), Some("<redacted>"));
    let cassandra = &parsed["store"]["cassandra"];
    assert_eq!(cassandra["password"].as_str(), Some("<redacted>"));
    assert_eq!(cassandra["username"].as_str(), Some("playhead"));
    // The shipped defaults are secrets too (anyone who read them can mint tokens), and
    // an empty secret stays empty: it tells the reader the feature is off.
    let out = Command::new(BIN)
        .arg("config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(playhead::config::BINARY_DEV_SECRET),
        "{text}"
    );
    assert!(!text.contains(playhead::ingest::auth::DEV_SECRET), "{text}");
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(parsed["auth"]["hs256_secret"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["store"]["cassandra"]["password"].as_str(), Some(""));
}

/// What the README tells a developer to do: start the server, mint a token with
/// `playhead token`, post a heartbeat, read it back; SIGTERM then leaves it in the store.
#[test]
fn token_subcommand_mints_a_token_the_server_accepts() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (mut child, rx, addr) = start_http(dir.path());
    let out = Command::new(BIN)
        .args(["token", "--account-id", "7", "--profile-id", "3"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let http = |request: String| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let body = r#"{"movie_id":"inception","position_seconds":2843,"device_id":"tv-living-room"}"#;
    let answer = http(format!(
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let answer = http(format!(
        "GET /api/v1/stream?movie_id=inception HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    ));
    assert!(
        answer.contains(r#""resume_position_seconds":2843"#),
        "{answer}"
    );

    assert!(terminate(&mut child).success());
    let done = wait_for_line(&rx, "shutdown complete");
    assert!(done.contains("left_in_log=0"), "{done}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store"), 1 << 20).unwrap();
    let key = Key::new(7, 3, playhead::resume::catalog::title_id_of("inception"));
    let stored = rt
        .block_on(store.get(key))
        .unwrap()
        .expect("flushed on SIGTERM");
    assert_eq!(stored.position_seconds, 2843);
}
