//! The allocator itself: every byte of its state lives in the heap, so it commits atomically
//! with the objects it hands out, and a crash rolls both back together.
//!
//! # On-heap layout
//!
//! All offsets are from the heap's base. Metadata never uses absolute addresses (the base is
//! fixed, but offsets keep `check()` readable and 0 free to mean "none").
//!
//! ```text
//! page 0  (0..4096)      the metadata block: magic, format version, heap size and base, the
//!                        application's schema version, the layout fingerprint, the block
//!                        region's bounds and top, the free-block bins, the partial-slab list
//!                        head of each size class, and the main root's entry
//! page 1  (4096..8192)   31 named-root entries of 128 bytes; the last 16 bytes hold the
//!                        sentinel tag that stands for "the block before the first block"
//! 8192..top              blocks, each ending in a 16-byte boundary tag
//! top..heap end          never carved (the "top"): large requests that fit no free block are
//!                        cut from its start, and a freed block next to it merges back into it
//! ```
//!
//! ## Blocks and boundary tags
//!
//! Every block is a multiple of 16 bytes and ends in a **tag**: `w0 = size | flags`,
//! `w1 = start ^ TAG_CHECK`. Flags: `ALLOCATED`, `SLAB` (an allocated block holding a slab
//! page), `NEXT_FREE` (the block right after this one is free — the mirror image of dlmalloc's
//! "previous in use" bit: tags sit at the *end*, so an allocated large object's payload starts
//! at the block's first byte and a slab page is exactly one page). A free block also repeats
//! `w0` in its first word (so its end can be found from its start); free blocks of 48 bytes or
//! more are on a doubly linked list (`next`, `prev` at +8, +16) in the bin of their size's
//! power of two; smaller ones (16, 32 bytes: alignment and split leftovers) are on no list and
//! merge when a neighbour is freed. Two free blocks are never adjacent, and the block before the
//! top is never free.
//!
//! Freeing a large block reads the tag before it (is the previous block free? where does it
//! start?) and its own `NEXT_FREE` bit (is the next block free?), so coalescing touches only
//! the pages at the block's two ends and its neighbours' — plus the bins' list neighbours.
//!
//! ## Slabs (small objects)
//!
//! Requests up to [`SMALL_OBJECT_BYTES_MAX`] bytes (and alignment up to that) go to one of
//! [`SIZE_CLASSES_BYTES`]. A slab is one page-aligned page, itself a 4096-byte block of the large
//! allocator (flag `SLAB`): objects from the page's first byte, then a 64-byte slab header
//! (magic, class, free count, partial-list links, a 256-bit free bitmap, a check word), then
//! the page's tag. An object of class `c` sits at `page + i*c`, so it is aligned to the largest
//! power of two dividing `c`; a class is chosen only if that satisfies the requested alignment.
//! Allocating or freeing a small object therefore writes **one page**: the page holding the
//! object and its own bitmap. Only when a slab becomes full or stops being full is the class's
//! partial list (head in page 0, links in neighbouring slab headers) touched. An empty slab goes
//! back to the large allocator unless it is the only partial slab of its class.
//!
//! ## What is not stored
//!
//! No counters are kept in the heap (a counter every allocation updates would dirty one
//! central page per allocation); `check()` computes them by walking the blocks.

use super::ObjectError;
use std::alloc::Layout;
use std::ptr::NonNull;

/// The heap's page, as the allocator computes with it.
pub(crate) const PAGE_BYTES: u64 = crate::PAGE_SIZE as u64;
/// The largest request (size, and alignment) served from a slab; larger ones get a block.
pub const SMALL_OBJECT_BYTES_MAX: usize = 1024;
/// The size classes of small objects. All are multiples of 16, so every small object is at
/// least 16-byte aligned.
pub const SIZE_CLASSES_BYTES: [u32; 20] =
    [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024];
pub(super) const CLASS_COUNT: usize = SIZE_CLASSES_BYTES.len();
/// Bytes of heap the object layer keeps for itself before the first block.
pub const OBJECT_META_BYTES: u64 = 2 * PAGE_BYTES;
/// The smallest heap the object layer accepts: the metadata plus room for a few slabs.
pub const OBJECT_HEAP_BYTES_MIN: u64 = 16 * PAGE_BYTES;
/// Named roots besides the main root.
pub const NAMED_ROOTS_MAX: usize = 31;
/// The longest root name, in bytes of UTF-8.
pub const ROOT_NAME_BYTES_MAX: usize = 88;
/// The version of this on-heap format. Opening a heap recorded with another version is refused.
pub const OBJECT_FORMAT_VERSION: u32 = 1;
/// How many free blocks an allocation examines per bin before trying the top; only if the top
/// cannot serve it either are all free blocks examined (so exhaustion is reported only when no
/// free block fits).
pub(super) const FIT_SEARCH_STEPS_MAX: usize = 32;

pub(crate) const MAGIC: [u8; 8] = *b"FAMSOBJ\0";

