//! Turns, next to the floors they are judged against, in one run: ping-pong between two fams
//! nodes (two threads of this process on 127.0.0.1, real heaps, logs and UDP sockets) with 1 and
//! 16 dirty pages per turn, strict (one ping in flight: two durable turns and a UDP round trip per
//! round trip) and windowed (64 in flight: turns pipeline and share device writes); the floors —
//! one loopback UDP round trip, one 4 KiB write + flush on the heap's device, and the heap's own
//! `commit_async` rate with 64 in flight; and the Ken-style baseline (one fsynced end-of-turn file
//! plus a directory fsync per turn, before any output) with the same app shape.
//!
//! Every row is time per round trip (two turns) except the floors, which are per operation. The
//! targets: strict ≤ 1.5 × (2 × `floor/commit-4k` + `floor/udp-round-trip`); windowed ≥ 70 % of
//! `floor/commit-async-64` (a round trip is two commits) and ≥ 5 × Ken-style windowed.
//! Heaps and logs go in `FAMS_BENCH_DIR` (default /var/tmp). `famsd bench --turns` measures the
//! same with node processes and prints the ratios.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fams::io::FlushMode;
use fams_bench::turns::{ken_pingpong, pingpong, udp_round_trip};
use fams_bench::*;
use std::time::Duration;

/// Criterion drives the iteration count; each sample is the measured latency sum.
fn per_iter(samples: &Samples, iters: u64) -> Duration {
    Duration::from_secs_f64(samples.mean() * iters as f64 / 1e6)
}

/// Pings in flight in the windowed rows.
const WINDOW: u64 = 64;

fn turns(c: &mut Criterion) {
    let t = Target::from_env();
    let mut g = c.benchmark_group("turns");
    g.sample_size(10).measurement_time(Duration::from_secs(4));

    g.bench_function("floor/udp-round-trip", |b| {
        b.iter_custom(|iters| per_iter(&udp_round_trip(iters as usize).expect("UDP round trip"), iters))
    });
    g.bench_function("floor/commit-4k", |b| {
        b.iter_custom(|iters| {
            per_iter(&floor_write_flush(&t, 4096, iters.max(2) as usize, FlushMode::Dsync).expect("floor"), iters)
        })
    });
    g.bench_function("floor/commit-async-64", |b| {
        b.iter_custom(|iters| {
            let (_, async_per_s, _) = commit_rate(&t, iters.max(64) as usize, 64, None).expect("commit rate");
            Duration::from_secs_f64(iters as f64 / async_per_s)
        })
    });

    // Two turns per round trip.
    g.throughput(Throughput::Elements(2));
    for (window, pages) in [(1u64, 1usize), (1, 16), (WINDOW, 1), (WINDOW, 16)] {
        let name = if window == 1 { format!("fams/strict/{pages}p") } else { format!("fams/window-{window}/{pages}p") };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // At least a full window, so the windowed rows measure a pipeline, not a start-up.
                let round_trips = iters.max(window);
                let run = pingpong(&t.dir.join("turns"), round_trips, window, pages).expect("fams ping-pong");
                run.elapsed.mul_f64(iters as f64 / round_trips as f64)
            })
        });
    }
    for window in [1, WINDOW] {
        let name = if window == 1 { "ken-style/strict".to_string() } else { format!("ken-style/window-{window}") };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let round_trips = iters.max(window);
                let run = ken_pingpong(&t.dir.join("ken-turns"), window, round_trips).expect("Ken-style ping-pong");
                run.elapsed.mul_f64(iters as f64 / round_trips as f64)
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&t.dir);
}

criterion_group!(benches, turns);
criterion_main!(benches);
