//! The fuzz targets' code paths, run in CI on the kept inputs: every file under
//! `tests/fuzz/regressions/` goes through all three targets (`decode_superblock`,
//! `decode_record`, `recover_from_bytes`) and must not panic. The harness is the fuzz project's
//! own (`tests/fuzz/src/lib.rs`), compiled in here, so these are the same checks the fuzzer runs.
//!
//! The kept inputs are seeds made from real logs by `tests/fuzz/examples/make_seeds.rs` (names
//! `area-*` and `raw-*` are recover_from_bytes inputs of the two shapes, `sb-*` superblock slots,
//! `rec-*` records) and anything the fuzzer found worth keeping.
//! To replay one input: `cargo test -p fams-tests --test fuzz_regressions -- --nocapture` prints
//! each file as it runs it; or in tests/fuzz, `cargo fuzz run TARGET FILE`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use fams::log_format::{Superblock, BLOCK};
use std::path::PathBuf;

fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions")
}

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(regressions_dir())
        .expect("tests/fuzz/regressions")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect()
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(regressions_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_kept_input_passes_all_three_targets() {
    let inputs = inputs();
    assert!(inputs.len() >= 10, "the kept inputs are missing: {} files", inputs.len());
    let mut failed = Vec::new();
    for (name, data) in &inputs {
        for (target, run) in [
            ("decode_superblock", harness::decode_superblock as fn(&[u8])),
            ("decode_record", harness::decode_record),
            ("recover_from_bytes", harness::recover_from_bytes),
        ] {
            eprintln!("{target} {name} ({} bytes)", data.len());
            if std::panic::catch_unwind(|| run(data)).is_err() {
                failed.push(format!("{target} {name}"));
            }
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:?}");
}

/// The seeds are what they claim: real logs whose records recovery replays through the harness's
/// shapes (otherwise the fuzzer would only ever explore rejections).
#[test]
fn the_seeds_from_real_logs_replay_their_records() {
    let replayed = |name: &str| {
        let b = harness::build(&input(name)).expect("builds");
        let (res, _, _) = fams::sim::recover_images(b.log, b.heap, b.salvage);
        res.unwrap_or_else(|e| panic!("{name}: {e}")).records_replayed
    };
    assert_eq!(replayed("area-one"), 1);
    assert_eq!(replayed("area-group"), 6, "six records in four device writes");
    // Tail near the end of the area, the next record at its start: the chain wraps.
    assert_eq!(replayed("area-wrap41"), 1);
    assert_eq!(replayed("raw-wrap42"), 2);
    // Records of the current epoch after stale ones of the previous epoch.
    assert_eq!(replayed("raw-reopened"), 2);
}

/// The harness's CRC32C (used to re-seal mutated inputs) is the one the format uses.
#[test]
fn the_harness_crc_is_the_formats() {
    let mut sb = Superblock::new(fams::HeapId([3; 16]), 1 << 20);
    sb.tail_lsn = 77;
    let mut out = vec![0u8; BLOCK];
    sb.encode(&mut out);
    assert_eq!(harness::crc32c(&out[..96]).to_le_bytes(), out[96..100]);
    assert_eq!(harness::crc32c(b"123456789"), 0xe306_9283);
}
