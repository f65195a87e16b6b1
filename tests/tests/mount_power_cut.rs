//! Real power cuts under `famsd mount`: the mount's promise (a file holds exactly the state of
//! its last successful msync) on the real kernel path, with the drive under the store losing
//! its power.
//!
//! The stack, bottom up: the FUSE power-cut drive `fs` (`fams_tests::fuse_disk`: a volatile
//! write cache; a cut keeps, drops or tears each unflushed write per sector, and the drive then
//! fails every write and flush), a loop device, ext4; on ext4 the mount's store (a heap made by
//! `famsd format`) and its log file; `famsd mount STORE MP` serving it; a Python program mapping
//! a file of the mount `MAP_SHARED` (`fams_tests::famsd_mount::MmapWriters`) that writes
//! generation-stamped pages — every other page of 32 holds the generation number g in each of
//! its 512 u64s — and msyncs (`flush()`) after each generation, acknowledging it once msync
//! returned.
//!
//! Each cycle starts a writer and **cuts the power** of the drive at one of these moments: after
//! its k-th acknowledgement with the writer frozen and the drive idle (`idle`); right after its
//! k-th acknowledgement while it goes on (`after-ack`); inside a commit, right after the n-th
//! next write reaches the drive, before its flush (`in-commit`); after a random delay
//! (`random`). Then it SIGKILLs `famsd mount` and the writer, detaches the dead mount (`famsd
//! umount`), unmounts ext4, detaches the loop devices and ends the drive; powers back on (a new
//! drive from the durable image, loop device, ext4 with its journal replay) and mounts the store
//! again, whose recovery replays the log. The file must then hold exactly one generation (every
//! stamped page the same g, every other page zero), g at or after the last one acknowledged
//! (acknowledgements printed after the cut count too: a flush that "succeeded" on a dead drive
//! would be caught) and no newer than the last one the writer started to msync.
//!
//! Every step that can hang on a wedged FUSE connection — the mount's or the drive's — runs
//! under both watchdogs (`Stack::guards`): past `FUSE_PATIENCE` they write 1 to
//! `/sys/fs/fuse/connections/N/abort` (N, the connection number, from the mount's minor device
//! number) and the test fails saying which step hung. Every wait has a deadline; mounts, loop
//! devices and processes are cleaned up on failure too (`Stack`'s drop, the rig's).
//!
//! Knobs: FAMS_MOUNT_POWER_CUT_CYCLES (default 25), _SEED, _PROGRESS (a line per cycle).
//! Root only (FUSE, losetup, mount); where every test must run (CI, FAMS_REQUIRE_ROOT_TESTS) a
//! skip fails.

use fams_tests::famsd_mount::{
    can_mount, famsd, format_store_with_log, generation_of, MmapWriters, Mounted, WriterState, PAGE, PATIENCE,
};
use fams_tests::fuse_disk::{CutReport, WatchGuard, FUSE_PATIENCE};
use fams_tests::power_rig::{cannot_run, env_u64, say, wait_stopped, Rig};
use fams_tests::{note_violation, signal_pid, skip, Rng, Signal};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Pages of the mapped file (generations stamp the even ones: 16 pages, 64 KiB per msync).
const NPAGES: usize = 32;
/// The drive under ext4: the store (16 MiB heap, 4 MiB log) and ext4's own journal.
const FS_DISK: u64 = 48 << 20;
/// The rig's second drive (a raw one for a fams log): unused here, so small.
const RAW_DISK: u64 = 1 << 20;
const STORE_SIZE: &str = "16M";
const STORE_MAX_SIZE: &str = "1G";
/// Small, so the log wraps and the heap checkpoints (an fdatasync of the heap file through
/// ext4) every few dozen generations: cuts land in those too.
const STORE_LOG_SIZE: &str = "4M";
const FILE: &str = "m";

/// When the power goes, in a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// After the writer's k-th acknowledgement, with it frozen (SIGSTOP) and the drive idle.
    Idle,
    /// Right after the writer's k-th acknowledgement, while it goes on.
    AfterAck,
    /// Right after the n-th next write reaches the drive (in the drive's request handler):
    /// inside a commit, between a log record's write and its flush.
    InCommit,
    /// After a random delay once the writer has started.
    Random,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Idle => "idle",
            Trigger::AfterAck => "after-ack",
            Trigger::InCommit => "in-commit",
            Trigger::Random => "random",
        }
    }
}

/// The whole stack. Dropped in field order: the mount (lazy unmount, the daemon killed), the
/// writer still running, the Python spawner, then the rig (ext4, loop devices, the drive) —
/// with the drive's watchdog armed while the mount goes.
struct Stack {
    mount: Option<Mounted>,
    /// A writer not yet reaped (killed on drop: a frozen one would otherwise stay).
    writer_pid: Option<i32>,
    writers: Option<MmapWriters>,
    rig: Rig,
    famsd: PathBuf,
}

