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
//!   back from the heap file, which must then be current);
//! * in the background, on the heap-file thread (`checkpoint.rs`), once a checkpoint nears (half
//!   the threshold, or half the budget) and a batch has gathered: then the checkpoint finds little
//!   left to write.
//!
//! Each flush writes the pages in ascending order, neighbours in one vectored write.
//!
//! # Who reads what
//!
//! The committed image of a page is its image here if there is one, else the heap file's page.
//! The committing thread reads it to diff a dirty page (only for pages with no record on its way,
//! as before), rollback to restore one, and the log writer to log a page whole. Every read and
//! every change happens under this store's lock. An image is forgotten only once the file holds
//! it, so a reader never sees a page between "forgotten here" and "in the file": a full flush
//! writes and forgets under the lock; the background flush copies a few images under it, writes
//! the copies without it (a capture never waits for a write), and forgets each one only if no
//! record changed it meanwhile (a version stamp says). One more lock, `file_writes`, is held by
//! whoever writes images into the file, so two writes of one page never land out of order (an
//! older background copy after a checkpoint's newer one would leave the file stale).
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

/// The committed images newer than the heap file's pages, shared by the committing thread and
/// the log writer.
pub(crate) struct CommittedImages {
    pages: HashMap<u64, Image>,
    /// Stamped on an image each time a record changes it, so a flush made without the lock can
    /// tell whether the image it wrote is still the newest.
    next_version: u64,
    bytes_max: usize,
    /// Flushes made so far, and the pages they wrote (for statistics).
    pub flushes: u64,
    pub pages_flushed: u64,
}

struct Image {
    version: u64,
    bytes: Box<[u8; PAGE_SIZE]>,
}

/// Copies of some images, taken to be written without the lock: (page, version, bytes).
pub(crate) type ImageCopies = Vec<(u64, u64, Box<[u8; PAGE_SIZE]>)>;

/// The images and the right to write them into the heap file.
pub(crate) struct ImageStore {
    images: Mutex<CommittedImages>,
    /// Held by whoever writes images into the heap file (taken before `images`), so two writes
    /// of one page can never land out of order: the heap-file thread's batches write
    /// copies without holding `images`, and a checkpoint's flush must not be overtaken by it.
    file_writes: Mutex<()>,
}

pub(crate) type SharedImages = Arc<ImageStore>;

pub(crate) fn new_shared(bytes_max: usize) -> SharedImages {
    Arc::new(ImageStore { images: Mutex::new(CommittedImages::new(bytes_max)), file_writes: Mutex::new(()) })
}

/// Lock the images. A panic while holding it leaves images that are each either before or after
/// one record's entries; the heap fails on such a panic and writes nothing more, so go on.
pub(crate) fn lock(images: &SharedImages) -> MutexGuard<'_, CommittedImages> {
    images.images.lock().unwrap_or_else(|p| p.into_inner())
}

/// Take the right to write images into the heap file (before [`lock`], never after it).
pub(crate) fn lock_file_writes(images: &SharedImages) -> MutexGuard<'_, ()> {
    images.file_writes.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write every image into the heap file and forget them (see [`CommittedImages::flush`]).
pub(crate) fn flush_all(images: &SharedImages, store: &dyn HeapStore) -> std::io::Result<()> {
    let _writing = lock_file_writes(images);
    lock(images).flush(store)
}

