//! The persistent allocator against a model: random sequences of allocations, frees, resizes
//! and writes, with commits, pipelined commits, clean reopens and crashes between them. Here a
//! crash is simulated in the process: `abandon()` (as a kill would: no checkpoint, commits never
//! written are lost) followed by `open()` (recovery); afterwards the heap must hold exactly the
//! objects of the last commit — the same offsets (nothing leaked, nothing handed out twice), the
//! same contents — and `check()` must pass. `check()` also runs after every operation that
//! changes the allocator's metadata in the short runs, and proptest shrinks a failing sequence.
//!
//! Real crashes — a child process SIGKILLed mid-commit, and power cut on the simulated machine
//! with unflushed writes lost or torn — are `alloc_crash.rs`'s, with the same kind of workload.

use fams::alloc::{ObjectError, ObjectHeap, ObjectOptions};
use fams::{Heap, HeapOptions};
use fams_tests::*;
use proptest::prelude::*;
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::path::Path;
use std::ptr::NonNull;

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_log2: u8, zeroed: bool },
    Free { pick: usize },
    Realloc { pick: usize, size: usize },
    Write { pick: usize, byte: u8 },
    Commit,
    CommitAsync,
    Reopen,
    Crash,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Obj {
    layout: Layout,
    fill: u8,
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 1usize..=1024,
        3 => 1025usize..=16_384,
        1 => 16_385usize..=200_000,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (size_strategy(), prop_oneof![6 => 0u8..=4, 2 => 5u8..=12, 1 => 13u8..=16], any::<bool>())
            .prop_map(|(size, align_log2, zeroed)| Op::Alloc { size, align_log2, zeroed }),
        6 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        3 => (any::<usize>(), size_strategy()).prop_map(|(pick, size)| Op::Realloc { pick, size }),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(pick, byte)| Op::Write { pick, byte }),
        2 => Just(Op::Commit),
        1 => Just(Op::CommitAsync),
        1 => Just(Op::Reopen),
        2 => Just(Op::Crash),
    ]
}

fn open_objects(path: &Path) -> ObjectHeap {
    let heap = Heap::open(path, &HeapOptions::default()).expect("open heap");
    ObjectHeap::open(heap, &ObjectOptions::schema(1)).expect("open objects")
}

struct Model {
    /// Live objects by offset from the base.
    live: BTreeMap<u64, Obj>,
    committed: BTreeMap<u64, Obj>,
    allocs: u64,
    exhausted: u64,
    crashes: u64,
}

fn ptr_of(o: &ObjectHeap, off: u64) -> NonNull<u8> {
    // SAFETY: off is inside the heap (it came from the allocator).
    NonNull::new(unsafe { o.heap().base().add(off as usize) }).unwrap()
}

fn fill(o: &mut ObjectHeap, off: u64, obj: Obj) {
    let p = ptr_of(o, off);
    // SAFETY: the object is live and obj.layout.size() bytes long; the ObjectHeap is borrowed
    // mutably, so no reference into the heap exists.
    unsafe { std::ptr::write_bytes(p.as_ptr(), obj.fill, obj.layout.size()) };
}

/// The heap holds exactly the model's objects, with their contents, and passes check().
fn verify(o: &ObjectHeap, m: &Model, what: &str) {
    o.check().unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    let allocs = o.allocations().unwrap();
    let offsets: Vec<u64> = allocs.iter().map(|a| a.0).collect();
    let want: Vec<u64> = m.live.keys().copied().collect();
    assert_eq!(offsets, want, "{what}: the allocator's live objects differ from the model's");
    for ((off, reserved), (_, obj)) in allocs.iter().zip(&m.live) {
        assert!(*reserved >= obj.layout.size() as u64, "{what}: {off:#x} reserves {reserved} < {}", obj.layout.size());
        let base = o.heap().base() as usize;
        assert_eq!((base + *off as usize) % obj.layout.align(), 0, "{what}: misaligned");
        let bytes = &o.heap().bytes()[*off as usize..*off as usize + obj.layout.size()];
        if let Some(i) = bytes.iter().position(|&b| b != obj.fill) {
            panic!("{what}: object {off:#x} byte {i} is {:#x}, expected {:#x}", bytes[i], obj.fill);
        }
    }
}

fn pick(m: &Model, pick: usize) -> Option<(u64, Obj)> {
    if m.live.is_empty() {
        return None;
    }
    m.live.iter().nth(pick % m.live.len()).map(|(&k, &v)| (k, v))
}

