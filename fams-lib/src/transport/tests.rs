//! Unit tests of the transport: the wire format alone, the RTO estimator alone, and endpoints
//! driven through a small deterministic network with a fake clock (and once over real UDP).

use super::auth::{Auth, Key};
use super::endpoint::{PeerRestore, Transmit};
use super::rto::RttEstimator;
use super::wire::{self, Datagram, Fragment, Header, Sack};
use super::*;
use crate::sim::SimRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// A deterministic network and clock.

fn addr(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn node_addr(i: usize) -> SocketAddr {
    addr(20_000 + i as u16)
}

/// The content of message `seq` from `from` to `to`: deterministic, so the receiver can check it.
fn content(from: NodeId, to: NodeId, seq: u64, len: usize) -> Vec<u8> {
    let mut rng = SimRng::new(from.0 * 1_000_003 + to.0 * 7_919 + seq);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

struct InFlight {
    at: Instant,
    order: u64,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// What the network does to datagrams (per mille, and delays).
#[derive(Clone, Copy, Debug)]
struct NetProfile {
    loss_permille: u64,
    dup_permille: u64,
    /// Datagrams that get `jitter_max` extra delay (so they overtake each other).
    reorder_permille: u64,
    delay_min: Duration,
    delay_max: Duration,
    jitter_max: Duration,
}

impl NetProfile {
    fn perfect() -> NetProfile {
        NetProfile {
            loss_permille: 0,
            dup_permille: 0,
            reorder_permille: 0,
            delay_min: Duration::from_millis(1),
            delay_max: Duration::from_millis(1),
            jitter_max: Duration::ZERO,
        }
    }
    fn hostile() -> NetProfile {
        NetProfile {
            loss_permille: 300,
            dup_permille: 100,
            reorder_permille: 100,
            delay_min: Duration::from_micros(200),
            delay_max: Duration::from_millis(3),
            jitter_max: Duration::from_millis(10),
        }
    }
}

type DropRule = Box<dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> bool>;

struct SimNode {
    ep: Endpoint,
    addr: SocketAddr,
    received: Vec<Message>,
    events: Vec<Event>,
    /// None: never report consumption (the turn manager withholds consumed_durable).
    commit_delay: Option<Duration>,
    pending_consume: VecDeque<(Instant, NodeId, u64)>,
    /// Datagrams this node sent, decoded (when recording).
    sent_log: Vec<(Instant, Vec<u8>)>,
    record: bool,
}

struct World {
    now: Instant,
    rng: SimRng,
    net: NetProfile,
    queue: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    drop_rule: Option<DropRule>,
    datagrams_moved: u64,
    datagrams_lost: u64,
}

impl World {
    fn new(seed: u64, net: NetProfile) -> World {
        World {
            now: Instant::now(),
            rng: SimRng::new(seed),
            net,
            queue: BinaryHeap::new(),
            order: 0,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            drop_rule: None,
            datagrams_moved: 0,
            datagrams_lost: 0,
        }
    }

    /// Adds an endpoint at `node_addr(index)`; returns its index.
    fn add(&mut self, config: EndpointConfig) -> usize {
        let i = self.nodes.len();
        let ep = Endpoint::new(config, self.now).expect("valid config");
        self.by_addr.insert(node_addr(i), i);
        self.nodes.push(SimNode {
            ep,
            addr: node_addr(i),
            received: Vec::new(),
            events: Vec::new(),
            commit_delay: Some(Duration::ZERO),
            pending_consume: VecDeque::new(),
            sent_log: Vec::new(),
            record: false,
        });
        i
    }

    /// Makes every pair of nodes peers of each other (new peers).
    fn mesh(&mut self) {
        let ids: Vec<(NodeId, SocketAddr)> = self.nodes.iter().map(|n| (n.ep.node(), n.addr)).collect();
        for n in self.nodes.iter_mut() {
            for &(id, a) in &ids {
                if id != n.ep.node() {
                    n.ep.add_peer(id, a, PeerRestore::NEW).unwrap();
                }
            }
        }
    }

    fn id(&self, i: usize) -> NodeId {
        self.nodes[i].ep.node()
    }

    fn send_datagram(&mut self, from: SocketAddr, t: Transmit) {
        if let Some(rule) = self.drop_rule.as_mut() {
            if rule(from, t.dest, &t.bytes) {
                self.datagrams_lost += 1;
                return;
            }
        }
        if self.rng.below(1000) < self.net.loss_permille {
            self.datagrams_lost += 1;
            return;
        }
        let copies = if self.rng.below(1000) < self.net.dup_permille { 2 } else { 1 };
        for _ in 0..copies {
            let spread = (self.net.delay_max - self.net.delay_min).as_nanos() as u64;
            let mut delay = self.net.delay_min + Duration::from_nanos(self.rng.below(spread + 1));
            if self.rng.below(1000) < self.net.reorder_permille {
                delay += Duration::from_nanos(self.rng.below(self.net.jitter_max.as_nanos() as u64 + 1));
            }
            self.order += 1;
            self.queue.push(Reverse(InFlight {
                at: self.now + delay,
                order: self.order,
                from,
                to: t.dest,
                bytes: t.bytes.clone(),
            }));
        }
    }

    /// Lets every node do what it can at `now`: deliver, consume, report events, transmit.
    fn pump(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            while let Some(m) = n.ep.poll_message() {
                if let Some(d) = n.commit_delay {
                    n.pending_consume.push_back((now + d, m.peer, m.seq));
                }
                n.received.push(m);
            }
            while n.pending_consume.front().is_some_and(|&(at, _, _)| at <= now) {
                let (_, peer, seq) = n.pending_consume.pop_front().unwrap();
                // The peer may have been removed in the meantime.
                let _ = n.ep.consumed_durable(now, peer, seq);
            }
            while let Some(e) = n.ep.poll_event() {
                n.events.push(e);
            }
            let from = n.addr;
            let mut out = Vec::new();
            while let Some(t) = n.ep.poll_transmit(now) {
                out.push(t);
            }
            if n.record {
                n.sent_log.extend(out.iter().map(|t| (now, t.bytes.clone())));
            }
            for t in out {
                self.send_datagram(from, t);
            }
        }
    }

    /// Moves the clock to the next thing that happens and makes it happen. False when nothing
    /// is pending anywhere.
    fn advance(&mut self) -> bool {
        let mut next: Option<Instant> = self.queue.peek().map(|Reverse(f)| f.at);
        for n in &self.nodes {
            for t in [n.ep.poll_timeout(), n.pending_consume.front().map(|&(at, _, _)| at)].into_iter().flatten() {
                next = Some(next.map_or(t, |x| x.min(t)));
            }
        }
        let Some(next) = next else { return false };
        self.now = self.now.max(next);
        while self.queue.peek().is_some_and(|Reverse(f)| f.at <= self.now) {
            let Reverse(f) = self.queue.pop().unwrap();
            self.datagrams_moved += 1;
            if let Some(&i) = self.by_addr.get(&f.to) {
                self.nodes[i].ep.handle_datagram(self.now, f.from, &f.bytes);
            }
        }
        let now = self.now;
        for n in self.nodes.iter_mut() {
            n.ep.handle_timeout(now);
        }
        true
    }

    /// Pumps and advances until `done` holds (checked after each pump) or `limit` of simulated
    /// time passes. Returns whether `done` held.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            if self.now > end || !self.advance() {
                return done(self);
            }
        }
    }

    /// Runs for `span` of simulated time.
    fn run_for(&mut self, span: Duration) {
        let end = self.now + span;
        loop {
            self.pump();
            let next = self.queue.peek().map(|Reverse(f)| f.at);
            let timers = self.nodes.iter().filter_map(|n| n.ep.poll_timeout()).min();
            let next = [next, timers].into_iter().flatten().min();
            match next {
                Some(t) if t <= end => {
                    self.advance();
                }
                _ => {
                    self.now = end;
                    self.pump();
                    return;
                }
            }
        }
    }

    fn acked(&self, i: usize) -> BTreeMap<NodeId, u64> {
        let mut m = BTreeMap::new();
        for e in &self.nodes[i].events {
            if let Event::Acked { peer, seq } = e {
                let v = m.entry(*peer).or_insert(0);
                assert!(*seq > *v, "acks move forward");
                *v = *seq;
            }
        }
        m
    }
}

fn config(node: u64) -> EndpointConfig {
    EndpointConfig::new(NodeId(node), 1)
}

/// Checks that `received` holds, per sender, exactly seqs 1..=n in order with the right content.
fn check_exactly_once_fifo(to: NodeId, received: &[Message], sizes: &HashMap<(NodeId, NodeId, u64), usize>) {
    let mut next: HashMap<NodeId, u64> = HashMap::new();
    for m in received {
        let n = next.entry(m.peer).or_insert(1);
        assert_eq!(m.seq, *n, "message from {} to {to}: FIFO and exactly once", m.peer);
        let len = sizes[&(m.peer, to, m.seq)];
        assert!(m.bytes == content(m.peer, to, m.seq, len), "content of {}→{to} seq {}", m.peer, m.seq);
        *n += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format.

fn header(sender: u64, receiver: u64) -> Header {
    Header { sender: NodeId(sender), receiver: NodeId(receiver), incarnation: 1, ack: 0 }
}

/// Builds a datagram field by field (no validation), then seals it, for malformed-input tests:
/// from node 1 to node 2, incarnation 1, ack 0.
fn raw(kind: u8, flags: u8, fields: &[u8], key: Option<&Key>) -> Vec<u8> {
    raw_from(kind, flags, RawHeader { sender: 1, receiver: 2, incarnation: 1, ack: 0 }, fields, key)
}

#[derive(Clone, Copy)]
struct RawHeader {
    sender: u64,
    receiver: u64,
    incarnation: u64,
    ack: u64,
}

fn raw_from(kind: u8, flags: u8, h: RawHeader, fields: &[u8], key: Option<&Key>) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"FT");
    v.push(1);
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&[0; 3]);
    v.extend_from_slice(&h.sender.to_le_bytes());
    v.extend_from_slice(&h.receiver.to_le_bytes());
    v.extend_from_slice(&h.incarnation.to_le_bytes());
    v.extend_from_slice(&h.ack.to_le_bytes());
    v.extend_from_slice(fields);
    Auth::new(key).seal(&mut v);
    v
}

