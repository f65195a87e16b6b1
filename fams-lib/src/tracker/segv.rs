//! The process-wide `SIGSEGV` handler and its table of read-protected ranges, shared by the
//! `mprotect` and `regions` trackers.
//!
//! A tracker publishes its range here as a [`SegvRange`]: the range `[base, base + len)` cut into
//! *units* of `1 << shift` bytes (the last unit may be shorter), with one bit per unit. The
//! tracker makes units `PROT_READ`; the first write to a read-only unit faults (`SIGSEGV`,
//! `si_code = SEGV_ACCERR`), and the handler finds the range containing `si_addr`, sets the unit's
//! bit and makes that unit `PROT_READ|PROT_WRITE`; the faulting write is then retried and
//! succeeds. What a bit means is the tracker's business: for `mprotect` a unit is one page and a
//! set bit means "written"; for `regions` a unit is one region and a set bit means "open".
//!
//! Invariant (outside the short windows inside the handler and the trackers' `collect`): every
//! unit of a published range that is writable has its bit set. The handler keeps it when it
//! cannot unprotect one unit (VMA limit, `vm.max_map_count`): it sets *every* bit and unprotects
//! the whole range (one VMA again); only if that fails too does the fault become fatal.
//!
//! # The global table and the signal handler
//!
//! A signal handler can only reach global state, and may only use async-signal-safe operations:
//! here atomics, plain loads through pointers published by the atomics, and the `mprotect` and
//! `sigaction` system calls. No allocation, no locks, no panics. Ranges live in [`SLOTS`], a fixed
//! array of [`MAX_TRACKERS`] slots. A slot is published by storing `base`, `shift` and `bits` and
//! then a non-zero `len`; it is withdrawn by storing `len = 0`.
//!
//! Freeing a bitmap while a handler on another thread might be reading it would be a
//! use-after-free, so each slot counts the handlers using it (`readers`). A handler increments
//! `readers` *before* it loads `len`; `drop` stores `len = 0` *before* it waits for `readers` to
//! reach zero. All four operations are `SeqCst`, so in their single total order either the handler
//! sees `len = 0` (and never touches `bits`), or `drop` sees the handler's increment and waits for
//! it to finish before freeing the bitmap. While a handler holds a slot, that slot can therefore
//! not be freed or reused, so the `base`, `len`, `shift` and `bits` it loaded belong together.
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

use std::ffi::{c_int, c_void};
use std::io;
use std::mem::MaybeUninit;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;
use nix::sys::mman::{mprotect, ProtFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::{TrackerKind, PAGE_SIZE};

/// How many trackers that use this table (`mprotect` and `regions` together) may be alive at
/// once in one process.
pub(super) const MAX_TRACKERS: usize = 16;

/// `si_code` of a fault on a mapped page whose protection forbids the access
/// (not exported by the `libc` crate for Linux).
const SEGV_ACCERR: c_int = 2;

struct Slot {
    /// Start of the tracked range.
    base: AtomicUsize,
    /// Length of the tracked range in bytes; 0 = slot not published.
    len: AtomicUsize,
    /// log2 of the unit size in bytes (at least log2(PAGE_SIZE)).
    shift: AtomicUsize,
    /// Bitmap, one bit per unit, rounded up to whole words; null = free.
    bits: AtomicPtr<AtomicU64>,
    /// Handlers currently using this slot's fields (see the module docs).
    readers: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    shift: AtomicUsize::new(0),
    bits: AtomicPtr::new(ptr::null_mut()),
    readers: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_TRACKERS] = [EMPTY_SLOT; MAX_TRACKERS];

/// Serialises publishing and withdrawing slots (never taken by the signal handler).
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

/// Install our `SIGSEGV` handler once per process, keeping the previous one for chaining.
/// `kind` only names the tracker in error messages.
fn install_handler(kind: TrackerKind) -> io::Result<()> {
    let who = kind.name();
    let r = INSTALLED.get_or_init(|| {
        // raw libc: nix's sigaction always installs a new action; this only queries the current
        // one (a null new action), before ours is installed.
        // SAFETY: sigaction with a null new action only reads the current action into
        // `PREV`, which no one else reads or writes yet (PREV_READY is still false).
        let r = unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), PREV.0.get().cast::<libc::sigaction>()) };
        if r != 0 {
            return Err(format!("sigaction(SIGSEGV) query failed: {}", io::Error::last_os_error()));
        }
        PREV_READY.store(true, std::sync::atomic::Ordering::Release);
        let act = SigAction::new(
            SigHandler::SigAction(on_segv),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK | SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: installs `on_segv`, an `extern "C"` function with the SA_SIGINFO signature that
        // only does async-signal-safe work.
        if let Err(e) = unsafe { sigaction(Signal::SIGSEGV, &act) } {
            return Err(format!("sigaction(SIGSEGV) install failed: {e}"));
        }
        Ok(())
    });
    if let Err(e) = r {
        return Err(io::Error::other(format!("{who} dirty tracker: {e}")));
    }
    // Someone may have replaced our handler without chaining to it: tracked writes would then
    // crash the process, so refuse to arm.
    let mut cur = MaybeUninit::<libc::sigaction>::uninit();
    // raw libc: a query only (null new action), which nix's sigaction cannot do.
    // SAFETY: `cur` is a valid out-pointer for one sigaction.
    if unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), cur.as_mut_ptr()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{who} dirty tracker: sigaction(SIGSEGV) query failed: {e}")));
    }
    // SAFETY: sigaction succeeded, so it filled `cur`.
    let cur = unsafe { cur.assume_init() };
    if cur.sa_sigaction != our_handler() {
        return Err(io::Error::other(format!(
            "{who} dirty tracker: the SIGSEGV handler was replaced by other code after ours \
             was installed; writes to a tracked heap would crash the process"
        )));
    }
    Ok(())
}

