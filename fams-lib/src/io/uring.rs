//! The io_uring backend.
//!
//! A write submits every piece in one `io_uring_enter`: in Dsync mode each `Write` carries
//! `RWF_DSYNC` and they run concurrently; in Fdatasync mode each `Write` is `IO_LINK`-ed to the
//! next and the chain ends in one `Fsync(DATASYNC)`, so the sync runs only after every write
//! completed successfully (a failed link completes the rest with `-ECANCELED`). The call waits
//! for every completion before returning, which is what keeps the borrowed buffers valid for as
//! long as the kernel may use them.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::device::{annotate, errno_error, Target};
use super::{Backend, FlushMode, IoPath, IoStats};

/// Submission queue entries; also the most requests in flight at once.
const RING_ENTRIES: u32 = 64;

pub(crate) struct UringIo {
    ring: IoUring,
    /// Set if the ring can no longer be used safely (an unrecoverable io_uring_enter error left
    /// unsubmitted entries behind); every later call fails with this message.
    broken: Option<String>,
}

impl UringIo {
    /// Set up a ring and check that it can do what the log needs. Err: the reason, for
    /// `fallback_reason` or an error message.
    pub(crate) fn new() -> Result<UringIo, String> {
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| {
            use nix::errno::Errno;
            let why = match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ENOSYS) => " (the kernel has no io_uring)",
                Some(Errno::EPERM) => {
                    " (blocked: a seccomp profile, e.g. a container's default, or \
                     kernel.io_uring_disabled)"
                }
                Some(Errno::ENOMEM) => " (locked-memory limit too low?)",
                _ => "",
            };
            format!("io_uring_setup failed: {e}{why}")
        })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("io_uring opcode probe failed (kernel older than 5.6?): {e}"))?;
        for (code, name) in [
            (opcode::Write::CODE, "WRITE"),
            (opcode::Read::CODE, "READ"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Nop::CODE, "NOP"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("this kernel's io_uring does not support IORING_OP_{name}"));
            }
        }
        let mut io = UringIo { ring, broken: None };
        // A full round trip: some sandboxes allow io_uring_setup but not io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP references no memory.
        match unsafe { io.execute(&[nop]) } {
            Ok(r) if r[0] == 0 => Ok(io),
            Ok(r) => Err(format!("io_uring NOP completed with {}", r[0])),
            Err(e) => Err(format!("io_uring NOP round trip failed: {e}")),
        }
    }

    /// Push `entries` (their user_data must be their index), submit them and wait for every
    /// completion. Returns the results by index.
    ///
    /// # Safety
    /// Every buffer an entry points to must stay valid, and must not be otherwise accessed in a
    /// way that conflicts with the kernel's (reads of a write buffer are fine; nothing may touch
    /// a read buffer), until this returns. It returns only after every submitted entry
    /// completed; if that cannot be ensured, it aborts the process rather than return.
    unsafe fn execute(&mut self, entries: &[squeue::Entry]) -> io::Result<Vec<i32>> {
        if let Some(msg) = &self.broken {
            return Err(io::Error::other(msg.clone()));
        }
        let n = entries.len();
        debug_assert!(n > 0 && n <= RING_ENTRIES as usize);
        {
            let mut sq = self.ring.submission();
            // SAFETY: the buffers' validity until completion is the caller's promise, and this
            // function does not return before every submitted entry completed.
            unsafe { sq.push_multiple(entries) }
                .map_err(|_| io::Error::other("io_uring submission queue unexpectedly full"))?;
        }
        let mut results: Vec<Option<i32>> = vec![None; n];
        let mut done = 0usize;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e) => match e.raw_os_error().map(nix::errno::Errno::from_raw) {
                    Some(nix::errno::Errno::EINTR) => {}
                    // Out of kernel resources, or completions backed up: reap, pause, retry.
                    Some(nix::errno::Errno::EAGAIN) | Some(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_micros(50)),
                    _ => return Err(self.fail(e, n, done)),
                },
            }
            for cqe in self.ring.completion() {
                let idx = cqe.user_data() as usize;
                if let Some(slot @ None) = results.get_mut(idx) {
                    *slot = Some(cqe.result());
                    done += 1;
                }
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(-(nix::errno::Errno::EIO as i32))).collect())
    }

    /// An unrecoverable io_uring_enter error. Entries the kernel has not consumed stay in the
    /// submission queue, so the ring must never be entered again. If any consumed entry has not
    /// completed, the kernel may still use its buffer after we return, which would be a
    /// use-after-free: abort instead.
    fn fail(&mut self, e: io::Error, n: usize, done: usize) -> io::Error {
        let unconsumed = self.ring.submission().len();
        let in_flight = n.saturating_sub(done).saturating_sub(unconsumed);
        let msg = format!(
            "io_uring_enter failed: {e}; this log device can no longer be used: close and reopen \
             the log (or use io path \"sync\")"
        );
        if in_flight > 0 {
            eprintln!(
                "fams: fatal: {msg}; {in_flight} request(s) are still in flight with borrowed \
                 buffers, aborting to avoid memory corruption"
            );
            std::process::abort();
        }
        self.broken = Some(msg.clone());
        io::Error::new(e.kind(), msg)
    }
}

