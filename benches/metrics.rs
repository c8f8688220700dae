//! What metrics cost on the ingest path (issue 3: < 3 % of ingest throughput).
//!
//! `ingest_batch` is the work the binary server does per batch of 1024 heartbeats:
//! `Engine::submit` (coalescer upserts, which count outcomes in per-shard counters, and
//! the log append) followed by the per-batch metric updates. `metric_updates` is the
//! metric work alone for the same batch: 1024 per-shard counter increments (what the
//! coalescer does per upsert, a plain add under the shard lock it already holds), plus the
//! per-batch atomic counter and histogram observation of the server. The ratio of the two
//! is the metric share of ingest (BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::ingest::metrics::IngestMetrics;
use playhead::model::{Key, Record, Value};
use playhead::store::EmbeddedStore;
use playhead::telemetry::metrics::Histogram;

const BATCH: usize = 1024;
const KEYS: u64 = 1 << 20;

#[derive(Default, Clone, Copy)]
struct ShardCounters {
    inserted: u64,
    superseded: u64,
    stale: u64,
}

fn metrics(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.coalescer.max_keys = 4 * KEYS as usize;
    config.wal.max_buffer_bytes = 1 << 30;
    let store = Arc::new(EmbeddedStore::open(&config.embedded_store_dir(), 8 << 20).unwrap());
    let (engine, _) = Engine::open(config, store).unwrap();
    let http = IngestMetrics::default();
    let latency = Histogram::default();

    let mut group = c.benchmark_group("metrics_share");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(5));
    let mut round = 0u64;
    group.bench_function("ingest_batch", |b| {
        b.iter(|| {
            round += 1;
            let base = (round * BATCH as u64) % KEYS;
            let records: [Record; BATCH] = std::array::from_fn(|i| {
                let k = base + i as u64;
                Record::new(
                    Key::new(k / 4, k % 4, 7),
                    Value::new(1, 1_700_000_000_000 + round, 1),
                )
            });
            let started = Instant::now();
            let pending = engine.submit(&records).unwrap();
            let _ = black_box(pending);
            http.accepted("binary", BATCH as u64);
            latency.observe(started.elapsed());
        })
    });
    let mut shards = [ShardCounters::default(); 64];
    group.bench_function("metric_updates", |b| {
        b.iter(|| {
            let started = Instant::now();
            for i in 0..BATCH {
                let shard = &mut shards[black_box(i) & 63];
                match black_box(i % 3) {
                    0 => shard.inserted += 1,
                    1 => shard.superseded += 1,
                    _ => shard.stale += 1,
                }
            }
            http.accepted("binary", BATCH as u64);
            latency.observe(started.elapsed());
            black_box(&shards);
        })
    });
    group.finish();
    // The log keeps growing during the bench; a flush keeps the run bounded.
    drop(engine);
}

criterion_group!(benches, metrics);
criterion_main!(benches);
