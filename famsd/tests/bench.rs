//! `famsd bench --quick --json` runs and reports every field scripts read. No timing thresholds:
//! numbers from a shared VM say nothing; only their presence and sanity are checked.

use fams_tests::TempDir;
use std::process::Command;

#[test]
fn quick_bench_reports_commit_recovery_and_baselines() {
    let dir = TempDir::new("bench");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["bench", "--quick", "--json", "--svg"])
        .arg(dir.join("bench.svg"))
        .arg("--dir")
        .arg(dir.join("run"))
        .output()
        .expect("run famsd bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let commit = v["commit"].as_array().expect("commit rows");
    assert!(commit.iter().any(|r| r["pages"] == 1));
    // The large resident heap's row is there, or the run says why not.
    let large = commit.iter().any(|r| r["heap_bytes"].as_u64() == Some(4 << 30));
    let skipped = v["skipped"].as_array().expect("skipped rows");
    assert!(large != skipped.iter().any(|s| s.as_str().is_some_and(|s| s.contains("4 GiB resident heap"))), "{v}");
    for r in commit {
        assert!(r["heap_bytes"].as_u64().unwrap() >= 64 << 20 && r["heap_resident"] == true, "{r}");
        assert!(r["overhead_target_met"].is_boolean(), "{r}");
        for k in ["p50_us", "p99_us", "commit_only_p50_us", "floor_p50_us", "compare_copy_p50_us", "overhead_target_us"]
        {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {r}");
        }
        assert!(r["p99_us"].as_f64() >= r["p50_us"].as_f64());
        // The same commits, timed from their first write: the whole update can only take longer.
        assert!(r["p50_us"].as_f64() >= r["commit_only_p50_us"].as_f64(), "{r}");
    }
    // Where the test's directory sits on a block device sysfs knows, its write cache is reported.
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(dir.join("run")).unwrap());
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let wc = &v["device"]["write_cache"];
    assert!(
        !std::path::Path::new(&format!("/sys/dev/block/{major}:{minor}/queue/write_cache")).exists()
            || wc["disk"].as_str().is_some_and(|d| !d.is_empty()) && wc["volatile_cache"].is_boolean(),
        "{wc}"
    );
    let rates = v["commit_rates"].as_array().expect("commit rates");
    assert!(!rates.is_empty() && v["commit_rate"] == rates[0], "{v}");
    for r in rates {
        assert!(r["tracker"].is_string() && r["async_speedup"].as_f64().unwrap() > 0.0, "{r}");
    }
    for r in v["recovery"].as_array().expect("recovery rows") {
        assert!(r["ms"].as_f64().unwrap() > 0.0 && r["floor_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["records"].as_u64().unwrap() > 0, "recovery replayed nothing: {r}");
    }
    for k in ["sqlite_wal_p50_us", "lmdb_p50_us", "ken_style_p50_us"] {
        assert!(v["baselines"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    let svg = std::fs::read_to_string(dir.join("bench.svg")).expect("svg written");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    assert!(!dir.join("run").join("bench-commit.heap").exists(), "scratch files cleaned up");
}

#[test]
fn bench_refuses_a_path_that_is_not_a_block_device_for_the_log() {
    let dir = TempDir::new("bench-bad");
    std::fs::write(dir.join("file"), b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["bench", "--quick", "--log"])
        .arg(dir.join("file"))
        .output()
        .expect("run famsd bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a block device") && err.contains("--dir"), "{err}");
}

#[test]
fn quick_turn_bench_reports_every_row_next_to_its_floor() {
    let dir = TempDir::new("bench-turns");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["bench", "--turns", "--quick", "--json", "--dir"])
        .arg(dir.join("run"))
        .output()
        .expect("run famsd bench --turns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["mode"], "turns");
    assert_eq!(v["rounds"], 2, "--quick measures every row in two rounds");
    let positive = |row: &serde_json::Value, keys: &[&str]| {
        for k in keys {
            let x = row[*k].as_f64().unwrap_or_else(|| panic!("{k} missing in {row}"));
            assert!(x > 0.0 && x.is_finite(), "{k} = {x} in {row}");
        }
    };
    for row in ["device_commit_floor", "udp_round_trip"] {
        positive(&v[row], &["p50_us", "p99_us"]);
        assert!(v[row]["p99_us"].as_f64() >= v[row]["p50_us"].as_f64(), "{}", v[row]);
    }
    let strict = v["pingpong_strict"].as_array().expect("strict rows");
    assert_eq!(strict.iter().map(|r| r["pages"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 16]);
    for r in strict {
        assert_eq!(r["window"], 1);
        assert_eq!(r["round_trips"], 300);
        positive(r, &["round_trips_per_s", "us_per_round_trip", "floor_us_per_round_trip", "ratio_to_floor"]);
        assert_eq!(r["ratio_to_floor_rounds"].as_array().map(|a| a.len()), Some(2), "{r}");
    }
    let w = &v["pingpong_windowed"];
    assert_eq!(w["window"], 64);
    positive(
        w,
        &["round_trips_per_s", "turns_per_s", "initiator_turns_pipelined_fraction", "initiator_turns_per_device_write"],
    );
    positive(&v["commit_async"], &["async_per_s", "sync_per_s", "windowed_turns_percent_of_async"]);
    let ken = &v["ken_style"];
    for mode in ["strict", "windowed"] {
        positive(&ken[mode], &["round_trips_per_s", "turns_per_s"]);
    }
    positive(ken, &["turn_file_bytes", "windowed_fams_over_windowed_ken", "strict_fams_over_strict_ken"]);
    let r = &v["restart"];
    assert_eq!(r["restarts"], 5, "{r}");
    positive(r, &["to_next_turn_p50_ms", "to_next_turn_max_ms", "to_node_open_p50_ms", "node_open_to_turn_p50_ms"]);
    assert!(r["to_next_turn_max_ms"].as_f64() >= r["to_next_turn_p50_ms"].as_f64(), "{r}");
    // Work resumed after every restart: the initiator saw its peer come back each time.
    assert!(r["initiator_peers_restarted"].as_u64().unwrap() >= 5, "{r}");
    positive(&r["heap_open_after_kill"], &["open_ms", "recovery_ms", "log_bytes_read"]);
    for k in ["strict_met", "over_ken_met", "of_commit_async_met", "restart_met"] {
        assert!(v["targets"][k].is_boolean(), "{k} in {}", v["targets"]);
    }
    let left: Vec<_> =
        std::fs::read_dir(dir.join("run")).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}
