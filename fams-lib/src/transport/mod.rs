//! # fams::transport — reliable, exactly-once, pairwise-FIFO messages between fams nodes
//!
//! This module is the protocol, as a sans-IO state machine ([`Endpoint`]): it takes datagrams,
//! the time, and the turn manager's "this is durable" calls, and yields datagrams to send,
//! messages to deliver, events, and the next timer deadline. It opens no socket, reads no clock
//! and starts no thread; production drives it with a UDP socket and a real clock, tests with a
//! simulated network and a fake clock (quinn-proto is the model for this split).
//!
//! ## What it guarantees, and who does which part
//!
//! Exactly-once, pairwise-FIFO processing of messages across crashes of either side is a
//! property of the transport *and* the turn manager together. The turn manager keeps, per peer,
//! in the persistent heap and committed with each turn: the next seq to send, the outbox of
//! messages not yet acknowledged, the highest seq the peer acknowledged, and the next seq
//! expected from the peer (one past the last one a durable turn consumed). The endpoint keeps
//! only volatile state, rebuilt after a restart from those values ([`PeerRestore`] and one
//! [`Endpoint::send_durable`] per outbox entry).
//!
//! - **Sending.** A message enters the endpoint only once the turn that produced it is durable
//!   ([`Endpoint::send_durable`]): nothing that could be rolled back ever leaves the process
//!   (no orphan messages). Messages to one peer carry consecutive sequence numbers from 1. The
//!   endpoint keeps a copy and transmits it until the peer's cumulative ack covers it, then
//!   frees it and emits [`Event::Acked`]; the turn manager frees its heap copy in a later turn.
//! - **Receiving.** Fragments are reassembled and messages handed out in seq order
//!   ([`Endpoint::poll_message`]), each seq at most once in the endpoint's life. A seq below the
//!   next one to deliver is a duplicate: dropped, and answered with an ack (the previous ack may
//!   have been lost). Messages that arrive early are buffered, within bounds, instead of being
//!   dropped as Ken did; past the bounds, arriving data is dropped and the sender resends it.
//! - **Acks mean "consumed durably", never "received".** The cumulative ack we send to a peer
//!   moves only when the turn manager calls [`Endpoint::consumed_durable`], i.e. when the turns
//!   that consumed those messages are durable. This is the output-commit rule applied to acks:
//!   once a sender frees a message because of our ack, no crash of ours can make us need it
//!   again. The converse case is safe too: if we crash after delivering a message but before the
//!   consuming turn was durable, our ack never covered it, so the sender still holds it and
//!   resends it to our next incarnation, whose restored `next_expected` asks for exactly it.
//! - **Duplicates across restarts.** After a restart the receiver's `next_expected` comes from
//!   the heap, so a message consumed by a durable turn is a duplicate forever, and a message
//!   delivered to a turn that did not become durable is delivered again — exactly once in the
//!   durable history. The sender, restarted, resends everything its heap outbox holds; what the
//!   peer already consumed is dropped as a duplicate and re-acked.
//!
//! ## Datagrams, fragments, windows
//!
//! The datagram format is in [`wire`]. A message longer than one datagram's payload is cut into
//! fragments of equal size (the last one shorter). The receiver reassembles them in a volatile
//! buffer and tells the sender which fragments it holds with selective acks (SACK: a bitmap for
//! one message per ACK datagram): after every [`SACK_EVERY_FRAGMENTS`] new fragments, on the
//! last fragment, on completion, and on a duplicate fragment (even of a message already
//! delivered: the duplicate carries the fragment count, so the receiver can say "held whole"
//! without remembering anything). A whole message that arrives while an earlier one is missing
//! is selectively acked too (as one fragment of one), so that a lost message costs one
//! retransmission, not the window behind it. The sender resends only what is missing.
//! Selective acks are volatile knowledge: when the receiver restarts (a higher incarnation), the
//! sender forgets them and sends every unacked message again from its first fragment. The
//! configuration makes sure the bitmap of the largest message fits in one datagram (4 MiB
//! messages need datagrams of at least 801 bytes, keyed).
//!
//! Three windows per peer bound what is sent ahead of acks: `window_messages` transmitted
//! unacked messages, `window_bytes` of them (one message always goes, however large), and
//! `window_fragments` fragments sent but neither acked nor selectively acked (which paces a
//! large message by the receiver's selective acks). The receiver bounds its buffer per peer by
//! `reorder_messages_max` and `reorder_bytes_max`, counting in-order messages not yet pulled, so
//! a turn manager that stops pulling stops the sender too (its windows fill, its retransmissions
//! are dropped). Past the bounds, arriving data is dropped — except the message that lets
//! delivery progress (the next seq to deliver), which is always admitted, so the bounds may be
//! exceeded by that one message. Nothing held is ever evicted, so a selective ack stays true
//! for the receiver's whole life.
//!
//! ## Retransmission
//!
//! One timer per peer, armed while transmitted messages are unacked. Its timeout comes from the
//! measured round trip ([`rto`]): samples are taken from acks and selective acks of data sent
//! exactly once (Karn). A round trip measured from an ack includes the peer's commit, which is
//! what the timer must wait for. On expiry the unacked fragments the peer does not hold are
//! resent, oldest first, at most a fragment window, and the timeout doubles (up to `rto_max`);
//! if the peer holds everything sent (it has not consumed it durably yet, or its ack was lost),
//! the first fragment of the oldest message is resent as a probe that draws a re-ack. Any
//! progress resets the backoff.
//!
//! Most losses are repaired before the timer fires: a fragment the peer does not hold while it
//! holds [`FAST_RETRANSMIT_AFTER`](endpoint::FAST_RETRANSMIT_AFTER) fragments sent after it,
//! and sent more than a round trip plus a reordering allowance ago, is resent at once (selective
//! acks after RFC 6675, the time test after RACK, RFC 8985).
//!
//! A selective ack is never taken back by a live receiver, but a peer that was retired and added
//! again (`remove_peer`, `add_peer`) without restarting has forgotten what it held; the answer to
//! a probe is therefore believed even where it says fewer fragments are held. Any other
//! selective ack only adds: an older one overtaken in the network must not undo a newer one.
//!
//! ## Restarts and incarnations
//!
//! Every endpoint has an incarnation, bumped by the turn manager at every open and carried in
//! every datagram. [`Endpoint::announce_restart`] sends a HELLO to every peer. A peer that sees a
//! HELLO, or any datagram of a higher incarnation than it knew, resends everything unacked at
//! once (no waiting for a timer: this is what makes a restart cost milliseconds, not Ken's
//! 250 ms), resets its backoff, sends its ack and emits [`Event::PeerRestarted`]. It also drops
//! partly reassembled messages from that peer, which may come again with another fragment size.
//! A datagram of an older incarnation than known is dropped (`stale_incarnation`).
//!
//! ## Identity, authentication, replay
//!
//! A peer is its [`NodeId`], carried in every datagram with the receiver's id; a datagram for
//! another id is dropped. Without a key, a datagram from a known peer's id must come from its
//! known address (as in Ken), and the CRC32C trailer only catches corruption. With a shared key
//! (`EndpointConfig::key`) every datagram carries a truncated HMAC-SHA256 ([`auth`]); unkeyed or
//! badly keyed datagrams are dropped, and a peer may change address (behind a NAT): the endpoint
//! follows it when an authenticated datagram from the new address carries news (new data, an ack
//! or selective ack that advances, a higher incarnation). A datagram that carries only old news
//! does not move the peer — so replaying a captured datagram from elsewhere cannot divert our
//! traffic — but a duplicate DATA from a new address is answered there with one ack, so a peer
//! that moved while only retransmitting still learns our ack.
//!
//! Replay cannot cause a duplicate delivery or a false ack: a replayed DATA is for a seq either
//! already delivered in this life (below `next_expected`: dropped as a duplicate) or one we have
//! not delivered yet, whose content is the one durable message with that seq (the sender sends a
//! message only once it is durable, and its bytes never change), so delivering it is exactly the
//! delivery the protocol owed. A replayed ack repeats an ack the peer really sent, which covers
//! only messages it durably consumed — acks never move backwards and are never larger than what
//! was consumed, however old. A replayed datagram of an earlier incarnation of the peer is
//! dropped as stale; a replayed HELLO of the current incarnation only draws an ack.
//!
//! ## Limits
//!
//! Messages ≤ [`MESSAGE_BYTES_MAX`] (4 MiB, `message_bytes_max` may lower it); `peers_max` peers
//! (default 1,024); per peer, the windows above on the sending side (the endpoint keeps every
//! unacked message given to it: the turn manager's outbox bounds that) and the reorder bounds on
//! the receiving side, so the receiving memory is at most `peers_max × (reorder_bytes_max +
//! message_bytes_max)`; selective acks of one message per ACK datagram. The event queue is not
//! bounded: drain [`Endpoint::poll_event`] in every turn of the event loop.
//!
//! ## Using it
//!
//! At open: [`Endpoint::new`] with the incarnation just bumped in the heap; `add_peer` for every
//! peer the heap knows, with its [`PeerRestore`]; `send_durable` for every message of the heap
//! outbox, in seq order (before handling any datagram, so that an ack from the peer finds them);
//! `announce_restart`. Then loop: feed datagrams (`handle_datagram`) and expiries
//! (`handle_timeout`, at `poll_timeout`); pull messages (`poll_message`) into turns; when turns
//! are durable, `consumed_durable` for what they consumed and `send_durable` for what they sent;
//! react to events (`poll_event`: free acked messages from the heap outbox, …); send everything
//! `poll_transmit` yields. The endpoint is deterministic: the same inputs give the same outputs.

pub mod auth;
pub mod endpoint;
pub mod rto;
pub mod wire;

pub use auth::Key;
pub use endpoint::{
    Endpoint, EndpointConfig, Event, MalformedStats, Message, PeerRestore, PeerView, Transmit, TransportError,
    TransportStats, SACK_EVERY_FRAGMENTS,
};
pub use wire::{decode, DecodeError, MESSAGE_BYTES_MAX};

/// A node's identity: stable across restarts and address changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests;
