//! The `mprotect` tracker: `PROT_READ` + a `SIGSEGV` handler (Ken's way).
//!
//! Arming makes the range `PROT_READ`. The first write to a page faults (`SIGSEGV`, `si_code =
//! SEGV_ACCERR`); the process-wide handler finds the tracked range containing `si_addr`, sets the
//! page's bit in that range's bitmap and makes the page `PROT_READ|PROT_WRITE`; the faulting write
//! is then retried and succeeds. `collect` swaps the bitmap words to zero, reports the set bits
//! and makes each run of consecutive dirty pages `PROT_READ` again with one `mprotect` call.
//!
//! Invariant (outside the short windows inside the handler and `collect`): every page of a
//! tracked range that is writable has its bit set. Error paths keep it: when the handler cannot
//! unprotect one page (VMA limit, `vm.max_map_count`) it marks *every* page dirty and unprotects
//! the whole range (one VMA again); when `collect` cannot re-protect a run it tries the whole
//! range, and failing that sets the bits of the pages it left writable again, so nothing written
//! is ever lost, at worst reported more than once.
//!
//! # The global table and the signal handler
//!
//! A signal handler can only reach global state, and may only use async-signal-safe operations:
//! here atomics, plain loads through pointers published by the atomics, and the `mprotect` and
//! `sigaction` system calls. No allocation, no locks, no panics. Ranges live in [`SLOTS`], a fixed
//! array of [`MAX_TRACKERS`] slots. A slot is published by storing `base` and `bits` and then a
//! non-zero `len`; it is withdrawn by storing `len = 0`.
//!
//! Freeing a bitmap while a handler on another thread might be reading it would be a
//! use-after-free, so each slot counts the handlers using it (`readers`). A handler increments
//! `readers` *before* it loads `len`; `drop` stores `len = 0` *before* it waits for `readers` to
//! reach zero. All four operations are `SeqCst`, so in their single total order either the handler
//! sees `len = 0` (and never touches `bits`), or `drop` sees the handler's increment and waits for
//! it to finish before freeing the bitmap. While a handler holds a slot, that slot can therefore
//! not be freed or reused, so the `base`, `len` and `bits` it loaded belong together.
//!
//! Assumption (the heap is single-threaded): no thread writes to a tracked range while its tracker
//! is being armed, collected or dropped. Under that assumption faults for a range can only happen
//! while its slot is published. If it is broken during `drop`, a write that faulted just before
//! the range was unprotected may find no slot and be passed on as a stray fault; the previous
//! handler then typically restores `SIG_DFL`, after which any tracked write in the process kills
//! it. Handlers running on other threads for *other* addresses never see torn or freed state.
//!
//! # Chaining
//!
//! The handler is installed once per process (with `SA_SIGINFO | SA_ONSTACK`, so stack-overflow
//! detection on the alternate signal stack keeps working) and remembers the handler installed
//! before it. A fault that is not ours goes to that previous handler: called directly if it was a
//! function; if it was `SIG_DFL` (or `SIG_IGN`, which the kernel does not honour for a real
//! fault), the disposition is reset to `SIG_DFL` and the handler returns, so the faulting
//! instruction runs again and the process dies of `SIGSEGV` the normal way (with a core dump).
//! The previous handler's `sa_mask` and `SA_RESETHAND` are not emulated.

use std::io;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

use super::{runs, DirtyTracker, TrackerKind, PAGE_SIZE};

/// How many mprotect trackers may be alive at once in one process.
const MAX_TRACKERS: usize = 16;

/// `si_code` of a fault on a mapped page whose protection forbids the access
/// (not exported by the `libc` crate for Linux).
const SEGV_ACCERR: libc::c_int = 2;

struct Slot {
    /// Start of the tracked range.
    base: AtomicUsize,
    /// Length of the tracked range in bytes; 0 = slot not published.
    len: AtomicUsize,
    /// Bitmap, one bit per page, `len / PAGE_SIZE` bits rounded up to whole words; null = free.
    bits: AtomicPtr<AtomicU64>,
    /// Handlers currently using this slot's fields (see the module docs).
    readers: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    bits: AtomicPtr::new(ptr::null_mut()),
    readers: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_TRACKERS] = [EMPTY_SLOT; MAX_TRACKERS];

