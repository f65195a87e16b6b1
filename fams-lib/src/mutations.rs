//! Deliberate bugs, for negative controls only: a test switches one on and shows that the checks
//! meant to catch it do. They exist only in builds with the cargo feature `mutations` (never a
//! product build: without it [`is_on`] is a constant `false` the compiler removes, and [`set`]
//! refuses).
//!
//! One is chosen at run time with [`set`], or with the environment variable `FAMS_MUTATION` (read
//! once, at the first check or [`set`]) — so node processes spawned by a harness inherit it.
//! `famsd torture --list-mutations` lists them; `famsd torture --power-loss --mutation NAME` runs
//! the crash explorer with one switched on (`--power-loss --mount` for the mount's).
//!
//! Each mutation is hooked where the real logic lives (the hook names the file): the mutated
//! build runs the product's own code path with one step broken, so a check that catches it has
//! shown it can see that class of bug.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

/// The deliberate bugs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The turn manager hands every committed turn's outputs (messages, the ack of what it
    /// consumed, stdout) to the world at once, without waiting for the turn to be durable.
    TransmitBeforeDurable,
    /// The turn manager acknowledges a consumed message as soon as its turn is committed, before
    /// it is durable (its other outputs still wait).
    AckBeforeDurable,
    /// The transport hands a DATA message it already delivered to the node again (a duplicate
    /// that arrives after delivery is not dropped). Hook: `transport::endpoint`, `on_fragment`.
    NoDuplicateSuppression,
    /// The transport delivers a buffered message that arrived out of order without waiting for
    /// the gap before it to fill (the gap's message is then dropped as old). Hook:
    /// `transport::endpoint`, `Peer::ready_to_deliver`.
    FifoReorder,
    /// A checkpoint moves the log tail without first making the heap file durable (no
    /// fdatasync), so records the heap file has not made durable can be dropped from replay.
    /// Hook: `commit.rs`, `LogWriter::checkpoint`.
    CheckpointWithoutHeapSync,
    /// A checkpoint syncs the heap file and moves the log tail without first writing the
    /// committed images held in memory into it, so the records they came from leave the log
    /// while the heap file still lacks them. Hook: `commit.rs`, `LogWriter::checkpoint`.
    CheckpointWithoutImageFlush,
    /// A checkpoint taken beside the commits moves the log tail to the head of the moment it
    /// writes the superblock, not to the head it planned before writing and syncing the heap
    /// file: records written meanwhile leave replay while the heap file may lack them. Hook:
    /// `checkpoint.rs`, `LogWriter::move_tail`.
    BackgroundCheckpointTailAtHead,
    /// A group's tickets are reported durable (the durable LSN advances, waiters wake) before its
    /// log write is issued, let alone durable. Hook: `commit.rs`, `LogWriter::commit_group`.
    CommitAckBeforeDurable,
    /// A group's committed bytes are written into the heap file as soon as the log writer takes
    /// the group, before its record is written to the log (and before any checkpoint the group
    /// needs to fit). Hook: `commit.rs`, `LogWriter::commit_group`.
    WriteBackBeforeDurable,
    /// After a checkpoint, the first change of a page is logged as a diff, not as the whole page
    /// image the design requires (a diff cannot repair a heap-file page torn during write-back).
    /// Hook: `commit.rs`, `LogWriter::add_full_images`.
    SkipFullPageImage,
    /// Recovery replays a record whose header is intact without checking its payload checksum
    /// (a torn record is replayed as if whole). Hook: `recovery.rs`, `recover`.
    TrustRecordWithoutCrc,
    /// Recovery makes its new superblock (tail at the end of the log) durable *before* it
    /// replays the records into the heap file, so a crash in the middle of the replay leaves
    /// records that no later recovery will replay. Only a crash inside a real replay can show
    /// it. Hook: `recovery.rs`, `recover`.
    TailBeforeReplay,
    /// Recovery moves the log tail past the records it replayed without syncing the heap file
    /// (instead of keeping them in the log until a checkpoint syncs it), so a power cut soon
    /// after the open loses them. Hook: `recovery.rs`, `recover`.
    RecoveryTailWithoutHeapSync,
    /// The log drive acknowledges flushes (and FUA writes) without making anything durable. Not
    /// a bug in fams's code but in the hardware under it: hooked in the drives the crash tests
    /// simulate — the power-loss simulator's log disk (`sim/mod.rs`, `SimLog::write_durable`)
    /// and, on the real kernel path, the FUSE-backed drive of `tests/tests/power_cut.rs` (its
    /// lying mode); fams's own I/O code is unchanged, so the tests show they see the drive.
    DriveIgnoresFlushes,
    /// The mount's sync (fsync, fdatasync, msync) answers success without committing the file's
    /// staged changes (they stay staged, and a crash or a close without sync loses them). Hook:
    /// `famsd/src/mount/core.rs`, `Core::sync`.
    MountSyncWithoutCommit,
    /// The mount's sync commits one file's staged changes in two heap commits (the first half of
    /// its pages with the new size, then the rest), so a crash between them leaves a mix. Hook:
    /// `famsd/src/mount/core.rs`, `Core::sync`.
    MountSyncInTwoCommits,
    /// The mount's sync of one file also commits every other file's staged changes (FAMS
    /// semantics are per file). Hook: `famsd/src/mount/core.rs`, `Core::sync`.
    MountSyncCommitsOtherFiles,
    /// The mount answers syncs and namespace operations as soon as their commit is issued, not
    /// once it is durable. Hook: `famsd/src/mount/layout.rs`, `Store::durable_after` and
    /// `Store::wait_durable`.
    MountAnswerBeforeDurable,
}

