//! The commit path.
//!
//! On the caller's thread (`Heap::commit_async`):
//! 1. the tracker returns the pages written since the last commit and re-arms them;
//! 2. each dirty page is compared with its committed image (the heap file's page cache) and only
//!    the changed byte runs are copied into a record payload, unless the whole page is smaller;
//!    a page whose previous commit is still on its way to the heap file is logged whole, because
//!    its committed image is not in the heap file yet;
//! 3. the payload gets the next LSN and is queued; the caller gets a [`Ticket`] and goes on.
//!    (Under an in-flight bound, `HeapOptions::in_flight_commits_max` / `_bytes_max`, the caller
//!    first waits while the commits captured but not yet durable reach it: back-pressure, so a
//!    caller faster than the device cannot queue unbounded memory.)
//!
//! Undoing instead of committing (`Heap::rollback`) uses step 1 too: the pages written since
//! the last capture are put back to their last captured image — the heap file's page, or for a
//! commit still in flight its shadow copy (or, without one, the page once written back) — and
//! nothing is queued.
//!
//! On the writer thread (this file's [`LogWriter`]):
//! 4. everything queued is taken as one group, sealed (checksums) and laid out in the circular
//!    log, and written with one durable device write (two when it wraps around the end);
//! 5. once durable, the group's entries are applied to the committed page images held in memory
//!    (`images.rs`; small groups before their tickets are acknowledged, large ones after);
//! 6. when the log holds more than the checkpoint threshold: ask the heap-file thread for a
//!    checkpoint — write the images into the heap file, fdatasync it, then move the tail in a new
//!    superblock — which it takes beside the commits (`checkpoint.rs`); when the next group would
//!    not fit, take one at once. Images also go to the heap file, unsynced, when there are too
//!    many, and in the background as a checkpoint nears.
//!
//! Only one group is in flight at a time: that is what lets recovery tell a torn write (damage
//! inside the last group) from corruption (damage followed by a later group). And no group is
//! written past the durable superblock's written limit (raised first when needed, see
//! `log_format`): that is what lets recovery look for such a later group without reading the
//! whole log.
//!
//! # Learning that commits are durable
//!
//! Whoever advances the durable LSN (the writer thread, or a caller's thread draining the queue
//! in a synchronous `commit`) wakes the `progress` condition variable — for threads that block in
//! `wait` — and adds 1 to an `eventfd` — for event loops, which cannot block: they watch the fd
//! with `poll`/`epoll` next to their sockets ([`crate::Heap::durability_fd`]). The fd is an edge
//! counter, not a level: readable means "something changed since you last drained me", so after
//! it fires call `poll_durable` (which drains it) and then check your tickets against the
//! returned durable ticket. The same fd fires when the heap fails, so a loop never waits forever.
//!
//! # Failure
//!
//! The first failure (a device error, a failed tracker, a panic while writing) is recorded in
//! `WriterState::failed`, once, with both wake-ups above; from then on every waiter returns
//! [`Error::Poisoned`] and nothing more is written. A panic on the writer thread or in a
//! caller's drain is caught and recorded the same way: a half-written group must neither reach
//! the heap file nor leave a waiter blocked forever. The process can drop the heap and reopen
//! it: recovery brings back the last durable commit.

use crate::error::Error;
use crate::heap_file::{HEADER_BYTES, PAGE_SIZE};
use crate::io::{AlignedBuf, LogDevice};
use crate::log_format::{self, RecordHeader, Superblock, RECORD_HEADER_BYTES};
use crate::mutations::{self, Mutation};
use crate::recovery::write_superblock;
use crate::storage::HeapStore;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A commit handed to the log writer. Durable once [`crate::Heap::wait`] returns Ok for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket {
    pub(crate) lsn: u64,
}

impl Ticket {
    /// The log sequence number of the commit (0 when nothing was ever committed).
    pub fn lsn(&self) -> u64 {
        self.lsn
    }
}

/// A record payload waiting for the writer.
pub(crate) struct QueuedRecord {
    pub lsn: u64,
    pub payload: Vec<u8>,
    pub entry_count: u32,
    /// Distinct heap pages the entries touch.
    pub pages: u32,
}

impl QueuedRecord {
    pub fn total_len(&self) -> u64 {
        log_format::round_up_block((RECORD_HEADER_BYTES + self.payload.len()) as u64)
    }

    /// The length once the writer has turned every page into a full image (the most it can be).
    pub fn total_len_max(&self) -> u64 {
        record_len_max(self.pages as u64).max(self.total_len())
    }
}

