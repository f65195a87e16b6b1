//! Real power cuts on the real kernel path.
//!
//! One `fams-fuse-disk` process serves two files, `log` and `fs`, each a simulated drive with a
//! volatile write cache (see `fams_tests::fuse_disk`). A loop device sits on each (direct I/O when
//! the kernel allows it); the fams log is the raw loop device over `log`, and the heap file lives
//! on ext4 on the loop device over `fs`. The product runs unchanged: io_uring or plain syscalls,
//! O_DIRECT, RWF_DSYNC (a FUA write; the loop device has no FUA, so the block layer follows the
//! write with a flush) or fdatasync; its checkpoints fdatasync the heap file through ext4. Every
//! flush reaches the FUSE program as an fsync of that file; everything written since is volatile.
//!
//! Each cycle: a child process (this test binary again) recovers and commits the verifiable
//! workload, printing `ack k` when commit k is durable. Then the test **cuts the power** of both
//! drives at once (each unflushed write kept, dropped or torn per 512-byte sector; afterwards
//! the drives fail every write and flush with EIO, so nothing after the cut can be acknowledged),
//! at one of these moments: while the child is still starting or recovering; after freezing it
//! (SIGSTOP; its I/O in flight lands on the dead drive); at a random instant while it runs; or
//! right after its n-th next write reaches a drive (in the FUSE request handler: between a
//! record's write and its flush). It kills the child, unmounts ext4, detaches the loop devices
//! and ends the FUSE program. Then power comes back: a new FUSE program from the durable images,
//! loop devices, ext4 (replaying its journal; every 20th time also checked with e2fsck), and
//! `Heap::open` (replaying the fams log). The heap must hold exactly the state after some commit
//! c ≥ the last acknowledged one, and never go back. The next cycle goes on from there.
//!
//! Knobs: FAMS_POWER_CUT_CYCLES, _SEED, _MAX_MS (longest run before a cut), _PROGRESS (a line
//! per cycle), _TRACE=DIR (every request the drives see, per power-on).
//!
//! Negative controls (a build with the cargo feature `mutations`): the same cuts, with each
//! deliberate bug of the heap switched on (`fams::mutations`), must find violations — see
//! `power_cuts_catch_every_heap_mutation`. In that build the clean run above is left out: a
//! mutation is switched on process-wide, and the two would share this process.
//! Root only (losetup, mount, FUSE); otherwise the test says why it skipped and passes.

use fams::{FlushMode, FormatOptions, Heap, HeapOptions, IoPath, TrackerKind};
use fams_tests::fuse_disk::{DiskCounters, DiskSpec, FuseDisk, FUSE_PATIENCE};
use fams_tests::power_rig::{cannot_run, env_u64, losetup, say, wait_stopped, LoopGuard, Rig};
use fams_tests::*;
use famsd::torture::{commit_forever, CommitterMode};
use famsd::workload::{commit_number, Model};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HEAP_SIZE: u64 = 4 << 20;
/// Small, so the log wraps and checkpoints (each one an fdatasync of the heap file through ext4)
/// happen every few cycles.
const LOG_DISK: u64 = 4 << 20;
const FS_DISK: u64 = 32 << 20;

fn heap_path(rig: &Rig) -> PathBuf {
    rig.fs_mnt().join("power-cut.heap")
}

