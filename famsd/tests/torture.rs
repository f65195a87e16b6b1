//! The SIGKILL crash test through the real binary: `famsd torture` kills a committing child at
//! random moments and verifies the recovered heap after every kill. Over 300 cycles per CI run,
//! across both trackers and both log kinds (a file, and a loop device when root). Every run must
//! have killed children inside their recovery of a filled log, in each recovery phase.

use fams_tests::{trackers, LoopDevice, TempDir};
use std::process::Command;

fn torture(cycles: u64, tracker: &str, log: Option<&std::path::Path>, seed: u64) -> serde_json::Value {
    torture_with(cycles, tracker, log, seed, &[])
}

fn torture_with(
    cycles: u64,
    tracker: &str,
    log: Option<&std::path::Path>,
    seed: u64,
    extra: &[&str],
) -> serde_json::Value {
    let dir = TempDir::new("torture");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_famsd"));
    cmd.args(["torture", "--json", "--cycles", &cycles.to_string(), "--tracker", tracker, "--seed", &seed.to_string()])
        .arg("--dir")
        .arg(dir.join("run"));
    if let Some(l) = log {
        cmd.arg("--log").arg(l);
    }
    cmd.args(extra);
    let out = cmd.output().expect("run famsd torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "famsd torture printed no JSON ({e}): status {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("torture {tracker} {}: {v}", log.map(|l| l.display().to_string()).unwrap_or("file log".into()));
    assert_eq!(v["cycles"], cycles, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["tracker"], tracker, "{v}");
    assert!(v["commits_acknowledged"].as_u64().unwrap() > cycles, "the child should commit between kills: {v}");
    // Coverage: kills landed inside real recoveries of a filled log, in every phase, and the
    // children's own recoveries were compared byte for byte with the verified in-memory replay.
    for phase in ["replay", "heap-sync", "superblock"] {
        assert!(v["killed_in_phase"][phase].as_u64().unwrap() > 0, "no kill landed in recovery phase {phase}: {v}");
    }
    assert!(v["longest_replay_killed_bytes"].as_u64().unwrap() >= 1 << 20, "no kill interrupted a long replay: {v}");
    assert!(v["real_recoveries_compared"].as_u64().unwrap() > cycles / 2, "{v}");
    v
}

/// Run `each` on every item, side by side: a torture cycle mostly waits (for the child's
/// commits, its kill, its recovery), so runs of the three trackers overlap well on two cores.
fn side_by_side<T: Sync>(items: &[T], each: impl Fn(&T) + Sync) {
    std::thread::scope(|s| {
        let runs: Vec<_> = items.iter().map(|item| s.spawn(|| each(item))).collect();
        for r in runs {
            if let Err(panic) = r.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

#[test]
fn sigkill_torture_with_a_file_log_for_each_tracker() {
    side_by_side(&trackers(), |t| {
        let v = torture(90, t.name(), None, 11);
        assert_eq!(v["log_kind"], "file");
    });
}

#[test]
fn sigkill_torture_with_the_log_on_a_loop_device() {
    // A loop device for each tracker's run (each formats its device), so the runs go side by side.
    let dir = TempDir::new("loop");
    let mut runs = Vec::new();
    for t in trackers() {
        let Some(dev) = LoopDevice::new(dir.join(&format!("backing-{}", t.name())), 8 << 20) else { return };
        runs.push((t, dev));
    }
    side_by_side(&runs, |(t, dev)| {
        let v = torture(60, t.name(), Some(&dev.device), 23);
        assert_eq!(v["log_kind"], "block");
    });
}

#[test]
fn sigkill_torture_on_the_plain_syscall_path_with_fdatasync() {
    // The path used where io_uring is blocked (e.g. a container's seccomp profile).
    let t = trackers()[0];
    let v = torture_with(60, t.name(), None, 31, &["--io-path", "sync", "--flush-mode", "fdatasync"]);
    assert_eq!(v["io_path"], "sync");
    assert_eq!(v["flush_mode"], "fdatasync");
}
