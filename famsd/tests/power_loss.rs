//! The crash explorer on the simulated machine: ≥ 10,000 power-cut states per CI run (two seeds
//! explored side by side), each verified, with the log in both flush modes, short log writes, and
//! recovery cut in each of its phases (replay writes, heap sync, superblock write), some after a
//! long log; and a seed replays exactly.

use fams_tests::TempDir;
use std::process::Command;

fn explore(states: u64, seed: u64, extra: &[&str]) -> (serde_json::Value, String) {
    let dir = TempDir::new("power-loss");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["torture", "--power-loss", "--json", "--states", &states.to_string(), "--seed", &seed.to_string()])
        .arg("--dir")
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .expect("run famsd torture --power-loss");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    (v, stdout)
}

#[test]
fn ten_thousand_simulated_power_cuts_without_a_violation() {
    // Two seeds of 5,000 states each, explored side by side: the explorer is single-threaded and
    // CPU-bound, so this takes half the time of one 10,000-state run on two cores.
    let seeds = [20261128u64, 20261129];
    let runs: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds.iter().map(|&seed| s.spawn(move || explore(5_000, seed, &[]).0)).collect();
        handles.into_iter().map(|h| h.join().expect("explorer thread")).collect()
    });
    for (v, seed) in runs.iter().zip(seeds) {
        eprintln!("power-loss explorer: {v}");
        assert_eq!(v["states"], 5_000, "{v}");
        assert_eq!(v["violations"], 0, "{v}");
        assert_eq!(v["seed"], seed);
    }
    let total = |path: &[&str]| -> u64 {
        runs.iter()
            .map(|v| path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("no {path:?} in {v}")))
            .sum()
    };
    // The runs really exercised what they claim to.
    for key in [
        "exhaustive_states",
        "cuts_during_recovery",
        "unflushed_writes_torn",
        "garbage_sectors",
        "checkpoints",
        "records_replayed",
        "recovered_unacknowledged",
        "rollbacks",
        "cuts_between_log_write_and_flush",
        "short_writes_injected",
        "long_replay_states",
        "recovery_short_writes",
    ] {
        assert!(total(&[key]) > 0, "{key} is zero in both runs: {runs:?}");
    }
    // Both flush modes of the log ran, recovery was cut in each of its phases, and some replay
    // was long (a few hundred records).
    for key in ["dsync", "fdatasync"] {
        assert!(total(&["states_per_flush_mode", key]) > 0, "no state with a {key} log: {runs:?}");
    }
    for key in ["replay_writes", "heap_sync", "superblock_write"] {
        assert!(total(&["recovery_cuts", key]) > 0, "recovery was never cut in {key}: {runs:?}");
    }
    let longest = runs.iter().map(|v| v["longest_replay_records"].as_u64().unwrap()).max().unwrap();
    assert!(longest >= 100, "no long replay: {runs:?}");
}

#[test]
fn a_seed_replays_exactly_with_synchronous_commits() {
    let (a, ja) = explore(600, 77, &["--sync-only"]);
    let (_, jb) = explore(600, 77, &["--sync-only"]);
    assert_eq!(a["violations"], 0, "{a}");
    assert_eq!(ja, jb, "the same seed gave different runs");
    let (_, jc) = explore(600, 78, &["--sync-only"]);
    assert_ne!(ja, jc, "a different seed gave the same run");
}

/// The negative controls (a build with `--features mutations`): with each deliberate bug of the
/// heap switched on, the explorer must report violations. CI runs the same through
/// `famsd torture --list-mutations --json` and prints the counts beside the real power cuts'.
#[cfg(feature = "mutations")]
#[test]
fn every_heap_mutation_is_caught() {
    let mut missed = Vec::new();
    let mut ran = 0;
    for name in fams_tests::mutations_of_layer(std::path::Path::new(env!("CARGO_BIN_EXE_famsd")), "heap") {
        let name = name.as_str();
        let (v, _) = explore(2000, 1, &["--mutation", name]);
        eprintln!(
            "{name}: {} violations in {} states, e.g. {}",
            v["violations"], v["states"], v["violation_details"][0]
        );
        if v["violations"] == 0 {
            missed.push(name.to_string());
        }
        ran += 1;
    }
    assert!(ran >= 6, "expected the heap's mutations, found {ran}");
    assert!(missed.is_empty(), "the power-loss explorer missed {missed:?}");
}
