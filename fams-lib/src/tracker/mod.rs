//! Dirty-page tracking over one fixed mapping.
//!
//! The persistent heap is mapped `MAP_PRIVATE`, so nothing the program writes reaches the heap
//! file until `commit()` copies it there. To commit, the heap must know *which* pages were written
//! since the previous commit. A [`DirtyTracker`] answers that question for one fixed range
//! `[base, base + len)`: [`DirtyTracker::collect`] returns the pages written since the previous
//! call and re-arms them, so the next write to each of them is seen again.
//!
//! # Why two trackers
//!
//! * **`uffd`** (preferred, Linux >= 6.7): the range is registered with a userfaultfd in
//!   write-protect *async* mode (`UFFD_FEATURE_WP_ASYNC`, plus `UFFD_FEATURE_WP_UNPOPULATED` so
//!   pages that were never touched are protected too). The kernel resolves the first write to a
//!   protected page by itself, with no round trip to user space, and remembers that the page was
//!   written. `collect` is one `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` that returns the
//!   written ranges and write-protects them again, atomically per page table.
//!   - Cost (measured on the project VM, 1 GiB mapping): the first write to a page is a fault
//!     resolved inside the kernel, about 0.9 µs on top of whatever the write costs anyway (the
//!     copy-on-write of a private file page, 4–6 µs here, is paid once per page with or without
//!     tracking). `collect` walks the page tables of the whole range, so it costs about
//!     0.2–0.7 ms per GiB mapped even with one dirty page (0.4 ms for a 1 GiB range that is not
//!     resident at all), plus 0.02–0.1 µs per dirty page. Arming protects every page-table entry
//!     of the range: 3–4 ms per GiB, and page tables for the whole range (2 MiB per GiB).
//!   - Writes made by the kernel on the program's behalf (`read(2)`/`pread(2)` into heap memory,
//!     `recv(2)` into a heap buffer, …) are tracked like any other write.
//!   - Limits: needs Linux >= 6.7 (`WP_ASYNC`; `PAGEMAP_SCAN`) and a userfaultfd that seccomp
//!     lets through; we open it with `UFFD_USER_MODE_ONLY`, which works even when
//!     `vm.unprivileged_userfaultfd = 0`. Transparent huge pages coarsen tracking to 2 MiB, which is
//!     why the heap applies `MADV_NOHUGEPAGE`. The registration belongs to this process: a child
//!     created by `fork(2)` does not inherit a working tracker.
//!
//! * **`mprotect`** (fallback, any Linux; this is how HP Labs' Ken did it): the whole range is made
//!   `PROT_READ`. The first write to a page raises `SIGSEGV`; a process-wide signal handler records
//!   the page in a bitmap and makes that page `PROT_READ|PROT_WRITE` again, and the write is
//!   retried. `collect` swaps the bitmap to zero and makes each run of dirty pages `PROT_READ`
//!   again (one `mprotect` per run of consecutive pages).
//!   - Cost (same machine): the first write to a page is a signal delivery, a handler and an
//!     `mprotect` system call, about 4.5–5.5 µs on top of the write itself (10–16 µs for a first
//!     write that also copies the page). `collect` costs one bitmap scan (8 bytes per 64 pages:
//!     about 3 µs per GiB with one dirty page) plus one `mprotect` per run of dirty pages. Every
//!     isolated dirty page splits the mapping's VMA in up to three, so re-protecting many
//!     scattered pages is slow: 10 ms for 4000 scattered pages (uffd: 0.7 ms).
//!   - Limits: **kernel writes into the range are not tracked, they fail**: a `read(2)` into heap
//!     memory returns `EFAULT` (the kernel does not raise `SIGSEGV` for its own accesses to user
//!     memory), so the program must read into a buffer outside the heap and copy. VMA splitting
//!     is bounded by `vm.max_map_count` (65530 by default): with too many scattered dirty pages
//!     `mprotect` fails with `ENOMEM`; the handler and `collect` then fall back to protecting or
//!     unprotecting the whole range at once (all pages are then reported dirty once), and only
//!     if that fails too does the write fault become fatal. The process's `SIGSEGV` handler is
//!     shared: ours is installed once and chains to whatever handler was installed before it;
//!     a handler installed later that does not chain to ours breaks tracking (arming checks that
//!     ours is still in place). At most 16 trackers of this kind may be alive at once.
//!
//! `arm(None, …)` picks `uffd` when [`uffd_available`] says it works, otherwise `mprotect`.
//!
//! # Threads
//!
//! The heap is single-threaded: for a given tracker, no thread writes to its range while
//! `arm`, `collect` or `drop` runs on it. Writes may come from any thread at other times. Broken,
//! this costs the exactness of what `collect` reports, and for the mprotect tracker a write racing
//! with `drop` may be taken for a stray fault (see `mprotect.rs`). Independently of it, the
//! mprotect tracker's global table is safe against signal handlers running on other threads (for
//! other ranges, or for stray faults) while trackers are armed or dropped: no torn or freed state
//! is ever read.

