//! `famsd torture`: a child process commits the verifiable workload and is killed with SIGKILL at
//! random moments; after each kill the parent checks that recovering the files gives exactly the
//! state after some commit `c`, with `c` at or after the last commit the child reported durable
//! and no later than the last one it announced.
//!
//! The parent verifies by replaying the log **in memory** ([`recovered_image`]) and never opens
//! the heap itself, so the files stay exactly as the kill left them and the next child's own
//! open replays a real log. Now and then a child fills the log with several MiB of records
//! (checkpoints held back) and is killed; the next child is killed *inside* its recovery of that
//! log, in each phase in turn — while it replays records into the heap file, during the heap
//! file's fdatasync, during the new superblock's write — which it announces on stdout
//! (`fams::recovery::observe_phases`). Every child says what its own recovery produced (commit
//! number and a checksum of the heap); that must equal the in-memory replay the parent verified,
//! so the real recovery path is checked byte for byte, too.

use crate::workload::{commit_number, failed_turn, fingerprint, mutate, recovered_image, Model, Rng};
use fams::recovery::Phase;
use fams::{FlushMode, FormatOptions, Heap, HeapOptions, IoPath, TrackerKind};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TortureConfig {
    pub cycles: u64,
    pub dir: PathBuf,
    pub force: bool,
    pub choice: HeapChoice,
    pub heap_size_bytes: u64,
    pub log_size_bytes: Option<u64>,
    pub seed: u64,
    /// Longest time a child runs before it is killed.
    pub kill_after_ms_max: u64,
    /// Print a line per cycle on stderr.
    pub progress: bool,
    /// End at the first violation (a negative control needs only one).
    pub stop_at_first_violation: bool,
}

#[derive(Default, Debug)]
pub struct TortureReport {
    pub cycles: u64,
    pub violations: u64,
    pub violation_details: Vec<String>,
    pub tracker: String,
    pub log_kind: String,
    pub io_path: String,
    pub flush_mode: String,
    pub commits_acknowledged: u64,
    /// Cycles in which the child was killed before it finished recovering.
    pub killed_during_open: u64,
    /// Cycles whose recovery found commits beyond the last acknowledged one (in flight at the kill).
    pub recovered_unacknowledged: u64,
    pub recovery_ms: Vec<f64>,
    pub records_replayed: u64,
    pub final_commit: u64,
    /// Kills that landed inside a recovery with records to replay, by the phase it had reached.
    pub killed_in_phase: std::collections::BTreeMap<&'static str, u64>,
    /// Children that filled the log for the next one to replay.
    pub fills: u64,
    /// Kills aimed at the heap's sync that came right after a recovery which kept its replayed
    /// records in the log instead (the next open then syncs, and is killed there).
    pub kills_after_a_kept_stretch: u64,
    /// The longest replay (heap bytes) a kill interrupted.
    pub longest_replay_killed_bytes: u64,
    /// Recoveries by the children (and the last one, by this process) whose result was compared
    /// with the in-memory replay of the same files.
    pub real_recoveries_compared: u64,
}

