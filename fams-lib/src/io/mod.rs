//! The log device: where the redo log's bytes go, and the point at which they are durable.
//!
//! A [`LogDevice`] is a file or a raw block device that fams writes in units of [`LOG_ALIGN`]
//! (4096) bytes. [`LogDevice::write_durable`] returns only once the bytes would survive a power
//! cut. This trait is also the storage seam: a simulated device can implement it for crash tests.
//!
//! Why it is built this way:
//!
//! * **O_DIRECT.** The log is opened with `O_DIRECT`, which bypasses the page cache, so a write
//!   is sent to the device itself rather than copied into kernel memory to be written back later.
//!   The price is alignment: offsets, lengths and buffer addresses must be multiples of the
//!   device's direct-I/O alignment (read with `statx(STATX_DIOALIGN)`, or the logical block
//!   size). fams always uses 4096 and refuses devices that need more. [`AlignedBuf`] gives
//!   4096-aligned memory; unaligned caller memory is copied into one first.
//! * **RWF_DSYNC on a raw block device** is turned by the block layer into a FUA (force unit
//!   access) write: the device acknowledges it only once it is on stable media. If the device does
//!   not support FUA, the kernel follows the write with a cache flush; if it has no volatile write
//!   cache, neither is needed and none is sent.
//! * **RWF_DSYNC on ext4/xfs** is a cheap single device write only when it is a pure overwrite of
//!   already *written* extents: a FUA write where the device supports FUA, otherwise the write
//!   followed by a cache flush (as on this project's VM disk, `fua=0`). Writing into a hole or into an unwritten (fallocated) extent
//!   changes file metadata, which then needs a journal commit as well. So [`create_log_file`]
//!   preallocates the whole log, fills it with real zeros and fsyncs it once; after that every
//!   log write is an overwrite.
//! * **io_uring completions are unordered.** Requests submitted together may run and complete in
//!   any order, so an fdatasync submitted beside its writes could run before them and flush
//!   nothing useful. In [`FlushMode::Fdatasync`] every write is `IO_LINK`-ed to one final
//!   `Fsync(DATASYNC)`: a chain runs in order, and if a link fails the rest complete with
//!   `-ECANCELED`. Every completion is checked; a short write is an error.
//! * **The Sync fallback.** Container runtimes' default seccomp profiles (and
//!   `kernel.io_uring_disabled`) block io_uring. [`open_log`] then silently uses plain
//!   `pwritev2(RWF_DSYNC)` or `pwrite` + `fdatasync` ([`IoPath::Sync`]) and records why in
//!   [`LogDevice::fallback_reason`].
//!
//! A block device is opened with `O_EXCL` as well, so the kernel refuses it (EBUSY) while it is
//! mounted or held by another exclusive user.

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;

mod aligned;
mod choose;
mod device;
mod sync;
mod uring;

pub use aligned::AlignedBuf;
// Without `testing`, only what the crate's root re-exports is reachable.
#[cfg_attr(not(feature = "testing"), allow(unused_imports))]
pub use choose::{choose_io, IoChoice, IoMeasurement, CHOICE_SAMPLES};
#[cfg_attr(not(feature = "testing"), allow(unused_imports))]
pub use device::{write_cache_state, BlockDeviceInfo, WriteCacheState};

use device::Target;

/// Every offset and length given to a [`LogDevice`] is a multiple of this.
pub const LOG_ALIGN: usize = 4096;

/// The largest single read or write request issued; longer segments are split. (Linux caps one
/// request at just under 2 GiB, and io_uring lengths are u32.)
const MAX_IO_BYTES: usize = 1 << 30;

/// Whether `x` is a multiple of [`LOG_ALIGN`].
fn log_aligned(x: u64) -> bool {
    x & (LOG_ALIGN as u64 - 1) == 0
}

/// How I/O is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPath {
    /// io_uring: all segments of a write in one submission.
    Uring,
    /// Plain blocking syscalls (`pwritev2`, `pwrite`, `fdatasync`, `pread`).
    Sync,
}

impl IoPath {
    /// `"io_uring"` or `"sync"`.
    pub fn name(self) -> &'static str {
        match self {
            IoPath::Uring => "io_uring",
            IoPath::Sync => "sync",
        }
    }
}

impl FromStr for IoPath {
    type Err = String;
    /// Accepts `uring`, `io_uring` or `sync` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<IoPath, String> {
        match s.to_ascii_lowercase().as_str() {
            "uring" | "io_uring" | "io-uring" => Ok(IoPath::Uring),
            "sync" => Ok(IoPath::Sync),
            _ => Err(format!("unknown io path {s:?}: expected \"io_uring\" (or \"uring\") or \"sync\"")),
        }
    }
}

