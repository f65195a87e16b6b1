//! Commit latency for 1, 16, 256 and 4096 dirty pages (one byte changed per page, and whole
//! pages), for each tracker, next to the device floor for the same log bytes and the baselines
//! doing the same durable 1-page update — all in one run, on the directory in FAMS_BENCH_DIR
//! (default /var/tmp) and, when FAMS_BENCH_LOG_DEVICE names a block device, with the log on it.

use criterion::{criterion_group, criterion_main, Criterion};
use fams::io::FlushMode;
use fams_bench::*;
use std::time::Duration;

/// Criterion drives the iteration count; each sample is the measured latency sum.
fn per_iter(samples: &Samples, iters: u64) -> Duration {
    Duration::from_secs_f64(samples.mean() * iters as f64 / 1e6)
}

fn commits(c: &mut Criterion) {
    let t = Target::from_env();
    let mut g = c.benchmark_group("commit");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let trackers: Vec<_> = match fams::tracker::uffd_available() {
        Ok(()) => vec![fams::TrackerKind::Uffd, fams::TrackerKind::Regions, fams::TrackerKind::Mprotect],
        Err(_) => vec![fams::TrackerKind::Mprotect],
    };
    for tracker in trackers {
        for pages in [1usize, 16, 256, 4096] {
            for whole in [false, true] {
                let name = format!("{}/{pages}p/{}", tracker.name(), if whole { "whole" } else { "1byte" });
                let mut log_bytes = 0.0;
                g.bench_function(&name, |b| {
                    b.iter_custom(|iters| {
                        let r = fams_commit(&t, pages, whole, iters.max(2) as usize, Some(tracker), 64 << 20)
                            .expect("commit bench");
                        log_bytes = r.log_bytes_per_commit;
                        per_iter(&r.samples, iters)
                    })
                });
                g.bench_function(
                    format!("floor-dsync/for-{}/{pages}p/{}", tracker.name(), if whole { "whole" } else { "1byte" }),
                    |b| {
                        b.iter_custom(|iters| {
                            let s =
                                floor_write_flush(&t, (log_bytes as usize).max(4096), iters as usize, FlushMode::Dsync)
                                    .expect("floor");
                            per_iter(&s, iters)
                        })
                    },
                );
                g.bench_function(
                    format!(
                        "floor-fdatasync/for-{}/{pages}p/{}",
                        tracker.name(),
                        if whole { "whole" } else { "1byte" }
                    ),
                    |b| {
                        b.iter_custom(|iters| {
                            let s = floor_write_flush(
                                &t,
                                (log_bytes as usize).max(4096),
                                iters as usize,
                                FlushMode::Fdatasync,
                            )
                            .expect("floor");
                            per_iter(&s, iters)
                        })
                    },
                );
            }
        }
    }
    #[cfg(feature = "baselines")]
    {
        g.bench_function("baseline/sqlite-wal-full/1p", |b| {
            b.iter_custom(|iters| per_iter(&sqlite_wal_full(&t.dir, iters as usize).expect("sqlite"), iters))
        });
        g.bench_function("baseline/lmdb/1p", |b| {
            b.iter_custom(|iters| per_iter(&lmdb(&t.dir, iters as usize).expect("lmdb"), iters))
        });
    }
    g.bench_function("baseline/ken-style/1p", |b| {
        b.iter_custom(|iters| per_iter(&ken_style(&t.dir, iters as usize).expect("ken"), iters))
    });
    g.bench_function("baseline/msync-not-atomic/1p", |b| {
        b.iter_custom(|iters| per_iter(&msync_shared(&t.dir, iters as usize).expect("msync"), iters))
    });
    g.finish();

    let mut g = c.benchmark_group("commit-rate");
    g.sample_size(10);
    g.bench_function("sync-vs-async/1p", |b| {
        b.iter_custom(|iters| {
            let (sync_rate, async_rate, _) = commit_rate(&t, (iters as usize).max(100), 64, None).expect("rate");
            eprintln!("commit rate: sync {sync_rate:.0}/s, async {async_rate:.0}/s ({:.1}x)", async_rate / sync_rate);
            Duration::from_secs_f64(iters as f64 / async_rate)
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&t.dir);
}

criterion_group!(benches, commits);
criterion_main!(benches);
