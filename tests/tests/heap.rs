//! The heap's promises through its public API: commits persist, uncommitted writes do not, both
//! trackers see every write, released pages come back, async commits group, and a crashed
//! process's commits are recovered over a wrapped, checkpointed log.

use fams::{Heap, HeapOptions, TrackerKind, PAGE_SIZE};
use fams_tests::*;

#[test]
fn committed_writes_persist_and_uncommitted_ones_do_not() {
    for tracker in trackers() {
        let dir = TempDir::new("persist");
        let path = dir.join("h");
        format(&path, 1 << 20, None);
        {
            let mut h = open(&path, tracker);
            assert_eq!(h.stats().tracker, tracker.name());
            h.bytes_mut()[0..5].copy_from_slice(b"hello");
            h.bytes_mut()[3 * PAGE_SIZE + 7] = 42;
            h.commit().unwrap();
            h.bytes_mut()[0..5].copy_from_slice(b"HELLO"); // never committed
            h.bytes_mut()[9 * PAGE_SIZE] = 9; // never committed
        }
        let h = open(&path, tracker);
        assert_eq!(&h.bytes()[0..5], b"hello", "{tracker:?}");
        assert_eq!(h.bytes()[3 * PAGE_SIZE + 7], 42);
        assert_eq!(h.bytes()[9 * PAGE_SIZE], 0);
        let s = h.stats();
        assert_eq!(h.base() as u64, h.header().base_addr, "mapped at its fixed base");
        assert!(s.heap_size == 1 << 20);
    }
}

#[test]
fn every_write_is_tracked_and_logged_as_changed_bytes() {
    for tracker in trackers() {
        let dir = TempDir::new("track");
        let path = dir.join("h");
        format(&path, 4 << 20, None);
        let mut h = open(&path, tracker);
        let pages = h.len() / PAGE_SIZE;
        for p in 0..pages {
            h.bytes_mut()[p * PAGE_SIZE + (p % 4000)] = (p as u8) | 1;
        }
        h.commit().unwrap();
        let s = h.stats();
        assert_eq!(s.pages_tracked, pages as u64, "{tracker:?}");
        assert_eq!(s.bytes_changed, pages as u64);
        // One byte per page: logged as a small diff, not whole pages.
        assert_eq!(s.full_page_entries, 0);
        assert!(s.payload_bytes < (pages * 32) as u64, "payload {}", s.payload_bytes);
        // Writing the same value again changes nothing and logs nothing.
        h.bytes_mut()[5 * PAGE_SIZE + 5] = 5 | 1;
        h.commit().unwrap();
        assert_eq!(h.stats().empty_commits, 1);
        drop(h);
        let h = open(&path, tracker);
        for p in 0..pages {
            assert_eq!(h.bytes()[p * PAGE_SIZE + (p % 4000)], (p as u8) | 1, "page {p}");
        }
    }
}

#[test]
fn released_pages_leave_memory_and_later_writes_are_still_tracked() {
    for tracker in trackers() {
        let dir = TempDir::new("release");
        let path = dir.join("h");
        format(&path, 16 << 20, None);
        let mut h = open(&path, tracker);
        let pages = h.len() / PAGE_SIZE;
        for p in 0..pages {
            h.bytes_mut()[p * PAGE_SIZE] = 1;
        }
        h.commit().unwrap();
        let before = h.memory();
        assert!(before.private_bytes >= (pages * PAGE_SIZE) as u64 * 9 / 10, "private {}", before.private_bytes);
        h.bytes_mut()[7 * PAGE_SIZE + 1] = 77; // dirty, not committed: must survive the release
        let kept = h.release_committed().unwrap();
        assert!(kept >= 1);
        let after = h.memory();
        assert!(
            after.private_bytes < before.private_bytes / 10,
            "{tracker:?}: private {} -> {}",
            before.private_bytes,
            after.private_bytes
        );
        assert!(
            after.resident_bytes < before.resident_bytes / 10,
            "{tracker:?}: resident {} -> {}",
            before.resident_bytes,
            after.resident_bytes
        );
        // Released pages read back their committed bytes; the dirty one kept its new byte.
        assert_eq!(h.bytes()[100 * PAGE_SIZE], 1);
        assert_eq!(h.bytes()[7 * PAGE_SIZE + 1], 77);
        // A write to a released page is tracked and committed.
        h.bytes_mut()[100 * PAGE_SIZE + 3] = 33;
        h.commit().unwrap();
        drop(h);
        let h = open(&path, tracker);
        assert_eq!(h.bytes()[100 * PAGE_SIZE + 3], 33, "{tracker:?}: write after release lost");
        assert_eq!(h.bytes()[7 * PAGE_SIZE + 1], 77);
    }
}

#[test]
fn async_commits_are_grouped_durable_in_order_and_persist() {
    let dir = TempDir::new("async");
    let path = dir.join("h");
    format(&path, 1 << 20, None);
    let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
    let mut tickets = Vec::new();
    for i in 0..2000u64 {
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        h.bytes_mut()[PAGE_SIZE * (1 + (i as usize % 200))] = i as u8;
        tickets.push(h.commit_async().unwrap());
    }
    let last = *tickets.last().unwrap();
    h.wait(last).unwrap();
    for t in &tickets {
        assert!(h.is_durable(*t).unwrap(), "ticket {} not durable after a later one", t.lsn());
    }
    assert!(tickets.windows(2).all(|w| w[0] < w[1]));
    let s = h.stats();
    assert_eq!(s.durable_lsn, last.lsn());
    assert!(s.groups < 2000, "{} device writes for 2000 commits: no grouping", s.groups);
    drop(h);
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert_eq!(u64::from_le_bytes(h.bytes()[0..8].try_into().unwrap()), 1999);
    for p in 0..200usize {
        // The last commit touching page 1+p was the largest i < 2000 with i % 200 == p.
        assert_eq!(h.bytes()[PAGE_SIZE * (1 + p)], (1800 + p) as u8);
    }
}