// Page 0: the metadata block.
pub(super) const M_MAGIC: u64 = 0;
pub(super) const M_VERSION: u64 = 8;
pub(super) const M_HEAP_BYTES: u64 = 16;
pub(super) const M_BASE: u64 = 24;
pub(super) const M_SCHEMA: u64 = 32;
pub(super) const M_LAYOUT_FP: u64 = 40;
pub(super) const M_REGION_START: u64 = 48;
pub(super) const M_REGION_END: u64 = 56;
pub(super) const M_TOP: u64 = 64;
pub(super) const M_BINS_NONEMPTY: u64 = 72;
pub(super) const M_ROOT: u64 = 128; // the main root's entry, ROOT_ENTRY_BYTES
pub(super) const M_BINS: u64 = 256; // BIN_COUNT offsets
pub(super) const M_CLASSES: u64 = M_BINS + 8 * BIN_COUNT as u64; // CLASS_COUNT offsets
pub(super) const META_USED_END: u64 = M_CLASSES + 8 * CLASS_COUNT as u64;
const _: () = assert!(META_USED_END <= PAGE_BYTES);
// Page 1: named roots, then the sentinel tag.
pub(super) const M_NAMED_ROOTS: u64 = PAGE_BYTES;
pub(crate) const ROOT_ENTRY_BYTES: u64 = 128;
pub(super) const SENTINEL_TAG: u64 = OBJECT_META_BYTES - 16;
const _: () = assert!(M_NAMED_ROOTS + NAMED_ROOTS_MAX as u64 * ROOT_ENTRY_BYTES <= SENTINEL_TAG);
const _: () = assert!(ROOT_NAME_BYTES_MAX as u64 + 40 == ROOT_ENTRY_BYTES);

pub(super) const BIN_COUNT: usize = 48;
/// Free blocks smaller than this are on no list (a listed block needs size, next, prev + tag).
pub(super) const LISTED_FREE_BYTES_MIN: u64 = 48;

bitflags::bitflags! {
    /// The flags of a boundary tag, in the low bits of its first word (`w0 = size | flags`), as
    /// stored in the heap. Bit 3 is unused (sizes are multiples of 16): it is kept when read
    /// ([`TagFlags::of`]) so `check` can report it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct TagFlags: u64 {
        /// The block is allocated (else free).
        const ALLOCATED = 1;
        /// The block right after this one is free.
        const NEXT_FREE = 2;
        /// An allocated block holding a slab page.
        const SLAB = 4;
    }
}

/// The bits of `w0` that hold flags; the rest is the size.
pub(super) const FLAGS: u64 = 15;

impl TagFlags {
    /// The flag bits of a tag's first word, unknown ones included.
    pub(super) fn of(w0: u64) -> TagFlags {
        TagFlags::from_bits_retain(w0 & FLAGS)
    }
}
pub(super) const TAG_CHECK: u64 = 0x7a6b_5c4d_3e2f_1a0b;
pub(super) const SENTINEL_CHECK: u64 = 0x5e47_1e7a_6f46_414d;

// Slab header, at the end of the slab page, before its tag.
pub(super) const SLAB_HDR: u64 = PAGE_BYTES - 16 - 64;
pub(super) const SLAB_MAGIC: u64 = 0x5ab5_1ab0;
pub(super) const SLAB_CHECK: u64 = 0x51ab_c0de_51ab_c0de;
pub(super) const SH_WORD: u64 = 0; // magic (32) | class (16) | free count (16)
pub(super) const SH_NEXT: u64 = 8;
pub(super) const SH_PREV: u64 = 16;
pub(super) const SH_BITMAP: u64 = 24; // 4 words, 1 = allocated
pub(super) const SH_CHECK: u64 = 56;
pub(super) const SLAB_OBJECTS_MAX: u64 = 256;
const _: () = assert!(SLAB_HDR / 16 <= SLAB_OBJECTS_MAX);

pub(crate) fn objects_per_slab(class: usize) -> u64 {
    SLAB_HDR / SIZE_CLASSES_BYTES[class] as u64
}

/// The size class for a request, if it is small.
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    if size > SMALL_OBJECT_BYTES_MAX || align > SMALL_OBJECT_BYTES_MAX {
        return None;
    }
    let size = size.max(1);
    SIZE_CLASSES_BYTES.iter().position(|&c| c as usize >= size && c as usize % align == 0)
}

/// Bytes of the block a large request occupies (payload rounded to 16, plus the tag).
fn large_block_bytes(size: usize) -> Option<u64> {
    let size = u64::try_from(size).ok()?;
    size.checked_add(15).map(|s| (s & !15) + 16)
}

pub(super) fn bin_of(size: u64) -> usize {
    debug_assert!(size >= LISTED_FREE_BYTES_MIN);
    ((63 - size.leading_zeros()) as usize).min(BIN_COUNT - 1)
}

/// Where a live allocation is: a slot of a slab or a large block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    Small { class: usize },
    Large { block_bytes: u64 },
    Empty,
}

pub(crate) fn placement(layout: Layout) -> Placement {
    if layout.size() == 0 {
        return Placement::Empty;
    }
    match class_for(layout.size(), layout.align()) {
        Some(class) => Placement::Small { class },
        None => match large_block_bytes(layout.size()) {
            Some(block_bytes) => Placement::Large { block_bytes },
            None => Placement::Large { block_bytes: !15 },
        },
    }
}

/// A view of the allocator state in a mapped heap. Copy: it is just the base and the length.
///
/// All access to metadata goes through raw pointer reads and writes of whole words at offsets
/// the allocator computed; no Rust reference to metadata is ever created, so no reference a
/// user holds (they only ever get references to objects) can overlap a write made here.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    base: NonNull<u8>,
    len: u64,
}

/// The allocator found its metadata contradicting itself in the middle of an operation (or was
/// given a pointer or layout that matches no live object). The operation stopped before writing
/// anything more; [`ObjectError::Damaged`] carries this to the caller.
#[derive(Debug)]
pub(crate) struct Damaged {
    pub base: u64,
    pub problem: String,
}

