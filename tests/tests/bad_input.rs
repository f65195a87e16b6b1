//! Bad input never corrupts and never panics: each case gets a clear error naming the file, and
//! nothing committed is lost.

use fams::{Error, FormatOptions, Heap, HeapOptions, PAGE_SIZE};
use fams_tests::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn log_of(heap: &Path) -> PathBuf {
    PathBuf::from(format!("{}.log", heap.display()))
}

fn open_default(path: &Path) -> Result<Heap, Error> {
    Heap::open(path, &HeapOptions::default())
}

/// A heap with `n` records in its log that were never checkpointed (the writer crashed).
fn heap_with_log_records(dir: &TempDir, n: u64) -> PathBuf {
    let path = dir.join("h");
    format(&path, 1 << 20, Some(1 << 20));
    run_child("child_writes_records", &[("HEAP", path.display().to_string()), ("N", n.to_string())]);
    path
}

#[test]
fn child_writes_records() {
    if !is_child() {
        return;
    }
    let path = PathBuf::from(std::env::var("HEAP").unwrap());
    let n: u64 = std::env::var("N").unwrap().parse().unwrap();
    let mut h = open_default(&path).unwrap();
    for i in 1..=n {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        h.bytes_mut()[PAGE_SIZE * i as usize] = i as u8;
        h.commit().unwrap();
    }
    crash_exit();
}

/// Offset of the record with `lsn` in the log file (records start on 4096-byte blocks with the
/// magic `FAMR` and their LSN at byte 8).
fn record_offset(log: &Path, lsn: u64) -> u64 {
    let bytes = std::fs::read(log).unwrap();
    (8192..bytes.len())
        .step_by(4096)
        .find(|&at| {
            &bytes[at..at + 4] == b"FAMR" && u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) == lsn
        })
        .unwrap_or_else(|| panic!("no record LSN {lsn} in {}", log.display())) as u64
}

fn counter(h: &Heap) -> u64 {
    u64::from_le_bytes(h.bytes()[0..8].try_into().unwrap())
}

#[test]
fn missing_short_and_foreign_heap_files_are_refused_by_name() {
    let dir = TempDir::new("badheap");
    let missing = dir.join("nope");
    let e = open_default(&missing).err().unwrap().to_string();
    assert!(e.contains("nope") && e.contains("No such file"), "{e}");

    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0xabu8; 10000]).unwrap();
    let e = open_default(&junk).err().unwrap();
    assert!(matches!(e, Error::NotAHeap { .. }), "{e}");
    assert!(e.to_string().contains("junk"));

    let short = dir.join("short");
    std::fs::write(&short, b"FAMS").unwrap();
    assert!(matches!(open_default(&short).err().unwrap(), Error::NotAHeap { .. }));

    let path = dir.join("h");
    format(&path, 1 << 20, None);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096 + 4096).unwrap();
    let e = open_default(&path).err().unwrap();
    assert!(matches!(e, Error::BadHeap { .. }) && e.to_string().contains("truncated"), "{e}");
}

#[test]
fn format_refuses_to_overwrite_and_refuses_a_tiny_log() {
    let dir = TempDir::new("fmt");
    let path = dir.join("h");
    format(&path, 1 << 20, None);
    let e = Heap::format(&FormatOptions::new(&path, 1 << 20)).err().unwrap().to_string();
    assert!(e.contains("exists"), "{e}");
    let mut f = FormatOptions::new(dir.join("h2"), 1 << 20);
    f.log_size_bytes = Some(8192);
    let e = Heap::format(&f).err().unwrap();
    assert!(matches!(e, Error::BadLogDevice { .. }), "{e}");
    assert!(!dir.join("h2").exists(), "a failed format leaves nothing behind");
}

#[test]
fn a_locked_heap_is_refused_naming_the_holder() {
    let dir = TempDir::new("lock");
    let path = dir.join("h");
    format(&path, 1 << 20, None);
    let _h = open_default(&path).unwrap();
    let e = open_default(&path).err().unwrap();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert!(e.to_string().contains(&std::process::id().to_string()), "{e}");
}

#[test]
fn a_taken_base_address_is_a_clear_error() {
    let dir = TempDir::new("addr");
    let a = dir.join("a");
    let b = dir.join("b");
    let mut f = FormatOptions::new(&a, 1 << 20);
    f.base_addr = Some(0x3300_0000_0000);
    Heap::format(&f).unwrap();
    f.heap_path = b.clone();
    Heap::format(&f).unwrap();
    let _ha = open_default(&a).unwrap();
    let e = open_default(&b).err().unwrap();
    assert!(matches!(e, Error::AddressTaken { .. }), "{e}");
}

