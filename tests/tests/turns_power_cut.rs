//! Power cuts of real turn nodes: the turn system's real-process proof on the FUSE power-cut disk.
//!
//! A bank cluster of three real `famsd node bank` processes on 127.0.0.1. Nodes 1 and 2 run on
//! "machine A", whose drives are served by one `fams-fuse-disk` program (drives with volatile
//! write caches; see `fams_tests::fuse_disk` and `fams_tests::power_rig`):
//!
//! * node 1 in the default layout `famsd node bank` makes: its heap file and its log *file*
//!   (`node1.heap.log`) on ext4, over a loop device, over the FUSE drive `fs`;
//! * node 2: its heap file on that ext4, its log the raw loop device over the FUSE drive `log`
//!   (reached through a symlink the test re-points at every power-on, as loop device names change).
//!
//! Node 3 runs on the host's disk. While transfers fly, the test repeatedly **cuts machine A's
//! power** — every write since the last flush is kept, dropped or torn per 512-byte sector, and
//! the drives fail everything afterwards — at a random moment: while the nodes run, right after
//! the n-th next write reaches a drive (between a write and its flush), after freezing the nodes
//! (SIGSTOP; their I/O in flight lands on the dead drives), or while they are still recovering
//! from the previous cut. Then it SIGKILLs nodes 1 and 2, unmounts ext4, detaches the loop
//! devices, ends the FUSE program, starts a new one from the durable images, attaches and
//! mounts again (ext4 replays its journal; now and then e2fsck checks it), and restarts the
//! nodes (fams replays their logs). Between cuts it SIGKILLs single nodes now and then (a crash
//! without power loss). At the end the cluster runs to completion and the nodes' heaps are
//! checked as `famsd node report` / `fams::apps::bank::check_cluster` do: the total is conserved,
//! every transfer was applied exactly once and in per-pair order, and every node made all its
//! transfers (liveness).
//!
//! A node on machine A that is still running when the power goes usually meets the dead drive's
//! EIO first and says so on stderr (`famsd: error: … the log writer failed …`): expected.
//! A node that ends by itself while its machine has power is a failure.
//!
//! Knobs: FAMS_TURNS_POWER_CUT_CYCLES (power cuts, default 40), _SEED, _TRANSFERS (per node),
//! _PROGRESS (a line per cut). Root only (FUSE, losetup, mount); elsewhere it says why it
//! skipped (and fails where every test must run: CI=true or FAMS_REQUIRE_ROOT_TESTS).
//! `scripts/turns-power-cut.sh` runs it with the knobs.

