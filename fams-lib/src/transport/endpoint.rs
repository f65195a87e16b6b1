//! The endpoint: the protocol's sans-IO state machine (see the module docs of
//! [`transport`](super) for the protocol in words).
//!
//! Inputs: [`Endpoint::handle_datagram`], [`Endpoint::handle_timeout`], and the turn manager's
//! calls ([`Endpoint::send_durable`], [`Endpoint::consumed_durable`], peers). Outputs, pulled:
//! [`Endpoint::poll_transmit`], [`Endpoint::poll_message`], [`Endpoint::poll_event`],
//! [`Endpoint::poll_timeout`]. Time is always passed in.
//!
//! Everything here is volatile. Per peer, the state splits into a receiving half (what to
//! deliver next, what to ack, the reorder/reassembly buffer) and a sending half (the volatile
//! copy of every unacknowledged message, which fragments were sent, which the peer holds, the
//! retransmission timer).

use super::auth::Auth;
use super::rto::RttEstimator;
use super::wire::{
    self, Datagram, DecodeError, Fragment, Header, Sack, ACK_HEADER_BYTES, DATAGRAM_BYTES_MIN, DATA_HEADER_BYTES,
    MESSAGE_BYTES_MAX, UDP_PAYLOAD_BYTES_MAX,
};
use super::NodeId;
use crate::mutations::{self, Mutation};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Default datagram size: 1,400 bytes including our header and trailer, so that with 20 bytes
/// of IPv4 (or 40 of IPv6) and 8 of UDP it crosses a 1,500-byte MTU unfragmented.
pub const DATAGRAM_BYTES_DEFAULT: usize = 1_400;
/// Default message window: unacknowledged messages transmitted to one peer.
pub const WINDOW_MESSAGES_DEFAULT: u32 = 64;
/// Default byte window: bytes of unacknowledged messages transmitted to one peer.
pub const WINDOW_BYTES_DEFAULT: u64 = 8 << 20;
/// Default fragment window: fragments sent to one peer that it has neither acked nor selectively
/// acked (about 350 KB in flight with the default datagram size).
pub const WINDOW_FRAGMENTS_DEFAULT: u32 = 256;
/// Default bound on messages buffered per peer before delivery (out of order, being reassembled,
/// or in order but not yet pulled by `poll_message`).
pub const REORDER_MESSAGES_DEFAULT: u32 = 128;
/// Default bound on bytes buffered per peer before delivery (≥ [`MESSAGE_BYTES_MAX`], so that the
/// largest message can always be reassembled).
pub const REORDER_BYTES_DEFAULT: u64 = 8 << 20;
/// Default retransmission timeout before the first round-trip sample.
pub const RTO_INITIAL_DEFAULT: Duration = Duration::from_millis(200);
/// Default floor of the retransmission timeout.
pub const RTO_MIN_DEFAULT: Duration = Duration::from_millis(5);
/// Default cap of the retransmission timeout (and of its backoff).
pub const RTO_MAX_DEFAULT: Duration = Duration::from_secs(2);
/// Default bound on peers (Ken's was 1,024, fixed, and peers were never forgotten).
pub const PEERS_MAX_DEFAULT: usize = 1_024;
/// The largest `peers_max` a configuration may ask for.
pub const PEERS_MAX_LIMIT: usize = 1 << 20;
/// The largest `window_messages`, `window_fragments` and `reorder_messages_max` a configuration
/// may ask for.
pub const WINDOW_LIMIT: u32 = 1 << 20;
/// A partly received message is selectively acked after this many new fragments (and when its
/// last fragment arrives, when it completes, and when a fragment arrives twice), so that the
/// sender's fragment window keeps moving.
pub const SACK_EVERY_FRAGMENTS: u32 = 32;
/// Bound on acks queued for addresses other than a peer's known one (see "replay" in the module
/// docs); more are dropped.
pub const ONE_OFF_TRANSMITS_MAX: usize = 64;
/// A fragment not held by the peer while it holds this many fragments sent after it is resent
/// at once (TCP's duplicate-ack threshold, counted in selectively acked fragments).
pub const FAST_RETRANSMIT_AFTER: usize = 3;

/// The endpoint's configuration. [`EndpointConfig::new`] gives the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// This node's identity.
    pub node: NodeId,
    /// This endpoint's life: the turn manager bumps it in the heap at every open.
    pub incarnation: u64,
    /// Bytes per datagram including header and trailer, in [`DATAGRAM_BYTES_MIN`]`..=`
    /// [`UDP_PAYLOAD_BYTES_MAX`].
    pub datagram_bytes_max: usize,
    /// Largest message accepted by `send_durable` and from the wire, ≤ [`MESSAGE_BYTES_MAX`].
    pub message_bytes_max: usize,
    /// Unacknowledged messages transmitted to one peer, at most.
    pub window_messages: u32,
    /// Bytes of unacknowledged transmitted messages to one peer, at most (one message is always
    /// allowed when nothing is in flight).
    pub window_bytes: u64,
    /// Fragments in flight to one peer (sent, neither acked nor selectively acked), at most.
    pub window_fragments: u32,
    /// Messages buffered per peer before delivery, at most.
    pub reorder_messages_max: u32,
    /// Bytes buffered per peer before delivery, at most; ≥ `message_bytes_max`.
    pub reorder_bytes_max: u64,
    pub rto_initial: Duration,
    pub rto_min: Duration,
    pub rto_max: Duration,
    /// Peers known at once, at most.
    pub peers_max: usize,
    /// Add a peer the first time a valid datagram arrives from an unknown node id.
    pub accept_unknown_peers: bool,
    /// Shared key: every datagram carries a MAC and unkeyed ones are rejected.
    pub key: Option<[u8; 32]>,
}

impl EndpointConfig {
    /// The defaults, for `node` in its life `incarnation`.
    pub fn new(node: NodeId, incarnation: u64) -> EndpointConfig {
        EndpointConfig {
            node,
            incarnation,
            datagram_bytes_max: DATAGRAM_BYTES_DEFAULT,
            message_bytes_max: MESSAGE_BYTES_MAX,
            window_messages: WINDOW_MESSAGES_DEFAULT,
            window_bytes: WINDOW_BYTES_DEFAULT,
            window_fragments: WINDOW_FRAGMENTS_DEFAULT,
            reorder_messages_max: REORDER_MESSAGES_DEFAULT,
            reorder_bytes_max: REORDER_BYTES_DEFAULT,
            rto_initial: RTO_INITIAL_DEFAULT,
            rto_min: RTO_MIN_DEFAULT,
            rto_max: RTO_MAX_DEFAULT,
            peers_max: PEERS_MAX_DEFAULT,
            accept_unknown_peers: true,
            key: None,
        }
    }

