//! Committed page images kept in memory, written into the heap file later and together.
//!
//! # Why
//!
//! Once a record is durable, its bytes must reach the heap file before the checkpoint that moves
//! the log's tail past it — not sooner. Writing them at every commit cost one system call per
//! changed span (a `pwrite` is 1–2 µs of kernel work for a few bytes; 256 scattered pages were
//! 256 of them), and a page committed a thousand times between two checkpoints was written a
//! thousand times. Here the log writer applies a durable record to an in-memory image of each
//! page it touches instead; the images go to the heap file (page cache) only:
//!
//! * at a checkpoint, before the heap file's `fdatasync` (so the sync covers them, and only then
//!   does the superblock move the tail: the crash reasoning of `log_format` is unchanged);
//! * when they hold more than their budget (then without a sync: like the old write-back);
//! * before the heap releases resident pages (`Heap::release_committed`: a released page is read
//!   back from the heap file, which must then be current).
//!
//! Each flush writes the pages in ascending order, neighbours in one vectored write.
//!
//! # Who reads what
//!
//! The committed image of a page is its image here if there is one, else the heap file's page.
//! The committing thread reads it to diff a dirty page (only for pages with no record on its way,
//! as before), rollback to restore one, and the log writer to log a page whole. Every read and
//! every change happens under this store's lock, and a flush writes and forgets its images under
//! the same lock, so a reader never sees a page between "forgotten here" and "in the file".
//!
//! # Crash reasoning
//!
//! Nothing here is durable, and nothing needs to be: every image is the product of records that
//! are in the log from the tail on. A crash loses the images and recovery replays those records.
//! The one rule is the checkpoint's: flush, then `fdatasync`, then move the tail. The mutation
//! `checkpoint-without-image-flush` breaks it on purpose to show the crash tests catch it.

use crate::heap_file::{HEADER_BYTES, PAGE_SIZE};
use crate::log_format::Entry;
use crate::storage::HeapStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most bytes of images held before they are flushed to the heap file without waiting for a
/// checkpoint (8,192 pages).
pub(crate) const IMAGES_BYTES_MAX: usize = 32 << 20;

/// Most pages one flush puts in a single vectored write (Linux's `IOV_MAX`).
const PAGES_PER_WRITE_MAX: usize = 1024;

/// The committed images newer than the heap file's pages, shared by the committing thread and
/// the log writer.
pub(crate) struct CommittedImages {
    pages: HashMap<u64, Box<[u8; PAGE_SIZE]>>,
    bytes_max: usize,
    /// Flushes made so far, and the pages they wrote (for statistics).
    pub flushes: u64,
    pub pages_flushed: u64,
}

pub(crate) type SharedImages = Arc<Mutex<CommittedImages>>;

pub(crate) fn new_shared(bytes_max: usize) -> SharedImages {
    Arc::new(Mutex::new(CommittedImages { pages: HashMap::new(), bytes_max, flushes: 0, pages_flushed: 0 }))
}

/// Lock the store. A panic while holding it leaves images that are each either before or after
/// one record's entries; the heap fails on such a panic and writes nothing more, so go on.
pub(crate) fn lock(images: &SharedImages) -> MutexGuard<'_, CommittedImages> {
    images.lock().unwrap_or_else(|p| p.into_inner())
}

impl CommittedImages {
    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Copy the committed image of `page` into `out` (one page): from here if held, else from
    /// the heap file.
    pub fn read(&self, store: &dyn HeapStore, page: u64, out: &mut [u8]) -> std::io::Result<()> {
        debug_assert_eq!(out.len(), PAGE_SIZE);
        match self.pages.get(&page) {
            Some(image) => {
                out.copy_from_slice(&image[..]);
                Ok(())
            }
            None => store.read_exact_at(out, HEADER_BYTES + page * PAGE_SIZE as u64),
        }
    }

