//! The `mprotect` tracker: `PROT_READ` + a `SIGSEGV` handler (Ken's way).
//!
//! Arming makes the range `PROT_READ`. The first write to a page faults (`SIGSEGV`, `si_code =
//! SEGV_ACCERR`); the process-wide handler (`segv.rs`, shared with the `regions` tracker) finds
//! the tracked range containing `si_addr`, sets the page's bit in that range's bitmap and makes
//! the page `PROT_READ|PROT_WRITE`; the faulting write is then retried and succeeds. `collect`
//! swaps the bitmap words to zero, reports the set bits and makes each run of consecutive dirty
//! pages `PROT_READ` again with one `mprotect` call.
//!
//! Invariant (outside the short windows inside the handler and `collect`): every page of a
//! tracked range that is writable has its bit set. Error paths keep it: when the handler cannot
//! unprotect one page (VMA limit, `vm.max_map_count`) it marks *every* page dirty and unprotects
//! the whole range (one VMA again); when `collect` cannot re-protect a run it tries the whole
//! range, and failing that sets the bits of the pages it left writable again, so nothing written
//! is ever lost, at worst reported more than once.
//!
//! The global table, the handler, its async-signal-safety and its chaining to the previous
//! `SIGSEGV` handler are described in `segv.rs`.

use std::io;
use std::sync::atomic::Ordering::SeqCst;

use super::segv::SegvRange;
use super::{runs, DirtyTracker, TrackerKind, PAGE_SIZE};

/// Dirty tracking of one range with `mprotect` + `SIGSEGV`.
pub(super) struct MprotectTracker {
    /// The range in the handler's table, one unit per page; a set bit means "written".
    /// Dropping it restores `PROT_READ|PROT_WRITE` and withdraws the range.
    pages: SegvRange,
    base: usize,
    len: usize,
}

impl MprotectTracker {
    pub(super) fn arm(base: usize, len: usize) -> io::Result<MprotectTracker> {
        let pages = SegvRange::publish(TrackerKind::Mprotect, base, len, PAGE_SIZE.trailing_zeros())?;
        // From here on, dropping `t` withdraws the range and frees the bitmap.
        let t = MprotectTracker { pages, base, len };
        // Removes write access from the caller's mapping [base, base+len); any write to it now
        // faults into the handler, which finds this published range and restores access.
        t.pages.protect_all()?;
        Ok(t)
    }

    /// `mprotect(PROT_READ)` of pages `[first, first + n)` of the range.
    fn protect(&self, first: usize, n: usize) -> bool {
        self.pages.protect(first, n, nix::sys::mman::ProtFlags::PROT_READ)
    }
}

