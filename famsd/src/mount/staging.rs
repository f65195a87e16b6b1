//! Unsynced file data: staged per inode in the daemon's memory until the file's next sync.
//!
//! Every write to a file — `write(2)` from any handle, dirty pages of a shared mapping written
//! back by the kernel (`FUSE_WRITE_CACHE`, from *any* writable handle of the inode), `ftruncate`
//! — lands here, per inode, never in the heap. Reads see the staged pages laid over the
//! committed ones. A sync (`fsync`/`fdatasync`/`msync(MS_SYNC)`, all one FUSE `FSYNC`) hands one
//! file's staged state to [`super::layout::Store::apply`], which commits it in one heap commit;
//! the last release of a file discards it (unless the mount commits on close).
//!
//! State per file: whole 4096-byte pages (a partial write first copies the page's current
//! content: committed, or zeros), the file's current size, and the `cut`: the lowest size the
//! file was truncated to since its last commit (committed bytes at or past it read as zeros and
//! are dropped at the commit). Invariant: bytes of a page past the size are zero, so growing a
//! file again reads zeros.
//!
//! Bounded: all staged pages of all files together may hold at most `max_bytes`; a write that
//! would need more is refused (ENOSPC, with a log line naming `--staging-max`). Nothing spills
//! to disk in this version.

use super::layout::BLOCK;
use std::collections::{BTreeMap, HashMap};

const PAGE: u64 = BLOCK as u64;

/// One file's staged state.
#[derive(Debug, Default)]
pub struct Staged {
    pub pages: BTreeMap<u64, Box<[u8]>>,
    pub size: u64,
    pub cut: Option<u64>,
    pub mtime_ns: Option<i64>,
}

/// The committed state of one file, as staging needs it.
pub trait Committed {
    fn size(&mut self) -> u64;
    /// Copy committed page `index` into `out`; false for a hole or past the end.
    fn page(&mut self, index: u64, out: &mut [u8]) -> bool;
}

#[derive(Debug)]
pub enum StageError {
    /// The staging budget (`--staging-max`) is used up.
    Full { max_bytes: u64 },
    /// The offset or size is past what a file may hold.
    TooLarge,
}

/// All files' staged state.
#[derive(Debug)]
pub struct Staging {
    files: HashMap<u64, Staged>,
    bytes: u64,
    max_bytes: u64,
}

/// Largest file size accepted (block indices must fit the block table).
pub const FILE_SIZE_MAX: u64 = 1 << 50;

impl Staging {
    pub fn new(max_bytes: u64) -> Staging {
        Staging { files: HashMap::new(), bytes: 0, max_bytes }
    }

    pub fn get(&self, ino: u64) -> Option<&Staged> {
        self.files.get(&ino)
    }

    /// Bytes of staged pages, all files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// The inodes with staged changes, in ascending order.
    pub fn inodes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.files.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The current size of `ino`: staged, or committed.
    pub fn size(&self, ino: u64, committed_size: u64) -> u64 {
        self.files.get(&ino).map_or(committed_size, |s| s.size)
    }

    /// What page `index` of a file holds now, without its staged copy: committed bytes below
    /// the cut, zeros elsewhere.
    fn underlying(st: &Staged, index: u64, committed: &mut dyn Committed, out: &mut [u8]) {
        out.fill(0);
        let start = index * PAGE;
        if let Some(cut) = st.cut {
            if start >= cut {
                return;
            }
        }
        if committed.page(index, out) {
            if let Some(cut) = st.cut {
                if cut < start + PAGE {
                    out[(cut - start) as usize..].fill(0);
                }
            }
        }
    }

