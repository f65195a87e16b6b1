//! The allocator's consistency check (fsck of the object layer): walks every block from the top
//! down, then the bins, the partial-slab lists and the roots, and reports every problem it finds
//! instead of stopping at the first. It reads only, and never follows a link before checking
//! that it leads to a block the walk found.

use super::raw::*;
use std::alloc::Layout;
use std::collections::{HashMap, HashSet};

impl Raw {
    /// Every block from the first to the top, walking the tags backwards from the top.
    fn blocks(&self, problems: &mut Vec<String>) -> Vec<(u64, u64, TagFlags)> {
        let mut out = Vec::new();
        let (rs, mut end) = (self.region_start(), self.top_unchecked());
        while end > rs {
            let w0 = self.peek(end - 16);
            let (size, flags) = (w0 & !FLAGS, TagFlags::of(w0));
            let check = self.peek(end - 8);
            if size < 16 || size % 16 != 0 || size > end - rs || check != (end - size) ^ TAG_CHECK {
                problems.push(format!(
                    "the tag ending at {end:#x} is damaged (size {size}, check {check:#x}); {} blocks above it were walked",
                    out.len()
                ));
                break;
            }
            out.push((end - size, size, flags));
            end -= size;
        }
        out.reverse();
        out
    }

    /// Walk and verify all metadata (fsck). Never panics on damaged metadata: every problem is
    /// collected. `allocations` receives (offset, bytes) of every live object.
    pub(crate) fn check(&self, mut allocations: Option<&mut Vec<(u64, u64)>>) -> (CheckReport, Vec<String>) {
        let mut p = Vec::new();
        let mut r = CheckReport::default();
        if let Err(e) = self.meta_sane() {
            p.push(e);
            return (r, p);
        }
        let top = self.top_unchecked();
        r.top_bytes = self.region_end() - top;
        let blocks = self.blocks(&mut p);
        r.blocks = blocks.len() as u64;
        let sentinel = self.peek(SENTINEL_TAG);
        if sentinel & !TagFlags::NEXT_FREE.bits() != TagFlags::ALLOCATED.bits() {
            p.push(format!("the sentinel tag is damaged ({sentinel:#x})"));
        }
        let mut listed: HashMap<u64, u64> = HashMap::new();
        let mut slabs: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut prev_free = false;
        let mut prev_next_free = TagFlags::of(sentinel).contains(TagFlags::NEXT_FREE);
        for (i, &(start, size, flags)) in blocks.iter().enumerate() {
            let free = !flags.contains(TagFlags::ALLOCATED);
            if prev_next_free != free {
                p.push(format!(
                    "block {start:#x}: the block before it says next-free={prev_next_free}, but it is {}",
                    if free { "free" } else { "allocated" }
                ));
            }
            if free {
                if prev_free {
                    p.push(format!("free blocks not coalesced at {start:#x}"));
                }
                if !flags.is_empty() {
                    p.push(format!("free block {start:#x} has flags {:#x}", flags.bits()));
                }
                if self.peek(start) != size {
                    p.push(format!(
                        "free block {start:#x}: header {:#x} differs from its tag (size {size})",
                        self.peek(start)
                    ));
                }
                if i + 1 == blocks.len() {
                    p.push(format!("free block {start:#x} lies right before the top (should have merged into it)"));
                }
                r.free_blocks += 1;
                r.free_bytes += size;
                if size >= LISTED_FREE_BYTES_MIN {
                    listed.insert(start, size);
                }
            } else if flags.contains(TagFlags::SLAB) {
                if size != PAGE_BYTES || start % PAGE_BYTES != 0 {
                    p.push(format!("slab block {start:#x} is {size} bytes, not one aligned page"));
                    continue;
                }
                r.slabs += 1;
                let (magic, class, free) = self.slab_word(start).unwrap_or((0, CLASS_COUNT, 0));
                if magic != SLAB_MAGIC
                    || class >= CLASS_COUNT
                    || self.peek(start + SLAB_HDR + SH_CHECK) != start ^ SLAB_CHECK
                {
                    p.push(format!("slab {start:#x}: header damaged (magic {magic:#x}, class {class})"));
                    continue;
                }
                let n = objects_per_slab(class);
                let c_bytes = SIZE_CLASSES_BYTES[class] as u64;
                let mut used = 0;
                for w in 0..4u64 {
                    let bits = self.peek(start + SLAB_HDR + SH_BITMAP + 8 * w);
                    for b in 0..64 {
                        let slot = w * 64 + b;
                        if bits & 1 << b != 0 {
                            if slot >= n {
                                p.push(format!("slab {start:#x}: bit {slot} set beyond its {n} objects"));
                            } else {
                                used += 1;
                                if let Some(a) = allocations.as_deref_mut() {
                                    a.push((start + slot * c_bytes, c_bytes));
                                }
                            }
                        }
                    }
                }
                if used + free != n {
                    p.push(format!("slab {start:#x}: {used} objects in use + {free} free != {n}"));
                }
                r.small_objects += used;
                r.small_bytes += used * c_bytes;
                slabs.insert(start, (class, free));
            } else {
                r.large_objects += 1;
                r.large_bytes += size - 16;
                if let Some(a) = allocations.as_deref_mut() {
                    a.push((start, size - 16));
                }
            }
            prev_free = free;
            prev_next_free = flags.contains(TagFlags::NEXT_FREE);
        }
        if prev_next_free {
            p.push("the last block before the top says its next block is free".into());
        }
        // Bins.
        let nonempty = self.peek(M_BINS_NONEMPTY);
        let mut seen = HashSet::new();
        for bin in 0..BIN_COUNT {
            let head = self.bin_head(bin);
            if (head != 0) != (nonempty & 1 << bin != 0) {
                p.push(format!("bin {bin}: non-empty bit disagrees with its head {head:#x}"));
            }
            let (mut cur, mut prev) = (head, 0);
            while cur != 0 {
                let Some(&size) = listed.get(&cur) else {
                    p.push(format!("bin {bin} lists {cur:#x}, which is not a free block of 48 bytes or more"));
                    break;
                };
                if !seen.insert(cur) {
                    p.push(format!("bin {bin}: {cur:#x} listed twice (a cycle?)"));
                    break;
                }
                if bin_of(size) != bin {
                    p.push(format!("free block {cur:#x} of {size} bytes is in bin {bin}, not {}", bin_of(size)));
                }
                if self.peek(cur + 16) != prev {
                    p.push(format!("free block {cur:#x}: back link {:#x}, expected {prev:#x}", self.peek(cur + 16)));
                }
                prev = cur;
                cur = self.peek(cur + 8);
            }
        }
        if seen.len() != listed.len() {
            p.push(format!("{} free blocks of 48 bytes or more, but {} on the bins", listed.len(), seen.len()));
        }
        // Partial slab lists.
        let mut on_lists = 0;
        for class in 0..CLASS_COUNT {
            let (mut cur, mut prev) = (self.class_head(class), 0);
            let mut steps = 0;
            while cur != 0 {
                steps += 1;
                match slabs.get(&cur) {
                    Some(&(c, free)) if c == class && free > 0 => {}
                    _ => {
                        p.push(format!(
                            "partial list of class {class} holds {cur:#x}, not a partial slab of that class"
                        ));
                        break;
                    }
                }
                if self.peek(cur + SLAB_HDR + SH_PREV) != prev {
                    p.push(format!("slab {cur:#x}: back link wrong"));
                }
                if steps > slabs.len() {
                    p.push(format!("partial list of class {class} has a cycle"));
                    break;
                }
                on_lists += 1;
                prev = cur;
                cur = self.peek(cur + SLAB_HDR + SH_NEXT);
            }
        }
        let partial = slabs.values().filter(|&&(_, free)| free > 0).count();
        if on_lists != partial {
            p.push(format!("{partial} slabs have free objects but {on_lists} are on the partial lists"));
        }
        // Roots point at live objects of their recorded layout.
        for slot in std::iter::once(None).chain((0..NAMED_ROOTS_MAX).map(Some)) {
            let Some(e) = self.read_root(slot) else { continue };
            r.roots += 1;
            let Ok(layout) = Layout::from_size_align(e.size as usize, e.align as usize) else {
                p.push(format!("root {:?}: impossible layout {} / {}", e.name, e.size, e.align));
                continue;
            };
            let live = match placement(layout) {
                Placement::Empty => true,
                Placement::Small { class } => {
                    let page = e.offset & !(PAGE_BYTES - 1);
                    let c_bytes = SIZE_CLASSES_BYTES[class] as u64;
                    slabs.get(&page).is_some_and(|&(c, _)| c == class)
                        && (e.offset - page) % c_bytes == 0
                        && self.peek(page + SLAB_HDR + SH_BITMAP + 8 * ((e.offset - page) / c_bytes / 64))
                            & 1 << ((e.offset - page) / c_bytes % 64)
                            != 0
                }
                Placement::Large { block_bytes } => blocks.binary_search_by_key(&e.offset, |b| b.0).is_ok_and(|i| {
                    blocks[i].1 == block_bytes
                        && blocks[i].2 & (TagFlags::ALLOCATED | TagFlags::SLAB) == TagFlags::ALLOCATED
                }),
            };
            if !live {
                p.push(format!(
                    "root {:?} points at {:#x}, which is not a live object of {} bytes",
                    e.name, e.offset, e.size
                ));
            }
        }
        (r, p)
    }
}

/// What [`ObjectHeap::check`](super::ObjectHeap::check) found: totals computed by walking every block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Blocks between the first one and the top (slabs, large objects, free blocks).
    pub blocks: u64,
    pub free_blocks: u64,
    /// Bytes in free blocks (tags included), not counting the top.
    pub free_bytes: u64,
    /// Bytes never carved, at the end of the heap.
    pub top_bytes: u64,
    pub slabs: u64,
    pub small_objects: u64,
    /// Bytes of small objects, counted by size class.
    pub small_bytes: u64,
    pub large_objects: u64,
    /// Bytes of large objects (their blocks less the tag).
    pub large_bytes: u64,
    /// The main root and the named roots.
    pub roots: u64,
}