fn run(path: &Path, ops: &[Op], check_every_op: bool) -> Model {
    let mut o = open_objects(path);
    let mut m = Model { live: BTreeMap::new(), committed: BTreeMap::new(), allocs: 0, exhausted: 0, crashes: 0 };
    let mut fill_counter = 0u8;
    for (step, op) in ops.iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match *op {
            Op::Alloc { size, align_log2, zeroed } => {
                let layout = Layout::from_size_align(size, 1 << align_log2).unwrap();
                match o.alloc(layout, zeroed) {
                    Ok(p) => {
                        let off = p.as_ptr() as u64 - o.heap().base() as u64;
                        if zeroed {
                            let b = &o.heap().bytes()[off as usize..off as usize + size];
                            assert!(b.iter().all(|&x| x == 0), "{what}: zeroed allocation is not zero");
                        }
                        fill_counter = fill_counter.wrapping_add(1);
                        let obj = Obj { layout, fill: fill_counter | 1 };
                        assert!(m.live.insert(off, obj).is_none(), "{what}: {off:#x} handed out twice");
                        fill(&mut o, off, obj);
                        m.allocs += 1;
                    }
                    Err(ObjectError::Exhausted { .. }) => m.exhausted += 1,
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            Op::Free { pick: k } => {
                let Some((off, obj)) = pick(&m, k) else { continue };
                let p = ptr_of(&o, off);
                // SAFETY: allocated with obj.layout and not freed (the model says it is live).
                unsafe { o.dealloc(p, obj.layout) };
                m.live.remove(&off);
            }
            Op::Realloc { pick: k, size } => {
                let Some((off, obj)) = pick(&m, k) else { continue };
                let new = Layout::from_size_align(size, obj.layout.align()).unwrap();
                let p = ptr_of(&o, off);
                // SAFETY: as for Free; on success the old pointer is dropped from the model.
                match unsafe { o.allocator().realloc(p, obj.layout, new, false) } {
                    Ok(q) => {
                        let noff = q.as_ptr() as u64 - o.heap().base() as u64;
                        let keep = obj.layout.size().min(size);
                        let b = &o.heap().bytes()[noff as usize..noff as usize + keep];
                        assert!(b.iter().all(|&x| x == obj.fill), "{what}: contents not preserved");
                        m.live.remove(&off);
                        let nobj = Obj { layout: new, fill: obj.fill };
                        assert!(m.live.insert(noff, nobj).is_none(), "{what}: {noff:#x} handed out twice");
                        fill(&mut o, noff, nobj);
                    }
                    Err(ObjectError::Exhausted { .. }) => m.exhausted += 1,
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            Op::Write { pick: k, byte } => {
                let Some((off, mut obj)) = pick(&m, k) else { continue };
                obj.fill = byte;
                fill(&mut o, off, obj);
                m.live.insert(off, obj);
            }
            Op::Commit => {
                o.commit().unwrap();
                m.committed = m.live.clone();
            }
            Op::CommitAsync => {
                let t = o.commit_async().unwrap();
                m.committed = m.live.clone();
                if step % 2 == 0 {
                    o.wait(t).unwrap();
                }
            }
            Op::Reopen => {
                // A clean close keeps what was committed only (nothing commits at drop).
                drop(o);
                o = open_objects(path);
                m.live = m.committed.clone();
                verify(&o, &m, &what);
            }
            Op::Crash => {
                o.abandon();
                o = open_objects(path);
                m.live = m.committed.clone();
                m.crashes += 1;
                verify(&o, &m, &what);
            }
        }
        if check_every_op {
            o.check().unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    verify(&o, &m, "end");
    o.abandon();
    let o = open_objects(path);
    m.live = m.committed.clone();
    verify(&o, &m, "after the final crash");
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn allocator_matches_the_model_across_commits_and_crashes(ops in proptest::collection::vec(op_strategy(), 1..150)) {
        let dir = TempDir::new("alloc-model");
        let path = dir.join("h");
        format(&path, 2 << 20, Some(8 << 20));
        run(&path, &ops, true);
    }
}

/// A long deterministic run on a larger heap: many thousands of operations, so slabs fill and
/// empty, large blocks split and coalesce many times, and the heap runs full.
#[test]
fn long_random_run_matches_the_model() {
    let dir = TempDir::new("alloc-long");
    let path = dir.join("h");
    format(&path, 8 << 20, Some(16 << 20));
    let mut rng = fams_tests::Rng::new(0xa110c);
    let mut ops = Vec::new();
    for _ in 0..20_000 {
        let r = rng.below(100);
        let size = match rng.below(10) {
            0..=5 => 1 + rng.below(1024) as usize,
            6..=8 => 1025 + rng.below(16_000) as usize,
            _ => 16_385 + rng.below(300_000) as usize,
        };
        ops.push(match r {
            0..=44 => {
                Op::Alloc { size, align_log2: [0, 3, 4, 4, 6, 12][rng.below(6) as usize], zeroed: rng.below(4) == 0 }
            }
            45..=79 => Op::Free { pick: rng.next_u64() as usize },
            80..=89 => Op::Realloc { pick: rng.next_u64() as usize, size },
            90..=95 => Op::Write { pick: rng.next_u64() as usize, byte: rng.below(256) as u8 },
            96..=98 => Op::Commit,
            _ => {
                if rng.below(4) == 0 {
                    Op::Crash
                } else {
                    Op::CommitAsync
                }
            }
        });
    }
    let started = std::time::Instant::now();
    let m = run(&path, &ops, false);
    eprintln!(
        "{} ops: {} allocations, {} exhausted, {} crashes, {} live at the end, {:.1} s",
        ops.len(),
        m.allocs,
        m.exhausted,
        m.crashes,
        m.committed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(m.exhausted > 0, "the run should fill the heap at times");
    assert!(m.crashes > 10);
}
