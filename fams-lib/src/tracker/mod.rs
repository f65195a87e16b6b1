//! Dirty-page tracking over one fixed mapping.
//!
//! The persistent heap is mapped `MAP_PRIVATE`, so nothing the program writes reaches the heap
//! file until `commit()` copies it there. To commit, the heap must know *which* pages were written
//! since the previous commit. A [`DirtyTracker`] answers that question for one fixed range
//! `[base, base + len)`: [`DirtyTracker::collect`] returns the pages written since the previous
//! call and re-arms them, so the next write to each of them is seen again.
//!
//! # Why three trackers
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
//!     ours is still in place). At most 16 `mprotect` and `regions` trackers together may be
//!     alive at once (they share the handler's table, `segv.rs`).
//!
//! * **`regions`** (Linux >= 6.7; opt-in): `uffd` page tracking, gated per region of
//!   2 MiB (512 pages) by `mprotect`, so that `collect` scans only recently written regions.
//!   All regions start *closed* (`PROT_READ`, and every page write-protected by the userfaultfd).
//!   The first write into a closed region raises `SIGSEGV`; the shared handler marks the region
//!   *open* and makes it `PROT_READ|PROT_WRITE`; the retried write takes the WP-async fault and
//!   the kernel marks the page written. `collect` is `PAGEMAP_SCAN` over the open regions only
//!   (adjacent ones merged into one range); a region with no written page in this collect and
//!   the previous 2 is closed again (adjacent ones with one `mprotect`). See `regions.rs`.
//!   - Cost (same machine): a region written at every commit costs about 1 µs of scan per
//!     commit and no signal; `collect` with one dirty page costs about 1 µs for a 64 MiB or a
//!     1 GiB heap (uffd: 10 µs and 160–200 µs). The first write into a closed region costs a
//!     signal and an `mprotect` of 2 MiB, 6–8 µs (up to ~20 µs) on top of the uffd fault, and
//!     closing it again later another `mprotect`; a commit pattern that comes back to a region
//!     only every 4th commit or less often pays both at every return (measured 14–16 µs per
//!     1-page commit, more than mprotect's 6.5 µs). Details in kernel-notes/dirty-tracking.md.
//!   - Limits: those of `uffd`, plus those of `mprotect` for closed regions: **kernel writes
//!     into a closed region fail with `EFAULT`** (into an open region they are tracked), and
//!     one slot of the shared `SIGSEGV` table. Opening or closing regions can hit
//!     `vm.max_map_count` only with more than ~32k alternately open regions (64 GiB): the
//!     handler then opens the whole range, and `collect` keeps regions it cannot close open.
//!
//! `arm(None, …)` picks `uffd` when [`uffd_available`] says it works, otherwise `mprotect`.
//! `regions` is only used when asked for.
//!
//! # Threads
//!
//! The heap is single-threaded: for a given tracker, no thread writes to its range while
//! `arm`, `collect` or `drop` runs on it. Writes may come from any thread at other times. Broken,
//! this costs the exactness of what `collect` reports, and for the mprotect and regions trackers
//! a write racing with `drop` may be taken for a stray fault (see `segv.rs`); for the regions
//! tracker, a write racing with a `collect` that closes its region can leave that region
//! writable but marked closed, so later writes to it go unreported until it is reopened (see
//! `regions.rs`). Independently of it, the shared `SIGSEGV` table of the mprotect and regions
//! trackers is safe against signal handlers running on other threads (for other ranges, or for
//! stray faults) while trackers are armed or dropped: no torn or freed state is ever read.

use std::io;
use std::str::FromStr;

mod mprotect;
mod regions;
mod segv;
#[cfg(test)]
mod test_util;
mod uffd;

/// The granularity of tracking, in bytes: the heap's page. Page indices reported by
/// [`DirtyTracker::collect`] are in units of this size, relative to the tracked base.
pub use crate::heap_file::PAGE_SIZE;

/// Which mechanism a tracker uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect async mode + `PAGEMAP_SCAN` (Linux >= 6.7).
    Uffd,
    /// `mprotect` + `SIGSEGV` handler (any Linux).
    Mprotect,
    /// userfaultfd WP-async + `PAGEMAP_SCAN` over the 2 MiB regions written recently, the others
    /// gated by `mprotect` + `SIGSEGV` (Linux >= 6.7). Never picked by default.
    Regions,
}

impl TrackerKind {
    /// The name used in configuration, statistics and error messages: `"uffd"`, `"mprotect"`
    /// or `"regions"`.
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Uffd => "uffd",
            TrackerKind::Mprotect => "mprotect",
            TrackerKind::Regions => "regions",
        }
    }
}

impl FromStr for TrackerKind {
    type Err = String;

    /// Parses `"uffd"`, `"mprotect"` or `"regions"` (ASCII case-insensitive, surrounding spaces
    /// ignored).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        [TrackerKind::Uffd, TrackerKind::Mprotect, TrackerKind::Regions]
            .into_iter()
            .find(|k| t.eq_ignore_ascii_case(k.name()))
            .ok_or_else(|| {
                format!(
                    "unknown dirty tracker {s:?}: valid values are \"uffd\", \"mprotect\" and \
                     \"regions\""
                )
            })
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

/// Stands in for a tracker that could not be re-armed (see `Heap::grow`): every collect fails,
/// so nothing is ever committed from a range whose writes are not seen.
pub(crate) struct Broken(pub String);

impl DirtyTracker for Broken {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Mprotect
    }
    fn collect(&mut self, _out: &mut Vec<usize>) -> io::Result<()> {
        Err(io::Error::other(self.0.clone()))
    }
}

/// Is the uffd WP-async + PAGEMAP_SCAN mechanism usable in this process? (probe once on a small
/// anonymous scratch mapping; cache the answer in a OnceLock). Err carries a human-readable reason.
pub fn uffd_available() -> Result<(), String> {
    uffd::available()
}

/// Start tracking writes to [base, base+len) (base and len multiples of 4096; the mapping already
/// exists, PROT_READ|PROT_WRITE, MAP_PRIVATE of a file, with MADV_NOHUGEPAGE already applied).
/// `kind = None` picks Uffd when `uffd_available()`, otherwise Mprotect (never Regions).
/// `Some(k)` forces k and fails with a clear error if unavailable (Regions needs what Uffd
/// needs). All pages start clean (armed).
/// Dropping the tracker stops tracking (unregister uffd / restore PROT_READ|PROT_WRITE and
/// uninstall the range from the signal handler).
///
/// # Safety
/// `[base, base+len)` must be a mapping the caller owns, as described above, and the caller keeps
/// it alive (not unmapped, not remapped) for as long as the tracker lives, dropping the tracker
/// before unmapping: arming write-protects the range and (for the mprotect tracker) installs a
/// SIGSEGV handler that writes to it, so any other memory there would be corrupted.
pub unsafe fn arm(kind: Option<TrackerKind>, base: *mut u8, len: usize) -> io::Result<Box<dyn DirtyTracker>> {
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
    if matches!(kind, TrackerKind::Uffd | TrackerKind::Regions) {
        if let Err(why) = uffd_available() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("dirty tracker \"{}\" is not available here: {why}", kind.name()),
            ));
        }
    }
    match kind {
        TrackerKind::Uffd => Ok(Box::new(uffd::UffdTracker::arm(addr, len)?)),
        TrackerKind::Mprotect => Ok(Box::new(mprotect::MprotectTracker::arm(addr, len)?)),
        TrackerKind::Regions => Ok(Box::new(regions::RegionsTracker::arm(addr, len)?)),
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
mod tests;