#[derive(Default)]
struct ChildOutput {
    ready: AtomicBool,
    eof: AtomicBool,
    last_ack: AtomicU64,
    /// The highest commit number the child announced it would issue.
    issued: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Choice {
    tracker: TrackerKind,
    io_path: IoPath,
    flush_mode: FlushMode,
}

struct Config {
    cycles: u64,
    seed: u64,
    /// Longest time the child commits before the cut.
    cut_after_ms_max: u64,
    /// Check ext4 with e2fsck after every this many power-ons.
    fsck_every: u64,
    /// End the run after the first cycle with a violation (the negative controls: one is proof
    /// enough, and the cycles after it cost time).
    stop_at_first_violation: bool,
}

#[derive(Default, Debug)]
struct Report {
    cycles: u64,
    violations: u64,
    violation_details: Vec<String>,
    commits_acknowledged: u64,
    final_commit: u64,
    cuts_during_recovery: u64,
    recovered_unacknowledged: u64,
    records_replayed: u64,
    cuts_with_pending_writes: u64,
    cuts_with_pending_log_writes: u64,
    cuts_that_dropped: u64,
    cuts_that_tore: u64,
    writes_pending_at_cuts: u64,
    writes_dropped: u64,
    writes_torn: u64,
    writes_kept: u64,
    cut_modes: std::collections::BTreeMap<String, u64>,
    cut_triggers: std::collections::BTreeMap<String, u64>,
    /// Cycles whose child reported an error (the dead drive's EIO) before it was killed.
    child_saw_io_errors: u64,
    log_disk: DiskCounters,
    fs_disk: DiskCounters,
    fsck_runs: u64,
    fsck_problems: Vec<String>,
    choices: std::collections::BTreeMap<String, u64>,
    loop_dio: bool,
    seconds: f64,
}

impl Report {
    fn summary(&self) -> String {
        format!(
            "power cuts: {} cycles in {:.1} s ({:.0} ms/cycle), violations {}, commits acknowledged {}, final commit {}, \
             cut while recovering {}, recovered unacknowledged commits {} times, records replayed {}\n\
             cuts: {} with unflushed writes ({} on the log drive), {} dropped writes, {} tore writes; \
             writes pending {} → kept {}, dropped {}, torn {}; modes {:?}; when {:?}; child saw the dead drive's EIO {} times\n\
             loop direct I/O: {}; fsck after journal replay: {} runs, {} problems\n\
             log drive saw: {} writes, {} fsyncs, {} fdatasyncs, {} writes with O_DSYNC, {} from page cache, {} O_DIRECT opens, max {} unflushed writes\n\
             fs drive saw: {} writes, {} fsyncs, {} fdatasyncs, {} fallocates, max {} unflushed writes\n\
             configurations: {:?}{}",
            self.cycles,
            self.seconds,
            self.seconds * 1e3 / self.cycles.max(1) as f64,
            self.violations,
            self.commits_acknowledged,
            self.final_commit,
            self.cuts_during_recovery,
            self.recovered_unacknowledged,
            self.records_replayed,
            self.cuts_with_pending_writes,
            self.cuts_with_pending_log_writes,
            self.cuts_that_dropped,
            self.cuts_that_tore,
            self.writes_pending_at_cuts,
            self.writes_kept,
            self.writes_dropped,
            self.writes_torn,
            self.cut_modes,
            self.cut_triggers,
            self.child_saw_io_errors,
            self.loop_dio,
            self.fsck_runs,
            self.fsck_problems.len(),
            self.log_disk.writes,
            self.log_disk.fsyncs,
            self.log_disk.fdatasyncs,
            self.log_disk.writes_with_sync_flag,
            self.log_disk.writes_from_page_cache,
            self.log_disk.opens_direct,
            self.log_disk.max_pending_writes,
            self.fs_disk.writes,
            self.fs_disk.fsyncs,
            self.fs_disk.fdatasyncs,
            self.fs_disk.fallocates,
            self.fs_disk.max_pending_writes,
            self.choices,
            if self.violation_details.is_empty() {
                String::new()
            } else {
                format!("\nviolations:\n  {}", self.violation_details.join("\n  "))
            },
        )
    }
}

fn run_power_cuts(cfg: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let mut rig = Rig::new("powercut", Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk")), LOG_DISK, FS_DISK);
    // FAMS_POWER_CUT_TRACE=DIR: keep a trace of every request the drives see, per power-on.
    rig.trace = std::env::var_os("FAMS_POWER_CUT_TRACE").map(PathBuf::from);
    if let Some(d) = &rig.trace {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    // The drive is the hardware under fams, so this mutation lives in the drive, not in fams.
    if fams::mutations::current() == Some(fams::mutations::Mutation::DriveIgnoresFlushes) {
        rig.lying_drive = Some("log".into());
    }
    rig.power_on(true, false)?;
    let heap_path = heap_path(&rig);
    let mut f = FormatOptions::new(&heap_path, HEAP_SIZE);
    f.log_path = Some(rig.log_dev());
    Heap::format(&f).map_err(|e| format!("format: {e}"))?;
    // Every step that waits on the drives runs under the FUSE watchdog (see `Rig`, and the
    // guards in `run_cycles`): a wedged connection is aborted and the test fails, not hangs.
    let result = run_cycles(cfg, &mut rig, &heap_path);
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    rig.power_off()?;
    Ok(report)
}

fn run_cycles(cfg: &Config, rig: &mut Rig, heap_path: &Path) -> Result<Report, String> {
    let trackers = trackers();
    let mut report = Report { loop_dio: rig.loop_dio, ..Report::default() };
    let mut model = Model::new(HEAP_SIZE as usize, cfg.seed);
    let mut last_acked = 0u64;
    // The highest commit number any child announced: a recovered heap claiming more is damaged.
    let mut issued = 0u64;
    let mut rng = Rng::new(cfg.seed ^ 0x0070_7765_7263_7574);
    for cycle in 0..cfg.cycles {
        // Mostly the production default (io_uring + RWF_DSYNC), sometimes the other paths.
        let choice = Choice {
            tracker: trackers[rng.below(trackers.len() as u64) as usize],
            io_path: if rng.below(4) == 0 { IoPath::Sync } else { IoPath::Uring },
            flush_mode: if rng.below(4) == 0 { FlushMode::Fdatasync } else { FlushMode::Dsync },
        };
        *report
            .choices
            .entry(format!("{}+{}+{}", choice.tracker.name(), choice.io_path.name(), choice.flush_mode.name()))
            .or_default() += 1;
        let err_path = rig.dir.join("child.err");
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "power_cut_child", "--nocapture", "--test-threads=1"])
            .env("FAMS_CHILD", "1")
            .env("FAMS_PC_HEAP", heap_path)
            .env("FAMS_PC_LOG", rig.log_dev())
            .env("FAMS_PC_SEED", cfg.seed.to_string())
            .env("FAMS_PC_RUN_SEED", rng.next_u64().to_string())
            .env("FAMS_PC_TRACKER", choice.tracker.name())
            .env("FAMS_PC_IO_PATH", choice.io_path.name())
            .env("FAMS_PC_FLUSH_MODE", choice.flush_mode.name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path).map_err(|e| e.to_string())?);
        // A negative control: the child commits (and recovers) with the same deliberate bug as
        // this process, which recovers after the cut.
        match fams::mutations::current() {
            Some(m) => cmd.env("FAMS_MUTATION", m.name()),
            None => cmd.env_remove("FAMS_MUTATION"),
        };
        let mut spawned = cmd.spawn().map_err(|e| format!("spawning the child: {e}"))?;
        let mut child = ChildProc::new(&spawned);
        let out = Arc::new(ChildOutput::default());
        let reader = {
            let out = out.clone();
            let stdout = spawned.stdout.take().expect("piped");
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // libtest may have printed "test power_cut_child ... " on the same line.
                    if line.contains("ready ") {
                        out.ready.store(true, Ordering::SeqCst);
                    } else if let Some(k) = line.strip_prefix("ack ").and_then(|k| k.trim().parse::<u64>().ok()) {
                        out.last_ack.fetch_max(k, Ordering::SeqCst);
                    } else if let Some(k) = line.strip_prefix("issue ").and_then(|k| k.trim().parse::<u64>().ok()) {
                        out.issued.fetch_max(k, Ordering::SeqCst);
                    }
                }
                out.eof.store(true, Ordering::SeqCst);
            })
        };
        drop(spawned); // the pid is ours to wait for (ChildProc); std's handle neither waits nor kills
                       // The child does its I/O through the drives; freezing, cutting and killing it wait on
                       // them. A cycle takes well under a second: past the patience, the watchdog aborts the
                       // FUSE connection and the cycle fails instead of hanging.
        let child_phase =
            rig.fuse().guard(&format!("cycle {cycle}: the child's run, the cut and its kill"), FUSE_PATIENCE);

        // When and how the power goes: a tenth of the time at a random moment of start-up and
        // recovery; otherwise while the child commits: with the child frozen first (its I/O in
        // flight lands on the dead drive), at a random instant while it runs, or right after
        // its n-th next write reaches a drive (between a write and its flush).
        let how = match rng.below(20) {
            0 | 1 => "recovering",
            2..=6 => "frozen",
            7..=10 => "running",
            _ => "after-write",
        };
        *report.cut_triggers.entry(how.into()).or_default() += 1;
        if how == "recovering" {
            std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !out.ready.load(Ordering::SeqCst) && !out.eof.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
            if !out.ready.load(Ordering::SeqCst) {
                child.kill();
                let _ = reader.join();
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                return Err(format!("cycle {cycle}: the child did not start ({choice:?}): {}", err.trim()));
            }
            std::thread::sleep(Duration::from_micros(rng.below(cfg.cut_after_ms_max * 1000 + 1)));
        }
        let died_early = |child: &mut ChildProc| -> Option<String> {
            let status = child.ended()?;
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            Some(format!(
                "cycle {cycle}: the child ended before the cut (status {status:#x}, {choice:?}): {}",
                err.trim()
            ))
        };
        let seed = rng.next_u64();
        let cut_result = match how {
            "frozen" => {
                // Freeze the child so it can acknowledge nothing more, then cut the power. Its
                // I/O in flight goes on in the kernel and lands on a dead drive.
                if let Err(e) = child.stop() {
                    let _ = reader.join();
                    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                    return Err(format!("cycle {cycle}: {e} ({choice:?}): {}", err.trim()));
                }
                rig.cut(seed)
            }
            "after-write" => {
                if let Some(e) = died_early(&mut child) {
                    return Err(e);
                }
                // Mostly the log drive: the moment between a record's write and its flush.
                let disk = if rng.below(4) == 0 { None } else { Some("log") };
                rig.cut_after_writes(
                    seed,
                    1 + rng.below(if disk.is_some() { 8 } else { 24 }),
                    disk,
                    Duration::from_secs(2),
                )
            }
            _ => {
                if how == "running" {
                    if let Some(e) = died_early(&mut child) {
                        return Err(e);
                    }
                }
                rig.cut(seed)
            }
        };
        // The child dies with the power (if the dead drive's EIO has not ended it already).
        child.kill();
        let (cut, counters) = cut_result?;
        // No one is left to be told that a write succeeded: let ext4 unmount without I/O errors.
        rig.fuse().command("silence")?;
        if std::fs::read_to_string(&err_path).is_ok_and(|e| e.contains("power-cut child:")) {
            report.child_saw_io_errors += 1;
        }
        reader.join().map_err(|_| "reader thread panicked".to_string())?;
        if child_phase.fired() {
            return Err(format!(
                "cycle {cycle}: the child's run, the cut and its kill took over {} s; the watchdog aborted the FUSE connection",
                FUSE_PATIENCE.as_secs()
            ));
        }
        drop(child_phase);
        let opened = out.ready.load(Ordering::SeqCst);
        let acked = out.last_ack.load(Ordering::SeqCst);
        issued = issued.max(out.issued.load(Ordering::SeqCst));
        if acked > last_acked {
            report.commits_acknowledged += acked - last_acked;
            last_acked = acked;
        }
        if !opened {
            report.cuts_during_recovery += 1;
        }
        report.writes_pending_at_cuts += cut.pending_writes;
        report.writes_kept += cut.kept;
        report.writes_dropped += cut.dropped;
        report.writes_torn += cut.torn;
        report.cuts_with_pending_writes += (cut.pending_writes > 0) as u64;
        report.cuts_with_pending_log_writes += (cut.pending_per_disk.first().copied().unwrap_or(0) > 0) as u64;
        report.cuts_that_dropped += (cut.dropped > 0) as u64;
        report.cuts_that_tore += (cut.torn > 0) as u64;
        *report.cut_modes.entry(cut.mode.clone()).or_default() += 1;
        if let [log, fs] = counters.as_slice() {
            report.log_disk.add(log);
            report.fs_disk.add(fs);
        }

        // Power back on.
        rig.power_off()?;
        let fsck = cfg.fsck_every > 0 && (cycle + 1) % cfg.fsck_every == 0;
        if let Some(problem) = rig.power_on(false, fsck)? {
            report.fsck_problems.push(format!("cycle {cycle}: {problem}"));
        }
        report.fsck_runs += fsck as u64;
        let opts = HeapOptions { log_path: Some(rig.log_dev()), ..HeapOptions::default() };
        let recovered =
            rig.fuse().watch(&format!("cycle {cycle}: recovery"), FUSE_PATIENCE, || Heap::open(heap_path, &opts))?;
        let heap = match recovered {
            Ok(h) => h,
            Err(e) => {
                report.violations += 1;
                report.violation_details.push(format!(
                    "cycle {cycle}: recovery failed after a power cut ({} cut {how}, {} writes pending, {} dropped, {} torn; {choice:?}): {e}",
                    cut.mode, cut.pending_writes, cut.dropped, cut.torn
                ));
                report.cycles += 1;
                break; // nothing more can be checked on a heap that does not open
            }
        };
        report.records_replayed += heap.stats().recovery.records_replayed;
        let c = commit_number(heap.bytes());
        let mut violation = None;
        let ctx = || {
            format!(
                "{} cut {how}, {} writes pending, {} dropped, {} torn; {choice:?}",
                cut.mode, cut.pending_writes, cut.dropped, cut.torn
            )
        };
        if c < last_acked {
            violation = Some(format!(
                "cycle {cycle}: heap is at commit {c} but commit {last_acked} was acknowledged ({})",
                ctx()
            ));
        } else if c < model.at {
            violation = Some(format!("cycle {cycle}: heap went back from commit {} to {c} ({})", model.at, ctx()));
        } else if c > issued.max(model.at) {
            violation = Some(format!(
                "cycle {cycle}: heap claims commit {c} but the child issued only up to {} ({})",
                issued.max(model.at),
                ctx()
            ));
        } else {
            if c > last_acked {
                report.recovered_unacknowledged += 1;
            }
            model.advance_to(c);
            if let Some(at) = model.first_difference(heap.bytes()) {
                violation = Some(format!(
                    "cycle {cycle}: heap says commit {c} but differs from that state at byte {at} (page {}) ({})",
                    at / 4096,
                    ctx()
                ));
            }
        }
        if let Some(v) = violation {
            report.violations += 1;
            if report.violation_details.len() < 10 {
                report.violation_details.push(v);
            }
            // Resynchronise with what is there so later cycles are still checked.
            model.image.copy_from_slice(heap.bytes());
            model.at = c;
            last_acked = c;
        }
        report.final_commit = c;
        report.cycles += 1;
        drop(heap);
        if std::env::var_os("FAMS_POWER_CUT_PROGRESS").is_some() {
            say(&format!(
                "cycle {cycle}: {} cut {how}, pending {:?}, kept {} dropped {} torn {}, acked {last_acked}, recovered {c}, violations {}",
                cut.mode, cut.pending_per_disk, cut.kept, cut.dropped, cut.torn, report.violations
            ));
        }
        if cfg.stop_at_first_violation && report.violations > 0 {
            break;
        }
    }
    Ok(report)
}

