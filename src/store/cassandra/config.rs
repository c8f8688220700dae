//! The `[store.cassandra]` section: the Cassandra / ScyllaDB store (docs/cassandra.md).

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

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

impl CassandraStoreConfig {
    /// Range checks that types alone cannot express; `retention_days` is `store.retention_days`,
    /// which sets the row TTL when `ttl_seconds` is 0.
    pub fn validate(&self, retention_days: u64) -> Result<(), ConfigError> {
        let c = self;
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
            retention_days,
            c.ttl_seconds != 0
                || retention_days.saturating_mul(86_400) <= MAX_CASSANDRA_TTL_SECONDS,
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

    /// The TTL rows are written with: `ttl_seconds`, or `retention_days` when it is 0.
    pub fn ttl_seconds_for(&self, retention_days: u64) -> u64 {
        match self.ttl_seconds {
            0 => retention_days.saturating_mul(86_400),
            ttl => ttl,
        }
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