/// Serialises arming and dropping (never taken by the signal handler).
static TABLE_LOCK: Mutex<()> = Mutex::new(());

/// The `SIGSEGV` action that was installed before ours, for chaining.
struct PrevAction(std::cell::UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written exactly once, by the thread installing our handler, before `PREV_READY` is set
// (Release) and before our handler is installed; only read afterwards (after an Acquire load of
// `PREV_READY`). No concurrent write can happen.
unsafe impl Sync for PrevAction {}
static PREV: PrevAction = PrevAction(std::cell::UnsafeCell::new(MaybeUninit::uninit()));
static PREV_READY: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

fn os_err(what: String) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Install our `SIGSEGV` handler once per process, keeping the previous one for chaining.
fn install_handler() -> io::Result<()> {
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction with a null new action only reads the current action into
        // `PREV`, which no one else reads or writes yet (PREV_READY is still false).
        let r = unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), (*PREV.0.get()).as_mut_ptr()) };
        if r != 0 {
            return Err(format!("sigaction(SIGSEGV) query failed: {}", io::Error::last_os_error()));
        }
        PREV_READY.store(true, std::sync::atomic::Ordering::Release);
        // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty mask, no flags);
        // we fill in the handler, mask and flags before use.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = our_handler();
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: installs `on_segv`, an `extern "C"` function with the SA_SIGINFO signature that
        // only does async-signal-safe work.
        let r = unsafe { libc::sigaction(libc::SIGSEGV, &act, ptr::null_mut()) };
        if r != 0 {
            return Err(format!("sigaction(SIGSEGV) install failed: {}", io::Error::last_os_error()));
        }
        Ok(())
    });
    if let Err(e) = r {
        return Err(io::Error::other(format!("mprotect dirty tracker: {e}")));
    }
    // Someone may have replaced our handler without chaining to it: tracked writes would then
    // crash the process, so refuse to arm.
    // SAFETY: an all-zero `sigaction` is a valid buffer for the query below.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: query only (null new action); `cur` is a valid out-pointer.
    if unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), &mut cur) } != 0 {
        return Err(os_err("mprotect dirty tracker: sigaction(SIGSEGV) query failed".into()));
    }
    if cur.sa_sigaction != our_handler() {
        return Err(io::Error::other(
            "mprotect dirty tracker: the SIGSEGV handler was replaced by other code after ours \
             was installed; writes to a tracked heap would crash the process",
        ));
    }
    Ok(())
}

type SigactionFn = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// `on_segv` as the integer `sigaction` stores.
fn our_handler() -> libc::sighandler_t {
    on_segv as SigactionFn as libc::sighandler_t
}

/// The `SIGSEGV` handler. Async-signal-safe: atomics, `mprotect`, `sigaction`, errno save/restore.
extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: reading and writing this thread's errno location is async-signal-safe; we restore
    // it so the interrupted code does not see errno changed by our system calls.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: `info` is the siginfo the kernel passed to an SA_SIGINFO handler (or null).
    let handled = unsafe { handle_fault(info) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    if !handled {
        // SAFETY: forwarding the kernel's arguments unchanged to the previous handler.
        unsafe { chain(sig, info, ctx) };
    }
}