    /// Apply a durable record's entries, in order: each page they touch gets an image here
    /// (read from the heap file the first time), and the entries' bytes are copied into it.
    pub fn apply(&mut self, store: &dyn HeapStore, entries: &[Entry<'_>]) -> std::io::Result<()> {
        for e in entries {
            let mut offset = e.offset;
            let mut data = e.data;
            // Records we build never cross a page; split anyway rather than assume it.
            while !data.is_empty() {
                let page = offset / PAGE_SIZE as u64;
                let at = (offset % PAGE_SIZE as u64) as usize;
                let n = data.len().min(PAGE_SIZE - at);
                let image = match self.pages.entry(page) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let mut image = Box::new([0u8; PAGE_SIZE]);
                        store.read_exact_at(&mut image[..], HEADER_BYTES + page * PAGE_SIZE as u64)?;
                        v.insert(image)
                    }
                };
                image[at..at + n].copy_from_slice(&data[..n]);
                offset += n as u64;
                data = &data[n..];
            }
        }
        Ok(())
    }

    /// Do the images exceed their budget?
    pub fn over_budget(&self) -> bool {
        self.pages.len() * PAGE_SIZE > self.bytes_max
    }

    /// Write every image into the heap file (page cache; not synced), ascending, neighbouring
    /// pages in one vectored write, and forget them. On error the images are kept (a later
    /// flush writes them again; the heap fails anyway).
    pub fn flush(&mut self, store: &dyn HeapStore) -> std::io::Result<()> {
        if self.pages.is_empty() {
            return Ok(());
        }
        let mut order: Vec<u64> = self.pages.keys().copied().collect();
        order.sort_unstable();
        let mut bufs: Vec<&[u8]> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let first = order[i];
            let mut j = i + 1;
            while j < order.len() && j - i < PAGES_PER_WRITE_MAX && order[j] == first + (j - i) as u64 {
                j += 1;
            }
            bufs.clear();
            bufs.extend(order[i..j].iter().map(|p| &self.pages[p][..]));
            let at = HEADER_BYTES + first * PAGE_SIZE as u64;
            if bufs.len() == 1 {
                store.write_all_at(bufs[0], at)?;
            } else {
                store.write_vectored_at(&bufs, at)?;
            }
            i = j;
        }
        self.flushes += 1;
        self.pages_flushed += order.len() as u64;
        self.pages.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap file in memory.
    struct MemFile(Mutex<Vec<u8>>);

    impl HeapStore for MemFile {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let b = self.0.lock().unwrap();
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
            self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn reserve(&self, _len_total: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn applied_entries_are_read_back_before_the_flush_and_land_in_the_file_after_it() {
        let pages = 6u64;
        let before: Vec<u8> = (0..HEADER_BYTES + pages * PAGE_SIZE as u64).map(|i| (i % 251) as u8).collect();
        let file = MemFile(Mutex::new(before.clone()));
        let mut images = CommittedImages { pages: HashMap::new(), bytes_max: 1 << 20, flushes: 0, pages_flushed: 0 };
        let (a, b, c) = ([1u8; 3], [2u8; 10], [3u8; 5]);
        // Page 1 and 2 (one entry crossing their boundary), page 4; page 1 again later.
        let entries = [
            Entry { offset: PAGE_SIZE as u64 * 2 - 4, data: &b },
            Entry { offset: PAGE_SIZE as u64 * 4 + 7, data: &a },
            Entry { offset: PAGE_SIZE as u64 + 100, data: &c },
        ];
        images.apply(&file, &entries).unwrap();
        assert_eq!(images.len(), 3);
        assert_eq!(*file.0.lock().unwrap(), before, "nothing reaches the file before a flush");
        let mut want = before.clone();
        for e in &entries {
            let at = (HEADER_BYTES + e.offset) as usize;
            want[at..at + e.data.len()].copy_from_slice(e.data);
        }
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            images.read(&file, p, &mut page).unwrap();
            let at = (HEADER_BYTES + p * PAGE_SIZE as u64) as usize;
            assert_eq!(page, want[at..at + PAGE_SIZE], "page {p} read back");
        }
        images.flush(&file).unwrap();
        assert_eq!(images.len(), 0);
        assert_eq!((images.flushes, images.pages_flushed), (1, 3));
        assert_eq!(*file.0.lock().unwrap(), want);
    }

    #[test]
    fn the_budget_is_counted_in_pages() {
        let file = MemFile(Mutex::new(vec![0u8; (HEADER_BYTES as usize) + 4 * PAGE_SIZE]));
        let mut images =
            CommittedImages { pages: HashMap::new(), bytes_max: 2 * PAGE_SIZE, flushes: 0, pages_flushed: 0 };
        let one = [9u8; 1];
        for p in 0..3u64 {
            assert!(!images.over_budget());
            images.apply(&file, &[Entry { offset: p * PAGE_SIZE as u64, data: &one }]).unwrap();
        }
        assert!(images.over_budget());
    }
}