    fn validate(&self) -> Result<(), TransportError> {
        let bad = |what: &'static str| Err(TransportError::InvalidConfig { what });
        if !(DATAGRAM_BYTES_MIN..=UDP_PAYLOAD_BYTES_MAX).contains(&self.datagram_bytes_max) {
            return bad("datagram_bytes_max must be in 512..=65507");
        }
        if self.message_bytes_max == 0 || self.message_bytes_max > MESSAGE_BYTES_MAX {
            return bad("message_bytes_max must be in 1..=MESSAGE_BYTES_MAX (4 MiB)");
        }
        if self.window_messages == 0 || self.window_messages > WINDOW_LIMIT {
            return bad("window_messages must be in 1..=WINDOW_LIMIT");
        }
        if self.window_fragments == 0 || self.window_fragments > WINDOW_LIMIT {
            return bad("window_fragments must be in 1..=WINDOW_LIMIT");
        }
        if self.window_bytes == 0 {
            return bad("window_bytes must be at least 1");
        }
        if self.reorder_messages_max == 0 || self.reorder_messages_max > WINDOW_LIMIT {
            return bad("reorder_messages_max must be in 1..=WINDOW_LIMIT");
        }
        if self.reorder_bytes_max < self.message_bytes_max as u64 {
            return bad("reorder_bytes_max must be at least message_bytes_max (else the largest message never fits)");
        }
        if self.rto_min.is_zero() || self.rto_min > self.rto_initial || self.rto_initial > self.rto_max {
            return bad("retransmission timeouts must satisfy 0 < rto_min <= rto_initial <= rto_max");
        }
        if self.peers_max == 0 || self.peers_max > PEERS_MAX_LIMIT {
            return bad("peers_max must be in 1..=PEERS_MAX_LIMIT");
        }
        // The selective ack of our largest message must fit in one of our datagrams.
        let trailer = wire::trailer_bytes(self.key.is_some());
        let payload = (self.datagram_bytes_max - DATA_HEADER_BYTES - trailer) as u64;
        let fragments = wire::fragment_count_for(self.message_bytes_max as u64, payload);
        if fragments.div_ceil(8) > (self.datagram_bytes_max - ACK_HEADER_BYTES - trailer) as u64 {
            return bad("message_bytes_max too large for datagram_bytes_max: the selective-ack bitmap of the largest \
                        message would not fit in one datagram (4 MiB messages need datagrams of at least 801 bytes)");
        }
        Ok(())
    }
}

/// What the turn manager restores for a peer from the heap after a restart (or gives a new peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRestore {
    /// First seq from that peer not yet durably consumed; 1 for a new peer.
    pub next_expected: u64,
    /// Highest seq of ours the peer acknowledged; 0 if none.
    pub acked_by_peer: u64,
}

impl PeerRestore {
    /// A peer never heard from: nothing consumed, nothing acked.
    pub const NEW: PeerRestore = PeerRestore { next_expected: 1, acked_by_peer: 0 };
}

/// A message delivered in order, exactly once per endpoint lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub peer: NodeId,
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Something the turn manager should know.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer acknowledged (durably consumed) every message up to `seq`: the endpoint has freed
    /// them; the turn manager may free them from its heap outbox in a later turn.
    Acked { peer: NodeId, seq: u64 },
    /// The peer restarted (a HELLO, or a datagram of a higher incarnation): everything unacked
    /// is being resent to it now.
    PeerRestarted { peer: NodeId, incarnation: u64 },
    /// A datagram came from a node id never seen; it was added with `next_expected = 1`. If this
    /// id is one the heap knows (a retired peer come back), the turn manager should
    /// `remove_peer` and `add_peer` it again with its stored [`PeerRestore`].
    NewPeer { peer: NodeId, addr: SocketAddr },
    /// An authenticated peer now sends from a new address; replies go there from now on.
    PeerAddressChanged { peer: NodeId, addr: SocketAddr },
}

/// Errors of the endpoint's API (never of input from the wire: that is counted and dropped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("invalid transport configuration: {what}")]
    InvalidConfig { what: &'static str },
    #[error("peer {peer} is not known to the transport; add_peer it first")]
    UnknownPeer { peer: NodeId },
    #[error("peer {peer} is already known to the transport; use set_peer_addr, or remove_peer first")]
    PeerExists { peer: NodeId },
    #[error("cannot add peer {peer}: the transport already has peers_max = {max} peers")]
    PeersFull { peer: NodeId, max: usize },
    #[error("peer {peer} is this node itself")]
    SelfPeer { peer: NodeId },
    #[error("peer {peer}: restored next_expected must be at least 1 (sequence numbers start at 1)")]
    InvalidRestore { peer: NodeId },
    #[error("message to peer {peer}: seq {got} leaves a gap, the next one must be {expected}")]
    SequenceGap { peer: NodeId, expected: u64, got: u64 },
    #[error("message to peer {peer}: seq {seq} is already queued (highest queued {highest})")]
    AlreadyQueued { peer: NodeId, seq: u64, highest: u64 },
    #[error("message of {bytes} bytes exceeds the transport's limit of {max} bytes")]
    MessageTooLarge { bytes: usize, max: usize },
    #[error("peer {peer}: consumed_durable({seq}) covers messages not delivered yet (delivered up to {delivered})")]
    NotDelivered { peer: NodeId, seq: u64, delivered: u64 },
}

/// Datagrams rejected as malformed, by reason (checksum, MAC and auth-mode failures are counted
/// in their own [`TransportStats`] fields instead).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MalformedStats {
    pub too_short: u64,
    pub bad_magic: u64,
    pub unsupported_version: u64,
    pub unknown_kind: u64,
    pub unknown_flags: u64,
    pub reserved_nonzero: u64,
    pub zero_sequence: u64,
    /// Over [`MESSAGE_BYTES_MAX`], or over this endpoint's `message_bytes_max`.
    pub message_too_large: u64,
    pub fragment_count: u64,
    pub fragment_index: u64,
    pub fragment_length: u64,
    pub payload_length: u64,
    pub sack_inconsistent: u64,
    pub sack_bitmap_length: u64,
}

impl MalformedStats {
    /// Every counter with its reason name (as [`DecodeError::reason`] spells it).
    pub fn by_reason(&self) -> [(&'static str, u64); 14] {
        [
            ("too_short", self.too_short),
            ("bad_magic", self.bad_magic),
            ("unsupported_version", self.unsupported_version),
            ("unknown_kind", self.unknown_kind),
            ("unknown_flags", self.unknown_flags),
            ("reserved_nonzero", self.reserved_nonzero),
            ("zero_sequence", self.zero_sequence),
            ("message_too_large", self.message_too_large),
            ("fragment_count", self.fragment_count),
            ("fragment_index", self.fragment_index),
            ("fragment_length", self.fragment_length),
            ("payload_length", self.payload_length),
            ("sack_inconsistent", self.sack_inconsistent),
            ("sack_bitmap_length", self.sack_bitmap_length),
        ]
    }
}

/// The endpoint's counters (since it was built).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Messages handed out by `poll_message`.
    pub messages_delivered: u64,
    /// DATA datagrams sent, first transmissions and retransmissions.
    pub fragments_sent: u64,
    /// DATA datagrams that resent a fragment already sent in this endpoint's life.
    pub fragments_retransmitted: u64,
    /// Messages that had any fragment resent (each counted once).
    pub messages_retransmitted: u64,
    /// DATA fragments received that were already held or delivered.
    pub duplicates_dropped: u64,
    /// ACK datagrams sent (with or without a selective ack).
    pub acks_sent: u64,
    /// ACK datagrams sent with a selective ack.
    pub sacks_sent: u64,
    /// Messages that started arriving ahead of the next one to deliver and were buffered.
    pub out_of_order_buffered: u64,
    /// Fragments of new messages dropped because the peer's reorder buffer was full.
    pub buffer_full_dropped: u64,
    /// Datagrams rejected as malformed (sum of `malformed`).
    pub rejected_malformed: u64,
    pub malformed: MalformedStats,
    pub rejected_checksum: u64,
    pub rejected_mac: u64,
    /// Keyed datagrams at an unkeyed endpoint, or unkeyed ones at a keyed endpoint.
    pub rejected_auth_mode: u64,
    /// Datagrams addressed to another node id (or claiming to come from this node).
    pub wrong_receiver: u64,
    /// Datagrams from unknown node ids not accepted (`accept_unknown_peers` off, or `peers_max`).
    pub unknown_peer: u64,
    /// Unkeyed datagrams from a known peer's id but another address.
    pub address_mismatch: u64,
    /// Keyed peers that moved to a new address.
    pub address_changes: u64,
    /// Datagrams from an older incarnation than already seen from that peer.
    pub stale_incarnation: u64,
    /// Fragments (or selective acks) that disagree with what is known of their message.
    pub inconsistent_fragment: u64,
    /// Fragments a peer selectively acked and later, answering a probe, said it no longer holds
    /// (they count in flight again, so `in_flight_fragments` may exceed the window by these).
    pub sack_reneged_fragments: u64,
    /// Acks beyond the highest seq ever queued to that peer (clamped).
    pub ack_beyond_sent: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Fragments declared lost from selective acks and resent without waiting for the timer.
    pub fast_retransmits: u64,
    pub hellos_sent: u64,
    pub hellos_received: u64,
    pub peer_restarts: u64,
}

