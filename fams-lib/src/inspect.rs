//! Read-only look at a heap and its log: identity, sizes, superblock, what recovery would replay.

use crate::error::{Error, Result};
use crate::heap::{open_log_of, HeapOptions};
use crate::heap_file::{self, HeapHeader};
use crate::log_format::Superblock;
use crate::recovery::{self, RecoveryReport};
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Inspection {
    pub heap_path: PathBuf,
    pub header: HeapHeader,
    /// The format version the header was written in (`famsd upgrade` brings it to the current).
    pub header_version: u32,
    pub log_path: PathBuf,
    pub log_kind: &'static str,
    pub superblock: Superblock,
    /// What opening the heap now would replay (a dry run: nothing was written).
    pub pending: std::result::Result<RecoveryReport, String>,
    /// Whether another process holds the heap open.
    pub locked: bool,
    /// The heap's current size (it may have grown since it was formatted).
    pub heap_size_bytes: u64,
    /// Disk space the heap file takes (allocated blocks).
    pub disk_used_bytes: u64,
}

/// Inspect without locking, replaying or writing anything.
pub fn inspect(path: &Path, log_path: Option<PathBuf>) -> Result<Inspection> {
    let mut file = File::open(path).map_err(|e| Error::io(path, "opening the heap file", e))?;
    let (header, header_version) = heap_file::read_header_and_version(&file, path)?;
    // A shared probe lock, released right away (when the guard drops).
    let locked = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(guard) => {
            file = guard.unlock().map_err(|(_, e)| Error::io(path, "releasing the probe lock", e.into()))?;
            false
        }
        Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
            file = f;
            true
        }
        Err((_, e)) => return Err(Error::io(path, "probing the heap's lock", e.into())),
    };
    let opts = HeapOptions { log_path, ..HeapOptions::default() };
    // A block-device log is opened exclusively by the process that has the heap open: rather than
    // wait for it and fail, say at once who holds it.
    let wanted_log = opts.log_path.clone().unwrap_or_else(|| header.resolve_log_path(path));
    let on_block_device = std::fs::metadata(&wanted_log).is_ok_and(|m| m.file_type().is_block_device());
    if locked && on_block_device {
        return Err(Error::LogInUse { path: path.into(), holder: crate::heap::lock_holder(&file), log: wanted_log });
    }
    let (log_path, mut dev, _) = open_log_of(path, &header, &opts, &mut crate::storage::RealStorage)?;
    let superblock = recovery::read_superblock(dev.as_mut(), &log_path)?;
    let file = crate::storage::RealHeapFile::new(std::sync::Arc::new(file), 0);
    let pending = recovery::recover(dev.as_mut(), &log_path, &file, path, &header, recovery::Mode::DryRun, None)
        .map(|r| r.report)
        .map_err(|e| e.to_string());
    let heap_size_bytes = if superblock.heap_size == 0 { header.heap_size } else { superblock.heap_size };
    let disk_used_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
    };
    Ok(Inspection {
        heap_size_bytes,
        disk_used_bytes,
        heap_path: path.into(),
        header,
        header_version,
        log_kind: dev.kind().name(),
        log_path,
        superblock,
        pending,
        locked,
    })
}
