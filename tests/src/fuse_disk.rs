//! A disk with a volatile write cache, served through FUSE, for power-cut tests on the real kernel
//! path (io_uring, O_DIRECT, RWF_DSYNC/FUA, fdatasync, the loop driver, ext4).
//!
//! `fams-fuse-disk MOUNTPOINT --disk NAME=IMAGE:SIZE … --control SOCKET` serves one fixed-size
//! file per `--disk` at `MOUNTPOINT/NAME`. Each file behaves like a drive with a write-back cache:
//!
//! * a **durable image**, kept in the file IMAGE (on the host's disk) and in memory;
//! * a **volatile cache**: the ordered list of writes received since that file's last `fsync`.
//!
//! A read sees the durable image with the cached writes laid over it. A write is appended to the
//! cache. An `fsync`/`fdatasync` of the file (what the loop driver sends for every flush barrier:
//! a REQ_PREFLUSH, an emulated FUA write, an fdatasync of the loop device) applies the file's cache
//! to its durable image and empties it. `close()` (FUSE_FLUSH) makes nothing durable.
//!
//! The control socket takes one command per line and answers with one JSON line:
//! * `stats` — counters per disk (writes, fsyncs, reads, pending writes, open flags seen);
//! * `cut SEED [MODE]` — a **power cut** of every disk at once: each cached write is kept, dropped or
//!   torn (per 512-byte sector: old bytes, new bytes or garbage), all chosen by a PRNG seeded
//!   with SEED; the survivors are applied to the durable images, and the disks go **dead**: later
//!   writes, fsyncs and fallocates fail with EIO and change nothing (a drive whose power is gone;
//!   failing rather than pretending matters: a program still running must not be told that a
//!   write or flush after the cut succeeded), reads return the durable image. The test then tears
//!   the stack down and starts a new `fams-fuse-disk` from the images (power back on);
//! * `arm SEED N [DISK]` — cut (as `cut SEED`) right after the N-th write from now (to any disk,
//!   or to DISK) has been cached, in the FUSE request handler itself: a cut that lands between a
//!   write and its flush, while the program runs;
//! * `silence` — after a cut, answer writes and fsyncs with success (still changing nothing):
//!   for the teardown, once the program under test is gone, so that ext4's unmount stays quiet;
//! * `ignore-flushes DISK` — from now on DISK acknowledges fsyncs without flushing: a drive that
//!   lies about its cache, for proving that a test notices lost "durable" data;
//! * `sector-atomic DISK [on|off]` — from now on a cut tears DISK's writes per sector into old
//!   or new bytes only, never garbage (a drive that writes each 512-byte sector atomically). For the
//!   drive under ext4 when ext4 holds a fams log file too: after one such cut ext4 refused to
//!   mount ("probably corrupted filesystem"); metadata it rewrites in place, such as its
//!   journal superblock, cannot be expected to survive a garbage sector — a limit of ext4 on
//!   such a drive, not of what fams is tested for. (Garbage in the heap *file* is what fams's
//!   full page images after a checkpoint exist for, so the power-cut test keeps garbage on
//!   ext4's drive while only the heap file lives there.) The fams log's own drive keeps the garbage model.
//!
//! The image files are written with plain `pwrite` and not fsynced: the host does not lose power
//! in this test, only the simulated drive does; the image only has to outlive the FUSE process.
//!
//! The cut follows the power-loss models of SQLite's crash-test layer and FoundationDB's
//! non-durable file: anything written since the last flush may be lost, kept or torn,
//! independently; nothing flushed is ever lost.

use crate::Rng;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

pub const SECTOR: usize = 512;

/// Counters of what one disk saw (since its program started).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub writes: u64,
    pub write_bytes: u64,
    /// Writes whose file flags carried O_DSYNC or O_SYNC (the FUSE layer's view of the open file).
    pub writes_with_sync_flag: u64,
    /// Writes that arrived from the kernel page cache (FUSE_WRITE_CACHE).
    pub writes_from_page_cache: u64,
    pub fsyncs: u64,
    pub fdatasyncs: u64,
    pub reads: u64,
    pub fallocates: u64,
    pub opens: u64,
    /// Opens with O_DIRECT (the loop driver in direct-I/O mode opens its backing file this way).
    pub opens_direct: u64,
    /// Most cached writes seen at once.
    pub max_pending_writes: u64,
    /// Writes, fsyncs and fallocates that arrived after the cut (failed with EIO).
    pub ignored_after_cut: u64,
}

impl DiskCounters {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "writes": self.writes,
            "write_bytes": self.write_bytes,
            "writes_with_sync_flag": self.writes_with_sync_flag,
            "writes_from_page_cache": self.writes_from_page_cache,
            "fsyncs": self.fsyncs,
            "fdatasyncs": self.fdatasyncs,
            "reads": self.reads,
            "fallocates": self.fallocates,
            "opens": self.opens,
            "opens_direct": self.opens_direct,
            "max_pending_writes": self.max_pending_writes,
            "ignored_after_cut": self.ignored_after_cut,
        })
    }
    pub fn from_json(v: &serde_json::Value) -> DiskCounters {
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        DiskCounters {
            writes: g("writes"),
            write_bytes: g("write_bytes"),
            writes_with_sync_flag: g("writes_with_sync_flag"),
            writes_from_page_cache: g("writes_from_page_cache"),
            fsyncs: g("fsyncs"),
            fdatasyncs: g("fdatasyncs"),
            reads: g("reads"),
            fallocates: g("fallocates"),
            opens: g("opens"),
            opens_direct: g("opens_direct"),
            max_pending_writes: g("max_pending_writes"),
            ignored_after_cut: g("ignored_after_cut"),
        }
    }
    pub fn add(&mut self, o: &DiskCounters) {
        self.writes += o.writes;
        self.write_bytes += o.write_bytes;
        self.writes_with_sync_flag += o.writes_with_sync_flag;
        self.writes_from_page_cache += o.writes_from_page_cache;
        self.fsyncs += o.fsyncs;
        self.fdatasyncs += o.fdatasyncs;
        self.reads += o.reads;
        self.fallocates += o.fallocates;
        self.opens += o.opens;
        self.opens_direct += o.opens_direct;
        self.max_pending_writes = self.max_pending_writes.max(o.max_pending_writes);
        self.ignored_after_cut += o.ignored_after_cut;
    }
}

