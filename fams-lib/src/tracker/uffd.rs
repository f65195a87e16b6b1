//! The `uffd` tracker: userfaultfd write-protect in async mode + `PAGEMAP_SCAN` (Linux >= 6.7).
//!
//! Arming: a userfaultfd with `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, the range
//! registered in `UFFDIO_REGISTER_MODE_WP` mode and write-protected with `UFFDIO_WRITEPROTECT`.
//! With `WP_ASYNC` the kernel resolves a write fault on a protected page itself (no message on
//! the userfaultfd, nobody needs to read it): it clears the page's uffd-wp bit and the write goes
//! on. A page is "written" exactly when its uffd-wp bit is clear. Page-table entries with no page
//! behind them (never touched, or dropped with `MADV_DONTNEED`) hold a protection marker instead,
//! so they count as clean and reading them back in keeps them clean; file-backed mappings always
//! get markers, `WP_UNPOPULATED` extends them to anonymous memory (the heap is file-backed, but
//! we ask for it anyway so any mapping behaves the same).
//!
//! Collecting: `PAGEMAP_SCAN` on `/proc/self/pagemap` with `PM_SCAN_WP_MATCHING` returns the
//! ranges whose `PAGE_IS_WRITTEN` category is set and write-protects them again in the same page
//! table walk, under the page-table lock. `PM_SCAN_CHECK_WPASYNC` makes the kernel refuse
//! (`EPERM`) if some part of the range is not registered in async WP mode, instead of silently
//! reporting nothing.
//!
//! The kernel UAPI definitions are not in Debian 12's headers nor in the `libc` crate, so they
//! are declared here; the ioctls are typed wrappers from nix's `ioctl_*!` macros, each request
//! number nix encodes is checked at compile time against the number in the kernel headers, and
//! each struct against its size.

use std::io;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};

use super::{DirtyTracker, TrackerKind, PAGE_SIZE};

// ---- UAPI: include/uapi/linux/userfaultfd.h -------------------------------------------------

const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: only faults raised by user-mode accesses are handled. Needs no
/// privilege even with `vm.unprivileged_userfaultfd = 0`. Kernel-mode writes are still tracked
/// in WP-async mode, because the kernel resolves those faults itself.
const UFFD_USER_MODE_ONLY: std::ffi::c_int = 1;
bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: what `UFFDIO_API` is asked for and reports (bits we do not name are kept
    /// as the kernel reported them).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct UffdFeatures: u64 {
        const WP_UNPOPULATED = 1 << 13;
        const WP_ASYNC = 1 << 15;
    }
}
bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct RegisterMode: u64 {
        const WP = 1 << 1;
    }
}
bitflags::bitflags! {
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct WriteprotectMode: u64 {
        const WP = 1 << 0;
    }
}
/// Bit number of `UFFDIO_WRITEPROTECT` in the `ioctls` mask returned by `UFFDIO_REGISTER`.
const _UFFDIO_WRITEPROTECT: u64 = 0x06;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: u32 = 0xc018_aa3f;
const UFFDIO_REGISTER: u32 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u32 = 0x8010_aa01;
const UFFDIO_WRITEPROTECT: u32 = 0xc018_aa06;

// ---- UAPI: include/uapi/linux/fs.h ----------------------------------------------------------

bitflags::bitflags! {
    /// `PM_SCAN_*` flags of `struct pm_scan_arg`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct PmScanFlags: u64 {
        const WP_MATCHING = 1 << 0;
        const CHECK_WPASYNC = 1 << 1;
    }
}
bitflags::bitflags! {
    /// `PAGE_IS_*` page categories of `PAGEMAP_SCAN`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct PageCategories: u64 {
        const WRITTEN = 1 << 1;
    }
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGEMAP_SCAN: u32 = 0xc060_6610;

