//! `famsd torture --power-loss`: the crash explorer. The unchanged heap runs on a simulated
//! machine ([`fams::sim`]) whose disks have volatile write caches; the power is cut during a
//! chosen I/O operation, unflushed writes are kept, dropped or torn per 512-byte sector, the
//! machine reboots and the heap recovers — sometimes with the power cut again *during* recovery.
//! After each crash the heap must hold exactly the state after some commit `c`, at or after the
//! last acknowledged one, and must keep working.
//!
//! Two phases:
//! 1. **Exhaustive**: a short synchronous workload from a fixed state, cut at every mutating I/O
//!    operation in turn, each with several cache outcomes — once with the log in each flush mode.
//! 2. **Random**: a long chain of states; each runs a random mix of synchronous commits, grouped
//!    async bursts and page releases until the power is cut at a random operation.
//!
//! The log runs in both flush modes of the real one ([`FlushMode`]), drawn per state (or forced
//! with `--flush-mode`): `dsync`, one durable write per log write, and `fdatasync`, a write per
//! segment and then a separate flush, so cuts land between a log write and its flush. Some states
//! also get a short log write (a prefix cached, the call failed): the commits it carried must
//! not be acknowledged, and recovery must cope with what reached the cache.
//!
//! Recovery is cut anywhere: a quarter of the states (and every long-log state) first recover
//! with the power on from the rebooted images, recording each mutating operation; then the same
//! images are recovered again and cut at an operation drawn from one of its phases — replay
//! writes, the heap file's sync, the superblock write — chosen uniformly. (A quarter of the
//! superblock picks make that write short instead: recovery must fail with an error, and recover
//! at the next open.) One state in
//! 80 (`LONG_REPLAY_EVERY`) first builds a long log (a few hundred commits, no checkpoint) so that
//! the replay it cuts is long.
//!
//! Both phases also run failed turns ([`failed_turn`]): scribbles rolled back, some over commits
//! still in flight. A rolled-back byte that reached the log or the heap file would make a
//! recovered heap differ from every committed state.
//!
//! The report counts what was exercised: states per flush mode, cuts per kind of operation
//! (those in an fdatasync-mode write or its flush are cuts between a write and its flush), short
//! writes, recovery cuts per phase, long replays and the longest one.
//!
//! Everything is derived from the seed. The order of operations is exact for synchronous commits;
//! grouped async commits depend on thread timing, so `--sync-only` makes a replay bit-exact.

use crate::workload::{commit_number, failed_turn, mutate, Model};
use fams::io::FlushMode;
use fams::sim::{OpKind, SimHeap, SimRng};
use fams::{Heap, HeapOptions, TrackerKind};
use std::path::PathBuf;

pub struct PowerLossConfig {
    pub states: u64,
    pub seed: u64,
    pub dir: PathBuf,
    pub tracker: Option<TrackerKind>,
    pub heap_size_bytes: u64,
    pub log_size_bytes: u64,
    /// Only synchronous commits: the I/O sequence, and so a replay, is exact.
    pub sync_only: bool,
    /// Run every state with this flush mode of the log; None: each state draws one.
    pub flush_mode: Option<FlushMode>,
    pub progress: bool,
}

/// The phases of recovery a cut can land in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecoveryPhase {
    /// Writing replayed records into the heap file.
    Replay,
    /// The heap file's fdatasync after replay.
    HeapSync,
    /// The new superblock (one durable write, or a write and its flush).
    Superblock,
}

impl RecoveryPhase {
    fn of(kind: OpKind) -> RecoveryPhase {
        match kind {
            OpKind::HeapWrite => RecoveryPhase::Replay,
            OpKind::HeapSync => RecoveryPhase::HeapSync,
            OpKind::LogDurableWrite | OpKind::LogWrite | OpKind::LogFlush => RecoveryPhase::Superblock,
        }
    }
}

