//! A bounded property test of recovery against damage to a real log.
//!
//! A child process commits N times synchronously (so every record is its own device write, its
//! own group) with checkpoints disabled, then crashes: every record stays in the log. The parent
//! keeps the heap file as it was *before* the child ran (right after format), so replaying any
//! prefix of the log onto it gives exactly the state after that many commits; a model of the
//! child's writes gives the same states independently.
//!
//! Each case damages the log outside the superblock slots — bit flips, spans of zeros, 0xff or
//! random bytes, inside a record's checksummed bytes, in a record's padding, past the last
//! record, or over a whole suffix of records — and runs `fams::sim::recover_images`. With `j` the
//! first record (in LSN order) whose checksummed bytes changed (N+1 if none), recovery must:
//! - replay exactly records 1..j-1 and leave the heap in the state after commit j-1, **or**
//! - refuse with `Error::MediaCorruption { lsn: j, .. }`, which it must do exactly when a record
//!   after j still has an intact header: that record was written by a later device write, and the
//!   next group is only written once the previous one is durable, so record j had been durable
//!   and is damaged, not torn. (The header alone decides: the recovery scan reads headers only,
//!   and an intact header of a later group is proof enough.) With every later record damaged the
//!   damage is indistinguishable from a torn tail, and the longest valid prefix is the answer; in
//!   particular damage to the last record alone is always a torn tail.
//!
//! With `salvage` the same cases must replay 1..j-1 and say they salvaged exactly when
//! MediaCorruption would have been returned. A successful recovery must write only a new
//! superblock (tail at record j, next epoch), and recovering its output again must change nothing.
//!
//! `FAMS_PROP_SEED` and `FAMS_PROP_CASES` override the seed and the number of cases; a failure
//! prints the seed and the case (and the damage applied) to replay it.

use fams::log_format::{RecordHeader, Superblock, AREA_START, BLOCK, RECORD_HEADER_BYTES};
use fams::sim::recover_images;
use fams::{Error, HeapOptions, PAGE_SIZE};
use fams_tests::*;
use std::path::PathBuf;

const COMMITS: u64 = 12;
const HEAP_PAGES: usize = 64;
const HEAP_BYTES: u64 = (HEAP_PAGES * PAGE_SIZE) as u64;
const LOG_BYTES: u64 = 1 << 20;
const HEADER: usize = fams::heap_file::HEADER_BYTES as usize;
const DEFAULT_SEED: u64 = 0x00fa_4510_9e11;
const DEFAULT_CASES: u64 = 2000;

/// Commit `i`'s writes, applied to the heap image `heap` (the mapped heap, without the file
/// header): the commit number in bytes 0..8, and a few runs of bytes (sometimes whole pages, so
/// some records span several blocks) that depend on `i`.
fn apply_commit(heap: &mut [u8], i: u64) {
    heap[0..8].copy_from_slice(&i.to_le_bytes());
    let mut rng = Rng::new(0xc0_33_17 ^ i.wrapping_mul(0x1_0000_0001));
    let pages = (heap.len() / PAGE_SIZE) as u64;
    for _ in 0..1 + rng.below(3) {
        let page = 1 + rng.below(pages - 1) as usize;
        let len = match rng.below(4) {
            0 => PAGE_SIZE,
            1 => 1 + rng.below(2000) as usize,
            _ => 1 + rng.below(64) as usize,
        };
        let off = rng.below((PAGE_SIZE - len + 1) as u64) as usize;
        for b in &mut heap[page * PAGE_SIZE + off..page * PAGE_SIZE + off + len] {
            *b = rng.next_u64() as u8;
        }
    }
}

#[test]
fn child_commits_records() {
    if !is_child() {
        return;
    }
    let path = PathBuf::from(std::env::var("HEAP").unwrap());
    let opts = HeapOptions { checkpoint_threshold_bytes: Some(u64::MAX), ..HeapOptions::default() };
    let mut h = fams::Heap::open(&path, &opts).unwrap();
    for i in 1..=COMMITS {
        apply_commit(h.bytes_mut(), i);
        h.commit().unwrap();
    }
    crash_exit();
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    off: usize,
    /// Header and payload: the bytes the two checksums cover.
    covered: usize,
    total: usize,
}

