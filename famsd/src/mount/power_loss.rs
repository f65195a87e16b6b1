//! `famsd torture --power-loss --mount`: the mount's crash explorer. The mount's request logic
//! ([`Core`], exactly what the FUSE handlers call) runs in process over a store whose heap lives
//! on the simulated machine of [`fams::sim`] (disks with volatile write caches, a power switch).
//! No FUSE, no root: the kernel's part is the order of requests, which the workload plays.
//!
//! Each state, from the seed: a workload over a few files in the root directory and one
//! subdirectory — create, open (sometimes a second handle), writes of byte ranges (partial pages,
//! extends, holes) and of whole mapped pages (`FUSE_WRITE_CACHE`), ftruncate (SETATTR size on an
//! open file: staged), fsync (one file's commit), close without a sync (FLUSH + RELEASE: the
//! staged changes are discarded), truncate(2) by path of a closed file (durable at once),
//! unlink and rename (durable when they return; an open file unlinked or replaced lives on as an
//! orphan) — until the power is cut at a random mutating I/O operation (half the states: at one
//! of the next few operations on the log, where a commit's record is on its way): mid-sync as
//! often as the syncs' share of the operations, or during a namespace operation, or while the
//! heap file takes a commit's write-back. Unflushed writes are kept,
//! dropped or torn per sector. The machine reboots and the store is opened again; a quarter of
//! the time that open (the heap's recovery, the object layer, the store's own start-up commit)
//! is first cut at one of its own operations, as in [`crate::power_loss`].
//!
//! The check, after every reboot: the file system (every name in both directories, each file's
//! size and every byte) equals exactly the model's last acknowledged state — every returned sync
//! and namespace operation durable, nothing unsynced — or, for the one operation in flight at
//! the cut, the state it would have made. Any other state (a file mixing two of its states, a
//! lost acknowledged sync, a leaked staged change, a lost rename) is a violation. Files unlinked
//! while open must be gone after the reboot. Without crashes too: a file read while open shows
//! its staged contents, and after its last close without a sync, exactly its synced contents.
//! The reopened store must keep working (the next state runs on it; the run ends with a clean
//! close, a reopen and the same check).
//!
//! Everything is derived from the seed (the heap's hash keys and the mount's clock too), and
//! every operation is synchronous, so a seed replays exactly; a violation names the seed and
//! the state.

use super::core::{Core, OnClose};
use super::layout::{self, Fail, NewInode, Store, KIND_DIR, KIND_FILE, ROOT_INO};
use fams::io::FlushMode;
use fams::sim::{OpKind, SimHeap, SimRng, SimStorage};
use fams::{Heap, HeapOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct MountPowerLossConfig {
    pub states: u64,
    pub seed: u64,
    pub dir: PathBuf,
    /// Run every state with this flush mode of the log; None: each state draws one.
    pub flush_mode: Option<FlushMode>,
    /// Commits wait where they are made (as the store's open does), so the I/O sequence — and
    /// so a replay of a seed — is exact. Otherwise commits are written while the workload goes
    /// on, as in the daemon, and acknowledged once durable; their timing varies from run to run.
    pub sync_only: bool,
    pub progress: bool,
}

/// The heap under the store: room for the files' blocks, their old versions until freed, and
/// the allocator's metadata.
const HEAP_BYTES: u64 = 2 << 20;
/// Small, so the log wraps and checkpoints often.
const LOG_BYTES: u64 = 1 << 20;
const CHECKPOINT_BYTES: u64 = 128 << 10;
/// Largest file the workload makes (a sync of it is ~10 pages).
const FILE_BYTES_MAX: u64 = 40 << 10;
/// Mount operations per state at most (the power goes long before, almost always).
const OPS_PER_STATE_MAX: u64 = 400;
/// The power is cut at one of the next this many mutating I/O operations.
const CUT_WINDOW_OPS: u64 = 120;
/// Half the states cut at one of the next this many log operations instead: a commit's record
/// on its way to the log is the window that decides a sync, and the heap file's write-backs
/// (several per commit) would otherwise take most cuts.
const LOG_CUT_WINDOW_OPS: u64 = 16;
/// Names the workload uses, in the root directory and in [`SUBDIR`].
const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
const SUBDIR: &[u8] = b"sub";
/// Staging budget of the simulated mount (never reached: files stay small).
const STAGING_MAX_BYTES: u64 = 64 << 20;

/// A name in the file system: the directory (0 the root, 1 [`SUBDIR`]) and the name in it.
type Name = (u8, Vec<u8>);

/// The durable state of the file system: every file's name and contents.
type Image = BTreeMap<Name, Vec<u8>>;

fn show(name: &Name) -> String {
    let n = String::from_utf8_lossy(&name.1);
    if name.0 == 0 {
        format!("/{n}")
    } else {
        format!("/{}/{n}", String::from_utf8_lossy(SUBDIR))
    }
}

/// The mount operations that commit (and so can be cut by the power).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MountOp {
    Sync,
    Create,
    Unlink,
    Rename,
    /// truncate(2) by path of a file nobody has open: durable at once.
    TruncateClosed,
    /// The last release of an unlinked file frees it.
    Release,
}