impl TortureReport {
    fn note_violation(&mut self, what: String) {
        self.violations += 1;
        if self.violation_details.len() < 10 {
            self.violation_details.push(what);
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut r = self.recovery_ms.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| if r.is_empty() { 0.0 } else { r[((r.len() - 1) as f64 * p).round() as usize] };
        serde_json::json!({
            "cycles": self.cycles,
            "violations": self.violations,
            "violation_details": self.violation_details,
            "tracker": self.tracker,
            "log_kind": self.log_kind,
            "io_path": self.io_path,
            "flush_mode": self.flush_mode,
            "commits_acknowledged": self.commits_acknowledged,
            "final_commit": self.final_commit,
            "killed_during_open": self.killed_during_open,
            "recovered_unacknowledged": self.recovered_unacknowledged,
            "records_replayed": self.records_replayed,
            "killed_in_phase": Phase::ALL
                .iter()
                .map(|p| (p.name().to_string(), serde_json::json!(self.killed_in_phase.get(p.name()).copied().unwrap_or(0))))
                .collect::<serde_json::Map<_, _>>(),
            "fills": self.fills,
            "kills_after_a_kept_stretch": self.kills_after_a_kept_stretch,
            "longest_replay_killed_bytes": self.longest_replay_killed_bytes,
            "real_recoveries_compared": self.real_recoveries_compared,
            "recovery_ms_p50": pct(0.5),
            "recovery_ms_p99": pct(0.99),
            "recovery_ms_max": r.last().copied().unwrap_or(0.0),
        })
    }
}

/// The mechanisms a run forces (None: automatic), passed on to the child unchanged.
#[derive(Clone, Debug, Default)]
pub struct HeapChoice {
    pub tracker: Option<TrackerKind>,
    pub io_path: Option<IoPath>,
    pub flush_mode: Option<FlushMode>,
    pub log: Option<PathBuf>,
}

impl HeapChoice {
    pub fn options(&self) -> HeapOptions {
        HeapOptions {
            tracker: self.tracker,
            io_path: self.io_path,
            flush_mode: self.flush_mode,
            log_path: self.log.clone(),
            ..HeapOptions::default()
        }
    }

    fn add_args(&self, cmd: &mut Command) {
        if let Some(t) = self.tracker {
            cmd.arg("--tracker").arg(t.name());
        }
        if let Some(p) = self.io_path {
            cmd.arg("--io-path").arg(p.name());
        }
        if let Some(f) = self.flush_mode {
            cmd.arg("--flush-mode").arg(f.name());
        }
        if let Some(l) = &self.log {
            cmd.arg("--log").arg(l);
        }
    }
}

pub fn heap_path(dir: &Path) -> PathBuf {
    dir.join("torture.heap")
}

/// Format a fresh heap for the run.
pub fn prepare(cfg: &TortureConfig) -> Result<(), String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let heap = heap_path(&cfg.dir);
    let _ = std::fs::remove_file(&heap);
    if cfg.choice.log.is_none() {
        let _ = std::fs::remove_file(cfg.dir.join("torture.heap.log"));
    }
    let mut f = FormatOptions::new(&heap, cfg.heap_size_bytes);
    f.log_path = cfg.choice.log.clone();
    f.log_size_bytes = cfg.log_size_bytes;
    f.force = cfg.force;
    Heap::format(&f).map_err(|e| e.to_string())?;
    Ok(())
}

fn spawn_child(cfg: &TortureConfig, cycle: u64, fill_log_bytes: Option<u64>) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("torture-child")
        .arg("--heap")
        .arg(heap_path(&cfg.dir))
        .arg("--seed")
        .arg(cfg.seed.to_string())
        .arg("--run-seed")
        .arg((cfg.seed ^ cycle.wrapping_mul(0x5851_f42d_4c95_7f2d)).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    cfg.choice.add_args(&mut cmd);
    if let Some(n) = fill_log_bytes {
        cmd.arg("--fill-log-bytes").arg(n.to_string());
    }
    // A negative control (`mutations` builds): the child commits with the same deliberate bug.
    match fams::mutations::current() {
        Some(m) => cmd.env("FAMS_MUTATION", m.name()),
        None => cmd.env_remove("FAMS_MUTATION"),
    };
    cmd.spawn().map_err(|e| format!("spawning the torture child: {e}"))
}

/// How a cycle ends its child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// At a random instant of start-up, without waiting for anything.
    Early,
    /// At a random instant while it commits.
    Running,
    /// Once it has piled several MiB of records into the log (no checkpoint in between), so
    /// that the next cycle's recovery has a long replay to do.
    AfterFill,
    /// Inside the given phase of its recovery of the log the previous child filled.
    InRecovery(Phase),
}

/// Log bytes a filling child writes since its last checkpoint before it says `filled`.
const FILL_LOG_FRACTION: (u64, u64) = (3, 4);