impl CommittedImages {
    pub fn new(bytes_max: usize) -> CommittedImages {
        CommittedImages { pages: HashMap::new(), next_version: 0, bytes_max, flushes: 0, pages_flushed: 0 }
    }

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
                out.copy_from_slice(&image.bytes[..]);
                Ok(())
            }
            None => store.read_exact_at(out, HEADER_BYTES + page * PAGE_SIZE as u64),
        }
    }

    /// The committed image of `page`, for reading in place: this store's image if it holds one
    /// (no copy), else the heap file's page read into `scratch` (one page).
    pub fn committed<'a>(&'a self, store: &dyn HeapStore, page: u64, scratch: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
        debug_assert_eq!(scratch.len(), PAGE_SIZE);
        match self.pages.get(&page) {
            Some(image) => Ok(&image.bytes[..]),
            None => {
                store.read_exact_at(scratch, HEADER_BYTES + page * PAGE_SIZE as u64)?;
                Ok(scratch)
            }
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
                        let mut bytes = Box::new([0u8; PAGE_SIZE]);
                        store.read_exact_at(&mut bytes[..], HEADER_BYTES + page * PAGE_SIZE as u64)?;
                        v.insert(Image { version: 0, bytes })
                    }
                };
                image.bytes[at..at + n].copy_from_slice(&data[..n]);
                image.version = self.next_version;
                self.next_version += 1;
                offset += n as u64;
                data = &data[n..];
            }
        }
        Ok(())
    }

    /// The budget, in bytes.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Do the images exceed their budget?
    pub fn over_budget(&self) -> bool {
        self.pages.len() * PAGE_SIZE > self.bytes_max
    }

    /// Write every image into the heap file (page cache; not synced), ascending, neighbouring
    /// pages in one vectored write, and forget them. On error the images are kept (a later
    /// flush writes them again; the heap fails anyway).
    pub fn flush(&mut self, store: &dyn HeapStore) -> std::io::Result<()> {
        self.flush_some(store, usize::MAX).map(|_| ())
    }

    /// Like [`CommittedImages::flush`], for at most `pages_max` of the images (any of them);
    /// returns how many are left.
    pub fn flush_some(&mut self, store: &dyn HeapStore, pages_max: usize) -> std::io::Result<usize> {
        let mut order: Vec<u64> = self.pages.keys().copied().take(pages_max).collect();
        order.sort_unstable();
        let items: Vec<(u64, &[u8])> = order.iter().map(|p| (*p, &self.pages[p].bytes[..])).collect();
        write_pages(store, &items)?;
        self.count_flush(order.len());
        for p in &order {
            self.pages.remove(p);
        }
        Ok(self.pages.len())
    }

    /// The pages held, ascending.
    pub fn pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.pages.keys().copied().collect();
        pages.sort_unstable();
        pages
    }

    /// Copies of the images of those of `pages` still held, in that order, to write without the
    /// lock; then [`CommittedImages::forget_written`].
    pub fn copy_pages(&self, pages: &[u64]) -> ImageCopies {
        pages.iter().filter_map(|p| self.pages.get(p).map(|i| (*p, i.version, i.bytes.clone()))).collect()
    }

    /// Forget the images of `written` (copies taken by [`CommittedImages::copy_pages`], now in the
    /// heap file) unless a record changed them since: those stay, newer than the file.
    pub fn forget_written(&mut self, written: &ImageCopies) {
        for (page, version, _) in written {
            if self.pages.get(page).is_some_and(|i| i.version == *version) {
                self.pages.remove(page);
            }
        }
        self.count_flush(written.len());
    }

    fn count_flush(&mut self, pages: usize) {
        if pages > 0 {
            self.flushes += 1;
            self.pages_flushed += pages as u64;
        }
    }
}

/// Write the images held now into the heap file (page cache, no sync), `batch_pages` at a time:
/// each batch is copied under the lock and written without it (a capture reading an image never
/// waits for a write), and each page forgotten only if no record changed it meanwhile (those stay,
/// newer than the file). Every page held at the start is then in the file, at that state or a newer
/// one, or still held. `keep_going` is asked before each batch; Ok(false) if it said no.
pub(crate) fn write_in_batches(
    images: &SharedImages,
    store: &dyn HeapStore,
    batch_pages: usize,
    keep_going: &dyn Fn() -> bool,
) -> std::io::Result<bool> {
    assert!(batch_pages > 0);
    let pages = lock(images).pages();
    for batch in pages.chunks(batch_pages) {
        if !keep_going() {
            return Ok(false);
        }
        let _writing = lock_file_writes(images);
        let copies = lock(images).copy_pages(batch);
        let items: Vec<(u64, &[u8])> = copies.iter().map(|(p, _, b)| (*p, &b[..])).collect();
        write_pages(store, &items)?;
        lock(images).forget_written(&copies);
    }
    Ok(true)
}

