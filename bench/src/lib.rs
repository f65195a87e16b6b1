//! Measurements shared by the criterion benchmarks (`benches/`) and `famsd bench`: fams commits,
//! the device floor for the same bytes, the baselines doing the same durable update, and
//! recovery. Every function measures exactly what its name says, on the target it is given, so
//! the rows of one run can be compared as ratios.

pub mod file_sync;
pub mod turns;

use fams::io::{self, AlignedBuf, FlushMode, LogOpenOptions};
use fams::{FormatOptions, Heap, HeapOptions, TrackerKind, PAGE_SIZE};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Latency samples in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    pub fn p50(&self) -> f64 {
        self.percentile(0.5)
    }
    pub fn p99(&self) -> f64 {
        self.percentile(0.99)
    }
    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }
}

fn time_us(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

/// Where to measure: a directory on the device under test, and optionally a block device for the
/// log (then the floor is measured on that device too).
#[derive(Clone, Debug)]
pub struct Target {
    pub dir: PathBuf,
    pub log_device: Option<PathBuf>,
}

impl Target {
    /// For the criterion benchmarks: a fresh directory under `FAMS_BENCH_DIR` (default
    /// /var/tmp), and the block device in `FAMS_BENCH_LOG_DEVICE` for the log, if set.
    pub fn from_env() -> Target {
        let base = std::env::var_os("FAMS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!("fams-criterion-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the benchmark directory");
        Target { dir, log_device: std::env::var_os("FAMS_BENCH_LOG_DEVICE").map(PathBuf::from) }
    }

    fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    /// Format a heap in `dir` with its log on the target (a file beside it, or the device).
    pub fn format_heap(&self, name: &str, heap_bytes: u64, log_bytes: u64) -> fams::Result<PathBuf> {
        let heap = self.scratch(name);
        let mut f = FormatOptions::new(&heap, heap_bytes);
        match &self.log_device {
            Some(dev) => {
                f.log_path = Some(dev.clone());
                f.log_size_bytes = Some(log_bytes);
                f.force = true; // the user named the device for benchmarking; famsd checks it first
            }
            None => {
                let _ = std::fs::remove_file(self.dir.join(format!("{name}.log")));
                f.log_size_bytes = Some(log_bytes);
            }
        }
        Heap::format(&f)?;
        Ok(heap)
    }

    pub fn remove_heap(&self, heap: &Path) {
        let _ = std::fs::remove_file(heap);
        let _ = std::fs::remove_file(PathBuf::from(format!("{}.log", heap.display())));
    }
}

/// The device floor: one O_DIRECT write of `bytes` (rounded up to 4 KiB) made durable the way
/// the log makes its writes durable, on the same device, `iters` times.
pub fn floor_write_flush(target: &Target, bytes: usize, iters: usize, mode: FlushMode) -> std::io::Result<Samples> {
    let len = bytes.div_ceil(4096).max(1) * 4096;
    let (path, span, temp) = match &target.log_device {
        Some(dev) => (dev.clone(), io::block_device_info(dev)?.map(|i| i.size_bytes).unwrap_or(0), false),
        None => {
            let p = target.scratch("floor.scratch");
            let span = (len as u64 * 4).max(64 << 20).next_multiple_of(4096);
            io::create_log_file(&p, span)?;
            (p, span, true)
        }
    };
    let mut dev = io::open_log(&path, &LogOpenOptions { io_path: None, flush_mode: Some(mode) })?;
    let buf = AlignedBuf::zeroed(len);
    let slots = (span / len as u64).max(1);
    let mut s = Samples::default();
    for i in 0..iters {
        let off = (i as u64 % slots) * len as u64;
        s.0.push(time_us(|| dev.write_durable(&[(off, &buf)]).expect("floor write")));
    }
    drop(dev);
    if temp {
        let _ = std::fs::remove_file(&path);
    }
    Ok(s)
}

/// The device's sequential read floor: read `bytes` with O_DIRECT in 1 MiB requests, in ms.
pub fn floor_read_ms(path: &Path, bytes: u64) -> std::io::Result<f64> {
    let mut dev = io::open_log(path, &LogOpenOptions::default())?;
    let chunk = 1 << 20;
    let mut buf = AlignedBuf::zeroed(chunk);
    let size = dev.size_bytes();
    let t = Instant::now();
    let mut off = 0u64;
    while off < bytes.min(size) {
        let n = ((bytes.min(size) - off) as usize).min(chunk) / 4096 * 4096;
        if n == 0 {
            break;
        }
        dev.read_exact_at(off, &mut buf[..n])?;
        off += n as u64;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// One row of commit latency.
#[derive(Clone, Debug)]
pub struct CommitResult {
    pub pages: usize,
    /// The heap's size; every page of it is resident (read once) before the commits.
    pub heap_bytes: u64,
    pub whole_pages: bool,
    pub tracker: &'static str,
    /// The durable update as the baselines are timed: from the first write of the update to the
    /// return of `commit()`, so the tracker's write faults are charged to it.
    pub samples: Samples,
    /// `commit()` alone, for the same commits.
    pub commit_only: Samples,
    /// Log bytes written per commit (records, headers, padding).
    pub log_bytes_per_commit: f64,
    /// The floor for the same number of log bytes.
    pub floor: Samples,
    /// Comparing the dirty pages with their committed images and copying them, in plain memory
    /// (see [`compare_and_copy`]): the CPU floor the overhead target is stated against.
    pub compare_copy: Samples,
}

impl CommitResult {
    /// The most fams may add above the device floor (p50): 10 µs for one page, and 10 µs plus
    /// twice the in-run cost of comparing and copying the dirty pages for more.
    pub fn overhead_target_us(&self) -> f64 {
        if self.pages <= 1 {
            10.0
        } else {
            10.0 + 2.0 * self.compare_copy.p50()
        }
    }

    /// p50 of the whole update minus the floor's p50.
    pub fn overhead_above_floor_us(&self) -> f64 {
        self.samples.p50() - self.floor.p50()
    }
}

/// Commit latency with `pages` dirty pages per commit: one byte changed per page, or whole pages
/// rewritten. Timed twice: the whole update, from its first write to `commit()`'s return (the
/// way the baselines are timed, so a tracker's first-write faults count), and `commit()` alone.
pub fn fams_commit(
    target: &Target,
    pages: usize,
    whole_pages: bool,
    iters: usize,
    tracker: Option<TrackerKind>,
    heap_bytes_min: u64,
) -> fams::Result<CommitResult> {
    let heap_bytes = ((pages * 2 * PAGE_SIZE) as u64).max(heap_bytes_min);
    let log_bytes = (256u64 << 20).max((pages * PAGE_SIZE) as u64 * 16);
    let path = target.format_heap("bench-commit.heap", heap_bytes, log_bytes)?;
    let mut heap = Heap::open(&path, &HeapOptions { tracker, ..HeapOptions::default() })?;
    // Every page of the heap resident (read once, so mapped but clean), as in a program that
    // has been running for a while: a tracker that walks the heap's page tables pays for all of
    // them, not only for the few pages the commits touch.
    let mut sum = 0u8;
    for at in (0..heap.len()).step_by(PAGE_SIZE) {
        sum = sum.wrapping_add(heap.bytes()[at]);
    }
    std::hint::black_box(sum);
    let touch = |heap: &mut Heap, i: usize| {
        let b = heap.bytes_mut();
        for p in 0..pages {
            if whole_pages {
                b[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill((i + p) as u8);
            } else {
                b[p * PAGE_SIZE + (i * 8 + p) % PAGE_SIZE] ^= 0x5a;
            }
        }
    };
    // Warm up: the first change to each page after a checkpoint is logged whole.
    for i in 0..2 {
        touch(&mut heap, i);
        heap.commit()?;
    }
    let before = heap.stats().log_bytes_written;
    let (mut samples, mut commit_only) = (Samples::default(), Samples::default());
    for i in 0..iters {
        let update_started = Instant::now();
        touch(&mut heap, i + 2);
        let commit_started = Instant::now();
        heap.commit()?;
        samples.0.push(update_started.elapsed().as_secs_f64() * 1e6);
        commit_only.0.push(commit_started.elapsed().as_secs_f64() * 1e6);
    }
    let stats = heap.stats();
    let log_bytes_per_commit = (stats.log_bytes_written - before) as f64 / iters as f64;
    drop(heap);
    let compare_copy = compare_and_copy(pages, whole_pages, iters);
    target.remove_heap(&path);
    let floor = floor_write_flush(target, log_bytes_per_commit.round() as usize, iters, FlushMode::Dsync)
        .map_err(|e| fams::Error::InvalidArgument(format!("floor measurement failed: {e}")))?;
    Ok(CommitResult {
        pages,
        heap_bytes,
        whole_pages,
        tracker: stats.tracker,
        samples,
        commit_only,
        log_bytes_per_commit,
        floor,
        compare_copy,
    })
}

/// The least CPU work any commit of these changes does, measured in the same run: compare each
/// dirty page with its committed image and copy it once (plain memory, no tracker, no I/O).
pub fn compare_and_copy(pages: usize, whole_pages: bool, iters: usize) -> Samples {
    let mut current = vec![0u8; pages * PAGE_SIZE];
    let mut committed = current.clone();
    let mut copy = current.clone();
    let mut s = Samples::default();
    for i in 0..iters {
        for p in 0..pages {
            if whole_pages {
                current[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill((i + p) as u8);
            } else {
                current[p * PAGE_SIZE + (i * 8 + p) % PAGE_SIZE] ^= 0x5a;
            }
        }
        s.0.push(time_us(|| {
            for ((cur, old), out) in current
                .chunks_exact(PAGE_SIZE)
                .zip(committed.chunks_exact(PAGE_SIZE))
                .zip(copy.chunks_exact_mut(PAGE_SIZE))
            {
                if std::hint::black_box(cur != old) {
                    out.copy_from_slice(cur);
                }
            }
        }));
        std::hint::black_box(&copy);
        committed.copy_from_slice(&current);
    }
    s
}

/// Commits per second, 1-page commits: synchronous `commit()` vs `commit_async()` with up to
/// `depth` in flight (grouped into shared device writes), with the given tracker (None: the
/// default).
pub fn commit_rate(
    target: &Target,
    commits: usize,
    depth: usize,
    tracker: Option<TrackerKind>,
) -> fams::Result<(f64, f64, u64)> {
    let path = target.format_heap("bench-rate.heap", 64 << 20, 256 << 20)?;
    let mut heap = Heap::open(&path, &HeapOptions { tracker, ..HeapOptions::default() })?;
    let t = Instant::now();
    for i in 0..commits {
        heap.bytes_mut()[PAGE_SIZE * (1 + i % 1000) + 8] ^= 1;
        heap.commit()?;
    }
    let sync_rate = commits as f64 / t.elapsed().as_secs_f64();
    let groups_before = heap.stats().groups;
    let t = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..commits {
        heap.bytes_mut()[PAGE_SIZE * (1 + i % 1000) + 16] ^= 1;
        in_flight.push_back(heap.commit_async()?);
        if in_flight.len() > depth {
            heap.wait(in_flight.pop_front().expect("non-empty"))?;
        }
    }
    if let Some(last) = in_flight.back() {
        heap.wait(*last)?;
    }
    let async_rate = commits as f64 / t.elapsed().as_secs_f64();
    let groups = heap.stats().groups - groups_before;
    drop(heap);
    target.remove_heap(&path);
    Ok((sync_rate, async_rate, groups))
}

/// Ken's way for a 1-page update: write one new checkpoint file holding the page image and a
/// CRC, fsync it, fsync the directory.
pub fn ken_style(dir: &Path, iters: usize) -> std::io::Result<Samples> {
    let d = dir.join("ken-style");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let dirf = std::fs::File::open(&d)?;
    let mut page = vec![0u8; PAGE_SIZE + 16];
    let mut s = Samples::default();
    for i in 0..iters {
        page[i % PAGE_SIZE] ^= 1;
        let crc = crc32c::crc32c(&page[..PAGE_SIZE]);
        page[PAGE_SIZE..PAGE_SIZE + 4].copy_from_slice(&crc.to_le_bytes());
        let name = d.join(format!("turn-{i:08}"));
        s.0.push(time_us(|| {
            let mut f = std::fs::File::create(&name).expect("create turn file");
            f.write_all(&page).expect("write turn file");
            f.sync_all().expect("fsync turn file");
            dirf.sync_all().expect("fsync directory");
        }));
        if i >= 8 {
            let _ = std::fs::remove_file(d.join(format!("turn-{:08}", i - 8)));
        }
    }
    let _ = std::fs::remove_dir_all(&d);
    Ok(s)
}

/// The durable end of one Ken-style turn: a new file `path` in the directory `dir` holding the
/// turn's outgoing messages, an index of them, the dirty page numbers, the page images and a
/// CRC-32C of all that; the file is fsynced, then the directory. Returns the file's length.
///
/// Layout (little endian): `KENTURN1`, turn number u64, message count u32, page count u32; per
/// message its length u32; per page its number u64; the messages; the page images; the CRC.
pub fn ken_turn_file(
    dir: &std::fs::File,
    path: &Path,
    turn: u64,
    messages: &[&[u8]],
    pages: &[(u64, &[u8])],
) -> std::io::Result<usize> {
    let mut buf = Vec::with_capacity(
        32 + messages.iter().map(|m| 4 + m.len()).sum::<usize>() + pages.iter().map(|p| 8 + p.1.len()).sum::<usize>(),
    );
    buf.extend_from_slice(b"KENTURN1");
    buf.extend_from_slice(&turn.to_le_bytes());
    buf.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for m in messages {
        buf.extend_from_slice(&(m.len() as u32).to_le_bytes());
    }
    for (n, _) in pages {
        buf.extend_from_slice(&n.to_le_bytes());
    }
    for m in messages {
        buf.extend_from_slice(m);
    }
    for (_, image) in pages {
        buf.extend_from_slice(image);
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let mut f = std::fs::File::create(path)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    dir.sync_all()?;
    Ok(buf.len())
}

/// Plain msync(MS_SYNC) of one changed page of a MAP_SHARED file. Fast, but NOT failure-atomic:
/// a crash can leave any mix of pages, and the kernel may write pages back before msync.
pub fn msync_shared(dir: &Path, iters: usize) -> std::io::Result<Samples> {
    let p = dir.join("msync.scratch");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p)?;
    let len = 64usize << 20;
    f.set_len(len as u64)?;
    // SAFETY: a scratch file this function made and no other process opens; nothing else
    // changes its length while it is mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f)? };
    let mut s = Samples::default();
    for i in 0..iters {
        let page = (i * 7) % (len / PAGE_SIZE);
        map[page * PAGE_SIZE + i % PAGE_SIZE] ^= 1;
        s.0.push(time_us(|| map.flush_range(page * PAGE_SIZE, PAGE_SIZE).expect("msync")));
    }
    drop(map);
    let _ = std::fs::remove_file(&p);
    Ok(s)
}

/// SQLite, WAL mode, synchronous=FULL: one transaction updating one row per iteration.
#[cfg(feature = "baselines")]
pub fn sqlite_wal_full(dir: &Path, iters: usize) -> rusqlite::Result<Samples> {
    let p = dir.join("sqlite.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
    }
    let db = rusqlite::Connection::open(&p)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB NOT NULL)", [])?;
    for k in 0..1000 {
        db.execute("INSERT INTO kv VALUES (?1, ?2)", rusqlite::params![k, vec![0u8; 64]])?;
    }
    let mut s = Samples::default();
    for i in 0..iters {
        let k = (i * 7) % 1000;
        s.0.push(time_us(|| {
            db.execute("UPDATE kv SET v = ?2 WHERE k = ?1", rusqlite::params![k as i64, vec![i as u8; 64]])
                .expect("sqlite update");
        }));
    }
    drop(db);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
    }
    Ok(s)
}

/// LMDB (heed), default durable commits: one write transaction putting one key per iteration.
#[cfg(feature = "baselines")]
pub fn lmdb(dir: &Path, iters: usize) -> Result<Samples, heed::Error> {
    let d = dir.join("lmdb");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    // SAFETY: heed's contract for `open`: this process opens this environment once, and no other
    // process uses the directory (it was just created).
    let env = unsafe { heed::EnvOpenOptions::new().map_size(256 << 20).open(&d)? };
    let mut wtxn = env.write_txn()?;
    let db: heed::Database<heed::types::U64<heed::byteorder::BE>, heed::types::Bytes> =
        env.create_database(&mut wtxn, None)?;
    for k in 0..1000u64 {
        db.put(&mut wtxn, &k, &[0u8; 64])?;
    }
    wtxn.commit()?;
    let mut s = Samples::default();
    for i in 0..iters {
        let k = ((i * 7) % 1000) as u64;
        let v = [i as u8; 64];
        s.0.push(time_us(|| {
            let mut w = env.write_txn().expect("lmdb txn");
            db.put(&mut w, &k, &v).expect("lmdb put");
            w.commit().expect("lmdb commit");
        }));
    }
    drop(env);
    let _ = std::fs::remove_dir_all(&d);
    Ok(s)
}

#[derive(Clone, Debug)]
pub struct RecoveryResult {
    pub log_mib: u64,
    pub heap_bytes: u64,
    /// The log's size.
    pub log_bytes: u64,
    /// The committed records' bytes (what the floor reads).
    pub record_bytes: u64,
    pub records: u64,
    pub log_bytes_read: u64,
    pub ms: f64,
    /// Reading the records' bytes from the same device with O_DIRECT.
    pub floor_ms: f64,
}

/// Recovery time after a crash that left `log_mib` MiB of committed records in the log.
/// Building the crashed image is not timed; the time is the recovery inside `Heap::open`.
///
/// The log is sized for the records plus a margin, or `log_area_bytes` if that is larger (to
/// show that recovery reads what it replays, not the whole log). The floor is one O_DIRECT read
/// of the records' bytes: anything recovery reads beyond them counts against it.
pub fn recovery(
    target: &Target,
    log_mib: u64,
    heap_bytes: u64,
    log_area_bytes: Option<u64>,
) -> fams::Result<RecoveryResult> {
    let record_bytes = log_mib << 20;
    // Room for the records plus a margin, so nothing is checkpointed away.
    let log_bytes =
        (record_bytes + record_bytes / 4 + (4 << 20)).max(log_area_bytes.unwrap_or(0)).next_multiple_of(4096);
    let path = target.format_heap("bench-recovery.heap", heap_bytes, log_bytes)?;
    let opts = HeapOptions { checkpoint_threshold_bytes: Some(u64::MAX), ..HeapOptions::default() };
    let mut heap = Heap::open(&path, &opts)?;
    let pages = (heap.len() / PAGE_SIZE).min(16 << 10);
    let mut i = 0usize;
    let mut written = 0;
    while written < record_bytes {
        // 64 whole pages per commit, spread over the heap. A page gets lap + 1, so it differs
        // from both the zeros it started with and what the previous lap wrote: no commit is empty.
        let lap = (i * 64) / pages;
        let fill = (lap as u8).wrapping_add(1);
        for j in 0..64 {
            let p = (i * 64 + j) % pages;
            heap.bytes_mut()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(fill);
        }
        heap.commit()?;
        let now = heap.stats().log_bytes_written;
        assert!(now > written, "internal: a benchmark commit wrote nothing to the log");
        written = now;
        i += 1;
    }
    heap.abandon();
    // Neither the recovery nor the floor may share the device with the kernel's background
    // write-back of the heap file: the crashed run's write-back before the recovery, and the
    // pages the recovery replayed (left unsynced, for the first checkpoint) before the floor.
    settle();
    // The floor is read once before the recovery and once after, and the faster read counts: on
    // a virtual disk the host's cache makes one read of the same bytes faster than another, and
    // the floor must not be the slow one by luck of order.
    // The log the heap names, resolved as an open resolves it (without opening: no replay yet).
    let log_path = match &target.log_device {
        Some(dev) => dev.clone(),
        None => {
            let file = std::fs::File::open(&path)
                .map_err(|e| fams::Error::InvalidArgument(format!("{}: opening the heap: {e}", path.display())))?;
            fams::heap_file::read_header(&file, &path)?.resolve_log_path(&path)
        }
    };
    let floor = || {
        floor_read_ms(&log_path, written.next_multiple_of(4096))
            .map_err(|e| fams::Error::InvalidArgument(format!("floor read failed: {e}")))
    };
    let floor_before_ms = floor()?;
    let heap = Heap::open(&path, &HeapOptions::default())?;
    let r = heap.stats().recovery;
    drop(heap);
    settle();
    let floor_ms = floor()?.min(floor_before_ms);
    target.remove_heap(&path);
    Ok(RecoveryResult {
        log_mib,
        heap_bytes,
        log_bytes,
        record_bytes: written,
        records: r.records_replayed,
        log_bytes_read: r.log_bytes_read,
        ms: r.duration.as_secs_f64() * 1e3,
        floor_ms,
    })
}

/// Let one row's background write-back finish before the next row starts.
pub fn settle() {
    nix::unistd::sync();
    std::thread::sleep(Duration::from_millis(50));
}