#[derive(Debug, Default)]
pub struct PowerLossReport {
    pub states: u64,
    pub violations: u64,
    pub violation_details: Vec<String>,
    pub seed: u64,
    pub exhaustive_states: u64,
    /// States recovered and checked with the log in each flush mode: [dsync, fdatasync]. (The
    /// open that recovers a state also runs the next state's workload, in the random phase.)
    pub states_per_flush_mode: [u64; 2],
    /// Cuts that landed in an operation of each kind (workload and recovery), by [`kind_index`].
    pub cuts_per_operation: [u64; 5],
    /// Log writes cut short ([`fams::sim::SimMachine::short_write_at`]).
    pub short_writes: u64,
    pub cuts_during_recovery: u64,
    /// Of those, cuts in each phase: [replay writes, heap sync, superblock write].
    pub recovery_cuts_per_phase: [u64; 3],
    /// Recoveries whose superblock write came back short (they must fail with an error).
    pub recovery_short_writes: u64,
    /// States that first built a long log (many commits, no checkpoint) so recovery replays long.
    pub long_replay_states: u64,
    /// The longest replay seen: records, and bytes of log read.
    pub longest_replay_records: u64,
    pub longest_replay_log_bytes: u64,
    pub commits_acknowledged: u64,
    pub recovered_unacknowledged: u64,
    pub writes_kept: u64,
    pub writes_dropped: u64,
    pub writes_torn: u64,
    pub garbage_sectors: u64,
    pub records_replayed: u64,
    pub checkpoints: u64,
    /// Of those, taken by the heap-file thread beside the commits (none with `--sync-only`).
    pub background_checkpoints: u64,
    /// Superblock writes that raised the log's written limit (each a place a cut can land).
    pub written_limit_raises: u64,
    /// Failed turns rolled back (and checked to leave the heap as it was).
    pub rollbacks: u64,
    pub final_commit: u64,
}

impl PowerLossReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "states": self.states,
            "violations": self.violations,
            "violation_details": self.violation_details,
            "seed": self.seed,
            "exhaustive_states": self.exhaustive_states,
            "states_per_flush_mode": {
                "dsync": self.states_per_flush_mode[0],
                "fdatasync": self.states_per_flush_mode[1],
            },
            "cuts_per_operation": KINDS.iter().map(|k| (k.name().to_string(), self.cuts_per_operation[kind_index(*k)].into()))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            // An fdatasync-mode log write cut after some of its writes and before its flush ended.
            "cuts_between_log_write_and_flush": self.cuts_per_operation[kind_index(OpKind::LogWrite)]
                + self.cuts_per_operation[kind_index(OpKind::LogFlush)],
            "short_writes_injected": self.short_writes,
            "cuts_during_recovery": self.cuts_during_recovery,
            "recovery_cuts": {
                "replay_writes": self.recovery_cuts_per_phase[0],
                "heap_sync": self.recovery_cuts_per_phase[1],
                "superblock_write": self.recovery_cuts_per_phase[2],
            },
            "recovery_short_writes": self.recovery_short_writes,
            "long_replay_states": self.long_replay_states,
            "longest_replay_records": self.longest_replay_records,
            "longest_replay_log_bytes": self.longest_replay_log_bytes,
            "commits_acknowledged": self.commits_acknowledged,
            "recovered_unacknowledged": self.recovered_unacknowledged,
            "unflushed_writes_kept": self.writes_kept,
            "unflushed_writes_dropped": self.writes_dropped,
            "unflushed_writes_torn": self.writes_torn,
            "garbage_sectors": self.garbage_sectors,
            "records_replayed": self.records_replayed,
            "checkpoints": self.checkpoints,
            "background_checkpoints": self.background_checkpoints,
            "written_limit_raises": self.written_limit_raises,
            "rollbacks": self.rollbacks,
            "final_commit": self.final_commit,
        })
    }
}

const KINDS: [OpKind; 5] =
    [OpKind::LogDurableWrite, OpKind::LogWrite, OpKind::LogFlush, OpKind::HeapWrite, OpKind::HeapSync];

fn kind_index(k: OpKind) -> usize {
    KINDS.iter().position(|&x| x == k).unwrap_or(0)
}

fn mode_index(m: FlushMode) -> usize {
    match m {
        FlushMode::Dsync => 0,
        FlushMode::Fdatasync => 1,
    }
}

/// The checkpoint threshold of ordinary states: small, so that cuts land around checkpoints and
/// the log wraps often.
const NORMAL_CHECKPOINT_BYTES: u64 = 128 << 10;

