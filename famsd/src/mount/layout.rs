//! The file system inside the heap: its on-heap format, and every operation that changes it.
//!
//! # Format (object-layer schema [`SCHEMA`], root format [`FORMAT`])
//!
//! The store is a fams heap made by `famsd format`, with the object layer ([`ObjectHeap`]: the
//! persistent allocator and collections; it grows the heap on demand when the heap was formatted
//! with `--max-size`). The object layer records the schema version [`SCHEMA`]; a heap of another
//! program is refused with a clear error. The file system is the named root [`ROOT_NAME`]:
//!
//! ```text
//! FsRoot  { format: u64 = FORMAT,
//!           next_ino: u64,                          // inode numbers are never reused
//!           inodes: PHashMap<u64, Inode> }          // inode number → inode; 1 is the root directory
//! Inode   { kind: u32,                              // 1 regular file, 2 directory
//!           mode: u32,                              // permission bits (07777)
//!           uid: u32, gid: u32,
//!           nlink: u32,                             // files: 1 while named, 0 once unlinked (an orphan
//!                                                   //   kept while open; removed at the last release,
//!                                                   //   or at the next mount after a crash)
//!           _reserved: u32,
//!           size: u64,                              // committed size in bytes (files)
//!           mtime_ns: i64, ctime_ns: i64,           // nanoseconds since the Unix epoch
//!           parent: u64,                            // directories: the parent directory (root: 1)
//!           subdirs: u64,                           // directories: how many entries are directories
//!           blocks: PVec<PVec<u8>>,                 // files: block i holds bytes [i·4096, (i+1)·4096);
//!                                                   //   an empty PVec is a hole (reads as zeros); no
//!                                                   //   block lies wholly past `size`, and the bytes of
//!                                                   //   the last block past `size` are zero
//!           entries: PHashMap<PVec<u8>, u64> }      // directories: name → inode number
//! ```
//!
//! Every change here is one heap commit: namespace operations (create, mkdir, unlink, rmdir,
//! rename, chmod/chown/utimes) and [`Store::apply`] (one file's staged data and size: a sync). A
//! commit is issued without waiting for the disk ([`ObjectHeap::commit_async`]): the store goes on
//! with the next request while the record is written, and whoever promises durability waits for
//! [`Store::durable_after`] first (the request handlers answer from the durability thread). An
//! operation that fails part way (a full store) is rolled back ([`ObjectHeap::rollback`]):
//! nothing is left half done, in the heap or in memory.

use fams::alloc::{BySlice, HeapAlloc, ObjectError, ObjectHeap, ObjectOptions, PHashMap, PVec};
use fams::{DurabilityHandle, Heap, HeapOptions, Ticket};
use std::path::{Path, PathBuf};

/// The object layer's schema version of a mount store ("fmnt" and version 1).
pub const SCHEMA: u64 = 0x666d_6e74_0000_0001;
/// The named root holding the file system.
pub const ROOT_NAME: &str = "famsd.mount";
/// The format of [`FsRoot`].
pub const FORMAT: u64 = 1;
/// Bytes per file block (and per staged page).
pub const BLOCK: usize = 4096;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;
/// Longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;

pub const KIND_FILE: u32 = 1;
pub const KIND_DIR: u32 = 2;

fams::persistent! {
    /// The file system (the named root [`ROOT_NAME`]).
    pub struct FsRoot<'h> {
        pub format: u64,
        pub next_ino: u64,
        pub inodes: PHashMap<'h, u64, Inode<'h>>,
    }
}

fams::persistent! {
    /// One file or directory.
    pub struct Inode<'h> {
        pub kind: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub nlink: u32,
        pub reserved: u32,
        pub size: u64,
        pub mtime_ns: i64,
        pub ctime_ns: i64,
        pub parent: u64,
        pub subdirs: u64,
        pub blocks: PVec<'h, PVec<'h, u8>>,
        pub entries: PHashMap<'h, PVec<'h, u8>, u64>,
    }
}

/// Why an operation failed (mapped to an errno by the request handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    /// E.g. moving a directory into itself.
    Invalid,
    NameTooLong,
    /// Past the largest file size.
    TooBig,
    /// The store is full (at its maximum size, or its disk is full). Nothing was changed.
    NoSpace(String),
    /// The heap failed (I/O error, damaged metadata); the message says what.
    Io(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::NoSpace(s) => write!(f, "store full: {s}"),
            Fail::Io(s) => write!(f, "store error: {s}"),
            other => write!(f, "{other:?}"),
        }
    }
}

