//! Typed configuration: `config/default.toml`, then `--config PATH`, then environment
//! variables `PLAYHEAD_<SECTION>__<KEY>` (e.g. `PLAYHEAD_WAL__SYNC_MODE=group`), later ones
//! winning. A bad value fails at start with the key, the value and what was expected.
//!
//! Units are in the names (`_ms`, `_bytes`, `_days`); every queue and buffer has a limit here.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Where the shipped defaults live, relative to the working directory. `playhead serve`
/// reads it when present; the compiled-in [`Config::default`] holds the same values.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

/// A configuration that could not be loaded or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value has the wrong type, an unknown key was given, or a file could not be read.
    #[error("configuration error: {0}")]
    Load(String),
    /// A value parsed but is out of range.
    #[error("configuration key `{key}` has value `{value}`, expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// The whole configuration. Each section is documented in `config/default.toml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub binary: BinaryConfig,
    pub auth: crate::auth::AuthConfig,
    pub api: ApiConfig,
    pub ingest: IngestConfig,
    pub coalescer: CoalescerConfig,
    pub wal: WalConfig,
    pub flush: FlushConfig,
    pub store: StoreConfig,
    pub faults: FaultsConfig,
}

/// Process-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Root of everything written to disk; `wal_dir` and the store's directory default to
    /// sub-directories of it.
    pub data_dir: PathBuf,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// `tracing` filter, e.g. `info` or `playhead=debug`. `RUST_LOG` overrides it.
    pub log_level: String,
    /// Nice levels below the process at which background work runs (flush cycles, purge,
    /// log snapshots, the embedded store's compaction); 0 runs it at the process's
    /// priority. See `crate::priority`.
    pub background_nice: i32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            worker_threads: 0,
            log_level: "info".into(),
            background_nice: crate::priority::DEFAULT_BACKGROUND_NICE,
        }
    }
}

/// The public HTTP listener and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the public API, `/metrics` and the health checks.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// A client must send its request headers within this, or the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request (body included) must complete within this, or it gets 408.
    pub request_timeout_ms: u64,
    /// Open connections at most; further ones are closed at once.
    pub max_connections: usize,
    /// `Retry-After` seconds sent with 503 when the server is overloaded.
    pub retry_after_seconds: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4_096,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            max_connections: 10_000,
            retry_after_seconds: 1,
        }
    }
}

/// The binary ingest listener (docs/protocol.md) and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BinaryConfig {
    /// Serve the binary protocol at all.
    pub enabled: bool,
    /// Address of the binary listener.
    pub listen: String,
    /// The shared secret a client presents in its HELLO (compared in constant time). Empty
    /// refuses every client.
    pub secret: String,
    /// Largest frame payload accepted; larger frames are a protocol error.
    pub max_frame_bytes: u32,
    /// Most records in one batch.
    pub max_records_per_batch: u32,
    /// Batches a connection may have submitted but not yet acknowledged; past it the server
    /// stops reading that connection (TCP back-pressure), so memory stays bounded.
    pub max_in_flight_batches: u32,
    /// Open connections at most; further ones get a TOO_MANY_CONNECTIONS error frame.
    pub max_connections: usize,
    /// The HELLO must arrive within this after connecting.
    pub handshake_timeout_ms: u64,
    /// A connection with no frame for this long is closed.
    pub idle_timeout_ms: u64,
    /// Once a frame has started, the rest of it must arrive within this.
    pub read_timeout_ms: u64,
    /// A client that reads no acknowledgements for this long is disconnected.
    pub write_timeout_ms: u64,
    /// Delay suggested in BUSY replies.
    pub busy_retry_after_ms: u32,
    /// Listen backlog.
    pub backlog: u32,
    /// Kernel socket buffer sizes for accepted connections (0 = system default).
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
}

impl Default for BinaryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:7070".into(),
            secret: BINARY_DEV_SECRET.into(),
            max_frame_bytes: 1 << 20,
            max_records_per_batch: 16_384,
            max_in_flight_batches: 64,
            max_connections: 1_024,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            busy_retry_after_ms: 100,
            backlog: 1_024,
            recv_buffer_bytes: 4 << 20,
            send_buffer_bytes: 1 << 20,
        }
    }
}

/// The binary listener's shipped secret. The server warns when it is in use on a
/// non-loopback address.
pub const BINARY_DEV_SECRET: &str = "playhead-binary-development-secret";

