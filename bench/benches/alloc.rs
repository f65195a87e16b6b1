//! The persistent allocator: allocations per second and pages dirtied per allocation, next to
//! the system allocator doing the same pattern in the same run.
//!
//! Patterns: `small-64B` (allocate 64-byte objects), `large-4000B` (allocate 4000-byte objects:
//! boundary-tag blocks), `mixed` (steady state of 4096 live objects; each step frees one and
//! allocates another of a random size from 16 B to 8 KiB). Each timed batch starts right after
//! a commit, so first-write faults of the pages the allocator touches are part of the cost, as
//! in a turn-based program. Pages dirtied per allocation are printed after the timings
//! ("pages/alloc"), from `Stats::pages_tracked` deltas over 10,000 operations, with and without
//! the program writing 8 bytes into each new object.
//!
//! On the directory in FAMS_BENCH_DIR (default /var/tmp).

use criterion::{criterion_group, criterion_main, Criterion};
use fams::alloc::{ObjectHeap, ObjectOptions};
use fams::{Heap, HeapOptions};
use fams_bench::Target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

const BATCH_MAX: u64 = 20_000;
const MIXED_LIVE: usize = 4096;

#[derive(Clone, Copy, Debug)]
enum Pattern {
    Small,
    Large,
    Mixed,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Small => "small-64B",
            Pattern::Large => "large-4000B",
            Pattern::Mixed => "mixed-16B-8KiB",
        }
    }
}

/// A tiny deterministic generator for the mixed pattern's sizes.
struct Lcg(u64);
impl Lcg {
    fn size(&mut self) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        16 + ((self.0 >> 33) % 8177) as usize
    }
}

/// Allocation and freeing, either through the heap or the system allocator.
trait Allocs {
    fn alloc(&mut self, l: Layout) -> NonNull<u8>;
    fn free(&mut self, p: NonNull<u8>, l: Layout);
    fn commit(&mut self) {}
}

impl Allocs for ObjectHeap {
    fn alloc(&mut self, l: Layout) -> NonNull<u8> {
        ObjectHeap::alloc(self, l, false).expect("heap large enough for the benchmark")
    }
    fn free(&mut self, p: NonNull<u8>, l: Layout) {
        // SAFETY: allocated by alloc with l, freed once.
        unsafe { self.dealloc(p, l) }
    }
    fn commit(&mut self) {
        ObjectHeap::commit(self).expect("commit");
    }
}

struct Sys;
impl Allocs for Sys {
    fn alloc(&mut self, l: Layout) -> NonNull<u8> {
        // SAFETY: l has a nonzero size.
        NonNull::new(unsafe { System.alloc(l) }).expect("system allocation")
    }
    fn free(&mut self, p: NonNull<u8>, l: Layout) {
        // SAFETY: allocated by System.alloc with l, freed once.
        unsafe { System.dealloc(p.as_ptr(), l) }
    }
}

/// Time `iters` operations of `pattern`; returns the time spent in timed batches only.
fn run(a: &mut dyn Allocs, pattern: Pattern, iters: u64, touch: bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut rng = Lcg(iters);
    while left > 0 {
        let n = left.min(BATCH_MAX);
        left -= n;
        match pattern {
            Pattern::Small | Pattern::Large => {
                let l = if matches!(pattern, Pattern::Small) {
                    Layout::from_size_align(64, 8).unwrap()
                } else {
                    Layout::from_size_align(4000, 8).unwrap()
                };
                let mut v = Vec::with_capacity(n as usize);
                a.commit();
                let t = Instant::now();
                for _ in 0..n {
                    let p = a.alloc(l);
                    if touch {
                        // SAFETY: a fresh allocation of at least 8 bytes.
                        unsafe { p.as_ptr().cast::<u64>().write_unaligned(1) };
                    }
                    v.push(p);
                }
                total += t.elapsed();
                for p in v {
                    a.free(p, l);
                }
            }
            Pattern::Mixed => {
                let mut live: Vec<(NonNull<u8>, Layout)> = (0..MIXED_LIVE)
                    .map(|_| {
                        let l = Layout::from_size_align(rng.size(), 8).unwrap();
                        (a.alloc(l), l)
                    })
                    .collect();
                a.commit();
                let t = Instant::now();
                for i in 0..n as usize {
                    let slot = &mut live[(i * 2654435761) % MIXED_LIVE];
                    a.free(slot.0, slot.1);
                    let l = Layout::from_size_align(rng.size(), 8).unwrap();
                    let p = a.alloc(l);
                    if touch {
                        // SAFETY: a fresh allocation of at least 16 bytes.
                        unsafe { p.as_ptr().cast::<u64>().write_unaligned(1) };
                    }
                    *slot = (p, l);
                }
                total += t.elapsed();
                for (p, l) in live {
                    a.free(p, l);
                }
            }
        }
    }
    total
}