impl From<Damaged> for ObjectError {
    fn from(d: Damaged) -> ObjectError {
        ObjectError::Damaged { base: d.base, problem: d.problem }
    }
}

/// Outcome of `Raw::validate_meta`.
pub(crate) enum MetaState {
    /// Page 0 and 1 are all zero: a fresh heap.
    Fresh,
    Ours,
    Foreign(String),
}

impl Raw {
    /// # Safety
    /// `[base, base+len)` must be a mapped, writable heap that stays mapped while this view (and
    /// any copy) is used, and nothing else may access the allocator's metadata meanwhile.
    pub(crate) unsafe fn new(base: NonNull<u8>, len: u64) -> Raw {
        debug_assert!(len % PAGE_BYTES == 0);
        Raw { base, len }
    }

    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Is `off` the offset of a whole, aligned word inside the heap?
    #[inline]
    fn word_inside(&self, off: u64) -> bool {
        off % 8 == 0 && off.checked_add(8).is_some_and(|end| end <= self.len)
    }

    /// Read a metadata word at an offset computed from metadata (which may be damaged).
    #[inline]
    fn rd(&self, off: u64) -> Result<u64, Damaged> {
        if !self.word_inside(off) {
            return self.damaged(format!("a link or size in the metadata leads to {off:#x}, outside the heap"));
        }
        Ok(self.peek(off))
    }

    /// Read a word, or 0 if `off` is outside the heap: for the fixed offsets of the metadata
    /// block (inside every heap the object layer opens) and for `check`, which validates what it
    /// follows and reports problems instead of failing.
    #[inline]
    pub(super) fn peek(&self, off: u64) -> u64 {
        if !self.word_inside(off) {
            return 0;
        }
        // SAFETY: in bounds (checked); the heap is mapped for the life of self (Raw::new's
        // contract).
        let p = unsafe { self.base.as_ptr().add(off as usize) };
        // SAFETY: a word inside the mapping, 8-aligned (base is page-aligned); a plain read races
        // with nothing because the heap is single-threaded.
        unsafe { p.cast::<u64>().read() }
    }

    /// Write a metadata word, skipping the write (and so the page fault that marks the page
    /// dirty) when the word already holds the value.
    #[inline]
    fn wr(&self, off: u64, v: u64) -> Result<(), Damaged> {
        if !self.word_inside(off) {
            return self.damaged(format!("a link in the metadata leads to {off:#x}, outside the heap"));
        }
        // SAFETY: in bounds (checked), as in `peek`.
        let p = unsafe { self.base.as_ptr().add(off as usize) }.cast::<u64>();
        // SAFETY: as in `peek`.
        if unsafe { p.read() } != v {
            // SAFETY: as in `peek`; the word belongs to allocator metadata, which no reference
            // covers.
            unsafe { p.write(v) };
        }
        Ok(())
    }

    /// Write a word of the metadata block (a fixed offset inside every heap the layer opens).
    fn wr_meta(&self, off: u64, v: u64) {
        debug_assert!(off < OBJECT_META_BYTES);
        // Cannot fail: the object layer never opens a heap smaller than its metadata block.
        let _ = self.wr(off, v);
    }

    /// Stop the operation: the metadata contradicts itself (or a pointer or layout given to
    /// free does not match it). The caller fails; nothing more is written.
    fn damaged<T>(&self, problem: String) -> Result<T, Damaged> {
        Err(self.damage(problem))
    }

    fn damage(&self, problem: String) -> Damaged {
        Damaged { base: self.base.as_ptr() as u64, problem }
    }

    pub(crate) fn ptr(&self, off: u64) -> *mut u8 {
        debug_assert!(off <= self.len);
        // SAFETY: off is inside the mapping (or one past its end), so the result stays in bounds.
        unsafe { self.base.as_ptr().add(off as usize) }
    }

    pub(crate) fn offset_of(&self, p: *const u8) -> Result<u64, Damaged> {
        let off = (p as usize).wrapping_sub(self.base.as_ptr() as usize) as u64;
        if off >= self.len {
            return self.damaged(format!("pointer {p:p} is not inside the heap at {:p}", self.base));
        }
        Ok(off)
    }

    fn abs(&self, off: u64) -> u64 {
        self.base.as_ptr() as u64 + off
    }

    fn align_up_abs(&self, off: u64, align: u64) -> Option<u64> {
        let a = self.abs(off);
        let up = a.checked_add(align - 1)? & !(align - 1);
        Some(up - self.base.as_ptr() as u64)
    }

    // ---- metadata -------------------------------------------------------------------------

    pub(crate) fn meta_state(&self) -> MetaState {
        if self.len < OBJECT_META_BYTES {
            return MetaState::Foreign(format!("the heap is {} bytes, too small for objects", self.len));
        }
        let magic = self.peek(M_MAGIC).to_le_bytes();
        if magic == MAGIC {
            return MetaState::Ours;
        }
        if (0..OBJECT_META_BYTES).step_by(8).all(|o| self.peek(o) == 0) {
            return MetaState::Fresh;
        }
        MetaState::Foreign(format!(
            "its first bytes are {:02x?}, not the object layer's magic {:?} (the heap holds data written without the object layer)",
            magic,
            String::from_utf8_lossy(&MAGIC[..7])
        ))
    }

