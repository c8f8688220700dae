//! Property: the embedded store's merge-join reads (`LwwReads::MergeJoin`, and the default
//! `Adaptive` that falls back to point reads for sparse runs) leave exactly the rows the
//! point-read path (`LwwReads::Point`) leaves, and both equal last-write-wins over the stored
//! rows and the batch — for any mix of keys that are absent, stored older, stored newer,
//! stored equal, and tombstones on either side.
//!
//! Keys are drawn from a small space (so batches hit stored rows) that spans several
//! profiles, and batches are sparse or dense against the stored rows, so `Adaptive` takes
//! both its merge-join and its fallback.

use std::collections::BTreeMap;

use proptest::prelude::*;

use playhead::model::{Key, Record, Value};
use playhead::store::{EmbeddedStore, LwwReads, Store};

const BASE_MS: u64 = 1_760_000_000_000;

/// A key from a small space: 2 accounts × 2 profiles × 256 titles.
fn key() -> impl Strategy<Value = Key> {
    (0u64..2, 0u64..2, 0u64..256).prop_map(|(a, p, t)| Key::new(a, p, t))
}

/// A value from a narrow time window (so stored and incoming versions often tie on the
/// timestamp and fall to device and position), a tombstone one time in five.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u32..3, 0u64..4, 0u32..3).prop_map(|(p, at, d)| Value::new(p, BASE_MS + at, d)),
        1 => (0u64..4).prop_map(|at| Value::tombstone(BASE_MS + at)),
    ]
}

/// Distinct keys with a value each (`write_batch` takes distinct keys).
fn rows(max: usize) -> impl Strategy<Value = BTreeMap<Key, Value>> {
    prop::collection::btree_map(key(), value(), 0..max)
}

fn records(rows: &BTreeMap<Key, Value>) -> Vec<Record> {
    // Reverse key order: the store must sort a batch itself.
    rows.iter()
        .rev()
        .map(|(k, v)| Record::new(*k, *v))
        .collect()
}

/// Writes `stored` in `chunks` batches, then `batch`, into a fresh store reading with
/// `reads`, and returns what the store holds for every key of either.
fn run(
    reads: LwwReads,
    stored: &BTreeMap<Key, Value>,
    chunks: usize,
    batch: &BTreeMap<Key, Value>,
) -> BTreeMap<Key, Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with_reads(dir.path(), 1 << 20, reads).unwrap();
    runtime.block_on(async {
        let stored_records = records(stored);
        for chunk in stored_records.chunks(stored_records.len().div_ceil(chunks).max(1)) {
            store.write_batch(chunk).await.unwrap();
        }
        store.write_batch(&records(batch)).await.unwrap();
        let mut held = BTreeMap::new();
        for key in stored.keys().chain(batch.keys()) {
            if let Some(value) = store.get(*key).await.unwrap() {
                held.insert(*key, value);
            }
        }
        held
    })
}

/// Last-write-wins over the stored rows and the batch, by the model's own order.
fn expected(stored: &BTreeMap<Key, Value>, batch: &BTreeMap<Key, Value>) -> BTreeMap<Key, Value> {
    let mut out = stored.clone();
    for (key, value) in batch {
        match out.get(key) {
            Some(current) if !value.supersedes(current) => {}
            _ => {
                out.insert(*key, *value);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merge_join_matches_point_reads(
        stored in rows(600),
        chunks in 1usize..4,
        batch in prop_oneof![rows(8), rows(600)],
    ) {
        let want = expected(&stored, &batch);
        let point = run(LwwReads::Point, &stored, chunks, &batch);
        prop_assert_eq!(&point, &want, "point reads");
        let merge = run(LwwReads::MergeJoin, &stored, chunks, &batch);
        prop_assert_eq!(&merge, &want, "merge-join");
        let adaptive = run(LwwReads::Adaptive, &stored, chunks, &batch);
        prop_assert_eq!(&adaptive, &want, "adaptive");
    }
}
