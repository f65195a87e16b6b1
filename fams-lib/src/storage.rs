//! The storage seam: everything the commit and recovery paths write or read goes through these
//! two interfaces — [`crate::io::LogDevice`] for the log and [`HeapStore`] for the heap file —
//! so a simulated device with a volatile write cache ([`crate::sim`]) can stand in for the real
//! ones in crash tests. Production uses [`RealStorage`]: the log through io_uring (or plain
//! syscalls) and the heap file itself. The heap's *mapping* always uses the real heap file: a
//! simulated store passes its reads and writes through to it and only models what would survive
//! a power cut.

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
}

/// The real heap file.
pub struct RealHeapFile(pub Arc<File>);

impl HeapStore for RealHeapFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

/// Where a heap's log and heap-file I/O go.
pub trait Storage {
    /// The log device at `path`.
    fn log(&mut self, path: &Path, opts: &LogOpenOptions) -> std::io::Result<Box<dyn LogDevice>>;
    /// The heap file as the commit and recovery paths see it.
    fn heap(&mut self, file: Arc<File>) -> Arc<dyn HeapStore>;
}

/// Production storage: the real log device and the real heap file.
pub struct RealStorage;

impl Storage for RealStorage {
    fn log(&mut self, path: &Path, opts: &LogOpenOptions) -> std::io::Result<Box<dyn LogDevice>> {
        io::open_log(path, opts)
    }
    fn heap(&mut self, file: Arc<File>) -> Arc<dyn HeapStore> {
        Arc::new(RealHeapFile(file))
    }
}
