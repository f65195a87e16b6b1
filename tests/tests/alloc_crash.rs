//! The persistent allocator under real crashes (`alloc_model.rs` checks it against a model with
//! crashes simulated by `abandon()` + reopen; here the process dies, or the power goes).
//!
//! Both tests run the allocator workload of `fams_tests::alloc_workload`: each commit applies a
//! few allocations (sizes from 1 byte to ~136 KB, alignments up to 8 KiB, some zeroed), frees,
//! reallocs and rewrites of object contents, and records the object set and the commit number in
//! a table root; failed turns (operations rolled back) run between commits, some over commits
//! still in flight.
//!
//! 1. **SIGKILL mid-commit**: a child process (this test binary again, `alloc_kill_child`) opens
//!    the heap (recovering), then commits the workload forever, synchronous commits and pipelined
//!    `commit_async` mixed, printing `commit k DIGEST` (the object set commit k will hold) before
//!    issuing commit k and `ack k` once it is durable. The parent SIGKILLs it at a random moment
//!    — one time in eight while it is still starting or recovering — then recovers the heap
//!    itself and checks it.
//! 2. **Power loss** on the simulated machine (`fams::sim`): the same workload on a
//!    [`SimHeap`] with the log writer stepped by hand ([`WriterMode::Manual`]), so a seed replays
//!    exactly; the power is cut at a random mutating I/O operation, or (a quarter of the
//!    states) during a commit's log write, and unflushed writes are kept, dropped or torn per
//!    sector; sometimes the power goes again during recovery; reboot, recover, check.
//!
//! The check after every crash: the recovered heap claims some commit `c`, with `c` at or after
//! the last acknowledged commit, never before the previous recovery's, and at most the last one
//! issued; its table equals the object set announced for `c` (the simulator compares the model
//! itself); `check()` passes; the allocator's live objects are exactly the table's — the same
//! offsets, at least the sizes, the alignments, and every byte its object's fill (nothing leaked,
//! nothing lost); and allocating on the recovered heap until it is full hands out nothing that
//! overlaps a live object (then rolled back).
//!
//! Knobs: FAMS_ALLOC_KILLS (default 120), FAMS_ALLOC_KILL_MAX_MS (longest run before the kill,
//! default 60), FAMS_ALLOC_SIM_STATES (default 400), FAMS_ALLOC_CRASH_SEED.
//!
//! Negative controls (a build with the cargo feature `mutations`): each deliberate bug of the
//! heap (`fams::mutations`) is switched on in turn and the crashes must find a violation — see
//! `crashes_catch_the_heap_mutations`. In that build the clean runs are left out: a mutation is
//! switched on process-wide, and they would share this process.

use fams::alloc::{ObjectHeap, ObjectOptions};
use fams::sim::SimHeap;
use fams::{Heap, HeapOptions, TrackerKind, WriterMode};
use fams_tests::alloc_workload::{self, digest, Live, OpCounts, Workload};
use fams_tests::power_rig::{env_u64, say};
use fams_tests::*;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEAP_SIZE: u64 = 4 << 20;
/// Small, so the log wraps and checkpoints run every few dozen commits.
const LOG_SIZE: u64 = 1 << 20;
/// At most this many allocations when filling a recovered heap (it is usually full before).
const FILL_LIMIT: u64 = 3000;

fn seed() -> u64 {
    env_u64("FAMS_ALLOC_CRASH_SEED", 0xa110_c0de)
}

fn open_objects(heap: Heap) -> Result<ObjectHeap, String> {
    ObjectHeap::open(heap, &ObjectOptions::schema(1)).map_err(|e| format!("opening the object layer: {e}"))
}

fn add_counts(total: &mut OpCounts, c: &OpCounts) {
    total.allocs += c.allocs;
    total.frees += c.frees;
    total.reallocs += c.reallocs;
    total.writes += c.writes;
    total.exhausted += c.exhausted;
    total.rollbacks += c.rollbacks;
}

/// The checks after a crash that both tests share: the commit's range, then the heap against
/// its table (`alloc_workload::verify`), then no double hand-out. Returns the recovered commit
/// and object set, or the violation.
struct Bounds {
    last_acked: u64,
    /// The commit the previous recovery found: committed states never go back.
    previous: u64,
    issued: u64,
}

