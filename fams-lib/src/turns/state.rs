//! The turn manager's state that lives in the heap and commits with every turn.
//!
//! What must survive a crash, per node (one heap per node): its identity, its incarnation (bumped
//! at every open, so peers can tell a restarted node from a delayed datagram), the alarm, the
//! stdout bytes produced by durable turns but not yet known to be written, and per peer:
//!
//! - `next_send_seq`: the sequence number the next message to that peer gets;
//! - `acked_by_peer`: the highest sequence number the peer said it durably consumed;
//! - `consumed`: the highest sequence number *from* that peer consumed by a committed turn —
//!   exactly-once rests on this: after a crash the transport delivers from `consumed + 1` on;
//! - `outbox`: every message sent to the peer that it has not acknowledged, in sequence order.
//!   After a crash all of it is resent (the peer drops what it already consumed).
//!
//! Everything else (round-trip estimates, timers, out-of-order and reassembly buffers, which
//! fragments a peer holds) is volatile and rebuilt by the transport after a restart.
//!
//! The state is the named root [`STATE_ROOT`]; applications use the main root or other names.

use crate::alloc::{HeapAlloc, ObjectError, ObjectHeap, PHashMap, PVec};
use crate::transport::NodeId;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The named root holding [`NodeState`]. Names starting with `fams.` are reserved.
pub const STATE_ROOT: &str = "fams.turns";

/// Bumped when [`NodeState`]'s meaning changes in a way its fingerprint does not show.
pub const STATE_VERSION: u64 = 1;

crate::persistent! {
    /// A socket address as stored in the heap: an IPv6 address (IPv4 as `::ffff:a.b.c.d`) and
    /// a port. `port == 0` means "no address known".
    pub struct StoredAddr {
        pub ip: [u8; 16],
        pub port: u16,
        pub is_v4: bool,
    }
}

impl StoredAddr {
    pub const NONE: StoredAddr = StoredAddr { ip: [0; 16], port: 0, is_v4: false };

    pub fn from_socket_addr(addr: SocketAddr) -> StoredAddr {
        match addr.ip() {
            IpAddr::V4(v4) => StoredAddr { ip: v4.to_ipv6_mapped().octets(), port: addr.port(), is_v4: true },
            IpAddr::V6(v6) => StoredAddr { ip: v6.octets(), port: addr.port(), is_v4: false },
        }
    }

    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        if self.port == 0 {
            return None;
        }
        let v6 = Ipv6Addr::from(self.ip);
        let ip = match (self.is_v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

crate::persistent! {
    /// One message the peer has not acknowledged yet.
    pub struct OutMessage<'h> {
        pub seq: u64,
        pub bytes: PVec<'h, u8>,
    }
}

crate::persistent! {
    /// The durable protocol state for one peer.
    pub struct PeerState<'h> {
        pub addr: StoredAddr,
        pub next_send_seq: u64,
        pub acked_by_peer: u64,
        pub consumed: u64,
        /// Retired by an operator: nothing more is sent to it, its outbox is dropped and its
        /// messages are refused.
        pub retired: bool,
        pub outbox: PVec<'h, OutMessage<'h>>,
    }
}

crate::persistent! {
    /// The durable state of one node: the named root [`STATE_ROOT`].
    pub struct NodeState<'h> {
        pub version: u64,
        /// 0 until the first open names it.
        pub node: u64,
        /// Bumped at every open (1 after the first).
        pub incarnation: u64,
        /// The `Start` turn committed.
        pub started: bool,
        /// Turns committed, failed turns included.
        pub turns: u64,
        /// Turns whose handler returned an error or panicked (rolled back; input consumed).
        pub turns_failed: u64,
        pub messages_sent: u64,
        pub messages_consumed: u64,
        /// When the alarm fires, in nanoseconds since the Unix epoch; 0 = no alarm.
        pub alarm_unix_ns: u64,
        /// Absolute offset (bytes ever printed) of `stdout_pending[0]`.
        pub stdout_base: u64,
        /// Output of durable turns that may not have reached stdout yet; re-emitted after a
        /// restart (stdout is at-least-once).
        pub stdout_pending: PVec<'h, u8>,
        /// The last failure's message, truncated (for `famsd inspect`).
        pub last_failure: [u8; 128],
        pub peers: PHashMap<'h, u64, PeerState<'h>>,
    }
}