pub fn run(cfg: &TortureConfig) -> Result<TortureReport, String> {
    prepare(cfg)?;
    let heap_path = heap_path(&cfg.dir);
    let log_path = cfg.choice.log.clone();
    let mut report = TortureReport::default();
    let mut model = Model::new(cfg.heap_size_bytes.div_ceil(4096) as usize * 4096, cfg.seed);
    let mut last_acked = 0u64;
    // The highest commit number any child announced it would issue.
    let mut issued = 0u64;
    let mut rng = Rng::new(cfg.seed ^ 0xdead_beef);
    let progress = crate::progress::Progress::new(cfg.progress, cfg.cycles as usize);
    // What recovering the files as they are now yields (verified against the model after every
    // kill); the next child's own recovery must produce exactly these bytes.
    let mut expected = recovered_image(&heap_path, log_path.as_deref())?;
    let mut next_phase = 0usize;
    let mut next_kill = None;
    // Kills aimed at the heap's sync in a row whose open kept its replayed stretch instead.
    let mut kept_stretch_in_a_row = 0u32;
    for cycle in 0..cfg.cycles {
        let kill = next_kill.take().unwrap_or_else(|| match rng.below(20) {
            0 | 1 => Kill::Early,
            2..=4 => Kill::AfterFill,
            _ => Kill::Running,
        });
        let kill = match kill {
            // A filled log needs a later cycle to recover it.
            Kill::AfterFill if cycle + 1 == cfg.cycles => Kill::Running,
            k => k,
        };
        // A child killed in the heap's sync holds its checkpoints back too: if its recovery
        // keeps the replayed records in the log instead of syncing (the usual case), the kill
        // comes after that recovery, and the stretch it left must still be there for the next
        // open, which then syncs.
        let fill_bytes = matches!(kill, Kill::AfterFill | Kill::InRecovery(Phase::HeapSync)).then(|| {
            let log_bytes = expected_log_bytes(cfg, &heap_path);
            log_bytes / FILL_LOG_FRACTION.1 * FILL_LOG_FRACTION.0
        });
        let mut child = spawn_child(cfg, cycle, fill_bytes)?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut seen = String::new();
        // Read lines until one starts with one of `wants` (which one) or the child's output ends.
        let mut read_until_any =
            |out: &mut BufReader<std::process::ChildStdout>, wants: &[&str]| -> Result<Option<usize>, String> {
                loop {
                    let mut line = String::new();
                    if out.read_line(&mut line).map_err(|e| format!("reading from the child: {e}"))? == 0 {
                        return Ok(None);
                    }
                    seen.push_str(&line);
                    if let Some(i) = wants.iter().position(|w| line.starts_with(w)) {
                        return Ok(Some(i));
                    }
                }
            };
        let mut read_until = |out: &mut BufReader<std::process::ChildStdout>, want: &str| -> Result<bool, String> {
            Ok(read_until_any(out, &[want])?.is_some())
        };
        let reached = match kill {
            Kill::Early => {
                std::thread::sleep(Duration::from_micros(rng.below(3000)));
                true
            }
            Kill::Running => {
                let ok = read_until(&mut out, "ready")?;
                if ok {
                    std::thread::sleep(Duration::from_millis(rng.below(cfg.kill_after_ms_max + 1)));
                }
                ok
            }
            Kill::AfterFill => read_until(&mut out, "filled")?,
            Kill::InRecovery(Phase::Replay) => {
                // Before a random record of the replay, not only the first: the child announces
                // each one.
                let at = rng.below(expected.report.records_replayed.max(1));
                read_until(&mut out, &format!("phase replay records={at}\n"))?
            }
            Kill::InRecovery(Phase::HeapSync) => {
                // Only an open that finds a replayed stretch already in the log syncs the heap
                // file; one that leaves a stretch says `done` without it. Kill it there, and aim
                // at the next open, which must sync.
                match read_until_any(&mut out, &["phase heap-sync", "phase done"])? {
                    Some(0) => {
                        kept_stretch_in_a_row = 0;
                        true
                    }
                    Some(_) => {
                        if kept_stretch_in_a_row > 0 {
                            return Err(format!(
                                "cycle {cycle}: an open of a log holding a replayed stretch left another one instead of syncing the heap file"
                            ));
                        }
                        kept_stretch_in_a_row += 1;
                        report.kills_after_a_kept_stretch += 1;
                        next_kill = Some(Kill::InRecovery(Phase::HeapSync));
                        true
                    }
                    None => false,
                }
            }
            Kill::InRecovery(phase) => read_until(&mut out, &format!("phase {}", phase.name()))?,
        };
        crate::child::signal_child(&mut child, nix::sys::signal::Signal::SIGKILL);
        let status = child.wait().map_err(|e| format!("waiting for the child: {e}"))?;
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        seen.push_str(&rest);
        let mut err = String::new();
        let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
        if !reached || status.signal() != Some(nix::sys::signal::Signal::SIGKILL as i32) {
            return Err(format!(
                "torture child ended on its own ({status}) in cycle {cycle} ({kill:?}): {}{}",
                seen.lines().last().unwrap_or(""),
                err.trim()
            ));
        }
        let mut opened = false;
        let mut last_phase = None;
        for line in seen.lines() {
            if let Some(rest) = line.strip_prefix("ready ") {
                opened = true;
                let ready = Ready::parse(rest).ok_or_else(|| format!("bad line from the child: {line}"))?;
                report.tracker = ready.tracker.clone();
                report.log_kind = ready.log_kind.clone();
                report.io_path = ready.io_path.clone();
                report.flush_mode = ready.flush_mode.clone();
                report.recovery_ms.push(ready.open_us as f64 / 1e3);
                report.real_recoveries_compared += 1;
                let want = commit_number(&expected.bytes);
                if ready.commit != want || ready.crc != expected.crc() {
                    report.note_violation(format!(
                        "cycle {cycle}: the child's own recovery gave commit {} (crc {:08x}) but replaying the same files in memory gives commit {want} (crc {:08x})",
                        ready.commit,
                        ready.crc,
                        expected.crc()
                    ));
                }
            } else if let Some(p) = line.strip_prefix("phase ") {
                // `done` is after the last phase: a kill there is not inside recovery.
                last_phase = Phase::ALL.into_iter().find(|ph| p.split(' ').next() == Some(ph.name()));
            } else if let Some(k) = line.strip_prefix("ack ") {
                let k: u64 = k.trim().parse().map_err(|_| format!("bad line from the child: {line}"))?;
                if k > last_acked {
                    report.commits_acknowledged += k - last_acked;
                    last_acked = k;
                }
            } else if let Some(k) = line.strip_prefix("issue ") {
                let k: u64 = k.trim().parse().map_err(|_| format!("bad line from the child: {line}"))?;
                issued = issued.max(k);
            }
        }
        if !opened {
            report.killed_during_open += 1;
            // A kill inside a recovery that had records to replay: the interesting kind.
            if let (Some(phase), true) = (last_phase, expected.report.records_replayed > 0) {
                *report.killed_in_phase.entry(phase.name()).or_default() += 1;
                if phase == Phase::Replay {
                    report.longest_replay_killed_bytes =
                        report.longest_replay_killed_bytes.max(expected.report.bytes_replayed);
                }
            }
        }
        if kill == Kill::AfterFill {
            report.fills += 1;
            next_kill = Some(Kill::InRecovery(Phase::ALL[next_phase % Phase::ALL.len()]));
            next_phase += 1;
        }

        // Verify what recovery would make of the files, leaving them as the kill left them.
        expected = recovered_image(&heap_path, log_path.as_deref())
            .map_err(|e| format!("cycle {cycle}: recovery failed after a SIGKILL (this is a bug): {e}"))?;
        report.records_replayed += expected.report.records_replayed;
        let c = commit_number(&expected.bytes);
        let mut violation = None;
        if c < last_acked {
            violation = Some(format!("cycle {cycle}: heap is at commit {c} but commit {last_acked} was acknowledged"));
        } else if c < model.at {
            violation = Some(format!("cycle {cycle}: heap went back from commit {} to {c}", model.at));
        } else if c > issued.max(model.at) {
            violation = Some(format!(
                "cycle {cycle}: heap claims commit {c} but the child issued only up to {}",
                issued.max(model.at)
            ));
        } else {
            if c > last_acked {
                report.recovered_unacknowledged += 1;
            }
            model.advance_to(c);
            if let Some(at) = model.first_difference(&expected.bytes) {
                violation = Some(format!(
                    "cycle {cycle}: heap says commit {c} but differs from that state at byte {at} (page {})",
                    at / 4096
                ));
            }
        }
        if let Some(v) = violation {
            report.note_violation(v);
            // Resynchronise the model with what is there so later cycles are still checked.
            model.image.copy_from_slice(&expected.bytes);
            model.at = c;
            last_acked = c;
        }
        report.final_commit = c;
        report.cycles += 1;
        if cfg.stop_at_first_violation && report.violations > 0 {
            break;
        }
        progress
            .at(cycle + 1, format!("SIGKILL cycles, commit {c}, acked {last_acked}, violations {}", report.violations));
    }
    // Last, the real thing in this process: opening the heap must give what was verified.
    let heap = Heap::open(&heap_path, &cfg.choice.options())
        .map_err(|e| format!("the final recovery failed (this is a bug): {e}"))?;
    report.real_recoveries_compared += 1;
    if fingerprint(heap.bytes()) != expected.crc() {
        report.note_violation(format!(
            "the final recovery gave commit {} but replaying the same files in memory gives commit {}, or other bytes",
            commit_number(heap.bytes()),
            commit_number(&expected.bytes)
        ));
    }
    Ok(report)
}

