//! Make seed inputs for the fuzz targets from real logs written by the library.
//!
//! `cargo run --release --example make_seeds -- OUT_DIR [WORK_DIR]` (from tests/fuzz) formats a
//! few small heaps in WORK_DIR (default /var/tmp; O_DIRECT needs a real filesystem), commits to
//! them in several patterns, "crashes" (the heap is leaked: no checkpoint, no clean close), and
//! writes into OUT_DIR/<target>/:
//! - recover_from_bytes: each log in the *area* shape (selector 0, the tail block, LSN delta 0,
//!   then the record area, trailing zero blocks trimmed) and in the *raw* shape (selector 1, then
//!   the whole log); see `fams_fuzz::build`;
//! - decode_superblock: both superblock slots of each log;
//! - decode_record: every record of each log (its whole `total_len` bytes).

use fams::log_format::{RecordHeader, AREA_START, BLOCK, LOG_SIZE_MIN};
use fams::{FormatOptions, Heap, HeapOptions};
use std::path::{Path, PathBuf};

const PAGE: usize = fams::PAGE_SIZE;

fn fill(h: &mut Heap, page: usize, off: usize, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in &mut h.bytes_mut()[page * PAGE + off..page * PAGE + off + len] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn no_checkpoints() -> HeapOptions {
    HeapOptions { checkpoint_threshold_bytes: Some(u64::MAX), ..HeapOptions::default() }
}

struct Made {
    name: &'static str,
    log: Vec<u8>,
}

fn formatted(work: &Path, name: &str) -> PathBuf {
    let path = work.join(format!("fams-seed-{}-{name}.heap", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}.log", path.display()));
    let mut f = FormatOptions::new(&path, fams_fuzz::FUZZ_HEAP_PAGES * PAGE as u64);
    f.log_size_bytes = Some(LOG_SIZE_MIN);
    Heap::format(&f).expect("format");
    path
}

/// Leave the heap as a crash would (no checkpoint, no close), read its log, remove its files.
fn crash_and_read(h: Heap, path: &Path) -> Vec<u8> {
    std::mem::forget(h);
    let log_path = format!("{}.log", path.display());
    let log = std::fs::read(&log_path).expect("read log");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&log_path);
    log
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: make_seeds OUT_DIR [WORK_DIR]"));
    let work = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    let mut made = Vec::new();

    // One small commit.
    let p = formatted(&work, "one");
    let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
    h.bytes_mut()[0..8].copy_from_slice(&1u64.to_le_bytes());
    h.commit().unwrap();
    made.push(Made { name: "one", log: crash_and_read(h, &p) });

    // Five synchronous commits of mixed sizes (one record per device write).
    let p = formatted(&work, "five");
    let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
    for i in 1..=5u64 {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        let len = [3, 100, PAGE, 700, 1][i as usize - 1];
        fill(&mut h, i as usize, PAGE - len, len, i);
        h.commit().unwrap();
    }
    made.push(Made { name: "five", log: crash_and_read(h, &p) });

    // Several commits in flight at once: records grouped into one device write.
    let p = formatted(&work, "group");
    let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
    let mut last = None;
    for i in 1..=6u64 {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        fill(&mut h, 1, 64 * i as usize, 64, i);
        last = Some(h.commit_async().unwrap());
    }
    h.wait(last.unwrap()).unwrap();
    made.push(Made { name: "group", log: crash_and_read(h, &p) });

    // Enough whole pages to fill the small log several times: forced checkpoints move the tail
    // and the records wrap around the end of the area.
    for (name, commits) in [("wrap40", 40u64), ("wrap41", 41), ("wrap42", 42)] {
        let p = formatted(&work, name);
        let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
        for i in 1..=commits {
            h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
            fill(&mut h, 1 + i as usize % 15, 0, PAGE, i);
            fill(&mut h, 1 + (i as usize * 7) % 15, 0, PAGE, i + 100);
            h.commit().unwrap();
        }
        made.push(Made { name, log: crash_and_read(h, &p) });
    }

    // A clean close, then a new epoch whose records follow stale ones of the old epoch.
    let p = formatted(&work, "reopened");
    let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
    for i in 1..=3u64 {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        fill(&mut h, 2, 0, 64, i);
        h.commit().unwrap();
    }
    drop(h);
    let mut h = Heap::open(&p, &no_checkpoints()).unwrap();
    for i in 4..=5u64 {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        fill(&mut h, 3, 100, 200, i);
        h.commit().unwrap();
    }
    made.push(Made { name: "reopened", log: crash_and_read(h, &p) });

    for t in ["recover_from_bytes", "decode_superblock", "decode_record"] {
        std::fs::create_dir_all(out.join(t)).unwrap();
    }
    for m in &made {
        let sb = fams_fuzz::current_superblock(&m.log).expect("a valid superblock");
        let mut records = Vec::new();
        for at in (AREA_START as usize..m.log.len()).step_by(BLOCK) {
            if let Ok(h) = RecordHeader::decode(&m.log[at..at + BLOCK], sb.heap_id, sb.epoch) {
                if at + h.total_len as usize <= m.log.len() {
                    records.push((at, h));
                }
            }
        }
        let summary: Vec<String> = records
            .iter()
            .map(|(at, h)| format!("LSN {} group {} at {at} len {}", h.lsn, h.group_first_lsn, h.total_len))
            .collect();
        eprintln!("{}: {sb:?}\n  {}", m.name, summary.join("\n  "));

        // Area shape: the record area, trailing zero blocks trimmed.
        let area = &m.log[AREA_START as usize..];
        let used = area.chunks(BLOCK).rposition(|b| b.iter().any(|&x| x != 0)).map_or(1, |i| i + 1);
        let records_end = records.iter().map(|(at, h)| (at + h.total_len as usize - AREA_START as usize) / BLOCK);
        let used = records_end.fold(used, usize::max);
        let tail_block = ((sb.tail_offset - AREA_START) / BLOCK as u64) as u8;
        let mut seed = vec![0u8, tail_block, 0];
        seed.extend_from_slice(&area[..used * BLOCK]);
        std::fs::write(out.join("recover_from_bytes").join(format!("area-{}", m.name)), &seed).unwrap();
        // Raw shape: the whole log.
        let mut seed = vec![1u8];
        seed.extend_from_slice(&m.log);
        std::fs::write(out.join("recover_from_bytes").join(format!("raw-{}", m.name)), &seed).unwrap();

        for (slot, name) in [(0, "a"), (1, "b")] {
            let b = &m.log[slot * BLOCK..(slot + 1) * BLOCK];
            std::fs::write(out.join("decode_superblock").join(format!("{}-{name}", m.name)), b).unwrap();
        }
        for (at, h) in &records {
            let b = &m.log[*at..*at + h.total_len as usize];
            std::fs::write(out.join("decode_record").join(format!("{}-lsn{}", m.name, h.lsn)), b).unwrap();
        }
    }
}
