//! [`AlignedBuf`]: a zeroed heap buffer aligned to [`LOG_ALIGN`] for O_DIRECT I/O.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::LOG_ALIGN;

/// A heap buffer aligned to 4096 bytes ([`LOG_ALIGN`]), zero-initialised, of fixed length (a
/// multiple of 4096). It dereferences to `[u8]`.
///
/// O_DIRECT requires the user memory of a read or write to be aligned (to the device's DMA
/// alignment, at most its logical block size); 4096 satisfies every device [`open_log`] accepts.
///
/// [`open_log`]: super::open_log
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Buffers of [`MAPPED_BYTES_MIN`] or more are anonymous mappings of their own (`ptr` points
    /// into it), returned to the kernel when dropped. From the allocator, large blocks freed by
    /// one thread and allocated by another stay in malloc's arenas: a commit path that allocates
    /// a record-sized buffer per commit then grows the process by the size of its commits (the
    /// cgroup test saw it OOM at four times less memory than the heap).
    map: Option<memmap2::MmapMut>,
}

/// From this size on, a buffer is its own anonymous mapping (see [`AlignedBuf`]).
const MAPPED_BYTES_MIN: usize = 256 << 10;

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); it has no interior
// mutability and no thread-affine state, so moving it to or sharing `&AlignedBuf` with another
// thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zero bytes aligned to 4096.
    ///
    /// # Panics
    /// If `len` is not a multiple of [`LOG_ALIGN`] (a programming error: every log I/O size is),
    /// or is too large for a `Layout`. Aborts via `handle_alloc_error` if memory is exhausted.
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(
            super::log_aligned(len as u64),
            "AlignedBuf::zeroed: length {len} is not a multiple of LOG_ALIGN ({LOG_ALIGN})"
        );
        if len == 0 {
            // A zero-length buffer owns no allocation; any non-null, 4096-aligned pointer is a
            // valid base for an empty slice.
            let ptr = NonNull::new(LOG_ALIGN as *mut u8).expect("LOG_ALIGN is nonzero");
            return AlignedBuf { ptr, len: 0, map: None };
        }
        if len >= MAPPED_BYTES_MIN {
            // Anonymous mappings are zero-filled and page-aligned (4096 here, = LOG_ALIGN).
            if let Ok(mut map) = memmap2::MmapMut::map_anon(len) {
                let ptr = NonNull::new(map.as_mut_ptr()).expect("a mapping is never at address 0");
                debug_assert_eq!(ptr.as_ptr() as usize % LOG_ALIGN, 0);
                return AlignedBuf { ptr, len, map: Some(map) };
            }
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a nonzero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = match NonNull::new(raw) {
            Some(p) => p,
            None => alloc::handle_alloc_error(layout),
        };
        AlignedBuf { ptr, len, map: None }
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, LOG_ALIGN).unwrap_or_else(|_| panic!("AlignedBuf: length {len} is too large"))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // A mapped buffer is unmapped when `map` drops.
        if self.len != 0 && self.map.is_none() {
            // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout (same `len`,
            // which never changes) and has not been freed: `drop` runs once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is non-null and aligned, and points to `len` initialised bytes (zeroed at
        // allocation) owned by `self` (or `len == 0`); the borrow of `self` keeps them alive and
        // prevents mutable aliasing for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees the slice is the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut copy = AlignedBuf::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish_non_exhaustive()
    }
}
