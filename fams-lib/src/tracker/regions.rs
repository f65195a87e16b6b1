//! The `regions` tracker: userfaultfd WP-async page tracking, gated per 2 MiB region by
//! `mprotect` so that `collect` scans only the regions written recently (Linux >= 6.7).
//!
//! The `uffd` tracker's `collect` walks the page tables of the whole heap, so its cost grows with
//! the heap, not with what was written (about 0.2 ms per GiB with one dirty page). The `mprotect`
//! tracker's `collect` is cheap with few dirty pages but every first write to a page is a signal.
//! This tracker combines them at two granularities:
//!
//! * **Pages** are tracked exactly as by the `uffd` tracker (`uffd.rs`, which this tracker
//!   reuses): the whole range is registered with a userfaultfd in WP-async mode (+
//!   `WP_UNPOPULATED`) and write-protected; the kernel marks a page written on its first write.
//! * **Regions** of [`REGION_BYTES`] (2 MiB = 512 pages; the last one may be shorter) are *open*
//!   or *closed*. A closed region is `PROT_READ`; an open one is `PROT_READ|PROT_WRITE`. All
//!   start closed. The first write into a closed region raises `SIGSEGV`; the process-wide
//!   handler (`segv.rs`, shared with the `mprotect` tracker, one unit = one region) sets the
//!   region's bit in an atomic bitmap ("open") and makes the region writable; the write is
//!   retried, takes the userfaultfd write-protect fault, which the kernel resolves by itself,
//!   marking the page written.
//!
//! `collect` runs `PAGEMAP_SCAN` (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category
//! `PAGE_IS_WRITTEN`) over the open regions only, adjacent open regions merged into one scan
//! range, and reports the written pages ascending (the scan write-protects them again). Then,
//! for every open region: a region with no written page in this collect and in the previous
//! [`CLOSE_AFTER_IDLE_COLLECTS`] collects is closed again (`PROT_READ`, adjacent ones with one
//! `mprotect`); busy regions stay open, so a region written at every commit costs about a
//! microsecond of scan per commit and no signal.
//!
//! # Why a written page is never missed
//!
//! `collect` scans only open regions, so every page written since the previous collect must lie
//! in an open region when `collect` runs:
//! - a write from user space into a closed region faults, and the handler sets the region's bit
//!   *before* it makes the region writable, so a region that can be written is open;
//! - a write by the kernel into a closed region fails with `EFAULT` (the kernel does not raise
//!   `SIGSEGV` for its own accesses, exactly as with the `mprotect` tracker), so it writes
//!   nothing; into an open region it is tracked by the userfaultfd like any write;
//! - a region is closed only at the end of a `collect` whose scan covered it and found nothing
//!   (so all its pages are write-protected), and it is made `PROT_READ` in the same step.
//!
//! Under the heap's rule that nothing writes to the range while `collect` runs, the set reported
//! is exactly the set of pages written, as with the `uffd` tracker. (A thread writing while
//! `collect` closes its region could leave the region writable with its bit clear: its later
//! writes would then not be reported until the region is opened again. The heap's contract rules
//! that out; see "Threads" in `mod.rs`.)
//!
//! # Errors and limits
//! - Opening a region in the handler can fail with `ENOMEM` when splitting the mapping would pass
//!   `vm.max_map_count`: the handler then opens *every* region (whole range `PROT_READ|
//!   PROT_WRITE`, one VMA); page tracking is unaffected, `collect` just scans the whole range
//!   until regions go idle. Only if that fails too is the fault fatal.
//! - Closing regions in `collect` can fail the same way: the regions then stay open (their bits
//!   are set again) and `collect` stops closing for this call; nothing is lost.
//! - A `PAGEMAP_SCAN` failure is returned as the `uffd` tracker returns it (pages may have been
//!   re-protected without being reported; the heap stops).
//! - One slot of the `SIGSEGV` handler's table (16 shared with `mprotect` trackers), and the
//!   `uffd` tracker's requirements: Linux >= 6.7, userfaultfd allowed by seccomp, no working
//!   registration in a `fork(2)` child.

use std::io;
use std::sync::atomic::Ordering::SeqCst;

use super::segv::SegvRange;
use super::uffd::UffdTracker;
use super::{runs, DirtyTracker, TrackerKind, PAGE_SIZE};

/// log2 of [`REGION_BYTES`].
const REGION_SHIFT: u32 = 21;