/// Both watchdogs armed for one step; [`Guards::check`] says whether either fired.
struct Guards {
    what: String,
    disk: WatchGuard,
    mount: Option<WatchGuard>,
}

impl Guards {
    fn check(self) -> Result<(), String> {
        let (disk, mount) = (self.disk.fired(), self.mount.as_ref().is_some_and(WatchGuard::fired));
        if disk || mount {
            return Err(format!(
                "{}: took over {} s; the watchdog aborted the FUSE connection of {} (a wedged FUSE program or kernel; \
                 see `dmesg` for hung tasks)",
                self.what,
                FUSE_PATIENCE.as_secs(),
                match (disk, mount) {
                    (true, true) => "the drive and the mount",
                    (true, false) => "the drive",
                    _ => "the mount",
                }
            ));
        }
        Ok(())
    }
}

impl Stack {
    fn store(&self) -> PathBuf {
        self.rig.fs_mnt().join("files.heap")
    }

    fn mountpoint(&self) -> PathBuf {
        self.rig.dir.join("mnt")
    }

    fn mount(&self) -> &Mounted {
        self.mount.as_ref().expect("mounted")
    }

    fn writers(&mut self) -> &mut MmapWriters {
        self.writers.as_mut().expect("started")
    }

    /// Arm the drive's watchdog and, while the store is mounted, the mount's.
    fn guards(&self, what: &str) -> Guards {
        Guards {
            what: what.to_string(),
            disk: self.rig.fuse().guard(what, FUSE_PATIENCE),
            mount: self.mount.as_ref().map(|m| m.watchdog.guard(what, FUSE_PATIENCE)),
        }
    }

    /// `famsd mount` the store (recovering it): Err if it does not mount.
    fn mount_store(&mut self, what: &str) -> Result<Result<(), String>, String> {
        let g = self.guards(what);
        // Its log is full of the dead drive's EIO after every cut: shown with _PROGRESS only.
        let echo = std::env::var_os("FAMS_MOUNT_POWER_CUT_PROGRESS").is_some();
        let m = Mounted::start_logging(&self.famsd, &self.store(), &self.mountpoint(), &[], echo);
        g.check()?;
        Ok(m.map(|m| self.mount = Some(m)))
    }

    /// The file as a new reader sees it through the mount.
    fn read_file(&self, what: &str) -> Result<std::io::Result<Vec<u8>>, String> {
        let g = self.guards(what);
        let data = std::fs::read(self.mount().path(FILE));
        g.check()?;
        Ok(data)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _disk = self.rig.fuse_if_on().map(|f| f.guard("tearing the mount down", FUSE_PATIENCE));
        if let Some(pid) = self.writer_pid.take() {
            // Not reaped yet (its parent, the spawner, is alive): the pid is still the writer's.
            signal_pid(pid as u32, Signal::SIGKILL);
        }
        self.mount = None;
        self.writers = None;
    }
}

#[derive(Default, Debug)]
struct Report {
    cycles: u64,
    violations: u64,
    details: Vec<String>,
    triggers: std::collections::BTreeMap<&'static str, u64>,
    /// Cuts while the writer was inside msync (it had said `sync g`, not yet `ack g`), or
    /// armed inside a commit's writes.
    cuts_mid_msync: u64,
    /// Cuts between msyncs.
    cuts_idle: u64,
    /// Cuts after at least one acknowledgement of that cycle's writer.
    cuts_after_acks: u64,
    /// Cuts with unflushed writes in the drive's cache (a commit's record not yet flushed, or
    /// ext4's own writes).
    cuts_with_unflushed_writes: u64,
    writes_pending_at_cuts: u64,
    writes_dropped: u64,
    writes_torn: u64,
    /// Generations acknowledged, over all cycles.
    acknowledged: u64,
    /// Cycles whose file held the generation the writer was syncing, unacknowledged.
    committed_unacknowledged: u64,
    /// Cycles whose writer's msync failed after the cut (the dead drive's EIO, through the mount).
    writer_msync_failed: u64,
    fsck_runs: u64,
    fsck_problems: Vec<String>,
    last_generation: u64,
    seconds: f64,
}