/// One simulated drive: durable image + volatile cache of writes since the last flush.
pub struct Disk {
    pub name: String,
    durable: Vec<u8>,
    /// `durable` with the cached writes applied: what reads return.
    current: Vec<u8>,
    cache: Vec<(u64, Vec<u8>)>,
    image: Option<File>,
    pub counters: DiskCounters,
    /// Acknowledge fsyncs without flushing (a lying drive; for proving the test can fail).
    pub ignore_flushes: bool,
    /// A cut tears writes into old or new sectors only, never garbage.
    pub sector_atomic: bool,
}

impl Disk {
    /// A disk whose durable content is `durable` (no image file: for unit tests).
    pub fn in_memory(name: &str, durable: Vec<u8>) -> Disk {
        Disk {
            name: name.into(),
            current: durable.clone(),
            durable,
            cache: Vec::new(),
            image: None,
            counters: DiskCounters::default(),
            ignore_flushes: false,
            sector_atomic: false,
        }
    }

    /// Open (or create, zero-filled) the image file of `size` bytes.
    pub fn open_image(name: &str, path: &Path, size: u64) -> Result<Disk, String> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
        if len != size {
            if len != 0 {
                return Err(format!("{}: image is {len} bytes, --disk says {size}", path.display()));
            }
            f.set_len(size).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let mut durable = vec![0u8; size as usize];
        f.read_exact_at(&mut durable, 0).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut d = Disk::in_memory(name, durable);
        d.image = Some(f);
        Ok(d)
    }

    pub fn size(&self) -> u64 {
        self.durable.len() as u64
    }
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }
    pub fn current(&self) -> &[u8] {
        &self.current
    }
    pub fn pending_writes(&self) -> usize {
        self.cache.len()
    }

    pub fn read(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset as usize).min(self.current.len());
        let end = start.saturating_add(len).min(self.current.len());
        &self.current[start..end]
    }

    /// A write into the volatile cache. False if it does not fit on the disk.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(end) = (offset as usize).checked_add(data.len()) else { return false };
        if end > self.current.len() {
            return false;
        }
        self.current[offset as usize..end].copy_from_slice(data);
        self.cache.push((offset, data.to_vec()));
        self.counters.max_pending_writes = self.counters.max_pending_writes.max(self.cache.len() as u64);
        true
    }

    /// Flush: every cached write becomes durable.
    pub fn flush(&mut self) -> Result<(), String> {
        for (off, data) in std::mem::take(&mut self.cache) {
            let o = off as usize;
            self.durable[o..o + data.len()].copy_from_slice(&data);
            if let Some(f) = &self.image {
                f.write_all_at(&data, off).map_err(|e| format!("writing the image of {}: {e}", self.name))?;
            }
        }
        debug_assert!(self.durable == self.current);
        Ok(())
    }

    /// Write a byte range of the durable image through to the image file.
    fn persist_range(&self, start: usize, end: usize) -> Result<(), String> {
        if let Some(f) = &self.image {
            f.write_all_at(&self.durable[start..end], start as u64)
                .map_err(|e| format!("writing the image of {}: {e}", self.name))?;
        }
        Ok(())
    }
}

/// How a cut treats the cached writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Every write since the last flush is lost.
    LoseAll,
    /// The writes reached the medium in order: a prefix survives, the write at the boundary torn.
    Prefix,
    /// Each write independently kept, dropped or torn (per sector: old, new or garbage).
    Random,
}

impl CutMode {
    pub fn name(self) -> &'static str {
        match self {
            CutMode::LoseAll => "lose-all",
            CutMode::Prefix => "prefix",
            CutMode::Random => "random",
        }
    }
    pub fn parse(s: &str) -> Option<CutMode> {
        [CutMode::LoseAll, CutMode::Prefix, CutMode::Random].into_iter().find(|m| m.name() == s)
    }
}

/// What a cut did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    pub mode: String,
    pub pending_writes: u64,
    pub pending_bytes: u64,
    pub kept: u64,
    pub dropped: u64,
    pub torn: u64,
    pub sectors_new: u64,
    pub sectors_old: u64,
    pub sectors_garbage: u64,
    /// Pending writes per disk, in disk order.
    pub pending_per_disk: Vec<u64>,
    /// "control" (a `cut` command) or "armed" (an `arm` command's count ran out).
    pub trigger: String,
}

impl CutReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "pending_writes": self.pending_writes,
            "pending_bytes": self.pending_bytes,
            "kept": self.kept,
            "dropped": self.dropped,
            "torn": self.torn,
            "sectors_new": self.sectors_new,
            "sectors_old": self.sectors_old,
            "sectors_garbage": self.sectors_garbage,
            "pending_per_disk": self.pending_per_disk,
            "trigger": self.trigger,
        })
    }
    pub fn from_json(v: &serde_json::Value) -> CutReport {
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        CutReport {
            mode: v["mode"].as_str().unwrap_or("").to_string(),
            pending_writes: g("pending_writes"),
            pending_bytes: g("pending_bytes"),
            kept: g("kept"),
            dropped: g("dropped"),
            torn: g("torn"),
            sectors_new: g("sectors_new"),
            sectors_old: g("sectors_old"),
            sectors_garbage: g("sectors_garbage"),
            pending_per_disk: v["pending_per_disk"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default(),
            trigger: v["trigger"].as_str().unwrap_or("").to_string(),
        }
    }
    /// Did the cut lose or damage anything that was written?
    pub fn lost_something(&self) -> bool {
        self.dropped > 0 || self.torn > 0
    }
}

