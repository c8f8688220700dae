//! The Cassandra / ScyllaDB store: the scale-out path (docs/cassandra.md), on the `scylla`
//! driver.
//!
//! Table (one per keyspace; [`table_cql`]):
//! ```text
//! positions ((account_id bigint, profile_id bigint), title_id varint, versions set<blob>,
//!            alternative blob)
//! ```
//! One partition per profile, so continue-watching is one partition read; `title_id` is a
//! `varint` so the clustering order is the unsigned order of our u64 title ids.
//!
//! ## Last-write-wins without read-before-write
//! Every write is `UPDATE … USING TIMESTAMP <updated_at_ms × 1000> AND TTL <ttl> SET
//! versions = {<v>}` where `<v>` is the 16-byte big-endian `(updated_at_ms, device_id,
//! position_seconds)` — byte order equals [`Value::version`] order. Overwriting a set writes
//! a collection tombstone at `timestamp − 1` plus the one element at `timestamp`. So after
//! any writes in any order, the set holds exactly the elements whose timestamp is the
//! largest written (older ones are shadowed by that tombstone) — that is, every version
//! written in the newest millisecond — and reads take the largest element. The answer is
//! our order, exactly, whatever the arrival order and whatever the server's rule for cells
//! of equal timestamp (which, for cells with a TTL, compares expiry before value and so
//! would follow arrival time). Deletes are the same write with a tombstone value.
//!
//! ## Alternatives
//! `alternative` holds a row's alternative ([`crate::resume::alternative`]) as a 16-byte
//! version like `versions`' elements, written by the same statement at the same timestamp
//! when the flushed row has one, and left *unset* (untouched) when it has none, so the last
//! alternative written survives later writes of the same device. A tombstone writes itself
//! there, so no alternative from before a deletion is offered after it. Without a read
//! before the write this is not the exact merge the embedded store does: when the node
//! writing a key never saw the stored value it superseded (the key had left its memory),
//! the stored value is not made the alternative. Reads keep it only while it qualifies
//! (older than the value, another device). A table created before alternatives gets the
//! column at start ([`migration_cql`], docs/cassandra.md).
//!
//! ## Write path
//! A batch is grouped by partition; a partition's rows go out as one UNLOGGED batch of up
//! to `max_batch_rows` (a single row as a plain statement), and partitions are written
//! concurrently, token-aware (the driver routes each request to a replica of its
//! partition), at most `max_in_flight` requests at once for the whole store.
//!
//! ## Failure
//! Every request passes a [`CircuitBreaker`], one for writes and one for reads, so slow or
//! failing reads cannot stop flushes and a write backlog cannot degrade reads. When the
//! cluster keeps failing, requests fail at once (reads degrade, flushes keep their data in
//! memory and the commit log and retry) and one probe at a time checks for recovery; the
//! probe runs in a task of its own, so a caller that gives up cannot cancel it
//! ([`breaker::run`]). A request its caller stopped waiting for is counted as cancelled,
//! not as a failure.

pub mod config;
mod metrics;

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::ExecutionError;
use scylla::observability::history::HistoryListener;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::PagingState;
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlVarint;
use tokio::sync::Semaphore;

use super::breaker::{self, BreakerState, CircuitBreaker};
use super::{MostRecent, RecentTitles, Store, StoreError, StoredRow, TitleEntry};
use crate::config::Config;
use crate::model::{Key, Record, Value};
use crate::resume::alternative::{self, Summary};
use crate::telemetry::metrics::{DescriptorEncoder, Encoded};
use config::{CassandraStoreConfig, ConsistencyLevel, ReplicationStrategy};
use metrics::{CancelGuard, CassandraMetrics, InFlight, Op, RetryCounter, BREAKERS, OPS};
use scylla::value::MaybeUnset;

/// The table every statement names.
pub const TABLE: &str = "positions";

/// Bytes of one element of `versions`.
pub const VERSION_BYTES: usize = 16;

// ---------------------------------------------------------------------------------------
// Schema and statements: plain functions of the configuration, unit-tested as text.
// ---------------------------------------------------------------------------------------

/// `CREATE KEYSPACE IF NOT EXISTS …` for the configured replication.
pub fn keyspace_cql(c: &CassandraStoreConfig) -> String {
    let replication = match c.replication {
        ReplicationStrategy::SimpleStrategy => format!(
            "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
            c.replication_factor
        ),
        ReplicationStrategy::NetworkTopologyStrategy => {
            let mut s = String::from("{'class': 'NetworkTopologyStrategy'");
            if c.datacenter_replication.is_empty() {
                let _ = write!(s, ", '{}': {}", c.local_datacenter, c.replication_factor);
            }
            for (dc, factor) in &c.datacenter_replication {
                let _ = write!(s, ", '{dc}': {factor}");
            }
            s.push('}');
            s
        }
    };
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {replication} AND durable_writes = true",
        c.keyspace
    )
}