#[cfg(not(feature = "mutations"))]
#[test]
fn power_cuts_on_a_fuse_backed_loop_device() {
    if is_child() {
        return;
    }
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("power-cut test: {why}"));
        return;
    }
    let cfg = Config {
        cycles: env_u64("FAMS_POWER_CUT_CYCLES", 240),
        seed: env_u64("FAMS_POWER_CUT_SEED", 0x00f0_5e5e_d001),
        cut_after_ms_max: env_u64("FAMS_POWER_CUT_MAX_MS", 80),
        fsck_every: 20,
        stop_at_first_violation: false,
    };
    let report = run_power_cuts(&cfg).unwrap_or_else(|e| panic!("power-cut test could not run: {e}"));
    say(&report.summary());
    assert_eq!(report.cycles, cfg.cycles, "{}", report.summary());
    assert_eq!(report.violations, 0, "{}", report.summary());
    assert!(
        report.fsck_problems.is_empty(),
        "ext4 found damage: the FUSE drive model is broken?\n{:?}",
        report.fsck_problems
    );
    assert!(report.commits_acknowledged > cfg.cycles, "the child should commit between cuts\n{}", report.summary());
    assert!(report.cuts_that_dropped > cfg.cycles / 10, "the cuts should lose unflushed writes\n{}", report.summary());
    // Coverage: a run that quietly stopped tearing writes, cutting during recovery or using
    // direct I/O below the loop devices would test less than it says.
    assert!(report.cuts_that_tore > 0, "no cut tore a write\n{}", report.summary());
    assert!(report.cuts_during_recovery > 0, "no cut landed while the child recovered\n{}", report.summary());
    assert!(report.loop_dio, "the loop devices are not in direct-I/O mode\n{}", report.summary());
    assert!(
        report.log_disk.fsyncs + report.log_disk.fdatasyncs > 0,
        "flushes should reach the drive as fsync\n{}",
        report.summary()
    );
}