    pub(crate) fn format_version(&self) -> u32 {
        self.peek(M_VERSION) as u32
    }
    pub(crate) fn recorded_heap_bytes(&self) -> u64 {
        self.peek(M_HEAP_BYTES)
    }
    pub(crate) fn recorded_base(&self) -> u64 {
        self.peek(M_BASE)
    }
    pub(crate) fn schema_version(&self) -> u64 {
        self.peek(M_SCHEMA)
    }
    pub(crate) fn set_schema_version(&self, v: u64) {
        self.wr_meta(M_SCHEMA, v)
    }
    pub(crate) fn layout_fingerprint(&self) -> u64 {
        self.peek(M_LAYOUT_FP)
    }

    /// Lay out the metadata of a fresh heap (whose first two pages are zero).
    pub(crate) fn format(&self, schema_version: u64, layout_fp: u64) -> Result<(), ObjectError> {
        if self.len < OBJECT_HEAP_BYTES_MIN {
            return Err(ObjectError::InvalidArgument(format!(
                "the heap is {} bytes; the object layer needs at least {OBJECT_HEAP_BYTES_MIN}",
                self.len
            )));
        }
        self.wr_meta(M_VERSION, OBJECT_FORMAT_VERSION as u64);
        self.wr_meta(M_HEAP_BYTES, self.len);
        self.wr_meta(M_BASE, self.base.as_ptr() as u64);
        self.wr_meta(M_SCHEMA, schema_version);
        self.wr_meta(M_LAYOUT_FP, layout_fp);
        self.wr_meta(M_REGION_START, OBJECT_META_BYTES);
        self.wr_meta(M_REGION_END, self.len);
        self.wr_meta(M_TOP, OBJECT_META_BYTES);
        self.wr_meta(SENTINEL_TAG, TagFlags::ALLOCATED.bits());
        self.wr_meta(SENTINEL_TAG + 8, SENTINEL_CHECK);
        // Last, so a crash (or an error) before the first commit leaves a fresh-looking heap.
        self.wr_meta(M_MAGIC, u64::from_le_bytes(MAGIC));
        Ok(())
    }

    /// Take a grown heap's new space `[len, new_len)` into the block region (it joins the
    /// never-carved space after the top). Written into the heap: durable with the next commit.
    pub(crate) fn extend_to(&self, new_len: u64) -> Raw {
        assert!(new_len >= self.len && new_len % PAGE_BYTES == 0);
        let grown = Raw { base: self.base, len: new_len };
        grown.wr_meta(M_HEAP_BYTES, new_len);
        grown.wr_meta(M_REGION_END, new_len);
        grown
    }

    /// The cheap consistency test `open` runs (the full one is `check`).
    pub(crate) fn meta_sane(&self) -> Result<(), String> {
        let (rs, re, top) = (self.peek(M_REGION_START), self.peek(M_REGION_END), self.peek(M_TOP));
        if rs != OBJECT_META_BYTES || re != self.len || top < rs || top > re || top % 16 != 0 {
            return Err(format!(
                "block region {rs:#x}..{re:#x} with top {top:#x} does not fit a heap of {} bytes",
                self.len
            ));
        }
        if self.peek(SENTINEL_TAG + 8) != SENTINEL_CHECK {
            return Err("the sentinel tag before the first block is damaged".into());
        }
        Ok(())
    }

    /// The top as recorded, for the fuzz harness (`alloc::fuzz`).
    #[cfg(feature = "testing")]
    pub(crate) fn top_for_fuzz(&self) -> u64 {
        self.top_unchecked()
    }

    /// The top as recorded, for `check` (which validated it with `meta_sane`).
    pub(super) fn top_unchecked(&self) -> u64 {
        self.peek(M_TOP)
    }

    /// The top, checked: the allocation paths compute with it.
    fn top(&self) -> Result<u64, Damaged> {
        let top = self.peek(M_TOP);
        if top < self.region_start() || top > self.region_end() || top % 16 != 0 {
            return self.damaged(format!("the top of the block region, {top:#x}, is outside the region or unaligned"));
        }
        Ok(top)
    }
    pub(super) fn region_start(&self) -> u64 {
        OBJECT_META_BYTES
    }
    pub(super) fn region_end(&self) -> u64 {
        self.len
    }

    // ---- roots ----------------------------------------------------------------------------

    pub(crate) fn root_entry_offset(&self, slot: Option<usize>) -> u64 {
        match slot {
            None => M_ROOT,
            Some(i) => {
                assert!(i < NAMED_ROOTS_MAX);
                M_NAMED_ROOTS + i as u64 * ROOT_ENTRY_BYTES
            }
        }
    }

    pub(crate) fn read_root(&self, slot: Option<usize>) -> Option<RootEntry> {
        let e = self.root_entry_offset(slot);
        let w0 = self.peek(e);
        if w0 & 0xff == 0 {
            return None;
        }
        let name_len = ((w0 >> 8) & 0xff) as usize;
        let mut name = vec![0u8; name_len.min(ROOT_NAME_BYTES_MAX)];
        for (i, b) in name.iter_mut().enumerate() {
            let w = self.peek(e + 40 + (i as u64 & !7));
            *b = (w >> (8 * (i % 8))) as u8;
        }
        Some(RootEntry {
            name: String::from_utf8_lossy(&name).into_owned(),
            offset: self.peek(e + 8),
            size: self.peek(e + 16),
            align: self.peek(e + 24),
            fingerprint: self.peek(e + 32),
        })
    }

