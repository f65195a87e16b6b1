//! `famsd bench --mount`: what failure-atomic fsync/msync on a `famsd mount` costs, next to
//! what a program would do instead on the plain file system beneath it, in one run on one
//! device (the file system of `--dir`):
//!
//! - the device floor: one O_DIRECT write made durable with `RWF_DSYNC` (4 KiB and 256 KiB);
//! - SQLite with `journal_mode=OFF`, `synchronous=FULL` on the mount (atomic because the mount's
//!   fsync is) vs SQLite WAL `synchronous=FULL` on the plain file system: a 1-row UPDATE
//!   transaction and a 100-row INSERT transaction;
//! - `msync(MS_SYNC)` of a `MAP_SHARED` file after changing 1 and 64 pages: on the mount
//!   (failure-atomic), on the plain file system (not atomic), and `Heap::commit` of the same
//!   pages on a heap in the same directory.
//!
//! Every sample is timed from the first write of the update to its acknowledgement (the page
//! writes and SQL statements are inside the timing). The rows are interleaved in rounds (each
//! round runs every row in turn), so drift of a shared machine spreads over all rows alike.
//!
//! The mount is real: `famsd mount --foreground` of this same binary, as a child process, over
//! a store formatted in `--dir`. It is unmounted (and the store removed) on every way out,
//! errors included; if this process dies, the child gets SIGTERM (`PR_SET_PDEATHSIG`) and
//! unmounts itself.

use crate::mount::daemon::Daemon;
use crate::mount::MountArgs;
use crate::progress::Progress;
use fams::{FormatOptions, Heap, HeapOptions, PAGE_SIZE};
use fams_bench::file_sync::{heap_dirty_and_commit, FloorWriter, MsyncFile};
use fams_bench::Samples;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// What `famsd bench --mount` runs.
pub struct MountBenchConfig {
    /// The `famsd` binary to run the mount daemon with (normally the running one).
    pub famsd: PathBuf,
    /// Directory on the device under test: the store, the mount point, the plain files, the heap.
    pub dir: PathBuf,
    pub quick: bool,
    /// Timed iterations per row (default: 1000, or 200 with `quick`).
    pub iterations: Option<usize>,
    pub progress: bool,
}

/// Pages in each file (and heap region) the msync and commit rows walk through.
const REGION_PAGES: usize = 256;
/// The bigger msync / commit.
const MANY_PAGES: usize = 64;
/// Rows in the INSERT transaction.
#[cfg(feature = "baselines")]
const INSERT_ROWS: usize = 100;
/// Untimed iterations of each row before the first round.
const WARMUP: usize = 2;

/// One measured row.
pub struct RowResult {
    pub key: &'static str,
    pub label: &'static str,
    /// The key of the floor row it is compared with.
    pub floor: &'static str,
    pub samples: Samples,
}

pub struct MountBenchReport {
    /// The file system of `--dir` (the "plain" rows and the store live on it).
    pub fstype: String,
    pub iterations: usize,
    pub rounds: usize,
    pub rows: Vec<RowResult>,
    /// The daemon's own counters at unmount (its "store statistics" log line).
    pub daemon_stats: Option<String>,
    pub seconds: f64,
}

/// The name of the file system `dir` is on (from statfs).
fn fs_name(dir: &Path) -> String {
    let Ok(s) = nix::sys::statfs::statfs(dir) else { return "unknown file system".into() };
    match s.filesystem_type().0 {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6573_5546 => "fuse".into(),
        m => format!("file system with magic {m:#x}"),
    }
}

/// A row being measured: `once(i)` makes the i-th update and returns its µs.
struct Row {
    key: &'static str,
    label: &'static str,
    floor: &'static str,
    once: Box<dyn FnMut(usize) -> Result<f64, String>>,
    next: usize,
    samples: Samples,
}

impl Row {
    fn new(
        key: &'static str,
        label: &'static str,
        floor: &'static str,
        once: impl FnMut(usize) -> Result<f64, String> + 'static,
    ) -> Row {
        Row { key, label, floor, once: Box::new(once), next: 0, samples: Samples::default() }
    }

    fn run(&mut self, n: usize, timed: bool) -> Result<(), String> {
        for _ in 0..n {
            let us = (self.once)(self.next).map_err(|e| format!("{}: {e}", self.label))?;
            self.next += 1;
            if timed {
                self.samples.0.push(us);
            }
        }
        Ok(())
    }
}

pub const FLOOR_1: &str = "floor_4k";
pub const FLOOR_64: &str = "floor_256k";

