//! Commit-log append per sync mode and replay speed.
//! Target (DESIGN): replay >= 5 M records/s.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use playhead::config::SyncMode;
use playhead::engine::wal::{Wal, WalOptions};
use playhead::model::{Key, Record, Value};

fn options(dir: &std::path::Path, mode: SyncMode) -> WalOptions {
    WalOptions {
        dir: dir.to_path_buf(),
        sync_mode: mode,
        sync_interval_ms: 10,
        segment_bytes: 64 << 20,
        max_buffer_bytes: 256 << 20,
    }
}

fn batch(n: usize, salt: u64) -> Vec<Record> {
    (0..n as u64)
        .map(|i| Record::new(Key::new(salt, i % 5, i), Value::new(i as u32, salt + i, 1)))
        .collect()
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for &batch_records in &[1usize, 1_000] {
        let records = batch(batch_records, 7);
        group.throughput(Throughput::Elements(batch_records as u64));
        for mode in [SyncMode::Periodic, SyncMode::Group] {
            let dir = tempfile::tempdir().unwrap();
            let (wal, _) = Wal::open(options(dir.path(), mode), |_| {}).unwrap();
            let id = BenchmarkId::new(format!("{mode:?}").to_lowercase(), batch_records);
            group.bench_function(id, |b| {
                b.iter(|| {
                    // Periodic acknowledges on append; group after the covering fsync.
                    loop {
                        match wal.append(&records) {
                            Ok(lsn) => {
                                if mode == SyncMode::Group {
                                    runtime.block_on(wal.wait_durable(lsn)).unwrap();
                                }
                                break black_box(lsn);
                            }
                            Err(_) => std::thread::yield_now(),
                        }
                    }
                })
            });
            wal.close();
        }
    }
    group.finish();
}

fn replay(c: &mut Criterion) {
    const RECORDS: usize = 2_000_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _) = Wal::open(options(dir.path(), SyncMode::Periodic), |_| {}).unwrap();
        for chunk in 0..(RECORDS / 1_000) {
            let records = batch(1_000, chunk as u64 * 1_000);
            while wal.append(&records).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        wal.close();
    }
    let mut group = c.benchmark_group("wal_replay");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("2M_records_decode_only", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let copy = tempfile::tempdir().unwrap();
                for e in std::fs::read_dir(dir.path()).unwrap() {
                    let e = e.unwrap();
                    std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
                }
                let started = Instant::now();
                let mut seen = 0usize;
                let (wal, report) = Wal::open(options(copy.path(), SyncMode::Periodic), |rs| {
                    seen += rs.len()
                })
                .unwrap();
                total += started.elapsed();
                assert_eq!(seen, RECORDS);
                assert_eq!(report.records as usize, RECORDS);
                wal.close();
            }
            total
        })
    });
    group.bench_function("2M_records_into_coalescer_2_threads", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let copy = tempfile::tempdir().unwrap();
                for e in std::fs::read_dir(dir.path()).unwrap() {
                    let e = e.unwrap();
                    std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
                }
                let coalescer = playhead::engine::coalescer::Coalescer::new(64, 4_000_000);
                let started = Instant::now();
                // As the engine replays: chunks of 256 k records applied on 2 threads.
                let mut pending = Vec::with_capacity(262_144);
                let (wal, _) = Wal::open(options(copy.path(), SyncMode::Periodic), |rs| {
                    pending.extend_from_slice(rs);
                    if pending.len() >= 262_144 {
                        coalescer.replay_parallel(&pending, 2);
                        pending.clear();
                    }
                })
                .unwrap();
                coalescer.replay_parallel(&pending, 2);
                total += started.elapsed();
                wal.close();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, append, replay);
criterion_main!(benches);
