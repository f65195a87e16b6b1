//! The storage seam: everything the commit and recovery paths write or read goes through these
//! two interfaces — [`crate::io::LogDevice`] for the log and [`HeapStore`] for the heap file —
//! so a simulated device with a volatile write cache ([`crate::sim`]) can stand in for the real
//! ones in crash tests. Production uses [`RealStorage`]: the log through io_uring (or plain
//! syscalls) and the heap file itself. The heap's *mapping* always uses the real heap file: a
//! simulated store wraps a [`RealHeapFile`], passes its reads and writes to it (so committed images
//! are read the production way, through its mapping) and only models what would survive a power
//! cut.

use crate::io::{self, LogDevice, LogOpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The heap file as the commit and recovery paths use it: positional reads and writes through the
/// page cache, and a flush that makes every earlier write durable.
pub trait HeapStore: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()>;
    /// fdatasync: every write before it is durable when it returns.
    fn sync_data(&self) -> std::io::Result<()>;
    /// Make the file `len_total` bytes long with its blocks allocated (growing the heap; see
    /// `heap_file::reserve`). Durable only after the next `sync_data`.
    fn reserve(&self, len_total: u64) -> std::io::Result<()>;
}

/// The real heap file. Committed-image reads go through a read-only shared mapping of it — a
/// memory copy from the page cache instead of a system call per page (a 4096-page commit made
/// 4,096 `pread`s). Writes stay `pwrite`: write-backs through a writable shared mapping were
/// tried and the power-cut test on the real kernel path (ext4 over a FUSE-backed loop device)
/// then found a torn heap page after recovery about once in 240 cuts, which `pwrite` never
/// showed; until that is understood, data reaches the heap file the plain way.
///
/// Who touches which bytes: the committing thread reads a page only when no record holding it is
/// on its way to the heap file, and only the log writer writes; so reads and writes of the same
/// bytes never overlap in time (see `Heap::capture` and the commit path's in-flight rule).
pub struct RealHeapFile {
    file: Arc<File>,
    /// Read-only shared mapping of the file up to the heap's maximum size, or None if mapping
    /// failed (then pread is used). Pages past the end of the file are never read (see `len`).
    /// A raw mapping: no Rust reference to its bytes is ever made, reads copy out of it.
    map: Option<memmap2::MmapRaw>,
    /// The file's length: reads stop here (past it, a shared mapping raises SIGBUS). Grows with
    /// `reserve`.
    len: std::sync::atomic::AtomicUsize,
}

impl RealHeapFile {
    /// The heap file, whose length may grow (by `reserve`) up to `len_max` bytes.
    pub fn new(file: Arc<File>, len_max: u64) -> RealHeapFile {
        let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let map_len = len.max(usize::try_from(len_max).unwrap_or(0));
        // A shared mapping of a file we hold open, unmapped on drop; the file is locked against
        // other fams processes and never truncated by us. Only the part below the file's
        // length is ever read (see `range`).
        let map = if map_len == 0 {
            None
        } else {
            memmap2::MmapOptions::new().len(map_len).map_raw_read_only(&*file).ok()
        };
        if let Some(m) = &map {
            // Dirty pages are scattered, read-ahead wastes.
            let _ = m.advise(memmap2::Advice::Random);
        }
        RealHeapFile { file, map, len: std::sync::atomic::AtomicUsize::new(len) }
    }

    fn range(&self, map: &memmap2::MmapRaw, offset: u64, n: usize) -> std::io::Result<usize> {
        let len = self.len.load(std::sync::atomic::Ordering::Acquire).min(map.len());
        match offset.checked_add(n as u64) {
            Some(end) if end <= len as u64 => Ok(offset as usize),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("heap file access of {n} bytes at {offset} runs past its end ({len})"),
            )),
        }
    }
}

impl HeapStore for RealHeapFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let Some(map) = &self.map else {
            return self.file.read_exact_at(buf, offset);
        };
        let at = self.range(map, offset, buf.len())?;
        // SAFETY: `at` is inside the mapping (checked by `range`).
        let src = unsafe { map.as_ptr().add(at) };
        // SAFETY: [at, at + len) lies inside the mapping and below the file's end (checked); no
        // thread writes these bytes concurrently (see the type's documentation); `buf` does not
        // overlap the mapping.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn reserve(&self, len_total: u64) -> std::io::Result<()> {
        crate::heap_file::reserve(&self.file, len_total)?;
        let len = usize::try_from(self.file.metadata()?.len()).unwrap_or(usize::MAX);
        self.len.fetch_max(len, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}

/// Where a heap's log and heap-file I/O go.
pub trait Storage {
    /// The log device at `path`.
    fn log(&mut self, path: &Path, opts: &LogOpenOptions) -> std::io::Result<Box<dyn LogDevice>>;
    /// The heap file as the commit and recovery paths see it; it may grow to `len_max` bytes.
    fn heap(&mut self, file: Arc<File>, len_max: u64) -> Arc<dyn HeapStore>;
}

/// Production storage: the real log device and the real heap file.
pub struct RealStorage;

impl Storage for RealStorage {
    fn log(&mut self, path: &Path, opts: &LogOpenOptions) -> std::io::Result<Box<dyn LogDevice>> {
        io::open_log(path, opts)
    }
    fn heap(&mut self, file: Arc<File>, len_max: u64) -> Arc<dyn HeapStore> {
        Arc::new(RealHeapFile::new(file, len_max))
    }
}