/// The log's size as formatted (the heap file's header says).
fn expected_log_bytes(cfg: &TortureConfig, heap_path: &Path) -> u64 {
    let header = std::fs::read(heap_path).ok().and_then(|b| fams::HeapHeader::decode(&b).ok());
    header.map(|h| h.log_size).or(cfg.log_size_bytes).unwrap_or(4 << 20)
}

/// The child's `ready` line: what its own recovery produced, and how the heap runs.
struct Ready {
    commit: u64,
    crc: u32,
    open_us: u64,
    tracker: String,
    log_kind: String,
    io_path: String,
    flush_mode: String,
}

impl Ready {
    fn line(heap: &Heap, open_us: u64) -> String {
        let s = heap.stats();
        format!(
            "ready commit={} crc={:08x} open_us={open_us} tracker={} log_kind={} io_path={} flush_mode={}\n",
            commit_number(heap.bytes()),
            fingerprint(heap.bytes()),
            s.tracker,
            s.log_kind,
            s.io_path,
            s.flush_mode
        )
    }

    fn parse(fields: &str) -> Option<Ready> {
        let get =
            |key: &str| fields.split_whitespace().find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
        Some(Ready {
            commit: get("commit")?.parse().ok()?,
            crc: u32::from_str_radix(get("crc")?, 16).ok()?,
            open_us: get("open_us")?.parse().ok()?,
            tracker: get("tracker")?.into(),
            log_kind: get("log_kind")?.into(),
            io_path: get("io_path")?.into(),
            flush_mode: get("flush_mode")?.into(),
        })
    }
}

