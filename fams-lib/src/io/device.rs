//! Opening the log target (file or block device), its O_DIRECT alignment and size, creating log
//! files, and recognising what a block device already holds.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{log_aligned, LogKind, LOG_ALIGN};

nix::ioctl_read!(
    /// `BLKGETSIZE64`, `_IOR(0x12, 114, size_t)`: the size of a block device in bytes (u64).
    blk_get_size64,
    0x12,
    114,
    u64
);
nix::ioctl_read_bad!(
    /// `BLKSSZGET`, `_IO(0x12, 104)` though it writes an int: the logical block size.
    blk_ssz_get,
    libc::BLKSSZGET,
    libc::c_int
);
// The numbers the kernel headers give (architectures with the common ioctl encoding).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const _: () = {
    assert!(nix::request_code_read!(0x12, 114, std::mem::size_of::<u64>()) == 0x8008_1272);
    assert!(nix::request_code_none!(0x12, 104) == libc::BLKSSZGET);
};

/// An opened log target with everything `open_log` learnt about it.
#[derive(Debug)]
pub(crate) struct Target {
    pub file: File,
    pub path: PathBuf,
    pub kind: LogKind,
    /// Usable size: a multiple of [`LOG_ALIGN`].
    pub size_bytes: u64,
    /// Required alignment of user memory for O_DIRECT (<= LOG_ALIGN).
    pub mem_align: u32,
}

impl Target {
    /// The same target through a duplicated descriptor (one open file: flags and all).
    pub fn try_clone(&self) -> std::io::Result<Target> {
        Ok(Target {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            kind: self.kind,
            size_bytes: self.size_bytes,
            mem_align: self.mem_align,
        })
    }
}

/// What to tell the operator for a given errno (appended to error messages).
pub(crate) fn errno_hint(errno: i32) -> &'static str {
    use nix::errno::Errno;
    match Errno::from_raw(errno) {
        Errno::EIO => {
            "; the device reported an I/O error: check `dmesg` and the device's health; \
             the data of this call may not be durable"
        }
        Errno::ENOSPC => {
            "; no space left: a log file must be fully preallocated (create it with \
             create_log_file) on a file system that is not full"
        }
        Errno::EDQUOT => "; disk quota exceeded for the log file's owner",
        Errno::EINVAL => {
            "; the kernel rejected the O_DIRECT request (alignment or flags): check the \
             device's logical block size and that the file system supports O_DIRECT"
        }
        Errno::EOPNOTSUPP => "; not supported by this kernel or device: try flush mode 'fdatasync' or io path 'sync'",
        Errno::EROFS | Errno::EACCES | Errno::EPERM => {
            "; the log must be writable by this process (permissions, read-only mount or device)"
        }
        Errno::ENODEV | Errno::ENXIO => "; the device has gone away (removed or detached)",
        Errno::ECANCELED => "; cancelled because an earlier linked request in the chain failed",
        _ => "",
    }
}

/// An `io::Error` for `errno`, naming the log path, the operation and a hint.
pub(crate) fn errno_error(path: &Path, errno: i32, what: &str) -> io::Error {
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), format!("fams log {}: {what} failed: {os}{}", path.display(), errno_hint(errno)))
}

/// Re-wrap an `io::Error` with the path and operation.
pub(crate) fn annotate(path: &Path, e: io::Error, what: &str) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => errno_error(path, errno, what),
        None => io::Error::new(e.kind(), format!("fams log {}: {what} failed: {e}", path.display())),
    }
}

pub(crate) fn invalid(path: &Path, msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("fams log {}: {msg}", path.display()))
}

/// Check that `[offset, offset+len)` is aligned to LOG_ALIGN and inside a log of `size` bytes.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: usize, op: &str) -> io::Result<()> {
    if !log_aligned(offset) || !log_aligned(len as u64) {
        return Err(invalid(
            path,
            format!(
                "{op} at offset {offset} of {len} bytes is not aligned: offsets and lengths \
                 given to a LogDevice must be multiples of {LOG_ALIGN} (LOG_ALIGN); this is a \
                 bug in the caller"
            ),
        ));
    }
    let end = offset.checked_add(len as u64);
    if !matches!(end, Some(end) if end <= size) {
        let kind = if op == "read" { io::ErrorKind::UnexpectedEof } else { io::ErrorKind::InvalidInput };
        return Err(io::Error::new(
            kind,
            format!(
                "fams log {}: {op} at offset {offset} of {len} bytes goes past the end of the \
                 log ({size} bytes)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Check every write segment (alignment, bounds) and that no two overlap: overlapping segments
/// would race, since the io_uring path issues them concurrently.
pub(crate) fn check_segments(path: &Path, size: u64, segments: &[(u64, &[u8])]) -> io::Result<()> {
    let mut spans = Vec::with_capacity(segments.len());
    for &(offset, data) in segments {
        check_range(path, size, offset, data.len(), "write")?;
        if !data.is_empty() {
            spans.push((offset, offset + data.len() as u64));
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(invalid(
                path,
                format!(
                    "write segments [{}, {}) and [{}, {}) overlap; give each byte of the log \
                     at most once per write_durable call",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ),
            ));
        }
    }
    Ok(())
}

fn blk_size_bytes(file: &File, path: &Path) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }
        .map_err(|e| annotate(path, e.into(), "ioctl(BLKGETSIZE64)"))?;
    Ok(size)
}

fn logical_block_size(file: &File, path: &Path) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    unsafe { blk_ssz_get(file.as_raw_fd(), &mut lbs) }.map_err(|e| annotate(path, e.into(), "ioctl(BLKSSZGET)"))?;
    u32::try_from(lbs)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| invalid(path, format!("device reports logical block size {lbs}")))
}