    pub(crate) fn write_root(&self, slot: Option<usize>, entry: Option<&RootEntry>) {
        let e = self.root_entry_offset(slot);
        let Some(r) = entry else {
            for o in (0..ROOT_ENTRY_BYTES).step_by(8) {
                self.wr_meta(e + o, 0);
            }
            return;
        };
        let name = r.name.as_bytes();
        assert!(name.len() <= ROOT_NAME_BYTES_MAX);
        self.wr_meta(e + 8, r.offset);
        self.wr_meta(e + 16, r.size);
        self.wr_meta(e + 24, r.align);
        self.wr_meta(e + 32, r.fingerprint);
        for w in 0..(ROOT_NAME_BYTES_MAX as u64 / 8) {
            let mut bytes = [0u8; 8];
            for (k, b) in bytes.iter_mut().enumerate() {
                *b = name.get(w as usize * 8 + k).copied().unwrap_or(0);
            }
            self.wr_meta(e + 40 + 8 * w, u64::from_le_bytes(bytes));
        }
        self.wr_meta(e, 1 | (name.len() as u64) << 8);
    }

    // ---- tags ----------------------------------------------------------------------------
    //
    // Every operation below reads links and sizes from the heap, so each checks what it follows
    // and stops with `Damaged` at the first contradiction instead of trusting it.

    /// The tag of the block ending at `end`: (size, flags).
    fn tag(&self, end: u64) -> Result<(u64, TagFlags), Damaged> {
        let w0 = self.rd(end.wrapping_sub(16))?;
        Ok((w0 & !FLAGS, TagFlags::of(w0)))
    }

    fn write_tag(&self, start: u64, end: u64, flags: TagFlags) -> Result<(), Damaged> {
        self.wr(end - 16, (end - start) | flags.bits())?;
        self.wr(end - 8, start ^ TAG_CHECK)
    }

    /// Set the NEXT_FREE bit of the block ending at `start` (an allocated block or the sentinel;
    /// a free block's next is never free, so there is nothing to record for it).
    fn mark_before(&self, start: u64, next_free: bool) -> Result<(), Damaged> {
        let w0 = self.rd(start - 16)?;
        if !TagFlags::of(w0).contains(TagFlags::ALLOCATED) {
            if next_free {
                return self.damaged(format!("two adjacent free blocks at {start:#x}"));
            }
            return Ok(());
        }
        let next = TagFlags::NEXT_FREE.bits();
        self.wr(start - 16, if next_free { w0 | next } else { w0 & !next })
    }

    /// The free block starting at `start`: its size, after checking its header against its tag.
    fn free_block_at(&self, start: u64) -> Result<u64, Damaged> {
        let w0 = self.rd(start)?;
        let size = w0 & !FLAGS;
        let top = self.top()?;
        let inside = start >= self.region_start() && start.checked_add(size).is_some_and(|end| end <= top);
        if TagFlags::of(w0).contains(TagFlags::ALLOCATED) || size < 16 || size % 16 != 0 || !inside {
            return self.damaged(format!("expected a free block at {start:#x}, found header {w0:#x}"));
        }
        if self.rd(start + size - 16)? != w0 || self.rd(start + size - 8)? != start ^ TAG_CHECK {
            return self.damaged(format!("free block at {start:#x}: its tag does not match its header"));
        }
        Ok(size)
    }

    fn make_free(&self, start: u64, end: u64) -> Result<(), Damaged> {
        let size = end - start;
        debug_assert!(size >= 16 && size % 16 == 0);
        self.write_tag(start, end, TagFlags::empty())?;
        self.wr(start, size)?; // the header repeats w0 (for a 16-byte block it is w0)
        if size >= LISTED_FREE_BYTES_MIN {
            self.bin_insert(start, size)?;
        }
        self.mark_before(start, true)
    }

    fn make_allocated(&self, start: u64, end: u64, flags: TagFlags) -> Result<(), Damaged> {
        self.write_tag(start, end, TagFlags::ALLOCATED | flags)?;
        self.mark_before(start, false)
    }

    // ---- bins ----------------------------------------------------------------------------

    pub(super) fn bin_head(&self, bin: usize) -> u64 {
        self.peek(M_BINS + 8 * bin as u64)
    }

    fn set_bin_head(&self, bin: usize, head: u64) {
        self.wr_meta(M_BINS + 8 * bin as u64, head);
        let bits = self.peek(M_BINS_NONEMPTY);
        self.wr_meta(M_BINS_NONEMPTY, if head == 0 { bits & !(1 << bin) } else { bits | (1 << bin) });
    }

    fn bin_insert(&self, start: u64, size: u64) -> Result<(), Damaged> {
        let bin = bin_of(size);
        let head = self.bin_head(bin);
        if head != 0 {
            self.free_block_at(head)?;
        }
        self.wr(start + 8, head)?;
        self.wr(start + 16, 0)?;
        if head != 0 {
            self.wr(head + 16, start)?;
        }
        self.set_bin_head(bin, start);
        Ok(())
    }

    fn bin_remove(&self, start: u64, size: u64) -> Result<(), Damaged> {
        let (next, prev) = (self.rd(start + 8)?, self.rd(start + 16)?);
        // The neighbours must be free blocks before their links are rewritten.
        for n in [next, prev] {
            if n != 0 {
                self.free_block_at(n)?;
            }
        }
        if prev == 0 {
            let bin = bin_of(size);
            if self.bin_head(bin) != start {
                return self.damaged(format!("free block {start:#x} is not the head of its bin"));
            }
            self.set_bin_head(bin, next);
        } else {
            self.wr(prev + 8, next)?;
        }
        if next != 0 {
            self.wr(next + 16, prev)?;
        }
        Ok(())
    }

