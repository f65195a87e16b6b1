//! The persistent heap: format, open (lock, recover, map, arm the tracker), commit, release.

use crate::commit::{self, LogWriter, PayloadBuilder, QueuedRecord, Shared, Ticket};
use crate::error::{Error, Result};
use crate::heap_file::{self, HeapHeader, HeapId, HEADER_BYTES, LOG_PATH_MAX, PAGE_SIZE};
use crate::io::{self, FlushMode, IoPath, LogKind, LogOpenOptions};
use crate::log_format::{Superblock, LOG_SIZE_MIN};
use crate::recovery::{self, RecoveryReport};
use crate::stats::Stats;
use crate::storage::{HeapStore, RealStorage, Storage};
use crate::tracker::{self, DirtyTracker, TrackerKind};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Commits dirtying more pages than this keep no shadow copies (the copy would cost more than
/// logging whole pages saves); their in-flight pages are logged whole by the next commit.
const SHADOW_PAGES_PER_COMMIT_MAX: usize = 64;

/// How long `open` waits for a heap lock that another process (or a just-forked child still
/// holding our closed descriptor) holds.
const LOCK_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// Default log size for a log file.
pub const LOG_SIZE_DEFAULT: u64 = 64 << 20;
/// Where default base addresses are picked: well above where Linux places ordinary mappings'
/// bases for small programs and below the stack, 1 GiB aligned.
const BASE_PICK_LOW: u64 = 0x2000_0000_0000;
const BASE_PICK_HIGH: u64 = 0x5000_0000_0000;

/// How to make a new heap.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub heap_path: PathBuf,
    /// Heap size in bytes; rounded up to a multiple of 4096.
    pub size_bytes: u64,
    /// The log: a file to create, or a block device to take over. Default: `<heap>.log` beside
    /// the heap file.
    pub log_path: Option<PathBuf>,
    /// Log size. Default: 64 MiB for a file, the whole device for a block device.
    pub log_size_bytes: Option<u64>,
    /// The fixed address the heap is mapped at. Default: picked at random among free ranges.
    pub base_addr: Option<u64>,
    /// Take over a block device even if it seems to hold a filesystem or other data.
    pub force: bool,
}

impl FormatOptions {
    pub fn new(heap_path: impl Into<PathBuf>, size_bytes: u64) -> FormatOptions {
        FormatOptions {
            heap_path: heap_path.into(),
            size_bytes,
            log_path: None,
            log_size_bytes: None,
            base_addr: None,
            force: false,
        }
    }
}

/// How to open a heap. `HeapOptions::default()` picks everything automatically.
#[derive(Clone, Debug, Default)]
pub struct HeapOptions {
    /// Force a dirty-page tracker (default: uffd where the kernel has it, else mprotect).
    pub tracker: Option<TrackerKind>,
    /// Force the I/O path (default: io_uring, else plain syscalls).
    pub io_path: Option<IoPath>,
    /// Force how log writes are made durable (default: RWF_DSYNC).
    pub flush_mode: Option<FlushMode>,
    /// Use this log instead of the one recorded in the heap header.
    pub log_path: Option<PathBuf>,
    /// Checkpoint when the log holds more than this many bytes (default: a quarter of the log).
    pub checkpoint_threshold_bytes: Option<u64>,
    /// On media corruption, replay up to the damage and drop the rest instead of refusing.
    pub salvage: bool,
}