/// The O_DIRECT alignment (offset/length, memory) for an open file.
///
/// statx(STATX_DIOALIGN) (Linux 6.1+) when the kernel reports it; otherwise the logical block
/// size for a block device, and 512 for a file (memory: 4096, conservatively).
fn dio_alignment(file: &File, path: &Path, kind: LogKind) -> io::Result<(u32, u32)> {
    // SAFETY: `libc::statx` is a plain C struct of integers, for which all-zero is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // raw libc: nix has no wrapper for statx (STATX_DIOALIGN).
    // SAFETY: the fd is open for the duration of the call; the empty C string with
    // AT_EMPTY_PATH makes statx describe the fd itself; `stx` is a valid, writable statx buffer.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "fams log {}: the kernel reports that direct I/O (O_DIRECT) is not supported \
                     for this file, so writes would not bypass the page cache; put the log on \
                     ext4, xfs or btrfs (without data journalling or compression) or on a block \
                     device",
                    path.display()
                ),
            ));
        }
        return Ok((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)));
    }
    match kind {
        LogKind::BlockDevice => {
            let lbs = logical_block_size(file, path)?;
            Ok((lbs, lbs))
        }
        LogKind::File => Ok((512, LOG_ALIGN as u32)),
    }
}

/// Open an existing log target read-write with O_DIRECT (and O_EXCL for a block device, which
/// fails with EBUSY if it is mounted or held by another exclusive opener).
pub(crate) fn open_target(path: &Path) -> io::Result<Target> {
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "fams log {}: does not exist; create a log file with create_log_file \
                     (famsd format) or give the path of an existing block device",
                    path.display()
                ),
            )
        } else {
            annotate(path, e, "stat")
        }
    })?;
    let kind = kind_of(&meta).ok_or_else(|| {
        invalid(path, "is neither a regular file nor a block device; a log must be one of them".into())
    })?;
    use nix::fcntl::OFlag;
    let mut flags = OFlag::O_DIRECT | OFlag::O_CLOEXEC;
    if kind == LogKind::BlockDevice {
        flags |= OFlag::O_EXCL;
    }
    // A process killed while it held the device releases its exclusive claim only when the
    // kernel finishes tearing down its io_uring, which happens asynchronously after the exit: a
    // restart right after a crash can see EBUSY for a few milliseconds. Retry for a while before
    // concluding the device is really taken.
    let busy_retry_until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let open = || OpenOptions::new().read(true).write(true).custom_flags(flags.bits()).open(path);
    let mut opened = open();
    while kind == LogKind::BlockDevice
        && matches!(&opened, Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32))
        && std::time::Instant::now() < busy_retry_until
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
        opened = open();
    }
    let file = opened.map_err(|e| match e.raw_os_error().map(nix::errno::Errno::from_raw) {
        Some(nix::errno::Errno::EINVAL) => io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "fams log {}: cannot open with O_DIRECT ({e}): the file system does not \
                     support direct I/O; put the log on ext4, xfs or btrfs, or a block device",
                path.display()
            ),
        ),
        Some(nix::errno::Errno::EBUSY) => io::Error::new(
            e.kind(),
            format!(
                "fams log {}: the block device is in use ({e}): it is mounted, part of a \
                     RAID/LVM/swap setup, or already opened by another fams process; unmount \
                     it or choose another device",
                path.display()
            ),
        ),
        _ => annotate(path, e, "open read-write with O_DIRECT"),
    })?;
    // The path may have changed between stat and open: trust the open descriptor.
    let meta = file.metadata().map_err(|e| annotate(path, e, "fstat"))?;
    if kind_of(&meta) != Some(kind) {
        return Err(invalid(path, "changed type while being opened; try again".into()));
    }
    let (offset_align, mem_align) = dio_alignment(&file, path, kind)?;
    for (what, v) in [("offset", offset_align), ("memory", mem_align)] {
        if !v.is_power_of_two() || v as usize > LOG_ALIGN {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "fams log {}: direct I/O needs {what} alignment of {v} bytes, but fams writes \
                     in units of {LOG_ALIGN} bytes; use a device or file system whose logical \
                     block size is at most {LOG_ALIGN}",
                    path.display()
                ),
            ));
        }
    }
    let size_bytes = match kind {
        LogKind::File => {
            let len = meta.len();
            if len == 0 || !log_aligned(len) {
                return Err(invalid(
                    path,
                    format!(
                        "log file is {len} bytes, not a positive multiple of {LOG_ALIGN}: it was \
                         not made by create_log_file; remove it and create the log again"
                    ),
                ));
            }
            len
        }
        LogKind::BlockDevice => {
            let raw = blk_size_bytes(&file, path)?;
            let usable = raw & !(LOG_ALIGN as u64 - 1);
            if usable == 0 {
                return Err(invalid(path, format!("block device is too small ({raw} bytes)")));
            }
            usable
        }
    };
    Ok(Target { file, path: path.to_path_buf(), kind, size_bytes, mem_align })
}

