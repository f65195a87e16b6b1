//! The heap API an event loop builds on: a durability descriptor it can poll next to its
//! sockets, a handle other threads can wait on, rollback of a failed turn under every tracker
//! (for the plain heap and the object layer), and bounded in-flight commits.
//!
//! No test relies on timing: waits are bounded only so that a bug shows up as a failure rather
//! than a hang.

use fams::alloc::{ObjectHeap, ObjectOptions, PHashMap, PVec};
use fams::{Heap, HeapOptions, RollbackReport, Ticket, TrackerKind, PAGE_SIZE};
use fams_tests::*;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen within milliseconds before calling
/// it a failure.
const PATIENCE: Duration = Duration::from_secs(10);

/// `poll(2)` the fd for readability with a timeout in milliseconds.
fn readable_within(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(&mut p, u16::try_from(timeout_ms).expect("a short timeout")).expect("poll");
    n == 1 && p[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// Poll in short steps until the fd is readable; false after PATIENCE.
fn becomes_readable(fd: BorrowedFd<'_>) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if readable_within(fd, 100) {
            return true;
        }
    }
    false
}

fn heap_at(dir: &TempDir, size: u64) -> std::path::PathBuf {
    let path = dir.join("h");
    format(&path, size, Some(16 << 20));
    path
}

fn fill(h: &mut Heap, pages: std::ops::Range<usize>, byte: u8) {
    h.bytes_mut()[pages.start * PAGE_SIZE..pages.end * PAGE_SIZE].fill(byte);
}

/// Write a distinctive pattern over `pages`, different in every page and every call.
fn scribble(h: &mut Heap, pages: impl IntoIterator<Item = usize>, salt: u8) {
    for p in pages {
        for (i, b) in h.bytes_mut()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].iter_mut().enumerate() {
            *b = (i as u8) ^ (p as u8) ^ salt ^ 0xA5;
        }
    }
}

#[test]
fn durability_fd_fires_once_a_commit_is_durable_and_stays_quiet_after_a_poll() {
    let dir = TempDir::new("ev-fd");
    let path = heap_at(&dir, 1 << 20);
    let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert!(!readable_within(h.durability_fd(), 0), "nothing happened yet");
    for round in 1..=3u8 {
        h.bytes_mut()[round as usize * PAGE_SIZE] = round;
        let t = h.commit_async().unwrap();
        assert!(becomes_readable(h.durability_fd()), "round {round}: the fd never became readable");
        let d = h.poll_durable().unwrap();
        assert!(d >= t, "round {round}: polled {d:?}, committed {t:?}");
        assert!(h.is_durable(t).unwrap());
        assert!(!readable_within(h.durability_fd(), 0), "round {round}: still readable after poll_durable");
        // With nothing committed, nothing advances, and the fd stays quiet.
        assert!(!readable_within(h.durability_fd(), 20), "round {round}: readable with nothing new");
        assert_eq!(h.poll_durable().unwrap(), d);
    }
    // A synchronous commit (which may write its group on this thread) announces it too.
    h.bytes_mut()[9 * PAGE_SIZE] = 9;
    let t = h.commit().unwrap();
    assert!(becomes_readable(h.durability_fd()), "a synchronous commit did not make the fd readable");
    assert!(h.poll_durable().unwrap() >= t);
    assert!(!readable_within(h.durability_fd(), 0));
}

#[test]
fn a_durability_handle_waits_for_a_ticket_on_another_thread() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<fams::DurabilityHandle>();
    let dir = TempDir::new("ev-handle");
    let path = heap_at(&dir, 1 << 20);
    let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
    let handle = h.durability_handle();
    let (ticket_tx, ticket_rx) = mpsc::channel::<Ticket>();
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        for t in ticket_rx {
            let waited = handle.wait(t);
            let durable = handle.is_durable(t);
            done_tx.send((t, waited.is_ok(), durable.unwrap_or(false), handle.durable())).unwrap();
        }
        // The handle's fd and poll work from here too.
        let polled = handle.poll_durable().unwrap();
        assert!(handle.fd().as_raw_fd() >= 0);
        polled
    });
    let mut last = None;
    for i in 0..20usize {
        h.bytes_mut()[i * 64] = i as u8 + 1;
        let t = h.commit_async().unwrap();
        ticket_tx.send(t).unwrap();
        last = Some(t);
        let (got, waited, durable, newest) = done_rx.recv_timeout(PATIENCE).expect("the waiter never returned");
        assert_eq!(got, t);
        assert!(waited && durable, "commit {i}: wait or is_durable failed on the other thread");
        assert!(newest >= t);
    }
    drop(ticket_tx);
    let polled = waiter.join().unwrap();
    assert!(polled >= last.unwrap());
    // A handle outlives the heap: what was committed is durable once the heap is closed.
    let handle = h.durability_handle();
    h.bytes_mut()[5000] = 5;
    let t = h.commit_async().unwrap();
    drop(h);
    handle.wait(t).unwrap();
    assert!(handle.durable() >= t);
}