/// Child half of `crash_recovery_over_a_wrapped_checkpointed_log`.
#[test]
fn child_commits_then_crashes() {
    if !is_child() {
        return;
    }
    let path = std::path::PathBuf::from(std::env::var("HEAP").unwrap());
    let tracker: TrackerKind = std::env::var("TRACKER").unwrap().parse().unwrap();
    let commits: u64 = std::env::var("COMMITS").unwrap().parse().unwrap();
    // Checkpoint only when the log is full: a checkpoint is then always followed by the group
    // that needed the room, so the crash always leaves records to replay over a wrapped log.
    let opts =
        HeapOptions { tracker: Some(tracker), checkpoint_threshold_bytes: Some(u64::MAX), ..HeapOptions::default() };
    let mut h = Heap::open(&path, &opts).unwrap();
    let mut rng = Rng::new(3);
    let mut last = None;
    for i in 1..=commits {
        // Mix of small and multi-page commits, some async.
        let n = 1 + rng.below(40) as usize;
        for _ in 0..n {
            let p = 1 + rng.below((h.len() / PAGE_SIZE - 1) as u64) as usize;
            let o = rng.below(4000) as usize;
            h.bytes_mut()[p * PAGE_SIZE + o..p * PAGE_SIZE + o + 64].fill(i as u8);
        }
        h.bytes_mut()[0..8].copy_from_slice(&i.to_le_bytes());
        let t = h.commit_async().unwrap();
        if i % 3 == 0 {
            h.wait(t).unwrap();
        }
        last = Some(t);
    }
    h.wait(last.unwrap()).unwrap();
    let s = h.stats();
    println!("checkpoints={} groups={}", s.checkpoints, s.groups);
    println!("image-crc={}", crc(h.bytes()));
    crash_exit();
}

fn crc(b: &[u8]) -> u64 {
    let mut x = 0xcbf2_9ce4_8422_2325u64;
    for &c in b {
        x = (x ^ c as u64).wrapping_mul(0x100_0000_01b3);
    }
    x
}

#[test]
fn crash_recovery_over_a_wrapped_checkpointed_log() {
    if is_child() {
        return;
    }
    for tracker in trackers() {
        let dir = TempDir::new("wrap");
        let path = dir.join("h");
        // A small log (512 KiB) so 300 commits wrap it many times and force checkpoints.
        format(&path, 2 << 20, Some(512 << 10));
        let out = run_child(
            "child_commits_then_crashes",
            &[
                ("HEAP", path.display().to_string()),
                ("TRACKER", tracker.name().to_string()),
                ("COMMITS", "300".to_string()),
            ],
        );
        let field = |k: &str| -> u64 {
            out.lines()
                .find_map(|l| l.split_once(k).map(|(_, v)| v))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("{k} missing in {out}"))
        };
        assert!(field("checkpoints=") >= 3, "the log should have been checkpointed: {out}");
        let expected = field("image-crc=");
        let h = open(&path, tracker);
        let r = h.stats().recovery;
        assert!(r.records_replayed > 0, "the crash left records to replay");
        assert_eq!(u64::from_le_bytes(h.bytes()[0..8].try_into().unwrap()), 300);
        assert_eq!(crc(h.bytes()), expected, "{tracker:?}: recovered image differs from the crashed process's");
        drop(h);
        // And once more: recovery's own result survives a reopen.
        let h = open(&path, tracker);
        assert_eq!(crc(h.bytes()), expected);
    }
}

/// Child half of `a_page_torn_in_the_heap_file_after_a_checkpoint_is_rebuilt_by_replay`.
#[test]
fn child_changes_one_byte_then_crashes() {
    if !is_child() {
        return;
    }
    let path = std::path::PathBuf::from(std::env::var("HEAP").unwrap());
    let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
    h.bytes_mut()[5 * PAGE_SIZE + 10] = 0x11;
    h.commit().unwrap();
    h.bytes_mut()[5 * PAGE_SIZE + 20] = 0x22; // second touch: a small diff
    h.commit().unwrap();
    let s = h.stats();
    println!("full_images={} diffed_pages={}", s.full_images_after_checkpoint, s.diffed_pages);
    crash_exit();
}

#[test]
fn a_page_torn_in_the_heap_file_after_a_checkpoint_is_rebuilt_by_replay() {
    if is_child() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("torn-heap");
    let path = dir.join("h");
    format(&path, 1 << 20, None);
    {
        let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
        h.bytes_mut()[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0xaa);
        h.commit().unwrap();
    } // clean close: checkpointed, the heap file holds page 5 durably
    let out = run_child("child_changes_one_byte_then_crashes", &[("HEAP", path.display().to_string())]);
    assert!(out.contains("full_images=1"), "the first change after the checkpoint is logged whole: {out}");
    // A power cut while the kernel was writing page 5 back could leave it torn on disk. Replay
    // must not depend on it: scribble over the whole page in the heap file.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x55u8; PAGE_SIZE], 4096 + 5 * PAGE_SIZE as u64).unwrap();
    drop(f);
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    let page = &h.bytes()[5 * PAGE_SIZE..6 * PAGE_SIZE];
    let mut want = vec![0xaau8; PAGE_SIZE];
    want[10] = 0x11;
    want[20] = 0x22;
    let first_bad = page.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "page 5 was not rebuilt from the log (first wrong byte shown)");
}
