//! A simulated machine for crash tests: two disks (the log and the heap file) with volatile write
//! caches, and a power switch.
//!
//! The model is the one the most trusted storage systems test against (SQLite's crash-test layer,
//! FoundationDB's non-durable files): a write goes into the disk's volatile cache; a flush makes
//! every cached write durable; a durable write (`RWF_DSYNC`/FUA) is a write plus a flush. When the
//! power is cut, each write still in the cache is independently **kept**, **dropped**, or **torn**:
//! each 512-byte sector it touches ends up old, new, or garbage. Everything is decided by a
//! seeded generator, so a seed replays the same outcomes for the same sequence of operations.
//!
//! The power is cut *during* the Nth mutating operation counted across both disks: that
//! operation's writes are in the cache when the lights go out, and it and everything after it
//! fail with an error, as I/O to a dead disk would. Reads never count. The operations ([`OpKind`])
//! follow the real log's two flush modes ([`FlushMode`], chosen by the heap's options as in
//! production):
//!
//! * **Dsync**: a log write is one operation — every segment into the cache, then durable (FUA).
//!   A cut during it catches all its segments in the cache, each kept, dropped or torn on its own
//!   (which covers segments the device had not started).
//! * **Fdatasync**: each segment write (`pwrite`) is its own operation, and so is the
//!   `fdatasync` after them: a cut can land after some segments reached the cache and before the
//!   others were issued (a partial write), or after all of them and before the flush.
//!
//! The heap file's writes and its `fdatasync` are separate operations too. A **short write** can
//! be injected ([`SimMachine::short_write_at`]): one log write request puts only a prefix of its
//! segment (whole sectors, maybe none) in the cache and the call fails, without a flush — what the
//! real log does when `pwritev2` or an io_uring write returns fewer bytes than asked (it reports
//! an error: see `io/sync.rs`, `io/uring.rs`). [`SimMachine::trace_ops`] records the kinds of the
//! operations as they run, so a caller can count an operation sequence with the power on and then
//! cut the same sequence at a chosen operation of a chosen kind.
//!
//! Plugging in: [`SimStorage`] implements [`crate::storage::Storage`], so
//! [`crate::Heap::open_on`] runs the unchanged heap over it. The heap's mapping still needs a real
//! file: the simulated heap store keeps the production store, [`RealHeapFile`], inside it and
//! passes reads and writes to it — so committed images are read through the same read-only
//! shared mapping as in production, and the heap's mapping sees committed bytes as usual — and
//! keeps, beside it, what would be on the platter. After a cut, [`SimMachine::reboot`] writes the
//! surviving image back into the real file, the equivalent of the machine coming back up.

pub mod cluster;

use crate::io::{FlushMode, IoPath, IoStats, LogDevice, LogKind, LogOpenOptions};
use crate::storage::{HeapStore, RealHeapFile, Storage};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub const SECTOR_BYTES: usize = 512;

/// splitmix64: small, seedable, good enough to choose outcomes.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x5eed_5eed_5eed_5eed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

thread_local! {
    /// See [`seed_randomness`].
    static SEEDED_RANDOMNESS: std::cell::RefCell<Option<SimRng>> = const { std::cell::RefCell::new(None) };
}

/// Make the randomness the library draws on this thread — the hash keys of new persistent hash
/// maps ([`crate::alloc::FixedState::random`]) — come from a generator seeded with `seed`
/// instead of the kernel, until called with `None`. A simulation calls it so that a seed
/// replays the same heap layout, hence the same log records and the same I/O operations (which
/// its power cuts count). Never for production heaps: the keys are then predictable.
pub fn seed_randomness(seed: Option<u64>) {
    SEEDED_RANDOMNESS.with(|r| *r.borrow_mut() = seed.map(|s| SimRng::new(s ^ 0x7261_6e64_6f6d)));
}

/// Bytes from the seeded generator of this thread, if [`seed_randomness`] set one.
pub(crate) fn seeded_random_bytes(buf: &mut [u8]) -> bool {
    SEEDED_RANDOMNESS.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => {
            for chunk in buf.chunks_mut(8) {
                let v = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
            true
        }
        None => false,
    })
}

