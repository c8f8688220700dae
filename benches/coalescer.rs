//! Coalescer upsert throughput: 1 M distinct keys, random order, on 1 and 2 threads.
//! Target (DESIGN): >= 20 M upserts/s on one thread. Also prints bytes per live key.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use playhead::engine::coalescer::{Checkpoint, Coalescer, Pick};
use playhead::model::{Key, Record, Value};

const KEYS: u64 = 1_000_000;

/// 1 M keys shaped like production: 250 k accounts x 2 profiles x 2 titles, shuffled.
fn records(seed: u64, at: u64) -> Vec<Record> {
    let mut out: Vec<Record> = (0..KEYS)
        .map(|i| {
            let key = Key::new(i / 4, (i / 2) % 2, 1_000 + i % 2);
            Record::new(key, Value::new((i % 7_200) as u32, at + i % 1_000, 1))
        })
        .collect();
    out.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    out
}

/// The ingest path's form: `records` upserted in batches of 1024.
fn upsert_in_batches_of_1024(coalescer: &Coalescer, records: &[Record]) {
    for chunk in records.chunks(1024) {
        black_box(coalescer.upsert_batch(chunk).unwrap());
    }
}

fn upsert(c: &mut Criterion) {
    let mut group = c.benchmark_group("coalescer_upsert");
    group.throughput(Throughput::Elements(KEYS));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    let coalescer = Coalescer::new(64, 4 * KEYS as usize);
    // Half of the keys present (steady state: updates and inserts both happen).
    let mut generation = 1_700_000_000_000u64;
    for r in records(1, generation).iter().take(KEYS as usize / 2) {
        coalescer.upsert(r).unwrap();
    }
    let batches: Vec<Vec<Record>> = (0..4)
        .map(|g| {
            generation += 10_000;
            records(g + 2, generation)
        })
        .collect();
    let mut round = 0;
    group.bench_function("1_thread_1M_keys", |b| {
        b.iter(|| {
            let batch = &batches[round % batches.len()];
            round += 1;
            for r in batch {
                black_box(coalescer.upsert(r).unwrap());
            }
        })
    });

    // The ingest path's form: batches of 1024.
    group.bench_function("1_thread_1M_keys_batches_of_1024", |b| {
        b.iter(|| {
            upsert_in_batches_of_1024(&coalescer, &batches[round % batches.len()]);
            round += 1;
        })
    });

    // One flush interval's ingest-side work when every key is rewritten each interval (as
    // `playhead-loadgen max` does): 1 M upserts, then the flush's pick of every dirty key
    // and its mark-stored pass (the store write itself is benches/flush.rs).
    let cycling = Coalescer::new(64, 4 * KEYS as usize);
    let pick_all = Pick {
        idle_before: 0,
        all: true,
        checkpoint: Checkpoint {
            period_ms: 0,
            from_ms: 0,
            to_ms: 0,
        },
        max_rows: usize::MAX,
    };
    group.bench_function("1M_keys_then_pick_and_mark_stored", |b| {
        b.iter(|| {
            upsert_in_batches_of_1024(&cycling, &batches[round % batches.len()]);
            round += 1;
            cycling.advance_epoch();
            let picked = cycling.pick(&pick_all);
            cycling.mark_stored(&picked);
        })
    });

    let shared = Arc::new(Coalescer::new(64, 4 * KEYS as usize));
    let halves: Arc<Vec<Vec<Record>>> = Arc::new(batches);
    group.bench_function("2_threads_1M_keys", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for it in 0..iters {
                let threads: Vec<_> = (0..2usize)
                    .map(|t| {
                        let c = Arc::clone(&shared);
                        let all = Arc::clone(&halves);
                        std::thread::spawn(move || {
                            let batch = &all[it as usize % all.len()];
                            let half = batch.len() / 2;
                            for r in &batch[t * half..(t + 1) * half] {
                                black_box(c.upsert(r).unwrap());
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap();
                }
            }
            started.elapsed()
        })
    });
    group.finish();

    let live = coalescer.len();
    eprintln!(
        "memory: {} live keys, {} bytes allocated by the tables = {:.1} bytes/key",
        live,
        coalescer.allocated_bytes(),
        coalescer.allocated_bytes() as f64 / live as f64
    );
}

criterion_group!(benches, upsert);
criterion_main!(benches);
