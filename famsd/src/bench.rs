//! `famsd bench`: commit latency and recovery time on the user's own device, next to the
//! device floor and the baselines, all measured in the same run and reported as ratios.

use crate::progress::Progress;
use fams::TrackerKind;
use fams_bench::{CommitResult, RecoveryResult, Samples, Target};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

pub struct BenchConfig {
    pub dir: PathBuf,
    pub log_device: Option<PathBuf>,
    pub quick: bool,
    pub force: bool,
    pub progress: bool,
}

pub struct BenchReport {
    pub commits: Vec<CommitResult>,
    pub recoveries: Vec<RecoveryResult>,
    pub baselines: Vec<(&'static str, Samples)>,
    /// Synchronous vs `commit_async` rates: the default tracker's first, then (full run) the
    /// others'.
    pub rates: Vec<RateRow>,
    pub async_commits: usize,
    pub seconds: f64,
    /// The write cache of the device the log lives on, as the kernel reports it.
    pub write_cache: Option<fams::io::WriteCacheState>,
    /// Rows this run left out, and why (for example no room for the large heap).
    pub skipped: Vec<String>,
}

/// 1-page commits per second with one tracker.
pub struct RateRow {
    pub tracker: &'static str,
    pub sync_per_s: f64,
    pub async_per_s: f64,
    /// Device writes that carried the async commits.
    pub async_groups: u64,
}

/// The large heap's size: a tracker whose commit cost follows the heap's size, not the dirty
/// pages, shows it here (every page is resident).
const LARGE_HEAP_BYTES: u64 = 4 << 30;

/// Why the large-heap row cannot run here, if it cannot: its heap file needs the disk space and
/// its resident pages the memory (page cache), with room to spare for everything else.
fn large_heap_unfit(free_disk_bytes: Option<u64>) -> Option<String> {
    let available_memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    // The heap file and its 256 MiB log, with 512 MiB to spare; the page cache for the whole
    // heap, with as much again for everything else.
    let (disk_need, memory_need) = (LARGE_HEAP_BYTES + (768 << 20), 2 * LARGE_HEAP_BYTES);
    match (free_disk_bytes, available_memory_bytes) {
        (Some(d), _) if d < disk_need => Some(format!(
            "1-page commit with a {} GiB resident heap: skipped, the directory has {} MiB free and the \
             row needs {} MiB",
            LARGE_HEAP_BYTES >> 30,
            d >> 20,
            disk_need >> 20
        )),
        (_, Some(m)) if m < memory_need => Some(format!(
            "1-page commit with a {} GiB resident heap: skipped, {} MiB of memory available and the \
             row needs {} MiB",
            LARGE_HEAP_BYTES >> 30,
            m >> 20,
            memory_need >> 20
        )),
        _ => None,
    }
}

/// Refuse a log device that holds anything we would destroy, unless forced.
pub fn check_device(dev: &Path, force: bool) -> Result<(), String> {
    let info = fams::io::block_device_info(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?
        .ok_or_else(|| format!("{}: not a block device; for a log file on a filesystem use --dir", dev.display()))?;
    if force {
        return Ok(());
    }
    if let Some(fs) = info.filesystem {
        return Err(format!(
            "{}: the device appears to hold {fs}; the benchmark overwrites it. Pass --force if that is what you want",
            dev.display()
        ));
    }
    let mut dev_io = fams::io::open_log(dev, &Default::default()).map_err(|e| e.to_string())?;
    let mut head = fams::io::AlignedBuf::zeroed(4096);
    dev_io.read_exact_at(0, &mut head).map_err(|e| e.to_string())?;
    if &head[..8] == b"FAMSLOG1" {
        return Err(format!(
            "{}: the device holds a fams log (maybe of a heap in use); the benchmark overwrites it. Pass --force if that is what you want",
            dev.display()
        ));
    }
    Ok(())
}

pub fn run(cfg: &BenchConfig) -> Result<BenchReport, String> {
    if let Some(dev) = &cfg.log_device {
        check_device(dev, cfg.force)?;
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let target = Target { dir: cfg.dir.clone(), log_device: cfg.log_device.clone() };
    let err = |e: fams::Error| e.to_string();

    // (pages, iterations, heap bytes) rows, baseline iterations, commits for the rate, (MiB of records, heap
    // bytes, log size if larger than the records need) rows. The same 16 MiB of records in a
    // small and a large log: recovery should read what it replays, not the whole log. (A raw
    // device's log is the whole device whatever is asked; files are made at the size asked.)
    type Plan = (Vec<(usize, usize, u64)>, usize, usize, Vec<(u64, u64, Option<u64>)>);
    // The large log of the full run is 8 GiB (a file written full once): only where the file
    // system has room to spare for it, else 1 GiB.
    let free_bytes =
        nix::sys::statvfs::statvfs(&cfg.dir).map(|v| v.blocks_available().saturating_mul(v.fragment_size()));
    let big_log = if cfg.quick || cfg.log_device.is_none() && free_bytes.map_or(true, |f| f < 24 << 30) {
        1 << 30
    } else {
        8 << 30
    };
    const HEAP: u64 = 64 << 20;
    let (mut page_rows, baseline_iters, rate_commits, recovery_rows): Plan = if cfg.quick {
        (
            vec![(1, 300, HEAP), (16, 150, HEAP), (256, 40, HEAP)],
            200,
            2000,
            vec![(1, 1 << 30, None), (16, 1 << 30, None), (16, 1 << 30, Some(big_log))],
        )
    } else {
        (
            vec![(1, 1000, HEAP), (16, 500, HEAP), (256, 100, HEAP), (4096, 20, HEAP)],
            1000,
            10000,
            vec![
                (1, 1 << 30, None),
                (16, 1 << 30, None),
                (256, 1 << 30, None),
                (16, 8 << 30, None),
                (16, 1 << 30, Some(big_log)),
            ],
        )
    };
    let mut skipped = Vec::new();
    match large_heap_unfit(free_bytes.ok()) {
        None => page_rows.push((1, if cfg.quick { 300 } else { 1000 }, LARGE_HEAP_BYTES)),
        Some(why) => skipped.push(why),
    }
    let trackers: Vec<Option<TrackerKind>> = if cfg.quick {
        vec![None]
    } else {
        vec![Some(TrackerKind::Uffd), Some(TrackerKind::Regions), Some(TrackerKind::Mprotect)]
    };
    let uffd = fams::tracker::uffd_available().is_ok();
    let trackers: Vec<_> = trackers
        .into_iter()
        .filter(|t| uffd || !matches!(t, Some(TrackerKind::Uffd) | Some(TrackerKind::Regions)))
        .collect();
    let mut p = Progress::new(
        cfg.progress,
        page_rows.len() * trackers.len() + BASELINES + trackers.len() + recovery_rows.len(),
    );

    let mut commits = Vec::new();
    for tracker in &trackers {
        for &(pages, iters, heap_bytes) in &page_rows {
            p.next(&format!(
                "commit, {pages} dirty pages, {} resident heap, {iters} commits + the floor",
                size_label(heap_bytes)
            ));
            commits.push(fams_bench::fams_commit(&target, pages, false, iters, *tracker, heap_bytes).map_err(err)?);
            fams_bench::settle();
        }
    }
    let mut baselines = Vec::new();
    #[cfg(feature = "baselines")]
    {
        p.next("baseline: SQLite WAL synchronous=FULL");
        baselines
            .push(("sqlite_wal", fams_bench::sqlite_wal_full(&cfg.dir, baseline_iters).map_err(|e| e.to_string())?));
        p.next("baseline: LMDB");
        baselines.push(("lmdb", fams_bench::lmdb(&cfg.dir, baseline_iters).map_err(|e| e.to_string())?));
    }
    p.next("baseline: Ken-style checkpoint file + fsync + directory fsync");
    baselines.push(("ken_style", fams_bench::ken_style(&cfg.dir, baseline_iters).map_err(|e| e.to_string())?));
    p.next("baseline: msync(MS_SYNC) of a MAP_SHARED file (not failure-atomic)");
    baselines
        .push(("msync_not_atomic", fams_bench::msync_shared(&cfg.dir, baseline_iters).map_err(|e| e.to_string())?));
    let mut rates = Vec::new();
    for tracker in &trackers {
        p.next(&format!(
            "commit rate{}: {rate_commits} synchronous vs {rate_commits} async 1-page commits",
            tracker.map(|t| format!(", {}", t.name())).unwrap_or_default()
        ));
        let (sync_per_s, async_per_s, async_groups) =
            fams_bench::commit_rate(&target, rate_commits, 64, *tracker).map_err(err)?;
        let tracker = tracker.map_or(if uffd { "uffd" } else { "mprotect" }, |t| t.name());
        rates.push(RateRow { tracker, sync_per_s, async_per_s, async_groups });
    }
    let mut recoveries = Vec::new();
    for &(log_mib, heap_bytes, log_area) in &recovery_rows {
        p.next(&format!(
            "recovery of {log_mib} MiB of records, {} GiB heap{}",
            heap_bytes >> 30,
            log_area.map(|b| format!(", {} MiB log", b >> 20)).unwrap_or_default()
        ));
        recoveries.push(fams_bench::recovery(&target, log_mib, heap_bytes, log_area).map_err(err)?);
        fams_bench::settle();
    }
    Ok(BenchReport {
        commits,
        recoveries,
        baselines,
        rates,
        async_commits: rate_commits,
        seconds: p.started.elapsed().as_secs_f64(),
        write_cache: fams::io::write_cache_state(cfg.log_device.as_deref().unwrap_or(&cfg.dir)),
        skipped,
    })
}

fn rate_json(r: &RateRow, commits: usize) -> serde_json::Value {
    serde_json::json!({
        "tracker": r.tracker, "sync_per_s": r.sync_per_s, "async_per_s": r.async_per_s,
        "async_speedup": r.async_per_s / r.sync_per_s,
        "async_device_writes": r.async_groups, "async_commits": commits,
    })
}

/// "64 MiB", "4 GiB".
fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// How many baselines this build measures (SQLite and LMDB only with the `baselines` feature).
const BASELINES: usize = if cfg!(feature = "baselines") { 4 } else { 2 };

impl BenchReport {
    /// `None` (JSON `null`) for a baseline this build does not measure.
    fn baseline_p50(&self, name: &str) -> Option<f64> {
        self.baselines.iter().find(|(n, _)| *n == name).map(|(_, s)| s.p50())
    }

    pub fn to_json(&self, cfg: &BenchConfig) -> serde_json::Value {
        let commit: Vec<_> = self
            .commits
            .iter()
            .map(|c| {
                serde_json::json!({
                    "pages": c.pages, "heap_bytes": c.heap_bytes, "heap_resident": true,
                    "tracker": c.tracker, "p50_us": c.samples.p50(), "p99_us": c.samples.p99(),
                    "commit_only_p50_us": c.commit_only.p50(), "commit_only_p99_us": c.commit_only.p99(),
                    "floor_p50_us": c.floor.p50(), "floor_p99_us": c.floor.p99(),
                    "ratio_to_floor_p50": c.samples.p50() / c.floor.p50(),
                    "overhead_above_floor_p50_us": c.overhead_above_floor_us(),
                    "compare_copy_p50_us": c.compare_copy.p50(),
                    "overhead_target_us": c.overhead_target_us(),
                    "overhead_target_met": c.overhead_above_floor_us() <= c.overhead_target_us(),
                    "log_bytes_per_commit": c.log_bytes_per_commit, "commits": c.samples.0.len(),
                })
            })
            .collect();
        let recovery: Vec<_> = self
            .recoveries
            .iter()
            .map(|r| {
                serde_json::json!({
                    "log_mib": r.log_mib, "heap_gib": r.heap_bytes as f64 / (1u64 << 30) as f64, "ms": r.ms,
                    "log_size_bytes": r.log_bytes, "record_bytes": r.record_bytes,
                    "floor_ms": r.floor_ms, "records": r.records, "log_bytes_read": r.log_bytes_read,
                    "ratio_to_floor": r.ms / r.floor_ms,
                })
            })
            .collect();
        serde_json::json!({
            "device": {
                "dir": cfg.dir, "log_device": cfg.log_device, "quick": cfg.quick,
                "write_cache": self.write_cache.as_ref().map(|w| serde_json::json!({
                    "disk": w.disk, "volatile_cache": w.volatile_cache, "fua": w.fua,
                    "rotational": w.rotational, "model": w.model,
                })),
            },
            "commit": commit,
            "recovery": recovery,
            "baselines": {
                "sqlite_wal_p50_us": self.baseline_p50("sqlite_wal"),
                "lmdb_p50_us": self.baseline_p50("lmdb"),
                "ken_style_p50_us": self.baseline_p50("ken_style"),
                "msync_not_atomic_p50_us": self.baseline_p50("msync_not_atomic"),
            },
            "commit_rate": self.rates.first().map(|r| rate_json(r, self.async_commits)),
            "commit_rates": self.rates.iter().map(|r| rate_json(r, self.async_commits)).collect::<Vec<_>>(),
            "seconds": self.seconds,
            "skipped": self.skipped,
        })
    }

    pub fn print_table(&self) {
        print_write_cache(self.write_cache.as_ref());
        println!(
            "\ndurable update (one byte changed per dirty page, timed from the first write to commit()'s return; \
             every page of the heap resident), µs; target: at most 10 µs above the floor, plus twice the in-run cost of \
             comparing and copying the dirty pages"
        );
        println!(
            "{:>8} {:>8} {:>9} {:>9} {:>9} {:>11} {:>11} {:>8} {:>13} {:>15} {:>12}",
            "pages",
            "heap",
            "tracker",
            "p50",
            "p99",
            "commit p50",
            "floor p50",
            "ratio",
            "above floor",
            "target",
            "log B/commit"
        );
        for c in &self.commits {
            let met = if c.overhead_above_floor_us() <= c.overhead_target_us() { "met" } else { "missed" };
            println!(
                "{:>8} {:>8} {:>9} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>7.2}× {:>10.0} µs {:>5.0} µs {:>6} {:>12.0}",
                c.pages,
                size_label(c.heap_bytes),
                c.tracker,
                c.samples.p50(),
                c.samples.p99(),
                c.commit_only.p50(),
                c.floor.p50(),
                c.samples.p50() / c.floor.p50(),
                c.overhead_above_floor_us(),
                c.overhead_target_us(),
                met,
                c.log_bytes_per_commit
            );
        }
        let one = self.commits.iter().find(|c| c.pages == 1).map(|c| c.samples.p50()).unwrap_or(0.0);
        for why in &self.skipped {
            println!("{why}");
        }
        println!("\nthe same durable 1-page update elsewhere, µs (p50, p99, and how many times slower than fams)");
        for (name, s) in &self.baselines {
            let label = match *name {
                "sqlite_wal" => "SQLite WAL, synchronous=FULL",
                "lmdb" => "LMDB",
                "ken_style" => "Ken-style checkpoint file",
                _ => "msync MAP_SHARED (NOT atomic)",
            };
            println!("{label:>32} {:>9.0} {:>9.0} {:>7.2}×", s.p50(), s.p99(), s.p50() / one);
        }
        if !cfg!(feature = "baselines") {
            println!("{:>32} not in this build (famsd was built without the `baselines` feature)", "SQLite, LMDB");
        }
        println!("\ncommit rate, 1-page commits (commit_async: up to 64 in flight)");
        for r in &self.rates {
            println!(
                "{:>9}: synchronous {:.0}/s, commit_async {:.0}/s ({:.1}×; {} commits in {} device writes)",
                r.tracker,
                r.sync_per_s,
                r.async_per_s,
                r.async_per_s / r.sync_per_s,
                self.async_commits,
                r.async_groups
            );
        }
        println!("\nrecovery (replay, and the look for later records up to the log's written limit), ms; floor: reading the records once");
        println!(
            "{:>11} {:>9} {:>9} {:>9} {:>9} {:>11} {:>8} {:>12}",
            "records MiB", "log MiB", "read MiB", "heap GiB", "ms", "floor ms", "ratio", "throughput"
        );
        for r in &self.recoveries {
            println!(
                "{:>11} {:>9} {:>9.1} {:>9.0} {:>9.1} {:>11.1} {:>7.2}× {:>8.0} MB/s",
                r.log_mib,
                r.log_bytes >> 20,
                r.log_bytes_read as f64 / (1u64 << 20) as f64,
                r.heap_bytes as f64 / (1u64 << 30) as f64,
                r.ms,
                r.floor_ms,
                r.ms / r.floor_ms,
                r.record_bytes as f64 / 1e6 / (r.ms / 1e3)
            );
        }
        println!("\n(measured in {:.0} s; ratios compare rows of this run on this device)", self.seconds);
    }

    /// Two log-log charts, drawn with plotters: commit latency p50 vs dirty pages (fams, the
    /// device floor for the same bytes, and each baseline's 1-page update as a horizontal line),
    /// and recovery time vs MiB of log (fams, the O_DIRECT read floor). Axes carry values and
    /// units; a legend names every line.
    pub fn svg(&self) -> Result<String, String> {
        let first = self.commits.first();
        let (tracker, heap_bytes) = (first.map(|c| c.tracker).unwrap_or_default(), first.map_or(0, |c| c.heap_bytes));
        // One line: the first tracker's rows on the usual heap (the large heap's row would put a
        // second point at one page).
        let of_tracker = || self.commits.iter().filter(|c| c.tracker == tracker && c.heap_bytes == heap_bytes);
        let fams_pts: Vec<(f64, f64)> = of_tracker().map(|c| (c.pages as f64, c.samples.p50())).collect();
        let floor_pts: Vec<(f64, f64)> = of_tracker().map(|c| (c.pages as f64, c.floor.p50())).collect();
        let base: Vec<(String, f64)> = self
            .baselines
            .iter()
            .map(|(n, s)| {
                let label = match *n {
                    "sqlite_wal" => "SQLite WAL, synchronous=FULL (1 page)",
                    "lmdb" => "LMDB (1 page)",
                    "ken_style" => "Ken-style checkpoint file (1 page)",
                    _ => "msync MAP_SHARED, not atomic (1 page)",
                };
                (label.to_string(), s.p50())
            })
            .collect();
        // One point per amount of records: the row with the log sized for them (not the row
        // that repeats them in a large log).
        let smallest_log = |r: &&RecoveryResult| {
            self.recoveries
                .iter()
                .filter(|o| o.log_mib == r.log_mib && o.heap_bytes == r.heap_bytes)
                .all(|o| o.log_bytes >= r.log_bytes)
        };
        let of_1gib = || self.recoveries.iter().filter(|r| r.heap_bytes == 1 << 30).filter(smallest_log);
        let rec: Vec<(f64, f64)> = of_1gib().map(|r| (r.log_mib as f64, r.ms)).collect();
        let rec_floor: Vec<(f64, f64)> = of_1gib().map(|r| (r.log_mib as f64, r.floor_ms)).collect();
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (1100, 460)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let (left, right) = root.split_horizontally(560);
            chart(
                &left,
                &format!("commit latency p50 ({tracker} tracker)"),
                ("dirty pages per commit", "µs"),
                &[("fams commit", BLUE, fams_pts), ("floor: O_DIRECT write + flush, same bytes", GREEN, floor_pts)],
                &base,
            )?;
            chart(
                &right,
                "recovery time (1 GiB heap)",
                ("MiB of log records", "ms"),
                &[("fams recovery", BLUE, rec), ("floor: O_DIRECT read of the same bytes", GREEN, rec_floor)],
                &[],
            )?;
            root.present().map_err(plot_err)?;
        }
        Ok(out)
    }
}

/// What the kernel says about the log device's write cache, and what that means for the figures.
fn print_write_cache(w: Option<&fams::io::WriteCacheState>) {
    let Some(w) = w else {
        println!("device: the block device under the log could not be found in sysfs (its write cache is unknown)");
        return;
    };
    let model = w.model.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
    if w.volatile_cache {
        println!(
            "device: {}{model}, volatile write cache (\"write back\"), FUA {}: every commit's durability rests on the \
             drive honouring {}. A drive (or a VM's virtual disk) that ignores flushes makes every durability figure \
             here meaningless: check its documentation, or cut its power under `famsd torture`.",
            w.disk,
            if w.fua { "yes" } else { "no (the kernel follows each durable write with a cache flush)" },
            if w.fua { "FUA writes and flushes" } else { "cache flushes" }
        );
    } else {
        println!(
            "device: {}{model}, no volatile write cache (\"write through\"): a flush costs nothing here — a drive with \
             power-loss protection, or a RAM-backed stand-in such as zram, which survives no power cut at all",
            w.disk
        );
    }
}

/// (name, colour, points) of one line in a chart.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn plot_err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the benchmark chart: {e:?}")
}

/// One log-log chart on `area`: `series` as lines with points, `hlines` (label, y) as horizontal
/// lines across the whole x range; axis descriptions `(x, y)`.
fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series<'_>],
    hlines: &[(String, f64)],
) -> Result<(), String> {
    let xs: Vec<f64> = series.iter().flat_map(|s| s.2.iter().map(|p| p.0)).filter(|x| *x > 0.0).collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .chain(hlines.iter().map(|h| h.1))
        .filter(|y| *y > 0.0)
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Ok(());
    }
    let (xmin, xmax) = (xs.iter().cloned().fold(f64::MAX, f64::min), xs.iter().cloned().fold(0.0, f64::max));
    let (ymin, ymax) = (ys.iter().cloned().fold(f64::MAX, f64::min), ys.iter().cloned().fold(0.0, f64::max));
    let (x0, x1) = (xmin / 1.5, xmax * 1.5);
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x0..x1).log_scale(), (ymin / 2.0..ymax * 4.0).log_scale())
        .map_err(plot_err)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") })
        .draw()
        .map_err(plot_err)?;
    for (name, color, pts) in series {
        let color = *color;
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_err)?;
    }
    for (i, (name, y)) in hlines.iter().enumerate() {
        let color = Palette99::pick(i + 2).to_rgba();
        c.draw_series(LineSeries::new([(x0, *y), (x1, *y)], color.stroke_width(1)))
            .map_err(plot_err)?
            .label(format!("{name}: {y:.0}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