/// A mapped, locked, recovered persistent heap.
///
/// Write through [`Heap::bytes_mut`] (or raw pointers into [`Heap::base`]); nothing written is
/// durable until [`Heap::commit`] returns, and after a crash the heap reopens holding exactly the
/// state of one completed commit.
pub struct Heap {
    path: PathBuf,
    header: HeapHeader,
    base: *mut u8,
    size: usize,
    /// Holds the lock and backs the mapping.
    _file: Arc<File>,
    /// The heap file as the commit path reads it (the storage seam; the real file in production).
    store: Arc<dyn HeapStore>,
    /// Dropped by hand in `Drop`, before the mapping it watches goes away.
    tracker: std::mem::ManuallyDrop<Box<dyn DirtyTracker>>,
    shared: Arc<Shared>,
    /// The log writer; a synchronous commit uses it directly when it is idle.
    writer_core: commit::WriterCore,
    writer: Option<JoinHandle<()>>,
    log_path: PathBuf,
    log_kind: LogKind,
    io_path: IoPath,
    flush_mode: FlushMode,
    io_fallback: Option<String>,
    capacity_bytes: u64,
    /// The LSN the next record gets.
    next_lsn: u64,
    /// For each page logged recently, the LSN of the last record holding it; a page is "in
    /// flight" while that record is not yet in the heap file.
    page_last_lsn: HashMap<usize, u64>,
    /// The committed image of in-flight pages (their newest logged content), so the next commit
    /// can log a diff against it instead of the whole page. Kept for small commits only.
    shadow_pages: HashMap<usize, Box<[u8; PAGE_SIZE]>>,
    /// Pages known dirty but not yet logged (collected for a release, or a refused commit).
    carried_pages: Vec<usize>,
    dirty_scratch: Vec<usize>,
    page_scratch: Vec<u8>,
    stats: Stats,
    recovery: RecoveryReport,
}

impl Heap {
    /// Create a heap file and its log. Fails if the heap file exists.
    pub fn format(opts: &FormatOptions) -> Result<HeapHeader> {
        format(opts)
    }