use std::io;
use std::str::FromStr;

mod mprotect;
mod uffd;

/// The granularity of tracking, in bytes. Page indices reported by [`DirtyTracker::collect`] are
/// in units of this size, relative to the tracked base.
pub const PAGE_SIZE: usize = 4096;

/// Which mechanism a tracker uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect async mode + `PAGEMAP_SCAN` (Linux >= 6.7).
    Uffd,
    /// `mprotect` + `SIGSEGV` handler (any Linux).
    Mprotect,
}

impl TrackerKind {
    /// The name used in configuration, statistics and error messages: `"uffd"` or `"mprotect"`.
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Uffd => "uffd",
            TrackerKind::Mprotect => "mprotect",
        }
    }
}

impl FromStr for TrackerKind {
    type Err = String;

    /// Parses `"uffd"` or `"mprotect"` (ASCII case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("uffd") {
            Ok(TrackerKind::Uffd)
        } else if t.eq_ignore_ascii_case("mprotect") {
            Ok(TrackerKind::Mprotect)
        } else {
            Err(format!("unknown dirty tracker {s:?}: valid values are \"uffd\" and \"mprotect\""))
        }
    }
}

/// Tracks writes to one fixed range of memory. Created by [`arm`]; dropping it stops tracking.
pub trait DirtyTracker: Send {
    /// The mechanism behind this tracker.
    fn kind(&self) -> TrackerKind;

    /// Append to `out` the indices (relative to the tracked base, in units of PAGE_SIZE = 4096)
    /// of every page written since the previous collect (or since arming), ascending, each once,
    /// and re-arm them so the next write is seen again. Atomic with respect to the caller's thread
    /// (the heap is single-threaded: no concurrent writers while collect runs).
    ///
    /// On error, some pages may have been re-armed without being reported (or reported without
    /// being re-armed): the caller must not trust this interval's answer and should treat every
    /// page as dirty (or stop using the heap).
    fn collect(&mut self, out: &mut Vec<usize>) -> io::Result<()>;
}

/// Is the uffd WP-async + PAGEMAP_SCAN mechanism usable in this process? (probe once on a small
/// anonymous scratch mapping; cache the answer in a OnceLock). Err carries a human-readable reason.
pub fn uffd_available() -> Result<(), String> {
    uffd::available()
}

/// Start tracking writes to [base, base+len) (base and len multiples of 4096; the mapping already
/// exists, PROT_READ|PROT_WRITE, MAP_PRIVATE of a file, with MADV_NOHUGEPAGE already applied).
/// `kind = None` picks Uffd when `uffd_available()`, otherwise Mprotect. `Some(k)` forces k and
/// fails with a clear error if unavailable. All pages start clean (armed).
/// Dropping the tracker stops tracking (unregister uffd / restore PROT_READ|PROT_WRITE and
/// uninstall the range from the signal handler).
///
/// The caller keeps the mapping alive (not unmapped, not remapped) for as long as the tracker
/// lives, and drops the tracker before unmapping.
pub fn arm(
    kind: Option<TrackerKind>,
    base: *mut u8,
    len: usize,
) -> io::Result<Box<dyn DirtyTracker>> {
    let addr = base as usize;
    if base.is_null() || addr & (PAGE_SIZE - 1) != 0 || len & (PAGE_SIZE - 1) != 0 || len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "dirty tracker: range {addr:#x}+{len:#x} must be non-empty, non-null and \
                 {PAGE_SIZE}-byte aligned"
            ),
        ));
    }
    if addr.checked_add(len).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("dirty tracker: range {addr:#x}+{len:#x} wraps the address space"),
        ));
    }
    let kind = match kind {
        Some(k) => k,
        None if uffd_available().is_ok() => TrackerKind::Uffd,
        None => TrackerKind::Mprotect,
    };
    match kind {
        TrackerKind::Uffd => {
            if let Err(why) = uffd_available() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("dirty tracker \"uffd\" is not available here: {why}"),
                ));
            }
            Ok(Box::new(uffd::UffdTracker::arm(addr, len)?))
        }
        TrackerKind::Mprotect => Ok(Box::new(mprotect::MprotectTracker::arm(addr, len)?)),
    }
}