/// The current superblock (what recovery would pick).
fn current_superblock(log: &[u8]) -> Superblock {
    let a = Superblock::decode(&log[..BLOCK]);
    let b = Superblock::decode(&log[BLOCK..2 * BLOCK]);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.sequence >= b.sequence {
                a
            } else {
                b
            }
        }
        (Ok(s), Err(_)) | (Err(_), Ok(s)) => s,
        (Err(a), Err(b)) => panic!("no valid superblock: {a}; {b}"),
    }
}

fn counter(heap_image: &[u8]) -> u64 {
    u64::from_le_bytes(heap_image[HEADER..HEADER + 8].try_into().unwrap())
}

struct Fixture {
    log: Vec<u8>,
    heap: Vec<u8>,
    sb: Superblock,
    recs: Vec<Rec>,
    /// Heap-file image after commits 0..=N.
    states: Vec<Vec<u8>>,
    /// End of the last record.
    end: usize,
}

fn fixture() -> (TempDir, Fixture) {
    let dir = TempDir::new("logprop");
    let path = dir.join("h");
    format(&path, HEAP_BYTES, Some(LOG_BYTES));
    // The heap file before any commit: replaying a prefix onto it gives that prefix's state.
    let heap = std::fs::read(&path).unwrap();
    assert_eq!(heap.len(), HEADER + HEAP_BYTES as usize);
    assert!(heap[HEADER..].iter().all(|&b| b == 0), "a fresh heap is zeros");
    run_child("child_commits_records", &[("HEAP", path.display().to_string())]);
    let log = std::fs::read(format!("{}.log", path.display())).unwrap();
    assert_eq!(log.len() as u64, LOG_BYTES);
    let after_child = std::fs::read(&path).unwrap();
    assert_eq!(after_child[..HEADER], heap[..HEADER], "the child changed the heap header");

    // Find the records: nothing was checkpointed, so they follow each other from the tail.
    let sb = current_superblock(&log);
    assert_eq!((sb.tail_offset, sb.tail_lsn), (AREA_START, 1), "the child's log was checkpointed: {sb:?}");
    let mut recs = Vec::new();
    let mut at = sb.tail_offset as usize;
    for lsn in 1..=COMMITS {
        let h = RecordHeader::decode(&log[at..at + BLOCK], sb.heap_id, sb.epoch)
            .unwrap_or_else(|e| panic!("no record LSN {lsn} at {at}: {e:?}"));
        assert_eq!(h.lsn, lsn);
        assert_eq!(&log[at..at + 4], b"FAMR");
        assert_eq!(u64::from_le_bytes(log[at + 8..at + 16].try_into().unwrap()), lsn);
        assert_eq!(u32::from_le_bytes(log[at + 48..at + 52].try_into().unwrap()), h.total_len);
        assert_eq!(u32::from_le_bytes(log[at + 52..at + 56].try_into().unwrap()), h.payload_len);
        assert_eq!(h.group_first_lsn, lsn, "synchronous commits: every record is its own group");
        recs.push(Rec { off: at, covered: RECORD_HEADER_BYTES + h.payload_len as usize, total: h.total_len as usize });
        at += h.total_len as usize;
    }
    let end = at;
    assert!(RecordHeader::decode(&log[end..end + BLOCK], sb.heap_id, sb.epoch).is_err(), "more records than commits");
    assert!(recs.iter().any(|r| r.total > BLOCK), "no multi-block record: the model writes too little");

    // The model: the state after each commit.
    let mut states = vec![heap.clone()];
    for i in 1..=COMMITS {
        let mut s = states.last().unwrap().clone();
        apply_commit(&mut s[HEADER..], i);
        states.push(s);
    }

    // Recovery of each prefix (later records' first blocks zeroed) gives the model's state.
    for k in 0..=COMMITS as usize {
        let mut l = log.clone();
        for r in &recs[k..] {
            l[r.off..r.off + BLOCK].fill(0);
        }
        let (res, heap_after, _) = recover_images(l, heap.clone(), false);
        let report = res.unwrap_or_else(|e| panic!("prefix {k}: {e}"));
        assert_eq!(report.records_replayed, k as u64, "prefix {k}");
        assert_eq!(counter(&heap_after), k as u64, "prefix {k}");
        assert!(heap_after == states[k], "prefix {k}: the replayed heap differs from the model");
    }
    (dir, Fixture { log, heap, sb, recs, states, end })
}

