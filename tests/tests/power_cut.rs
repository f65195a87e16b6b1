//! Real power cuts on the real kernel path.
//!
//! One `fams-fuse-disk` process serves two files, `log` and `fs`, each a simulated drive with a
//! volatile write cache (see `fams_tests::fuse_disk`). A loop device sits on each (direct I/O when
//! the kernel allows it), with ext4 on the one over `fs`. Two heaps live on this machine, in the
//! two layouts users have: the *raw-log* heap keeps its fams log on the raw loop device over `log`
//! (O_DIRECT, RWF_DSYNC becomes a FUA write, which the loop device turns into write + flush), and
//! the *file-log* heap is what `famsd format` makes by default, heap file and log file side by
//! side on ext4 (RWF_DSYNC or a separate fdatasync through ext4). The product runs unchanged: io_uring
//! or plain syscalls, either flush mode; its checkpoints fdatasync the heap file through ext4.
//! Every flush reaches the FUSE program as an fsync of that file; everything written since is
//! volatile.
//!
//! Each cycle: a child process (this test binary again) recovers one of the heaps and commits the
//! verifiable workload, printing `ack k` when commit k is durable. Then the test **cuts the
//! power** of both drives at once (each unflushed write kept, dropped or torn per 512-byte sector;
//! afterwards the drives fail every write and flush with EIO, so nothing after the cut can be
//! acknowledged), at one of these moments: while the child is still starting or recovering; after
//! freezing it (SIGSTOP; its I/O in flight lands on the dead drive); at a random instant while it
//! runs; right after its n-th next write reaches a drive (in the FUSE request handler: between a
//! record's write and its flush); once it has filled the log with several MiB of records — and
//! then the next child, recovering that log, is cut inside its recovery, in each phase in turn (at
//! a random record of the replay, in the heap file's fdatasync, in the superblock write; the
//! child announces them). It kills the child, unmounts ext4, detaches the loop devices and ends
//! the FUSE program. Then power comes back: a new FUSE program from the durable images, loop
//! devices, ext4 (replaying its journal; every 20th time also checked with e2fsck). The test then
//! replays the heap's log **in memory** (`famsd::workload::recovered_image`), leaving the files
//! as the cut left them, so the next child's own open replays a real log. The recovered state must
//! be exactly the state after some commit c ≥ the last acknowledged one, never going back, and
//! the next child's own recovery must produce exactly those bytes (it prints their checksum). At
//! the end, this process opens both heaps for real and compares too.
//!
//! Knobs: FAMS_POWER_CUT_CYCLES, _SEED, _MAX_MS (longest run before a cut), _PROGRESS (a line
//! per cycle), _TRACE=DIR (every request the drives see, per power-on).
//!
//! Negative controls (a build with the cargo feature `mutations`): the same cuts, with each
//! deliberate bug of the heap switched on (`fams::mutations`), must find violations — see
//! `power_cuts_catch_every_heap_mutation`. In that build the clean run above is left out: a
//! mutation is switched on process-wide, and the two would share this process.
//! Root only (losetup, mount, FUSE); otherwise the test says why it skipped and passes.

use fams::recovery::Phase;
use fams::{FlushMode, FormatOptions, Heap, HeapOptions, IoPath, TrackerKind};
use fams_tests::fuse_disk::{DiskCounters, DiskSpec, FuseDisk, FUSE_PATIENCE};
use fams_tests::power_rig::{cannot_run, env_u64, losetup, say, wait_stopped, LoopGuard, Rig};
use fams_tests::*;
use famsd::torture::{commit_forever, CommitterMode};
use famsd::workload::{commit_number, fingerprint, recovered_image, Model, RecoveredImage};
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
/// The log file of the default layout, on ext4 beside its heap file: small too, for the same
/// reason.
const FILE_LOG_SIZE: u64 = 4 << 20;

