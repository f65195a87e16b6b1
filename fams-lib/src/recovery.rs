//! The recovery path: bring the heap file up to the last durable commit before it is mapped.
//!
//! 1. Read both superblock slots; the valid one with the larger sequence number is current. It
//!    names the tail (offset and LSN) and the epoch.
//! 2. From the tail, read records in LSN order: the record with LSN `n` is at the current position,
//!    or at the start of the record area when the writer wrapped. Each record's header and payload
//!    checksums must match and its entries must lie inside the heap; its entries are written into
//!    the heap file. A thread of its own reads the log ahead meanwhile, in 1 MiB windows in ring
//!    order from the tail up to the written limit, so the device's reads overlap the replay's
//!    copying (`ReadAhead`); whatever it cannot serve is read directly, and its bytes are checked
//!    exactly like those.
//! 3. The first position that holds no valid record with the expected LSN is the end. What lies
//!    after it decides whether that end is honest: an intact record of this epoch from a *later*
//!    device write (its group started after the missing LSN) proves the missing record had been
//!    durable, so the log is damaged; we refuse to open rather than silently drop commits
//!    (`salvage` truncates there instead, saying what is lost). Intact records of the *same*
//!    group are a torn write from a power cut, which is expected. Only the superblock's written
//!    limit past the tail is looked at (see `log_format`): no record was ever written beyond it,
//!    so an open reads what it replays plus the rest of that limit, whatever the log's size.
//! 4. Write a new superblock with the next epoch. Only then may new records be written, so the
//!    new history can never be confused with leftovers of the old one. Usually it keeps the old
//!    tail and records where the replayed records end (`replayed_until_lsn`): the heap file is
//!    *not* synced here — its page cache holds the replayed bytes, the log still holds them
//!    durably, and the first checkpoint syncs the heap file and moves the tail past them. That
//!    takes the heap file's `fdatasync` (most of a recovery on a fast device) off the open. If
//!    the superblock already records such a stretch (an open that deferred was followed by a
//!    crash before any checkpoint), or when a salvage dropped records, this open syncs the heap file first and
//!    moves the tail to the end, as every open did before superblock version 4: only one
//!    stretch of the previous epoch is ever described. A crash anywhere in here is harmless:
//!    replay is idempotent and the old superblock still describes the log until the new one is
//!    durable.

use crate::error::{Error, Result};
use crate::heap_file::HeapHeader;
use crate::io::{AlignedBuf, LogDevice};
use crate::log_format::{self, HeaderProblem, RecordHeader, Superblock, BLOCK, RECORD_HEADER_BYTES};
use crate::mutations::{self, Mutation};
use crate::storage::{write_entries, HeapStore};
use std::path::Path;
use std::time::{Duration, Instant};

/// What the last open found in the log and did about it.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub records_replayed: u64,
    /// Heap bytes written back from those records.
    pub bytes_replayed: u64,
    pub log_bytes_read: u64,
    pub duration: Duration,
    /// LSN the next commit will get.
    pub next_lsn: u64,
    /// The heap's size after recovery (grown sizes are recorded in the log's superblock).
    pub heap_size_bytes: u64,
    /// Why replay stopped, when it was not simply the end of what was written.
    pub torn_tail: Option<String>,
    /// Set when `salvage` dropped (or, in a dry run, would drop) records after damage.
    pub salvaged: Option<String>,
}

/// The steps of a replaying recovery, in order. Crash tests watch for them ([`observe_phases`])
/// so that they can prove their kills and power cuts land inside each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Records are being read and written into the heap file (announced before each record,
    /// with the count replayed so far, and once before the first if there is none).
    Replay,
    /// The heap file's fdatasync after the replay (only when the tail moves: see the module
    /// docs, step 4).
    HeapSync,
    /// The new superblock's durable write.
    Superblock,
    /// The superblock is durable: recovery is over.
    Done,
}

#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Replay => "replay",
            Phase::HeapSync => "heap-sync",
            Phase::Superblock => "superblock",
            Phase::Done => "done",
        }
    }
    /// The phases a crash can interrupt.
    pub const ALL: [Phase; 3] = [Phase::Replay, Phase::HeapSync, Phase::Superblock];
}

/// Who is told each [`Phase`] as this process's recoveries reach it. Set once; unset costs one
/// atomic load per phase.
static PHASE_OBSERVER: std::sync::OnceLock<fn(Phase, &RecoveryReport)> = std::sync::OnceLock::new();

