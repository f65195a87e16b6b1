//! The persistent heap: format, open (lock, recover, map, arm the tracker), commit, roll back,
//! release.
//!
//! # What an event loop uses
//!
//! A turn-based program commits with [`Heap::commit_async`] and must not block until the commit
//! is durable; it watches [`Heap::durability_fd`] next to its sockets and calls
//! [`Heap::poll_durable`] when it fires. A turn that fails half way is undone with
//! [`Heap::rollback`], which puts every page written since the last capture back to its last
//! captured image. [`Heap::in_flight`] and [`Heap::would_block`] tell it how far the log writer
//! lags, and [`HeapOptions::in_flight_commits_max`] / [`HeapOptions::in_flight_bytes_max`] bound
//! that lag (memory held by queued records) by making `commit_async` wait.

use crate::commit::{self, DurabilityHandle, LogWriter, PayloadBuilder, QueuedRecord, Shared, Ticket, WriterState};
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
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
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
    /// At most this many commits captured but not yet durable: beyond it, `commit_async` (and
    /// `commit`) wait for the log writer first. Default: unbounded. See [`Heap::set_in_flight_limit`].
    pub in_flight_commits_max: Option<u64>,
    /// At most this many payload bytes captured but not yet durable (as above). Default: unbounded.
    pub in_flight_bytes_max: Option<u64>,
    /// Who writes queued commits to the log: a thread of the heap's own (the default), or the
    /// owner, step by step ([`WriterMode::Manual`], for deterministic simulations).
    pub writer: WriterMode,
    /// No heap-file thread: checkpoints run on the thread that writes the group that crosses the
    /// threshold (a synchronous `commit()`, or the log-writer thread), and committed page images
    /// reach the heap file only at checkpoints (and when they pass their budget). By default a
    /// thread of the heap's own takes checkpoints beside the commits — the heap file's
    /// `fdatasync` off the committing path — and writes images as a checkpoint nears, so the
    /// checkpoint has little left to write (`checkpoint.rs`). Set it for simulations that replay
    /// a seed's I/O operations in the same order, or to keep that thread's work from running
    /// beside the committing one on a machine with few CPUs. [`WriterMode::Manual`] has no
    /// heap-file thread either.
    pub images_only_at_checkpoints: bool,
    /// Whether recovery reads the log ahead of its replay on a second thread. None (the
    /// default): when it may read 8 MiB or more (below that, starting the thread costs more than
    /// the overlap saves; measured in BENCHMARKS.md). `Some(false)` keeps every read on the
    /// opening thread (a machine with one CPU); `Some(true)` reads ahead whatever the size.
    pub recovery_read_ahead: Option<bool>,
}

/// Who runs the log writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriterMode {
    /// A log-writer thread drains the queue as soon as commits are queued (production).
    #[default]
    Thread,
    /// No thread: [`Heap::commit_async`] only queues, and a queued group is written when the
    /// owner calls [`Heap::write_step`] — so a simulation decides when the device write happens
    /// and runs bit-for-bit the same every time. Everything that must wait for the log writer
    /// writes on the caller's thread instead of blocking: [`Heap::commit`] and [`Heap::wait`]
    /// drain the queue, `commit_async` over an in-flight bound first writes queued groups until
    /// it is under the bound, and a rollback that needs a write-back drains. (A
    /// [`DurabilityHandle::wait`] on another thread waits for one of those.) Closing drains the
    /// queue and checkpoints; [`Heap::abandon`] drops the commits never stepped, as a killed
    /// process would lose them.
    Manual,
}

/// Commits captured but not yet durable: queued for the log writer, or in the group it is
/// writing. Each holds its record's payload in memory until it is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub commits: u64,
    /// Record payload bytes (entry headers and changed bytes) of those commits.
    pub bytes: u64,
}