/// Which part of the product a mutation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The persistent heap: commit path, checkpoints, recovery, the log device. Caught by the
    /// power-loss explorer and the real-kernel power-cut test.
    Heap,
    /// The turn manager and the transport. Caught by the cluster simulation and the output-commit
    /// test.
    Turns,
    /// `famsd mount`'s sync path. Caught by the mount's power-loss explorer
    /// (`famsd torture --power-loss --mount`).
    Mount,
}

impl Layer {
    /// `"heap"`, `"turns"` or `"mount"`.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Heap => "heap",
            Layer::Turns => "turns",
            Layer::Mount => "mount",
        }
    }
}

impl Mutation {
    /// The part of the product it breaks.
    pub fn layer(self) -> Layer {
        match self {
            Mutation::TransmitBeforeDurable
            | Mutation::AckBeforeDurable
            | Mutation::NoDuplicateSuppression
            | Mutation::FifoReorder => Layer::Turns,
            Mutation::CheckpointWithoutHeapSync
            | Mutation::CheckpointWithoutImageFlush
            | Mutation::BackgroundCheckpointTailAtHead
            | Mutation::CommitAckBeforeDurable
            | Mutation::WriteBackBeforeDurable
            | Mutation::SkipFullPageImage
            | Mutation::TrustRecordWithoutCrc
            | Mutation::TailBeforeReplay
            | Mutation::RecoveryTailWithoutHeapSync
            | Mutation::DriveIgnoresFlushes => Layer::Heap,
            Mutation::MountSyncWithoutCommit
            | Mutation::MountSyncInTwoCommits
            | Mutation::MountSyncCommitsOtherFiles
            | Mutation::MountAnswerBeforeDurable => Layer::Mount,
        }
    }

    /// Its name in [`ALL`] (what [`set`] and `FAMS_MUTATION` take).
    pub fn name(self) -> &'static str {
        ALL.iter().find(|(m, _, _)| *m == self).map_or("?", |(_, n, _)| *n)
    }
}

/// Every mutation: (mutation, name, what it breaks).
pub const ALL: &[(Mutation, &str, &str)] = &[
    (
        Mutation::TransmitBeforeDurable,
        "transmit-before-durable",
        "a turn's messages, acks and stdout leave before the turn is durable (output commit)",
    ),
    (
        Mutation::AckBeforeDurable,
        "ack-before-durable",
        "the ack of a consumed message leaves before the consuming turn is durable",
    ),
    (
        Mutation::NoDuplicateSuppression,
        "no-duplicate-suppression",
        "the transport delivers a duplicate DATA message again instead of dropping it (exactly-once)",
    ),
    (
        Mutation::FifoReorder,
        "fifo-reorder",
        "the transport delivers buffered out-of-order messages without waiting for the gap (FIFO)",
    ),
    (
        Mutation::CheckpointWithoutHeapSync,
        "checkpoint-without-heap-sync",
        "a checkpoint moves the log tail before the heap file is durable (no fdatasync)",
    ),
    (
        Mutation::CheckpointWithoutImageFlush,
        "checkpoint-without-image-flush",
        "a checkpoint moves the log tail before the committed images held in memory are in the heap file",
    ),
    (
        Mutation::BackgroundCheckpointTailAtHead,
        "background-checkpoint-tail-at-head",
        "a checkpoint taken beside the commits moves the log tail to the current head, past records written during its sync",
    ),
    (
        Mutation::CommitAckBeforeDurable,
        "commit-ack-before-durable",
        "a commit's ticket is reported durable before its log record is written and flushed",
    ),
    (
        Mutation::WriteBackBeforeDurable,
        "write-back-before-durable",
        "committed bytes are written into the heap file before their log record is durable",
    ),
    (
        Mutation::SkipFullPageImage,
        "skip-full-page-image",
        "the first change of a page after a checkpoint is logged as a diff, not the full page image",
    ),
    (
        Mutation::TrustRecordWithoutCrc,
        "trust-record-without-crc",
        "recovery replays a log record without checking its payload checksum",
    ),
    (
        Mutation::TailBeforeReplay,
        "tail-before-replay",
        "recovery moves the log tail past the records before it has replayed them into the heap file",
    ),
    (
        Mutation::RecoveryTailWithoutHeapSync,
        "recovery-tail-without-heap-sync",
        "recovery moves the log tail past the records it replayed without syncing the heap file",
    ),
    (
        Mutation::DriveIgnoresFlushes,
        "drive-ignores-flushes",
        "the log drive acknowledges flushes and FUA writes without making anything durable",
    ),
    (
        Mutation::MountSyncWithoutCommit,
        "mount-sync-without-commit",
        "the mount's sync answers success without committing the file's staged changes",
    ),
    (
        Mutation::MountSyncInTwoCommits,
        "mount-sync-in-two-commits",
        "the mount's sync commits a file's staged changes in two heap commits, not one",
    ),
    (
        Mutation::MountSyncCommitsOtherFiles,
        "mount-sync-commits-other-files",
        "the mount's sync of one file also commits every other file's staged changes",
    ),
    (
        Mutation::MountAnswerBeforeDurable,
        "mount-answer-before-durable",
        "the mount answers syncs and namespace operations once their commit is issued, before it is durable",
    ),
];