/// One state in this many first builds a long log for recovery to replay.
const LONG_REPLAY_EVERY: u64 = 80;

struct Explorer<'a> {
    cfg: &'a PowerLossConfig,
    /// The heap file and the simulated machine under it.
    sim: SimHeap,
    model: Model,
    /// Highest commit acknowledged durable so far.
    acked: u64,
    report: PowerLossReport,
    /// The flush mode the next open gives the log.
    flush_mode: FlushMode,
    /// Whether the next open lets the log grow long before checkpointing.
    long_log: bool,
    /// Whether the next open's recovery reads the log ahead on a second thread (every other
    /// open: the explorer's logs are smaller than the size from which an open does by itself).
    read_ahead: bool,
    /// Chooses where recovery is cut (its own generator, so the workload's draws stay put).
    recovery_rng: SimRng,
}

impl<'a> Explorer<'a> {
    fn options(&self) -> HeapOptions {
        // Checkpoint often, so crashes land around checkpoints and wrap-arounds — except when
        // building a long log, for a long replay.
        let threshold = if self.long_log {
            self.cfg.log_size_bytes / 16 * 15
        } else {
            (self.cfg.log_size_bytes / 5).min(NORMAL_CHECKPOINT_BYTES)
        };
        HeapOptions {
            tracker: self.cfg.tracker,
            checkpoint_threshold_bytes: Some(threshold),
            flush_mode: Some(self.flush_mode),
            // With synchronous commits only, nothing may write the heap file beside the
            // committing thread (the background writing of committed images would, when it
            // likes), so a seed replays bit-exactly; the mixed workload keeps it, and explores it.
            images_only_at_checkpoints: self.cfg.sync_only,
            recovery_read_ahead: Some(self.read_ahead),
            ..HeapOptions::default()
        }
    }

    /// The flush mode for the next open: the configured one, or drawn from `rng`; and whether its
    /// recovery reads ahead (every other open, without a draw: the workload's draws stay put).
    fn choose_flush_mode(&mut self, rng: &mut SimRng) {
        self.read_ahead = !self.read_ahead;
        self.flush_mode =
            self.cfg.flush_mode.unwrap_or(if rng.below(2) == 0 { FlushMode::Dsync } else { FlushMode::Fdatasync });
    }

    fn open(&self) -> fams::Result<Heap> {
        self.sim.open(&self.options())
    }

    fn violation(&mut self, state: u64, what: String) {
        self.report.violations += 1;
        if self.report.violation_details.len() < 10 {
            self.report.violation_details.push(format!("seed {} state {state}: {what}", self.cfg.seed));
        }
    }

    fn note_cut(&mut self) {
        if let Some(o) = self.sim.machine.take_last_cut() {
            self.report.writes_kept += o.writes_kept;
            self.report.writes_dropped += o.writes_dropped;
            self.report.writes_torn += o.writes_torn;
            self.report.garbage_sectors += o.garbage_sectors;
            if let Some(k) = o.during {
                self.report.cuts_per_operation[kind_index(k)] += 1;
            }
        }
    }