/// Heap mutations these power cuts cannot catch, and why. They are not run here: a run that
/// cannot fail proves nothing. (Numbers: kernel-notes/crash-model.md.)
#[cfg(feature = "mutations")]
const NOT_VISIBLE_TO_POWER_CUTS: &[(&str, &str)] = &[(
    "write-back-before-durable",
    "the bytes written back early sit in ext4's page cache, which the cut discards together with \
     the record they ran ahead of: the drive sees them only when the heap file is flushed, i.e. at a \
     checkpoint that makes room for that very group (and the cut must land inside its fdatasync), \
     or after the kernel's writeback delay (~30 s, longer than a cycle). A SIGKILL keeps the page \
     cache: `famsd torture --mutation write-back-before-durable` catches it",
)];

/// The negative controls (a build with `--features mutations`): with each deliberate bug of the
/// heap switched on (`fams::mutations`, layer heap) — in this process, whose `Heap::open`
/// recovers after every cut, and in the child, which inherits it as `FAMS_MUTATION` — the power
/// cuts must find a violation. `drive-ignores-flushes` is the FUSE log drive's lying mode (it
/// acknowledges flushes without flushing); the others are bugs in fams's own code path. Those in
/// [`NOT_VISIBLE_TO_POWER_CUTS`] are skipped, saying why.
///
/// Each runs until its first violation, at most FAMS_POWER_CUT_CYCLES (default 500) cycles:
/// most are caught in the first few; `trust-record-without-crc` needs a torn record whose header
/// survived and whose lost sectors held entry data (seen after 25, 63 and 114 cycles, and once
/// not in 100: roughly one cycle in 70, so 500 leave it about one chance in a thousand to pass
/// unseen).
/// FAMS_POWER_CUT_MUTATIONS=a,b runs only those; FAMS_POWER_CUT_MUTATION_REPORT=FILE writes
/// `{name: {"violations", "cycles", "seconds", "first"} or {"not_visible"}}` as JSON (CI prints it beside the
/// simulator's numbers). Run with
/// `cargo test --release -p fams-tests --features mutations --test power_cut -- --nocapture`.
#[cfg(feature = "mutations")]
#[test]
fn power_cuts_catch_every_heap_mutation() {
    if is_child() {
        return;
    }
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("power-cut test: {why}"));
        return;
    }
    let only: Option<Vec<String>> =
        std::env::var("FAMS_POWER_CUT_MUTATIONS").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut results = serde_json::Map::new();
    let mut missed = Vec::new();
    for (_, name, what) in fams::mutations::of_layer(fams::mutations::Layer::Heap) {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        if let Some((_, why)) = NOT_VISIBLE_TO_POWER_CUTS.iter().find(|(n, _)| n == name) {
            say(&format!("mutation {name}: not run (power cuts cannot see it: {why})"));
            results.insert(name.to_string(), serde_json::json!({ "not_visible": why }));
            continue;
        }
        let cfg = Config {
            cycles: env_u64("FAMS_POWER_CUT_CYCLES", 500),
            seed: env_u64("FAMS_POWER_CUT_SEED", 0x0b0e_4e11),
            cut_after_ms_max: env_u64("FAMS_POWER_CUT_MAX_MS", 80),
            fsck_every: 0,
            stop_at_first_violation: true,
        };
        fams::mutations::set(name).expect("switch the mutation on");
        let report = run_power_cuts(&cfg);
        fams::mutations::set("none").expect("switch the mutation off");
        let report = report.unwrap_or_else(|e| panic!("power-cut test could not run ({name}): {e}"));
        say(&format!(
            "mutation {name} ({what}): {} violations in {} cycles ({:.1} s){}",
            report.violations,
            report.cycles,
            report.seconds,
            report.violation_details.first().map(|v| format!("\n  e.g. {v}")).unwrap_or_default()
        ));
        if report.violations == 0 {
            say(&report.summary());
            missed.push(*name);
        }
        results.insert(
            name.to_string(),
            serde_json::json!({
                "violations": report.violations,
                "cycles": report.cycles,
                "seconds": report.seconds,
                "first": report.violation_details.first(),
            }),
        );
    }
    if let Ok(path) = std::env::var("FAMS_POWER_CUT_MUTATION_REPORT") {
        std::fs::write(&path, serde_json::Value::Object(results).to_string())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    assert!(missed.is_empty(), "power cuts on the real kernel path missed the mutations {missed:?}");
}

