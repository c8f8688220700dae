//! Property: for any stream of heartbeats and deletes, with flushes, key-aware flush cycles
//! (idle keys and checkpoints only: a random part of memory goes to the store, the rest
//! stays dirty while the log drops what is covered), clean restarts (the engine dropped
//! without flushing — its commit log written and fsynced on close — then reopened) and
//! crashes (`Engine::crash`: what a SIGKILL leaves — no final flush, no snapshot, no more
//! writes or fsyncs of the log; what the log's writer had not handed to write(2) is lost)
//! at random points, what the engine shows for every key equals the newest write to that
//! key that survived:
//! - in `group` mode every acknowledged write survives a crash (each was fsynced before
//!   its acknowledgement), so that is the newest acknowledged write;
//! - in `periodic` mode a crash loses exactly the writes appended after the last byte the
//!   writer had written (the position `Engine::crash` reports), unless a flush had already
//!   stored them: the engine then shows the newest of the surviving writes and the store.
//!
//! Against the real embedded store in a temporary directory.

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
    /// A SIGKILL: `Engine::crash`, then reopen.
    Crash,
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
        1 => Just(Op::Crash),
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

fn config(dir: &Path, mode: SyncMode) -> Config {
    let mut c = Config::default();
    c.server.data_dir = dir.to_path_buf();
    c.wal.sync_mode = mode;
    c.wal.sync_interval_ms = 5;
    c.wal.segment_bytes = 64 << 10;
    c.wal.snapshot_after_bytes = 128 << 10;
    c.coalescer.shards = 4;
    c.flush.batch_rows = 3;
    // Short enough that keys go idle and checkpoint windows pass between operations.
    c.flush.idle_ms = 5;
    c.flush.checkpoint_ms = 20;
    c
}

fn open(dir: &Path, mode: SyncMode) -> Engine {
    let c = config(dir, mode);
    let store = Arc::new(EmbeddedStore::open(&c.embedded_store_dir(), 1 << 20).unwrap());
    Engine::open(c, store).unwrap().0
}

fn newer(a: Option<Value>, b: Option<Value>) -> Option<Value> {
    match (a, b) {
        (Some(a), Some(b)) if b.supersedes(&a) => Some(b),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

/// What the writes so far leave: `durable` survives anything (it came back from the last
/// reopen); `pending` are this engine's writes since, each with the log position that
/// covers it.
#[derive(Default)]
struct Model {
    durable: HashMap<u8, Value>,
    pending: Vec<(u64, u8, Value)>,
}

impl Model {
    fn wrote(&mut self, engine: &Engine, written: &[(u8, Value)]) {
        let lsn = engine.appended_lsn();
        self.pending
            .extend(written.iter().map(|&(k, v)| (lsn, k, v)));
    }

    /// The newest write per key (what the engine must show while it runs).
    fn newest(&self, k: u8) -> Option<Value> {
        self.pending
            .iter()
            .filter(|p| p.1 == k)
            .fold(self.durable.get(&k).copied(), |n, p| newer(n, Some(p.2)))
    }

    /// A clean stop: everything appended is in the log.
    fn closed(&mut self) {
        for k in 0u8..12 {
            if let Some(v) = self.newest(k) {
                self.durable.insert(k, v);
            }
        }
        self.pending.clear();
    }

    /// A crash with the log written up to `written`, the store holding `stored`.
    fn crashed(&mut self, written: u64, stored: &[Option<Value>]) {
        self.pending.retain(|p| p.0 <= written);
        self.closed();
        for (k, &v) in stored.iter().enumerate() {
            let k = k as u8;
            if let Some(v) = newer(self.durable.get(&k).copied(), v) {
                self.durable.insert(k, v);
            }
        }
    }
}

/// Every key shows the model's newest value.
async fn check(engine: &Engine, model: &Model, when: &str) {
    for k in 0u8..12 {
        let expected = model.newest(k).filter(|v| !v.is_tombstone());
        let got = engine.get(key(k)).await;
        assert_eq!(
            got.value, expected,
            "key {k} {when} (read from {:?})",
            got.source
        );
    }
}

async fn run(ops: Vec<Op>, mode: SyncMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), mode);
    let mut model = Model::default();
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
                model.wrote(&engine, &[(k, r.value)]);
            }
            Op::Delete { key: k, at } => {
                let r = Record::new(key(k), Value::tombstone(BASE_MS + u64::from(at)));
                engine.write(&[r]).await.unwrap();
                model.wrote(&engine, &[(k, r.value)]);
            }
            Op::Batch(items) => {
                // One call carries distinct keys, like a protocol batch after dedup; a key
                // repeated in a batch is also legal, so keep the repeats.
                let records: Vec<Record> = items
                    .iter()
                    .map(|&(k, p, at, d)| heartbeat(k, p, at, d))
                    .collect();
                engine.write(&records).await.unwrap();
                let written: Vec<(u8, Value)> = records
                    .iter()
                    .zip(&items)
                    .map(|(r, &(k, ..))| (k, r.value))
                    .collect();
                model.wrote(&engine, &written);
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
                model.closed();
                engine = open(dir.path(), mode);
                check(&engine, &model, "after a restart").await;
            }
            Op::Crash => {
                let mut stored = Vec::new();
                for k in 0u8..12 {
                    stored.push(engine.get_stored(key(k)).await.unwrap());
                }
                let appended = engine.appended_lsn();
                let written = engine.crash();
                if mode == SyncMode::Group {
                    assert_eq!(
                        written, appended,
                        "group mode: every acknowledged write was written"
                    );
                }
                model.crashed(written, &stored);
                engine = open(dir.path(), mode);
                check(&engine, &model, "after a crash").await;
            }
        }
    }
    check(&engine, &model, "at the end").await;
    // And once everything is flushed and memory is empty, the store alone agrees.
    engine.flush().await.unwrap();
    drop(engine);
    model.closed();
    let engine = open(dir.path(), mode);
    engine.flush().await.unwrap();
    check(&engine, &model, "after flush").await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// `group` mode: acknowledged writes survive clean restarts and crashes alike.
    #[test]
    fn visible_state_is_the_newest_write_per_key(ops in prop::collection::vec(op(), 1..60)) {
        runtime().block_on(run(ops, SyncMode::Group));
    }

    /// `periodic` mode: a crash loses exactly what had not reached write(2), and nothing
    /// that a flush had stored.
    #[test]
    fn periodic_crashes_lose_exactly_the_unwritten_tail(ops in prop::collection::vec(op(), 1..60)) {
        runtime().block_on(run(ops, SyncMode::Periodic));
    }
}
