//! Runs the one store conformance suite (`tests/conformance/mod.rs`) against every store:
//! the embedded fjall store always, the same store behind the fault-injecting decorator with
//! faults off (it must be transparent), and Cassandra when `PLAYHEAD_TEST_CASSANDRA` is set.

mod conformance;

use std::sync::Arc;

use conformance::Subject;
use playhead::store::{EmbeddedStore, FaultyStore};

async fn embedded() -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 8 << 20).unwrap();
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

conformance_suite!(embedded_store, embedded());
conformance_suite!(faulty_store_passthrough, faulty_embedded());