/// `CREATE TABLE IF NOT EXISTS <keyspace>.positions …`.
pub fn table_cql(keyspace: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {keyspace}.{TABLE} (\n\
         \x20   account_id bigint,\n\
         \x20   profile_id bigint,\n\
         \x20   title_id varint,\n\
         \x20   versions set<blob>,\n\
         \x20   alternative blob,\n\
         \x20   PRIMARY KEY ((account_id, profile_id), title_id)\n\
         ) WITH CLUSTERING ORDER BY (title_id ASC)\n\
         \x20 AND compaction = {{'class': 'SizeTieredCompactionStrategy'}}\n\
         \x20 AND comment = 'Playhead resume positions; versions holds 16-byte big-endian (updated_at_ms, device_id, position_seconds), the largest wins; docs/cassandra.md'"
    )
}

/// The schema a DBA applies (what `playhead schema` prints), with the migration of a table
/// created before alternatives as a comment.
pub fn schema_cql(c: &CassandraStoreConfig) -> String {
    format!(
        "{};\n\n{};\n\n-- A table created before alternatives (docs/cassandra.md):\n-- {};\n",
        keyspace_cql(c),
        table_cql(&c.keyspace),
        migration_cql(&c.keyspace)
    )
}

/// Adds `alternative` to a table created before it (run at start when the column is
/// missing, [`alternative_column_cql`]).
pub fn migration_cql(keyspace: &str) -> String {
    format!("ALTER TABLE {keyspace}.{TABLE} ADD alternative blob")
}

/// Whether the table has `alternative`: one row when it does. Bind: keyspace.
pub fn alternative_column_cql() -> String {
    format!(
        "SELECT column_name FROM system_schema.columns \
         WHERE keyspace_name = ? AND table_name = '{TABLE}' AND column_name = 'alternative'"
    )
}

/// The upsert: bind order timestamp, ttl, versions, alternative (or unset), account_id,
/// profile_id, title_id.
pub fn upsert_cql(keyspace: &str) -> String {
    format!(
        "UPDATE {keyspace}.{TABLE} USING TIMESTAMP ? AND TTL ? SET versions = ?, alternative = ? \
         WHERE account_id = ? AND profile_id = ? AND title_id = ?"
    )
}

/// One key's versions and alternative.
pub fn get_cql(keyspace: &str) -> String {
    format!(
        "SELECT versions, alternative FROM {keyspace}.{TABLE} \
         WHERE account_id = ? AND profile_id = ? AND title_id = ?"
    )
}

/// Every title of one profile (one partition), read in pages of [`LIST_PAGE_ROWS`].
pub fn list_cql(keyspace: &str) -> String {
    format!(
        "SELECT title_id, versions FROM {keyspace}.{TABLE} \
         WHERE account_id = ? AND profile_id = ?"
    )
}

/// Rows per page of a profile listing: a profile of a few hundred titles is one round trip,
/// and a page (~60 bytes a row with its one or two versions) stays well under the driver's
/// frame limits whatever the profile's size.
pub const LIST_PAGE_ROWS: i32 = 1_000;

// ---------------------------------------------------------------------------------------
// Conversions.
// ---------------------------------------------------------------------------------------

/// The write timestamp of `value`: `updated_at` in microseconds. Order-preserving (never
/// decreasing in [`Value::version`]), which is all the set-overwrite scheme needs; values of
/// the same millisecond share it and are told apart by the element bytes.
pub fn write_timestamp_micros(value: &Value) -> i64 {
    i64::try_from(value.updated_at_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000)
}

/// The TTL bound into each write, clamped to what CQL's `int` and Cassandra accept.
pub fn ttl_for_cql(ttl_seconds: u64) -> i32 {
    ttl_seconds.clamp(1, config::MAX_CASSANDRA_TTL_SECONDS) as i32
}

/// Big-endian `(updated_at_ms, device_id, position_seconds)`: unsigned byte order equals
/// [`Value::version`] order, so the largest element of a set is the newest version.
pub fn encode_version(value: &Value) -> [u8; VERSION_BYTES] {
    let mut out = [0u8; VERSION_BYTES];
    out[0..8].copy_from_slice(&value.updated_at_ms.to_be_bytes());
    out[8..12].copy_from_slice(&value.device_id.to_be_bytes());
    out[12..16].copy_from_slice(&value.position_seconds.to_be_bytes());
    out
}