/// The most bytes a record touching `pages` pages can need (every page a full image).
pub(crate) fn record_len_max(pages: u64) -> u64 {
    log_format::round_up_block(RECORD_HEADER_BYTES as u64 + pages * log_format::entry_encoded_len(PAGE_SIZE) as u64)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct WriterStats {
    pub groups: u64,
    pub records: u64,
    pub log_bytes_written: u64,
    pub checkpoints: u64,
    /// Of those, taken on the heap-file thread (see `checkpoint.rs`).
    pub background_checkpoints: u64,
    pub written_limit_raises: u64,
    pub heap_fdatasyncs: u64,
    /// Pages logged whole because it was their first change since a checkpoint.
    pub full_images_after_checkpoint: u64,
    /// Sum over groups of the time from the group's write to its durability.
    pub device_write_ns: u64,
}

pub(crate) struct WriterState {
    pub queue: Vec<QueuedRecord>,
    /// Payload bytes of the queued records.
    pub queued_bytes: u64,
    /// Payload bytes (as captured) of the group being written: taken from the queue, not yet
    /// durable.
    pub writing_bytes: u64,
    /// Every LSN up to this one is durable in the log.
    pub durable_lsn: u64,
    /// Every LSN up to this one is also in the heap file.
    pub applied_lsn: u64,
    pub failed: Option<String>,
    /// The heap-file thread should write committed images into the heap file (set as a
    /// checkpoint nears; see `checkpoint.rs`).
    pub flush_images: bool,
    /// The log passed its checkpoint threshold: the heap-file thread should take a checkpoint
    /// (see `checkpoint.rs`).
    pub checkpoint_wanted: bool,
    pub shutdown: bool,
    /// With `shutdown`: leave without the final checkpoint, as a crash would.
    pub abandon: bool,
    pub stats: WriterStats,
    pub io: crate::io::IoStats,
}

pub(crate) struct Shared {
    pub state: Mutex<WriterState>,
    /// Signalled when the queue gains work or shutdown is asked.
    pub work: Condvar,
    /// Signalled when the heap-file thread has work (`flush_images`, `checkpoint_wanted`), and on
    /// shutdown and failure.
    pub background: Condvar,
    /// Signalled when durable_lsn / applied_lsn / failed change.
    pub progress: Condvar,
    /// Counts durable-LSN advances and failures, for event loops (see the module docs).
    /// Nonblocking, so neither the writer nor `poll_durable` can ever block on it.
    durability_fd: nix::sys::eventfd::EventFd,
    /// Tests: make the next `commit_group` panic, wherever it runs.
    #[cfg(test)]
    pub panic_next_group: std::sync::atomic::AtomicBool,
    /// Tests: `commit_group` waits (before writing anything) while this is set, so commits stay
    /// in flight for as long as a test needs; shutdown, or a rollback that must wait for a
    /// write-back, lifts it.
    #[cfg(test)]
    pub hold_groups: std::sync::atomic::AtomicBool,
    /// Tests: a background checkpoint waits after its plan, before writing images, while this is
    /// set (or until shutdown).
    #[cfg(test)]
    pub hold_checkpoint_before_sync: std::sync::atomic::AtomicBool,
    /// Tests: a background checkpoint waits after its sync, before moving the tail, while this is
    /// set (or until shutdown).
    #[cfg(test)]
    pub hold_checkpoint_before_tail: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(last_lsn: u64) -> std::io::Result<Shared> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let durability_fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Shared {
            state: Mutex::new(WriterState {
                queue: Vec::new(),
                queued_bytes: 0,
                writing_bytes: 0,
                durable_lsn: last_lsn,
                applied_lsn: last_lsn,
                failed: None,
                flush_images: false,
                checkpoint_wanted: false,
                shutdown: false,
                abandon: false,
                stats: WriterStats::default(),
                io: Default::default(),
            }),
            work: Condvar::new(),
            background: Condvar::new(),
            progress: Condvar::new(),
            durability_fd,
            #[cfg(test)]
            panic_next_group: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            hold_groups: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            hold_checkpoint_before_sync: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            hold_checkpoint_before_tail: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, WriterState> {
        // A panic on the writer thread while holding the lock is a bug; the data under it
        // (counters, a queue) stays meaningful, so go on rather than cascade the panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake everyone who learns about durability: blocked waiters and event loops. Call after
    /// changing `durable_lsn` or `failed`, with the state lock released (the order matters for
    /// `poll_durable`: the fd is drained first and the state read after, so an advance is never
    /// missed — at worst it is reported twice).
    pub fn announce(&self) {
        self.signal_fd();
        self.progress.notify_all();
    }

    /// Make the durability descriptor readable.
    fn signal_fd(&self) {
        // Nonblocking; the only possible failure, EAGAIN when the counter would overflow
        // 2^64 - 2, cannot happen before a reader drains it (and would mean it is readable anyway).
        let _ = self.durability_fd.write(1);
    }

    /// Record the first failure (later ones keep the first reason: it is the cause) and wake
    /// everyone, so no waiter stays blocked on a heap that will make no more progress.
    pub fn fail(&self, reason: String) {
        {
            let mut st = self.lock();
            st.failed.get_or_insert(reason);
            st.queue.clear();
            st.queued_bytes = 0;
            st.writing_bytes = 0;
            // Signalled under the lock: whoever sees the failure also finds the descriptor
            // readable (a waiter may wake before the notification below).
            self.signal_fd();
        }
        self.progress.notify_all();
        self.background.notify_all();
    }

    pub fn durability_fd(&self) -> BorrowedFd<'_> {
        self.durability_fd.as_fd()
    }

    /// Reset the eventfd's counter: read until it would block. Never blocks.
    fn drain_fd(&self) {
        loop {
            match self.durability_fd.read() {
                // A non-semaphore eventfd is now 0; the next read says EAGAIN.
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return, // EAGAIN: drained
            }
        }
    }

    pub fn poll_durable(&self, log_path: &Path) -> crate::Result<Ticket> {
        self.drain_fd();
        let st = self.lock();
        match &st.failed {
            Some(reason) => Err(poisoned(log_path, reason)),
            None => Ok(Ticket { lsn: st.durable_lsn }),
        }
    }

    pub fn durable(&self) -> Ticket {
        Ticket { lsn: self.lock().durable_lsn }
    }

    pub fn is_durable(&self, ticket: Ticket, log_path: &Path) -> crate::Result<bool> {
        let st = self.lock();
        if st.durable_lsn >= ticket.lsn {
            return Ok(true);
        }
        match &st.failed {
            Some(reason) => Err(poisoned(log_path, reason)),
            None => Ok(false),
        }
    }

    pub fn wait(&self, ticket: Ticket, log_path: &Path) -> crate::Result<()> {
        let mut st = self.lock();
        loop {
            if st.durable_lsn >= ticket.lsn {
                return Ok(());
            }
            if let Some(reason) = &st.failed {
                return Err(poisoned(log_path, reason));
            }
            st = self.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A thread-safe handle on a heap's durability, for code that does not own the heap: another
/// thread waiting for a ticket, or an event loop watching [`DurabilityHandle::fd`] while the
/// heap itself is used elsewhere. It outlives the heap harmlessly: once the heap is closed,
/// tickets it issued are durable (a clean close drains the queue) or the handle reports the
/// failure.
#[derive(Clone)]
pub struct DurabilityHandle {
    shared: Arc<Shared>,
    /// For error messages: the failures reported are the log's.
    log_path: Arc<Path>,
}

impl std::fmt::Debug for DurabilityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurabilityHandle").field("log_path", &self.log_path).finish_non_exhaustive()
    }
}

impl DurabilityHandle {
    pub(crate) fn new(shared: Arc<Shared>, log_path: &Path) -> DurabilityHandle {
        DurabilityHandle { shared, log_path: log_path.into() }
    }

    /// The newest durable commit.
    pub fn durable(&self) -> Ticket {
        self.shared.durable()
    }

    /// Is the ticket's commit durable yet? Never blocks. Err if the heap failed first.
    pub fn is_durable(&self, ticket: Ticket) -> crate::Result<bool> {
        self.shared.is_durable(ticket, &self.log_path)
    }

    /// Block until the ticket's commit is durable, or the heap fails.
    pub fn wait(&self, ticket: Ticket) -> crate::Result<()> {
        self.shared.wait(ticket, &self.log_path)
    }

    /// See [`crate::Heap::durability_fd`]. All handles of a heap share one fd (and one counter:
    /// whoever calls `poll_durable` drains it for all), so give each event loop its own heap.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.durability_fd()
    }

    /// See [`crate::Heap::poll_durable`].
    pub fn poll_durable(&self) -> crate::Result<Ticket> {
        self.shared.poll_durable(&self.log_path)
    }
}

/// What a caught panic says, for the failure reason.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The most bytes one group may hold: also the largest record a commit may produce, so a group
/// always fits in the log after a checkpoint (a wrap can waste less than one record).
pub(crate) fn group_bytes_max(capacity_bytes: u64) -> u64 {
    capacity_bytes / 2
}

/// The log writer, shared by the log-writer thread and synchronous commits.
pub(crate) type WriterCore = Arc<Mutex<LogWriter>>;

pub(crate) fn lock_core(core: &WriterCore) -> MutexGuard<'_, LogWriter> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

/// The log-writer thread: sleeps until records are queued (by `commit_async`), drains them,
/// and takes the final checkpoint at shutdown. A panic anywhere in it (a bug) fails the heap
/// instead of leaving waiters blocked on a thread that is gone.
pub(crate) fn run_writer_thread(core: WriterCore, shared: Arc<Shared>) {
    let body = std::panic::AssertUnwindSafe(|| {
        loop {
            {
                let mut st = shared.lock();
                while st.queue.is_empty() && !st.shutdown {
                    st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.queue.is_empty() && st.shutdown {
                    break;
                }
            }
            if lock_core(&core).drain().is_err() {
                return;
            }
        }
        lock_core(&core).finish();
    });
    // Unwind safety: after a panic the writer's state is not trusted again — `failed` is set,
    // and `drain` and `finish` refuse to write anything once it is.
    if let Err(payload) = std::panic::catch_unwind(body) {
        shared.fail(format!("the log writer thread panicked: {}", panic_message(payload.as_ref())));
    }
}

/// Groups with at most this much payload are written back to the heap file before they are
/// acknowledged; larger ones after (their write-back would delay the acknowledgement).
const WRITE_BACK_BEFORE_ACK_BYTES_MAX: usize = 64 << 10;

pub(crate) struct LogWriter {
    pub dev: Box<dyn LogDevice>,
    pub log_path: PathBuf,
    pub heap_file: Arc<dyn HeapStore>,
    pub heap_path: PathBuf,
    pub superblock: Superblock,
    /// Where the next record goes.
    pub head: u64,
    /// Bytes of the record area in use since the tail (records plus space skipped at a wrap).
    pub used_bytes: u64,
    pub checkpoint_threshold_bytes: u64,
    pub shared: Arc<Shared>,
    pub heap_size_bytes: u64,
    /// Pages that have had a full image logged since the last checkpoint.
    pub full_image_logged: PageSet,
    /// Durable records' bytes, applied to page images in memory; the heap file gets them at the
    /// next checkpoint (or when there are too many, see `images.rs`).
    pub images: crate::images::SharedImages,
    /// A heap-file thread takes checkpoints and writes images beside the commits (see
    /// `checkpoint.rs`); without one, checkpoints run on the thread that writes the group.
    pub checkpoints_in_background: bool,
    /// The background checkpoint planned and not yet finished (its id), if any.
    pub planned_checkpoint: Option<u64>,
    /// Checkpoints planned so far (ids).
    pub checkpoint_plans: u64,
}

/// One bit per heap page.
pub(crate) struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    pub fn new(pages: u64) -> PageSet {
        PageSet { words: vec![0; pages.div_ceil(64) as usize] }
    }
    pub fn get(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    pub fn set(&mut self, page: u64) {
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }
    pub fn clear(&mut self) {
        self.words.fill(0);
    }
    /// Make room for `pages` pages (the new ones unset).
    pub fn grow(&mut self, pages: u64) {
        let words = pages.div_ceil(64) as usize;
        if words > self.words.len() {
            self.words.resize(words, 0);
        }
    }
}

impl LogWriter {
    /// The next group: queued records in LSN order, up to the group limit.
    fn take_group(&self, st: &mut WriterState) -> Vec<QueuedRecord> {
        let limit = group_bytes_max(self.superblock.capacity_bytes());
        let mut bytes = 0;
        let mut take = 0;
        for r in &st.queue {
            if take > 0 && bytes + r.total_len_max() > limit {
                break;
            }
            bytes += r.total_len_max();
            take += 1;
        }
        let taken = st.queue[..take].iter().map(|r| r.payload.len() as u64).sum::<u64>();
        st.queued_bytes -= taken;
        st.writing_bytes = taken;
        st.queue.drain(..take).collect()
    }

    /// Write every queued record, group by group, on the calling thread. Whoever holds the
    /// writer (the log-writer thread, or a synchronous `commit()` that found it idle) drains the
    /// queue in LSN order. Err once the writer has failed — including by a panic while writing a
    /// group, which is caught here so that it fails the heap (and wakes every waiter) instead of
    /// unwinding into a caller's `commit`.
    pub fn drain(&mut self) -> Result<(), ()> {
        while self.step()? {}
        Ok(())
    }

    /// Write the next queued group (one device write, at most [`group_bytes_max`] of records) on
    /// the calling thread. `Ok(true)` if a group was written, `Ok(false)` if nothing was queued,
    /// `Err` once the writer has failed (see [`LogWriter::drain`]). The step a heap in
    /// [`crate::heap::WriterMode::Manual`] takes when its owner says so.
    pub fn step(&mut self) -> Result<bool, ()> {
        {
            let group = {
                let mut st = self.shared.lock();
                if st.failed.is_some() {
                    return Err(());
                }
                if st.queue.is_empty() {
                    return Ok(false);
                }
                self.take_group(&mut st)
            };
            // Unwind safety: a panic leaves this writer's fields (head, used bytes) possibly
            // half updated; `fail` below makes sure they are never used to write again.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit_group(group)))
                .unwrap_or_else(|payload| {
                    Err(format!(
                        "{}: the log writer panicked while writing a group: {}",
                        self.log_path.display(),
                        panic_message(payload.as_ref())
                    ))
                });
            if let Err(reason) = written {
                self.shared.fail(reason);
                return Err(());
            }
        }
        Ok(true)
    }

    /// Clean shutdown: leave a short log so the next open is quick (unless abandoning). Not after
    /// a failure: the heap file may then hold part of a group whose write-back failed, and a
    /// checkpoint would make that torn state the base of recovery; without one, recovery replays
    /// the log over it.
    pub(crate) fn finish(&mut self) {
        let skip = {
            let st = self.shared.lock();
            st.abandon || st.failed.is_some()
        };
        if self.used_bytes > 0 && !skip {
            if let Err(reason) = self.checkpoint() {
                self.shared.fail(reason);
            }
        }
        self.publish_io_stats();
    }

    fn publish_io_stats(&self) {
        self.shared.lock().io = self.dev.stats();
    }

    fn commit_group(&mut self, mut group: Vec<QueuedRecord>) -> Result<(), String> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::SeqCst;
            while self.shared.hold_groups.load(SeqCst) && !self.shared.lock().shutdown {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if self.shared.panic_next_group.swap(false, SeqCst) {
                panic!("injected panic in commit_group (test)");
            }
        }
        let first_lsn = group[0].lsn;
        let last_lsn = group[group.len() - 1].lsn;
        // Negative control (`mutations` builds only): the group's bytes reach the heap file
        // before its record is even written — and before a checkpoint that makes room for it,
        // whose fdatasync would then make them durable with no record to explain them.
        if mutations::is_on(Mutation::WriteBackBeforeDurable) {
            for r in &group {
                let entries = log_format::decode_entries(&r.payload, r.entry_count, u64::MAX)
                    .map_err(|e| format!("internal: a record we built does not decode: {e}"))?;
                crate::storage::write_entries(&*self.heap_file, &entries).map_err(|e| e.to_string())?;
            }
        }
        // Room for the group at its largest, plus what a wrap can skip (less than one record).
        let bytes_max: u64 = group.iter().map(|r| r.total_len_max()).sum();
        let record_max = group.iter().map(|r| r.total_len_max()).max().unwrap_or(0);
        if self.used_bytes + bytes_max + record_max > self.superblock.capacity_bytes() {
            self.checkpoint()?;
        }
        // Only after any checkpoint: which pages need a full image depends on it.
        self.add_full_images(&mut group)?;
        let group = &group[..];
        let group_bytes: u64 = group.iter().map(|r| r.total_len()).sum();

        // Lay the group out: records in order from the head, jumping to the area start when the
        // next one does not fit before the end.
        let mut layout = Vec::with_capacity(group.len());
        let mut at = self.head;
        let mut skipped = 0;
        for r in group {
            let len = r.total_len();
            if at + len > self.superblock.area_end {
                skipped += self.superblock.area_end - at;
                at = self.superblock.area_start;
            }
            layout.push(at);
            at += len;
        }
        assert!(
            self.used_bytes + group_bytes + skipped <= self.superblock.capacity_bytes(),
            "group of {group_bytes} bytes (+{skipped} skipped) does not fit: {} used of {}",
            self.used_bytes,
            self.superblock.capacity_bytes()
        );

        // Every record stays inside the durable superblock's written limit (see `log_format`):
        // raise it first, with one durable superblock write, when this group would end past it.
        let group_end_bytes = self.used_bytes + group_bytes + skipped;
        if group_end_bytes > self.superblock.written_limit_bytes {
            self.raise_written_limit(group_end_bytes, group_bytes)?;
        }

        // Two contiguous segments at most: before and after the wrap.
        let split = layout.iter().position(|&o| o < self.head).unwrap_or(group.len());
        let seg_len = |rs: &[QueuedRecord]| rs.iter().map(|r| r.total_len()).sum::<u64>() as usize;
        let mut seg_a = AlignedBuf::zeroed(seg_len(&group[..split]));
        let mut seg_b = AlignedBuf::zeroed(seg_len(&group[split..]));
        let fill = |buf: &mut [u8], rs: &[QueuedRecord]| {
            let mut at = 0usize;
            for r in rs {
                let len = r.total_len() as usize;
                let out = &mut buf[at..at + len];
                out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + r.payload.len()].copy_from_slice(&r.payload);
                let header = RecordHeader {
                    lsn: r.lsn,
                    group_first_lsn: first_lsn,
                    heap_id: self.superblock.heap_id,
                    epoch: self.superblock.epoch,
                    total_len: len as u32,
                    payload_len: r.payload.len() as u32,
                    entry_count: r.entry_count,
                    payload_crc: 0,
                };
                log_format::seal_record(out, &header);
                at += len;
            }
        };
        fill(&mut seg_a, &group[..split]);
        fill(&mut seg_b, &group[split..]);
        let mut segments: Vec<(u64, &[u8])> = Vec::with_capacity(2);
        if !seg_a.is_empty() {
            segments.push((layout[0], &seg_a));
        }
        if !seg_b.is_empty() {
            segments.push((self.superblock.area_start, &seg_b));
        }

        // Negative control (`mutations` builds only): tell the waiters the group is durable
        // before its log write is issued.
        if mutations::is_on(Mutation::CommitAckBeforeDurable) {
            self.shared.lock().durable_lsn = last_lsn;
            self.shared.announce();
        }
        let started = Instant::now();
        self.dev
            .write_durable(&segments)
            .map_err(|e| format!("{}: writing log records {first_lsn}..={last_lsn}: {e}", self.log_path.display()))?;
        let write_ns = started.elapsed().as_nanos() as u64;
        self.head = at;
        if self.head == self.superblock.area_end {
            self.head = self.superblock.area_start;
        }
        self.used_bytes += group_bytes + skipped;
        // The group is durable: its bytes may now reach the heap file. A small group is written
        // back before the acknowledgement: it costs microseconds, and the caller's next commit
        // then finds the heap file current (no wait, no whole-page logging) and this thread
        // asleep (its CPU needs no TLB-shootdown interrupt when the tracker re-protects pages).
        let payload_bytes: usize = group.iter().map(|r| r.payload.len()).sum();
        let write_back_first = payload_bytes <= WRITE_BACK_BEFORE_ACK_BYTES_MAX;
        if write_back_first {
            self.write_back(group)?;
        }
        {
            let mut st = self.shared.lock();
            st.durable_lsn = last_lsn;
            st.writing_bytes = 0;
            if write_back_first {
                st.applied_lsn = last_lsn;
            }
            st.stats.groups += 1;
            st.stats.records += group.len() as u64;
            st.stats.log_bytes_written += group_bytes;
            st.stats.device_write_ns += write_ns;
            st.io = self.dev.stats();
        }
        self.shared.announce();
        if !write_back_first {
            self.write_back(group)?;
            self.shared.lock().applied_lsn = last_lsn;
            self.shared.progress.notify_all();
        }
        if self.used_bytes > self.checkpoint_threshold_bytes {
            self.checkpoint_due()?;
        } else {
            self.images_due();
        }
        Ok(())
    }

    /// Make the first record to touch a page since the last checkpoint carry the page's whole
    /// committed image instead of a diff.
    ///
    /// Why: after a checkpoint the heap file is written again (write-back, page cache), and the
    /// kernel may flush those pages at any time; a power cut during that flush can leave a page
    /// torn on disk. Recovery replays from the checkpoint, and a diff only repairs the bytes it
    /// covers. A full image first makes replay independent of what the heap file holds for that
    /// page. The image is the heap file's current page (everything before this group is written
    /// back) with the record's entries applied; later touches in the same group or after it are
    /// diffs against a page that replay has already rebuilt whole.
    fn add_full_images(&mut self, group: &mut [QueuedRecord]) -> Result<(), String> {
        // Negative control (`mutations` builds only): leave every first change a diff.
        if mutations::is_on(Mutation::SkipFullPageImage) {
            return Ok(());
        }
        let mut image = vec![0u8; PAGE_SIZE];
        for r in group.iter_mut() {
            let entries = log_format::decode_entries(&r.payload, r.entry_count, self.heap_size_bytes)
                .map_err(|e| format!("internal: a record we built does not decode: {e}"))?;
            let needs_image = |e: &log_format::Entry<'_>| !self.full_image_logged.get(e.offset / PAGE_SIZE as u64);
            if !entries.iter().any(needs_image) {
                continue;
            }
            let mut payload = Vec::with_capacity(r.payload.len() + PAGE_SIZE);
            let mut entry_count = 0u32;
            let mut i = 0;
            while i < entries.len() {
                let page = entries[i].offset / PAGE_SIZE as u64;
                let end = entries[i..]
                    .iter()
                    .position(|e| e.offset / PAGE_SIZE as u64 != page)
                    .map_or(entries.len(), |n| i + n);
                if self.full_image_logged.get(page) {
                    for e in &entries[i..end] {
                        log_format::push_entry(&mut payload, e.offset, e.data);
                        entry_count += 1;
                    }
                } else {
                    let page_offset = page * PAGE_SIZE as u64;
                    crate::images::lock(&self.images).read(&*self.heap_file, page, &mut image).map_err(|err| {
                        format!("{}: reading a page to log it whole: {err}", self.heap_path.display())
                    })?;
                    for e in &entries[i..end] {
                        let at = (e.offset - page_offset) as usize;
                        image[at..at + e.data.len()].copy_from_slice(e.data);
                    }
                    log_format::push_entry(&mut payload, page_offset, &image);
                    entry_count += 1;
                    self.full_image_logged.set(page);
                    self.shared.lock().stats.full_images_after_checkpoint += 1;
                }
                i = end;
            }
            r.payload = payload;
            r.entry_count = entry_count;
        }
        Ok(())
    }

    /// Apply a durable group's entries to the committed images (see `images.rs`); write the
    /// images into the heap file (page cache; checkpoints sync it) when there are too many.
    fn write_back(&self, group: &[QueuedRecord]) -> Result<(), String> {
        let over_budget = {
            let mut images = crate::images::lock(&self.images);
            for r in group {
                let entries = log_format::decode_entries(&r.payload, r.entry_count, u64::MAX)
                    .map_err(|e| format!("internal: a record we built does not decode: {e}"))?;
                images.apply(&*self.heap_file, &entries).map_err(|err| {
                    format!("{}: reading a page to apply committed bytes to it: {err}", self.heap_path.display())
                })?;
            }
            images.over_budget()
        };
        if over_budget {
            crate::images::flush_all(&self.images, &*self.heap_file).map_err(|err| {
                format!("{}: writing committed pages into the heap file: {err}", self.heap_path.display())
            })?;
        }
        Ok(())
    }

    /// Grow the heap to `new_size` bytes, failure-atomically: extend the heap file with its disk
    /// space reserved and make that durable, then write a superblock naming the new size (same
    /// tail, same epoch) with one durable write. A crash before that write leaves the old size
    /// and a longer file (harmless); after it, the new size over a file that already holds it.
    /// Runs with no record in flight (the caller drained them), so nothing else writes the log.
    /// A full disk fails the first step and changes nothing; a failed superblock write fails
    /// the heap (the slot's content is then unknown).
    pub(crate) fn grow(&mut self, new_size: u64) -> crate::Result<()> {
        assert!(new_size >= self.heap_size_bytes && new_size % PAGE_SIZE as u64 == 0);
        let heap_path = self.heap_path.clone();
        let heap_err = |what: &'static str| {
            let heap_path = heap_path.clone();
            move |e: std::io::Error| Error::io(heap_path, what, e)
        };
        self.heap_file.reserve(HEADER_BYTES + new_size).map_err(heap_err("reserving disk space to grow the heap"))?;
        self.heap_file.sync_data().map_err(heap_err("fdatasync of the grown heap file"))?;
        let mut sb = self.superblock;
        sb.sequence += 1;
        sb.heap_size = new_size;
        if !sb.counters_writable() {
            return Err(Error::CorruptSuperblock {
                path: self.log_path.clone(),
                reason: format!("its counters are at their limit ({sb:?})"),
            });
        }
        if let Err(e) = write_superblock(self.dev.as_mut(), &sb) {
            let reason = format!("{}: writing the superblock of the grown heap: {e}", self.log_path.display());
            self.shared.fail(reason.clone());
            return Err(Error::io(&self.log_path, "writing the superblock of the grown heap", e));
        }
        self.superblock = sb;
        self.heap_size_bytes = new_size;
        self.full_image_logged.grow(new_size / PAGE_SIZE as u64);
        self.shared.lock().io = self.dev.stats();
        Ok(())
    }

    /// Write a superblock whose written limit covers a group ending `group_end_bytes` past the
    /// tail, and wait until it is durable: only then may the group be written.
    fn raise_written_limit(&mut self, group_end_bytes: u64, group_bytes: u64) -> Result<(), String> {
        let mut sb = self.superblock;
        sb.sequence += 1;
        sb.written_limit_bytes = sb.raised_written_limit(group_end_bytes, group_bytes);
        assert!(sb.written_limit_bytes >= group_end_bytes, "a group never runs past the tail (checkpoint first)");
        if !sb.counters_writable() {
            return Err(format!("{}: the log's counters are at their limit ({sb:?})", self.log_path.display()));
        }
        write_superblock(self.dev.as_mut(), &sb)
            .map_err(|e| format!("{}: writing the superblock to raise its written limit: {e}", self.log_path.display()))?;
        self.superblock = sb;
        let mut st = self.shared.lock();
        st.stats.written_limit_raises += 1;
        st.io = self.dev.stats();
        Ok(())
    }
}

