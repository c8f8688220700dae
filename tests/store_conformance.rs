//! Runs the one store conformance suite (`tests/conformance/mod.rs`) against every store:
//! the embedded fjall store always, the same store behind the fault-injecting decorator with
//! faults off (it must be transparent), the embedded store with each of its non-default
//! read strategies (point reads only, merge-joins only), and Cassandra: those cases are
//! `#[ignore]`d and run with `PLAYHEAD_TEST_CASSANDRA=host:port cargo test --test
//! store_conformance cassandra -- --ignored`.

mod conformance;

use std::sync::Arc;

use conformance::Subject;
use playhead::config::{Config, ReplicationStrategy, StoreKind};
use playhead::store::{CassandraStore, EmbeddedStore, FaultyStore, LwwReads};

async fn embedded() -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 8 << 20).unwrap();
    Some(Subject {
        store: Arc::new(store),
        purges_rows: true,
        _guard: Box::new(dir),
    })
}

async fn embedded_reading(reads: LwwReads) -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with_reads(dir.path(), 8 << 20, reads).unwrap();
    Some(Subject {
        store: Arc::new(store),
        purges_rows: true,
        _guard: Box::new(dir),
    })
}

async fn faulty_embedded() -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(EmbeddedStore::open(dir.path(), 8 << 20).unwrap());
    Some(Subject {
        store: Arc::new(store),
        purges_rows: true,
        _guard: Box::new(dir),
    })
}

/// A Cassandra or ScyllaDB node named by `PLAYHEAD_TEST_CASSANDRA=host:port`, with the
/// keyspace `PLAYHEAD_TEST_CASSANDRA_KEYSPACE` (default `playhead_test`, created with
/// SimpleStrategy 1 if missing) in datacenter `PLAYHEAD_TEST_CASSANDRA_DC` (default
/// `datacenter1`). Every case uses fresh account ids, so runs share the keyspace. Rows
/// expire by TTL, so the purge case only checks that recent rows stay.
async fn cassandra() -> Option<Subject> {
    // Set but empty counts as unset (e.g. `PLAYHEAD_TEST_CASSANDRA= cargo test`). The
    // cases are `#[ignore]`d, so this runs only when asked for with `--ignored`: then a
    // missing node is a failure, never a silent pass.
    let addr = std::env::var("PLAYHEAD_TEST_CASSANDRA")
        .ok()
        .filter(|a| !a.is_empty())
        .expect(
            "the Cassandra conformance cases need PLAYHEAD_TEST_CASSANDRA=host:port naming a \
             Cassandra or ScyllaDB node",
        );
    let env_or = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
    let mut config = Config::default();
    config.store.kind = StoreKind::Cassandra;
    let c = &mut config.store.cassandra;
    c.contact_points = vec![addr.clone()];
    c.keyspace = env_or("PLAYHEAD_TEST_CASSANDRA_KEYSPACE", "playhead_test");
    c.local_datacenter = env_or("PLAYHEAD_TEST_CASSANDRA_DC", "datacenter1");
    c.replication = ReplicationStrategy::SimpleStrategy;
    c.replication_factor = 1;
    c.create_schema = true;
    c.request_timeout_ms = 20_000;
    config.validate().expect("test configuration is valid");
    let store = CassandraStore::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("PLAYHEAD_TEST_CASSANDRA={addr} is set but: {e}"));
    Some(Subject {
        store: Arc::new(store),
        purges_rows: false,
        _guard: Box::new(()),
    })
}

conformance_suite!(embedded_store, embedded());
conformance_suite!(
    embedded_store_point_reads,
    embedded_reading(LwwReads::Point)
);
conformance_suite!(
    embedded_store_merge_joins,
    embedded_reading(LwwReads::MergeJoin)
);
conformance_suite!(faulty_store_passthrough, faulty_embedded());
conformance_suite!(
    cassandra_store,
    cassandra(),
    #[ignore = "needs PLAYHEAD_TEST_CASSANDRA=host:port (docs/cassandra.md, How to run)"]
);