/// Inverse of [`encode_version`]; `None` when `bytes` has the wrong length.
pub fn decode_version(bytes: &[u8]) -> Option<Value> {
    let bytes: &[u8; VERSION_BYTES] = bytes.try_into().ok()?;
    Some(Value::new(
        u32::from_be_bytes(bytes[12..16].try_into().ok()?),
        u64::from_be_bytes(bytes[0..8].try_into().ok()?),
        u32::from_be_bytes(bytes[8..12].try_into().ok()?),
    ))
}

/// The newest of a row's versions. Malformed elements are skipped (and counted in the
/// error), so one bad element cannot hide a good one.
pub fn newest_version<'a>(
    elements: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<Value>, String> {
    let mut newest: Option<Value> = None;
    let mut malformed = 0usize;
    for e in elements {
        match decode_version(e) {
            Some(v) if newest.is_none_or(|n| v.supersedes(&n)) => newest = Some(v),
            Some(_) => {}
            None => malformed += 1,
        }
    }
    match (newest, malformed) {
        (None, n) if n > 0 => Err(format!(
            "{n} element(s) of `versions`, none of {VERSION_BYTES} bytes"
        )),
        (newest, _) => Ok(newest),
    }
}

/// A u64 id as the bigint column holds it: the same 64 bits, two's complement.
pub fn id_to_bigint(id: u64) -> i64 {
    id as i64
}

/// A u64 as a minimal CQL varint (two's complement big-endian, non-negative).
pub fn u64_to_varint(id: u64) -> CqlVarint {
    let bytes = id.to_be_bytes();
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(7);
    let mut out = Vec::with_capacity(9);
    if bytes[first] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&bytes[first..]);
    CqlVarint::from_signed_bytes_be(out)
}

/// Inverse of [`u64_to_varint`]; `None` for negative or too-large values.
pub fn varint_to_u64(v: &CqlVarint) -> Option<u64> {
    let bytes = v.as_signed_bytes_be_slice();
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let significant = &bytes[bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len())..];
    if significant.len() > 8 {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[8 - significant.len()..].copy_from_slice(significant);
    Some(u64::from_be_bytes(buf))
}

/// The datacenter the driver routes requests to: `local_datacenter`, except with a
/// SimpleStrategy keyspace, which places replicas without regard to datacenters (one-DC
/// development and test clusters): the driver warns on every request that combines it with
/// a DC preference (`Combining SimpleStrategy with DC preference …`), and the preference
/// buys nothing there.
pub fn preferred_datacenter(c: &CassandraStoreConfig) -> Option<&str> {
    match c.replication {
        ReplicationStrategy::SimpleStrategy => None,
        ReplicationStrategy::NetworkTopologyStrategy => Some(&c.local_datacenter),
    }
}

fn consistency(level: ConsistencyLevel) -> Consistency {
    match level {
        ConsistencyLevel::Any => Consistency::Any,
        ConsistencyLevel::One => Consistency::One,
        ConsistencyLevel::Two => Consistency::Two,
        ConsistencyLevel::Three => Consistency::Three,
        ConsistencyLevel::Quorum => Consistency::Quorum,
        ConsistencyLevel::All => Consistency::All,
        ConsistencyLevel::LocalQuorum => Consistency::LocalQuorum,
        ConsistencyLevel::EachQuorum => Consistency::EachQuorum,
        ConsistencyLevel::LocalOne => Consistency::LocalOne,
    }
}

/// Splits `records` into per-partition groups of at most `max_rows`, each group sorted by
/// title. Every record lands in exactly one group; no group mixes two profiles.
pub fn group_by_partition(records: &[StoredRow], max_rows: usize) -> Vec<Vec<StoredRow>> {
    assert!(max_rows >= 1);
    let mut sorted = records.to_vec();
    sorted.sort_unstable_by_key(|r| r.key);
    let mut groups = Vec::new();
    for partition in sorted.chunk_by(|a, b| {
        (a.key.account_id, a.key.profile_id) == (b.key.account_id, b.key.profile_id)
    }) {
        groups.extend(partition.chunks(max_rows).map(<[StoredRow]>::to_vec));
    }
    groups
}

// ---------------------------------------------------------------------------------------
// The store.
// ---------------------------------------------------------------------------------------

/// Cheap-to-clone handle on one driver session and its prepared statements.
#[derive(Clone)]
pub struct CassandraStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    upsert: PreparedStatement,
    get: PreparedStatement,
    list: PreparedStatement,
    write_consistency: Consistency,
    ttl: i32,
    max_batch_rows: usize,
    max_in_flight: usize,
    /// Bounds requests outstanding across every concurrent caller (flush tasks, reads).
    in_flight: Arc<Semaphore>,
    /// Indexed by [`Op::breaker`]: writes, reads.
    breakers: [Arc<CircuitBreaker>; 2],
    metrics: CassandraMetrics,
    history: Arc<RetryCounter>,
}

