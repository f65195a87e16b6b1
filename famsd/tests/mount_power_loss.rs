//! The mount under simulated power cuts (`famsd torture --power-loss --mount`, see
//! `famsd/src/mount/power_loss.rs`): the mount's request logic drives a store on the simulated
//! machine through creates, writes, truncates, syncs, closes without a sync, unlinks and renames,
//! the power is cut at a random I/O operation (half the time at a log operation, where a sync's
//! record is on its way; a quarter of the reopens are cut too), and after every reboot each file
//! must be exactly its last synced state — or, for the operation in flight, the state it would
//! have made — with every returned namespace operation durable. No FUSE and no root: it always
//! runs.
//!
//! What it proves: 1000 crash states without a violation, having covered cuts in each kind of
//! mount operation and of I/O operation, in-flight syncs found both done and undone, and the
//! checks without a crash (discards, staged reads, orphans); a seed replays exactly. Negative
//! controls (a build with `--features mutations`): each deliberate bug of the mount's sync path
//! (`fams::mutations`, layer `mount`) makes the same run report violations.

use fams_tests::TempDir;
use std::process::Command;

fn explore(states: u64, seed: u64, extra: &[&str]) -> (serde_json::Value, String) {
    let dir = TempDir::new("mount-power-loss");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["torture", "--power-loss", "--mount", "--json"])
        .args(["--states", &states.to_string(), "--seed", &seed.to_string()])
        .arg("--dir")
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .expect("run famsd torture --power-loss --mount");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    (v, stdout)
}

#[cfg(not(feature = "mutations"))]
#[test]
fn a_thousand_power_cuts_under_the_mount_leave_every_file_at_a_synced_state() {
    let (v, _) = explore(1000, 20261210, &[]);
    eprintln!("mount power-loss explorer: {v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["states"], 1000, "{v}");
    assert_eq!(v["final_reopen_ok"], true, "{v}");
    // The run covered what it claims to.
    for op in ["sync", "create", "unlink", "rename", "truncate-closed"] {
        assert!(v["cuts_per_mount_op"][op].as_u64().unwrap() > 0, "no cut during a {op}: {v}");
    }
    for kind in ["log-durable-write", "log-write", "log-flush", "heap-write"] {
        assert!(v["cuts_per_io_op"][kind].as_u64().unwrap() > 0, "no cut in a {kind}: {v}");
    }
    for key in [
        "cuts_during_recovery",
        "in_flight_found_done",
        "in_flight_found_undone",
        "syncs_acknowledged",
        "mapped_page_writes",
        "truncates",
        "discards_checked",
        "reads_checked",
        "orphans_checked",
        "unflushed_writes_torn",
    ] {
        assert!(v[key].as_u64().unwrap() > 0, "{key} is zero: {v}");
    }
    for mode in ["dsync", "fdatasync"] {
        assert!(v["states_per_flush_mode"][mode].as_u64().unwrap() > 0, "no state with a {mode} log: {v}");
    }
}

#[cfg(not(feature = "mutations"))]
#[test]
fn a_mount_power_loss_seed_replays_exactly_with_synchronous_commits() {
    // Commits written while the workload goes on (the daemon's way, the default) make the I/O
    // sequence depend on thread timing; --sync-only makes it exact.
    let (a, ja) = explore(100, 5, &["--sync-only"]);
    let (_, jb) = explore(100, 5, &["--sync-only"]);
    assert_eq!(a["violations"], 0, "{a}");
    assert_eq!(ja, jb, "the same seed gave different runs");
    let (_, jc) = explore(100, 6, &["--sync-only"]);
    assert_ne!(ja, jc, "a different seed gave the same run");
}

/// The negative controls (a build with `--features mutations`): with each deliberate bug of the
/// mount's sync path switched on, the explorer must report violations.
/// Run with `cargo test --release -p famsd --features mutations --test mount_power_loss -- --nocapture`.
#[cfg(feature = "mutations")]
#[test]
fn every_mount_mutation_is_caught() {
    let mut missed = Vec::new();
    let mut ran = 0;
    for name in fams_tests::mutations_of_layer(std::path::Path::new(env!("CARGO_BIN_EXE_famsd")), "mount") {
        let name = name.as_str();
        let (v, _) = explore(200, 1, &["--mutation", name]);
        eprintln!(
            "mount mutation {name}: {} violations in {} states, e.g. {}",
            v["violations"], v["states"], v["violation_details"][0]
        );
        if v["violations"] == 0 {
            missed.push(name.to_string());
        }
        ran += 1;
    }
    assert!(ran >= 3, "expected the mount's mutations, found {ran}");
    assert!(missed.is_empty(), "the mount's power-loss explorer missed {missed:?}");
}