/// A random span inside [lo, hi): mostly short, sometimes several blocks.
fn span(rng: &mut Rng, lo: usize, hi: usize) -> (usize, usize) {
    let room = (hi - lo) as u64;
    let cap = match rng.below(4) {
        0 => 1,
        1 => 16,
        2 => 512,
        _ => 3 * BLOCK as u64,
    };
    let len = 1 + rng.below(cap.min(room)) as usize;
    let start = lo + rng.below(room - len as u64 + 1) as usize;
    (start, len)
}

/// Damage `log[start..start+len]`; returns a description.
fn damage(rng: &mut Rng, log: &mut [u8], start: usize, len: usize) -> String {
    let s = &mut log[start..start + len];
    match rng.below(4) {
        0 => {
            let flips = 1 + rng.below(3);
            for _ in 0..flips {
                let at = rng.below(len as u64) as usize;
                s[at] ^= 1 << rng.below(8);
            }
            format!("{flips} bit flip(s) in {start}+{len}")
        }
        1 => {
            s.fill(0);
            format!("zeros over {start}+{len}")
        }
        2 => {
            s.fill(0xff);
            format!("0xff over {start}+{len}")
        }
        _ => {
            for b in s.iter_mut() {
                *b = rng.next_u64() as u8;
            }
            format!("random bytes over {start}+{len}")
        }
    }
}

/// Damage the log at random places (never the superblock slots); returns what was done.
fn damage_case(rng: &mut Rng, f: &Fixture, log: &mut [u8]) -> Vec<String> {
    let n = match rng.below(4) {
        0 | 1 => 1,
        2 => 2,
        _ => 3 + rng.below(3),
    };
    let mut done = Vec::new();
    for _ in 0..n {
        let r = f.recs[rng.below(f.recs.len() as u64) as usize];
        match rng.below(20) {
            // Checksummed bytes of a record.
            0..=6 => {
                let (s, l) = span(rng, r.off, r.off + r.covered);
                done.push(damage(rng, log, s, l));
            }
            // Its header only.
            7..=9 => {
                let (s, l) = span(rng, r.off, r.off + RECORD_HEADER_BYTES);
                done.push(damage(rng, log, s, l));
            }
            // Its padding (or, with none, its checksummed bytes).
            10..=12 => {
                let (lo, hi) =
                    if r.covered < r.total { (r.off + r.covered, r.off + r.total) } else { (r.off, r.off + r.covered) };
                let (s, l) = span(rng, lo, hi);
                done.push(damage(rng, log, s, l));
            }
            // Past the last record.
            13..=14 => {
                let (s, l) = span(rng, f.end, log.len());
                done.push(damage(rng, log, s, l));
            }
            // Anywhere outside the superblocks.
            15..=16 => {
                let (s, l) = span(rng, AREA_START as usize, log.len());
                done.push(damage(rng, log, s, l));
            }
            // A whole suffix of records: the first somewhere in its checksummed bytes, the later
            // ones mostly in their headers (then no later record proves the first was durable).
            _ => {
                let from = rng.below(f.recs.len() as u64) as usize;
                let header_only = rng.below(4) != 0;
                for (i, r) in f.recs[from..].iter().enumerate() {
                    let hi = if i > 0 && header_only { RECORD_HEADER_BYTES } else { r.covered };
                    let (s, l) = span(rng, r.off, r.off + hi);
                    done.push(damage(rng, log, s, l));
                }
            }
        }
    }
    done
}

#[derive(Default, Debug)]
struct Tally {
    intact: u64,
    torn_tail: u64,
    torn_before_last: u64,
    media_corruption: u64,
    salvaged: u64,
}