/// A DATA datagram of a whole one-fragment message.
fn raw_data(h: RawHeader, seq: u64, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    raw_from(wire::KIND_DATA, 0, h, &data_fields(seq, n, 0, 1, n, payload), None)
}

fn reseal(mut v: Vec<u8>) -> Vec<u8> {
    let n = v.len() - 4;
    v.truncate(n);
    Auth::new(None).seal(&mut v);
    v
}

fn data_fields(seq: u64, message_len: u32, index: u32, count: u32, payload_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&message_len.to_le_bytes());
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&payload_len.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn ack_fields(sack_seq: u64, frag_count: u32, bitmap_len: u32, bitmap: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sack_seq.to_le_bytes());
    v.extend_from_slice(&frag_count.to_le_bytes());
    v.extend_from_slice(&bitmap_len.to_le_bytes());
    v.extend_from_slice(bitmap);
    v
}

#[test]
fn wire_layout_matches_the_documentation() {
    let payload = [7u8; 10];
    let d = Datagram::Data {
        header: Header { sender: NodeId(0x0102), receiver: NodeId(0x0304), incarnation: 5, ack: 9 },
        fragment: Fragment { seq: 3, message_len: 10, frag_index: 0, frag_count: 1, payload: &payload },
    };
    let mut out = Vec::new();
    wire::encode(&d, None, &mut out);
    assert_eq!(&out[0..2], b"FT");
    assert_eq!(out[2], 1);
    assert_eq!(out[3], wire::KIND_DATA);
    assert_eq!(out[4], 0);
    assert_eq!(&out[5..8], &[0, 0, 0]);
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 0x0102);
    assert_eq!(u64::from_le_bytes(out[16..24].try_into().unwrap()), 0x0304);
    assert_eq!(u64::from_le_bytes(out[24..32].try_into().unwrap()), 5);
    assert_eq!(u64::from_le_bytes(out[32..40].try_into().unwrap()), 9);
    assert_eq!(u64::from_le_bytes(out[40..48].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(out[48..52].try_into().unwrap()), 10);
    assert_eq!(u32::from_le_bytes(out[60..64].try_into().unwrap()), 10);
    assert_eq!(&out[64..74], &payload);
    assert_eq!(out.len(), 64 + 10 + 4);
    assert_eq!(u32::from_le_bytes(out[74..78].try_into().unwrap()), crc32c::crc32c(&out[..74]));
    // The same datagram built by hand decodes to the same value.
    assert_eq!(out, {
        let mut h = raw(wire::KIND_DATA, 0, &data_fields(3, 10, 0, 1, 10, &payload), None);
        h[8..10].copy_from_slice(&[2, 1]);
        h[16..18].copy_from_slice(&[4, 3]);
        h[24] = 5;
        h[32] = 9;
        let n = h.len() - 4;
        h.truncate(n);
        Auth::new(None).seal(&mut h);
        h
    });
    let key = [9u8; 32];
    wire::encode(&Datagram::Hello { header: header(1, 2) }, Some(&key), &mut out);
    assert_eq!(out.len(), 40 + 16);
    assert_eq!(out[4], wire::FLAG_KEYED);
}

#[test]
fn fragment_layout_rules() {
    assert_eq!(wire::fragment_stride(0, 1), Some(0));
    assert_eq!(wire::fragment_stride(0, 2), None);
    assert_eq!(wire::fragment_stride(10, 0), None);
    assert_eq!(wire::fragment_stride(10, 4), Some(3)); // 3,3,3,1
    assert_eq!(wire::fragment_stride(10, 6), None); // 2,2,2,2,2,0: last empty
    assert_eq!(wire::fragment_stride(10, 11), None);
    // Whatever the sender's payload size, its layout is valid and every fragment fits.
    let mut rng = SimRng::new(1);
    for _ in 0..10_000 {
        let len = rng.below(wire::MESSAGE_BYTES_MAX as u64 + 1);
        let payload_max = 100 + rng.below(65_000);
        let count = wire::fragment_count_for(len, payload_max);
        let stride = wire::fragment_stride(len, count).expect("sender layouts are valid");
        assert!(stride <= payload_max);
        let total: usize = (0..count).map(|i| wire::fragment_range(len, count, i).len()).sum();
        assert_eq!(total as u64, len);
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Shape {
        Data { seq: u64, message_len: u32, count_choice: u32, index_choice: u32 },
        Ack { sack: Option<(u64, u32, Vec<u8>)> },
        Hello,
    }

    fn shape() -> impl Strategy<Value = Shape> {
        prop_oneof![
            (1u64.., 0u32..=(wire::MESSAGE_BYTES_MAX as u32), any::<u32>(), any::<u32>()).prop_map(
                |(seq, message_len, count_choice, index_choice)| Shape::Data {
                    seq,
                    message_len,
                    count_choice,
                    index_choice
                }
            ),
            proptest::option::of((1u64.., 1u32..2000, proptest::collection::vec(any::<u8>(), 250)))
                .prop_map(|sack| Shape::Ack { sack }),
            Just(Shape::Hello),
        ]
    }

    fn check_roundtrip(h: Header, shape: Shape, keyed: bool) -> Result<(), TestCaseError> {
        let key = [0x5a; 32];
        let key = keyed.then_some(&key);
        let mut out = Vec::new();
        let payload_buf;
        let bitmap_buf;
        let d = match shape {
            Shape::Data { seq, message_len, count_choice, index_choice } => {
                // A valid layout: the count a sender with some payload size would choose.
                let payload_max = 400 + (count_choice as u64 % 65_000);
                let count = wire::fragment_count_for(message_len as u64, payload_max);
                let index = index_choice as u64 % count;
                let range = wire::fragment_range(message_len as u64, count, index);
                payload_buf = vec![index as u8; range.len()];
                Datagram::Data {
                    header: h,
                    fragment: Fragment {
                        seq,
                        message_len,
                        frag_index: index as u32,
                        frag_count: count as u32,
                        payload: &payload_buf,
                    },
                }
            }
            Shape::Ack { sack: None } => Datagram::Ack { header: h, sack: None },
            Shape::Ack { sack: Some((seq, frag_count, mut bits)) } => {
                bits.truncate((frag_count as usize).div_ceil(8));
                if frag_count % 8 != 0 {
                    let last = bits.len() - 1;
                    bits[last] &= (1u8 << (frag_count % 8)) - 1;
                }
                bitmap_buf = bits;
                Datagram::Ack { header: h, sack: Some(Sack { seq, frag_count, bitmap: &bitmap_buf }) }
            }
            Shape::Hello => Datagram::Hello { header: h },
        };
        wire::encode(&d, key, &mut out);
        prop_assert_eq!(wire::decode(&out, key), Ok(d));
        // The other auth mode rejects it, cleanly.
        let other = [0x11; 32];
        let other = if keyed { None } else { Some(&other) };
        let rejected = matches!(wire::decode(&out, other), Err(DecodeError::AuthMode { .. }));
        prop_assert!(rejected, "the other auth mode must reject it");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decode_inverts_encode(s in any::<u64>(), r in any::<u64>(), inc in any::<u64>(), ack in any::<u64>(),
                                 shape in shape(), keyed in any::<bool>()) {
            let h = Header { sender: NodeId(s), receiver: NodeId(r), incarnation: inc, ack };
            check_roundtrip(h, shape, keyed)?;
        }

        #[test]
        fn decode_of_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), keyed in any::<bool>()) {
            let key = [3u8; 32];
            let _ = wire::decode(&bytes, keyed.then_some(&key));
        }

        #[test]
        fn decode_of_mutated_datagrams_never_panics(
            shape in shape(), flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..8),
            cut in any::<u16>(), reseal in any::<bool>()) {
            let payload = vec![1u8; 2000];
            let h = header(1, 2);
            let d = match shape {
                Shape::Data { seq, .. } => Datagram::Data { header: h, fragment: Fragment {
                    seq, message_len: 2000, frag_index: 1, frag_count: 2, payload: &payload[..1000] } },
                Shape::Ack { .. } => Datagram::Ack { header: h, sack: Some(Sack { seq: 4, frag_count: 9, bitmap: &[0xff, 1] }) },
                Shape::Hello => Datagram::Hello { header: h },
            };
            let mut out = Vec::new();
            wire::encode(&d, None, &mut out);
            for (at, x) in flips {
                let n = out.len();
                out[at as usize % n] ^= x;
            }
            if cut & 3 == 0 {
                let n = out.len();
                out.truncate(cut as usize % n);
            }
            if reseal && out.len() >= 4 {
                // Fix the checksum so the structural checks are reached.
                let n = out.len() - 4;
                out.truncate(n);
                Auth::new(None).seal(&mut out);
            }
            if let Ok(d) = wire::decode(&out, None) {
                // Whatever decodes re-encodes to the same bytes.
                let mut again = Vec::new();
                wire::encode(&d, None, &mut again);
                prop_assert_eq!(again, out);
            }
        }
    }
}

