//! Upgrading a heap file's header in place: to the current format version, and to a larger
//! maximum size (the address range a heap may grow into).
//!
//! The header is one 4096-byte block at the front of the heap file, checked by a CRC. Written in
//! place, a power cut could tear it (each 512-byte sector old, new, or garbage) and leave a heap
//! that refuses to open. So the new header is first made durable in a side file next to the heap,
//! `.NAME.header-upgrade`, and only then written over the old one:
//!
//! 1. write the new header into the side file; fsync it; fsync the directory (the side file is
//!    now durable, and the header in place has not been touched);
//! 2. write the new header at offset 0 of the heap file; fdatasync;
//! 3. remove the side file; fsync the directory.
//!
//! Whoever next opens the heap for writing (under the heap's lock) first finishes an interrupted
//! upgrade ([`finish_interrupted`]): a side file whose content is a valid header of this heap
//! means step 1 completed, so the header in place may be torn — it is overwritten from the side
//! file, synced, and the side file removed. A side file that is not a valid header was cut in
//! step 1, before the header in place was touched: it is removed and the old header stands.
//! Either way the result is the old header or the new one, never a mix. Nothing else in the heap
//! file or the log changes: records and the superblock name the heap by its identity, which an
//! upgrade keeps.
//!
//! The order of the steps is [`plan`]; `tests/tests/upgrade.rs` cuts the power after each of its
//! operations, tears the unsynced writes per sector, and opens the result.

use super::format::{range_is_free, sync_parent_dir};
use super::open::open_locked;
use crate::error::{Error, Result};
use crate::heap_file::{self, HeapHeader, HEADER_BYTES, PAGE_SIZE};
use crate::io::{self, LogOpenOptions};
use crate::recovery;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What to change. `UpgradeOptions::default()` only brings the header to the current version.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct UpgradeOptions {
    /// Raise the maximum size (rounded up to whole pages). It can only be raised: pointers into
    /// the heap assume the reserved range stays where it is.
    pub max_size_bytes: Option<u64>,
}

/// What an upgrade did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeReport {
    pub heap_path: PathBuf,
    pub version_before: u32,
    pub version_after: u32,
    pub max_size_before: u64,
    pub max_size_after: u64,
    /// The heap's current size (from the log's superblock).
    pub size_bytes: u64,
    /// False when the header already said all of this: nothing was written.
    pub changed: bool,
    /// An earlier upgrade of this heap had been interrupted and was finished first.
    pub finished_interrupted: bool,
}

/// One file operation of an upgrade, in the order [`plan`] gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeOp {
    /// Create the side file holding these bytes (not yet durable).
    WriteSide(Vec<u8>),
    /// fsync the side file.
    SyncSide,
    /// fsync the directory holding the heap file and the side file.
    SyncDir,
    /// Write these bytes at offset 0 of the heap file (not yet durable).
    WriteHeader(Vec<u8>),
    /// fdatasync the heap file.
    SyncHeader,
    /// Remove the side file.
    RemoveSide,
}

/// The operations that replace a heap's header with `new_header` (4096 encoded bytes), in order.
pub fn plan(new_header: &[u8]) -> Vec<UpgradeOp> {
    assert_eq!(new_header.len() as u64, HEADER_BYTES, "a whole header block");
    vec![
        UpgradeOp::WriteSide(new_header.to_vec()),
        UpgradeOp::SyncSide,
        UpgradeOp::SyncDir,
        UpgradeOp::WriteHeader(new_header.to_vec()),
        UpgradeOp::SyncHeader,
        UpgradeOp::RemoveSide,
        UpgradeOp::SyncDir,
    ]
}

/// `dir/.NAME.header-upgrade`: where the new header of `dir/NAME` is made durable first.
pub fn side_path(heap_path: &Path) -> PathBuf {
    let name = heap_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    heap_path.with_file_name(format!(".{name}.header-upgrade"))
}

fn run(heap_path: &Path, file: &File, ops: &[UpgradeOp]) -> Result<()> {
    let side = side_path(heap_path);
    let mut side_file: Option<File> = None;
    for op in ops {
        match op {
            UpgradeOp::WriteSide(bytes) => {
                let mut f = File::create(&side).map_err(|e| Error::io(&side, "creating the header upgrade file", e))?;
                f.write_all(bytes).map_err(|e| Error::io(&side, "writing the header upgrade file", e))?;
                side_file = Some(f);
            }
            UpgradeOp::SyncSide => {
                let sync = |f: &File| f.sync_all();
                match &side_file {
                    Some(f) => sync(f),
                    None => File::open(&side).and_then(|f| sync(&f)),
                }
                .map_err(|e| Error::io(&side, "fsync of the header upgrade file", e))?;
            }
            UpgradeOp::SyncDir => sync_parent_dir(heap_path)?,
            UpgradeOp::WriteHeader(bytes) => {
                file.write_all_at(bytes, 0).map_err(|e| Error::io(heap_path, "writing the new header", e))?
            }
            UpgradeOp::SyncHeader => {
                file.sync_data().map_err(|e| Error::io(heap_path, "fdatasync of the new header", e))?
            }
            UpgradeOp::RemoveSide => {
                side_file = None;
                std::fs::remove_file(&side).map_err(|e| Error::io(&side, "removing the header upgrade file", e))?;
            }
        }
    }
    Ok(())
}

