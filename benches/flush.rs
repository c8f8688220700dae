//! Flush of 1 M dirty keys from the coalescer to the embedded fjall store, through the
//! real engine (rotate, freeze, batches, LWW read-compare-write, durable commit).
//! Target (issue 2): <= 1.5 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::model::{Key, Record, Value};
use playhead::store::EmbeddedStore;

const KEYS: u64 = 1_000_000;

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
    group.bench_function("1M_dirty_keys", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for it in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let mut config = Config::default();
                config.server.data_dir = dir.path().to_path_buf();
                config.coalescer.max_keys = 2 * KEYS as usize;
                let store =
                    Arc::new(EmbeddedStore::open(&config.embedded_store_dir(), 64 << 20).unwrap());
                let (engine, _) = Engine::open(config, store).unwrap();
                let at = 1_700_000_000_000 + it;
                let records: Vec<Record> = (0..KEYS)
                    .map(|i| Record::new(Key::new(i / 4, i % 4, i), Value::new(60, at, 1)))
                    .collect();
                runtime.block_on(async {
                    for chunk in records.chunks(10_000) {
                        engine.write(chunk).await.unwrap();
                    }
                    let started = Instant::now();
                    let report = engine.flush().await.unwrap();
                    total += started.elapsed();
                    assert_eq!(report.rows, KEYS as usize);
                    engine.shutdown(None).await;
                });
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