    /// Open, lock, recover and map the heap at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &HeapOptions) -> Result<Heap> {
        open(path.as_ref(), opts, &mut RealStorage)
    }

    /// [`Heap::open`] with the log and heap-file I/O going through `storage` — the seam crash
    /// tests use to put a simulated device with a volatile cache under an unchanged heap.
    pub fn open_on(path: impl AsRef<Path>, opts: &HeapOptions, storage: &mut dyn Storage) -> Result<Heap> {
        open(path.as_ref(), opts, storage)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &HeapHeader {
        &self.header
    }

    pub fn id(&self) -> HeapId {
        self.header.heap_id
    }

    /// The fixed address of the heap's first byte, the same in every process and every run.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: [base, base+size) is our private mapping, alive while self is; the borrow of
        // self keeps it from being unmapped or written through &mut during the borrow.
        unsafe { std::slice::from_raw_parts(self.base, self.size) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; &mut self makes this the only live reference into the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.size) }
    }

    /// Make everything written so far durable, all or nothing; returns once it is.
    pub fn commit(&mut self) -> Result<Ticket> {
        let t = self.capture()?;
        // When the log writer is idle, write the record on this thread: no hand-off to the
        // writer thread and back, so two thread wake-ups fewer per commit. Otherwise the writer
        // thread is busy with earlier records and drains this one after them.
        match self.writer_core.try_lock() {
            Ok(mut w) => {
                let _ = w.drain();
            }
            Err(_) => self.shared.work.notify_one(),
        }
        self.wait(t)?;
        Ok(t)
    }

    /// Capture everything written so far as one commit and hand it to the log writer; returns
    /// at once. The commit is durable when [`Heap::wait`] returns Ok or [`Heap::is_durable`]
    /// says so. Commits become durable in order; several in flight are grouped into one write.
    /// Writes made after this call belong to the next commit.
    #[must_use = "the ticket is how you learn the commit is durable"]
    pub fn commit_async(&mut self) -> Result<Ticket> {
        let t = self.capture()?;
        self.shared.work.notify_one();
        Ok(t)
    }

    /// Capture the commit into a queued record (steps 1–3 of the commit path).
    fn capture(&mut self) -> Result<Ticket> {
        self.check_writer()?;
        let started = Instant::now();
        let mut dirty = std::mem::take(&mut self.dirty_scratch);
        dirty.clear();
        self.collect_dirty(&mut dirty)?;
        self.stats.collect_ns += started.elapsed().as_nanos() as u64;
        if !self.carried_pages.is_empty() {
            dirty.append(&mut self.carried_pages);
            dirty.sort_unstable();
            dirty.dedup();
        }
        self.stats.pages_tracked += dirty.len() as u64;

        let wait_started = Instant::now();
        let applied_lsn = self.applied_lsn_for(&dirty)?;
        self.stats.write_back_wait_ns += wait_started.elapsed().as_nanos() as u64;
        let mut builder = PayloadBuilder::new();
        for &page in &dirty {
            debug_assert!(page * PAGE_SIZE < self.size);
            let offset = (page * PAGE_SIZE) as u64;
            // SAFETY: page < size / PAGE_SIZE (tracker pages are inside the range it tracks),
            // so the slice lies inside the mapping; no &mut to it exists during this call.
            let current = unsafe { std::slice::from_raw_parts(self.base.add(page * PAGE_SIZE), PAGE_SIZE) };
            let in_flight = self.page_last_lsn.get(&page).is_some_and(|&l| l > applied_lsn);
            if in_flight {
                match self.shadow_pages.get(&page) {
                    Some(committed) => builder.add_diff(offset, current, &committed[..]),
                    None => builder.add_full_page(offset, current),
                }
                continue;
            }
            if let Err(e) = self.store.read_exact_at(&mut self.page_scratch, HEADER_BYTES + offset) {
                self.carried_pages = dirty.clone();
                self.dirty_scratch = dirty;
                return Err(Error::io(&self.path, "reading the committed image of a dirty page", e));
            }
            builder.add_diff(offset, current, &self.page_scratch);
        }

        let record_bytes = builder.record_bytes();
        let record_max = commit::group_bytes_max(self.capacity_bytes);
        let pages_logged = builder.pages_logged();
        if commit::record_len_max(pages_logged as u64).max(record_bytes) > record_max {
            self.carried_pages = dirty.clone();
            self.dirty_scratch = dirty;
            return Err(Error::CommitTooLarge {
                needed_bytes: commit::record_len_max(pages_logged as u64).max(record_bytes),
                capacity_bytes: record_max,
            });
        }
        self.stats.commits += 1;
        self.stats.bytes_changed += builder.bytes_changed;
        self.stats.full_page_entries += builder.full_pages;
        self.stats.diffed_pages += builder.diffed_pages;
        if builder.entry_count == 0 {
            self.stats.empty_commits += 1;
            self.dirty_scratch = dirty;
            return Ok(Ticket { lsn: self.next_lsn - 1 });
        }
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        let last_lsn = &mut self.page_last_lsn;
        self.shadow_pages.retain(|p, _| last_lsn.get(p).is_some_and(|&l| l > applied_lsn));
        let keep_shadows = dirty.len() <= SHADOW_PAGES_PER_COMMIT_MAX;
        for &page in &dirty {
            last_lsn.insert(page, lsn);
            if keep_shadows {
                // SAFETY: as above, the page lies inside the mapping.
                let current = unsafe { std::slice::from_raw_parts(self.base.add(page * PAGE_SIZE), PAGE_SIZE) };
                self.shadow_pages.entry(page).or_insert_with(|| Box::new([0u8; PAGE_SIZE])).copy_from_slice(current);
            } else {
                // A stale shadow would be a wrong diff base.
                self.shadow_pages.remove(&page);
            }
        }
        if last_lsn.len() > 4 * dirty.len().max(1024) {
            last_lsn.retain(|_, &mut l| l > applied_lsn);
        }
        self.stats.payload_bytes += builder.payload.len() as u64;
        self.stats.record_bytes += record_bytes;
        {
            let mut st = self.shared.lock();
            st.queued_bytes += builder.payload.len() as u64;
            st.queue.push(QueuedRecord {
                lsn,
                payload: builder.payload,
                entry_count: builder.entry_count,
                pages: pages_logged,
            });
        }
        self.stats.capture_ns += started.elapsed().as_nanos() as u64;
        self.dirty_scratch = dirty;
        Ok(Ticket { lsn })
    }

    /// The LSN up to which the heap file holds committed images, for diffing `dirty`. A dirty
    /// page whose last record is durable but not yet written back would have to be logged whole;
    /// that write-back is microseconds away, so wait for it instead. Pages whose record is not yet
    /// durable (pipelined commits) are logged whole.
    fn applied_lsn_for(&self, dirty: &[usize]) -> Result<u64> {
        let mut st = self.shared.lock();
        let durable = st.durable_lsn;
        if st.applied_lsn >= durable {
            return Ok(st.applied_lsn);
        }
        let applied = st.applied_lsn;
        let must_wait = dirty.iter().any(|p| self.page_last_lsn.get(p).is_some_and(|&l| l > applied && l <= durable));
        while must_wait && st.applied_lsn < durable {
            if let Some(reason) = &st.failed {
                return Err(commit::poisoned(&self.log_path, reason));
            }
            st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(st.applied_lsn)
    }

    /// Block until the ticket's commit is durable.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        let mut st = self.shared.lock();
        loop {
            if st.durable_lsn >= ticket.lsn {
                return Ok(());
            }
            if let Some(reason) = &st.failed {
                return Err(commit::poisoned(&self.log_path, reason));
            }
            st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Is the ticket's commit durable yet? Never blocks.
    pub fn is_durable(&self, ticket: Ticket) -> Result<bool> {
        let st = self.shared.lock();
        if st.durable_lsn >= ticket.lsn {
            return Ok(true);
        }
        match &st.failed {
            Some(reason) => Err(commit::poisoned(&self.log_path, reason)),
            None => Ok(false),
        }
    }

    /// The newest durable commit.
    pub fn durable(&self) -> Ticket {
        Ticket { lsn: self.shared.lock().durable_lsn }
    }

    /// Give back the memory of every page whose content equals its committed image in the heap
    /// file (`MADV_DONTNEED`): the next access reads it back from the page cache. Pages written
    /// since the last commit, and pages whose commit is still on its way to the heap file, are
    /// kept. Returns the number of pages kept resident by this rule. Writes after a release are
    /// tracked as usual.
    pub fn release_committed(&mut self) -> Result<usize> {
        self.check_writer()?;
        let mut dirty = Vec::new();
        self.collect_dirty(&mut dirty)?;
        self.carried_pages.append(&mut dirty);
        self.carried_pages.sort_unstable();
        self.carried_pages.dedup();
        // Durable records are written back within microseconds; let that finish so their pages
        // count as clean.
        let applied_lsn = {
            let mut st = self.shared.lock();
            let durable = st.durable_lsn;
            while st.applied_lsn < durable && st.failed.is_none() {
                st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.applied_lsn
        };
        let mut keep: Vec<usize> = self.carried_pages.clone();
        keep.extend(self.page_last_lsn.iter().filter(|(_, &l)| l > applied_lsn).map(|(&p, _)| p));
        keep.sort_unstable();
        keep.dedup();
        let pages = self.size / PAGE_SIZE;
        let mut start = 0usize;
        for &k in keep.iter().chain(std::iter::once(&pages)) {
            if k > start {
                // SAFETY: [start, k) pages lie inside our mapping; they hold exactly their
                // committed bytes (not dirty, not in flight), which the heap file's page cache
                // also holds, so discarding the private copies loses nothing.
                let rc = unsafe {
                    libc::madvise(self.base.add(start * PAGE_SIZE).cast(), (k - start) * PAGE_SIZE, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(Error::io(&self.path, "madvise(MADV_DONTNEED)", std::io::Error::last_os_error()));
                }
            }
            start = k + 1;
        }
        self.page_last_lsn.retain(|_, &mut l| l > applied_lsn);
        let last_lsn = &self.page_last_lsn;
        self.shadow_pages.retain(|p, _| last_lsn.contains_key(p));
        self.stats.releases += 1;
        Ok(keep.len())
    }

    /// Close the heap as a crash would leave it: every acknowledged commit is in the log, queued
    /// ones are written, but no final checkpoint is taken, so the next open replays the log.
    /// For benchmarks of recovery and for tests; a normal close is just dropping the heap.
    pub fn abandon(self) {
        self.shared.lock().abandon = true;
        drop(self);
    }

    /// Resident and private memory of the heap's mapping (reads /proc/self/smaps).
    pub fn memory(&self) -> crate::stats::Memory {
        let (resident_bytes, private_bytes) = resident_bytes(self.base, self.size);
        crate::stats::Memory { heap_bytes: self.size as u64, resident_bytes, private_bytes }
    }

    /// Counters since open, and what the last open's recovery did. Cheap: no system calls.
    pub fn stats(&self) -> Stats {
        let st = self.shared.lock();
        let mut s = self.stats.clone();
        s.groups = st.stats.groups;
        s.log_bytes_written = st.stats.log_bytes_written;
        s.checkpoints = st.stats.checkpoints;
        s.heap_fdatasyncs = st.stats.heap_fdatasyncs;
        s.full_images_after_checkpoint = st.stats.full_images_after_checkpoint;
        s.device_write_ns = st.stats.device_write_ns;
        s.io = st.io;
        s.durable_lsn = st.durable_lsn;
        s.tracker = self.tracker.kind().name();
        s.io_path = self.io_path.name();
        s.io_fallback = self.io_fallback.clone();
        s.flush_mode = self.flush_mode.name();
        s.log_kind = self.log_kind.name();
        s.log_path = self.log_path.clone();
        s.heap_size = self.size as u64;
        s.recovery = self.recovery.clone();
        s
    }

    /// Ask the tracker for the dirty pages. If it fails part way, pages it already re-armed
    /// are lost to us and the next commit could miss their writes: refuse all further commits
    /// (reopening recovers the last committed state) rather than risk a partial commit.
    fn collect_dirty(&mut self, dirty: &mut Vec<usize>) -> Result<()> {
        if let Err(e) = self.tracker.collect(dirty) {
            let reason = format!("dirty-page tracking failed ({e}); writes since the last commit cannot be captured");
            self.shared.lock().failed.get_or_insert(reason);
            return Err(Error::Tracker(e));
        }
        Ok(())
    }

    fn check_writer(&self) -> Result<()> {
        match &self.shared.lock().failed {
            Some(reason) => Err(commit::poisoned(&self.log_path, reason)),
            None => Ok(()),
        }
    }
}

impl Drop for Heap {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            self.shared.work.notify_all();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // SAFETY: the tracker is dropped exactly once, here, and never used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.tracker) };
        // SAFETY: the mapping was created by open() with exactly this range and is no longer
        // reachable: the tracker is dropped below, and no borrow of self outlives drop.
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}

/// (resident, private) bytes of the mappings inside [base, base+size), from /proc/self/smaps:
/// `Rss` counts pages mapped in (private copies and page-cache pages read through the mapping);
/// `Anonymous` counts the private copies only, which is the memory the heap itself costs. mincore
/// would not do: on a file mapping it reports the page cache, not the mapping.
fn resident_bytes(base: *mut u8, size: usize) -> (u64, u64) {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return (0, 0) };
    let (lo, hi) = (base as u64, base as u64 + size as u64);
    let (mut rss_kb, mut anon_kb, mut inside) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a >= lo && b <= hi;
                continue;
            }
        }
        if !inside {
            continue;
        }
        let kb = || fields.clone().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match first {
            "Rss:" => rss_kb += kb(),
            "Anonymous:" => anon_kb += kb(),
            _ => {}
        }
    }
    (rss_kb * 1024, anon_kb * 1024)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, "fsync of the directory", e))
}