const MOUNT_OPS: [MountOp; 6] =
    [MountOp::Sync, MountOp::Create, MountOp::Unlink, MountOp::Rename, MountOp::TruncateClosed, MountOp::Release];

impl MountOp {
    fn name(self) -> &'static str {
        match self {
            MountOp::Sync => "sync",
            MountOp::Create => "create",
            MountOp::Unlink => "unlink",
            MountOp::Rename => "rename",
            MountOp::TruncateClosed => "truncate-closed",
            MountOp::Release => "release-orphan",
        }
    }
    fn index(self) -> usize {
        MOUNT_OPS.iter().position(|&o| o == self).unwrap_or(0)
    }
}

const IO_KINDS: [OpKind; 5] =
    [OpKind::LogDurableWrite, OpKind::LogWrite, OpKind::LogFlush, OpKind::HeapWrite, OpKind::HeapSync];

fn io_index(k: OpKind) -> usize {
    IO_KINDS.iter().position(|&x| x == k).unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct MountPowerLossReport {
    pub states: u64,
    pub violations: u64,
    pub violation_details: Vec<String>,
    pub seed: u64,
    /// States recovered and checked with the log in each flush mode: [dsync, fdatasync].
    pub states_per_flush_mode: [u64; 2],
    /// Cuts during the workload, by the mount operation in flight ([`MOUNT_OPS`] order).
    pub cuts_per_mount_op: [u64; 6],
    /// States whose cut was aimed at a log operation ([`LOG_CUT_WINDOW_OPS`]).
    pub cuts_aimed_at_log_ops: u64,
    /// Cuts that found no operation in flight (the workload ended first; rare).
    pub cuts_between_ops: u64,
    /// Cuts (workload and recovery) by the kind of I/O operation they landed in.
    pub cuts_per_io_op: [u64; 5],
    /// Store opens cut by the power (heap recovery, object layer, the store's start-up commit).
    pub cuts_during_recovery: u64,
    /// Of the operations in flight at a cut: how many were found done after the reboot, and how
    /// many not.
    pub in_flight_found_done: u64,
    pub in_flight_found_undone: u64,
    pub syncs_acknowledged: u64,
    pub namespace_ops_acknowledged: u64,
    pub writes: u64,
    pub mapped_page_writes: u64,
    pub truncates: u64,
    /// Closes without a sync whose discard was checked by reading the file back.
    pub discards_checked: u64,
    /// Reads of open files compared with their staged contents.
    pub reads_checked: u64,
    /// Files unlinked while open at a cut, checked gone after the reboot.
    pub orphans_checked: u64,
    pub writes_kept: u64,
    pub writes_dropped: u64,
    pub writes_torn: u64,
    pub heap_commits: u64,
    /// The store, closed cleanly at the end of the run, opened again and checked.
    pub final_reopen_ok: bool,
}

impl MountPowerLossReport {
    pub fn to_json(&self) -> serde_json::Value {
        let by = |names: &[&str], counts: &[u64]| -> serde_json::Map<String, serde_json::Value> {
            names.iter().zip(counts).map(|(n, c)| (n.to_string(), (*c).into())).collect()
        };
        let mount_names: Vec<&str> = MOUNT_OPS.iter().map(|o| o.name()).collect();
        let io_names: Vec<&str> = IO_KINDS.iter().map(|k| k.name()).collect();
        serde_json::json!({
            "states": self.states,
            "violations": self.violations,
            "violation_details": self.violation_details,
            "seed": self.seed,
            "states_per_flush_mode": { "dsync": self.states_per_flush_mode[0], "fdatasync": self.states_per_flush_mode[1] },
            "cuts_per_mount_op": by(&mount_names, &self.cuts_per_mount_op),
            "cuts_between_ops": self.cuts_between_ops,
            "cuts_aimed_at_log_ops": self.cuts_aimed_at_log_ops,
            "cuts_per_io_op": by(&io_names, &self.cuts_per_io_op),
            "cuts_during_recovery": self.cuts_during_recovery,
            "in_flight_found_done": self.in_flight_found_done,
            "in_flight_found_undone": self.in_flight_found_undone,
            "syncs_acknowledged": self.syncs_acknowledged,
            "namespace_ops_acknowledged": self.namespace_ops_acknowledged,
            "writes": self.writes,
            "mapped_page_writes": self.mapped_page_writes,
            "truncates": self.truncates,
            "discards_checked": self.discards_checked,
            "reads_checked": self.reads_checked,
            "orphans_checked": self.orphans_checked,
            "unflushed_writes_kept": self.writes_kept,
            "unflushed_writes_dropped": self.writes_dropped,
            "unflushed_writes_torn": self.writes_torn,
            "heap_commits": self.heap_commits,
            "final_reopen_ok": self.final_reopen_ok,
        })
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let mount: Vec<String> =
            MOUNT_OPS.iter().map(|o| format!("{} {}", o.name(), self.cuts_per_mount_op[o.index()])).collect();
        let io: Vec<String> =
            IO_KINDS.iter().map(|k| format!("{} {}", k.name(), self.cuts_per_io_op[io_index(*k)])).collect();
        format!(
            "{} mount power-loss states (dsync/fdatasync log {}/{}), {} violations, seed {}; cuts during: {}, between \
             operations {} ({} aimed at log operations); cuts in I/O: {}; {} cuts during recovery; in-flight operations found done/undone {}/{}; \
             {} syncs and {} namespace operations acknowledged, {} writes ({} of mapped pages), {} truncates; \
             {} discards, {} reads, {} orphans checked; unflushed writes kept/dropped/torn {}/{}/{}; {} heap commits",
            self.states,
            self.states_per_flush_mode[0],
            self.states_per_flush_mode[1],
            self.violations,
            self.seed,
            mount.join(", "),
            self.cuts_between_ops,
            self.cuts_aimed_at_log_ops,
            io.join(", "),
            self.cuts_during_recovery,
            self.in_flight_found_done,
            self.in_flight_found_undone,
            self.syncs_acknowledged,
            self.namespace_ops_acknowledged,
            self.writes,
            self.mapped_page_writes,
            self.truncates,
            self.discards_checked,
            self.reads_checked,
            self.orphans_checked,
            self.writes_kept,
            self.writes_dropped,
            self.writes_torn,
            self.heap_commits,
        )
    }
}

/// A file the workload has open: its handles and what a process sees in it now.
struct OpenFile {
    ino: u64,
    handles: Vec<u64>,
    /// None once unlinked (or replaced by a rename): an orphan until its last release.
    name: Option<Name>,
    /// The contents a read shows now: synced plus staged.
    current: Vec<u8>,
}

/// The operation in flight: what the durable state will be once it returns.
struct InFlight {
    op: MountOp,
    after: Image,
}

struct Explorer<'a> {
    cfg: &'a MountPowerLossConfig,
    sim: SimHeap,
    report: MountPowerLossReport,
    /// The workload's choices.
    rng: SimRng,
    /// Where recovery is cut (its own generator, so the workload's draws stay put).
    recovery_rng: SimRng,
    flush_mode: FlushMode,
    /// The last acknowledged durable state.
    durable: Image,
    /// Inode numbers of the named files (as of the running store).
    inos: BTreeMap<Name, u64>,
    /// The subdirectory's inode.
    subdir: u64,
    open: Vec<OpenFile>,
    in_flight: Option<InFlight>,
}

