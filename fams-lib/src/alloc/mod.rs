//! Objects and collections in the heap: a persistent allocator, roots, and Rust collections
//! whose memory is in the heap.
//!
//! The allocator's metadata lives in the heap itself, so an allocation becomes durable in the
//! same commit as the data written into it, and a crash rolls both back together: a crash can
//! neither leak an object nor hand the same memory out twice. See [`raw`]'s docs for the on-heap
//! layout (size-class slabs whose free bitmap is in the slab's own page; large blocks with
//! boundary tags that coalesce; a metadata block at the start of the heap).
//!
//! ```
//! use fams::alloc::{ObjectHeap, ObjectOptions, PHashMap, PVec};
//! use fams::{FormatOptions, Heap, HeapOptions};
//!
//! fams::persistent! {
//!     /// The application's root object: everything reachable from it persists.
//!     pub struct Root<'h> {
//!         pub visits: u64,
//!         pub names: PHashMap<'h, PVec<'h, u8>, u64>,
//!     }
//! }
//!
//! # let dir = format!("/var/tmp/fams-doctest-{}", std::process::id());
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = format!("{dir}/app.heap");
//! Heap::format(&FormatOptions::new(&path, 64 << 20))?; // once
//! let heap = Heap::open(&path, &HeapOptions::default())?;
//! let mut objects = ObjectHeap::open(heap, &ObjectOptions::schema(1))?; // your schema version
//! let (root, alloc) = objects.root_with_alloc(|a| Root { visits: 0, names: PHashMap::new_in(a) })?;
//! root.visits += 1;
//! let mut name = PVec::new_in(alloc);
//! name.extend_from_slice(b"ada");
//! root.names.insert(name, root.visits);
//! objects.commit()?; // the map, its new entry and the allocator's metadata: durable together
//! # drop(objects);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), fams::ObjectError>(())
//! ```
//!
//! # What may be stored
//!
//! Only [`Persistent`] types: plain data, arrays and tuples of them, and [`PVec`], [`PBox`],
//! [`PHashMap`] of them — collections whose allocator is this heap's [`HeapAlloc`]. No
//! references, no `Box`/`Vec`/`String`/`HashMap` of the global allocator, no `Rc`/`Arc`, no file
//! descriptors or other process-local handles, no function pointers. Declare your own structs
//! with [`persistent!`](crate::persistent), which checks every field.
//!
//! # Soundness
//!
//! - An [`ObjectHeap`] owns its [`Heap`]: nobody can scribble over objects with `bytes_mut()`.
//! - References into the heap ([`ObjectHeap::root`]) and allocator handles ([`HeapAlloc`])
//!   borrow the `ObjectHeap` mutably, so they cannot outlive the mapping, and no commit, no
//!   `heap().bytes()` and no second root borrow can happen while they exist. The allocator
//!   writes its metadata through raw pointers, which no reference ever covers.
//! - The heap is single-threaded: `ObjectHeap`, `HeapAlloc` and the collections are neither
//!   `Send` nor `Sync`.
//! - A typed root records its size, alignment and [`Persistent::FINGERPRINT`]; opening it as a
//!   different type is an error, not a reinterpretation.
//! - Collections' infallible methods (`push`, `insert`) abort the process when the heap is full
//!   (as std's do when memory runs out): use `try_reserve` first where that matters. The
//!   allocator's own API ([`HeapAlloc::try_alloc`], [`ObjectHeap::alloc`]) returns
//!   [`ObjectError::Exhausted`].
//! - Damaged metadata (a link, size or tag that contradicts the rest, read from the heap) stops
//!   the operation at the first contradiction with [`ObjectError::Damaged`]; nothing is written
//!   after it. The heap then refuses allocations and commits ([`ObjectError::Corrupt`], naming
//!   the problem) until [`ObjectHeap::rollback`] (or reopening) brings back the last commit. A
//!   panic part way through an operation (a bug) poisons the heap the same way
//!   ([`ObjectError::Poisoned`]).