/// Business rules of the public API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The catalog of titles (docs/catalog.md).
    pub catalog_path: PathBuf,
    /// A title watched to at least this fraction of its duration counts as completed.
    pub completed_ratio: f64,
    /// A position may exceed the title's duration by this much (credits, rounding).
    pub position_allowance_seconds: u32,
    /// Longest continue-watching list returned.
    pub continue_watching_limit: usize,
    /// Longest `device_id` accepted.
    pub max_device_id_bytes: usize,
    /// Device names remembered for `last_device_id` answers (oldest forgotten first).
    pub max_device_names: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            catalog_path: PathBuf::from("config/catalog.toml"),
            completed_ratio: 0.95,
            position_allowance_seconds: 60,
            continue_watching_limit: 20,
            max_device_id_bytes: 64,
            max_device_names: 1_000_000,
        }
    }
}

/// Rules applied to every heartbeat before it is accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A client-supplied timestamp is clamped to at most server-now plus this.
    pub max_clock_skew_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_clock_skew_ms: 2_000,
        }
    }
}

/// The sharded in-memory memtable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalescerConfig {
    /// Number of shards, a power of two; several per core keep lock contention low.
    pub shards: usize,
    /// Most keys held in memory at once (unflushed plus being flushed). Past it, writes
    /// are refused with "overloaded" instead of growing without bound.
    pub max_keys: usize,
    /// Titles one profile may hold in memory before a new one may be refused with
    /// "overloaded" (docs/architecture.md, "A profile's titles live together"): a viewer
    /// plays one title at a time, and a profile's titles stay in memory only until they go
    /// idle and are stored. Bounds what one profile writing thousands of titles costs the
    /// keys around it.
    pub max_titles_per_profile: usize,
}

impl Default for CoalescerConfig {
    fn default() -> Self {
        Self {
            shards: 64,
            max_keys: 48_000_000,
            max_titles_per_profile: 64,
        }
    }
}

/// When the commit log makes an appended record durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Acknowledge once the record is in the log's buffer; fsync every `sync_interval_ms`.
    /// A crash can lose at most that window of acknowledged writes.
    Periodic,
    /// Acknowledge only after the fsync that covers the record; fsyncs are shared by every
    /// caller waiting at that moment.
    Group,
}

/// The commit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Directory of the segment files; empty means `<data_dir>/wal`.
    pub dir: PathBuf,
    pub sync_mode: SyncMode,
    /// Periodic mode: the longest an acknowledged record waits for its fsync.
    pub sync_interval_ms: u64,
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Appended bytes not yet written to the file. Past it, appends are refused
    /// ("overloaded") until the writer catches up.
    pub max_buffer_bytes: usize,
    /// When the segments on disk exceed this (the store is down or slow, or ingest outpaces
    /// the flush cadence), a snapshot of the unflushed keys replaces them.
    pub snapshot_after_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            sync_mode: SyncMode::Periodic,
            sync_interval_ms: 10,
            segment_bytes: 64 << 20,
            max_buffer_bytes: 64 << 20,
            snapshot_after_bytes: 1 << 30,
        }
    }
}

/// Moving deduplicated batches from the coalescer to the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Cadence of flush cycles: each one writes the dirty keys that are due (see
    /// `crate::flusher`).
    pub interval_ms: u64,
    /// A dirty key not written for this long is idle (its viewer paused, stopped or left):
    /// the next cycle writes it and, once stored, forgets it. Bounds how long the last
    /// position of a stopped viewer takes to reach the store, and how much commit log is
    /// kept. 0: every key written before a cycle began is written by that cycle.
    pub idle_ms: u64,
    /// A key that keeps playing is written once per this period (a checkpoint, at a phase
    /// fixed by its key). Bounds how stale the store is for a key that never goes idle.
    /// 0: every dirty key is written by every cycle.
    pub checkpoint_ms: u64,
    /// Most rows one cycle writes; idle keys left over wait for the next cycle (and keep
    /// their log segments), checkpoints left over for their next period. Bounds the
    /// cycle's copy of the rows (40 bytes each).
    pub max_rows_per_cycle: usize,
    /// Rows per store write.
    pub batch_rows: usize,
    /// Store writes in flight at once.
    pub max_concurrency: usize,
    /// First retry delay after a failed store write; doubles up to `retry_max_ms`, with
    /// random jitter.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// On shutdown, how long to keep trying to flush before exiting with the rest safe in
    /// the commit log.
    pub shutdown_timeout_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            idle_ms: 10_000,
            checkpoint_ms: 300_000,
            max_rows_per_cycle: 2_000_000,
            batch_rows: 8_192,
            max_concurrency: 4,
            retry_initial_ms: 50,
            retry_max_ms: 10_000,
            shutdown_timeout_ms: 30_000,
        }
    }
}

