//! Making a heap: `Heap::format` builds the heap file and its log under staging names and renames
//! them into place (heap last), so a crash part way leaves either no heap or a whole one.

use super::open::refuse_volatile;
use super::*;

/// How to make a new heap.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub heap_path: PathBuf,
    /// Heap size in bytes; rounded up to a multiple of 4096. Disk space is reserved for it.
    pub size_bytes: u64,
    /// The largest the heap may grow to ([`Heap::grow`]); rounded up to a multiple of 4096.
    /// Only address space is reserved for it (at every open), no disk. Default: `size_bytes`.
    pub max_size_bytes: Option<u64>,
    /// The log: a file to create, or a block device to take over. Default: `<heap>.log` beside
    /// the heap file.
    pub log_path: Option<PathBuf>,
    /// Log size. Default: 64 MiB for a file, the whole device for a block device.
    pub log_size_bytes: Option<u64>,
    /// The fixed address the heap is mapped at. Default: picked at random among free ranges.
    pub base_addr: Option<u64>,
    /// Take over a block device even if it seems to hold a filesystem or other data.
    pub force: bool,
    /// How the log is written (recorded in its superblock; every open uses it unless told
    /// otherwise). None: measured when the log is made, the fastest of io_uring and plain system
    /// calls ([`io::choose_io`]).
    pub io_path: Option<io::IoPath>,
    /// Likewise the flush mode. None: measured, the fastest of `RWF_DSYNC` writes and writes
    /// followed by `fdatasync`.
    pub flush_mode: Option<io::FlushMode>,
}

impl FormatOptions {
    pub fn new(heap_path: impl Into<PathBuf>, size_bytes: u64) -> FormatOptions {
        FormatOptions {
            heap_path: heap_path.into(),
            size_bytes,
            max_size_bytes: None,
            log_path: None,
            log_size_bytes: None,
            base_addr: None,
            force: false,
            io_path: None,
            flush_mode: None,
        }
    }
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(super) fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, "fsync of the directory", e))
}

/// Is [base, base+size) free in this process? Probe with MAP_FIXED_NOREPLACE.
pub(super) fn range_is_free(base: u64, size: u64) -> bool {
    use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let (Some(addr), Some(len)) =
        (std::num::NonZeroUsize::new(base as usize), std::num::NonZeroUsize::new(size as usize))
    else {
        return false;
    };
    let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED_NOREPLACE;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory in use changes.
    let Ok(p) = (unsafe { mmap_anonymous(Some(addr), len, ProtFlags::PROT_NONE, flags) }) else {
        return false;
    };
    // SAFETY: `p` is the probe mapping made just above, never shared; nothing refers into it.
    let _ = unsafe { munmap(p, len.get()) };
    p.as_ptr() as u64 == base
}

pub(super) fn pick_base(size: u64) -> Result<u64> {
    const GIB: u64 = 1 << 30;
    let span = (BASE_PICK_HIGH - BASE_PICK_LOW) / GIB;
    let id = HeapId::random().map_err(|e| Error::io("/dev/urandom", "getrandom", e))?;
    let seed = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"));
    for i in 0..64 {
        let base = BASE_PICK_LOW + (seed.wrapping_add(i * 7919) % span) * GIB;
        if base + size <= BASE_PICK_HIGH && range_is_free(base, size) {
            return Ok(base);
        }
    }
    Err(Error::InvalidArgument(format!("found no free address range for a {size}-byte heap; pass --base")))
}

