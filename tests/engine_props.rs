//! Property: for any stream of heartbeats and deletes, with flushes, key-aware flush cycles
//! (idle keys and checkpoints only: a random part of memory goes to the store, the rest
//! stays dirty while the log drops what is covered) and restarts (the engine dropped
//! without flushing, then reopened from its commit log and store) at random points, what
//! the engine shows for every key equals the newest write to that key.
//!
//! Runs in `group` mode, where every acknowledged write is fsynced, against the real
//! embedded store in a temporary directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use playhead::config::{Config, SyncMode};
use playhead::engine::Engine;
use playhead::model::{Key, Record, Value};
use playhead::store::EmbeddedStore;

const BASE_MS: u64 = 1_760_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    Heartbeat {
        key: u8,
        position: u32,
        at: u16,
        device: u8,
    },
    Delete {
        key: u8,
        at: u16,
    },
    /// A batch of heartbeats written in one call.
    Batch(Vec<(u8, u32, u16, u8)>),
    Flush,
    /// One cycle of the background cadence: what is idle or due for a checkpoint.
    Cycle,
    /// Let a few milliseconds pass, so keys go idle and checkpoint windows move.
    Wait(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, 0u32..8_000, 0u16..60, 0u8..3).prop_map(|(key, position, at, device)| Op::Heartbeat { key, position, at, device }),
        1 => (0u8..12, 0u16..60).prop_map(|(key, at)| Op::Delete { key, at }),
        2 => prop::collection::vec((0u8..12, 0u32..8_000, 0u16..60, 0u8..3), 1..20).prop_map(Op::Batch),
        1 => Just(Op::Flush),
        2 => Just(Op::Cycle),
        1 => (1u8..8).prop_map(Op::Wait),
        1 => Just(Op::Restart),
    ]
}

fn key(k: u8) -> Key {
    // Keys spread over two accounts and two profiles, several titles each.
    Key::new(u64::from(k % 2), u64::from(k % 4 / 2), u64::from(k))
}

fn heartbeat(k: u8, position: u32, at: u16, device: u8) -> Record {
    Record::new(
        key(k),
        Value::new(position, BASE_MS + u64::from(at), u32::from(device)),
    )
}

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.data_dir = dir.to_path_buf();
    c.wal.sync_mode = SyncMode::Group;
    c.wal.segment_bytes = 64 << 10;
    c.wal.snapshot_after_bytes = 128 << 10;
    c.coalescer.shards = 4;
    c.flush.batch_rows = 3;
    // Short enough that keys go idle and checkpoint windows pass between operations.
    c.flush.idle_ms = 5;
    c.flush.checkpoint_ms = 20;
    c
}

fn open(dir: &Path) -> Engine {
    let c = config(dir);
    let store = Arc::new(EmbeddedStore::open(&c.embedded_store_dir(), 1 << 20).unwrap());
    Engine::open(c, store).unwrap().0
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path());
    let mut newest: HashMap<u8, Value> = HashMap::new();
    let mut remember = |r: &Record, k: u8| {
        let e = newest.entry(k).or_insert(r.value);
        if r.value.supersedes(e) {
            *e = r.value;
        }
    };
    for op in ops {
        match op {
            Op::Heartbeat {
                key: k,
                position,
                at,
                device,
            } => {
                let r = heartbeat(k, position, at, device);
                engine.write(&[r]).await.unwrap();
                remember(&r, k);
            }
            Op::Delete { key: k, at } => {
                let r = Record::new(key(k), Value::tombstone(BASE_MS + u64::from(at)));
                engine.write(&[r]).await.unwrap();
                remember(&r, k);
            }
            Op::Batch(items) => {
                // One call carries distinct keys, like a protocol batch after dedup; a key
                // repeated in a batch is also legal, so keep the repeats.
                let records: Vec<Record> = items
                    .iter()
                    .map(|&(k, p, at, d)| heartbeat(k, p, at, d))
                    .collect();
                engine.write(&records).await.unwrap();
                for (r, &(k, ..)) in records.iter().zip(&items) {
                    remember(r, k);
                }
            }
            Op::Flush => {
                engine.flush().await.unwrap();
            }
            Op::Cycle => {
                engine.flush_due().await.unwrap();
            }
            Op::Wait(ms) => {
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(ms))).await;
            }
            Op::Restart => {
                // No flush: whatever is not in the store must come back from the log.
                drop(engine);
                engine = open(dir.path());
            }
        }
    }
    for k in 0u8..12 {
        let expected = newest.get(&k).filter(|v| !v.is_tombstone()).copied();
        let got = engine.get(key(k)).await;
        assert_eq!(got.value, expected, "key {k} (read from {:?})", got.source);
    }
    // And once everything is flushed and memory is empty, the store alone agrees.
    engine.flush().await.unwrap();
    drop(engine);
    let engine = open(dir.path());
    engine.flush().await.unwrap();
    for k in 0u8..12 {
        let expected = newest.get(&k).filter(|v| !v.is_tombstone()).copied();
        assert_eq!(
            engine.get(key(k)).await.value,
            expected,
            "key {k} after flush"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn visible_state_is_the_newest_write_per_key(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}