/// Rollback under one tracker: pages never committed, committed and written back, in flight
/// (commit_async then written again), large rollbacks; then the rolled-back writes never reach
/// the log or the disk.
fn rollback_cases(tracker: TrackerKind) {
    let dir = TempDir::new("ev-rollback");
    let path = heap_at(&dir, 8 << 20);
    let mut h = open(&path, tracker);

    // Pages never committed: back to zeros.
    scribble(&mut h, [0, 1, 7, 300], 1);
    let r = h.rollback().unwrap();
    assert_eq!(r, RollbackReport { pages_dirty: 4, pages_restored: 4, ..Default::default() }, "{tracker:?}");
    assert!(h.bytes()[..400 * PAGE_SIZE].iter().all(|&b| b == 0), "{tracker:?}: never-committed pages");

    // Committed (synchronously, so written back): back to the committed bytes.
    fill(&mut h, 0..20, 0x11);
    h.commit().unwrap();
    let committed = h.bytes().to_vec();
    scribble(&mut h, 0..40, 2);
    h.bytes_mut()[500 * PAGE_SIZE + 3] = 3;
    let r = h.rollback().unwrap();
    assert_eq!((r.pages_dirty, r.pages_restored), (41, 41), "{tracker:?}");
    assert!(h.bytes() == &committed[..], "{tracker:?}: committed pages");

    // Rolling back with nothing written does nothing.
    assert_eq!(h.rollback().unwrap(), RollbackReport::default(), "{tracker:?}");

    // In flight: the rollback must give back the commit_async'd bytes, not the heap file's older
    // ones. Small commits (shadow copies) and a large one (none: rollback may wait for it).
    for (round, pages) in [(0u8, 0..3usize), (1, 10..30), (2, 0..200)] {
        fill(&mut h, pages.clone(), 0x20 + round);
        let t = h.commit_async().unwrap();
        let captured = h.bytes().to_vec();
        scribble(&mut h, pages.start..pages.end + 50, 3 + round);
        let r = h.rollback().unwrap();
        assert_eq!(r.pages_dirty, pages.len() + 50, "{tracker:?} round {round}");
        assert!(h.bytes() == &captured[..], "{tracker:?} round {round}: not the commit_async'd state");
        h.wait(t).unwrap();
    }

    // Large: hundreds of pages, scattered and contiguous, several writes each.
    let before = h.bytes().to_vec();
    let pages = h.len() / PAGE_SIZE;
    scribble(&mut h, (0..pages).step_by(3), 9);
    scribble(&mut h, 1000..1500, 10);
    scribble(&mut h, 1000..1500, 11);
    let r = h.rollback().unwrap();
    assert!(r.pages_restored > 900, "{tracker:?}: {r:?}");
    assert!(h.bytes() == &before[..], "{tracker:?}: large rollback");

    // The rolled-back writes are not logged: the next commit is empty, and a real change after a
    // rollback is logged as just that change.
    let s0 = h.stats();
    h.commit().unwrap();
    let s1 = h.stats();
    assert_eq!(s1.empty_commits, s0.empty_commits + 1, "{tracker:?}: rolled-back pages were logged");
    h.bytes_mut()[2 * PAGE_SIZE + 1] = 0x77;
    scribble(&mut h, [3, 4], 12);
    h.rollback().unwrap();
    h.bytes_mut()[5 * PAGE_SIZE] = 0x55;
    h.commit().unwrap();
    let s2 = h.stats();
    assert_eq!(s2.bytes_changed - s1.bytes_changed, 1, "{tracker:?}: only the byte written after the rollback");
    let expected = h.bytes().to_vec();
    // A write after the last commit, rolled back, then the heap closed: none of it on disk.
    scribble(&mut h, 0..64, 13);
    h.rollback().unwrap();
    assert!(h.stats().rollbacks >= 7);
    drop(h);
    let h = open(&path, tracker);
    assert!(h.bytes() == &expected[..], "{tracker:?}: the reopened heap is not the committed state");
}

