//! Rust collections that live in the heap: the [`HeapAlloc`] handle (an
//! [`allocator_api2::alloc::Allocator`]), [`PVec`], [`PBox`], [`PHashMap`] and the persistent
//! hasher [`FixedState`].

use super::persistent::{fingerprint, fingerprint_combine, Persistent};
use super::raw::{Raw, PAGE_BYTES};
use super::ObjectError;
use allocator_api2::alloc::{AllocError, Allocator};
use std::alloc::Layout;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A vector whose buffer is in the heap. Survives restarts when stored in a root.
pub type PVec<'h, T> = allocator_api2::vec::Vec<T, HeapAlloc<'h>>;
/// A box in the heap.
pub type PBox<'h, T> = allocator_api2::boxed::Box<T, HeapAlloc<'h>>;

/// The heap's allocator, for collections that live in the heap.
///
/// It holds only the heap's base address — the same in every run — so a collection stored in
/// the heap finds its allocator again after a restart. Its lifetime is a borrow of the
/// [`ObjectHeap`](super::ObjectHeap) (taken by [`ObjectHeap::allocator`](super::ObjectHeap::allocator)
/// or [`ObjectHeap::root`](super::ObjectHeap::root)): no collection, and no copy of the handle,
/// can outlive the mapping, and while one exists nothing else can touch the heap (no commit, no
/// `bytes()`), so the allocator's writes never race with a reference Rust believes immutable.
///
/// All the allocator's state is in the heap (see the [module docs](super)); the handle writes
/// it through raw pointers only, never through references.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct HeapAlloc<'h> {
    base: NonNull<u8>,
    _heap: PhantomData<&'h ()>,
}

impl fmt::Debug for HeapAlloc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeapAlloc({:p})", self.base)
    }
}

// SAFETY: holds the base address of the heap it lives in, valid in every run (fixed base).
unsafe impl Persistent for HeapAlloc<'_> {
    const FINGERPRINT: u64 = fingerprint(b"HeapAlloc");
}

/// Why a heap's allocator refuses to go on until the heap is rolled back or reopened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Poison {
    /// The allocator panicked part way through an operation (a bug): its metadata may be half
    /// updated.
    Panicked,
    /// The allocator found its metadata damaged (or was handed a pointer or layout that matches
    /// no live object) and stopped part way through an operation.
    Damaged(String),
}

/// Heaps (by base address) whose allocator refuses to go on, and why. Set rarely, read at every
/// commit; `ANY_POISONED` keeps the allocation path from taking the lock.
static POISONED: Mutex<Vec<(usize, Poison)>> = Mutex::new(Vec::new());
static ANY_POISONED: AtomicBool = AtomicBool::new(false);

pub(crate) fn poison_of(base: NonNull<u8>) -> Option<Poison> {
    if !ANY_POISONED.load(Ordering::Acquire) {
        return None;
    }
    let list = POISONED.lock().unwrap_or_else(|p| p.into_inner());
    list.iter().find(|(b, _)| *b == base.as_ptr() as usize).map(|(_, why)| why.clone())
}

/// Record why `base`'s allocator must stop (the first reason is kept).
fn poison(base: NonNull<u8>, why: Poison) {
    let mut list = POISONED.lock().unwrap_or_else(|p| p.into_inner());
    if !list.iter().any(|(b, _)| *b == base.as_ptr() as usize) {
        list.push((base.as_ptr() as usize, why));
    }
    ANY_POISONED.store(true, Ordering::Release);
}

pub(crate) fn clear_poison(base: NonNull<u8>) {
    let mut list = POISONED.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|(b, _)| *b != base.as_ptr() as usize);
    ANY_POISONED.store(!list.is_empty(), Ordering::Release);
}

/// For each heap (by base address), the object heap that lent out the allocator handles in use,
/// so that an allocation that does not fit can grow the heap. Set by every `ObjectHeap` method
/// that makes a [`HeapAlloc`] (which borrows the object heap mutably for as long as it, or
/// anything made with it, lives, so the object heap cannot move or be used otherwise while the
/// entry is used); cleared when the object heap goes away.
static GROWERS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

pub(crate) fn set_grower(base: NonNull<u8>, heap: *mut super::ObjectHeap) {
    let mut list = GROWERS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|(b, _)| *b != base.as_ptr() as usize);
    list.push((base.as_ptr() as usize, heap as usize));
}