impl fmt::Display for IoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a write is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Each write carries `RWF_DSYNC` (a FUA write on block devices and overwrites on ext4/xfs).
    Dsync,
    /// Plain writes followed by one (io_uring: linked) `fdatasync`.
    Fdatasync,
}

impl FlushMode {
    /// `"dsync"` or `"fdatasync"`.
    pub fn name(self) -> &'static str {
        match self {
            FlushMode::Dsync => "dsync",
            FlushMode::Fdatasync => "fdatasync",
        }
    }
}

impl FromStr for FlushMode {
    type Err = String;
    /// Accepts `dsync` or `fdatasync` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<FlushMode, String> {
        match s.to_ascii_lowercase().as_str() {
            "dsync" | "rwf_dsync" => Ok(FlushMode::Dsync),
            "fdatasync" => Ok(FlushMode::Fdatasync),
            _ => Err(format!("unknown flush mode {s:?}: expected \"dsync\" or \"fdatasync\"")),
        }
    }
}

impl fmt::Display for FlushMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the log lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// A regular file (preallocated by [`create_log_file`]).
    File,
    /// A raw block device (a disk, partition, loop device, ...).
    BlockDevice,
}

impl LogKind {
    /// `"file"` or `"block"`.
    pub fn name(self) -> &'static str {
        match self {
            LogKind::File => "file",
            LogKind::BlockDevice => "block",
        }
    }
}

impl fmt::Display for LogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of completed operations. A write or read split into several requests (segments,
/// or pieces of segments longer than 1 GiB) counts each request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Write requests completed.
    pub writes: u64,
    /// Bytes written by those requests.
    pub bytes_written: u64,
    /// Of `writes`, those that carried RWF_DSYNC.
    pub dsync_writes: u64,
    /// fdatasync operations completed.
    pub fdatasyncs: u64,
    /// Read requests completed.
    pub reads: u64,
    /// Bytes read by those requests.
    pub bytes_read: u64,
}

/// A log device: a file or block device written in aligned units, durably.
pub trait LogDevice: Send {
    /// The path the log was opened with.
    fn path(&self) -> &Path;
    /// File or block device.
    fn kind(&self) -> LogKind;
    /// How I/O is issued.
    fn io_path(&self) -> IoPath;
    /// How writes are made durable.
    fn flush_mode(&self) -> FlushMode;
    /// Usable size in bytes (a multiple of [`LOG_ALIGN`]).
    fn size_bytes(&self) -> u64;
    /// Write every `(offset, bytes)` segment and return only when all of them are durable.
    ///
    /// Offsets and lengths must be multiples of [`LOG_ALIGN`], inside the device, and must not
    /// overlap (otherwise an `InvalidInput` error, before any I/O). Empty segments are skipped;
    /// with no bytes to write nothing is flushed. On error, any subset of the segments may have
    /// reached the device, durably or not: treat the whole write as failed.
    fn write_durable(&mut self, segments: &[(u64, &[u8])]) -> io::Result<()>;
    /// Read exactly `buf.len()` bytes at `offset` (both multiples of [`LOG_ALIGN`]). A range past
    /// the end is an `UnexpectedEof` error.
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Counters of the I/O done so far.
    fn stats(&self) -> IoStats;
    /// Why the automatic choice fell back from io_uring to [`IoPath::Sync`], if it did.
    fn fallback_reason(&self) -> Option<&str> {
        None
    }
    /// A second handle that reads the same device, for a thread that reads ahead while this one
    /// is busy (recovery's replay). None if the device offers none; the caller then reads on its
    /// own thread. Its reads are not counted in [`LogDevice::stats`] (recovery counts them in
    /// `RecoveryReport::log_bytes_read`).
    fn reader(&self) -> Option<Box<dyn LogRead>> {
        None
    }
}

/// Reads of a log device from another thread (see [`LogDevice::reader`]).
pub trait LogRead: Send {
    /// As [`LogDevice::read_exact_at`].
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// The real device's second handle: a duplicate of its descriptor (same open file, so the same
/// `O_DIRECT`), read with plain `pread`s.
struct PlainReader {
    target: Target,
    stats: IoStats,
}

impl LogRead for PlainReader {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        device::check_range(&self.target.path, self.target.size_bytes, offset, buf.len(), "read")?;
        let aligned = (buf.as_ptr() as usize) & (self.target.mem_align as usize - 1) == 0;
        if !aligned || buf.len() > MAX_IO_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read-ahead buffers are aligned and at most 1 GiB"));
        }
        sync::SyncIo.read(&self.target, &mut [(offset, buf)], &mut self.stats)
    }
}