#[derive(Default)]
struct ChildOutput {
    ready: AtomicBool,
    eof: AtomicBool,
    last_ack: AtomicU64,
    /// The highest commit number the child announced it would issue.
    issued: AtomicU64,
    /// What the child's own recovery produced: (commit, crc of the heap bytes).
    recovered: std::sync::Mutex<Option<(u64, u32)>>,
    /// The last recovery phase the child announced (`done` once recovery is over).
    phase: std::sync::Mutex<Option<String>>,
}

/// Wait (bounded) until the child prints a line starting with `want`; false if its output ended
/// or the time ran out first.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, want: &str, patience: Duration) -> bool {
    wait_for_any_line(lines, &[want], patience).is_some()
}

/// Wait for a line starting with one of `wants`; which one, or None past `patience`.
fn wait_for_any_line(lines: &std::sync::mpsc::Receiver<String>, wants: &[&str], patience: Duration) -> Option<usize> {
    let deadline = Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(i) = wants.iter().position(|w| line.starts_with(w)) {
                    return Some(i);
                }
            }
            Err(_) => return None,
        }
    }
}

/// The two ways a heap and its log are laid out on the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The log on the raw loop device over the `log` drive, the heap file on ext4.
    RawLog,
    /// What `famsd format` makes by default: heap file and log file side by side on ext4.
    FileLog,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::RawLog => "raw-log",
            Layout::FileLog => "file-log",
        }
    }
    fn heap_path(self, rig: &Rig) -> PathBuf {
        match self {
            Layout::RawLog => rig.fs_mnt().join("power-cut.heap"),
            Layout::FileLog => rig.fs_mnt().join("power-cut-file.heap"),
        }
    }
    /// The log to pass when opening (None: the one the heap file names).
    fn log(self, rig: &Rig) -> Option<PathBuf> {
        match self {
            Layout::RawLog => Some(rig.log_dev()),
            Layout::FileLog => None,
        }
    }
}

/// What the test knows about one heap across cycles.
struct HeapState {
    layout: Layout,
    model: Model,
    last_acked: u64,
    /// The highest commit number any child announced: a recovered heap claiming more is damaged.
    issued: u64,
    /// What recovering its files as they are now yields (verified against the model); the next
    /// child's own recovery must produce exactly these bytes.
    expected: RecoveredImage,
    /// The next child on this heap is to be cut inside this recovery phase (its log was filled).
    cut_in: Option<Phase>,
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
    /// Make every cut that is not aimed at a recovery phase this kind (a negative control that
    /// only one kind of cut can show); None: the usual mix.
    cut_focus: Option<&'static str>,
}