#[test]
fn a_log_of_another_heap_or_a_missing_or_truncated_log_is_refused() {
    let dir = TempDir::new("logs");
    let a = dir.join("a");
    let b = dir.join("b");
    format(&a, 1 << 20, None);
    format(&b, 1 << 20, None);
    let e = Heap::open(&a, &HeapOptions { log_path: Some(log_of(&b)), ..HeapOptions::default() }).err().unwrap();
    assert!(matches!(e, Error::LogMismatch { .. }), "{e}");

    std::fs::rename(log_of(&a), dir.join("moved")).unwrap();
    let e = open_default(&a).err().unwrap();
    assert!(matches!(e, Error::BadLogDevice { .. }) && e.to_string().contains("missing"), "{e}");
    std::fs::rename(dir.join("moved"), log_of(&a)).unwrap();
    open_default(&a).unwrap();

    let f = std::fs::OpenOptions::new().write(true).open(log_of(&a)).unwrap();
    f.set_len(1 << 20).unwrap();
    let e = open_default(&a).err().unwrap();
    assert!(matches!(e, Error::BadLogDevice { .. }) && e.to_string().contains("truncated"), "{e}");
}

#[test]
fn one_damaged_superblock_is_survived_two_are_reported() {
    let dir = TempDir::new("sb");
    let path = heap_with_log_records(&dir, 5);
    let log = std::fs::OpenOptions::new().read(true).write(true).open(log_of(&path)).unwrap();
    // Find the current slot (the one recovery would use) and damage the *other* one first.
    let mut a = vec![0u8; 4096];
    log.read_at(&mut a, 0).unwrap();
    let current_is_a = fams::log_format::Superblock::decode(&a).is_ok();
    let other = if current_is_a { 4096 } else { 0 };
    log.write_all_at(&[0x55; 64], other).unwrap();
    {
        let h = open_default(&path).unwrap();
        assert_eq!(counter(&h), 5);
    }
    // Opening wrote a new superblock into the damaged slot; now damage both.
    log.write_all_at(&[0x55; 64], 0).unwrap();
    log.write_all_at(&[0x55; 64], 4096).unwrap();
    let e = open_default(&path).err().unwrap();
    assert!(matches!(e, Error::CorruptSuperblock { .. }), "{e}");
    assert!(e.to_string().contains(".log"));
}

#[test]
fn a_torn_last_record_is_dropped_and_the_rest_replayed() {
    let dir = TempDir::new("torn");
    let path = heap_with_log_records(&dir, 6);
    let at = record_offset(&log_of(&path), 6);
    let log = std::fs::OpenOptions::new().write(true).open(log_of(&path)).unwrap();
    // Zero part of its payload, as a write torn at a sector boundary would.
    log.write_all_at(&[0u8; 100], at + 80).unwrap();
    let h = open_default(&path).unwrap();
    assert_eq!(counter(&h), 5);
    let r = h.stats().recovery;
    assert_eq!(r.records_replayed, 5);
    assert!(r.torn_tail.unwrap().contains("LSN 6"));
}

/// A record whose header checksum fails at the end of replay (a torn header write): the report
/// says at which offset and why replay stopped, not just that it did.
#[test]
fn a_torn_record_header_is_named_in_the_report() {
    let dir = TempDir::new("tornhdr");
    let path = heap_with_log_records(&dir, 4);
    let at = record_offset(&log_of(&path), 4);
    let log = std::fs::OpenOptions::new().write(true).open(log_of(&path)).unwrap();
    // Inside the header (the LSN field): the magic is intact, the header checksum is not.
    log.write_all_at(&[0xee; 4], at + 8).unwrap();
    let h = open_default(&path).unwrap();
    assert_eq!(counter(&h), 3);
    let why = h.stats().recovery.torn_tail.expect("the report says why replay stopped");
    assert!(why.contains(&format!("offset {at}")) && why.contains("header checksum"), "{why}");
}

/// The heap file and its log each record the log's size; a disagreement (a log file replaced by
/// one of the same heap but another size, or a damaged header) is refused by name.
#[test]
fn a_log_whose_size_disagrees_with_the_heap_header_is_refused() {
    let dir = TempDir::new("logsize");
    let path = heap_with_log_records(&dir, 2);
    let log = std::fs::OpenOptions::new().read(true).write(true).open(log_of(&path)).unwrap();
    for slot in [0u64, 4096] {
        let mut b = vec![0u8; 4096];
        log.read_at(&mut b, slot).unwrap();
        if let Ok(mut sb) = fams::log_format::Superblock::decode(&b) {
            sb.log_size -= 4096;
            sb.area_end = sb.area_end.min(sb.log_size);
            sb.written_limit_bytes = sb.written_limit_bytes.min(sb.capacity_bytes());
            sb.encode(&mut b);
            log.write_all_at(&b, slot).unwrap();
        }
    }
    let Err(e) = open_default(&path) else { panic!("the sizes disagree") };
    assert!(matches!(e, Error::LogMismatch { .. }) && e.to_string().contains("bytes"), "{e}");
}