nix::ioctl_readwrite!(
    /// `UFFDIO_API`: the feature handshake.
    uffdio_api,
    0xAA,
    0x3F,
    UffdioApi
);
nix::ioctl_readwrite!(
    /// `UFFDIO_REGISTER`: register a range (here in write-protect mode).
    uffdio_register,
    0xAA,
    0x00,
    UffdioRegister
);
nix::ioctl_read!(
    /// `UFFDIO_UNREGISTER`: end the registration of a range.
    uffdio_unregister,
    0xAA,
    0x01,
    UffdioRange
);
nix::ioctl_readwrite!(
    /// `UFFDIO_WRITEPROTECT`: write-protect (or unprotect) a registered range.
    uffdio_writeprotect,
    0xAA,
    0x06,
    UffdioWriteprotect
);
nix::ioctl_readwrite!(
    /// `PAGEMAP_SCAN` on `/proc/self/pagemap`.
    pagemap_scan,
    b'f',
    16,
    PmScanArg
);

const _: () = {
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
    assert!(size_of::<UffdioWriteprotect>() == 24);
    assert!(size_of::<PmScanArg>() == 96);
    assert!(size_of::<PageRegion>() == 24);
};
// The request numbers nix encodes are the kernel's (x86-64 and the asm-generic architectures).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const _: () = {
    assert!(nix::request_code_readwrite!(0xAA, 0x3F, size_of::<UffdioApi>()) as u32 == UFFDIO_API);
    assert!(nix::request_code_readwrite!(0xAA, 0x00, size_of::<UffdioRegister>()) as u32 == UFFDIO_REGISTER);
    assert!(nix::request_code_read!(0xAA, 0x01, size_of::<UffdioRange>()) as u32 == UFFDIO_UNREGISTER);
    assert!(nix::request_code_readwrite!(0xAA, 0x06, size_of::<UffdioWriteprotect>()) as u32 == UFFDIO_WRITEPROTECT);
    assert!(nix::request_code_readwrite!(b'f', 16, size_of::<PmScanArg>()) as u32 == PAGEMAP_SCAN);
};

/// Regions fetched per `PAGEMAP_SCAN` call; more dirty runs than this take several calls.
const REGIONS_PER_SCAN: usize = 512;

// ---- helpers --------------------------------------------------------------------------------

