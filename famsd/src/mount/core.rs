//! What each request does, on the store thread: the namespace in the heap ([`Store`]), file
//! data staged per inode ([`Staging`]), open counts per inode, and directory listings per
//! handle. Independent of FUSE: every method takes plain values and returns a result that the
//! request handlers ([`super::fs`]) turn into a reply.

use super::layout::{Attr, DirEntry, Fail, FileChanges, MetaChange, NewInode, Store, BLOCK, KIND_DIR, KIND_FILE};
use super::staging::{Committed, StageError, Staging};
use fams::mutations::{self, Mutation};
use std::collections::HashMap;
use std::sync::mpsc::Sender;

/// An answer that must wait until a commit is durable: the handle to wait with, the commit, and
/// what to do then (with the outcome). Run by the durability thread ([`Core::after_durable`]).
pub type Deferred = (fams::DurabilityHandle, fams::Ticket, Box<dyn FnOnce(Result<(), Fail>) + Send>);

/// What happens to a file's staged changes at its last release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClose {
    /// Discard them (the default: only a sync makes data durable).
    Discard,
    /// Commit them (`--commit-on-close`), at every close (FLUSH) and at the last release.
    Commit,
}

/// Counters, for logs and the status attribute.
#[derive(Debug, Default, Clone, Copy)]
pub struct CoreStats {
    pub syncs: u64,
    pub sync_commits: u64,
    pub discards: u64,
    pub discarded_bytes: u64,
    pub close_commits: u64,
    pub writes: u64,
    pub writes_from_page_cache: u64,
    pub refused_staging_full: u64,
}

pub struct Core {
    pub store: Store,
    pub staging: Staging,
    on_close: OnClose,
    /// Open handles per inode (files and directories).
    opens: HashMap<u64, u32>,
    /// Handle → inode.
    handles: HashMap<u64, u64>,
    /// Directory handle → its listing, taken at opendir.
    listings: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
    /// Pages committed since the heap's memory was last given back.
    pages_since_release: u64,
    /// Where answers that wait for durability go (the durability thread); None: wait here.
    durability: Option<Sender<Deferred>>,
    pub stats: CoreStats,
}

/// Give the heap's committed pages' memory back after this many pages were committed.
const RELEASE_AFTER_PAGES: u64 = 8192;

/// The committed state of one file, read from the store on demand.
struct CommittedFile<'a> {
    store: &'a mut Store,
    ino: u64,
    size: Option<u64>,
}

impl Committed for CommittedFile<'_> {
    fn size(&mut self) -> u64 {
        if self.size.is_none() {
            self.size = Some(self.store.attr(self.ino).map_or(0, |a| a.size));
        }
        self.size.unwrap_or(0)
    }
    fn page(&mut self, index: u64, out: &mut [u8]) -> bool {
        self.store.committed_block(self.ino, index, out).unwrap_or(false)
    }
}

fn stage_fail(e: StageError, ino: u64) -> Fail {
    match e {
        StageError::Full { max_bytes } => {
            tracing::warn!(
                "inode {ino}: write refused (ENOSPC): unsynced data of all files already fills the staging budget \
                 of {max_bytes} bytes (--staging-max); sync or close files, or mount with a larger --staging-max"
            );
            Fail::NoSpace(format!("staging budget of {max_bytes} bytes is full"))
        }
        StageError::TooLarge => Fail::TooBig,
    }
}

impl Core {
    pub fn new(store: Store, staging_max_bytes: u64, on_close: OnClose) -> Core {
        Core {
            store,
            staging: Staging::new(staging_max_bytes),
            on_close,
            opens: HashMap::new(),
            handles: HashMap::new(),
            listings: HashMap::new(),
            next_fh: 1,
            pages_since_release: 0,
            durability: None,
            stats: CoreStats::default(),
        }
    }

    /// Answers that promise durability are run by the thread receiving on `tx` once their
    /// commit is durable, so this thread goes on with other requests meanwhile.
    pub fn send_durable_answers_to(&mut self, tx: Sender<Deferred>) {
        self.durability = Some(tx);
    }