impl TransportStats {
    fn count_rejected(&mut self, error: &DecodeError) {
        let m = &mut self.malformed;
        let counter = match error {
            DecodeError::AuthMode { .. } => {
                self.rejected_auth_mode += 1;
                return;
            }
            DecodeError::BadChecksum => {
                self.rejected_checksum += 1;
                return;
            }
            DecodeError::BadMac => {
                self.rejected_mac += 1;
                return;
            }
            DecodeError::TooShort { .. } => &mut m.too_short,
            DecodeError::BadMagic => &mut m.bad_magic,
            DecodeError::UnsupportedVersion(_) => &mut m.unsupported_version,
            DecodeError::UnknownKind(_) => &mut m.unknown_kind,
            DecodeError::UnknownFlags(_) => &mut m.unknown_flags,
            DecodeError::ReservedNonzero => &mut m.reserved_nonzero,
            DecodeError::ZeroSequence => &mut m.zero_sequence,
            DecodeError::MessageTooLarge { .. } => &mut m.message_too_large,
            DecodeError::FragmentCount { .. } => &mut m.fragment_count,
            DecodeError::FragmentIndex { .. } => &mut m.fragment_index,
            DecodeError::FragmentLength { .. } => &mut m.fragment_length,
            DecodeError::PayloadLength { .. } => &mut m.payload_length,
            DecodeError::SackInconsistent => &mut m.sack_inconsistent,
            DecodeError::SackBitmapLength { .. } => &mut m.sack_bitmap_length,
        };
        *counter += 1;
        self.rejected_malformed += 1;
    }
}

/// A snapshot of one peer's protocol state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub addr: SocketAddr,
    /// Highest incarnation seen from the peer, once it was heard from.
    pub incarnation_seen: Option<u64>,
    /// Next seq from the peer to hand out by `poll_message`.
    pub next_expected: u64,
    /// The cumulative ack we send: every seq from the peer up to it was durably consumed.
    pub ack_to_send: u64,
    /// Highest seq of ours the peer acknowledged.
    pub acked_by_peer: u64,
    /// Highest seq given to `send_durable` (or `acked_by_peer` when none since).
    pub highest_queued_seq: u64,
    pub unacked_messages: u64,
    pub unacked_bytes: u64,
    /// Unacknowledged messages of which at least one fragment was transmitted.
    pub transmitted_messages: u64,
    /// Fragments sent that the peer neither acked nor selectively acked.
    pub in_flight_fragments: u64,
    /// Messages buffered before delivery (out of order, partial, or not yet pulled).
    pub buffered_messages: u64,
    pub buffered_bytes: u64,
    pub srtt: Option<Duration>,
    /// The retransmission timeout now in effect (with backoff).
    pub rto: Duration,
    /// When the retransmission timer fires, if armed.
    pub timer: Option<Instant>,
}

/// Per-fragment sending state.
#[derive(Clone, Copy, Debug)]
struct FragState {
    /// When it was last sent.
    last_sent: Option<Instant>,
    /// How many times it was sent.
    sends: u32,
    /// The peer said (selectively) that it holds it.
    sacked: bool,
    /// Marked to be resent.
    resend: bool,
    /// The peer-wide transmission counter at its latest send (orders sends made at one instant).
    tx_order: u64,
}

/// One unacknowledged message (the volatile copy of a heap outbox entry).
#[derive(Debug)]
struct Outgoing {
    seq: u64,
    bytes: Vec<u8>,
    frag_count: u32,
    frags: Vec<FragState>,
    /// Fragments `0..next_new` were sent (since the last rewind); the others wait for windows.
    next_new: u32,
    /// Fragments `< next_new` that are not selectively acked.
    in_flight: u32,
    /// Fragments marked to be resent.
    resend: u32,
    /// No fragment before this index is marked to be resent.
    resend_cursor: u32,
    /// Some fragment was sent twice: no round-trip sample from this message (Karn).
    retransmitted: bool,
    /// When its last fragment was first sent.
    last_first_send: Option<Instant>,
    /// A probe was sent since the last selective ack of it: the next selective ack is believed
    /// even where it takes fragments back.
    probed: bool,
    /// Every fragment below this index is selectively acked.
    first_unsacked: u32,
}