/// Have `observer` called as every later recovery in this process enters each [`Phase`] (with
/// the report so far: at `HeapSync` it holds the records replayed). For crash tests: the SIGKILL
/// torture's child prints the phases so its parent can aim kills inside them. Only the first
/// call takes effect.
#[cfg(any(test, feature = "testing"))]
pub fn observe_phases(observer: fn(Phase, &RecoveryReport)) {
    let _ = PHASE_OBSERVER.set(observer);
}

fn announce(phase: Phase, report: &RecoveryReport) {
    if let Some(observer) = PHASE_OBSERVER.get() {
        observer(phase, report);
    }
}

pub(crate) struct Recovered {
    pub superblock: Superblock,
    pub head: u64,
    /// Bytes of the record area in use from the new superblock's tail to `head` (the replayed
    /// stretch, when the heap file was not synced; else 0).
    pub used_bytes: u64,
    pub report: RecoveryReport,
}

/// Read window over the log: recovery reads sequentially in large aligned chunks — ahead of the
/// replay, on a thread of its own, when the device offers a second handle ([`ReadAhead`]); else,
/// and for any read the read-ahead cannot serve, on this thread.
struct LogReader<'a> {
    dev: &'a mut dyn LogDevice,
    buf: AlignedBuf,
    start: u64,
    len: usize,
    area_end: u64,
    bytes_read: u64,
    ahead: Option<ReadAhead>,
}

const WINDOW_BYTES: usize = 1 << 20;