    /// Reboot, recover (maybe cutting the power during recovery first), and check the state.
    /// Returns the recovered heap, or None if it could not be opened (a violation).
    ///
    /// To cut recovery anywhere — deep in a long replay as much as in its first writes — it is
    /// first run with the power on from the rebooted images, recording the kind of each of its
    /// mutating operations; then the images are put back and the same recovery (it is
    /// deterministic: one thread, the same bytes) is cut at an operation of a phase drawn
    /// uniformly (replay writes, heap sync, superblock write), uniformly within the phase.
    fn recover_and_verify(&mut self, state: u64, issued: u64, cut_recovery: bool) -> Option<Heap> {
        self.report.short_writes = self.sim.machine.short_writes();
        self.note_cut();
        self.sim.reboot().expect("rewriting the real heap file");
        if cut_recovery {
            let (log_image, heap_image) = self.sim.machine.images();
            self.sim.machine.trace_ops();
            let probe = self.open();
            let trace = self.sim.machine.take_trace();
            match probe {
                Ok(h) => drop(h),
                Err(e) => {
                    self.violation(state, format!("recovery after a power cut failed: {e}"));
                    return None;
                }
            }
            self.sim.machine.restore(log_image, heap_image, &self.sim.heap_path).expect("rewriting the real heap file");
            let mut phases: Vec<(RecoveryPhase, Vec<u64>)> = Vec::new();
            for (i, &k) in trace.iter().enumerate() {
                let phase = RecoveryPhase::of(k);
                match phases.iter_mut().find(|(p, _)| *p == phase) {
                    Some((_, ops)) => ops.push(i as u64 + 1),
                    None => phases.push((phase, vec![i as u64 + 1])),
                }
            }
            if !phases.is_empty() {
                let (phase, ops) = &phases[self.recovery_rng.below(phases.len() as u64) as usize];
                let (phase, n) = (*phase, ops[self.recovery_rng.below(ops.len() as u64) as usize]);
                // Now and then the superblock write comes back short instead: recovery must fail
                // with an error, and the next open (after the power goes) must recover.
                let write = matches!(trace[n as usize - 1], OpKind::LogDurableWrite | OpKind::LogWrite);
                let short = write && self.recovery_rng.below(4) == 0;
                let shorts_before = self.sim.machine.short_writes();
                if short {
                    self.sim.machine.short_write_at(Some(n));
                } else {
                    self.sim.machine.cut_power_at(Some(n));
                }
                match self.open() {
                    Ok(_) => {
                        self.violation(
                            state,
                            format!(
                                "recovery ran to its end although its operation {n} of {} was {}: it did \
                                 not repeat itself on the same images",
                                trace.len(),
                                if short { "a short write" } else { "cut by the power" }
                            ),
                        );
                        self.sim.machine.cut_power_at(None);
                        self.sim.machine.cut_power_now();
                    }
                    Err(_) if !self.sim.machine.powered() => {
                        self.report.cuts_during_recovery += 1;
                        self.report.recovery_cuts_per_phase[phase as usize] += 1;
                    }
                    Err(_) if short && self.sim.machine.short_writes() > shorts_before => {
                        self.report.recovery_short_writes += 1;
                    }
                    Err(e) => {
                        self.violation(state, format!("recovery failed without a power cut: {e}"));
                        return None;
                    }
                }
                self.note_cut();
                self.sim.reboot().expect("rewriting the real heap file");
            }
        }
        match self.open() {
            Ok(h) => self.verify(state, issued, h),
            Err(e) => {
                self.violation(state, format!("recovery after a power cut failed: {e}"));
                None
            }
        }
    }

    fn verify(&mut self, state: u64, issued: u64, heap: Heap) -> Option<Heap> {
        self.report.states_per_flush_mode[mode_index(self.flush_mode)] += 1;
        let s = heap.stats();
        self.report.records_replayed += s.recovery.records_replayed;
        if s.recovery.records_replayed > self.report.longest_replay_records {
            self.report.longest_replay_records = s.recovery.records_replayed;
            self.report.longest_replay_log_bytes = s.recovery.log_bytes_read;
        }
        let c = commit_number(heap.bytes());
        if c < self.acked {
            self.violation(state, format!("heap is at commit {c} but commit {} was acknowledged", self.acked));
        } else if c < self.model.at {
            self.violation(state, format!("heap went back from commit {} to {c}", self.model.at));
        } else if c > issued {
            self.violation(state, format!("heap is at commit {c} but only {issued} were issued"));
        } else {
            if c > self.acked {
                self.report.recovered_unacknowledged += 1;
            }
            self.model.advance_to(c);
            if let Some(at) = self.model.first_difference(heap.bytes()) {
                self.violation(
                    state,
                    format!("heap says commit {c} but differs from it at byte {at} (page {})", at / 4096),
                );
            } else {
                self.report.final_commit = c;
                self.report.states += 1;
                return Some(heap);
            }
        }
        // Go on from what is there, so later states are still checked.
        self.model.image.copy_from_slice(heap.bytes());
        self.model.at = c;
        self.acked = c;
        self.report.states += 1;
        Some(heap)
    }