/// Size of a region, the unit that is opened (`PROT_READ|PROT_WRITE`, on the first write) and
/// closed (`PROT_READ`, when idle): 2 MiB = 512 pages. Scanning one region costs about 1 µs.
pub(super) const REGION_BYTES: usize = 1 << REGION_SHIFT;

/// An open region is closed when none of its pages was written in this collect nor in the
/// previous `CLOSE_AFTER_IDLE_COLLECTS` collects. Keeping an idle region open costs ~0.3 µs of
/// scan per collect; closing and reopening it costs ~10–15 µs, so regions stay open a while: 2
/// made a workload cycling over 4 regions pay a close and reopen on every commit (15 µs), 4
/// brought it to ~3 µs. The price is that after a burst over the whole heap, this many collects
/// scan every region before they close.
pub(super) const CLOSE_AFTER_IDLE_COLLECTS: u8 = 8;

const _: () = assert!(REGION_BYTES & (PAGE_SIZE - 1) == 0 && REGION_BYTES >= PAGE_SIZE);

/// Dirty tracking of one range with userfaultfd WP-async + PAGEMAP_SCAN over mprotect-gated
/// regions.
pub(super) struct RegionsTracker {
    /// Page tracking: the userfaultfd registration and the pagemap scanner. Declared first so it
    /// drops first: dropping it unregisters the range.
    pages: UffdTracker,
    /// Region gates in the `SIGSEGV` handler's table, one unit per region; a set bit means
    /// "open". Dropping it restores `PROT_READ|PROT_WRITE` and frees the slot.
    gates: SegvRange,
    /// log2 of the region size ([`REGION_SHIFT`]; smaller in tests).
    shift: u32,
    /// For each region, how many collects in a row found it open with no written page.
    idle: Vec<u8>,
    /// Scratch: the open regions at the start of a collect, ascending.
    open: Vec<usize>,
    /// Scratch: the regions a collect closes, ascending.
    closing: Vec<usize>,
}

impl RegionsTracker {
    pub(super) fn arm(base: usize, len: usize) -> io::Result<RegionsTracker> {
        Self::arm_with(base, len, REGION_SHIFT)
    }

    /// Arm with regions of `1 << shift` bytes (tests use small regions).
    fn arm_with(base: usize, len: usize, shift: u32) -> io::Result<RegionsTracker> {
        let gates = SegvRange::publish(TrackerKind::Regions, base, len, shift)?;
        // Registers the whole range and write-protects every page: all pages start clean.
        let pages =
            UffdTracker::arm(base, len).map_err(|e| io::Error::new(e.kind(), format!("regions dirty tracker: {e}")))?;
        let nregions = gates.units();
        // From here on, dropping `t` unregisters the range, restores PROT_READ|PROT_WRITE and
        // frees the slot.
        let t = RegionsTracker { pages, gates, shift, idle: vec![0; nregions], open: Vec::new(), closing: Vec::new() };
        // Close every region: any write to the range now faults into the handler, which finds
        // this published range and opens the region.
        t.gates.protect_all()?;
        Ok(t)
    }

    /// Pages per region.
    fn region_pages(&self) -> usize {
        1 << (self.shift - PAGE_SIZE.trailing_zeros())
    }

    /// Close the regions in `self.closing` (ascending), one `mprotect` per run of adjacent ones.
    /// On failure (`ENOMEM`: too many VMAs) this and the remaining runs stay open, and are tried
    /// again at the next collect.
    fn close(&mut self) {
        for (first, n) in runs(&self.closing) {
            // Clear the bits, then make the run read-only. Nothing writes to the range while
            // collect runs (the heap's contract); the module docs say what a writer racing with
            // this could do.
            for r in first..first + n {
                self.gates.clear(r);
            }
            if !self.gates.protect(first, n, nix::sys::mman::ProtFlags::PROT_READ) {
                // Part of the run may be read-only now, part not: mark all of it open again so
                // it is scanned, and a write into a read-only part faults and opens it (again).
                for r in first..first + n {
                    self.gates.set(r);
                }
                return;
            }
            for r in first..first + n {
                self.idle[r] = 0;
            }
        }
    }
}