impl Outgoing {
    fn transmitted(&self) -> bool {
        self.next_new > 0
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// One message being received (partial) or received and not yet delivered (complete).
#[derive(Debug)]
struct Incoming {
    message_len: u32,
    frag_count: u32,
    bytes: Vec<u8>,
    /// Bit i (byte i / 8, bit i % 8) = fragment i held: the selective ack's bitmap as is.
    held: Vec<u8>,
    held_count: u32,
    /// Fragments received since the last selective ack of this message was sent.
    unreported: u32,
}

impl Incoming {
    fn complete(&self) -> bool {
        self.held_count == self.frag_count
    }
    fn holds(&self, index: u32) -> bool {
        self.held[(index / 8) as usize] & (1 << (index % 8)) != 0
    }
}

#[derive(Debug)]
struct Peer {
    id: NodeId,
    addr: SocketAddr,
    incarnation_seen: Option<u64>,

    // Receiving from the peer.
    /// Next seq to hand out by poll_message; everything below was delivered (or consumed before
    /// this endpoint's life).
    next_deliver: u64,
    /// Cumulative ack we send (durably consumed).
    ack_to_send: u64,
    /// An ACK must go out (ack advanced, duplicate seen, HELLO received) unless data carries it.
    ack_needed: bool,
    /// Messages whose selective ack must go out, with their fragment count (a message delivered
    /// meanwhile is acked as held whole).
    sack_pending: BTreeMap<u64, u32>,
    /// Messages ≥ next_deliver being received or waiting to be pulled.
    incoming: BTreeMap<u64, Incoming>,
    incoming_bytes: u64,

    // Sending to the peer.
    acked_by_peer: u64,
    highest_queued: u64,
    /// Seqs `acked_by_peer + 1 ..= highest_queued`, in order.
    outbox: VecDeque<Outgoing>,
    unacked_bytes: u64,
    /// Index in `outbox` of the first message not completely sent (since the last rewind).
    send_cursor: usize,
    transmitted_messages: u32,
    transmitted_bytes: u64,
    in_flight_fragments: u64,
    resend_pending: u64,
    rtt: RttEstimator,
    timer: Option<Instant>,
    timer_registered: Option<Instant>,
    hello_pending: bool,
    /// Counts fragment sends to this peer (see `FragState::tx_order`).
    tx_counter: u64,
    /// The highest transmission orders of fragments the peer selectively acked, ascending.
    newest_sacked: [u64; FAST_RETRANSMIT_AFTER],

    in_transmit_queue: bool,
    in_deliver_queue: bool,
}

impl Peer {
    fn new(id: NodeId, addr: SocketAddr, restore: PeerRestore, config: &EndpointConfig) -> Peer {
        Peer {
            id,
            addr,
            incarnation_seen: None,
            next_deliver: restore.next_expected,
            ack_to_send: restore.next_expected - 1,
            ack_needed: false,
            sack_pending: BTreeMap::new(),
            incoming: BTreeMap::new(),
            incoming_bytes: 0,
            acked_by_peer: restore.acked_by_peer,
            highest_queued: restore.acked_by_peer,
            outbox: VecDeque::new(),
            unacked_bytes: 0,
            send_cursor: 0,
            transmitted_messages: 0,
            transmitted_bytes: 0,
            in_flight_fragments: 0,
            resend_pending: 0,
            rtt: RttEstimator::new(config.rto_initial, config.rto_min, config.rto_max),
            timer: None,
            timer_registered: None,
            hello_pending: false,
            tx_counter: 0,
            newest_sacked: [0; FAST_RETRANSMIT_AFTER],
            in_transmit_queue: false,
            in_deliver_queue: false,
        }
    }

    fn header(&self, config: &EndpointConfig) -> Header {
        Header { sender: config.node, receiver: self.id, incarnation: config.incarnation, ack: self.ack_to_send }
    }

    fn can_send_new(&self, config: &EndpointConfig) -> bool {
        let Some(msg) = self.outbox.get(self.send_cursor) else {
            return false;
        };
        if self.in_flight_fragments >= config.window_fragments as u64 {
            return false;
        }
        msg.transmitted()
            || (self.transmitted_messages < config.window_messages
                && (self.transmitted_messages == 0 || self.transmitted_bytes + msg.len() <= config.window_bytes))
    }

    fn wants_transmit(&self, config: &EndpointConfig) -> bool {
        self.hello_pending
            || self.ack_needed
            || !self.sack_pending.is_empty()
            || self.resend_pending > 0
            || self.can_send_new(config)
    }

    fn ready_to_deliver(&self) -> bool {
        // Mutation `fifo-reorder` (negative control only): deliver the first buffered message
        // whole, without waiting for the gap before it.
        let fifo = !mutations::is_on(Mutation::FifoReorder);
        self.incoming.first_key_value().is_some_and(|(&seq, m)| (seq == self.next_deliver || !fifo) && m.complete())
    }

    /// Marks fragment `frag` of `outbox[index]` to be resent.
    fn mark_resend(&mut self, index: usize, frag: u32) {
        let msg = &mut self.outbox[index];
        let f = &mut msg.frags[frag as usize];
        debug_assert!(frag < msg.next_new);
        if !f.resend {
            f.resend = true;
            msg.resend += 1;
            msg.resend_cursor = msg.resend_cursor.min(frag);
            self.resend_pending += 1;
        }
    }

    /// Forgets everything sent to the peer in this life (its reassembly state is gone): every
    /// unacked message goes out again from its first fragment, paced by the windows.
    fn rewind(&mut self) {
        for msg in self.outbox.iter_mut() {
            if msg.transmitted() {
                msg.retransmitted = true;
            }
            msg.next_new = 0;
            msg.in_flight = 0;
            msg.probed = false;
            msg.first_unsacked = 0;
            msg.resend = 0;
            msg.resend_cursor = 0;
            for f in msg.frags.iter_mut() {
                f.sacked = false;
                f.resend = false;
            }
        }
        self.send_cursor = 0;
        self.transmitted_messages = 0;
        self.transmitted_bytes = 0;
        self.in_flight_fragments = 0;
        self.resend_pending = 0;
        self.newest_sacked = [0; FAST_RETRANSMIT_AFTER];
    }

    /// The timer after progress or a send: armed while something transmitted is unacked.
    fn rearm(&mut self, now: Instant) {
        self.timer = (self.transmitted_messages > 0).then(|| now + self.rtt.rto());
    }

    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            let in_flight: u64 = self.outbox.iter().map(|m| m.in_flight as u64).sum();
            let resend: u64 = self.outbox.iter().map(|m| m.resend as u64).sum();
            let transmitted = self.outbox.iter().filter(|m| m.transmitted()).count() as u32;
            let bytes: u64 = self.outbox.iter().filter(|m| m.transmitted()).map(|m| m.len()).sum();
            debug_assert_eq!(in_flight, self.in_flight_fragments);
            debug_assert_eq!(resend, self.resend_pending);
            debug_assert_eq!(transmitted, self.transmitted_messages);
            debug_assert_eq!(bytes, self.transmitted_bytes);
            debug_assert_eq!(self.outbox.len() as u64, self.highest_queued - self.acked_by_peer);
            debug_assert!(self.outbox.front().is_none_or(|m| m.seq == self.acked_by_peer + 1));
            debug_assert!(self.ack_to_send < self.next_deliver);
            let incoming: u64 = self.incoming.values().map(|m| m.message_len as u64).sum();
            debug_assert_eq!(incoming, self.incoming_bytes);
        }
    }
}

/// The protocol's state machine for one node: all its peers, both directions.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    auth: Auth,
    /// Payload bytes per DATA fragment.
    payload_bytes_max: usize,
    /// Bitmap bytes that fit in one ACK datagram.
    sack_bitmap_bytes_max: usize,
    peers: HashMap<NodeId, Peer>,
    /// Peers that may have a datagram to send, round-robin.
    transmit_queue: VecDeque<NodeId>,
    /// Peers with a message ready to deliver, round-robin.
    deliver_queue: VecDeque<NodeId>,
    /// Every armed retransmission timer.
    timers: BTreeSet<(Instant, NodeId)>,
    events: VecDeque<Event>,
    /// Acks for addresses other than the peer's known one.
    one_off: VecDeque<Transmit>,
    stats: TransportStats,
    /// Mutation `no-duplicate-suppression` only: duplicates to hand out again. Always empty
    /// otherwise.
    mutation_redeliver: VecDeque<Message>,
}

impl Endpoint {
    /// A new endpoint (no peers yet). `now` is accepted for symmetry with the other inputs.
    pub fn new(config: EndpointConfig, _now: Instant) -> Result<Endpoint, TransportError> {
        config.validate()?;
        let auth = Auth::new(config.key.as_ref());
        let trailer = auth.trailer_bytes();
        let payload_bytes_max = config.datagram_bytes_max - DATA_HEADER_BYTES - trailer;
        // A peer with smaller datagrams may cut a message into more fragments than we would:
        // its selective ack may then exceed our datagram size (up to the UDP limit) rather than
        // be cut short, which would leave the fragments beyond the cut unacknowledged.
        let sack_bitmap_bytes_max = UDP_PAYLOAD_BYTES_MAX - ACK_HEADER_BYTES - trailer;
        Ok(Endpoint {
            config,
            auth,
            payload_bytes_max,
            sack_bitmap_bytes_max,
            peers: HashMap::new(),
            transmit_queue: VecDeque::new(),
            deliver_queue: VecDeque::new(),
            timers: BTreeSet::new(),
            events: VecDeque::new(),
            one_off: VecDeque::new(),
            stats: TransportStats::default(),
            mutation_redeliver: VecDeque::new(),
        })
    }

    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    pub fn node(&self) -> NodeId {
        self.config.node
    }