impl Backend for UringIo {
    const IO_PATH: IoPath = IoPath::Uring;

    fn write_durable(
        &mut self,
        t: &Target,
        flush: FlushMode,
        pieces: &[(u64, &[u8])],
        stats: &mut IoStats,
    ) -> io::Result<()> {
        let fd = types::Fd(t.file.as_raw_fd());
        let dsync = flush == FlushMode::Dsync;
        let per_batch = if dsync { RING_ENTRIES as usize } else { RING_ENTRIES as usize - 1 };
        for batch in pieces.chunks(per_batch) {
            let mut entries = Vec::with_capacity(batch.len() + 1);
            for (i, &(offset, data)) in batch.iter().enumerate() {
                let mut w = opcode::Write::new(fd, data.as_ptr(), data.len() as u32).offset(offset);
                if dsync {
                    // libc constant: nix has no RWF_* flags (io_uring takes the raw value).
                    w = w.rw_flags(libc::RWF_DSYNC);
                }
                let mut e = w.build().user_data(i as u64);
                if !dsync {
                    e = e.flags(squeue::Flags::IO_LINK);
                }
                entries.push(e);
            }
            if !dsync {
                let sync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
                entries.push(sync.user_data(batch.len() as u64));
            }
            // SAFETY: every `data` slice is borrowed from the caller for this whole call (only
            // read by the kernel), and `execute` returns only after all completions.
            let results =
                unsafe { self.execute(&entries) }.map_err(|e| annotate(&t.path, e, "io_uring write submission"))?;

            let mut error: Option<io::Error> = None;
            let mut cancelled: Option<io::Error> = None;
            for (i, &(offset, data)) in batch.iter().enumerate() {
                let what = || {
                    format!(
                        "io_uring write{} of {} bytes at offset {offset}",
                        if dsync { " (RWF_DSYNC)" } else { "" },
                        data.len()
                    )
                };
                let r = results[i];
                if r >= 0 && r as usize == data.len() {
                    stats.writes += 1;
                    stats.bytes_written += data.len() as u64;
                    if dsync {
                        stats.dsync_writes += 1;
                    }
                } else if r == -(nix::errno::Errno::ECANCELED as i32) {
                    cancelled.get_or_insert_with(|| errno_error(&t.path, nix::errno::Errno::ECANCELED as i32, &what()));
                } else if r < 0 {
                    error.get_or_insert_with(|| errno_error(&t.path, -r, &what()));
                } else {
                    error.get_or_insert_with(|| {
                        io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!(
                                "fams log {}: {} wrote only {r} bytes; the device may be full, \
                                 shrunk or failing",
                                t.path.display(),
                                what()
                            ),
                        )
                    });
                }
            }
            if !dsync {
                let r = results[batch.len()];
                if r == 0 {
                    stats.fdatasyncs += 1;
                } else if r == -(nix::errno::Errno::ECANCELED as i32) {
                    cancelled.get_or_insert_with(|| errno_error(&t.path, nix::errno::Errno::ECANCELED as i32, "io_uring linked fdatasync"));
                } else {
                    error.get_or_insert_with(|| {
                        errno_error(&t.path, if r < 0 { -r } else { nix::errno::Errno::EIO as i32 }, "io_uring linked fdatasync")
                    });
                }
            }
            // A real failure explains any cancellations that followed it in the chain.
            if let Some(e) = error.or(cancelled) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn read(&mut self, t: &Target, pieces: &mut [(u64, &mut [u8])], stats: &mut IoStats) -> io::Result<()> {
        let fd = types::Fd(t.file.as_raw_fd());
        for batch in pieces.chunks_mut(RING_ENTRIES as usize) {
            let entries: Vec<squeue::Entry> = batch
                .iter_mut()
                .enumerate()
                .map(|(i, (offset, buf))| {
                    opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                        .offset(*offset)
                        .build()
                        .user_data(i as u64)
                })
                .collect();
            // SAFETY: every buffer is exclusively borrowed from the caller for this whole call
            // and not touched until `execute` returns, which is after all completions.
            let results =
                unsafe { self.execute(&entries) }.map_err(|e| annotate(&t.path, e, "io_uring read submission"))?;
            for (i, (offset, buf)) in batch.iter().enumerate() {
                let what = format!("io_uring read of {} bytes at offset {offset}", buf.len());
                let r = results[i];
                if r < 0 {
                    return Err(errno_error(&t.path, -r, &what));
                }
                if r as usize != buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "fams log {}: {what} returned only {r} bytes (end of device); the log \
                             is shorter than expected",
                            t.path.display()
                        ),
                    ));
                }
                stats.reads += 1;
                stats.bytes_read += buf.len() as u64;
            }
        }
        Ok(())
    }
}
