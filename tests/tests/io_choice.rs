//! The log's I/O path and flush mode are chosen once, by measuring the device when the log is
//! formatted, recorded in its superblock, and used by every open unless the caller says
//! otherwise. No timing thresholds: which candidate wins is the device's business; the tests
//! check that the fastest measured one is recorded, used, reported, and overridable.

use fams::io::{FlushMode, IoPath};
use fams::log_format::Superblock;
use fams::{FormatOptions, Heap, HeapOptions};
use fams_tests::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn superblock(log: &Path) -> Superblock {
    let f = std::fs::File::open(log).unwrap();
    let mut b = vec![0u8; 8192];
    f.read_exact_at(&mut b, 0).unwrap();
    [Superblock::decode(&b[..4096]), Superblock::decode(&b[4096..])]
        .into_iter()
        .flatten()
        .max_by_key(|s| s.sequence)
        .expect("a valid superblock")
}

#[test]
fn format_measures_records_and_open_uses_the_fastest_way() {
    let dir = TempDir::new("io-choice");
    let path = dir.join("h");
    let (_, io) = Heap::format_reporting(&FormatOptions::new(&path, 1 << 20)).unwrap();
    let uring = fams::io::open_log(
        &dir.join("h.log"),
        &fams::io::LogOpenOptions { io_path: Some(IoPath::Uring), flush_mode: None },
    )
    .is_ok();
    assert_eq!(io.measured.len(), if uring { 4 } else { 2 }, "every candidate measured: {io:?}");
    assert!(io.measured.iter().all(|m| m.p50_us > 0.0 && m.p50_us.is_finite()), "{io:?}");
    let best = io.measured.iter().min_by(|a, b| a.p50_us.total_cmp(&b.p50_us)).unwrap();
    assert_eq!((io.io_path, io.flush_mode), (best.io_path, best.flush_mode), "the fastest is chosen: {io:?}");
    let sb = superblock(&dir.join("h.log"));
    assert_eq!((sb.io_path_preferred, sb.flush_mode_preferred), (Some(io.io_path), Some(io.flush_mode)));

    // Every open uses it, and says so; the recovery's new superblock keeps it.
    for _ in 0..2 {
        let h = Heap::open(&path, &HeapOptions::default()).unwrap();
        let s = h.stats();
        assert_eq!((s.io_path, s.flush_mode), (io.io_path.name(), io.flush_mode.name()), "{s:?}");
        assert!(s.io_choice.contains("measured"), "{}", s.io_choice);
    }
    let sb = superblock(&dir.join("h.log"));
    assert_eq!((sb.io_path_preferred, sb.flush_mode_preferred), (Some(io.io_path), Some(io.flush_mode)));

    // The caller's choice wins over the recorded one.
    let other = if io.flush_mode == FlushMode::Dsync { FlushMode::Fdatasync } else { FlushMode::Dsync };
    let mut h = Heap::open(
        &path,
        &HeapOptions { io_path: Some(IoPath::Sync), flush_mode: Some(other), ..HeapOptions::default() },
    )
    .unwrap();
    let s = h.stats();
    assert_eq!((s.io_path, s.flush_mode), ("sync", other.name()));
    assert!(s.io_choice.contains("asked"), "{}", s.io_choice);
    h.bytes_mut()[0] = 1;
    h.commit().unwrap();
}

#[test]
fn a_format_told_how_measures_nothing_and_records_what_it_was_told() {
    let dir = TempDir::new("io-choice-told");
    let path = dir.join("h");
    let mut opts = FormatOptions::new(&path, 1 << 20);
    opts.io_path = Some(IoPath::Sync);
    opts.flush_mode = Some(FlushMode::Fdatasync);
    let (_, io) = Heap::format_reporting(&opts).unwrap();
    assert!(io.measured.is_empty());
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    let s = h.stats();
    assert_eq!((s.io_path, s.flush_mode), ("sync", "fdatasync"), "{s:?}");
}

#[test]
fn a_log_that_records_no_choice_opens_with_the_defaults() {
    let dir = TempDir::new("io-choice-none");
    let path = dir.join("h");
    format(&path, 1 << 20, None);
    // Rewrite the superblock without a choice, as a log formatted before the choice existed.
    let log = dir.join("h.log");
    let mut sb = superblock(&log);
    sb.io_path_preferred = None;
    sb.flush_mode_preferred = None;
    let mut b = vec![0u8; 4096];
    sb.encode(&mut b);
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().write_all_at(&b, sb.slot_offset()).unwrap();
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    let s = h.stats();
    assert_eq!(s.flush_mode, "dsync", "{s:?}");
    assert!(s.io_choice.contains("defaults"), "{}", s.io_choice);
}