#[test]
fn rollback_restores_the_last_captured_state_under_every_tracker() {
    for tracker in trackers() {
        rollback_cases(tracker);
    }
}

#[test]
fn rollback_then_a_crash_recovers_only_committed_state() {
    // The heap is abandoned (no checkpoint), so the reopen replays the log: a rolled-back write
    // that had leaked into a record would show up.
    for tracker in trackers() {
        let dir = TempDir::new("ev-rollback-crash");
        let path = heap_at(&dir, 2 << 20);
        let mut h = open(&path, tracker);
        let mut tickets = Vec::new();
        for i in 0..30usize {
            fill(&mut h, i..i + 2, i as u8 + 1);
            tickets.push(h.commit_async().unwrap());
            scribble(&mut h, i..i + 5, i as u8);
            h.rollback().unwrap();
        }
        let expected = h.bytes().to_vec();
        h.wait(*tickets.last().unwrap()).unwrap();
        scribble(&mut h, 0..100, 0xEE); // never committed, never rolled back
        h.abandon();
        let h = open(&path, tracker);
        assert!(h.bytes() == &expected[..], "{tracker:?}");
        assert!(h.stats().recovery.records_replayed > 0);
    }
}

fams::persistent! {
    struct Root<'h> {
        turns: u64,
        map: PHashMap<'h, u64, PVec<'h, u8>>,
        log: PVec<'h, u64>,
    }
}

fn open_objects(path: &Path, tracker: TrackerKind) -> ObjectHeap {
    ObjectHeap::open(open(path, tracker), &ObjectOptions::schema(1)).unwrap()
}

fn value(i: u64) -> Vec<u8> {
    format!("value-{i}-{}", "v".repeat((i % 50) as usize)).into_bytes()
}

/// The root's contents, as plain data: (counter, map entries, list).
type Contents = (u64, Vec<(u64, Vec<u8>)>, Vec<u64>);

/// The root's contents, as plain data.
fn snapshot(o: &mut ObjectHeap) -> Contents {
    let root: &mut Root = o.root(|_| unreachable!("the root exists")).unwrap();
    let mut map: Vec<(u64, Vec<u8>)> = root.map.iter().map(|(k, v)| (*k, v.to_vec())).collect();
    map.sort();
    (root.turns, map, root.log.to_vec())
}

#[test]
fn object_heap_rollback_undoes_allocations_and_map_inserts() {
    for tracker in trackers() {
        let dir = TempDir::new("ev-objects");
        let path = heap_at(&dir, 16 << 20);
        let mut o = open_objects(&path, tracker);
        {
            let (root, a) =
                o.root_with_alloc(|a| Root { turns: 0, map: PHashMap::new_in(a), log: PVec::new_in(a) }).unwrap();
            for i in 0..200 {
                let mut v = PVec::new_in(a);
                v.extend_from_slice(&value(i));
                root.map.insert(i, v);
                root.log.push(i);
            }
            root.turns = 1;
        }
        o.commit().unwrap();
        let committed = snapshot(&mut o);
        let allocations = o.allocations().unwrap();

        // A failed turn: many inserts (the map grows and rehashes), removals, raw allocations.
        {
            let (root, a) = o.root_with_alloc::<Root>(|_| unreachable!()).unwrap();
            for i in 200..3000 {
                let mut v = PVec::new_in(a);
                v.extend_from_slice(&value(i));
                root.map.insert(i, v);
                root.log.push(i);
            }
            for i in 0..100 {
                root.map.remove(&i);
            }
            root.turns = 999;
        }
        for _ in 0..50 {
            o.alloc(std::alloc::Layout::from_size_align(5000, 16).unwrap(), true).unwrap();
        }
        let r = o.rollback().unwrap();
        assert!(r.pages_restored > 10, "{tracker:?}: {r:?}");
        o.check().unwrap();
        assert_eq!(o.allocations().unwrap(), allocations, "{tracker:?}: allocations since the commit remain");
        assert_eq!(snapshot(&mut o), committed, "{tracker:?}");

        // The allocator works after a rollback.
        {
            let (root, a) = o.root_with_alloc::<Root>(|_| unreachable!()).unwrap();
            for i in 500..700 {
                let mut v = PVec::new_in(a);
                v.extend_from_slice(&value(i));
                root.map.insert(i, v);
            }
            root.turns = 2;
        }
        o.check().unwrap();
        let t = o.commit_async().unwrap();
        let second = snapshot(&mut o);
        // A turn rolled back while the previous commit is in flight.
        {
            let (root, a) = o.root_with_alloc::<Root>(|_| unreachable!()).unwrap();
            root.map.clear();
            root.log.push(7);
            root.map.insert(1, PVec::new_in(a));
        }
        o.rollback().unwrap();
        o.check().unwrap();
        assert_eq!(snapshot(&mut o), second, "{tracker:?}: rollback over an in-flight commit");
        o.wait(t).unwrap();
        assert!(o.is_durable(t).unwrap());
        assert!(o.durable() >= t);

        // Uncommitted changes, rolled back, then closed: the reopened heap is the last commit.
        {
            let root: &mut Root = o.root(|_| unreachable!()).unwrap();
            root.turns = 3;
            root.log.clear();
        }
        o.rollback().unwrap();
        drop(o);
        let mut o = open_objects(&path, tracker);
        o.check().unwrap();
        assert_eq!(snapshot(&mut o), second, "{tracker:?}: after reopening");
    }
}