/// Turn a sorted list of page indices into runs `(first, count)` of consecutive pages.
fn runs(pages: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pages.len() {
            return None;
        }
        let first = pages[i];
        let mut n = 1;
        while i + n < pages.len() && pages[i + n] == first + n {
            n += 1;
        }
        i += n;
        Some((first, n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A MAP_PRIVATE mapping of a temporary file whose page `i` is filled with byte `fill(i)`.
    struct TestMap {
        base: *mut u8,
        len: usize,
        path: PathBuf,
    }

    fn fill(page: usize) -> u8 {
        (page % 251) as u8 + 1
    }

    impl TestMap {
        fn new(pages: usize) -> TestMap {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "fams-tracker-test-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .expect("create temp file");
            let mut buf = vec![0u8; PAGE_SIZE];
            for p in 0..pages {
                buf.fill(fill(p));
                f.write_all(&buf).expect("fill temp file");
            }
            let len = pages * PAGE_SIZE;
            // SAFETY: mapping a fresh region chosen by the kernel (addr = NULL) of a file we own,
            // of exactly its length; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            // SAFETY: advising the mapping we just created.
            let r = unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
            assert_eq!(r, 0, "madvise: {}", io::Error::last_os_error());
            TestMap { base: p as *mut u8, len, path }
        }

        fn pages(&self) -> usize {
            self.len / PAGE_SIZE
        }

        fn write(&self, page: usize, byte: u8) {
            assert!(page < self.pages());
            // SAFETY: in bounds of our live RW mapping (tracking only intercepts the write).
            unsafe { std::ptr::write_volatile(self.base.add(page * PAGE_SIZE + 17), byte) }
        }

        fn read(&self, page: usize, off: usize) -> u8 {
            assert!(page < self.pages() && off < PAGE_SIZE);
            // SAFETY: in bounds of our live readable mapping.
            unsafe { std::ptr::read_volatile(self.base.add(page * PAGE_SIZE + off)) }
        }

        fn dontneed(&self, page: usize) {
            // SAFETY: drops the private copy of one page of our own mapping; the next access
            // faults the file's page in again.
            let r = unsafe {
                libc::madvise(
                    self.base.add(page * PAGE_SIZE) as *mut libc::c_void,
                    PAGE_SIZE,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(r, 0, "madvise(DONTNEED): {}", io::Error::last_os_error());
        }
    }

    impl Drop for TestMap {
        fn drop(&mut self) {
            // SAFETY: unmapping the region we mapped; every tracker on it was dropped first
            // (trackers are declared after the map in each test, so they drop before it).
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Returns false (after printing why) when `kind` cannot run here. A uffd mechanism that
    /// exists but misbehaves in the availability probe is a failure, not a reason to skip; so is
    /// any unavailability when FAMS_REQUIRE_UFFD is set (for machines known to support it).
    fn usable(kind: TrackerKind) -> bool {
        if kind == TrackerKind::Uffd {
            if let Err(why) = uffd_available() {
                if why.starts_with("probe:") || std::env::var_os("FAMS_REQUIRE_UFFD").is_some() {
                    panic!("uffd tracker unavailable: {why}");
                }
                eprintln!("skipping uffd test: {why}");
                return false;
            }
        }
        true
    }

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
    fn uffd_all_dirty_64() {
        all_dirty(TrackerKind::Uffd, 64);
    }

    #[test]
    fn mprotect_all_dirty_64() {
        all_dirty(TrackerKind::Mprotect, 64);
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
    fn uffd_checkerboard_8192() {
        checkerboard(TrackerKind::Uffd, 8192);
    }

    #[test]
    fn mprotect_checkerboard_8192() {
        checkerboard(TrackerKind::Mprotect, 8192);
    }

    #[test]
    fn uffd_tracks_kernel_writes() {
        if !usable(TrackerKind::Uffd) {
            return;
        }
        let m = TestMap::new(16);
        let mut t = arm(Some(TrackerKind::Uffd), m.base, m.len).expect("arm");
        let f = std::fs::File::open(&m.path).unwrap();
        // SAFETY: reading 100 bytes into page 5 of our live RW mapping.
        let n = unsafe {
            libc::pread(f.as_raw_fd(), m.base.add(5 * PAGE_SIZE) as *mut libc::c_void, 100, 0)
        };
        assert_eq!(n, 100, "pread into tracked memory: {}", io::Error::last_os_error());
        assert_eq!(collect(&mut t), vec![5]);
    }

    #[test]
    fn mprotect_kernel_writes_fail_with_efault() {
        // Documents the limit of the mprotect tracker: the kernel does not fault on our behalf.
        let m = TestMap::new(16);
        let mut t = arm(Some(TrackerKind::Mprotect), m.base, m.len).expect("arm");
        let f = std::fs::File::open(&m.path).unwrap();
        // SAFETY: reading into page 5 of our live mapping (currently PROT_READ: the kernel
        // refuses to write there and fails the call; no memory is touched).
        let n = unsafe {
            libc::pread(f.as_raw_fd(), m.base.add(5 * PAGE_SIZE) as *mut libc::c_void, 100, 0)
        };
        assert_eq!(n, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EFAULT));
        assert_eq!(collect(&mut t), Vec::<usize>::new());
    }

    #[test]
    fn two_trackers_are_independent() {
        for kind in [TrackerKind::Mprotect, TrackerKind::Uffd] {
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
        let mut ta = arm(Some(TrackerKind::Uffd), a.base, a.len).unwrap();
        let mut tb = arm(Some(TrackerKind::Mprotect), b.base, b.len).unwrap();
        a.write(7, 1);
        b.write(0, 1);
        assert_eq!(collect(&mut ta), vec![7]);
        assert_eq!(collect(&mut tb), vec![0]);
    }

    #[test]
    fn many_threads_many_trackers() {
        // Every thread owns one mapping and one mprotect tracker, all alive at once; faults on
        // one thread must never be attributed to another's range.
        let threads: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let m = TestMap::new(128);
                    let mut t = arm(Some(TrackerKind::Mprotect), m.base, m.len).expect("arm");
                    for round in 0..50usize {
                        let want: Vec<usize> =
                            (0..128).filter(|p| (p + round + i) % 7 == 0).collect();
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
        for kind in [TrackerKind::Mprotect, TrackerKind::Uffd] {
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
        for kind in [None, Some(TrackerKind::Mprotect), Some(TrackerKind::Uffd)] {
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
        for kind in [TrackerKind::Mprotect, TrackerKind::Uffd] {
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
        for k in [TrackerKind::Uffd, TrackerKind::Mprotect] {
            assert_eq!(k.name().parse::<TrackerKind>(), Ok(k));
        }
        assert_eq!(" UFFD ".parse::<TrackerKind>(), Ok(TrackerKind::Uffd));
        let e = "softdirty".parse::<TrackerKind>().unwrap_err();
        assert!(e.contains("uffd") && e.contains("mprotect") && e.contains("softdirty"), "{e}");
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
        for kind in [TrackerKind::Uffd, TrackerKind::Mprotect] {
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

    impl TestMap {
        /// Like `new`, but the file is sparse (all zeros) so a 1 GiB map is quick to make.
        fn new_sparse(pages: usize) -> TestMap {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "fams-tracker-timing-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            let len = pages * PAGE_SIZE;
            f.set_len(len as u64).unwrap();
            // SAFETY: as in `new`.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: advising the mapping we just created.
            unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
            TestMap { base: p as *mut u8, len, path }
        }
    }
}
