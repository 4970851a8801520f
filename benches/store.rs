//! Store write benchmarks: single puts and batches on memory and SQLite, and the B3 figure —
//! durable writes per second with 64 concurrent writers on SQLite (group commit).
//!
//! `cargo bench --bench store` prints criterion's figures and writes the concurrent-writer
//! summary to `target/bench/store.json`.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bootsync::store::memory::MemoryStore;
use bootsync::store::sqlite::{SqliteOptions, SqliteStore};
use bootsync::store::{Batch, DynStore, Key, Limits, StoreExt};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn stores(dir: &std::path::Path) -> Vec<(&'static str, DynStore)> {
    vec![
        (
            "memory",
            Arc::new(MemoryStore::new(Limits::default())) as DynStore,
        ),
        (
            "sqlite",
            Arc::new(SqliteStore::open(dir.join("bench.db"), SqliteOptions::default()).unwrap())
                as DynStore,
        ),
    ]
}

fn writes(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("store_write");
    group
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    for (name, store) in stores(dir.path()) {
        let mut n = 0u64;
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("single_put", name), |b| {
            b.to_async(&rt).iter(|| {
                n += 1;
                let store = store.clone();
                async move {
                    store
                        .put(
                            Key::new("bench", "single", format!("k{n}")),
                            json!({"n": n}),
                        )
                        .await
                        .unwrap()
                }
            })
        });
        group.throughput(Throughput::Elements(100));
        group.bench_function(BenchmarkId::new("batch_of_100", name), |b| {
            b.to_async(&rt).iter(|| {
                n += 1;
                let mut batch = Batch::new();
                for i in 0..100 {
                    batch = batch.put(Key::new("bench", "batch", format!("k{n}-{i}")), json!(i));
                }
                let store = store.clone();
                async move { store.apply(batch).await.unwrap() }
            })
        });
    }
    group.finish();
}

/// B3: 64 concurrent writers, one durable single-key put each at a time, for a fixed window.
fn concurrent_writers(_: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (name, store) in stores(dir.path()) {
        let writers = 64;
        let window = Duration::from_secs(5);
        let total = rt.block_on(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut done = 0u64;
                    while start.elapsed() < window {
                        store
                            .put(
                                Key::new("bench", "concurrent", format!("w{w}-{done}")),
                                json!(done),
                            )
                            .await
                            .unwrap();
                        done += 1;
                    }
                    done
                }));
            }
            let mut total = 0;
            for task in tasks {
                total += task.await.unwrap();
            }
            (total, start.elapsed())
        });
        let per_sec = total.0 as f64 / total.1.as_secs_f64();
        println!(
            "store_write/concurrent_64/{name}: {per_sec:.0} acknowledged writes/s ({} in {:.2?})",
            total.0, total.1
        );
        results.push(json!({"backend": name, "writers": writers, "writes": total.0, "seconds": total.1.as_secs_f64(), "writes_per_sec": per_sec}));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("store.json"),
        serde_json::to_string_pretty(&json!({"concurrent_writers": results})).unwrap(),
    )
    .unwrap();
}

criterion_group!(benches, writes, concurrent_writers);
criterion_main!(benches);