/// Options for [`open_log`]. `None` means automatic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogOpenOptions {
    /// None: io_uring if it can be set up, else Sync (see [`LogDevice::fallback_reason`]).
    /// `Some(Uring)` fails if io_uring is unavailable.
    pub io_path: Option<IoPath>,
    /// None: [`FlushMode::Dsync`].
    pub flush_mode: Option<FlushMode>,
}

/// Open an existing log (a file made by [`create_log_file`], or a block device) read-write with
/// `O_DIRECT|O_CLOEXEC` (plus `O_EXCL` for a block device).
///
/// Refuses: a missing path; anything but a regular file or block device; a file system without
/// direct I/O; a direct-I/O alignment above 4096; a file whose length is not a positive multiple
/// of 4096. A block device's size is rounded down to a multiple of 4096.
///
/// `io_path: None` tries io_uring (a 64-entry ring, an opcode probe and a NOP round trip) and
/// falls back to [`IoPath::Sync`] if any of that fails (ENOSYS, EPERM from seccomp,
/// `io_uring_disabled`, an old kernel), recording the reason. `flush_mode: None` is
/// [`FlushMode::Dsync`], measured faster here on both files and block devices.
pub fn open_log(path: &Path, opts: &LogOpenOptions) -> io::Result<Box<dyn LogDevice>> {
    let target = device::open_target(path)?;
    let flush = opts.flush_mode.unwrap_or(FlushMode::Dsync);
    Ok(match opts.io_path {
        Some(IoPath::Sync) => Box::new(Log::new(target, flush, sync::SyncIo, None)),
        Some(IoPath::Uring) => match uring::UringIo::new() {
            Ok(ring) => Box::new(Log::new(target, flush, ring, None)),
            Err(reason) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "fams log {}: io_uring was requested but is unavailable: {reason}; use \
                         io path \"sync\" or leave it automatic",
                        path.display()
                    ),
                ))
            }
        },
        None => match uring::UringIo::new() {
            Ok(ring) => Box::new(Log::new(target, flush, ring, None)),
            Err(reason) => Box::new(Log::new(target, flush, sync::SyncIo, Some(reason))),
        },
    })
}

/// Create a log file of `size_bytes` (a positive multiple of 4096; mode 0600).
///
/// Fails if the file exists. Preallocates with fallocate, fills it with zeros by writing (so
/// later O_DIRECT+RWF_DSYNC writes are pure overwrites of written extents), fsyncs the file and
/// its parent directory. On failure the partly made file is removed.
pub fn create_log_file(path: &Path, size_bytes: u64) -> io::Result<()> {
    device::create_log_file(path, size_bytes)
}

/// For a path that is a block device: its size, logical block size, and the name of the file
/// system or other known data it appears to hold (by signature: ext2/3/4, xfs, btrfs, swap,
/// LUKS, LVM2, vfat, ntfs, GPT or MBR partition table). `Ok(None)` if the path is not a block
/// device; an error if it does not exist or cannot be read.
pub fn block_device_info(path: &Path) -> io::Result<Option<BlockDeviceInfo>> {
    device::block_device_info(path)
}