/// The mutations of one layer, in [`ALL`] order.
pub fn of_layer(layer: Layer) -> impl Iterator<Item = &'static (Mutation, &'static str, &'static str)> {
    ALL.iter().filter(move |(m, _, _)| m.layer() == layer)
}

/// 0: none; i + 1: `ALL[i]`.
static CURRENT: AtomicU8 = AtomicU8::new(0);
static FROM_ENV: Once = Once::new();

fn init() {
    FROM_ENV.call_once(|| {
        if let Ok(name) = std::env::var("FAMS_MUTATION") {
            switch(&name).unwrap_or_else(|e| panic!("FAMS_MUTATION: {e}"));
        }
    });
}

/// Switch on the mutation called `name` (process-wide), or every mutation off with `""` or
/// `"none"`. Fails in a build without the `mutations` feature.
pub fn set(name: &str) -> Result<(), String> {
    init();
    switch(name)
}

fn switch(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "none" {
        CURRENT.store(0, Ordering::SeqCst);
        return Ok(());
    }
    if !cfg!(feature = "mutations") {
        return Err(format!("mutation {name:?} asked for, but this build has none (build with --features mutations)"));
    }
    let i = ALL.iter().position(|(_, n, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = ALL.iter().map(|(_, n, _)| *n).collect();
        format!("unknown mutation {name:?}; known: {}", known.join(", "))
    })?;
    CURRENT.store(i as u8 + 1, Ordering::SeqCst);
    Ok(())
}

/// The mutation switched on, if any (always None without the `mutations` feature). A harness
/// passes it on to the processes it spawns as `FAMS_MUTATION`.
pub fn current() -> Option<Mutation> {
    if !cfg!(feature = "mutations") {
        return None;
    }
    init();
    let i = CURRENT.load(Ordering::Relaxed) as usize;
    (i > 0).then(|| ALL[i - 1].0)
}

/// Is `m` switched on? Always false without the `mutations` feature.
pub fn is_on(m: Mutation) -> bool {
    if !cfg!(feature = "mutations") {
        return false;
    }
    init();
    let i = CURRENT.load(Ordering::Relaxed) as usize;
    i > 0 && ALL[i - 1].0 == m
}

/// Whether `transmit-before-durable` is on.
pub fn transmit_before_durable() -> bool {
    is_on(Mutation::TransmitBeforeDurable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutation_has_one_entry_and_its_name_finds_it() {
        for (i, (m, name, _)) in ALL.iter().enumerate() {
            assert_eq!(m.name(), *name);
            assert_eq!(ALL.iter().position(|(o, _, _)| o == m), Some(i), "{name} listed twice");
            assert_eq!(ALL.iter().filter(|(_, n, _)| n == name).count(), 1, "name {name} taken twice");
        }
        assert!(of_layer(Layer::Heap).count() >= 6 && of_layer(Layer::Turns).count() >= 4);
        assert!(of_layer(Layer::Mount).count() >= 2);
    }

    #[cfg(not(feature = "mutations"))]
    #[test]
    fn a_product_build_refuses_every_mutation() {
        for (m, name, _) in ALL {
            assert!(set(name).is_err(), "{name} accepted in a build without the feature");
            assert!(!is_on(*m));
        }
        assert_eq!(current(), None);
        assert!(set("none").is_ok());
    }
}