/// One datagram of every malformed class (for an unkeyed receiver, node 2, from node 1) with
/// the reason it must be rejected for.
fn malformed_cases() -> Vec<(Vec<u8>, &'static str)> {
    let ok_data = data_fields(1, 3, 0, 1, 3, b"abc");
    let with = |at: usize, x: u8| {
        let mut v = raw(1, 0, &ok_data, None);
        v[at] = x;
        v
    };
    vec![
        (vec![0; 10], "too_short"),
        (vec![], "too_short"),
        (with(0, b'X'), "bad_magic"),
        (with(2, 2), "unsupported_version"),
        (raw(9, 0, &ok_data, None), "unknown_kind"),
        (raw(0, 0, &ok_data, None), "unknown_kind"),
        (with(4, 2), "unknown_flags"),
        (reseal(with(6, 1)), "reserved_nonzero"),
        (with(66, b'z'), "bad_checksum"),
        (raw(1, 1, &ok_data, Some(&[1; 32])), "auth_mode"),
        (raw(1, 0, &data_fields(0, 3, 0, 1, 3, b"abc"), None), "zero_sequence"),
        (raw(1, 0, &data_fields(1, (4 << 20) + 1, 0, 4000, 0, b""), None), "message_too_large"),
        (raw(1, 0, &data_fields(1, 3, 0, 0, 3, b"abc"), None), "fragment_count"),
        (raw(1, 0, &data_fields(1, 3, 0, 4, 1, b"a"), None), "fragment_count"),
        (raw(1, 0, &data_fields(1, 0, 0, 2, 0, b""), None), "fragment_count"),
        (raw(1, 0, &data_fields(1, 3, 3, 3, 1, b"a"), None), "fragment_index"),
        (raw(1, 0, &data_fields(1, 4, 1, 2, 1, b"a"), None), "fragment_length"),
        (raw(1, 0, &data_fields(1, 3, 0, 1, 3, b"ab"), None), "payload_length"),
        (raw(1, 0, &data_fields(1, 3, 0, 1, 3, b"abcd"), None), "payload_length"),
        (raw(1, 0, &[0; 10], None), "too_short"),
        (raw(2, 0, &[0; 10], None), "too_short"),
        (raw(2, 0, &ack_fields(0, 1, 0, b""), None), "sack_inconsistent"),
        (raw(2, 0, &ack_fields(5, 0, 0, b""), None), "sack_inconsistent"),
        (raw(2, 0, &ack_fields(5, 3, 1, &[0b1000]), None), "sack_inconsistent"),
        (raw(2, 0, &ack_fields(5, 9, 1, &[0]), None), "sack_bitmap_length"),
        (raw(2, 0, &ack_fields(5, 9, 2, &[0]), None), "sack_bitmap_length"),
        (raw(2, 0, &ack_fields(0, 0, 0, b"x"), None), "payload_length"),
        (raw(3, 0, b"x", None), "payload_length"),
    ]
}

#[test]
fn decode_errors_are_each_reported() {
    for (i, (bytes, reason)) in malformed_cases().iter().enumerate() {
        let e = wire::decode(bytes, None).expect_err(&format!("case {i} decodes"));
        assert_eq!(e.reason(), *reason, "case {i}: {e}");
    }
    let ok_data = data_fields(1, 3, 0, 1, 3, b"abc");
    // And a keyed endpoint: bad MAC, unkeyed datagram.
    let key = [1u8; 32];
    let mut v = raw(1, 1, &ok_data, Some(&key));
    assert!(wire::decode(&v, Some(&key)).is_ok());
    v[65] ^= 0x80;
    assert_eq!(wire::decode(&v, Some(&key)), Err(DecodeError::BadMac));
    assert_eq!(wire::decode(&raw(1, 1, &ok_data, Some(&[2; 32])), Some(&key)), Err(DecodeError::BadMac));
    assert_eq!(
        wire::decode(&raw(1, 0, &ok_data, None), Some(&key)),
        Err(DecodeError::AuthMode { datagram_keyed: false })
    );
}

// ---------------------------------------------------------------------------------------------
// RTO estimator.

#[test]
fn rto_follows_rfc6298_and_backs_off() {
    let ms = Duration::from_millis;
    let mut r = RttEstimator::new(ms(200), ms(5), ms(2000));
    assert_eq!(r.rto(), ms(200));
    r.sample(ms(100));
    assert_eq!(r.srtt(), Some(ms(100)));
    assert_eq!(r.rto(), ms(100) + ms(200)); // SRTT + 4 × R/2
    r.sample(ms(100));
    // RTTVAR = 3/4 × 50 = 37.5; SRTT = 100.
    assert_eq!(r.rto(), ms(100) + ms(150));
    let mut r = RttEstimator::new(ms(200), ms(5), ms(2000));
    for _ in 0..50 {
        r.sample(Duration::from_micros(100));
    }
    assert_eq!(r.rto(), ms(5), "clamped to rto_min");
    let mut r = RttEstimator::new(ms(200), ms(5), ms(2000));
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(r.rto());
        r.back_off();
    }
    assert_eq!(seen, [ms(200), ms(400), ms(800), ms(1600), ms(2000), ms(2000)]);
    r.reset_backoff();
    assert_eq!(r.rto(), ms(200));
}

// ---------------------------------------------------------------------------------------------
// Endpoints.

#[test]
fn lossy_network_delivers_exactly_once_in_order() {
    let started = std::time::Instant::now();
    let mut w = World::new(42, NetProfile::hostile());
    for n in 1..=3 {
        w.add(config(n));
    }
    w.mesh();
    for n in w.nodes.iter_mut() {
        n.commit_delay = Some(Duration::from_micros(500));
    }
    // 10,000 messages over the six directed pairs; sizes: mostly small, some multi-fragment,
    // a few up to 1 MiB (one exactly 1 MiB).
    const MESSAGES: u64 = 10_000;
    const OUTBOX_MAX: u64 = 200;
    let pairs: Vec<(usize, usize)> =
        (0..3).flat_map(|a| (0..3).filter(move |&b| b != a).map(move |b| (a, b))).collect();
    let mut plan: Vec<Vec<usize>> = vec![Vec::new(); pairs.len()];
    let mut rng = SimRng::new(7);
    let mut sizes = HashMap::new();
    let mut bytes_total = 0u64;
    for k in 0..MESSAGES {
        let p = (k % pairs.len() as u64) as usize;
        let size = match rng.below(1000) {
            0..=799 => rng.below(1_400) as usize,
            800..=989 => 1_400 + rng.below(60_000) as usize,
            _ => 60_000 + rng.below(1 << 20) as usize,
        };
        let size = if k == 5_000 { 1 << 20 } else { size.min(1 << 20) };
        plan[p].push(size);
        bytes_total += size as u64;
    }
    let mut next_seq = vec![1u64; pairs.len()];
    let mut steps = 0u64;
    let deadline = Duration::from_secs(3_600);
    let start = w.now;
    let end = start + deadline;
    loop {
        // The application: keep each outbox topped up, like a turn manager with a bounded outbox.
        for (p, &(a, b)) in pairs.iter().enumerate() {
            let to = w.id(b);
            let from = w.id(a);
            loop {
                let view = w.nodes[a].ep.peer_view(to).unwrap();
                let seq = next_seq[p];
                if view.unacked_messages >= OUTBOX_MAX || seq > plan[p].len() as u64 {
                    break;
                }
                let len = plan[p][(seq - 1) as usize];
                sizes.insert((from, to, seq), len);
                let now = w.now;
                w.nodes[a].ep.send_durable(now, to, seq, content(from, to, seq, len)).unwrap();
                next_seq[p] += 1;
            }
        }
        w.pump();
        steps += 1;
        // The windows hold at every step.
        for n in &w.nodes {
            for peer in n.ep.peers() {
                let v = n.ep.peer_view(peer).unwrap();
                assert!(v.transmitted_messages <= 64);
                assert!(v.in_flight_fragments <= 256 + n.ep.stats().sack_reneged_fragments);
            }
        }
        let delivered: usize = w.nodes.iter().map(|n| n.received.len()).sum();
        let all_acked = pairs
            .iter()
            .enumerate()
            .all(|(p, &(a, b))| w.nodes[a].ep.peer_view(w.id(b)).unwrap().acked_by_peer == plan[p].len() as u64);
        if delivered as u64 == MESSAGES && all_acked {
            break;
        }
        assert!(w.now < end, "no progress: delivered {delivered} of {MESSAGES}");
        assert!(w.advance(), "stalled with {delivered} of {MESSAGES} delivered");
    }
    let elapsed = started.elapsed();
    for (i, n) in w.nodes.iter().enumerate() {
        check_exactly_once_fifo(w.id(i), &n.received, &sizes);
    }
    for (p, &(a, b)) in pairs.iter().enumerate() {
        assert_eq!(w.acked(a).get(&w.id(b)).copied(), Some(plan[p].len() as u64), "Acked events up to the last seq");
    }
    let s: Vec<TransportStats> = w.nodes.iter().map(|n| n.ep.stats().clone()).collect();
    let sum = |f: fn(&TransportStats) -> u64| s.iter().map(f).sum::<u64>();
    assert_eq!(sum(|s| s.messages_delivered), MESSAGES);
    assert!(sum(|s| s.duplicates_dropped) > 0, "duplication happened");
    assert!(sum(|s| s.out_of_order_buffered) > 0, "reordering happened");
    assert!(sum(|s| s.fragments_retransmitted) > 0, "loss happened");
    assert_eq!(sum(|s| s.rejected_malformed + s.rejected_checksum), 0);
    eprintln!(
        "lossy network: {MESSAGES} messages ({:.1} MB) in {:.2} s wall ({:.0} messages/s, {:.1} MB/s), \
         {:.1} s simulated, {} datagrams moved, {} lost, {} steps; fragments sent {} (retransmitted {}), \
         acks {} (sacks {}), timeouts {}, fast retransmits {}, duplicates {}",
        bytes_total as f64 / 1e6,
        elapsed.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64(),
        bytes_total as f64 / 1e6 / elapsed.as_secs_f64(),
        (w.now - start).as_secs_f64(),
        w.datagrams_moved,
        w.datagrams_lost,
        steps,
        sum(|s| s.fragments_sent),
        sum(|s| s.fragments_retransmitted),
        sum(|s| s.acks_sent),
        sum(|s| s.sacks_sent),
        sum(|s| s.timeouts),
        sum(|s| s.fast_retransmits),
        sum(|s| s.duplicates_dropped),
    );
}

/// Two nodes (1 and 2) that know each other.
fn pair(seed: u64, net: NetProfile, a: EndpointConfig, b: EndpointConfig) -> World {
    let mut w = World::new(seed, net);
    w.add(a);
    w.add(b);
    w.mesh();
    w
}

fn decode_sent(bytes: &[u8]) -> Datagram<'_> {
    wire::decode(bytes, None).expect("the endpoint sends valid datagrams")
}

/// Queues `count` messages of `len` bytes from node `a` to node `b`, from seq `first`.
fn send_many(w: &mut World, a: usize, b: usize, first: u64, count: u64, len: usize) {
    let (from, to, now) = (w.id(a), w.id(b), w.now);
    for seq in first..first + count {
        w.nodes[a].ep.send_durable(now, to, seq, content(from, to, seq, len)).unwrap();
    }
}

fn received_seqs(w: &World, i: usize) -> Vec<u64> {
    w.nodes[i].received.iter().map(|m| m.seq).collect()
}