/// The child: open (recovering, printing `phase NAME` as recovery enters each phase), say
/// `ready …` with what recovery produced, then commit the workload forever, printing "ack k"
/// when commit k is durable. Mixes synchronous commits, pipelined async commits and releases of
/// committed pages; the parent kills it. With `fill_log_bytes`, it also says `filled` once that
/// many log bytes have been written since the last checkpoint (its checkpoints then wait until
/// the log is full), so the next recovery has a long replay.
pub fn child(
    heap_path: &Path,
    seed: u64,
    run_seed: u64,
    choice: &HeapChoice,
    fill_log_bytes: Option<u64>,
) -> Result<(), String> {
    fams::recovery::observe_phases(|phase, so_far| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "phase {} records={}", phase.name(), so_far.records_replayed);
        let _ = out.flush();
    });
    let mut opts = choice.options();
    if fill_log_bytes.is_some() {
        opts.checkpoint_threshold_bytes = Some(u64::MAX);
    }
    let started = Instant::now();
    let mut heap = Heap::open(heap_path, &opts).map_err(|e| e.to_string())?;
    let open_us = started.elapsed().as_micros() as u64;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
    };
    say(Ready::line(&heap, open_us))?;
    let mode = CommitterMode { fill_log_bytes, ..CommitterMode::default() };
    commit_forever(&mut heap, seed, run_seed, mode, &mut say)
}

