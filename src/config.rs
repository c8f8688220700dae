//! Typed configuration: `config/default.toml`, then `--config PATH`, then environment
//! variables `PLAYHEAD_<SECTION>__<KEY>` (e.g. `PLAYHEAD_WAL__SYNC_MODE=group`), later ones
//! winning. A bad value fails at start with the key, the value and what was expected.
//!
//! Units are in the names (`_ms`, `_bytes`, `_days`); every queue and buffer has a limit.
//!
//! This module assembles and loads; each section (its struct, defaults and validation) lives
//! with the component it configures, and is re-exported here under its usual name:
//!
//! | section | defined in |
//! | --- | --- |
//! | `[server]` | here ([`ServerConfig`]: the process) |
//! | `[http]`, `[binary]`, `[auth]`, `[ingest]` | [`crate::ingest`]: `http::config`, `binary::config`, `auth`, `config` |
//! | `[api]` | [`crate::resume::config`] |
//! | `[coalescer]`, `[wal]`, `[flush]` | [`crate::engine`]: `coalescer::config`, `wal::config`, `flusher::config` |
//! | `[store]` (`.embedded`, `.cassandra`), `[faults]` | [`crate::store`]: `config`, `embedded`, `cassandra::config`, `faulty` |
//! | `[events]` | [`crate::events::config`] |

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::engine::coalescer::config::CoalescerConfig;
pub use crate::engine::flusher::config::FlushConfig;
pub use crate::engine::wal::config::{SyncMode, WalConfig};
pub use crate::events::config::{EventsConfig, EventsKind};
pub use crate::ingest::auth::AuthConfig;
pub use crate::ingest::binary::config::{BinaryConfig, BINARY_DEV_SECRET};
pub use crate::ingest::config::IngestConfig;
pub use crate::ingest::http::config::HttpConfig;
pub use crate::resume::config::ApiConfig;
pub use crate::store::cassandra::config::{
    CassandraStoreConfig, ConsistencyLevel, ReplicationStrategy, MAX_CASSANDRA_TTL_SECONDS,
};
pub use crate::store::config::{StoreConfig, StoreKind};
pub use crate::store::embedded::EmbeddedStoreConfig;
pub use crate::store::faulty::FaultsConfig;

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
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub ingest: IngestConfig,
    pub coalescer: CoalescerConfig,
    pub wal: WalConfig,
    pub flush: FlushConfig,
    pub store: StoreConfig,
    pub events: EventsConfig,
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
    /// priority. See `crate::telemetry::priority`.
    pub background_nice: i32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            worker_threads: 0,
            log_level: "info".into(),
            background_nice: crate::telemetry::priority::DEFAULT_BACKGROUND_NICE,
        }
    }
}

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

    /// Range checks that types alone cannot express: the process's own settings here, each
    /// section's by the component it configures. The first bad value is the error.
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
        self.http.validate()?;
        self.binary.validate()?;
        self.api.validate()?;
        self.auth.validate()?;
        self.coalescer.validate()?;
        self.wal.validate()?;
        self.flush.validate()?;
        self.store.validate()?;
        self.events.validate()?;
        self.faults.validate()
    }

    /// The TTL Cassandra rows are written with.
    pub fn cassandra_ttl_seconds(&self) -> u64 {
        self.store
            .cassandra
            .ttl_seconds_for(self.store.retention_days)
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
        self.store.retention_ms()
    }
}

fn resolve(data_dir: &Path, dir: &Path, default_name: &str) -> PathBuf {
    if dir.as_os_str().is_empty() {
        data_dir.join(default_name)
    } else {
        dir.to_path_buf()
    }
}

/// `Ok` when `ok`, else the error naming `key`, its `value` and what was `expected`: what
/// every section's `validate` reports a bad value with.
pub(crate) fn check<T: ToString>(
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
pub(crate) mod tests {
    use super::*;

    /// Environment variables as [`Config::load`] takes them, for the config tests of every
    /// section.
    pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
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
        let err = Config::load(None, env(&[("PLAYHEAD_API__ALTERNATIVE_WINDOW_MS", "0")]))
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            err,
            "configuration key `api.alternative_window_ms` has value `0`, expected between 1 and 2592000000 (30 days)"
        );
        let err = Config::load(None, env(&[("PLAYHEAD_COALESCER__MAX_ALTERNATIVES", "0")]))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("coalescer.max_alternatives"), "{err}");
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