/// One disk: what is on stable media, and the writes still in its volatile cache, in order.
#[derive(Clone, Debug)]
pub struct SimDisk {
    pub durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl SimDisk {
    pub fn new(image: Vec<u8>) -> SimDisk {
        SimDisk { durable: image, pending: Vec::new() }
    }

    fn check_range(&self, offset: u64, len: usize) -> std::io::Result<()> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.durable.len() as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("simulated disk: {len} bytes at {offset} run past its end ({})", self.durable.len()),
            ));
        }
        Ok(())
    }

    /// What a read sees: stable media overlaid with the cache.
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let at = offset as usize;
        buf.copy_from_slice(&self.durable[at..at + buf.len()]);
        for (o, data) in &self.pending {
            let (s, e) = (*o as usize, *o as usize + data.len());
            let (lo, hi) = (s.max(at), e.min(at + buf.len()));
            if lo < hi {
                buf[lo - at..hi - at].copy_from_slice(&data[lo - s..hi - s]);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A write of nothing (a short write that wrote no sector) leaves nothing to keep or tear.
        if !data.is_empty() {
            self.pending.push((offset, data.to_vec()));
        }
    }

    /// Grow the disk's image (a file extended with its space reserved) to `len` bytes of zeros.
    /// The new length is modelled as durable at once: a cut that loses it leaves a file too
    /// short only for a size that no superblock names yet, since growing writes the superblock
    /// after the next flush (the real-kernel tests cover the length itself).
    fn extend(&mut self, len: u64) {
        if self.durable.len() < len as usize {
            self.durable.resize(len as usize, 0);
        }
    }

    fn flush(&mut self) {
        for (o, data) in std::mem::take(&mut self.pending) {
            self.durable[o as usize..o as usize + data.len()].copy_from_slice(&data);
        }
    }

    /// Power cut: each cached write is kept, dropped or torn per sector.
    fn cut(&mut self, rng: &mut SimRng, outcome: &mut CutOutcome) {
        for (o, data) in std::mem::take(&mut self.pending) {
            let (start, end) = (o as usize, o as usize + data.len());
            match rng.below(3) {
                0 => {
                    self.durable[start..end].copy_from_slice(&data);
                    outcome.writes_kept += 1;
                }
                1 => outcome.writes_dropped += 1,
                _ => {
                    outcome.writes_torn += 1;
                    let first = start / SECTOR_BYTES;
                    let last = (end - 1) / SECTOR_BYTES;
                    for sector in first..=last {
                        let (s0, s1) = (sector * SECTOR_BYTES, (sector + 1) * SECTOR_BYTES);
                        match rng.below(3) {
                            0 => {} // old
                            1 => {
                                let (lo, hi) = (s0.max(start), s1.min(end));
                                self.durable[lo..hi].copy_from_slice(&data[lo - start..hi - start]);
                            }
                            _ => {
                                // The device was writing this sector when the power went: its
                                // whole content is undefined.
                                let hi = s1.min(self.durable.len());
                                for b in &mut self.durable[s0..hi] {
                                    *b = rng.next_u64() as u8;
                                }
                                outcome.garbage_sectors += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a power cut did to the cached writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutOutcome {
    pub writes_kept: u64,
    pub writes_dropped: u64,
    pub writes_torn: u64,
    pub garbage_sectors: u64,
    /// The operation the cut landed in; None for a cut between operations
    /// ([`SimMachine::cut_power_now`], or a reboot with the power still on).
    pub during: Option<OpKind>,
}

/// A mutating operation, as the machine counts them (reads never count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A log write in [`FlushMode::Dsync`]: every segment into the cache, then durable (FUA) —
    /// one operation, so a cut catches all its segments in the cache.
    LogDurableWrite,
    /// One segment of a log write in [`FlushMode::Fdatasync`] (a `pwrite`): into the cache only.
    LogWrite,
    /// The `fdatasync` ending a [`FlushMode::Fdatasync`] log write.
    LogFlush,
    /// A write into the heap file.
    HeapWrite,
    /// The heap file's `fdatasync`.
    HeapSync,
}

impl OpKind {
    /// An operation on the log (a write or a flush), not on the heap file.
    pub fn is_log(self) -> bool {
        matches!(self, OpKind::LogDurableWrite | OpKind::LogWrite | OpKind::LogFlush)
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::LogDurableWrite => "log-durable-write",
            OpKind::LogWrite => "log-write",
            OpKind::LogFlush => "log-flush",
            OpKind::HeapWrite => "heap-write",
            OpKind::HeapSync => "heap-sync",
        }
    }
}

#[derive(Debug)]
struct Machine {
    log: SimDisk,
    heap: SimDisk,
    rng: SimRng,
    /// Mutating operations so far in this power cycle.
    ops: u64,
    cut_at: Option<u64>,
    /// Log operations ([`OpKind::is_log`]) so far in this power cycle.
    log_ops: u64,
    /// Cut the power during this log operation (counted in `log_ops`).
    cut_at_log_op: Option<u64>,
    powered: bool,
    last_cut: Option<CutOutcome>,
    log_stats: IoStats,
    /// The kinds of the mutating operations since [`SimMachine::trace_ops`], if tracing.
    trace: Option<Vec<OpKind>>,
    /// The first log write request at or after this operation number is short.
    short_write_at: Option<u64>,
    /// Short writes injected since the machine was made.
    short_writes: u64,
}

/// The simulated machine: both disks and the power switch, shared by the devices handed out.
#[derive(Clone, Debug)]
pub struct SimMachine {
    inner: Arc<Mutex<Machine>>,
}

fn powered_off() -> std::io::Error {
    std::io::Error::other("simulated power cut: the disk is gone")
}

impl SimMachine {
    /// A machine whose disks hold these images (e.g. a freshly formatted heap file and log).
    pub fn new(log_image: Vec<u8>, heap_image: Vec<u8>, seed: u64) -> SimMachine {
        SimMachine {
            inner: Arc::new(Mutex::new(Machine {
                log: SimDisk::new(log_image),
                heap: SimDisk::new(heap_image),
                rng: SimRng::new(seed),
                ops: 0,
                cut_at: None,
                log_ops: 0,
                cut_at_log_op: None,
                powered: true,
                last_cut: None,
                log_stats: IoStats::default(),
                trace: None,
                short_write_at: None,
                short_writes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cut the power during the `n`th mutating operation from now (1 = the next one); None
    /// leaves the power on.
    pub fn cut_power_at(&self, n: Option<u64>) {
        let mut m = self.lock();
        m.cut_at = n.map(|n| m.ops + n.max(1));
    }

    /// Cut the power during the `n`th operation on the log from now (1 = the next one: a write
    /// or a flush, [`OpKind::is_log`]), whatever comes between; None cancels. Aims a cut at the
    /// window where a commit's record is on its way, which the heap file's write-backs would
    /// otherwise outnumber. A reboot cancels it.
    pub fn cut_power_at_log_op(&self, n: Option<u64>) {
        let mut m = self.lock();
        m.cut_at_log_op = n.map(|n| m.log_ops + n.max(1));
    }

    /// Make the first log write request at or after the `n`th mutating operation from now (1 =
    /// the next one) *short*: it puts only a prefix of its segment (whole 512-byte sectors, maybe
    /// none) into the cache and fails, as a `pwritev2` or io_uring write returning fewer bytes
    /// than asked does on the real log (which reports that as an error: see `io/sync.rs` and
    /// `io/uring.rs`). Nothing of that log write is flushed. None cancels; a reboot cancels too.
    pub fn short_write_at(&self, n: Option<u64>) {
        let mut m = self.lock();
        m.short_write_at = n.map(|n| m.ops + n.max(1));
    }

    /// Short writes injected so far (see [`SimMachine::short_write_at`]).
    pub fn short_writes(&self) -> u64 {
        self.lock().short_writes
    }

    /// Start recording the kind of every mutating operation, until [`SimMachine::take_trace`]:
    /// with the power on, this tells which operation a later cut at the same count would hit.
    pub fn trace_ops(&self) {
        self.lock().trace = Some(Vec::new());
    }

    /// The operations recorded since [`SimMachine::trace_ops`] (and stop recording).
    pub fn take_trace(&self) -> Vec<OpKind> {
        self.lock().trace.take().unwrap_or_default()
    }

    /// Cut the power now (between operations).
    pub fn cut_power_now(&self) {
        let mut m = self.lock();
        if m.powered {
            m.cut();
        }
    }

    /// Restart the generator that decides what a cut does to cached writes (for replays).
    pub fn reseed(&self, seed: u64) {
        self.lock().rng = SimRng::new(seed);
    }

    /// Mutating operations so far in this power cycle.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    pub fn powered(&self) -> bool {
        self.lock().powered
    }

    /// What the last power cut did, once (later calls return None until the next cut).
    pub fn take_last_cut(&self) -> Option<CutOutcome> {
        self.lock().last_cut.take()
    }

    /// Power back on: the caches are empty, the disks hold what survived. Writes the heap image
    /// into `heap_file` (the real file the heap maps), as a reboot would present it.
    pub fn reboot(&self, heap_file: &Path) -> std::io::Result<()> {
        let mut m = self.lock();
        if m.powered {
            m.cut();
        }
        m.log.pending.clear();
        m.heap.pending.clear();
        m.powered = true;
        m.ops = 0;
        m.cut_at = None;
        m.log_ops = 0;
        m.cut_at_log_op = None;
        m.short_write_at = None;
        let f = std::fs::OpenOptions::new().write(true).open(heap_file)?;
        f.write_all_at(&m.heap.durable, 0)?;
        // The file's length is the disk's too (a grown heap file, or one restored to before).
        f.set_len(m.heap.durable.len() as u64)?;
        Ok(())
    }

    /// Replace both disks' contents (a snapshot taken with [`SimMachine::images`]) and power on,
    /// writing the heap image into `heap_file` as [`SimMachine::reboot`] does.
    pub fn restore(&self, log_image: Vec<u8>, heap_image: Vec<u8>, heap_file: &Path) -> std::io::Result<()> {
        {
            let mut m = self.lock();
            m.log = SimDisk::new(log_image);
            m.heap = SimDisk::new(heap_image);
            m.powered = false;
        }
        self.reboot(heap_file)
    }

    /// The disks' current images (stable media only), for snapshots.
    pub fn images(&self) -> (Vec<u8>, Vec<u8>) {
        let m = self.lock();
        (m.log.durable.clone(), m.heap.durable.clone())
    }

    /// The log and heap-file images as a process sees them now, through the drives' caches: what
    /// a recovery replayed but did not sync (it leaves that to the first checkpoint) included.
    pub fn visible_images(&self) -> (Vec<u8>, Vec<u8>) {
        let m = self.lock();
        let mut log = vec![0u8; m.log.durable.len()];
        m.log.read(0, &mut log);
        let mut heap = vec![0u8; m.heap.durable.len()];
        m.heap.read(0, &mut heap);
        (log, heap)
    }
}

impl Machine {
    fn cut(&mut self) {
        let mut outcome = CutOutcome::default();
        let Machine { log, heap, rng, .. } = self;
        log.cut(rng, &mut outcome);
        heap.cut(rng, &mut outcome);
        self.powered = false;
        self.cut_at = None;
        self.cut_at_log_op = None;
        self.last_cut = Some(outcome);
    }

    /// Count a mutating operation; cut the power if this is the one. `apply` puts the
    /// operation's writes into the cache first, so a cut during it covers them.
    fn mutate(&mut self, kind: OpKind, apply: impl FnOnce(&mut Machine)) -> std::io::Result<()> {
        if !self.powered {
            return Err(powered_off());
        }
        self.ops += 1;
        if let Some(t) = &mut self.trace {
            t.push(kind);
        }
        if kind.is_log() {
            self.log_ops += 1;
        }
        let cut_now = self.cut_at == Some(self.ops) || (kind.is_log() && self.cut_at_log_op == Some(self.log_ops));
        apply(self);
        if cut_now {
            self.cut();
            if let Some(o) = &mut self.last_cut {
                o.during = Some(kind);
            }
            return Err(powered_off());
        }
        Ok(())
    }

    /// Whether the next operation, a log write request, is to be short (and disarm it).
    fn short_write_due(&mut self) -> bool {
        if self.powered && self.short_write_at.is_some_and(|n| self.ops + 1 >= n) {
            self.short_write_at = None;
            return true;
        }
        false
    }

    /// How much of a `len`-byte request a short write writes: whole sectors, fewer than asked.
    fn short_len(&mut self, len: usize) -> usize {
        let sectors = (len / SECTOR_BYTES) as u64;
        self.rng.below(sectors.max(1)) as usize * SECTOR_BYTES
    }
}

/// The error the real log returns for a short write (`io/sync.rs`, `io/uring.rs`).
fn short_write_error(path: &Path, wrote: usize, len: usize, offset: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::WriteZero,
        format!(
            "fams log {}: simulated write of {len} bytes at offset {offset} wrote only {wrote} bytes; the \
             device may be full, shrunk or failing",
            path.display()
        ),
    )
}

/// The log on the simulated machine, in either flush mode of the real log:
///
/// * [`FlushMode::Dsync`] (`RWF_DSYNC`, a FUA write on a block device): one operation puts every
///   segment into the cache and then makes them durable; a cut during it catches all of them in
///   the cache (each then kept, dropped or torn on its own — which covers segments the device
///   had not even started).
/// * [`FlushMode::Fdatasync`] (`pwrite` per segment, then `fdatasync`, what the real log does on
///   a log file when asked to): each segment write is its own operation and so is the flush, so
///   a cut can land after some segments reached the cache and before the rest were issued, or
///   after all of them and before the flush.
///
/// Either way a short write ([`SimMachine::short_write_at`]) fails the call after caching a
/// prefix of one segment, without flushing.
pub struct SimLog {
    machine: SimMachine,
    path: PathBuf,
    size_bytes: u64,
    flush: FlushMode,
}

/// A read of the simulated log (reads are not operations: they never count toward a cut).
fn read_log(machine: &SimMachine, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut m = machine.lock();
    if !m.powered {
        return Err(powered_off());
    }
    m.log.check_range(offset, buf.len())?;
    m.log.read(offset, buf);
    m.log_stats.reads += 1;
    m.log_stats.bytes_read += buf.len() as u64;
    Ok(())
}

/// The simulated log read from another thread (recovery's read-ahead).
struct SimLogReader(SimMachine);

impl crate::io::LogRead for SimLogReader {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        read_log(&self.0, offset, buf)
    }
}

impl LogDevice for SimLog {
    fn path(&self) -> &Path {
        &self.path
    }
    fn kind(&self) -> LogKind {
        LogKind::File
    }
    fn io_path(&self) -> IoPath {
        IoPath::Sync
    }
    fn flush_mode(&self) -> FlushMode {
        self.flush
    }
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn fallback_reason(&self) -> Option<&str> {
        Some("simulated device")
    }

    fn write_durable(&mut self, segments: &[(u64, &[u8])]) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        for (o, data) in segments {
            m.log.check_range(*o, data.len())?;
        }
        // As on the real log: empty segments are skipped, and with no bytes nothing is flushed.
        let segments: Vec<(u64, &[u8])> = segments.iter().copied().filter(|(_, d)| !d.is_empty()).collect();
        if segments.is_empty() {
            return Ok(());
        }
        let fdatasync = self.flush == FlushMode::Fdatasync;
        match self.flush {
            FlushMode::Dsync => {
                // The writes go into the cache, then the flush (FUA) makes them durable; a cut
                // during this operation catches them in the cache.
                let short = m.short_write_due().then(|| m.rng.below(segments.len() as u64) as usize);
                let short_len = short.map(|i| m.short_len(segments[i].1.len()));
                m.mutate(OpKind::LogDurableWrite, |m| {
                    for (i, (o, data)) in segments.iter().enumerate() {
                        let n = if short == Some(i) { short_len.unwrap_or(0) } else { data.len() };
                        m.log.write(*o, &data[..n]);
                        if short != Some(i) {
                            m.log_stats.writes += 1;
                            m.log_stats.bytes_written += n as u64;
                            m.log_stats.dsync_writes += 1;
                        }
                    }
                })?;
                if let (Some(i), Some(n)) = (short, short_len) {
                    // The call failed: nothing of it is promised durable, so nothing is flushed
                    // (the segments wait in the cache for the next flush or the cut).
                    m.short_writes += 1;
                    return Err(short_write_error(&self.path, n, segments[i].1.len(), segments[i].0));
                }
            }
            FlushMode::Fdatasync => {
                // One operation per segment write, then the flush: a cut can fall anywhere
                // between the first write and the flush's end.
                for (o, data) in &segments {
                    let short = m.short_write_due();
                    let n = if short { m.short_len(data.len()) } else { data.len() };
                    m.mutate(OpKind::LogWrite, |m| {
                        m.log.write(*o, &data[..n]);
                        if !short {
                            m.log_stats.writes += 1;
                            m.log_stats.bytes_written += n as u64;
                        }
                    })?;
                    if short {
                        // The real log stops at a short write and never issues the flush.
                        m.short_writes += 1;
                        return Err(short_write_error(&self.path, n, data.len(), *o));
                    }
                }
                m.mutate(OpKind::LogFlush, |_| {})?;
            }
        }
        // The mutation `drive-ignores-flushes` (`mutations` builds only) makes this a drive that
        // acknowledges the flush without doing it: the writes stay in the volatile cache.
        if !crate::mutations::is_on(crate::mutations::Mutation::DriveIgnoresFlushes) {
            m.log.flush();
        }
        if fdatasync {
            m.log_stats.fdatasyncs += 1;
        }
        Ok(())
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        read_log(&self.machine, offset, buf)
    }

    fn reader(&self) -> Option<Box<dyn crate::io::LogRead>> {
        Some(Box::new(SimLogReader(self.machine.clone())))
    }

    fn stats(&self) -> IoStats {
        self.machine.lock().log_stats
    }
}

/// The heap file on the simulated machine. Reads and writes go to the real heap file through
/// the production heap store, [`RealHeapFile`] — so committed images are read through the same
/// read-only shared mapping as in production, and the heap's own mapping sees committed bytes as
/// usual — while the simulated disk remembers what would survive a cut. Its flush is the
/// simulated disk's: the real file's durability plays no part in the simulation.
pub struct SimHeapFile {
    machine: SimMachine,
    real: RealHeapFile,
}

impl HeapStore for SimHeapFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let m = self.machine.lock();
        if !m.powered {
            return Err(powered_off());
        }
        m.heap.check_range(offset, buf.len())?;
        drop(m);
        self.real.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        m.heap.check_range(offset, data.len())?;
        m.mutate(OpKind::HeapWrite, |m| m.heap.write(offset, data))?;
        self.real.write_all_at(data, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        m.mutate(OpKind::HeapSync, |_| {})?;
        m.heap.flush();
        Ok(())
    }

    /// Growing the file counts as a heap write (the model makes the new length durable at
    /// once: see `SimDisk::extend`).
    fn reserve(&self, len_total: u64) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        m.mutate(OpKind::HeapWrite, |m| m.heap.extend(len_total))?;
        self.real.reserve(len_total)
    }
}

/// [`Storage`] on the simulated machine.
pub struct SimStorage {
    pub machine: SimMachine,
}

impl Storage for SimStorage {
    /// The simulated log, in the flush mode asked for (default [`FlushMode::Dsync`], as
    /// [`crate::io::open_log`]); the I/O path is not simulated.
    fn log(&mut self, path: &Path, opts: &LogOpenOptions) -> std::io::Result<Box<dyn LogDevice>> {
        let size_bytes = self.machine.lock().log.durable.len() as u64;
        let flush = opts.flush_mode.unwrap_or(FlushMode::Dsync);
        Ok(Box::new(SimLog { machine: self.machine.clone(), path: path.into(), size_bytes, flush }))
    }
    fn heap(&mut self, file: Arc<File>, len_max: u64) -> Arc<dyn HeapStore> {
        Arc::new(SimHeapFile { machine: self.machine.clone(), real: RealHeapFile::new(file, len_max) })
    }
}

/// A heap formatted onto a simulated machine: the real heap file its mapping needs, and the
/// machine holding both disks, which start as the freshly formatted images. The power-loss
/// explorer and the turn manager's crash tests build on it: open, cut the power, [`reboot`],
/// open again (recovering whatever survived), or [`reset`] to start over.
///
/// [`reboot`]: SimHeap::reboot
/// [`reset`]: SimHeap::reset
pub struct SimHeap {
    pub heap_path: PathBuf,
    pub machine: SimMachine,
    formatted: (Vec<u8>, Vec<u8>),
}

impl SimHeap {
    /// Format a heap of `heap_size_bytes` at `heap_path` with a log of `log_size_bytes` beside it
    /// (`<heap>.log`, replacing any files there), and put both images on a new machine whose
    /// cut outcomes are seeded with `seed`. From then on the machine holds the log; the real log
    /// file is only what formatting left.
    pub fn format(heap_path: &Path, heap_size_bytes: u64, log_size_bytes: u64, seed: u64) -> crate::Result<SimHeap> {
        let mut f = crate::FormatOptions::new(heap_path, heap_size_bytes);
        f.log_size_bytes = Some(log_size_bytes);
        SimHeap::format_with(&f, seed)
    }

    /// [`SimHeap::format`] with any format options (a growable heap, say); the log is always
    /// `<heap>.log` beside the heap file.
    pub fn format_with(opts: &crate::FormatOptions, seed: u64) -> crate::Result<SimHeap> {
        let heap_path = opts.heap_path.as_path();
        let mut log_path = heap_path.as_os_str().to_owned();
        log_path.push(".log");
        let log_path = PathBuf::from(log_path);
        let _ = std::fs::remove_file(heap_path);
        let _ = std::fs::remove_file(&log_path);
        let mut f = opts.clone();
        f.log_path = Some(log_path.clone());
        // The simulated log has no I/O path to choose (and a flush mode per open): measuring
        // the real file it starts from would only cost time.
        f.io_path = f.io_path.or(Some(crate::io::IoPath::Sync));
        f.flush_mode = f.flush_mode.or(Some(crate::io::FlushMode::Dsync));
        crate::Heap::format(&f)?;
        let read = |p: &Path| std::fs::read(p).map_err(|e| crate::Error::io(p, "reading the formatted image", e));
        let (log_image, heap_image) = (read(&log_path)?, read(heap_path)?);
        let machine = SimMachine::new(log_image.clone(), heap_image.clone(), seed);
        Ok(SimHeap { heap_path: heap_path.to_path_buf(), machine, formatted: (log_image, heap_image) })
    }

    /// Open the heap on the machine: [`crate::Heap::open_on`] over a [`SimStorage`].
    pub fn open(&self, opts: &crate::HeapOptions) -> crate::Result<crate::Heap> {
        let mut storage = SimStorage { machine: self.machine.clone() };
        crate::Heap::open_on(&self.heap_path, opts, &mut storage)
    }

    /// Power back on after a cut (cutting it first if it is still on): see [`SimMachine::reboot`].
    /// Drop (or abandon) the heap opened before first.
    pub fn reboot(&self) -> std::io::Result<()> {
        self.machine.reboot(&self.heap_path)
    }

    /// Back to the freshly formatted images, powered on.
    pub fn reset(&self) -> std::io::Result<()> {
        let (log_image, heap_image) = self.formatted.clone();
        self.machine.restore(log_image, heap_image, &self.heap_path)
    }
}

/// The heap file held entirely by the simulated machine (no real file, no mapping): for running
/// recovery on images alone.
pub struct SimMemHeap {
    machine: SimMachine,
}

impl HeapStore for SimMemHeap {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let m = self.machine.lock();
        if !m.powered {
            return Err(powered_off());
        }
        m.heap.check_range(offset, buf.len())?;
        m.heap.read(offset, buf);
        Ok(())
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        m.heap.check_range(offset, data.len())?;
        m.mutate(OpKind::HeapWrite, |m| m.heap.write(offset, data))
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut m = self.machine.lock();
        m.mutate(OpKind::HeapSync, |_| {})?;
        m.heap.flush();
        Ok(())
    }
    fn reserve(&self, len_total: u64) -> std::io::Result<()> {
        self.machine.lock().mutate(OpKind::HeapWrite, |m| m.heap.extend(len_total))
    }
}

/// Run recovery on a log image and a heap-file image, in memory: what opening a heap with these
/// files would do, without files, locks or a mapping. Returns the result and the images after it
/// as the opened heap would see them (the heap file with the replayed records, synced or still
/// in its cache; the log with its new superblock). Used by the fuzz
/// targets and the property tests; any bytes at all may be passed.
pub fn recover_images(
    log_image: Vec<u8>,
    heap_file_image: Vec<u8>,
    salvage: bool,
) -> (crate::Result<crate::RecoveryReport>, Vec<u8>, Vec<u8>) {
    let path = Path::new("<in-memory heap>");
    let header = match crate::heap_file::HeapHeader::decode(&heap_file_image) {
        Ok(h) => h,
        Err(reason) => return (Err(crate::Error::NotAHeap { path: path.into(), reason }), heap_file_image, log_image),
    };
    if (heap_file_image.len() as u64) < crate::heap_file::HEADER_BYTES + header.heap_size {
        let reason = "the heap image is shorter than its header says".to_string();
        return (Err(crate::Error::BadHeap { path: path.into(), reason }), heap_file_image, log_image);
    }
    let log_len = log_image.len() / crate::io::LOG_ALIGN * crate::io::LOG_ALIGN;
    let mut log_image = log_image;
    log_image.truncate(log_len);
    let machine = SimMachine::new(log_image, heap_file_image, 0);
    let mut log = SimLog {
        machine: machine.clone(),
        path: PathBuf::from("<in-memory log>"),
        size_bytes: log_len as u64,
        flush: FlushMode::Dsync,
    };
    let heap = SimMemHeap { machine: machine.clone() };
    let result = crate::recovery::recover(
        &mut log,
        &PathBuf::from("<in-memory log>"),
        &heap,
        path,
        &header,
        crate::recovery::Mode::Replay { salvage },
        // Read ahead whatever the log's size: damaged logs go through that path too.
        Some(true),
    )
    .map(|r| r.report);
    let (log_after, heap_after) = machine.visible_images();
    (result, heap_after, log_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_writes_survive_and_unflushed_ones_follow_the_model() {
        let mut outcomes = CutOutcome::default();
        for seed in 0..200 {
            let mut d = SimDisk::new(vec![0u8; 4096]);
            d.write(0, &[1u8; 1024]);
            d.flush();
            d.write(1024, &[2u8; 2048]);
            let mut rng = SimRng::new(seed);
            let mut o = CutOutcome::default();
            d.cut(&mut rng, &mut o);
            assert_eq!(&d.durable[..1024], &[1u8; 1024][..], "flushed data lost (seed {seed})");
            assert!(d.durable[3072..].iter().all(|&b| b == 0), "bytes outside any write changed");
            // Every sector of the unflushed write is old, new or garbage; kept/dropped are whole.
            if o.writes_kept == 1 {
                assert!(d.durable[1024..3072].iter().all(|&b| b == 2));
            }
            if o.writes_dropped == 1 {
                assert!(d.durable[1024..3072].iter().all(|&b| b == 0));
            }
            outcomes.writes_kept += o.writes_kept;
            outcomes.writes_dropped += o.writes_dropped;
            outcomes.writes_torn += o.writes_torn;
            outcomes.garbage_sectors += o.garbage_sectors;
        }
        assert!(outcomes.writes_kept > 20 && outcomes.writes_dropped > 20 && outcomes.writes_torn > 20);
        assert!(outcomes.garbage_sectors > 20);
    }

    #[test]
    fn the_same_seed_gives_the_same_outcome() {
        let run = |seed| {
            let mut d = SimDisk::new(vec![0u8; 8192]);
            for i in 0..8u64 {
                d.write(i * 1000, &[i as u8 + 1; 700]);
            }
            d.cut(&mut SimRng::new(seed), &mut CutOutcome::default());
            d.durable
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn a_cut_during_a_durable_write_fails_it_and_everything_after() {
        let m = SimMachine::new(vec![0u8; 8192], vec![0u8; 8192], 1);
        let mut log = SimLog { machine: m.clone(), path: "sim".into(), size_bytes: 8192, flush: FlushMode::Dsync };
        log.write_durable(&[(0, &[7u8; 4096])]).unwrap();
        m.cut_power_at(Some(1));
        assert!(log.write_durable(&[(4096, &[8u8; 4096])]).is_err());
        assert!(!m.powered());
        let mut buf = [0u8; 16];
        assert!(log.read_exact_at(0, &mut buf).is_err(), "a dead disk cannot be read");
        let (log_image, _) = m.images();
        assert!(log_image[..4096].iter().all(|&b| b == 7), "a durable write survives a later cut");
    }

    fn log_on(m: &SimMachine, flush: FlushMode) -> SimLog {
        SimLog { machine: m.clone(), path: "sim".into(), size_bytes: 4 * 4096, flush }
    }

    #[test]
    fn an_fdatasync_write_is_cut_between_its_segments_and_before_its_flush() {
        let segments: [(u64, &[u8]); 3] = [(0, &[1u8; 4096]), (4096, &[2u8; 4096]), (8192, &[3u8; 4096])];
        // Three segment writes then the flush: four operations.
        let m = SimMachine::new(vec![0u8; 4 * 4096], vec![0u8; 4096], 1);
        m.trace_ops();
        log_on(&m, FlushMode::Fdatasync).write_durable(&segments).unwrap();
        use OpKind::*;
        assert_eq!(m.take_trace(), [LogWrite, LogWrite, LogWrite, LogFlush]);
        assert_eq!(m.images().0[..3 * 4096], [[1u8; 4096], [2; 4096], [3; 4096]].concat()[..]);

        let (mut third_written, mut first_lost, mut all_lost) = (0, 0, 0);
        for seed in 0..100 {
            // Cut during the second segment's write: the third was never issued.
            let m = SimMachine::new(vec![0u8; 4 * 4096], vec![0u8; 4096], seed);
            m.cut_power_at(Some(2));
            assert!(log_on(&m, FlushMode::Fdatasync).write_durable(&segments).is_err());
            assert_eq!(m.take_last_cut().and_then(|o| o.during), Some(LogWrite));
            let log = m.images().0;
            third_written += log[8192..12288].iter().any(|&b| b != 0) as u32;
            first_lost += log[..4096].iter().all(|&b| b == 0) as u32;
            // Cut during the flush: every segment is in the cache, none durable yet.
            let m = SimMachine::new(vec![0u8; 4 * 4096], vec![0u8; 4096], seed);
            m.cut_power_at(Some(4));
            assert!(log_on(&m, FlushMode::Fdatasync).write_durable(&segments).is_err());
            assert_eq!(m.take_last_cut().and_then(|o| o.during), Some(LogFlush));
            all_lost += m.images().0[..12288].iter().all(|&b| b == 0) as u32;
        }
        assert_eq!(third_written, 0, "a segment not yet issued reached the disk");
        assert!(first_lost > 0 && all_lost > 0, "unflushed segments always survived");
    }

    #[test]
    fn a_short_write_fails_the_call_and_caches_only_a_prefix() {
        for flush in [FlushMode::Dsync, FlushMode::Fdatasync] {
            let mut saw_partial = false;
            for seed in 0..50 {
                let m = SimMachine::new(vec![0u8; 4 * 4096], vec![0u8; 4096], seed);
                let mut log = log_on(&m, flush);
                m.short_write_at(Some(1));
                let segments: [(u64, &[u8]); 2] = [(0, &[1u8; 4096]), (4096, &[2u8; 4096])];
                let e = log.write_durable(&segments).unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::WriteZero, "{e}");
                assert_eq!(m.short_writes(), 1);
                assert!(m.powered(), "a short write is an error, not a power cut");
                // Nothing was flushed: with the power on, a read sees the cache; the platter is
                // untouched.
                assert!(m.images().0.iter().all(|&b| b == 0), "a failed write was flushed ({flush})");
                let mut buf = vec![0u8; 8192];
                log.read_exact_at(0, &mut buf).unwrap();
                let new = |r: &[u8], v: u8| r.iter().take_while(|&&b| b == v).count();
                let (a, b) = (new(&buf[..4096], 1), new(&buf[4096..], 2));
                assert!(a < 4096 || b < 4096, "no segment was short ({flush})");
                assert!(a % SECTOR_BYTES == 0 && b % SECTOR_BYTES == 0);
                saw_partial |= (a > 0 && a < 4096) || (b > 0 && b < 4096);
                // The next write is whole again, and durable.
                log.write_durable(&[(12288, &[9u8; 4096])]).unwrap();
                assert!(m.images().0[12288..].iter().all(|&b| b == 9));
            }
            assert!(saw_partial, "short writes never wrote a non-empty prefix ({flush})");
        }
    }
}