    pub fn incarnation(&self) -> u64 {
        self.config.incarnation
    }

    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Payload bytes one DATA datagram carries (the fragment size of large messages).
    pub fn fragment_payload_bytes_max(&self) -> usize {
        self.payload_bytes_max
    }

    /// Adds a peer at `addr` with its restored protocol state.
    pub fn add_peer(&mut self, id: NodeId, addr: SocketAddr, restore: PeerRestore) -> Result<(), TransportError> {
        if id == self.config.node {
            return Err(TransportError::SelfPeer { peer: id });
        }
        if self.peers.contains_key(&id) {
            return Err(TransportError::PeerExists { peer: id });
        }
        if self.peers.len() >= self.config.peers_max {
            return Err(TransportError::PeersFull { peer: id, max: self.config.peers_max });
        }
        if restore.next_expected == 0 {
            return Err(TransportError::InvalidRestore { peer: id });
        }
        self.peers.insert(id, Peer::new(id, addr, restore, &self.config));
        Ok(())
    }

    /// Sends to `id` at `addr` from now on.
    pub fn set_peer_addr(&mut self, id: NodeId, addr: SocketAddr) -> Result<(), TransportError> {
        let peer = self.peers.get_mut(&id).ok_or(TransportError::UnknownPeer { peer: id })?;
        peer.addr = addr;
        Ok(())
    }

    /// Retires a peer: drops all its volatile state (unacked copies, buffers, timer). Returns
    /// whether it was known.
    pub fn remove_peer(&mut self, id: NodeId) -> bool {
        let Some(peer) = self.peers.remove(&id) else {
            return false;
        };
        if let Some(t) = peer.timer_registered {
            self.timers.remove(&(t, id));
        }
        self.transmit_queue.retain(|&p| p != id);
        self.deliver_queue.retain(|&p| p != id);
        true
    }

