//! A real `nats-server` with JetStream as a child process (Debian's `nats-server`, which
//! scripts/test installs): on a loopback port of its own, its store in a directory the test
//! owns, stopped (SIGKILL) and started again on the same port and store to play an outage,
//! and killed when dropped. Plus a reader of every message of a stream.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use playhead::events::Event;

/// A running (or stopped) nats-server.
pub struct Nats {
    bin: PathBuf,
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    /// Starts nats-server with JetStream on a free loopback port, or `None` with the skip
    /// printed when it is not installed.
    pub fn start() -> Option<Self> {
        let bin = super::system_tool("nats-server", "nats-server")?;
        let port = free_port();
        let mut nats = Self {
            bin,
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.restart();
        Some(nats)
    }

    /// A free loopback port on which no server runs yet: for a test that starts Playhead
    /// before NATS (`start_later`).
    pub fn not_started() -> Option<Self> {
        let bin = super::system_tool("nats-server", "nats-server")?;
        Some(Self {
            bin,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// (Re)starts the server on the same port and store; returns once it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every event in `stream` with its subject, oldest first, waiting up to `limit` for
    /// at least `at_least` of them.
    pub fn events(&self, stream: &str, at_least: usize, limit: Duration) -> Vec<(String, Event)> {
        let url = self.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(read_stream(&url, stream, at_least, limit))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads the whole stream with an ephemeral pull consumer, until it holds `at_least`
/// messages and every one was read (or `limit` passes: then what was read).
async fn read_stream(
    url: &str,
    stream: &str,
    at_least: usize,
    limit: Duration,
) -> Vec<(String, Event)> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let deadline = Instant::now() + limit;
    let client = async_nats::connect(url).await.expect("connect to nats");
    let js = async_nats::jetstream::new(client);
    // Wait for the stream (Playhead creates it at its first publish).
    let mut stream = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no stream {stream}: {e}"),
        }
    };
    loop {
        let held = stream.info().await.unwrap().state.messages as usize;
        if held >= at_least || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = Vec::with_capacity(held);
    while events.len() < held {
        let mut batch = consumer
            .fetch()
            .max_messages(1_000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = events.len();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            let event = serde_json::from_slice(&message.payload).expect("an event's JSON");
            events.push((message.subject.to_string(), event));
        }
        assert!(
            events.len() > before || Instant::now() < deadline,
            "read {} of {held} messages",
            events.len()
        );
    }
    events
}