/// Builds a record payload from dirty pages: changed runs, or whole pages when that is smaller.
pub(crate) struct PayloadBuilder {
    pub payload: Vec<u8>,
    pub entry_count: u32,
    /// Bytes that differ from the committed image (whole pages count fully).
    pub bytes_changed: u64,
    pub full_pages: u64,
    pub diffed_pages: u64,
    /// Scratch for `add_diff`: the changed word ranges of the page being compared.
    runs: Vec<(usize, usize)>,
}

/// Runs of changed 8-byte words closer than this are logged as one entry: a separate entry
/// costs its 16-byte header.
const MERGE_GAP_WORDS: usize = 2;

impl PayloadBuilder {
    pub fn new() -> PayloadBuilder {
        PayloadBuilder { payload: Vec::new(), entry_count: 0, bytes_changed: 0, full_pages: 0, diffed_pages: 0, runs: Vec::new() }
    }

    pub fn add_full_page(&mut self, page_offset: u64, current: &[u8]) {
        log_format::push_entry(&mut self.payload, page_offset, current);
        self.entry_count += 1;
        self.bytes_changed += current.len() as u64;
        self.full_pages += 1;
    }

    /// Log the differences between `current` and `committed` (one page each).
    ///
    /// Equal 64-byte blocks are skipped with one comparison each (most of a page is usually
    /// unchanged); only a block that differs is looked at word by word.
    pub fn add_diff(&mut self, page_offset: u64, current: &[u8], committed: &[u8]) {
        const WORD_BYTES: usize = 8;
        const BLOCK_BYTES: usize = 64;
        debug_assert_eq!(current.len(), committed.len());
        debug_assert_eq!(current.len() % BLOCK_BYTES, 0);
        let word = |b: &[u8], i: usize| {
            u64::from_ne_bytes(b[i * WORD_BYTES..(i + 1) * WORD_BYTES].try_into().expect("8 bytes"))
        };
        let runs = &mut self.runs; // word ranges [start, end)
        runs.clear();
        let mut changed = 0u64;
        let blocks = current.chunks_exact(BLOCK_BYTES).zip(committed.chunks_exact(BLOCK_BYTES));
        for (block, (cur, old)) in blocks.enumerate() {
            let cur: &[u8; BLOCK_BYTES] = cur.try_into().expect("a 64-byte block");
            let old: &[u8; BLOCK_BYTES] = old.try_into().expect("a 64-byte block");
            // Fixed bounds: the compiler turns this into a few vector instructions, where a slice
            // comparison calls memcmp once per block.
            let differs = (0..BLOCK_BYTES / WORD_BYTES).fold(0u64, |acc, w| acc | (word(cur, w) ^ word(old, w)));
            if differs == 0 {
                continue;
            }
            for w in 0..BLOCK_BYTES / WORD_BYTES {
                let x = word(cur, w) ^ word(old, w);
                if x == 0 {
                    continue;
                }
                let i = block * (BLOCK_BYTES / WORD_BYTES) + w;
                changed += (x.to_ne_bytes().iter().filter(|&&b| b != 0).count()) as u64;
                match runs.last_mut() {
                    Some(last) if i - last.1 <= MERGE_GAP_WORDS => last.1 = i + 1,
                    _ => runs.push((i, i + 1)),
                }
            }
        }
        if runs.is_empty() {
            return;
        }
        let encoded: usize = runs.iter().map(|&(s, e)| log_format::entry_encoded_len((e - s) * WORD_BYTES)).sum();
        if encoded >= log_format::entry_encoded_len(current.len()) {
            self.add_full_page(page_offset, current);
            self.bytes_changed -= current.len() as u64;
            self.bytes_changed += changed;
            return;
        }
        for &(s, e) in self.runs.iter() {
            log_format::push_entry(&mut self.payload, page_offset + (s * WORD_BYTES) as u64, &current[s * WORD_BYTES..e * WORD_BYTES]);
            self.entry_count += 1;
        }
        self.bytes_changed += changed;
        self.diffed_pages += 1;
    }