/// Fault injection for reliability tests of the real binary (tests/reliability.rs). Off
/// unless a path is set; never set it in production.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    /// While a file exists at this absolute path, every store write fails (flushes and
    /// purges are retried as in a real outage; reads still work). Empty: off.
    pub store_write_fault_file: PathBuf,
}

/// Which store backs the coalescer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// fjall, an LSM tree inside this process. No external service.
    Embedded,
    /// A Cassandra or ScyllaDB cluster (docs/cassandra.md): the scale-out path.
    Cassandra,
}

/// The store and its retention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Positions (and deletion markers) untouched for longer are purged. Heartbeats older
    /// than this are refused at ingest, so a purged deletion cannot be undone by them.
    pub retention_days: u64,
    /// How often the retention purge runs.
    pub purge_interval_ms: u64,
    /// A read that the store has not answered by then is answered without it (resume at
    /// 0, or memory only): playback is never blocked by the position store. Default 70 ms:
    /// the product's budget for a resume is 150 ms end to end, and a resume makes at most
    /// two store reads one after the other (the title, then the next episode when the
    /// title is completed), so 2 × 70 = 140 ms leaves 10 ms for the rest of the request.
    pub read_timeout_ms: u64,
    pub embedded: EmbeddedStoreConfig,
    pub cassandra: CassandraStoreConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Embedded,
            retention_days: 180,
            purge_interval_ms: 3_600_000,
            read_timeout_ms: 70,
            embedded: EmbeddedStoreConfig::default(),
            cassandra: CassandraStoreConfig::default(),
        }
    }
}

/// The embedded fjall store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedStoreConfig {
    /// Directory of the LSM tree; empty means `<data_dir>/store`.
    pub dir: PathBuf,
    /// Block cache size.
    pub cache_bytes: u64,
}

impl Default for EmbeddedStoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            cache_bytes: 64 << 20,
        }
    }
}

/// A CQL consistency level, spelled as in CQL (`LOCAL_QUORUM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConsistencyLevel {
    Any,
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

/// The replication strategy of the keyspace Playhead creates (or prints for a DBA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationStrategy {
    /// `replication_factor` copies, placed without regard to datacenters: one-DC test
    /// clusters only.
    SimpleStrategy,
    /// Per-datacenter factors: `datacenter_replication`, or `replication_factor` copies in
    /// `local_datacenter` when that map is empty.
    NetworkTopologyStrategy,
}

/// The Cassandra / ScyllaDB store (docs/cassandra.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CassandraStoreConfig {
    /// `host:port` of nodes to discover the cluster from; the driver learns the rest.
    pub contact_points: Vec<String>,
    /// The datacenter this Playhead node runs in: requests go to its replicas, and the
    /// `LOCAL_*` consistency levels count only them.
    pub local_datacenter: String,
    /// Keyspace of the `positions` table.
    pub keyspace: String,
    pub replication: ReplicationStrategy,
    /// Copies of each row (SimpleStrategy, or NetworkTopologyStrategy in the local DC).
    pub replication_factor: u32,
    /// NetworkTopologyStrategy: copies per datacenter, e.g. `{ eu = 3, us = 3 }`. Empty
    /// means `{ <local_datacenter> = replication_factor }`.
    pub datacenter_replication: std::collections::BTreeMap<String, u32>,
    /// Flush writes: a batch is acknowledged (and may leave the commit log) at this level.
    pub write_consistency: ConsistencyLevel,
    /// Resume and continue-watching reads.
    pub read_consistency: ConsistencyLevel,
    /// Driver-side limit on one request (all its retries included).
    pub request_timeout_ms: u64,
    /// Limit on opening a connection to a node.
    pub connect_timeout_ms: u64,
    /// Requests this node has outstanding at once, across every flush batch and read.
    pub max_in_flight: usize,
    /// Rows of one partition per UNLOGGED batch.
    pub max_batch_rows: usize,
    /// Row TTL; 0 means `store.retention_days`.
    pub ttl_seconds: u64,
    /// Create the keyspace and table at start if missing (development); production
    /// schemas are applied by a DBA from `playhead schema`.
    pub create_schema: bool,
    /// Password authentication; both empty means none.
    pub username: String,
    pub password: String,
    /// Consecutive failed requests that open the circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker fails requests at once before letting one probe through.
    pub breaker_open_ms: u64,
}