/// How [`commit_forever`] commits.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitterMode {
    /// Also make some commits with the synchronous `commit()` (a quarter, when none is in flight).
    pub sync_commits: bool,
    /// Say `filled` once this many log bytes have been written since the last checkpoint.
    pub fill_log_bytes: Option<u64>,
}

/// The workload's committing loop, shared by the crash tests' children: from the heap's current
/// commit on, apply mutation k and commit it, keeping up to a random depth in flight, and call
/// `say("ack k\n")` once commit k is durable. Between commits, now and then, a failed turn is
/// rolled back ([`failed_turn`]). Returns only on an error (including a rollback that did not
/// restore the heap).
pub fn commit_forever(
    heap: &mut Heap,
    seed: u64,
    run_seed: u64,
    mode: CommitterMode,
    say: &mut dyn FnMut(String) -> Result<(), String>,
) -> Result<(), String> {
    let mut k = commit_number(heap.bytes());
    let mut rng = Rng::new(run_seed);
    let mut in_flight: VecDeque<(u64, fams::Ticket)> = VecDeque::new();
    let mut fill = mode.fill_log_bytes.map(|want| {
        let s = heap.stats();
        (want, s.checkpoints, s.log_bytes_written)
    });
    loop {
        if let Some((want, checkpoints, since)) = fill {
            let s = heap.stats();
            if s.checkpoints != checkpoints {
                // Counted from when the checkpoint was seen: at most an undercount.
                fill = Some((want, s.checkpoints, s.log_bytes_written));
            } else if s.log_bytes_written - since >= want {
                say(format!("filled {}\n", s.log_bytes_written - since))?;
                fill = None;
            }
        }
        let depth = match rng.below(3) {
            0 => 1,
            _ => 1 + rng.below(6) as usize,
        };
        // Say how far this batch goes before committing any of it: a recovered heap claiming a
        // commit beyond what was ever issued is damage, caught without replaying the model to it.
        let batch = 1 + rng.below(8);
        say(format!("issue {}\n", k + batch))?;
        for _ in 0..batch {
            k += 1;
            mutate(heap.bytes_mut(), seed, k);
            if mode.sync_commits && rng.below(4) == 0 && in_flight.is_empty() {
                heap.commit().map_err(|e| e.to_string())?;
                say(format!("ack {k}\n"))?;
                continue;
            }
            let t = heap.commit_async().map_err(|e| e.to_string())?;
            in_flight.push_back((k, t));
            if rng.below(8) == 0 {
                if let Some(what) = failed_turn(heap, &mut rng).map_err(|e| e.to_string())? {
                    return Err(what);
                }
            }
            while let Some(&(kk, t)) = in_flight.front() {
                if in_flight.len() > depth {
                    heap.wait(t).map_err(|e| e.to_string())?;
                } else if !heap.is_durable(t).map_err(|e| e.to_string())? {
                    break;
                }
                say(format!("ack {kk}\n"))?;
                in_flight.pop_front();
            }
        }
        if rng.below(16) == 0 {
            heap.release_committed().map_err(|e| e.to_string())?;
        }
    }
}