    /// Every known peer, sorted.
    pub fn peers(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn peer_view(&self, id: NodeId) -> Option<PeerView> {
        let p = self.peers.get(&id)?;
        Some(PeerView {
            addr: p.addr,
            incarnation_seen: p.incarnation_seen,
            next_expected: p.next_deliver,
            ack_to_send: p.ack_to_send,
            acked_by_peer: p.acked_by_peer,
            highest_queued_seq: p.highest_queued,
            unacked_messages: p.outbox.len() as u64,
            unacked_bytes: p.unacked_bytes,
            transmitted_messages: p.transmitted_messages as u64,
            in_flight_fragments: p.in_flight_fragments,
            buffered_messages: p.incoming.len() as u64,
            buffered_bytes: p.incoming_bytes,
            srtt: p.rtt.srtt(),
            rto: p.rtt.rto(),
            timer: p.timer,
        })
    }

    /// Queues message `seq` for `peer`: call once the turn that produced it is durable, in seq
    /// order (previous + 1); after a restart, again for every unacknowledged message of the heap
    /// outbox. A seq the peer already acked is ignored. The endpoint (re)transmits it until the
    /// peer's cumulative ack covers it, then emits [`Event::Acked`].
    pub fn send_durable(
        &mut self,
        _now: Instant,
        peer: NodeId,
        seq: u64,
        bytes: impl Into<Vec<u8>>,
    ) -> Result<(), TransportError> {
        let bytes = bytes.into();
        if bytes.len() > self.config.message_bytes_max {
            return Err(TransportError::MessageTooLarge { bytes: bytes.len(), max: self.config.message_bytes_max });
        }
        let p = self.peers.get_mut(&peer).ok_or(TransportError::UnknownPeer { peer })?;
        if seq <= p.acked_by_peer {
            return Ok(());
        }
        if seq <= p.highest_queued {
            return Err(TransportError::AlreadyQueued { peer, seq, highest: p.highest_queued });
        }
        if seq != p.highest_queued + 1 {
            return Err(TransportError::SequenceGap { peer, expected: p.highest_queued + 1, got: seq });
        }
        let frag_count = wire::fragment_count_for(bytes.len() as u64, self.payload_bytes_max as u64);
        // ≤ MESSAGE_BYTES_MAX / 432 fragments.
        let frag_count = u32::try_from(frag_count).expect("fragment count fits u32");
        let fresh = FragState { last_sent: None, sends: 0, sacked: false, resend: false, tx_order: 0 };
        p.unacked_bytes += bytes.len() as u64;
        p.outbox.push_back(Outgoing {
            seq,
            bytes,
            frag_count,
            frags: vec![fresh; frag_count as usize],
            next_new: 0,
            in_flight: 0,
            resend: 0,
            resend_cursor: 0,
            retransmitted: false,
            last_first_send: None,
            probed: false,
            first_unsacked: 0,
        });
        p.highest_queued = seq;
        self.sync(peer);
        Ok(())
    }

    /// Every message from `peer` up to `seq` was consumed by durable turns: the cumulative ack we
    /// send may now cover them (and only this moves it). Acks of several calls before the next
    /// `poll_transmit` go out as one.
    pub fn consumed_durable(&mut self, _now: Instant, peer: NodeId, seq: u64) -> Result<(), TransportError> {
        let p = self.peers.get_mut(&peer).ok_or(TransportError::UnknownPeer { peer })?;
        if seq <= p.ack_to_send {
            return Ok(());
        }
        if seq >= p.next_deliver {
            return Err(TransportError::NotDelivered { peer, seq, delivered: p.next_deliver - 1 });
        }
        p.ack_to_send = seq;
        p.ack_needed = true;
        self.sync(peer);
        Ok(())
    }

    /// Tells every known peer that this node restarted (a HELLO each): they resend what we have
    /// not acknowledged at once instead of waiting for their timers.
    pub fn announce_restart(&mut self, _now: Instant) {
        // In id order: the endpoint's outputs depend only on its inputs (simulations replay).
        let ids = self.peers();
        for id in ids {
            self.peers.get_mut(&id).expect("listed").hello_pending = true;
            self.sync(id);
        }
    }

    /// The next message, in seq order per peer, round-robin across peers; each seq at most once
    /// in this endpoint's life.
    pub fn poll_message(&mut self) -> Option<Message> {
        if let Some(m) = self.mutation_redeliver.pop_front() {
            return Some(m);
        }
        while let Some(id) = self.deliver_queue.pop_front() {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            p.in_deliver_queue = false;
            if !p.ready_to_deliver() {
                continue;
            }
            let (seq, msg) = p.incoming.pop_first().expect("ready");
            debug_assert!(seq == p.next_deliver || mutations::is_on(Mutation::FifoReorder));
            p.incoming_bytes -= msg.message_len as u64;
            p.next_deliver = seq + 1;
            self.stats.messages_delivered += 1;
            self.sync(id);
            return Some(Message { peer: id, seq, bytes: msg.bytes });
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest retransmission deadline across peers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|&(t, _)| t)
    }

    /// Fires every retransmission timer due at `now`: the unacked fragments the peer does not
    /// hold (by its selective acks) are marked to be resent, oldest first, at most a fragment
    /// window; when it holds them all, the first fragment of the oldest message is resent as a
    /// probe that draws a fresh ack.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let p = self.peers.get_mut(&id).expect("timers hold known peers only");
            p.timer_registered = None;
            p.timer = None;
            if p.transmitted_messages > 0 {
                self.stats.timeouts += 1;
                p.rtt.back_off();
                let budget = self.config.window_fragments as u64;
                let mut marked = p.resend_pending;
                'messages: for index in 0..p.outbox.len() {
                    if !p.outbox[index].transmitted() {
                        break;
                    }
                    for frag in 0..p.outbox[index].next_new {
                        if marked >= budget {
                            break 'messages;
                        }
                        let f = p.outbox[index].frags[frag as usize];
                        if !f.sacked && !f.resend {
                            p.mark_resend(index, frag);
                            marked += 1;
                        }
                    }
                }
                if p.resend_pending == 0 {
                    // The peer holds every fragment sent: it has not consumed the messages
                    // durably yet, or its ack was lost, or it dropped a message after saying it
                    // held it (it was retired and added again). Resend the first fragment of the
                    // oldest as a probe: it draws a re-ack, or a selective ack that takes
                    // fragments back.
                    p.outbox[0].probed = true;
                    p.mark_resend(0, 0);
                }
                p.timer = Some(now + p.rtt.rto());
            }
            self.sync(id);
        }
    }

    /// The next datagram to send, round-robin across peers; `None` when nothing is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.one_off.pop_front() {
            self.stats.datagrams_sent += 1;
            self.stats.bytes_sent += t.bytes.len() as u64;
            self.stats.acks_sent += 1;
            return Some(t);
        }
        while let Some(id) = self.transmit_queue.pop_front() {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            p.in_transmit_queue = false;
            let transmit =
                build_transmit(p, &self.config, &self.auth, self.sack_bitmap_bytes_max, &mut self.stats, now);
            self.sync(id);
            if let Some(t) = transmit {
                self.stats.datagrams_sent += 1;
                self.stats.bytes_sent += t.bytes.len() as u64;
                return Some(t);
            }
        }
        None
    }

    /// Takes in one datagram that arrived from `from`. Anything invalid is counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let datagram = match wire::decode_with(bytes, &self.auth) {
            Ok(d) => d,
            Err(e) => {
                self.stats.count_rejected(&e);
                return;
            }
        };
        let header = *datagram.header();
        if header.receiver != self.config.node || header.sender == self.config.node {
            self.stats.wrong_receiver += 1;
            return;
        }
        if let Datagram::Data { fragment, .. } = &datagram {
            if fragment.message_len as usize > self.config.message_bytes_max {
                self.stats.malformed.message_too_large += 1;
                self.stats.rejected_malformed += 1;
                return;
            }
        }
        let id = header.sender;
        if !self.peers.contains_key(&id) {
            if !self.config.accept_unknown_peers || self.peers.len() >= self.config.peers_max {
                self.stats.unknown_peer += 1;
                return;
            }
            self.peers.insert(id, Peer::new(id, from, PeerRestore::NEW, &self.config));
            self.events.push_back(Event::NewPeer { peer: id, addr: from });
        }
        let keyed = self.auth.keyed();
        let p = self.peers.get_mut(&id).expect("present");
        let from_known_addr = from == p.addr;
        if !from_known_addr && !keyed {
            self.stats.address_mismatch += 1;
            return;
        }
        if p.incarnation_seen.is_some_and(|seen| header.incarnation < seen) {
            self.stats.stale_incarnation += 1;
            return;
        }
        let is_hello = matches!(datagram, Datagram::Hello { .. });
        if is_hello {
            self.stats.hellos_received += 1;
        }
        let restarted = match p.incarnation_seen {
            Some(seen) => header.incarnation > seen,
            None => is_hello,
        };
        p.incarnation_seen = Some(header.incarnation);
        // Whether this datagram told us anything new: only such a datagram may move a keyed peer
        // to a new address (a replayed one cannot).
        let mut fresh = restarted;
        if restarted {
            self.stats.peer_restarts += 1;
            // Its reassembly buffers and selective-ack knowledge died with it: resend all now.
            p.rewind();
            p.rtt.reset_backoff();
            p.timer = None;
            p.ack_needed = true;
            // Partly received messages may come again with another fragment layout.
            let before = p.incoming.len();
            p.incoming.retain(|_, m| m.complete());
            if p.incoming.len() != before {
                p.incoming_bytes = p.incoming.values().map(|m| m.message_len as u64).sum();
            }
            p.sack_pending.clear();
            self.events.push_back(Event::PeerRestarted { peer: id, incarnation: header.incarnation });
        } else if is_hello {
            // A duplicate HELLO: answer with our ack, nothing more.
            p.ack_needed = true;
        }
        fresh |= on_ack(p, header.ack, now, &mut self.stats, &mut self.events);
        let mut reack_here = false;
        match datagram {
            Datagram::Data { fragment, .. } => {
                let outcome = on_fragment(p, &fragment, &self.config, &mut self.stats);
                fresh |= outcome == FragmentOutcome::New;
                reack_here = outcome == FragmentOutcome::Duplicate;
                if reack_here
                    && fragment.seq < p.next_deliver
                    && fragment.frag_count == 1
                    && mutations::is_on(Mutation::NoDuplicateSuppression)
                {
                    // Mutation `no-duplicate-suppression` (negative control only): a whole
                    // message delivered already is handed out again.
                    let m = Message { peer: id, seq: fragment.seq, bytes: fragment.payload.to_vec() };
                    self.mutation_redeliver.push_back(m);
                }
            }
            Datagram::Ack { sack: Some(sack), .. } => fresh |= on_sack(p, &sack, now, &mut self.stats),
            Datagram::Ack { sack: None, .. } | Datagram::Hello { .. } => {}
        }
        if !from_known_addr {
            if fresh {
                p.addr = from;
                self.stats.address_changes += 1;
                self.events.push_back(Event::PeerAddressChanged { peer: id, addr: from });
            } else if reack_here && self.one_off.len() < ONE_OFF_TRANSMITS_MAX {
                // Old news from another address: a replay, or the peer moved and only resends
                // what we hold. Answer there (the ack is smaller than the DATA that drew it, so
                // this amplifies nothing) but keep sending to the known address.
                let mut bytes = Vec::with_capacity(ACK_HEADER_BYTES + self.auth.trailer_bytes());
                wire::encode_with(
                    &Datagram::Ack { header: p.header(&self.config), sack: None },
                    &self.auth,
                    &mut bytes,
                );
                self.one_off.push_back(Transmit { dest: from, bytes });
            }
        }
        p.check_invariants();
        self.sync(id);
    }

    /// After any change to a peer: registers its timer and queues it for transmit/delivery.
    fn sync(&mut self, id: NodeId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.timer != p.timer_registered {
            if let Some(t) = p.timer_registered {
                self.timers.remove(&(t, id));
            }
            if let Some(t) = p.timer {
                self.timers.insert((t, id));
            }
            p.timer_registered = p.timer;
        }
        if !p.in_transmit_queue && p.wants_transmit(&self.config) {
            p.in_transmit_queue = true;
            self.transmit_queue.push_back(id);
        }
        if !p.in_deliver_queue && p.ready_to_deliver() {
            p.in_deliver_queue = true;
            self.deliver_queue.push_back(id);
        }
        p.check_invariants();
    }
}