impl<'a> LogReader<'a> {
    fn new(dev: &'a mut dyn LogDevice, area_end: u64) -> LogReader<'a> {
        LogReader { dev, buf: AlignedBuf::zeroed(0), start: 0, len: 0, area_end, bytes_read: 0, ahead: None }
    }

    /// Start reading the log ahead: `limit_bytes` in ring order from the tail (what recovery may
    /// look at). Without a second handle on the device, or a thread, reads stay on this thread.
    fn read_ahead(&mut self, sb: &Superblock, limit_bytes: u64) {
        if let Some(reader) = self.dev.reader() {
            self.ahead = ReadAhead::start(reader, sb.area_start, sb.area_end, sb.tail_offset, limit_bytes);
        }
    }

    /// The bytes [offset, offset+len), both block aligned and inside the record area.
    fn get(&mut self, offset: u64, len: usize) -> std::io::Result<&[u8]> {
        debug_assert!(offset % BLOCK as u64 == 0 && len % BLOCK == 0);
        debug_assert!(offset + len as u64 <= self.area_end);
        if self.ahead.as_mut().is_some_and(|a| a.fill(offset, len)) {
            return Ok(self.ahead.as_ref().map_or(&[][..], |a| a.slice(len)));
        }
        let window_end = self.start + self.len as u64;
        let inside = offset >= self.start && offset + len as u64 <= window_end;
        if !inside {
            // A record that starts in the window and runs past it: keep the part already read
            // (moved to the front) and read only the rest, so sequential records are read once.
            let keep = if offset >= self.start && offset < window_end { (window_end - offset) as usize } else { 0 };
            if len > self.buf.len() {
                let mut bigger = AlignedBuf::zeroed(len.next_multiple_of(WINDOW_BYTES));
                if keep > 0 {
                    let at = (offset - self.start) as usize;
                    bigger[..keep].copy_from_slice(&self.buf[at..at + keep]);
                }
                self.buf = bigger;
            } else if keep > 0 {
                let at = (offset - self.start) as usize;
                self.buf.copy_within(at..at + keep, 0);
            }
            let want = (self.area_end - offset).min(self.buf.len() as u64) as usize;
            debug_assert!(keep <= want && keep % BLOCK == 0);
            self.dev.read_exact_at(offset + keep as u64, &mut self.buf[keep..want])?;
            self.bytes_read += (want - keep) as u64;
            self.start = offset;
            self.len = want;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.buf[at..at + len])
    }

    /// Bytes read from the device so far, by this thread and the read-ahead (which is stopped).
    fn finish(&mut self) -> u64 {
        let ahead = self.ahead.take().map_or(0, |a| a.stop());
        self.bytes_read + ahead
    }
}

/// Buffers of the read-ahead ([`WINDOW_BYTES`] each): one being read, one waiting, one in use by
/// the replay. Bounded, and reused: a fresh buffer costs its page faults on first use.
const READ_AHEAD_BUFFERS: usize = 3;

/// Below this much to read, the log is read on the replaying thread: starting the read-ahead (a
/// thread, its buffers' first page faults) cost 0.3–0.9 ms more than it saved for 1 and 4 MiB of
/// records on zram, and saved 20–35 % from 16 MiB on.
/// (`HeapOptions::recovery_read_ahead` chooses otherwise.)
pub const READ_AHEAD_BYTES_MIN: u64 = 8 << 20;

/// One window of the log, read ahead: `len` bytes at ring distance `distance` from the tail.
struct Window {
    distance: u64,
    buf: AlignedBuf,
    len: usize,
}

impl Window {
    fn end(&self) -> u64 {
        self.distance + self.len as u64
    }
}

/// The log read ahead of the replay by a thread of its own, as a stream: the record area in
/// ring order from the tail (wrapping from the area's end to its start), `limit` bytes long, in
/// windows that never cross the area's end. A record never crosses it either, so every request
/// is one contiguous stretch of the stream. Requests go forward (replay, then the look for a later
/// group); one behind the stream (after a look at the area start that found no wrap) is not
/// served here and goes to the device directly, as does everything after a read error — the
/// direct read then reports it.
struct ReadAhead {
    area_start: u64,
    area_end: u64,
    tail: u64,
    limit: u64,
    /// Received windows, ascending, covering a stretch of the stream with no gap.
    windows: std::collections::VecDeque<Window>,
    rx: Option<std::sync::mpsc::Receiver<std::io::Result<Window>>>,
    /// Buffers given back to the thread for reuse (it waits for one when all are out).
    recycle: Option<std::sync::mpsc::Sender<AlignedBuf>>,
    thread: Option<std::thread::JoinHandle<()>>,
    bytes_read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// A request spanning windows is copied here.
    scratch: AlignedBuf,
    /// Where the last filled request lies: in the front window at this offset, or (None) in
    /// `scratch`.
    hit: Option<usize>,
}

impl ReadAhead {
    fn start(
        mut reader: Box<dyn crate::io::LogRead>,
        area_start: u64,
        area_end: u64,
        tail: u64,
        limit: u64,
    ) -> Option<ReadAhead> {
        use std::sync::atomic::Ordering::Relaxed;
        assert!(area_start <= tail && tail < area_end && limit <= area_end - area_start);
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Window>>(READ_AHEAD_BUFFERS - 2);
        let (recycle, recycled) = std::sync::mpsc::channel::<AlignedBuf>();
        let bytes_read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = bytes_read.clone();
        let thread = std::thread::Builder::new()
            .name("fams-log-read-ahead".into())
            .spawn(move || {
                let mut distance = 0u64;
                let mut buffers = 0usize;
                while distance < limit {
                    let pos = ring_position(area_start, area_end, tail, distance);
                    let len = (WINDOW_BYTES as u64).min(limit - distance).min(area_end - pos) as usize;
                    let mut buf = match recycled.try_recv() {
                        Ok(b) => b,
                        Err(_) if buffers < READ_AHEAD_BUFFERS => {
                            buffers += 1;
                            AlignedBuf::zeroed(WINDOW_BYTES)
                        }
                        Err(_) => match recycled.recv() {
                            Ok(b) => b,
                            Err(_) => return, // recovery is done with the stream
                        },
                    };
                    let read = reader.read_exact_at(pos, &mut buf[..len]);
                    let failed = read.is_err();
                    if !failed {
                        counter.fetch_add(len as u64, Relaxed);
                    }
                    if tx.send(read.map(|()| Window { distance, buf, len })).is_err() || failed {
                        return;
                    }
                    distance += len as u64;
                }
            })
            .ok()?;
        Some(ReadAhead {
            area_start,
            area_end,
            tail,
            limit,
            windows: std::collections::VecDeque::new(),
            rx: Some(rx),
            recycle: Some(recycle),
            thread: Some(thread),
            bytes_read,
            scratch: AlignedBuf::zeroed(0),
            hit: None,
        })
    }

    /// The next window from the thread; None once it stopped (done, or a read error: the direct
    /// read reports what is wrong).
    fn next_window(&mut self) -> Option<Window> {
        match self.rx.as_ref()?.recv() {
            Ok(Ok(w)) => Some(w),
            Ok(Err(_)) | Err(_) => {
                self.rx = None;
                None
            }
        }
    }