#[test]
fn recovery_replays_the_longest_valid_prefix_or_refuses_on_proven_corruption() {
    if is_child() {
        return;
    }
    let started = std::time::Instant::now();
    let (_dir, f) = fixture();
    let seed = std::env::var("FAMS_PROP_SEED").ok().map(|s| s.parse().expect("FAMS_PROP_SEED")).unwrap_or(DEFAULT_SEED);
    let cases =
        std::env::var("FAMS_PROP_CASES").ok().map(|s| s.parse().expect("FAMS_PROP_CASES")).unwrap_or(DEFAULT_CASES);
    let n = COMMITS as usize;
    let mut tally = Tally::default();
    for case in 0..cases {
        let mut rng = Rng::new(seed ^ case.wrapping_mul(0x9e37_79b9));
        let mut log = f.log.clone();
        let done = damage_case(&mut rng, &f, &mut log);
        let salvage_too = rng.below(2) == 0;
        let changed = |r: &Rec, len: usize| log[r.off..r.off + len] != f.log[r.off..r.off + len];
        // j: the first record (1-based) whose checksummed bytes changed.
        let j = f.recs.iter().position(|r| changed(r, r.covered)).map_or(n + 1, |i| i + 1);
        // The first record after j whose header is intact: proof that j had been durable.
        let later = (j < n).then(|| (j + 1..=n).find(|&r| !changed(&f.recs[r - 1], RECORD_HEADER_BYTES))).flatten();
        let ctx = format!("seed {seed} case {case}: j = {j}, later intact = {later:?}, damage: {done:?}");

        let (res, heap_after, log_after) = recover_images(log.clone(), f.heap.clone(), false);
        match (&res, later) {
            (Ok(report), None) => {
                assert_eq!(report.records_replayed, j as u64 - 1, "{ctx}: {report:?}");
                assert_eq!(report.next_lsn, j as u64, "{ctx}: {report:?}");
                assert!(report.salvaged.is_none(), "{ctx}: {report:?}");
                assert_eq!(counter(&heap_after), j as u64 - 1, "{ctx}");
                assert!(heap_after == f.states[j - 1], "{ctx}: the heap is not the state after commit {}", j - 1);
                check_new_superblock(&f, &log, &log_after, j, &ctx);
                // Recovering the result again changes nothing: the dropped records belong to the
                // old epoch now. If the first recovery left its replayed stretch in the log, the
                // second replays it again (same bytes), syncs and moves the tail to j.
                let stretch = current_superblock(&log_after).has_replayed_stretch();
                let (again, heap_again, log_again) = recover_images(log_after.clone(), heap_after.clone(), false);
                let again = again.unwrap_or_else(|e| panic!("{ctx}: second recovery: {e}"));
                let replayed_again = if stretch { j as u64 - 1 } else { 0 };
                assert_eq!(again.records_replayed, replayed_again, "{ctx}: second recovery {again:?}");
                assert!(heap_again == heap_after, "{ctx}: the second recovery changed the heap");
                let sb_again = current_superblock(&log_again);
                assert!(!sb_again.has_replayed_stretch(), "{ctx}: a stretch after a second recovery {sb_again:?}");
                assert_eq!(sb_again.tail_lsn, j as u64, "{ctx}: {sb_again:?}");
                match j {
                    _ if j == n + 1 => tally.intact += 1,
                    _ if j == n => tally.torn_tail += 1,
                    _ => tally.torn_before_last += 1,
                }
            }
            (Err(Error::MediaCorruption { lsn, offset, later_lsn, .. }), Some(later)) => {
                assert_eq!(*lsn, j as u64, "{ctx}: {res:?}");
                assert_eq!(*offset, f.recs[j - 1].off as u64, "{ctx}: {res:?}");
                assert_eq!(*later_lsn, later as u64, "{ctx}: {res:?}");
                assert!(log_after == log, "{ctx}: a refused recovery changed the log");
                tally.media_corruption += 1;
            }
            (Ok(report), Some(later)) => panic!(
                "{ctx}: recovery dropped commits {j}.. although record {later} (a later device write) is intact: {report:?}"
            ),
            (Err(e), _) => panic!("{ctx}: unexpected error: {e}"),
        }
        if j == n {
            assert!(res.is_ok(), "{ctx}: damage to the last record alone must be a torn tail");
        }

        if salvage_too && j <= n {
            let (res, heap_after, log_after) = recover_images(log.clone(), f.heap.clone(), true);
            let report = res.unwrap_or_else(|e| panic!("{ctx}: salvage failed: {e}"));
            assert_eq!(report.records_replayed, j as u64 - 1, "{ctx}: salvage {report:?}");
            assert_eq!(report.salvaged.is_some(), later.is_some(), "{ctx}: salvage {report:?}");
            if let Some(s) = &report.salvaged {
                assert!(s.contains(&format!("LSN {j} ")), "{ctx}: salvage names the first lost LSN: {s}");
                tally.salvaged += 1;
            }
            assert!(heap_after == f.states[j - 1], "{ctx}: salvage: the heap is not the state after commit {}", j - 1);
            check_new_superblock(&f, &log, &log_after, j, &ctx);
            // A salvage that dropped records moved the tail; one that dropped nothing may have
            // left its replayed stretch for the next open to replay again.
            let stretch = current_superblock(&log_after).has_replayed_stretch();
            assert!(!(stretch && report.salvaged.is_some()), "{ctx}: a salvage kept a stretch");
            let (again, heap_again, _) = recover_images(log_after, heap_after.clone(), false);
            let again = again.unwrap_or_else(|e| panic!("{ctx}: recovery after salvage: {e}"));
            let replayed_again = if stretch { j as u64 - 1 } else { 0 };
            assert_eq!(again.records_replayed, replayed_again, "{ctx}: recovery after salvage {again:?}");
            assert!(heap_again == heap_after, "{ctx}: recovery after salvage changed the heap");
        }
    }
    eprintln!("{cases} cases (seed {seed}) in {:.1?}: {tally:?}", started.elapsed());
    // Every outcome was reached, or the damage model is not testing what it claims.
    if cases >= 500 {
        assert!(tally.intact > 10 && tally.torn_tail > 10 && tally.torn_before_last > 10, "{tally:?}");
        assert!(tally.media_corruption > 10 && tally.salvaged > 10, "{tally:?}");
    }
}