/// Is the fault described by `info` a write to a tracked, read-protected page? If so, record
/// it, unprotect the page and return true.
///
/// # Safety
/// `info` is null or points at the siginfo of the current SIGSEGV delivery.
unsafe fn handle_fault(info: *mut libc::siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: `info` points at a valid siginfo (caller's contract).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code != SEGV_ACCERR {
        return false;
    }
    for slot in SLOTS.iter() {
        if slot.len.load(SeqCst) == 0 {
            continue; // cheap filter; the authoritative check is below
        }
        slot.readers.fetch_add(1, SeqCst);
        let len = slot.len.load(SeqCst);
        let base = slot.base.load(SeqCst);
        if len == 0 || addr.wrapping_sub(base) >= len {
            slot.readers.fetch_sub(1, SeqCst);
            continue;
        }
        let bits = slot.bits.load(SeqCst);
        let page = (addr - base) / PAGE_SIZE;
        // SAFETY: the slot is published (len != 0 was seen after registering as a reader), so
        // `bits` is a live bitmap of at least `len / PAGE_SIZE` bits that `drop` will not free
        // until `readers` falls back to zero; `page < len / PAGE_SIZE`.
        unsafe { (*bits.add(page / 64)).fetch_or(1 << (page % 64), SeqCst) };
        // SAFETY: mprotect of one page inside the tracked range, which is mapped while it is
        // tracked; it only widens access to what the mapping was created with (RW).
        let mut ok = unsafe {
            libc::mprotect(
                (base + page * PAGE_SIZE) as *mut libc::c_void,
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } == 0;
        if !ok {
            // Most likely ENOMEM: splitting the VMA would exceed vm.max_map_count. Fall back to
            // "everything is dirty" and unprotect the whole range, which merges it back into one
            // VMA. The invariant "writable => bit set" holds because the bits are set first.
            // SAFETY: same bitmap as above, `len / PAGE_SIZE` bits long.
            unsafe { set_all(bits, len / PAGE_SIZE) };
            // SAFETY: mprotect of exactly the tracked range, back to the mapping's own RW.
            ok = unsafe {
                libc::mprotect(base as *mut libc::c_void, len, libc::PROT_READ | libc::PROT_WRITE)
            } == 0;
        }
        slot.readers.fetch_sub(1, SeqCst);
        // If even that failed, let the fault be fatal rather than loop on it forever.
        return ok;
    }
    false
}

/// Set the first `npages` bits of the bitmap at `bits`.
///
/// # Safety
/// `bits` points at a live bitmap of at least `npages` bits (rounded up to words).
unsafe fn set_all(bits: *const AtomicU64, npages: usize) {
    for w in 0..npages.div_ceil(64) {
        let n = (npages - w * 64).min(64);
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        // SAFETY: `w < npages.div_ceil(64)`, within the bitmap (caller's contract).
        unsafe { (*bits.add(w)).fetch_or(mask, SeqCst) };
    }
}

/// Hand a fault that is not ours to the handler that was installed before ours.
///
/// # Safety
/// Called from the SIGSEGV handler with the kernel's arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = if PREV_READY.load(std::sync::atomic::Ordering::Acquire) {
        // SAFETY: PREV was fully written before PREV_READY was set and is never written again.
        Some(unsafe { (*PREV.0.get()).assume_init_ref() })
    } else {
        None
    };
    match prev {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the stored handler has this three-argument signature.
                let f: SigactionFn = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the stored handler takes only the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: restore SIG_DFL and return; the faulting instruction runs again
            // and the kernel kills the process with SIGSEGV as if we had never been installed.
            // SAFETY: an all-zero sigaction with sa_sigaction = SIG_DFL is a valid action, and
            // sigaction(2) is async-signal-safe.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGSEGV, &dfl, ptr::null_mut());
            }
        }
    }
}

/// Dirty tracking of one range with `mprotect` + `SIGSEGV`.
pub(super) struct MprotectTracker {
    slot: usize,
    base: usize,
    len: usize,
    /// The slot's bitmap (`nwords` words), owned by this tracker, shared with the handler.
    bits: *const AtomicU64,
    nwords: usize,
}

// SAFETY: the only non-Send field is `bits`, a pointer to atomics that the tracker owns (freed in
// its drop) and shares only with the signal handler, which reaches it through the global table
// on whatever thread faults. Moving the tracker to another thread changes nothing for either.
unsafe impl Send for MprotectTracker {}