#[test]
fn acks_never_run_ahead_of_consumed_durable() {
    let mut w = pair(3, NetProfile::hostile(), config(1), config(2));
    w.nodes[1].commit_delay = None; // the turn manager withholds consumed_durable
    w.nodes[1].record = true;
    send_many(&mut w, 0, 1, 1, 15, 500);
    send_many(&mut w, 0, 1, 16, 5, 5_000); // multi-fragment too
    w.run_for(Duration::from_secs(10));
    assert_eq!(received_seqs(&w, 1), (1..=20).collect::<Vec<_>>(), "delivered in order, once");
    assert_eq!(w.acked(0).len(), 0, "no Acked event while nothing was consumed durably");
    let retransmitted = w.nodes[0].ep.stats().fragments_retransmitted;
    assert!(retransmitted > 0, "the sender keeps retransmitting");
    w.run_for(Duration::from_secs(10));
    assert!(w.nodes[0].ep.stats().fragments_retransmitted > retransmitted, "and keeps at it");
    assert_eq!(w.acked(0).len(), 0);
    assert_eq!(w.nodes[0].ep.peer_view(w.id(1)).unwrap().unacked_messages, 20);
    // Not one datagram from the receiver acked anything.
    assert!(!w.nodes[1].sent_log.is_empty());
    for (_, bytes) in &w.nodes[1].sent_log {
        assert_eq!(decode_sent(bytes).header().ack, 0);
    }
    assert_eq!(received_seqs(&w, 1).len(), 20, "retransmissions were not delivered again");
    // Consuming 7 durably lets the ack cover exactly 7.
    let (now, a) = (w.now, w.id(0));
    w.nodes[1].ep.consumed_durable(now, a, 7).unwrap();
    w.nodes[1].sent_log.clear();
    w.run_for(Duration::from_secs(5));
    assert_eq!(w.acked(0).get(&w.id(1)), Some(&7));
    for (_, bytes) in &w.nodes[1].sent_log {
        assert!(decode_sent(bytes).header().ack <= 7);
    }
    let view = w.nodes[0].ep.peer_view(w.id(1)).unwrap();
    assert_eq!((view.acked_by_peer, view.unacked_messages), (7, 13));
}

#[test]
fn duplicates_are_dropped_and_reacked() {
    let mut w = pair(4, NetProfile::perfect(), config(1), config(2));
    w.nodes[0].record = true;
    send_many(&mut w, 0, 1, 1, 2, 100);
    assert!(w.run_until(Duration::from_secs(1), |w| w.acked(0).get(&w.id(1)) == Some(&2)));
    let data: Vec<Vec<u8>> = w.nodes[0]
        .sent_log
        .iter()
        .filter(|(_, b)| matches!(decode_sent(b), Datagram::Data { .. }))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data.len(), 2);
    let (now, from) = (w.now, w.nodes[0].addr);
    let b = &mut w.nodes[1].ep;
    b.handle_datagram(now, from, &data[0]);
    b.handle_datagram(now, from, &data[1]);
    assert_eq!(b.stats().duplicates_dropped, 2);
    assert!(b.poll_message().is_none(), "never delivered twice");
    let t = b.poll_transmit(now).expect("a re-ack");
    match decode_sent(&t.bytes) {
        Datagram::Ack { header, sack: None } => assert_eq!(header.ack, 2),
        d => panic!("expected a bare ACK, got {d:?}"),
    }
    assert!(b.poll_transmit(now).is_none(), "one ack for both duplicates");
    assert_eq!(w.nodes[1].received.len(), 2);
}

#[test]
fn acks_of_many_consumed_calls_are_coalesced() {
    let mut w = pair(5, NetProfile::perfect(), config(1), config(2));
    w.nodes[1].commit_delay = None;
    send_many(&mut w, 0, 1, 1, 10, 10);
    assert!(w.run_until(Duration::from_secs(1), |w| w.nodes[1].received.len() == 10));
    w.run_for(Duration::from_millis(5));
    let (now, a) = (w.now, w.id(0));
    let b = &mut w.nodes[1].ep;
    assert!(b.poll_transmit(now).is_none());
    let acks_before = b.stats().acks_sent;
    for seq in 1..=10 {
        b.consumed_durable(now, a, seq).unwrap();
    }
    let t = b.poll_transmit(now).expect("an ack");
    assert_eq!(decode_sent(&t.bytes).header().ack, 10);
    assert!(b.poll_transmit(now).is_none(), "one ACK for ten consumed_durable calls");
    assert_eq!(b.stats().acks_sent, acks_before + 1);
    // Data going the other way carries the ack instead of a separate ACK.
    b.consumed_durable(now, a, 10).unwrap(); // no change: nothing to send
    assert!(b.poll_transmit(now).is_none());
}

#[test]
fn piggybacked_ack_replaces_the_explicit_one() {
    let mut w = pair(6, NetProfile::perfect(), config(1), config(2));
    w.nodes[1].commit_delay = None;
    send_many(&mut w, 0, 1, 1, 3, 10);
    assert!(w.run_until(Duration::from_secs(1), |w| w.nodes[1].received.len() == 3));
    let (now, a, b) = (w.now, w.id(0), w.id(1));
    let ep = &mut w.nodes[1].ep;
    ep.consumed_durable(now, a, 3).unwrap();
    ep.send_durable(now, a, 1, b"reply".to_vec()).unwrap();
    let t = ep.poll_transmit(now).unwrap();
    match decode_sent(&t.bytes) {
        Datagram::Data { header, fragment } => {
            assert_eq!((header.ack, fragment.seq, header.sender), (3, 1, b));
        }
        d => panic!("expected DATA, got {d:?}"),
    }
    assert!(ep.poll_transmit(now).is_none(), "no separate ACK");
}

/// Runs a sender against a receiver that is unreachable, then lets them talk; checks what the
/// sender had transmitted at most while nothing was acked.
fn sniff_window(mut cfg: EndpointConfig, messages: u64, len: usize) -> (World, std::collections::BTreeSet<(u64, u32)>) {
    cfg.node = NodeId(1);
    let mut w = pair(7, NetProfile::perfect(), cfg, config(2));
    let blocked = std::rc::Rc::new(std::cell::Cell::new(true));
    let b = blocked.clone();
    w.drop_rule = Some(Box::new(move |_, _, _| b.get()));
    w.nodes[0].record = true;
    send_many(&mut w, 0, 1, 1, messages, len);
    w.run_for(Duration::from_secs(5)); // several timeouts
    let mut sent = std::collections::BTreeSet::new();
    for (_, bytes) in &w.nodes[0].sent_log {
        if let Datagram::Data { fragment, .. } = decode_sent(bytes) {
            sent.insert((fragment.seq, fragment.frag_index));
        }
    }
    assert!(w.nodes[0].ep.stats().timeouts >= 3);
    blocked.set(false);
    let total = messages;
    assert!(w.run_until(Duration::from_secs(60), |w| {
        for n in &w.nodes {
            for p in n.ep.peers() {
                let v = n.ep.peer_view(p).unwrap();
                assert!(v.transmitted_messages <= n.ep.config().window_messages as u64);
                assert!(v.in_flight_fragments <= n.ep.config().window_fragments as u64);
            }
        }
        w.acked(0).get(&NodeId(2)) == Some(&total)
    }));
    assert_eq!(w.nodes[1].received.len() as u64, messages);
    (w, sent)
}

#[test]
fn windows_bound_what_is_sent_before_acks() {
    // Message window.
    let mut cfg = config(1);
    cfg.window_messages = 8;
    let (_, sent) = sniff_window(cfg, 100, 100);
    let seqs: std::collections::BTreeSet<u64> = sent.iter().map(|&(s, _)| s).collect();
    assert_eq!(seqs, (1..=8).collect(), "only the first 8 messages went out before an ack");
    // Byte window: 3,000-byte messages, 10,000 bytes → 3 at a time.
    let mut cfg = config(1);
    cfg.window_bytes = 10_000;
    let (_, sent) = sniff_window(cfg, 20, 3_000);
    let seqs: std::collections::BTreeSet<u64> = sent.iter().map(|&(s, _)| s).collect();
    assert_eq!(seqs, (1..=3).collect());
    // A message larger than the byte window still goes (alone).
    let mut cfg = config(1);
    cfg.window_bytes = 1_000;
    let (_, sent) = sniff_window(cfg, 3, 3_000);
    let seqs: std::collections::BTreeSet<u64> = sent.iter().map(|&(s, _)| s).collect();
    assert_eq!(seqs, [1].into());
    // Fragment window: a 100 kB message (76 fragments) with 16 in flight.
    let mut cfg = config(1);
    cfg.window_fragments = 16;
    let (w, sent) = sniff_window(cfg, 1, 100_000);
    assert_eq!(sent, (0..16).map(|i| (1, i)).collect(), "the first 16 fragments only, resent alone");
    assert_eq!(w.nodes[1].received[0].bytes, content(NodeId(1), NodeId(2), 1, 100_000));
}

#[test]
fn reassembles_one_and_four_mebibyte_messages() {
    let mut w = pair(8, NetProfile::perfect(), config(1), config(2));
    let (now, a, b) = (w.now, w.id(0), w.id(1));
    w.nodes[0].ep.send_durable(now, b, 1, content(a, b, 1, 1 << 20)).unwrap();
    w.nodes[0].ep.send_durable(now, b, 2, content(a, b, 2, MESSAGE_BYTES_MAX)).unwrap();
    w.nodes[0].ep.send_durable(now, b, 3, Vec::new()).unwrap(); // and an empty one
    assert!(w.run_until(Duration::from_secs(10), |w| w.acked(0).get(&b) == Some(&3)));
    let got = &w.nodes[1].received;
    assert_eq!(got.len(), 3);
    assert!(got[0].bytes == content(a, b, 1, 1 << 20));
    assert!(got[1].bytes == content(a, b, 2, MESSAGE_BYTES_MAX));
    assert!(got[2].bytes.is_empty());
    let s = w.nodes[0].ep.stats();
    let per = w.nodes[0].ep.fragment_payload_bytes_max() as u64;
    let frags = (1u64 << 20).div_ceil(per) + (MESSAGE_BYTES_MAX as u64).div_ceil(per) + 1;
    assert_eq!(s.fragments_sent, frags, "every fragment once");
    assert_eq!(s.fragments_retransmitted, 0, "no spurious retransmission on a perfect network");
    eprintln!(
        "reassembly: 5 MiB in {} fragments, {} selective acks, {:?} simulated",
        s.fragments_sent,
        w.nodes[1].ep.stats().sacks_sent,
        w.now - now
    );
    assert!(w.nodes[1].ep.stats().sacks_sent > 0);
}