/// The drive model seen through the real kernel path, without fams: an O_DIRECT write to the loop
/// device that was never flushed is lost at a cut; one followed by fdatasync, and one written with
/// RWF_DSYNC (a FUA write), survive.
#[test]
fn the_fuse_drive_loses_unflushed_writes_and_keeps_flushed_ones() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    if is_child() {
        return;
    }
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("power-cut test: {why}"));
        return;
    }
    let dir = TempDir::new("fusedrive");
    let exe = Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk"));
    let spec = [DiskSpec { name: "d".into(), image: dir.join("d.img"), size: 1 << 20 }];
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a non-zero-sized layout; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    // SAFETY: `buf` is a live 4096-byte allocation owned here.
    let block = unsafe { std::slice::from_raw_parts_mut(buf, 4096) };
    {
        let fuse = FuseDisk::start(exe, &dir.join("m"), &spec, &dir.join("c.sock"), None).unwrap();
        let (dev, dio) = losetup(&fuse.disk_path("d")).unwrap();
        let _loop = LoopGuard(dev.clone());
        let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&dev).unwrap();
        block.fill(1);
        f.write_all_at(block, 0).unwrap();
        f.sync_data().unwrap();
        block.fill(2);
        let iov = libc::iovec { iov_base: buf.cast(), iov_len: 4096 };
        // SAFETY: one iovec over our 4096-byte, 4096-aligned buffer.
        let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, 4096, libc::RWF_DSYNC) };
        assert_eq!(n, 4096, "{}", std::io::Error::last_os_error());
        block.fill(3);
        f.write_all_at(block, 8192).unwrap();
        let st = fuse.stats().unwrap();
        let d = &st["disks"][0];
        say(&format!(
            "fuse drive under a loop device (direct I/O {dio}): 3 O_DIRECT writes (1 + fdatasync, 1 RWF_DSYNC, 1 plain) \
             arrived as {} writes and {} fsyncs + {} fdatasyncs; {} unflushed",
            d["writes"], d["fsyncs"], d["fdatasyncs"], d["pending_writes"]
        ));
        assert_eq!(d["pending_writes"], 1, "only the plain write is unflushed: {st}");
        let (cut, _) = fuse.cut_mode(1, fams_tests::fuse_disk::CutMode::LoseAll).unwrap();
        assert_eq!((cut.pending_writes, cut.dropped), (1, 1), "{cut:?}");
        // The dead drive fails what comes after the cut.
        assert!(f.write_all_at(block, 12288).and_then(|_| f.sync_data()).is_err(), "writes after the cut must fail");
    }
    // Power back on.
    let fuse = FuseDisk::start(exe, &dir.join("m"), &spec, &dir.join("c.sock"), None).unwrap();
    let (dev, _) = losetup(&fuse.disk_path("d")).unwrap();
    let _loop = LoopGuard(dev.clone());
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&dev).unwrap();
    for (off, want) in [(0u64, 1u8), (4096, 2), (8192, 0), (12288, 0)] {
        f.read_exact_at(block, off).unwrap();
        assert!(block.iter().all(|&b| b == want), "block at {off}: want {want}, found {}", block[0]);
    }
    // SAFETY: allocated above with this layout; `block` is not used after this.
    unsafe { std::alloc::dealloc(buf, layout) };
}