fn check_recovered(o: &mut ObjectHeap, b: &Bounds, rng: &mut Rng) -> Result<(alloc_workload::Recovered, u64), String> {
    let rec = alloc_workload::verify(o)?;
    let c = rec.commit;
    if c < b.last_acked {
        return Err(format!("the heap is at commit {c} but commit {} was acknowledged", b.last_acked));
    }
    if c < b.previous {
        return Err(format!("the heap went back from commit {} to {c}", b.previous));
    }
    if c > b.issued.max(b.previous) {
        return Err(format!("the heap claims commit {c} but only {} were issued", b.issued.max(b.previous)));
    }
    let made = alloc_workload::allocate_until_full(o, rng, FILL_LIMIT)?;
    Ok((rec, made))
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL

#[derive(Default, Debug)]
struct KillConfig {
    kills: u64,
    seed: u64,
    kill_after_ms_max: u64,
    stop_at_first_violation: bool,
}

#[derive(Default, Debug)]
struct KillReport {
    kills: u64,
    /// Killed before it said `ready` (while starting or recovering).
    kills_before_ready: u64,
    /// Killed with commits announced but not acknowledged (mid-commit, pipelined ones in flight).
    kills_with_commits_in_flight: u64,
    commits_acknowledged: u64,
    recoveries: u64,
    /// Recoveries that found a commit beyond the last acknowledged one.
    recovered_unacknowledged: u64,
    objects_checked: u64,
    allocated_after_recovery: u64,
    final_commit: u64,
    counts: OpCounts,
    violations: u64,
    violation_details: Vec<String>,
    seconds: f64,
}

impl KillReport {
    fn summary(&self) -> String {
        format!(
            "allocator under SIGKILL: {} kills in {:.1} s ({} before ready, {} with commits in flight), \
             {} recoveries ({} found a commit beyond the last ack), {} commits acknowledged, final commit {}, \
             {} objects checked, {} allocated on recovered heaps; the children reported {:?}; violations {}{}",
            self.kills,
            self.seconds,
            self.kills_before_ready,
            self.kills_with_commits_in_flight,
            self.recoveries,
            self.recovered_unacknowledged,
            self.commits_acknowledged,
            self.final_commit,
            self.objects_checked,
            self.allocated_after_recovery,
            self.counts,
            self.violations,
            if self.violation_details.is_empty() {
                String::new()
            } else {
                format!("\n  {}", self.violation_details.join("\n  "))
            }
        )
    }

    fn violation(&mut self, what: String) {
        note_violation(&mut self.violations, &mut self.violation_details, what);
    }
}

/// What the reader thread heard from a child.
#[derive(Default)]
struct Heard {
    ready: bool,
    /// (k, digest of commit k's object set), announced before commit k was issued.
    announced: Vec<(u64, u64)>,
    last_ack: u64,
    /// The child's operation counts, as of its last announced commit.
    counts: OpCounts,
}

fn parse_line(line: &str, h: &mut Heard) {
    // libtest may have printed "test alloc_kill_child ... " on the same line as "ready".
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next()) {
        (Some("commit"), Some(k), Some(d)) => {
            if let (Ok(k), Ok(d)) = (k.parse(), u64::from_str_radix(d, 16)) {
                h.announced.push((k, d));
            }
            let n: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
            if let [allocs, frees, reallocs, writes, exhausted, rollbacks] = n[..] {
                h.counts = OpCounts { allocs, frees, reallocs, writes, exhausted, rollbacks };
            }
        }
        (Some("ack"), Some(k), _) => h.last_ack = h.last_ack.max(k.parse().unwrap_or(0)),
        _ if line.contains("ready ") => h.ready = true,
        _ => {}
    }
}

