//! Counters a heap keeps, for `famsd inspect` and for benchmarks.

use crate::io::IoStats;
use crate::recovery::RecoveryReport;
use std::path::PathBuf;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Commits requested (including those that changed nothing).
    pub commits: u64,
    /// Commits that found nothing changed and wrote no record.
    pub empty_commits: u64,
    /// Dirty pages reported by the tracker.
    pub pages_tracked: u64,
    /// Bytes that differ from the committed image, over all commits.
    pub bytes_changed: u64,
    /// Bytes of record payload (entry headers + data).
    pub payload_bytes: u64,
    /// Bytes of records including headers and padding to the block size.
    pub record_bytes: u64,
    /// Pages logged whole (diff not smaller, or previous commit of the page still in flight).
    pub full_page_entries: u64,
    /// Pages logged as changed runs only.
    pub diffed_pages: u64,
    /// Time spent on the caller's thread capturing commits (scan, diff, copy).
    pub capture_ns: u64,
    /// Part of `capture_ns` spent asking the tracker for dirty pages.
    pub collect_ns: u64,
    /// Part of `capture_ns` spent waiting for the previous commit's write-back to the heap file.
    pub write_back_wait_ns: u64,
    pub releases: u64,
    /// Calls to `rollback`, and the pages they put back.
    pub rollbacks: u64,
    pub pages_rolled_back: u64,
    /// Device writes of records (each may hold several commits).
    pub groups: u64,
    pub log_bytes_written: u64,
    pub checkpoints: u64,
    /// Of those, taken on the heap's heap-file thread beside the commits (the others ran on the
    /// thread that wrote a group: one that would not fit the log, the final one, or all of them
    /// without that thread).
    pub background_checkpoints: u64,
    /// Superblock writes that raised the log's written limit before a group (see `log_format`).
    pub written_limit_raises: u64,
    pub heap_fdatasyncs: u64,
    /// Pages logged whole because it was their first change since a checkpoint (so that replay
    /// never depends on a heap-file page a power cut may have torn).
    pub full_images_after_checkpoint: u64,
    /// Committed page images held in memory, not yet written into the heap file (they are at the
    /// next checkpoint, or when there are too many), now.
    pub committed_images_pages: u64,
    /// Times those images were written into the heap file, and how many pages that wrote.
    pub committed_images_flushes: u64,
    pub committed_images_pages_flushed: u64,
    /// Total time the log writer waited for durable writes.
    pub device_write_ns: u64,
    /// The log device's own counters (writes, RWF_DSYNC writes, fdatasyncs, reads).
    pub io: IoStats,
    pub durable_lsn: u64,
    pub tracker: &'static str,
    pub io_path: &'static str,
    /// Why io_uring was not used, when it was not.
    pub io_fallback: Option<String>,
    pub flush_mode: &'static str,
    /// How the I/O path and flush mode were chosen: asked for, measured at format, or defaults.
    pub io_choice: &'static str,
    pub log_kind: &'static str,
    pub log_path: PathBuf,
    pub heap_size: u64,
    pub recovery: RecoveryReport,
}

/// How much memory the heap's mapping uses (from /proc/self/smaps: costs a read of that file,
/// so it is separate from the cheap [`Stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub heap_bytes: u64,
    /// Heap pages mapped in (private copies plus committed pages read through the page cache).
    pub resident_bytes: u64,
    /// Private copies: pages written since they were last released. Follows the dirty working
    /// set, not the heap size, when `release_committed` is called after commits.
    pub private_bytes: u64,
}