pub(super) type SigactionFn = extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void);

/// `on_segv` as the integer `sigaction` stores.
fn our_handler() -> libc::sighandler_t {
    on_segv as SigactionFn as libc::sighandler_t
}

/// The `SIGSEGV` handler. Async-signal-safe: atomics, `mprotect`, `sigaction`, errno save/restore.
/// (The nix calls used here are thin wrappers: no allocation, no locks.)
extern "C" fn on_segv(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // Restored below, so the interrupted code does not see errno changed by our system calls.
    let errno = Errno::last_raw();
    // SAFETY: `info` is the siginfo the kernel passed to an SA_SIGINFO handler (or null).
    let handled = unsafe { handle_fault(info) };
    Errno::set_raw(errno);
    if !handled {
        // SAFETY: forwarding the kernel's arguments unchanged to the previous handler.
        unsafe { chain(sig, info, ctx) };
    }
}

/// Is the fault described by `info` a write to a read-protected unit of a published range? If
/// so, set the unit's bit, unprotect the unit and return true.
///
/// # Safety
/// `info` is null or points at the siginfo of the current SIGSEGV delivery.
unsafe fn handle_fault(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: `info` is null or points at a valid siginfo (caller's contract).
    let Some(info) = (unsafe { info.as_ref() }) else {
        return false;
    };
    let code = info.si_code;
    // SAFETY: a SIGSEGV siginfo carries the faulting address in its `si_addr` field.
    let addr = unsafe { info.si_addr() } as usize;
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
        let shift = slot.shift.load(SeqCst);
        let bits = slot.bits.load(SeqCst);
        let unit = (addr - base) >> shift;
        let start = unit << shift;
        let end = ((unit + 1) << shift).min(len);
        let nunits = len.div_ceil(1 << shift);
        // SAFETY: the slot is published (len != 0 was seen after registering as a reader), so
        // `bits` is a live bitmap of `nunits.div_ceil(64)` words that `drop` will not free until
        // `readers` falls back to zero.
        let words = unsafe { std::slice::from_raw_parts(bits, nunits.div_ceil(64)) };
        let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let mut ok = match (words.get(unit / 64), NonNull::new((base + start) as *mut c_void)) {
            (Some(word), Some(at)) => {
                word.fetch_or(1 << (unit % 64), SeqCst);
                // SAFETY: mprotect of one unit inside the tracked range, which is mapped while it
                // is tracked; it only widens access to what the mapping was created with (RW).
                unsafe { mprotect(at, end - start, rw) }.is_ok()
            }
            _ => false,
        };
        if !ok {
            // Most likely ENOMEM: splitting the VMA would exceed vm.max_map_count. Set every bit
            // and unprotect the whole range, which merges it back into one VMA. The invariant
            // "writable => bit set" holds because the bits are set first.
            set_all(words, nunits);
            if let Some(at) = NonNull::new(base as *mut c_void) {
                // SAFETY: mprotect of exactly the tracked range, back to the mapping's own RW.
                ok = unsafe { mprotect(at, len, rw) }.is_ok();
            }
        }
        slot.readers.fetch_sub(1, SeqCst);
        // If even that failed, let the fault be fatal rather than loop on it forever.
        return ok;
    }
    false
}