    /// Remove a free block from its bin if it is on one.
    fn unlist(&self, start: u64, size: u64) -> Result<(), Damaged> {
        if size >= LISTED_FREE_BYTES_MIN {
            self.bin_remove(start, size)?;
        }
        Ok(())
    }

    // ---- large blocks ----------------------------------------------------------------------

    /// Where a block of `bytes` aligned to `align` fits in the free block [fs, fs+size).
    fn fit(&self, fs: u64, size: u64, bytes: u64, align: u64) -> Option<u64> {
        let p = self.align_up_abs(fs, align)?;
        (p.checked_add(bytes)? <= fs + size).then_some(p)
    }

    /// Find a free block for (bytes, align): Some((free block start, its size, where)).
    fn find_free(&self, bytes: u64, align: u64, steps_max: usize) -> Result<Option<(u64, u64, u64)>, Damaged> {
        let first = bin_of(bytes.max(LISTED_FREE_BYTES_MIN));
        let nonempty = self.peek(M_BINS_NONEMPTY);
        // No bin can list more blocks than fit in the heap: more steps means a cycle.
        let blocks_max = self.len / LISTED_FREE_BYTES_MIN;
        for bin in first..BIN_COUNT {
            if nonempty & (1 << bin) == 0 {
                continue;
            }
            let mut cur = self.bin_head(bin);
            let mut steps = 0u64;
            while cur != 0 && (steps as usize) < steps_max {
                if steps > blocks_max {
                    return self.damaged(format!("bin {bin} lists more free blocks than the heap holds (a cycle)"));
                }
                let size = self.free_block_at(cur)?;
                if let Some(p) = self.fit(cur, size, bytes, align) {
                    return Ok(Some((cur, size, p)));
                }
                cur = self.rd(cur + 8)?;
                steps += 1;
            }
        }
        Ok(None)
    }

    /// Allocate a block of exactly `bytes` (a multiple of 16, tag included) whose first byte is
    /// aligned to `align` (absolute address).
    pub(crate) fn alloc_block(&self, bytes: u64, align: u64, flags: TagFlags) -> Result<u64, ObjectError> {
        assert!(bytes >= 16 && bytes % 16 == 0 && align.is_power_of_two());
        let align = align.max(16);
        if let Some((fs, size, p)) = self.find_free(bytes, align, FIT_SEARCH_STEPS_MAX)? {
            self.take_from_free(fs, size, p, bytes, flags)?;
            return Ok(p);
        }
        let top = self.top()?;
        if let Some(p) = self.align_up_abs(top, align) {
            if p.checked_add(bytes).is_some_and(|e| e <= self.region_end()) {
                if p > top {
                    self.make_free(top, p)?;
                }
                self.make_allocated(p, p + bytes, flags)?;
                self.wr_meta(M_TOP, p + bytes);
                return Ok(p);
            }
        }
        if let Some((fs, size, p)) = self.find_free(bytes, align, usize::MAX)? {
            self.take_from_free(fs, size, p, bytes, flags)?;
            return Ok(p);
        }
        Err(ObjectError::Exhausted {
            requested_bytes: bytes - 16,
            align_bytes: align,
            top_bytes: self.region_end() - top,
        })
    }

    fn take_from_free(&self, fs: u64, size: u64, p: u64, bytes: u64, flags: TagFlags) -> Result<(), Damaged> {
        let fe = fs + size;
        self.unlist(fs, size)?;
        if p > fs {
            self.make_free(fs, p)?;
        }
        self.make_allocated(p, p + bytes, flags)?;
        if p + bytes < fe {
            self.make_free(p + bytes, fe)?;
        }
        Ok(())
    }

    /// Check that an allocated block of `bytes` with `flags` starts at `p`, and return its tag's
    /// flags; fails for a deallocation with the wrong layout, a pointer the allocator never
    /// returned, a double free, or a damaged tag.
    fn expect_block(&self, p: u64, bytes: u64, flags: TagFlags) -> Result<TagFlags, Damaged> {
        let top = self.top()?;
        if p < self.region_start() || p % 16 != 0 || p.checked_add(bytes).is_none_or(|e| e > top) {
            return self.damaged(format!(
                "no block of {bytes} bytes at {p:#x}: outside the allocated region (wrong pointer or layout)"
            ));
        }
        let end = p + bytes;
        let (size, f) = self.tag(end)?;
        let kind = f & (TagFlags::ALLOCATED | TagFlags::SLAB);
        if size != bytes || kind != TagFlags::ALLOCATED | flags || self.rd(end - 8)? != p ^ TAG_CHECK {
            let f = f.bits();
            return self.damaged(format!(
                "no allocated block of {bytes} bytes at {p:#x} (tag says {size} bytes, flags {f:#x}): wrong pointer or layout, a double free, or a damaged tag"
            ));
        }
        Ok(f)
    }

    pub(crate) fn free_block(&self, p: u64, bytes: u64, flags: TagFlags) -> Result<(), Damaged> {
        let f = self.expect_block(p, bytes, flags)?;
        let (mut start, mut end) = (p, p + bytes);
        let prev_w0 = self.rd(start - 16)?;
        if !TagFlags::of(prev_w0).contains(TagFlags::ALLOCATED) {
            let psize = prev_w0 & !FLAGS;
            let ps = start.wrapping_sub(psize);
            if psize > start || self.free_block_at(ps)? != psize {
                return self.damaged(format!("the free block before {start:#x} does not match its tag"));
            }
            self.unlist(ps, psize)?;
            start = ps;
        }
        if end == self.top()? {
            self.wr_meta(M_TOP, start);
            return self.mark_before(start, false);
        }
        if f.contains(TagFlags::NEXT_FREE) {
            let nsize = self.free_block_at(end)?;
            self.unlist(end, nsize)?;
            end += nsize;
        }
        self.make_free(start, end)
    }

