//! Flush of 1 M dirty keys from the coalescer to the embedded fjall store, through the
//! real engine (rotate, pick, batches, LWW read-compare-write, durable commit).
//! Target (issue 2): <= 1.5 s.
//!
//! Each case runs with the store's default reads (`adaptive`: key-ordered batches,
//! merge-joins) and with the earlier path (`point`: hash-ordered batches, one point read per
//! row) as its A/B peer. Alternate them in one session, e.g.
//! `for i in 1 2 3; do target/release/deps/flush-* --bench point; … --bench adaptive; done`.
//!
//! - `empty_store`: the 1 M keys are new to the store.
//! - `rewrite`: the store already holds the 1 M keys (one untimed flush); the timed flush
//!   rewrites every key, half with newer values (kept) and half with older ones (dropped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::model::{Key, Record, Value};
use playhead::store::{EmbeddedStore, LwwReads};

const KEYS: u64 = 1_000_000;
const BASE_MS: u64 = 1_700_000_000_000;

fn records(at_ms: impl Fn(u64) -> u64) -> Vec<Record> {
    (0..KEYS)
        .map(|i| Record::new(Key::new(i / 4, i % 4, i), Value::new(60, at_ms(i), 1)))
        .collect()
}

/// One timed flush of `timed` into a fresh store that first flushed `untimed` (if any).
fn flush_once(
    runtime: &tokio::runtime::Runtime,
    reads: LwwReads,
    untimed: Option<&[Record]>,
    timed: &[Record],
) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.coalescer.max_keys = 2 * KEYS as usize;
    let store = EmbeddedStore::open_with_reads(&config.embedded_store_dir(), 64 << 20, reads);
    let (engine, _) = Engine::open(config, Arc::new(store.unwrap())).unwrap();
    runtime.block_on(async {
        if let Some(untimed) = untimed {
            for chunk in untimed.chunks(10_000) {
                engine.write(chunk).await.unwrap();
            }
            engine.flush().await.unwrap();
        }
        for chunk in timed.chunks(10_000) {
            engine.write(chunk).await.unwrap();
        }
        let started = Instant::now();
        let report = engine.flush().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(report.rows, timed.len());
        engine.shutdown(None).await;
        elapsed
    })
}

fn flush(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("flush_to_fjall");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(KEYS));
    let first = records(|_| BASE_MS);
    let rewrite = records(|i| if i % 2 == 0 { BASE_MS + 1 } else { BASE_MS - 1 });
    for (reads, name) in [(LwwReads::Adaptive, "adaptive"), (LwwReads::Point, "point")] {
        group.bench_function(format!("1M_dirty_keys/empty_store/{name}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| flush_once(&runtime, reads, None, &first))
                    .sum()
            })
        });
        group.bench_function(format!("1M_dirty_keys/rewrite/{name}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| flush_once(&runtime, reads, Some(&first), &rewrite))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