/// The FUSE watchdog: with the FUSE program frozen (SIGSTOP), a read through the mount would
/// wait forever; the watchdog aborts the connection after its patience, the read fails, and
/// the step reports which step hung — the test ends instead of hanging CI.
#[test]
fn the_watchdog_aborts_a_wedged_fuse_connection() {
    use std::os::unix::fs::FileExt;
    if is_child() {
        return;
    }
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("FUSE watchdog test: {why}"));
        return;
    }
    let dir = TempDir::new("watchdog");
    let exe = Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk"));
    let spec = [DiskSpec { name: "d".into(), image: dir.join("d.img"), size: 1 << 20 }];
    let mut fuse = FuseDisk::start(exe, &dir.join("m"), &spec, &dir.join("c.sock"), None).unwrap();
    let connection = fuse.connection();
    assert!(connection.is_some(), "the FUSE mount at {} is not in /proc/self/mountinfo", dir.join("m").display());
    let pid = fuse.pid().expect("running") as libc::pid_t;
    // Freeze the FUSE program: every request to it now waits.
    // SAFETY: kill(2) on the FUSE program this test started; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Every thread of it, before the read is issued (a request it was just taking could pass).
    wait_stopped(pid as u32, Duration::from_secs(10));
    let path = fuse.disk_path("d");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&path).and_then(|f| f.read_at(&mut [0u8; 512], 0));
        let _ = tx.send(r);
    });
    // Bounded even if the watchdog did nothing: then the receive times out and the test fails.
    let mut read = None;
    let watched = fuse.watch("reading from a frozen FUSE drive", Duration::from_secs(2), || {
        read = rx.recv_timeout(Duration::from_secs(60)).ok();
    });
    // SAFETY: as above; let the program run again so it can see the aborted connection and end.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = match watched {
        Err(e) => e,
        Ok(()) => panic!("the watchdog did not fire: the read returned {read:?} within its patience"),
    };
    say(&format!("watchdog (connection {connection:?}): {err}"));
    assert!(err.contains("aborted the FUSE connection"), "{err}");
    let read = read.expect("the read still hung 60 s after the watchdog's abort");
    assert!(read.is_err(), "a read through an aborted FUSE connection must fail, got {read:?}");
    assert_eq!(fuse.watchdog_fired().len(), 1, "{:?}", fuse.watchdog_fired());
    let _ = fuse.stop();
}

