//! Every error the library returns. Each variant names the file or device involved and, where
//! there is one, what the operator can do about it. Nothing read from disk panics: decoders
//! return these instead.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a fams heap file ({reason}); format one with `famsd format --heap {path} --size SIZE`")]
    NotAHeap { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    BadHeap { path: PathBuf, reason: String },

    #[error("{path}: the log does not belong to this heap ({reason}); pass the log that was formatted with it (`famsd inspect --heap` shows its path)")]
    LogMismatch { path: PathBuf, reason: String },

    #[error("{path}: both superblocks of the log are unreadable ({reason}); the log is damaged or not a fams log")]
    CorruptSuperblock { path: PathBuf, reason: String },

    #[error("{path}: media corruption in the log: record LSN {lsn} at offset {offset} is damaged ({reason}) but a later commit (LSN {later_lsn}) is intact, so this is not a torn tail; refusing to open. `famsd recover --salvage` replays up to LSN {lsn} and drops what follows")]
    MediaCorruption { path: PathBuf, lsn: u64, offset: u64, later_lsn: u64, reason: String },

    #[error("{path}: the heap is locked by another process (pid {holder}); stop it first, a heap has one writer")]
    Locked { path: PathBuf, holder: String },

    #[error("{path}: the heap is open in another process (pid {holder}), which holds its log, the block device {log}, exclusively; a block-device log cannot be read while it is in use. Stop that process first (a running turn node's state is in its status file, <heap>.status.json)")]
    LogInUse { path: PathBuf, holder: String, log: PathBuf },

    #[error("{path}: the heap's base address {base:#x}..{end:#x} is already in use in this process; open it in a process that has that range free, or reformat with another --base", end = base + size)]
    AddressTaken { path: PathBuf, base: usize, size: usize },

    #[error("{path}: {reason}")]
    BadLogDevice { path: PathBuf, reason: String },

    #[error("commit too large: its log record needs {needed_bytes} bytes but the log holds {capacity_bytes}; make the log larger (famsd format --log-size) or commit more often")]
    CommitTooLarge { needed_bytes: u64, capacity_bytes: u64 },

    #[error("dirty tracking failed: {0}")]
    Tracker(std::io::Error),

    #[error("{path}: the log writer failed earlier ({reason}); commits after that are not durable. Drop the heap and reopen it to recover the committed state")]
    Poisoned { path: PathBuf, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), what, source }
    }
}