mod check;
pub mod collections;
#[cfg(feature = "testing")]
pub mod fuzz;
pub mod persistent;
pub mod raw;
/// If the heap is larger than the object layer's recorded size (`famsd grow`, a growth whose
/// commit a crash lost, or one inside a rolled-back operation), give the new space to the
/// allocator. Written into the heap: durable with the next commit; until then a crash leads here
/// again. `raw` spans the whole heap of `len` bytes.
fn take_grown_space(raw: Raw, base: NonNull<u8>, len: u64, path: &std::path::Path) -> Result<Raw, ObjectError> {
    let recorded = raw.recorded_heap_bytes();
    if recorded < len && recorded >= raw::OBJECT_HEAP_BYTES_MIN && recorded % 4096 == 0 {
        // SAFETY: recorded < len, so [base, base + recorded) lies inside the mapped heap.
        let old = unsafe { Raw::new(base, recorded) };
        old.meta_sane().map_err(|p| ObjectError::Corrupt { path: path.to_path_buf(), problems: vec![p] })?;
        Ok(old.extend_to(len))
    } else {
        Ok(raw)
    }
}

#[cfg(test)]
mod tests;

pub use check::CheckReport;
pub use collections::{BySlice, FixedState, HeapAlloc, PBox, PHashMap, PVec, SipHasher13};
pub use persistent::{fingerprint, fingerprint_combine, Persistent};
pub use raw::{
    NAMED_ROOTS_MAX, OBJECT_FORMAT_VERSION, OBJECT_HEAP_BYTES_MIN, OBJECT_META_BYTES, ROOT_NAME_BYTES_MAX,
    SIZE_CLASSES_BYTES, SMALL_OBJECT_BYTES_MAX,
};

use crate::{DurabilityHandle, Heap, InFlight, RollbackReport, Stats, Ticket};
use raw::{MetaState, Raw, RootEntry};
use std::alloc::Layout;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::ptr::NonNull;

/// Errors of the object layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    #[error(transparent)]
    Heap(#[from] crate::Error),

    #[error("heap exhausted: no free block holds {requested_bytes} bytes aligned to {align_bytes} ({top_bytes} bytes never used remain at the end, and the heap is at its maximum size); free objects, or format with a larger --max-size")]
    Exhausted { requested_bytes: u64, align_bytes: u64, top_bytes: u64 },

    #[error("{path}: not an object heap: {reason}")]
    NotAnObjectHeap { path: PathBuf, reason: String },

    #[error("{path}: the object layer's format version is {found}, this program reads version {supported}; open it with a matching fams build")]
    FormatVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("{path}: the application's schema version in the heap is {found}, this program expects {expected}; migrate the heap (open it with ObjectOptions {{ schema_version: None, .. }} and set_schema_version) or use the matching program")]
    SchemaVersion { path: PathBuf, found: u64, expected: u64 },

    #[error("{path}: the heap's collections were laid out by a differently built program (layout fingerprint {found:#x}, this build {expected:#x}: another fams, hashbrown or allocator-api2 version, or a toolchain that hashes std types differently); open it with the build that wrote it")]
    LayoutChanged { path: PathBuf, found: u64, expected: u64 },

    #[error("root {name:?} holds a {found_size}-byte object (align {found_align}, fingerprint {found_fingerprint:#x}), not a {expected} ({expected_size} bytes, align {expected_align}, fingerprint {expected_fingerprint:#x}); the type's definition changed: bump the schema version and migrate")]
    RootType {
        name: String,
        expected: &'static str,
        found_size: u64,
        found_align: u64,
        found_fingerprint: u64,
        expected_size: u64,
        expected_align: u64,
        expected_fingerprint: u64,
    },

    #[error("{path}: the object heap's metadata is damaged: {}", problems.join("; "))]
    Corrupt { path: PathBuf, problems: Vec<String> },

    #[error("the object heap mapped at {base:#x}: {problem}; the allocator stopped before changing anything more, and refuses allocations and commits until the heap is rolled back (ObjectHeap::rollback) or reopened")]
    Damaged { base: u64, problem: String },

    #[error("{path}: the allocator panicked part way through an operation; commits are refused. Roll back (ObjectHeap::rollback), or drop the heap and reopen it, to recover the last commit")]
    Poisoned { path: PathBuf },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// How to open an [`ObjectHeap`].