/// Forget `heap` as the grower of `base` (if it still is).
pub(crate) fn clear_grower(base: NonNull<u8>, heap: *mut super::ObjectHeap) {
    let mut list = GROWERS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|&(b, h)| !(b == base.as_ptr() as usize && h == heap as usize));
}

fn grower_of(base: NonNull<u8>) -> Option<*mut super::ObjectHeap> {
    let list = GROWERS.lock().unwrap_or_else(|p| p.into_inner());
    list.iter().find(|(b, _)| *b == base.as_ptr() as usize).map(|&(_, h)| h as *mut super::ObjectHeap)
}

/// Marks the heap poisoned if dropped during a panic (a bug in the allocator).
struct OpGuard(NonNull<u8>);

impl Drop for OpGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            poison(self.0, Poison::Panicked);
        }
    }
}

impl<'h> HeapAlloc<'h> {
    /// # Safety
    /// `base` is the base of a mapped heap with the object layer's metadata, which stays mapped
    /// and is accessed only through this handle (and its copies) for `'h`.
    pub(crate) unsafe fn new(base: NonNull<u8>) -> HeapAlloc<'h> {
        HeapAlloc { base, _heap: PhantomData }
    }

    fn raw(&self) -> Raw {
        // SAFETY: the metadata block is at the base (HeapAlloc::new's contract) and its heap-size
        // word, 16 bytes in, lies inside the mapping.
        let word = unsafe { self.base.as_ptr().add(16) };
        // SAFETY: that word was checked against the mapping when the ObjectHeap was opened; it is
        // 8-aligned (the base is page-aligned).
        let len = unsafe { word.cast::<u64>().read() };
        // SAFETY: [base, base+len) is the mapped heap for 'h.
        unsafe { Raw::new(self.base, len) }
    }

    /// The heap's base address.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Allocate for `layout`, with the reason on failure (the `Allocator` methods only say
    /// `AllocError`). Zero-size layouts get a dangling, aligned pointer and touch nothing.
    pub fn try_alloc(&self, layout: Layout, zeroed: bool) -> Result<NonNull<u8>, ObjectError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        self.refuse_if_poisoned()?;
        let _g = OpGuard(self.base);
        let off = match self.raw().alloc(layout, zeroed) {
            Err(ObjectError::Exhausted { .. }) if grower_of(self.base).is_some() => {
                let heap = grower_of(self.base).expect("checked");
                // SAFETY: the entry names the object heap that lent out this handle: it is
                // mutably borrowed for as long as the handle lives (see GROWERS), so it is alive,
                // has not moved, and nothing else uses it on any thread (a HeapAlloc is not Send).
                // Growing maps more memory after the heap's end and re-arms tracking; nothing a
                // reference into the heap points at moves or changes.
                unsafe { (*heap).grow_for(layout) }.and_then(|()| self.raw().alloc(layout, zeroed))
            }
            r => r,
        }
        .inspect_err(|e| self.poison_if_damaged(e))?;
        // SAFETY: raw.alloc returns an offset inside the heap, never 0 (page 0 is metadata).
        Ok(unsafe { NonNull::new_unchecked(self.raw().ptr(off)) })
    }

    /// After damage was found (or a panic), the metadata may be half updated: hand out nothing
    /// more, so no two live objects can ever overlap, until the heap is rolled back or reopened.
    fn refuse_if_poisoned(&self) -> Result<(), ObjectError> {
        match poison_of(self.base) {
            None => Ok(()),
            Some(Poison::Damaged(problem)) => Err(ObjectError::Damaged { base: self.base.as_ptr() as u64, problem }),
            Some(Poison::Panicked) => Err(ObjectError::Damaged {
                base: self.base.as_ptr() as u64,
                problem: "the allocator panicked part way through an earlier operation".into(),
            }),
        }
    }

    fn poison_if_damaged(&self, e: &ObjectError) {
        if let ObjectError::Damaged { problem, .. } = e {
            poison(self.base, Poison::Damaged(problem.clone()));
        }
    }

    /// Free an allocation.
    ///
    /// # Safety
    /// `ptr` was returned by this heap's allocator for `layout` and is not used afterwards.
    /// (A pointer or layout the allocator can tell is wrong — not the start of a live object of
    /// that size — or damaged metadata stops the free before it changes anything it cannot
    /// vouch for: the heap then refuses allocations and commits, with the problem named, until
    /// it is rolled back or reopened.)
    pub unsafe fn dealloc(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 || poison_of(self.base).is_some() {
            return;
        }
        let _g = OpGuard(self.base);
        let raw = self.raw();
        if let Err(d) = raw.offset_of(ptr.as_ptr()).and_then(|off| raw.dealloc(off, layout)) {
            poison(self.base, Poison::Damaged(d.problem));
        }
    }

    /// Resize an allocation, in place when possible. On error the old allocation is untouched.
    ///
    /// # Safety
    /// As for [`HeapAlloc::dealloc`]; on success the old pointer must not be used any more.
    pub unsafe fn realloc(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<u8>, ObjectError> {
        if old.size() == 0 {
            return self.try_alloc(new, zeroed);
        }
        if new.size() == 0 {
            // SAFETY: forwarded contract.
            unsafe { self.dealloc(ptr, old) };
            return Ok(dangling(new));
        }
        self.refuse_if_poisoned()?;
        let raw = self.raw();
        let resized = {
            let _g = OpGuard(self.base);
            raw.offset_of(ptr.as_ptr()).and_then(|off| Ok((off, raw.resize_in_place(off, old, new)?)))
        };
        let (off, resized) = resized.map_err(ObjectError::from).inspect_err(|e| self.poison_if_damaged(e))?;
        if resized {
            if zeroed && new.size() > old.size() {
                raw.zero(off + old.size() as u64, (new.size() - old.size()) as u64);
            }
            return Ok(ptr);
        }
        let fresh = self.try_alloc(new, zeroed)?;
        // SAFETY: both blocks are live, distinct allocations at least min(old, new) bytes long.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.as_ptr(), old.size().min(new.size())) };
        // SAFETY: forwarded contract; the contents were moved to `fresh`.
        unsafe { self.dealloc(ptr, old) };
        Ok(fresh)
    }
}