/// Finish an upgrade a crash interrupted (see the module docs). `file` is the heap file, opened
/// for writing and locked by the caller. Returns whether there was one to finish.
pub(crate) fn finish_interrupted(heap_path: &Path, file: &File) -> Result<bool> {
    let side = side_path(heap_path);
    let bytes = match std::fs::read(&side) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(&side, "reading the header upgrade file", e)),
    };
    if let Ok(new) = HeapHeader::decode(&bytes) {
        let mut in_place = vec![0u8; HEADER_BYTES as usize];
        let got = file.read_at(&mut in_place, 0).map_err(|e| Error::io(heap_path, "reading the heap header", e))?;
        // The identity sits in the first sector, which a torn write leaves old or new (both carry
        // it) or garbage; a valid header of another heap means the side file is not ours.
        if let Ok(current) = HeapHeader::decode(&in_place[..got]) {
            if current.heap_id != new.heap_id {
                return Err(Error::BadHeap {
                    path: side.clone(),
                    reason: format!(
                        "this header upgrade file belongs to heap {}, not to {} (heap {}); remove it if it was copied here by mistake",
                        new.heap_id,
                        heap_path.display(),
                        current.heap_id
                    ),
                });
            }
        }
        // Steps 2 and 3 again: idempotent.
        let rest = [UpgradeOp::WriteHeader(bytes), UpgradeOp::SyncHeader, UpgradeOp::RemoveSide, UpgradeOp::SyncDir];
        run(heap_path, file, &rest)?;
        tracing::info!(heap = %heap_path.display(), "finished an interrupted header upgrade");
    } else {
        // Cut while the side file was being made: the header in place was never touched.
        std::fs::remove_file(&side).map_err(|e| Error::io(&side, "removing an incomplete header upgrade file", e))?;
        sync_parent_dir(heap_path)?;
    }
    Ok(true)
}

/// Upgrade the heap at `heap_path` (which must not be open anywhere): see [`UpgradeOptions`].
pub(super) fn upgrade(heap_path: &Path, opts: &UpgradeOptions) -> Result<UpgradeReport> {
    let file = open_locked(heap_path)?;
    let finished_interrupted = finish_interrupted(heap_path, &file)?;
    let (old, version_before) = heap_file::read_header_and_version(&file, heap_path)?;
    let size_bytes = current_size(heap_path, &old);
    let page = PAGE_SIZE as u64;
    let max_size_after = match opts.max_size_bytes {
        None => old.max_size,
        Some(m) => m
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::InvalidArgument(format!("maximum size {m} is out of range")))?,
    };
    if max_size_after < old.max_size {
        return Err(Error::InvalidArgument(format!(
            "{}: the maximum size is {} bytes and can only be raised (asked for {max_size_after}); the heap is {size_bytes} bytes now",
            heap_path.display(),
            old.max_size
        )));
    }
    if old.base_addr.checked_add(max_size_after).is_none_or(|end| end > 1 << 47) {
        return Err(Error::InvalidArgument(format!(
            "{}: a maximum of {max_size_after} bytes at base {:#x} runs past the user address space; the base cannot move (pointers in the heap hold it)",
            heap_path.display(),
            old.base_addr
        )));
    }
    if max_size_after > old.max_size && !range_is_free(old.base_addr, max_size_after) {
        return Err(Error::AddressTaken {
            path: heap_path.into(),
            base: old.base_addr as usize,
            size: max_size_after as usize,
        });
    }
    let mut report = UpgradeReport {
        heap_path: heap_path.into(),
        version_before,
        version_after: heap_file::VERSION,
        max_size_before: old.max_size,
        max_size_after,
        size_bytes,
        changed: false,
        finished_interrupted,
    };
    if version_before == heap_file::VERSION && max_size_after == old.max_size {
        return Ok(report);
    }
    let new = HeapHeader { max_size: max_size_after, ..old };
    run(heap_path, &file, &plan(&new.encode()))?;
    report.changed = true;
    tracing::info!(heap = %heap_path.display(), from = version_before, max_size = max_size_after, "upgraded the heap header");
    Ok(report)
}

/// The heap's current size: the log's superblock keeps it (a version-1 superblock, or one that
/// cannot be read here, means the size formatted).
fn current_size(heap_path: &Path, header: &HeapHeader) -> u64 {
    let log_path = header.resolve_log_path(heap_path);
    io::open_log(&log_path, &LogOpenOptions::default())
        .ok()
        .and_then(|mut dev| recovery::read_superblock(dev.as_mut(), &log_path).ok())
        .map(|sb| sb.heap_size.max(header.heap_size))
        .unwrap_or(header.heap_size)
}