fn unavailable(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("cassandra: {context}: {e}"))
}

impl CassandraStore {
    /// Connects to the cluster, creates the schema when `store.cassandra.create_schema` is
    /// set, and prepares the statements. Fails when no contact point answers or the table
    /// does not exist (run `playhead schema` and apply it, or set create_schema).
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        let c = &config.store.cassandra;
        let mut policy = DefaultPolicy::builder()
            .token_aware(true)
            .permit_dc_failover(false);
        if let Some(dc) = preferred_datacenter(c) {
            policy = policy.prefer_datacenter(dc.to_string());
        }
        let policy = policy.build();
        let profile = ExecutionProfile::builder()
            .consistency(consistency(c.read_consistency))
            .request_timeout(Some(Duration::from_millis(c.request_timeout_ms)))
            .load_balancing_policy(policy)
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&c.contact_points)
            .connection_timeout(Duration::from_millis(c.connect_timeout_ms))
            .default_execution_profile_handle(profile.into_handle());
        if !c.username.is_empty() {
            builder = builder.user(&c.username, &c.password);
        }
        let session = builder.build().await.map_err(|e| {
            unavailable(&format!("connecting to {}", c.contact_points.join(", ")), e)
        })?;
        if c.create_schema {
            for statement in [keyspace_cql(c), table_cql(&c.keyspace)] {
                session
                    .query_unpaged(statement.as_str(), ())
                    .await
                    .map_err(|e| unavailable("creating the schema", e))?;
            }
            add_alternative_column(&session, &c.keyspace).await?;
            session
                .await_schema_agreement()
                .await
                .map_err(|e| unavailable("waiting for schema agreement", e))?;
        }
        let metrics = CassandraMetrics::default();
        let history = Arc::new(RetryCounter {
            retries: Arc::clone(&metrics.driver_retries),
            next_id: AtomicU64::new(0),
        });
        let prepare = |cql: String, level: ConsistencyLevel| {
            let session = &session;
            let history = Arc::clone(&history);
            async move {
                let mut statement = session.prepare(cql.as_str()).await.map_err(|e| {
                    unavailable(
                        &format!(
                            "preparing `{cql}` (is the schema applied? see `playhead schema`)"
                        ),
                        e,
                    )
                })?;
                statement.set_consistency(consistency(level));
                // Every statement is idempotent: a write carries its own timestamp, so
                // the driver may retry it (and a replay changes nothing).
                statement.set_is_idempotent(true);
                statement.set_history_listener(history);
                Ok::<_, StoreError>(statement)
            }
        };
        let upsert = prepare(upsert_cql(&c.keyspace), c.write_consistency).await?;
        let get = prepare(get_cql(&c.keyspace), c.read_consistency).await?;
        let mut list = prepare(list_cql(&c.keyspace), c.read_consistency).await?;
        list.set_page_size(LIST_PAGE_ROWS);
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                upsert,
                get,
                list,
                write_consistency: consistency(c.write_consistency),
                ttl: ttl_for_cql(config.cassandra_ttl_seconds()),
                max_batch_rows: c.max_batch_rows,
                max_in_flight: c.max_in_flight,
                in_flight: Arc::new(Semaphore::new(c.max_in_flight)),
                breakers: [(); 2].map(|()| {
                    CircuitBreaker::new(
                        c.breaker_failure_threshold,
                        Duration::from_millis(c.breaker_open_ms),
                    )
                }),
                metrics,
                history,
            }),
        })
    }

    /// The write breaker's and the read breaker's current states.
    pub fn breaker_states(&self) -> (BreakerState, BreakerState) {
        (
            self.inner.breakers[0].state(),
            self.inner.breakers[1].state(),
        )
    }
}

