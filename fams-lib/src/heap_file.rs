//! The heap file: a 4096-byte header, then the heap image.
//!
//! ```text
//!  offset 0          4096                                  4096 + heap size
//!  +-----------------+-------------------------------------+
//!  | header          | heap image (mapped MAP_PRIVATE)     |
//!  +-----------------+-------------------------------------+
//! ```
//!
//! Header (little-endian; written by `format`, fsynced with its directory; rewritten only by an
//! upgrade, crash-safely through a side file — see `heap/upgrade.rs`):
//! | off | size | field |
//! |-----|------|-------|
//! | 0   | 8    | magic `FAMSHEAP` |
//! | 8   | 4    | format version (2; version 1 is read too) |
//! | 12  | 4    | page size (4096) |
//! | 16  | 16   | heap identity: random; the log's superblock and every record carry it |
//! | 32  | 8    | heap size in bytes when formatted (multiple of 4096) |
//! | 40  | 8    | base address the heap is mapped at in every process |
//! | 48  | 8    | log size in bytes |
//! | 56  | 8    | creation time, seconds since the epoch |
//! | 64  | 2    | length of the log path |
//! | 66  | ≤1024| log path (UTF-8), absolute or relative to the heap file's directory |
//! | 1096| 8    | version 2: maximum heap size (the address range reserved at the base); version 1: zero, the maximum is the size |
//! | 4092| 4    | CRC32C of bytes 0..4092 |
//!
//! A heap grows (`Heap::grow`) without touching this header: its
//! *current* size lives in the log's superblock (see `log_format.rs`), written durably after the
//! file has been extended and its disk space reserved. A crash mid-grow therefore leaves the old
//! size (and a file longer than it needs, which is harmless) or the new one.
//!
//! The image holds the state of the last checkpoint plus any commits written back since; it is
//! only ever written with committed bytes (after their log record is durable), so a crash can
//! leave it *behind* the log but never ahead of it. Recovery replays the log onto it.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub const HEADER_BYTES: u64 = 4096;
pub const PAGE_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"FAMSHEAP";
pub(crate) const VERSION: u32 = 2;
/// Where version 2 keeps the maximum size.
const MAX_SIZE_AT: usize = 1096;
pub const LOG_PATH_MAX: usize = 1024;
const CRC_AT: usize = 4092;

/// 128 random bits naming one heap; its log must carry the same.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeapId(pub [u8; 16]);

