//! Opening a heap: lock the heap file, open its log, recover (replay the log into the heap file),
//! map the heap at its base address and arm the dirty-page tracker.

use super::*;

/// Who holds a flock on `file`, from /proc/locks (best effort, for the error message).
pub(crate) fn lock_holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else { return "unknown".into() };
    let ino = meta.ino();
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return "unknown".into() };
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF"
        if f.len() >= 6 && f[1] == "FLOCK" {
            if let Some(i) = f[5].rsplit(':').next().and_then(|s| s.parse::<u64>().ok()) {
                if i == ino {
                    return f[4].to_string();
                }
            }
        }
    }
    "unknown".into()
}

/// Open the heap file and take its exclusive lock.
pub(crate) fn open_locked(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .map_err(|e| Error::io(path, "opening the heap file", e))?;
    // A lock belongs to the open file description, and a process that forks (to exec a helper)
    // while a heap is open briefly shares that description, so the lock can outlive our close()
    // by the moment the child takes to exec. Retry for a short while before calling the heap taken.
    let deadline = Instant::now() + LOCK_RETRY_MAX;
    loop {
        // nix's `Flock` guard would own the file and unlock (or panic) when dropped; the heap's
        // lock lives exactly as long as its descriptor, so the plain call is what fits here.
        #[allow(deprecated)]
        let rc = nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock);
        match rc {
            Ok(()) => return Ok(file),
            Err(nix::errno::Errno::EWOULDBLOCK) => {}
            Err(e) => return Err(Error::io(path, "locking the heap file", e.into())),
        }
        if Instant::now() >= deadline {
            return Err(Error::Locked { path: path.into(), holder: lock_holder(&file) });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// How the log's I/O path and flush mode were chosen (shown in [`crate::Stats::io_choice`]).
const IO_CHOICE_ASKED: &str = "asked for by the caller";
const IO_CHOICE_MEASURED: &str = "measured fastest on this device when the log was formatted";
const IO_CHOICE_DEFAULT: &str = "the defaults (this log records no measured choice; it predates it)";

pub(crate) fn open_log_of(
    path: &Path,
    header: &HeapHeader,
    opts: &HeapOptions,
    storage: &mut dyn Storage,
) -> Result<(PathBuf, Box<dyn io::LogDevice>, &'static str)> {
    let log_path = opts.log_path.clone().unwrap_or_else(|| header.resolve_log_path(path));
    if !log_path.exists() {
        return Err(Error::BadLogDevice {
            path: log_path.clone(),
            reason: format!(
                "the log of heap {} is missing; without it commits since the last checkpoint are lost. Restore it, or pass its new location",
                path.display()
            ),
        });
    }
    let asked = LogOpenOptions { io_path: opts.io_path, flush_mode: opts.flush_mode };
    // What the caller left open: the way measured fastest for this device when its log was
    // formatted, recorded in its superblock (read through plain calls, cheap to set up). A
    // superblock that cannot be read is recovery's to report, below.
    let mut io_choice = IO_CHOICE_ASKED;
    let want = if asked.io_path.is_some() && asked.flush_mode.is_some() {
        asked
    } else {
        let probe = LogOpenOptions { io_path: Some(io::IoPath::Sync), flush_mode: None };
        let mut dev = storage.log(&log_path, &probe).map_err(|e| Error::io(&log_path, "opening the log", e))?;
        match crate::recovery::read_superblock(dev.as_mut(), &log_path) {
            Ok(sb) if sb.io_path_preferred.is_some() || sb.flush_mode_preferred.is_some() => {
                io_choice = IO_CHOICE_MEASURED;
                LogOpenOptions {
                    io_path: asked.io_path.or(sb.io_path_preferred),
                    flush_mode: asked.flush_mode.or(sb.flush_mode_preferred),
                }
            }
            _ => {
                io_choice = IO_CHOICE_DEFAULT;
                asked
            }
        }
    };
    let dev = match storage.log(&log_path, &want) {
        // io_uring was measured fastest but cannot be set up now (seccomp, a new policy): open
        // the way an unrecorded log would be, which falls back and says why.
        Err(_) if want.io_path == Some(io::IoPath::Uring) && asked.io_path.is_none() => {
            storage.log(&log_path, &LogOpenOptions { io_path: None, ..want })
        }
        r => r,
    }
    .map_err(|e| Error::io(&log_path, "opening the log", e))?;
    if dev.size_bytes() < header.log_size {
        return Err(Error::BadLogDevice {
            path: log_path.clone(),
            reason: format!(
                "the log is {} bytes but was formatted as {}; it was truncated or is the wrong device",
                dev.size_bytes(),
                header.log_size
            ),
        });
    }
    Ok((log_path, dev, io_choice))
}

/// Refuse a heap or log on a file system that forgets everything at a power cut.
pub(super) fn refuse_volatile(what: &str, path: &Path) -> Result<()> {
    match io::volatile_filesystem(path) {
        Some(fs) => Err(Error::InvalidArgument(format!(
            "{}: the {what} is on {fs}, which keeps data only in memory: nothing there survives a power cut. Put it on a disk (ext4, xfs, btrfs) or a block device",
            path.display()
        ))),
        None => Ok(()),
    }
}

pub(super) fn open(path: &Path, opts: &HeapOptions, storage: &mut dyn Storage) -> Result<Heap> {
    let file = open_locked(path)?;
    super::upgrade::finish_interrupted(path, &file)?;
    let header = heap_file::read_header(&file, path)?;
    refuse_volatile("heap", path)?;
    let (log_path, mut dev, io_choice) = open_log_of(path, &header, opts, storage)?;
    refuse_volatile("log", &log_path)?;
    let max_size = usize::try_from(header.max_size)
        .map_err(|_| Error::BadHeap { path: path.into(), reason: "heap larger than the address space".into() })?;

    // Claim the whole address range the heap may grow into before replaying, so a taken range
    // fails fast and changes nothing. The reservation is inaccessible anonymous memory; the
    // heap file is mapped over the front of it below, and over more of it as the heap grows.
    let reservation = Reservation::claim(header.base_addr, max_size).ok_or(Error::AddressTaken {
        path: path.into(),
        base: header.base_addr as usize,
        size: max_size,
    })?;
    let file = Arc::new(file);
    let store = storage.heap(file.clone(), HEADER_BYTES + header.max_size);
    let recovered = recovery::recover(
        dev.as_mut(),
        &log_path,
        store.as_ref(),
        path,
        &header,
        recovery::Mode::Replay { salvage: opts.salvage },
        opts.recovery_read_ahead,
    )?;
    let size = recovered.report.heap_size_bytes as usize;
    let file_len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    if file_len < HEADER_BYTES + size as u64 {
        return Err(Error::BadHeap {
            path: path.into(),
            reason: format!(
                "the file is {file_len} bytes but the heap has grown to {size} bytes (+{HEADER_BYTES} header); it was truncated"
            ),
        });
    }
    map_file_over(&file, reservation.base, 0, size).map_err(|e| Error::io(path, "mapping the heap", e))?;
    let base = reservation.keep();
    let unmap = || {
        if let Some(p) = NonNull::new(base.cast()) {
            // SAFETY: undoing the reservation (and the file mapping over it) made above on an
            // error path; nothing else refers to it.
            let _ = unsafe { nix::sys::mman::munmap(p, max_size) };
        }
    };
    // SAFETY: [base, base+size) is the mapping made above, owned by the heap; the heap drops its
    // tracker before unmapping it (see `Drop for Heap`).
    let tracker = match unsafe { tracker::arm(opts.tracker, base, size) } {
        Ok(t) => t,
        Err(e) => {
            unmap();
            return Err(Error::Tracker(e));
        }
    };

    let report = recovered.report;
    let capacity_bytes = recovered.superblock.capacity_bytes();
    let last_lsn = report.next_lsn - 1;
    let shared = match Shared::new(last_lsn) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            unmap();
            return Err(Error::io(path, "creating the durability eventfd", e));
        }
    };
    let (log_kind, io_path, flush_mode) = (dev.kind(), dev.io_path(), dev.flush_mode());
    let io_fallback = dev.fallback_reason().map(str::to_string);
    let images = crate::images::new_shared(crate::images::IMAGES_BYTES_MAX);
    let manual = opts.writer == WriterMode::Manual;
    let background = !manual && !opts.images_only_at_checkpoints;
    let writer = LogWriter {
        dev,
        log_path: log_path.clone(),
        heap_file: store.clone(),
        heap_path: path.into(),
        superblock: recovered.superblock,
        head: recovered.head,
        used_bytes: recovered.used_bytes,
        heap_size_bytes: size as u64,
        full_image_logged: commit::PageSet::new(size as u64 / PAGE_SIZE as u64),
        checkpoint_threshold_bytes: opts.checkpoint_threshold_bytes.unwrap_or(capacity_bytes / 4),
        shared: shared.clone(),
        images: images.clone(),
        checkpoints_in_background: background,
        planned_checkpoint: None,
        checkpoint_plans: 0,
    };
    let writer_core: commit::WriterCore = Arc::new(std::sync::Mutex::new(writer));
    let (core, thread_shared) = (writer_core.clone(), shared.clone());
    let writer = if manual {
        None
    } else {
        let thread = std::thread::Builder::new()
            .name("fams-log-writer".into())
            .spawn(move || commit::run_writer_thread(core, thread_shared))
            .map_err(|e| {
                unmap();
                Error::io(path, "starting the log writer thread", e)
            })?;
        Some(thread)
    };
    let heap_file_thread = if background {
        let (core, thread_shared) = (writer_core.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("fams-checkpoint".into())
            .spawn(move || crate::checkpoint::run_heap_file_thread(core, thread_shared));
        match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // Stop the log writer first: it must not outlive the mapping.
                shared.lock().shutdown = true;
                shared.work.notify_all();
                if let Some(w) = writer {
                    let _ = w.join();
                }
                unmap();
                return Err(Error::io(path, "starting the heap-file thread", e));
            }
        }
    } else {
        None
    };
    Ok(Heap {
        path: path.into(),
        header,
        base,
        size,
        max_size,
        _file: file,
        store,
        images,
        tracker: std::mem::ManuallyDrop::new(tracker),
        shared,
        writer_core,
        writer,
        heap_file_thread,
        manual,
        log_path,
        log_kind,
        io_path,
        flush_mode,
        io_fallback,
        io_choice,
        capacity_bytes,
        next_lsn: report.next_lsn,
        in_flight_commits_max: opts.in_flight_commits_max,
        in_flight_bytes_max: opts.in_flight_bytes_max,
        page_last_lsn: HashMap::new(),
        shadow_pages: HashMap::new(),
        carried_pages: Vec::new(),
        dirty_scratch: Vec::new(),
        page_scratch: vec![0u8; PAGE_SIZE],
        stats: Stats::default(),
        recovery: report,
    })
}