/// Adds `alternative` to a table created before it, once: the column is looked up first,
/// so a start with the column does nothing (and a concurrent start that added it first
/// is no error either).
async fn add_alternative_column(session: &Session, keyspace: &str) -> Result<(), StoreError> {
    let has_column = || async {
        let found = session
            .query_unpaged(alternative_column_cql(), (keyspace,))
            .await
            .map_err(|e| unavailable("reading the table's columns", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading the table's columns", e))?
            .rows_num();
        Ok::<bool, StoreError>(found > 0)
    };
    if has_column().await? {
        return Ok(());
    }
    let added = session
        .query_unpaged(migration_cql(keyspace).as_str(), ())
        .await;
    match added {
        Ok(_) => {
            tracing::info!(keyspace, "added the `alternative` column to {TABLE}");
            Ok(())
        }
        Err(_) if has_column().await? => Ok(()),
        Err(e) => Err(unavailable("adding the `alternative` column", e)),
    }
}

/// The values of one upsert, in [`upsert_cql`]'s bind order.
type UpsertRow = (
    i64,
    i32,
    Vec<Vec<u8>>,
    MaybeUnset<Vec<u8>>,
    i64,
    i64,
    CqlVarint,
);

/// What a row writes to `alternative`: its alternative, a tombstone itself (so nothing
/// from before a deletion is offered after it), or nothing (unset: the cell keeps what an
/// earlier write put there).
pub fn alternative_cell(row: &StoredRow) -> Option<[u8; VERSION_BYTES]> {
    if row.value.is_tombstone() {
        return Some(encode_version(&row.value));
    }
    row.alternative.as_ref().map(encode_version)
}

/// A row read back: the newest version and the `alternative` cell while it qualifies
/// (older than the value, another device: [`alternative::merge`] drops it otherwise).
pub fn read_row(key: Key, value: Value, alternative_cell: Option<&[u8]>) -> StoredRow {
    let cell = alternative_cell.and_then(decode_version);
    let summary = alternative::merge(
        Summary::single(value),
        Summary {
            value,
            alternative: cell,
        },
    );
    StoredRow {
        key,
        value,
        alternative: summary.alternative,
    }
}

impl Inner {
    fn upsert_row(&self, r: &StoredRow) -> UpsertRow {
        let alternative = match alternative_cell(r) {
            Some(bytes) => MaybeUnset::Set(bytes.to_vec()),
            None => MaybeUnset::Unset,
        };
        (
            write_timestamp_micros(&r.value),
            self.ttl,
            vec![encode_version(&r.value).to_vec()],
            alternative,
            id_to_bigint(r.key.account_id),
            id_to_bigint(r.key.profile_id),
            u64_to_varint(r.key.title_id),
        )
    }

    /// Runs one request through the in-flight bound, its breaker and the metrics. `run`
    /// owns what it needs (`'static`) because a half-open probe runs as a task of its own
    /// and finishes even when this call is dropped.
    async fn request<T, F>(self: &Arc<Self>, op: Op, run: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, ExecutionError>> + Send + 'static,
        T: Send + 'static,
    {
        let m = &self.metrics;
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|e| unavailable("in-flight limit", e))?;
        let which = op.breaker();
        let ticket = self.breakers[which].acquire().await.map_err(|refused| {
            m.breaker_refused[which].fetch_add(1, Ordering::Relaxed);
            StoreError::Unavailable(format!("cassandra: {} {refused}", BREAKERS[which]))
        })?;
        m.requests[op as usize].fetch_add(1, Ordering::Relaxed);
        let inner = Arc::clone(self);
        let measured = async move {
            let _permit = permit;
            let m = &inner.metrics;
            let started = Instant::now();
            let result = {
                // Decrements on drop too: a read the engine stops waiting for ends here.
                let _in_flight = InFlight::enter(&m.in_flight);
                run.await
            };
            m.latency[op as usize].observe(started.elapsed());
            if let Err(e) = &result {
                m.errors[op as usize].fetch_add(1, Ordering::Relaxed);
                if matches!(e, ExecutionError::RequestTimeout(_)) {
                    m.timeouts[op as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            result
        };
        let cancelled = CancelGuard(Some(&m.cancelled[op as usize]));
        let result = breaker::run(ticket, measured).await;
        cancelled.disarm();
        match result {
            Some(Ok(value)) => Ok(value),
            Some(Err(ExecutionError::RequestTimeout(d))) => {
                Err(StoreError::Timeout(d.as_millis() as u64))
            }
            Some(Err(e)) => Err(unavailable(OPS[op as usize], e)),
            None => Err(unavailable(OPS[op as usize], "runtime shutting down")),
        }
    }

    /// Writes one partition's rows: a plain statement for one row, an UNLOGGED batch for
    /// more (one partition, so one replica set applies it atomically and cheaply).
    async fn write_partition(self: &Arc<Self>, rows: &[StoredRow]) -> Result<(), StoreError> {
        debug_assert!(!rows.is_empty() && rows.len() <= self.max_batch_rows);
        let inner = Arc::clone(self);
        if let [row] = rows {
            let values = self.upsert_row(row);
            self.request(Op::Write, async move {
                inner.session.execute_unpaged(&inner.upsert, values).await
            })
            .await?;
        } else {
            let mut batch = Batch::new_with_statements(
                BatchType::Unlogged,
                vec![BatchStatement::PreparedStatement(self.upsert.clone()); rows.len()],
            );
            batch.set_consistency(self.write_consistency);
            batch.set_is_idempotent(true);
            batch.set_history_listener(Arc::clone(&self.history) as Arc<dyn HistoryListener>);
            let values: Vec<UpsertRow> = rows.iter().map(|r| self.upsert_row(r)).collect();
            self.request(Op::Write, async move {
                inner.session.batch(&batch, values).await
            })
            .await?;
        }
        self.metrics
            .rows_written
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// One partition of a [`Store::write_batch`]: skipped once another partition of the batch
/// failed (the batch is retried whole anyway), else written to its answer.
async fn write_unless_failed(
    inner: Arc<Inner>,
    rows: Vec<StoredRow>,
    failed: Arc<AtomicBool>,
) -> Result<(), StoreError> {
    if failed.load(Ordering::Relaxed) {
        return Ok(());
    }
    let result = inner.write_partition(&rows).await;
    if result.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    result
}

#[async_trait]
impl Store for CassandraStore {
    fn name(&self) -> &'static str {
        "cassandra"
    }

    /// Partitions are written concurrently. After the first failure no new request starts,
    /// but those in flight run to their answer (never dropped midway: a dropped request
    /// tells nobody anything, and a dropped probe would leave the breaker undecided); the
    /// call returns the first error and the flusher retries the whole batch, which is
    /// harmless: every write carries its own timestamp.
    async fn write_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        let rows: Vec<StoredRow> = records.iter().copied().map(StoredRow::plain).collect();
        self.write_rows(&rows).await
    }

    /// [`Store::write_batch`] with each row's alternative (module docs, "Alternatives").
    async fn write_rows(&self, records: &[StoredRow]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let groups = group_by_partition(records, inner.max_batch_rows);
        let failed = Arc::new(AtomicBool::new(false));
        let writes: Vec<_> = groups
            .into_iter()
            .map(|rows| write_unless_failed(Arc::clone(inner), rows, Arc::clone(&failed)))
            .collect();
        let mut answers = stream::iter(writes).buffer_unordered(inner.max_in_flight);
        let mut first_error = None;
        while let Some(answer) = answers.next().await {
            if let Err(e) = answer {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError> {
        Ok(self.get_row(key).await?.map(|row| row.value))
    }

    async fn get_row(&self, key: Key) -> Result<Option<StoredRow>, StoreError> {
        let inner = Arc::clone(&self.inner);
        let values = (
            id_to_bigint(key.account_id),
            id_to_bigint(key.profile_id),
            u64_to_varint(key.title_id),
        );
        let result = self
            .inner
            .request(Op::Get, async move {
                inner.session.execute_unpaged(&inner.get, values).await
            })
            .await?;
        let rows = result
            .into_rows_result()
            .map_err(|e| unavailable("reading a row", e))?;
        let row = rows
            .maybe_first_row::<(Option<Vec<&[u8]>>, Option<&[u8]>)>()
            .map_err(|e| StoreError::Corrupt {
                key: Some(key),
                detail: e.to_string(),
            })?;
        let Some((Some(elements), cell)) = row else {
            return Ok(None);
        };
        let newest = newest_version(elements).map_err(|detail| StoreError::Corrupt {
            key: Some(key),
            detail,
        })?;
        Ok(newest.map(|value| read_row(key, value, cell)))
    }

    async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<RecentTitles, StoreError> {
        let values = (id_to_bigint(account_id), id_to_bigint(profile_id));
        let mut recent = MostRecent::new(limit);
        let mut paging = PagingState::start();
        // The whole partition, page by page, each page one request through the breaker:
        // the most recent titles may be anywhere in title order.
        loop {
            let inner = Arc::clone(&self.inner);
            let state = paging.clone();
            let (result, next) = self
                .inner
                .request(Op::List, async move {
                    inner
                        .session
                        .execute_single_page(&inner.list, values, state)
                        .await
                })
                .await?;
            let rows = result
                .into_rows_result()
                .map_err(|e| unavailable("listing a profile", e))?;
            let typed = rows
                .rows::<(CqlVarint, Option<Vec<&[u8]>>)>()
                .map_err(|e| StoreError::Corrupt {
                    key: None,
                    detail: e.to_string(),
                })?;
            for row in typed {
                let (title, elements) = row.map_err(|e| StoreError::Corrupt {
                    key: None,
                    detail: e.to_string(),
                })?;
                let Some(title_id) = varint_to_u64(&title) else {
                    tracing::warn!(?title, "skipping a row whose title_id is not a u64");
                    continue;
                };
                match newest_version(elements.unwrap_or_default()) {
                    Ok(Some(value)) => recent.offer(TitleEntry { title_id, value }),
                    Ok(None) => {}
                    Err(detail) => {
                        // Skip one malformed row rather than hide the whole profile.
                        tracing::warn!(account_id, profile_id, title_id, "{detail}");
                    }
                }
            }
            match next.into_paging_control_flow() {
                ControlFlow::Break(()) => break,
                ControlFlow::Continue(state) => paging = state,
            }
        }
        Ok(recent.finish())
    }

    /// Rows expire by their TTL; there is nothing to purge.
    async fn purge_older_than(&self, _cutoff_ms: u64) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder<'_>) -> Encoded {
        self.inner.metrics.encode(&self.inner.breakers, encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CassandraStoreConfig {
        CassandraStoreConfig::default()
    }

    #[test]
    fn keyspace_cql_follows_replication_settings() {
        let mut c = config();
        assert_eq!(
            keyspace_cql(&c),
            "CREATE KEYSPACE IF NOT EXISTS playhead WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'datacenter1': 3} AND durable_writes = true"
        );
        c.datacenter_replication = [("eu".to_string(), 3), ("us".to_string(), 2)].into();
        assert!(keyspace_cql(&c).contains("{'class': 'NetworkTopologyStrategy', 'eu': 3, 'us': 2}"));
        c.datacenter_replication.clear();
        c.replication = ReplicationStrategy::SimpleStrategy;
        c.replication_factor = 1;
        c.keyspace = "playhead_test".into();
        assert_eq!(
            keyspace_cql(&c),
            "CREATE KEYSPACE IF NOT EXISTS playhead_test WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1} AND durable_writes = true"
        );
    }

    #[test]
    fn table_and_statements_name_the_keyspace_and_bind_in_order() {
        let table = table_cql("ks");
        assert!(table.starts_with("CREATE TABLE IF NOT EXISTS ks.positions (\n"));
        assert!(table.contains("    title_id varint,\n"));
        assert!(table.contains("    versions set<blob>,\n"));
        assert!(table.contains("    alternative blob,\n"));
        assert_eq!(
            migration_cql("ks"),
            "ALTER TABLE ks.positions ADD alternative blob"
        );
        assert!(table.contains("PRIMARY KEY ((account_id, profile_id), title_id)"));
        assert_eq!(
            upsert_cql("ks"),
            "UPDATE ks.positions USING TIMESTAMP ? AND TTL ? SET versions = ?, alternative = ? \
             WHERE account_id = ? AND profile_id = ? AND title_id = ?"
        );
        assert_eq!(
            get_cql("ks"),
            "SELECT versions, alternative FROM ks.positions WHERE account_id = ? AND profile_id = ? AND title_id = ?"
        );
        assert!(list_cql("ks").ends_with("WHERE account_id = ? AND profile_id = ?"));
        let schema = schema_cql(&config());
        assert_eq!(schema.matches(";\n").count(), 3, "{schema}");
        assert!(schema.ends_with(" ADD alternative blob;\n"), "{schema}");
    }

    #[test]
    fn timestamps_are_microseconds_and_ttl_is_clamped() {
        let v = Value::new(10, 1_760_000_000_123, 4);
        assert_eq!(write_timestamp_micros(&v), 1_760_000_000_123_000);
        assert_eq!(
            write_timestamp_micros(&Value::tombstone(u64::MAX)),
            i64::MAX
        );
        assert_eq!(ttl_for_cql(180 * 86_400), 15_552_000);
        assert_eq!(ttl_for_cql(0), 1);
        assert_eq!(ttl_for_cql(u64::MAX), 630_720_000);
    }

    #[test]
    fn version_bytes_order_equals_version_order() {
        let values = [
            Value::new(u32::MAX - 1, 0, 0),
            Value::new(0, 1, 0),
            Value::new(5, 1_000, 1),
            Value::new(6, 1_000, 1),
            Value::new(0, 1_000, 2),
            Value::new(0, 1_000, u32::MAX - 1),
            Value::tombstone(1_000),
            Value::new(0, 1_001, 0),
            Value::tombstone(u64::MAX),
        ];
        for a in &values {
            assert_eq!(decode_version(&encode_version(a)), Some(*a));
            for b in &values {
                assert_eq!(
                    encode_version(a).cmp(&encode_version(b)),
                    a.version().cmp(&b.version()),
                    "{a:?} vs {b:?}"
                );
                // The write timestamp never contradicts the order.
                if a.supersedes(b) {
                    assert!(write_timestamp_micros(a) >= write_timestamp_micros(b));
                }
            }
        }
        assert_eq!(decode_version(&[0; 15]), None);
    }

    #[test]
    fn newest_version_picks_the_largest_and_skips_malformed() {
        let a = encode_version(&Value::new(40, 1_001, 2));
        let b = encode_version(&Value::new(41, 1_001, 2));
        let t = encode_version(&Value::tombstone(1_001));
        assert_eq!(
            newest_version([&a[..], &b[..]]),
            Ok(Some(Value::new(41, 1_001, 2)))
        );
        assert_eq!(
            newest_version([&t[..], &b[..], &[1u8, 2][..]]),
            Ok(Some(Value::tombstone(1_001)))
        );
        assert_eq!(newest_version(std::iter::empty()), Ok(None));
        assert!(newest_version([&[0u8; 3][..]]).is_err());
    }

    #[test]
    fn ids_round_trip_and_varints_are_minimal() {
        for id in [0u64, 1, 127, 128, 255, 256, 1 << 63, u64::MAX - 1, u64::MAX] {
            let v = u64_to_varint(id);
            assert_eq!(varint_to_u64(&v), Some(id), "{id}");
            assert_eq!(id_to_bigint(id) as u64, id);
        }
        assert_eq!(u64_to_varint(0).as_signed_bytes_be_slice(), &[0]);
        assert_eq!(u64_to_varint(127).as_signed_bytes_be_slice(), &[127]);
        assert_eq!(u64_to_varint(128).as_signed_bytes_be_slice(), &[0, 128]);
        assert_eq!(u64_to_varint(u64::MAX).as_signed_bytes_be_slice().len(), 9);
        assert_eq!(
            varint_to_u64(&CqlVarint::from_signed_bytes_be(vec![0xff])),
            None
        );
        assert_eq!(
            varint_to_u64(&CqlVarint::from_signed_bytes_be(vec![1; 9])),
            None
        );
        assert_eq!(
            varint_to_u64(&CqlVarint::from_signed_bytes_be(vec![0, 0, 5])),
            Some(5)
        );
    }

    /// What `alternative` is written and read back as (the exact merge needs a read; the
    /// column keeps the last one written, and a read keeps it only while it qualifies).
    #[test]
    fn the_alternative_cell_is_written_when_known_and_read_while_it_qualifies() {
        let key = Key::new(1, 1, 1);
        let (phone, tv) = (Value::new(2_843, 1_000, 1), Value::new(8, 9_000, 2));
        let row = |value, alternative| StoredRow {
            key,
            value,
            alternative,
        };
        assert_eq!(
            alternative_cell(&row(tv, Some(phone))),
            Some(encode_version(&phone))
        );
        assert_eq!(
            alternative_cell(&row(tv, None)),
            None,
            "unset: the cell stays"
        );
        let deleted = Value::tombstone(10_000);
        assert_eq!(
            alternative_cell(&row(deleted, Some(phone))),
            Some(encode_version(&deleted))
        );
        let cell = encode_version(&phone);
        assert_eq!(read_row(key, tv, Some(&cell)).alternative, Some(phone));
        // The phone wrote again since: its own old position is no alternative.
        let phone_again = Value::new(2_900, 12_000, 1);
        assert_eq!(read_row(key, phone_again, Some(&cell)).alternative, None);
        assert_eq!(read_row(key, tv, None).alternative, None);
        let tomb = encode_version(&deleted);
        let after = read_row(key, Value::new(4, 11_000, 2), Some(&tomb));
        assert_eq!(after.alternative, Some(deleted), "a blocker, never offered");
    }

    #[test]
    fn batches_group_one_partition_each_and_respect_the_row_limit() {
        let v = Value::new(1, 1, 1);
        let mut records = Vec::new();
        for title in 0..5 {
            records.push(Record::new(Key::new(1, 1, title), v));
        }
        records.push(Record::new(Key::new(1, 2, 0), v));
        records.push(Record::new(Key::new(2, 1, 0), v));
        records.push(Record::new(Key::new(1, 1, 9), v));
        records.reverse();
        let records: Vec<StoredRow> = records.into_iter().map(StoredRow::plain).collect();
        let groups = group_by_partition(&records, 2);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 2, 1, 1]);
        let mut seen = 0;
        for g in &groups {
            let p = (g[0].key.account_id, g[0].key.profile_id);
            assert!(g.iter().all(|r| (r.key.account_id, r.key.profile_id) == p));
            seen += g.len();
        }
        assert_eq!(seen, records.len());
        assert_eq!(group_by_partition(&records, 100).len(), 3);
        assert!(group_by_partition(&[], 4).is_empty());
    }

    #[test]
    fn requests_prefer_the_local_datacenter_unless_the_keyspace_ignores_datacenters() {
        let mut c = config();
        c.local_datacenter = "eu".into();
        assert_eq!(preferred_datacenter(&c), Some("eu"));
        c.replication = ReplicationStrategy::SimpleStrategy;
        assert_eq!(preferred_datacenter(&c), None);
    }

    #[test]
    fn consistency_levels_map_one_to_one() {
        assert_eq!(
            consistency(ConsistencyLevel::LocalQuorum),
            Consistency::LocalQuorum
        );
        assert_eq!(
            consistency(ConsistencyLevel::LocalOne),
            Consistency::LocalOne
        );
        assert_eq!(
            consistency(ConsistencyLevel::EachQuorum),
            Consistency::EachQuorum
        );
    }
}
