//! The persistent allocator's crash workload, shared by the real-crash tests of
//! `tests/alloc_crash.rs` (a SIGKILLed child process; the power-loss simulator).
//!
//! Commit `k` applies a few allocator operations — allocations of varied sizes and alignments,
//! frees, reallocs, rewrites of an object's contents — chosen by a generator seeded with
//! (seed, k), and records the resulting object set in a root of the heap, a [`Table`], together
//! with `k`. So a recovered heap names the commit it claims to be, and says which objects it
//! should hold; [`verify`] checks the allocator against that table (the same offsets, sizes,
//! alignments and contents; nothing else allocated; `check()` clean), and the crash tests check
//! the table itself against what the workload announced for commit `k` ([`digest`]) — so a heap
//! whose table and allocator agree with each other but not with commit `k` is caught as well.

use crate::Rng;
use fams::alloc::{ObjectError, ObjectHeap, OBJECT_META_BYTES, SIZE_CLASSES_BYTES, SMALL_OBJECT_BYTES_MAX};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;

/// Most live objects at once (the table's capacity). With the size mix below this fills a
/// 4 MiB heap now and then, so allocations also meet exhaustion.
pub const TABLE_SLOTS: usize = 384;

fams::persistent! {
    /// The table root: the commit this heap state belongs to, and the live objects as of it.
    pub struct Table {
        pub commit: u64,
        pub count: u64,
        /// (offset from the base, size, alignment, fill byte), in address order.
        pub objects: [[u64; 4]; TABLE_SLOTS],
    }
}

/// One object of the model: its layout and the byte every byte of it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Obj {
    pub size: u64,
    pub align: u64,
    pub fill: u8,
}

impl Obj {
    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size as usize, self.align as usize).expect("a valid layout")
    }
}

/// Live objects by offset from the heap's base.
pub type Live = BTreeMap<u64, Obj>;

/// What the workload did, over all its commits.
#[derive(Clone, Debug, Default)]
pub struct OpCounts {
    pub allocs: u64,
    pub frees: u64,
    pub reallocs: u64,
    pub writes: u64,
    /// Allocations and reallocs refused with `Exhausted` (the heap was full).
    pub exhausted: u64,
    /// Failed turns: operations rolled back with `ObjectHeap::rollback`.
    pub rollbacks: u64,
}

/// A hash of a commit's object set: what a committer announces before issuing commit `k`, and
/// what a checker compares a recovered table with. (Both sides are the same build.)
pub fn digest(commit: u64, live: &Live) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    commit.hash(&mut h);
    live.hash(&mut h);
    h.finish()
}

fn ptr_of(o: &ObjectHeap, off: u64) -> NonNull<u8> {
    // SAFETY: off is inside the heap (it came from the allocator), so the sum stays in the mapping.
    NonNull::new(unsafe { o.heap().base().add(off as usize) }).expect("inside the mapping")
}

fn offset_of(o: &ObjectHeap, p: NonNull<u8>) -> u64 {
    p.as_ptr() as u64 - o.heap().base() as u64
}

fn fill(o: &mut ObjectHeap, off: u64, obj: Obj) {
    let p = ptr_of(o, off);
    // SAFETY: the object is live and obj.size bytes long; the ObjectHeap is borrowed mutably, so
    // no reference into the heap exists while the bytes are written.
    unsafe { std::ptr::write_bytes(p.as_ptr(), obj.fill, obj.size as usize) };
}

/// The table is a named root, so that a heap which lost it says so instead of quietly making a
/// new one ([`ObjectHeap::named_roots`] tells; the main root cannot be asked).
pub const TABLE_ROOT: &str = "alloc-crash-table";

fn table(o: &mut ObjectHeap) -> Result<&mut Table, String> {
    if !o.named_roots().iter().any(|r| r.name == TABLE_ROOT) {
        return Err(format!("the heap has no root {TABLE_ROOT:?}"));
    }
    o.named_root::<Table>(TABLE_ROOT, |_| empty_table()).map(|(t, _)| t).map_err(|e| format!("the table root: {e}"))
}

fn table_offset(o: &mut ObjectHeap) -> Result<u64, String> {
    let base = o.heap().base() as u64;
    let t = table(o)?;
    Ok(t as *mut Table as u64 - base)
}

fn empty_table() -> Table {
    Table { commit: 0, count: 0, objects: [[0; 4]; TABLE_SLOTS] }
}

