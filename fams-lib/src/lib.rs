//! # fams — failure-atomic msync
//!
//! A persistent heap: a file mapped into memory at a fixed address, read and written like
//! ordinary memory, whose changes become durable only at [`Heap::commit`] — all of them or none,
//! whatever crashes (process kill, kernel panic, power cut).
//!
//! Where to look:
//! - [`heap`]: format, open, commit, rollback — the public API of the heap;
//! - [`alloc`]: objects, roots and collections in the heap;
//! - [`turns`]: the turn manager (Ken's model: a handler per input, pipelined output commit);
//! - [`transport`]: the reliable, exactly-once, FIFO message protocol between nodes (a sans-IO
//!   state machine; its datagram format in [`transport::wire`]);
//! - [`apps`]: reference turn applications (a bank, ping-pong, a chat room);
//! - [`inspect`]: what a heap and its log hold, read without opening them for writing.
//!
//! The engine's files, for readers of the source (public only with the `testing` feature):
//! `commit.rs` (the commit path: capture, log writer, write-back, checkpoint), `recovery.rs`
//! (the recovery path), `log_format.rs` and `heap_file.rs` (the on-disk formats, documented where
//! they are encoded), `tracker/` (dirty-page tracking: userfaultfd WP-async + PAGEMAP_SCAN, or
//! mprotect), `io/` (the log device: io_uring or plain syscalls, O_DIRECT, RWF_DSYNC / fdatasync),
//! `storage.rs` (the seam the simulator replaces) and `sim/` (the power-loss simulator and the
//! deterministic cluster simulation).
//!
//! # Cargo features
//! - `testing`: makes the internals above public, including `fams::sim::cluster`: the
//!   deterministic cluster simulator an application developer runs their own [`turns::App`] in
//!   (seeded message faults, kills and power cuts, their own invariants; its module page shows
//!   how). Enable it for tests only: `[dev-dependencies] fams = { version = "…", features =
//!   ["testing"] }`.
//! - `mutations`: deliberate bugs switched on at run time ([`mutations`]), for negative controls
//!   only. Never enable it in a product build.
//!
//! ```no_run
//! use fams::{FormatOptions, Heap, HeapOptions};
//! Heap::format(&FormatOptions::new("/var/tmp/app.heap", 64 << 20))?;
//! let mut heap = Heap::open("/var/tmp/app.heap", &HeapOptions::default())?;
//! heap.bytes_mut()[..5].copy_from_slice(b"hello");
//! heap.commit()?; // durable now, all or nothing
//! # Ok::<(), fams::Error>(())
//! ```

/// The README's Rust examples, compiled as doctests (not run: they use a deployment's paths),
/// so the front page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;

pub mod alloc;
pub mod apps;
pub mod error;
pub mod heap;
pub mod inspect;
pub mod mutations;
pub mod stats;
pub mod transport;
pub mod turns;

/// The engine's internals: public with the `testing` feature (for the crash tests, the
/// simulators and `famsd`'s torture and benchmark commands), crate-private otherwise, so a
/// program using the heap cannot reach past its API into the log, the tracker or the I/O layer.
macro_rules! internal_modules {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "testing")]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "testing"))]
        pub(crate) mod $name;
    )*};
}

internal_modules! {
    checkpoint;
    commit;
    heap_file;
    images;
    io;
    log_format;
    recovery;
    // Without `testing` only the seeded random numbers are used (by the reference apps and the
    // fault layer); the simulators exist for the test crates.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    sim;
    storage;
    tracker;
}

pub use alloc::{ObjectError, ObjectHeap, ObjectOptions, Persistent};
pub use commit::{DurabilityHandle, Ticket};
pub use error::{Error, Result};
pub use heap::{FormatOptions, Heap, HeapOptions, InFlight, RollbackReport, UpgradeOptions, UpgradeReport, WriterMode};
pub use heap_file::{HeapHeader, HeapId, PAGE_SIZE};
pub use io::{write_cache_state, FlushMode, IoChoice, IoMeasurement, IoPath, LogKind, WriteCacheState};
pub use recovery::RecoveryReport;
pub use stats::{Memory, Stats};
pub use tracker::TrackerKind;