impl MprotectTracker {
    pub(super) fn arm(base: usize, len: usize) -> io::Result<MprotectTracker> {
        install_handler()?;
        let npages = len / PAGE_SIZE;
        let nwords = npages.div_ceil(64);
        let bitmap: Box<[AtomicU64]> = (0..nwords).map(|_| AtomicU64::new(0)).collect();
        let bits = Box::into_raw(bitmap) as *mut AtomicU64;

        let guard = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut free = None;
        for (i, s) in SLOTS.iter().enumerate() {
            if s.bits.load(SeqCst).is_null() {
                free = free.or(Some(i));
                continue;
            }
            let (ob, ol) = (s.base.load(SeqCst), s.len.load(SeqCst));
            if ob < base + len && base < ob + ol {
                drop(guard);
                // SAFETY: `bits` came from Box::into_raw of a `[AtomicU64]` of `nwords` words
                // just above and was never published.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(bits, nwords)) });
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "mprotect dirty tracker: {base:#x}+{len:#x} overlaps the tracked range \
                         {ob:#x}+{ol:#x}"
                    ),
                ));
            }
        }
        let Some(slot) = free else {
            drop(guard);
            // SAFETY: as above, never published.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(bits, nwords)) });
            return Err(io::Error::other(format!(
                "mprotect dirty tracker: at most {MAX_TRACKERS} trackers may be alive at once"
            )));
        };
        let s = &SLOTS[slot];
        s.base.store(base, SeqCst);
        s.bits.store(bits, SeqCst);
        s.len.store(len, SeqCst); // publish
        drop(guard);
        // From here on, dropping `t` withdraws the slot and frees the bitmap.
        let t = MprotectTracker { slot, base, len, bits, nwords };

        // SAFETY: removes write access from the caller's mapping [base, base+len); any write to
        // it now faults into `on_segv`, which finds this published slot and restores access.
        if unsafe { libc::mprotect(base as *mut libc::c_void, len, libc::PROT_READ) } != 0 {
            let hint = match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOMEM) => " (is the whole range mapped? vm.max_map_count reached?)",
                _ => "",
            };
            return Err(os_err(format!(
                "mprotect dirty tracker: mprotect(PROT_READ) of {base:#x}+{len:#x} failed{hint}"
            )));
        }
        Ok(t)
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `bits` points at `nwords` atomics owned by this tracker until its drop.
        unsafe { std::slice::from_raw_parts(self.bits, self.nwords) }
    }

    /// `mprotect(PROT_READ)` of pages `[first, first + n)` of the range.
    fn protect(&self, first: usize, n: usize) -> bool {
        // SAFETY: the pages lie inside our tracked range (indices come from our bitmap, which
        // only has bits for pages < len / PAGE_SIZE); read-only is what arming set.
        unsafe {
            libc::mprotect(
                (self.base + first * PAGE_SIZE) as *mut libc::c_void,
                n * PAGE_SIZE,
                libc::PROT_READ,
            ) == 0
        }
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
        for (w, word) in self.words().iter().enumerate() {
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
            self.words()[p / 64].fetch_or(1 << (p % 64), SeqCst);
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

impl Drop for MprotectTracker {
    fn drop(&mut self) {
        // SAFETY: gives the caller's mapping its original PROT_READ|PROT_WRITE back; harmless if
        // the range is already gone (fails with ENOMEM and changes nothing).
        unsafe {
            libc::mprotect(
                self.base as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let s = &SLOTS[self.slot];
        let guard = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        s.len.store(0, SeqCst); // withdraw: handlers arriving from now on skip the slot
        while s.readers.load(SeqCst) != 0 {
            // A handler on another thread is looking at this slot; it finishes in a few
            // instructions (plus at most two mprotect calls).
            std::thread::yield_now();
        }
        s.base.store(0, SeqCst);
        s.bits.store(ptr::null_mut(), SeqCst); // slot free
        drop(guard);
        // SAFETY: `bits` came from Box::into_raw of `nwords` atomics in `arm`; the slot no
        // longer refers to it and no handler is using it (readers == 0 after len = 0).
        drop(unsafe {
            Box::from_raw(ptr::slice_from_raw_parts_mut(self.bits as *mut AtomicU64, self.nwords))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(pages: usize) -> usize {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; it overlaps nothing.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
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
        unsafe { libc::munmap(a as *mut libc::c_void, 8 * PAGE_SIZE) };
    }

    /// Run the `#[ignore]`d test `name` of this module alone in a child process (for tests that
    /// must not share the process with the others: they fill the global table, exhaust
    /// vm.max_map_count, or crash on purpose). Returns its exit status.
    fn run_child(name: &str) -> std::process::ExitStatus {
        use std::process::{Command, Stdio};
        let module = module_path!().split_once("::").map(|(_, m)| m).unwrap_or("");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([&format!("{module}::{name}"), "--exact", "--ignored", "--test-threads=1"])
            .args(["--nocapture"])
            .env("FAMS_TRACKER_CHILD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn test child");
        // A broken handler can make the child fault forever: give up after 30 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait for test child") {
                eprintln!("child {name}: {st:?}");
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().expect("reap test child");
                panic!("child {name} hung (killed: {st:?})");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn in_child() -> bool {
        if std::env::var_os("FAMS_TRACKER_CHILD").is_none() {
            eprintln!("runs only as a child of another test");
            return false;
        }
        true
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
        let a = anon(MAX_TRACKERS + 1);
        let mut held = Vec::new();
        for i in 0..MAX_TRACKERS {
            held.push(MprotectTracker::arm(a + i * PAGE_SIZE, PAGE_SIZE).expect("slot"));
        }
        let e = MprotectTracker::arm(a + MAX_TRACKERS * PAGE_SIZE, PAGE_SIZE)
            .err()
            .expect("the table must be full");
        assert!(e.to_string().contains("at most 16"), "{e}");
        // Writes to all held ranges are tracked by the right tracker.
        for i in (0..MAX_TRACKERS).rev() {
            // SAFETY: inside our live mapping.
            unsafe { ptr::write_volatile((a + i * PAGE_SIZE + 8) as *mut u8, 1) };
        }
        for (i, t) in held.iter_mut().enumerate() {
            let mut v = Vec::new();
            t.collect(&mut v).unwrap();
            assert_eq!(v, vec![0], "tracker {i}");
        }
        held.remove(5);
        let t = MprotectTracker::arm(a + MAX_TRACKERS * PAGE_SIZE, PAGE_SIZE)
            .expect("a freed slot is reusable");
        assert_eq!(t.slot, 5);
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

    extern "C" fn exit_42(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: _exit is async-signal-safe and ends this disposable test child.
        unsafe { libc::_exit(42) }
    }

    /// Arm, check tracking works, then write to a read-only page of ours that is not tracked.
    fn stray_fault(before: Before) {
        if !in_child() {
            return;
        }
        // SAFETY: an all-zero sigaction is valid; we set handler, flags and mask below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        match before {
            Before::Runtime => {}
            Before::Default => act.sa_sigaction = libc::SIG_DFL,
            Before::Custom => {
                act.sa_sigaction = exit_42 as SigactionFn as libc::sighandler_t;
                act.sa_flags = libc::SA_SIGINFO;
            }
        }
        if !matches!(before, Before::Runtime) {
            // SAFETY: installing a valid action in a child process that has no tracker yet.
            unsafe {
                libc::sigemptyset(&mut act.sa_mask);
                assert_eq!(libc::sigaction(libc::SIGSEGV, &act, ptr::null_mut()), 0);
            }
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
        unsafe { libc::mprotect((a + PAGE_SIZE) as *mut libc::c_void, PAGE_SIZE, libc::PROT_READ) };
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
        assert_eq!(st.signal(), Some(libc::SIGSEGV), "runtime handler: {st:?}");
        let st = run_child("child_stray_fault_default");
        assert_eq!(st.signal(), Some(libc::SIGSEGV), "SIG_DFL: {st:?}");
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
        let max: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65530);
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

    #[test]
    fn set_all_sets_exactly_npages_bits() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        // SAFETY: 3 words = 192 bits >= 130.
        unsafe { set_all(words.as_ptr(), 130) };
        assert_eq!(words[0].load(SeqCst), u64::MAX);
        assert_eq!(words[1].load(SeqCst), u64::MAX);
        assert_eq!(words[2].load(SeqCst), 0b11);
    }
}