#[test]
fn a_lost_fragment_is_resent_alone() {
    let mut w = pair(9, NetProfile::perfect(), config(1), config(2));
    let lost = [100u32, 333, 500];
    let mut dropped = std::collections::HashSet::new();
    w.drop_rule = Some(Box::new(move |_, _, bytes| {
        if let Ok(Datagram::Data { fragment, .. }) = wire::decode(bytes, None) {
            if lost.contains(&fragment.frag_index) && dropped.insert(fragment.frag_index) {
                return true;
            }
        }
        false
    }));
    let (now, a, b) = (w.now, w.id(0), w.id(1));
    w.nodes[0].ep.send_durable(now, b, 1, content(a, b, 1, 1 << 20)).unwrap();
    assert!(w.run_until(Duration::from_secs(10), |w| w.acked(0).get(&b) == Some(&1)));
    assert!(w.nodes[1].received[0].bytes == content(a, b, 1, 1 << 20));
    let s = w.nodes[0].ep.stats();
    assert_eq!(s.fragments_retransmitted, lost.len() as u64, "only the lost fragments were resent");
    assert_eq!(s.messages_retransmitted, 1);
    // Detected from the selective acks (later fragments held), not by the timer.
    assert_eq!((s.fast_retransmits, s.timeouts), (3, 0));
}

#[test]
fn retransmission_backs_off_to_rto_max_and_resets_on_progress() {
    let mut w = pair(10, NetProfile::perfect(), config(1), config(2));
    let blocked = std::rc::Rc::new(std::cell::Cell::new(true));
    let bl = blocked.clone();
    w.drop_rule = Some(Box::new(move |_, _, _| bl.get()));
    let b = w.id(1);
    send_many(&mut w, 0, 1, 1, 1, 100);
    w.pump();
    let mut last = w.now;
    let mut intervals = Vec::new();
    for _ in 0..7 {
        let t = w.nodes[0].ep.peer_view(b).unwrap().timer.expect("armed");
        intervals.push((t - last).as_millis());
        last = t;
        assert!(w.advance());
        assert_eq!(w.now, t);
        w.pump(); // the retransmission
    }
    assert_eq!(intervals, [200, 400, 800, 1600, 2000, 2000, 2000]);
    assert_eq!(w.nodes[0].ep.stats().timeouts, 7);
    assert_eq!(w.nodes[0].ep.stats().fragments_retransmitted, 7);
    // Progress: the ack comes; no RTT sample (retransmitted, Karn), so the timeout is back to
    // rto_initial, not backed off.
    blocked.set(false);
    assert!(w.run_until(Duration::from_secs(10), |w| w.acked(0).get(&b) == Some(&1)));
    let v = w.nodes[0].ep.peer_view(b).unwrap();
    assert_eq!((v.srtt, v.rto, v.timer), (None, Duration::from_millis(200), None));
    send_many(&mut w, 0, 1, 2, 1, 100);
    w.pump();
    let now = w.now;
    assert_eq!(w.nodes[0].ep.peer_view(b).unwrap().timer, Some(now + Duration::from_millis(200)));
    assert!(w.run_until(Duration::from_secs(10), |w| w.acked(0).get(&b) == Some(&2)));
    // A message sent once gives a sample: 1 ms each way.
    let v = w.nodes[0].ep.peer_view(b).unwrap();
    assert_eq!(v.srtt, Some(Duration::from_millis(2)));
    assert_eq!(v.rto, Duration::from_millis(6), "SRTT + 4 × RTTVAR = 2 ms + 4 × 1 ms");
}

#[test]
fn a_restarted_peer_gets_everything_resent_at_once() {
    let mut a_cfg = config(1);
    // Timers so slow that only the HELLO can explain a prompt resend.
    a_cfg.rto_min = Duration::from_secs(1);
    a_cfg.rto_initial = Duration::from_secs(1);
    a_cfg.rto_max = Duration::from_secs(2);
    let mut w = pair(11, NetProfile::perfect(), a_cfg, config(2));
    w.nodes[1].commit_delay = None;
    let (a, b) = (w.id(0), w.id(1));
    send_many(&mut w, 0, 1, 1, 30, 300);
    w.run_for(Duration::from_millis(20));
    // A large message the receiver holds whole (selectively acked), not consumed.
    let now = w.now;
    w.nodes[0].ep.send_durable(now, b, 31, content(a, b, 31, 200_000)).unwrap();
    send_many(&mut w, 1, 0, 1, 5, 50); // b → a, consumed by a at once
    assert!(w.run_until(Duration::from_secs(1), |w| w.nodes[1].received.len() == 31 && w.acked(1).get(&a) == Some(&5)));
    let now = w.now;
    w.nodes[1].ep.consumed_durable(now, a, 12).unwrap();
    assert!(w.run_until(Duration::from_secs(1), |w| w.acked(0).get(&b) == Some(&12)));
    assert!(w.nodes[1].ep.stats().sacks_sent > 0, "{:?}", w.nodes[1].ep.stats());
    let view = w.nodes[0].ep.peer_view(b).unwrap();
    assert_eq!(view.in_flight_fragments, 18, "the large message is held whole by b: only 18 singles in flight");

    // b crashes: its volatile state is gone, datagrams to it are lost. Its heap says: consumed
    // up to 12 from a; a acked our 5.
    w.queue.clear();
    let restore = PeerRestore { next_expected: 13, acked_by_peer: 5 };
    let now = w.now;
    let mut ep = Endpoint::new(EndpointConfig::new(b, 2), now).unwrap();
    ep.add_peer(a, w.nodes[0].addr, restore).unwrap();
    ep.announce_restart(now);
    w.nodes[1].ep = ep;
    w.nodes[1].received.clear();
    w.nodes[1].commit_delay = Some(Duration::ZERO);
    w.nodes[0].record = true;
    let restarted_at = w.now;
    let timeouts = w.nodes[0].ep.stats().timeouts;
    let resent_before = w.nodes[0].ep.stats().fragments_retransmitted;
    assert!(w.run_until(Duration::from_secs(1), |w| w.nodes[1].received.len() == 19));
    assert_eq!(received_seqs(&w, 1), (13..=31).collect::<Vec<_>>());
    assert!(w.nodes[1].received[18].bytes == content(a, b, 31, 200_000));
    // The large message b had said it held whole went again in full: what b said died with it.
    let large_fragments = 200_000u64.div_ceil(w.nodes[0].ep.fragment_payload_bytes_max() as u64);
    let resent = w.nodes[0].ep.stats().fragments_retransmitted - resent_before;
    assert!(resent >= large_fragments + 18, "resent {resent}");
    assert!(w.now - restarted_at < Duration::from_millis(50), "took {:?}", w.now - restarted_at);
    assert_eq!(w.nodes[0].ep.stats().timeouts, timeouts, "no timer was involved");
    // a resent as soon as the HELLO arrived (1 ms in this network).
    let first_data = w.nodes[0]
        .sent_log
        .iter()
        .find(|(_, bytes)| matches!(decode_sent(bytes), Datagram::Data { .. }))
        .map(|&(t, _)| t)
        .unwrap();
    assert_eq!(first_data - restarted_at, Duration::from_millis(1));
    assert!(w.nodes[0].events.contains(&Event::PeerRestarted { peer: b, incarnation: 2 }));
    assert_eq!(w.nodes[0].ep.stats().hellos_received, 1);
    assert!(w.run_until(Duration::from_secs(1), |w| w.acked(0).get(&b) == Some(&31)));
}

/// A lone endpoint (node 2) that knows node 1 at `addr(1)` and node 3 at `addr(3)`.
fn lone(cfg: EndpointConfig) -> Endpoint {
    let mut ep = Endpoint::new(cfg, Instant::now()).unwrap();
    ep.add_peer(NodeId(1), addr(1), PeerRestore::NEW).unwrap();
    ep.add_peer(NodeId(3), addr(3), PeerRestore::NEW).unwrap();
    ep
}

const FROM1: RawHeader = RawHeader { sender: 1, receiver: 2, incarnation: 1, ack: 0 };

#[test]
fn every_malformed_datagram_is_counted_and_dropped() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    for (i, (bytes, reason)) in malformed_cases().iter().enumerate() {
        let before = ep.stats().clone();
        ep.handle_datagram(now, addr(1), bytes);
        let s = ep.stats();
        let counted = match *reason {
            "bad_checksum" => s.rejected_checksum == before.rejected_checksum + 1,
            "bad_mac" => s.rejected_mac == before.rejected_mac + 1,
            "auth_mode" => s.rejected_auth_mode == before.rejected_auth_mode + 1,
            _ => {
                s.rejected_malformed == before.rejected_malformed + 1
                    && s.malformed.by_reason().iter().zip(before.malformed.by_reason()).all(|(&(n, x), (_, y))| {
                        if n == *reason {
                            x == y + 1
                        } else {
                            x == y
                        }
                    })
            }
        };
        assert!(counted, "case {i} ({reason}) not counted as such: {s:?}");
        assert_eq!(s.datagrams_received, before.datagrams_received + 1);
    }
    assert!(ep.poll_message().is_none());
    assert!(ep.poll_transmit(now).is_none());
    assert!(ep.poll_event().is_none());
    let view = ep.peer_view(NodeId(1)).unwrap();
    assert_eq!((view.incarnation_seen, view.buffered_messages), (None, 0));
    // And the endpoint's own limit: a message over message_bytes_max.
    let mut cfg = config(2);
    cfg.message_bytes_max = 1_000;
    cfg.reorder_bytes_max = 1_000;
    let mut ep = lone(cfg);
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 1, &[1; 1_001]));
    assert_eq!(ep.stats().malformed.message_too_large, 1);
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 1, &[1; 1_000]));
    assert_eq!(ep.poll_message().unwrap().bytes.len(), 1_000);
}