/// If `path` (or, when it does not exist yet, its directory) lives on a file system that
/// keeps its data only in memory (tmpfs, ramfs), its name: nothing written there survives a
/// power cut or reboot, so neither a heap nor a log may live there.
pub fn volatile_filesystem(path: &Path) -> Option<&'static str> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    use std::os::unix::fs::FileTypeExt;
    // A device node lives on devtmpfs, but its data lives on the device.
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        return None;
    }
    let probe = if path.exists() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        }
    };
    let f_type = nix::sys::statfs::statfs(probe.as_path()).ok()?.filesystem_type().0 as i64;
    match f_type {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

/// Zero `len` bytes at `offset` durably (both multiples of [`LOG_ALIGN`]).
pub fn zero_range_durable(dev: &mut dyn LogDevice, offset: u64, len: u64) -> io::Result<()> {
    if !log_aligned(offset) || !log_aligned(len) {
        return Err(device::invalid(
            dev.path(),
            format!("zero range at offset {offset} of {len} bytes is not aligned to {LOG_ALIGN}"),
        ));
    }
    if len == 0 {
        return Ok(());
    }
    const CHUNK: u64 = 1 << 20;
    const PER_CALL: u64 = 8;
    let zeros = AlignedBuf::zeroed(len.min(CHUNK) as usize);
    let end = offset.checked_add(len).ok_or_else(|| {
        device::invalid(dev.path(), format!("zero range at offset {offset} of {len} bytes overflows"))
    })?;
    let mut pos = offset;
    while pos < end {
        let mut segments: Vec<(u64, &[u8])> = Vec::with_capacity(PER_CALL as usize);
        while pos < end && (segments.len() as u64) < PER_CALL {
            let n = (end - pos).min(CHUNK) as usize;
            segments.push((pos, &zeros[..n]));
            pos += n as u64;
        }
        dev.write_durable(&segments)?;
    }
    Ok(())
}

/// How a [`Log`] issues its requests. Both methods get pieces that are non-empty, aligned
/// (offset, length and memory), in bounds, non-overlapping and at most [`MAX_IO_BYTES`] long.
trait Backend: Send {
    const IO_PATH: IoPath;
    fn write_durable(
        &mut self,
        target: &Target,
        flush: FlushMode,
        pieces: &[(u64, &[u8])],
        stats: &mut IoStats,
    ) -> io::Result<()>;
    fn read(&mut self, target: &Target, pieces: &mut [(u64, &mut [u8])], stats: &mut IoStats) -> io::Result<()>;
}

/// The real log device: an opened target plus an I/O backend.
struct Log<B> {
    target: Target,
    flush: FlushMode,
    stats: IoStats,
    backend: B,
    fallback: Option<String>,
}

impl<B: Backend> Log<B> {
    fn new(target: Target, flush: FlushMode, backend: B, fallback: Option<String>) -> Log<B> {
        Log { target, flush, stats: IoStats::default(), backend, fallback }
    }

    fn mem_aligned(&self, p: *const u8) -> bool {
        // mem_align is a power of two (checked when opening).
        (p as usize) & (self.target.mem_align as usize - 1) == 0
    }
}

impl<B: Backend> LogDevice for Log<B> {
    fn path(&self) -> &Path {
        &self.target.path
    }
    fn kind(&self) -> LogKind {
        self.target.kind
    }
    fn io_path(&self) -> IoPath {
        B::IO_PATH
    }
    fn flush_mode(&self) -> FlushMode {
        self.flush
    }
    fn size_bytes(&self) -> u64 {
        self.target.size_bytes
    }
    fn stats(&self) -> IoStats {
        self.stats
    }
    fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    fn write_durable(&mut self, segments: &[(u64, &[u8])]) -> io::Result<()> {
        device::check_segments(&self.target.path, self.target.size_bytes, segments)?;
        // O_DIRECT needs aligned memory: copy any misaligned segment into an AlignedBuf.
        let bounces: Vec<Option<AlignedBuf>> = segments
            .iter()
            .map(|&(_, data)| {
                if data.is_empty() || self.mem_aligned(data.as_ptr()) {
                    None
                } else {
                    let mut b = AlignedBuf::zeroed(data.len());
                    b.copy_from_slice(data);
                    Some(b)
                }
            })
            .collect();
        let mut pieces: Vec<(u64, &[u8])> = Vec::with_capacity(segments.len());
        for (&(offset, data), bounce) in segments.iter().zip(&bounces) {
            let data: &[u8] = bounce.as_deref().unwrap_or(data);
            for (i, chunk) in data.chunks(MAX_IO_BYTES).enumerate() {
                pieces.push((offset + (i * MAX_IO_BYTES) as u64, chunk));
            }
        }
        if pieces.is_empty() {
            return Ok(());
        }
        self.backend.write_durable(&self.target, self.flush, &pieces, &mut self.stats)
    }

    fn reader(&self) -> Option<Box<dyn LogRead>> {
        let target = self.target.try_clone().ok()?;
        Some(Box::new(PlainReader { target, stats: IoStats::default() }))
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        device::check_range(&self.target.path, self.target.size_bytes, offset, buf.len(), "read")?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.mem_aligned(buf.as_ptr()) {
            let mut pieces: Vec<(u64, &mut [u8])> = buf
                .chunks_mut(MAX_IO_BYTES)
                .enumerate()
                .map(|(i, chunk)| (offset + (i * MAX_IO_BYTES) as u64, chunk))
                .collect();
            self.backend.read(&self.target, &mut pieces, &mut self.stats)
        } else {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            self.read_exact_at(offset, &mut bounce)?;
            buf.copy_from_slice(&bounce);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
