//! The real `playhead` binary as a child process: started with `PLAYHEAD_*` overrides and
//! its data in a directory the test owns, its log captured, killed with SIGKILL or stopped
//! with SIGTERM, and talked to over blocking HTTP/1.1 on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_playhead");

/// A running `playhead serve`.
pub struct Process {
    child: Child,
    pub http: SocketAddr,
    pub binary: SocketAddr,
    pub dir: PathBuf,
    /// Every stderr line so far (the log), appended by a reader thread.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `playhead serve` on `dir` with `overrides` (`("WAL__SYNC_MODE", "group")` sets
    /// `PLAYHEAD_WAL__SYNC_MODE`), and returns once it logs that it runs.
    pub fn start(dir: &Path, overrides: &[(&str, String)]) -> Self {
        Self::start_with_log(dir, overrides, "info")
    }

    pub fn start_with_log(dir: &Path, overrides: &[(&str, String)], rust_log: &str) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PLAYHEAD_SERVER__DATA_DIR", dir)
            .env("PLAYHEAD_SERVER__WORKER_THREADS", "2")
            .env("PLAYHEAD_HTTP__LISTEN", "127.0.0.1:0")
            .env("PLAYHEAD_BINARY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in overrides {
            cmd.env(format!("PLAYHEAD_{k}"), v);
        }
        let mut child = cmd.spawn().expect("spawn playhead");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut p = Self {
            child,
            http: "127.0.0.1:1".parse().unwrap(),
            binary: "127.0.0.1:1".parse().unwrap(),
            dir: dir.to_path_buf(),
            lines,
        };
        let running = p.wait_for_line("playhead running", Duration::from_secs(30));
        let field = |name: &str| -> SocketAddr {
            running
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {running}"))
                .parse()
                .unwrap()
        };
        p.http = field("http=");
        p.binary = field("binary=");
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first log line containing `needle`, waiting up to `limit` for it.
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "playhead exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// SIGKILL, as a crash would: no flush, no fsync, nothing.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    /// SIGUSR1: ask the node for a full flush (docs/deploy.md, handover); returns at once.
    pub fn request_flush(&self) {
        let ok = Command::new("kill")
            .args(["-USR1", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Asks for a full flush and waits (up to `limit`) until the node counts it done;
    /// returns how long that took.
    pub fn flush_now(&mut self, limit: Duration) -> Duration {
        const DONE: &str = "playhead_flush_requests_total{outcome=\"done\"}";
        let before = metric(&self.metrics(), DONE);
        let started = Instant::now();
        self.request_flush();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("playhead exited ({status}) after SIGUSR1:\n{}", self.log());
            }
            // Not `metrics()`: a node that SIGUSR1 killed answers nothing, and the next
            // round says why.
            let page = self.http("GET", "/metrics", None, None);
            if page.status == 200 && metric(&page.body, DONE) > before {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "the requested flush was not done within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for the exit (panics past `limit`); returns the status and how long
    /// the shutdown took.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return (status, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
        panic!(
            "playhead did not exit within {limit:?} of SIGTERM:\n{}",
            self.log()
        );
    }

    /// SIGTERM, expecting exit 0 and a final flush that left nothing in the log.
    pub fn stop_clean(&mut self) -> Duration {
        let (status, took) = self.terminate(Duration::from_secs(30));
        assert!(status.success(), "exit status {status}:\n{}", self.log());
        let done = self.wait_for_line("shutdown complete", Duration::from_secs(5));
        assert!(done.contains("left_in_log=0"), "{done}");
        took
    }

    /// Resident set size, KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A request over a fresh connection (`Connection: close`): (status, headers, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpAnswer {
        http_request(self.http, method, path, token, body)
    }

    /// The whole /metrics page.
    pub fn metrics(&self) -> String {
        let a = self.http("GET", "/metrics", None, None);
        assert_eq!(a.status, 200);
        a.body
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of the sample `name` (exactly, labels included) in a /metrics page; 0 when absent.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A parsed HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpAnswer {
    exchange(addr, &request_bytes(method, path, token, body))
        .expect("connect")
        .0
}

/// [`http_request`] for a client that outlives its peer: a refused or reset connection,
/// or one closed before a status line came, is an error to act on (try elsewhere), not a
/// panic nor an answer.
pub fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    let (answer, read) = exchange(addr, &request_bytes(method, path, token, body))?;
    match read {
        Err(e) if answer.status == 0 => Err(e),
        _ if answer.status == 0 => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before an HTTP status line",
        )),
        _ => Ok(answer),
    }
}

/// Sends `request` on a new connection and reads until the peer closes it: the answer as
/// far as it came, and how the read ended. `Err` only if connecting or sending failed.
fn exchange(
    addr: SocketAddr,
    request: &str,
) -> std::io::Result<(HttpAnswer, std::io::Result<usize>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    Ok((parse_answer(&raw), read))
}

/// One HTTP/1.1 request that closes its connection after the answer.
fn request_bytes(method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    req
}

pub fn parse_answer(raw: &[u8]) -> HttpAnswer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    HttpAnswer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}