fn dangling(layout: Layout) -> NonNull<u8> {
    // SAFETY: an alignment is never zero. The address is the same in every process, so a
    // dangling pointer stored in the heap (an empty PVec) is as valid after a restart.
    unsafe { NonNull::new_unchecked(layout.align() as *mut u8) }
}

fn slice(ptr: NonNull<u8>, len: usize) -> NonNull<[u8]> {
    NonNull::slice_from_raw_parts(ptr, len)
}

// SAFETY: blocks stay valid until freed (they live in the heap, mapped for 'h, which every copy
// of the handle is bounded by); all copies share one state (in the heap), so any of them may
// free or resize a block another allocated; allocate_zeroed zeroes; grow/shrink preserve
// contents. Exhaustion is an AllocError, never a panic.
unsafe impl Allocator for HeapAlloc<'_> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.try_alloc(layout, false).map(|p| slice(p, layout.size())).map_err(|_| AllocError)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.try_alloc(layout, true).map(|p| slice(p, layout.size())).map_err(|_| AllocError)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the Allocator contract is the same as dealloc's.
        unsafe { self.dealloc(ptr, layout) }
    }

    unsafe fn grow(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract (new.size() >= old.size()).
        unsafe { self.realloc(ptr, old, new, false) }.map(|p| slice(p, new.size())).map_err(|_| AllocError)
    }

    unsafe fn grow_zeroed(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.realloc(ptr, old, new, true) }.map(|p| slice(p, new.size())).map_err(|_| AllocError)
    }

    unsafe fn shrink(&self, ptr: NonNull<u8>, old: Layout, new: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract (new.size() <= old.size()).
        unsafe { self.realloc(ptr, old, new, false) }.map(|p| slice(p, new.size())).map_err(|_| AllocError)
    }
}

// SAFETY: the buffer is in the heap (the allocator is the heap's) and holds persistent values;
// an empty vector's pointer is `align_of::<T>()`, the same in every process.
unsafe impl<T: Persistent> Persistent for PVec<'_, T> {
    const FINGERPRINT: u64 = fingerprint_combine(fingerprint(b"PVec"), T::FINGERPRINT);
}

// SAFETY: the value is in the heap and persistent.
unsafe impl<T: Persistent> Persistent for PBox<'_, T> {
    const FINGERPRINT: u64 = fingerprint_combine(fingerprint(b"PBox"), T::FINGERPRINT);
}

// ---- the hasher -----------------------------------------------------------------------------