/// Create the table (commit 0, no objects) in a fresh object heap and commit it.
pub fn create(o: &mut ObjectHeap) -> Result<(), String> {
    o.named_root::<Table>(TABLE_ROOT, |_| empty_table()).map_err(|e| format!("creating the table: {e}"))?;
    o.commit().map_err(|e| format!("committing the empty table: {e}"))?;
    Ok(())
}

/// The commit number and object set the heap's table records (read only; the table must exist).
pub fn read_table(o: &mut ObjectHeap) -> Result<(u64, Live), String> {
    let t = table(o)?;
    let (commit, count) = (t.commit, t.count);
    if count > TABLE_SLOTS as u64 {
        return Err(format!("the table of commit {commit} says it holds {count} objects (at most {TABLE_SLOTS})"));
    }
    let mut live = Live::new();
    for &[off, size, align, fill] in &t.objects[..count as usize] {
        let obj = Obj { size, align, fill: fill as u8 };
        if live.insert(off, obj).is_some() {
            return Err(format!("the table of commit {commit} lists {off:#x} twice"));
        }
    }
    Ok((commit, live))
}

/// What [`verify`] found in a recovered heap.
#[derive(Debug)]
pub struct Recovered {
    pub commit: u64,
    pub live: Live,
}

/// Check a (recovered) heap against its own table: `check()` passes; the allocator's live
/// allocations are exactly the table's objects and the table itself (nothing leaked, nothing
/// lost); each reserves at least its size, at its alignment; each holds its fill byte
/// throughout. Reads only.
pub fn verify(o: &mut ObjectHeap) -> Result<Recovered, String> {
    o.check().map_err(|e| format!("check() failed: {e}"))?;
    let table_off = table_offset(o)?;
    let (commit, live) = read_table(o)?;
    let what = |m: String| format!("commit {commit}: {m}");
    let allocs = o.allocations().map_err(|e| what(format!("allocations(): {e}")))?;
    let mut expected: Vec<u64> = live.keys().copied().collect();
    expected.push(table_off);
    expected.sort_unstable();
    let found: Vec<u64> = allocs.iter().map(|a| a.0).collect();
    if found != expected {
        let leaked: Vec<String> =
            found.iter().filter(|f| expected.binary_search(f).is_err()).map(|f| format!("{f:#x}")).collect();
        let lost: Vec<String> =
            expected.iter().filter(|e| found.binary_search(e).is_err()).map(|e| format!("{e:#x}")).collect();
        return Err(what(format!(
            "the allocator holds {} objects, the table {} (+ itself): allocated but not in the table {leaked:?}, \
             in the table but not allocated {lost:?}",
            found.len(),
            live.len()
        )));
    }
    let base = o.heap().base() as u64;
    let bytes = o.heap().bytes();
    for &(off, reserved) in &allocs {
        let Some(obj) = live.get(&off) else { continue }; // the table itself
                                                          // Nothing leaked inside a reservation either: a small object holds exactly its size
                                                          // class, a large one its size rounded to 16 (plus less than a block the allocator could
                                                          // have split off).
        let want = reservation(*obj);
        if reserved < obj.size || reserved < want || reserved >= want + SPLIT_SLACK_BYTES_MAX {
            return Err(what(format!(
                "{off:#x} reserves {reserved} bytes for an object of {} aligned {} (expected {want})",
                obj.size, obj.align
            )));
        }
        if (base + off) % obj.align != 0 {
            return Err(what(format!("{off:#x} is not aligned to {}", obj.align)));
        }
        let b = &bytes[off as usize..(off + obj.size) as usize];
        if let Some(i) = b.iter().position(|&x| x != obj.fill) {
            return Err(what(format!(
                "object {off:#x} ({} bytes) has {:#x} at byte {i}, expected {:#x}",
                obj.size, b[i], obj.fill
            )));
        }
    }
    Ok(Recovered { commit, live })
}

/// The bytes the allocator reserves for an object: a small one (size and alignment up to
/// [`SMALL_OBJECT_BYTES_MAX`]) the first size class that holds it at its alignment, a large one
/// its size rounded up to 16 (its block, less the 16-byte tag).
pub fn reservation(obj: Obj) -> u64 {
    let (size, align) = (obj.size.max(1), obj.align);
    if size <= SMALL_OBJECT_BYTES_MAX as u64 && align <= SMALL_OBJECT_BYTES_MAX as u64 {
        if let Some(&c) = SIZE_CLASSES_BYTES.iter().find(|&&c| c as u64 >= size && c as u64 % align == 0) {
            return c as u64;
        }
    }
    size.div_ceil(16) * 16
}