/// The committing child (runs only inside the process the test starts).
#[test]
fn power_cut_child() {
    if !is_child() || std::env::var_os("FAMS_PC_HEAP").is_none() {
        return;
    }
    if let Err(e) = child_main() {
        eprintln!("power-cut child: {e}");
        let _ = std::io::stderr().flush();
        // SAFETY: leave at once, as a crash would.
        unsafe { libc::_exit(3) };
    }
}

fn child_main() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let heap_path = PathBuf::from(var("FAMS_PC_HEAP")?);
    let seed: u64 = var("FAMS_PC_SEED")?.parse().map_err(|_| "FAMS_PC_SEED")?;
    let run_seed: u64 = var("FAMS_PC_RUN_SEED")?.parse().map_err(|_| "FAMS_PC_RUN_SEED")?;
    let opts = HeapOptions {
        tracker: Some(var("FAMS_PC_TRACKER")?.parse()?),
        io_path: Some(var("FAMS_PC_IO_PATH")?.parse()?),
        flush_mode: Some(var("FAMS_PC_FLUSH_MODE")?.parse()?),
        log_path: Some(PathBuf::from(var("FAMS_PC_LOG")?)),
        ..HeapOptions::default()
    };
    let mut heap = Heap::open(&heap_path, &opts).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
    };
    // On a line of its own: libtest has printed "test power_cut_child ... " without a newline.
    say(format!("\nready {}\n", commit_number(heap.bytes())))?;
    let mode = CommitterMode { sync_commits: true };
    commit_forever(&mut heap, seed, run_seed, mode, &mut say)
}