    fn entry<'a>(files: &'a mut HashMap<u64, Staged>, ino: u64, committed: &mut dyn Committed) -> &'a mut Staged {
        files.entry(ino).or_insert_with(|| Staged { size: committed.size(), ..Staged::default() })
    }

    /// Bytes [offset, offset + len) of the file as it is now, clamped to its size.
    pub fn read(&self, ino: u64, offset: u64, len: usize, committed: &mut dyn Committed) -> Vec<u8> {
        let Some(st) = self.files.get(&ino) else {
            let size = committed.size();
            let end = offset.saturating_add(len as u64).min(size);
            let mut out = vec![0u8; end.saturating_sub(offset) as usize];
            let mut page = vec![0u8; BLOCK];
            let mut at = offset;
            while at < end {
                let index = at / PAGE;
                let within = (at % PAGE) as usize;
                let n = ((PAGE - within as u64).min(end - at)) as usize;
                page.fill(0);
                if committed.page(index, &mut page) {
                    let o = (at - offset) as usize;
                    out[o..o + n].copy_from_slice(&page[within..within + n]);
                }
                at += n as u64;
            }
            return out;
        };
        let end = offset.saturating_add(len as u64).min(st.size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        let mut page = vec![0u8; BLOCK];
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE - within as u64).min(end - at)) as usize;
            let o = (at - offset) as usize;
            match st.pages.get(&index) {
                Some(p) => out[o..o + n].copy_from_slice(&p[within..within + n]),
                None => {
                    Self::underlying(st, index, committed, &mut page);
                    out[o..o + n].copy_from_slice(&page[within..within + n]);
                }
            }
            at += n as u64;
        }
        out
    }

    /// Stage a write of `data` at `offset`.
    pub fn write(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        mtime_ns: i64,
        committed: &mut dyn Committed,
    ) -> Result<(), StageError> {
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= FILE_SIZE_MAX).ok_or(StageError::TooLarge)?;
        if data.is_empty() {
            return Ok(());
        }
        // Budget: the pages this write adds.
        let first = offset / PAGE;
        let last = (end - 1) / PAGE;
        let new_pages =
            (first..=last).filter(|i| self.files.get(&ino).is_none_or(|s| !s.pages.contains_key(i))).count() as u64;
        if self.bytes + new_pages * PAGE > self.max_bytes {
            return Err(StageError::Full { max_bytes: self.max_bytes });
        }
        let st = Self::entry(&mut self.files, ino, committed);
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE - within as u64).min(end - at)) as usize;
            if !st.pages.contains_key(&index) {
                let mut p = vec![0u8; BLOCK].into_boxed_slice();
                if n < BLOCK {
                    Self::underlying(st, index, committed, &mut p);
                }
                st.pages.insert(index, p);
                self.bytes += PAGE;
            }
            let p = st.pages.get_mut(&index).expect("present");
            let d = (at - offset) as usize;
            p[within..within + n].copy_from_slice(&data[d..d + n]);
            at += n as u64;
        }
        st.size = st.size.max(end);
        st.mtime_ns = Some(mtime_ns);
        Ok(())
    }

    /// Stage a size change (ftruncate, or a write-extending fallocate).
    pub fn truncate(
        &mut self,
        ino: u64,
        size: u64,
        mtime_ns: i64,
        committed: &mut dyn Committed,
    ) -> Result<(), StageError> {
        if size > FILE_SIZE_MAX {
            return Err(StageError::TooLarge);
        }
        let partial = size % PAGE != 0;
        let needs_page = partial && self.files.get(&ino).is_none_or(|s| !s.pages.contains_key(&(size / PAGE)));
        if needs_page && self.bytes + PAGE > self.max_bytes {
            return Err(StageError::Full { max_bytes: self.max_bytes });
        }
        let st = Self::entry(&mut self.files, ino, committed);
        if size < st.size {
            // Drop whole pages past the new end; zero the tail of the page that holds it.
            let keep = size.div_ceil(PAGE);
            let dropped = st.pages.split_off(&keep);
            self.bytes -= dropped.len() as u64 * PAGE;
            if partial {
                let index = size / PAGE;
                if !st.pages.contains_key(&index) {
                    let mut p = vec![0u8; BLOCK].into_boxed_slice();
                    Self::underlying(st, index, committed, &mut p);
                    st.pages.insert(index, p);
                    self.bytes += PAGE;
                }
                let p = st.pages.get_mut(&index).expect("present");
                p[(size % PAGE) as usize..].fill(0);
            }
            st.cut = Some(st.cut.map_or(size, |c| c.min(size)));
        }
        // Growing: bytes past the old size are zero already (the invariant).
        st.size = size;
        st.mtime_ns = Some(mtime_ns);
        Ok(())
    }

    /// Remove and return one file's staged state (to commit it, or to discard it).
    pub fn take(&mut self, ino: u64) -> Option<Staged> {
        let st = self.files.remove(&ino)?;
        self.bytes -= st.pages.len() as u64 * PAGE;
        Some(st)
    }

    /// Put back a state taken with [`Staging::take`] whose commit failed.
    pub fn restore(&mut self, ino: u64, st: Staged) {
        self.bytes += st.pages.len() as u64 * PAGE;
        self.files.insert(ino, st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed file in memory.
    struct Mem(Vec<u8>);
    impl Committed for Mem {
        fn size(&mut self) -> u64 {
            self.0.len() as u64
        }
        fn page(&mut self, index: u64, out: &mut [u8]) -> bool {
            let s = (index * PAGE) as usize;
            if s >= self.0.len() {
                return false;
            }
            let e = (s + BLOCK).min(self.0.len());
            out[..e - s].copy_from_slice(&self.0[s..e]);
            true
        }
    }

    /// Where two byte strings differ (without printing them whole).
    fn diff(got: &[u8], want: &[u8]) -> Option<String> {
        if got == want {
            return None;
        }
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        Some(format!("lengths {} and {}, first difference at {at}", got.len(), want.len()))
    }

    /// The model: a plain byte vector with the same operations.
    fn commit(st: &Staged, c: &Mem) -> Vec<u8> {
        let mut v = c.0.clone();
        if let Some(cut) = st.cut {
            v.truncate(cut as usize);
        }
        v.resize(st.size as usize, 0);
        for (i, p) in &st.pages {
            let s = (*i * PAGE) as usize;
            if s < v.len() {
                let e = (s + BLOCK).min(v.len());
                v[s..e].copy_from_slice(&p[..e - s]);
            }
        }
        v
    }

    #[test]
    fn staged_reads_match_a_byte_vector_model_and_commit_gives_the_same_bytes() {
        let mut rng = crate::workload::Rng::new(7);
        for round in 0..300 {
            let base: Vec<u8> = (0..rng.below(20_000)).map(|_| rng.next_u64() as u8 | 1).collect();
            let mut c = Mem(base.clone());
            let mut model = base;
            let mut s = Staging::new(1 << 30);
            let mut ops = vec![format!("committed {}", model.len())];
            for _ in 0..12 {
                match rng.below(3) {
                    0 | 1 => {
                        let off = rng.below(24_000);
                        let data: Vec<u8> = (0..rng.below(9000)).map(|_| rng.next_u64() as u8).collect();
                        s.write(5, off, &data, 0, &mut c).unwrap();
                        ops.push(format!("write {off}+{}", data.len()));
                        let end = off as usize + data.len();
                        if model.len() < end && !data.is_empty() {
                            model.resize(end, 0);
                        }
                        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                    }
                    _ => {
                        let size = rng.below(24_000);
                        s.truncate(5, size, 0, &mut c).unwrap();
                        ops.push(format!("truncate {size}"));
                        model.resize(size as usize, 0);
                    }
                }
                let got = s.read(5, 0, 40_000, &mut c);
                if let Some(d) = diff(&got, &model) {
                    panic!("round {round}: {d}; ops {ops:?}");
                }
                let off = rng.below(25_000);
                let got = s.read(5, off, 5000, &mut c);
                let want = model.get(off as usize..(off as usize + 5000).min(model.len())).unwrap_or(&[]);
                if let Some(d) = diff(&got, want) {
                    panic!("round {round}, read at {off}: {d}; ops {ops:?}");
                }
            }
            let st = s.take(5).unwrap();
            assert_eq!(s.bytes(), 0);
            if let Some(d) = diff(&commit(&st, &c), &model) {
                panic!("round {round}, committing: {d}; ops {ops:?}");
            }
        }
    }

    #[test]
    fn the_budget_refuses_new_pages_and_counts_freed_ones() {
        let mut c = Mem(Vec::new());
        let mut s = Staging::new(2 * PAGE);
        s.write(1, 0, &[1; 8192], 0, &mut c).unwrap();
        assert!(matches!(s.write(2, 0, &[1], 0, &mut c), Err(StageError::Full { .. })));
        s.write(1, 100, &[2; 100], 0, &mut c).unwrap(); // rewriting a staged page is free
        s.truncate(1, 10, 0, &mut c).unwrap();
        assert_eq!(s.bytes(), PAGE);
        s.write(2, 0, &[1], 0, &mut c).unwrap();
        assert!(s.take(1).is_some());
        assert_eq!(s.bytes(), PAGE);
        assert!(matches!(s.write(3, FILE_SIZE_MAX, &[1], 0, &mut c), Err(StageError::TooLarge)));
    }
}