/// A large block may keep a tail too small to be a free block of its own (under 48 bytes)
/// instead of splitting it off; more than that is memory lost inside a live object.
const SPLIT_SLACK_BYTES_MAX: u64 = 48;

/// Nothing is handed out twice: allocate objects of mixed sizes until the heap refuses
/// (at most `limit`), check that none overlaps another live object, the metadata or the end of
/// the heap, and that `check()` still passes; then roll all of it back. Returns how many
/// allocations were made.
pub fn allocate_until_full(o: &mut ObjectHeap, rng: &mut Rng, limit: u64) -> Result<u64, String> {
    let mut spans: Vec<(u64, u64)> = o.allocations().map_err(|e| format!("allocations(): {e}"))?;
    let existing = spans.len();
    let mut made = 0;
    let mut refused = 0;
    // Large requests first fail while small ones still fit; stop after a run of refusals.
    while made < limit && refused < 8 {
        let size = match rng.below(4) {
            0 => 1 + rng.below(256),
            1 => 257 + rng.below(4096),
            2 => 4097 + rng.below(60_000),
            _ => 1 + rng.below(2048),
        };
        let align = [1u64, 8, 16, 64, 4096][rng.below(5) as usize];
        let layout = Layout::from_size_align(size as usize, align as usize).expect("layout");
        match o.alloc(layout, false) {
            Ok(p) => {
                spans.push((offset_of(o, p), size));
                made += 1;
                refused = 0;
            }
            Err(ObjectError::Exhausted { .. }) => refused += 1,
            Err(e) => return Err(format!("allocating after recovery: {e}")),
        }
    }
    let heap_len = o.heap().len() as u64;
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(format!(
                "after recovery {:#x} (+{}) and {:#x} (+{}) overlap ({} objects were live, {made} allocated since)",
                w[0].0, w[0].1, w[1].0, w[1].1, existing
            ));
        }
    }
    if let (Some(first), Some(last)) = (spans.first(), spans.last()) {
        if first.0 < OBJECT_META_BYTES || last.0 + last.1 > heap_len {
            return Err(format!("an object lies outside the object region: {first:?} … {last:?}"));
        }
    }
    o.check().map_err(|e| format!("check() after {made} allocations on the recovered heap: {e}"))?;
    o.rollback().map_err(|e| format!("rolling back the allocations made to check: {e}"))?;
    Ok(made)
}

/// The committer's side: the model of the objects, and the operations that change it.
pub struct Workload {
    pub seed: u64,
    /// The commit the live objects belong to (the last one prepared with [`Workload::next_commit`]).
    pub commit: u64,
    pub live: Live,
    pub counts: OpCounts,
}

impl Workload {
    /// Pick up from the state the heap holds (as its table records it).
    pub fn resume(o: &mut ObjectHeap, seed: u64) -> Result<Workload, String> {
        let (commit, live) = read_table(o)?;
        Ok(Workload { seed, commit, live, counts: OpCounts::default() })
    }

    /// The digest of the current object set (see [`digest`]).
    pub fn digest(&self) -> u64 {
        digest(self.commit, &self.live)
    }

    /// Apply the operations of the next commit `k` (a function of (seed, k) and the current
    /// state) and record the new object set and `k` in the table; does not commit. Returns `k`.
    pub fn next_commit(&mut self, o: &mut ObjectHeap) -> Result<u64, String> {
        let k = self.commit + 1;
        let mut rng = Rng::new(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k);
        for _ in 0..1 + rng.below(6) {
            self.op(o, &mut rng)?;
        }
        self.commit = k;
        self.write_table(o)?;
        Ok(k)
    }

    /// A failed turn: a few operations, then `ObjectHeap::rollback`. The model is left as it
    /// was; the heap must be too (a checker sees it at the next recovery or [`verify`]).
    pub fn failed_turn(&mut self, o: &mut ObjectHeap, rng: &mut Rng) -> Result<(), String> {
        let (live, counts) = (self.live.clone(), self.counts.clone());
        for _ in 0..1 + rng.below(4) {
            self.op(o, rng)?;
        }
        o.rollback().map_err(|e| format!("rollback: {e}"))?;
        self.live = live;
        self.counts = counts;
        self.counts.rollbacks += 1;
        Ok(())
    }