fn from_object(e: ObjectError) -> Fail {
    match e {
        e @ ObjectError::Exhausted { .. } => Fail::NoSpace(e.to_string()),
        ObjectError::Heap(h @ fams::Error::CommitTooLarge { .. }) => Fail::NoSpace(h.to_string()),
        ObjectError::Heap(h) if h.to_string().contains("No space left") => Fail::NoSpace(h.to_string()),
        e => Fail::Io(e.to_string()),
    }
}

fn full(what: &str) -> Fail {
    Fail::NoSpace(format!("no room in the store for {what} (it is at its maximum size or its disk is full)"))
}

/// A directory entry: (inode, kind, name).
pub type DirEntry = (u64, u32, Vec<u8>);

/// What `stat` shows of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Inode<'_> {
    fn attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            nlink: if self.kind == KIND_DIR { 2 + self.subdirs.min(u32::MAX as u64 - 2) as u32 } else { self.nlink },
            size: if self.kind == KIND_DIR { 0 } else { self.size },
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        }
    }
}

/// Ownership and mode of a new inode.
#[derive(Debug, Clone, Copy)]
pub struct NewInode {
    pub kind: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub now_ns: i64,
}

/// Metadata changes that are durable at once (chmod, chown, utimes).
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime_ns: Option<i64>,
    pub ctime_ns: Option<i64>,
}

/// One file's staged changes, as [`Store::apply`] commits them.
pub struct FileChanges<'a> {
    /// The lowest size the file was truncated to since its last commit: committed bytes at or
    /// past it are gone.
    pub cut: Option<u64>,
    /// The new size.
    pub size: u64,
    /// Whole blocks to write: (block index, 4096 bytes).
    pub blocks: &'a mut dyn Iterator<Item = (u64, &'a [u8])>,
    pub mtime_ns: Option<i64>,
}

/// Counters of the store (for logs and the status attribute).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub commits: u64,
    pub rollbacks: u64,
}

/// The mounted store: the heap with the file system in it. Lives on one thread (a heap is not
/// `Send`).
pub struct Store {
    /// None only after a failed reopen (see [`Store::reopen`]): every operation is then EIO.
    objects: Option<ObjectHeap>,
    path: PathBuf,
    /// Opens the store's heap (again, in [`Store::reopen`]).
    open_heap: HeapOpener,
    /// The last commit issued (it and every one before it are durable once it is).
    last_commit: Option<Ticket>,
    /// Wait for each commit where it is made ([`Store::set_sync_commits`]).
    sync_commits: bool,
    pub stats: StoreStats,
}

/// Opens the heap a store lives in: from its path ([`Store::open`]), or on any storage — the
/// mount's power-loss explorer opens it on a simulated machine ([`Store::open_with`]).
pub type HeapOpener = Box<dyn FnMut() -> Result<Heap, String>>;

fn new_root(a: HeapAlloc<'_>) -> FsRoot<'_> {
    FsRoot { format: FORMAT, next_ino: ROOT_INO + 1, inodes: PHashMap::new_in(a) }
}

fn new_inode<'h>(a: HeapAlloc<'h>, n: &NewInode, parent: u64) -> Inode<'h> {
    Inode {
        kind: n.kind,
        mode: n.mode & 0o7777,
        uid: n.uid,
        gid: n.gid,
        nlink: 1,
        reserved: 0,
        size: 0,
        mtime_ns: n.now_ns,
        ctime_ns: n.now_ns,
        parent,
        subdirs: 0,
        blocks: PVec::new_in(a),
        entries: PHashMap::new_in(a),
    }
}

fn name_in<'h>(a: HeapAlloc<'h>, name: &[u8]) -> Result<PVec<'h, u8>, Fail> {
    let mut v = PVec::new_in(a);
    v.try_reserve_exact(name.len()).map_err(|_| full("a name"))?;
    v.extend_from_slice(name);
    Ok(v)
}

