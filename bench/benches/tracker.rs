//! Dirty tracking, per tracker: the cost of the first write to a page after a commit (the fault
//! the tracker takes, including the private copy of the page), and the commit-time `collect`
//! with one dirty page as the resident heap grows from 64 MiB to 4 GiB. The mapping is what the
//! heap uses: MAP_PRIVATE of a file on the benchmark directory's file system.

use criterion::{criterion_group, criterion_main, Criterion};
use fams::tracker::{self, TrackerKind, PAGE_SIZE};
use fams_bench::Target;
use std::time::{Duration, Instant};

struct Mapping {
    base: *mut u8,
    len: usize,
    /// Unmapped on drop (after the tracker, which is dropped first).
    _map: memmap2::MmapMut,
}

impl Mapping {
    fn new(t: &Target, len: usize) -> Mapping {
        let path = t.dir.join("tracker-bench.map");
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("map file");
        file.set_len(len as u64).expect("size map file");
        let _ = std::fs::remove_file(&path);
        // SAFETY: a private (copy-on-write) mapping of a file this bench made and already
        // unlinked: no one else can change it under the mapping.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.expect("mmap");
        map.advise(memmap2::Advice::NoHugePage).expect("madvise");
        let m = Mapping { base: map.as_mut_ptr(), len, _map: map };
        // Make every page resident (a private copy), as a heap in use would be.
        for p in 0..len / PAGE_SIZE {
            m.write(p, 1);
        }
        m
    }

    fn write(&self, page: usize, v: u8) {
        assert!(page < self.len / PAGE_SIZE);
        // The address is computed without unsafe; the write below needs it in bounds.
        let byte = self.base.wrapping_add(page * PAGE_SIZE + 8);
        // SAFETY: page < len / PAGE_SIZE (asserted), so the byte lies inside the live mapping.
        unsafe { byte.write_volatile(v) };
    }
}

fn kinds() -> Vec<TrackerKind> {
    match tracker::uffd_available() {
        Ok(()) => vec![TrackerKind::Uffd, TrackerKind::Regions, TrackerKind::Mprotect],
        Err(why) => {
            eprintln!("uffd and regions trackers not benchmarked: {why}");
            vec![TrackerKind::Mprotect]
        }
    }
}

fn trackers(c: &mut Criterion) {
    let t = Target::from_env();
    let mut g = c.benchmark_group("tracker");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for kind in kinds() {
        // First write to a page after a commit: write N distinct pages, time only the writes.
        let m = Mapping::new(&t, 64 << 20);
        // SAFETY: `m` is this benchmark's own mapping; the tracker is dropped before it.
        let mut trk = unsafe { tracker::arm(Some(kind), m.base, m.len) }.expect("arm");
        let mut out = Vec::new();
        let pages = m.len / PAGE_SIZE;
        let mut next = 0usize;
        g.bench_function(format!("first-write/{}", kind.name()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let batch = (iters - done).min(1024);
                    out.clear();
                    trk.collect(&mut out).expect("collect");
                    let start = Instant::now();
                    for _ in 0..batch {
                        m.write(next % pages, (done % 251) as u8);
                        next += 7;
                    }
                    total += start.elapsed();
                    done += batch;
                }
                total
            })
        });
        drop(trk);
        drop(m);

        // Commit-time collect with one dirty page, vs resident heap size.
        for mib in [64usize, 256, 1024, 4096] {
            let m = Mapping::new(&t, mib << 20);
            // SAFETY: `m` is this benchmark's own mapping; the tracker is dropped before it.
            let mut trk = unsafe { tracker::arm(Some(kind), m.base, m.len) }.expect("arm");
            let mut out = Vec::new();
            trk.collect(&mut out).expect("collect");
            g.bench_function(format!("collect-1-dirty/{}/{mib}MiB", kind.name()), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        m.write((i as usize * 13) % 64, i as u8);
                        out.clear();
                        let start = Instant::now();
                        trk.collect(&mut out).expect("collect");
                        total += start.elapsed();
                        assert_eq!(out.len(), 1);
                    }
                    total
                })
            });
        }
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&t.dir);
}

criterion_group!(benches, trackers);
criterion_main!(benches);