/// Every row key `famsd bench --mount` reports (the SQLite ones only with `baselines`).
pub const ROW_KEYS: &[&str] = &[
    FLOOR_1,
    FLOOR_64,
    "sqlite_mount_update_1_row",
    "sqlite_plain_wal_update_1_row",
    "sqlite_mount_insert_100_rows",
    "sqlite_plain_wal_insert_100_rows",
    "msync_mount_1_page",
    "msync_plain_1_page",
    "heap_commit_1_page",
    "msync_mount_64_pages",
    "msync_plain_64_pages",
    "heap_commit_64_pages",
];

/// An I/O error about `what`, as a message.
fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// The rows, in the order they run in each round. Everything they open is closed when they
/// are dropped (before the unmount).
fn rows(mnt: &Path, plain: &Path, heap: Rc<RefCell<Heap>>) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut floor1 = FloorWriter::create(plain, "floor-4k.scratch", PAGE_SIZE).map_err(io(plain))?;
    rows.push(Row::new(FLOOR_1, "device floor: one O_DIRECT RWF_DSYNC write, 4 KiB", FLOOR_1, move |i| {
        floor1.once(i).map_err(|e| e.to_string())
    }));
    let mut floor64 = FloorWriter::create(plain, "floor-256k.scratch", MANY_PAGES * PAGE_SIZE).map_err(io(plain))?;
    rows.push(Row::new(FLOOR_64, "device floor: one O_DIRECT RWF_DSYNC write, 256 KiB", FLOOR_64, move |i| {
        floor64.once(i).map_err(|e| e.to_string())
    }));
    sqlite_rows(&mut rows, mnt, plain)?;
    for (pages, floor) in [(1, FLOOR_1), (MANY_PAGES, FLOOR_64)] {
        let (k_mount, l_mount, k_plain, l_plain, k_heap, l_heap) = if pages == 1 {
            (
                "msync_mount_1_page",
                "msync(MS_SYNC) on the mount, 1 page (atomic)",
                "msync_plain_1_page",
                "msync(MS_SYNC) on the plain fs, 1 page (NOT atomic)",
                "heap_commit_1_page",
                "Heap::commit, 1 page",
            )
        } else {
            (
                "msync_mount_64_pages",
                "msync(MS_SYNC) on the mount, 64 pages (atomic)",
                "msync_plain_64_pages",
                "msync(MS_SYNC) on the plain fs, 64 pages (NOT atomic)",
                "heap_commit_64_pages",
                "Heap::commit, 64 pages",
            )
        };
        let p = mnt.join(format!("msync-{pages}.map"));
        let mut on_mount = MsyncFile::create(&p, REGION_PAGES).map_err(io(&p))?;
        rows.push(Row::new(k_mount, l_mount, floor, move |i| {
            on_mount.dirty_and_msync(pages, i).map_err(|e| e.to_string())
        }));
        let p = plain.join(format!("msync-{pages}.map"));
        let mut on_plain = MsyncFile::create(&p, REGION_PAGES).map_err(io(&p))?;
        rows.push(Row::new(k_plain, l_plain, floor, move |i| {
            on_plain.dirty_and_msync(pages, i).map_err(|e| e.to_string())
        }));
        let heap = heap.clone();
        // The two heap rows walk separate halves' worth of pages: [0, 256) and [256, 512).
        let base = if pages == 1 { 0 } else { REGION_PAGES };
        rows.push(Row::new(k_heap, l_heap, floor, move |i| {
            let mut h = heap.borrow_mut();
            heap_dirty_and_commit(&mut h, pages, base, REGION_PAGES, i).map_err(|e| e.to_string())
        }));
    }
    Ok(rows)
}

#[cfg(feature = "baselines")]
fn sqlite_rows(rows: &mut Vec<Row>, mnt: &Path, plain: &Path) -> Result<(), String> {
    use fams_bench::file_sync::{SqliteJournal, SqliteTable};
    let mut up_mount = SqliteTable::create(&mnt.join("update.db"), SqliteJournal::Off)?;
    rows.push(Row::new(
        "sqlite_mount_update_1_row",
        "SQLite journal=OFF on the mount: 1-row UPDATE",
        FLOOR_1,
        move |i| up_mount.update_one(i).map_err(|e| e.to_string()),
    ));
    let mut up_plain = SqliteTable::create(&plain.join("update.db"), SqliteJournal::Wal)?;
    rows.push(Row::new(
        "sqlite_plain_wal_update_1_row",
        "SQLite WAL on the plain fs: 1-row UPDATE",
        FLOOR_1,
        move |i| up_plain.update_one(i).map_err(|e| e.to_string()),
    ));
    let mut ins_mount = SqliteTable::create(&mnt.join("insert.db"), SqliteJournal::Off)?;
    rows.push(Row::new(
        "sqlite_mount_insert_100_rows",
        "SQLite journal=OFF on the mount: 100-row INSERT",
        FLOOR_1,
        move |_| ins_mount.insert_rows(INSERT_ROWS).map_err(|e| e.to_string()),
    ));
    let mut ins_plain = SqliteTable::create(&plain.join("insert.db"), SqliteJournal::Wal)?;
    rows.push(Row::new(
        "sqlite_plain_wal_insert_100_rows",
        "SQLite WAL on the plain fs: 100-row INSERT",
        FLOOR_1,
        move |_| ins_plain.insert_rows(INSERT_ROWS).map_err(|e| e.to_string()),
    ));
    Ok(())
}