/// Power loss across `disks` at once, decided by `seed`: every cached write is kept, dropped or
/// torn; the survivors become durable; caches are emptied; `current` becomes the durable image.
/// `mode` None: picked by the seed (a fifth lose-all, a fifth prefix, the rest random).
pub fn cut(disks: &mut [Disk], seed: u64, mode: Option<CutMode>) -> Result<CutReport, String> {
    let mut rng = Rng::new(seed ^ 0x00c0_ffee_0000_0001);
    let picked = match rng.below(10) {
        0 | 1 => CutMode::LoseAll,
        2 | 3 => CutMode::Prefix,
        _ => CutMode::Random,
    };
    let mode = mode.unwrap_or(picked);
    let mut r = CutReport { mode: mode.name().into(), ..CutReport::default() };
    for d in disks.iter_mut() {
        let cache = std::mem::take(&mut d.cache);
        r.pending_per_disk.push(cache.len() as u64);
        r.pending_writes += cache.len() as u64;
        r.pending_bytes += cache.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        // In prefix mode, writes [0, boundary) survive, write `boundary` is torn, the rest lost.
        let boundary = if cache.is_empty() { 0 } else { rng.below(cache.len() as u64 + 1) as usize };
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for (i, (off, data)) in cache.iter().enumerate() {
            // 0 keep, 1 drop, 2 tear
            let fate = match mode {
                CutMode::LoseAll => 1,
                CutMode::Prefix => match i.cmp(&boundary) {
                    std::cmp::Ordering::Less => 0,
                    std::cmp::Ordering::Equal => 2,
                    std::cmp::Ordering::Greater => 1,
                },
                CutMode::Random => rng.below(3),
            };
            let o = *off as usize;
            match fate {
                0 => {
                    r.kept += 1;
                    d.durable[o..o + data.len()].copy_from_slice(data);
                    lo = lo.min(o);
                    hi = hi.max(o + data.len());
                }
                1 => r.dropped += 1,
                _ => {
                    r.torn += 1;
                    // Sectors are aligned to the disk, not to the write.
                    let end = o + data.len();
                    let mut s = o;
                    while s < end {
                        let e = ((s / SECTOR + 1) * SECTOR).min(end);
                        let outcome = rng.below(3);
                        // A sector-atomic drive leaves old bytes where another would leave garbage.
                        let outcome = if outcome == 2 && d.sector_atomic { 0 } else { outcome };
                        match outcome {
                            0 => r.sectors_old += 1,
                            1 => {
                                r.sectors_new += 1;
                                d.durable[s..e].copy_from_slice(&data[s - o..e - o]);
                            }
                            _ => {
                                r.sectors_garbage += 1;
                                for b in &mut d.durable[s..e] {
                                    *b = rng.next_u64() as u8;
                                }
                            }
                        }
                        s = e;
                    }
                    lo = lo.min(o);
                    hi = hi.max(end);
                }
            }
        }
        if lo < hi {
            d.persist_range(lo, hi)?;
        }
        d.current.copy_from_slice(&d.durable);
    }
    Ok(r)
}

/// The FUSE file system: the root directory holds one file per disk (inode 2, 3, …).
struct State {
    disks: Vec<Disk>,
    dead: bool,
    /// After a cut: answer later writes and fsyncs with success (still changing nothing) instead
    /// of EIO. For the teardown once no program is left to believe it: keeps ext4's unmount quiet.
    silenced: bool,
    last_cut: Option<CutReport>,
    /// An armed cut: (seed, writes still to come before it, counting only this disk's).
    armed: Option<(u64, u64, Option<usize>)>,
    trace: Option<File>,
    started: Instant,
}

impl State {
    fn trace(&mut self, line: std::fmt::Arguments<'_>) {
        if let Some(t) = &mut self.trace {
            let _ = writeln!(t, "{:.6} {line}", self.started.elapsed().as_secs_f64());
        }
    }

    fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dead": self.dead,
            "disks": self.disks.iter().map(|d| {
                let mut v = d.counters.to_json();
                v["name"] = d.name.clone().into();
                v["pending_writes"] = (d.cache.len() as u64).into();
                v
            }).collect::<Vec<_>>(),
            "last_cut": self.last_cut.as_ref().map(|c| c.to_json()),
            "armed": self.armed.map(|(_, n, _)| n),
        })
    }

    fn cut(&mut self, seed: u64, mode: Option<CutMode>, trigger: &str) -> Result<CutReport, String> {
        if self.dead {
            return Err("already cut".into());
        }
        let mut r = cut(&mut self.disks, seed, mode)?;
        r.trigger = trigger.into();
        self.dead = true;
        self.armed = None;
        self.trace(format_args!("CUT {}", r.to_json()));
        self.last_cut = Some(r.clone());
        Ok(r)
    }
}

struct DiskFs {
    state: Arc<Mutex<State>>,
}

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