fn run_kills(cfg: &KillConfig) -> Result<KillReport, String> {
    let started = Instant::now();
    let dir = TempDir::new("alloc-kill");
    let path = dir.join("h");
    format(&path, HEAP_SIZE, Some(LOG_SIZE));
    {
        let mut o = open_objects(Heap::open(&path, &HeapOptions::default()).map_err(|e| e.to_string())?)?;
        alloc_workload::create(&mut o)?;
        o.close().map_err(|e| e.to_string())?;
    }
    let trackers = trackers();
    let mut report = KillReport::default();
    // Digest of each commit's object set, as announced (commit 0: the empty table).
    let mut announced: BTreeMap<u64, u64> = BTreeMap::from([(0, digest(0, &Live::new()))]);
    let mut bounds = Bounds { last_acked: 0, previous: 0, issued: 0 };
    let mut rng = Rng::new(cfg.seed ^ 0x6b11_6b11);
    for cycle in 0..cfg.kills {
        let tracker = trackers[rng.below(trackers.len() as u64) as usize];
        let err_path = dir.join("child.err");
        let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
        cmd.args(["--exact", "alloc_kill_child", "--nocapture", "--test-threads=1"])
            .env("FAMS_CHILD", "1")
            .env("FAMS_AK_HEAP", &path)
            .env("FAMS_AK_SEED", cfg.seed.to_string())
            .env("FAMS_AK_RUN_SEED", rng.next_u64().to_string())
            .env("FAMS_AK_TRACKER", tracker.name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path).map_err(|e| e.to_string())?);
        // A negative control: the child commits (and recovers) with the same deliberate bug.
        match fams::mutations::current() {
            Some(m) => cmd.env("FAMS_MUTATION", m.name()),
            None => cmd.env_remove("FAMS_MUTATION"),
        };
        let mut spawned = cmd.spawn().map_err(|e| format!("spawning the child: {e}"))?;
        let mut child = ChildProc::new(&spawned);
        let heard = Arc::new(Mutex::new(Heard::default()));
        let reader = {
            let heard = heard.clone();
            let stdout = spawned.stdout.take().expect("piped");
            // Read as the child writes, so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    parse_line(&line, &mut heard.lock().unwrap());
                }
            })
        };
        drop(spawned); // `child` waits for it and kills it on drop
        let is_ready = || heard.lock().unwrap().ready;
        if rng.below(8) == 0 {
            // While it starts (the test binary's start-up takes a few ms) or recovers.
            std::thread::sleep(Duration::from_micros(rng.below(12_000)));
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !is_ready() && child.ended().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(300));
            }
            if !is_ready() && child.ended().is_none() {
                // A wedged open or recovery: a failure, not a kill before ready.
                report.violation(format!("kill {cycle}: the child did not open the heap within 60 s"));
                break;
            }
            std::thread::sleep(Duration::from_micros(rng.below(cfg.kill_after_ms_max * 1000 + 1)));
        }
        let ended = child.ended();
        child.kill();
        reader.join().map_err(|_| "the reader thread panicked".to_string())?;
        let heard = std::mem::take(&mut *heard.lock().unwrap());
        report.kills += 1;
        if let Some(status) = ended {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            report.violation(format!("kill {cycle}: the child ended by itself ({status:?}): {}", err.trim()));
            if cfg.stop_at_first_violation || !heard.ready {
                break;
            }
        }
        if !heard.ready {
            report.kills_before_ready += 1;
        }
        let child_issued = heard.announced.last().map_or(0, |a| a.0);
        if child_issued > heard.last_ack.max(bounds.previous) {
            report.kills_with_commits_in_flight += 1;
        }
        for &(k, d) in &heard.announced {
            announced.insert(k, d);
        }
        bounds.issued = bounds.issued.max(child_issued);
        if heard.last_ack > bounds.last_acked {
            report.commits_acknowledged += heard.last_ack - bounds.last_acked;
            bounds.last_acked = heard.last_ack;
        }
        add_counts(&mut report.counts, &heard.counts);

        // Recover, as the next process to open the heap would.
        let recovered = Heap::open(&path, &HeapOptions::default()).map_err(|e| e.to_string()).and_then(open_objects);
        let mut o = match recovered {
            Ok(o) => o,
            Err(e) => {
                report.violation(format!("kill {cycle}: recovery failed: {e}"));
                break; // nothing more can be checked on a heap that does not open
            }
        };
        report.recoveries += 1;
        match check_recovered(&mut o, &bounds, &mut rng) {
            Ok((rec, made)) => {
                let c = rec.commit;
                let want = announced.get(&c).copied();
                if want != Some(digest(c, &rec.live)) {
                    report.violation(format!(
                        "kill {cycle}: the heap's table for commit {c} ({} objects) is not the object set announced for it",
                        rec.live.len()
                    ));
                }
                if c > bounds.last_acked {
                    report.recovered_unacknowledged += 1;
                }
                report.objects_checked += rec.live.len() as u64;
                report.allocated_after_recovery += made;
                report.final_commit = c;
                // The next child goes on from c; what was announced beyond it is void.
                announced.retain(|&k, _| k <= c);
                bounds.previous = c;
                // After a violation, go on from what is there so later kills are still checked.
                bounds.last_acked = bounds.last_acked.min(c);
                bounds.issued = c;
                announced.insert(c, digest(c, &rec.live));
            }
            Err(e) => {
                report.violation(format!("kill {cycle}: {e}"));
                break; // the allocator's metadata is damaged: the next child could not go on
            }
        }
        drop(o);
        if cfg.stop_at_first_violation && report.violations > 0 {
            break;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(not(feature = "mutations"))]