impl Report {
    fn summary(&self) -> String {
        format!(
            "mount power cuts: {} cycles in {:.1} s ({:.0} ms/cycle), violations {}; cuts by trigger {:?}; \
             mid-msync {}, idle {}, after acknowledgements {}, with unflushed writes on the drive {} \
             ({} writes pending → {} dropped, {} torn); generations acknowledged {}, last {}; \
             unacknowledged generation kept {} times; writer's msync failed after the cut {} times; \
             e2fsck {} runs, {} problems{}",
            self.cycles,
            self.seconds,
            self.seconds * 1e3 / self.cycles.max(1) as f64,
            self.violations,
            self.triggers,
            self.cuts_mid_msync,
            self.cuts_idle,
            self.cuts_after_acks,
            self.cuts_with_unflushed_writes,
            self.writes_pending_at_cuts,
            self.writes_dropped,
            self.writes_torn,
            self.acknowledged,
            self.last_generation,
            self.committed_unacknowledged,
            self.writer_msync_failed,
            self.fsck_runs,
            self.fsck_problems.len(),
            if self.details.is_empty() {
                String::new()
            } else {
                format!("\nviolations:\n  {}", self.details.join("\n  "))
            }
        )
    }
}

struct Config {
    cycles: u64,
    seed: u64,
    /// Check ext4 with e2fsck after every this many power-ons.
    fsck_every: u64,
}

