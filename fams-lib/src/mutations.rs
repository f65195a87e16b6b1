//! Deliberate bugs, for negative controls only: a test switches one on and shows that the checks
//! meant to catch it do. They exist only in builds with the cargo feature `mutations` (never a
//! product build: without it [`is_on`] is a constant `false` the compiler removes, and [`set`]
//! refuses).
//!
//! One is chosen at run time with [`set`], or with the environment variable `FAMS_MUTATION` (read
//! once, at the first check or [`set`]) — so node processes spawned by a harness inherit it.

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
];

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