pub(super) fn format(opts: &FormatOptions) -> Result<(HeapHeader, io::IoChoice)> {
    let heap_path = &opts.heap_path;
    if opts.size_bytes == 0 {
        return Err(Error::InvalidArgument("heap size must be more than 0 bytes".into()));
    }
    let size = opts.size_bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let max_size = opts.max_size_bytes.unwrap_or(size).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    if max_size < size {
        return Err(Error::InvalidArgument(format!(
            "the maximum size ({max_size} bytes) is smaller than the size ({size} bytes)"
        )));
    }
    let base = match opts.base_addr {
        Some(b) if b % PAGE_SIZE as u64 != 0 || b == 0 => {
            return Err(Error::InvalidArgument(format!("base address {b:#x} is not a nonzero multiple of 4096")))
        }
        Some(b) => b,
        None => pick_base(max_size)?,
    };
    if base.checked_add(max_size).is_none_or(|end| end > 0x7fff_ffff_f000) {
        return Err(Error::InvalidArgument(format!(
            "base {base:#x} + maximum size {max_size} leaves the user address space"
        )));
    }
    let default_log_name = || {
        let name = heap_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or("heap".into());
        PathBuf::from(format!("{name}.log"))
    };
    // Recorded as given; a default log is recorded relative so heap and log can move together.
    let (log_recorded, log_actual) = match &opts.log_path {
        Some(p) => {
            let actual = p.clone();
            let recorded = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            (recorded, actual)
        }
        None => {
            let rel = default_log_name();
            let actual = heap_path.parent().unwrap_or(Path::new(".")).join(&rel);
            (rel, actual)
        }
    };
    let log_recorded = log_recorded
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument(format!("log path {} is not UTF-8", log_recorded.display())))?;
    if log_recorded.len() > LOG_PATH_MAX {
        return Err(Error::InvalidArgument(format!("log path longer than {LOG_PATH_MAX} bytes")));
    }

    refuse_volatile("heap", heap_path)?;
    refuse_volatile("log", &log_actual)?;
    if heap_path.exists() {
        return Err(Error::io(
            heap_path,
            "creating the heap file (it already exists; remove it or pick another path)",
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    // Format builds both files under staging names and renames them into place, the heap last:
    // a heap file exists only once it and its log are complete and durable. A format killed
    // part way leaves staging files (and perhaps its renamed log) behind: clear them.
    let heap_staging = staging_path(heap_path);
    let log_staging = staging_path(&log_actual);
    clear_interrupted_format(&heap_staging, &log_staging, &log_actual);
    // Check the log target before creating anything.
    let block = if log_actual.exists() {
        io::block_device_info(&log_actual).map_err(|e| Error::io(&log_actual, "inspecting the log device", e))?
    } else {
        None
    };
    let log_size = match &block {
        Some(info) => {
            if let Some(fs) = &info.filesystem {
                if !opts.force {
                    return Err(Error::BadLogDevice {
                        path: log_actual.clone(),
                        reason: format!("the device appears to hold {fs}; formatting would destroy it. Pass --force if that is what you want"),
                    });
                }
            }
            let size = opts.log_size_bytes.unwrap_or(info.size_bytes);
            if size > info.size_bytes {
                return Err(Error::BadLogDevice {
                    path: log_actual.clone(),
                    reason: format!("--log-size {size} is larger than the device ({} bytes)", info.size_bytes),
                });
            }
            size / PAGE_SIZE as u64 * PAGE_SIZE as u64
        }
        None => {
            if log_actual.exists() {
                return Err(Error::BadLogDevice {
                    path: log_actual.clone(),
                    reason: "already exists; remove it or choose another --log".into(),
                });
            }
            opts.log_size_bytes.unwrap_or(LOG_SIZE_DEFAULT).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
        }
    };
    if log_size < LOG_SIZE_MIN {
        return Err(Error::BadLogDevice {
            path: log_actual.clone(),
            reason: format!("a log needs at least {LOG_SIZE_MIN} bytes, this one would have {log_size}"),
        });
    }

    let header = HeapHeader {
        heap_id: HeapId::random().map_err(|e| Error::io("/dev/urandom", "getrandom", e))?,
        heap_size: size,
        max_size,
        base_addr: base,
        log_size,
        created_unix: now_unix(),
        log_path: log_recorded,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&heap_staging)
        .map_err(|e| Error::io(&heap_staging, "creating the heap file under its staging name", e))?;
    let mut log_renamed = false;
    let mut io_choice = None;
    let result = (|| {
        file.write_all_at(&header.encode(), 0).map_err(|e| Error::io(heap_path, "writing the heap header", e))?;
        // Reserve the blocks now, so a full disk is reported here and not later, when
        // committed bytes are written back.
        crate::heap_file::reserve(&file, HEADER_BYTES + size)
            .map_err(|e| Error::io(heap_path, "reserving disk space for the heap (fallocate)", e))?;
        file.sync_all().map_err(|e| Error::io(heap_path, "fsync", e))?;
        // A log file is made under its staging name too; a block device is written in place
        // (it has no name to stage, and a half-formatted device holds no valid superblock).
        let log_target = if block.is_none() { &log_staging } else { &log_actual };
        if block.is_none() {
            io::create_log_file(log_target, log_size)
                .map_err(|e| Error::io(&log_actual, "creating the log file", e))?;
        }
        // How this device is written fastest, measured on it now (over the first record block:
        // the log is ours and holds no record yet).
        let choice = io::choose_io(log_target, crate::log_format::AREA_START, opts.io_path, opts.flush_mode)
            .map_err(|e| Error::io(&log_actual, "measuring how to write the log", e))?;
        for m in &choice.measured {
            tracing::info!(
                "{}: durable 4 KiB write with {} and {}: p50 {:.1} µs",
                log_actual.display(),
                m.io_path.name(),
                m.flush_mode.name(),
                m.p50_us
            );
        }
        let mut dev = io::open_log(log_target, &LogOpenOptions::default())
            .map_err(|e| Error::io(&log_actual, "opening the log", e))?;
        // Zero both slots first so an old superblock on a reused device cannot win.
        io::zero_range_durable(dev.as_mut(), 0, 2 * PAGE_SIZE as u64)
            .map_err(|e| Error::io(&log_actual, "clearing the superblocks", e))?;
        let mut first = Superblock::new(header.heap_id, log_size);
        first.heap_size = size;
        first.io_path_preferred = Some(choice.io_path);
        first.flush_mode_preferred = Some(choice.flush_mode);
        io_choice = Some(choice);
        recovery::write_superblock(dev.as_mut(), &first)
            .map_err(|e| Error::io(&log_actual, "writing the first superblock", e))?;
        drop(dev);
        if block.is_none() {
            rename_no_replace(&log_staging, &log_actual)?;
            log_renamed = true;
            sync_parent_dir(&log_actual)?;
        }
        rename_no_replace(&heap_staging, heap_path)?;
        sync_parent_dir(heap_path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&heap_staging);
        let _ = std::fs::remove_file(&log_staging);
        if log_renamed {
            let _ = std::fs::remove_file(&log_actual);
        }
        return Err(e);
    }
    Ok((header, io_choice.expect("set before the format succeeded")))
}

/// `dir/.NAME.formatting`: where format builds `dir/NAME` before renaming it into place.
pub(super) fn staging_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.formatting"))
}

/// Remove what a killed format left: its staging files, and the log it had already renamed into
/// place — recognised as its own by the heap id in the log's superblock, which equals the one
/// in the staging heap file's header. A log of any other heap is left alone.
pub(super) fn clear_interrupted_format(heap_staging: &Path, log_staging: &Path, log_actual: &Path) {
    let _ = std::fs::remove_file(log_staging);
    let Ok(file) = File::open(heap_staging) else { return };
    let staged_id = crate::heap_file::read_header(&file, heap_staging).ok().map(|h| h.heap_id);
    drop(file);
    if let (Some(id), true) = (staged_id, log_actual.is_file()) {
        let ours = io::open_log(log_actual, &LogOpenOptions::default())
            .ok()
            .and_then(|mut dev| recovery::read_superblock(dev.as_mut(), log_actual).ok())
            .is_some_and(|sb| sb.heap_id == id);
        if ours {
            let _ = std::fs::remove_file(log_actual);
        }
    }
    let _ = std::fs::remove_file(heap_staging);
}

/// rename(2) that fails instead of replacing an existing file (renameat2 RENAME_NOREPLACE).
pub(super) fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    for p in [from, to] {
        if p.as_os_str().as_bytes().contains(&0) {
            return Err(Error::InvalidArgument(format!("{} contains a NUL byte", p.display())));
        }
    }
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
        .map_err(|e| Error::io(to, "renaming the finished file into place", e.into()))
}