/// Set the first `nunits` bits of the bitmap `words` (at most as many as it holds). Called from
/// the signal handler: no panics (no indexing).
fn set_all(words: &[AtomicU64], nunits: usize) {
    for (w, word) in words.iter().enumerate().take(nunits.div_ceil(64)) {
        let n = (nunits - w * 64).min(64);
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        word.fetch_or(mask, SeqCst);
    }
}

/// Hand a fault that is not ours to the handler that was installed before ours.
///
/// # Safety
/// Called from the SIGSEGV handler with the kernel's arguments.
unsafe fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let prev = if PREV_READY.load(std::sync::atomic::Ordering::Acquire) {
        // SAFETY: PREV was fully written before PREV_READY was set and is never written again;
        // `MaybeUninit<libc::sigaction>` has the layout of `libc::sigaction`, of which
        // `SigAction` is a `repr(transparent)` wrapper.
        Some(unsafe { &*PREV.0.get().cast::<SigAction>() })
    } else {
        None
    };
    // `handler()` tells the two handler signatures apart by `SA_SIGINFO`.
    match prev.map(SigAction::handler) {
        Some(SigHandler::SigAction(f)) => f(sig, info, ctx),
        Some(SigHandler::Handler(f)) => f(sig),
        _ => {
            // Default action (SIG_DFL, or SIG_IGN, which the kernel does not honour for a real
            // fault): restore SIG_DFL and return; the faulting instruction runs again and the
            // kernel kills the process with SIGSEGV as if we had never been installed.
            let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: SIG_DFL is a valid action, and sigaction(2) is async-signal-safe.
            let _ = unsafe { sigaction(Signal::SIGSEGV, &dfl) };
        }
    }
}

/// One range published in the table. Dropping it gives the whole range its original
/// `PROT_READ|PROT_WRITE` back, withdraws the slot and frees the bitmap, in that order (so no
/// write can fault in the range once the handler no longer knows it).
pub(super) struct SegvRange {
    /// The tracker using the range (for error messages).
    kind: TrackerKind,
    slot: usize,
    base: usize,
    len: usize,
    shift: u32,
    /// The slot's bitmap (`nwords` words), owned by this range, shared with the handler.
    bits: *const AtomicU64,
    nwords: usize,
}

// SAFETY: the only non-Send field is `bits`, a pointer to atomics that the range owns (freed in
// its drop) and shares only with the signal handler, which reaches it through the global table
// on whatever thread faults. Moving it to another thread changes nothing for either.
unsafe impl Send for SegvRange {}