/// A `BuildHasher` whose state is two keys stored with the map, so a map hashes its keys the
/// same way in every process (std's `RandomState` picks new keys per process, and would lose
/// every entry at a restart). The hash function is SipHash-1-3, implemented here so that no
/// change of the standard library can change it.
///
/// [`FixedState::random`] (what [`PHashMap::new_in`] uses) picks the keys once, when the map
/// is made, which keeps HashDoS resistance; [`FixedState::with_keys`] fixes them.
///
/// One thing here is outside our control: how std's `Hash` impls feed a key to the hasher
/// (e.g. `str` appends a 0xff byte). Should a toolchain ever change that, lookups in existing
/// maps would miss; the object layer records a fingerprint of those hashes at format and
/// refuses to open a heap whose fingerprint no longer matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FixedState {
    k0: u64,
    k1: u64,
}

// SAFETY: two integers.
unsafe impl Persistent for FixedState {
    const FINGERPRINT: u64 = fingerprint(b"FixedState(SipHash-1-3)");
}

impl FixedState {
    pub const fn with_keys(k0: u64, k1: u64) -> FixedState {
        FixedState { k0, k1 }
    }

    /// Keys from the kernel's random source (falls back to the time and pid if that fails).
    /// Under a simulation's [`crate::sim::seed_randomness`], from its seeded generator instead.
    pub fn random() -> FixedState {
        let mut b = [0u8; 16];
        if crate::sim::seeded_random_bytes(&mut b) {
            return FixedState {
                k0: u64::from_le_bytes(b[..8].try_into().unwrap()),
                k1: u64::from_le_bytes(b[8..].try_into().unwrap()),
            };
        }
        if let Ok(id) = crate::heap_file::HeapId::random() {
            b = id.0;
        } else {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            b = (t ^ (std::process::id() as u128) << 64).to_le_bytes();
        }
        FixedState {
            k0: u64::from_le_bytes(b[..8].try_into().unwrap()),
            k1: u64::from_le_bytes(b[8..].try_into().unwrap()),
        }
    }
}

impl BuildHasher for FixedState {
    type Hasher = SipHasher13;
    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.k0, self.k1)
    }
}

/// SipHash-1-3 (one compression round, three finalisation rounds), as std uses today — but
/// fixed here, forever.
#[derive(Clone, Debug)]
pub struct SipHasher13 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    tail: u64,
    ntail: usize,
    length: usize,
}

impl SipHasher13 {
    pub fn new_with_keys(k0: u64, k1: u64) -> SipHasher13 {
        SipHasher13 {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
            tail: 0,
            ntail: 0,
            length: 0,
        }
    }

    #[inline]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }
}

impl Hasher for SipHasher13 {
    fn write(&mut self, mut bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len());
        while self.ntail != 0 && !bytes.is_empty() {
            self.tail |= (bytes[0] as u64) << (8 * self.ntail);
            self.ntail += 1;
            bytes = &bytes[1..];
            if self.ntail == 8 {
                let m = self.tail;
                self.compress(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.compress(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for (i, &b) in chunks.remainder().iter().enumerate() {
            self.tail |= (b as u64) << (8 * i);
        }
        self.ntail = chunks.remainder().len();
    }

    fn finish(&self) -> u64 {
        let mut s = self.clone();
        let b = ((self.length as u64 & 0xff) << 56) | self.tail;
        s.v3 ^= b;
        s.round();
        s.v0 ^= b;
        s.v2 ^= 0xff;
        s.round();
        s.round();
        s.round();
        s.v0 ^ s.v1 ^ s.v2 ^ s.v3
    }

    // Spelled out so that no change to the trait's default methods can change a hash.
    fn write_u8(&mut self, i: u8) {
        self.write(&[i])
    }
    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_le_bytes())
    }
    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_le_bytes())
    }
    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_le_bytes())
    }
    fn write_u128(&mut self, i: u128) {
        self.write(&i.to_le_bytes())
    }
    fn write_usize(&mut self, i: usize) {
        self.write(&(i as u64).to_le_bytes())
    }
    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8)
    }
    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16)
    }
    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32)
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64)
    }
    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128)
    }
    fn write_isize(&mut self, i: isize) {
        self.write_usize(i as usize)
    }
}

// ---- the map ---------------------------------------------------------------------------------

type Inner<'h, K, V> = hashbrown::HashMap<K, V, FixedState, HeapAlloc<'h>>;

/// A `hashbrown::HashMap` that lives in the heap.
///
/// A thin wrapper for one reason: an empty hashbrown table that owns no allocation points its
/// control bytes at a `static` inside the program's binary, whose address changes from run to
/// run (ASLR) — stored in the heap, such a map would point into nowhere after a restart. A
/// `PHashMap` always owns a table (it is made with room for at least one entry and never
/// shrinks below that), so every pointer it stores is into the heap.
///
/// Reading goes through `Deref` to the hashbrown map (`get`, `iter`, `len`, …); every method
/// that changes it is forwarded here, except those that could free the table (`shrink_to(0)`
/// becomes `shrink_to(1)`).
#[repr(transparent)]
pub struct PHashMap<'h, K, V> {
    map: Inner<'h, K, V>,
}

