//! The same small durable update made through file-level paths, one iteration at a time, so a
//! caller can interleave the paths in rounds and compare them within one run (`famsd bench
//! --mount`): `msync(MS_SYNC)` of a `MAP_SHARED` file, `Heap::commit`, SQLite transactions and
//! the device floor. Each `*_once` call returns the microseconds from its first write to the
//! acknowledgement (the page dirtying and the SQL statements are inside the timing).

use fams::io::{self, AlignedBuf, FlushMode, LogOpenOptions};
use fams::{Heap, PAGE_SIZE};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which byte of page `page` iteration `i` changes: a different one each time, so every
/// iteration changes every page it dirties (and a diff-based log sees a change).
fn byte_of(page: usize, i: usize) -> usize {
    page * PAGE_SIZE + (i * 8 + page) % PAGE_SIZE
}

/// The first page an iteration dirties, for `pages` pages in a region of `region_pages`: the
/// iterations walk the region in steps of `pages` (wrapping).
fn first_page(pages: usize, region_pages: usize, i: usize) -> usize {
    (i * pages) % region_pages.saturating_sub(pages - 1).max(1)
}

/// The device floor: one O_DIRECT write of `bytes` (rounded up to 4 KiB) made durable with
/// `RWF_DSYNC`, on a preallocated scratch file in `dir` (16 MiB or 16 slots, written in turn),
/// kept open between iterations.
pub struct FloorWriter {
    dev: Box<dyn io::LogDevice>,
    buf: AlignedBuf,
    slots: u64,
    path: PathBuf,
}

impl FloorWriter {
    pub fn create(dir: &Path, name: &str, bytes: usize) -> std::io::Result<FloorWriter> {
        let len = bytes.div_ceil(4096).max(1) * 4096;
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let span = (len as u64 * 16).max(16 << 20).next_multiple_of(4096);
        io::create_log_file(&path, span)?;
        let dev = io::open_log(&path, &LogOpenOptions { io_path: None, flush_mode: Some(FlushMode::Dsync) })?;
        Ok(FloorWriter { dev, buf: AlignedBuf::zeroed(len), slots: (span / len as u64).max(1), path })
    }

    /// One durable write (iteration `i` picks the slot), in µs.
    pub fn once(&mut self, i: usize) -> std::io::Result<f64> {
        let off = (i as u64 % self.slots) * self.buf.len() as u64;
        let t = Instant::now();
        self.dev.write_durable(&[(off, &self.buf[..])])?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }
}

impl Drop for FloorWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A `MAP_SHARED` mapping of a file of `region_pages` pages, written and synced once before the
/// first iteration (so every page is allocated and resident, and iterations measure updates).
pub struct MsyncFile {
    map: memmap2::MmapMut,
    region_pages: usize,
}

impl MsyncFile {
    pub fn create(path: &Path, region_pages: usize) -> std::io::Result<MsyncFile> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        f.write_all(&vec![1u8; region_pages * PAGE_SIZE])?;
        f.sync_all()?;
        // SAFETY: a scratch file this process made and no other process opens; nothing else
        // changes its length while it is mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&f)? };
        Ok(MsyncFile { map, region_pages })
    }

    /// Change one byte in each of `pages` consecutive pages, then `msync(MS_SYNC)` of exactly
    /// those pages. Timed: from the first write to msync's return, in µs.
    pub fn dirty_and_msync(&mut self, pages: usize, i: usize) -> std::io::Result<f64> {
        let first = first_page(pages, self.region_pages, i);
        let t = Instant::now();
        for p in first..first + pages {
            self.map[byte_of(p, i)] ^= 0x5a;
        }
        self.map.flush_range(first * PAGE_SIZE, pages * PAGE_SIZE)?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }
}

/// Change one byte in each of `pages` consecutive pages of the heap (in the `region_pages`
/// from page `base_page`), then `Heap::commit`. Timed: from the first write to commit's return,
/// in µs.
pub fn heap_dirty_and_commit(
    heap: &mut Heap,
    pages: usize,
    base_page: usize,
    region_pages: usize,
    i: usize,
) -> fams::Result<f64> {
    let first = base_page + first_page(pages, region_pages, i);
    let t = Instant::now();
    let b = heap.bytes_mut();
    for p in first..first + pages {
        b[byte_of(p, i)] ^= 0x5a;
    }
    heap.commit()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// How a SQLite database keeps its transactions atomic.
#[cfg(feature = "baselines")]
#[derive(Clone, Copy, Debug)]
pub enum SqliteJournal {
    /// `journal_mode=OFF`, `synchronous=FULL`: SQLite writes its pages in place and fsyncs; only
    /// atomic where the file system makes fsync failure-atomic (a `famsd mount`).
    Off,
    /// `journal_mode=WAL`, `synchronous=FULL`: SQLite's own atomic commit (append to the WAL and
    /// fsync it).
    Wal,
}

/// A SQLite database with a table `kv (k INTEGER PRIMARY KEY, v BLOB)` of 1000 rows of 64 bytes.
#[cfg(feature = "baselines")]
pub struct SqliteTable {
    db: rusqlite::Connection,
    next_key: i64,
}

#[cfg(feature = "baselines")]
pub const SQLITE_ROWS: i64 = 1000;

#[cfg(feature = "baselines")]
impl SqliteTable {
    /// Create the database at `path` (replacing any) with 1000 rows.
    pub fn create(path: &Path, journal: SqliteJournal) -> Result<SqliteTable, String> {
        Self::create_inner(path, journal).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn create_inner(path: &Path, journal: SqliteJournal) -> Result<SqliteTable, Box<dyn std::error::Error>> {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let db = rusqlite::Connection::open(path)?;
        let mode = match journal {
            SqliteJournal::Off => "OFF",
            SqliteJournal::Wal => "WAL",
        };
        let set: String = db.pragma_update_and_check(None, "journal_mode", mode, |r| r.get(0))?;
        if !set.eq_ignore_ascii_case(mode) {
            return Err(format!("journal_mode={mode} was refused (SQLite kept {set})").into());
        }
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB NOT NULL)", [])?;
        db.execute_batch("BEGIN")?;
        for k in 0..SQLITE_ROWS {
            db.execute("INSERT INTO kv VALUES (?1, ?2)", rusqlite::params![k, vec![0u8; 64]])?;
        }
        db.execute_batch("COMMIT")?;
        Ok(SqliteTable { db, next_key: SQLITE_ROWS })
    }

    /// One transaction updating one row (an autocommit `UPDATE`). Timed: the statement, from
    /// its start to its return (SQLite returns after its commit's fsync), in µs.
    pub fn update_one(&mut self, i: usize) -> rusqlite::Result<f64> {
        let k = (i as i64 * 7) % SQLITE_ROWS;
        let v = vec![i as u8; 64];
        let t = Instant::now();
        self.db.prepare_cached("UPDATE kv SET v = ?2 WHERE k = ?1")?.execute(rusqlite::params![k, v])?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }

    /// One transaction inserting `rows` new rows: `BEGIN`, the inserts, `COMMIT`. Timed: from
    /// `BEGIN` to `COMMIT`'s return, in µs.
    pub fn insert_rows(&mut self, rows: usize) -> rusqlite::Result<f64> {
        let v = vec![7u8; 64];
        let t = Instant::now();
        self.db.execute_batch("BEGIN")?;
        {
            let mut ins = self.db.prepare_cached("INSERT INTO kv VALUES (?1, ?2)")?;
            for _ in 0..rows {
                ins.execute(rusqlite::params![self.next_key, v])?;
                self.next_key += 1;
            }
        }
        self.db.execute_batch("COMMIT")?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }
}