/// What [`Heap::rollback`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollbackReport {
    /// Pages written since the last capture (what the tracker reported, plus pages a refused
    /// commit left behind).
    pub pages_dirty: usize,
    /// Of those, pages whose bytes differed from their last captured image and were put back.
    pub pages_restored: usize,
    /// Pages restored from the copy of a commit still on its way to the heap file.
    pub pages_from_shadow: usize,
    /// Whether rollback had to wait for an earlier commit's write-back to the heap file (a page
    /// in flight with no shadow copy: its last captured image was only in a queued record).
    pub waited_for_write_back: bool,
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
    /// The current size: the heap file is mapped over `[base, base + size)`.
    size: usize,
    /// The reserved address range is `[base, base + max_size)`.
    max_size: usize,
    /// Holds the lock and backs the mapping.
    _file: Arc<File>,
    /// The heap file as the commit path reads it (the storage seam; the real file in production).
    store: Arc<dyn HeapStore>,
    /// Committed page images not yet in the heap file (shared with the log writer): a page's
    /// committed image is here if held, else in `store`.
    images: crate::images::SharedImages,
    /// Dropped by hand in `Drop`, before the mapping it watches goes away.
    tracker: std::mem::ManuallyDrop<Box<dyn DirtyTracker>>,
    shared: Arc<Shared>,
    /// The log writer; a synchronous commit uses it directly when it is idle.
    writer_core: commit::WriterCore,
    writer: Option<JoinHandle<()>>,
    /// The heap-file thread: checkpoints and image writes beside the commits (`checkpoint.rs`).
    heap_file_thread: Option<JoinHandle<()>>,
    /// [`WriterMode::Manual`]: no writer thread; the owner steps the writer.
    manual: bool,
    log_path: PathBuf,
    log_kind: LogKind,
    io_path: IoPath,
    flush_mode: FlushMode,
    io_fallback: Option<String>,
    /// How `io_path` and `flush_mode` were chosen.
    io_choice: &'static str,
    capacity_bytes: u64,
    /// The LSN the next record gets.
    next_lsn: u64,
    in_flight_commits_max: Option<u64>,
    in_flight_bytes_max: Option<u64>,
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
        format::format(opts).map(|(header, _)| header)
    }

    /// [`Heap::format`], also saying how the log will be written and what each candidate
    /// measured on this device ([`io::choose_io`]; nothing measured when both were given).
    pub fn format_reporting(opts: &FormatOptions) -> Result<(HeapHeader, io::IoChoice)> {
        format::format(opts)
    }

    /// Open, lock, recover and map the heap at `path`.
    /// Rewrite the header of the heap file at `path` (not open anywhere) in the current format
    /// version, raising its maximum size if asked; crash-safe (see [`upgrade`]). Heaps written by
    /// earlier versions open without it; an upgrade lets them grow past their old maximum.
    pub fn upgrade(path: impl AsRef<Path>, opts: &UpgradeOptions) -> Result<UpgradeReport> {
        upgrade::upgrade(path.as_ref(), opts)
    }

    pub fn open(path: impl AsRef<Path>, opts: &HeapOptions) -> Result<Heap> {
        open::open(path.as_ref(), opts, &mut RealStorage)
    }

    /// [`Heap::open`] with the log and heap-file I/O going through `storage` — the seam crash
    /// tests use to put a simulated device with a volatile cache under an unchanged heap.
    pub fn open_on(path: impl AsRef<Path>, opts: &HeapOptions, storage: &mut dyn Storage) -> Result<Heap> {
        open::open(path.as_ref(), opts, storage)
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

    /// The largest this heap may grow to (set at format; the address range reserved for it).
    pub fn max_len(&self) -> usize {
        self.max_size
    }

    /// Grow the heap to `new_size_bytes` (rounded up to 4096; at most [`Heap::max_len`]). The new
    /// bytes are zero and usable at once, right after the old end, so pointers into the heap
    /// stay valid. Disk space for them is reserved first: a full disk is an error that changes
    /// nothing. Failure-atomic: after a crash the heap opens with the old size or the new one,
    /// holding the same committed bytes either way. Growing commits nothing: writes not yet
    /// committed stay pending for the next commit (or rollback). It first waits until the commits
    /// in flight have reached the heap file, and re-arms dirty tracking over the larger range
    /// (for `uffd`, 3–4 ms per GiB). Asking for a size at or below the current one does nothing.
    pub fn grow(&mut self, new_size_bytes: u64) -> Result<()> {
        self.check_writer()?;
        let new = new_size_bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        if new > self.max_size as u64 {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot grow the heap to {new} bytes: its maximum size is {} bytes (set when it was formatted)",
                self.path.display(),
                self.max_size
            )));
        }
        let old = self.size;
        if new <= old as u64 {
            return Ok(());
        }
        let new = new as usize;
        // The writer must be idle while the superblock is rewritten: no record in flight.
        self.wait_applied(self.next_lsn - 1)?;
        commit::lock_core(&self.writer_core).grow(new as u64)?;
        if let Err(e) = open::map_file_over(&self._file, self.base, old, new - old) {
            // The new size is durable; the next open maps it. This process cannot use it.
            self.shared.fail(format!("mapping the grown heap failed: {e}"));
            return Err(Error::io(&self.path, "mapping the grown part of the heap", e));
        }
        // Re-arm the tracker over the whole new range, carrying what the old one had seen.
        let mut dirty = Vec::new();
        self.collect_dirty(&mut dirty)?;
        self.carried_pages.append(&mut dirty);
        self.carried_pages.sort_unstable();
        self.carried_pages.dedup();
        let kind = self.tracker.kind();
        // SAFETY: the old tracker is dropped once, here, and replaced below before any use; no
        // thread writes to the heap while `grow` (which holds &mut self) runs.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.tracker) };
        // SAFETY: [base, base + new) is the heap's own mapping (the file mapped over its
        // reservation, just extended); the heap drops its tracker before unmapping (Drop).
        let armed = unsafe { tracker::arm(Some(kind), self.base, new) };
        self.size = new;
        match armed {
            Ok(t) => {
                self.tracker = std::mem::ManuallyDrop::new(t);
                Ok(())
            }
            Err(e) => {
                let reason = format!("re-arming dirty tracking over the grown heap failed: {e}");
                self.tracker = std::mem::ManuallyDrop::new(Box::new(tracker::Broken(reason.clone())));
                self.shared.fail(reason);
                Err(Error::Tracker(e))
            }
        }
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
        self.wait_for_room()?;
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
    ///
    /// Blocks only under an in-flight limit ([`HeapOptions::in_flight_commits_max`],
    /// [`HeapOptions::in_flight_bytes_max`], [`Heap::set_in_flight_limit`]): while the commits
    /// already in flight reach either bound, it first waits until the log writer has made enough
    /// of them durable. So with a limit of `n` commits, at most `n` are ever in flight; the bytes
    /// bound is checked before capturing, so the commit being made may take the total past it by
    /// its own size. An event loop asks [`Heap::would_block`] first.
    #[must_use = "the ticket is how you learn the commit is durable"]
    pub fn commit_async(&mut self) -> Result<Ticket> {
        self.wait_for_room()?;
        let t = self.capture()?;
        self.shared.work.notify_one();
        Ok(t)
    }

    /// Block until the ticket's commit is durable. Err (poisoned) if the log writer fails first,
    /// whatever the cause — an I/O error, a failed tracker, even a panic on the writer thread.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        if self.manual && self.shared.durable() < ticket {
            // Nobody else writes: write what is queued here.
            let _ = commit::lock_core(&self.writer_core).drain();
        }
        self.shared.wait(ticket, &self.log_path)
    }

    /// [`WriterMode::Manual`]: write the next queued group (one device write holding every
    /// commit queued, up to the group size limit) on this thread. `Ok(true)` if a group was
    /// written, `Ok(false)` if nothing was queued; the poisoned error if the log writer has
    /// failed (e.g. the device write failed). Under [`WriterMode::Thread`] the thread's own
    /// writer is stepped the same way (harmless: it writes in LSN order whoever holds it).
    pub fn write_step(&mut self) -> Result<bool> {
        let stepped = commit::lock_core(&self.writer_core).step();
        match stepped {
            Ok(wrote) => Ok(wrote),
            Err(()) => {
                self.check_writer()?;
                Err(commit::poisoned(&self.log_path, "the log writer failed"))
            }
        }
    }

    /// How this heap's log writer runs.
    pub fn writer_mode(&self) -> WriterMode {
        if self.manual {
            WriterMode::Manual
        } else {
            WriterMode::Thread
        }
    }

    /// Is the ticket's commit durable yet? Never blocks.
    pub fn is_durable(&self, ticket: Ticket) -> Result<bool> {
        self.shared.is_durable(ticket, &self.log_path)
    }

    /// The newest durable commit.
    pub fn durable(&self) -> Ticket {
        self.shared.durable()
    }

    /// A descriptor that becomes readable when the durable LSN has advanced, or the heap has
    /// failed, since the last [`Heap::poll_durable`] — for `poll`/`epoll` in an event loop.
    ///
    /// It is an *edge counter* (an `eventfd`), not a level: it says "something changed", not
    /// "ticket t is durable". Readable → call `poll_durable` (which drains it, so it stays
    /// unreadable until the next advance) → compare your tickets with the ticket it returns
    /// (tickets are ordered: every ticket `<=` it is durable). Do not read it yourself, and do
    /// not assume one readiness per commit: several commits may become durable behind one
    /// wake-up, and a wake-up may find nothing new (an advance already seen). With level-triggered
    /// polling, an undrained fd keeps firing; with edge-triggered epoll, drain it on every wake-up
    /// or you may miss later ones. The fd is `O_NONBLOCK` and close-on-exec, and lives as long as
    /// the heap (and any [`DurabilityHandle`]).
    pub fn durability_fd(&self) -> BorrowedFd<'_> {
        self.shared.durability_fd()
    }

    /// Never blocks: reset [`Heap::durability_fd`] and return the newest durable commit, or the
    /// poisoned error if the log writer has failed (after which no more commits become durable).
    pub fn poll_durable(&self) -> Result<Ticket> {
        self.shared.poll_durable(&self.log_path)
    }

    /// A `Clone + Send + Sync` handle on this heap's durability, for other threads (the heap
    /// itself is not `Send`): wait for tickets, poll, or watch the fd.
    pub fn durability_handle(&self) -> DurabilityHandle {
        DurabilityHandle::new(self.shared.clone(), &self.log_path)
    }

    /// Commits captured but not yet durable, and their payload bytes. Zero once the heap has
    /// failed: nothing more is on its way.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight_of(&self.shared.lock())
    }

    fn in_flight_of(&self, st: &WriterState) -> InFlight {
        if st.failed.is_some() {
            return InFlight::default();
        }
        InFlight {
            commits: (self.next_lsn - 1).saturating_sub(st.durable_lsn),
            bytes: st.queued_bytes + st.writing_bytes,
        }
    }

    /// Bound the commits in flight (see [`Heap::commit_async`]); `None` means unbounded. A bound
    /// of 0 behaves as 1: a commit never waits when nothing is in flight.
    pub fn set_in_flight_limit(&mut self, commits: Option<u64>, bytes: Option<u64>) {
        self.in_flight_commits_max = commits;
        self.in_flight_bytes_max = bytes;
    }

    /// Would `commit_async` wait for the log writer now (an in-flight bound is reached)? Never
    /// blocks. An event loop that gets `true` waits for [`Heap::durability_fd`] instead, and
    /// meanwhile does work that needs no commit.
    pub fn would_block(&self) -> bool {
        let st = self.shared.lock();
        st.failed.is_none() && self.over_limit(&st)
    }

    fn over_limit(&self, st: &WriterState) -> bool {
        let f = self.in_flight_of(st);
        f.commits > 0
            && (self.in_flight_commits_max.is_some_and(|m| f.commits >= m)
                || self.in_flight_bytes_max.is_some_and(|m| f.bytes >= m))
    }

    /// Wait while the in-flight bounds are reached (see [`Heap::commit_async`]).
    fn wait_for_room(&self) -> Result<()> {
        if self.in_flight_commits_max.is_none() && self.in_flight_bytes_max.is_none() {
            return Ok(());
        }
        let mut st = self.shared.lock();
        loop {
            if let Some(reason) = &st.failed {
                return Err(commit::poisoned(&self.log_path, reason));
            }
            if !self.over_limit(&st) {
                return Ok(());
            }
            if self.manual {
                // No thread would ever make room: write the oldest queued group here.
                drop(st);
                let _ = commit::lock_core(&self.writer_core).step();
                st = self.shared.lock();
                continue;
            }
            self.shared.work.notify_one();
            st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait until every record up to `lsn` is in the heap file; returns the applied LSN.
    fn wait_applied(&self, lsn: u64) -> Result<u64> {
        #[cfg(test)]
        self.shared.hold_groups.store(false, std::sync::atomic::Ordering::SeqCst);
        if self.manual {
            // Write-back follows the device write on the same thread: drain, and it is done.
            let _ = commit::lock_core(&self.writer_core).drain();
        }
        let mut st = self.shared.lock();
        loop {
            if st.applied_lsn >= lsn {
                return Ok(st.applied_lsn);
            }
            if let Some(reason) = &st.failed {
                return Err(commit::poisoned(&self.log_path, reason));
            }
            self.shared.work.notify_one();
            st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Undo every write made since the last capture (the last `commit` or `commit_async`, or
    /// open): each page written since then gets back its last captured image. The next commit
    /// logs nothing for those pages. This is how a turn that fails half way (an error, a caught
    /// panic) leaves no trace.
    ///
    /// The last captured image of a page is in one of three places:
    /// - the heap file, when every record holding the page has been written back to it;
    /// - the heap's shadow copy, when the page's last record is still on its way (kept for small
    ///   commits, to diff against);
    /// - only in that queued record, for a page of a large commit still in flight: rollback then
    ///   waits until the record is durable and written back (the log writer's next step anyway),
    ///   and reads the heap file. Only then can it block.
    ///
    /// Bytes are copied back (not `MADV_DONTNEED`, which would revert to the heap file's image:
    /// wrong for pages in flight), so this works under every tracker and keeps the pages resident.
    /// Errors: the poisoned error if the heap has failed (tracking failed: the dirty pages cannot
    /// be known, so the writes cannot be undone — drop the heap and reopen it), or reading the heap
    /// file failed.
    pub fn rollback(&mut self) -> Result<RollbackReport> {
        self.check_writer()?;
        let mut dirty = std::mem::take(&mut self.dirty_scratch);
        dirty.clear();
        self.collect_dirty(&mut dirty)?;
        if !self.carried_pages.is_empty() {
            dirty.append(&mut self.carried_pages);
            dirty.sort_unstable();
            dirty.dedup();
        }
        let mut report = RollbackReport { pages_dirty: dirty.len(), ..RollbackReport::default() };
        let restored = self.restore_pages(&dirty, &mut report);
        if let Err(e) = restored {
            // Not undone: keep them for the next commit (or rollback), as a refused commit does.
            self.carried_pages = dirty.clone();
            self.dirty_scratch = dirty;
            return Err(e);
        }
        // The restoring writes dirtied the pages again; they now hold their last captured image,
        // which the next commit would find unchanged, so forget them instead of diffing them.
        // (Nothing else can have written since the first collect: we hold &mut self.)
        let mut again = Vec::new();
        self.collect_dirty(&mut again)?;
        self.stats.rollbacks += 1;
        self.stats.pages_rolled_back += report.pages_restored as u64;
        self.dirty_scratch = dirty;
        Ok(report)
    }

    /// Put each of `dirty` back to its last captured image.
    fn restore_pages(&mut self, dirty: &[usize], report: &mut RollbackReport) -> Result<()> {
        let mut applied_lsn = self.shared.lock().applied_lsn;
        for &page in dirty {
            debug_assert!(page * PAGE_SIZE < self.size);
            let offset = (page * PAGE_SIZE) as u64;
            let last_lsn = self.page_last_lsn.get(&page).copied().unwrap_or(0);
            if last_lsn > applied_lsn && !self.shadow_pages.contains_key(&page) {
                // The image is only in a record on its way: let it reach the heap file.
                report.waited_for_write_back = true;
                applied_lsn = self.wait_applied(last_lsn)?;
            }
            let shadow = if last_lsn > applied_lsn { self.shadow_pages.get(&page) } else { None };
            let image: &[u8] = match shadow {
                Some(shadow) => &shadow[..],
                None => {
                    crate::images::lock(&self.images)
                        .read(&*self.store, offset / PAGE_SIZE as u64, &mut self.page_scratch)
                        .map_err(|e| {
                            Error::io(&self.path, "reading the committed image of a page to roll it back", e)
                        })?;
                    &self.page_scratch
                }
            };
            // SAFETY: page < size / PAGE_SIZE, so the page lies inside our mapping.
            let at = unsafe { self.base.add(page * PAGE_SIZE) };
            // SAFETY: the page lies inside our mapping; &mut self means no reference into the
            // heap is alive, and `image` is outside the mapping (a shadow box or the scratch
            // buffer), so the two slices do not overlap.
            let current = unsafe { std::slice::from_raw_parts_mut(at, PAGE_SIZE) };
            if current != image {
                current.copy_from_slice(image);
                report.pages_restored += 1;
                report.pages_from_shadow += usize::from(shadow.is_some());
            }
        }
        Ok(())
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
            while st.applied_lsn < durable {
                if let Some(reason) = &st.failed {
                    return Err(commit::poisoned(&self.log_path, reason));
                }
                st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.applied_lsn
        };
        // A released page is read back from the heap file: it must hold every committed image.
        crate::images::flush_all(&self.images, &*self.store)
            .map_err(|e| Error::io(&self.path, "writing committed pages into the heap file before a release", e))?;
        let mut keep: Vec<usize> = self.carried_pages.clone();
        keep.extend(self.page_last_lsn.iter().filter(|(_, &l)| l > applied_lsn).map(|(&p, _)| p));
        keep.sort_unstable();
        keep.dedup();
        let pages = self.size / PAGE_SIZE;
        let mut start = 0usize;
        for &k in keep.iter().chain(std::iter::once(&pages)) {
            if k > start {
                let at = NonNull::new(self.base.wrapping_add(start * PAGE_SIZE).cast())
                    .ok_or_else(|| Error::InvalidArgument("the heap has no mapping".into()))?;
                // SAFETY: [start, k) pages lie inside our mapping; they hold exactly their
                // committed bytes (not dirty, not in flight), which the heap file's page cache
                // also holds, so discarding the private copies loses nothing.
                let rc = unsafe {
                    nix::sys::mman::madvise(at, (k - start) * PAGE_SIZE, nix::sys::mman::MmapAdvise::MADV_DONTNEED)
                };
                if let Err(e) = rc {
                    return Err(Error::io(&self.path, "madvise(MADV_DONTNEED)", e.into()));
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

    /// Close the heap: write what is queued, take the final checkpoint, unmap. Unlike dropping
    /// it, reports a failure — a commit that never became durable, a failed final checkpoint
    /// (nothing committed is lost then: the next open replays the log).
    pub fn close(mut self) -> Result<()> {
        self.stop_writer();
        let failed = self.shared.lock().failed.clone();
        let log_path = self.log_path.clone();
        drop(self);
        match failed {
            Some(reason) => Err(commit::poisoned(&log_path, &reason)),
            None => Ok(()),
        }
    }

    /// Ask the log writer to drain the queue, checkpoint and leave; wait for it.
    fn stop_writer(&mut self) {
        let abandon = {
            let mut st = self.shared.lock();
            st.shutdown = true;
            self.shared.work.notify_all();
            self.shared.background.notify_all();
            st.abandon
        };
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(t) = self.heap_file_thread.take() {
            let _ = t.join();
        }
        if self.manual {
            // What the thread does when it leaves, here; once only (shutdown stays set).
            let mut w = commit::lock_core(&self.writer_core);
            if abandon {
                // A killed process loses the commits it had queued and never written.
                let mut st = self.shared.lock();
                st.queue.clear();
                st.queued_bytes = 0;
            } else {
                let _ = w.drain();
            }
            w.finish();
        }
    }

    /// Resident and private memory of the heap's mapping (reads /proc/self/smaps).
    pub fn memory(&self) -> crate::stats::Memory {
        let (resident_bytes, private_bytes) = resident_bytes(self.base, self.size);
        crate::stats::Memory { heap_bytes: self.size as u64, resident_bytes, private_bytes }
    }

    /// Counters since open, and what the last open's recovery did. Cheap: no system calls.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        {
            let images = crate::images::lock(&self.images);
            s.committed_images_pages = images.len() as u64;
            s.committed_images_flushes = images.flushes;
            s.committed_images_pages_flushed = images.pages_flushed;
        }
        let st = self.shared.lock();
        s.groups = st.stats.groups;
        s.log_bytes_written = st.stats.log_bytes_written;
        s.checkpoints = st.stats.checkpoints;
        s.background_checkpoints = st.stats.background_checkpoints;
        s.heap_fdatasyncs = st.stats.heap_fdatasyncs;
        s.written_limit_raises = st.stats.written_limit_raises;
        s.full_images_after_checkpoint = st.stats.full_images_after_checkpoint;
        s.device_write_ns = st.stats.device_write_ns;
        s.io = st.io;
        s.durable_lsn = st.durable_lsn;
        s.tracker = self.tracker.kind().name();
        s.io_path = self.io_path.name();
        s.io_fallback = self.io_fallback.clone();
        s.io_choice = self.io_choice;
        s.flush_mode = self.flush_mode.name();
        s.log_kind = self.log_kind.name();
        s.log_path = self.log_path.clone();
        s.heap_size = self.size as u64;
        s.recovery = self.recovery.clone();
        s
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
        self.stop_writer();
        // The writer drains the queue before it leaves, or fails the heap. Should a ticket still
        // be pending anyway, fail it: a DurabilityHandle may outlive the heap, and its waiters
        // must not wait for a writer that is gone.
        let issued = self.next_lsn - 1;
        let pending = {
            let st = self.shared.lock();
            st.failed.is_none() && st.durable_lsn < issued
        };
        if pending {
            self.shared.fail(format!("the heap was closed before commit {issued} was durable"));
        }
        // SAFETY: the tracker is dropped exactly once, here, and never used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.tracker) };
        if let Some(p) = NonNull::new(self.base.cast()) {
            // SAFETY: the reservation (with the file mapped over its front) was created by open()
            // with exactly this range and is no longer reachable: the tracker is dropped above,
            // and no borrow of self outlives drop.
            let _ = unsafe { nix::sys::mman::munmap(p, self.max_size) };
        }
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

mod capture;
mod format;
mod open;
#[cfg(test)]
mod tests;
// Its plan of file operations is public for the crash test that cuts the power inside it.
#[cfg(any(test, feature = "testing"))]
pub mod upgrade;
#[cfg(not(any(test, feature = "testing")))]
pub(crate) mod upgrade;

pub use format::FormatOptions;
pub(crate) use open::{lock_holder, open_log_of};
pub use upgrade::{UpgradeOptions, UpgradeReport};