// SAFETY: the table is in the heap (the allocator is the heap's), always allocated there (see
// the type's docs), the hasher state is two integers, and keys and values are persistent.
unsafe impl<K: Persistent, V: Persistent> Persistent for PHashMap<'_, K, V> {
    const FINGERPRINT: u64 =
        fingerprint_combine(fingerprint_combine(fingerprint(b"PHashMap"), K::FINGERPRINT), V::FINGERPRINT);
}

impl<'h, K, V> Deref for PHashMap<'h, K, V> {
    type Target = Inner<'h, K, V>;
    fn deref(&self) -> &Inner<'h, K, V> {
        &self.map
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for PHashMap<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.map.fmt(f)
    }
}

impl<'a, 'h, K, V> IntoIterator for &'a PHashMap<'h, K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = hashbrown::hash_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<'a, 'h, K, V> IntoIterator for &'a mut PHashMap<'h, K, V> {
    type Item = (&'a K, &'a mut V);
    type IntoIter = hashbrown::hash_map::IterMut<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter_mut()
    }
}

impl<'h, K: Eq + Hash, V> PHashMap<'h, K, V> {
    /// An empty map in the heap, with random hasher keys. Aborts if the heap cannot hold even
    /// one entry (like `Vec::push`); see [`PHashMap::try_new_in`].
    pub fn new_in(alloc: HeapAlloc<'h>) -> Self {
        Self::with_hasher_in(FixedState::random(), alloc)
    }

    pub fn with_hasher_in(hasher: FixedState, alloc: HeapAlloc<'h>) -> Self {
        Self::with_capacity_and_hasher_in(1, hasher, alloc)
    }

    pub fn with_capacity_in(capacity: usize, alloc: HeapAlloc<'h>) -> Self {
        Self::with_capacity_and_hasher_in(capacity, FixedState::random(), alloc)
    }

    pub fn with_capacity_and_hasher_in(capacity: usize, hasher: FixedState, alloc: HeapAlloc<'h>) -> Self {
        PHashMap { map: Inner::with_capacity_and_hasher_in(capacity.max(1), hasher, alloc) }
    }

    /// An empty map, or the allocation error if the heap is full.
    pub fn try_new_in(alloc: HeapAlloc<'h>) -> Result<Self, hashbrown::TryReserveError> {
        let mut map = Inner::with_hasher_in(FixedState::random(), alloc);
        map.try_reserve(1)?;
        Ok(PHashMap { map })
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.map.insert(k, v)
    }

    pub fn remove<Q: ?Sized + Hash + hashbrown::Equivalent<K>>(&mut self, k: &Q) -> Option<V> {
        self.map.remove(k)
    }

    pub fn remove_entry<Q: ?Sized + Hash + hashbrown::Equivalent<K>>(&mut self, k: &Q) -> Option<(K, V)> {
        self.map.remove_entry(k)
    }

    pub fn get_mut<Q: ?Sized + Hash + hashbrown::Equivalent<K>>(&mut self, k: &Q) -> Option<&mut V> {
        self.map.get_mut(k)
    }

    pub fn entry(&mut self, key: K) -> hashbrown::hash_map::Entry<'_, K, V, FixedState, HeapAlloc<'h>> {
        self.map.entry(key)
    }

    pub fn iter_mut(&mut self) -> hashbrown::hash_map::IterMut<'_, K, V> {
        self.map.iter_mut()
    }

    pub fn values_mut(&mut self) -> hashbrown::hash_map::ValuesMut<'_, K, V> {
        self.map.values_mut()
    }

    pub fn retain(&mut self, f: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(f)
    }

    /// Remove every entry; the table stays allocated.
    pub fn clear(&mut self) {
        self.map.clear()
    }

    pub fn drain(&mut self) -> hashbrown::hash_map::Drain<'_, K, V, HeapAlloc<'h>> {
        self.map.drain()
    }

    /// Make room for `additional` more entries; aborts if the heap is full.
    pub fn reserve(&mut self, additional: usize) {
        self.map.reserve(additional)
    }

    /// Make room for `additional` more entries, or say the heap is full. Call it before an
    /// `insert` that must not abort on a full heap.
    pub fn try_reserve(&mut self, additional: usize) -> Result<(), hashbrown::TryReserveError> {
        self.map.try_reserve(additional)
    }

    /// Shrink to hold `max(len, min_capacity, 1)` entries.
    pub fn shrink_to(&mut self, min_capacity: usize) {
        self.map.shrink_to(min_capacity.max(1))
    }

    pub fn shrink_to_fit(&mut self) {
        self.shrink_to(1)
    }

    /// The hashbrown map itself, out of the wrapper (it is no longer `Persistent`).
    pub fn into_inner(self) -> Inner<'h, K, V> {
        self.map
    }
}