    /// Commit the workload until the power goes (or `max_commits`). Returns the highest commit
    /// issued; updates `acked`.
    fn run_workload(&mut self, heap: &mut Heap, rng: &mut SimRng, max_commits: u64, sync_only: bool) -> u64 {
        let (checkpoints_before, background_before) = (heap.stats().checkpoints, heap.stats().background_checkpoints);
        let raises_before = heap.stats().written_limit_raises;
        let mut k = commit_number(heap.bytes());
        let mut done = 0;
        while done < max_commits && self.sim.machine.powered() {
            if sync_only || rng.below(2) == 0 {
                k += 1;
                done += 1;
                mutate(heap.bytes_mut(), self.cfg.seed, k);
                match heap.commit() {
                    Ok(_) => self.ack(k),
                    Err(_) => break,
                }
                if rng.below(4) == 0 && !self.failed_turn(heap, rng) {
                    break;
                }
            } else {
                let mut tickets = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    k += 1;
                    done += 1;
                    mutate(heap.bytes_mut(), self.cfg.seed, k);
                    match heap.commit_async() {
                        Ok(t) => tickets.push((k, t)),
                        Err(_) => break,
                    }
                    // Rolled back over the commit still in flight.
                    if rng.below(3) == 0 && !self.failed_turn(heap, rng) {
                        break;
                    }
                }
                if let Some(&(_, last)) = tickets.last() {
                    let _ = heap.wait(last);
                }
                for (kk, t) in tickets {
                    if heap.is_durable(t).unwrap_or(false) {
                        self.ack(kk);
                    }
                }
            }
            if !sync_only && rng.below(8) == 0 && heap.release_committed().is_err() {
                break;
            }
        }
        self.report.checkpoints += heap.stats().checkpoints - checkpoints_before;
        self.report.background_checkpoints += heap.stats().background_checkpoints - background_before;
        self.report.written_limit_raises += heap.stats().written_limit_raises - raises_before;
        k
    }

    /// A failed turn, rolled back. False when the heap refused (the power is gone, or the heap
    /// failed): the workload stops, as it does when a commit fails.
    fn failed_turn(&mut self, heap: &mut Heap, rng: &mut SimRng) -> bool {
        match failed_turn(heap, rng) {
            Ok(None) => {
                self.report.rollbacks += 1;
                true
            }
            Ok(Some(what)) => {
                self.violation(self.report.states, what);
                true
            }
            Err(_) => false,
        }
    }

    fn ack(&mut self, k: u64) {
        if k > self.acked {
            self.report.commits_acknowledged += k - self.acked;
            self.acked = k;
        }
    }
}