#[derive(Clone, Debug)]
pub struct ObjectOptions {
    /// The application's schema version. `Some(v)`: recorded when the object layer is created,
    /// and opening a heap that records another version fails with
    /// [`ObjectError::SchemaVersion`]. `None`: not checked (for migration tools); a new heap
    /// records 0.
    pub schema_version: Option<u64>,
    /// Create the object layer on a fresh heap (first two pages all zero). Default true.
    pub create: bool,
    /// When an allocation does not fit, grow the heap ([`Heap::grow`]) by at least this many
    /// bytes (and by at least the heap's current size, so growth steps double until they reach
    /// this), up to its maximum size. Default 64 MiB. 0: never grow (allocations past the end
    /// fail with [`ObjectError::Exhausted`]).
    pub grow_step_bytes: u64,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        ObjectOptions { schema_version: None, create: true, grow_step_bytes: 64 << 20 }
    }
}

impl ObjectOptions {
    pub fn schema(version: u64) -> ObjectOptions {
        ObjectOptions { schema_version: Some(version), ..ObjectOptions::default() }
    }
}

impl Drop for ObjectHeap {
    fn drop(&mut self) {
        collections::clear_grower(self.raw.base(), self);
    }
}

/// A named root, as listed by [`ObjectHeap::named_roots`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    pub name: String,
    /// Offset of the object from the heap's base.
    pub offset: u64,
    pub size: u64,
    pub align: u64,
    pub fingerprint: u64,
}

/// A heap with the object layer: an allocator, roots and collections inside it. Owns the
/// [`Heap`]; commit through it.
pub struct ObjectHeap {
    heap: Heap,
    raw: Raw,
    grow_step_bytes: u64,
}

impl ObjectHeap {
    /// Open the object layer of `heap`, creating it if the heap is fresh (and committing that).
    ///
    /// Errors: [`ObjectError::NotAnObjectHeap`] if the heap holds other data,
    /// [`ObjectError::FormatVersion`], [`ObjectError::SchemaVersion`],
    /// [`ObjectError::LayoutChanged`] on mismatches, [`ObjectError::Corrupt`] if the metadata
    /// block is damaged. Never panics on what is in the heap.
    pub fn open(mut heap: Heap, opts: &ObjectOptions) -> Result<ObjectHeap, ObjectError> {
        let base = NonNull::new(heap.base()).ok_or_else(|| ObjectError::InvalidArgument("heap at address 0".into()))?;
        let path = heap.path().to_path_buf();
        let len = heap.len() as u64;
        // SAFETY: the heap is mapped for as long as `heap` lives, which the ObjectHeap owns; we
        // hold it by value, so nothing else can access the mapping.
        let raw = unsafe { Raw::new(base, len) };
        let expected_fp = collections::layout_fingerprint();
        collections::clear_poison(base);
        match raw.meta_state() {
            MetaState::Foreign(reason) => return Err(ObjectError::NotAnObjectHeap { path, reason }),
            MetaState::Fresh if !opts.create => {
                return Err(ObjectError::NotAnObjectHeap {
                    path,
                    reason: "the heap is empty and ObjectOptions::create is false".into(),
                })
            }
            MetaState::Fresh => {
                raw.format(opts.schema_version.unwrap_or(0), expected_fp)?;
                heap.commit()?;
            }
            MetaState::Ours => {}
        }
        let raw = take_grown_space(raw, base, len, &path)?;
        let found = raw.format_version();
        if found != raw::OBJECT_FORMAT_VERSION {
            return Err(ObjectError::FormatVersion { path, found, supported: raw::OBJECT_FORMAT_VERSION });
        }
        if raw.recorded_heap_bytes() != len || raw.recorded_base() != base.as_ptr() as u64 {
            return Err(ObjectError::Corrupt {
                path,
                problems: vec![format!(
                    "the object layer was made for a heap of {} bytes at {:#x}, this one is {len} bytes at {:p}",
                    raw.recorded_heap_bytes(),
                    raw.recorded_base(),
                    base
                )],
            });
        }
        raw.meta_sane().map_err(|p| ObjectError::Corrupt { path: path.clone(), problems: vec![p] })?;
        if raw.layout_fingerprint() != expected_fp {
            return Err(ObjectError::LayoutChanged { path, found: raw.layout_fingerprint(), expected: expected_fp });
        }
        if let Some(expected) = opts.schema_version {
            let found = raw.schema_version();
            if found != expected {
                return Err(ObjectError::SchemaVersion { path, found, expected });
            }
        }
        Ok(ObjectHeap { heap, raw, grow_step_bytes: opts.grow_step_bytes })
    }

    /// The heap, for reading (`bytes()`, `stats()`, `path()`…). Writing is only through objects.
    pub fn heap(&self) -> &Heap {
        &self.heap
    }