fn mode_index(m: FlushMode) -> usize {
    match m {
        FlushMode::Dsync => 0,
        FlushMode::Fdatasync => 1,
    }
}

/// The mount's clock and the heap's hash keys for opening the store in `state`: the same for a
/// probe and the open it repeats, so both issue the same operations.
fn seed_determinism(seed: u64, state: u64) {
    fams::sim::seed_randomness(Some(seed ^ state.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    layout::use_simulated_clock(Some(1_700_000_000_000_000_000 + state as i64 * 1_000_000_000));
}

impl<'a> Explorer<'a> {
    fn violation(&mut self, state: u64, what: String) {
        self.report.violations += 1;
        if self.report.violation_details.len() < 10 {
            self.report.violation_details.push(format!("seed {} state {state}: {what}", self.cfg.seed));
        }
    }

    fn heap_options(&self) -> HeapOptions {
        HeapOptions {
            checkpoint_threshold_bytes: Some(CHECKPOINT_BYTES),
            flush_mode: Some(self.flush_mode),
            // Nothing beside the mount's own thread writes the heap file (the background writing
            // of committed images would, when it likes), so a seed's I/O operations come in the
            // same order every time and a state can be rebuilt by replaying them.
            images_only_at_checkpoints: true,
            ..HeapOptions::default()
        }
    }

    /// Open the store on the simulated machine, the way `famsd mount` opens it from its path.
    fn open_store(&self) -> Result<Store, String> {
        let machine = self.sim.machine.clone();
        let heap_path = self.sim.heap_path.clone();
        let opts = self.heap_options();
        let opener = move || -> Result<Heap, String> {
            let mut storage = SimStorage { machine: machine.clone() };
            Heap::open_on(&heap_path, &opts, &mut storage).map_err(|e| format!("cannot open the store: {e}"))
        };
        Store::open_with(&self.sim.heap_path, Box::new(opener))
    }

    fn note_cut(&mut self) {
        if let Some(o) = self.sim.machine.take_last_cut() {
            self.report.writes_kept += o.writes_kept;
            self.report.writes_dropped += o.writes_dropped;
            self.report.writes_torn += o.writes_torn;
            if let Some(k) = o.during {
                self.report.cuts_per_io_op[io_index(k)] += 1;
            }
        }
    }

    /// Reboot, reopen the store (maybe cutting the power during the open first), and check it.
    /// None: it could not be opened (a violation; the run ends).
    fn recover_and_verify(&mut self, state: u64, cut_recovery: bool) -> Option<Core> {
        self.note_cut();
        self.sim.reboot().expect("rewriting the real heap file");
        if cut_recovery {
            let (log_image, heap_image) = self.sim.machine.images();
            seed_determinism(self.cfg.seed, state);
            self.sim.machine.trace_ops();
            let probe = self.open_store();
            let trace = self.sim.machine.take_trace();
            match probe {
                Ok(s) => drop(s),
                Err(e) => {
                    self.violation(state, format!("opening the store after a power cut failed: {e}"));
                    return None;
                }
            }
            self.sim.machine.restore(log_image, heap_image, &self.sim.heap_path).expect("rewriting the real heap file");
            if !trace.is_empty() {
                let n = 1 + self.recovery_rng.below(trace.len() as u64);
                self.sim.machine.cut_power_at(Some(n));
                seed_determinism(self.cfg.seed, state);
                match self.open_store() {
                    // The cut came after the open's last step that can fail (the write-back of
                    // its start-up commit, say): a cut during recovery all the same.
                    Ok(s) if !self.sim.machine.powered() => {
                        drop(s);
                        self.report.cuts_during_recovery += 1;
                    }
                    Ok(s) => {
                        drop(s);
                        self.violation(
                            state,
                            format!(
                                "opening the store never reached its operation {n} of {} ({}): it did not \
                                 repeat itself on the same images",
                                trace.len(),
                                trace[n as usize - 1].name()
                            ),
                        );
                        self.sim.machine.cut_power_at(None);
                        self.sim.machine.cut_power_now();
                    }
                    Err(_) if !self.sim.machine.powered() => self.report.cuts_during_recovery += 1,
                    Err(e) => {
                        self.violation(state, format!("opening the store failed without a power cut: {e}"));
                        return None;
                    }
                }
                self.note_cut();
                self.sim.reboot().expect("rewriting the real heap file");
            }
        }
        seed_determinism(self.cfg.seed, state);
        let store = match self.open_store() {
            Ok(s) => s,
            Err(e) => {
                self.violation(state, format!("opening the store after a power cut failed: {e}"));
                return None;
            }
        };
        let mut core = Core::new(store, STAGING_MAX_BYTES, OnClose::Discard);
        core.store.set_sync_commits(self.cfg.sync_only);
        self.verify(state, &mut core);
        Some(core)
    }

    /// Compare the reopened file system with the model; adopt what is there to go on.
    fn verify(&mut self, state: u64, core: &mut Core) {
        self.report.states += 1;
        self.report.states_per_flush_mode[mode_index(self.flush_mode)] += 1;
        let in_flight = self.in_flight.take();
        let orphans: Vec<u64> = self.open.drain(..).filter(|f| f.name.is_none()).map(|f| f.ino).collect();
        for ino in orphans {
            self.report.orphans_checked += 1;
            match core.store.attr(ino) {
                Err(Fail::NotFound) => {}
                Ok(a) => self.violation(
                    state,
                    format!(
                        "inode {ino}, unlinked while open before the power cut, is still there (nlink {})",
                        a.nlink
                    ),
                ),
                Err(e) => self.violation(state, format!("looking up the unlinked inode {ino}: {e}")),
            }
        }
        let (found, inos) = match self.read_image(core) {
            Ok(x) => x,
            Err(e) => {
                self.violation(state, format!("reading the file system back: {e}"));
                return;
            }
        };
        let matched = if found == self.durable {
            if in_flight.as_ref().is_some_and(|f| f.after != self.durable) {
                self.report.in_flight_found_undone += 1;
            }
            true
        } else if in_flight.as_ref().is_some_and(|f| f.after == found) {
            self.report.in_flight_found_done += 1;
            true
        } else {
            false
        };
        if !matched {
            let what = match &in_flight {
                Some(f) => format!(
                    "neither the last acknowledged state nor the one the {} in flight would make: {}; against the \
                     state after it: {}",
                    f.op.name(),
                    describe_difference(&self.durable, &found),
                    describe_difference(&f.after, &found)
                ),
                None => format!(
                    "not the last acknowledged state (no operation was in flight): {}",
                    describe_difference(&self.durable, &found)
                ),
            };
            self.violation(state, what);
        }
        self.durable = found;
        self.inos = inos;
    }

    /// Every file of the root directory and the subdirectory, with its committed contents.
    fn read_image(&self, core: &mut Core) -> Result<(Image, BTreeMap<Name, u64>), String> {
        let mut image = Image::new();
        let mut inos = BTreeMap::new();
        for (d, dir_ino) in [(0u8, ROOT_INO), (1u8, self.subdir)] {
            let (_, entries) = core.store.list(dir_ino).map_err(|e| format!("listing directory {d}: {e}"))?;
            for (ino, kind, name) in entries {
                match kind {
                    KIND_DIR if d == 0 && name == SUBDIR && ino == self.subdir => {}
                    KIND_FILE => {
                        let a = core.store.attr(ino).map_err(|e| format!("inode {ino}: {e}"))?;
                        let bytes = core
                            .store
                            .read_committed(ino, 0, a.size as usize)
                            .map_err(|e| format!("reading inode {ino}: {e}"))?;
                        if bytes.len() as u64 != a.size {
                            return Err(format!("inode {ino} reads {} bytes, its size is {}", bytes.len(), a.size));
                        }
                        image.insert((d, name.clone()), bytes);
                        inos.insert((d, name), ino);
                    }
                    _ => {
                        return Err(format!(
                            "unexpected entry {:?} (inode {ino}, kind {kind}) in directory {d}",
                            String::from_utf8_lossy(&name)
                        ))
                    }
                }
            }
        }
        Ok((image, inos))
    }

    fn dir_ino(&self, d: u8) -> u64 {
        if d == 0 {
            ROOT_INO
        } else {
            self.subdir
        }
    }

    fn random_name(&mut self) -> Name {
        let d = self.rng.below(2) as u8;
        (d, NAMES[self.rng.below(NAMES.len() as u64) as usize].to_vec())
    }

    fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for chunk in v.chunks_mut(8) {
            let x = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
        v
    }

    /// Run a mount operation that commits: `after` is the durable state once it returns. Ok:
    /// acknowledged. Err: it failed; with the power gone that is the cut (the state stays in
    /// flight), with the power on it is a violation.
    fn durable_op<R>(
        &mut self,
        state: u64,
        op: MountOp,
        after: Image,
        run: impl FnOnce(&mut Self) -> Result<R, Fail>,
    ) -> Option<R> {
        self.in_flight = Some(InFlight { op, after });
        match run(self) {
            Ok(r) => {
                if !self.sim.machine.powered() {
                    // The power went during it, after the point where it could no longer fail.
                    self.report.cuts_per_mount_op[op.index()] += 1;
                }
                if let Some(f) = self.in_flight.take() {
                    self.durable = f.after;
                }
                if op == MountOp::Sync {
                    self.report.syncs_acknowledged += 1;
                } else {
                    self.report.namespace_ops_acknowledged += 1;
                }
                Some(r)
            }
            Err(e) => {
                if self.sim.machine.powered() {
                    self.violation(state, format!("{} failed with the power on: {e}", op.name()));
                    self.in_flight = None;
                } else {
                    self.report.cuts_per_mount_op[op.index()] += 1;
                }
                None
            }
        }
    }

    /// The workload of one state, until the power goes (or [`OPS_PER_STATE_MAX`] operations).
    fn run_workload(&mut self, state: u64, core: &mut Core) {
        for _ in 0..OPS_PER_STATE_MAX {
            if !self.sim.machine.powered() || !self.step(state, core) {
                return;
            }
        }
    }

    /// One mount operation, drawn from the rng. False: the workload stops (the power went).
    fn step(&mut self, state: u64, core: &mut Core) -> bool {
        let named_closed: Vec<Name> =
            self.durable.keys().filter(|n| !self.open.iter().any(|f| f.name.as_ref() == Some(*n))).cloned().collect();
        let pick = self.rng.below(100);
        let open_idx = if self.open.is_empty() { None } else { Some(self.rng.below(self.open.len() as u64) as usize) };
        match (pick, open_idx) {
            // Write a byte range, or whole mapped pages.
            (0..=29, Some(i)) => {
                let size = self.open[i].current.len() as u64;
                let (offset, data, mapped) = if size >= 4096 && self.rng.below(3) == 0 {
                    let pages = size / 4096;
                    let first = self.rng.below(pages);
                    let n = 1 + self.rng.below((pages - first).min(4));
                    let len = (n * 4096).min(size - first * 4096) as usize;
                    (first * 4096, self.random_bytes(len), true)
                } else {
                    let offset = self.rng.below(size + 8192).min(FILE_BYTES_MAX - 1);
                    let len = (1 + self.rng.below(12_000)).min(FILE_BYTES_MAX - offset) as usize;
                    (offset, self.random_bytes(len), false)
                };
                let ino = self.open[i].ino;
                if let Err(e) = core.write(ino, offset, &data, mapped) {
                    self.violation(state, format!("write to inode {ino} failed: {e}"));
                    return false;
                }
                let cur = &mut self.open[i].current;
                let end = offset as usize + data.len();
                if cur.len() < end {
                    cur.resize(end, 0);
                }
                cur[offset as usize..end].copy_from_slice(&data);
                self.report.writes += 1;
                if mapped {
                    self.report.mapped_page_writes += 1;
                }
                true
            }
            // ftruncate: staged.
            (30..=37, Some(i)) => {
                let size = self.open[i].current.len() as u64;
                let new = self.rng.below((size + 10_000).min(FILE_BYTES_MAX) + 1);
                let ino = self.open[i].ino;
                if let Err(e) = core.set_size(ino, new) {
                    self.violation(state, format!("ftruncate of inode {ino} to {new} failed: {e}"));
                    return false;
                }
                self.open[i].current.resize(new as usize, 0);
                self.report.truncates += 1;
                true
            }
            // fsync / fdatasync / msync(MS_SYNC).
            (38..=55, Some(i)) => {
                let (ino, name) = (self.open[i].ino, self.open[i].name.clone());
                let mut after = self.durable.clone();
                if let Some(n) = name {
                    after.insert(n, self.open[i].current.clone());
                }
                self.durable_op(state, MountOp::Sync, after, |_| core.sync(ino).and_then(|()| core.wait_durable()))
                    .is_some()
            }
            // Read an open file: its staged contents.
            (56..=59, Some(i)) => {
                let (ino, want) = (self.open[i].ino, self.open[i].current.clone());
                match core.read(ino, 0, want.len() + 4096) {
                    Ok(got) if got == want => self.report.reads_checked += 1,
                    Ok(got) => {
                        self.violation(state, format!("reading open inode {ino}: {}", describe_bytes(&want, &got)))
                    }
                    Err(e) => self.violation(state, format!("reading open inode {ino}: {e}")),
                }
                true
            }
            // close(2) without a sync: FLUSH, then RELEASE; at the last release the staged
            // changes are discarded (and an unlinked file freed).
            (60..=69, Some(i)) => {
                let ino = self.open[i].ino;
                let fh = self.open[i].handles.pop().expect("an open file has a handle");
                if let Err(e) = core.flush(ino) {
                    self.violation(state, format!("flush of inode {ino} failed: {e}"));
                }
                if !self.open[i].handles.is_empty() {
                    core.release(fh, ino);
                    return true;
                }
                let f = self.open.remove(i);
                match f.name {
                    Some(name) => {
                        core.release(fh, ino);
                        let want = self.durable.get(&name).cloned().unwrap_or_default();
                        match core.read(ino, 0, want.len() + 4096) {
                            Ok(got) if got == want => self.report.discards_checked += 1,
                            Ok(got) => self.violation(
                                state,
                                format!(
                                    "{} after its last close without a sync: {}",
                                    show(&name),
                                    describe_bytes(&want, &got)
                                ),
                            ),
                            Err(e) => self.violation(state, format!("reading {} after close: {e}", show(&name))),
                        }
                        true
                    }
                    None => {
                        // The orphan is freed: a commit, invisible in the namespace.
                        let after = self.durable.clone();
                        let r = self.durable_op(state, MountOp::Release, after, |x| {
                            core.release(fh, ino);
                            // The release's commit is not waited for by any caller; the check is
                            // that it is all or nothing once durable.
                            let _ = core.wait_durable();
                            if x.sim.machine.powered() {
                                Ok(())
                            } else {
                                Err(Fail::Io("the power went during the release".into()))
                            }
                        });
                        if r.is_none() {
                            // Still an orphan on disk: the reboot must free it.
                            self.open.push(OpenFile { ino, handles: Vec::new(), name: None, current: Vec::new() });
                        }
                        r.is_some()
                    }
                }
            }
            // A second handle on an open file.
            (70..=72, Some(i)) => {
                let ino = self.open[i].ino;
                match core.open(ino, false) {
                    Ok(fh) => self.open[i].handles.push(fh),
                    Err(e) => self.violation(state, format!("open of inode {ino} failed: {e}")),
                }
                true
            }
            // Open a closed file (the first open sees the synced contents).
            (73..=80, _) if !named_closed.is_empty() => {
                let name = named_closed[self.rng.below(named_closed.len() as u64) as usize].clone();
                let ino = self.inos[&name];
                match core.open(ino, false) {
                    Ok(fh) => {
                        let current = self.durable[&name].clone();
                        self.open.push(OpenFile { ino, handles: vec![fh], name: Some(name), current });
                    }
                    Err(e) => self.violation(state, format!("open of {} failed: {e}", show(&name))),
                }
                true
            }
            // truncate(2) by path of a closed file: durable at once.
            (81..=83, _) if !named_closed.is_empty() => {
                let name = named_closed[self.rng.below(named_closed.len() as u64) as usize].clone();
                let ino = self.inos[&name];
                let mut content = self.durable[&name].clone();
                let new = self.rng.below((content.len() as u64 + 10_000).min(FILE_BYTES_MAX) + 1);
                content.resize(new as usize, 0);
                let mut after = self.durable.clone();
                after.insert(name, content);
                self.report.truncates += 1;
                self.durable_op(state, MountOp::TruncateClosed, after, |_| {
                    core.set_size(ino, new).and_then(|()| core.wait_durable())
                })
                .is_some()
            }
            // Unlink (the file may be open: it becomes an orphan).
            (84..=87, _) if !self.durable.is_empty() => {
                let names: Vec<Name> = self.durable.keys().cloned().collect();
                let name = names[self.rng.below(names.len() as u64) as usize].clone();
                let mut after = self.durable.clone();
                after.remove(&name);
                let dir = self.dir_ino(name.0);
                let r = self.durable_op(state, MountOp::Unlink, after, |_| {
                    core.remove(dir, &name.1, false).and_then(|r| core.wait_durable().map(|()| r))
                });
                // Whether or not it returned, the file may be gone: an open one is an orphan
                // from now on for the check after the reboot, if it was unlinked.
                if r.is_some() {
                    self.inos.remove(&name);
                    for f in self.open.iter_mut().filter(|f| f.name.as_ref() == Some(&name)) {
                        f.name = None;
                    }
                }
                r.is_some()
            }
            // Rename to a new name or over an existing file (which goes, or becomes an orphan).
            (88..=91, _) if !self.durable.is_empty() => {
                let names: Vec<Name> = self.durable.keys().cloned().collect();
                let from = names[self.rng.below(names.len() as u64) as usize].clone();
                let to = self.random_name();
                if to == from {
                    return true;
                }
                let mut after = self.durable.clone();
                let content = after.remove(&from).expect("a named file");
                after.insert(to.clone(), content);
                let (fd, td) = (self.dir_ino(from.0), self.dir_ino(to.0));
                let r = self.durable_op(state, MountOp::Rename, after, |_| {
                    core.rename(fd, &from.1, td, &to.1, false).and_then(|r| core.wait_durable().map(|()| r))
                });
                if r.is_some() {
                    for f in self.open.iter_mut().filter(|f| f.name.as_ref() == Some(&to)) {
                        f.name = None;
                    }
                    for f in self.open.iter_mut().filter(|f| f.name.as_ref() == Some(&from)) {
                        f.name = Some(to.clone());
                    }
                    let ino = self.inos.remove(&from).expect("a named file");
                    self.inos.insert(to, ino);
                }
                r.is_some()
            }
            // Create (and open) a file under a free name.
            _ => {
                let name = self.random_name();
                if self.durable.contains_key(&name) {
                    return true;
                }
                let mut after = self.durable.clone();
                after.insert(name.clone(), Vec::new());
                let n = NewInode { kind: KIND_FILE, mode: 0o644, uid: 0, gid: 0, now_ns: layout::now_ns() };
                let dir = self.dir_ino(name.0);
                match self.durable_op(state, MountOp::Create, after, |_| {
                    core.create(dir, &name.1, n, true).and_then(|r| core.wait_durable().map(|()| r))
                }) {
                    Some((a, fh)) => {
                        self.inos.insert(name.clone(), a.ino);
                        self.open.push(OpenFile {
                            ino: a.ino,
                            handles: vec![fh],
                            name: Some(name),
                            current: Vec::new(),
                        });
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

/// Where two file system states differ, briefly.
fn describe_difference(want: &Image, got: &Image) -> String {
    let mut out = Vec::new();
    for (name, w) in want {
        match got.get(name) {
            None => out.push(format!("{} missing", show(name))),
            Some(g) if g != w => out.push(format!("{}: {}", show(name), describe_bytes(w, g))),
            Some(_) => {}
        }
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        out.push(format!("{} should not exist", show(name)));
    }
    if out.is_empty() {
        "no difference".into()
    } else {
        out.join("; ")
    }
}

fn describe_bytes(want: &[u8], got: &[u8]) -> String {
    match want.iter().zip(got).position(|(a, b)| a != b) {
        Some(at) => {
            format!("{} bytes (want {}), first difference at byte {at} (page {})", got.len(), want.len(), at / 4096)
        }
        None if want.len() != got.len() => format!("{} bytes, want {}", got.len(), want.len()),
        None => "equal".into(),
    }
}

pub fn run(cfg: &MountPowerLossConfig) -> Result<MountPowerLossReport, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let heap_path = cfg.dir.join("mount-power-loss.heap");
    let sim = SimHeap::format(&heap_path, HEAP_BYTES, LOG_BYTES, cfg.seed)
        .map_err(|e| format!("formatting {}: {e}", heap_path.display()))?;
    let mut x = Explorer {
        cfg,
        sim,
        report: MountPowerLossReport { seed: cfg.seed, ..Default::default() },
        rng: SimRng::new(cfg.seed ^ 0x6d6f_756e_7400_0001),
        recovery_rng: SimRng::new(cfg.seed ^ 0x7265_636f_7665_7279),
        flush_mode: cfg.flush_mode.unwrap_or(FlushMode::Dsync),
        durable: Image::new(),
        inos: BTreeMap::new(),
        subdir: 0,
        open: Vec::new(),
        in_flight: None,
    };
    let r = explore(&mut x);
    fams::sim::seed_randomness(None);
    layout::use_simulated_clock(None);
    r.map(|()| x.report)
}

fn explore(x: &mut Explorer<'_>) -> Result<(), String> {
    seed_determinism(x.cfg.seed, 0);
    let store = x.open_store().map_err(|e| format!("opening the fresh store on the simulated machine: {e}"))?;
    let mut core = Core::new(store, STAGING_MAX_BYTES, OnClose::Discard);
    core.store.set_sync_commits(x.cfg.sync_only);
    let n = NewInode { kind: KIND_DIR, mode: 0o755, uid: 0, gid: 0, now_ns: layout::now_ns() };
    x.subdir = core
        .create(ROOT_INO, SUBDIR, n, false)
        .and_then(|r| core.wait_durable().map(|()| r))
        .map_err(|e| format!("making the subdirectory: {e}"))?
        .0
        .ino;
    let progress = crate::progress::Progress::new(x.cfg.progress, x.cfg.states as usize);
    let mut state = 0;
    while x.report.states < x.cfg.states {
        state += 1;
        if x.rng.below(2) == 0 {
            x.report.cuts_aimed_at_log_ops += 1;
            x.sim.machine.cut_power_at_log_op(Some(1 + x.rng.below(LOG_CUT_WINDOW_OPS)));
        } else {
            x.sim.machine.cut_power_at(Some(1 + x.rng.below(CUT_WINDOW_OPS)));
        }
        x.run_workload(state, &mut core);
        if x.sim.machine.powered() {
            x.report.cuts_between_ops += 1;
        }
        x.report.heap_commits += core.store.stats.commits;
        drop(core);
        x.flush_mode =
            x.cfg.flush_mode.unwrap_or(if x.rng.below(2) == 0 { FlushMode::Dsync } else { FlushMode::Fdatasync });
        let cut_recovery = x.rng.below(4) == 0;
        core = match x.recover_and_verify(state, cut_recovery) {
            Some(c) => c,
            None => return Ok(()),
        };
        if state % 50 == 0 {
            progress.at(x.report.states, format!("mount power-loss states, violations {}", x.report.violations));
        }
    }
    // The store keeps working: a clean close with the power on, a reopen, the same check (not
    // a crash state of its own).
    x.report.heap_commits += core.store.stats.commits;
    x.in_flight = None;
    x.open.clear();
    core.shutdown();
    let (states, per_mode, violations) = (x.report.states, x.report.states_per_flush_mode, x.report.violations);
    x.sim.machine.cut_power_now();
    if let Some(c) = x.recover_and_verify(state + 1, false) {
        c.shutdown();
    }
    x.report.final_reopen_ok = x.report.violations == violations;
    (x.report.states, x.report.states_per_flush_mode) = (states, per_mode);
    Ok(())
}