#[test]
fn sigkill_mid_commit_recovers_exactly_a_committed_object_set() {
    if is_child() {
        return;
    }
    let cfg = KillConfig {
        kills: env_u64("FAMS_ALLOC_KILLS", 120),
        seed: seed(),
        kill_after_ms_max: env_u64("FAMS_ALLOC_KILL_MAX_MS", 60),
        stop_at_first_violation: false,
    };
    let r = run_kills(&cfg).unwrap_or_else(|e| panic!("the SIGKILL test could not run: {e}"));
    say(&r.summary());
    assert_eq!(r.violations, 0, "{}", r.summary());
    assert_eq!(r.kills, cfg.kills, "{}", r.summary());
    // Coverage: a run that quietly stopped killing mid-commit, during recovery, or stopped
    // exercising the allocator would test less than it says.
    assert!(r.kills_before_ready > 0, "no kill landed before the child was ready\n{}", r.summary());
    assert!(r.kills_with_commits_in_flight > cfg.kills / 4, "few kills landed mid-commit\n{}", r.summary());
    assert!(r.recovered_unacknowledged > 0, "no recovery found an unacknowledged commit\n{}", r.summary());
    assert!(r.commits_acknowledged > cfg.kills, "the children should commit between kills\n{}", r.summary());
    assert!(r.objects_checked > 0 && r.allocated_after_recovery > 0, "{}", r.summary());
    let c = &r.counts;
    assert!(
        c.allocs > 0 && c.frees > 0 && c.reallocs > 0 && c.writes > 0 && c.rollbacks > 0 && c.exhausted > 0,
        "some kind of operation never ran\n{}",
        r.summary()
    );
}

/// The committing child (runs only inside the process the SIGKILL test starts).
#[test]
fn alloc_kill_child() {
    if !is_child() || std::env::var_os("FAMS_AK_HEAP").is_none() {
        return;
    }
    if let Err(e) = child_main() {
        eprintln!("alloc kill child: {e}");
        let _ = std::io::stderr().flush();
        // Leave at once, as a crash would (the parent reports the exit as a failure).
        exit_now(3);
    }
}

