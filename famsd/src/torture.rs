//! `famsd torture`: a child process commits the verifiable workload and is killed with SIGKILL at
//! random moments (including while it is still recovering); after each kill the parent recovers
//! the heap and checks it equals exactly the state after some commit `c`, with `c` at or after
//! the last commit the child reported durable.

use crate::workload::{commit_number, failed_turn, mutate, Model, Rng};
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
}

impl TortureReport {
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

fn spawn_child(cfg: &TortureConfig, cycle: u64) -> Result<Child, String> {
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
    // A negative control (`mutations` builds): the child commits with the same deliberate bug.
    match fams::mutations::current() {
        Some(m) => cmd.env("FAMS_MUTATION", m.name()),
        None => cmd.env_remove("FAMS_MUTATION"),
    };
    cmd.spawn().map_err(|e| format!("spawning the torture child: {e}"))
}

pub fn run(cfg: &TortureConfig) -> Result<TortureReport, String> {
    prepare(cfg)?;
    let heap_path = heap_path(&cfg.dir);
    let mut report = TortureReport::default();
    let mut model = Model::new(cfg.heap_size_bytes.div_ceil(4096) as usize * 4096, cfg.seed);
    let mut last_acked = 0u64;
    // The highest commit number any child announced it would issue.
    let mut issued = 0u64;
    let mut rng = Rng::new(cfg.seed ^ 0xdead_beef);
    let progress = crate::progress::Progress::new(cfg.progress, cfg.cycles as usize);
    for cycle in 0..cfg.cycles {
        let mut child = spawn_child(cfg, cycle)?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        // Kill at a random moment: a tenth of the time before the child has even finished
        // opening (so recovery itself gets interrupted), otherwise while it commits.
        let early = rng.below(10) == 0;
        let mut ready = String::new();
        let mut opened = false;
        if early {
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
        } else {
            out.read_line(&mut ready).map_err(|e| format!("reading from the child: {e}"))?;
            opened = ready.starts_with("ready");
            if !opened {
                let mut err = String::new();
                let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
                let _ = child.wait();
                return Err(format!("torture child failed to start (cycle {cycle}): {}{err}", ready.trim()));
            }
            std::thread::sleep(Duration::from_millis(rng.below(cfg.kill_after_ms_max + 1)));
        }
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let status = child.wait().map_err(|e| format!("waiting for the child: {e}"))?;
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        let mut err = String::new();
        let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
        if status.signal() != Some(libc::SIGKILL) {
            return Err(format!("torture child ended on its own ({status}) in cycle {cycle}: {}", err.trim()));
        }
        for line in ready.lines().chain(rest.lines()) {
            if line.starts_with("ready") {
                opened = true;
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
        }

        let started = Instant::now();
        let heap = Heap::open(&heap_path, &cfg.choice.options())
            .map_err(|e| format!("cycle {cycle}: recovery failed after a SIGKILL (this is a bug): {e}"))?;
        let open_ms = started.elapsed().as_secs_f64() * 1e3;
        let stats = heap.stats();
        report.tracker = stats.tracker.to_string();
        report.log_kind = stats.log_kind.to_string();
        report.io_path = stats.io_path.to_string();
        report.flush_mode = stats.flush_mode.to_string();
        report.recovery_ms.push(open_ms);
        report.records_replayed += stats.recovery.records_replayed;
        let c = commit_number(heap.bytes());
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
            if let Some(at) = model.first_difference(heap.bytes()) {
                violation = Some(format!(
                    "cycle {cycle}: heap says commit {c} but differs from that state at byte {at} (page {})",
                    at / 4096
                ));
            }
        }
        if let Some(v) = violation {
            report.violations += 1;
            if report.violation_details.len() < 10 {
                report.violation_details.push(v.clone());
            }
            // Resynchronise the model with what is there so later cycles are still checked.
            model.image.copy_from_slice(heap.bytes());
            model.at = c;
            last_acked = c;
        }
        report.final_commit = c;
        report.cycles += 1;
        drop(heap);
        progress
            .at(cycle + 1, format!("SIGKILL cycles, commit {c}, acked {last_acked}, violations {}", report.violations));
    }
    Ok(report)
}

/// The child: open (recovering), then commit the workload forever, printing "ack k" when commit
/// k is durable. Mixes synchronous commits, pipelined async commits and releases of committed
/// pages; the parent kills it.
pub fn child(heap_path: &Path, seed: u64, run_seed: u64, choice: &HeapChoice) -> Result<(), String> {
    let mut heap = Heap::open(heap_path, &choice.options()).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
    };
    say(format!("ready {}\n", commit_number(heap.bytes())))?;
    commit_forever(&mut heap, seed, run_seed, CommitterMode::default(), &mut say)
}

/// How [`commit_forever`] commits.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitterMode {
    /// Also make some commits with the synchronous `commit()` (a quarter, when none is in flight).
    pub sync_commits: bool,
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
    loop {
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