#[test]
fn fragments_that_disagree_are_dropped() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    let cfg_data = |len: u32, index: u32, count: u32| {
        let range = wire::fragment_range(len as u64, count as u64, index as u64);
        let payload = vec![5u8; range.len()];
        raw_from(1, 0, FROM1, &data_fields(1, len, index, count, payload.len() as u32, &payload), None)
    };
    ep.handle_datagram(now, addr(1), &cfg_data(3_000, 0, 3));
    ep.handle_datagram(now, addr(1), &cfg_data(3_001, 1, 3));
    ep.handle_datagram(now, addr(1), &cfg_data(3_000, 1, 4));
    assert_eq!(ep.stats().inconsistent_fragment, 2);
    ep.handle_datagram(now, addr(1), &cfg_data(3_000, 1, 3));
    ep.handle_datagram(now, addr(1), &cfg_data(3_000, 2, 3));
    assert_eq!(ep.poll_message().unwrap().bytes, vec![5u8; 3_000]);
    // A selective ack describing more fragments than our message has.
    let mut ep = lone(config(2));
    ep.send_durable(now, NodeId(1), 1, vec![0u8; 3_000]).unwrap();
    while ep.poll_transmit(now).is_some() {}
    ep.handle_datagram(
        now,
        addr(1),
        &raw_from(2, 0, FROM1, &ack_fields(1, 40, 5, &[0xff, 0xff, 0xff, 0xff, 0xff]), None),
    );
    assert_eq!(ep.stats().inconsistent_fragment, 1);
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().in_flight_fragments, 3);
    ep.handle_datagram(now, addr(1), &raw_from(2, 0, FROM1, &ack_fields(1, 3, 1, &[0b101]), None));
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().in_flight_fragments, 1);
}

#[test]
fn reorder_buffer_is_bounded_and_lets_the_next_message_in() {
    let now = Instant::now();
    let mut cfg = config(2);
    cfg.reorder_messages_max = 4;
    let mut ep = lone(cfg);
    for seq in 2..=10 {
        ep.handle_datagram(now, addr(1), &raw_data(FROM1, seq, &[seq as u8; 10]));
    }
    let s = ep.stats();
    // Only seq 2 arrived with its predecessor missing; 3 to 5 followed buffered ones.
    assert_eq!((s.out_of_order_buffered, s.buffer_full_dropped), (1, 5));
    assert!(ep.poll_message().is_none(), "seq 1 is missing");
    // The message that lets delivery progress gets in beyond the bound.
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 1, &[1; 10]));
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().buffered_messages, 5);
    let got: Vec<u64> = std::iter::from_fn(|| ep.poll_message()).map(|m| m.seq).collect();
    assert_eq!(got, [1, 2, 3, 4, 5]);
    // Out-of-order whole messages were selectively acked (so a timeout resends only seq 1).
    let sacked: Vec<u64> = std::iter::from_fn(|| ep.poll_transmit(now))
        .filter_map(|t| match decode_sent(&t.bytes) {
            Datagram::Ack { sack: Some(s), .. } => Some(s.seq),
            _ => None,
        })
        .collect();
    assert_eq!(sacked, [2, 3, 4, 5]);
    // In-order messages not pulled count too.
    let mut cfg = config(2);
    cfg.reorder_messages_max = 2;
    let mut ep = lone(cfg);
    for seq in 1..=3 {
        ep.handle_datagram(now, addr(1), &raw_data(FROM1, seq, &[1; 10]));
    }
    assert_eq!(ep.stats().buffer_full_dropped, 1);
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().buffered_messages, 2);
    // The byte bound.
    let mut cfg = config(2);
    cfg.message_bytes_max = 1_000;
    cfg.reorder_bytes_max = 1_500;
    let mut ep = lone(cfg);
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 2, &[1; 1_000]));
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 3, &[1; 1_000]));
    assert_eq!(ep.stats().buffer_full_dropped, 1);
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().buffered_bytes, 1_000);
}

#[test]
fn messages_from_several_peers_are_delivered_round_robin() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    let from3 = RawHeader { sender: 3, ..FROM1 };
    for seq in 1..=3 {
        ep.handle_datagram(now, addr(1), &raw_data(FROM1, seq, b"one"));
        ep.handle_datagram(now, addr(3), &raw_data(from3, seq, b"three"));
    }
    ep.handle_datagram(now, addr(1), &raw_data(FROM1, 4, b"one"));
    let got: Vec<(u64, u64)> = std::iter::from_fn(|| ep.poll_message()).map(|m| (m.peer.0, m.seq)).collect();
    assert_eq!(got, [(1, 1), (3, 1), (1, 2), (3, 2), (1, 3), (3, 3), (1, 4)]);
}

#[test]
fn identity_incarnation_and_stale_datagrams() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    // Addressed to someone else.
    ep.handle_datagram(now, addr(1), &raw_data(RawHeader { receiver: 9, ..FROM1 }, 1, b"x"));
    // Claiming to come from ourselves.
    ep.handle_datagram(now, addr(1), &raw_data(RawHeader { sender: 2, ..FROM1 }, 1, b"x"));
    assert_eq!(ep.stats().wrong_receiver, 2);
    // Incarnation 5, then a datagram of incarnation 4: stale.
    ep.handle_datagram(now, addr(1), &raw_data(RawHeader { incarnation: 5, ..FROM1 }, 1, b"x"));
    assert_eq!(ep.peer_view(NodeId(1)).unwrap().incarnation_seen, Some(5));
    ep.handle_datagram(now, addr(1), &raw_data(RawHeader { incarnation: 4, ..FROM1 }, 2, b"x"));
    assert_eq!(ep.stats().stale_incarnation, 1);
    assert_eq!(ep.poll_message().unwrap().seq, 1);
    assert!(ep.poll_message().is_none());
    assert!(ep.poll_event().is_none(), "the first datagram of a peer is no restart");
    // A higher incarnation without a HELLO is a restart too.
    ep.handle_datagram(
        now,
        addr(1),
        &raw_from(2, 0, RawHeader { incarnation: 6, ..FROM1 }, &ack_fields(0, 0, 0, b""), None),
    );
    assert_eq!(ep.poll_event(), Some(Event::PeerRestarted { peer: NodeId(1), incarnation: 6 }));
    // A repeated HELLO of the same incarnation only draws an ack.
    let hello = raw_from(3, 0, RawHeader { incarnation: 6, ..FROM1 }, b"", None);
    ep.handle_datagram(now, addr(1), &hello);
    assert!(ep.poll_event().is_none());
    let t = ep.poll_transmit(now).unwrap();
    assert!(matches!(decode_sent(&t.bytes), Datagram::Ack { sack: None, .. }));
    assert_eq!(ep.stats().hellos_received, 1);
}

#[test]
fn acks_beyond_what_was_sent_are_clamped() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    for seq in 1..=3 {
        ep.send_durable(now, NodeId(1), seq, vec![seq as u8; 10]).unwrap();
    }
    while ep.poll_transmit(now).is_some() {}
    ep.handle_datagram(
        now,
        addr(1),
        &raw_from(2, 0, RawHeader { ack: 1_000, ..FROM1 }, &ack_fields(0, 0, 0, b""), None),
    );
    assert_eq!(ep.stats().ack_beyond_sent, 1);
    assert_eq!(ep.poll_event(), Some(Event::Acked { peer: NodeId(1), seq: 3 }));
    let v = ep.peer_view(NodeId(1)).unwrap();
    assert_eq!((v.acked_by_peer, v.unacked_messages, v.timer), (3, 0, None));
    // The next message is 4, as before.
    assert!(matches!(ep.send_durable(now, NodeId(1), 5, vec![]), Err(TransportError::SequenceGap { expected: 4, .. })));
}

fn keyed(node: u64, key: Key) -> EndpointConfig {
    let mut c = config(node);
    c.key = Some(key);
    c
}

#[test]
fn keyed_endpoints_reject_forged_and_unkeyed_datagrams() {
    let key = [0x42; 32];
    let mut w = pair(12, NetProfile::perfect(), keyed(1, key), keyed(2, key));
    w.nodes[0].record = true;
    let (a, b) = (w.id(0), w.id(1));
    send_many(&mut w, 0, 1, 1, 3, 100_000);
    assert!(w.run_until(Duration::from_secs(5), |w| w.acked(0).get(&b) == Some(&3)));
    assert_eq!(w.nodes[1].received.len(), 3);
    let captured = w.nodes[0].sent_log[0].1.clone();
    assert_eq!(captured[4], wire::FLAG_KEYED);
    let (now, from) = (w.now, w.nodes[0].addr);
    let ep = &mut w.nodes[1].ep;
    // A flipped bit anywhere.
    for at in [0usize, 9, 30, 70, captured.len() - 1] {
        let mut forged = captured.clone();
        forged[at] ^= 0x04;
        ep.handle_datagram(now, from, &forged);
    }
    // A datagram sealed with another key.
    let mut other = Vec::new();
    let h = Header { sender: a, receiver: b, incarnation: 1, ack: 0 };
    wire::encode(&Datagram::Hello { header: h }, Some(&[0x43; 32]), &mut other);
    ep.handle_datagram(now, from, &other);
    let s = ep.stats();
    // Flipping a bit of the magic or version is caught before the MAC is even computed.
    assert_eq!(s.rejected_mac + s.rejected_malformed, 6);
    assert!(s.rejected_mac >= 5);
    // An unkeyed datagram.
    ep.handle_datagram(
        now,
        from,
        &raw_from(3, 0, RawHeader { sender: 1, receiver: 2, incarnation: 9, ack: 0 }, b"", None),
    );
    assert_eq!(ep.stats().rejected_auth_mode, 1);
    assert!(ep.poll_event().is_none(), "no restart from an unauthenticated HELLO");
    // A keyed datagram at an unkeyed endpoint.
    let mut plain = lone(config(2));
    plain.handle_datagram(now, addr(1), &captured);
    assert_eq!(plain.stats().rejected_auth_mode, 1);
    assert_eq!(w.nodes[1].received.len(), 3);
}