#[cfg(not(feature = "baselines"))]
fn sqlite_rows(_: &mut Vec<Row>, _: &Path, _: &Path) -> Result<(), String> {
    Ok(())
}

pub fn run(cfg: &MountBenchConfig) -> Result<MountBenchReport, String> {
    crate::mount::daemon::check_can_mount("famsd bench --mount")?;
    let iterations = cfg.iterations.unwrap_or(if cfg.quick { 200 } else { 1000 }).max(1);
    let rounds = iterations.min(5);
    let per_round = iterations.div_ceil(rounds);
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let fstype = fs_name(&cfg.dir);
    let work = cfg.dir.join("mount-bench");
    let _ = std::fs::remove_dir_all(&work);
    let (mnt, plain) = (work.join("mnt"), work.join("plain"));
    for d in [&mnt, &plain] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let r = measure(cfg, &work, &mnt, &plain, rounds, per_round);
    let _ = std::fs::remove_dir_all(&work);
    let (rows, daemon_stats, seconds) = r?;
    Ok(MountBenchReport { fstype, iterations: rounds * per_round, rounds, rows, daemon_stats, seconds })
}

type Measured = (Vec<RowResult>, Option<String>, f64);

fn measure(
    cfg: &MountBenchConfig,
    work: &Path,
    mnt: &Path,
    plain: &Path,
    rounds: usize,
    per_round: usize,
) -> Result<Measured, String> {
    // The store's log and the heap's are the same size. Quick runs make smaller ones (they are
    // written whole with zeros at format time).
    let log_bytes = if cfg.quick { 16 << 20 } else { 64 << 20 };
    let format = |heap: &Path, size: u64, max: u64| {
        let mut f = FormatOptions::new(heap, size);
        f.max_size_bytes = Some(max);
        f.log_size_bytes = Some(log_bytes);
        Heap::format(&f).map(|_| ()).map_err(|e| format!("{}: {e}", heap.display()))
    };
    let store = work.join("store.heap");
    format(&store, 64 << 20, 4 << 30)?;
    let heap_path = plain.join("bench.heap");
    format(&heap_path, 64 << 20, 64 << 20)?;
    let mut p = Progress::new(cfg.progress, rounds + 2);
    p.next("mounting");
    let mut daemon = Daemon::start(&cfg.famsd, &MountArgs::new(&store, mnt), &work.join("mount.log"))?;
    let heap = Heap::open(&heap_path, &HeapOptions::default()).map_err(|e| format!("{}: {e}", heap_path.display()))?;
    let heap = Rc::new(RefCell::new(heap));
    let started = Instant::now();
    let measured = (|| {
        let mut rows = rows(mnt, plain, heap.clone())?;
        for r in rows.iter_mut() {
            r.run(WARMUP, false)?;
        }
        for round in 0..rounds {
            p.next(&format!("round {}/{rounds}: {per_round} updates per row", round + 1));
            for r in rows.iter_mut() {
                r.run(per_round, true)?;
            }
        }
        Ok::<_, String>(
            rows.into_iter()
                .map(|r| RowResult { key: r.key, label: r.label, floor: r.floor, samples: r.samples })
                .collect::<Vec<_>>(),
        )
    })();
    let seconds = started.elapsed().as_secs_f64();
    drop(heap);
    p.next("unmounting");
    let stopped = daemon.stop();
    let rows = measured?;
    stopped?;
    Ok((rows, daemon.stats(), seconds))
}

impl MountBenchReport {
    fn row(&self, key: &str) -> Option<&RowResult> {
        self.rows.iter().find(|r| r.key == key)
    }

