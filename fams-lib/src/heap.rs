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
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
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
    /// At most this many commits captured but not yet durable: beyond it, `commit_async` (and
    /// `commit`) wait for the log writer first. Default: unbounded. See [`Heap::set_in_flight_limit`].
    pub in_flight_commits_max: Option<u64>,
    /// At most this many payload bytes captured but not yet durable (as above). Default: unbounded.
    pub in_flight_bytes_max: Option<u64>,
    /// Who writes queued commits to the log: a thread of the heap's own (the default), or the
    /// owner, step by step ([`WriterMode::Manual`], for deterministic simulations).
    pub writer: WriterMode,
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
    /// [`WriterMode::Manual`]: no writer thread; the owner steps the writer.
    manual: bool,
    log_path: PathBuf,
    log_kind: LogKind,
    io_path: IoPath,
    flush_mode: FlushMode,
    io_fallback: Option<String>,
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
                    self.store.read_exact_at(&mut self.page_scratch, HEADER_BYTES + offset).map_err(|e| {
                        Error::io(&self.path, "reading the committed image of a page to roll it back", e)
                    })?;
                    &self.page_scratch
                }
            };
            // SAFETY: page < size / PAGE_SIZE, so the page lies inside our mapping; &mut self
            // means no reference into the heap is alive, and `image` is outside the mapping
            // (a shadow box or the scratch buffer), so the two slices do not overlap.
            let current = unsafe { std::slice::from_raw_parts_mut(self.base.add(page * PAGE_SIZE), PAGE_SIZE) };
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
            st.abandon
        };
        if let Some(w) = self.writer.take() {
            let _ = w.join();
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
            self.shared.fail(reason);
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
        // A log file is made under its staging name too; a block device is written in place
        // (it has no name to stage, and a half-formatted device holds no valid superblock).
        let log_target = if block.is_none() { &log_staging } else { &log_actual };
        if block.is_none() {
            io::create_log_file(log_target, log_size)
                .map_err(|e| Error::io(&log_actual, "creating the log file", e))?;
        }
        let mut dev = io::open_log(log_target, &LogOpenOptions::default())
            .map_err(|e| Error::io(&log_actual, "opening the log", e))?;
        // Zero both slots first so an old superblock on a reused device cannot win.
        io::zero_range_durable(dev.as_mut(), 0, 2 * PAGE_SIZE as u64)
            .map_err(|e| Error::io(&log_actual, "clearing the superblocks", e))?;
        recovery::write_superblock(dev.as_mut(), &Superblock::new(header.heap_id, log_size))
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
    Ok(header)
}

/// `dir/.NAME.formatting`: where format builds `dir/NAME` before renaming it into place.
fn staging_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.formatting"))
}

/// Remove what a killed format left: its staging files, and the log it had already renamed into
/// place — recognised as its own by the heap id in the log's superblock, which equals the one
/// in the staging heap file's header. A log of any other heap is left alone.
fn clear_interrupted_format(heap_staging: &Path, log_staging: &Path, log_actual: &Path) {
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
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("{} contains a NUL byte", p.display())))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; renameat2 only reads them.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc != 0 {
        return Err(Error::io(to, "renaming the finished file into place", std::io::Error::last_os_error()));
    }
    Ok(())
}

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
    let manual = opts.writer == WriterMode::Manual;
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
        writer,
        manual,
        log_path,
        log_kind,
        io_path,
        flush_mode,
        io_fallback,
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

#[cfg(test)]
mod tests {
    //! What needs the commit path's test hooks (`Shared::panic_next_group`, `hold_groups`): a
    //! panicking log writer, and commits held in flight for as long as a test needs.