impl<'h> NodeState<'h> {
    fn new(alloc: HeapAlloc<'h>) -> NodeState<'h> {
        NodeState {
            version: STATE_VERSION,
            node: 0,
            incarnation: 0,
            started: false,
            turns: 0,
            turns_failed: 0,
            messages_sent: 0,
            messages_consumed: 0,
            alarm_unix_ns: 0,
            stdout_base: 0,
            stdout_pending: PVec::new_in(alloc),
            last_failure: [0; 128],
            peers: PHashMap::new_in(alloc),
        }
    }

    /// Mark `peer` retired and drop its outbox; the number of messages dropped, or `None` if the
    /// peer is unknown.
    pub fn retire(&mut self, peer: NodeId) -> Option<u64> {
        let p = self.peers.get_mut(&peer.0)?;
        let dropped = p.outbox.len() as u64;
        p.retired = true;
        p.outbox.clear();
        Some(dropped)
    }

    pub fn set_last_failure(&mut self, message: &str) {
        self.last_failure = [0; 128];
        let n = message.len().min(self.last_failure.len());
        self.last_failure[..n].copy_from_slice(&message.as_bytes()[..n]);
    }

    pub fn last_failure(&self) -> String {
        let end = self.last_failure.iter().position(|&b| b == 0).unwrap_or(self.last_failure.len());
        String::from_utf8_lossy(&self.last_failure[..end]).into_owned()
    }

    /// The peer's state, created (with `addr`) if the heap has none yet.
    pub fn peer_or_insert(
        &mut self,
        alloc: HeapAlloc<'h>,
        peer: NodeId,
        addr: Option<SocketAddr>,
    ) -> Result<&mut PeerState<'h>, ObjectError> {
        if !self.peers.contains_key(&peer.0) {
            self.peers.try_reserve(1).map_err(|_| exhausted(std::mem::size_of::<PeerState<'_>>()))?;
            self.peers.insert(
                peer.0,
                PeerState {
                    addr: addr.map(StoredAddr::from_socket_addr).unwrap_or(StoredAddr::NONE),
                    next_send_seq: 1,
                    acked_by_peer: 0,
                    consumed: 0,
                    retired: false,
                    outbox: PVec::new_in(alloc),
                },
            );
        }
        Ok(self.peers.get_mut(&peer.0).expect("inserted above"))
    }
}

/// A collection could not grow: the heap is full.
pub(crate) fn exhausted(requested_bytes: usize) -> ObjectError {
    ObjectError::Exhausted { requested_bytes: requested_bytes as u64, align_bytes: 8, top_bytes: 0 }
}

/// The node state, created empty on a heap that has none.
pub fn node_state(objects: &mut ObjectHeap) -> Result<(&mut NodeState<'_>, HeapAlloc<'_>), ObjectError> {
    objects.named_root(STATE_ROOT, NodeState::new)
}

/// A copy of one peer's durable state, for inspection and for rebuilding the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub peer: NodeId,
    pub addr: Option<SocketAddr>,
    pub next_send_seq: u64,
    pub acked_by_peer: u64,
    pub consumed: u64,
    pub retired: bool,
    pub unacked_messages: u64,
    pub unacked_bytes: u64,
}

/// A copy of the node's durable state (without message bodies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub node: NodeId,
    pub incarnation: u64,
    pub started: bool,
    pub turns: u64,
    pub turns_failed: u64,
    pub messages_sent: u64,
    pub messages_consumed: u64,
    pub alarm_unix_ns: u64,
    /// Bytes of stdout ever produced by durable turns and known written (the absolute offset
    /// of the first pending byte).
    pub stdout_base: u64,
    pub stdout_pending_bytes: u64,
    pub last_failure: String,
    pub peers: Vec<PeerSnapshot>,
}

impl NodeState<'_> {
    pub fn snapshot(&self) -> NodeSnapshot {
        let mut peers: Vec<PeerSnapshot> = self
            .peers
            .iter()
            .map(|(&id, p)| PeerSnapshot {
                peer: NodeId(id),
                addr: p.addr.to_socket_addr(),
                next_send_seq: p.next_send_seq,
                acked_by_peer: p.acked_by_peer,
                consumed: p.consumed,
                retired: p.retired,
                unacked_messages: p.outbox.len() as u64,
                unacked_bytes: p.outbox.iter().map(|m| m.bytes.len() as u64).sum(),
            })
            .collect();
        peers.sort_by_key(|p| p.peer);
        NodeSnapshot {
            node: NodeId(self.node),
            incarnation: self.incarnation,
            started: self.started,
            turns: self.turns,
            turns_failed: self.turns_failed,
            messages_sent: self.messages_sent,
            messages_consumed: self.messages_consumed,
            alarm_unix_ns: self.alarm_unix_ns,
            stdout_base: self.stdout_base,
            stdout_pending_bytes: self.stdout_pending.len() as u64,
            last_failure: self.last_failure(),
            peers,
        }
    }
}

/// Read the node state of a heap without creating it: `Ok(None)` if the heap holds no turns
/// state (for `famsd inspect`).
pub fn snapshot(objects: &mut ObjectHeap) -> Result<Option<NodeSnapshot>, ObjectError> {
    if !objects.named_roots().iter().any(|r| r.name == STATE_ROOT) {
        return Ok(None);
    }
    let (state, _) = node_state(objects)?;
    Ok(Some(state.snapshot()))
}

/// Retire `peer` in a stopped node's heap: its outbox is dropped, nothing more is sent to it and
/// its messages are refused. For a peer that is gone for good (a full outbox to a dead peer
/// would otherwise stop the node's input). Committed before returning. Returns the number of
/// unacknowledged messages dropped, or `None` if the heap does not know the peer.
pub fn retire_peer(objects: &mut ObjectHeap, peer: NodeId) -> Result<Option<u64>, ObjectError> {
    let Some(dropped) = node_state(objects)?.0.retire(peer) else { return Ok(None) };
    objects.commit()?;
    Ok(Some(dropped))
}

/// Record a new address for `peer` in a stopped node's heap (a peer that moved), creating the
/// peer if the heap does not know it; un-retires it. Committed before returning.
pub fn set_peer_addr(objects: &mut ObjectHeap, peer: NodeId, addr: SocketAddr) -> Result<(), ObjectError> {
    {
        let (st, alloc) = node_state(objects)?;
        let p = st.peer_or_insert(alloc, peer, Some(addr))?;
        p.addr = StoredAddr::from_socket_addr(addr);
        p.retired = false;
    }
    objects.commit()?;
    Ok(())
}
