//! The trackers' tests: each arms a tracker on a mapping of its own and checks what it reports.

use super::*;

use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::fs::OpenOptions;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Every test arms trackers only on its own `TestMap` (or on ranges `arm` must reject before
/// touching them), declared before the tracker so the tracker drops first.
fn arm(kind: Option<TrackerKind>, base: *mut u8, len: usize) -> io::Result<Box<dyn DirtyTracker>> {
    // SAFETY: see above: the range is the test's own mapping, which outlives the tracker.
    unsafe { super::arm(kind, base, len) }
}

/// A MAP_PRIVATE mapping of a temporary file whose page `i` is filled with byte `fill(i)`.
struct TestMap {
    base: *mut u8,
    len: usize,
    path: PathBuf,
}

fn fill(page: usize) -> u8 {
    (page % 251) as u8 + 1
}

/// A private read-write mapping of the first `len` bytes of `f`, without huge pages.
fn map_file(f: &std::fs::File, len: usize) -> *mut u8 {
    let size = NonZeroUsize::new(len).expect("a test map has pages");
    let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: mapping a fresh region chosen by the kernel (addr = None) of a file we own, of
    // exactly its length; no existing memory is affected.
    let p = unsafe { mmap(None, size, rw, MapFlags::MAP_PRIVATE, f, 0) }.expect("mmap");
    // SAFETY: advising the mapping we just created.
    unsafe { madvise(p, len, MmapAdvise::MADV_NOHUGEPAGE) }.expect("madvise");
    p.as_ptr().cast()
}

impl TestMap {
    fn new(pages: usize) -> TestMap {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "fams-tracker-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create temp file");
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in 0..pages {
            buf.fill(fill(p));
            f.write_all(&buf).expect("fill temp file");
        }
        let len = pages * PAGE_SIZE;
        TestMap { base: map_file(&f, len), len, path }
    }

    fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Byte `off` of page `page`.
    fn at(&self, page: usize, off: usize) -> *mut u8 {
        assert!(page < self.pages() && off < PAGE_SIZE);
        // SAFETY: in bounds of our mapping (checked above).
        unsafe { self.base.add(page * PAGE_SIZE + off) }
    }

    fn write(&self, page: usize, byte: u8) {
        let p = self.at(page, 17);
        // SAFETY: in bounds of our live RW mapping (tracking only intercepts the write).
        unsafe { std::ptr::write_volatile(p, byte) }
    }

    fn read(&self, page: usize, off: usize) -> u8 {
        let p = self.at(page, off);
        // SAFETY: in bounds of our live readable mapping.
        unsafe { std::ptr::read_volatile(p) }
    }

    fn dontneed(&self, page: usize) {
        let p = std::ptr::NonNull::new(self.at(page, 0).cast()).expect("mapped");
        // SAFETY: drops the private copy of one page of our own mapping; the next access
        // faults the file's page in again.
        unsafe { madvise(p, PAGE_SIZE, MmapAdvise::MADV_DONTNEED) }.expect("madvise(DONTNEED)");
    }
}