    /// Give the heap back (objects stay in it).
    pub fn into_heap(mut self) -> Heap {
        collections::clear_grower(self.raw.base(), &mut self);
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the heap is moved out exactly once; the other
        // fields are plain data with nothing to drop.
        unsafe { std::ptr::read(&this.heap) }
    }

    /// Close the heap, reporting a failed final checkpoint (see [`Heap::close`]). Uncommitted
    /// changes are lost.
    pub fn close(self) -> Result<(), ObjectError> {
        Ok(self.into_heap().close()?)
    }

    /// Close as a crash would (see [`Heap::abandon`]): uncommitted changes are lost.
    pub fn abandon(self) {
        self.into_heap().abandon()
    }

    fn check_poison(&self) -> Result<(), ObjectError> {
        let path = || self.heap.path().to_path_buf();
        match collections::poison_of(self.raw.base()) {
            None => Ok(()),
            Some(collections::Poison::Panicked) => Err(ObjectError::Poisoned { path: path() }),
            Some(collections::Poison::Damaged(problem)) => {
                Err(ObjectError::Corrupt { path: path(), problems: vec![problem] })
            }
        }
    }

    /// Make everything written so far — objects and the allocator's metadata — durable, all or
    /// nothing. See [`Heap::commit`].
    pub fn commit(&mut self) -> Result<Ticket, ObjectError> {
        self.check_poison()?;
        Ok(self.heap.commit()?)
    }

    /// See [`Heap::commit_async`].
    pub fn commit_async(&mut self) -> Result<Ticket, ObjectError> {
        self.check_poison()?;
        Ok(self.heap.commit_async()?)
    }

    /// See [`Heap::write_step`] (a heap opened with [`crate::WriterMode::Manual`]).
    pub fn write_step(&mut self) -> Result<bool, ObjectError> {
        Ok(self.heap.write_step()?)
    }

    /// See [`Heap::wait`].
    pub fn wait(&self, ticket: Ticket) -> Result<(), ObjectError> {
        Ok(self.heap.wait(ticket)?)
    }

    /// See [`Heap::is_durable`].
    pub fn is_durable(&self, ticket: Ticket) -> Result<bool, ObjectError> {
        Ok(self.heap.is_durable(ticket)?)
    }

    /// See [`Heap::durable`].
    pub fn durable(&self) -> Ticket {
        self.heap.durable()
    }

