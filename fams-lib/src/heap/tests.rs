//! Unit tests of the heap: the writer thread, in-flight bounds, rollback, the manual writer.

//! What needs the commit path's test hooks (`Shared::panic_next_group`, `hold_groups`): a
//! panicking log writer, and commits held in flight for as long as a test needs.

use super::*;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
use std::time::Duration;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, SeqCst);
        let p = PathBuf::from(format!("/var/tmp/fams-heap-unit-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn heap(&self) -> PathBuf {
        let p = self.0.join("h");
        let mut f = FormatOptions::new(&p, 4 << 20);
        f.log_size_bytes = Some(8 << 20);
        Heap::format(&f).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn trackers() -> Vec<TrackerKind> {
    match tracker::uffd_available() {
        Ok(()) => vec![TrackerKind::Uffd, TrackerKind::Mprotect, TrackerKind::Regions],
        Err(why) => {
            eprintln!("uffd and regions trackers not tested here: {why}");
            vec![TrackerKind::Mprotect]
        }
    }
}

fn open_with(path: &Path, tracker: Option<TrackerKind>) -> Heap {
    Heap::open(path, &HeapOptions { tracker, ..HeapOptions::default() }).unwrap()
}

/// Run `f` on its own thread and return its result; fail the test if it takes more than 10 s
/// (a hang is the bug these tests look for, and must not hang the test run).
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still blocked after 10 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(&mut p, PollTimeout::ZERO);
    n == Ok(1) && p[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
}

fn fill(h: &mut Heap, pages: std::ops::Range<usize>, byte: u8) {
    h.bytes_mut()[pages.start * PAGE_SIZE..pages.end * PAGE_SIZE].fill(byte);
}

fn assert_pages(h: &Heap, pages: std::ops::Range<usize>, byte: u8, what: &str) {
    for p in pages {
        let page = &h.bytes()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        assert!(page.iter().all(|&b| b == byte), "{what}: page {p} is not all {byte:#x}");
    }
}

#[test]
fn a_panic_on_the_writer_thread_fails_every_waiter() {
    let dir = Dir::new("writer-panic");
    let path = dir.heap();
    let mut h = open_with(&path, None);
    h.bytes_mut()[100] = 1;
    let t0 = h.commit().unwrap();
    let handle = h.durability_handle();
    h.poll_durable().unwrap();
    h.shared.panic_next_group.store(true, SeqCst);
    h.bytes_mut()[PAGE_SIZE] = 2;
    // commit_async never writes on the caller's thread: the writer thread takes it, and panics.
    let t1 = h.commit_async().unwrap();
    let waiter = handle.clone();
    match within_10s("waiting for a commit whose writer panicked", move || waiter.wait(t1)) {
        Err(Error::Poisoned { reason, .. }) => assert!(reason.contains("panicked"), "{reason}"),
        other => panic!("wait returned {other:?}"),
    }
    assert!(readable(h.durability_fd()), "the failure must wake event loops too");
    assert!(matches!(h.poll_durable(), Err(Error::Poisoned { .. })));
    assert!(matches!(h.wait(t1), Err(Error::Poisoned { .. })));
    assert!(matches!(h.is_durable(t1), Err(Error::Poisoned { .. })));
    assert!(h.is_durable(t0).unwrap(), "what was durable stays durable");
    assert_eq!(h.in_flight(), InFlight::default());
    h.bytes_mut()[2 * PAGE_SIZE] = 3;
    assert!(matches!(h.commit(), Err(Error::Poisoned { .. })));
    assert!(matches!(h.commit_async(), Err(Error::Poisoned { .. })));
    assert!(matches!(h.rollback(), Err(Error::Poisoned { .. })));
    assert!(matches!(h.release_committed(), Err(Error::Poisoned { .. })));
    assert!(matches!(h.close(), Err(Error::Poisoned { .. })), "close reports the failure");
    assert!(matches!(handle.wait(t1), Err(Error::Poisoned { .. })), "a handle outliving the heap");
    let h = open_with(&path, None);
    assert_eq!(h.bytes()[100], 1);
    assert_eq!(h.bytes()[PAGE_SIZE], 0, "the group the writer panicked on never reached the disk");
    h.close().expect("a healthy heap closes without error");
}

#[test]
fn a_panic_while_a_commit_drains_the_queue_is_an_error_not_an_unwind() {
    let dir = Dir::new("drain-panic");
    let path = dir.heap();
    let p = path.clone();
    let (first, second) = within_10s("a commit whose group panics", move || {
        let mut h = open_with(&p, None);
        h.bytes_mut()[0] = 1;
        h.commit().unwrap();
        h.shared.panic_next_group.store(true, SeqCst);
        h.bytes_mut()[0] = 2;
        // The writer is idle, so this commit most likely writes its group on this thread;
        // either way it must come back as an error.
        let first = h.commit().map_err(|e| e.to_string());
        h.bytes_mut()[0] = 3;
        let second = h.commit().map_err(|e| e.to_string());
        (first, second)
    });
    let e = first.expect_err("a commit whose group panicked");
    assert!(e.contains("panicked"), "{e}");
    assert!(second.is_err());
    let h = open_with(&path, None);
    assert_eq!(h.bytes()[0], 1);
}

#[test]
fn commits_held_in_flight_are_counted_and_bound_commit_async() {
    let dir = Dir::new("in-flight");
    let path = dir.heap();
    let mut h = open_with(&path, None);
    assert_eq!(h.in_flight(), InFlight::default());
    h.shared.hold_groups.store(true, SeqCst);
    let payload_before = h.stats().payload_bytes;
    let mut tickets = Vec::new();
    for i in 0..3 {
        h.bytes_mut()[i * 3 * PAGE_SIZE + 8] = 7;
        tickets.push(h.commit_async().unwrap());
    }
    let f = h.in_flight();
    assert_eq!(f.commits, 3);
    assert_eq!(f.bytes, h.stats().payload_bytes - payload_before);
    assert!(f.bytes > 0);
    assert!(!h.would_block(), "unbounded by default");
    h.set_in_flight_limit(Some(3), None);
    assert!(h.would_block());
    h.set_in_flight_limit(Some(4), None);
    assert!(!h.would_block());
    h.set_in_flight_limit(None, Some(f.bytes));
    assert!(h.would_block());
    h.set_in_flight_limit(None, Some(f.bytes + 1));
    assert!(!h.would_block());
    h.set_in_flight_limit(None, None);
    assert!(!readable(h.durability_fd()), "nothing became durable");
    assert!(!h.is_durable(tickets[0]).unwrap());
    h.shared.hold_groups.store(false, SeqCst);
    h.wait(tickets[2]).unwrap();
    assert_eq!(h.in_flight(), InFlight::default());
    assert!(h.poll_durable().unwrap() >= tickets[2]);
}

#[test]
fn rollback_restores_in_flight_pages_from_shadows_or_after_their_write_back() {
    for tracker in trackers() {
        let dir = Dir::new("rollback-in-flight");
        let path = dir.heap();
        let mut h = open_with(&path, Some(tracker));
        fill(&mut h, 0..10, 1);
        h.commit().unwrap();

        // A small commit held in flight: its pages keep shadow copies.
        h.shared.hold_groups.store(true, SeqCst);
        fill(&mut h, 0..5, 2);
        let t = h.commit_async().unwrap();
        fill(&mut h, 0..10, 3);
        let r = h.rollback().unwrap();
        assert_eq!(
            r,
            RollbackReport { pages_dirty: 10, pages_restored: 10, pages_from_shadow: 5, waited_for_write_back: false },
            "{tracker:?}"
        );
        assert_pages(&h, 0..5, 2, "in flight: the commit_async'd image, not the heap file's");
        assert_pages(&h, 5..10, 1, "committed and written back");
        assert!(!h.is_durable(t).unwrap(), "still held in flight");
        h.shared.hold_groups.store(false, SeqCst);
        h.wait(t).unwrap();

        // A large commit (no shadows) held in flight: rollback waits for its write-back.
        h.shared.hold_groups.store(true, SeqCst);
        fill(&mut h, 0..100, 4);
        let t2 = h.commit_async().unwrap();
        fill(&mut h, 0..120, 5);
        let r = h.rollback().unwrap();
        assert!(r.waited_for_write_back, "{tracker:?}: {r:?}");
        assert_eq!((r.pages_dirty, r.pages_restored, r.pages_from_shadow), (120, 120, 0), "{tracker:?}");
        assert!(h.is_durable(t2).unwrap());
        assert_pages(&h, 0..100, 4, "large commit in flight");
        assert_pages(&h, 100..120, 0, "never committed");

        let before = h.stats();
        h.commit().unwrap();
        let after = h.stats();
        assert_eq!(after.empty_commits, before.empty_commits + 1, "{tracker:?}: rolled-back pages were logged");
        assert_eq!(after.rollbacks, 2);
        assert_eq!(after.pages_rolled_back, 130);
        drop(h);
        let h = open_with(&path, Some(tracker));
        assert_pages(&h, 0..100, 4, "after reopening");
        assert_pages(&h, 100..120, 0, "after reopening");
    }
}

fn manual_options() -> HeapOptions {
    HeapOptions { writer: WriterMode::Manual, ..HeapOptions::default() }
}

fn page_byte(h: &Heap, page: usize) -> u8 {
    h.bytes()[page * PAGE_SIZE]
}

#[test]
fn a_manual_writer_makes_commits_durable_only_when_stepped_in_order() {
    let dir = Dir::new("manual-step");
    let sim = crate::sim::SimHeap::format(&dir.0.join("s"), 1 << 20, 1 << 20, 7).unwrap();
    let mut h = sim.open(&manual_options()).unwrap();
    assert_eq!(h.writer_mode(), WriterMode::Manual);
    assert!(!h.write_step().unwrap(), "nothing queued");
    let _ = h.poll_durable().unwrap();
    let mut tickets = Vec::new();
    for page in 0..3 {
        h.bytes_mut()[page * PAGE_SIZE] = page as u8 + 1;
        tickets.push(h.commit_async().unwrap());
    }
    std::thread::sleep(Duration::from_millis(5));
    assert!(!h.is_durable(tickets[0]).unwrap(), "no thread writes in manual mode");
    assert_eq!(h.in_flight().commits, 3);
    assert!(!readable(h.durability_fd()));
    let groups = h.stats().groups;
    assert!(h.write_step().unwrap());
    assert_eq!(h.stats().groups, groups + 1, "the three queued commits share one device write");
    assert!(h.is_durable(tickets[2]).unwrap());
    assert!(readable(h.durability_fd()), "a step announces durability on the fd");
    assert_eq!(h.poll_durable().unwrap(), tickets[2]);
    assert!(!h.write_step().unwrap());

    // Two commits, one step: the first is durable, the second is not.
    h.bytes_mut()[3 * PAGE_SIZE] = 4;
    let t4 = h.commit_async().unwrap();
    h.bytes_mut()[4 * PAGE_SIZE] = 5;
    assert!(h.write_step().unwrap());
    let t5 = h.commit_async().unwrap();
    assert!(h.is_durable(t4).unwrap() && !h.is_durable(t5).unwrap());
    assert_eq!(h.in_flight().commits, 1);

    // The process dies (no power cut): what was stepped survives, the unstepped commit not.
    h.abandon();
    let h = sim.open(&manual_options()).unwrap();
    for page in 0..4 {
        assert_eq!(page_byte(&h, page), page as u8 + 1, "stepped commit of page {page} lost");
    }
    assert_eq!(page_byte(&h, 4), 0, "a commit never stepped survived a crash");
    drop(h);

    // A power cut between steps: the same (stepped writes are durable log writes).
    let mut h = sim.open(&manual_options()).unwrap();
    h.bytes_mut()[5 * PAGE_SIZE] = 6;
    let t6 = h.commit_async().unwrap();
    assert!(h.write_step().unwrap());
    h.bytes_mut()[6 * PAGE_SIZE] = 7;
    let t7 = h.commit_async().unwrap();
    assert!(h.is_durable(t6).unwrap() && !h.is_durable(t7).unwrap());
    sim.machine.cut_power_now();
    h.abandon();
    sim.reboot().unwrap();
    let h = sim.open(&manual_options()).unwrap();
    assert_eq!(page_byte(&h, 5), 6);
    assert_eq!(page_byte(&h, 6), 0, "a commit never stepped survived a power cut");
}

#[test]
fn a_manual_writer_never_blocks_commit_wait_bounds_or_close() {
    let dir = Dir::new("manual-sync");
    let sim = crate::sim::SimHeap::format(&dir.0.join("s"), 1 << 20, 1 << 20, 8).unwrap();
    let mut h = sim.open(&manual_options()).unwrap();
    // Back-pressure: over the bound, commit_async writes the oldest group itself.
    h.set_in_flight_limit(Some(2), None);
    let mut last = None;
    for page in 0..6 {
        h.bytes_mut()[page * PAGE_SIZE] = 9;
        last = Some(h.commit_async().unwrap());
        assert!(h.in_flight().commits <= 2);
    }
    assert!(h.would_block());
    // wait drains.
    h.wait(last.unwrap()).unwrap();
    assert_eq!(h.in_flight().commits, 0);
    // commit drains synchronously, earlier queued commits first.
    h.bytes_mut()[7 * PAGE_SIZE] = 1;
    let a = h.commit_async().unwrap();
    h.bytes_mut()[8 * PAGE_SIZE] = 2;
    let b = h.commit().unwrap();
    assert!(h.is_durable(a).unwrap() && h.is_durable(b).unwrap());
    // A rollback of a page whose commit is queued (no shadow for a whole new page is
    // needed here; it must not wait for a thread that does not exist).
    h.bytes_mut()[9 * PAGE_SIZE] = 3;
    let _queued = h.commit_async().unwrap();
    h.bytes_mut()[9 * PAGE_SIZE] = 4;
    h.rollback().unwrap();
    assert_eq!(page_byte(&h, 9), 3);
    // A clean close drains the queue.
    h.bytes_mut()[10 * PAGE_SIZE] = 5;
    let _ = h.commit_async().unwrap();
    h.close().unwrap();
    let h = sim.open(&manual_options()).unwrap();
    assert_eq!(page_byte(&h, 9), 3);
    assert_eq!(page_byte(&h, 10), 5, "close wrote the queued commit");
}

/// Commit one byte into page `i % pages`, and the same into `model`.
fn commit_step(h: &mut Heap, model: &mut [u8], i: usize, pages: usize) {
    let at = (i % pages) * PAGE_SIZE + i % 7;
    let byte = (i % 251) as u8 + 1;
    h.bytes_mut()[at] = byte;
    model[at] = byte;
    h.commit().unwrap();
}

/// Commit until the heap-file thread has planned a checkpoint (bounded); returns commits made.
fn commit_until_planned(h: &mut Heap, model: &mut [u8], pages: usize) -> usize {
    for i in 0..100_000 {
        commit_step(h, model, i, pages);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        if h.stats().checkpoints == 0 && commit::lock_core(&h.writer_core).used_bytes > (1 << 20) {
            // Past the threshold: the plan comes from the other thread; wait for it.
            while commit::lock_core(&h.writer_core).planned_checkpoint.is_none() {
                assert!(std::time::Instant::now() < deadline, "no checkpoint planned within 10 s");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if commit::lock_core(&h.writer_core).planned_checkpoint.is_some() {
            return i + 1;
        }
    }
    panic!("no checkpoint planned after 100,000 commits");
}

/// A fresh heap checkpointing past 1 MiB of log, open, with a model of its bytes.
struct BackgroundCheckpointHeap {
    _dir: Dir,
    path: PathBuf,
    pages: usize,
    opts: HeapOptions,
    model: Vec<u8>,
    h: Heap,
}

fn background_checkpoint_heap(tag: &str) -> BackgroundCheckpointHeap {
    let dir = Dir::new(tag);
    let path = dir.heap();
    let opts = HeapOptions { checkpoint_threshold_bytes: Some(1 << 20), ..HeapOptions::default() };
    let model = {
        let h = Heap::open(&path, &opts).unwrap();
        h.bytes().to_vec()
    };
    let h = Heap::open(&path, &opts).unwrap();
    BackgroundCheckpointHeap { _dir: dir, path, pages: 1000, opts, model, h }
}

#[test]
fn a_background_checkpoint_moves_the_tail_to_its_plan_while_commits_go_on() {
    let BackgroundCheckpointHeap { _dir, path, pages, opts, mut model, mut h } =
        background_checkpoint_heap("bg-checkpoint");
    h.shared.hold_checkpoint_before_tail.store(true, SeqCst);
    let before = commit_until_planned(&mut h, &mut model, pages);
    // The heap file is synced, the tail not moved yet: commits go on, each touching a page for
    // the first time since the plan.
    let during = 40;
    for i in before..before + during {
        commit_step(&mut h, &mut model, i, pages);
    }
    assert_eq!(h.stats().checkpoints, 0, "the held checkpoint moved the tail");
    assert!(commit::lock_core(&h.writer_core).planned_checkpoint.is_some());
    h.shared.hold_checkpoint_before_tail.store(false, SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.stats().background_checkpoints == 0 {
        assert!(std::time::Instant::now() < deadline, "the checkpoint did not finish within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.stats().checkpoints, 1);
    h.abandon(); // a crash: the images of the commits made during the checkpoint are lost
    let h = Heap::open(&path, &opts).unwrap();
    let replayed = h.recovery.records_replayed;
    assert!(
        replayed >= during as u64,
        "recovery replayed {replayed} records; the {during} written while the checkpoint ran are after its tail"
    );
    assert!(replayed < (before + during) as u64, "the tail did not move: {replayed} records replayed");
    assert!(h.bytes() == &model[..], "the recovered heap differs from the last commit");
}

#[test]
fn a_crash_before_a_background_checkpoint_moves_the_tail_loses_nothing() {
    let BackgroundCheckpointHeap { _dir, path, pages, opts, mut model, mut h } =
        background_checkpoint_heap("bg-checkpoint-crash");
    h.shared.hold_checkpoint_before_sync.store(true, SeqCst);
    let before = commit_until_planned(&mut h, &mut model, pages);
    for i in before..before + 40 {
        commit_step(&mut h, &mut model, i, pages);
    }
    h.abandon(); // before the images are written: only the log holds the commits
    let h = Heap::open(&path, &opts).unwrap();
    assert_eq!(h.recovery.records_replayed, (before + 40) as u64, "replay starts at the old tail");
    assert!(h.bytes() == &model[..], "the recovered heap differs from the last commit");
}
