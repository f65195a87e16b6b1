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
            let off = libc::off_t::try_from(offset).map_err(|_| errno_error(&t.path, nix::errno::Errno::EOVERFLOW as i32, &what()))?;
            let n = loop {
                let n = if dsync {
                    let iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
                    // raw libc: nix has no wrapper for pwritev2 (RWF_DSYNC).
                    // SAFETY: `iov` describes `data`, which is borrowed (alive, not mutated) for
                    // the whole call; the kernel only reads it. One iovec, count 1.
                    let n = unsafe { libc::pwritev2(fd, &iov, 1, off, libc::RWF_DSYNC) };
                    if n < 0 {
                        Err(nix::errno::Errno::last())
                    } else {
                        Ok(n as usize)
                    }
                } else {
                    nix::sys::uio::pwrite(&t.file, data, off)
                };
                match n {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(errno) => return Err(errno_error(&t.path, errno as i32, &what())),
                }
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
                match nix::unistd::fdatasync(&t.file) {
                    Ok(()) => break,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(errno) => return Err(errno_error(&t.path, errno as i32, "fdatasync")),
                }
            }
            stats.fdatasyncs += 1;
        }
        Ok(())
    }

    fn read(&mut self, t: &Target, pieces: &mut [(u64, &mut [u8])], stats: &mut IoStats) -> io::Result<()> {
        for (offset, buf) in pieces.iter_mut() {
            let (offset, len) = (*offset, buf.len());
            let what = format!("pread of {len} bytes at offset {offset}");
            let off = libc::off_t::try_from(offset).map_err(|_| errno_error(&t.path, nix::errno::Errno::EOVERFLOW as i32, &what))?;
            let mut done = 0usize;
            while done < len {
                let rest = &mut buf[done..];
                let n = match nix::sys::uio::pread(&t.file, rest, off + done as libc::off_t) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(errno) => return Err(errno_error(&t.path, errno as i32, &what)),
                };
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