/// The address range a heap may grow into, claimed as inaccessible memory; released on drop
/// unless kept.
struct Reservation {
    base: *mut u8,
    len: usize,
}

impl Reservation {
    /// Claim `[base, base + len)`, or None if any of it is taken.
    fn claim(base: u64, len: usize) -> Option<Reservation> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let addr = NonZeroUsize::new(base as usize)?;
        let size = NonZeroUsize::new(len)?;
        let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED_NOREPLACE;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the new one is
        // anonymous, inaccessible and ours.
        let p = unsafe { mmap_anonymous(Some(addr), size, ProtFlags::PROT_NONE, flags) }.ok()?;
        let r = Reservation { base: p.as_ptr().cast(), len };
        // Old kernels ignore the flag and may place the mapping elsewhere.
        (p.as_ptr() as u64 == base).then_some(r)
    }

    /// The heap owns the range from now on (it unmaps it when dropped).
    fn keep(self) -> *mut u8 {
        let base = self.base;
        std::mem::forget(self);
        base
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(p) = NonNull::new(self.base.cast()) {
            // SAFETY: unmapping the range this value claimed, which nothing else refers to.
            let _ = unsafe { nix::sys::mman::munmap(p, self.len) };
        }
    }
}

/// Map the heap file's bytes `[from, from + len)` of the image over the heap's reserved range at
/// the same offsets, `MAP_PRIVATE` (the kernel can never write uncommitted bytes back to the
/// file), without huge pages (they would coarsen dirty tracking to 2 MiB).
pub(super) fn map_file_over(file: &File, base: *mut u8, from: usize, len: usize) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    use nix::sys::mman::{madvise, mmap, MapFlags, MmapAdvise, ProtFlags};
    let (Some(addr), Some(size)) = (NonZeroUsize::new(base as usize + from), NonZeroUsize::new(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    let offset = libc::off_t::try_from(HEADER_BYTES + from as u64)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: [base + from, base + from + len) lies inside the heap's own reservation (callers
    // pass ranges below the maximum size), so MAP_FIXED replaces only memory the heap owns and
    // nothing refers to yet; the file is at least HEADER_BYTES + from + len long (checked by the
    // callers), so every page is backed.
    let p = unsafe {
        mmap(
            Some(addr),
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED | MapFlags::MAP_NORESERVE,
            file,
            offset,
        )
    }?;
    // SAFETY: advice on the mapping just made; MADV_NOHUGEPAGE does not change its contents.
    let _ = unsafe { madvise(p, len, MmapAdvise::MADV_NOHUGEPAGE) };
    Ok(())
}