#[test]
fn damage_followed_by_later_commits_is_media_corruption_and_salvage_says_what_is_lost() {
    let dir = TempDir::new("corrupt");
    let path = heap_with_log_records(&dir, 8);
    let at = record_offset(&log_of(&path), 3);
    let log = std::fs::OpenOptions::new().write(true).open(log_of(&path)).unwrap();
    // Damage the payload of LSN 3; LSN 4..8 were written by later device writes.
    log.write_all_at(&[0xff; 8], at + 100).unwrap();
    let e = open_default(&path).err().unwrap();
    assert!(matches!(e, Error::MediaCorruption { lsn: 3, .. }), "{e}");
    assert!(e.to_string().contains("salvage"), "{e}");
    // Nothing was changed by the refusal: inspect still sees the same damage.
    let i = fams::inspect::inspect(&path, None).unwrap();
    assert!(i.pending.unwrap().salvaged.is_some());
    let h = Heap::open(&path, &HeapOptions { salvage: true, ..HeapOptions::default() }).unwrap();
    assert_eq!(counter(&h), 2);
    assert!(h.stats().recovery.salvaged.unwrap().contains("LSN 3"));
    drop(h);
    // After salvage the heap works normally again.
    let mut h = open_default(&path).unwrap();
    assert_eq!(counter(&h), 2);
    h.bytes_mut()[0..8].copy_from_slice(&100u64.to_le_bytes());
    h.commit().unwrap();
    drop(h);
    assert_eq!(counter(&open_default(&path).unwrap()), 100);
}

#[test]
fn random_garbage_in_the_log_never_panics_and_never_applies_foreign_bytes() {
    let dir = TempDir::new("garbage");
    let path = heap_with_log_records(&dir, 4);
    let pristine_heap = std::fs::read(&path).unwrap();
    let pristine_log = std::fs::read(log_of(&path)).unwrap();
    let mut rng = Rng::new(11);
    for round in 0..200 {
        std::fs::write(&path, &pristine_heap).unwrap();
        let mut log = pristine_log.clone();
        // Scribble over random spots: headers, payloads, superblocks, beyond the tail.
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(log.len() as u64 - 64) as usize;
            let len = 1 + rng.below(64) as usize;
            for b in &mut log[at..at + len] {
                *b = rng.next_u64() as u8;
            }
        }
        std::fs::write(log_of(&path), &log).unwrap();
        match open_default(&path) {
            Ok(h) => {
                let c = counter(&h);
                assert!(c <= 4, "round {round}: counter {c}");
                // The replayed prefix is there, and no byte came from anywhere but a commit.
                // (The heap file already holds all four commits, written back before the crash,
                // so damage to the *last* durable record, which looks like a torn tail, leaves
                // its bytes in place: media corruption of the newest record cannot be told from a
                // torn write. A power cut cannot cause it: a torn record was never written back.)
                for i in 1..=4u64 {
                    let got = h.bytes()[PAGE_SIZE * i as usize];
                    assert!(got == i as u8 || (i > c && got == 0), "round {round}, counter {c}, page {i}: {got}");
                }
                assert!(h.bytes()[PAGE_SIZE * 5..].iter().all(|&b| b == 0), "round {round}: bytes outside any commit");
            }
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains(".log") || s.contains("/h"), "round {round}: error names no file: {s}");
            }
        }
    }
}

#[test]
fn a_heap_or_log_on_tmpfs_is_refused() {
    let Some(shm) =
        ["/dev/shm", "/run"].into_iter().map(std::path::Path::new).find(|p| fams::io::volatile_filesystem(p).is_some())
    else {
        fams_tests::skip("no tmpfs mounted at /dev/shm or /run");
        return;
    };
    let heap = shm.join(format!("fams-test-{}.heap", std::process::id()));
    let e = Heap::format(&FormatOptions::new(&heap, 1 << 20)).err().unwrap().to_string();
    assert!(e.contains("tmpfs") && e.contains("power cut"), "{e}");
    assert!(!heap.exists());
    let dir = TempDir::new("tmpfs-log");
    let mut f = FormatOptions::new(dir.join("h"), 1 << 20);
    f.log_path = Some(shm.join(format!("fams-test-{}.log", std::process::id())));
    let e = Heap::format(&f).err().unwrap().to_string();
    assert!(e.contains("the log is on tmpfs"), "{e}");
}
