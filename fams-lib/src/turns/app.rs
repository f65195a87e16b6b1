//! What an application developer writes: an [`App`] whose [`App::turn`] is called once per
//! input, with a [`Turn`] to reach the heap and to send, print and set the alarm.

use crate::alloc::{HeapAlloc, ObjectError, ObjectHeap, Persistent};
use crate::transport::NodeId;
use crate::Heap;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

/// What a turn consumes. Each input is consumed by exactly one committed turn (messages from
/// peers: exactly once; stdin: at most once — a line read but not yet committed when the node
/// crashes is lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// The very first turn of a new heap.
    Start,
    /// The first turn after the node was reopened (after a crash or a clean stop): rebuild
    /// volatile state here.
    Restarted,
    /// A message from a peer, in the order the peer sent it.
    Message { from: NodeId, seq: u64, bytes: &'a [u8] },
    /// One line of standard input, without its newline.
    Stdin(&'a [u8]),
    /// The alarm set by an earlier turn went off.
    Alarm,
}

impl Input<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Start => "start",
            Input::Restarted => "restarted",
            Input::Message { .. } => "message",
            Input::Stdin(_) => "stdin",
            Input::Alarm => "alarm",
        }
    }
}

/// A turn failed: its effects are rolled back. Any error converts into it with `?`.
pub struct TurnError {
    message: String,
}

impl TurnError {
    pub fn new(message: impl Into<String>) -> TurnError {
        TurnError { message: message.into() }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for TurnError {
    fn from(e: E) -> TurnError {
        TurnError { message: e.to_string() }
    }
}

impl fmt::Debug for TurnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TurnError({:?})", self.message)
    }
}

impl fmt::Display for TurnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A crash-proof event handler.
///
/// Everything a turn does commits together or not at all: its heap changes (through
/// [`Turn::heap`]), the messages it sends, what it prints, the alarm, and the consumption of its
/// input. Nothing it sends or prints leaves the process before the turn is durable.
///
/// If `turn` returns an error or panics, the turn is rolled back in place: the heap is exactly
/// as before it, nothing it sent or printed exists. Its input is then consumed anyway by a turn
/// that records only the failure (see [`crate::turns::NodeStats::turns_failed`] and `famsd
/// inspect`): a poison message must not wedge the node by failing forever. The `App` value
/// itself (`&mut self`) is ordinary memory: keep durable state in the heap and treat fields of
/// the `App` as caches you can rebuild in [`Input::Restarted`].
pub trait App {
    /// The version of the application's heap layout. When a heap records an older version,
    /// [`App::migrate`] runs (in a turn of its own) before anything else.
    const SCHEMA_VERSION: u64 = 1;

    /// Handle one input.
    fn turn(&mut self, turn: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError>;

    /// Bring a heap written with schema version `from` up to [`App::SCHEMA_VERSION`]: e.g.
    /// `take_root` the old root type and store a new one. The default refuses.
    fn migrate(&mut self, heap: &mut TurnHeap<'_>, from: u64) -> Result<(), TurnError> {
        let _ = heap;
        Err(TurnError::new(format!(
            "the heap holds schema version {from}, this program expects {}; it has no migration from it",
            Self::SCHEMA_VERSION
        )))
    }
}

/// The heap as a turn sees it: objects and roots, but no commit and no rollback — the turn
/// manager commits the turn as a whole.
pub struct TurnHeap<'a> {
    objects: &'a mut ObjectHeap,
}