    /// Run `then` once everything committed so far is durable: at once if it already is (or
    /// nothing was committed), else from the durability thread (or, without one, after waiting
    /// here). Namespace operations and syncs answer through this: durable when they return.
    pub fn after_durable(&mut self, then: impl FnOnce(Result<(), Fail>) + Send + 'static) {
        let Some((handle, ticket)) = self.store.durable_after() else { return then(Ok(())) };
        let outcome = |h: &fams::DurabilityHandle| {
            h.wait(ticket).map_err(|e| Fail::Io(format!("a commit did not become durable: {e}")))
        };
        if handle.is_durable(ticket).unwrap_or(false) {
            return then(Ok(()));
        }
        match &self.durability {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError((handle, _, then))) = tx.send((handle, ticket, Box::new(then))) {
                    then(outcome(&handle));
                }
            }
            None => then(outcome(&handle)),
        }
    }

    /// Wait here until everything committed so far is durable (for callers without a
    /// durability thread, such as the power-loss explorer).
    pub fn wait_durable(&mut self) -> Result<(), Fail> {
        self.store.wait_durable()
    }

    fn is_open(&self, ino: u64) -> bool {
        self.opens.get(&ino).is_some_and(|&n| n > 0)
    }

    /// Attributes as a process sees them now: committed, with the staged size and mtime.
    pub fn attr(&mut self, ino: u64) -> Result<Attr, Fail> {
        let mut a = self.store.attr(ino)?;
        if let Some(st) = self.staging.get(ino) {
            a.size = st.size;
            if let Some(t) = st.mtime_ns {
                a.mtime_ns = t;
            }
        }
        Ok(a)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Attr, Fail> {
        let ino = self.store.lookup(parent, name)?.ino;
        self.attr(ino)
    }

    fn new_handle(&mut self, ino: u64) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, ino);
        *self.opens.entry(ino).or_insert(0) += 1;
        fh
    }

    pub fn create(&mut self, parent: u64, name: &[u8], n: NewInode, open: bool) -> Result<(Attr, u64), Fail> {
        let a = self.store.create(parent, name, n)?;
        let fh = if open { self.new_handle(a.ino) } else { 0 };
        Ok((a, fh))
    }

    pub fn open(&mut self, ino: u64, want_dir: bool) -> Result<u64, Fail> {
        let a = self.store.attr(ino)?;
        match (want_dir, a.kind == KIND_DIR) {
            (true, false) => return Err(Fail::NotDir),
            (false, true) => return Err(Fail::IsDir),
            _ => {}
        }
        let fh = self.new_handle(ino);
        if want_dir {
            let (parent, entries) = self.store.list(ino)?;
            let mut all = vec![(ino, KIND_DIR, b".".to_vec()), (parent, KIND_DIR, b"..".to_vec())];
            all.extend(entries);
            self.listings.insert(fh, all);
        }
        Ok(fh)
    }

    /// Directory entries of handle `fh` from index `offset` on.
    pub fn listing(&self, fh: u64) -> Option<&[DirEntry]> {
        self.listings.get(&fh).map(Vec::as_slice)
    }

    /// A handle closes. At a file's last release its staged changes are discarded (or committed
    /// with `--commit-on-close`), and an unlinked file is freed.
    pub fn release(&mut self, fh: u64, ino: u64) {
        let ino = self.handles.remove(&fh).unwrap_or(ino);
        self.listings.remove(&fh);
        let left = match self.opens.get_mut(&ino) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return;
        }
        self.opens.remove(&ino);
        if self.staging.get(ino).is_some() {
            match self.on_close {
                OnClose::Commit => match self.sync(ino) {
                    Ok(()) => self.stats.close_commits += 1,
                    Err(e) => {
                        tracing::error!("inode {ino}: committing at the last close failed ({e}); its unsynced changes are discarded");
                        self.discard(ino);
                    }
                },
                OnClose::Discard => self.discard(ino),
            }
        }
        if let Err(e) = self.store.delete_orphan(ino) {
            tracing::error!("inode {ino}: freeing the unlinked file failed: {e} (the next mount frees it)");
        }
    }

    fn discard(&mut self, ino: u64) {
        if let Some(st) = self.staging.take(ino) {
            let bytes = st.pages.len() as u64 * BLOCK as u64;
            self.stats.discards += 1;
            self.stats.discarded_bytes += bytes;
            tracing::debug!("inode {ino}: last close without a sync: discarded {bytes} bytes of unsynced pages");
        }
    }

    /// close(2) of one descriptor (FUSE FLUSH): with `--commit-on-close`, commit now, so close()
    /// returns once the data is durable.
    pub fn flush(&mut self, ino: u64) -> Result<(), Fail> {
        if self.on_close == OnClose::Commit && self.staging.get(ino).is_some() {
            self.sync(ino)?;
            self.stats.close_commits += 1;
        }
        Ok(())
    }

    /// fsync / fdatasync / msync(MS_SYNC): commit all of this file's staged changes, and nothing
    /// of any other file, in one heap commit. On failure nothing is committed and the changes
    /// stay staged.
    pub fn sync(&mut self, ino: u64) -> Result<(), Fail> {
        self.stats.syncs += 1;
        if mutations::is_on(Mutation::MountSyncWithoutCommit) {
            return Ok(());
        }
        if mutations::is_on(Mutation::MountSyncCommitsOtherFiles) {
            for other in self.staging.inodes().into_iter().filter(|&o| o != ino) {
                self.commit_staged(other)?;
            }
        }
        self.commit_staged(ino)
    }

    /// Commit one file's staged changes in one heap commit (see [`Core::sync`]).
    fn commit_staged(&mut self, ino: u64) -> Result<(), Fail> {
        let Some(mut st) = self.staging.take(ino) else { return Ok(()) };
        let pages = std::mem::take(&mut st.pages);
        let r = if mutations::is_on(Mutation::MountSyncInTwoCommits) && pages.len() >= 2 {
            let half = pages.len() / 2;
            let mut first = pages.iter().take(half).map(|(i, p)| (*i, &p[..]));
            let mut rest = pages.iter().skip(half).map(|(i, p)| (*i, &p[..]));
            self.store
                .apply(ino, FileChanges { cut: st.cut, size: st.size, blocks: &mut first, mtime_ns: st.mtime_ns })
                .and_then(|()| {
                    self.store
                        .apply(ino, FileChanges { cut: None, size: st.size, blocks: &mut rest, mtime_ns: st.mtime_ns })
                })
        } else {
            let mut it = pages.iter().map(|(i, p)| (*i, &p[..]));
            self.store.apply(ino, FileChanges { cut: st.cut, size: st.size, blocks: &mut it, mtime_ns: st.mtime_ns })
        };
        match r {
            Ok(()) => {
                self.stats.sync_commits += 1;
                self.pages_since_release += pages.len() as u64;
                if self.pages_since_release >= RELEASE_AFTER_PAGES {
                    self.pages_since_release = 0;
                    self.store.release_committed();
                }
                Ok(())
            }
            Err(e) => {
                st.pages = pages;
                if matches!(e, Fail::NotFound) {
                    return Ok(()); // the file is gone: nothing to keep
                }
                tracing::warn!("inode {ino}: sync failed, nothing committed, changes stay staged: {e}");
                self.staging.restore(ino, st);
                Err(e)
            }
        }
    }

    pub fn read(&mut self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Fail> {
        if self.staging.get(ino).is_none() {
            return self.store.read_committed(ino, offset, len);
        }
        let Core { store, staging, .. } = self;
        Ok(staging.read(ino, offset, len, &mut CommittedFile { store, ino, size: None }))
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8], from_page_cache: bool) -> Result<(), Fail> {
        let a = self.store.attr(ino)?;
        if a.kind != KIND_FILE {
            return Err(Fail::IsDir);
        }
        self.stats.writes += 1;
        if from_page_cache {
            self.stats.writes_from_page_cache += 1;
        }
        let now = super::layout::now_ns();
        let Core { store, staging, stats, .. } = self;
        let mut c = CommittedFile { store, ino, size: Some(a.size) };
        staging.write(ino, offset, data, now, &mut c).map_err(|e| {
            stats.refused_staging_full += 1;
            stage_fail(e, ino)
        })
    }

    /// A size change: staged with the data while the file is open (ftruncate); durable at once
    /// for a file nobody has open (truncate(2) by path: there is no descriptor to sync).
    pub fn set_size(&mut self, ino: u64, size: u64) -> Result<(), Fail> {
        let a = self.store.attr(ino)?;
        if a.kind != KIND_FILE {
            return Err(Fail::IsDir);
        }
        let now = super::layout::now_ns();
        {
            let Core { store, staging, .. } = self;
            let mut c = CommittedFile { store, ino, size: Some(a.size) };
            staging.truncate(ino, size, now, &mut c).map_err(|e| stage_fail(e, ino))?;
        }
        if !self.is_open(ino) {
            self.sync(ino)?;
        }
        Ok(())
    }

    pub fn set_meta(&mut self, ino: u64, m: MetaChange) -> Result<Attr, Fail> {
        self.store.set_meta(ino, m)?;
        self.attr(ino)
    }

    pub fn remove(&mut self, parent: u64, name: &[u8], want_dir: bool) -> Result<(), Fail> {
        let opens = &self.opens;
        let is_open = |ino: u64| opens.get(&ino).is_some_and(|&n| n > 0);
        let ino = self.store.remove(parent, name, want_dir, &is_open)?;
        if !self.is_open(ino) {
            self.staging.take(ino);
        }
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<(), Fail> {
        let replaced = self.store.lookup(newparent, newname).ok().map(|a| a.ino);
        let opens = &self.opens;
        let is_open = |ino: u64| opens.get(&ino).is_some_and(|&n| n > 0);
        self.store.rename(parent, name, newparent, newname, noreplace, &is_open)?;
        if let Some(t) = replaced {
            if !self.is_open(t) {
                self.staging.take(t);
            }
        }
        Ok(())
    }

    /// The status attribute `user.fams.status` of an inode: open handles and staged bytes.
    pub fn status(&self, ino: u64) -> String {
        let (pages, size) = self.staging.get(ino).map_or((0, None), |s| (s.pages.len(), Some(s.size)));
        format!(
            "openers={} staged_pages={pages} staged_size={} staging_bytes_all={} syncs={} sync_commits={} discards={} heap_commits={}",
            self.opens.get(&ino).copied().unwrap_or(0),
            size.map_or("-".to_string(), |s| s.to_string()),
            self.staging.bytes(),
            self.stats.syncs,
            self.stats.sync_commits,
            self.stats.discards,
            self.store.stats.commits,
        )
    }

    /// The daemon stops: staged changes of files still open are discarded (or committed with
    /// `--commit-on-close`), then the heap is closed.
    pub fn shutdown(mut self) {
        let left: Vec<u64> = self.opens.keys().copied().collect();
        for ino in left {
            if self.staging.get(ino).is_some() && self.on_close == OnClose::Commit {
                if let Err(e) = self.sync(ino) {
                    tracing::error!("inode {ino}: commit at unmount failed: {e}");
                }
            }
        }
        if self.staging.files() > 0 {
            tracing::info!(
                "unmounting: discarding {} bytes of unsynced pages of {} files",
                self.staging.bytes(),
                self.staging.files()
            );
        }
        tracing::info!(
            "store statistics: {} heap commits, {} syncs ({} with changes), {} discards ({} bytes), {} writes ({} from mapped pages)",
            self.store.stats.commits,
            self.stats.syncs,
            self.stats.sync_commits,
            self.stats.discards,
            self.stats.discarded_bytes,
            self.stats.writes,
            self.stats.writes_from_page_cache
        );
        let path = self.store.path().to_path_buf();
        if let Err(e) = self.store.close() {
            tracing::error!("{}: closing the store: {e}", path.display());
        }
    }
}