/// Look a [`PVec`] key up by a plain slice: `map.get(&BySlice(b"key"))`. (allocator-api2's
/// `Vec` does not implement `Borrow<[T]>`, which `map.get(&b"key"[..])` would need.) Hashes
/// exactly as the `PVec` holding the same elements does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BySlice<'a, T>(pub &'a [T]);

impl<T: Hash> Hash for BySlice<'_, T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The same as <Vec<T, A> as Hash>::hash, which hashes the slice.
        self.0.hash(state)
    }
}

impl<T: PartialEq> hashbrown::Equivalent<PVec<'_, T>> for BySlice<'_, T> {
    fn equivalent(&self, key: &PVec<'_, T>) -> bool {
        self.0 == &key[..]
    }
}

// ---- the layout fingerprint ---------------------------------------------------------------

/// A fingerprint of everything in this build that decides how heap collections are laid out
/// and hashed: sizes of the collection types, the field order of `PVec`, and the hashes std's
/// `Hash` impls produce through `FixedState`. Recorded at format; a different value at open
/// means the program was built in a way that would misread the heap.
pub(crate) fn layout_fingerprint() -> u64 {
    let mut h = fingerprint(b"fams object layout");
    let mut mix = |v: u64| h = fingerprint_combine(h, v);
    mix(super::raw::OBJECT_FORMAT_VERSION as u64);
    mix(PAGE_BYTES);
    for (size, align) in [
        (size_of::<PVec<'_, u8>>(), align_of::<PVec<'_, u8>>()),
        (size_of::<PVec<'_, u64>>(), align_of::<PVec<'_, u64>>()),
        (size_of::<PBox<'_, u64>>(), align_of::<PBox<'_, u64>>()),
        (size_of::<PHashMap<'_, u64, u64>>(), align_of::<PHashMap<'_, u64, u64>>()),
        (size_of::<PHashMap<'_, PVec<'_, u8>, PVec<'_, u8>>>(), align_of::<PHashMap<'_, PVec<'_, u8>, PVec<'_, u8>>>()),
        (size_of::<FixedState>(), align_of::<FixedState>()),
        (size_of::<HeapAlloc<'_>>(), align_of::<HeapAlloc<'_>>()),
    ] {
        mix(size as u64);
        mix(align as u64);
    }
    // Where PVec keeps its pointer, capacity, length and allocator.
    {
        // SAFETY: HeapAlloc::new's contract is about using the handle; this one is never used.
        let alloc = unsafe { HeapAlloc::new(NonNull::new(0x4444_0000 as *mut u8).expect("nonzero")) };
        // SAFETY: from_raw_parts_in only stores the four fields; the vector is never read
        // through, grown or dropped (ManuallyDrop), only its own bytes are looked at.
        let v = std::mem::ManuallyDrop::new(unsafe { PVec::<u64>::from_raw_parts_in(0x1000 as *mut u64, 2, 3, alloc) });
        let p = (&*v as *const PVec<'_, u64>).cast::<u8>();
        // SAFETY: PVec<u64> is four word-sized fields with no padding; reading its bytes is
        // reading initialised memory.
        let bytes = unsafe { std::slice::from_raw_parts(p, size_of::<PVec<'_, u64>>()) };
        mix(fingerprint(bytes));
    }
    let fs = FixedState::with_keys(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    mix(fs.hash_one("fams"));
    mix(fs.hash_one(&b"key"[..]));
    mix(fs.hash_one(b"key".to_vec()));
    mix(fs.hash_one((1u32, 2u64, -3i8)));
    mix(fs.hash_one(Some(5u16)));
    mix(fs.hash_one(['x', 'y']));
    mix(fs.hash_one(true));
    mix(fs.hash_one(7usize));
    mix(fs.hash_one(String::from("s")));
    h
}