    /// Resize a large block in place if its neighbour allows; returns whether it did.
    fn resize_block_in_place(&self, p: u64, old: u64, new: u64) -> Result<bool, Damaged> {
        let f = self.expect_block(p, old, TagFlags::empty())?;
        let end = p + old;
        if new == old {
            return Ok(true);
        }
        if new < old {
            // Shrink: the tail becomes an allocated block that is freed at once (merging it).
            self.write_tag(p, p + new, TagFlags::ALLOCATED)?;
            self.write_tag(p + new, end, TagFlags::ALLOCATED | (f & TagFlags::NEXT_FREE))?;
            self.free_block(p + new, old - new, TagFlags::empty())?;
            return Ok(true);
        }
        if end == self.top()? {
            if p + new > self.region_end() {
                return Ok(false);
            }
            self.write_tag(p, p + new, TagFlags::ALLOCATED)?;
            self.wr_meta(M_TOP, p + new);
            return Ok(true);
        }
        if !f.contains(TagFlags::NEXT_FREE) {
            return Ok(false);
        }
        let nsize = self.free_block_at(end)?;
        if end + nsize < p + new {
            return Ok(false);
        }
        self.unlist(end, nsize)?;
        self.write_tag(p, p + new, TagFlags::ALLOCATED)?;
        if p + new < end + nsize {
            self.make_free(p + new, end + nsize)?;
        }
        Ok(true)
    }

    // ---- slabs -------------------------------------------------------------------------------

    pub(super) fn slab_word(&self, page: u64) -> Result<(u64, usize, u64), Damaged> {
        let w = self.rd(page + SLAB_HDR + SH_WORD)?;
        Ok((w & 0xffff_ffff, ((w >> 32) & 0xffff) as usize, w >> 48))
    }

    fn set_slab_word(&self, page: u64, class: usize, free: u64) -> Result<(), Damaged> {
        self.wr(page + SLAB_HDR + SH_WORD, SLAB_MAGIC | (class as u64) << 32 | free << 48)
    }

    /// Check that `page` is a slab of `class` before following or rewriting its links.
    fn expect_slab(&self, page: u64, class: usize) -> Result<u64, Damaged> {
        let inside = page >= self.region_start() && page % PAGE_BYTES == 0 && page < self.top()?;
        if !inside {
            return self.damaged(format!("a slab link leads to {page:#x}, not a page of the allocated region"));
        }
        let (magic, c, free) = self.slab_word(page)?;
        if magic != SLAB_MAGIC || c != class || self.rd(page + SLAB_HDR + SH_CHECK)? != page ^ SLAB_CHECK {
            return self.damaged(format!("slab {page:#x} of class {class} is damaged (magic {magic:#x}, class {c})"));
        }
        Ok(free)
    }

    pub(super) fn class_head(&self, class: usize) -> u64 {
        self.peek(M_CLASSES + 8 * class as u64)
    }

    fn partial_push(&self, class: usize, page: u64) -> Result<(), Damaged> {
        let head = self.class_head(class);
        if head != 0 {
            self.expect_slab(head, class)?;
        }
        self.wr(page + SLAB_HDR + SH_NEXT, head)?;
        self.wr(page + SLAB_HDR + SH_PREV, 0)?;
        if head != 0 {
            self.wr(head + SLAB_HDR + SH_PREV, page)?;
        }
        self.wr_meta(M_CLASSES + 8 * class as u64, page);
        Ok(())
    }

    fn partial_remove(&self, class: usize, page: u64) -> Result<(), Damaged> {
        let (next, prev) = (self.rd(page + SLAB_HDR + SH_NEXT)?, self.rd(page + SLAB_HDR + SH_PREV)?);
        for n in [next, prev] {
            if n != 0 {
                self.expect_slab(n, class)?;
            }
        }
        if prev == 0 {
            if self.class_head(class) != page {
                return self.damaged(format!("slab {page:#x} is not the head of its partial list"));
            }
            self.wr_meta(M_CLASSES + 8 * class as u64, next);
        } else {
            self.wr(prev + SLAB_HDR + SH_NEXT, next)?;
        }
        if next != 0 {
            self.wr(next + SLAB_HDR + SH_PREV, prev)?;
        }
        self.wr(page + SLAB_HDR + SH_NEXT, 0)?;
        self.wr(page + SLAB_HDR + SH_PREV, 0)
    }

    fn new_slab(&self, class: usize) -> Result<u64, ObjectError> {
        let page = self.alloc_block(PAGE_BYTES, PAGE_BYTES, TagFlags::SLAB)?;
        for w in 0..4 {
            self.wr(page + SLAB_HDR + SH_BITMAP + 8 * w, 0)?;
        }
        self.wr(page + SLAB_HDR + SH_CHECK, page ^ SLAB_CHECK)?;
        self.set_slab_word(page, class, objects_per_slab(class))?;
        self.partial_push(class, page)?;
        Ok(page)
    }