    fn p50(&self, key: &str) -> Option<f64> {
        self.row(key).map(|r| r.samples.p50())
    }

    /// (what, numerator key, denominator key) of the ratios reported.
    const RATIOS: &'static [(&'static str, &'static str, &'static str)] = &[
        (
            "SQLite 1-row UPDATE: mount (journal OFF) / plain WAL",
            "sqlite_mount_update_1_row",
            "sqlite_plain_wal_update_1_row",
        ),
        (
            "SQLite 100-row INSERT: mount (journal OFF) / plain WAL",
            "sqlite_mount_insert_100_rows",
            "sqlite_plain_wal_insert_100_rows",
        ),
        ("msync 1 page: mount / plain fs", "msync_mount_1_page", "msync_plain_1_page"),
        ("msync 1 page: mount / Heap::commit", "msync_mount_1_page", "heap_commit_1_page"),
        ("1 page: plain msync / Heap::commit", "msync_plain_1_page", "heap_commit_1_page"),
        ("msync 64 pages: mount / plain fs", "msync_mount_64_pages", "msync_plain_64_pages"),
        ("msync 64 pages: mount / Heap::commit", "msync_mount_64_pages", "heap_commit_64_pages"),
        ("64 pages: plain msync / Heap::commit", "msync_plain_64_pages", "heap_commit_64_pages"),
    ];

    fn ratios(&self) -> Vec<(&'static str, &'static str, &'static str, f64)> {
        Self::RATIOS.iter().filter_map(|&(what, a, b)| Some((what, a, b, self.p50(a)? / self.p50(b)?))).collect()
    }

    pub fn to_json(&self, cfg: &MountBenchConfig) -> serde_json::Value {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|r| {
                let floor = self.p50(r.floor).unwrap_or(f64::NAN);
                serde_json::json!({
                    "key": r.key, "label": r.label, "samples": r.samples.0.len(),
                    "p50_us": r.samples.p50(), "p99_us": r.samples.p99(), "mean_us": r.samples.mean(),
                    "floor": r.floor, "ratio_to_floor_p50": r.samples.p50() / floor,
                })
            })
            .collect();
        let ratios: Vec<_> = self
            .ratios()
            .into_iter()
            .map(|(what, a, b, x)| serde_json::json!({"what": what, "numerator": a, "denominator": b, "ratio_p50": x}))
            .collect();
        serde_json::json!({
            "device": { "dir": cfg.dir, "fstype": self.fstype, "quick": cfg.quick },
            "timed": TIMED,
            "iterations": self.iterations, "rounds": self.rounds,
            "rows": rows,
            "ratios": ratios,
            "sqlite_rows": if cfg!(feature = "baselines") { "measured" } else { NO_SQLITE },
            "daemon_stats": self.daemon_stats,
            "seconds": self.seconds,
        })
    }

    pub fn print_table(&self) {
        println!(
            "the same small durable update, one run, one device ({} under --dir); µs, {} per row in {} interleaved rounds",
            self.fstype, self.iterations, self.rounds
        );
        println!("timed: {TIMED}\n");
        println!("{:<54} {:>9} {:>9} {:>8}", "", "p50", "p99", "÷floor");
        for r in &self.rows {
            let floor = self.p50(r.floor).unwrap_or(f64::NAN);
            let ratio = if r.key == r.floor { String::new() } else { format!("{:.2}×", r.samples.p50() / floor) };
            println!("{:<54} {:>9.0} {:>9.0} {:>8}", r.label, r.samples.p50(), r.samples.p99(), ratio);
        }
        if !cfg!(feature = "baselines") {
            println!("{:<54} {NO_SQLITE}", "SQLite rows");
        }
        println!("\nratios of p50s");
        for (what, _, _, x) in self.ratios() {
            println!("  {what:<54} {x:>6.2}×");
        }
        if let Some(s) = &self.daemon_stats {
            println!("\nthe mount daemon's counters: {s}");
        }
        println!("\n(measured in {:.0} s; the 4 KiB floor is the reference of the 1-page and SQLite rows, the 256 KiB floor of the 64-page rows)", self.seconds);
    }
}

const NO_SQLITE: &str = "not in this build (famsd was built without the `baselines` feature)";

/// What every sample times (also in the JSON).
pub const TIMED: &str = "from the first write of the update to its acknowledgement: SQLite, the statement (UPDATE, \
autocommit) or BEGIN + 100 INSERTs + COMMIT; msync, changing one byte in each of the pages through the mapping, \
then msync(MS_SYNC) of those pages; Heap::commit, changing the same bytes in the heap, then commit(); the floor, \
one write call";