fn open_heap(t: &Target) -> ObjectHeap {
    let path = t.format_heap("alloc-bench.heap", 1 << 30, 256 << 20).expect("format");
    let heap = Heap::open(&path, &HeapOptions::default()).expect("open");
    ObjectHeap::open(heap, &ObjectOptions::default()).expect("objects")
}

/// Pages dirtied per operation: commit, run `ops` operations (untimed), commit, read the delta.
fn pages_per_op(o: &mut ObjectHeap, pattern: Pattern, touch: bool) -> f64 {
    const OPS: u64 = 10_000;
    o.commit().unwrap();
    // Warm up so slabs and free blocks exist as in a running program.
    run(o, pattern, OPS, touch);
    o.commit().unwrap();
    let before = o.stats().pages_tracked;
    // One batch, one commit at its end: what a turn doing OPS operations dirties.
    let l = |rng: &mut Lcg| match pattern {
        Pattern::Small => Layout::from_size_align(64, 8).unwrap(),
        Pattern::Large => Layout::from_size_align(4000, 8).unwrap(),
        Pattern::Mixed => Layout::from_size_align(rng.size(), 8).unwrap(),
    };
    let mut rng = Lcg(7);
    let mut v = Vec::new();
    for _ in 0..OPS {
        let layout = l(&mut rng);
        let p = Allocs::alloc(o, layout);
        if touch {
            // SAFETY: a fresh allocation of at least 8 bytes.
            unsafe { p.as_ptr().cast::<u64>().write_unaligned(1) };
        }
        v.push((p, layout));
    }
    o.commit().unwrap();
    let per = (o.stats().pages_tracked - before) as f64 / OPS as f64;
    for (p, layout) in v {
        Allocs::free(o, p, layout);
    }
    o.commit().unwrap();
    per
}

fn allocs(c: &mut Criterion) {
    let t = Target::from_env();
    let mut o = open_heap(&t);
    let mut g = c.benchmark_group("alloc");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    for pattern in [Pattern::Small, Pattern::Large, Pattern::Mixed] {
        g.bench_function(format!("fams/{}", pattern.name()), |b| {
            b.iter_custom(|iters| run(&mut o, pattern, iters, false))
        });
        g.bench_function(format!("system/{}", pattern.name()), |b| {
            b.iter_custom(|iters| run(&mut Sys, pattern, iters, false))
        });
    }
    g.finish();
    println!("pages dirtied per allocation (10,000 allocations in one commit, after a warm-up):");
    for pattern in [Pattern::Small, Pattern::Large, Pattern::Mixed] {
        let bare = pages_per_op(&mut o, pattern, false);
        let touched = pages_per_op(&mut o, pattern, true);
        println!(
            "  {:<16} allocator only: {bare:.3} pages/alloc; writing 8 bytes into each object: {touched:.3} pages/alloc",
            pattern.name()
        );
    }
    let report = o.check().expect("check after the benchmark");
    println!("  heap after the benchmark: {report:?}");
    let path = o.heap().path().to_path_buf();
    drop(o);
    t.remove_heap(&path);
    let _ = std::fs::remove_dir(&t.dir);
}

criterion_group!(benches, allocs);
criterion_main!(benches);
