//! The FUSE request handlers: each request is decoded on one of fuser's threads, handed to the
//! store thread (which owns the heap: a heap is not `Send`) as a job, executed there in arrival
//! order by [`Core`], and answered from there — or, when the answer promises durability (a sync,
//! a namespace operation), from the durability thread once the commit is durable. Neither
//! fuser's threads nor the store thread wait for the disk: requests of other files go on while a
//! commit is written, and commits issued meanwhile share device writes.
//!
//! Caching (see `kernel-facts.md`): files open in cached mode (no `FOPEN_DIRECT_IO`, so writable
//! `MAP_SHARED` works) without `FOPEN_KEEP_CACHE` (every open drops the kernel's cached pages, so
//! discarded data is never seen again); attributes are never cached (TTL 0: sizes change when
//! staged changes are discarded), names for one second (only this daemon changes them).
//! `flush` and `fsync` are implemented: fuser's defaults answer ENOSYS, after which the kernel
//! stops sending FSYNC and msync "succeeds" with nothing durable.

use super::core::Core;
use super::layout::{Attr, Fail, MetaChange, NewInode, KIND_DIR, KIND_FILE};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::Sender;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A request's work, run on the store thread.
pub type Job = Box<dyn FnOnce(&mut Core) + Send>;

/// The largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// The status attribute: open handles and staged bytes of a file (for tests and operators).
pub const STATUS_XATTR: &str = "user.fams.status";

const ENTRY_TTL: Duration = Duration::from_secs(1);
const ATTR_TTL: Duration = Duration::ZERO;

pub struct MountFs {
    tx: Sender<Job>,
}

impl MountFs {
    pub fn new(tx: Sender<Job>) -> MountFs {
        MountFs { tx }
    }

    /// Run `job` on the store thread. If that thread is gone (the store failed), the job is
    /// dropped, and with it its reply, which fuser then answers with EIO.
    fn run(&self, job: impl FnOnce(&mut Core) + Send + 'static) {
        if self.tx.send(Box::new(job)).is_err() {
            tracing::error!("the store thread is gone; answering EIO");
        }
    }
}