impl DirtyTracker for RegionsTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Regions
    }

    fn collect(&mut self, out: &mut Vec<usize>) -> io::Result<()> {
        let from = out.len();
        self.open.clear();
        for (w, word) in self.gates.words().iter().enumerate() {
            let mut v = word.load(SeqCst);
            while v != 0 {
                self.open.push(w * 64 + v.trailing_zeros() as usize);
                v &= v - 1;
            }
        }
        // Every page written since the last collect lies in an open region (module docs): scan
        // those, adjacent regions as one range. Pages come out ascending.
        for (first, n) in runs(&self.open) {
            let (start, end) = self.gates.span(first, n);
            self.pages.scan_range(start, end, out)?;
        }
        // Which open regions had no written page, and which of those have been idle long enough.
        self.closing.clear();
        let per_region = self.region_pages();
        let mut i = from;
        for &r in &self.open {
            let end_page = (r + 1) * per_region;
            let written = i < out.len() && out[i] < end_page;
            while i < out.len() && out[i] < end_page {
                i += 1;
            }
            if written {
                self.idle[r] = 0;
            } else if self.idle[r] >= CLOSE_AFTER_IDLE_COLLECTS {
                self.closing.push(r);
            } else {
                self.idle[r] += 1;
            }
        }
        debug_assert_eq!(i, out.len(), "a reported page outside the open regions");
        if !self.closing.is_empty() {
            self.close();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{anon, in_child, is_writable, max_map_count, run_child as run_child_in};
    use super::*;
    use std::ptr;

    fn run_child(name: &str) -> std::process::ExitStatus {
        run_child_in(module_path!(), name)
    }

    fn skip() -> bool {
        if let Err(why) = super::super::uffd_available() {
            eprintln!("skipping regions test: {why}");
            return true;
        }
        false
    }

    fn write(base: usize, page: usize) {
        // SAFETY: callers pass pages inside their live RW mapping.
        unsafe { ptr::write_volatile((base + page * PAGE_SIZE + 9) as *mut u8, 1) };
    }

    fn collect(t: &mut RegionsTracker) -> Vec<usize> {
        let mut v = Vec::new();
        t.collect(&mut v).expect("collect");
        v
    }

    fn open_regions(t: &RegionsTracker) -> Vec<usize> {
        (0..t.gates.units()).filter(|&r| t.gates.words()[r / 64].load(SeqCst) & (1 << (r % 64)) != 0).collect()
    }

    /// Regions of 4 pages: bits, protection and idle closing follow the writes exactly.
    #[test]
    fn regions_open_and_close_exactly() {
        if skip() {
            return;
        }
        const PAGES: usize = 4 * 6 + 2; // six regions of 4 pages and a last one of 2
        let a = anon(PAGES);
        let mut t = RegionsTracker::arm_with(a, PAGES * PAGE_SIZE, 14).unwrap();
        assert_eq!(t.gates.units(), 7);
        assert!(open_regions(&t).is_empty());
        assert!((0..PAGES).all(|p| !is_writable(a + p * PAGE_SIZE)), "all closed at arming");
        // Boundaries: last page of region 0, first of 1, and both pages of the short last one.
        for p in [3, 4, 24, 25] {
            write(a, p);
        }
        assert_eq!(open_regions(&t), vec![0, 1, 6]);
        assert!(is_writable(a + 7 * PAGE_SIZE) && !is_writable(a + 8 * PAGE_SIZE));
        assert_eq!(collect(&mut t), vec![3, 4, 24, 25]);
        // Region 1 stays busy; 0 and 6 go idle and close on the third idle collect.
        for round in 0..=CLOSE_AFTER_IDLE_COLLECTS {
            assert_eq!(open_regions(&t), vec![0, 1, 6], "round {round}");
            write(a, 5);
            assert_eq!(collect(&mut t), vec![5], "round {round}");
        }
        assert_eq!(open_regions(&t), vec![1]);
        assert!(!is_writable(a) && !is_writable(a + 25 * PAGE_SIZE));
        assert!(is_writable(a + 4 * PAGE_SIZE));
        // A write into a closed region is seen across the close.
        write(a, 2);
        write(a, 9);
        write(a, 6);
        assert_eq!(open_regions(&t), vec![0, 1, 2]);
        assert_eq!(collect(&mut t), vec![2, 6, 9]);
        // Regions 0..=2 go idle together and close together (one mprotect); then everything
        // is closed.
        for _ in 0..=CLOSE_AFTER_IDLE_COLLECTS {
            assert_eq!(open_regions(&t), vec![0, 1, 2]);
            assert_eq!(collect(&mut t), Vec::<usize>::new());
        }
        assert!(open_regions(&t).is_empty());
        assert!((0..PAGES).all(|p| !is_writable(a + p * PAGE_SIZE)));
        // A write straddling a region boundary opens both regions and reports both pages.
        let buf = [7u8; 64];
        // SAFETY: 64 bytes across the boundary between pages 11 and 12, inside our mapping.
        unsafe { ptr::copy_nonoverlapping(buf.as_ptr(), (a + 12 * PAGE_SIZE - 32) as *mut u8, 64) };
        assert_eq!(open_regions(&t), vec![2, 3]);
        assert_eq!(collect(&mut t), vec![11, 12]);
        drop(t);
        assert!((0..PAGES).all(|p| is_writable(a + p * PAGE_SIZE)), "drop restores RW");
        // SAFETY: unmapping our own mapping; the tracker is gone.
        let _ = unsafe { nix::sys::mman::munmap(super::super::test_util::at(a), PAGES * PAGE_SIZE) };
    }

    #[test]
    fn regions_share_the_table_with_mprotect() {
        if skip() {
            return;
        }
        let a = anon(8);
        let t = RegionsTracker::arm(a, 8 * PAGE_SIZE).unwrap();
        let e = super::super::mprotect::MprotectTracker::arm(a + 4 * PAGE_SIZE, PAGE_SIZE).err().expect("overlap");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let e = RegionsTracker::arm(a, PAGE_SIZE).err().expect("overlap");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().starts_with("regions dirty tracker"), "{e}");
        drop(t);
        // SAFETY: unmapping our own mapping; the tracker is gone.
        let _ = unsafe { nix::sys::mman::munmap(super::super::test_util::at(a), 8 * PAGE_SIZE) };
    }

    #[test]
    fn regions_vma_limit_falls_back_to_all_open() {
        let st = run_child("child_regions_vma_limit");
        assert!(st.success(), "{st:?}");
    }

    /// One-page regions, every other one written: opening them one by one passes
    /// vm.max_map_count, so the handler opens the whole range; tracking stays exact, and idle
    /// regions close again later.
    #[test]
    #[ignore]
    fn child_regions_vma_limit() {
        if !in_child() || skip() {
            return;
        }
        let max = max_map_count();
        let pages = max + 1000;
        let a = anon(pages);
        let mut t = RegionsTracker::arm_with(a, pages * PAGE_SIZE, PAGE_SIZE.trailing_zeros()).unwrap();
        let want: Vec<usize> = (0..pages).step_by(2).collect();
        for &p in &want {
            write(a, p);
        }
        assert_eq!(open_regions(&t).len(), pages, "the handler's fallback opens every region");
        assert!(is_writable(a + PAGE_SIZE));
        // Page tracking is not affected: exactly the written pages.
        assert!(collect(&mut t) == want, "not exactly the written pages");
        assert_eq!(collect(&mut t), Vec::<usize>::new());
        for _ in 2..CLOSE_AFTER_IDLE_COLLECTS {
            assert_eq!(collect(&mut t), Vec::<usize>::new());
        }
        write(a, 7);
        assert_eq!(collect(&mut t), vec![7]);
        // That collect closed the odd regions (idle for CLOSE_AFTER_IDLE_COLLECTS + 1 collects now) one by one between open
        // even ones, which needs more VMAs than vm.max_map_count allows: closing stopped part
        // way, and the regions it could not close stay open. Tracking is still exact in both.
        let open = open_regions(&t);
        let closed_odd = (1..pages).step_by(2).find(|r| !open.contains(r)).expect("none closed");
        let open_odd = *open.iter().rfind(|&&r| r % 2 == 1 && r != 7).expect("all odd closed");
        assert!(!is_writable(a + closed_odd * PAGE_SIZE));
        write(a, closed_odd);
        write(a, open_odd);
        assert_eq!(collect(&mut t), vec![closed_odd, open_odd]);
        for _ in 0..=CLOSE_AFTER_IDLE_COLLECTS {
            assert_eq!(collect(&mut t), Vec::<usize>::new());
        }
        assert!(open_regions(&t).is_empty(), "idle regions close again");
        assert!(!is_writable(a + 7 * PAGE_SIZE));
        write(a, 9);
        assert_eq!(collect(&mut t), vec![9]);
        eprintln!("vm.max_map_count {max}: regions fallback worked");
    }
}