#[test]
fn object_heap_rollback_recovers_from_a_refused_free() {
    let dir = TempDir::new("ev-objects-poison");
    let path = heap_at(&dir, 4 << 20);
    let mut o =
        ObjectHeap::open(Heap::open(&path, &HeapOptions::default()).unwrap(), &ObjectOptions::schema(1)).unwrap();
    let layout = std::alloc::Layout::from_size_align(64, 8).unwrap();
    let keep = o.alloc(layout, true).unwrap();
    o.commit().unwrap();
    let before = o.allocations().unwrap();
    let p = o.alloc(layout, false).unwrap();
    // SAFETY: p came from this allocator with this layout and is not used again.
    unsafe { o.dealloc(p, layout) };
    // SAFETY: deliberately wrong (a double free); the allocator refuses it without a panic.
    unsafe { o.dealloc(p, layout) };
    match o.commit() {
        Err(fams::ObjectError::Corrupt { problems, .. }) => {
            assert!(problems[0].contains("double free"), "{problems:?}")
        }
        other => panic!("a commit after a refused free must fail, got {other:?}"),
    }
    o.rollback().unwrap();
    o.check().unwrap();
    assert_eq!(o.allocations().unwrap(), before);
    o.alloc(layout, false).unwrap();
    o.commit().unwrap();
    // SAFETY: `keep` is a live allocation of this layout, not used after this.
    unsafe { o.dealloc(keep, layout) };
    o.commit().unwrap();
    o.check().unwrap();
}

#[test]
fn in_flight_commits_stay_within_the_bound_and_all_become_durable() {
    let dir = TempDir::new("ev-bound");
    let path = heap_at(&dir, 4 << 20);
    let opts = HeapOptions { in_flight_commits_max: Some(1), ..HeapOptions::default() };
    let mut h = Heap::open(&path, &opts).unwrap();
    let mut tickets = Vec::new();
    let mut max_seen = 0;
    for i in 0..300usize {
        let pages = if i % 10 == 0 { 0..100 } else { i % 50..i % 50 + 2 };
        fill(&mut h, pages, i as u8);
        tickets.push(h.commit_async().unwrap());
        let f = h.in_flight();
        max_seen = max_seen.max(f.commits);
        assert!(f.commits <= 1, "commit {i}: {f:?} in flight with a bound of 1");
        assert!(f.commits > 0 || f.bytes == 0, "{f:?}");
    }
    h.wait(*tickets.last().unwrap()).unwrap();
    for t in &tickets {
        assert!(h.is_durable(*t).unwrap());
    }
    assert_eq!(h.in_flight(), fams::InFlight::default());
    assert!(!h.would_block());

    // A bytes bound, set at run time: every commit waits for the previous one.
    h.set_in_flight_limit(None, Some(1));
    for i in 0..50usize {
        fill(&mut h, i..i + 1, 0x80 | i as u8);
        tickets.push(h.commit_async().unwrap());
        assert!(h.in_flight().commits <= 1);
    }
    h.set_in_flight_limit(None, None);
    let expected = h.bytes().to_vec();
    h.wait(*tickets.last().unwrap()).unwrap();
    drop(h);
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert!(h.bytes() == &expected[..]);
    eprintln!("most commits seen in flight: {max_seen}");
}