/// Is [base, base+size) free in this process? Probe with MAP_FIXED_NOREPLACE.
fn range_is_free(base: u64, size: u64) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a successful probe is
    // unmapped at once and was never shared.
    unsafe {
        let p = libc::mmap(
            base as *mut libc::c_void,
            size as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return false;
        }
        libc::munmap(p, size as usize);
        p as u64 == base
    }
}

fn pick_base(size: u64) -> Result<u64> {
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

fn format(opts: &FormatOptions) -> Result<HeapHeader> {
    let heap_path = &opts.heap_path;
    if opts.size_bytes == 0 {
        return Err(Error::InvalidArgument("heap size must be more than 0 bytes".into()));
    }
    let size = opts.size_bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let base = match opts.base_addr {
        Some(b) if b % PAGE_SIZE as u64 != 0 || b == 0 => {
            return Err(Error::InvalidArgument(format!("base address {b:#x} is not a nonzero multiple of 4096")))
        }
        Some(b) => b,
        None => pick_base(size)?,
    };
    if base.checked_add(size).is_none_or(|end| end > 0x7fff_ffff_f000) {
        return Err(Error::InvalidArgument(format!("base {base:#x} + size {size} leaves the user address space")));
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
        base_addr: base,
        log_size,
        created_unix: now_unix(),
        log_path: log_recorded,
    };
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(heap_path).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "creating the heap file (it already exists; remove it or pick another path)"
        } else {
            "creating the heap file"
        };
        Error::io(heap_path, what, e)
    })?;
    let result = (|| {
        file.write_all_at(&header.encode(), 0).map_err(|e| Error::io(heap_path, "writing the heap header", e))?;
        file.set_len(HEADER_BYTES + size).map_err(|e| Error::io(heap_path, "sizing the heap file", e))?;
        // Reserve the blocks now, so a full disk is reported here and not later, when
        // committed bytes are written back (the log would still hold them, but the heap would
        // stop). Filesystems without fallocate keep the file sparse.
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, (HEADER_BYTES + size) as libc::off_t) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(Error::io(heap_path, "reserving disk space for the heap (fallocate)", e));
            }
        }
        file.sync_all().map_err(|e| Error::io(heap_path, "fsync", e))?;
        if block.is_none() {
            io::create_log_file(&log_actual, log_size)
                .map_err(|e| Error::io(&log_actual, "creating the log file", e))?;
        }
        let mut dev = io::open_log(&log_actual, &LogOpenOptions::default())
            .map_err(|e| Error::io(&log_actual, "opening the log", e))?;
        // Zero both slots first so an old superblock on a reused device cannot win.
        io::zero_range_durable(dev.as_mut(), 0, 2 * PAGE_SIZE as u64)
            .map_err(|e| Error::io(&log_actual, "clearing the superblocks", e))?;
        recovery::write_superblock(dev.as_mut(), &Superblock::new(header.heap_id, log_size))
            .map_err(|e| Error::io(&log_actual, "writing the first superblock", e))?;
        sync_parent_dir(heap_path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(heap_path);
        if block.is_none() {
            let _ = std::fs::remove_file(&log_actual);
        }
        return Err(e);
    }
    Ok(header)
}