impl DirtyTracker for MprotectTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Mprotect
    }

    fn collect(&mut self, out: &mut Vec<usize>) -> io::Result<()> {
        let from = out.len();
        // First take the bits, then re-protect: a page written between the two (only possible
        // with a concurrent writer, which the heap does not have) is reported now and, being
        // read-only again afterwards, faults and is seen again on its next write.
        for (w, word) in self.pages.words().iter().enumerate() {
            if word.load(SeqCst) == 0 {
                continue;
            }
            let mut v = word.swap(0, SeqCst);
            while v != 0 {
                out.push(w * 64 + v.trailing_zeros() as usize);
                v &= v - 1;
            }
        }
        let mut failed_at = None;
        for (first, n) in runs(&out[from..]) {
            if !self.protect(first, n) {
                failed_at = Some(first);
                break;
            }
        }
        let Some(first_failed) = failed_at else { return Ok(()) };
        let e = io::Error::last_os_error();
        // Probably ENOMEM (vm.max_map_count): protect the whole range in one call instead, which
        // also merges its VMAs. Every writable page was in `out`, so afterwards all are clean.
        if self.protect(0, self.len / PAGE_SIZE) {
            return Ok(());
        }
        // Give up, but lose nothing: pages we could not re-protect stay writable, so keep them
        // marked dirty (they will be reported again next time).
        for &p in out[from..].iter().filter(|&&p| p >= first_failed) {
            self.pages.set(p);
        }
        Err(io::Error::new(
            e.kind(),
            format!(
                "mprotect dirty tracker: re-protecting dirty pages of {:#x}+{:#x} failed: {e} \
                 (vm.max_map_count too low?)",
                self.base, self.len
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::segv::MAX_TRACKERS;
    use super::super::test_util::{anon, at, in_child, max_map_count};
    use super::*;
    use nix::sys::mman::{mprotect, munmap, ProtFlags};
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::ptr;

    fn run_child(name: &str) -> std::process::ExitStatus {
        super::super::test_util::run_child(module_path!(), name)
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let a = anon(8);
        let t = MprotectTracker::arm(a, 8 * PAGE_SIZE).unwrap();
        let e = MprotectTracker::arm(a + 4 * PAGE_SIZE, PAGE_SIZE).err().expect("overlap");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        drop(t);
        // Free again after drop.
        let t = MprotectTracker::arm(a + 4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        drop(t);
        // SAFETY: unmapping our own mapping, no tracker left on it.
        let _ = unsafe { munmap(at(a), 8 * PAGE_SIZE) };
    }

    #[test]
    fn table_fills_up_and_frees() {
        let st = run_child("child_table_fills_up_and_frees");
        assert!(st.success(), "{st:?}");
    }

    #[test]
    #[ignore]
    fn child_table_fills_up_and_frees() {
        if !in_child() {
            return;
        }
        // Regions trackers share the table: every other slot holds one where uffd works.
        let regions = super::super::uffd_available().is_ok();
        let arm_kind = |i: usize, addr: usize| -> io::Result<Box<dyn DirtyTracker>> {
            if regions && i % 2 == 1 {
                Ok(Box::new(super::super::regions::RegionsTracker::arm(addr, PAGE_SIZE)?))
            } else {
                Ok(Box::new(MprotectTracker::arm(addr, PAGE_SIZE)?))
            }
        };
        let a = anon(MAX_TRACKERS + 1);
        let mut held = Vec::new();
        for i in 0..MAX_TRACKERS {
            held.push(arm_kind(i, a + i * PAGE_SIZE).expect("slot"));
        }
        for i in [0, 1] {
            let e = arm_kind(i, a + MAX_TRACKERS * PAGE_SIZE).err().expect("the table must be full");
            assert!(e.to_string().contains("at most 16"), "{e}");
        }
        // Writes to all held ranges are tracked by the right tracker.
        for i in (0..MAX_TRACKERS).rev() {
            // SAFETY: inside our live mapping.
            unsafe { ptr::write_volatile((a + i * PAGE_SIZE + 8) as *mut u8, 1) };
        }
        for (i, t) in held.iter_mut().enumerate() {
            let mut v = Vec::new();
            t.collect(&mut v).unwrap();
            assert_eq!(v, vec![0], "tracker {i} ({})", t.kind().name());
        }
        held.remove(5);
        let t = MprotectTracker::arm(a + MAX_TRACKERS * PAGE_SIZE, PAGE_SIZE).expect("a freed slot is reusable");
        assert_eq!(t.pages.slot(), 5);
    }

    /// What the SIGSEGV disposition is before the first tracker installs ours.
    #[derive(Clone, Copy)]
    enum Before {
        /// Whatever the Rust runtime installed (its stack-overflow handler).
        Runtime,
        /// SIG_DFL: our handler must restore it and let the fault kill the process.
        Default,
        /// A SA_SIGINFO handler that exits with status 42: ours must call it.
        Custom,
    }

    extern "C" fn exit_42(_: std::ffi::c_int, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {
        // raw libc: nix has no wrapper for _exit(2) (std's exit is not async-signal-safe).
        // SAFETY: _exit is async-signal-safe and ends this disposable test child.
        unsafe { libc::_exit(42) }
    }

    /// Arm, check tracking works, then write to a read-only page of ours that is not tracked.
    fn stray_fault(before: Before) {
        if !in_child() {
            return;
        }
        let act = match before {
            Before::Runtime => None,
            Before::Default => Some(SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty())),
            Before::Custom => {
                Some(SigAction::new(SigHandler::SigAction(exit_42), SaFlags::SA_SIGINFO, SigSet::empty()))
            }
        };
        if let Some(act) = act {
            // SAFETY: installing a valid action in a child process that has no tracker yet.
            unsafe { sigaction(Signal::SIGSEGV, &act) }.unwrap();
        }
        let a = anon(2);
        let mut t = MprotectTracker::arm(a, PAGE_SIZE).unwrap();
        // SAFETY: page 0 is tracked and writable through the handler.
        unsafe { ptr::write_volatile(a as *mut u8, 1) };
        let mut v = Vec::new();
        t.collect(&mut v).unwrap();
        assert_eq!(v, vec![0]);
        // SAFETY: page 1 is ours but not tracked; make it read-only so the write below is a
        // genuine protection fault (SEGV_ACCERR) that is not ours.
        unsafe { mprotect(at(a + PAGE_SIZE), PAGE_SIZE, ProtFlags::PROT_READ) }.unwrap();
        eprintln!("about to fault outside any tracked range");
        // SAFETY: deliberately faulting; this process is a disposable test child.
        unsafe { ptr::write_volatile((a + PAGE_SIZE) as *mut u8, 1) };
        eprintln!("survived a stray write fault: BUG");
        std::process::exit(0);
    }

    #[test]
    #[ignore]
    fn child_stray_fault_runtime() {
        stray_fault(Before::Runtime);
    }

    #[test]
    #[ignore]
    fn child_stray_fault_default() {
        stray_fault(Before::Default);
    }

    #[test]
    #[ignore]
    fn child_stray_fault_custom() {
        stray_fault(Before::Custom);
    }

    #[test]
    fn stray_faults_chain_to_the_previous_handler() {
        use std::os::unix::process::ExitStatusExt;
        let st = run_child("child_stray_fault_runtime");
        assert_eq!(st.signal(), Some(Signal::SIGSEGV as i32), "runtime handler: {st:?}");
        let st = run_child("child_stray_fault_default");
        assert_eq!(st.signal(), Some(Signal::SIGSEGV as i32), "SIG_DFL: {st:?}");
        let st = run_child("child_stray_fault_custom");
        assert_eq!(st.code(), Some(42), "custom handler: {st:?}");
    }

    #[test]
    fn vma_limit_falls_back_to_whole_range() {
        let st = run_child("child_vma_limit");
        assert!(st.success(), "{st:?}");
    }

    #[test]
    #[ignore]
    fn child_vma_limit() {
        if !in_child() {
            return;
        }
        let max = max_map_count();
        // Every other page written: each isolated writable page needs two more VMAs, so
        // `max` pages is more than enough to hit the limit.
        let pages = max + 1000;
        let a = anon(pages);
        let mut t = MprotectTracker::arm(a, pages * PAGE_SIZE).unwrap();
        for p in (0..pages).step_by(2) {
            // SAFETY: inside our live mapping.
            unsafe { ptr::write_volatile((a + p * PAGE_SIZE) as *mut u8, 1) };
        }
        let mut v = Vec::new();
        t.collect(&mut v).unwrap();
        // The handler hit the limit and fell back to "all dirty": a superset of what was written,
        // still ascending and unique.
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert!((0..pages).step_by(2).all(|p| v.binary_search(&p).is_ok()));
        assert_eq!(v.len(), pages, "expected the whole-range fallback to report every page");
        // ...and everything is protected again, exactly.
        v.clear();
        t.collect(&mut v).unwrap();
        assert!(v.is_empty(), "{} pages", v.len());
        // SAFETY: inside our live mapping.
        unsafe { ptr::write_volatile((a + 7 * PAGE_SIZE) as *mut u8, 1) };
        t.collect(&mut v).unwrap();
        assert_eq!(v, vec![7]);
        eprintln!("vm.max_map_count {max}: fallback worked");
    }
}