    /// See [`Heap::durability_fd`].
    pub fn durability_fd(&self) -> BorrowedFd<'_> {
        self.heap.durability_fd()
    }

    /// See [`Heap::poll_durable`].
    pub fn poll_durable(&self) -> Result<Ticket, ObjectError> {
        Ok(self.heap.poll_durable()?)
    }

    /// See [`Heap::durability_handle`].
    pub fn durability_handle(&self) -> DurabilityHandle {
        self.heap.durability_handle()
    }

    /// See [`Heap::in_flight`].
    pub fn in_flight(&self) -> InFlight {
        self.heap.in_flight()
    }

    /// See [`Heap::set_in_flight_limit`].
    pub fn set_in_flight_limit(&mut self, commits: Option<u64>, bytes: Option<u64>) {
        self.heap.set_in_flight_limit(commits, bytes)
    }

    /// See [`Heap::would_block`].
    pub fn would_block(&self) -> bool {
        self.heap.would_block()
    }

    /// Undo everything written since the last `commit`/`commit_async` — objects, collections
    /// and the allocator's metadata together (see [`Heap::rollback`]): allocations made since
    /// then are gone, frees are undone, roots are back. This is also the recovery from an
    /// allocator panic: the half-updated metadata is replaced by the last captured one, so the
    /// poisoned flag is lifted.
    ///
    /// No value referring into the heap can be alive across the call (they all borrow the
    /// `ObjectHeap`), so nothing can observe the undone objects. The allocator keeps no state
    /// outside the heap ([`HeapAlloc`] is the base address; the rest is read from the metadata
    /// block on every call), so once the bytes are back the allocator is too; the metadata
    /// block's sanity is checked again before the poison is lifted.
    pub fn rollback(&mut self) -> Result<RollbackReport, ObjectError> {
        let report = self.heap.rollback()?;
        let path = self.heap.path().to_path_buf();
        // A growth inside the rolled-back operation stays (the heap's size is durable at once),
        // while the allocator's record of it was rolled back with the rest: take the space again.
        self.raw = take_grown_space(self.raw, self.raw.base(), self.heap.len() as u64, &path)?;
        match self.raw.meta_state() {
            MetaState::Ours => {}
            MetaState::Fresh | MetaState::Foreign(_) => {
                return Err(ObjectError::Corrupt {
                    path,
                    problems: vec!["after a rollback the metadata block is not the object layer's".into()],
                })
            }
        }
        self.raw.meta_sane().map_err(|p| ObjectError::Corrupt { path, problems: vec![p] })?;
        collections::clear_poison(self.raw.base());
        Ok(report)
    }

    /// See [`Heap::release_committed`].
    pub fn release_committed(&mut self) -> Result<usize, ObjectError> {
        Ok(self.heap.release_committed()?)
    }

    pub fn stats(&self) -> Stats {
        self.heap.stats()
    }

    /// Resident and private memory of the heap's mapping (see [`Heap::memory`]).
    pub fn memory(&self) -> crate::stats::Memory {
        self.heap.memory()
    }

    /// The application's schema version recorded in the heap.
    pub fn schema_version(&self) -> u64 {
        self.raw.schema_version()
    }

    /// Record a new schema version (after migrating); durable at the next commit.
    pub fn set_schema_version(&mut self, version: u64) {
        self.raw.set_schema_version(version)
    }

    /// The allocator, for making collections. Borrows the heap mutably for as long as the
    /// handle (or anything made with it) lives.
    pub fn allocator(&mut self) -> HeapAlloc<'_> {
        collections::set_grower(self.raw.base(), self);
        // SAFETY: the mutable borrow of self keeps the mapping alive and every other access to
        // the heap out for 'h.
        unsafe { HeapAlloc::new(self.raw.base()) }
    }

    /// Allocate raw memory (`zeroed`: filled with zeros). The pointer stays valid across
    /// restarts; store it (or its offset from `heap().base()`) in the heap.
    ///
    /// When nothing free fits, the heap grows (see [`ObjectOptions::grow_step_bytes`]) up to its
    /// maximum size; [`ObjectError::Exhausted`] only there. A growth that fails (a full disk)
    /// is that error, and nothing committed is lost.
    pub fn alloc(&mut self, layout: Layout, zeroed: bool) -> Result<NonNull<u8>, ObjectError> {
        self.allocator().try_alloc(layout, zeroed)
    }

    /// Grow the heap (by the policy) so that an allocation of `layout` may fit, or say why not.
    pub(crate) fn grow_for(&mut self, layout: Layout) -> Result<(), ObjectError> {
        if !self.can_grow() {
            let top = self.raw.region_end().saturating_sub(self.raw.top_unchecked());
            return Err(ObjectError::Exhausted {
                requested_bytes: layout.size() as u64,
                align_bytes: layout.align() as u64,
                top_bytes: top,
            });
        }
        let need = layout.size().max(layout.align()) as u64 * 2 + 2 * raw::PAGE_BYTES;
        self.grow_by(need)
    }

    fn can_grow(&self) -> bool {
        self.grow_step_bytes > 0 && self.heap.len() < self.heap.max_len()
    }

    /// Grow the heap by at least `need` bytes following the growth policy, and give the new
    /// space to the allocator.
    fn grow_by(&mut self, need: u64) -> Result<(), ObjectError> {
        let len = self.heap.len() as u64;
        let step = need.max(self.grow_step_bytes.min(len.max(raw::PAGE_BYTES)));
        let new = len.saturating_add(step).min(self.heap.max_len() as u64);
        self.grow(new)
    }

    /// Grow the heap to `new_size_bytes` ([`Heap::grow`]) and give the new space to the
    /// allocator (recorded in the heap, durable with the next commit).
    pub fn grow(&mut self, new_size_bytes: u64) -> Result<(), ObjectError> {
        self.heap.grow(new_size_bytes)?;
        let len = self.heap.len() as u64;
        if len > self.raw.recorded_heap_bytes() {
            self.raw = self.raw.extend_to(len);
        }
        Ok(())
    }

    /// Free raw memory.
    ///
    /// # Safety
    /// `ptr` came from this heap's allocator with `layout` and is not used afterwards.
    pub unsafe fn dealloc(&mut self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.allocator().dealloc(ptr, layout) }
    }

    /// Get the main root, or create it with `init` (which receives the allocator, for the
    /// root's collections). The root's type is recorded; asking for another type is
    /// [`ObjectError::RootType`].
    pub fn root<'h, T: Persistent + 'h>(
        &'h mut self,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<&'h mut T, ObjectError> {
        self.root_in(None, "", init).map(|(r, _)| r)
    }

    /// [`ObjectHeap::root`], also returning the allocator (to build new values for the root).
    pub fn root_with_alloc<'h, T: Persistent + 'h>(
        &'h mut self,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<(&'h mut T, HeapAlloc<'h>), ObjectError> {
        self.root_in(None, "", init)
    }

    /// Get the root called `name`, or create it with `init`. Up to [`NAMED_ROOTS_MAX`] names of
    /// up to [`ROOT_NAME_BYTES_MAX`] bytes.
    pub fn named_root<'h, T: Persistent + 'h>(
        &'h mut self,
        name: &str,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<(&'h mut T, HeapAlloc<'h>), ObjectError> {
        let slot = self.named_slot(name)?;
        self.root_in(Some(slot), name, init)
    }

    /// Remove the root called `name`, returning its object (whose heap memory is freed when
    /// the value is dropped). `Ok(None)` if there is no such root.
    pub fn take_named_root<'h, T: Persistent + 'h>(&'h mut self, name: &str) -> Result<Option<T>, ObjectError> {
        let Some(slot) = self.find_named(name) else { return Ok(None) };
        self.take_root_in(Some(slot))
    }

    /// Remove the main root, returning its object.
    pub fn take_root<'h, T: Persistent + 'h>(&'h mut self) -> Result<Option<T>, ObjectError> {
        self.take_root_in(None)
    }

    /// Every named root (not the main one).
    pub fn named_roots(&self) -> Vec<RootInfo> {
        (0..NAMED_ROOTS_MAX)
            .filter_map(|i| self.raw.read_root(Some(i)))
            .map(|e| RootInfo {
                name: e.name,
                offset: e.offset,
                size: e.size,
                align: e.align,
                fingerprint: e.fingerprint,
            })
            .collect()
    }

    /// Walk and verify all of the allocator's metadata: every block's tags, coalescing, the free
    /// lists, every slab's bitmap and counts, the partial-slab lists, the roots. Returns the
    /// totals, or [`ObjectError::Corrupt`] listing every problem found. Reads only.
    pub fn check(&self) -> Result<CheckReport, ObjectError> {
        let (report, problems) = self.raw.check(None);
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(ObjectError::Corrupt { path: self.heap.path().to_path_buf(), problems })
        }
    }

    /// Every live allocation as (offset from the base, bytes reserved for it: the size class
    /// of a small object, the block less its tag for a large one), in address order within each
    /// kind. For tests and debugging; walks the whole heap.
    pub fn allocations(&self) -> Result<Vec<(u64, u64)>, ObjectError> {
        let mut out = Vec::new();
        let (_, problems) = self.raw.check(Some(&mut out));
        if !problems.is_empty() {
            return Err(ObjectError::Corrupt { path: self.heap.path().to_path_buf(), problems });
        }
        out.sort_unstable();
        Ok(out)
    }

    fn find_named(&self, name: &str) -> Option<usize> {
        (0..NAMED_ROOTS_MAX).find(|&i| self.raw.read_root(Some(i)).is_some_and(|e| e.name == name))
    }

    fn named_slot(&self, name: &str) -> Result<usize, ObjectError> {
        if name.is_empty() || name.len() > ROOT_NAME_BYTES_MAX {
            return Err(ObjectError::InvalidArgument(format!(
                "a root name has 1 to {ROOT_NAME_BYTES_MAX} bytes; {name:?} has {}",
                name.len()
            )));
        }
        if let Some(i) = self.find_named(name) {
            return Ok(i);
        }
        (0..NAMED_ROOTS_MAX).find(|&i| self.raw.read_root(Some(i)).is_none()).ok_or_else(|| {
            ObjectError::InvalidArgument(format!("all {NAMED_ROOTS_MAX} named roots are taken; cannot add {name:?}"))
        })
    }

    fn expect_type<T: Persistent>(e: &RootEntry) -> Result<(), ObjectError> {
        let (size, align) = (size_of::<T>() as u64, align_of::<T>() as u64);
        if e.size != size || e.align != align || e.fingerprint != T::FINGERPRINT {
            return Err(ObjectError::RootType {
                name: e.name.clone(),
                expected: std::any::type_name::<T>(),
                found_size: e.size,
                found_align: e.align,
                found_fingerprint: e.fingerprint,
                expected_size: size,
                expected_align: align,
                expected_fingerprint: T::FINGERPRINT,
            });
        }
        Ok(())
    }

    /// A root's object must lie in the block region, aligned: never hand out a reference to
    /// metadata or past the end, whatever the heap holds.
    fn expect_in_heap(&self, e: &RootEntry) -> Result<(), ObjectError> {
        if e.size == 0 {
            return Ok(());
        }
        let inside = e.offset >= OBJECT_META_BYTES
            && e.offset.checked_add(e.size).is_some_and(|end| end <= self.heap.len() as u64)
            && (self.raw.base().as_ptr() as u64 + e.offset) % e.align.max(1) == 0;
        if !inside {
            return Err(ObjectError::Corrupt {
                path: self.heap.path().to_path_buf(),
                problems: vec![format!(
                    "root {:?} points at {:#x} ({} bytes), outside the object region",
                    e.name, e.offset, e.size
                )],
            });
        }
        Ok(())
    }

    fn object_ptr<T>(&self, e: &RootEntry) -> *mut T {
        if size_of::<T>() == 0 {
            return NonNull::<T>::dangling().as_ptr();
        }
        self.raw.ptr(e.offset).cast()
    }

    fn root_in<'h, T: Persistent + 'h>(
        &'h mut self,
        slot: Option<usize>,
        name: &str,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<(&'h mut T, HeapAlloc<'h>), ObjectError> {
        collections::set_grower(self.raw.base(), self);
        // SAFETY: as in `allocator`: the handle borrows self mutably for 'h.
        let alloc = unsafe { HeapAlloc::new(self.raw.base()) };
        let ptr = match self.raw.read_root(slot) {
            Some(e) => {
                Self::expect_type::<T>(&e)?;
                self.expect_in_heap(&e)?;
                self.object_ptr::<T>(&e)
            }
            None => {
                let value = init(alloc);
                let layout = Layout::new::<T>();
                let p = alloc.try_alloc(layout, false)?; // on error `value` drops, freeing what it holds
                let ptr = p.as_ptr().cast::<T>();
                // SAFETY: a fresh allocation with T's layout (or a dangling aligned pointer for a
                // zero-sized T), which nothing else refers to.
                unsafe { ptr.write(value) };
                let offset = if size_of::<T>() == 0 { 0 } else { self.raw.offset_of(p.as_ptr())? };
                let entry = RootEntry {
                    name: name.to_string(),
                    offset,
                    size: layout.size() as u64,
                    align: layout.align() as u64,
                    fingerprint: T::FINGERPRINT,
                };
                self.raw.write_root(slot, Some(&entry));
                ptr
            }
        };
        // SAFETY: ptr points to a live T (written above, or in an earlier run with the same
        // recorded layout and fingerprint; T is Persistent, so those bytes are still a valid T);
        // the object is only reachable through this root entry, and the returned reference
        // borrows self mutably for 'h, so it is the only reference to it.
        Ok((unsafe { &mut *ptr }, alloc))
    }

    fn take_root_in<'h, T: Persistent + 'h>(&'h mut self, slot: Option<usize>) -> Result<Option<T>, ObjectError> {
        let Some(e) = self.raw.read_root(slot) else { return Ok(None) };
        Self::expect_type::<T>(&e)?;
        self.expect_in_heap(&e)?;
        let ptr = self.object_ptr::<T>(&e);
        // SAFETY: a live T (as in root_in); after the read the heap copy is freed and the entry
        // cleared, so the value is owned exactly once.
        let value = unsafe { ptr.read() };
        if let (true, Some(p)) = (size_of::<T>() != 0, NonNull::new(ptr.cast::<u8>())) {
            // SAFETY: the base of this open heap, mapped for as long as `self` borrows it.
            let alloc = unsafe { HeapAlloc::new(self.raw.base()) };
            // SAFETY: allocated by root_in with T's layout.
            unsafe { alloc.dealloc(p, Layout::new::<T>()) };
        }
        self.raw.write_root(slot, None);
        Ok(Some(value))
    }
}