impl Drop for TestMap {
    fn drop(&mut self) {
        if let Some(p) = std::ptr::NonNull::new(self.base.cast()) {
            // SAFETY: unmapping the region we mapped; every tracker on it was dropped first
            // (trackers are declared after the map in each test, so they drop before it).
            let _ = unsafe { munmap(p, self.len) };
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Returns false (after printing why) when `kind` cannot run here. A uffd mechanism that
/// exists but misbehaves in the availability probe is a failure, not a reason to skip; so is
/// any unavailability when FAMS_REQUIRE_UFFD is set (for machines known to support it).
fn usable(kind: TrackerKind) -> bool {
    if matches!(kind, TrackerKind::Uffd | TrackerKind::Regions) {
        if let Err(why) = uffd_available() {
            if why.starts_with("probe:") || std::env::var_os("FAMS_REQUIRE_UFFD").is_some() {
                panic!("uffd tracker unavailable: {why}");
            }
            eprintln!("skipping {} test: {why}", kind.name());
            return false;
        }
    }
    true
}

/// Every kind, in the order the multi-kind tests use.
const KINDS: [TrackerKind; 3] = [TrackerKind::Mprotect, TrackerKind::Uffd, TrackerKind::Regions];

#[test]
fn uffd_probe_does_not_fail_on_wrong_answers() {
    // Skips only for an absent mechanism (old kernel, seccomp); panics on a broken one.
    usable(TrackerKind::Uffd);
}

fn collect(t: &mut Box<dyn DirtyTracker>) -> Vec<usize> {
    let mut v = Vec::new();
    t.collect(&mut v).expect("collect");
    v
}

fn basic(kind: TrackerKind) {
    if !usable(kind) {
        return;
    }
    let m = TestMap::new(64);
    // Pages touched before arming (resident private copies, resident file pages) start
    // clean like the others.
    m.write(5, 0x55);
    m.write(6, 0x56);
    let _ = m.read(7, 0);
    let mut t = arm(Some(kind), m.base, m.len).expect("arm");
    assert_eq!(t.kind(), kind);
    assert_eq!(collect(&mut t), Vec::<usize>::new(), "fresh tracker must be clean");
    assert_eq!(m.read(5, 17), 0x55);

    m.write(10, 0xAA);
    m.write(3, 0xBB);
    m.write(3, 0xBC);
    assert_eq!(collect(&mut t), vec![3, 10]);
    assert_eq!(collect(&mut t), Vec::<usize>::new());
    assert_eq!(m.read(3, 17), 0xBC);
    assert_eq!(m.read(10, 17), 0xAA);
    // Reads are not writes.
    let _ = m.read(20, 0);
    assert_eq!(collect(&mut t), Vec::<usize>::new());

    m.write(3, 0xCC);
    assert_eq!(collect(&mut t), vec![3]);

    // Dropping the private copy shows the file again; reading it is not a write...
    m.dontneed(3);
    assert_eq!(m.read(3, 17), fill(3), "after MADV_DONTNEED the file's bytes show");
    assert_eq!(m.read(3, 0), fill(3));
    assert_eq!(collect(&mut t), Vec::<usize>::new());
    // ...and writing it again is seen.
    m.write(3, 0xDD);
    assert_eq!(collect(&mut t), vec![3]);
    // A page dropped while clean and never read, then written, is seen too.
    m.dontneed(40);
    m.write(40, 1);
    assert_eq!(collect(&mut t), vec![40]);

    // Appends, never clears, `out`.
    m.write(63, 1);
    let mut v = vec![999];
    t.collect(&mut v).unwrap();
    assert_eq!(v, vec![999, 63]);

    drop(t);
    // After drop, writes are untracked and must just work (no fault left behind).
    for p in 0..64 {
        m.write(p, 7);
    }
    assert_eq!(m.read(5, 17), 7);
}

fn all_dirty(kind: TrackerKind, pages: usize) {
    if !usable(kind) {
        return;
    }
    let m = TestMap::new(pages);
    let mut t = arm(Some(kind), m.base, m.len).expect("arm");
    for round in 0..2u8 {
        for p in 0..pages {
            m.write(p, round);
        }
        let got = collect(&mut t);
        assert_eq!(got.len(), pages, "round {round}");
        assert!(got.iter().copied().eq(0..pages), "round {round}: not 0..{pages}");
        assert_eq!(collect(&mut t), Vec::<usize>::new());
    }
}

/// Every other page dirty: one region per page, so the uffd scan fills its region vector
/// many times and must continue from `walk_end`; the mprotect tracker makes one mprotect call
/// per page and splits the VMA into thousands of pieces.
fn checkerboard(kind: TrackerKind, pages: usize) {
    if !usable(kind) {
        return;
    }
    let m = TestMap::new(pages);
    let mut t = arm(Some(kind), m.base, m.len).expect("arm");
    for phase in 0..2 {
        for p in (phase..pages).step_by(2) {
            m.write(p, 9);
        }
        let got = collect(&mut t);
        let want: Vec<usize> = (phase..pages).step_by(2).collect();
        assert_eq!(got.len(), want.len(), "phase {phase}");
        assert!(got == want, "phase {phase}: wrong page set");
        assert_eq!(collect(&mut t), Vec::<usize>::new(), "phase {phase}: not re-armed");
    }
    // Everything is armed again: a write anywhere is seen.
    m.write(pages - 1, 1);
    m.write(0, 1);
    assert_eq!(collect(&mut t), vec![0, pages - 1]);
}

#[test]
fn uffd_basic() {
    basic(TrackerKind::Uffd);
}

#[test]
fn mprotect_basic() {
    basic(TrackerKind::Mprotect);
}

#[test]
fn regions_basic() {
    basic(TrackerKind::Regions);
}

#[test]
fn uffd_all_dirty_64() {
    all_dirty(TrackerKind::Uffd, 64);
}

#[test]
fn mprotect_all_dirty_64() {
    all_dirty(TrackerKind::Mprotect, 64);
}

#[test]
fn regions_all_dirty_64() {
    all_dirty(TrackerKind::Regions, 64);
}

#[test]
fn uffd_all_dirty_8192() {
    all_dirty(TrackerKind::Uffd, 8192);
}

#[test]
fn mprotect_all_dirty_8192() {
    all_dirty(TrackerKind::Mprotect, 8192);
}

#[test]
fn regions_all_dirty_8192() {
    all_dirty(TrackerKind::Regions, 8192);
}

#[test]
fn uffd_checkerboard_8192() {
    checkerboard(TrackerKind::Uffd, 8192);
}

#[test]
fn mprotect_checkerboard_8192() {
    checkerboard(TrackerKind::Mprotect, 8192);
}

#[test]
fn regions_checkerboard_8192() {
    checkerboard(TrackerKind::Regions, 8192);
}

/// Pages per region of the regions tracker.
const RP: usize = regions::REGION_BYTES / PAGE_SIZE;

fn writable(m: &TestMap, page: usize) -> bool {
    test_util::is_writable(m.base as usize + page * PAGE_SIZE)
}

/// A region that goes idle is closed (read-only again); a later write into it is still
/// reported, and so are reads and `MADV_DONTNEED` in a closed region handled like the
/// other trackers handle them. A busy region stays open throughout.
#[test]
fn regions_idle_region_closes_and_later_writes_are_seen() {
    if !usable(TrackerKind::Regions) {
        return;
    }
    let m = TestMap::new(3 * RP);
    let mut t = arm(Some(TrackerKind::Regions), m.base, m.len).expect("arm");
    assert!(!writable(&m, 0) && !writable(&m, RP) && !writable(&m, 2 * RP), "start closed");
    let (busy, idle) = (5, RP + 100); // regions 0 and 1
    m.write(busy, 1);
    m.write(idle, 1);
    assert!(writable(&m, idle) && writable(&m, RP) && !writable(&m, 2 * RP));
    assert_eq!(collect(&mut t), vec![busy, idle]);
    for round in 0..regions::CLOSE_AFTER_IDLE_COLLECTS {
        m.write(busy, 2);
        assert_eq!(collect(&mut t), vec![busy], "round {round}");
        assert!(writable(&m, idle), "round {round}: closed too early");
    }
    m.write(busy, 3);
    assert_eq!(collect(&mut t), vec![busy]);
    assert!(!writable(&m, idle), "idle region must be closed now");
    assert!(writable(&m, busy), "busy region must stay open");
    // Across the close: the data is intact and the next write to the closed region is seen,
    // on the same page and on another one.
    assert_eq!(m.read(idle, 17), 1);
    m.write(idle, 4);
    m.write(idle + 1, 4);
    assert!(writable(&m, idle));
    assert_eq!(collect(&mut t), vec![idle, idle + 1]);
    assert_eq!(m.read(idle, 17), 4);
    // Let region 1 close again, then drop a page of it and read it: not a write.
    for _ in 0..=regions::CLOSE_AFTER_IDLE_COLLECTS {
        m.write(busy, 5);
        assert_eq!(collect(&mut t), vec![busy]);
    }
    assert!(!writable(&m, idle));
    m.dontneed(idle);
    assert_eq!(m.read(idle, 17), fill(idle), "after MADV_DONTNEED the file's bytes show");
    assert_eq!(collect(&mut t), Vec::<usize>::new());
    assert!(!writable(&m, idle), "reading does not open a region");
    m.write(idle, 6);
    assert_eq!(collect(&mut t), vec![idle]);
    // Every region idle: all close, and writes anywhere are seen again.
    for _ in 0..=regions::CLOSE_AFTER_IDLE_COLLECTS {
        assert_eq!(collect(&mut t), Vec::<usize>::new());
    }
    assert!((0..3).all(|r| !writable(&m, r * RP)), "all closed");
    m.write(3 * RP - 1, 7);
    m.write(0, 7);
    assert_eq!(collect(&mut t), vec![0, 3 * RP - 1]);
    drop(t);
    assert!((0..3).all(|r| writable(&m, r * RP)), "drop restores PROT_READ|PROT_WRITE");
}

/// Pages in different regions, written in any order, come out ascending, each once; writes
/// on both sides of every region boundary (and in a shorter last region) are all seen.
#[test]
fn regions_boundaries_and_many_regions() {
    if !usable(TrackerKind::Regions) {
        return;
    }
    let pages = 4 * RP + 7; // four whole regions and a short fifth
    let m = TestMap::new(pages);
    let mut t = arm(Some(TrackerKind::Regions), m.base, m.len).expect("arm");
    let mut want = vec![0, pages - 1];
    for r in 1..=4 {
        want.extend([r * RP - 1, r * RP]);
    }
    for &p in want.iter().rev() {
        m.write(p, 9);
    }
    want.sort_unstable();
    assert_eq!(collect(&mut t), want);
    assert_eq!(collect(&mut t), Vec::<usize>::new());
    // Regions 0, 2, 4 (not adjacent: three scan ranges) and then 1..=3 (one range).
    let spread = vec![10, 2 * RP + 10, 4 * RP + 6];
    for &p in &spread {
        m.write(p, 1);
    }
    assert_eq!(collect(&mut t), spread);
    let run = vec![RP + 3, 2 * RP + 3, 3 * RP + 3];
    for &p in &run {
        m.write(p, 1);
    }
    assert_eq!(collect(&mut t), run);
    // A single store straddling a region boundary opens both regions.
    let buf = [3u8; 64];
    let dst = m.at(3 * RP - 1, PAGE_SIZE - 32);
    // SAFETY: 64 bytes across the boundary of regions 2 and 3, inside our mapping.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, 64) };
    assert_eq!(collect(&mut t), vec![3 * RP - 1, 3 * RP]);
}

#[test]
fn regions_kernel_writes_fail_in_closed_regions_and_are_tracked_in_open_ones() {
    if !usable(TrackerKind::Regions) {
        return;
    }
    let m = TestMap::new(2 * RP);
    let mut t = arm(Some(TrackerKind::Regions), m.base, m.len).expect("arm");
    let f = std::fs::File::open(&m.path).unwrap();
    let pread = |page: usize| {
        let dst = m.at(page, 0);
        // raw libc: the kernel must write into tracked memory through a raw pointer (nix's
        // pread takes a `&mut [u8]`, which must not point at memory the kernel may refuse).
        // SAFETY: reading 100 bytes into `page` of our live mapping; when the page is
        // read-only the kernel refuses and no memory is touched.
        unsafe { libc::pread(f.as_raw_fd(), dst.cast(), 100, 0) }
    };
    // Closed region: like the mprotect tracker, the kernel's write fails.
    assert_eq!(pread(RP + 5), -1);
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(nix::errno::Errno::EFAULT as i32));
    assert_eq!(collect(&mut t), Vec::<usize>::new());
    // Open the region with a store; now a kernel write into it is tracked like uffd's.
    m.write(RP, 1);
    assert_eq!(pread(RP + 5), 100, "pread: {}", io::Error::last_os_error());
    assert_eq!(collect(&mut t), vec![RP, RP + 5]);
    assert_eq!(m.read(RP + 5, 0), fill(0));
}

#[test]
fn uffd_tracks_kernel_writes() {
    if !usable(TrackerKind::Uffd) {
        return;
    }
    let m = TestMap::new(16);
    let mut t = arm(Some(TrackerKind::Uffd), m.base, m.len).expect("arm");
    let f = std::fs::File::open(&m.path).unwrap();
    let dst = m.at(5, 0);
    // raw libc: a kernel write into tracked memory through a raw pointer (see above).
    // SAFETY: reading 100 bytes into page 5 of our live RW mapping.
    let n = unsafe { libc::pread(f.as_raw_fd(), dst.cast(), 100, 0) };
    assert_eq!(n, 100, "pread into tracked memory: {}", io::Error::last_os_error());
    assert_eq!(collect(&mut t), vec![5]);
}

#[test]
fn mprotect_kernel_writes_fail_with_efault() {
    // Documents the limit of the mprotect tracker: the kernel does not fault on our behalf.
    let m = TestMap::new(16);
    let mut t = arm(Some(TrackerKind::Mprotect), m.base, m.len).expect("arm");
    let f = std::fs::File::open(&m.path).unwrap();
    let dst = m.at(5, 0);
    // raw libc: a kernel write into tracked memory through a raw pointer (see above).
    // SAFETY: reading into page 5 of our live mapping (currently PROT_READ: the kernel
    // refuses to write there and fails the call; no memory is touched).
    let n = unsafe { libc::pread(f.as_raw_fd(), dst.cast(), 100, 0) };
    assert_eq!(n, -1);
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(nix::errno::Errno::EFAULT as i32));
    assert_eq!(collect(&mut t), Vec::<usize>::new());
}

#[test]
fn two_trackers_are_independent() {
    for kind in KINDS {
        if !usable(kind) {
            continue;
        }
        let a = TestMap::new(32);
        let b = TestMap::new(32);
        let mut ta = arm(Some(kind), a.base, a.len).expect("arm a");
        let mut tb = arm(Some(kind), b.base, b.len).expect("arm b");
        a.write(1, 1);
        b.write(2, 2);
        b.write(30, 2);
        assert_eq!(collect(&mut ta), vec![1], "{kind:?}");
        a.write(31, 1);
        assert_eq!(collect(&mut tb), vec![2, 30], "{kind:?}");
        assert_eq!(collect(&mut ta), vec![31], "{kind:?}");
        drop(ta);
        // b keeps working after a is gone; a's range is plain memory again.
        a.write(4, 4);
        b.write(4, 4);
        assert_eq!(collect(&mut tb), vec![4], "{kind:?}");
    }
}

#[test]
fn mixed_kinds_on_one_thread() {
    if !usable(TrackerKind::Uffd) {
        return;
    }
    let a = TestMap::new(8);
    let b = TestMap::new(8);
    let c = TestMap::new(8);
    let mut ta = arm(Some(TrackerKind::Uffd), a.base, a.len).unwrap();
    let mut tb = arm(Some(TrackerKind::Mprotect), b.base, b.len).unwrap();
    let mut tc = arm(Some(TrackerKind::Regions), c.base, c.len).unwrap();
    a.write(7, 1);
    b.write(0, 1);
    c.write(3, 1);
    assert_eq!(collect(&mut ta), vec![7]);
    assert_eq!(collect(&mut tb), vec![0]);
    assert_eq!(collect(&mut tc), vec![3]);
    drop(tb);
    c.write(4, 1);
    assert_eq!(collect(&mut tc), vec![4]);
}

#[test]
fn many_threads_many_trackers() {
    for kind in [TrackerKind::Mprotect, TrackerKind::Regions] {
        if usable(kind) {
            many_threads(kind);
        }
    }
}

fn many_threads(kind: TrackerKind) {
    // Every thread owns one mapping and one tracker of `kind`, all alive at once; faults on
    // one thread must never be attributed to another's range.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let m = TestMap::new(128);
                let mut t = arm(Some(kind), m.base, m.len).expect("arm");
                for round in 0..50usize {
                    let want: Vec<usize> = (0..128).filter(|p| (p + round + i) % 7 == 0).collect();
                    for &p in &want {
                        m.write(p, round as u8);
                    }
                    assert_eq!(collect(&mut t), want, "thread {i} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn tracker_moves_between_threads() {
    for kind in KINDS {
        if !usable(kind) {
            continue;
        }
        let m = TestMap::new(8);
        let t = arm(Some(kind), m.base, m.len).unwrap();
        let (base, len) = (m.base as usize, m.len);
        let t = std::thread::spawn(move || {
            let mut t = t;
            // SAFETY: the mapping outlives this thread (joined below).
            unsafe { std::ptr::write_volatile((base + 2 * PAGE_SIZE) as *mut u8, 1) };
            let _ = len;
            assert_eq!(collect(&mut t), vec![2]);
            t
        })
        .join()
        .unwrap();
        let mut t = t;
        m.write(6, 1);
        assert_eq!(collect(&mut t), vec![6]);
    }
}

#[test]
fn bad_arguments_are_rejected() {
    let m = TestMap::new(4);
    for kind in std::iter::once(None).chain(KINDS.map(Some)) {
        let e = arm(kind, m.base.wrapping_add(1), PAGE_SIZE).err().expect("unaligned");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("aligned"), "{e}");
        let e = arm(kind, m.base, 100).err().expect("odd length");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = arm(kind, m.base, 0).err().expect("empty");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

#[test]
fn unmapped_range_gives_clear_error() {
    // The bottom of the address space is never handed out by mmap without MAP_FIXED (Linux
    // allocates top-down). A freshly unmapped range would not do: other test threads may map
    // something there at any moment.
    let p = PAGE_SIZE as *mut u8;
    for kind in KINDS {
        if !usable(kind) {
            continue;
        }
        let e = arm(Some(kind), p, 16 * PAGE_SIZE).err().expect("must fail");
        let msg = e.to_string();
        eprintln!("{kind:?} on unmapped range: {msg}");
        assert!(msg.contains(kind.name()) || msg.contains("userfaultfd"), "{msg}");
    }
}

#[test]
fn kind_names_round_trip() {
    for k in KINDS {
        assert_eq!(k.name().parse::<TrackerKind>(), Ok(k));
    }
    assert_eq!(" UFFD ".parse::<TrackerKind>(), Ok(TrackerKind::Uffd));
    assert_eq!("regions".parse::<TrackerKind>(), Ok(TrackerKind::Regions));
    assert_eq!(TrackerKind::Regions.name(), "regions");
    let e = "softdirty".parse::<TrackerKind>().unwrap_err();
    assert!(e.contains("uffd") && e.contains("mprotect") && e.contains("softdirty"), "{e}");
    assert!(e.contains("regions"), "{e}");
}

#[test]
fn default_kind_follows_availability() {
    let m = TestMap::new(4);
    let t = arm(None, m.base, m.len).unwrap();
    let want = if uffd_available().is_ok() { TrackerKind::Uffd } else { TrackerKind::Mprotect };
    assert_eq!(t.kind(), want);
}

#[test]
fn runs_coalesce() {
    let v: Vec<_> = runs(&[1, 2, 3, 5, 7, 8]).collect();
    assert_eq!(v, vec![(1, 3), (5, 1), (7, 2)]);
    assert_eq!(runs(&[]).count(), 0);
}

/// Timing: `cargo test --release -- --ignored --nocapture timing`. A 1 GiB MAP_PRIVATE
/// mapping of a sparse file whose pages are all resident (in the page cache and mapped
/// read-only by a read pass), so a first write costs the copy-on-write plus tracking.
#[test]
#[ignore]
fn timing() {
    use std::time::Duration;
    const PAGES: usize = (1 << 30) / PAGE_SIZE;
    const N: usize = 4000;
    let touch_all = |m: &TestMap| {
        let mut s = 0u32;
        for p in 0..PAGES {
            s = s.wrapping_add(m.read(p, 0) as u32);
        }
        std::hint::black_box(s);
    };
    // Scattered pages (stride 61: no two adjacent, so mprotect splits a VMA per page).
    let page_of = |i: usize| i * 61 % PAGES;
    let first_writes = |m: &TestMap| {
        let t0 = Instant::now();
        for i in 0..N {
            m.write(page_of(i), 1);
        }
        t0.elapsed() / N as u32
    };
    // Baseline: the same first writes with no tracker (copy-on-write only).
    let m = TestMap::new_sparse(PAGES);
    touch_all(&m);
    eprintln!("untracked 1GiB resident: first-write {:>7.2?}/page (COW only)", first_writes(&m));
    drop(m);
    // Regions touched by the scattered pages: the regions tracker takes one SIGSEGV for each
    // (in `first-write`), and scans them all in `collect(N dirty)`.
    let mut regions_touched: Vec<usize> = (0..N).map(|i| page_of(i) / RP).collect();
    regions_touched.sort_unstable();
    regions_touched.dedup();
    eprintln!("{N} scattered pages lie in {} regions of {RP} pages", regions_touched.len());
    for kind in [TrackerKind::Uffd, TrackerKind::Regions, TrackerKind::Mprotect] {
        if !usable(kind) {
            continue;
        }
        let m = TestMap::new_sparse(PAGES);
        touch_all(&m);
        let t0 = Instant::now();
        let mut t = arm(Some(kind), m.base, m.len).unwrap();
        let arm_t = t0.elapsed();
        let fw = first_writes(&m);
        let mut v = Vec::new();
        let t0 = Instant::now();
        t.collect(&mut v).unwrap();
        let c_many = t0.elapsed();
        assert_eq!(v.len(), N);
        // Re-dirtying the already-copied pages (the steady state of a heap).
        let t0 = Instant::now();
        for i in 0..N {
            m.write(page_of(i), 2);
        }
        let rw = t0.elapsed() / N as u32;
        v.clear();
        t.collect(&mut v).unwrap();
        assert_eq!(v.len(), N);
        let mut one = Duration::MAX;
        for _ in 0..20 {
            m.write(12345, 1);
            v.clear();
            let t0 = Instant::now();
            t.collect(&mut v).unwrap();
            one = one.min(t0.elapsed());
            assert_eq!(v, vec![12345]);
        }
        let mut empty = Duration::MAX;
        for _ in 0..20 {
            v.clear();
            let t0 = Instant::now();
            t.collect(&mut v).unwrap();
            empty = empty.min(t0.elapsed());
        }
        // Every page privately copied (a heap whose whole working set was once written).
        for p in 0..PAGES {
            m.write(p, 3);
        }
        v.clear();
        let t0 = Instant::now();
        t.collect(&mut v).unwrap();
        let c_all = t0.elapsed();
        assert_eq!(v.len(), PAGES);
        let mut one_cow = Duration::MAX;
        for _ in 0..20 {
            m.write(12345, 1);
            v.clear();
            let t0 = Instant::now();
            t.collect(&mut v).unwrap();
            one_cow = one_cow.min(t0.elapsed());
            assert_eq!(v, vec![12345]);
        }
        eprintln!(
            "{:9} 1GiB all pages copied: collect(all {PAGES} dirty) {:>8.2?}  \
             collect(1 dirty) {:>8.2?}",
            kind.name(),
            c_all,
            one_cow
        );
        eprintln!(
            "{:9} 1GiB resident: arm {:>8.2?}  first-write {:>7.2?}/page  \
             re-dirty {:>7.2?}/page  collect({N} dirty) {:>8.2?}  collect(1 dirty) {:>8.2?}  \
             collect(0) {:>8.2?}",
            kind.name(),
            arm_t,
            fw,
            rw,
            c_many,
            one,
            empty
        );
    }
}

/// Sorted durations: (min, median, 90th percentile).
fn spread(v: &mut [std::time::Duration]) -> [std::time::Duration; 3] {
    v.sort_unstable();
    [v[0], v[v.len() / 2], v[v.len() * 9 / 10]]
}

/// Timing of what the regions tracker changes, against the other two:
/// `cargo test --release -p fams --lib -- --ignored --nocapture timing_regions`.
/// Maps are `MAP_PRIVATE` of sparse files with every page resident (read once) before arming.
#[test]
#[ignore]
fn timing_regions() {
    use std::time::Duration;
    let touch_all = |m: &TestMap| {
        let mut s = 0u32;
        for p in 0..m.pages() {
            s = s.wrapping_add(m.read(p, 0) as u32);
        }
        std::hint::black_box(s);
    };
    const COMMITS: usize = 400;
    // 1. collect with one dirty page (the same page each time: its region stays open).
    for (label, bytes) in [("64MiB", 64usize << 20), ("1GiB", 1usize << 30)] {
        for kind in [TrackerKind::Uffd, TrackerKind::Regions, TrackerKind::Mprotect] {
            if !usable(kind) {
                continue;
            }
            let m = TestMap::new_sparse(bytes / PAGE_SIZE);
            touch_all(&m);
            let mut t = arm(Some(kind), m.base, m.len).unwrap();
            let page = m.pages() / 2 + 3;
            let mut v = Vec::new();
            let mut times = Vec::with_capacity(COMMITS);
            for i in 0..COMMITS {
                m.write(page, i as u8);
                v.clear();
                let t0 = Instant::now();
                t.collect(&mut v).unwrap();
                times.push(t0.elapsed());
                assert_eq!(v, vec![page]);
            }
            let [min, med, p90] = spread(&mut times);
            eprintln!(
                "{:9} {label:>5} resident: collect(1 dirty, same page) min {min:>8.2?} \
                 median {med:>8.2?} p90 {p90:>8.2?}",
                kind.name()
            );
        }
    }
    if !usable(TrackerKind::Regions) {
        return;
    }
    // 2. First writes into closed vs open regions (1 GiB resident).
    const PAGES: usize = (1 << 30) / PAGE_SIZE;
    const NR: usize = 400; // regions used
    let m = TestMap::new_sparse(PAGES);
    touch_all(&m);
    let mut t = arm(Some(TrackerKind::Regions), m.base, m.len).unwrap();
    let region_page = |r: usize, k: usize| r * RP + k;
    // First write ever to a page (copy-on-write included): closed region (signal + open the
    // region + uffd fault) vs open region (uffd fault).
    let t0 = Instant::now();
    for r in 0..NR {
        m.write(region_page(r, 0), 1);
    }
    let closed_first = t0.elapsed() / NR as u32;
    let t0 = Instant::now();
    for r in 0..NR {
        m.write(region_page(r, 1), 1);
    }
    let open_first = t0.elapsed() / NR as u32;
    let mut v = Vec::new();
    t.collect(&mut v).unwrap();
    assert_eq!(v.len(), 2 * NR);
    // Re-write of a page already copied, after a collect re-armed it: open region (uffd
    // fault only) ...
    let t0 = Instant::now();
    for r in 0..NR {
        m.write(region_page(r, 0), 2);
    }
    let open_again = t0.elapsed() / NR as u32;
    // ... and, once the regions went idle and closed, closed region (signal + uffd fault).
    for _ in 0..=regions::CLOSE_AFTER_IDLE_COLLECTS + 1 {
        v.clear();
        t.collect(&mut v).unwrap();
    }
    assert!(!test_util::is_writable(m.base as usize), "regions should be closed now");
    let t0 = Instant::now();
    for r in 0..NR {
        m.write(region_page(r, 1), 3);
    }
    let closed_again = t0.elapsed() / NR as u32;
    v.clear();
    t.collect(&mut v).unwrap();
    assert_eq!(v.len(), NR);
    eprintln!(
        "regions   1GiB resident: first write to a page (with COW): closed region \
         {closed_first:>7.2?}  open region {open_first:>7.2?}; re-write of a copied page: \
         closed region {closed_again:>7.2?}  open region {open_again:>7.2?}"
    );
    drop(t);
    drop(m);
    // 3. A steady workload of 1-page commits: `hot` writes the same page at every commit,
    //    `pair` alternates between 2 pages in 2 regions, `round4` cycles through 4 pages in
    //    4 regions (each region idle for 3 collects between its writes, so with
    //    CLOSE_AFTER_IDLE_COLLECTS = 2 it is closed and reopened every time).
    for (name, set) in
        [("hot", vec![12345usize]), ("pair", vec![12345, 50000]), ("round4", vec![12345, 50000, 100000, 200000])]
    {
        for kind in [TrackerKind::Uffd, TrackerKind::Regions, TrackerKind::Mprotect] {
            if !usable(kind) {
                continue;
            }
            let m = TestMap::new_sparse(PAGES);
            touch_all(&m);
            let mut t = arm(Some(kind), m.base, m.len).unwrap();
            for &p in &set {
                m.write(p, 0); // copy-on-write once, outside the measurement
            }
            let mut v = Vec::new();
            t.collect(&mut v).unwrap();
            let mut times = Vec::with_capacity(COMMITS);
            for i in 0..COMMITS {
                let p = set[i % set.len()];
                v.clear();
                let t0 = Instant::now();
                m.write(p, i as u8);
                t.collect(&mut v).unwrap();
                times.push(t0.elapsed());
                assert_eq!(v, vec![p]);
            }
            let [min, med, p90] = spread(&mut times);
            let mean = times.iter().sum::<Duration>() / COMMITS as u32;
            eprintln!(
                "{:9} 1GiB steady {name:>6}: write+collect per 1-page commit min {min:>8.2?} \
                 median {med:>8.2?} p90 {p90:>8.2?} mean {mean:>8.2?}",
                kind.name()
            );
        }
    }
}

impl TestMap {
    /// Like `new`, but the file is sparse (all zeros) so a 1 GiB map is quick to make.
    fn new_sparse(pages: usize) -> TestMap {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "fams-tracker-timing-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        let len = pages * PAGE_SIZE;
        f.set_len(len as u64).unwrap();
        TestMap { base: map_file(&f, len), len, path }
    }
}