impl HeapId {
    pub fn random() -> std::io::Result<HeapId> {
        let mut b = [0u8; 16];
        let mut filled = 0;
        while filled < b.len() {
            // raw libc: nix has no wrapper for getrandom(2).
            // SAFETY: the pointer and length describe the unfilled tail of `b`, which we own.
            let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(HeapId(b))
    }
}

impl std::fmt::Debug for HeapId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for HeapId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapHeader {
    pub heap_id: HeapId,
    /// The size when formatted; the current size is in the log's superblock.
    pub heap_size: u64,
    /// The largest the heap may grow to: the address range `[base, base + max)` is reserved at
    /// every open, so pointers stay valid as it grows.
    pub max_size: u64,
    pub base_addr: u64,
    pub log_size: u64,
    pub created_unix: u64,
    /// As recorded: absolute, or relative to the heap file's directory.
    pub log_path: String,
}

impl HeapHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.heap_id.0);
        b[32..40].copy_from_slice(&self.heap_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.base_addr.to_le_bytes());
        b[48..56].copy_from_slice(&self.log_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.created_unix.to_le_bytes());
        let path = self.log_path.as_bytes();
        assert!(path.len() <= LOG_PATH_MAX, "log path checked by format");
        b[64..66].copy_from_slice(&(path.len() as u16).to_le_bytes());
        b[66..66 + path.len()].copy_from_slice(path);
        b[MAX_SIZE_AT..MAX_SIZE_AT + 8].copy_from_slice(&self.max_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> std::result::Result<HeapHeader, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err(format!("file is {} bytes, shorter than the {HEADER_BYTES}-byte header", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("no heap magic at offset 0".into());
        }
        let crc = u32::from_le_bytes(b[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..CRC_AT]) {
            return Err("heap header checksum mismatch (the header is damaged)".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != 1 && version != VERSION {
            return Err(format!("heap format version {version}, this build reads versions 1 and {VERSION}"));
        }
        let page = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if page as usize != PAGE_SIZE {
            return Err(format!("heap page size {page}, this build uses {PAGE_SIZE}"));
        }
        let path_len = u16::from_le_bytes([b[64], b[65]]) as usize;
        if path_len > LOG_PATH_MAX {
            return Err(format!("log path length {path_len} exceeds {LOG_PATH_MAX}"));
        }
        let log_path =
            std::str::from_utf8(&b[66..66 + path_len]).map_err(|_| "log path is not UTF-8".to_string())?.to_string();
        // Past the log path, version 1 wrote zeros; the unused bytes must be zero in both.
        let max_size = if version == 1 { 0 } else { u64_at(MAX_SIZE_AT) };
        if version != 1 && max_size == 0 {
            return Err("the maximum heap size is 0 (a version-2 header always records it)".into());
        }
        if b[66 + path_len..MAX_SIZE_AT].iter().chain(&b[MAX_SIZE_AT + 8..CRC_AT]).any(|&x| x != 0) {
            return Err("unused heap header bytes are not zero".into());
        }
        let h = HeapHeader {
            heap_id: HeapId(b[16..32].try_into().expect("16 bytes")),
            max_size: if max_size == 0 { u64_at(32) } else { max_size },
            heap_size: u64_at(32),
            base_addr: u64_at(40),
            log_size: u64_at(48),
            created_unix: u64_at(56),
            log_path,
        };
        if h.heap_size == 0 || h.heap_size % PAGE_SIZE as u64 != 0 {
            return Err(format!("heap size {} is not a positive multiple of {PAGE_SIZE}", h.heap_size));
        }
        if h.max_size < h.heap_size || h.max_size % PAGE_SIZE as u64 != 0 {
            return Err(format!("maximum heap size {} is below the size {} or not a multiple of {PAGE_SIZE}", h.max_size, h.heap_size));
        }
        if h.base_addr % PAGE_SIZE as u64 != 0 || h.base_addr.checked_add(h.max_size).is_none() {
            return Err(format!("base address {:#x} is not usable", h.base_addr));
        }
        Ok(h)
    }

    /// The log's path as the operator would open it: relative paths are relative to the heap
    /// file's directory, so a heap and its log can be moved together.
    pub fn resolve_log_path(&self, heap_path: &Path) -> PathBuf {
        let p = PathBuf::from(&self.log_path);
        if p.is_absolute() {
            p
        } else {
            heap_path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Make the heap file `len_total` bytes long (never shorter) with its blocks allocated, so that
/// writing committed bytes back into it can never fail for lack of space: a full disk shows
/// here, when formatting or growing, where it is refused cleanly, and not after a commit was
/// acknowledged. Filesystems without fallocate keep the file sparse (and the guarantee is then
/// theirs to keep). Not durable by itself: the caller syncs.
pub(crate) fn reserve(file: &std::fs::File, len_total: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let len = libc::off_t::try_from(len_total)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "heap file size out of range"))?;
    // Mode 0 extends the file size when the range ends past it.
    if let Err(e) = fallocate(file, FallocateFlags::empty(), 0, len) {
        if e != nix::errno::Errno::EOPNOTSUPP {
            return Err(e.into());
        }
        if file.metadata()?.len() < len_total {
            file.set_len(len_total)?;
        }
    }
    Ok(())
}

/// Read and check the header of the heap file at `path`.
pub fn read_header(file: &std::fs::File, path: &Path) -> Result<HeapHeader> {
    read_header_and_version(file, path).map(|(h, _)| h)
}

/// [`read_header`], and the format version the header was written in.
pub fn read_header_and_version(file: &std::fs::File, path: &Path) -> Result<(HeapHeader, u32)> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; HEADER_BYTES as usize];
    let mut got = 0;
    while got < b.len() {
        let n = file.read_at(&mut b[got..], got as u64).map_err(|e| Error::io(path, "reading the heap header", e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let h = HeapHeader::decode(&b[..got]).map_err(|mut reason| {
        if crate::heap::upgrade::side_path(path).exists() {
            reason.push_str(
                "; an interrupted header upgrade left its new header beside the heap: opening the heap for writing (or `famsd upgrade` again) finishes it",
            );
        }
        Error::NotAHeap { path: path.into(), reason }
    })?;
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    let len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    if len < HEADER_BYTES + h.heap_size {
        return Err(Error::BadHeap {
            path: path.into(),
            reason: format!(
                "the file is {len} bytes but its header says the heap is {} bytes (+{HEADER_BYTES} header); it was truncated",
                h.heap_size
            ),
        });
    }
    Ok((h, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> HeapHeader {
        HeapHeader {
            heap_id: HeapId::random().unwrap(),
            heap_size: 1 << 30,
            max_size: 4 << 30,
            base_addr: 0x6000_0000_0000,
            log_size: 64 << 20,
            created_unix: 1,
            log_path: "heap.fams.log".into(),
        }
    }

    #[test]
    fn round_trip() {
        let h = header();
        assert_eq!(HeapHeader::decode(&h.encode()).unwrap(), h);
        assert_ne!(HeapId::random().unwrap(), h.heap_id);
    }

    #[test]
    fn damage_is_refused() {
        let b = header().encode();
        for i in (0..200).chain(CRC_AT..HEADER_BYTES as usize) {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(HeapHeader::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(HeapHeader::decode(&b[..100]).is_err());
    }

    #[test]
    fn relative_log_paths_follow_the_heap() {
        let h = header();
        assert_eq!(h.resolve_log_path(Path::new("/data/x/heap")), PathBuf::from("/data/x/heap.fams.log"));
    }
}