    fn recycle_front(&mut self) {
        if let (Some(w), Some(recycle)) = (self.windows.pop_front(), &self.recycle) {
            let _ = recycle.send(w.buf);
        }
    }

    /// Make [offset, offset+len) ready for [`ReadAhead::slice`]; false if this stream cannot
    /// serve it (behind the stream, past its limit, or the thread stopped).
    fn fill(&mut self, offset: u64, len: usize) -> bool {
        let distance = ring_distance(self.area_start, self.area_end, self.tail, offset);
        let end = distance + len as u64;
        if end > self.limit {
            return false;
        }
        // The window holding the request's first byte, at the front.
        loop {
            while self.windows.front().is_some_and(|w| w.end() <= distance) {
                self.recycle_front();
            }
            match self.windows.front() {
                Some(front) if front.distance > distance => return false, // behind the stream
                Some(_) => break,
                None => match self.next_window() {
                    Some(w) => self.windows.push_back(w),
                    None => return false,
                },
            }
        }
        let front = &self.windows[0];
        if front.end() >= end {
            self.hit = Some((distance - front.distance) as usize);
            return true;
        }
        // Spanning windows: copy the parts, giving back each window passed (the last one stays:
        // it may hold the next request), so the thread never waits for buffers held here.
        if self.scratch.len() < len {
            self.scratch = AlignedBuf::zeroed(len.next_multiple_of(WINDOW_BYTES));
        }
        let mut copied = 0usize;
        loop {
            let w = &self.windows[0];
            let from = (distance + copied as u64 - w.distance) as usize;
            let n = (w.len - from).min(len - copied);
            self.scratch[copied..copied + n].copy_from_slice(&w.buf[from..from + n]);
            copied += n;
            if copied == len {
                break;
            }
            self.recycle_front();
            match self.next_window() {
                Some(w) => self.windows.push_back(w),
                None => return false,
            }
        }
        self.hit = None;
        true
    }

    /// The request made ready by the last [`ReadAhead::fill`] that returned true.
    fn slice(&self, len: usize) -> &[u8] {
        match self.hit {
            Some(at) => &self.windows[0].buf[at..at + len],
            None => &self.scratch[..len],
        }
    }