fn kind_of(meta: &fs::Metadata) -> Option<LogKind> {
    let ft = meta.file_type();
    if ft.is_file() {
        Some(LogKind::File)
    } else if ft.is_block_device() {
        Some(LogKind::BlockDevice)
    } else {
        None
    }
}

/// See [`super::create_log_file`].
pub(crate) fn create_log_file(path: &Path, size_bytes: u64) -> io::Result<()> {
    if size_bytes == 0 || !log_aligned(size_bytes) {
        return Err(invalid(path, format!("log size {size_bytes} is not a positive multiple of {LOG_ALIGN} bytes")));
    }
    let file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(nix::fcntl::OFlag::O_CLOEXEC.bits()).open(path).map_err(
            |e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "fams log {}: already exists; refusing to overwrite it (open it with \
                         open_log, or remove it first to start a new log)",
                            path.display()
                        ),
                    )
                } else {
                    annotate(path, e, "create log file")
                }
            },
        )?;
    let result = fill_and_sync(&file, path, size_bytes);
    if result.is_err() {
        // Do not leave a half-made log behind: it would make the next attempt fail with
        // "already exists" and could be mistaken for a real log.
        drop(file);
        let _ = fs::remove_file(path);
    }
    result
}

fn fill_and_sync(file: &File, path: &Path, size_bytes: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(size_bytes).map_err(|_| invalid(path, format!("log size {size_bytes} is too large")))?;
    if let Err(e) = nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        // Without fallocate support the zero-fill below still allocates every block.
        if e != nix::errno::Errno::EOPNOTSUPP {
            return Err(annotate(path, e.into(), &format!("fallocate of {size_bytes} bytes")));
        }
    }
    // Write real zeros: fallocate leaves *unwritten* extents, and an O_DIRECT+RWF_DSYNC write
    // into one needs a metadata update (extent conversion) and so a journal commit, not a plain
    // FUA write. After this every later log write is a pure overwrite.
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(size_bytes as usize)];
    let mut off = 0u64;
    while off < size_bytes {
        let n = (size_bytes - off).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off).map_err(|e| annotate(path, e, &format!("zero-fill at offset {off}")))?;
        off += n as u64;
    }
    file.sync_all().map_err(|e| annotate(path, e, "fsync of the new log file"))?;
    // The zeros need not stay in the page cache: the log is accessed with O_DIRECT. Advisory only.
    let _ = nix::fcntl::posix_fadvise(file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| annotate(path, e, &format!("fsync of the parent directory {}", parent.display())))?;
    Ok(())
}

/// What [`super::block_device_info`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    /// Size in bytes (BLKGETSIZE64).
    pub size_bytes: u64,
    /// Logical block size (BLKSSZGET): the smallest unit the device addresses.
    pub logical_block_bytes: u32,
    /// The file system or other known data found on the device (`"ext4"`, `"xfs"`,
    /// `"btrfs"`, `"swap"`, `"crypto_LUKS"`, `"LVM2_member"`, `"vfat"`, `"ntfs"`,
    /// `"gpt partition table"`, `"dos partition table"`), or None if no signature was found.
    pub filesystem: Option<String>,
}