/// Who holds a flock on `file`, from /proc/locks (best effort, for the error message).
fn lock_holder(file: &File) -> String {
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
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, "opening the heap file", e))?;
    // A lock belongs to the open file description, and a process that forks (to exec a helper)
    // while a heap is open briefly shares that description, so the lock can outlive our close()
    // by the moment the child takes to exec. Retry for a short while before calling the heap taken.
    let deadline = Instant::now() + LOCK_RETRY_MAX;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(path, "locking the heap file", e));
        }
        if Instant::now() >= deadline {
            return Err(Error::Locked { path: path.into(), holder: lock_holder(&file) });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

pub(crate) fn open_log_of(
    path: &Path,
    header: &HeapHeader,
    opts: &HeapOptions,
    storage: &mut dyn Storage,
) -> Result<(PathBuf, Box<dyn io::LogDevice>)> {
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
    let dev = storage
        .log(&log_path, &LogOpenOptions { io_path: opts.io_path, flush_mode: opts.flush_mode })
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
    Ok((log_path, dev))
}

/// Refuse a heap or log on a file system that forgets everything at a power cut.
fn refuse_volatile(what: &str, path: &Path) -> Result<()> {
    match io::volatile_filesystem(path) {
        Some(fs) => Err(Error::InvalidArgument(format!(
            "{}: the {what} is on {fs}, which keeps data only in memory: nothing there survives a power cut. Put it on a disk (ext4, xfs, btrfs) or a block device",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn open(path: &Path, opts: &HeapOptions, storage: &mut dyn Storage) -> Result<Heap> {
    let file = open_locked(path)?;
    let header = heap_file::read_header(&file, path)?;
    refuse_volatile("heap", path)?;
    let (log_path, mut dev) = open_log_of(path, &header, opts, storage)?;
    refuse_volatile("log", &log_path)?;
    let size = usize::try_from(header.heap_size)
        .map_err(|_| Error::BadHeap { path: path.into(), reason: "heap larger than the address space".into() })?;

    // Claim the address range before replaying, so a taken range fails fast and changes nothing.
    if !range_is_free(header.base_addr, header.heap_size) {
        return Err(Error::AddressTaken { path: path.into(), base: header.base_addr as usize, size });
    }
    let file = Arc::new(file);
    let store = storage.heap(file.clone());
    let recovered = recovery::recover(
        dev.as_mut(),
        &log_path,
        store.as_ref(),
        path,
        &header,
        recovery::Mode::Replay { salvage: opts.salvage },
    )?;

    // SAFETY: MAP_FIXED_NOREPLACE cannot clobber an existing mapping; the file is at least
    // HEADER_BYTES + size long (checked by read_header), so every page is backed.
    let base = unsafe {
        libc::mmap(
            header.base_addr as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            HEADER_BYTES as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(Error::AddressTaken { path: path.into(), base: header.base_addr as usize, size });
        }
        return Err(Error::io(path, "mapping the heap", e));
    }
    if base as u64 != header.base_addr {
        // SAFETY: unmapping the mapping we just made.
        unsafe { libc::munmap(base, size) };
        return Err(Error::AddressTaken { path: path.into(), base: header.base_addr as usize, size });
    }
    let base = base.cast::<u8>();
    let unmap = || {
        // SAFETY: undoing the mapping made above on an error path; nothing else refers to it.
        unsafe { libc::munmap(base.cast(), size) };
    };
    // SAFETY: advice on our own mapping; huge pages would coarsen tracking to 2 MiB.
    unsafe { libc::madvise(base.cast(), size, libc::MADV_NOHUGEPAGE) };
    let tracker = match tracker::arm(opts.tracker, base, size) {
        Ok(t) => t,
        Err(e) => {
            unmap();
            return Err(Error::Tracker(e));
        }
    };

    let report = recovered.report;
    let capacity_bytes = recovered.superblock.capacity_bytes();
    let last_lsn = report.next_lsn - 1;
    let shared = Arc::new(Shared::new(last_lsn));
    let (log_kind, io_path, flush_mode) = (dev.kind(), dev.io_path(), dev.flush_mode());
    let io_fallback = dev.fallback_reason().map(str::to_string);
    let writer = LogWriter {
        dev,
        log_path: log_path.clone(),
        heap_file: store.clone(),
        heap_path: path.into(),
        superblock: recovered.superblock,
        head: recovered.head,
        used_bytes: 0,
        heap_size_bytes: header.heap_size,
        full_image_logged: commit::PageSet::new(header.heap_size / PAGE_SIZE as u64),
        checkpoint_threshold_bytes: opts.checkpoint_threshold_bytes.unwrap_or(capacity_bytes / 4),
        shared: shared.clone(),
    };
    let writer_core: commit::WriterCore = Arc::new(std::sync::Mutex::new(writer));
    let (core, thread_shared) = (writer_core.clone(), shared.clone());
    let writer = std::thread::Builder::new()
        .name("fams-log-writer".into())
        .spawn(move || commit::run_writer_thread(core, thread_shared))
        .map_err(|e| {
            unmap();
            Error::io(path, "starting the log writer thread", e)
        })?;
    Ok(Heap {
        path: path.into(),
        header,
        base,
        size,
        _file: file,
        store,
        tracker: std::mem::ManuallyDrop::new(tracker),
        shared,
        writer_core,
        writer: Some(writer),
        log_path,
        log_kind,
        io_path,
        flush_mode,
        io_fallback,
        capacity_bytes,
        next_lsn: report.next_lsn,
        page_last_lsn: HashMap::new(),
        shadow_pages: HashMap::new(),
        carried_pages: Vec::new(),
        dirty_scratch: Vec::new(),
        page_scratch: vec![0u8; PAGE_SIZE],
        stats: Stats::default(),
        recovery: report,
    })
}