/// Applies the peer's cumulative ack of our messages. Returns whether it covered anything new.
fn on_ack(p: &mut Peer, ack: u64, now: Instant, stats: &mut TransportStats, events: &mut VecDeque<Event>) -> bool {
    if ack <= p.acked_by_peer {
        return false;
    }
    let mut ack = ack;
    if ack > p.highest_queued {
        // A protocol violation (or a peer whose heap was replaced): never free what we were not
        // given, never panic.
        stats.ack_beyond_sent += 1;
        ack = p.highest_queued;
        if ack <= p.acked_by_peer {
            return false;
        }
    }
    let mut sample = None;
    while p.outbox.front().is_some_and(|m| m.seq <= ack) {
        let m = p.outbox.pop_front().expect("front");
        if m.transmitted() {
            p.transmitted_messages -= 1;
            p.transmitted_bytes -= m.len();
        }
        p.in_flight_fragments -= m.in_flight as u64;
        p.resend_pending -= m.resend as u64;
        p.unacked_bytes -= m.len();
        // The popped message was either fully sent (before the cursor) or is the cursor's.
        p.send_cursor = p.send_cursor.saturating_sub(1);
        if !m.retransmitted && m.next_new == m.frag_count {
            if let Some(t) = m.last_first_send {
                sample = Some(now.saturating_duration_since(t));
            }
        }
    }
    p.acked_by_peer = ack;
    events.push_back(Event::Acked { peer: p.id, seq: ack });
    if let Some(rtt) = sample {
        p.rtt.sample(rtt);
    }
    p.rtt.reset_backoff();
    p.rearm(now);
    true
}

/// Applies a selective ack of one of our messages. Returns whether it marked anything new.
fn on_sack(p: &mut Peer, sack: &Sack<'_>, now: Instant, stats: &mut TransportStats) -> bool {
    if sack.seq <= p.acked_by_peer {
        return false; // Stale: that message is gone.
    }
    if sack.seq > p.highest_queued {
        stats.ack_beyond_sent += 1;
        return false;
    }
    let index = (sack.seq - p.acked_by_peer - 1) as usize;
    let msg = &mut p.outbox[index];
    debug_assert_eq!(msg.seq, sack.seq);
    if sack.frag_count > msg.frag_count {
        stats.inconsistent_fragment += 1;
        return false;
    }
    let mut progress = false;
    let mut newest_single_send: Option<Instant> = None;
    for i in 0..sack.frag_count.min(msg.next_new) {
        let f = &mut msg.frags[i as usize];
        let held = sack.holds(i);
        if held && !f.sacked {
            f.sacked = true;
            msg.in_flight -= 1;
            p.in_flight_fragments -= 1;
            if f.resend {
                f.resend = false;
                msg.resend -= 1;
                p.resend_pending -= 1;
            }
            progress = true;
            if f.sends == 1 {
                newest_single_send = newest_single_send.max(f.last_sent);
            }
            if f.tx_order > p.newest_sacked[0] {
                p.newest_sacked[0] = f.tx_order;
                p.newest_sacked.sort_unstable();
            }
        } else if !held && f.sacked && msg.probed {
            // The peer no longer holds it (it evicted the message to make room for a lower seq):
            // count it in flight again; the timer resends it. Without a probe outstanding, a
            // selective ack that takes fragments back is an older one overtaken in the network,
            // and is not believed.
            f.sacked = false;
            msg.in_flight += 1;
            p.in_flight_fragments += 1;
            msg.first_unsacked = msg.first_unsacked.min(i);
            stats.sack_reneged_fragments += 1;
        }
    }
    while msg.first_unsacked < msg.next_new && msg.frags[msg.first_unsacked as usize].sacked {
        msg.first_unsacked += 1;
    }
    msg.probed = false;
    if progress {
        if let Some(t) = newest_single_send {
            p.rtt.sample(now.saturating_duration_since(t));
        }
        p.rtt.reset_backoff();
        p.rearm(now);
    }
    detect_losses(p, now, stats);
    progress
}