use fams_tests::fuse_disk::{DiskCounters, FUSE_PATIENCE};
use fams_tests::power_rig::{cannot_run, env_u64, say, wait_stopped, Rig};
use fams_tests::{built_binary, Rng, Signal};
use famsd::cluster::{BankCluster, ClusterConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The raw log drive of node 2.
const LOG_DISK: u64 = 8 << 20;
/// ext4 holding node 1's heap and log file and node 2's heap.
const FS_DISK: u64 = 64 << 20;
/// Each node's heap; small, so recovery and the drives' images stay cheap.
const NODE_HEAP_BYTES: u64 = 8 << 20;
/// Node 2's log on the raw drive (the default log of a node this size is 4 MiB too).
const NODE2_LOG_BYTES: u64 = 4 << 20;
const NODES: usize = 3;
/// Nodes 1 and 2 (indexes 0 and 1) live on machine A.
const ON_MACHINE_A: [usize; 2] = [0, 1];

struct Config {
    cuts: u64,
    seed: u64,
    transfers_per_node: u64,
    /// Break the drive on purpose: this drive of machine A acknowledges flushes without flushing.
    lying_drive: Option<String>,
    fsck_every: u64,
    /// How long the cluster may take to finish after the last cut (then: a liveness failure).
    finish_timeout: Duration,
}

#[derive(Default, Debug)]
struct Report {
    power_cuts: u64,
    cuts_that_dropped: u64,
    cuts_that_tore: u64,
    cuts_with_pending_writes: u64,
    writes_pending: u64,
    writes_kept: u64,
    writes_dropped: u64,
    writes_torn: u64,
    cut_modes: std::collections::BTreeMap<String, u64>,
    cut_when: std::collections::BTreeMap<String, u64>,
    /// SIGKILLs without a power cut, per node.
    sigkills: [u64; NODES],
    /// Nodes that ended by themselves (a failed recovery, say): the first few, and how many.
    nodes_ended_by_themselves: Vec<String>,
    nodes_ended_count: u64,
    /// A node that ended by itself is started again after a pause (not in a hot loop).
    ended_at: [Option<Instant>; NODES],
    log_disk: DiskCounters,
    fs_disk: DiskCounters,
    fsck_runs: u64,
    fsck_problems: Vec<String>,
    /// Transfers applied (as the nodes printed them) when the last cut came.
    applied_at_last_cut: u64,
    transfers: u64,
    transfers_applied: u64,
    finished: bool,
    violations: Vec<String>,
    loop_dio: bool,
    seconds: f64,
    /// Time spent tearing machine A down and powering it on again (not the nodes' recovery).
    reboot_seconds: f64,
    /// Time the cluster took to finish after the last cut.
    finish_seconds: f64,
}

impl Report {
    fn summary(&self) -> String {
        format!(
            "turns power cuts: {} cuts of machine A (nodes 1, 2) in {:.1} s ({:.1} s rebooting machine A, \
             {:.1} s finishing after the last cut), {} SIGKILLs without a cut {:?}, \
             violations {}; transfers applied {} of {} (finished: {}; {} applied by the last cut)\n\
             cuts: {} with unflushed writes, {} dropped writes, {} tore writes; writes pending {} → kept {}, \
             dropped {}, torn {}; modes {:?}; when {:?}\n\
             log drive (node 2's raw log) saw {} writes, {} fsyncs + {} fdatasyncs; fs drive (ext4: node 1's heap + \
             log file, node 2's heap) saw {} writes, {} fsyncs + {} fdatasyncs; loop direct I/O {}; \
             e2fsck after journal replay: {} runs, {} problems{}{}",
            self.power_cuts,
            self.seconds,
            self.reboot_seconds,
            self.finish_seconds,
            self.sigkills.iter().sum::<u64>(),
            self.sigkills,
            self.violations.len(),
            self.transfers_applied,
            self.transfers,
            self.finished,
            self.applied_at_last_cut,
            self.cuts_with_pending_writes,
            self.cuts_that_dropped,
            self.cuts_that_tore,
            self.writes_pending,
            self.writes_kept,
            self.writes_dropped,
            self.writes_torn,
            self.cut_modes,
            self.cut_when,
            self.log_disk.writes,
            self.log_disk.fsyncs,
            self.log_disk.fdatasyncs,
            self.fs_disk.writes,
            self.fs_disk.fsyncs,
            self.fs_disk.fdatasyncs,
            self.loop_dio,
            self.fsck_runs,
            self.fsck_problems.len(),
            if self.nodes_ended_by_themselves.is_empty() {
                String::new()
            } else {
                format!(
                    "\nnodes that ended by themselves {} times: {:?}",
                    self.nodes_ended_count, self.nodes_ended_by_themselves
                )
            },
            if self.violations.is_empty() {
                String::new()
            } else {
                format!("\nVIOLATIONS:\n  {}", self.violations.join("\n  "))
            },
        )
    }
}

/// Point node 2's log symlink at the loop device of this power-on.
fn point_log_link(link: &Path, dev: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(dev, link).map_err(|e| format!("{} → {}: {e}", link.display(), dev.display()))
}

fn signal(pid: u32, sig: Signal) {
    fams_tests::signal_pid(pid, sig);
}

/// Follow the cluster for `d`: read the nodes' output, note nodes that ended by themselves.
fn run_for(cluster: &mut BankCluster, d: Duration, report: &mut Report) -> Result<(), String> {
    let until = Instant::now() + d;
    loop {
        cluster.poll();
        for i in 0..cluster.nodes() {
            if let Some(status) = cluster.ended_by_itself(i) {
                // Say so (it is reaped by `kill`), and give it another go in a while.
                report.nodes_ended_count += 1;
                if report.nodes_ended_by_themselves.len() < 10 {
                    report.nodes_ended_by_themselves.push(format!("node {} ({status})", i + 1));
                }
                cluster.kill(i);
                report.ended_at[i] = Some(Instant::now());
            }
            if report.ended_at[i].is_some_and(|t| t.elapsed() > Duration::from_millis(200)) {
                report.ended_at[i] = None;
                cluster.restart(i)?;
            }
        }
        if Instant::now() >= until {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run_turns_power_cuts(cfg: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let famsd = built_binary("famsd", &["--bin", "famsd"], Path::new("famsd"));
    let mut rig = Rig::new("turnspowercut", Path::new(env!("CARGO_BIN_EXE_fams-fuse-disk")), LOG_DISK, FS_DISK);
    rig.lying_drive = cfg.lying_drive.clone();
    rig.power_on(true, false)?;
    let mut report = Report { loop_dio: rig.loop_dio, ..Report::default() };
    let log_link = rig.dir.join("node2-log-device");
    point_log_link(&log_link, &rig.log_dev())?;
    let heaps: Vec<PathBuf> =
        vec![rig.fs_mnt().join("node1.heap"), rig.fs_mnt().join("node2.heap"), rig.dir.join("host").join("node3.heap")];
    // Node 2's heap is made here, with its log on the raw drive; node 1's and node 3's are made
    // by `famsd node bank` itself (the default layout: a log file beside the heap).
    let mut f = fams::FormatOptions::new(&heaps[1], NODE_HEAP_BYTES);
    f.log_path = Some(log_link.clone());
    f.log_size_bytes = Some(NODE2_LOG_BYTES);
    fams::Heap::format(&f)
        .map_err(|e| format!("formatting node 2's heap with its log on {}: {e}", log_link.display()))?;

    let ccfg = ClusterConfig {
        famsd,
        dir: rig.dir.join("host"),
        nodes: NODES,
        transfers_per_node: cfg.transfers_per_node,
        interval_ms: 2,
        kills_per_node: 0,
        kill_gap_ms: (0, 0),
        down_ms: (0, 0),
        seed: cfg.seed,
        faults: None,
        relay: None,
        key: None,
        timeout: cfg.finish_timeout,
        tracker: None,
        progress: false,
        mutation: None,
    };
    let mut cluster = BankCluster::start(&ccfg, heaps, NODE_HEAP_BYTES)?;
    let mut rng = Rng::new(cfg.seed ^ 0x7475_726e_7370_6375);
    let progress = std::env::var_os("FAMS_TURNS_POWER_CUT_PROGRESS").is_some();
    for cut_no in 0..cfg.cuts {
        // Machine A runs for a while; now and then a single node crashes without a power cut.
        // Mostly right after a write reached a drive (between a write and its flush: the cut
        // that can lose or tear something), else frozen, at a random instant, or mid-recovery.
        let when = match rng.below(10) {
            0 => "recovering",
            1..=2 => "frozen",
            3..=4 => "running",
            _ => "after-write",
        };
        *report.cut_when.entry(when.into()).or_default() += 1;
        let uptime_ms = if when == "recovering" { rng.below(60) } else { 150 + rng.below(500) };
        let up_until = Instant::now() + Duration::from_millis(uptime_ms);
        while Instant::now() < up_until {
            let left = up_until.saturating_duration_since(Instant::now());
            let step = Duration::from_millis(50 + rng.below(150)).min(left);
            run_for(&mut cluster, step, &mut report)?;
            if when != "recovering" && rng.below(4) == 0 && Instant::now() < up_until {
                let i = rng.below(NODES as u64) as usize;
                let what = format!("cut {cut_no}: SIGKILL of node {}", i + 1);
                rig.fuse().watch(&what, FUSE_PATIENCE, || cluster.kill(i))?;
                report.sigkills[i] += 1;
                run_for(&mut cluster, Duration::from_millis(rng.below(100)), &mut report)?;
                cluster.restart(i)?;
            }
        }
        // The nodes do their I/O through the drives: freezing, cutting and killing them wait
        // on the FUSE program, so the watchdog guards this stretch.
        let guard =
            rig.fuse().guard(&format!("cut {cut_no}: the cut of machine A and the kill of its nodes"), FUSE_PATIENCE);
        let seed = rng.next_u64();
        let cut = match when {
            "frozen" => {
                let pids: Vec<u32> = ON_MACHINE_A.iter().filter_map(|&i| cluster.pid(i)).collect();
                for &pid in &pids {
                    signal(pid, Signal::SIGSTOP);
                }
                for &pid in &pids {
                    wait_stopped(pid, Duration::from_secs(5));
                }
                rig.cut(seed)
            }
            "after-write" => {
                let disk = match rng.below(3) {
                    0 => None,
                    1 => Some("log"),
                    _ => Some("fs"),
                };
                rig.cut_after_writes(seed, 1 + rng.below(16), disk, Duration::from_millis(500))
            }
            _ => rig.cut(seed),
        };
        // The nodes die with the power (a node may have seen the dead drive's EIO first).
        for i in ON_MACHINE_A {
            cluster.kill(i);
        }
        cluster.poll();
        report.applied_at_last_cut = cluster.applied();
        if guard.fired() {
            return Err(format!("cut {cut_no}: the watchdog aborted a wedged FUSE connection"));
        }
        drop(guard);
        let (cut, counters) = cut?;
        report.power_cuts += 1;
        report.writes_pending += cut.pending_writes;
        report.writes_kept += cut.kept;
        report.writes_dropped += cut.dropped;
        report.writes_torn += cut.torn;
        report.cuts_with_pending_writes += (cut.pending_writes > 0) as u64;
        report.cuts_that_dropped += (cut.dropped > 0) as u64;
        report.cuts_that_tore += (cut.torn > 0) as u64;
        *report.cut_modes.entry(cut.mode.clone()).or_default() += 1;
        if let [log, fs] = counters.as_slice() {
            report.log_disk.add(log);
            report.fs_disk.add(fs);
        }
        // No node is left on machine A to be told a write succeeded: let ext4 unmount quietly.
        rig.fuse().command("silence")?;
        // Power back on: new drives from the durable images, loop devices, ext4, the nodes.
        let reboot_started = Instant::now();
        rig.power_off()?;
        let fsck = cfg.fsck_every > 0 && (cut_no + 1) % cfg.fsck_every == 0;
        if let Some(problem) = rig.power_on(false, fsck)? {
            report.fsck_problems.push(format!("after cut {cut_no}: {problem}"));
        }
        report.fsck_runs += fsck as u64;
        point_log_link(&log_link, &rig.log_dev())?;
        for i in ON_MACHINE_A {
            report.ended_at[i] = None;
            cluster.restart(i)?;
        }
        report.reboot_seconds += reboot_started.elapsed().as_secs_f64();
        if progress {
            say(&format!(
                "{:.1} s: cut {cut_no} ({when}): {} cut, pending {:?}, kept {} dropped {} torn {}; {} transfers applied; reboot {:.0} ms",
                started.elapsed().as_secs_f64(),
                cut.mode,
                cut.pending_per_disk,
                cut.kept,
                cut.dropped,
                cut.torn,
                cluster.applied(),
                reboot_started.elapsed().as_secs_f64() * 1e3
            ));
        }
    }
    // Power stays on now: let the cluster finish its transfers.
    let finish_started = Instant::now();
    let deadline = Instant::now() + ccfg.timeout;
    let guard = rig.fuse().guard("the cluster finishing its transfers", ccfg.timeout + FUSE_PATIENCE);
    while !cluster.finished() && Instant::now() < deadline {
        run_for(&mut cluster, Duration::from_millis(20), &mut report)?;
    }
    let finished = cluster.finished();
    report.finish_seconds = finish_started.elapsed().as_secs_f64();
    // Stop the nodes (SIGTERM) and read their heaps: machine A's through its FUSE drives.
    let result =
        rig.fuse().watch("stopping the nodes and reading their heaps", FUSE_PATIENCE, || cluster.finish(finished))?;
    if guard.fired() {
        return Err("the watchdog aborted a wedged FUSE connection while the cluster finished".into());
    }
    drop(guard);
    let cluster_report = result?;
    report.finished = cluster_report.finished;
    report.transfers = cluster_report.transfers;
    report.transfers_applied = cluster_report.reports.iter().map(|r| r.transfers_applied).sum();
    report.violations = cluster_report.problems.clone();
    for r in &cluster_report.reports {
        let applied: u64 = r.applied.values().map(|a| a.0).sum();
        let sent: u64 = r.sent.values().map(|s| s.0).sum();
        if progress {
            say(&format!(
                "  node {}: total {}, sent {sent}, applied {applied}, restarts {}",
                r.node,
                r.total(),
                r.restarts
            ));
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    rig.power_off()?;
    Ok(report)
}

#[test]
fn turn_nodes_survive_power_cuts_on_the_fuse_disk() {
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("turns power-cut test: {why}"));
        return;
    }
    let cfg = Config {
        cuts: env_u64("FAMS_TURNS_POWER_CUT_CYCLES", 40),
        seed: env_u64("FAMS_TURNS_POWER_CUT_SEED", 0x7e57_c0de),
        transfers_per_node: env_u64("FAMS_TURNS_POWER_CUT_TRANSFERS", 6000),
        lying_drive: None,
        fsck_every: 10,
        finish_timeout: Duration::from_secs(120),
    };
    let report = run_turns_power_cuts(&cfg).unwrap_or_else(|e| panic!("turns power-cut test could not run: {e}"));
    say(&report.summary());
    let s = report.summary();
    assert!(report.violations.is_empty(), "{s}");
    assert!(report.finished, "{s}");
    assert!(report.nodes_ended_count == 0, "a node on a powered machine ended by itself (failed recovery?)\n{s}");
    assert!(report.fsck_problems.is_empty(), "ext4 found damage: {:?}\n{s}", report.fsck_problems);
    // Coverage: what the test claims to have exercised, it did.
    assert!(report.power_cuts >= cfg.cuts.min(25), "{s}");
    assert!(report.cuts_that_dropped + report.cuts_that_tore > 0, "no cut lost or tore an unflushed write\n{s}");
    assert!(report.log_disk.fsyncs + report.log_disk.fdatasyncs > 0, "no flush reached the log drive\n{s}");
    assert!(report.fs_disk.fsyncs + report.fs_disk.fdatasyncs > 0, "no flush reached the fs drive\n{s}");
    assert!(report.sigkills.iter().sum::<u64>() > 0, "no SIGKILL without a cut\n{s}");
    assert!(report.applied_at_last_cut > 0, "no transfer was applied while the power was being cut\n{s}");
}

/// Proof that the test sees the drive: machine A's raw log drive (node 2's log; with
/// FAMS_TURNS_POWER_CUT_LYING_DRIVE=fs the drive of ext4, node 1's log file) acknowledges
/// flushes without making anything durable, so turns node 2 reported durable — transfers it
/// sent and acknowledged — are lost at power cuts, and the bank check must say so. Run with
/// `cargo test --release -p fams-tests --test turns_power_cut -- --ignored --nocapture`.
#[test]
#[ignore]
fn turns_power_cut_catches_a_log_drive_that_ignores_flushes() {
    if let Some(why) = cannot_run() {
        fams_tests::skip(&format!("turns power-cut test: {why}"));
        return;
    }
    let cfg = Config {
        cuts: env_u64("FAMS_TURNS_POWER_CUT_CYCLES", 30),
        seed: env_u64("FAMS_TURNS_POWER_CUT_SEED", 0x11e5),
        transfers_per_node: env_u64("FAMS_TURNS_POWER_CUT_TRANSFERS", 6000),
        // `fs` makes node 1's log file lie instead — and ext4's journal with it: then ext4
        // itself is usually found corrupt at the next mount, and the run stops with that error.
        lying_drive: Some(std::env::var("FAMS_TURNS_POWER_CUT_LYING_DRIVE").unwrap_or_else(|_| "log".into())),
        fsck_every: 0,
        // The damage usually keeps node 2 from ever finishing: do not wait long for it.
        finish_timeout: Duration::from_secs(20),
    };
    let report = run_turns_power_cuts(&cfg).unwrap_or_else(|e| panic!("turns power-cut test could not run: {e}"));
    say(&format!("lying log drive (flushes ignored):\n{}", report.summary()));
    assert!(!report.violations.is_empty(), "a log drive that ignores flushes went unnoticed\n{}", report.summary());
}