    /// Stop the thread; the bytes it read.
    fn stop(mut self) -> u64 {
        self.halt();
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop the thread: its next send fails, and so does a wait for a buffer.
    fn halt(&mut self) {
        self.rx = None;
        self.recycle = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Ring distance from `tail` to `offset` in the record area [area_start, area_end).
fn ring_distance(area_start: u64, area_end: u64, tail: u64, offset: u64) -> u64 {
    if offset >= tail {
        offset - tail
    } else {
        (area_end - tail) + (offset - area_start)
    }
}

/// The offset `distance` bytes past `tail` in ring order.
fn ring_position(area_start: u64, area_end: u64, tail: u64, distance: u64) -> u64 {
    if distance < area_end - tail {
        tail + distance
    } else {
        area_start + (distance - (area_end - tail))
    }
}

pub(crate) fn read_superblock(dev: &mut dyn LogDevice, log_path: &Path) -> Result<Superblock> {
    read_superblock_slots(dev, log_path).map(|(sb, _)| sb)
}

/// The current superblock, and whether the other slot is damaged — unreadable but not blank, so
/// it may have held a newer superblock (a torn write, or media damage) whose written limit is
/// unknown.
fn read_superblock_slots(dev: &mut dyn LogDevice, log_path: &Path) -> Result<(Superblock, bool)> {
    let mut buf = AlignedBuf::zeroed(2 * BLOCK);
    dev.read_exact_at(0, &mut buf).map_err(|e| Error::io(log_path, "reading the log superblocks", e))?;
    let (slot_a, slot_b) = buf.split_at(BLOCK);
    let blank = |slot: &[u8]| slot.iter().all(|&b| b == 0);
    match (Superblock::decode(slot_a), Superblock::decode(slot_b)) {
        (Ok(a), Ok(b)) => Ok((if a.sequence >= b.sequence { a } else { b }, false)),
        (Ok(s), Err(_)) => Ok((s, !blank(slot_b))),
        (Err(_), Ok(s)) => Ok((s, !blank(slot_a))),
        (Err(ea), Err(eb)) => {
            Err(Error::CorruptSuperblock { path: log_path.into(), reason: format!("slot A: {ea}; slot B: {eb}") })
        }
    }
}

/// Write `sb` to its slot and wait until it is durable.
pub(crate) fn write_superblock(dev: &mut dyn LogDevice, sb: &Superblock) -> std::io::Result<()> {
    let mut buf = AlignedBuf::zeroed(BLOCK);
    sb.encode(&mut buf);
    dev.write_durable(&[(sb.slot_offset(), &buf)])
}

enum Step {
    Record { offset: u64, header: RecordHeader },
    End { why: Option<String> },
}

/// What recovery may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Replay into the heap file, sync, start a new epoch.
    Replay { salvage: bool },
    /// Only read and report (for `inspect`): the heap file and the log are not written.
    DryRun,
}

pub(crate) fn recover(
    dev: &mut dyn LogDevice,
    log_path: &Path,
    heap_file: &dyn HeapStore,
    heap_path: &Path,
    header: &HeapHeader,
    mode: Mode,
    read_ahead: Option<bool>,
) -> Result<Recovered> {
    let started = Instant::now();
    let (sb, other_slot_damaged) = read_superblock_slots(dev, log_path)?;
    if sb.heap_id != header.heap_id {
        return Err(Error::LogMismatch {
            path: log_path.into(),
            reason: format!("the log belongs to heap {}, this heap is {}", sb.heap_id, header.heap_id),
        });
    }
    if sb.log_size != header.log_size {
        return Err(Error::LogMismatch {
            path: log_path.into(),
            reason: format!(
                "the heap file says its log is {} bytes, the log's superblock says {}: one of them was replaced or damaged",
                header.log_size, sb.log_size
            ),
        });
    }
    if sb.log_size > dev.size_bytes() {
        return Err(Error::BadLogDevice {
            path: log_path.into(),
            reason: format!(
                "the log was formatted for {} bytes but the device holds {}; it was truncated or replaced",
                sb.log_size,
                dev.size_bytes()
            ),
        });
    }
    // The current size: a version-1 superblock does not record it (the heap never grew).
    let mut sb = sb;
    if sb.heap_size == 0 {
        sb.heap_size = header.heap_size;
    }
    if sb.heap_size < header.heap_size || sb.heap_size > header.max_size {
        return Err(Error::LogMismatch {
            path: log_path.into(),
            reason: format!(
                "the log says the heap is {} bytes, outside what its header allows ({} to {}): one of them was replaced or damaged",
                sb.heap_size, header.heap_size, header.max_size
            ),
        });
    }
    let log_err = |what: &'static str| move |e: std::io::Error| Error::io(log_path, what, e);
    let heap_err = |what: &'static str| move |e: std::io::Error| Error::io(heap_path, what, e);

    let mut report = RecoveryReport::default();
    let mut reader = LogReader::new(dev, sb.area_end);
    let mut pos = sb.tail_offset;
    let mut lsn = sb.tail_lsn;
    let mut consumed_bytes = 0u64;
    if mode != Mode::DryRun {
        announce(Phase::Replay, &report);
        if mutations::is_on(Mutation::TailBeforeReplay) {
            // The deliberate bug: find the end first, and make it the tail before replaying.
            let ahead = recover(&mut *reader.dev, log_path, heap_file, heap_path, header, Mode::DryRun, Some(false))?;
            let mut early = sb;
            early.sequence += 1;
            early.tail_offset = ahead.head;
            early.tail_lsn = ahead.report.next_lsn;
            write_superblock(&mut *reader.dev, &early).map_err(log_err("writing the superblock"))?;
        }
    }
    // How far past the tail records can be: the written limit — or anywhere, when the limit is
    // not recorded or the other slot is damaged and may have held a larger one.
    let scan_limit = if other_slot_damaged { sb.capacity_bytes() } else { sb.scan_limit_bytes() };
    if read_ahead.unwrap_or(scan_limit >= READ_AHEAD_BYTES_MIN) {
        reader.read_ahead(&sb, scan_limit);
    }
    let end_why = loop {
        debug_assert!(lsn >= sb.tail_lsn);
        // The next record may have wrapped to the area start only if that lies inside the limit.
        let wrap_possible = consumed_bytes + (sb.area_end - pos) < scan_limit;
        match next_step(&mut reader, &sb, pos, lsn, wrap_possible).map_err(log_err("reading log records"))? {
            Step::End { why } => break why,
            Step::Record { offset, header: h } => {
                if offset != pos {
                    consumed_bytes += sb.area_end - pos;
                }
                consumed_bytes += h.total_len as u64;
                if consumed_bytes > sb.capacity_bytes() {
                    // Between two checkpoints the writer never laps the tail; this chain does.
                    break Some(format!("record LSN {lsn} would run the log past its tail"));
                }
                let total = h.total_len as usize;
                let rec = reader.get(offset, total).map_err(log_err("reading a log record"))?;
                let payload = &rec[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + h.payload_len as usize];
                // (The mutation `trust-record-without-crc`, in `mutations` builds only, skips
                // this check to show the crash tests catch a torn record replayed as whole.)
                if crc32c::crc32c(payload) != h.payload_crc && !mutations::is_on(Mutation::TrustRecordWithoutCrc) {
                    break Some(format!("record LSN {lsn} at offset {offset}: payload checksum mismatch"));
                }
                let entries = match log_format::decode_entries(payload, h.entry_count, sb.heap_size) {
                    Ok(e) => e,
                    Err(why) => break Some(format!("record LSN {lsn} at offset {offset}: {why}")),
                };
                if mode != Mode::DryRun && report.records_replayed > 0 {
                    announce(Phase::Replay, &report);
                }
                if mode != Mode::DryRun {
                    write_entries(heap_file, &entries).map_err(heap_err("replaying a log record into the heap"))?;
                }
                report.bytes_replayed += entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
                report.records_replayed += 1;
                pos = offset + h.total_len as u64;
                if pos == sb.area_end {
                    pos = sb.area_start;
                }
                lsn += 1;
            }
        }
    };

    let later = if lsn < sb.replayed_until_lsn {
        // An earlier open replayed these records: they were durable, so a gap among them is
        // damage, whatever follows it.
        Some(Later { lsn: sb.replayed_until_lsn - 1, newer_epoch: None })
    } else {
        later_group_after(&mut reader, &sb, pos, consumed_bytes, scan_limit, lsn).map_err(log_err("scanning the log"))?
    };
    if let Some(Later { lsn: later, newer_epoch }) = later {
        let reason = match newer_epoch {
            Some(e) => format!(
                "the newest superblock is damaged: the log holds records of epoch {e}, the best superblock left is of epoch {}",
                sb.epoch
            ),
            None => {
                let why = end_why.clone().unwrap_or_else(|| format!("no valid record LSN {lsn} at offset {pos}"));
                if lsn < sb.replayed_until_lsn {
                    format!("{why}; an earlier open replayed the records up to LSN {later}, so they had been durable")
                } else {
                    why
                }
            }
        };
        if mode == (Mode::Replay { salvage: false }) {
            return Err(Error::MediaCorruption { path: log_path.into(), lsn, offset: pos, later_lsn: later, reason });
        }
        report.salvaged =
            Some(format!("dropped LSN {lsn} and everything after it (up to at least LSN {later}): {reason}"));
    }
    report.torn_tail = end_why;
    report.log_bytes_read = reader.finish();
    drop(reader);
    report.next_lsn = lsn;
    report.heap_size_bytes = sb.heap_size;
    if mode == Mode::DryRun {
        report.duration = started.elapsed();
        return Ok(Recovered { superblock: sb, head: pos, used_bytes: 0, report });
    }

    let mut next = sb;
    next.sequence += 1;
    next.epoch += 1;
    // Keep the replayed records in the log instead of syncing the heap file (step 4): when
    // something was replayed, nothing was dropped, and no earlier stretch is still recorded.
    // (The mutation `recovery-tail-without-heap-sync`, in `mutations` builds only, skips the
    // sync but moves the tail anyway, to show the crash tests catch it.)
    let keep_stretch = report.records_replayed > 0 && report.salvaged.is_none() && !sb.has_replayed_stretch();
    let used_bytes = if keep_stretch && !mutations::is_on(Mutation::RecoveryTailWithoutHeapSync) {
        next.replayed_until_lsn = lsn;
        next.written_limit_bytes = consumed_bytes.saturating_add(next.fresh_written_limit()).min(next.capacity_bytes());
        consumed_bytes
    } else {
        if !keep_stretch {
            announce(Phase::HeapSync, &report);
            heap_file.sync_data().map_err(heap_err("fdatasync after replay"))?;
        }
        next.tail_offset = pos;
        next.tail_lsn = lsn;
        next.replayed_until_lsn = 0;
        next.written_limit_bytes = next.fresh_written_limit();
        0
    };
    if !next.counters_writable() {
        // Only a damaged or crafted superblock gets here (the counters grow by one per open,
        // checkpoint or commit): a superblock written with them could not be read back.
        return Err(Error::CorruptSuperblock {
            path: log_path.into(),
            reason: format!("its counters are at their limit ({next:?}); the log is damaged"),
        });
    }
    announce(Phase::Superblock, &report);
    write_superblock(dev, &next).map_err(log_err("writing the superblock after recovery"))?;
    announce(Phase::Done, &report);

    report.duration = started.elapsed();
    Ok(Recovered { superblock: next, head: pos, used_bytes, report })
}

/// Where the record with `lsn` is, if anywhere: at `pos`, or (if `wrap_possible`) at the area
/// start after a wrap.
fn next_step(
    reader: &mut LogReader<'_>,
    sb: &Superblock,
    pos: u64,
    lsn: u64,
    wrap_possible: bool,
) -> std::io::Result<Step> {
    let found = |offset: u64, h: RecordHeader| {
        if offset + h.total_len as u64 > sb.area_end {
            Step::End { why: Some(format!("record LSN {lsn} at offset {offset} runs past the end of the log")) }
        } else {
            Step::Record { offset, header: h }
        }
    };
    let epoch = sb.epoch_of(lsn);
    let why = match RecordHeader::decode(reader.get(pos, BLOCK)?, sb.heap_id, epoch) {
        Ok(h) if h.lsn == lsn => return Ok(found(pos, h)),
        Ok(h) if h.lsn > lsn => Some(format!("at offset {pos}: LSN {} where {lsn} was expected", h.lsn)),
        Err(HeaderProblem::Foreign(f)) => Some(format!("at offset {pos}: {f}")),
        // A header with our magic whose checksum fails: a record whose write was torn (at the
        // end of the log, by a crash), or damage — say which position and why.
        Err(HeaderProblem::NotARecord(why)) if why != "no record magic" => {
            Some(format!("at offset {pos}: {why} (a torn or damaged record header)"))
        }
        // The normal end: never written, or what an earlier lap or epoch left there.
        Ok(_)
        | Err(HeaderProblem::NotARecord(_))
        | Err(HeaderProblem::OtherHeap)
        | Err(HeaderProblem::OtherEpoch(_)) => None,
    };
    if pos != sb.area_start && wrap_possible {
        if let Ok(h) = RecordHeader::decode(reader.get(sb.area_start, BLOCK)?, sb.heap_id, epoch) {
            if h.lsn == lsn {
                return Ok(found(sb.area_start, h));
            }
        }
    }
    Ok(Step::End { why })
}

/// Look through the part of the log that was not replayed, from `end` (`end_bytes` past the
/// tail) up to `limit_bytes` past the tail, for an intact record of this epoch that was written
/// in a device write *after* the one holding `lsn`. Returns its LSN.
/// An intact record that proves the end of replay is not the end of what was durable.
struct Later {
    lsn: u64,
    /// Set when the record belongs to a newer epoch than the superblock used.
    newer_epoch: Option<u64>,
}

fn later_group_after(
    reader: &mut LogReader<'_>,
    sb: &Superblock,
    end: u64,
    end_bytes: u64,
    limit_bytes: u64,
    lsn: u64,
) -> std::io::Result<Option<Later>> {
    debug_assert!(limit_bytes <= sb.capacity_bytes());
    let mut offset = end;
    let mut distance = end_bytes;
    while distance < limit_bytes {
        distance += BLOCK as u64;
        let block = reader.get(offset, BLOCK)?;
        match RecordHeader::decode(block, sb.heap_id, sb.epoch) {
            Ok(h) if h.lsn >= lsn && h.group_first_lsn > lsn => {
                return Ok(Some(Later { lsn: h.lsn, newer_epoch: None }))
            }
            // Records of an epoch are written only after that epoch's superblock is durable, so
            // a record of a newer epoch proves a newer superblock existed: the one we read is
            // not the newest, and replaying from it would lose commits.
            Err(HeaderProblem::OtherEpoch(h)) if h.epoch > sb.epoch => {
                return Ok(Some(Later { lsn: h.lsn, newer_epoch: Some(h.epoch) }));
            }
            _ => {}
        }
        offset += BLOCK as u64;
        if offset == sb.area_end {
            offset = sb.area_start;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log in memory, readable from another thread; fails reads at and past `fail_at`.
    struct MemLog {
        bytes: std::sync::Arc<Vec<u8>>,
        fail_at: u64,
    }

    impl crate::io::LogRead for MemLog {
        fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if offset + buf.len() as u64 > self.fail_at {
                return Err(std::io::Error::other("injected read error"));
            }
            buf.copy_from_slice(&self.bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    /// Every block holds its own block number, so a wrong byte says where it came from.
    fn numbered(blocks: u64) -> std::sync::Arc<Vec<u8>> {
        let mut v = vec![0u8; (blocks * BLOCK as u64) as usize];
        for (i, b) in v.chunks_mut(BLOCK).enumerate() {
            for w in b.chunks_mut(8) {
                w.copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
        std::sync::Arc::new(v)
    }

    fn expect_blocks(got: &[u8], first_block: u64) {
        for (i, b) in got.chunks(BLOCK).enumerate() {
            let want = first_block + i as u64;
            assert!(b.chunks(8).all(|w| w == want.to_le_bytes()), "block {i} of the request is not block {want}");
        }
    }

    #[test]
    fn the_read_ahead_serves_forward_requests_across_windows_and_the_wrap() {
        let window_blocks = (WINDOW_BYTES / BLOCK) as u64;
        let area = (2u64, 2 + 5 * window_blocks + 3); // blocks; not a multiple of the window
        let log = numbered(area.1);
        let (start, end) = (area.0 * BLOCK as u64, area.1 * BLOCK as u64);
        let tail = start + (3 * window_blocks + 1) * BLOCK as u64;
        let limit = end - start;
        let reader = Box::new(MemLog { bytes: log.clone(), fail_at: u64::MAX });
        let mut a = ReadAhead::start(reader, start, end, tail, limit).expect("a thread");
        let block = BLOCK as u64;
        // From the tail to the area's end in requests of assorted sizes, some spanning windows.
        let mut at = tail;
        let mut sizes = [1u64, 7, window_blocks + 5, 2, 3 * window_blocks, 1].into_iter().cycle();
        while at < end {
            let n = sizes.next().unwrap().min((end - at) / block);
            assert!(a.fill(at, (n * block) as usize), "request at {at} not served");
            expect_blocks(a.slice((n * block) as usize), at / block);
            at += n * block;
        }
        // Then from the area's start, up to the limit (just before the tail).
        let mut at = start;
        while at < tail {
            let n = (window_blocks / 2).min((tail - at) / block);
            assert!(a.fill(at, (n * block) as usize));
            expect_blocks(a.slice((n * block) as usize), at / block);
            at += n * block;
        }
        // Behind the stream: not served (the direct read takes it).
        assert!(!a.fill(tail, BLOCK));
        assert_eq!(a.stop(), limit, "the whole limit was read once");
    }

    #[test]
    fn the_read_ahead_gives_up_on_a_read_error_and_past_its_limit() {
        let w = (WINDOW_BYTES / BLOCK) as u64;
        let block = BLOCK as u64;
        let (start, end) = (2 * block, (2 + 4 * w) * block);
        // The third window's read fails.
        let reader = Box::new(MemLog { bytes: numbered(2 + 4 * w), fail_at: start + (2 * w + 1) * block });
        let mut a = ReadAhead::start(reader, start, end, start, 4 * w * block).expect("a thread");
        assert!(a.fill(start, 8 * BLOCK));
        expect_blocks(a.slice(8 * BLOCK), 2);
        assert!(a.fill(start + (w + 3) * block, BLOCK), "the second window");
        assert!(!a.fill(start + (2 * w + 3) * block, BLOCK), "the failed window");
        assert!(!a.fill(start + (3 * w) * block, BLOCK), "nothing after an error");
        drop(a);
        let reader = Box::new(MemLog { bytes: numbered(2 + 4 * w), fail_at: u64::MAX });
        let mut b = ReadAhead::start(reader, start, end, start, 16 * block).expect("a thread");
        assert!(!b.fill(start + 16 * block, BLOCK), "past the limit");
        assert!(b.fill(start + 15 * block, BLOCK));
        expect_blocks(b.slice(BLOCK), 17);
        assert_eq!(b.stop(), 16 * block);
    }
}