    use super::*;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::mpsc;
    use std::time::Duration;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, SeqCst);
            let p = PathBuf::from(format!("/var/tmp/fams-heap-unit-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn heap(&self) -> PathBuf {
            let p = self.0.join("h");
            let mut f = FormatOptions::new(&p, 4 << 20);
            f.log_size_bytes = Some(8 << 20);
            Heap::format(&f).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn trackers() -> Vec<TrackerKind> {
        match tracker::uffd_available() {
            Ok(()) => vec![TrackerKind::Uffd, TrackerKind::Mprotect, TrackerKind::Regions],
            Err(why) => {
                eprintln!("uffd and regions trackers not tested here: {why}");
                vec![TrackerKind::Mprotect]
            }
        }
    }

    fn open_with(path: &Path, tracker: Option<TrackerKind>) -> Heap {
        Heap::open(path, &HeapOptions { tracker, ..HeapOptions::default() }).unwrap()
    }

    /// Run `f` on its own thread and return its result; fail the test if it takes more than 10 s
    /// (a hang is the bug these tests look for, and must not hang the test run).
    fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(v) => v,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still blocked after 10 s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
        }
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    fn fill(h: &mut Heap, pages: std::ops::Range<usize>, byte: u8) {
        h.bytes_mut()[pages.start * PAGE_SIZE..pages.end * PAGE_SIZE].fill(byte);
    }

    fn assert_pages(h: &Heap, pages: std::ops::Range<usize>, byte: u8, what: &str) {
        for p in pages {
            let page = &h.bytes()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
            assert!(page.iter().all(|&b| b == byte), "{what}: page {p} is not all {byte:#x}");
        }
    }

    #[test]
    fn a_panic_on_the_writer_thread_fails_every_waiter() {
        let dir = Dir::new("writer-panic");
        let path = dir.heap();
        let mut h = open_with(&path, None);
        h.bytes_mut()[100] = 1;
        let t0 = h.commit().unwrap();
        let handle = h.durability_handle();
        h.poll_durable().unwrap();
        h.shared.panic_next_group.store(true, SeqCst);
        h.bytes_mut()[PAGE_SIZE] = 2;
        // commit_async never writes on the caller's thread: the writer thread takes it, and panics.
        let t1 = h.commit_async().unwrap();
        let waiter = handle.clone();
        match within_10s("waiting for a commit whose writer panicked", move || waiter.wait(t1)) {
            Err(Error::Poisoned { reason, .. }) => assert!(reason.contains("panicked"), "{reason}"),
            other => panic!("wait returned {other:?}"),
        }
        assert!(readable(h.durability_fd()), "the failure must wake event loops too");
        assert!(matches!(h.poll_durable(), Err(Error::Poisoned { .. })));
        assert!(matches!(h.wait(t1), Err(Error::Poisoned { .. })));
        assert!(matches!(h.is_durable(t1), Err(Error::Poisoned { .. })));
        assert!(h.is_durable(t0).unwrap(), "what was durable stays durable");
        assert_eq!(h.in_flight(), InFlight::default());
        h.bytes_mut()[2 * PAGE_SIZE] = 3;
        assert!(matches!(h.commit(), Err(Error::Poisoned { .. })));
        assert!(matches!(h.commit_async(), Err(Error::Poisoned { .. })));
        assert!(matches!(h.rollback(), Err(Error::Poisoned { .. })));
        assert!(matches!(h.release_committed(), Err(Error::Poisoned { .. })));
        assert!(matches!(h.close(), Err(Error::Poisoned { .. })), "close reports the failure");
        assert!(matches!(handle.wait(t1), Err(Error::Poisoned { .. })), "a handle outliving the heap");
        let h = open_with(&path, None);
        assert_eq!(h.bytes()[100], 1);
        assert_eq!(h.bytes()[PAGE_SIZE], 0, "the group the writer panicked on never reached the disk");
        h.close().expect("a healthy heap closes without error");
    }

    #[test]
    fn a_panic_while_a_commit_drains_the_queue_is_an_error_not_an_unwind() {
        let dir = Dir::new("drain-panic");
        let path = dir.heap();
        let p = path.clone();
        let (first, second) = within_10s("a commit whose group panics", move || {
            let mut h = open_with(&p, None);
            h.bytes_mut()[0] = 1;
            h.commit().unwrap();
            h.shared.panic_next_group.store(true, SeqCst);
            h.bytes_mut()[0] = 2;
            // The writer is idle, so this commit most likely writes its group on this thread;
            // either way it must come back as an error.
            let first = h.commit().map_err(|e| e.to_string());
            h.bytes_mut()[0] = 3;
            let second = h.commit().map_err(|e| e.to_string());
            (first, second)
        });
        let e = first.expect_err("a commit whose group panicked");
        assert!(e.contains("panicked"), "{e}");
        assert!(second.is_err());
        let h = open_with(&path, None);
        assert_eq!(h.bytes()[0], 1);
    }

    #[test]
    fn commits_held_in_flight_are_counted_and_bound_commit_async() {
        let dir = Dir::new("in-flight");
        let path = dir.heap();
        let mut h = open_with(&path, None);
        assert_eq!(h.in_flight(), InFlight::default());
        h.shared.hold_groups.store(true, SeqCst);
        let payload_before = h.stats().payload_bytes;
        let mut tickets = Vec::new();
        for i in 0..3 {
            h.bytes_mut()[i * 3 * PAGE_SIZE + 8] = 7;
            tickets.push(h.commit_async().unwrap());
        }
        let f = h.in_flight();
        assert_eq!(f.commits, 3);
        assert_eq!(f.bytes, h.stats().payload_bytes - payload_before);
        assert!(f.bytes > 0);
        assert!(!h.would_block(), "unbounded by default");
        h.set_in_flight_limit(Some(3), None);
        assert!(h.would_block());
        h.set_in_flight_limit(Some(4), None);
        assert!(!h.would_block());
        h.set_in_flight_limit(None, Some(f.bytes));
        assert!(h.would_block());
        h.set_in_flight_limit(None, Some(f.bytes + 1));
        assert!(!h.would_block());
        h.set_in_flight_limit(None, None);
        assert!(!readable(h.durability_fd()), "nothing became durable");
        assert!(!h.is_durable(tickets[0]).unwrap());
        h.shared.hold_groups.store(false, SeqCst);
        h.wait(tickets[2]).unwrap();
        assert_eq!(h.in_flight(), InFlight::default());
        assert!(h.poll_durable().unwrap() >= tickets[2]);
    }

    #[test]
    fn rollback_restores_in_flight_pages_from_shadows_or_after_their_write_back() {
        for tracker in trackers() {
            let dir = Dir::new("rollback-in-flight");
            let path = dir.heap();
            let mut h = open_with(&path, Some(tracker));
            fill(&mut h, 0..10, 1);
            h.commit().unwrap();

            // A small commit held in flight: its pages keep shadow copies.
            h.shared.hold_groups.store(true, SeqCst);
            fill(&mut h, 0..5, 2);
            let t = h.commit_async().unwrap();
            fill(&mut h, 0..10, 3);
            let r = h.rollback().unwrap();
            assert_eq!(
                r,
                RollbackReport {
                    pages_dirty: 10,
                    pages_restored: 10,
                    pages_from_shadow: 5,
                    waited_for_write_back: false
                },
                "{tracker:?}"
            );
            assert_pages(&h, 0..5, 2, "in flight: the commit_async'd image, not the heap file's");
            assert_pages(&h, 5..10, 1, "committed and written back");
            assert!(!h.is_durable(t).unwrap(), "still held in flight");
            h.shared.hold_groups.store(false, SeqCst);
            h.wait(t).unwrap();

            // A large commit (no shadows) held in flight: rollback waits for its write-back.
            h.shared.hold_groups.store(true, SeqCst);
            fill(&mut h, 0..100, 4);
            let t2 = h.commit_async().unwrap();
            fill(&mut h, 0..120, 5);
            let r = h.rollback().unwrap();
            assert!(r.waited_for_write_back, "{tracker:?}: {r:?}");
            assert_eq!((r.pages_dirty, r.pages_restored, r.pages_from_shadow), (120, 120, 0), "{tracker:?}");
            assert!(h.is_durable(t2).unwrap());
            assert_pages(&h, 0..100, 4, "large commit in flight");
            assert_pages(&h, 100..120, 0, "never committed");

            let before = h.stats();
            h.commit().unwrap();
            let after = h.stats();
            assert_eq!(after.empty_commits, before.empty_commits + 1, "{tracker:?}: rolled-back pages were logged");
            assert_eq!(after.rollbacks, 2);
            assert_eq!(after.pages_rolled_back, 130);
            drop(h);
            let h = open_with(&path, Some(tracker));
            assert_pages(&h, 0..100, 4, "after reopening");
            assert_pages(&h, 100..120, 0, "after reopening");
        }
    }

    fn manual_options() -> HeapOptions {
        HeapOptions { writer: WriterMode::Manual, ..HeapOptions::default() }
    }

    fn page_byte(h: &Heap, page: usize) -> u8 {
        h.bytes()[page * PAGE_SIZE]
    }

    #[test]
    fn a_manual_writer_makes_commits_durable_only_when_stepped_in_order() {
        let dir = Dir::new("manual-step");
        let sim = crate::sim::SimHeap::format(&dir.0.join("s"), 1 << 20, 1 << 20, 7).unwrap();
        let mut h = sim.open(&manual_options()).unwrap();
        assert_eq!(h.writer_mode(), WriterMode::Manual);
        assert!(!h.write_step().unwrap(), "nothing queued");
        let _ = h.poll_durable().unwrap();
        let mut tickets = Vec::new();
        for page in 0..3 {
            h.bytes_mut()[page * PAGE_SIZE] = page as u8 + 1;
            tickets.push(h.commit_async().unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(!h.is_durable(tickets[0]).unwrap(), "no thread writes in manual mode");
        assert_eq!(h.in_flight().commits, 3);
        assert!(!readable(h.durability_fd()));
        let groups = h.stats().groups;
        assert!(h.write_step().unwrap());
        assert_eq!(h.stats().groups, groups + 1, "the three queued commits share one device write");
        assert!(h.is_durable(tickets[2]).unwrap());
        assert!(readable(h.durability_fd()), "a step announces durability on the fd");
        assert_eq!(h.poll_durable().unwrap(), tickets[2]);
        assert!(!h.write_step().unwrap());

        // Two commits, one step: the first is durable, the second is not.
        h.bytes_mut()[3 * PAGE_SIZE] = 4;
        let t4 = h.commit_async().unwrap();
        h.bytes_mut()[4 * PAGE_SIZE] = 5;
        assert!(h.write_step().unwrap());
        let t5 = h.commit_async().unwrap();
        assert!(h.is_durable(t4).unwrap() && !h.is_durable(t5).unwrap());
        assert_eq!(h.in_flight().commits, 1);

        // The process dies (no power cut): what was stepped survives, the unstepped commit not.
        h.abandon();
        let h = sim.open(&manual_options()).unwrap();
        for page in 0..4 {
            assert_eq!(page_byte(&h, page), page as u8 + 1, "stepped commit of page {page} lost");
        }
        assert_eq!(page_byte(&h, 4), 0, "a commit never stepped survived a crash");
        drop(h);

        // A power cut between steps: the same (stepped writes are durable log writes).
        let mut h = sim.open(&manual_options()).unwrap();
        h.bytes_mut()[5 * PAGE_SIZE] = 6;
        let t6 = h.commit_async().unwrap();
        assert!(h.write_step().unwrap());
        h.bytes_mut()[6 * PAGE_SIZE] = 7;
        let t7 = h.commit_async().unwrap();
        assert!(h.is_durable(t6).unwrap() && !h.is_durable(t7).unwrap());
        sim.machine.cut_power_now();
        h.abandon();
        sim.reboot().unwrap();
        let h = sim.open(&manual_options()).unwrap();
        assert_eq!(page_byte(&h, 5), 6);
        assert_eq!(page_byte(&h, 6), 0, "a commit never stepped survived a power cut");
    }

    #[test]
    fn a_manual_writer_never_blocks_commit_wait_bounds_or_close() {
        let dir = Dir::new("manual-sync");
        let sim = crate::sim::SimHeap::format(&dir.0.join("s"), 1 << 20, 1 << 20, 8).unwrap();
        let mut h = sim.open(&manual_options()).unwrap();
        // Back-pressure: over the bound, commit_async writes the oldest group itself.
        h.set_in_flight_limit(Some(2), None);
        let mut last = None;
        for page in 0..6 {
            h.bytes_mut()[page * PAGE_SIZE] = 9;
            last = Some(h.commit_async().unwrap());
            assert!(h.in_flight().commits <= 2);
        }
        assert!(h.would_block());
        // wait drains.
        h.wait(last.unwrap()).unwrap();
        assert_eq!(h.in_flight().commits, 0);
        // commit drains synchronously, earlier queued commits first.
        h.bytes_mut()[7 * PAGE_SIZE] = 1;
        let a = h.commit_async().unwrap();
        h.bytes_mut()[8 * PAGE_SIZE] = 2;
        let b = h.commit().unwrap();
        assert!(h.is_durable(a).unwrap() && h.is_durable(b).unwrap());
        // A rollback of a page whose commit is queued (no shadow for a whole new page is
        // needed here; it must not wait for a thread that does not exist).
        h.bytes_mut()[9 * PAGE_SIZE] = 3;
        let _queued = h.commit_async().unwrap();
        h.bytes_mut()[9 * PAGE_SIZE] = 4;
        h.rollback().unwrap();
        assert_eq!(page_byte(&h, 9), 3);
        // A clean close drains the queue.
        h.bytes_mut()[10 * PAGE_SIZE] = 5;
        let _ = h.commit_async().unwrap();
        h.close().unwrap();
        let h = sim.open(&manual_options()).unwrap();
        assert_eq!(page_byte(&h, 9), 3);
        assert_eq!(page_byte(&h, 10), 5, "close wrote the queued commit");
    }
}
