//! The Sync backend: plain blocking syscalls, for when io_uring is unavailable (seccomp-restricted
//! containers, `kernel.io_uring_disabled`, old kernels) or chosen explicitly.
//!
//! Dsync: one `pwritev2(.., RWF_DSYNC)` per segment. Fdatasync: `pwrite` per segment, then one
//! `fdatasync`.

use std::io;
use std::os::fd::AsRawFd;

use super::device::{errno_error, Target};
use super::{Backend, FlushMode, IoPath, IoStats};

pub(crate) struct SyncIo;

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

impl Backend for SyncIo {
    const IO_PATH: IoPath = IoPath::Sync;

    fn write_durable(
        &mut self,
        t: &Target,
        flush: FlushMode,
        pieces: &[(u64, &[u8])],
        stats: &mut IoStats,
    ) -> io::Result<()> {
        let fd = t.file.as_raw_fd();
        let dsync = flush == FlushMode::Dsync;
        for &(offset, data) in pieces {
            let what = || {
                format!(
                    "{} of {} bytes at offset {offset}",
                    if dsync { "pwritev2(RWF_DSYNC)" } else { "pwrite" },
                    data.len()
                )
            };
            let off = libc::off_t::try_from(offset).map_err(|_| errno_error(&t.path, libc::EOVERFLOW, &what()))?;
            let n = loop {
                let n = if dsync {
                    let iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
                    // SAFETY: `iov` describes `data`, which is borrowed (alive, not mutated) for
                    // the whole call; the kernel only reads it. One iovec, count 1.
                    unsafe { libc::pwritev2(fd, &iov, 1, off, libc::RWF_DSYNC) }
                } else {
                    // SAFETY: `data` is a live borrowed slice of `data.len()` readable bytes.
                    unsafe { libc::pwrite(fd, data.as_ptr() as *const libc::c_void, data.len(), off) }
                };
                if n < 0 {
                    let errno = last_errno();
                    if errno == libc::EINTR {
                        continue;
                    }
                    return Err(errno_error(&t.path, errno, &what()));
                }
                break n as usize;
            };
            if n != data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "fams log {}: {} wrote only {n} bytes; the device may be full, shrunk \
                         or failing",
                        t.path.display(),
                        what()
                    ),
                ));
            }
            stats.writes += 1;
            stats.bytes_written += n as u64;
            if dsync {
                stats.dsync_writes += 1;
            }
        }
        if !dsync {
            loop {
                // SAFETY: plain syscall on an fd owned by `t.file`; no pointers.
                if unsafe { libc::fdatasync(fd) } == 0 {
                    break;
                }
                let errno = last_errno();
                if errno != libc::EINTR {
                    return Err(errno_error(&t.path, errno, "fdatasync"));
                }
            }
            stats.fdatasyncs += 1;
        }
        Ok(())
    }

    fn read(&mut self, t: &Target, pieces: &mut [(u64, &mut [u8])], stats: &mut IoStats) -> io::Result<()> {
        let fd = t.file.as_raw_fd();
        for (offset, buf) in pieces.iter_mut() {
            let (offset, len) = (*offset, buf.len());
            let what = format!("pread of {len} bytes at offset {offset}");
            let off = libc::off_t::try_from(offset).map_err(|_| errno_error(&t.path, libc::EOVERFLOW, &what))?;
            let mut done = 0usize;
            while done < len {
                let rest = &mut buf[done..];
                // SAFETY: `rest` is a live, exclusively borrowed slice of `rest.len()` writable
                // bytes for the duration of the call.
                let n = unsafe {
                    libc::pread(fd, rest.as_mut_ptr() as *mut libc::c_void, rest.len(), off + done as libc::off_t)
                };
                if n < 0 {
                    let errno = last_errno();
                    if errno == libc::EINTR {
                        continue;
                    }
                    return Err(errno_error(&t.path, errno, &what));
                }
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "fams log {}: {what} ended after {done} bytes (end of device); the \
                             log is shorter than expected",
                            t.path.display()
                        ),
                    ));
                }
                done += n as usize;
            }
            stats.reads += 1;
            stats.bytes_read += len as u64;
        }
        Ok(())
    }
}