fn run_power_cuts(cfg: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let mut rig =
        Rig::new("mount-powercut", std::path::Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk")), RAW_DISK, FS_DISK);
    rig.power_on(true, false)?;
    let mut s = Stack { mount: None, writer_pid: None, writers: None, rig, famsd: famsd() };
    let g = s.guards("formatting the store");
    let formatted = format_store_with_log(&s.store(), STORE_SIZE, Some(STORE_MAX_SIZE), STORE_LOG_SIZE);
    g.check()?;
    formatted?;
    s.mount_store("mounting the new store")??;
    let g = s.guards("creating the file");
    let created = std::fs::File::create(s.mount().path(FILE))
        .and_then(|f| f.set_len((NPAGES * PAGE) as u64).and_then(|_| f.sync_all()));
    g.check()?;
    created.map_err(|e| format!("creating {FILE} in the mount: {e}"))?;
    s.writers = Some(MmapWriters::start(&s.mount().path(FILE), NPAGES)?);
    let mut report = Report::default();
    let mut rng = Rng::new(cfg.seed);
    let mut verified = 0u64; // the generation the file held after the last power-on
    for cycle in 0..cfg.cycles {
        let trigger = match rng.below(8) {
            0 | 1 => Trigger::Idle,
            2 | 3 => Trigger::AfterAck,
            4 | 5 => Trigger::InCommit,
            _ => Trigger::Random,
        };
        *report.triggers.entry(trigger.name()).or_default() += 1;
        let seed = rng.next_u64();
        let k = 1 + rng.below(3);

        // The writer's run and the cut.
        let g = s.guards(&format!("cycle {cycle}: the writer's run and the cut"));
        let pid = s.writers().go(verified)?;
        s.writer_pid = Some(pid);
        let (cut, at_cut): (CutReport, WriterState) = match trigger {
            Trigger::Idle => {
                s.writers().wait_for_ack(verified + k, PATIENCE)?;
                signal_pid(pid as u32, Signal::SIGSTOP);
                wait_stopped(pid as u32, PATIENCE);
                // A commit the frozen writer's msync started goes on in the daemon: wait
                // (bounded) until the drive holds no unflushed write.
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline && s.rig.fuse().stats()?["disks"][1]["pending_writes"] != 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                s.writers().catch_up();
                let at = s.writers().state.clone();
                (s.rig.cut(seed)?.0, at)
            }
            Trigger::AfterAck => {
                s.writers().wait_for_ack(verified + k, PATIENCE)?;
                s.writers().catch_up();
                let at = s.writers().state.clone();
                (s.rig.cut(seed)?.0, at)
            }
            Trigger::InCommit => {
                let n = 1 + rng.below(4);
                let cut = s.rig.cut_after_writes(seed, n, Some("fs"), Duration::from_secs(2))?.0;
                // Inside a commit by construction, when the drive saw a write to cut after (the
                // writer's state at that instant is not known here).
                (cut, WriterState::default())
            }
            Trigger::Random => {
                std::thread::sleep(Duration::from_micros(rng.below(30_000)));
                s.writers().catch_up();
                let at = s.writers().state.clone();
                (s.rig.cut(seed)?.0, at)
            }
        };
        // The power is gone: the daemon and the writer die.
        if let Some(m) = s.mount.as_mut() {
            m.kill_daemon();
        }
        let writer = s.writers().kill(pid)?;
        s.writer_pid = None;
        let unmounted = s.mount.as_mut().map(Mounted::unmount);
        s.mount = None;
        // Nothing above the drive is left to be told a write succeeded: let ext4 unmount quietly.
        s.rig.fuse().command("silence")?;
        g.check()?;
        if let Some(Err(e)) = unmounted {
            return Err(format!("cycle {cycle}: detaching the dead mount: {e}"));
        }

        report.cuts_after_acks += u64::from(at_cut.acked.is_some());
        if (trigger == Trigger::InCommit && cut.pending_writes > 0) || at_cut.in_msync() {
            report.cuts_mid_msync += 1;
        } else {
            report.cuts_idle += 1;
        }
        report.cuts_with_unflushed_writes += u64::from(cut.pending_writes > 0);
        report.writes_pending_at_cuts += cut.pending_writes;
        report.writes_dropped += cut.dropped;
        report.writes_torn += cut.torn;
        report.writer_msync_failed += u64::from(writer.error.is_some());
        report.acknowledged += writer.acked.map_or(0, |a| a.saturating_sub(verified));

        // Power back on; the store's recovery replays its log.
        s.rig.power_off()?;
        let fsck = cfg.fsck_every > 0 && (cycle + 1) % cfg.fsck_every == 0;
        if let Some(problem) = s.rig.power_on(false, fsck)? {
            report.fsck_problems.push(format!("cycle {cycle}: {problem}"));
        }
        report.fsck_runs += u64::from(fsck);
        report.cycles += 1;
        let floor = writer.acked.unwrap_or(0).max(verified);
        let newest = writer.synced.unwrap_or(0).max(floor);
        let context = format!(
            "cycle {cycle}, cut {}: {} writes unflushed, {} dropped, {} torn; writer acknowledged {:?}, was syncing {:?}",
            trigger.name(),
            cut.pending_writes,
            cut.dropped,
            cut.torn,
            writer.acked,
            writer.synced
        );
        if let Err(e) = s.mount_store(&format!("cycle {cycle}: mounting (recovering) the store"))? {
            note_violation(
                &mut report.violations,
                &mut report.details,
                format!("{context}: the store does not mount: {e}"),
            );
            break; // nothing more can be checked
        }
        let data = s.read_file(&format!("cycle {cycle}: reading the file"))?;
        let found = match &data {
            Ok(d) => generation_of(d, NPAGES),
            Err(e) => Err(format!("reading it: {e}")),
        };
        let verdict = match found {
            Ok(g) if g < floor => Err(format!("generation {g}, older than the last acknowledged {floor}")),
            Ok(g) if g > newest => Err(format!("generation {g}, newer than any synced ({newest})")),
            other => other,
        };
        match verdict {
            Ok(g) => {
                report.committed_unacknowledged += u64::from(g > floor);
                verified = g;
            }
            Err(w) => {
                let msg = format!("{context}: {w}");
                say(&format!("VIOLATION {msg}"));
                note_violation(&mut report.violations, &mut report.details, msg);
                // Start over from generation 0, so later cycles are still checked.
                let g = s.guards("rewriting the file after a violation");
                let rewritten = std::fs::File::create(s.mount().path(FILE)).and_then(|f| {
                    f.set_len((NPAGES * PAGE) as u64)?;
                    f.sync_all()
                });
                g.check()?;
                rewritten.map_err(|e| format!("rewriting {FILE}: {e}"))?;
                verified = 0;
            }
        }
        report.last_generation = verified;
        if std::env::var_os("FAMS_MOUNT_POWER_CUT_PROGRESS").is_some() {
            say(&format!("{context}; file at {verified}; violations {}", report.violations));
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[test]
fn power_cuts_under_famsd_mount_keep_the_last_msync() {
    if let Some(why) = cannot_run() {
        skip(&format!("mount power-cut test: {why}"));
        return;
    }
    if !can_mount() {
        return;
    }
    let cfg = Config {
        cycles: env_u64("FAMS_MOUNT_POWER_CUT_CYCLES", 25),
        seed: env_u64("FAMS_MOUNT_POWER_CUT_SEED", 0x6d6f_756e_7463_7574),
        fsck_every: 20,
    };
    let report = run_power_cuts(&cfg).unwrap_or_else(|e| panic!("mount power-cut test could not run: {e}"));
    say(&report.summary());
    assert_eq!(report.violations, 0, "{}", report.summary());
    assert_eq!(report.cycles, cfg.cycles, "{}", report.summary());
    assert!(report.fsck_problems.is_empty(), "ext4 found damage: {:?}", report.fsck_problems);
    // Coverage: cuts after acknowledged msyncs (what must survive) and inside commits.
    assert!(report.cuts_after_acks > 0, "no cut came after an acknowledgement\n{}", report.summary());
    assert!(report.cuts_with_unflushed_writes > 0, "no cut found unflushed writes on the drive\n{}", report.summary());
    assert!(report.acknowledged > 0, "the writer never got an acknowledgement\n{}", report.summary());
}