#[test]
fn unkeyed_peers_are_pinned_to_their_address_keyed_ones_may_move() {
    // Unkeyed: a datagram with a known peer's id from another address is dropped.
    for key in [None, Some([7u8; 32])] {
        let mut ca = config(1);
        let mut cb = config(2);
        ca.key = key;
        cb.key = key;
        let mut w = pair(13, NetProfile::perfect(), ca, cb);
        let (a, b) = (w.id(0), w.id(1));
        // Capture a's first datagram instead of delivering it.
        let captured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let c = captured.clone();
        w.drop_rule = Some(Box::new(move |_, _, bytes| {
            c.borrow_mut().push(bytes.to_vec());
            true
        }));
        send_many(&mut w, 0, 1, 1, 1, 10);
        w.pump();
        w.drop_rule = None;
        let data = captured.borrow()[0].clone();
        let moved = addr(4_444);
        let now = w.now;
        w.nodes[1].ep.handle_datagram(now, moved, &data);
        w.pump();
        let view = w.nodes[1].ep.peer_view(a).unwrap();
        if key.is_none() {
            assert_eq!(w.nodes[1].ep.stats().address_mismatch, 1);
            assert!(w.nodes[1].received.is_empty());
            assert_eq!(view.addr, w.nodes[0].addr);
        } else {
            assert_eq!(w.nodes[1].received.len(), 1, "authenticated: accepted from the new address");
            assert_eq!(view.addr, moved);
            assert!(w.nodes[1].events.contains(&Event::PeerAddressChanged { peer: a, addr: moved }));
            // A replay of the same (old) datagram from a third address does not move it back
            // or elsewhere; it is answered there once, as a duplicate.
            let third = addr(5_555);
            w.nodes[1].ep.handle_datagram(now, third, &data);
            assert_eq!(w.nodes[1].ep.peer_view(a).unwrap().addr, moved);
            assert_eq!(w.nodes[1].ep.stats().duplicates_dropped, 1);
            let t = w.nodes[1].ep.poll_transmit(now).unwrap();
            assert_eq!(t.dest, third);
            let mut out = Vec::new();
            while let Some(t) = w.nodes[1].ep.poll_transmit(now) {
                out.push(t.dest);
            }
            assert!(out.iter().all(|&d| d == moved), "everything else goes to the followed address");
            assert_eq!(w.nodes[1].received.len(), 1);
            let _ = b;
        }
    }
}

#[test]
fn peer_limits_and_unknown_peers() {
    let now = Instant::now();
    let mut cfg = config(2);
    cfg.peers_max = 3;
    let mut ep = lone(cfg.clone());
    ep.add_peer(NodeId(4), addr(4), PeerRestore::NEW).unwrap();
    assert_eq!(
        ep.add_peer(NodeId(5), addr(5), PeerRestore::NEW),
        Err(TransportError::PeersFull { peer: NodeId(5), max: 3 })
    );
    ep.handle_datagram(now, addr(6), &raw_data(RawHeader { sender: 6, ..FROM1 }, 1, b"x"));
    assert_eq!(ep.stats().unknown_peer, 1);
    assert!(ep.remove_peer(NodeId(4)));
    assert!(!ep.remove_peer(NodeId(4)));
    // Room again: an unknown sender is added as a new peer.
    ep.handle_datagram(now, addr(6), &raw_data(RawHeader { sender: 6, ..FROM1 }, 1, b"x"));
    assert_eq!(ep.poll_event(), Some(Event::NewPeer { peer: NodeId(6), addr: addr(6) }));
    assert_eq!(ep.poll_message().map(|m| (m.peer, m.seq)), Some((NodeId(6), 1)));
    assert_eq!(ep.peers(), [NodeId(1), NodeId(3), NodeId(6)]);
    // Unless unknown peers are refused.
    cfg.accept_unknown_peers = false;
    let mut ep = lone(cfg);
    ep.handle_datagram(now, addr(6), &raw_data(RawHeader { sender: 6, ..FROM1 }, 1, b"x"));
    assert_eq!(ep.stats().unknown_peer, 1);
    assert!(ep.poll_event().is_none() && ep.peer_view(NodeId(6)).is_none());
}

#[test]
fn api_misuse_is_reported() {
    let now = Instant::now();
    let mut ep = lone(config(2));
    let p = NodeId(1);
    assert_eq!(
        ep.send_durable(now, p, 1, vec![0; MESSAGE_BYTES_MAX + 1]),
        Err(TransportError::MessageTooLarge { bytes: MESSAGE_BYTES_MAX + 1, max: MESSAGE_BYTES_MAX })
    );
    assert_eq!(
        ep.send_durable(now, p, 2, b"x".to_vec()),
        Err(TransportError::SequenceGap { peer: p, expected: 1, got: 2 })
    );
    ep.send_durable(now, p, 1, b"x".as_slice()).unwrap();
    assert!(matches!(ep.send_durable(now, p, 1, b"x".to_vec()), Err(TransportError::AlreadyQueued { .. })));
    assert_eq!(ep.send_durable(now, NodeId(9), 1, b"x".to_vec()), Err(TransportError::UnknownPeer { peer: NodeId(9) }));
    assert_eq!(ep.consumed_durable(now, p, 1), Err(TransportError::NotDelivered { peer: p, seq: 1, delivered: 0 }));
    assert_eq!(ep.add_peer(NodeId(2), addr(2), PeerRestore::NEW), Err(TransportError::SelfPeer { peer: NodeId(2) }));
    assert_eq!(ep.add_peer(p, addr(2), PeerRestore::NEW), Err(TransportError::PeerExists { peer: p }));
    assert_eq!(
        ep.add_peer(NodeId(7), addr(7), PeerRestore { next_expected: 0, acked_by_peer: 0 }),
        Err(TransportError::InvalidRestore { peer: NodeId(7) })
    );
    // After a restart: messages the peer already acked are ignored, the rest must follow on.
    ep.add_peer(NodeId(8), addr(8), PeerRestore { next_expected: 4, acked_by_peer: 10 }).unwrap();
    ep.send_durable(now, NodeId(8), 9, b"old".to_vec()).unwrap();
    ep.send_durable(now, NodeId(8), 10, b"old".to_vec()).unwrap();
    ep.send_durable(now, NodeId(8), 11, b"new".to_vec()).unwrap();
    let v = ep.peer_view(NodeId(8)).unwrap();
    assert_eq!((v.next_expected, v.ack_to_send, v.unacked_messages, v.highest_queued_seq), (4, 3, 1, 11));
    // A lower message limit.
    let mut cfg = config(2);
    cfg.message_bytes_max = 1_000;
    let mut ep = lone(cfg);
    assert!(matches!(
        ep.send_durable(now, p, 1, vec![0; 1_001]),
        Err(TransportError::MessageTooLarge { max: 1_000, .. })
    ));
    ep.send_durable(now, p, 1, vec![0; 1_000]).unwrap();
    // Errors name the peer.
    let e = TransportError::SequenceGap { peer: NodeId(7), expected: 3, got: 5 };
    assert!(e.to_string().contains("peer 7"), "{e}");
}

#[test]
fn invalid_configurations_are_refused() {
    let now = Instant::now();
    let bad: Vec<fn(&mut EndpointConfig)> = vec![
        |c| c.datagram_bytes_max = 511,
        |c| c.datagram_bytes_max = 65_508,
        |c| c.message_bytes_max = MESSAGE_BYTES_MAX + 1,
        |c| c.message_bytes_max = 0,
        |c| c.window_messages = 0,
        |c| c.window_fragments = 0,
        |c| c.window_bytes = 0,
        |c| c.reorder_messages_max = 0,
        |c| c.reorder_bytes_max = 1_000,
        |c| c.rto_min = Duration::ZERO,
        |c| c.rto_initial = Duration::from_millis(1),
        |c| c.rto_max = Duration::from_millis(100),
        |c| c.peers_max = 0,
    ];
    for (i, f) in bad.iter().enumerate() {
        let mut c = config(1);
        f(&mut c);
        assert!(matches!(Endpoint::new(c, now), Err(TransportError::InvalidConfig { .. })), "case {i}");
    }
    // The selective-ack bitmap of the largest message must fit in one datagram.
    let mut c = config(1);
    c.datagram_bytes_max = 512;
    c.key = Some([1; 32]);
    assert!(matches!(Endpoint::new(c.clone(), now), Err(TransportError::InvalidConfig { .. })));
    c.message_bytes_max = 440 * 8 * 432; // 3,520 fragments of 432 bytes: 440 bitmap bytes
    let ep = Endpoint::new(c.clone(), now).unwrap();
    assert_eq!(ep.fragment_payload_bytes_max(), 512 - 64 - 16);
    c.message_bytes_max += 1;
    assert!(matches!(Endpoint::new(c, now), Err(TransportError::InvalidConfig { .. })));
    for (datagram, ok) in [(800, false), (801, true)] {
        let mut c = config(1);
        c.key = Some([1; 32]);
        c.datagram_bytes_max = datagram;
        assert_eq!(Endpoint::new(c, now).is_ok(), ok, "{datagram}-byte datagrams, 4 MiB messages, keyed");
    }
    assert_eq!(Endpoint::new(config(1), now).unwrap().fragment_payload_bytes_max(), 1_400 - 64 - 4);
}

#[test]
fn small_datagrams_and_keyed_large_messages() {
    // The smallest datagrams, keyed, and the largest message they allow (3,520 fragments: the
    // selective-ack bitmap fills an ACK); the receiver uses 1,400-byte datagrams.
    const MAX: usize = 440 * 8 * 432;
    let key = [9u8; 32];
    let mut ca = keyed(1, key);
    let cb = keyed(2, key);
    ca.datagram_bytes_max = 512;
    ca.message_bytes_max = MAX;
    let mut net = NetProfile::hostile();
    net.loss_permille = 50;
    let mut w = pair(14, net, ca, cb);
    let (now, a, b) = (w.now, w.id(0), w.id(1));
    w.nodes[0].ep.send_durable(now, b, 1, content(a, b, 1, MAX)).unwrap();
    w.nodes[0].ep.send_durable(now, b, 2, content(a, b, 2, 10)).unwrap();
    let done = w.run_until(Duration::from_secs(120), |w| w.acked(0).get(&b) == Some(&2));
    assert!(
        done,
        "{:?}\n{:?}\n{:?}\n{:?}",
        w.nodes[0].ep.stats(),
        w.nodes[0].ep.peer_view(b),
        w.nodes[1].ep.stats(),
        w.nodes[1].ep.peer_view(a)
    );
    assert!(w.nodes[1].received[0].bytes == content(a, b, 1, MAX));
    assert_eq!(w.nodes[1].received.len(), 2);
}