    /// Pages with at least one entry.
    pub fn pages_logged(&self) -> u32 {
        (self.full_pages + self.diffed_pages) as u32
    }

    pub fn record_bytes(&self) -> u64 {
        log_format::round_up_block((RECORD_HEADER_BYTES + self.payload.len()) as u64)
    }
}

pub(crate) fn poisoned(path: &std::path::Path, reason: &str) -> Error {
    Error::Poisoned { path: path.into(), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(payload: &[u8], count: u32, page: &mut [u8]) {
        for e in log_format::decode_entries(payload, count, 4096).unwrap() {
            page[e.offset as usize..e.offset as usize + e.data.len()].copy_from_slice(e.data);
        }
    }

    #[test]
    fn diff_logs_only_changes_and_reproduces_the_page() {
        let committed = vec![0u8; 4096];
        let mut current = committed.clone();
        current[5] = 1;
        current[17] = 2; // merged with the first run (gap of one word)
        current[3000] = 3;
        let mut b = PayloadBuilder::new();
        b.add_diff(0, &current, &committed);
        assert_eq!(b.entry_count, 2);
        assert_eq!(b.bytes_changed, 3);
        assert!(b.payload.len() < 100);
        let mut page = committed.clone();
        apply(&b.payload, b.entry_count, &mut page);
        assert_eq!(page, current);
    }

    #[test]
    fn unchanged_page_logs_nothing_and_scattered_changes_log_the_page() {
        let committed = vec![9u8; 4096];
        let mut b = PayloadBuilder::new();
        b.add_diff(0, &committed, &committed);
        assert_eq!(b.entry_count, 0);
        let mut current = committed.clone();
        for i in (0..4096).step_by(8) {
            current[i] = 0; // every word changed: one run as long as the page
        }
        b.add_diff(0, &current, &committed);
        assert_eq!(b.entry_count, 1);
        assert_eq!(b.full_pages, 1);
        assert_eq!(b.bytes_changed, 512);
        let mut page = committed.clone();
        apply(&b.payload, b.entry_count, &mut page);
        assert_eq!(page, current);
    }
}