/// Write whole pages into the heap file (page cache), `pages` ascending: neighbouring pages go out
/// in one vectored write (`storage::write_entries` groups them).
pub(crate) fn write_pages(store: &dyn HeapStore, pages: &[(u64, &[u8])]) -> std::io::Result<()> {
    let entries: Vec<Entry<'_>> =
        pages.iter().map(|&(page, data)| Entry { offset: page * PAGE_SIZE as u64, data }).collect();
    crate::storage::write_entries(store, &entries)
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
        let mut images = CommittedImages::new(1 << 20);
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
    fn a_partial_flush_writes_some_images_and_keeps_the_rest_readable() {
        let pages = 10u64;
        let file = MemFile(Mutex::new(vec![0u8; (HEADER_BYTES + pages * PAGE_SIZE as u64) as usize]));
        let mut images = CommittedImages::new(1 << 20);
        let one = [5u8; 1];
        let entries: Vec<Entry<'_>> = (0..pages).map(|p| Entry { offset: p * PAGE_SIZE as u64 + 3, data: &one }).collect();
        images.apply(&file, &entries).unwrap();
        assert_eq!(images.flush_some(&file, 4).unwrap(), 6);
        assert_eq!(images.flush_some(&file, 4).unwrap(), 2);
        // Flushed or not, every page reads back its committed image.
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            images.read(&file, p, &mut page).unwrap();
            assert_eq!(page[3], 5, "page {p}");
        }
        assert_eq!(images.flush_some(&file, 4).unwrap(), 0);
        assert_eq!(images.pages_flushed, pages);
        let f = file.0.lock().unwrap();
        assert!((0..pages).all(|p| f[(HEADER_BYTES + p * PAGE_SIZE as u64 + 3) as usize] == 5));
    }

    #[test]
    fn committed_images_are_read_in_place_and_others_from_the_file() {
        let pages = 3u64;
        let before: Vec<u8> = (0..HEADER_BYTES + pages * PAGE_SIZE as u64).map(|i| (i % 241) as u8).collect();
        let file = MemFile(Mutex::new(before.clone()));
        let mut images = CommittedImages::new(1 << 20);
        let seven = [7u8; 9];
        images.apply(&file, &[Entry { offset: PAGE_SIZE as u64 + 5, data: &seven }]).unwrap();
        let mut scratch = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            let at = (HEADER_BYTES + p * PAGE_SIZE as u64) as usize;
            let mut want = before[at..at + PAGE_SIZE].to_vec();
            if p == 1 {
                want[5..14].copy_from_slice(&seven);
            }
            let scratch_at = scratch.as_ptr();
            let got = images.committed(&file, p, &mut scratch).unwrap();
            assert_eq!(got, &want[..], "page {p}");
            assert_eq!(got.as_ptr() == scratch_at, p != 1, "page {p}: a held image is read in place, others from the file");
        }
    }

    #[test]
    fn the_budget_is_counted_in_pages() {
        let file = MemFile(Mutex::new(vec![0u8; (HEADER_BYTES as usize) + 4 * PAGE_SIZE]));
        let mut images =
            CommittedImages::new(2 * PAGE_SIZE);
        let one = [9u8; 1];
        for p in 0..3u64 {
            assert!(!images.over_budget());
            images.apply(&file, &[Entry { offset: p * PAGE_SIZE as u64, data: &one }]).unwrap();
        }
        assert!(images.over_budget());
    }
}