/// See [`super::block_device_info`].
pub(crate) fn block_device_info(path: &Path) -> io::Result<Option<BlockDeviceInfo>> {
    let meta = fs::metadata(path).map_err(|e| annotate(path, e, "stat"))?;
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .map_err(|e| annotate(path, e, "open read-only"))?;
    let size_bytes = blk_size_bytes(&file, path)?;
    let logical_block_bytes = logical_block_size(&file, path)?;
    // Enough to cover every signature we look for (Btrfs at 64 KiB + 64).
    const HEAD: u64 = 72 * 1024;
    let mut head = vec![0u8; HEAD.min(size_bytes) as usize];
    let mut done = 0;
    while done < head.len() {
        match file.read_at(&mut head[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(annotate(path, e, "read of the first 72 KiB")),
        }
    }
    head.truncate(done);
    Ok(Some(BlockDeviceInfo {
        size_bytes,
        logical_block_bytes,
        filesystem: detect_signature(&head).map(str::to_string),
    }))
}

/// What the kernel says about the write cache of the block device under a path (the device
/// itself, or the one holding the file system a file lives on). Read from sysfs
/// (`/sys/dev/block/MAJ:MIN`, the whole disk's `queue/` for a partition); durability figures
/// mean something only if the drive honours the flushes and FUA writes these imply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCacheState {
    /// The kernel's name of the whole disk (`nvme0n1`, `vda`, `zram0`, `loop3`).
    pub disk: String,
    /// `queue/write_cache`: true for "write back" (a volatile cache: data is durable only after
    /// a flush or a FUA write), false for "write through".
    pub volatile_cache: bool,
    /// `queue/fua`: the device takes FUA writes (else the kernel follows a write with a flush).
    pub fua: bool,
    /// `queue/rotational`.
    pub rotational: bool,
    /// `device/model`, where the driver has one.
    pub model: Option<String>,
}

/// See [`WriteCacheState`]. None when the path lives on no single block device (tmpfs, overlay,
/// a multi-device file system) or sysfs does not say.
pub fn write_cache_state(path: &Path) -> Option<WriteCacheState> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ok()?;
    let dev = if meta.file_type().is_block_device() { meta.rdev() } else { meta.dev() };
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let mut sys = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if sys.join("partition").exists() {
        sys = sys.parent()?.to_path_buf();
    }
    let read = |rel: &str| fs::read_to_string(sys.join(rel)).ok().map(|s| s.trim().to_string());
    let cache = read("queue/write_cache")?;
    Some(WriteCacheState {
        disk: sys.file_name()?.to_string_lossy().into_owned(),
        volatile_cache: cache == "write back",
        fua: read("queue/fua").as_deref() == Some("1"),
        rotational: read("queue/rotational").as_deref() == Some("1"),
        model: read("device/model").filter(|m| !m.is_empty()),
    })
}

fn bytes_at(head: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    head.get(off..off.checked_add(len)?)
}

fn u32_le_at(head: &[u8], off: usize) -> u32 {
    bytes_at(head, off, 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Name the data found in the first bytes of a device, if it carries a known signature.
pub(crate) fn detect_signature(head: &[u8]) -> Option<&'static str> {
    let is = |off: usize, magic: &[u8]| bytes_at(head, off, magic.len()) == Some(magic);
    if is(0, b"LUKS\xba\xbe") {
        return Some("crypto_LUKS");
    }
    if is(0, b"XFSB") {
        return Some("xfs");
    }
    if is(65600, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if is(1080, &[0x53, 0xEF]) {
        // ext2/3/4 superblock at 1024: feature words at 0x5C (compat), 0x60 (incompat),
        // 0x64 (ro_compat).
        let sb = 1024;
        let compat = u32_le_at(head, sb + 0x5C);
        let incompat = u32_le_at(head, sb + 0x60);
        let ro_compat = u32_le_at(head, sb + 0x64);
        const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
        // extents, 64bit, flex_bg, mmp, inline_data, ... (anything ext3 does not know)
        const INCOMPAT_EXT4: u32 = 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x8000 | 0x10000;
        // huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum, ...
        const RO_COMPAT_EXT4: u32 = 0x8 | 0x10 | 0x20 | 0x40 | 0x400;
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        return Some(if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            "jbd"
        } else if incompat & INCOMPAT_EXT4 != 0 || ro_compat & RO_COMPAT_EXT4 != 0 {
            "ext4"
        } else if compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        });
    }
    if is(4096 - 10, b"SWAPSPACE2") || is(4096 - 10, b"SWAP-SPACE") {
        return Some("swap");
    }
    if is(512, b"LABELONE") && is(512 + 24, b"LVM2 001") {
        return Some("LVM2_member");
    }
    if is(3, b"NTFS    ") {
        return Some("ntfs");
    }
    if is(510, &[0x55, 0xAA]) && (is(82, b"FAT32   ") || is(54, b"FAT16   ") || is(54, b"FAT12   ")) {
        return Some("vfat");
    }
    if is(512, b"EFI PART") {
        return Some("gpt partition table");
    }
    if is(510, &[0x55, 0xAA]) {
        let entries = bytes_at(head, 446, 64).unwrap_or(&[]);
        if entries.iter().any(|&b| b != 0) {
            return Some("dos partition table");
        }
    }
    None
}