fn check_name(name: &[u8]) -> Result<(), Fail> {
    if name.len() > NAME_MAX {
        return Err(Fail::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(Fail::Invalid);
    }
    Ok(())
}

fn dir<'a, 'h>(root: &'a FsRoot<'h>, ino: u64) -> Result<&'a Inode<'h>, Fail> {
    let i = root.inodes.get(&ino).ok_or(Fail::NotFound)?;
    if i.kind != KIND_DIR {
        return Err(Fail::NotDir);
    }
    Ok(i)
}

fn child(root: &FsRoot<'_>, parent: u64, name: &[u8]) -> Result<Option<u64>, Fail> {
    Ok(dir(root, parent)?.entries.get(&BySlice(name)).copied())
}

impl Store {
    /// Open the store at `path` (its redo log: the one recorded in the heap, or `log`), creating
    /// the file system in a fresh heap, and removing inodes a crash left unlinked but not freed.
    pub fn open(path: &Path, log: Option<PathBuf>) -> Result<Store, String> {
        let heap_path = path.to_path_buf();
        Store::open_with(
            path,
            Box::new(move || {
                let opts = HeapOptions { log_path: log.clone(), ..HeapOptions::default() };
                Heap::open(&heap_path, &opts).map_err(|e| {
                    format!(
                        "{}: cannot open the store: {e} (make one with `famsd format --heap STORE --size 64M --max-size 64G`)",
                        heap_path.display()
                    )
                })
            }),
        )
    }

    /// [`Store::open`] with the heap `open_heap` opens (on any storage); `path` names the store
    /// in messages.
    pub fn open_with(path: &Path, mut open_heap: HeapOpener) -> Result<Store, String> {
        let objects = Self::open_objects(path, &mut open_heap)?;
        let mut store = Store {
            objects: Some(objects),
            path: path.to_path_buf(),
            open_heap,
            last_commit: None,
            // Opening is one deterministic sequence of I/O (crash tests repeat it and cut it
            // at a chosen operation): its commits wait where they are made.
            sync_commits: true,
            stats: StoreStats::default(),
        };
        store.init().map_err(|e| format!("{}: {e}", path.display()))?;
        store.sync_commits = false;
        Ok(store)
    }

    fn open_objects(path: &Path, open_heap: &mut HeapOpener) -> Result<ObjectHeap, String> {
        let heap = open_heap()?;
        let objects = ObjectHeap::open(heap, &ObjectOptions::schema(SCHEMA)).map_err(|e| match e {
            ObjectError::SchemaVersion { found, .. } => format!(
                "{}: not a famsd mount store: its objects belong to another program (schema {found:#x}, a mount store has {SCHEMA:#x})",
                path.display()
            ),
            ObjectError::NotAnObjectHeap { reason, .. } => {
                format!("{}: not a famsd mount store: the heap holds other data ({reason})", path.display())
            }
            e => format!("{}: not a usable famsd mount store: {e}", path.display()),
        })?;
        Ok(objects)
    }

    fn objects(&mut self) -> Result<&mut ObjectHeap, Fail> {
        self.objects.as_mut().ok_or_else(|| {
            Fail::Io("the store could not be reopened after a failed rollback; unmount and mount again".into())
        })
    }

    /// Drop the heap's uncommitted state the way a crash would and open it again: the way back
    /// when a rollback fails (a poisoned heap: its dirty pages cannot be known, so its writes
    /// cannot be undone). Nothing committed is lost; staged file data is not in the heap.
    fn reopen(&mut self) -> Result<(), String> {
        if let Some(o) = self.objects.take() {
            // Commits on their way end first (durable, or failed with the heap): nobody waits on
            // a heap that is gone.
            if let Some(t) = self.last_commit.take() {
                let _ = o.wait(t);
            }
            o.abandon();
        }
        let objects = Self::open_objects(&self.path, &mut self.open_heap)?;
        self.objects = Some(objects);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What to wait for before promising that everything committed so far is durable: the last
    /// commit issued, and a handle that waits for it from any thread. None: nothing to wait for.
    pub fn durable_after(&self) -> Option<(DurabilityHandle, Ticket)> {
        if fams::mutations::is_on(fams::mutations::Mutation::MountAnswerBeforeDurable) {
            return None;
        }
        let o = self.objects.as_ref()?;
        self.last_commit.map(|t| (o.durability_handle(), t))
    }

    /// Make every commit wait here until it is durable before the operation returns, instead
    /// of going on while it is written. Only for tests that need one exact sequence of I/O
    /// operations per seed (the mount power-loss explorer's `--sync-only`).
    pub fn set_sync_commits(&mut self, on: bool) {
        self.sync_commits = on;
    }

    /// Wait here until everything committed so far is durable.
    pub fn wait_durable(&mut self) -> Result<(), Fail> {
        if fams::mutations::is_on(fams::mutations::Mutation::MountAnswerBeforeDurable) {
            return Ok(());
        }
        match self.last_commit {
            Some(t) => self.objects()?.wait(t).map_err(from_object),
            None => Ok(()),
        }
    }

    fn init(&mut self) -> Result<(), Fail> {
        let format = self.read(|r| r.format)?;
        if format != FORMAT {
            return Err(Fail::Io(format!(
                "the file system in this store has format {format}, this famsd reads format {FORMAT}"
            )));
        }
        let now = now_ns();
        self.mutate(|root, a| {
            if !root.inodes.contains_key(&ROOT_INO) {
                root.inodes.try_reserve(1).map_err(|_| full("the root directory"))?;
                let n = NewInode { kind: KIND_DIR, mode: 0o755, uid: 0, gid: 0, now_ns: now };
                root.inodes.insert(ROOT_INO, new_inode(a, &n, ROOT_INO));
            }
            // Files unlinked while open whose last release a crash prevented.
            let orphans: Vec<u64> =
                root.inodes.iter().filter(|(_, i)| i.kind == KIND_FILE && i.nlink == 0).map(|(k, _)| *k).collect();
            for ino in &orphans {
                root.inodes.remove(ino);
            }
            if !orphans.is_empty() {
                tracing::info!("removed {} unlinked files a crash left behind", orphans.len());
            }
            Ok(())
        })
    }

    /// Run `f` on the file system without changing it.
    fn read<R>(&mut self, f: impl for<'h> FnOnce(&'h mut FsRoot<'h>) -> R) -> Result<R, Fail> {
        let (root, _) = self.objects()?.named_root(ROOT_NAME, new_root).map_err(from_object)?;
        Ok(f(root))
    }

    /// Run `f` and commit what it changed; if it fails (or the commit does), roll everything
    /// back to the last commit.
    fn mutate<R>(
        &mut self,
        f: impl for<'h> FnOnce(&'h mut FsRoot<'h>, HeapAlloc<'h>) -> Result<R, Fail>,
    ) -> Result<R, Fail> {
        let objects = self.objects()?;
        let r = match objects.named_root(ROOT_NAME, new_root) {
            Ok((root, a)) => f(root, a),
            Err(e) => Err(from_object(e)),
        };
        let sync = self.sync_commits;
        let r = r.and_then(|v| {
            let objects = self.objects()?;
            let ticket = if sync { objects.commit() } else { objects.commit_async() };
            ticket.map(|t| (v, t)).map_err(from_object)
        });
        match r {
            Ok((v, ticket)) => {
                self.stats.commits += 1;
                self.last_commit = Some(ticket);
                Ok(v)
            }
            Err(e) => {
                self.stats.rollbacks += 1;
                let rolled_back = match self.objects() {
                    Ok(o) => o.rollback().map(|_| ()).map_err(|re| re.to_string()),
                    Err(re) => Err(re.to_string()),
                };
                if let Err(re) = rolled_back {
                    tracing::warn!("rolling back after {e} failed ({re}); reopening the store");
                    if let Err(oe) = self.reopen() {
                        tracing::error!("reopening the store failed: {oe}");
                        return Err(Fail::Io(format!("{e}; the rollback failed ({re}) and so did reopening ({oe})")));
                    }
                }
                Err(e)
            }
        }
    }

    pub fn attr(&mut self, ino: u64) -> Result<Attr, Fail> {
        self.read(|r| r.inodes.get(&ino).map(|i| i.attr(ino)))?.ok_or(Fail::NotFound)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Attr, Fail> {
        self.read(|r| {
            let ino = child(r, parent, name)?.ok_or(Fail::NotFound)?;
            r.inodes.get(&ino).map(|i| i.attr(ino)).ok_or(Fail::NotFound)
        })?
    }

    /// The entries of a directory: (inode, kind, name).
    pub fn list(&mut self, ino: u64) -> Result<(u64, Vec<DirEntry>), Fail> {
        self.read(|r| {
            let d = dir(r, ino)?;
            let mut out: Vec<DirEntry> = d
                .entries
                .iter()
                .map(|(name, &c)| (c, r.inodes.get(&c).map_or(KIND_FILE, |i| i.kind), name.to_vec()))
                .collect();
            out.sort_by(|a, b| a.2.cmp(&b.2));
            Ok((d.parent, out))
        })?
    }

    /// Make a file or directory `name` in `parent`. Durable when it returns.
    pub fn create(&mut self, parent: u64, name: &[u8], n: NewInode) -> Result<Attr, Fail> {
        check_name(name)?;
        self.mutate(|root, a| {
            if child(root, parent, name)?.is_some() {
                return Err(Fail::Exists);
            }
            let ino = root.next_ino;
            root.next_ino += 1;
            let key = name_in(a, name)?;
            root.inodes.try_reserve(1).map_err(|_| full("an inode"))?;
            root.inodes.insert(ino, new_inode(a, &n, parent));
            let p = root.inodes.get_mut(&parent).ok_or(Fail::NotFound)?;
            p.entries.try_reserve(1).map_err(|_| full("a directory entry"))?;
            p.entries.insert(key, ino);
            if n.kind == KIND_DIR {
                p.subdirs += 1;
            }
            p.mtime_ns = n.now_ns;
            p.ctime_ns = n.now_ns;
            Ok(root.inodes.get(&ino).map(|i| i.attr(ino)).expect("just inserted"))
        })
    }

    /// Remove `name` from `parent` (`want_dir`: rmdir, else unlink). A file still open is kept as
    /// an orphan (nlink 0) until [`Store::delete_orphan`]. Durable when it returns. Returns the
    /// inode removed from the namespace.
    pub fn remove(
        &mut self,
        parent: u64,
        name: &[u8],
        want_dir: bool,
        is_open: &dyn Fn(u64) -> bool,
    ) -> Result<u64, Fail> {
        let now = now_ns();
        self.mutate(|root, _| {
            let ino = child(root, parent, name)?.ok_or(Fail::NotFound)?;
            let (kind, empty) = {
                let i = root.inodes.get(&ino).ok_or(Fail::NotFound)?;
                (i.kind, i.entries.is_empty())
            };
            match (want_dir, kind == KIND_DIR) {
                (true, false) => return Err(Fail::NotDir),
                (false, true) => return Err(Fail::IsDir),
                (true, true) if !empty => return Err(Fail::NotEmpty),
                _ => {}
            }
            let p = root.inodes.get_mut(&parent).ok_or(Fail::NotFound)?;
            p.entries.remove(&BySlice(name));
            if kind == KIND_DIR {
                p.subdirs = p.subdirs.saturating_sub(1);
            }
            p.mtime_ns = now;
            p.ctime_ns = now;
            unlink_inode(root, ino, is_open);
            Ok(ino)
        })
    }

    /// Rename; replaces an existing target (a file, or an empty directory) unless `noreplace`.
    /// Durable when it returns.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
        is_open: &dyn Fn(u64) -> bool,
    ) -> Result<(), Fail> {
        check_name(newname)?;
        let now = now_ns();
        self.mutate(|root, a| {
            let ino = child(root, parent, name)?.ok_or(Fail::NotFound)?;
            let kind = root.inodes.get(&ino).ok_or(Fail::NotFound)?.kind;
            let target = child(root, newparent, newname)?;
            if target == Some(ino) {
                return Ok(());
            }
            if kind == KIND_DIR {
                // Not into itself or below itself.
                let mut at = newparent;
                loop {
                    if at == ino {
                        return Err(Fail::Invalid);
                    }
                    if at == ROOT_INO {
                        break;
                    }
                    at = root.inodes.get(&at).ok_or(Fail::NotFound)?.parent;
                }
            }
            if let Some(t) = target {
                if noreplace {
                    return Err(Fail::Exists);
                }
                let ti = root.inodes.get(&t).ok_or(Fail::NotFound)?;
                match (kind == KIND_DIR, ti.kind == KIND_DIR) {
                    (true, false) => return Err(Fail::NotDir),
                    (false, true) => return Err(Fail::IsDir),
                    (true, true) if !ti.entries.is_empty() => return Err(Fail::NotEmpty),
                    _ => {}
                }
            }
            let key = name_in(a, newname)?;
            root.inodes
                .get_mut(&newparent)
                .ok_or(Fail::NotFound)?
                .entries
                .try_reserve(1)
                .map_err(|_| full("a directory entry"))?;
            // From here on nothing allocates.
            if let Some(t) = target {
                let np = root.inodes.get_mut(&newparent).ok_or(Fail::NotFound)?;
                np.entries.remove(&BySlice(newname));
                if kind == KIND_DIR {
                    np.subdirs = np.subdirs.saturating_sub(1);
                }
                unlink_inode(root, t, is_open);
            }
            let p = root.inodes.get_mut(&parent).ok_or(Fail::NotFound)?;
            p.entries.remove(&BySlice(name));
            if kind == KIND_DIR {
                p.subdirs = p.subdirs.saturating_sub(1);
            }
            p.mtime_ns = now;
            p.ctime_ns = now;
            let np = root.inodes.get_mut(&newparent).ok_or(Fail::NotFound)?;
            np.entries.insert(key, ino);
            if kind == KIND_DIR {
                np.subdirs += 1;
            }
            np.mtime_ns = now;
            np.ctime_ns = now;
            let i = root.inodes.get_mut(&ino).ok_or(Fail::NotFound)?;
            i.ctime_ns = now;
            if kind == KIND_DIR {
                i.parent = newparent;
            }
            Ok(())
        })
    }

    /// chmod / chown / utimes: durable when it returns.
    pub fn set_meta(&mut self, ino: u64, m: MetaChange) -> Result<Attr, Fail> {
        self.mutate(|root, _| {
            let i = root.inodes.get_mut(&ino).ok_or(Fail::NotFound)?;
            if let Some(mode) = m.mode {
                i.mode = mode & 0o7777;
            }
            if let Some(uid) = m.uid {
                i.uid = uid;
            }
            if let Some(gid) = m.gid {
                i.gid = gid;
            }
            if let Some(t) = m.mtime_ns {
                i.mtime_ns = t;
            }
            i.ctime_ns = m.ctime_ns.unwrap_or_else(now_ns);
            Ok(i.attr(ino))
        })
    }

    /// Free an orphan (a file unlinked while open) at its last release. Durable when it returns.
    pub fn delete_orphan(&mut self, ino: u64) -> Result<(), Fail> {
        let orphan = self.read(|r| r.inodes.get(&ino).is_some_and(|i| i.kind == KIND_FILE && i.nlink == 0))?;
        if !orphan {
            return Ok(());
        }
        self.mutate(|root, _| {
            root.inodes.remove(&ino);
            Ok(())
        })
    }

    /// Copy committed block `index` of file `ino` into `out` (4096 bytes). False (and `out`
    /// untouched) for a hole or past the last block.
    pub fn committed_block(&mut self, ino: u64, index: u64, out: &mut [u8]) -> Result<bool, Fail> {
        self.read(|r| {
            let i = r.inodes.get(&ino).ok_or(Fail::NotFound)?;
            match i.blocks.get(index as usize) {
                Some(b) if b.len() == BLOCK => {
                    out[..BLOCK].copy_from_slice(b);
                    Ok(true)
                }
                _ => Ok(false),
            }
        })?
    }

    /// Read committed bytes [offset, offset + len) of file `ino`, clamped to its size.
    pub fn read_committed(&mut self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Fail> {
        self.read(|r| {
            let i = r.inodes.get(&ino).ok_or(Fail::NotFound)?;
            if i.kind != KIND_FILE {
                return Err(Fail::IsDir);
            }
            let end = offset.saturating_add(len as u64).min(i.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            let mut out = vec![0u8; (end - offset) as usize];
            let mut at = offset;
            while at < end {
                let b = at / BLOCK as u64;
                let within = (at % BLOCK as u64) as usize;
                let n = ((BLOCK - within) as u64).min(end - at) as usize;
                if let Some(block) = i.blocks.get(b as usize).filter(|v| v.len() == BLOCK) {
                    let o = (at - offset) as usize;
                    out[o..o + n].copy_from_slice(&block[within..within + n]);
                }
                at += n as u64;
            }
            Ok(out)
        })?
    }

    /// Commit one file's staged changes: cut, then the blocks, then size and mtime — one heap
    /// commit, all or nothing. On failure nothing changed (rolled back).
    pub fn apply(&mut self, ino: u64, c: FileChanges<'_>) -> Result<(), Fail> {
        let FileChanges { cut, size, blocks, mtime_ns } = c;
        self.mutate(|root, a| {
            let i = root.inodes.get_mut(&ino).ok_or(Fail::NotFound)?;
            if i.kind != KIND_FILE {
                return Err(Fail::IsDir);
            }
            if let Some(cut) = cut {
                let keep = cut.div_ceil(BLOCK as u64) as usize;
                if i.blocks.len() > keep {
                    i.blocks.truncate(keep);
                }
                zero_tail(&mut i.blocks, cut);
            }
            for (index, data) in blocks {
                let idx = usize::try_from(index).map_err(|_| Fail::Invalid)?;
                if i.blocks.len() <= idx {
                    i.blocks.try_reserve(idx + 1 - i.blocks.len()).map_err(|_| full("a file's block table"))?;
                    i.blocks.resize_with(idx + 1, || PVec::new_in(a));
                }
                let b = &mut i.blocks[idx];
                if b.len() != BLOCK {
                    b.clear();
                    b.try_reserve_exact(BLOCK).map_err(|_| full("a file block"))?;
                    b.resize(BLOCK, 0);
                }
                b.copy_from_slice(&data[..BLOCK]);
            }
            // No block wholly past the size; the last block's bytes past the size are zero.
            let keep = size.div_ceil(BLOCK as u64) as usize;
            if i.blocks.len() > keep {
                i.blocks.truncate(keep);
            }
            zero_tail(&mut i.blocks, size);
            i.size = size;
            let now = now_ns();
            i.mtime_ns = mtime_ns.unwrap_or(now);
            i.ctime_ns = now;
            Ok(())
        })
    }

    /// Give back the memory of heap pages that equal their committed image (the heap is mapped
    /// privately, so every page written stays resident until released).
    pub fn release_committed(&mut self) {
        match self.objects().map(|o| o.release_committed()) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("releasing committed heap pages: {e}"),
            Err(e) => tracing::warn!("releasing committed heap pages: {e}"),
        }
    }

    /// The heap's size and maximum size (for statfs).
    pub fn space(&self) -> (u64, u64) {
        self.objects.as_ref().map_or((0, 0), |o| (o.heap().len() as u64, o.heap().max_len() as u64))
    }

    /// Close the heap cleanly (a final checkpoint). Uncommitted changes are lost.
    pub fn close(self) -> Result<(), String> {
        match self.objects {
            Some(o) => o.close().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Zero the bytes past `size` in the block that holds offset `size`.
fn zero_tail(blocks: &mut PVec<'_, PVec<'_, u8>>, size: u64) {
    let within = (size % BLOCK as u64) as usize;
    if within == 0 {
        return;
    }
    if let Some(b) = blocks.get_mut((size / BLOCK as u64) as usize).filter(|b| b.len() == BLOCK) {
        b[within..].fill(0);
    }
}

/// Drop one name of `ino`: a directory goes at once; a file goes at once unless it is open,
/// then it stays as an orphan (nlink 0) until its last release.
fn unlink_inode(root: &mut FsRoot<'_>, ino: u64, is_open: &dyn Fn(u64) -> bool) {
    let keep = match root.inodes.get_mut(&ino) {
        Some(i) if i.kind == KIND_FILE && is_open(ino) => {
            i.nlink = 0;
            true
        }
        _ => false,
    };
    if !keep {
        root.inodes.remove(&ino);
    }
}

thread_local! {
    /// See [`use_simulated_clock`].
    static SIMULATED_CLOCK_NS: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// Make [`now_ns`] on this thread a counter from `start_ns` on (one nanosecond per call) instead
/// of the wall clock, until called with None: the mount's power-loss explorer uses it so that a
/// seed writes the same bytes into the heap, hence the same I/O operations (which its power cuts
/// count).
pub fn use_simulated_clock(start_ns: Option<i64>) {
    SIMULATED_CLOCK_NS.with(|c| c.set(start_ns));
}

pub fn now_ns() -> i64 {
    if let Some(t) = SIMULATED_CLOCK_NS.with(|c| c.get()) {
        SIMULATED_CLOCK_NS.with(|c| c.set(Some(t.saturating_add(1))));
        return t;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
