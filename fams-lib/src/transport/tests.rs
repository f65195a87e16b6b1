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

/// Builds a datagram field by field (no validation), then seals it, for malformed-input tests.
fn raw(kind: u8, flags: u8, fields: &[u8], key: Option<&Key>) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"FT");
    v.push(1);
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&[0; 3]);
    v.extend_from_slice(&1u64.to_le_bytes()); // sender
    v.extend_from_slice(&2u64.to_le_bytes()); // receiver
    v.extend_from_slice(&1u64.to_le_bytes()); // incarnation
    v.extend_from_slice(&0u64.to_le_bytes()); // ack
    v.extend_from_slice(fields);
    Auth::new(key).seal(&mut v);
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
            if cut as usize % 4 == 0 {
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

#[test]
fn decode_errors_are_each_reported() {
    use DecodeError as E;
    let ok_data = data_fields(1, 3, 0, 1, 3, b"abc");
    let cases: Vec<(Vec<u8>, fn(&DecodeError) -> bool)> = vec![
        (vec![0; 10], |e| matches!(e, E::TooShort { .. })),
        (
            {
                let mut v = raw(1, 0, &ok_data, None);
                v[0] = b'X';
                v
            },
            |e| matches!(e, E::BadMagic),
        ),
        (
            {
                let mut v = raw(1, 0, &ok_data, None);
                v[2] = 2;
                v
            },
            |e| matches!(e, E::UnsupportedVersion(2)),
        ),
        (raw(9, 0, &ok_data, None), |e| matches!(e, E::UnknownKind(9))),
        (
            {
                let mut v = raw(1, 0, &ok_data, None);
                v[4] = 2;
                v
            },
            |e| matches!(e, E::UnknownFlags(2)),
        ),
        (
            {
                let mut v = raw(1, 0, &ok_data, None);
                v[6] = 1;
                let n = v.len() - 4;
                v.truncate(n);
                Auth::new(None).seal(&mut v);
                v
            },
            |e| matches!(e, E::ReservedNonzero),
        ),
        (
            {
                let mut v = raw(1, 0, &ok_data, None);
                v[70] ^= 1;
                v
            },
            |e| matches!(e, E::BadChecksum),
        ),
        (raw(1, 1, &ok_data, Some(&[1; 32])), |e| matches!(e, E::AuthMode { datagram_keyed: true })),
        (raw(1, 0, &data_fields(0, 3, 0, 1, 3, b"abc"), None), |e| matches!(e, E::ZeroSequence)),
        (raw(1, 0, &data_fields(1, (4 << 20) + 1, 0, 4000, 0, b""), None), |e| matches!(e, E::MessageTooLarge { .. })),
        (raw(1, 0, &data_fields(1, 3, 0, 0, 3, b"abc"), None), |e| matches!(e, E::FragmentCount { .. })),
        (raw(1, 0, &data_fields(1, 3, 0, 4, 1, b"a"), None), |e| matches!(e, E::FragmentCount { .. })),
        (raw(1, 0, &data_fields(1, 3, 3, 3, 1, b"a"), None), |e| matches!(e, E::FragmentIndex { .. })),
        (raw(1, 0, &data_fields(1, 4, 1, 2, 1, b"a"), None), |e| matches!(e, E::FragmentLength { .. })),
        (raw(1, 0, &data_fields(1, 3, 0, 1, 3, b"ab"), None), |e| matches!(e, E::PayloadLength { .. })),
        (raw(1, 0, &data_fields(1, 3, 0, 1, 3, b"abcd"), None), |e| matches!(e, E::PayloadLength { .. })),
        (raw(1, 0, &[0; 10], None), |e| matches!(e, E::TooShort { .. })),
        (raw(2, 0, &ack_fields(0, 1, 0, b""), None), |e| matches!(e, E::SackInconsistent)),
        (raw(2, 0, &ack_fields(5, 0, 0, b""), None), |e| matches!(e, E::SackInconsistent)),
        (raw(2, 0, &ack_fields(5, 3, 1, &[0b1000]), None), |e| matches!(e, E::SackInconsistent)),
        (raw(2, 0, &ack_fields(5, 9, 1, &[0]), None), |e| matches!(e, E::SackBitmapLength { .. })),
        (raw(2, 0, &ack_fields(5, 9, 2, &[0]), None), |e| matches!(e, E::SackBitmapLength { .. })),
        (raw(2, 0, &ack_fields(0, 0, 0, b"x"), None), |e| matches!(e, E::PayloadLength { .. })),
        (raw(3, 0, b"x", None), |e| matches!(e, E::PayloadLength { .. })),
    ];
    for (i, (bytes, expected)) in cases.iter().enumerate() {
        let e = wire::decode(bytes, None).expect_err(&format!("case {i} decodes"));
        assert!(expected(&e), "case {i}: got {e:?}");
    }
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
         acks {} (sacks {}), timeouts {}, duplicates {}",
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
        sum(|s| s.duplicates_dropped),
    );
}
