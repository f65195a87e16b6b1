//! Recovery time vs log size (1, 16, 256 MiB of committed records) and vs heap size (the same
//! log, 1 GiB vs 8 GiB heap), next to the floor: reading the same bytes with O_DIRECT. Building
//! the crashed image is not timed (iter_custom times only the recovery inside Heap::open).

use criterion::{criterion_group, criterion_main, Criterion};
use fams_bench::*;
use std::time::Duration;

fn recoveries(c: &mut Criterion) {
    let t = Target::from_env();
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (log_mib, heap_bytes) in [(1u64, 1u64 << 30), (16, 1 << 30), (256, 1 << 30), (16, 8 << 30)] {
        let name = format!("{log_mib}MiB-log/{}GiB-heap", heap_bytes >> 30);
        let mut floor = Vec::new();
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = recovery(&t, log_mib, heap_bytes, None).expect("recovery bench");
                    floor.push(r.floor_ms);
                    total += Duration::from_secs_f64(r.ms / 1e3);
                }
                total
            })
        });
        let floor_ms = floor.iter().sum::<f64>() / floor.len().max(1) as f64;
        eprintln!("recovery {name}: O_DIRECT read floor for the same bytes {floor_ms:.1} ms (mean)");
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&t.dir);
}

criterion_group!(benches, recoveries);
criterion_main!(benches);