#[test]
fn udp_loopback_exchange() {
    use std::net::UdpSocket;
    let guard = std::time::Instant::now() + Duration::from_secs(10);
    let sa = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let sb = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    for s in [&sa, &sb] {
        s.set_nonblocking(true).unwrap();
    }
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let now = Instant::now();
    let (a, b) = (NodeId(1), NodeId(2));
    let mut ea = Endpoint::new(config(1), now).unwrap();
    let mut eb = Endpoint::new(config(2), now).unwrap();
    ea.add_peer(b, ab, PeerRestore::NEW).unwrap();
    eb.add_peer(a, aa, PeerRestore::NEW).unwrap();
    const N: u64 = 1_000;
    let size = |seq: u64| if seq == 500 { 1 << 20 } else { (seq as usize * 37) % 3_000 };
    let mut next_a = 1u64; // a → b
    let mut next_b = 1u64; // b → a, a tenth as many
    let mut got_b: Vec<Message> = Vec::new();
    let mut got_a: Vec<Message> = Vec::new();
    let mut acked_a = 0u64;
    let mut buf = vec![0u8; 65_536];
    let started = std::time::Instant::now();
    loop {
        assert!(std::time::Instant::now() < guard, "UDP exchange did not finish in 10 s: {} delivered", got_b.len());
        let now = Instant::now();
        while next_a <= N && ea.peer_view(b).unwrap().unacked_messages < 256 {
            ea.send_durable(now, b, next_a, content(a, b, next_a, size(next_a))).unwrap();
            next_a += 1;
        }
        while next_b <= N / 10 && eb.peer_view(a).unwrap().unacked_messages < 64 {
            eb.send_durable(now, a, next_b, content(b, a, next_b, 100)).unwrap();
            next_b += 1;
        }
        let mut idle = true;
        for (ep, sock, got) in [(&mut ea, &sa, &mut got_a), (&mut eb, &sb, &mut got_b)] {
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        idle = false;
                        ep.handle_datagram(Instant::now(), from, &buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv: {e}"),
                }
            }
            ep.handle_timeout(Instant::now());
            while let Some(m) = ep.poll_message() {
                let now = Instant::now();
                ep.consumed_durable(now, m.peer, m.seq).unwrap();
                got.push(m);
            }
            while let Some(Event::Acked { peer, seq }) = ep.poll_event() {
                if peer == b {
                    acked_a = seq;
                }
            }
            while let Some(t) = ep.poll_transmit(Instant::now()) {
                idle = false;
                assert!(t.dest.ip().is_loopback());
                // A full socket buffer is a loss like any other.
                let _ = sock.send_to(&t.bytes, t.dest);
            }
        }
        if got_b.len() as u64 == N && got_a.len() as u64 == N / 10 && acked_a == N {
            break;
        }
        if idle {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let elapsed = started.elapsed();
    for (i, m) in got_b.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1);
        assert!(m.bytes == content(a, b, m.seq, size(m.seq)));
    }
    for (i, m) in got_a.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1);
    }
    eprintln!(
        "UDP loopback: {} + {} messages in {:.3} s; a: {:?}",
        N,
        N / 10,
        elapsed.as_secs_f64(),
        (ea.stats().fragments_sent, ea.stats().fragments_retransmitted, ea.stats().timeouts)
    );
}

#[test]
fn the_same_inputs_give_the_same_outputs() {
    // A seeded run replays exactly: what a whole-cluster simulation relies on.
    let run = || {
        let mut w = World::new(99, NetProfile::hostile());
        for n in 1..=3 {
            w.add(config(n));
        }
        w.mesh();
        for (a, b) in [(0, 1), (1, 2), (2, 0), (0, 2)] {
            send_many(&mut w, a, b, 1, 40, 3_000);
        }
        let now = w.now;
        for n in w.nodes.iter_mut() {
            n.ep.announce_restart(now);
        }
        assert!(
            w.run_until(Duration::from_secs(60), |w| w.nodes.iter().map(|n| n.received.len()).sum::<usize>() == 160)
        );
        let received: Vec<Vec<(u64, u64)>> =
            w.nodes.iter().map(|n| n.received.iter().map(|m| (m.peer.0, m.seq)).collect()).collect();
        let stats: Vec<TransportStats> = w.nodes.iter().map(|n| n.ep.stats().clone()).collect();
        (received, stats, w.now - now, w.datagrams_moved)
    };
    assert_eq!(run(), run());
}

/// Not a check: how fast the endpoints move small messages through the in-test network (run with
/// `cargo test --release -p fams transport::tests::throughput -- --ignored --nocapture`).
#[test]
#[ignore]
fn throughput_of_small_messages() {
    const N: u64 = 200_000;
    let mut w = pair(15, NetProfile::perfect(), config(1), config(2));
    let (a, b) = (w.id(0), w.id(1));
    let payload = vec![7u8; 100];
    let started = std::time::Instant::now();
    let mut next = 1u64;
    loop {
        let now = w.now;
        while next <= N && w.nodes[0].ep.peer_view(b).unwrap().unacked_messages < 1_000 {
            w.nodes[0].ep.send_durable(now, b, next, payload.clone()).unwrap();
            next += 1;
        }
        w.pump();
        w.nodes[1].received.clear();
        if w.nodes[0].ep.peer_view(b).unwrap().acked_by_peer == N {
            break;
        }
        assert!(w.advance());
    }
    let wall = started.elapsed();
    let s = w.nodes[0].ep.stats();
    eprintln!(
        "{N} messages of 100 B {a}→{b}: {:.2} s wall, {:.0} messages/s; {} datagrams sent by the sender, {} by the receiver",
        wall.as_secs_f64(),
        N as f64 / wall.as_secs_f64(),
        s.datagrams_sent,
        w.nodes[1].ep.stats().datagrams_sent
    );
}

mod adversarial {
    use super::*;
    use proptest::prelude::*;

    /// One input to an endpoint: a well-formed datagram with hostile field values, or an action.
    #[derive(Debug, Clone)]
    enum Input {
        Data { seq: u64, len: u32, count_choice: u32, index_choice: u32, incarnation: u64, ack: u64, other_addr: bool },
        Ack { ack: u64, sack: Option<(u64, u32, u8)>, incarnation: u64 },
        Hello { incarnation: u64 },
        Timeout { advance_ms: u64 },
        Pull { consume: bool },
        Send { len: u16 },
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            (1u64..24, 0u32..6000, any::<u32>(), any::<u32>(), 0u64..4, 0u64..40, any::<bool>()).prop_map(
                |(seq, len, count_choice, index_choice, incarnation, ack, other_addr)| Input::Data {
                    seq,
                    len,
                    count_choice,
                    index_choice,
                    incarnation,
                    ack,
                    other_addr
                }
            ),
            (0u64..40, proptest::option::of((0u64..30, 1u32..12, any::<u8>())), 0u64..4)
                .prop_map(|(ack, sack, incarnation)| Input::Ack { ack, sack, incarnation }),
            (0u64..4).prop_map(|incarnation| Input::Hello { incarnation }),
            (0u64..3000).prop_map(|advance_ms| Input::Timeout { advance_ms }),
            any::<bool>().prop_map(|consume| Input::Pull { consume }),
            (0u16..5000).prop_map(|len| Input::Send { len }),
        ]
    }

    fn run(inputs: Vec<Input>, key: Option<Key>) {
        let mut cfg = config(2);
        cfg.key = key;
        cfg.reorder_messages_max = 6;
        cfg.window_messages = 4;
        cfg.window_fragments = 5;
        let mut ep = Endpoint::new(cfg, Instant::now()).unwrap();
        ep.add_peer(NodeId(1), addr(1), PeerRestore::NEW).unwrap();
        let mut now = Instant::now();
        let mut next_send = 1u64;
        let mut delivered = 0u64;
        let mut buf = Vec::new();
        let header = |incarnation, ack| Header { sender: NodeId(1), receiver: NodeId(2), incarnation, ack };
        for input in inputs {
            let mut from = addr(1);
            match input {
                Input::Data { seq, len, count_choice, index_choice, incarnation, ack, other_addr } => {
                    let count = wire::fragment_count_for(len as u64, 400 + (count_choice as u64 % 3000));
                    let index = index_choice as u64 % count;
                    let payload = vec![seq as u8; wire::fragment_range(len as u64, count, index).len()];
                    let fragment = Fragment {
                        seq,
                        message_len: len,
                        frag_index: index as u32,
                        frag_count: count as u32,
                        payload: &payload,
                    };
                    wire::encode(
                        &Datagram::Data { header: header(incarnation, ack), fragment },
                        key.as_ref(),
                        &mut buf,
                    );
                    if other_addr {
                        from = addr(77);
                    }
                }
                Input::Ack { ack, sack, incarnation } => {
                    let bitmap;
                    let sack = match sack {
                        Some((seq, frag_count, bits)) if seq > 0 => {
                            let mut b = vec![bits; (frag_count as usize).div_ceil(8)];
                            if frag_count % 8 != 0 {
                                let last = b.len() - 1;
                                b[last] &= (1u8 << (frag_count % 8)) - 1;
                            }
                            bitmap = b;
                            Some(Sack { seq, frag_count, bitmap: &bitmap })
                        }
                        _ => None,
                    };
                    wire::encode(&Datagram::Ack { header: header(incarnation, ack), sack }, key.as_ref(), &mut buf);
                }
                Input::Hello { incarnation } => {
                    wire::encode(&Datagram::Hello { header: header(incarnation, 0) }, key.as_ref(), &mut buf);
                }
                Input::Timeout { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    ep.handle_timeout(now);
                    continue;
                }
                Input::Pull { consume } => {
                    while let Some(m) = ep.poll_message() {
                        assert_eq!(m.seq, delivered + 1, "in order, once");
                        delivered = m.seq;
                    }
                    if consume && delivered > 0 {
                        ep.consumed_durable(now, NodeId(1), delivered).unwrap();
                    }
                    while ep.poll_event().is_some() {}
                    continue;
                }
                Input::Send { len } => {
                    ep.send_durable(now, NodeId(1), next_send, vec![1u8; len as usize]).unwrap();
                    next_send += 1;
                    continue;
                }
            }
            ep.handle_datagram(now, from, &buf);
            while let Some(t) = ep.poll_transmit(now) {
                assert!(wire::decode(&t.bytes, key.as_ref()).is_ok());
                let v = ep.peer_view(NodeId(1)).unwrap();
                assert!(v.transmitted_messages <= 4);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn hostile_but_well_formed_datagrams_never_break_the_endpoint(
            inputs in proptest::collection::vec(input(), 1..120), keyed in any::<bool>()) {
            run(inputs, keyed.then_some([5u8; 32]));
        }
    }
}