/// After a successful recovery the log changed only in one superblock slot: the next sequence and
/// epoch, and either the tail at record j (where LSN j is expected next) or — when records were
/// replayed and nothing dropped, the heap file left unsynced — the old tail with the replayed
/// stretch ending at LSN j.
fn check_new_superblock(f: &Fixture, log_in: &[u8], log_after: &[u8], j: usize, ctx: &str) {
    assert!(
        log_after[AREA_START as usize..] == log_in[AREA_START as usize..],
        "{ctx}: recovery changed the record area"
    );
    let sb = current_superblock(log_after);
    assert_eq!(sb.sequence, f.sb.sequence + 1, "{ctx}: {sb:?}");
    assert_eq!(sb.epoch, f.sb.epoch + 1, "{ctx}: {sb:?}");
    if sb.has_replayed_stretch() {
        assert_eq!((sb.tail_lsn, sb.tail_offset), (f.sb.tail_lsn, f.sb.tail_offset), "{ctx}: {sb:?}");
        assert_eq!(sb.replayed_until_lsn, j as u64, "{ctx}: {sb:?}");
    } else {
        assert_eq!(sb.tail_lsn, j as u64, "{ctx}: {sb:?}");
        let tail = if j <= f.recs.len() { f.recs[j - 1].off } else { f.end };
        assert_eq!(sb.tail_offset, tail as u64, "{ctx}: {sb:?}");
    }
    let other = (sb.slot_offset() as usize + BLOCK) % (2 * BLOCK);
    assert!(
        log_after[other..other + BLOCK] == log_in[other..other + BLOCK],
        "{ctx}: the other superblock slot changed"
    );
}
