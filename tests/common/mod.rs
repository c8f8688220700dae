//! Helpers shared by the integration tests: an in-process server on 127.0.0.1 port 0 with
//! the real engine and the real fjall store in a temporary directory, and a deliberately
//! small HTTP/1.1 client over a raw socket (so tests can also send what no well-behaved
//! client would: invalid UTF-8, partial headers, oversized bodies).

#![allow(dead_code)]

pub mod nats;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::ingest::auth::{self, Verifier};
use playhead::ingest::http::AppState;
use playhead::ingest::Ingest;
use playhead::model::Clock;
use playhead::resume::catalog::Catalog;
use playhead::store::{EmbeddedStore, FaultSwitch, FaultyStore};

/// A running server and the handles tests poke at.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The binary-protocol listener.
    pub binary_addr: SocketAddr,
    pub engine: Engine,
    pub faults: Arc<FaultSwitch>,
    /// The embedded store under the fault switch (a handle on the same database), for
    /// faults only it can inject (reads that block their thread).
    pub embedded: EmbeddedStore,
    pub config: Config,
    /// The engine's and the token verifier's clock: the system clock, or the manual one
    /// of [`TestServer::start_with_clock`].
    pub clock: Clock,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
    binary: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The test configuration: defaults, data in `dir`, the shipped sample catalog.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.api.catalog_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.toml");
    config.http.listen = "127.0.0.1:0".into();
    config.binary.listen = "127.0.0.1:0".into();
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server whose config `adjust` may change first. The store is the embedded
    /// store behind a [`FaultyStore`] whose faults start off.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_clock(Clock::System, adjust).await
    }

    /// [`TestServer::start_with`] on `clock`: heartbeats are stamped and tokens checked
    /// against it, so a test can make time pass without sleeping.
    pub async fn start_with_clock(clock: Clock, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        adjust(&mut config);
        config.validate().unwrap();
        let embedded = EmbeddedStore::open(&config.embedded_store_dir(), 8 << 20).unwrap();
        let store = FaultyStore::new(embedded.clone());
        let faults = store.switch();
        let (engine, _) =
            Engine::open_with_clock(config.clone(), Arc::new(store), clock.clone()).unwrap();
        let catalog = Catalog::load(&config.api.catalog_path).unwrap();
        let verifier = Verifier::with_clock(&config.auth, clock.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ingest = Arc::new(Ingest::new(engine.clone(), catalog));
        let state = Arc::new(AppState::new(Arc::clone(&ingest), verifier));
        let (stop, stopped) = watch::channel(false);
        let binary_listener = playhead::ingest::binary::bind(&config.binary).unwrap();
        let binary_addr = binary_listener.local_addr().unwrap();
        let binary = tokio::spawn(playhead::ingest::binary::serve(
            binary_listener,
            ingest,
            stopped.clone(),
        ));
        let server = tokio::spawn(playhead::ingest::http::serve(listener, state, stopped));
        Self {
            addr,
            binary_addr,
            binary: Some(binary),
            engine,
            faults,
            embedded,
            config,
            clock,
            stop,
            server: Some(server),
            _dir: dir,
        }
    }

    /// A binary-protocol client, authenticated.
    pub async fn binary_client(&self) -> playhead::ingest::binary::client::Client {
        playhead::ingest::binary::client::Client::connect(
            self.binary_addr,
            self.config.binary.secret.as_bytes(),
        )
        .await
        .unwrap()
    }

    /// A valid token for one profile.
    pub fn token(&self, account_id: u64, profile_id: u64) -> String {
        auth::mint_hs256(&self.config.auth.hs256_secret, account_id, profile_id, 600).unwrap()
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        if method == "POST" {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body.as_bytes());
        self.raw(&raw).await
    }

    /// Sends `bytes` as they are and reads the response until the server closes.
    pub async fn raw(&self, bytes: &[u8]) -> Response {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .unwrap();
        Response::parse(&out)
    }

    pub async fn post_progress(&self, token: &str, body: &str) -> Response {
        self.request("POST", "/api/v1/stream/progress", Some(token), Some(body))
            .await
    }

    pub async fn resume(&self, token: &str, movie_id: &str) -> serde_json::Value {
        let r = self
            .request(
                "GET",
                &format!("/api/v1/stream?movie_id={movie_id}"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// Stops accepting, waits for in-flight requests, then shuts the engine down.
    pub async fn stop(mut self) -> playhead::engine::ShutdownReport {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
        if let Some(binary) = self.binary.take() {
            binary.await.unwrap();
        }
        self.engine.shutdown(None).await
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn parse(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Self {
            status,
            headers,
            body: body.to_string(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error` code of a JSON error body, asserting the body is one.
    pub fn error_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error bodies are JSON: {self:?}"
        );
        let v = self.json();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["error"].as_str().unwrap().to_string()
    }
}

/// A system tool the tests run (`haproxy`, `promtool`), found on `PATH` or in `/usr/sbin`,
/// or `None` with the skip printed. Installed by `scripts/test` from Debian's `package`; in
/// CI (`CI` set) a missing tool fails the test instead of skipping it.
pub fn system_tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed, and CI installs it (scripts/test): the install step failed"
        );
        // Straight to the process's stderr, past the test harness's capture, so that a skip
        // shows in a plain `cargo test` run.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {name} is not installed (apt-get install {package}; scripts/test does it)"
        );
    }
    found
}