/// Loss detection without waiting for the timer (after RFC 6675 and RACK, RFC 8985), on every
/// selective ack: a fragment the peer does not hold, though it holds at least
/// [`FAST_RETRANSMIT_AFTER`] fragments sent after it (of any message), and that was sent longer
/// ago than a round trip plus a reordering allowance (2 RTTVAR), was lost: it is marked to be
/// resent now. Resent, it gets a new transmission order and time, so it is not declared lost
/// again before as many of its successors arrive after it and another round trip passed. The
/// allowance keeps reordering in the network from passing for loss; the timer remains the
/// backstop (a lost last fragment has no successors).
fn detect_losses(p: &mut Peer, now: Instant, stats: &mut TransportStats) {
    let Some(srtt) = p.rtt.srtt() else { return };
    let overdue = srtt + p.rtt.rttvar() * 2;
    // Held fragments of messages acked since still count: what was sent before them and is not
    // held is just as overdue.
    let threshold = p.newest_sacked[0];
    if threshold == 0 {
        return;
    }
    for index in 0..p.outbox.len() {
        if !p.outbox[index].transmitted() {
            break;
        }
        if p.outbox[index].in_flight == 0 {
            continue;
        }
        for frag in p.outbox[index].first_unsacked..p.outbox[index].next_new {
            let f = p.outbox[index].frags[frag as usize];
            let overdue = f.last_sent.is_some_and(|t| now.saturating_duration_since(t) >= overdue);
            if !f.sacked && !f.resend && f.tx_order < threshold && overdue {
                stats.fast_retransmits += 1;
                p.mark_resend(index, frag);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FragmentOutcome {
    /// Stored: something we did not hold.
    New,
    /// Already held or delivered: a re-ack is due.
    Duplicate,
    /// Dropped (buffer full, inconsistent).
    Dropped,
}

/// Takes in one fragment from the peer.
fn on_fragment(
    p: &mut Peer,
    frag: &Fragment<'_>,
    config: &EndpointConfig,
    stats: &mut TransportStats,
) -> FragmentOutcome {
    let seq = frag.seq;
    if seq < p.next_deliver {
        // Delivered already (maybe consumed and acked, and the ack was lost): re-ack, and say
        // that we hold it whole, so that the sender stops resending its fragments while the
        // consuming turn is not durable yet.
        stats.duplicates_dropped += 1;
        p.ack_needed = true;
        if frag.frag_count > 1 && seq > p.ack_to_send {
            p.sack_pending.insert(seq, frag.frag_count);
        }
        return FragmentOutcome::Duplicate;
    }
    if !p.incoming.contains_key(&seq) {
        let need = frag.message_len as u64;
        // The message that lets delivery progress is always admitted, beyond the bounds if
        // need be (by one message): never evicting what we hold keeps every selective ack true.
        let full = p.incoming.len() >= config.reorder_messages_max as usize
            || p.incoming_bytes + need > config.reorder_bytes_max;
        if full && seq != p.next_deliver {
            stats.buffer_full_dropped += 1;
            return FragmentOutcome::Dropped;
        }
        // Out of order: the previous message is neither delivered nor (partly) buffered.
        if seq > p.next_deliver && !p.incoming.contains_key(&(seq - 1)) {
            stats.out_of_order_buffered += 1;
        }
        p.incoming.insert(
            seq,
            Incoming {
                message_len: frag.message_len,
                frag_count: frag.frag_count,
                bytes: vec![0; frag.message_len as usize],
                held: vec![0; (frag.frag_count as usize).div_ceil(8)],
                held_count: 0,
                unreported: 0,
            },
        );
        p.incoming_bytes += need;
    }
    let m = p.incoming.get_mut(&seq).expect("present");
    if m.message_len != frag.message_len || m.frag_count != frag.frag_count {
        if m.complete() && m.message_len == frag.message_len {
            // The sender restarted with another datagram size and resends a message we hold
            // whole: the same durable bytes, cut differently. A duplicate.
            stats.duplicates_dropped += 1;
            p.ack_needed = true;
            return FragmentOutcome::Duplicate;
        }
        stats.inconsistent_fragment += 1;
        return FragmentOutcome::Dropped;
    }
    if m.holds(frag.frag_index) {
        stats.duplicates_dropped += 1;
        // The sender resent it: tell it what we hold (and where the ack stands).
        p.sack_pending.insert(seq, m.frag_count);
        p.ack_needed = true;
        return FragmentOutcome::Duplicate;
    }
    let range = wire::fragment_range(m.message_len as u64, m.frag_count as u64, frag.frag_index as u64);
    // The decoder checked the payload length against the layout.
    m.bytes[range].copy_from_slice(frag.payload);
    m.held[(frag.frag_index / 8) as usize] |= 1 << (frag.frag_index % 8);
    m.held_count += 1;
    m.unreported += 1;
    let complete = m.complete();
    let frag_count = m.frag_count;
    let sack = if frag_count > 1 {
        complete || m.unreported >= SACK_EVERY_FRAGMENTS || frag.frag_index == frag_count - 1
    } else {
        // A whole message that cannot be delivered yet because an earlier one is missing: say
        // we hold it, so that a timeout resends only the missing one.
        // (Counted over the buffer, which is bounded, never over the seq range, which is not.)
        let held_before = p.incoming.range(p.next_deliver..seq).filter(|(_, m)| m.complete()).count() as u64;
        held_before != seq - p.next_deliver
    };
    if sack {
        p.sack_pending.insert(seq, frag_count);
    }
    FragmentOutcome::New
}

/// Builds the peer's next datagram, if any: HELLO, then selective acks, then resent fragments,
/// then new fragments (within the windows), then a bare ACK. Every datagram carries the ack.
fn build_transmit(
    p: &mut Peer,
    config: &EndpointConfig,
    auth: &Auth,
    sack_bitmap_bytes_max: usize,
    stats: &mut TransportStats,
    now: Instant,
) -> Option<Transmit> {
    let mut out = Vec::with_capacity(config.datagram_bytes_max);
    let header = p.header(config);
    if p.hello_pending {
        p.hello_pending = false;
        p.ack_needed = false;
        stats.hellos_sent += 1;
        wire::encode_with(&Datagram::Hello { header }, auth, &mut out);
        return Some(Transmit { dest: p.addr, bytes: out });
    }
    while let Some((seq, frag_count)) = p.sack_pending.pop_first() {
        let full;
        let (cover, bitmap) = if let Some(m) = p.incoming.get_mut(&seq) {
            m.unreported = 0;
            let cover = (m.frag_count as usize).min(sack_bitmap_bytes_max * 8);
            (cover, &m.held[..cover.div_ceil(8)])
        } else if seq < p.next_deliver {
            // Delivered: held whole.
            let cover = (frag_count as usize).min(sack_bitmap_bytes_max * 8);
            full = full_bitmap(cover);
            (cover, &full[..])
        } else {
            continue; // Evicted meanwhile.
        };
        let sack = Sack { seq, frag_count: cover as u32, bitmap };
        wire::encode_with(&Datagram::Ack { header, sack: Some(sack) }, auth, &mut out);
        p.ack_needed = false;
        stats.acks_sent += 1;
        stats.sacks_sent += 1;
        return Some(Transmit { dest: p.addr, bytes: out });
    }
    if p.resend_pending > 0 {
        let index = p.outbox.iter().position(|m| m.resend > 0).expect("resend_pending counts marks");
        let m = &mut p.outbox[index];
        let frag = (m.resend_cursor..m.next_new).find(|&i| m.frags[i as usize].resend).expect("resend counts marks");
        let f = &mut m.frags[frag as usize];
        f.resend = false;
        f.sends = f.sends.saturating_add(1);
        f.last_sent = Some(now);
        p.tx_counter += 1;
        f.tx_order = p.tx_counter;
        m.resend -= 1;
        m.resend_cursor = frag + 1;
        p.resend_pending -= 1;
        if !m.retransmitted {
            m.retransmitted = true;
            stats.messages_retransmitted += 1;
        }
        stats.fragments_retransmitted += 1;
        encode_fragment(m, frag, header, auth, &mut out);
        stats.fragments_sent += 1;
        p.ack_needed = false;
        if p.timer.is_none() {
            p.timer = Some(now + p.rtt.rto());
        }
        return Some(Transmit { dest: p.addr, bytes: out });
    }
    if p.can_send_new(config) {
        let m = &mut p.outbox[p.send_cursor];
        if !m.transmitted() {
            p.transmitted_messages += 1;
            p.transmitted_bytes += m.len();
        }
        let frag = m.next_new;
        m.next_new += 1;
        m.in_flight += 1;
        p.in_flight_fragments += 1;
        let f = &mut m.frags[frag as usize];
        if f.sends > 0 {
            // Sent before a rewind (the peer restarted).
            stats.fragments_retransmitted += 1;
            if !m.retransmitted {
                m.retransmitted = true;
                stats.messages_retransmitted += 1;
            }
        }
        f.sends = f.sends.saturating_add(1);
        f.last_sent = Some(now);
        p.tx_counter += 1;
        f.tx_order = p.tx_counter;
        if m.next_new == m.frag_count {
            m.last_first_send = Some(now);
            p.send_cursor += 1;
        }
        encode_fragment(m, frag, header, auth, &mut out);
        stats.fragments_sent += 1;
        p.ack_needed = false;
        if p.timer.is_none() {
            p.timer = Some(now + p.rtt.rto());
        }
        return Some(Transmit { dest: p.addr, bytes: out });
    }
    if p.ack_needed {
        p.ack_needed = false;
        stats.acks_sent += 1;
        wire::encode_with(&Datagram::Ack { header, sack: None }, auth, &mut out);
        return Some(Transmit { dest: p.addr, bytes: out });
    }
    None
}

/// A bitmap with bits `0..count` set (padding bits clear).
fn full_bitmap(count: usize) -> Vec<u8> {
    let mut v = vec![0xff; count.div_ceil(8)];
    if count & 7 != 0 {
        *v.last_mut().expect("count > 0") = (1u8 << (count % 8)) - 1;
    }
    v
}

fn encode_fragment(m: &Outgoing, frag: u32, header: Header, auth: &Auth, out: &mut Vec<u8>) {
    let range = wire::fragment_range(m.len(), m.frag_count as u64, frag as u64);
    let fragment = Fragment {
        seq: m.seq,
        message_len: m.bytes.len() as u32,
        frag_index: frag,
        frag_count: m.frag_count,
        payload: &m.bytes[range],
    };
    wire::encode_with(&Datagram::Data { header, fragment }, auth, out);
}
