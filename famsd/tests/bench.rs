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
    for r in commit {
        for k in ["p50_us", "p99_us", "floor_p50_us"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {r}");
        }
        assert!(r["p99_us"].as_f64() >= r["p50_us"].as_f64());
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