impl Default for CassandraStoreConfig {
    fn default() -> Self {
        Self {
            contact_points: vec!["127.0.0.1:9042".into()],
            local_datacenter: "datacenter1".into(),
            keyspace: "playhead".into(),
            replication: ReplicationStrategy::NetworkTopologyStrategy,
            replication_factor: 3,
            datacenter_replication: Default::default(),
            write_consistency: ConsistencyLevel::LocalQuorum,
            read_consistency: ConsistencyLevel::LocalOne,
            request_timeout_ms: 2_000,
            connect_timeout_ms: 5_000,
            max_in_flight: 1_024,
            max_batch_rows: 32,
            ttl_seconds: 0,
            create_schema: false,
            username: String::new(),
            password: String::new(),
            breaker_failure_threshold: 20,
            breaker_open_ms: 1_000,
        }
    }
}

/// Longest TTL Cassandra accepts (20 years).
pub const MAX_CASSANDRA_TTL_SECONDS: u64 = 630_720_000;

/// What [`Config::redacted`] prints in place of a secret.
pub const REDACTED: &str = "<redacted>";

impl Config {
    /// This configuration with every secret (`auth.hs256_secret`, `binary.secret`,
    /// `store.cassandra.password`) replaced by [`REDACTED`], for printing (`playhead
    /// config`). An empty secret stays empty: it says the feature is off, and reveals nothing.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        for secret in [
            &mut config.auth.hs256_secret,
            &mut config.binary.secret,
            &mut config.store.cassandra.password,
        ] {
            if !secret.is_empty() {
                *secret = REDACTED.into();
            }
        }
        config
    }

    /// Loads defaults, then `file` (or [`DEFAULT_CONFIG_PATH`] when it exists and `file` is
    /// `None`), then `PLAYHEAD_<SECTION>__<KEY>` variables from `env`, and validates.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Load(format!(
                        "config file {} does not exist or is not a file",
                        path.display()
                    )));
                }
                figment = figment.merge(Toml::file(path));
            }
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                figment = figment.merge(Toml::file(DEFAULT_CONFIG_PATH));
            }
            None => {}
        }
        // Only double-underscore variables are config; PLAYHEAD_TEST_* and friends are not.
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PLAYHEAD_") && k.contains("__"))
            .collect();
        for (k, v) in &vars {
            let key = k["PLAYHEAD_".len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            figment = figment.merge(Serialized::global(&key, parse_env_value(v)));
        }
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Loads from the process environment.
    pub fn load_from_process(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load(file, std::env::vars())
    }

    /// Range checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            "server.log_level",
            &self.server.log_level,
            tracing_subscriber::EnvFilter::try_new(&self.server.log_level).is_ok(),
            "a tracing filter such as `info` or `playhead=debug,info`",
        )?;
        check(
            "server.worker_threads",
            self.server.worker_threads,
            self.server.worker_threads <= 1_024,
            "between 0 (one per core) and 1024",
        )?;
        check(
            "server.background_nice",
            self.server.background_nice,
            (0..=19).contains(&self.server.background_nice),
            "between 0 (background at the process's priority) and 19",
        )?;
        let h = &self.http;
        check(
            "http.listen",
            &h.listen,
            h.listen.parse::<std::net::SocketAddr>().is_ok(),
            "an IP address and port such as 127.0.0.1:8080",
        )?;
        let b = &self.binary;
        check(
            "binary.listen",
            &b.listen,
            b.listen.parse::<std::net::SocketAddr>().is_ok(),
            "an IP address and port such as 127.0.0.1:7070",
        )?;
        check(
            "binary.secret",
            b.secret.len(),
            b.secret.len() <= crate::protocol::MAX_SECRET_BYTES,
            "at most 1024 bytes",
        )?;
        check(
            "binary.max_frame_bytes",
            b.max_frame_bytes,
            (1_024..=64 << 20).contains(&b.max_frame_bytes),
            "between 1024 and 67108864",
        )?;
        check(
            "binary.max_records_per_batch",
            b.max_records_per_batch,
            b.max_records_per_batch >= 1
                && (b.max_records_per_batch as usize) * crate::protocol::RECORD_BYTES
                    + crate::protocol::BATCH_PREFIX_BYTES
                    <= b.max_frame_bytes as usize,
            "at least 1, and small enough that a full batch fits in binary.max_frame_bytes (40 bytes a record + 12)",
        )?;
        check(
            "binary.max_in_flight_batches",
            b.max_in_flight_batches,
            (1..=4_096).contains(&b.max_in_flight_batches),
            "between 1 and 4096",
        )?;
        check(
            "binary.max_connections",
            b.max_connections,
            (1..=1_000_000).contains(&b.max_connections),
            "between 1 and 1000000",
        )?;
        for (key, value) in [
            ("binary.handshake_timeout_ms", b.handshake_timeout_ms),
            ("binary.idle_timeout_ms", b.idle_timeout_ms),
            ("binary.read_timeout_ms", b.read_timeout_ms),
            ("binary.write_timeout_ms", b.write_timeout_ms),
        ] {
            check(
                key,
                value,
                (1..=3_600_000).contains(&value),
                "between 1 and 3600000",
            )?;
        }
        check(
            "binary.backlog",
            b.backlog,
            (1..=65_535).contains(&b.backlog),
            "between 1 and 65535",
        )?;
        for (key, value) in [
            ("binary.recv_buffer_bytes", b.recv_buffer_bytes),
            ("binary.send_buffer_bytes", b.send_buffer_bytes),
        ] {
            check(
                key,
                value,
                value <= 256 << 20,
                "between 0 (system default) and 268435456",
            )?;
        }
        check(
            "http.max_body_bytes",
            h.max_body_bytes,
            (64..=1 << 20).contains(&h.max_body_bytes),
            "between 64 and 1048576",
        )?;
        check(
            "http.header_read_timeout_ms",
            h.header_read_timeout_ms,
            (1..=600_000).contains(&h.header_read_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "http.request_timeout_ms",
            h.request_timeout_ms,
            (1..=600_000).contains(&h.request_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "http.max_connections",
            h.max_connections,
            (1..=1_000_000).contains(&h.max_connections),
            "between 1 and 1000000",
        )?;
        let a = &self.api;
        check(
            "api.completed_ratio",
            a.completed_ratio,
            a.completed_ratio > 0.0 && a.completed_ratio <= 1.0,
            "a fraction in (0, 1]",
        )?;
        check(
            "api.continue_watching_limit",
            a.continue_watching_limit,
            (1..=1_000).contains(&a.continue_watching_limit),
            "between 1 and 1000",
        )?;
        check(
            "api.max_device_id_bytes",
            a.max_device_id_bytes,
            (1..=256).contains(&a.max_device_id_bytes),
            "between 1 and 256",
        )?;
        check(
            "auth.leeway_seconds",
            self.auth.leeway_seconds,
            self.auth.leeway_seconds <= 3_600,
            "at most 3600",
        )?;
        check(
            "auth.verified_token_cache",
            self.auth.verified_token_cache,
            self.auth.verified_token_cache <= 16 << 20,
            "at most 16777216 (0 disables it)",
        )?;
        let c = &self.coalescer;
        check(
            "coalescer.shards",
            c.shards,
            c.shards.is_power_of_two() && c.shards <= 65_536,
            "a power of two between 1 and 65536",
        )?;
        check(
            "coalescer.max_keys",
            c.max_keys,
            c.max_keys >= 1,
            "at least 1",
        )?;
        check(
            "coalescer.max_titles_per_profile",
            c.max_titles_per_profile,
            c.max_titles_per_profile >= 1,
            "at least 1",
        )?;
        let w = &self.wal;
        check(
            "wal.sync_interval_ms",
            w.sync_interval_ms,
            (1..=10_000).contains(&w.sync_interval_ms),
            "between 1 and 10000",
        )?;
        check(
            "wal.segment_bytes",
            w.segment_bytes,
            (64 << 10..=4 << 30).contains(&w.segment_bytes),
            "between 65536 (64 KiB) and 4294967296 (4 GiB)",
        )?;
        check(
            "wal.max_buffer_bytes",
            w.max_buffer_bytes,
            (64 << 10..=1 << 30).contains(&w.max_buffer_bytes),
            "between 65536 (64 KiB) and 1073741824 (1 GiB)",
        )?;
        check(
            "wal.snapshot_after_bytes",
            w.snapshot_after_bytes,
            w.snapshot_after_bytes >= 2 * w.segment_bytes,
            "at least twice wal.segment_bytes",
        )?;
        let f = &self.flush;
        check(
            "flush.interval_ms",
            f.interval_ms,
            (1..=3_600_000).contains(&f.interval_ms),
            "between 1 and 3600000",
        )?;
        check(
            "flush.idle_ms",
            f.idle_ms,
            f.idle_ms <= 3_600_000,
            "at most 3600000",
        )?;
        check(
            "flush.checkpoint_ms",
            f.checkpoint_ms,
            f.checkpoint_ms <= 86_400_000,
            "at most 86400000 (a day)",
        )?;
        check(
            "flush.max_rows_per_cycle",
            f.max_rows_per_cycle,
            (1..=100_000_000).contains(&f.max_rows_per_cycle),
            "between 1 and 100000000",
        )?;
        check(
            "flush.batch_rows",
            f.batch_rows,
            (1..=1_000_000).contains(&f.batch_rows),
            "between 1 and 1000000",
        )?;
        check(
            "flush.max_concurrency",
            f.max_concurrency,
            (1..=1_024).contains(&f.max_concurrency),
            "between 1 and 1024",
        )?;
        check(
            "flush.retry_initial_ms",
            f.retry_initial_ms,
            f.retry_initial_ms >= 1,
            "at least 1",
        )?;
        check(
            "flush.retry_max_ms",
            f.retry_max_ms,
            f.retry_max_ms >= f.retry_initial_ms,
            "at least flush.retry_initial_ms",
        )?;
        let s = &self.store;
        check(
            "store.retention_days",
            s.retention_days,
            (1..=36_500).contains(&s.retention_days),
            "between 1 and 36500",
        )?;
        check(
            "store.purge_interval_ms",
            s.purge_interval_ms,
            s.purge_interval_ms >= 1_000,
            "at least 1000",
        )?;
        check(
            "store.read_timeout_ms",
            s.read_timeout_ms,
            (1..=60_000).contains(&s.read_timeout_ms),
            "between 1 and 60000",
        )?;
        let fault_file = &self.faults.store_write_fault_file;
        check(
            "faults.store_write_fault_file",
            fault_file.display(),
            fault_file.as_os_str().is_empty() || fault_file.is_absolute(),
            "empty (off) or an absolute path",
        )?;
        self.validate_cassandra()
    }

    fn validate_cassandra(&self) -> Result<(), ConfigError> {
        let c = &self.store.cassandra;
        check(
            "store.cassandra.contact_points",
            format!("{:?}", c.contact_points),
            !c.contact_points.is_empty() && c.contact_points.iter().all(|p| is_host_port(p)),
            "a non-empty list of host:port strings such as [\"10.0.0.1:9042\"]",
        )?;
        check(
            "store.cassandra.local_datacenter",
            &c.local_datacenter,
            is_datacenter_name(&c.local_datacenter),
            "a datacenter name of letters, digits, `-`, `_` or `.`",
        )?;
        check(
            "store.cassandra.keyspace",
            &c.keyspace,
            is_cql_identifier(&c.keyspace),
            "a lowercase CQL identifier: a letter, then letters, digits or `_`, at most 48",
        )?;
        check(
            "store.cassandra.replication_factor",
            c.replication_factor,
            (1..=16).contains(&c.replication_factor),
            "between 1 and 16",
        )?;
        let dcs = &c.datacenter_replication;
        check(
            "store.cassandra.datacenter_replication",
            format!("{dcs:?}"),
            dcs.iter()
                .all(|(dc, n)| is_datacenter_name(dc) && (1..=16).contains(n)),
            "datacenter names mapped to factors between 1 and 16",
        )?;
        check(
            "store.cassandra.datacenter_replication",
            format!("{dcs:?}"),
            dcs.is_empty() || c.replication == ReplicationStrategy::NetworkTopologyStrategy,
            "empty unless store.cassandra.replication is NetworkTopologyStrategy",
        )?;
        check(
            "store.cassandra.datacenter_replication",
            format!("{dcs:?}"),
            dcs.is_empty() || dcs.contains_key(&c.local_datacenter),
            "empty, or naming store.cassandra.local_datacenter (LOCAL_* levels need replicas there)",
        )?;
        check(
            "store.cassandra.write_consistency",
            format!("{:?}", c.write_consistency),
            c.write_consistency != ConsistencyLevel::Any,
            "a level that stores the row on a replica (not ANY, which acknowledges a hint)",
        )?;
        check(
            "store.cassandra.read_consistency",
            format!("{:?}", c.read_consistency),
            c.read_consistency != ConsistencyLevel::Any,
            "a level valid for reads (not ANY)",
        )?;
        check(
            "store.cassandra.request_timeout_ms",
            c.request_timeout_ms,
            (1..=600_000).contains(&c.request_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "store.cassandra.connect_timeout_ms",
            c.connect_timeout_ms,
            (1..=600_000).contains(&c.connect_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "store.cassandra.max_in_flight",
            c.max_in_flight,
            (1..=65_536).contains(&c.max_in_flight),
            "between 1 and 65536",
        )?;
        check(
            "store.cassandra.max_batch_rows",
            c.max_batch_rows,
            (1..=1_000).contains(&c.max_batch_rows),
            "between 1 and 1000",
        )?;
        check(
            "store.cassandra.ttl_seconds",
            c.ttl_seconds,
            c.ttl_seconds <= MAX_CASSANDRA_TTL_SECONDS,
            "0 (use store.retention_days) or at most 630720000 (20 years, Cassandra's limit)",
        )?;
        check(
            "store.retention_days",
            self.store.retention_days,
            c.ttl_seconds != 0
                || self.store.retention_days.saturating_mul(86_400) <= MAX_CASSANDRA_TTL_SECONDS,
            "at most 7300 days when it sets the Cassandra TTL (store.cassandra.ttl_seconds = 0)",
        )?;
        check(
            "store.cassandra.username",
            &c.username,
            c.username.is_empty() == c.password.is_empty(),
            "set together with store.cassandra.password (or both empty)",
        )?;
        check(
            "store.cassandra.breaker_failure_threshold",
            c.breaker_failure_threshold,
            (1..=1_000_000).contains(&c.breaker_failure_threshold),
            "between 1 and 1000000",
        )?;
        check(
            "store.cassandra.breaker_open_ms",
            c.breaker_open_ms,
            (1..=600_000).contains(&c.breaker_open_ms),
            "between 1 and 600000",
        )?;
        Ok(())
    }

    /// The TTL Cassandra rows are written with.
    pub fn cassandra_ttl_seconds(&self) -> u64 {
        match self.store.cassandra.ttl_seconds {
            0 => self.store.retention_days.saturating_mul(86_400),
            ttl => ttl,
        }
    }

    /// The commit log's directory.
    pub fn wal_dir(&self) -> PathBuf {
        resolve(&self.server.data_dir, &self.wal.dir, "wal")
    }

    /// The embedded store's directory.
    pub fn embedded_store_dir(&self) -> PathBuf {
        resolve(&self.server.data_dir, &self.store.embedded.dir, "store")
    }

    /// Retention as milliseconds.
    pub fn retention_ms(&self) -> u64 {
        self.store.retention_days.saturating_mul(86_400_000)
    }
}

fn resolve(data_dir: &Path, dir: &Path, default_name: &str) -> PathBuf {
    if dir.as_os_str().is_empty() {
        data_dir.join(default_name)
    } else {
        dir.to_path_buf()
    }
}

fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

fn is_datacenter_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A lowercase, unquoted CQL identifier, so it can be written into statements verbatim.
fn is_cql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.len() <= 48
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check<T: ToString>(
    key: &'static str,
    value: T,
    ok: bool,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            expected,
        })
    }
}