impl SegvRange {
    /// Install the handler if needed and publish `[base, base + len)` in units of `1 << shift`
    /// bytes, all bits clear. Changes no protection: the caller then makes units read-only.
    /// `kind` names the tracker in error messages. Fails with `AlreadyExists` if the range
    /// overlaps a published one, and when [`MAX_TRACKERS`] ranges are already published.
    pub(super) fn publish(kind: TrackerKind, base: usize, len: usize, shift: u32) -> io::Result<SegvRange> {
        assert!((PAGE_SIZE.trailing_zeros()..usize::BITS - 1).contains(&shift), "unit must be at least a page");
        install_handler(kind)?;
        let who = kind.name();
        let nwords = len.div_ceil(1 << shift).div_ceil(64);
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
                        "{who} dirty tracker: {base:#x}+{len:#x} overlaps the tracked range \
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
                "{who} dirty tracker: at most {MAX_TRACKERS} mprotect and regions trackers may \
                 be alive at once"
            )));
        };
        let s = &SLOTS[slot];
        s.base.store(base, SeqCst);
        s.shift.store(shift as usize, SeqCst);
        s.bits.store(bits, SeqCst);
        s.len.store(len, SeqCst); // publish
        drop(guard);
        Ok(SegvRange { kind, slot, base, len, shift, bits, nwords })
    }

    /// The bitmap, one bit per unit (bits past the last unit are always clear).
    pub(super) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `bits` points at `nwords` atomics owned by this range until its drop.
        unsafe { std::slice::from_raw_parts(self.bits, self.nwords) }
    }

    /// Set the bit of unit `u`.
    pub(super) fn set(&self, u: usize) {
        self.words()[u / 64].fetch_or(1 << (u % 64), SeqCst);
    }

    /// Clear the bit of unit `u`.
    pub(super) fn clear(&self, u: usize) {
        self.words()[u / 64].fetch_and(!(1 << (u % 64)), SeqCst);
    }

    /// Number of units (the last one may be shorter than `1 << shift` bytes).
    pub(super) fn units(&self) -> usize {
        self.len.div_ceil(1 << self.shift)
    }

    /// The byte range `[start, end)` of units `[first, first + n)`, clamped to the range.
    pub(super) fn span(&self, first: usize, n: usize) -> (usize, usize) {
        let start = self.base + (first << self.shift);
        let end = self.base + ((first + n) << self.shift).min(self.len);
        (start, end)
    }

    /// `mprotect(prot)` of units `[first, first + n)`; false (with errno set) on failure.
    /// `prot` is `PROT_READ` or `PROT_READ | PROT_WRITE`.
    pub(super) fn protect(&self, first: usize, n: usize, prot: ProtFlags) -> bool {
        debug_assert!(first + n <= self.units());
        debug_assert!(prot == ProtFlags::PROT_READ || prot == ProtFlags::PROT_READ | ProtFlags::PROT_WRITE);
        let (start, end) = self.span(first, n);
        let Some(at) = NonNull::new(start as *mut c_void) else {
            Errno::set_raw(Errno::EINVAL as i32);
            return false;
        };
        // SAFETY: the units lie inside the published range, which the caller keeps mapped while
        // it is tracked; read-only is what tracking uses and read-write is what the mapping was
        // created with. Making a unit writable only after its bit is set is the caller's part.
        unsafe { mprotect(at, end - start, prot) }.is_ok()
    }

    /// `mprotect(PROT_READ)` of the whole range, as trackers do when they arm; any write to it
    /// then faults into the handler, which finds this published range. The error says why.
    pub(super) fn protect_all(&self) -> io::Result<()> {
        if self.protect(0, self.units(), ProtFlags::PROT_READ) {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOMEM) => " (is the whole range mapped? vm.max_map_count reached?)",
            _ => "",
        };
        Err(io::Error::new(
            e.kind(),
            format!(
                "{} dirty tracker: mprotect(PROT_READ) of {:#x}+{:#x} failed{hint}: {e}",
                self.kind.name(),
                self.base,
                self.len
            ),
        ))
    }

    #[cfg(test)]
    pub(super) fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for SegvRange {
    fn drop(&mut self) {
        if let Some(at) = NonNull::new(self.base as *mut c_void) {
            // SAFETY: gives the caller's mapping its original PROT_READ|PROT_WRITE back; harmless
            // if the range is already gone (fails with ENOMEM and changes nothing).
            let _ = unsafe { mprotect(at, self.len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) };
        }
        let s = &SLOTS[self.slot];
        let guard = TABLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        s.len.store(0, SeqCst); // withdraw: handlers arriving from now on skip the slot
        while s.readers.load(SeqCst) != 0 {
            // A handler on another thread is looking at this slot; it finishes in a few
            // instructions (plus at most two mprotect calls).
            std::thread::yield_now();
        }
        s.base.store(0, SeqCst);
        s.shift.store(0, SeqCst);
        s.bits.store(ptr::null_mut(), SeqCst); // slot free
        drop(guard);
        // SAFETY: `bits` came from Box::into_raw of `nwords` atomics in `publish`; the slot no
        // longer refers to it and no handler is using it (readers == 0 after len = 0).
        drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(self.bits as *mut AtomicU64, self.nwords)) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_all_sets_exactly_nunits_bits() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        set_all(&words, 130);
        assert_eq!(words[0].load(SeqCst), u64::MAX);
        assert_eq!(words[1].load(SeqCst), u64::MAX);
        assert_eq!(words[2].load(SeqCst), 0b11);
    }
}