pub fn errno(f: &Fail) -> Errno {
    match f {
        Fail::NotFound => Errno::ENOENT,
        Fail::Exists => Errno::EEXIST,
        Fail::NotDir => Errno::ENOTDIR,
        Fail::IsDir => Errno::EISDIR,
        Fail::NotEmpty => Errno::ENOTEMPTY,
        Fail::Invalid => Errno::EINVAL,
        Fail::NameTooLong => Errno::ENAMETOOLONG,
        Fail::TooBig => Errno::EFBIG,
        Fail::NoSpace(_) => Errno::ENOSPC,
        Fail::Io(e) => {
            tracing::error!("{e}");
            Errno::EIO
        }
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

fn ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn kind(k: u32) -> FileType {
    if k == KIND_DIR {
        FileType::Directory
    } else {
        FileType::RegularFile
    }
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.mtime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, Fail>) {
    match r {
        Ok(a) => reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Fail>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Answer `answer` with `r` once everything committed so far is durable (a failure at once):
/// namespace operations and syncs are durable when they return. The store thread goes on
/// meanwhile; the answer comes from the durability thread ([`Core::after_durable`]).
fn when_durable<T: Send + 'static>(
    c: &mut Core,
    r: Result<T, Fail>,
    answer: impl FnOnce(Result<T, Fail>) + Send + 'static,
) {
    match r {
        Ok(v) => c.after_durable(move |durable| answer(durable.map(|()| v))),
        Err(e) => answer(Err(e)),
    }
}

impl Filesystem for MountFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(n) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(n);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.run(move |c| reply_entry(reply, c.lookup(parent.0, &name)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.run(move |c| match c.attr(ino.0) {
            Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mtime_ns = mtime.map(|t| match t {
            TimeOrNow::SpecificTime(t) => ns(t),
            TimeOrNow::Now => super::layout::now_ns(),
        });
        let _ = atime; // atime is mtime here (not kept separately)
        self.run(move |c| {
            let r = (|| {
                if let Some(size) = size {
                    // Staged with the file's data; durable at its next sync.
                    c.set_size(ino.0, size)?;
                }
                if mode.is_some() || uid.is_some() || gid.is_some() || (mtime_ns.is_some() && size.is_none()) {
                    // Metadata: durable when this returns.
                    let m = MetaChange { mode, uid, gid, mtime_ns, ctime_ns: ctime.map(ns) };
                    return c.set_meta(ino.0, m);
                }
                c.attr(ino.0)
            })();
            when_durable(c, r, move |r| match r {
                Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            });
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            tracing::info!("mknod {name:?}: only regular files and directories are supported (mode {mode:#o})");
            return reply.error(Errno::EPERM);
        }
        let name = name.as_bytes().to_vec();
        let n = NewInode {
            kind: KIND_FILE,
            mode: mode & !umask,
            uid: req.uid(),
            gid: req.gid(),
            now_ns: super::layout::now_ns(),
        };
        self.run(move |c| {
            let r = c.create(parent.0, &name, n, false).map(|(a, _)| a);
            when_durable(c, r, move |r| reply_entry(reply, r));
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        let n = NewInode {
            kind: KIND_DIR,
            mode: mode & !umask,
            uid: req.uid(),
            gid: req.gid(),
            now_ns: super::layout::now_ns(),
        };
        self.run(move |c| {
            let r = c.create(parent.0, &name, n, false).map(|(a, _)| a);
            when_durable(c, r, move |r| reply_entry(reply, r));
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.run(move |c| {
            let r = c.remove(parent.0, &name, false);
            when_durable(c, r, move |r| reply_empty(reply, r));
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.run(move |c| {
            let r = c.remove(parent.0, &name, true);
            when_durable(c, r, move |r| reply_empty(reply, r));
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.run(move |c| {
            let r = c.rename(parent.0, &name, newparent.0, &newname, noreplace);
            when_durable(c, r, move |r| reply_empty(reply, r));
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Cached mode, and no FOPEN_KEEP_CACHE: see the module docs.
        self.run(move |c| match c.open(ino.0, false) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(Errno::EPERM);
        }
        let name = name.as_bytes().to_vec();
        let n = NewInode {
            kind: KIND_FILE,
            mode: mode & !umask,
            uid: req.uid(),
            gid: req.gid(),
            now_ns: super::layout::now_ns(),
        };
        self.run(move |c| {
            let r = c.create(parent.0, &name, n, true);
            when_durable(c, r, move |r| match r {
                Ok((a, fh)) => {
                    reply.created(&ENTRY_TTL, &file_attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(errno(&e)),
            });
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(move |c| match c.read(ino.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Staged per inode, whichever handle it came on (mapped pages come on any writable one).
        let from_cache = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let Ok(len) = u32::try_from(data.len()) else { return reply.error(Errno::EINVAL) };
        let data = data.to_vec();
        self.run(move |c| match c.write(ino.0, offset, &data, from_cache) {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // With --commit-on-close a close commits: it returns once that is durable.
        self.run(move |c| {
            let r = c.flush(ino.0);
            when_durable(c, r, move |r| reply_empty(reply, r));
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run(move |c| {
            c.release(fh.0, ino.0);
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // fsync, fdatasync and msync(MS_SYNC) all arrive here (after the dirty pages' WRITEs).
        // Answered once the commit is durable — and, when this file had nothing staged, once an
        // earlier commit still on its way (another process's sync of it, say) is.
        self.run(move |c| {
            let r = c.sync(ino.0);
            when_durable(c, r, move |r| reply_empty(reply, r));
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(move |c| match c.open(ino.0, true) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.run(move |c| {
            let Some(list) = c.listing(fh.0) else { return reply.error(Errno::EBADF) };
            for (i, (ino, k, name)) in list.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
                if reply.add(INodeNo(*ino), i as u64 + 1, kind(*k), OsStr::from_bytes(name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.run(move |c| {
            c.release(fh.0, ino.0);
            reply.ok();
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace operations are durable when they return; this waits for any still on its way.
        self.run(move |c| when_durable(c, Ok(()), move |r| reply_empty(reply, r)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(move |c| {
            let (len, max) = c.store.space();
            let blocks = max / 4096;
            // Free space inside the heap is not tracked here; report what the heap can still grow by.
            let free = max.saturating_sub(len) / 4096;
            reply.statfs(blocks, free, free, 0, 0, 4096, super::layout::NAME_MAX as u32, 4096);
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() != STATUS_XATTR.as_bytes() {
            return reply.error(Errno::ENODATA);
        }
        self.run(move |c| {
            let v = c.status(ino.0);
            if size == 0 {
                reply.size(v.len() as u32);
            } else if (size as usize) < v.len() {
                reply.error(Errno::ERANGE);
            } else {
                reply.data(v.as_bytes());
            }
        });
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            // Punching holes, zeroing ranges, keep-size: not in this version.
            return reply.error(Errno::ENOTSUP);
        }
        let Some(end) = offset.checked_add(length) else { return reply.error(Errno::EFBIG) };
        self.run(move |c| {
            let r = c.attr(ino.0).and_then(|a| if end > a.size { c.set_size(ino.0, end) } else { Ok(()) });
            reply_empty(reply, r);
        });
    }
}