/// Run one ioctl, again while it fails with `EINTR`; `Ok(return value)` when it is not negative.
/// (Not used for `PAGEMAP_SCAN`, whose partial progress must not be repeated blindly.)
fn retry_eintr(mut ioctl: impl FnMut() -> nix::Result<std::ffi::c_int>) -> io::Result<std::ffi::c_int> {
    loop {
        match ioctl() {
            Err(Errno::EINTR) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Open a userfaultfd. The error says why the system call failed.
fn new_uffd() -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let flags = (OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits() | UFFD_USER_MODE_ONLY;
    // raw libc: nix has no wrapper for the userfaultfd(2) system call.
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1; no memory is
    // passed.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        let errno = Errno::last();
        let e = io::Error::from(errno);
        let hint = match errno {
            Errno::ENOSYS => " (kernel built without CONFIG_USERFAULTFD, or filtered)",
            Errno::EPERM => " (blocked by seccomp or vm.unprivileged_userfaultfd)",
            Errno::EINVAL => " (UFFD_USER_MODE_ONLY needs Linux >= 5.11)",
            _ => "",
        };
        return Err(io::Error::new(e.kind(), format!("userfaultfd: the userfaultfd(2) system call failed: {e}{hint}")));
    }
    // SAFETY: `r` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as std::ffi::c_int) })
}

/// `UFFDIO_API` handshake asking for `features`; returns the features the kernel reports.
/// The error is the bare OS error.
fn enable_api(uffd: &OwnedFd, features: UffdFeatures) -> io::Result<UffdFeatures> {
    let mut api = UffdioApi { api: UFFD_API, features: features.bits(), ioctls: 0 };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is, live for the call.
    retry_eintr(|| unsafe { uffdio_api(uffd.as_raw_fd(), &mut api) })?;
    Ok(UffdFeatures::from_bits_retain(api.features))
}

/// Why UFFDIO_API refused `WP_ASYNC | WP_UNPOPULATED`: ask a second userfaultfd, with no
/// features requested, what this kernel supports.
fn explain_api_failure(e: io::Error) -> io::Error {
    let mut missing = Vec::new();
    if let Ok(supported) = new_uffd().and_then(|fd| enable_api(&fd, UffdFeatures::empty())) {
        if !supported.contains(UffdFeatures::WP_ASYNC) {
            missing.push("WP_ASYNC (needs Linux >= 6.7)");
        }
        if !supported.contains(UffdFeatures::WP_UNPOPULATED) {
            missing.push("WP_UNPOPULATED (needs Linux >= 6.4)");
        }
    }
    let what = if missing.is_empty() {
        "WP_ASYNC|WP_UNPOPULATED (needs Linux >= 6.7)".to_string()
    } else {
        missing.join(" and ")
    };
    io::Error::new(e.kind(), format!("userfaultfd: UFFDIO_API rejected {what}: {e}"))
}

// ---- the tracker ----------------------------------------------------------------------------

/// Dirty tracking of one range with userfaultfd WP-async + PAGEMAP_SCAN.
pub(super) struct UffdTracker {
    base: usize,
    len: usize,
    /// The userfaultfd the range is registered with. Closing it ends the registration.
    uffd: OwnedFd,
    /// `/proc/self/pagemap` of this process (opened once, at arming).
    pagemap: OwnedFd,
    /// Reusable output vector for PAGEMAP_SCAN.
    regions: Vec<PageRegion>,
}

impl UffdTracker {
    pub(super) fn arm(base: usize, len: usize) -> io::Result<UffdTracker> {
        Self::arm_with(base, len, REGIONS_PER_SCAN)
    }

    fn arm_with(base: usize, len: usize, regions: usize) -> io::Result<UffdTracker> {
        let features = UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED;
        let uffd = new_uffd()?;
        let got = enable_api(&uffd, features).map_err(explain_api_failure)?;
        if !got.contains(features) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd: UFFDIO_API accepted but did not enable WP_ASYNC|WP_UNPOPULATED \
                     (features {:#x}; needs Linux >= 6.7)",
                    got.bits()
                ),
            ));
        }

        let pagemap = open_pagemap()?;

        let range = UffdioRange { start: base as u64, len: len as u64 };
        let mut reg = UffdioRegister { range, mode: RegisterMode::WP.bits(), ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`, which `reg` is. The kernel
        // only changes how faults in the range are handled; it touches no memory of ours
        // besides `reg`.
        if let Err(e) = retry_eintr(|| unsafe { uffdio_register(uffd.as_raw_fd(), &mut reg) }) {
            let hint = match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::EINVAL) | Some(Errno::ENOMEM) => {
                    " (is the whole range mapped, and of a kind userfaultfd supports?)"
                }
                Some(Errno::EBUSY) => " (already registered with another userfaultfd?)",
                _ => "",
            };
            return Err(io::Error::new(
                e.kind(),
                format!("userfaultfd: UFFDIO_REGISTER (mode WP) of {base:#x}+{len:#x} failed: {e}{hint}"),
            ));
        }
        // From here on, dropping `t` unregisters the range.
        let t = UffdTracker { base, len, uffd, pagemap, regions: vec![PageRegion::default(); regions.max(1)] };
        if reg.ioctls & (1 << _UFFDIO_WRITEPROTECT) == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd: UFFDIO_REGISTER of {base:#x}+{len:#x} does not offer \
                     UFFDIO_WRITEPROTECT for this mapping (ioctls {:#x})",
                    reg.ioctls
                ),
            ));
        }
        let mut wp = UffdioWriteprotect { range, mode: WriteprotectMode::WP.bits() };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`, which `wp` is. Write
        // protection in async mode never blocks a writer: a later write just clears the bit.
        if let Err(e) = retry_eintr(|| unsafe { uffdio_writeprotect(t.uffd.as_raw_fd(), &mut wp) }) {
            return Err(io::Error::new(
                e.kind(),
                format!("userfaultfd: UFFDIO_WRITEPROTECT of {base:#x}+{len:#x} failed: {e}"),
            ));
        }
        Ok(t)
    }

    /// Report (appending to `out`, ascending) and write-protect again the written pages of the
    /// whole range.
    fn scan(&mut self, out: &mut Vec<usize>) -> io::Result<()> {
        self.scan_range(self.base, self.base + self.len, out)
    }

    /// Report (appending to `out`, ascending, as page indices relative to the tracked base) and
    /// write-protect again the written pages of `[start, end)`, a page-aligned part of the
    /// tracked range. Used by the `regions` tracker to scan only its open regions.
    pub(super) fn scan_range(&mut self, start: usize, end: usize, out: &mut Vec<usize>) -> io::Result<()> {
        debug_assert!(self.base <= start && start <= end && end <= self.base + self.len);
        debug_assert!((start | end) & (PAGE_SIZE - 1) == 0);
        let end = end as u64;
        let mut start = start as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags: (PmScanFlags::WP_MATCHING | PmScanFlags::CHECK_WPASYNC).bits(),
                start,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PageCategories::WRITTEN.bits(),
                category_anyof_mask: 0,
                return_mask: PageCategories::WRITTEN.bits(),
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` (`arg`, of the size it states)
            // and writes at most `vec_len` `struct page_region`s to `vec`, which points at our
            // vector of exactly that many. The scanned range is ours; the kernel only reads and
            // write-protects its page tables.
            let n = match unsafe { pagemap_scan(self.pagemap.as_raw_fd(), &mut arg) } {
                Ok(n) => n,
                Err(errno) => {
                    // Not retried: a failure after part of the walk may already have re-protected
                    // pages it could not report (see the trait's contract on errors).
                    let e = io::Error::from(errno);
                    let hint = if errno == Errno::EPERM {
                        " (part of the range is not registered in async write-protect mode)"
                    } else {
                        ""
                    };
                    return Err(io::Error::new(
                        e.kind(),
                        format!("PAGEMAP_SCAN of {:#x}..{end:#x} failed: {e}{hint}", start),
                    ));
                }
            };
            let n = n as usize;
            if n > self.regions.len() {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN returned {n} regions for a vector of {}",
                    self.regions.len()
                )));
            }
            for r in &self.regions[..n] {
                if r.start < start || r.end > end || r.start >= r.end {
                    return Err(io::Error::other(format!(
                        "PAGEMAP_SCAN returned region {:#x}..{:#x} outside {start:#x}..{end:#x}",
                        r.start, r.end
                    )));
                }
                let first = (r.start - self.base as u64) as usize / PAGE_SIZE;
                let last = (r.end - self.base as u64) as usize / PAGE_SIZE;
                out.extend(first..last);
            }
            let walk_end = if arg.walk_end == 0 { end } else { arg.walk_end };
            if walk_end <= start || walk_end > end {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN made no progress: walk_end {walk_end:#x}, scanning \
                     {start:#x}..{end:#x}"
                )));
            }
            start = walk_end;
        }
        Ok(())
    }
}

impl DirtyTracker for UffdTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Uffd
    }

    fn collect(&mut self, out: &mut Vec<usize>) -> io::Result<()> {
        self.scan(out)
    }
}

impl Drop for UffdTracker {
    fn drop(&mut self) {
        let mut range = UffdioRange { start: self.base as u64, len: self.len as u64 };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`, which `range` is. It removes
        // the write protection so later writes are ordinary. Failure (the mapping is already
        // gone) leaves nothing to undo: closing the fd below ends the registration anyway.
        let _ = retry_eintr(|| unsafe { uffdio_unregister(self.uffd.as_raw_fd(), &mut range) });
        // `uffd` and `pagemap` are closed when their OwnedFds drop.
    }
}

fn open_pagemap() -> io::Result<OwnedFd> {
    // std opens with O_CLOEXEC.
    std::fs::File::open("/proc/self/pagemap").map(OwnedFd::from).map_err(|e| {
        io::Error::new(e.kind(), format!("userfaultfd tracker: cannot open /proc/self/pagemap: {e}"))
    })
}

// ---- availability probe ---------------------------------------------------------------------

pub(super) fn available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

/// Arm a tracker on a 4-page anonymous scratch mapping and check that it really works: a fresh
/// range is clean, a write is reported exactly, and the rescan is clean again.
fn probe() -> Result<(), String> {
    const PAGES: usize = 4;
    let len = PAGES * PAGE_SIZE;
    let size = NonZeroUsize::new(len).ok_or("probe: empty scratch mapping")?;
    // SAFETY: a fresh private anonymous mapping chosen by the kernel; it overlaps nothing.
    let p = unsafe { mmap_anonymous(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE) }
        .map_err(|e| format!("probe: mmap of a scratch page failed: {e}"))?;
    // Unmap on every path out, after the tracker (declared later) has been dropped.
    struct Unmap(NonNull<std::ffi::c_void>, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: unmapping exactly the scratch mapping made above, which nothing else uses.
            let _ = unsafe { munmap(self.0, self.1) };
        }
    }
    let _unmap = Unmap(p, len);
    // SAFETY: advising our own scratch mapping; failure only means THP may stay on.
    let _ = unsafe { madvise(p, len, MmapAdvise::MADV_NOHUGEPAGE) };
    let base = p.as_ptr() as usize;

    let mut t = UffdTracker::arm(base, len).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    t.scan(&mut v).map_err(|e| e.to_string())?;
    if !v.is_empty() {
        return Err(format!("probe: a freshly armed range reported dirty pages {v:?}"));
    }
    // SAFETY: page 2 lies inside our live RW scratch mapping.
    unsafe { std::ptr::write_volatile((base + 2 * PAGE_SIZE) as *mut u8, 1) };
    t.scan(&mut v).map_err(|e| e.to_string())?;
    if v != [2] {
        return Err(format!("probe: wrote page 2, PAGEMAP_SCAN reported {v:?}"));
    }
    v.clear();
    t.scan(&mut v).map_err(|e| e.to_string())?;
    if !v.is_empty() {
        return Err(format!("probe: PAGEMAP_SCAN did not re-protect: rescan reported {v:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-entry region vector forces a `walk_end` continuation after every dirty run.
    #[test]
    fn tiny_region_vector_continues_from_walk_end() {
        if let Err(why) = available() {
            eprintln!("skipping: {why}");
            return;
        }
        const PAGES: usize = 300;
        let len = PAGES * PAGE_SIZE;
        let size = NonZeroUsize::new(len).unwrap();
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of this test after the
        // tracker is dropped.
        let p = unsafe { mmap_anonymous(None, size, prot, MapFlags::MAP_PRIVATE) }.unwrap();
        let base = p.as_ptr() as usize;
        let mut t = UffdTracker::arm_with(base, len, 1).unwrap();
        let want: Vec<usize> = (0..PAGES).filter(|i| i % 3 != 1).collect(); // runs of 2 pages, gaps of 1
        for &i in &want {
            // SAFETY: inside our live RW mapping.
            unsafe { std::ptr::write_volatile((base + i * PAGE_SIZE) as *mut u8, 1) };
        }
        let mut v = Vec::new();
        t.collect(&mut v).unwrap();
        assert_eq!(v, want);
        v.clear();
        t.collect(&mut v).unwrap();
        assert!(v.is_empty(), "{v:?}");
        drop(t);
        // SAFETY: unmapping our own mapping; the tracker is gone.
        unsafe { munmap(p, len) }.unwrap();
    }

    /// On anonymous memory only WP_UNPOPULATED keeps never-touched pages protected: without it a
    /// read would map the zero page unprotected and the page would look written.
    #[test]
    fn anonymous_reads_are_not_writes() {
        if let Err(why) = available() {
            eprintln!("skipping: {why}");
            return;
        }
        const PAGES: usize = 8;
        let len = PAGES * PAGE_SIZE;
        let size = NonZeroUsize::new(len).unwrap();
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of this test after the
        // tracker is dropped.
        let p = unsafe { mmap_anonymous(None, size, prot, MapFlags::MAP_PRIVATE) }.unwrap();
        let base = p.as_ptr() as usize;
        let mut t = UffdTracker::arm(base, len).unwrap();
        let mut sum = 0u32;
        for i in 0..PAGES {
            // SAFETY: inside our live mapping.
            sum += unsafe { std::ptr::read_volatile((base + i * PAGE_SIZE) as *const u8) } as u32;
        }
        assert_eq!(sum, 0);
        let mut v = Vec::new();
        t.collect(&mut v).unwrap();
        assert!(v.is_empty(), "reads reported as writes: {v:?}");
        // SAFETY: inside our live mapping.
        unsafe { std::ptr::write_volatile((base + 4 * PAGE_SIZE) as *mut u8, 1) };
        t.collect(&mut v).unwrap();
        assert_eq!(v, vec![4]);
        drop(t);
        // SAFETY: unmapping our own mapping; the tracker is gone.
        unsafe { munmap(p, len) }.unwrap();
    }

    #[test]
    fn probe_result_is_cached_and_explained() {
        let a = available();
        let b = available();
        assert_eq!(a, b);
        if let Err(why) = a {
            assert!(!why.is_empty());
        }
    }
}