fn child_main() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let path = PathBuf::from(var("FAMS_AK_HEAP")?);
    let seed: u64 = var("FAMS_AK_SEED")?.parse().map_err(|_| "FAMS_AK_SEED")?;
    let run_seed: u64 = var("FAMS_AK_RUN_SEED")?.parse().map_err(|_| "FAMS_AK_RUN_SEED")?;
    let tracker: TrackerKind = var("FAMS_AK_TRACKER")?.parse()?;
    let opts = HeapOptions { tracker: Some(tracker), ..HeapOptions::default() };
    let mut o = open_objects(Heap::open(&path, &opts).map_err(|e| e.to_string())?)?;
    let mut w = Workload::resume(&mut o, seed)?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
    };
    // On a line of its own: libtest has printed "test alloc_kill_child ... " without a newline.
    say(format!("\nready {}\n", w.commit))?;
    let mut rng = Rng::new(run_seed);
    let mut in_flight: VecDeque<(u64, fams::Ticket)> = VecDeque::new();
    let e = |e: fams::alloc::ObjectError| e.to_string();
    loop {
        // The same pipelining as the heap's torture child (`famsd::torture::commit_forever`):
        // up to a random depth of commits in flight, acknowledged in order once durable.
        let depth = if rng.below(3) == 0 { 1 } else { 1 + rng.below(6) as usize };
        let k = w.next_commit(&mut o)?;
        // Announced before the commit is issued: the parent knows every state it may find.
        // (With the operation counts so far, for the parent's coverage numbers.)
        let c = &w.counts;
        say(format!(
            "commit {k} {:x} {} {} {} {} {} {}\n",
            w.digest(),
            c.allocs,
            c.frees,
            c.reallocs,
            c.writes,
            c.exhausted,
            c.rollbacks
        ))?;
        if rng.below(4) == 0 && in_flight.is_empty() {
            o.commit().map_err(e)?;
            say(format!("ack {k}\n"))?;
        } else {
            in_flight.push_back((k, o.commit_async().map_err(e)?));
        }
        if rng.below(8) == 0 {
            w.failed_turn(&mut o, &mut rng)?; // rolled back over the commits in flight
        }
        while let Some(&(kk, t)) = in_flight.front() {
            if in_flight.len() > depth {
                o.wait(t).map_err(e)?;
            } else if !o.is_durable(t).map_err(e)? {
                break;
            }
            say(format!("ack {kk}\n"))?;
            in_flight.pop_front();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Power loss (simulated)

#[derive(Debug)]
struct SimConfig {
    states: u64,
    seed: u64,
    stop_at_first_violation: bool,
    /// Aim every cut at a commit's log write, not one in four (a negative control that only a
    /// record torn in its write can show).
    aim_every_cut_at_a_write: bool,
}

#[derive(Default, Debug)]
struct SimReport {
    states: u64,
    cuts_during_recovery: u64,
    /// Cuts with commits issued but not acknowledged.
    cuts_with_commits_in_flight: u64,
    /// Cuts armed for the next operation right before a commit's write (see `run_sim`).
    cuts_aimed_at_log_writes: u64,
    commits_acknowledged: u64,
    recovered_unacknowledged: u64,
    writes_kept: u64,
    writes_dropped: u64,
    writes_torn: u64,
    checkpoints: u64,
    objects_checked: u64,
    allocated_after_recovery: u64,
    final_commit: u64,
    counts: OpCounts,
    violations: u64,
    violation_details: Vec<String>,
    seconds: f64,
}

impl SimReport {
    fn summary(&self) -> String {
        format!(
            "allocator under simulated power loss: {} states in {:.1} s ({} cut again during recovery, {} with commits in flight, \
             {} aimed at a log write), \
             unflushed writes kept {} / dropped {} / torn {}, {} commits acknowledged, {} recoveries found a commit \
             beyond the last ack, final commit {}, {} checkpoints, {} objects checked, {} allocated on recovered heaps, \
             operations {:?}; violations {}{}",
            self.states,
            self.seconds,
            self.cuts_during_recovery,
            self.cuts_with_commits_in_flight,
            self.cuts_aimed_at_log_writes,
            self.writes_kept,
            self.writes_dropped,
            self.writes_torn,
            self.commits_acknowledged,
            self.recovered_unacknowledged,
            self.final_commit,
            self.checkpoints,
            self.objects_checked,
            self.allocated_after_recovery,
            self.counts,
            self.violations,
            if self.violation_details.is_empty() {
                String::new()
            } else {
                format!("\n  {}", self.violation_details.join("\n  "))
            }
        )
    }

    fn violation(&mut self, what: String) {
        note_violation(&mut self.violations, &mut self.violation_details, what);
    }

    fn note_cut(&mut self, sim: &SimHeap) {
        if let Some(c) = sim.machine.take_last_cut() {
            self.writes_kept += c.writes_kept;
            self.writes_dropped += c.writes_dropped;
            self.writes_torn += c.writes_torn;
        }
    }
}

fn sim_options() -> HeapOptions {
    // The log writer runs when the workload steps it, so the I/O sequence (and where a cut
    // lands) is a function of the seed; checkpoints come often, so cuts land around them.
    HeapOptions { writer: WriterMode::Manual, checkpoint_threshold_bytes: Some(LOG_SIZE / 8), ..HeapOptions::default() }
}

/// Reboot and recover, sometimes with the power cut again during recovery first.
fn sim_recover(sim: &SimHeap, rng: &mut Rng, report: &mut SimReport) -> Result<ObjectHeap, String> {
    report.note_cut(sim);
    sim.reboot().map_err(|e| format!("rewriting the heap file: {e}"))?;
    if rng.below(4) == 0 {
        sim.machine.cut_power_at(Some(1 + rng.below(8)));
        match sim.open(&sim_options()) {
            Ok(h) => {
                // Recovery needed fewer operations than that: keep this open.
                sim.machine.cut_power_at(None);
                return open_objects(h);
            }
            Err(_) if !sim.machine.powered() => {
                report.cuts_during_recovery += 1;
                report.note_cut(sim);
                sim.reboot().map_err(|e| format!("rewriting the heap file: {e}"))?;
            }
            Err(e) => return Err(format!("recovery failed without a power cut: {e}")),
        }
    }
    open_objects(sim.open(&sim_options()).map_err(|e| format!("recovery after a power cut failed: {e}"))?)
}

fn run_sim(cfg: &SimConfig) -> Result<SimReport, String> {
    let started = Instant::now();
    let dir = TempDir::new("alloc-sim");
    let sim = SimHeap::format(&dir.join("h"), HEAP_SIZE, LOG_SIZE, cfg.seed).map_err(|e| e.to_string())?;
    let mut o = open_objects(sim.open(&sim_options()).map_err(|e| e.to_string())?)?;
    alloc_workload::create(&mut o)?;
    let mut report = SimReport::default();
    let mut rng = Rng::new(cfg.seed ^ 0x5117_0000_0a11_0c00);
    let mut w = Workload::resume(&mut o, cfg.seed)?;
    // The object set of every commit that a recovery may find (from the last recovered one on).
    let mut models: BTreeMap<u64, Live> = BTreeMap::from([(0, Live::new())]);
    let mut bounds = Bounds { last_acked: 0, previous: 0, issued: 0 };
    while report.states < cfg.states {
        let state = report.states;
        // Where the power goes. Mostly at a random mutating operation: soon, or now and then
        // after hundreds, so the log fills past the checkpoint threshold first (recovery empties
        // it). But a commit writes back each changed run of bytes as an operation of its own, so
        // random operations seldom hit a log write; one state in four aims at one instead: the
        // power goes during the first operation of some commit's write (in this writer mode,
        // the group's log write, or the checkpoint making room for it).
        let aim_at_commit = if cfg.aim_every_cut_at_a_write || rng.below(4) == 0 {
            Some(rng.below(8))
        } else {
            let cut_range = if rng.below(4) == 0 { 600 } else { 40 };
            sim.machine.cut_power_at(Some(1 + rng.below(cut_range)));
            None
        };
        let mut in_flight: VecDeque<(u64, fams::Ticket)> = VecDeque::new();
        let ack = |k: u64, bounds: &mut Bounds, report: &mut SimReport| {
            if k > bounds.last_acked {
                report.commits_acknowledged += k - bounds.last_acked;
                bounds.last_acked = k;
            }
        };
        // Commit until the power goes (or 200 commits: the cut point may lie beyond them).
        for i in 0..200 {
            let k = match w.next_commit(&mut o) {
                Ok(k) => k,
                Err(m) => {
                    // The allocator did what it must never do (e.g. handed out a live object).
                    report.violation(format!("state {state}: {m}"));
                    o.abandon();
                    report.seconds = started.elapsed().as_secs_f64();
                    return Ok(report);
                }
            };
            models.insert(k, w.live.clone());
            bounds.issued = k;
            if aim_at_commit == Some(i) {
                sim.machine.cut_power_at(Some(1));
                report.cuts_aimed_at_log_writes += 1;
            }
            let ok = if rng.below(3) == 0 {
                o.commit().map(|_| ack(k, &mut bounds, &mut report)).is_ok()
            } else {
                let queued = o.commit_async().map(|t| in_flight.push_back((k, t))).is_ok();
                // Write a queued group now and then; otherwise the queue grows until a wait.
                queued && (rng.below(2) == 0 || o.write_step().is_ok())
            };
            if !ok {
                break;
            }
            if rng.below(6) == 0 {
                if let Err(m) = w.failed_turn(&mut o, &mut rng) {
                    if sim.machine.powered() {
                        return Err(format!("state {state}: a failed turn with the power on: {m}"));
                    }
                    break;
                }
            }
            let depth = 1 + rng.below(6) as usize;
            while let Some(&(kk, t)) = in_flight.front() {
                if in_flight.len() > depth && o.wait(t).is_err() {
                    break;
                }
                if !o.is_durable(t).unwrap_or(false) {
                    break;
                }
                ack(kk, &mut bounds, &mut report);
                in_flight.pop_front();
            }
            if !sim.machine.powered() {
                break;
            }
        }
        if bounds.issued > bounds.last_acked {
            report.cuts_with_commits_in_flight += 1;
        }
        report.checkpoints += o.stats().checkpoints;
        add_counts(&mut report.counts, &w.counts);
        // The process dies with the power: commits never stepped are lost (as abandon() does).
        o.abandon();
        o = match sim_recover(&sim, &mut rng, &mut report) {
            Ok(o) => o,
            Err(m) => {
                // Nothing more can be checked on a heap that does not open.
                report.violation(format!("state {state}: {m}"));
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(report);
            }
        };
        report.states += 1;
        match check_recovered(&mut o, &bounds, &mut rng) {
            Ok((rec, made)) => {
                let c = rec.commit;
                if models.get(&c) != Some(&rec.live) {
                    let want = models.get(&c).map_or(0, |m| m.len());
                    report.violation(format!(
                        "state {state}: the heap's table for commit {c} ({} objects) differs from the model's ({want})",
                        rec.live.len()
                    ));
                }
                if c > bounds.last_acked {
                    report.recovered_unacknowledged += 1;
                }
                report.objects_checked += rec.live.len() as u64;
                report.allocated_after_recovery += made;
                report.final_commit = c;
                models.retain(|&k, _| k <= c);
                models.insert(c, rec.live);
                bounds.previous = c;
                bounds.last_acked = bounds.last_acked.min(c);
                bounds.issued = c;
            }
            Err(m) => {
                report.violation(format!("state {state}: {m}"));
                break;
            }
        }
        w = Workload::resume(&mut o, cfg.seed)?; // its counts start over (added to the report above)
        if cfg.stop_at_first_violation && report.violations > 0 {
            break;
        }
    }
    o.abandon();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(not(feature = "mutations"))]
#[test]
fn power_loss_recovers_exactly_a_committed_object_set() {
    if is_child() {
        return;
    }
    let cfg = SimConfig {
        states: env_u64("FAMS_ALLOC_SIM_STATES", 400),
        seed: seed(),
        stop_at_first_violation: false,
        aim_every_cut_at_a_write: false,
    };
    let r = run_sim(&cfg).unwrap_or_else(|e| panic!("the power-loss test could not run: {e}"));
    say(&r.summary());
    assert_eq!(r.violations, 0, "{}", r.summary());
    assert_eq!(r.states, cfg.states, "{}", r.summary());
    for (what, n) in [
        ("cuts during recovery", r.cuts_during_recovery),
        ("cuts with commits in flight", r.cuts_with_commits_in_flight),
        ("cuts aimed at log writes", r.cuts_aimed_at_log_writes),
        ("recoveries beyond the last ack", r.recovered_unacknowledged),
        ("dropped writes", r.writes_dropped),
        ("torn writes", r.writes_torn),
        ("checkpoints", r.checkpoints),
        ("objects checked", r.objects_checked),
        ("allocations on recovered heaps", r.allocated_after_recovery),
        ("exhausted allocations", r.counts.exhausted),
        ("reallocs", r.counts.reallocs),
        ("rollbacks", r.counts.rollbacks),
    ] {
        assert!(n > 0, "no {what}: the run stopped covering it\n{}", r.summary());
    }
}

/// The negative controls (a build with `--features mutations`): with each deliberate bug of the
/// heap switched on, the simulated power cuts must find a violation (each runs until its first:
/// here after 0 to 259 states — `trust-record-without-crc` needs a cut during the log write of a
/// multi-sector record that tears data sectors only, which the cuts aimed at log writes provide),
/// and so must the SIGKILLs for `write-back-before-durable` (the others need what a power cut
/// loses — the page cache, the drive's cache — or a kill within microseconds; see below).
/// Run with `cargo test --release -p fams-tests --features mutations --test alloc_crash -- --nocapture`.
#[cfg(feature = "mutations")]
#[test]
fn crashes_catch_the_heap_mutations() {
    if is_child() {
        return;
    }
    let mut missed = Vec::new();
    for (_, name, what) in fams::mutations::of_layer(fams::mutations::Layer::Heap) {
        if *name == "background-checkpoint-tail-at-head" {
            // This test's heaps step a manual writer (so a seed replays its I/O exactly), and a
            // manual writer has no heap-file thread, so no checkpoint runs beside the commits.
            // The power-loss explorer, the real power cuts, the SIGKILL torture and the heap's
            // unit test catch it.
            say(&format!("mutation {name}: not run (no checkpoint beside the commits with a manual writer)"));
            continue;
        }
        fams::mutations::set(name).expect("switch the mutation on");
        // A record replayed without its checksum shows only if a cut tore it in its write (with
        // its header intact and entry data lost), so every cut is aimed at a write, and it gets
        // more states: over seeds 1-8 it was caught after 4, 2402, 1653, 438, 395, 595, 159 and 4
        // states (with one cut in four aimed, this test's seed needed 879).
        let torn_record = *name == "trust-record-without-crc";
        let cfg = SimConfig {
            states: env_u64("FAMS_ALLOC_SIM_STATES", if torn_record { 8000 } else { 3000 }),
            seed: seed(),
            stop_at_first_violation: true,
            aim_every_cut_at_a_write: torn_record,
        };
        let r = run_sim(&cfg);
        fams::mutations::set("none").expect("switch the mutation off");
        let r = r.unwrap_or_else(|e| panic!("the power-loss test could not run ({name}): {e}"));
        say(&format!(
            "mutation {name} ({what}), power loss: {} violations in {} states ({:.1} s){}",
            r.violations,
            r.states,
            r.seconds,
            r.violation_details.first().map(|v| format!("\n  e.g. {v}")).unwrap_or_default()
        ));
        if r.violations == 0 {
            say(&r.summary());
            missed.push(format!("{name} (power loss)"));
        }
    }
    // A SIGKILL keeps the page cache and the drive: only bugs in what the process does before
    // the kill show, and of those only `write-back-before-durable` reliably (caught after 12,
    // 16, 30 and 72 kills here; up to 400 are allowed). `commit-ack-before-durable` is not run:
    // under SIGKILL its window is the microseconds between the writer marking a group durable
    // and submitting its write (a write submitted before the kill still completes), so a kill
    // lands in it by chance (after 24 and 88 kills in two runs, in none of 200 in a third); the
    // simulator above catches it.
    {
        let name = "write-back-before-durable";
        fams::mutations::set(name).expect("switch the mutation on");
        let cfg = KillConfig {
            kills: env_u64("FAMS_ALLOC_KILLS", 400),
            seed: seed(),
            kill_after_ms_max: env_u64("FAMS_ALLOC_KILL_MAX_MS", 60),
            stop_at_first_violation: true,
        };
        let r = run_kills(&cfg);
        fams::mutations::set("none").expect("switch the mutation off");
        let r = r.unwrap_or_else(|e| panic!("the SIGKILL test could not run ({name}): {e}"));
        say(&format!(
            "mutation {name}, SIGKILL: {} violations in {} kills ({:.1} s){}",
            r.violations,
            r.kills,
            r.seconds,
            r.violation_details.first().map(|v| format!("\n  e.g. {v}")).unwrap_or_default()
        ));
        if r.violations == 0 {
            say(&r.summary());
            missed.push(format!("{name} (SIGKILL)"));
        }
    }
    assert!(missed.is_empty(), "the allocator's crash tests missed {missed:?}");
}
