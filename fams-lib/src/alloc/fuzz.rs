//! The allocator on damaged metadata, for the fuzz target `alloc_damage` and its regression
//! test (feature `testing`). No file and no heap: the object layer is laid out in an aligned
//! buffer, populated, damaged as the input says, and then allocated from, freed into and
//! checked — the paths that must turn every contradiction into an error value.
//!
//! Input: byte 0 = how many damages (0–7, low 3 bits); then per damage 2 bytes (which word of
//! the populated region, little endian, taken modulo the words in use) and 8 bytes (the value
//! written there); the rest are operations, one byte each: even = allocate (size from the byte
//! and the next one), odd = free the k-th object the population left live (k from the byte).

use super::raw::{Raw, OBJECT_META_BYTES};
use std::alloc::Layout;
use std::ptr::NonNull;

/// The buffer the object layer is laid out in.
const IMAGE_BYTES: usize = 512 << 10;
/// Operations read from one input, at most.
const OPS_MAX: usize = 256;

/// What one input did (for the regression test's coverage counters).
#[derive(Clone, Debug, Default)]
pub struct DamageOutcome {
    pub damages: usize,
    pub allocations_failed: usize,
    pub frees: usize,
    pub check_problems: usize,
}

struct Image {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Image {
    fn new() -> Image {
        let layout = Layout::from_size_align(IMAGE_BYTES, 4096).expect("a valid layout");
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        Image { ptr: NonNull::new(ptr).expect("allocation of the fuzz image"), layout }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; no view of it outlives `run`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Run one input. Panics only if the allocator does — which is the bug the fuzzer looks for —
/// or if an allocation it reports as successful lies outside the block region.
pub fn run(data: &[u8]) -> DamageOutcome {
    let image = Image::new();
    // SAFETY: the buffer is ours, mapped and writable for this function, touched only via `raw`.
    let raw = unsafe { Raw::new(image.ptr, IMAGE_BYTES as u64) };
    raw.format(0, 0).expect("a fresh image formats");
    // A population with slabs of several classes (some partial), large blocks and free blocks.
    let mut live = Vec::new();
    for i in 0..160u64 {
        let size = if i % 9 == 0 { 1100 + (i * 977) % 9000 } else { 8 + (i * 131) % 1000 };
        let layout = Layout::from_size_align(size as usize, 8).expect("a valid layout");
        let off = raw.alloc(layout, false).expect("the population fits");
        live.push((off, layout));
    }
    let mut kept = Vec::new();
    for (i, (off, layout)) in live.into_iter().enumerate() {
        if i % 3 == 0 {
            raw.dealloc(off, layout).expect("freeing the population");
        } else {
            kept.push((off, layout));
        }
    }
    let mut out = DamageOutcome::default();
    let (damages, mut rest) = match data.split_first() {
        Some((&n, rest)) => ((n & 7) as usize, rest),
        None => (0, data),
    };
    let words_in_use = raw.top_for_fuzz() / 8;
    for _ in 0..damages {
        let Some((d, tail)) = rest.split_first_chunk::<10>() else { break };
        rest = tail;
        let word = u16::from_le_bytes([d[0], d[1]]) as u64 % words_in_use;
        // The heap-size and base words are checked against the mapping at open: not here.
        if word == 2 || word == 3 {
            continue;
        }
        let value = u64::from_le_bytes(d[2..10].try_into().expect("8 bytes"));
        // SAFETY: `word * 8` is inside the buffer (below the top, itself inside).
        let at = unsafe { image.ptr.as_ptr().add(word as usize * 8) };
        // SAFETY: an 8-aligned word inside the buffer; metadata and objects alike are plain
        // bytes that no reference covers.
        unsafe { at.cast::<u64>().write(value) };
        out.damages += 1;
    }
    let mut ops = rest.iter().take(OPS_MAX).peekable();
    while let Some(&op) = ops.next() {
        if op % 2 == 0 {
            let high = ops.next().copied().unwrap_or(0) as usize;
            let size = 1 + (op as usize) / 2 + (high % 24) * 512;
            let layout = Layout::from_size_align(size, 8).expect("a valid layout");
            match raw.alloc(layout, true) {
                Ok(off) => {
                    let end = off + size as u64;
                    assert!(
                        off >= OBJECT_META_BYTES && end <= IMAGE_BYTES as u64,
                        "an allocation of {size} bytes at {off:#x} lies outside the block region"
                    );
                }
                Err(_) => out.allocations_failed += 1,
            }
        } else if !kept.is_empty() {
            let (off, layout) = kept.swap_remove(op as usize / 2 % kept.len());
            // A free of a live object (or of a damaged one: the allocator reports it).
            let _ = raw.dealloc(off, layout);
            out.frees += 1;
        }
    }
    let (_, problems) = raw.check(None);
    out.check_problems = problems.len();
    out
}