    pub(crate) fn alloc_small(&self, class: usize) -> Result<u64, ObjectError> {
        let mut page = self.class_head(class);
        if page == 0 {
            page = self.new_slab(class)?;
        }
        let free = self.expect_slab(page, class)?;
        let n = objects_per_slab(class);
        if free == 0 || free > n {
            return Err(self.damage(format!("partial slab {page:#x} says {free} of {n} objects are free")).into());
        }
        let mut slot = None;
        for w in 0..4u64 {
            let bits = self.rd(page + SLAB_HDR + SH_BITMAP + 8 * w)?;
            if bits != u64::MAX {
                let i = w * 64 + bits.trailing_ones() as u64;
                if i >= n {
                    break;
                }
                self.wr(page + SLAB_HDR + SH_BITMAP + 8 * w, bits | 1 << (i % 64))?;
                slot = Some(i);
                break;
            }
        }
        let Some(slot) = slot else {
            return Err(self.damage(format!("slab {page:#x}: free count {free} but no free slot")).into());
        };
        self.set_slab_word(page, class, free - 1)?;
        if free == 1 {
            self.partial_remove(class, page)?;
        }
        Ok(page + slot * SIZE_CLASSES_BYTES[class] as u64)
    }

    pub(crate) fn free_small(&self, off: u64, class: usize) -> Result<(), Damaged> {
        let page = off & !(PAGE_BYTES - 1);
        let c_bytes = SIZE_CLASSES_BYTES[class] as u64;
        if page < self.region_start() || page >= self.top()? {
            return self.damaged(format!("small object {off:#x} is outside the allocated region"));
        }
        let free = self.expect_slab(page, class).map_err(|d| {
            self.damage(format!(
                "{off:#x} is not in a slab of {c_bytes}-byte objects (wrong pointer or layout): {}",
                d.problem
            ))
        })?;
        let n = objects_per_slab(class);
        let i = (off - page) / c_bytes;
        if (off - page) % c_bytes != 0 || i >= n {
            return self.damaged(format!("{off:#x} is not the start of a {c_bytes}-byte object"));
        }
        let word = page + SLAB_HDR + SH_BITMAP + 8 * (i / 64);
        let bits = self.rd(word)?;
        if bits & 1 << (i % 64) == 0 {
            return self.damaged(format!("double free of the {c_bytes}-byte object at {off:#x}"));
        }
        if free >= n {
            return self.damaged(format!("slab {page:#x} says all {n} objects are free, yet {off:#x} is in use"));
        }
        self.wr(word, bits & !(1 << (i % 64)))?;
        let free = free + 1;
        self.set_slab_word(page, class, free)?;
        if free == 1 {
            self.partial_push(class, page)?;
        } else if free == n {
            let sole = self.class_head(class) == page && self.rd(page + SLAB_HDR + SH_NEXT)? == 0;
            if !sole {
                self.partial_remove(class, page)?;
                self.wr(page + SLAB_HDR + SH_WORD, 0)?;
                self.free_block(page, PAGE_BYTES, TagFlags::SLAB)?;
            }
        }
        Ok(())
    }

    // ---- the public operations -------------------------------------------------------------

    /// Allocate for `layout`; returns the offset. Zero-size layouts are not allowed here.
    pub(crate) fn alloc(&self, layout: Layout, zeroed: bool) -> Result<u64, ObjectError> {
        let exhausted = || ObjectError::Exhausted {
            requested_bytes: layout.size() as u64,
            align_bytes: layout.align() as u64,
            top_bytes: self.region_end().saturating_sub(self.top_unchecked()),
        };
        let off = match placement(layout) {
            Placement::Empty => unreachable!("zero-size allocations never reach the heap"),
            Placement::Small { class } => self.alloc_small(class),
            Placement::Large { block_bytes } if block_bytes > self.len => Err(exhausted()),
            Placement::Large { block_bytes } => self.alloc_block(block_bytes, layout.align() as u64, TagFlags::empty()),
        }
        .map_err(|e| match e {
            ObjectError::Exhausted { .. } => exhausted(),
            e => e,
        })?;
        debug_assert!(self.abs(off) % layout.align() as u64 == 0);
        if zeroed {
            self.zero(off, layout.size() as u64);
        }
        Ok(off)
    }

    pub(crate) fn dealloc(&self, off: u64, layout: Layout) -> Result<(), Damaged> {
        match placement(layout) {
            Placement::Empty => Ok(()),
            Placement::Small { class } => self.free_small(off, class),
            Placement::Large { block_bytes } => self.free_block(off, block_bytes, TagFlags::empty()),
        }
    }

    /// Resize in place when the placement allows; returns whether it did.
    pub(crate) fn resize_in_place(&self, off: u64, old: Layout, new: Layout) -> Result<bool, Damaged> {
        if self.abs(off) % new.align() as u64 != 0 {
            return Ok(false);
        }
        match (placement(old), placement(new)) {
            (Placement::Small { class: a }, Placement::Small { class: b }) => Ok(a == b),
            (Placement::Large { block_bytes: a }, Placement::Large { block_bytes: b }) => {
                Ok(b <= self.len && self.resize_block_in_place(off, a, b)?)
            }
            _ => Ok(false),
        }
    }

    /// Zero `[off, off+len)`, writing only the 64-byte chunks that are not zero already, so
    /// that memory which is zero (never used, or freshly formatted) is not dirtied.
    pub(crate) fn zero(&self, off: u64, len: u64) {
        assert!(off + len <= self.len);
        // SAFETY: the range is inside the mapping (asserted) and belongs to an allocation that
        // was just made (or grown) and not yet handed out, so nothing else refers to it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr(off), len as usize) };
        for chunk in bytes.chunks_mut(64) {
            if chunk.iter().any(|&b| b != 0) {
                chunk.fill(0);
            }
        }
    }
}

/// A root's entry in the metadata block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RootEntry {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub align: u64,
    pub fingerprint: u64,
}
