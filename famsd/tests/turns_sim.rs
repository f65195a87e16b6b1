//! The deterministic cluster simulation (`famsd torture --turns`, [`fams::sim::cluster`]): a
//! thousand seeds of the bank on three nodes, and the token ring and larger clusters, without a
//! violation and with every fault really exercised; a seed replays exactly; and, with the cargo
//! feature `mutations`, every deliberate bug of the turn manager and the transport is caught.
//!
//! `cargo test --release -p famsd --test turns_sim`, and for the negative controls
//! `cargo test --release -p famsd --features mutations --test turns_sim`.

use fams_tests::TempDir;
use std::process::Command;
#[cfg(not(feature = "mutations"))]
use std::time::{Duration, Instant};

fn simulate(seeds: u64, seed: u64, extra: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("turn-sim");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["torture", "--turns", "--json", "--seeds", &seeds.to_string(), "--seed", &seed.to_string()])
        .arg("--dir")
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .expect("run famsd torture --turns");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    })
}

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[cfg_attr(feature = "mutations", allow(dead_code))]
fn assert_clean_and_covered(v: &serde_json::Value, seeds: u64, pipelined: bool) {
    assert_eq!(count(v, "seeds"), seeds, "{v}");
    assert_eq!(count(v, "violations"), 0, "violations: {:#}", v["violation_details"]);
    let mut keys = vec![
        "turns",
        "messages",
        "kills",
        "power_cuts",
        "cuts_during_recovery",
        "datagrams_lost",
        "datagrams_duplicated",
        "datagrams_reordered",
        "partitions",
        "recoveries_checked",
    ];
    if pipelined {
        keys.push("turns_pipelined");
    }
    for key in keys {
        assert!(count(v, key) > 0, "{key} is 0: not exercised in {v}");
    }
}

#[cfg(not(feature = "mutations"))]
#[test]
fn a_thousand_seeds_of_the_bank_find_no_violation() {
    let started = Instant::now();
    let v = simulate(1000, 1, &["--app", "bank", "--nodes", "3"]);
    let elapsed = started.elapsed();
    eprintln!("bank, 3 nodes, 1000 seeds in {elapsed:?}: {v}");
    assert_clean_and_covered(&v, 1000, true);
    assert!(elapsed < Duration::from_secs(150), "1000 seeds took {elapsed:?}");
}

#[cfg(not(feature = "mutations"))]
#[test]
fn the_token_ring_and_larger_clusters_find_no_violation() {
    let v = simulate(300, 5000, &["--app", "ring", "--nodes", "5"]);
    eprintln!("ring, 5 nodes: {v}");
    assert_clean_and_covered(&v, 300, false);
    let v = simulate(100, 9000, &["--app", "bank", "--nodes", "7"]);
    eprintln!("bank, 7 nodes: {v}");
    assert_clean_and_covered(&v, 100, true);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77] {
        let a = simulate(1, seed, &["--app", "bank"]);
        let b = simulate(1, seed, &["--app", "bank"]);
        assert_eq!(a["last_trace_hash"], b["last_trace_hash"], "seed {seed} does not replay: {a} / {b}");
        assert_eq!(a["turns"], b["turns"]);
        assert_eq!(a["events"], b["events"]);
    }
    let a = simulate(1, 3, &["--app", "bank"]);
    let c = simulate(1, 4, &["--app", "bank"]);
    assert_ne!(a["last_trace_hash"], c["last_trace_hash"]);
}

/// Each mutation must be caught, and its first failing seed must fail again on its own.
#[cfg(feature = "mutations")]
fn caught(mutation: &str, app: &str, seeds: u64) {
    let v = simulate(seeds, 1, &["--app", app, "--mutation", mutation]);
    eprintln!("{mutation} ({app}): {} violations in {} failing seeds", v["violations"], v["failing_seeds"]);
    assert!(count(&v, "violations") > 0, "mutation {mutation} went unnoticed in {seeds} seeds: {v}");
    let first = v["failing_seeds"][0].as_u64().expect("a failing seed");
    let again = simulate(1, first, &["--app", app, "--mutation", mutation]);
    assert!(count(&again, "violations") > 0, "seed {first} did not replay its violation: {again}");
    eprintln!("  e.g. {}", again["violation_details"][0]);
}

#[cfg(feature = "mutations")]
#[test]
fn transmit_before_durable_is_caught() {
    caught("transmit-before-durable", "bank", 300);
}

#[cfg(feature = "mutations")]
#[test]
fn ack_before_durable_is_caught() {
    caught("ack-before-durable", "bank", 300);
}

#[cfg(feature = "mutations")]
#[test]
fn no_duplicate_suppression_is_caught() {
    caught("no-duplicate-suppression", "bank", 50);
    caught("no-duplicate-suppression", "ring", 50);
}

#[cfg(feature = "mutations")]
#[test]
fn fifo_reorder_is_caught() {
    caught("fifo-reorder", "bank", 50);
}
