//! # fams — failure-atomic msync
//!
//! A persistent heap: a file mapped into memory at a fixed address, read and written like
//! ordinary memory, whose changes become durable only at [`Heap::commit`] — all of them or none,
//! whatever crashes (process kill, kernel panic, power cut).
//!
//! Where to look:
//! - [`heap`]: format, open, the public API;
//! - [`commit`]: the commit path (capture, log writer, write-back, checkpoint);
//! - [`recovery`]: the recovery path;
//! - [`log_format`] and [`heap_file`]: the on-disk formats, documented where they are encoded;
//! - [`tracker`]: dirty-page tracking (userfaultfd WP-async + PAGEMAP_SCAN, or mprotect);
//! - [`io`]: the log device (io_uring or plain syscalls, O_DIRECT, RWF_DSYNC / fdatasync);
//! - [`alloc`]: objects, roots and collections in the heap;
//! - [`turns`]: the turn manager (Ken's model: a handler per input, pipelined output commit);
//! - [`transport`]: the reliable, exactly-once, FIFO message protocol between nodes (a sans-IO
//!   state machine; its datagram format in [`transport::wire`]);
//! - [`apps`]: reference turn applications (a bank, ping-pong, a chat room).
//!
//! ```no_run
//! use fams::{FormatOptions, Heap, HeapOptions};
//! Heap::format(&FormatOptions::new("/var/tmp/app.heap", 64 << 20))?;
//! let mut heap = Heap::open("/var/tmp/app.heap", &HeapOptions::default())?;
//! heap.bytes_mut()[..5].copy_from_slice(b"hello");
//! heap.commit()?; // durable now, all or nothing
//! # Ok::<(), fams::Error>(())
//! ```

pub mod alloc;
pub mod apps;
pub mod commit;
pub mod error;
pub mod heap;
pub mod heap_file;
pub mod inspect;
pub mod io;
pub mod log_format;
pub mod mutations;
pub mod recovery;
pub mod sim;
pub mod stats;
pub mod storage;
pub mod tracker;
pub mod transport;
pub mod turns;

pub use alloc::{ObjectError, ObjectHeap, ObjectOptions, Persistent};
pub use commit::{DurabilityHandle, Ticket};
pub use error::{Error, Result};
pub use heap::{FormatOptions, Heap, HeapOptions, InFlight, RollbackReport, WriterMode};
pub use heap_file::{HeapHeader, HeapId, PAGE_SIZE};
pub use io::{FlushMode, IoPath, LogKind};
pub use recovery::RecoveryReport;
pub use stats::{Memory, Stats};
pub use tracker::TrackerKind;