pub fn run(cfg: &PowerLossConfig) -> Result<PowerLossReport, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let heap_path = cfg.dir.join("power-loss.heap");
    let sim = SimHeap::format(&heap_path, cfg.heap_size_bytes, cfg.log_size_bytes, cfg.seed)
        .map_err(|e| format!("formatting {}: {e}", heap_path.display()))?;
    let heap_bytes = cfg.heap_size_bytes.div_ceil(4096) as usize * 4096;
    let mut x = Explorer {
        cfg,
        sim,
        model: Model::new(heap_bytes, cfg.seed),
        acked: 0,
        report: PowerLossReport { seed: cfg.seed, ..Default::default() },
        flush_mode: cfg.flush_mode.unwrap_or(FlushMode::Dsync),
        long_log: false,
        read_ahead: false,
        recovery_rng: SimRng::new(cfg.seed ^ 0x7265_636f_7665_7279),
    };
    let mut rng = SimRng::new(cfg.seed ^ 0x0ddb_a11c_afe0_0001);
    let mut heap = x.open().map_err(|e| format!("opening the fresh heap on the simulated machine: {e}"))?;

    // Phase 1, exhaustive: from a state with some history, a short synchronous workload cut at
    // every mutating operation, with several cache outcomes each — once per flush mode of the
    // log (unless one is forced), since they issue different operations.
    const EXHAUSTIVE_COMMITS: u64 = 6;
    const OUTCOMES_PER_POINT: u64 = 3;
    x.run_workload(&mut heap, &mut rng, 12, true);
    drop(heap);
    let (log0, heap0) = x.sim.machine.images();
    // The snapshot's committed state, as recovery sees it (and checked like any other).
    x.sim.machine.restore(log0.clone(), heap0.clone(), &x.sim.heap_path).map_err(|e| e.to_string())?;
    let prefix_issued = x.acked;
    let Some(h) = x.recover_and_verify(0, prefix_issued, false) else { return Ok(x.report) };
    let at0 = commit_number(h.bytes());
    drop(h);
    let (model0, acked0) = (x.model.image.clone(), x.acked);
    let modes = match cfg.flush_mode {
        Some(m) => vec![m],
        None => vec![FlushMode::Dsync, FlushMode::Fdatasync],
    };
    let exhaustive_budget = cfg.states / 2 / modes.len() as u64;
    for (i, &mode) in modes.iter().enumerate() {
        x.flush_mode = mode;
        // Count the operations of the workload with the power on.
        x.sim.machine.restore(log0.clone(), heap0.clone(), &x.sim.heap_path).map_err(|e| e.to_string())?;
        let mut h = x.open().map_err(|e| e.to_string())?;
        let ops_before = x.sim.machine.ops();
        let mut probe_rng = SimRng::new(1);
        x.run_workload(&mut h, &mut probe_rng, EXHAUSTIVE_COMMITS, true);
        let ops_total = x.sim.machine.ops() - ops_before;
        drop(h);
        let points = ops_total.min(exhaustive_budget / OUTCOMES_PER_POINT);
        'points: for point in 1..=points {
            for _ in 0..OUTCOMES_PER_POINT {
                if x.report.states >= exhaustive_budget * (i as u64 + 1) {
                    break 'points;
                }
                x.sim.machine.restore(log0.clone(), heap0.clone(), &x.sim.heap_path).map_err(|e| e.to_string())?;
                x.model.image.copy_from_slice(&model0);
                x.model.at = at0;
                x.acked = acked0.max(at0);
                let Some(mut h) = x.recover_and_verify(x.report.states, at0, false) else { continue };
                x.sim.machine.cut_power_at(Some(point));
                let mut wl_rng = SimRng::new(1);
                let issued = x.run_workload(&mut h, &mut wl_rng, EXHAUSTIVE_COMMITS, true);
                drop(h);
                if let Some(h) = x.recover_and_verify(x.report.states, issued, false) {
                    drop(h);
                }
                x.report.exhaustive_states += 1;
            }
        }
    }

    // Phase 2, random: one long chain from the exhaustive phase's starting state.
    x.sim.machine.restore(log0, heap0, &x.sim.heap_path).map_err(|e| e.to_string())?;
    x.model.image.copy_from_slice(&model0);
    x.model.at = at0;
    x.acked = acked0.max(at0);
    x.choose_flush_mode(&mut rng);
    let mut heap = x.open().map_err(|e| format!("reopening for the random phase: {e}"))?;
    let progress = crate::progress::Progress::new(cfg.progress, cfg.states as usize);
    let mut state = x.report.states;
    while x.report.states < cfg.states {
        state += 1;
        let long = x.long_log;
        if long {
            // The heap was opened to checkpoint late: build a long log with the power on (a
            // few hundred commits), then cut during the next few operations.
            x.report.long_replay_states += 1;
            let commits = 150 + rng.below(250);
            x.run_workload(&mut heap, &mut rng, commits, cfg.sync_only);
            x.sim.machine.cut_power_at(Some(1 + rng.below(20)));
        } else {
            x.sim.machine.cut_power_at(Some(1 + rng.below(60)));
            // Sometimes a log write comes back short first: the heap must fail the commits it
            // carried, never acknowledge them, and recover from what reached the cache.
            if rng.below(8) == 0 {
                x.sim.machine.short_write_at(Some(1 + rng.below(60)));
            }
        }
        let issued = x.run_workload(&mut heap, &mut rng, 200, cfg.sync_only);
        drop(heap);
        // A long log is always replayed under a cut; other states' recovery a quarter of the time.
        let cut_recovery = long || rng.below(4) == 0;
        x.long_log = rng.below(LONG_REPLAY_EVERY) == 0;
        x.choose_flush_mode(&mut rng);
        heap = match x.recover_and_verify(state, issued, cut_recovery) {
            Some(h) => h,
            None => return Ok(x.report),
        };
        if state % 100 == 0 {
            progress.at(
                x.report.states,
                format!("power-loss states, commit {}, violations {}", x.report.final_commit, x.report.violations),
            );
        }
    }
    drop(heap);
    Ok(x.report)
}