#[derive(Default, Debug)]
struct Report {
    cycles: u64,
    violations: u64,
    violation_details: Vec<String>,
    commits_acknowledged: u64,
    final_commit: u64,
    cuts_during_recovery: u64,
    /// Cuts that landed inside a recovery with records to replay, by the phase it had reached.
    cuts_in_phase: std::collections::BTreeMap<&'static str, u64>,
    /// Children that filled the log (several MiB of records, checkpoints held back).
    fills: u64,
    /// Cuts aimed at the heap's sync that came right after a recovery which kept its replayed
    /// records in the log instead (the next open of that heap then syncs, and is cut there).
    cuts_after_a_kept_stretch: u64,
    /// Cycles per layout.
    layouts: std::collections::BTreeMap<&'static str, u64>,
    /// Children's recoveries (and the final ones here) compared byte for byte with the verified
    /// in-memory replay of the same files.
    real_recoveries_compared: u64,
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
             cut while recovering {} (inside a replaying recovery, by phase: {:?}; {} fills; {} after a recovery kept its stretch), \
             recovered unacknowledged commits {} times, records replayed {}, real recoveries compared {}\n\
             layouts {:?}\n\
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
            self.cuts_in_phase,
            self.fills,
            self.cuts_after_a_kept_stretch,
            self.recovered_unacknowledged,
            self.records_replayed,
            self.real_recoveries_compared,
            self.layouts,
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

impl Report {
    /// Fold in the report of a run beside this one (another rig, another seed).
    fn absorb(&mut self, o: Report) {
        fn add<K: Ord>(a: &mut std::collections::BTreeMap<K, u64>, b: std::collections::BTreeMap<K, u64>) {
            for (k, v) in b {
                *a.entry(k).or_default() += v;
            }
        }
        self.cycles += o.cycles;
        self.violations += o.violations;
        self.violation_details.extend(o.violation_details);
        self.commits_acknowledged += o.commits_acknowledged;
        self.final_commit = self.final_commit.max(o.final_commit);
        self.cuts_during_recovery += o.cuts_during_recovery;
        add(&mut self.cuts_in_phase, o.cuts_in_phase);
        self.fills += o.fills;
        self.cuts_after_a_kept_stretch += o.cuts_after_a_kept_stretch;
        add(&mut self.layouts, o.layouts);
        self.real_recoveries_compared += o.real_recoveries_compared;
        self.recovered_unacknowledged += o.recovered_unacknowledged;
        self.records_replayed += o.records_replayed;
        self.cuts_with_pending_writes += o.cuts_with_pending_writes;
        self.cuts_with_pending_log_writes += o.cuts_with_pending_log_writes;
        self.cuts_that_dropped += o.cuts_that_dropped;
        self.cuts_that_tore += o.cuts_that_tore;
        self.writes_pending_at_cuts += o.writes_pending_at_cuts;
        self.writes_dropped += o.writes_dropped;
        self.writes_torn += o.writes_torn;
        self.writes_kept += o.writes_kept;
        add(&mut self.cut_modes, o.cut_modes);
        add(&mut self.cut_triggers, o.cut_triggers);
        self.child_saw_io_errors += o.child_saw_io_errors;
        self.log_disk.add(&o.log_disk);
        self.fs_disk.add(&o.fs_disk);
        self.fsck_runs += o.fsck_runs;
        self.fsck_problems.extend(o.fsck_problems);
        add(&mut self.choices, o.choices);
        self.loop_dio &= o.loop_dio;
        self.seconds = self.seconds.max(o.seconds);
    }
}

fn run_power_cuts(cfg: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let mut rig = Rig::new("powercut", Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk")), LOG_DISK, FS_DISK);
    // FAMS_POWER_CUT_TRACE=DIR: keep a trace of every request the drives see, per power-on.
    // (One directory per seed: runs side by side would otherwise write the same files.)
    rig.trace = std::env::var_os("FAMS_POWER_CUT_TRACE").map(|d| PathBuf::from(d).join(format!("seed-{:x}", cfg.seed)));
    if let Some(d) = &rig.trace {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    // The drive is the hardware under fams, so this mutation lives in the drive, not in fams.
    if fams::mutations::current() == Some(fams::mutations::Mutation::DriveIgnoresFlushes) {
        rig.lying_drive = Some("log".into());
    }
    rig.power_on(true, false)?;
    let mut heaps = Vec::new();
    for layout in [Layout::RawLog, Layout::FileLog] {
        let heap_path = layout.heap_path(&rig);
        let mut f = FormatOptions::new(&heap_path, HEAP_SIZE);
        f.log_path = layout.log(&rig);
        if layout == Layout::FileLog {
            f.log_size_bytes = Some(FILE_LOG_SIZE);
        }
        Heap::format(&f).map_err(|e| format!("format ({}): {e}", layout.name()))?;
        let expected = recovered_image(&heap_path, layout.log(&rig).as_deref())?;
        heaps.push(HeapState {
            layout,
            model: Model::new(HEAP_SIZE as usize, cfg.seed ^ layout as u64),
            last_acked: 0,
            issued: 0,
            expected,
            cut_in: None,
        });
    }
    // Every step that waits on the drives runs under the FUSE watchdog (see `Rig`, and the
    // guards in `run_cycles`): a wedged connection is aborted and the test fails, not hangs.
    let result = run_cycles(cfg, &mut rig, &mut heaps);
    let mut report = result?;
    // Last, the real thing in this process: opening each heap must give what was verified.
    for h in &heaps {
        let (heap_path, log) = (h.layout.heap_path(&rig), h.layout.log(&rig));
        let opts = HeapOptions { log_path: log, ..HeapOptions::default() };
        let what = format!("final recovery of the {} heap", h.layout.name());
        match rig.fuse().watch(&what, FUSE_PATIENCE, || Heap::open(&heap_path, &opts))? {
            Ok(heap) => {
                report.real_recoveries_compared += 1;
                if fingerprint(heap.bytes()) != h.expected.crc() {
                    report.violations += 1;
                    report.violation_details.push(format!(
                        "{what}: commit {} but the in-memory replay of the same files gives commit {}, or other bytes",
                        commit_number(heap.bytes()),
                        commit_number(&h.expected.bytes)
                    ));
                }
            }
            Err(e) => {
                report.violations += 1;
                report.violation_details.push(format!("{what} failed: {e}"));
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    rig.power_off()?;
    Ok(report)
}

fn run_cycles(cfg: &Config, rig: &mut Rig, heaps: &mut [HeapState]) -> Result<Report, String> {
    let trackers = trackers();
    let mut report = Report { loop_dio: rig.loop_dio, ..Report::default() };
    let mut rng = Rng::new(cfg.seed ^ 0x0070_7765_7263_7574);
    let mut next_phase = 0usize;
    // Opens in a row aimed at the heap's sync that kept their replayed stretch instead.
    let mut deferred_in_a_row = 0u32;
    for cycle in 0..cfg.cycles {
        // A heap whose log was just filled is recovered (and cut) next; otherwise either layout.
        let which = match heaps.iter().position(|h| h.cut_in.is_some()) {
            Some(i) => i,
            None => rng.below(heaps.len() as u64) as usize,
        };
        let h = &mut heaps[which];
        *report.layouts.entry(h.layout.name()).or_default() += 1;
        // With the raw log, ext4 holds only the heap file, and its drive tears with garbage as
        // the log's does (torn heap pages are what the full page images after a checkpoint are
        // for). With the log file on ext4 too, its drive tears per sector without garbage: ext4
        // refused to mount after one such cut (see `fams_tests::fuse_disk`).
        let atomic = if h.layout == Layout::FileLog { "on" } else { "off" };
        rig.fuse().command(&format!("sector-atomic fs {atomic}"))?;
        let heap_path = h.layout.heap_path(rig);
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

        // When and how the power goes: inside the recovery of a log the previous child filled,
        // in the phase whose turn it is; else a tenth of the time at a random moment of
        // start-up and recovery; else while the child commits: with the child frozen first (its
        // I/O in flight lands on the dead drive), at a random instant while it runs, right
        // after its n-th next write reaches a drive (between a write and its flush), or once it
        // has filled the log with several MiB of records for the next child to replay.
        let how = match h.cut_in.take() {
            Some(Phase::Replay) => "in-replay",
            Some(Phase::HeapSync) => "in-heap-sync",
            Some(_) => "in-superblock",
            None if cfg.cut_focus.is_some() => cfg.cut_focus.unwrap_or_default(),
            None => match rng.below(20) {
                0 | 1 => "recovering",
                2..=5 => "frozen",
                6..=8 => "running",
                9..=10 if cycle + 1 < cfg.cycles => "filled",
                _ => "after-write",
            },
        };
        *report.cut_triggers.entry(how.into()).or_default() += 1;
        let log_bytes = match h.layout {
            Layout::RawLog => LOG_DISK,
            Layout::FileLog => FILE_LOG_SIZE,
        };
        let err_path = rig.dir.join("child.err");
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "power_cut_child", "--nocapture", "--test-threads=1"])
            .env("FAMS_CHILD", "1")
            .env("FAMS_PC_HEAP", &heap_path)
            .env("FAMS_PC_SEED", h.model.seed.to_string())
            .env("FAMS_PC_RUN_SEED", rng.next_u64().to_string())
            .env("FAMS_PC_TRACKER", choice.tracker.name())
            .env("FAMS_PC_IO_PATH", choice.io_path.name())
            .env("FAMS_PC_FLUSH_MODE", choice.flush_mode.name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path).map_err(|e| e.to_string())?);
        match h.layout.log(rig) {
            Some(log) => cmd.env("FAMS_PC_LOG", log),
            None => cmd.env_remove("FAMS_PC_LOG"),
        };
        // A child cut in the heap's sync holds its checkpoints back too: if its recovery keeps
        // the replayed records in the log instead of syncing (the usual case), the cut comes
        // after that recovery, and the stretch it left must still be there for the next open,
        // which then syncs.
        if how == "filled" || how == "in-heap-sync" {
            cmd.env("FAMS_PC_FILL", (log_bytes / 4 * 3).to_string());
        } else {
            cmd.env_remove("FAMS_PC_FILL");
        }
        // A negative control: the child commits (and recovers) with the same deliberate bug as
        // this process.
        match fams::mutations::current() {
            Some(m) => cmd.env("FAMS_MUTATION", m.name()),
            None => cmd.env_remove("FAMS_MUTATION"),
        };
        let mut spawned = cmd.spawn().map_err(|e| format!("spawning the child: {e}"))?;
        let mut child = ChildProc::new(&spawned);
        let out = Arc::new(ChildOutput::default());
        let (line_tx, lines) = std::sync::mpsc::channel::<String>();
        let reader = {
            let out = out.clone();
            let stdout = spawned.stdout.take().expect("piped");
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // libtest may have printed "test power_cut_child ... " on the same line.
                    if let Some(at) = line.find("ready ") {
                        *out.recovered.lock().expect("not poisoned") = parse_ready(&line[at + 6..]);
                        out.ready.store(true, Ordering::SeqCst);
                    } else if let Some(k) = line.strip_prefix("ack ").and_then(|k| k.trim().parse::<u64>().ok()) {
                        out.last_ack.fetch_max(k, Ordering::SeqCst);
                    } else if let Some(k) = line.strip_prefix("issue ").and_then(|k| k.trim().parse::<u64>().ok()) {
                        out.issued.fetch_max(k, Ordering::SeqCst);
                    } else if let Some(p) = line.strip_prefix("phase ") {
                        *out.phase.lock().expect("not poisoned") = p.split(' ').next().map(String::from);
                    }
                    let _ = line_tx.send(line);
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
        let child_failed = |what: &str| {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            format!("cycle {cycle}: {what} ({choice:?}, {}): {}", h.layout.name(), err.trim())
        };
        let patience = Duration::from_secs(30);
        match how {
            "recovering" => std::thread::sleep(Duration::from_micros(rng.below(40_000))),
            "in-replay" => {
                // Before a random record of the replay, not only the first: the child announces
                // each one.
                let at = rng.below(h.expected.report.records_replayed.max(1));
                if !wait_for_line(&lines, &format!("phase replay records={at}"), patience) {
                    child.kill();
                    let _ = reader.join();
                    return Err(child_failed(&format!("the child never reached record {at} of its replay")));
                }
            }
            "in-heap-sync" => {
                // Only an open that finds a replayed stretch already in the log syncs the heap
                // file; one that leaves a stretch announces `done` without it. Cut there, and
                // aim at the next open of this heap, which must sync.
                match wait_for_any_line(&lines, &["phase heap-sync", "phase done"], patience) {
                    Some(0) => deferred_in_a_row = 0,
                    Some(_) => {
                        if deferred_in_a_row > 0 {
                            child.kill();
                            let _ = reader.join();
                            return Err(child_failed(
                                "an open of a log holding a replayed stretch left another one instead of syncing the heap file",
                            ));
                        }
                        deferred_in_a_row += 1;
                        report.cuts_after_a_kept_stretch += 1;
                        h.cut_in = Some(Phase::HeapSync);
                    }
                    None => {
                        child.kill();
                        let _ = reader.join();
                        return Err(child_failed("the child never announced phase heap-sync or phase done"));
                    }
                }
            }
            "in-superblock" => {
                let phase = "phase superblock";
                if !wait_for_line(&lines, phase, patience) {
                    child.kill();
                    let _ = reader.join();
                    return Err(child_failed(&format!("the child never announced {phase}")));
                }
            }
            _ => {
                if !wait_for_line(&lines, "ready", patience) {
                    child.kill();
                    let _ = reader.join();
                    return Err(child_failed("the child did not start"));
                }
                if how == "filled" {
                    if !wait_for_line(&lines, "filled", patience) {
                        child.kill();
                        let _ = reader.join();
                        return Err(child_failed("the child did not fill the log"));
                    }
                } else {
                    std::thread::sleep(Duration::from_micros(rng.below(cfg.cut_after_ms_max * 1000 + 1)));
                }
            }
        }
        let died_early = |child: &mut ChildProc| -> Option<String> {
            let status = child.ended()?;
            Some(child_failed(&format!("the child ended before the cut ({status:?})")))
        };
        let seed = rng.next_u64();
        let cut_result = match how {
            "frozen" => {
                // Freeze the child so it can acknowledge nothing more, then cut the power. Its
                // I/O in flight goes on in the kernel and lands on a dead drive.
                if let Err(e) = child.stop() {
                    let _ = reader.join();
                    return Err(child_failed(&e));
                }
                rig.cut(seed)
            }
            "after-write" => {
                if let Some(e) = died_early(&mut child) {
                    return Err(e);
                }
                // Mostly the drive of the log: the moment between a record's write and its
                // flush (the file log lives on the fs drive).
                let log_disk = match h.layout {
                    Layout::RawLog => "log",
                    Layout::FileLog => "fs",
                };
                let disk = if rng.below(4) == 0 { None } else { Some(log_disk) };
                rig.cut_after_writes(
                    seed,
                    1 + rng.below(if disk == Some("log") { 8 } else { 24 }),
                    disk,
                    Duration::from_secs(2),
                )
            }
            _ => {
                if how == "running" || how == "filled" {
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
        h.issued = h.issued.max(out.issued.load(Ordering::SeqCst));
        if acked > h.last_acked {
            report.commits_acknowledged += acked - h.last_acked;
            h.last_acked = acked;
        }
        let ctx = |h: &HeapState| {
            format!(
                "{}; {} cut {how}, {} writes pending, {} dropped, {} torn; {choice:?}",
                h.layout.name(),
                cut.mode,
                cut.pending_writes,
                cut.dropped,
                cut.torn
            )
        };
        if let Some((c, crc)) = *out.recovered.lock().expect("not poisoned") {
            report.real_recoveries_compared += 1;
            if c != commit_number(&h.expected.bytes) || crc != h.expected.crc() {
                report.violations += 1;
                report.violation_details.push(format!(
                    "cycle {cycle}: the child's own recovery gave commit {c} (crc {crc:08x}) but replaying the same files in memory gives commit {} (crc {:08x}) ({})",
                    commit_number(&h.expected.bytes),
                    h.expected.crc(),
                    ctx(h)
                ));
            }
        }
        if !opened {
            report.cuts_during_recovery += 1;
            let phase = out.phase.lock().expect("not poisoned").clone();
            let phase = Phase::ALL.into_iter().find(|p| phase.as_deref() == Some(p.name()));
            if let (Some(p), true) = (phase, h.expected.report.records_replayed > 0) {
                *report.cuts_in_phase.entry(p.name()).or_default() += 1;
            }
        }
        if how == "filled" {
            report.fills += 1;
            h.cut_in = Some(Phase::ALL[next_phase % Phase::ALL.len()]);
            next_phase += 1;
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
        // Verify what recovery would make of the files, in memory: they stay as the cut left
        // them, so the next child's own open replays a real log (and may be cut inside it).
        let log = h.layout.log(rig);
        let recovered = rig.fuse().watch(&format!("cycle {cycle}: reading the files"), FUSE_PATIENCE, || {
            recovered_image(&heap_path, log.as_deref())
        })?;
        let recovered = match recovered {
            Ok(r) => r,
            Err(e) => {
                report.violations += 1;
                report
                    .violation_details
                    .push(format!("cycle {cycle}: recovery failed after a power cut ({}): {e}", ctx(h)));
                report.cycles += 1;
                break; // nothing more can be checked on a heap that does not open
            }
        };
        report.records_replayed += recovered.report.records_replayed;
        let c = commit_number(&recovered.bytes);
        let mut violation = None;
        if c < h.last_acked {
            violation = Some(format!(
                "cycle {cycle}: heap is at commit {c} but commit {} was acknowledged ({})",
                h.last_acked,
                ctx(h)
            ));
        } else if c < h.model.at {
            violation = Some(format!("cycle {cycle}: heap went back from commit {} to {c} ({})", h.model.at, ctx(h)));
        } else if c > h.issued.max(h.model.at) {
            violation = Some(format!(
                "cycle {cycle}: heap claims commit {c} but the child issued only up to {} ({})",
                h.issued.max(h.model.at),
                ctx(h)
            ));
        } else {
            if c > h.last_acked {
                report.recovered_unacknowledged += 1;
            }
            h.model.advance_to(c);
            if let Some(at) = h.model.first_difference(&recovered.bytes) {
                violation = Some(format!(
                    "cycle {cycle}: heap says commit {c} but differs from that state at byte {at} (page {}) ({})",
                    at / 4096,
                    ctx(h)
                ));
            }
        }
        if let Some(v) = violation {
            note_violation(&mut report.violations, &mut report.violation_details, v);
            // Resynchronise with what is there so later cycles are still checked.
            h.model.image.copy_from_slice(&recovered.bytes);
            h.model.at = c;
            h.last_acked = c;
        }
        h.expected = recovered;
        report.final_commit = c;
        report.cycles += 1;
        if std::env::var_os("FAMS_POWER_CUT_PROGRESS").is_some() {
            say(&format!(
                "cycle {cycle}: {}, {} cut {how}, pending {:?}, kept {} dropped {} torn {}, acked {}, recovered {c}, violations {}",
                h.layout.name(),
                cut.mode,
                cut.pending_per_disk,
                cut.kept,
                cut.dropped,
                cut.torn,
                h.last_acked,
                report.violations
            ));
        }
        if cfg.stop_at_first_violation && report.violations > 0 {
            break;
        }
    }
    Ok(report)
}

/// The fields of the child's `ready` line: commit and crc.
fn parse_ready(fields: &str) -> Option<(u64, u32)> {
    let get = |key: &str| fields.split_whitespace().find_map(|f| f.strip_prefix(key)?.strip_prefix('='));
    Some((get("commit")?.parse().ok()?, u32::from_str_radix(get("crc")?, 16).ok()?))
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
        cycles: env_u64("FAMS_POWER_CUT_CYCLES", 200),
        seed: env_u64("FAMS_POWER_CUT_SEED", 0x00f0_5e5e_d001),
        cut_after_ms_max: env_u64("FAMS_POWER_CUT_MAX_MS", 80),
        fsck_every: 20,
        stop_at_first_violation: false,
        cut_focus: None,
    };
    // Two rigs side by side, each with half the cycles and a seed of its own: a cycle mostly
    // waits (for the child, the drives, ext4's mount), so two take little longer than one. The
    // checks below are over both runs together.
    let halves = [cfg.cycles.div_ceil(2), cfg.cycles / 2];
    let reports: Vec<Result<Report, String>> = std::thread::scope(|s| {
        let runs: Vec<_> = halves
            .iter()
            .enumerate()
            .map(|(i, &cycles)| {
                let half = Config { cycles, seed: cfg.seed ^ i as u64, cut_focus: None, ..cfg };
                s.spawn(move || run_power_cuts(&half))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap_or_else(|_| Err("a power-cut run panicked".into()))).collect()
    });
    let mut report = Report { loop_dio: true, ..Report::default() };
    for r in reports {
        report.absorb(r.unwrap_or_else(|e| panic!("power-cut test could not run: {e}")));
    }
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
    for phase in Phase::ALL {
        assert!(
            report.cuts_in_phase.get(phase.name()).copied().unwrap_or(0) > 0,
            "no cut landed in recovery phase {} of a real replay\n{}",
            phase.name(),
            report.summary()
        );
    }
    for layout in [Layout::RawLog, Layout::FileLog] {
        assert!(report.layouts.get(layout.name()).copied().unwrap_or(0) > 0, "layout {} never ran", layout.name());
    }
    assert!(report.real_recoveries_compared > cfg.cycles / 2, "{}", report.summary());
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
/// survived and whose lost sectors held entry data. In the usual mix of cuts it was seen after
/// 25, 63, 73, 114, 269 and 428 cycles (about one in 160: 500 left it a few chances in a hundred
/// to pass unseen); so every one of its cuts comes between a write and its flush, where such
/// records are made (seen after 35, 63, 126 and 211 cycles, about one in 110, ~0.24 s each), and
/// it gets up to 1000 cycles: about one chance in 10,000 to pass unseen, 26 s on average.
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
        let torn_record = *name == "trust-record-without-crc";
        let cfg = Config {
            cycles: env_u64("FAMS_POWER_CUT_CYCLES", if torn_record { 1000 } else { 500 }),
            seed: env_u64("FAMS_POWER_CUT_SEED", 0x0b0e_4e11),
            cut_after_ms_max: env_u64("FAMS_POWER_CUT_MAX_MS", 80),
            fsck_every: 0,
            stop_at_first_violation: true,
            // A torn record with its header intact is made by a cut between a record's write and
            // its flush: aim every cut there (in the usual mix, 9 in 20 are).
            cut_focus: torn_record.then_some("after-write"),
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
        // raw libc: nix 0.31 has no pwritev2 (per-write RWF_DSYNC, the flag under test here).
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
    let pid = fuse.pid().expect("running");
    // Freeze the FUSE program: every request to it now waits.
    signal_pid(pid, Signal::SIGSTOP);
    // Every thread of it, before the read is issued (a request it was just taking could pass).
    wait_stopped(pid, Duration::from_secs(10));
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
    // Let the program run again so it can see the aborted connection and end.
    signal_pid(pid, Signal::SIGCONT);
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
        exit_now(3);
    }
}

fn child_main() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let heap_path = PathBuf::from(var("FAMS_PC_HEAP")?);
    let seed: u64 = var("FAMS_PC_SEED")?.parse().map_err(|_| "FAMS_PC_SEED")?;
    let run_seed: u64 = var("FAMS_PC_RUN_SEED")?.parse().map_err(|_| "FAMS_PC_RUN_SEED")?;
    let fill_log_bytes = std::env::var("FAMS_PC_FILL").ok().and_then(|v| v.parse().ok());
    let opts = HeapOptions {
        tracker: Some(var("FAMS_PC_TRACKER")?.parse()?),
        io_path: Some(var("FAMS_PC_IO_PATH")?.parse()?),
        flush_mode: Some(var("FAMS_PC_FLUSH_MODE")?.parse()?),
        log_path: std::env::var_os("FAMS_PC_LOG").map(PathBuf::from),
        // A filling child holds its checkpoints back until the log is full.
        checkpoint_threshold_bytes: fill_log_bytes.map(|_| u64::MAX),
        ..HeapOptions::default()
    };
    // On a line of its own: libtest has printed "test power_cut_child ... " without a newline.
    println!();
    fams::recovery::observe_phases(|phase, so_far| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "phase {} records={}", phase.name(), so_far.records_replayed);
        let _ = out.flush();
    });
    let mut heap = Heap::open(&heap_path, &opts).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
    };
    say(format!("ready commit={} crc={:08x}\n", commit_number(heap.bytes()), fingerprint(heap.bytes())))?;
    let mode = CommitterMode { sync_commits: true, fill_log_bytes };
    commit_forever(&mut heap, seed, run_seed, mode, &mut say)
}