impl<'a> TurnHeap<'a> {
    pub(crate) fn new(objects: &'a mut ObjectHeap) -> TurnHeap<'a> {
        TurnHeap { objects }
    }

    /// The heap, for reading.
    pub fn heap(&self) -> &Heap {
        self.objects.heap()
    }

    /// The main root, created with `init` if absent. See [`ObjectHeap::root`].
    pub fn root<'h, T: Persistent + 'h>(
        &'h mut self,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<&'h mut T, ObjectError> {
        self.objects.root(init)
    }

    /// See [`ObjectHeap::root_with_alloc`].
    pub fn root_with_alloc<'h, T: Persistent + 'h>(
        &'h mut self,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<(&'h mut T, HeapAlloc<'h>), ObjectError> {
        self.objects.root_with_alloc(init)
    }

    /// See [`ObjectHeap::named_root`]. Names starting with `fams.` are reserved.
    pub fn named_root<'h, T: Persistent + 'h>(
        &'h mut self,
        name: &str,
        init: impl FnOnce(HeapAlloc<'h>) -> T,
    ) -> Result<(&'h mut T, HeapAlloc<'h>), ObjectError> {
        reserved(name)?;
        self.objects.named_root(name, init)
    }

    /// See [`ObjectHeap::take_root`] (for migrations).
    pub fn take_root<'h, T: Persistent + 'h>(&'h mut self) -> Result<Option<T>, ObjectError> {
        self.objects.take_root()
    }

    /// See [`ObjectHeap::take_named_root`].
    pub fn take_named_root<'h, T: Persistent + 'h>(&'h mut self, name: &str) -> Result<Option<T>, ObjectError> {
        reserved(name)?;
        self.objects.take_named_root(name)
    }

    /// The allocator, for building collections.
    pub fn allocator(&mut self) -> HeapAlloc<'_> {
        self.objects.allocator()
    }

    pub fn schema_version(&self) -> u64 {
        self.objects.schema_version()
    }
}

fn reserved(name: &str) -> Result<(), ObjectError> {
    if name.starts_with("fams.") {
        return Err(ObjectError::InvalidArgument(format!(
            "root names starting with \"fams.\" are reserved ({name:?})"
        )));
    }
    Ok(())
}

/// Limits on what one turn may produce.
#[derive(Clone, Copy, Debug)]
pub struct TurnLimits {
    pub sends_per_turn_max: usize,
    pub message_bytes_max: usize,
    pub stdout_bytes_per_turn_max: usize,
    /// Unacknowledged messages per peer (durable outbox plus turns in flight).
    pub outbox_messages_max: usize,
}

/// The alarm as a turn leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AlarmChange {
    Keep,
    Clear,
    At(u64),
}

/// The effects of a turn, staged until it commits.
pub struct Turn<'a> {
    /// The heap: roots, objects, the allocator.
    pub heap: TurnHeap<'a>,
    pub(crate) node: NodeId,
    pub(crate) now: SystemTime,
    pub(crate) limits: TurnLimits,
    /// Sequence number the next message to each peer gets, before this turn.
    pub(crate) next_seq: &'a BTreeMap<NodeId, u64>,
    /// Unacknowledged messages per peer before this turn (outbox plus turns in flight).
    pub(crate) unacked: &'a BTreeMap<NodeId, usize>,
    pub(crate) ackd: &'a BTreeMap<NodeId, u64>,
    pub(crate) sends: Vec<(NodeId, u64, Vec<u8>)>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) alarm: AlarmChange,
    pub(crate) stop: bool,
}

impl Turn<'_> {
    /// This node's identity.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The wall-clock time the turn started.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// The peers this node knows (has an address for or has heard from).
    pub fn peers(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.next_seq.keys().copied().collect();
        v.sort();
        v
    }

    /// Send `bytes` to `to`, delivered exactly once and in order after this turn is durable.
    /// Returns the message's sequence number (1 for the first message to that peer).
    pub fn send(&mut self, to: NodeId, bytes: &[u8]) -> Result<u64, TurnError> {
        let Some(&base) = self.next_seq.get(&to) else {
            return Err(TurnError::new(format!("unknown peer {to}: give its address in the node's configuration")));
        };
        if to == self.node {
            return Err(TurnError::new("a node cannot send to itself"));
        }
        if bytes.len() > self.limits.message_bytes_max {
            return Err(TurnError::new(format!(
                "a message of {} bytes exceeds the limit of {} bytes",
                bytes.len(),
                self.limits.message_bytes_max
            )));
        }
        if self.sends.len() >= self.limits.sends_per_turn_max {
            return Err(TurnError::new(format!("more than {} sends in one turn", self.limits.sends_per_turn_max)));
        }
        let staged = self.sends.iter().filter(|(p, _, _)| *p == to).count();
        let unacked = self.unacked.get(&to).copied().unwrap_or(0) + staged;
        if unacked >= self.limits.outbox_messages_max {
            return Err(TurnError::new(format!(
                "the outbox to {to} is full ({unacked} unacknowledged messages): wait for ackd({to}) to advance"
            )));
        }
        let seq = base + staged as u64;
        self.sends.push((to, seq, bytes.to_vec()));
        Ok(seq)
    }

    /// Print to standard output once the turn is durable (at least once across crashes).
    pub fn print(&mut self, bytes: &[u8]) -> Result<(), TurnError> {
        if self.stdout.len() + bytes.len() > self.limits.stdout_bytes_per_turn_max {
            return Err(TurnError::new(format!(
                "more than {} bytes of output in one turn",
                self.limits.stdout_bytes_per_turn_max
            )));
        }
        self.stdout.extend_from_slice(bytes);
        Ok(())
    }

    /// [`Turn::print`] a line.
    pub fn println(&mut self, line: &str) -> Result<(), TurnError> {
        self.print(line.as_bytes())?;
        self.print(b"\n")
    }

    /// Be called with [`Input::Alarm`] after `delay` (replaces any alarm set before).
    pub fn set_alarm(&mut self, delay: Duration) {
        let at = self.now + delay;
        self.set_alarm_at(at);
    }

    /// Be called with [`Input::Alarm`] at `at` (wall clock; survives restarts).
    pub fn set_alarm_at(&mut self, at: SystemTime) {
        let ns = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0).max(1);
        self.alarm = AlarmChange::At(ns);
    }

    pub fn clear_alarm(&mut self) {
        self.alarm = AlarmChange::Clear;
    }

    /// The highest sequence number of ours that `peer` has processed to completion (durably).
    pub fn ackd(&self, peer: NodeId) -> u64 {
        self.ackd.get(&peer).copied().unwrap_or(0)
    }

    /// Ask the node to stop once this turn and everything before it is durable and sent.
    pub fn stop(&mut self) {
        self.stop = true;
    }
}