    fn write_table(&mut self, o: &mut ObjectHeap) -> Result<(), String> {
        let t = table(o)?;
        t.commit = self.commit;
        t.count = self.live.len() as u64;
        for (slot, (&off, obj)) in t.objects.iter_mut().zip(&self.live) {
            *slot = [off, obj.size, obj.align, obj.fill as u64];
        }
        Ok(())
    }

    fn pick(&self, rng: &mut Rng) -> Option<(u64, Obj)> {
        if self.live.is_empty() {
            return None;
        }
        self.live.iter().nth(rng.below(self.live.len() as u64) as usize).map(|(&k, &v)| (k, v))
    }

    /// One random operation. Err only for what the allocator must never do (a zeroed
    /// allocation that is not zero, contents lost by a realloc, an offset handed out twice, an
    /// error other than exhaustion).
    fn op(&mut self, o: &mut ObjectHeap, rng: &mut Rng) -> Result<(), String> {
        let mut r = rng.below(100);
        // A full table turns allocations into frees, so the heap keeps churning.
        if r < 45 && self.live.len() >= TABLE_SLOTS {
            r = 45;
        }
        let size = match rng.below(10) {
            0..=5 => 1 + rng.below(1024),
            6..=8 => 1025 + rng.below(15_360),
            _ => 16_385 + rng.below(120_000),
        };
        let fill_byte = rng.next_u64() as u8 | 1; // never 0: a zeroed page does not look filled
        match r {
            0..=44 => {
                let align = [1u64, 8, 16, 16, 64, 4096, 1 << 13][rng.below(7) as usize];
                let zeroed = rng.below(4) == 0;
                let obj = Obj { size, align, fill: fill_byte };
                match o.alloc(obj.layout(), zeroed) {
                    Ok(p) => {
                        let off = offset_of(o, p);
                        if zeroed {
                            let b = &o.heap().bytes()[off as usize..(off + size) as usize];
                            if let Some(i) = b.iter().position(|&x| x != 0) {
                                return Err(format!("a zeroed allocation at {off:#x} has {:#x} at byte {i}", b[i]));
                            }
                        }
                        if self.live.insert(off, obj).is_some() {
                            return Err(format!("{off:#x} handed out while live"));
                        }
                        fill(o, off, obj);
                        self.counts.allocs += 1;
                    }
                    Err(ObjectError::Exhausted { .. }) => self.counts.exhausted += 1,
                    Err(e) => return Err(format!("alloc {size} aligned {align}: {e}")),
                }
            }
            45..=69 => {
                let Some((off, obj)) = self.pick(rng) else { return Ok(()) };
                let p = ptr_of(o, off);
                // SAFETY: allocated with obj's layout and not freed (the model says it is live);
                // it is dropped from the model, so never used again.
                unsafe { o.dealloc(p, obj.layout()) };
                self.live.remove(&off);
                self.counts.frees += 1;
            }
            70..=84 => {
                let Some((off, obj)) = self.pick(rng) else { return Ok(()) };
                let new = Obj { size, ..obj };
                let p = ptr_of(o, off);
                // SAFETY: as for a free; on success the old pointer is dropped from the model,
                // on failure the object is untouched and stays.
                match unsafe { o.allocator().realloc(p, obj.layout(), new.layout(), false) } {
                    Ok(q) => {
                        let noff = offset_of(o, q);
                        let keep = obj.size.min(size);
                        let b = &o.heap().bytes()[noff as usize..(noff + keep) as usize];
                        if let Some(i) = b.iter().position(|&x| x != obj.fill) {
                            return Err(format!("realloc {off:#x} → {noff:#x} lost the contents at byte {i}"));
                        }
                        self.live.remove(&off);
                        if self.live.insert(noff, new).is_some() {
                            return Err(format!("realloc returned {noff:#x}, which is live"));
                        }
                        fill(o, noff, new);
                        self.counts.reallocs += 1;
                    }
                    Err(ObjectError::Exhausted { .. }) => self.counts.exhausted += 1,
                    Err(e) => return Err(format!("realloc {off:#x} to {size}: {e}")),
                }
            }
            _ => {
                let Some((off, obj)) = self.pick(rng) else { return Ok(()) };
                let obj = Obj { fill: fill_byte, ..obj };
                fill(o, off, obj);
                self.live.insert(off, obj);
                self.counts.writes += 1;
            }
        }
        Ok(())
    }
}