fn dir_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo::ROOT,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn file_attr(ino: u64, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o600,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl DiskFs {
    fn with_disk<T>(&self, ino: INodeNo, f: impl FnOnce(&mut State, usize) -> T) -> Option<T> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = u64::from(ino).checked_sub(2)? as usize;
        if i >= s.disks.len() {
            return None;
        }
        Some(f(&mut s, i))
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if u64::from(parent) != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match s.disks.iter().position(|d| OsStr::new(&d.name) == name) {
            Some(i) => reply.entry(&TTL, &file_attr(i as u64 + 2, s.disks[i].size()), fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if u64::from(ino) == ROOT {
            return reply.attr(&TTL, &dir_attr());
        }
        match self.with_disk(ino, |s, i| s.disks[i].size()) {
            Some(size) => reply.attr(&TTL, &file_attr(u64::from(ino), size)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with_disk(ino, |s, i| s.disks[i].size()) {
            // A disk has a fixed size.
            Some(cur) if size.is_some_and(|n| n != cur) => reply.error(Errno::EPERM),
            Some(cur) => reply.attr(&TTL, &file_attr(u64::from(ino), cur)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ok = self.with_disk(ino, |s, i| {
            s.disks[i].counters.opens += 1;
            if flags.0 & libc::O_DIRECT != 0 {
                s.disks[i].counters.opens_direct += 1;
            }
            let name = s.disks[i].name.clone();
            s.trace(format_args!("open {name} flags {:#x}", flags.0));
        });
        match ok {
            Some(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = u64::from(ino).checked_sub(2).map(|i| i as usize).filter(|&i| i < s.disks.len()) else {
            return reply.error(Errno::ENOENT);
        };
        s.disks[i].counters.reads += 1;
        reply.data(s.disks[i].read(offset, size as usize));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.with_disk(ino, |s, i| {
            let (dead, silenced) = (s.dead, s.silenced);
            let d = &mut s.disks[i];
            if dead {
                d.counters.ignored_after_cut += 1;
                return if silenced { Ok(()) } else { Err(Errno::EIO) };
            }
            d.counters.writes += 1;
            d.counters.write_bytes += data.len() as u64;
            if flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0 {
                d.counters.writes_with_sync_flag += 1;
            }
            if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
                d.counters.writes_from_page_cache += 1;
            }
            if !d.write(offset, data) {
                return Err(Errno::ENOSPC);
            }
            let name = d.name.clone();
            s.trace(format_args!("W {name} {offset} {} flags {:#x} wflags {:?}", data.len(), flags.0, write_flags));
            if let Some((seed, n, only)) = s.armed.filter(|a| a.2.is_none_or(|d| d == i)) {
                if n <= 1 {
                    if let Err(e) = s.cut(seed, None, "armed") {
                        eprintln!("fams-fuse-disk: armed cut: {e}");
                    }
                    // The write was received; its fate was decided by the cut. Answer as a drive
                    // whose cache took it would have (the acknowledgement may be lost in reality too).
                } else {
                    s.armed = Some((seed, n - 1, only));
                }
            }
            Ok(())
        });
        match r {
            Some(Ok(())) => reply.written(data.len() as u32),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): not a durability barrier.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = self.with_disk(ino, |s, i| {
            let (dead, silenced) = (s.dead, s.silenced);
            let d = &mut s.disks[i];
            if dead {
                d.counters.ignored_after_cut += 1;
                return if silenced { Ok(()) } else { Err("dead".to_string()) };
            }
            if datasync {
                d.counters.fdatasyncs += 1;
            } else {
                d.counters.fsyncs += 1;
            }
            let pending = d.pending_writes();
            let name = d.name.clone();
            let r = if d.ignore_flushes { Ok(()) } else { d.flush() };
            s.trace(format_args!("S {name} datasync {datasync} pending {pending}"));
            r
        });
        match r {
            Some(Ok(())) => reply.ok(),
            Some(Err(e)) => {
                if e != "dead" {
                    eprintln!("fams-fuse-disk: {e}");
                }
                reply.error(Errno::EIO)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // The loop driver turns discard / write-zeroes into PUNCH_HOLE / ZERO_RANGE: a cached
        // write of zeros. Plain allocation changes nothing on a fixed-size disk.
        let r = self.with_disk(ino, |s, i| {
            let (dead, silenced) = (s.dead, s.silenced);
            let d = &mut s.disks[i];
            d.counters.fallocates += 1;
            if offset.checked_add(length).is_none_or(|e| e > d.size()) {
                return Err(Errno::EINVAL);
            }
            if dead {
                d.counters.ignored_after_cut += 1;
                return if silenced { Ok(()) } else { Err(Errno::EIO) };
            }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
                return Ok(());
            }
            let mut off = offset;
            let end = offset + length;
            while off < end {
                let n = (end - off).min(1 << 20);
                d.write(off, &vec![0u8; n as usize]);
                off += n;
            }
            let name = d.name.clone();
            s.trace(format_args!("Z {name} {offset} {length} mode {mode:#x}"));
            Ok(())
        });
        match r {
            Some(Ok(())) => reply.ok(),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if u64::from(ino) != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<(u64, FileType, String)> =
            vec![(ROOT, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        for (i, d) in s.disks.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, d.name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn control_loop(listener: UnixListener, state: Arc<Mutex<State>>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let state = state.clone();
        std::thread::spawn(move || {
            let Ok(mut w) = conn.try_clone() else { return };
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                let reply = control_command(&state, line.trim());
                if writeln!(w, "{reply}").is_err() {
                    return;
                }
            }
        });
    }
}

fn control_command(state: &Mutex<State>, cmd: &str) -> serde_json::Value {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let mut words = cmd.split_whitespace();
    match (words.next(), words.next()) {
        (Some("stats"), None) => s.stats_json(),
        (Some("ping"), None) => serde_json::json!({"ok": true}),
        (Some("cut"), Some(seed)) => {
            let Ok(seed) = seed.parse::<u64>() else {
                return serde_json::json!({"error": "cut SEED [MODE]: SEED is a u64"});
            };
            let mode = match words.next() {
                None => None,
                Some(m) => match CutMode::parse(m) {
                    Some(m) => Some(m),
                    None => return serde_json::json!({"error": "cut SEED [lose-all|prefix|random]"}),
                },
            };
            match s.cut(seed, mode, "control") {
                Ok(r) => {
                    let mut v = r.to_json();
                    v["stats"] = s.stats_json();
                    v
                }
                Err(e) => serde_json::json!({"error": e}),
            }
        }
        (Some("silence"), None) => {
            if !s.dead {
                return serde_json::json!({"error": "silence: only after a cut"});
            }
            s.silenced = true;
            serde_json::json!({"ok": true})
        }
        (Some("sector-atomic"), Some(name)) => {
            let on = match words.next() {
                None | Some("on") => true,
                Some("off") => false,
                Some(w) => return serde_json::json!({"error": format!("sector-atomic DISK [on|off]: not {w:?}")}),
            };
            match s.disks.iter().position(|d| d.name == name) {
                Some(i) => {
                    s.disks[i].sector_atomic = on;
                    serde_json::json!({"ok": true})
                }
                None => serde_json::json!({"error": format!("no disk {name:?}")}),
            }
        }
        (Some("ignore-flushes"), Some(name)) => match s.disks.iter().position(|d| d.name == name) {
            // A drive that lies: acknowledges flushes without making anything durable.
            Some(i) => {
                s.disks[i].ignore_flushes = true;
                serde_json::json!({"ok": true})
            }
            None => serde_json::json!({"error": format!("no disk {name:?}")}),
        },
        (Some("arm"), Some(seed)) => {
            let (Ok(seed), Some(Ok(n))) = (seed.parse::<u64>(), words.next().map(str::parse::<u64>)) else {
                return serde_json::json!({"error": "arm SEED N [DISK]: two u64s and a disk name"});
            };
            let only = match words.next() {
                None => None,
                Some(name) => match s.disks.iter().position(|d| d.name == name) {
                    Some(i) => Some(i),
                    None => return serde_json::json!({"error": format!("no disk {name:?}")}),
                },
            };
            if s.dead {
                return serde_json::json!({"error": "already cut"});
            }
            s.armed = Some((seed, n.max(1), only));
            serde_json::json!({"ok": true})
        }
        _ => {
            serde_json::json!({"error": format!("unknown command {cmd:?}: stats | ping | cut SEED [MODE] | arm SEED N [DISK] | silence | ignore-flushes DISK | sector-atomic DISK [on|off]")})
        }
    }
}

/// A `--disk NAME=IMAGE:SIZE` argument.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
}

impl DiskSpec {
    pub fn parse(s: &str) -> Result<DiskSpec, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| format!("--disk {s}: want NAME=IMAGE:SIZE"))?;
        let (image, size) = rest.rsplit_once(':').ok_or_else(|| format!("--disk {s}: want NAME=IMAGE:SIZE"))?;
        let size: u64 = size.parse().map_err(|_| format!("--disk {s}: SIZE is a number of bytes"))?;
        if name.is_empty() || name.contains('/') || size == 0 || !size.is_multiple_of(SECTOR as u64) {
            return Err(format!("--disk {s}: NAME must be a plain file name, SIZE a non-zero multiple of 512"));
        }
        Ok(DiskSpec { name: name.into(), image: image.into(), size })
    }
    pub fn arg(&self) -> String {
        format!("{}={}:{}", self.name, self.image.display(), self.size)
    }
}

const USAGE: &str = "usage: fams-fuse-disk MOUNTPOINT --disk NAME=IMAGE:SIZE [--disk …] --control SOCKET [--trace FILE]\n\
Serves each disk as MOUNTPOINT/NAME: a durable image (IMAGE) plus a volatile cache of the writes\n\
since the last fsync. Control socket commands: `stats`, `cut SEED` (power cut: cached writes kept,\n\
dropped or torn per 512-byte sector; then every write/fsync fails with EIO; MODE lose-all, prefix or\n\
random, default picked by SEED), `arm SEED N [DISK]` (cut right after the N-th next write),\n\
`silence` (after a cut: fail nothing, change nothing), `ignore-flushes DISK` (a lying drive), `sector-atomic DISK [on|off]` (tears without garbage). Prints `ready` once mounted.";

/// The `fams-fuse-disk` program.
pub fn serve_main(args: Vec<String>) -> Result<(), String> {
    let mut mountpoint = None;
    let mut specs = Vec::new();
    let mut control = None;
    let mut trace = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--disk" => specs.push(DiskSpec::parse(&it.next().ok_or(USAGE)?)?),
            "--control" => control = Some(PathBuf::from(it.next().ok_or(USAGE)?)),
            "--trace" => trace = Some(PathBuf::from(it.next().ok_or(USAGE)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ if mountpoint.is_none() && !a.starts_with('-') => mountpoint = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a:?}\n{USAGE}")),
        }
    }
    let (Some(mountpoint), Some(control)) = (mountpoint, control) else { return Err(USAGE.into()) };
    if specs.is_empty() {
        return Err(USAGE.into());
    }
    let disks = specs.iter().map(|s| Disk::open_image(&s.name, &s.image, s.size)).collect::<Result<Vec<_>, _>>()?;
    let trace = match trace {
        Some(p) => Some(File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let state = Arc::new(Mutex::new(State {
        disks,
        dead: false,
        silenced: false,
        last_cut: None,
        armed: None,
        trace,
        started: Instant::now(),
    }));
    let _ = std::fs::remove_file(&control);
    let listener = UnixListener::bind(&control).map_err(|e| format!("{}: {e}", control.display()))?;
    {
        let state = state.clone();
        std::thread::spawn(move || control_loop(listener, state));
    }
    let mut config = fuser::Config::default();
    // Mounted by root for root (the owner), which is who opens it: losetup and the loop driver.
    config.mount_options = vec![MountOption::FSName("fams-fuse-disk".into())];
    config.n_threads = Some(1); // requests are handled in the order the kernel queued them
    let session = fuser::Session::new(DiskFs { state }, &mountpoint, &config)
        .map_err(|e| format!("mounting FUSE at {}: {e}", mountpoint.display()))?;
    println!("ready");
    let _ = std::io::stdout().flush();
    session.run().map_err(|e| format!("FUSE session: {e}"))?;
    let _ = std::fs::remove_file(&control);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test's side: start, control and stop a fams-fuse-disk process.

/// A running `fams-fuse-disk`, mounted. Dropping it unmounts (lazily if busy) and ends it.
///
/// Every `FuseDisk` has a [watchdog](FuseDisk::watch): a step that depends on the FUSE program
/// (a control command, an unmount, a loop detach, waiting for a program that does I/O through
/// the drive) runs under a patience; past it the FUSE connection is aborted, every request
/// waiting on it fails, and the step reports an error naming what hung — instead of hanging CI.
pub struct FuseDisk {
    pub mountpoint: PathBuf,
    pub control: PathBuf,
    child: Option<Child>,
    watchdog: Watchdog,
}

/// How long a step that depends on the FUSE program may take before the watchdog aborts the
/// connection. Generous: a healthy step takes well under a second, even on a loaded 2-core CI
/// machine; only a wedged connection takes this long.
pub const FUSE_PATIENCE: Duration = Duration::from_secs(60);

/// The watchdog of one FUSE mount: a thread that aborts the connection when an armed step
/// outlives its deadline. Armed through [`Watchdog::watch`] / [`Watchdog::guard`] (for a
/// `FuseDisk`, [`FuseDisk::watch`] / [`FuseDisk::guard`]); any test that runs a FUSE program
/// (the `famsd mount` tests too) uses it, so that a wedged connection fails the test instead
/// of hanging CI.
pub struct Watchdog {
    shared: Arc<(Mutex<WatchState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    /// The FUSE connection number (the minor device number of the mount), once known.
    connection: Option<u32>,
    /// The FUSE program's pid: killed if the connection cannot be aborted through fusectl.
    pid: Option<u32>,
    /// Armed steps: id → (deadline, what).
    armed: std::collections::BTreeMap<u64, (Instant, String)>,
    next_id: u64,
    /// Steps that outlived their patience (the connection was aborted for them).
    fired: Vec<String>,
    stop: bool,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::new()
    }
}

impl Watchdog {
    pub fn new() -> Watchdog {
        let shared = Arc::new((Mutex::new(WatchState::default()), std::sync::Condvar::new()));
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fuse-watchdog".into())
                .spawn(move || watchdog_loop(&shared))
                .map_err(|e| eprintln!("fams-fuse-disk: no watchdog thread: {e}"))
                .ok()
        };
        Watchdog { shared, thread }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to abort when a step hangs: the FUSE connection number (see
    /// [`fuse_connection_of`]) and, if that cannot be aborted, the FUSE program to kill.
    pub fn set_target(&self, connection: Option<u32>, pid: Option<u32>) {
        let mut s = self.state();
        s.connection = connection;
        s.pid = pid;
    }

    /// Arm the watchdog for a step: if the guard is still alive after `patience`, the
    /// connection is aborted (requests waiting on it fail with ENOTCONN).
    pub fn guard(&self, what: &str, patience: Duration) -> WatchGuard {
        let mut s = self.state();
        let id = s.next_id;
        s.next_id += 1;
        // Unique, so a guard can tell its own firing from another's.
        let what = format!("{what} (step {id})");
        s.armed.insert(id, (Instant::now() + patience, what.clone()));
        drop(s);
        self.shared.1.notify_all();
        WatchGuard { shared: self.shared.clone(), id, what }
    }

    /// Run `step` under the watchdog. If it outlived `patience`, the connection was aborted and
    /// this is an error saying which step hung, whatever `step` returned after the abort.
    pub fn watch<T>(&self, what: &str, patience: Duration, step: impl FnOnce() -> T) -> Result<T, String> {
        let guard = self.guard(what, patience);
        let r = step();
        if guard.fired() {
            return Err(format!(
                "{what}: no answer from the FUSE program within {} s; the watchdog aborted the FUSE connection \
                 (a wedged FUSE program or kernel; see `dmesg` for hung tasks)",
                patience.as_secs()
            ));
        }
        Ok(r)
    }

    /// The steps whose patience ran out so far.
    pub fn fired(&self) -> Vec<String> {
        self.state().fired.clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state().stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watchdog_loop(shared: &(Mutex<WatchState>, std::sync::Condvar)) {
    let (lock, cv) = shared;
    let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if s.stop {
            return;
        }
        let now = Instant::now();
        let due: Vec<u64> = s.armed.iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect();
        if !due.is_empty() {
            let mut what = Vec::new();
            for id in due {
                if let Some((_, w)) = s.armed.remove(&id) {
                    what.push(w);
                }
            }
            let (connection, pid) = (s.connection, s.pid);
            s.fired.extend(what.iter().cloned());
            // Abort without holding the lock: steps that finish meanwhile may disarm.
            drop(s);
            let how = abort_connection(connection, pid);
            eprintln!("fams-fuse-disk watchdog: {} took too long; {how}", what.join(", "));
            s = lock.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        s = match s.armed.values().map(|(d, _)| *d).min() {
            Some(d) => cv.wait_timeout(s, d.saturating_duration_since(now)).unwrap_or_else(|p| p.into_inner()).0,
            None => cv.wait(s).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// Abort FUSE connection `connection` through fusectl (mounting fusectl at
/// /sys/fs/fuse/connections if it is not); if that fails, SIGKILL the FUSE program (its death
/// aborts the connection too). Says what it did.
pub fn abort_connection(connection: Option<u32>, pid: Option<u32>) -> String {
    let mut tried = String::new();
    if let Some(n) = connection {
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{n}/abort"));
        if !abort.exists() {
            // fusectl is not mounted by default on every distribution.
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        match std::fs::write(&abort, "1") {
            Ok(()) => return format!("aborted FUSE connection {n} ({})", abort.display()),
            Err(e) => tried = format!("writing {}: {e}; ", abort.display()),
        }
    }
    match pid {
        Some(pid) => {
            crate::signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
            format!("{tried}killed fams-fuse-disk (pid {pid}), which aborts its connection")
        }
        None => format!("{tried}nothing to abort"),
    }
}

/// The FUSE connection number of the mount at `mountpoint`: the minor device number of the
/// mount, read from /proc/self/mountinfo (a `stat` of the mount point would ask the FUSE
/// program, which may be the thing that hangs).
pub fn fuse_connection_of(mountpoint: &Path) -> Option<u32> {
    famsd::mount::mount_entry(mountpoint).filter(|m| m.fstype.starts_with("fuse")).and_then(|m| m.minor)
}

/// An armed watchdog step; disarmed when dropped.
pub struct WatchGuard {
    shared: Arc<(Mutex<WatchState>, std::sync::Condvar)>,
    id: u64,
    what: String,
}

impl WatchGuard {
    /// Did this step outlive its patience (so the connection was aborted)?
    pub fn fired(&self) -> bool {
        let s = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        !s.armed.contains_key(&self.id) && s.fired.contains(&self.what)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).armed.remove(&self.id);
    }
}

impl FuseDisk {
    /// Start `exe` serving `disks` at `mountpoint` (created if missing); returns once mounted.
    pub fn start(
        exe: &Path,
        mountpoint: &Path,
        disks: &[DiskSpec],
        control: &Path,
        trace: Option<&Path>,
    ) -> Result<FuseDisk, String> {
        std::fs::create_dir_all(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg(mountpoint).arg("--control").arg(control);
        for d in disks {
            cmd.arg("--disk").arg(d.arg());
        }
        if let Some(t) = trace {
            cmd.arg("--trace").arg(t);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
        let pid = child.id();
        let mut fd = FuseDisk {
            mountpoint: mountpoint.into(),
            control: control.into(),
            child: Some(child),
            watchdog: Watchdog::new(),
        };
        if !(read.is_ok() && line.trim() == "ready") {
            let status = fd.child.as_mut().and_then(|c| c.wait().ok());
            fd.child = None;
            return Err(format!("fams-fuse-disk did not mount at {} ({status:?})", mountpoint.display()));
        }
        let connection = fuse_connection_of(mountpoint);
        if connection.is_none() {
            eprintln!(
                "fams-fuse-disk: no FUSE mount at {} in /proc/self/mountinfo; the watchdog will kill the program instead",
                mountpoint.display()
            );
        }
        fd.watchdog.set_target(connection, Some(pid));
        Ok(fd)
    }

    /// The FUSE connection number (/sys/fs/fuse/connections/N), if it was found.
    pub fn connection(&self) -> Option<u32> {
        self.watchdog.state().connection
    }

    /// Arm the watchdog for a step that depends on the FUSE program: if the guard is still alive
    /// after `patience`, the connection is aborted (requests waiting on it fail with ENOTCONN).
    pub fn guard(&self, what: &str, patience: Duration) -> WatchGuard {
        self.watchdog.guard(&format!("{what} on {}", self.mountpoint.display()), patience)
    }

    /// Run `step` under the watchdog (see [`Self::guard`]). If it outlived `patience`, the
    /// connection was aborted and this is an error saying which step hung, whatever `step`
    /// returned after the abort released it.
    pub fn watch<T>(&self, what: &str, patience: Duration, step: impl FnOnce() -> T) -> Result<T, String> {
        let guard = self.guard(what, patience);
        let r = step();
        if guard.fired() {
            return Err(format!(
                "{what}: no answer from fams-fuse-disk at {} within {} s; the watchdog aborted the FUSE connection \
                 (a wedged FUSE program or kernel; see the kernel log, `dmesg`, for hung tasks)",
                self.mountpoint.display(),
                patience.as_secs()
            ));
        }
        Ok(r)
    }

    /// The steps whose patience ran out so far.
    pub fn watchdog_fired(&self) -> Vec<String> {
        self.watchdog.fired()
    }

    /// The program's pid while it runs. Killing it aborts the FUSE connection: every request
    /// waiting on it fails (ENOTCONN) instead of hanging.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub fn command(&self, cmd: &str) -> Result<serde_json::Value, String> {
        let mut s = UnixStream::connect(&self.control).map_err(|e| format!("{}: {e}", self.control.display()))?;
        s.set_read_timeout(Some(FUSE_PATIENCE)).ok();
        s.set_write_timeout(Some(FUSE_PATIENCE)).ok();
        // The program answers at once unless it is wedged (its lock held by a stuck request):
        // then abort the connection, so the requests behind it fail and the teardown can go on.
        let line = self.watch(&format!("control command {cmd:?}"), FUSE_PATIENCE, || {
            writeln!(s, "{cmd}").map_err(|e| format!("control {cmd:?}: {e}"))?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).map_err(|e| format!("control {cmd:?}: {e}"))?;
            Ok::<_, String>(line)
        })??;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("control answered {line:?}: {e}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("control {cmd:?}: {e}"));
        }
        Ok(v)
    }

    /// Power cut of every disk this program serves.
    pub fn cut(&self, seed: u64) -> Result<(CutReport, serde_json::Value), String> {
        let v = self.command(&format!("cut {seed}"))?;
        Ok((CutReport::from_json(&v), v["stats"].clone()))
    }

    /// Power cut in a given mode.
    pub fn cut_mode(&self, seed: u64, mode: CutMode) -> Result<(CutReport, serde_json::Value), String> {
        let v = self.command(&format!("cut {seed} {}", mode.name()))?;
        Ok((CutReport::from_json(&v), v["stats"].clone()))
    }

    /// Cut right after the `n`-th write from now (to `disk`, or to any) reaches the drive cache.
    pub fn arm(&self, seed: u64, n: u64, disk: Option<&str>) -> Result<(), String> {
        self.command(&format!("arm {seed} {n} {}", disk.unwrap_or(""))).map(|_| ())
    }

    /// Wait up to `patience` for an armed cut; its report and the stats, or None if it did not happen.
    pub fn wait_for_cut(&self, patience: Duration) -> Result<Option<(CutReport, serde_json::Value)>, String> {
        let deadline = Instant::now() + patience;
        loop {
            let v = self.stats()?;
            if v["dead"] == true {
                return Ok(Some((CutReport::from_json(&v["last_cut"]), v)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn stats(&self) -> Result<serde_json::Value, String> {
        self.command("stats")
    }

    /// Unmount and wait for the program to end (kill it if it does not).
    pub fn stop(&mut self) -> Result<(), String> {
        if self.child.is_none() {
            return Ok(());
        }
        let mut err = None;
        match self.watch("unmounting the FUSE drive", FUSE_PATIENCE, || {
            // Busy while a loop device over a drive has not let go of it yet: retry a while.
            umount_retrying(&self.mountpoint, Duration::from_secs(30))
        }) {
            Ok(true) => {}
            Ok(false) => err = Some(format!("{} stayed busy; unmounted lazily", self.mountpoint.display())),
            Err(e) => err = Some(e),
        }
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    err.get_or_insert_with(|| "fams-fuse-disk did not end after unmount; killed".into());
                    break;
                }
            }
        }
        err.map_or(Ok(()), Err)
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("fams-fuse-disk: {e}");
        }
    }
}

/// umount(2) `path`, retrying while busy; in the end detach it lazily. True if it went cleanly.
pub fn umount_retrying(path: &Path, patience: Duration) -> bool {
    use nix::errno::Errno;
    use nix::mount::{umount2, MntFlags};
    let deadline = Instant::now() + patience;
    loop {
        let e = match umount2(path, MntFlags::empty()) {
            Ok(()) => return true,
            Err(e) => e,
        };
        if e != Errno::EBUSY || Instant::now() >= deadline {
            if e == Errno::EINVAL {
                return true; // not mounted
            }
            let _ = umount2(path, MntFlags::MNT_DETACH);
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(n: usize) -> Disk {
        Disk::in_memory("d", vec![0xAA; n])
    }

    #[test]
    fn reads_see_cached_writes_and_flush_makes_them_durable() {
        let mut d = disk(4096);
        assert!(d.write(512, &[1; 1024]));
        assert_eq!(d.read(512, 4)[0], 1);
        assert_eq!(d.durable()[512], 0xAA);
        d.flush().unwrap();
        assert_eq!(d.durable()[512], 1);
        assert_eq!(d.pending_writes(), 0);
        assert!(!d.write(4000, &[0; 512]), "past the end");
    }

    #[test]
    fn a_cut_never_touches_flushed_data_and_leaves_only_old_new_or_garbage() {
        for seed in 0..300 {
            let mut d = disk(8192);
            d.write(0, &[1; 4096]);
            d.flush().unwrap();
            d.write(512, &[2; 1000]); // not sector-aligned at its end: partial sector pieces
            d.write(4096, &[3; 2048]);
            d.write(4096 + 512, &[4; 512]); // overlaps the previous
            let mut ds = [d];
            let r = cut(&mut ds, seed, None).unwrap();
            let d = &ds[0];
            assert_eq!(r.pending_writes, 3);
            assert_eq!(r.kept + r.dropped + r.torn, 3);
            assert_eq!(d.pending_writes(), 0);
            assert_eq!(d.current(), d.durable());
            // Outside the written ranges nothing changed.
            assert!(d.durable()[..512].iter().all(|&b| b == 1), "seed {seed}");
            assert!(d.durable()[1512..4096].iter().all(|&b| b == 1), "seed {seed}");
            assert!(d.durable()[4096 + 2048..].iter().all(|&b| b == 0xAA), "seed {seed}");
            if r.mode == "lose-all" {
                assert!(d.durable()[..4096].iter().all(|&b| b == 1));
                assert!(d.durable()[4096..].iter().all(|&b| b == 0xAA));
            }
            if r.torn == 0 {
                // Only whole writes or nothing: every sector is old or new, never garbage.
                for s in d.durable()[512..1512].chunks(1000) {
                    assert!(s.iter().all(|&b| b == 1) || s.iter().all(|&b| b == 2), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn cut_modes_all_occur_and_the_same_seed_gives_the_same_result() {
        let mut modes = std::collections::HashSet::new();
        for seed in 0..100 {
            let mk = || {
                let mut d = disk(1 << 16);
                for i in 0..20u64 {
                    d.write(i * 2048, &[i as u8 + 1; 3072]);
                }
                [d]
            };
            let (mut a, mut b) = (mk(), mk());
            let ra = cut(&mut a, seed, None).unwrap();
            let rb = cut(&mut b, seed, None).unwrap();
            assert_eq!(ra, rb);
            assert_eq!(a[0].durable(), b[0].durable());
            modes.insert(ra.mode);
        }
        assert_eq!(modes.len(), 3, "{modes:?}");
    }

    #[test]
    fn disk_spec_parses() {
        let s = DiskSpec::parse("log=/var/tmp/x:y.img:4194304").unwrap();
        assert_eq!((s.name.as_str(), s.image.to_str().unwrap(), s.size), ("log", "/var/tmp/x:y.img", 4194304));
        assert!(DiskSpec::parse("log=/x:100").is_err());
        assert!(DiskSpec::parse("a/b=/x:512").is_err());
    }
}