/// Environment values are typed the way TOML would type them (`10` is an integer, `true`
/// a boolean), and anything else is a string.
fn parse_env_value(raw: &str) -> figment::value::Value {
    match raw.parse::<figment::value::Value>() {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::from("(top level)")
            } else {
                e.path.join(".")
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            format!("key `{key}`{source}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_default_file_equals_compiled_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let loaded = Config::load(Some(&path), env(&[])).expect("default.toml loads");
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn environment_overrides_file_and_ignores_unrelated_vars() {
        let c = Config::load(
            None,
            env(&[
                ("PLAYHEAD_WAL__SYNC_MODE", "group"),
                ("PLAYHEAD_FLUSH__INTERVAL_MS", "250"),
                ("PLAYHEAD_STORE__EMBEDDED__CACHE_BYTES", "1048576"),
                ("PLAYHEAD_TEST_CASSANDRA", "127.0.0.1:9042"),
                ("HOME", "/root"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.wal.sync_mode, SyncMode::Group);
        assert_eq!(c.flush.interval_ms, 250);
        assert_eq!(c.store.embedded.cache_bytes, 1 << 20);
    }

    #[test]
    fn bad_type_names_key_and_value() {
        let err = Config::load(None, env(&[("PLAYHEAD_FLUSH__INTERVAL_MS", "soon")]))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("flush.interval_ms"), "{err}");
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn out_of_range_names_key_value_and_expectation() {
        let err = Config::load(None, env(&[("PLAYHEAD_COALESCER__SHARDS", "12")]))
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            err,
            "configuration key `coalescer.shards` has value `12`, expected a power of two between 1 and 65536"
        );
        let err = Config::load(None, env(&[("PLAYHEAD_SERVER__BACKGROUND_NICE", "20")]))
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            err,
            "configuration key `server.background_nice` has value `20`, expected between 0 (background at the process's priority) and 19"
        );
        let c = Config::load(None, env(&[("PLAYHEAD_SERVER__BACKGROUND_NICE", "0")])).unwrap();
        assert_eq!(c.server.background_nice, 0);
    }

    #[test]
    fn unknown_key_and_bad_enum_are_refused() {
        let err = Config::load(None, env(&[("PLAYHEAD_WAL__SYNC_MOOD", "group")]))
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("sync_mood"), "{err}");
        let err = Config::load(None, env(&[("PLAYHEAD_WAL__SYNC_MODE", "sometimes")]))
            .expect_err("bad enum")
            .to_string();
        assert!(
            err.contains("sometimes") && err.contains("wal.sync_mode"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/playhead.toml")), env(&[]))
            .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/playhead.toml"));
    }

    #[test]
    fn cassandra_settings_are_validated_with_key_and_expectation() {
        let bad = |pairs: &[(&str, &str)]| {
            Config::load(None, env(pairs))
                .expect_err("must fail")
                .to_string()
        };
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__CONTACT_POINTS", "[\"node1\"]")]);
        assert!(err.contains("store.cassandra.contact_points"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__KEYSPACE", "Play-head")]);
        assert!(err.contains("store.cassandra.keyspace"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__WRITE_CONSISTENCY", "ANY")]);
        assert!(err.contains("store.cassandra.write_consistency"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__WRITE_CONSISTENCY", "MOST")]);
        assert!(err.contains("store.cassandra.write_consistency"), "{err}");
        let err = bad(&[
            ("PLAYHEAD_STORE__CASSANDRA__REPLICATION", "SimpleStrategy"),
            (
                "PLAYHEAD_STORE__CASSANDRA__DATACENTER_REPLICATION",
                "{datacenter1=3}",
            ),
        ]);
        assert!(err.contains("datacenter_replication"), "{err}");
        let err = bad(&[(
            "PLAYHEAD_STORE__CASSANDRA__DATACENTER_REPLICATION",
            "{eu=3}",
        )]);
        assert!(err.contains("local_datacenter"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__USERNAME", "playhead")]);
        assert!(err.contains("store.cassandra.username"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__MAX_IN_FLIGHT", "0")]);
        assert!(err.contains("store.cassandra.max_in_flight"), "{err}");
        let err = bad(&[("PLAYHEAD_STORE__CASSANDRA__TTL_SECONDS", "630720001")]);
        assert!(err.contains("store.cassandra.ttl_seconds"), "{err}");
    }

    #[test]
    fn cassandra_settings_load_from_environment() {
        let c = Config::load(
            None,
            env(&[
                ("PLAYHEAD_STORE__KIND", "cassandra"),
                (
                    "PLAYHEAD_STORE__CASSANDRA__CONTACT_POINTS",
                    "[\"10.0.0.1:9042\",\"[::1]:9042\"]",
                ),
                ("PLAYHEAD_STORE__CASSANDRA__LOCAL_DATACENTER", "eu-west"),
                (
                    "PLAYHEAD_STORE__CASSANDRA__DATACENTER_REPLICATION",
                    "{eu-west=3,us-east=2}",
                ),
                (
                    "PLAYHEAD_STORE__CASSANDRA__READ_CONSISTENCY",
                    "LOCAL_QUORUM",
                ),
            ]),
        )
        .expect("loads");
        assert_eq!(c.store.kind, StoreKind::Cassandra);
        let cass = &c.store.cassandra;
        assert_eq!(cass.contact_points.len(), 2);
        assert_eq!(cass.datacenter_replication.get("us-east"), Some(&2));
        assert_eq!(cass.read_consistency, ConsistencyLevel::LocalQuorum);
        assert_eq!(c.cassandra_ttl_seconds(), 180 * 86_400);
    }

    #[test]
    fn directories_default_under_data_dir() {
        let mut c = Config::default();
        c.server.data_dir = PathBuf::from("/srv/ph");
        assert_eq!(c.wal_dir(), PathBuf::from("/srv/ph/wal"));
        assert_eq!(c.embedded_store_dir(), PathBuf::from("/srv/ph/store"));
        c.wal.dir = PathBuf::from("/fast/wal");
        assert_eq!(c.wal_dir(), PathBuf::from("/fast/wal"));
    }
}
