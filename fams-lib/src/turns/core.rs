//! The node core: the turn manager as a sans-IO state machine.
//!
//! It owns the heap (an [`ObjectHeap`]), the application and the transport [`Endpoint`]. A
//! driver feeds it datagrams, stdin lines and the time, tells it when the heap's durability
//! descriptor is readable, and carries out what it yields: datagrams to send, bytes to print,
//! the next deadline. The production driver is [`super::node`] (UDP sockets, a real clock); the
//! cluster simulation drives the very same core with a simulated network and clock.
//!
//! # Pipelined output commit
//!
//! A turn runs, its effects are written into the heap (outbox entries, the consumed sequence
//! number, stdout bytes, the alarm) and the heap is committed with `commit_async`, which returns
//! at once with a ticket. The next turn runs while that ticket's record is on its way to the
//! device, so several turns share one device write. What a turn produced — its messages, the
//! acknowledgement of the message it consumed, its output — is held in [`PendingTurn`] and
//! handed to the transport and to stdout only once its ticket is durable. Tickets become durable
//! in order, so outputs leave in turn order. Nothing the world can see ever depends on a turn
//! that a crash could roll back.
//!
//! # After a restart
//!
//! The heap holds every committed turn's outbox: all unacknowledged messages are resent at once
//! (they are durable), the transport announces the new incarnation so peers resend theirs at
//! once too, and delivery resumes from each peer's `consumed + 1`, so no message is processed
//! twice or skipped.

use super::app::{AlarmChange, App, Input, Turn, TurnError, TurnHeap, TurnLimits};
use super::state::{self, NodeSnapshot, OutMessage, StoredAddr};
use crate::alloc::{ObjectError, ObjectHeap, ObjectOptions, PVec};
use crate::mutations::{self, Mutation};
use crate::transport::{self, Endpoint, EndpointConfig, Event, NodeId, PeerRestore, Transmit, TransportError};
use crate::{Heap, Ticket};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How long a node stays idle before it commits acknowledgements on their own (freeing the
/// acknowledged outbox entries in its heap).
pub const HOUSEKEEPING_IDLE: Duration = Duration::from_millis(100);

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Heap(#[from] crate::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{path}: this heap belongs to node {found}, not node {expected}; each node needs its own heap")]
    WrongNode { path: PathBuf, found: NodeId, expected: NodeId },
    #[error("{path}: the heap's turn state has version {found}, this program reads version {supported}")]
    StateVersion { path: PathBuf, found: u64, supported: u64 },
    #[error("{path}: the heap's application schema version is {found}, newer than this program's {supported}; run the newer program")]
    SchemaTooNew { path: PathBuf, found: u64, supported: u64 },
    #[error("{path}: the {input} turn failed: {message}; the heap is unchanged, fix the application and start the node again")]
    SetupTurnFailed { path: PathBuf, input: &'static str, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("invalid node configuration: {0}")]
    Config(String),
}

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: NodeId,
    /// Peers and their addresses. Added to the heap at open; a peer already known gets the
    /// address given here.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// The transport's configuration (its `node` and `incarnation` are set by the node).
    pub endpoint: EndpointConfig,
    /// Turns committed but not yet durable, at most (pipelining depth).
    pub turns_in_flight_max: u64,
    pub limits: TurnLimits,
    /// Stdin lines read ahead of their turns, at most.
    pub stdin_lines_max: usize,
}

impl NodeConfig {
    pub fn new(node: NodeId) -> NodeConfig {
        NodeConfig {
            node,
            peers: Vec::new(),
            endpoint: EndpointConfig::new(node, 0),
            turns_in_flight_max: 64,
            limits: TurnLimits {
                sends_per_turn_max: 1024,
                message_bytes_max: transport::MESSAGE_BYTES_MAX,
                stdout_bytes_per_turn_max: 1 << 20,
                outbox_messages_max: 4096,
            },
            stdin_lines_max: 1024,
        }
    }
}

/// Counters since the node was opened.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    /// Turns committed (failed ones included).
    pub turns: u64,
    /// Turns whose handler failed; rolled back, input consumed.
    pub turns_failed: u64,
    /// Turns started while an earlier turn was not yet durable.
    pub turns_pipelined: u64,
    /// Turns committed synchronously (nothing in flight, no input waiting).
    pub turns_synchronous: u64,
    /// Most turns in flight at once.
    pub turns_in_flight_peak: u64,
    pub turns_durable: u64,
    pub messages_sent: u64,
    pub messages_consumed: u64,
    pub stdin_lines: u64,
    pub stdin_lines_dropped: u64,
    pub alarms: u64,
    /// Housekeeping commits (acknowledged outbox entries freed while no input was waiting).
    pub housekeeping_commits: u64,
    /// The log's device writes since open (each may carry several turns).
    pub device_writes: u64,
    pub stdout_bytes: u64,
    pub peers_restarted: u64,
    /// Messages the transport delivered with a sequence number already consumed (a transport
    /// bug: it promises each sequence number once). Refused, never processed; must stay 0.
    pub duplicate_deliveries_refused: u64,
    /// The transport's counters (datagrams, retransmissions, duplicates, rejections…).
    pub transport: crate::transport::TransportStats,
    /// The heap's counters (commits, pages per commit, where the commit time goes, recovery).
    pub heap: crate::Stats,
    /// Faults the driver injected into outgoing datagrams (fault runs only).
    pub faults_injected: super::faults::FaultCounters,
}

impl NodeStats {
    /// Turns per device write since open (grouping across pipelined turns).
    pub fn turns_per_device_write(&self) -> f64 {
        if self.device_writes == 0 {
            return 0.0;
        }
        (self.turns + self.housekeeping_commits) as f64 / self.device_writes as f64
    }
}

/// A committed turn whose outputs wait for its ticket.
struct PendingTurn {
    ticket: Ticket,
    /// A turn (not a housekeeping or retirement commit).
    is_turn: bool,
    sends: Vec<(NodeId, u64, Vec<u8>)>,
    consumed: Option<(NodeId, u64)>,
    stdout: Vec<u8>,
}

enum FirstTurn {
    Migrate(u64),
    Start,
    Restarted,
}

/// The turn manager of one node; see the module docs.
pub struct NodeCore<A: App> {
    app: A,
    objects: ObjectHeap,
    endpoint: Endpoint,
    config: NodeConfig,
    path: PathBuf,
    pending: VecDeque<PendingTurn>,
    /// Per peer: the sequence number the next message gets (turns in flight included).
    next_seq: BTreeMap<NodeId, u64>,
    /// Per peer: messages sent and not acknowledged (next_seq - 1 - ackd).
    unacked: BTreeMap<NodeId, usize>,
    /// Per peer: the newest acknowledgement heard.
    ackd: BTreeMap<NodeId, u64>,
    /// Per peer: the highest sequence number consumed by a committed turn.
    consumed: BTreeMap<NodeId, u64>,
    /// Acknowledgements not yet recorded in the heap (their outbox entries not yet freed).
    acks_unrecorded: bool,
    /// Addresses learned from the transport, to store in the heap at the next turn.
    addr_updates: BTreeMap<NodeId, SocketAddr>,
    retired: Vec<NodeId>,
    /// Bytes handed to stdout so far (absolute offset into everything ever printed).
    stdout_emitted: u64,
    stdout_ready: VecDeque<Vec<u8>>,
    stdin: VecDeque<Vec<u8>>,
    first: VecDeque<FirstTurn>,
    alarm_unix_ns: u64,
    wall0: SystemTime,
    inst0: Instant,
    groups_at_open: u64,
    stats: NodeStats,
    stop_requested: bool,
    /// Messages from peers and stdin lines alternate, so neither starves the other.
    prefer_stdin: bool,
    /// A message pulled from the transport ahead of its turn (to know whether input waits).
    lookahead: Option<transport::Message>,
    /// The time of the current step.
    last_now: Instant,
    /// When the last turn (or housekeeping commit) was committed.
    last_turn_at: Instant,
}

impl<A: App> NodeCore<A> {
    /// Open the node on `heap` (recovered already by [`Heap::open`]): bump the incarnation and
    /// commit it, rebuild the transport from the heap and queue every unacknowledged message.
    /// `now` and `wall` are the same moment on the monotonic and the wall clock.
    pub fn open(heap: Heap, mut config: NodeConfig, app: A, now: Instant, wall: SystemTime) -> Result<Self, NodeError> {
        let path = heap.path().to_path_buf();
        let node = config.node;
        if node.0 == 0 {
            return Err(NodeError::Config("node id 0 is reserved; use 1 or more".into()));
        }
        if config.turns_in_flight_max == 0 || config.limits.sends_per_turn_max == 0 {
            return Err(NodeError::Config("turns_in_flight_max and sends_per_turn_max must be at least 1".into()));
        }
        if config.limits.outbox_messages_max <= config.limits.sends_per_turn_max {
            return Err(NodeError::Config(format!(
                "outbox_messages_max ({}) must exceed sends_per_turn_max ({})",
                config.limits.outbox_messages_max, config.limits.sends_per_turn_max
            )));
        }
        let mut objects = ObjectHeap::open(heap, &ObjectOptions::default())?;
        objects.set_in_flight_limit(Some(config.turns_in_flight_max), None);
        let fresh = !objects.named_roots().iter().any(|r| r.name == state::STATE_ROOT);
        if fresh {
            objects.set_schema_version(A::SCHEMA_VERSION);
        }
        let schema = objects.schema_version();
        if schema > A::SCHEMA_VERSION {
            return Err(NodeError::SchemaTooNew { path, found: schema, supported: A::SCHEMA_VERSION });
        }

        let mut first = VecDeque::new();
        if schema < A::SCHEMA_VERSION {
            first.push_back(FirstTurn::Migrate(schema));
        }
        let incarnation;
        let mut restore = Vec::new();
        let mut retired = Vec::new();
        let mut outbox = Vec::new();
        let mut stdout_pending = Vec::new();
        let stdout_base;
        let alarm_unix_ns;
        {
            let (st, alloc) = state::node_state(&mut objects)?;
            if st.version != state::STATE_VERSION {
                return Err(NodeError::StateVersion { path, found: st.version, supported: state::STATE_VERSION });
            }
            if st.node == 0 {
                st.node = node.0;
            } else if st.node != node.0 {
                return Err(NodeError::WrongNode { path, found: NodeId(st.node), expected: node });
            }
            st.incarnation += 1;
            incarnation = st.incarnation;
            first.push_back(if st.started { FirstTurn::Restarted } else { FirstTurn::Start });
            for &(peer, addr) in &config.peers {
                if peer == node {
                    return Err(NodeError::Config(format!("node {node} lists itself as a peer")));
                }
                let p = st.peer_or_insert(alloc, peer, Some(addr))?;
                p.addr = StoredAddr::from_socket_addr(addr);
            }
            for (&id, p) in st.peers.iter() {
                if p.retired {
                    retired.push(NodeId(id));
                    continue;
                }
                let Some(addr) = p.addr.to_socket_addr() else { continue };
                restore.push((
                    NodeId(id),
                    addr,
                    PeerRestore { next_expected: p.consumed + 1, acked_by_peer: p.acked_by_peer },
                    p.next_send_seq,
                    p.consumed,
                ));
                for m in p.outbox.iter() {
                    outbox.push((NodeId(id), m.seq, m.bytes.to_vec()));
                }
            }
            stdout_pending.extend_from_slice(&st.stdout_pending);
            stdout_base = st.stdout_base;
            alarm_unix_ns = st.alarm_unix_ns;
        }
        // The new incarnation is durable before any datagram carries it.
        objects.commit()?;

        config.endpoint.node = node;
        config.endpoint.incarnation = incarnation;
        let mut endpoint = Endpoint::new(config.endpoint.clone(), now)?;
        let (mut next_seq, mut unacked, mut ackd, mut consumed) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        restore.sort_by_key(|r| r.0);
        for (peer, addr, r, next, cons) in restore {
            endpoint.add_peer(peer, addr, r)?;
            next_seq.insert(peer, next);
            unacked.insert(peer, (next - 1 - r.acked_by_peer) as usize);
            ackd.insert(peer, r.acked_by_peer);
            consumed.insert(peer, cons);
        }
        outbox.sort_by_key(|m| (m.0, m.1));
        for (peer, seq, bytes) in outbox {
            endpoint.send_durable(now, peer, seq, bytes)?;
        }
        if incarnation > 1 {
            endpoint.announce_restart(now);
        }
        let mut stdout_ready = VecDeque::new();
        if !stdout_pending.is_empty() {
            stdout_ready.push_back(stdout_pending);
        }
        let groups_at_open = objects.stats().groups;
        let core = NodeCore {
            app,
            objects,
            endpoint,
            path,
            pending: VecDeque::new(),
            next_seq,
            unacked,
            ackd,
            consumed,
            acks_unrecorded: false,
            addr_updates: BTreeMap::new(),
            retired,
            stdout_emitted: stdout_base,
            stdout_ready,
            stdin: VecDeque::new(),
            first,
            alarm_unix_ns,
            wall0: wall,
            inst0: now,
            groups_at_open,
            stats: NodeStats::default(),
            stop_requested: false,
            prefer_stdin: false,
            lookahead: None,
            last_now: now,
            last_turn_at: now,
            config,
        };
        tracing::info!(node = %node, incarnation, heap = %core.path.display(), "node opened");
        Ok(core)
    }

    pub fn node(&self) -> NodeId {
        self.config.node
    }

    pub fn objects(&self) -> &ObjectHeap {
        &self.objects
    }

    pub fn app(&self) -> &A {
        &self.app
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn stats(&self) -> NodeStats {
        let mut s = self.stats.clone();
        s.device_writes = self.objects.stats().groups - self.groups_at_open;
        s.transport = self.endpoint.stats().clone();
        s.heap = self.objects.stats();
        s
    }

    /// Every peer's volatile protocol state (addresses, sequence numbers, RTT, buffers).
    pub fn peer_views(&self) -> Vec<(NodeId, crate::transport::PeerView)> {
        self.endpoint.peers().into_iter().filter_map(|p| Some((p, self.endpoint.peer_view(p)?))).collect()
    }

    /// The durable turn state (a copy, without message bodies). Reads the heap.
    pub fn snapshot(&mut self) -> Result<NodeSnapshot, NodeError> {
        let (st, _) = state::node_state(&mut self.objects)?;
        Ok(st.snapshot())
    }

    /// Turns committed but not yet durable.
    pub fn turns_in_flight(&self) -> usize {
        self.pending.len()
    }

    /// For a heap opened with [`crate::WriterMode::Manual`] (simulation): write the next queued
    /// group of commits to the log (see [`crate::Heap::write_step`]). Returns whether one was
    /// written; call [`NodeCore::step`] after it to release the outputs of what became durable.
    pub fn write_step(&mut self) -> Result<bool, NodeError> {
        Ok(self.objects.write_step()?)
    }

    /// Commits queued for the log writer and not yet written (in [`crate::WriterMode::Manual`]:
    /// what the next [`NodeCore::write_step`] writes).
    pub fn writes_queued(&self) -> bool {
        self.objects.in_flight().commits > 0
    }

    /// A datagram arrived.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.endpoint.handle_datagram(now, from, bytes);
    }

    /// A line of stdin arrived (without its newline). Returns false (and drops it) when the
    /// queue of lines waiting for their turns is full: stdin is at-most-once anyway.
    pub fn push_stdin(&mut self, line: Vec<u8>) -> bool {
        if self.stdin.len() >= self.config.stdin_lines_max {
            self.stats.stdin_lines_dropped += 1;
            return false;
        }
        self.stdin.push_back(line);
        true
    }

    /// The heap's durability descriptor: readable when a turn may have become durable.
    pub fn durability_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.objects.durability_fd()
    }

    /// The earliest moment the driver must call [`NodeCore::step`] again without other input.
    /// Deadlines the node cannot act on are left out — an alarm while no turn may start (too
    /// many in flight), housekeeping while turns are in flight: the durability descriptor wakes
    /// the driver then, and a deadline already past would make it spin.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transport = self.endpoint.poll_timeout();
        let alarm =
            (self.alarm_unix_ns != 0 && self.can_start_turn()).then(|| self.instant_of_unix_ns(self.alarm_unix_ns));
        let housekeeping =
            (self.acks_unrecorded && self.pending.is_empty()).then_some(self.last_turn_at + HOUSEKEEPING_IDLE);
        [transport, alarm, housekeeping].into_iter().flatten().min()
    }

    /// Do everything that is due at `now`: timers, released outputs, turns (up to
    /// `turns_max`). Returns the number of turns run.
    pub fn step(&mut self, now: Instant, turns_max: usize) -> Result<usize, NodeError> {
        self.last_now = now;
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        self.release_durable(now)?;
        self.handle_events();
        let ran = self.run_turns(now, turns_max)?;
        if ran == 0 && self.housekeeping_due(now) && self.nothing_to_do(now) {
            self.housekeeping(now)?;
        }
        // Turns are committed asynchronously; what became durable meanwhile goes out now.
        self.release_durable(now)?;
        Ok(ran)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.endpoint.poll_transmit(now)
    }

    /// The next bytes to write to stdout (from durable turns only). The driver must write
    /// them; after a crash they may be written again (at-least-once).
    pub fn poll_stdout(&mut self) -> Option<Vec<u8>> {
        let bytes = self.stdout_ready.pop_front()?;
        self.stdout_emitted += bytes.len() as u64;
        self.stats.stdout_bytes += bytes.len() as u64;
        Some(bytes)
    }

    /// A turn asked to stop, and every turn is durable and its output handed out.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested
    }

    /// Nothing in flight: every turn durable, every output taken, every message acknowledged.
    pub fn is_quiescent(&self) -> bool {
        self.pending.is_empty() && self.stdout_ready.is_empty() && self.unacked.values().all(|&n| n == 0)
    }

    /// Wait (blocking) until every committed turn is durable and release its outputs.
    pub fn flush(&mut self, now: Instant) -> Result<(), NodeError> {
        if let Some(last) = self.pending.back() {
            self.objects.wait(last.ticket)?;
        }
        self.release_durable(now)
    }

    /// Close the node: wait for durability, record what was acknowledged and printed (so a
    /// clean restart re-sends and re-prints nothing), then close the heap with a checkpoint.
    /// Call it after the driver has written everything [`NodeCore::poll_stdout`] returned.
    pub fn close(mut self, now: Instant) -> Result<(), NodeError> {
        self.flush(now)?;
        self.handle_events();
        self.record_housekeeping()?;
        self.objects.commit()?;
        self.objects.close()?;
        Ok(())
    }

    /// Close as a crash would (no flush, no checkpoint): for tests.
    pub fn abandon(self) {
        self.objects.abandon();
    }

    fn wall_at(&self, now: Instant) -> SystemTime {
        self.wall0 + now.saturating_duration_since(self.inst0)
    }

    fn instant_of_unix_ns(&self, ns: u64) -> Instant {
        let wall0 = self.wall0.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        self.inst0 + Duration::from_nanos(ns.saturating_sub(wall0))
    }

    /// Acknowledged outbox entries wait in the heap and the node has been idle a while: the
    /// next turn would free them for free, so a commit of its own is worth it only when no turn
    /// comes for [`HOUSEKEEPING_IDLE`].
    fn housekeeping_due(&self, now: Instant) -> bool {
        self.acks_unrecorded && self.pending.is_empty() && now >= self.last_turn_at + HOUSEKEEPING_IDLE
    }

    fn nothing_to_do(&self, now: Instant) -> bool {
        self.first.is_empty() && self.stdin.is_empty() && !self.alarm_due(now)
    }

    fn alarm_due(&self, now: Instant) -> bool {
        self.alarm_unix_ns != 0 && self.instant_of_unix_ns(self.alarm_unix_ns) <= now
    }

    /// Hand the outputs of every durable turn to the transport and to stdout, in turn order.
    fn release_durable(&mut self, now: Instant) -> Result<(), NodeError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let durable = self.objects.poll_durable()?;
        let early = mutations::is_on(Mutation::TransmitBeforeDurable);
        while self.pending.front().is_some_and(|t| early || t.ticket <= durable) {
            let turn = self.pending.pop_front().expect("checked above");
            for (peer, seq, bytes) in turn.sends {
                self.endpoint.send_durable(now, peer, seq, bytes)?;
            }
            if let Some((peer, seq)) = turn.consumed {
                self.endpoint.consumed_durable(now, peer, seq)?;
            }
            if !turn.stdout.is_empty() {
                self.stdout_ready.push_back(turn.stdout);
            }
            self.stats.turns_durable += turn.is_turn as u64;
        }
        Ok(())
    }

    fn handle_events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Acked { peer, seq } => {
                    let a = self.ackd.entry(peer).or_insert(0);
                    if seq > *a {
                        *a = seq;
                        let next = self.next_seq.get(&peer).copied().unwrap_or(1);
                        self.unacked.insert(peer, next.saturating_sub(1).saturating_sub(seq) as usize);
                        self.acks_unrecorded = true;
                    }
                }
                Event::NewPeer { peer, addr } => {
                    if self.retired.contains(&peer) {
                        self.endpoint.remove_peer(peer);
                        continue;
                    }
                    self.next_seq.entry(peer).or_insert(1);
                    self.unacked.entry(peer).or_insert(0);
                    self.consumed.entry(peer).or_insert(0);
                    self.addr_updates.insert(peer, addr);
                    tracing::info!(node = %self.config.node, %peer, %addr, "new peer");
                }
                Event::PeerAddressChanged { peer, addr } => {
                    self.addr_updates.insert(peer, addr);
                    tracing::info!(node = %self.config.node, %peer, %addr, "peer moved");
                }
                Event::PeerRestarted { peer, incarnation } => {
                    self.stats.peers_restarted += 1;
                    tracing::info!(node = %self.config.node, %peer, incarnation, "peer restarted");
                }
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
    }

    fn outbox_has_room(&self) -> bool {
        let high = self.config.limits.outbox_messages_max - self.config.limits.sends_per_turn_max;
        self.unacked.values().all(|&n| n <= high)
    }

    fn can_start_turn(&self) -> bool {
        !self.stop_requested
            && (self.pending.len() as u64) < self.config.turns_in_flight_max
            && !self.objects.would_block()
    }

    fn run_turns(&mut self, now: Instant, turns_max: usize) -> Result<usize, NodeError> {
        let mut ran = 0;
        while ran < turns_max && self.can_start_turn() {
            if let Some(first) = self.first.pop_front() {
                self.run_setup_turn(now, first)?;
                ran += 1;
                continue;
            }
            if self.alarm_due(now) {
                self.stats.alarms += 1;
                self.run_turn(now, Source::Alarm)?;
                ran += 1;
                continue;
            }
            if !self.outbox_has_room() {
                break;
            }
            let source = if self.prefer_stdin && !self.stdin.is_empty() {
                Source::Stdin(self.stdin.pop_front().expect("not empty"))
            } else if let Some(m) = self.lookahead.take().or_else(|| self.endpoint.poll_message()) {
                Source::Message(m.peer, m.seq, m.bytes)
            } else if let Some(line) = self.stdin.pop_front() {
                Source::Stdin(line)
            } else {
                break;
            };
            self.prefer_stdin = !matches!(source, Source::Stdin(_));
            if let Source::Message(peer, seq, _) = &source {
                let consumed = self.consumed.get(peer).copied().unwrap_or(0);
                if *seq <= consumed {
                    // The transport delivers each sequence number once per lifetime, from
                    // consumed + 1 on; this would be a duplicate: never process it, and count it
                    // (the cluster simulation reports any).
                    debug_assert!(
                        mutations::is_on(Mutation::NoDuplicateSuppression),
                        "transport delivered {peer}'s seq {seq} again (consumed {consumed})"
                    );
                    self.stats.duplicate_deliveries_refused += 1;
                    tracing::error!(node = %self.config.node, %peer, seq, consumed, "transport delivered a duplicate");
                    continue;
                }
                if self.retired.contains(peer) {
                    continue;
                }
            }
            if let Source::Stdin(_) = source {
                self.stats.stdin_lines += 1;
            }
            self.run_turn(now, source)?;
            ran += 1;
        }
        Ok(ran)
    }

    fn run_setup_turn(&mut self, now: Instant, first: FirstTurn) -> Result<(), NodeError> {
        let (input, name) = match first {
            FirstTurn::Migrate(from) => {
                let r = {
                    let mut heap = TurnHeap::new(&mut self.objects);
                    let app = &mut self.app;
                    std::panic::catch_unwind(AssertUnwindSafe(|| app.migrate(&mut heap, from)))
                };
                return match flatten(r) {
                    Ok(()) => {
                        self.objects.set_schema_version(A::SCHEMA_VERSION);
                        self.objects.commit()?;
                        tracing::info!(node = %self.config.node, from, to = A::SCHEMA_VERSION, "heap migrated");
                        Ok(())
                    }
                    Err(message) => {
                        self.objects.rollback()?;
                        Err(NodeError::SetupTurnFailed { path: self.path.clone(), input: "migration", message })
                    }
                };
            }
            FirstTurn::Start => (Source::Start, "start"),
            FirstTurn::Restarted => (Source::Restarted, "restarted"),
        };
        match self.try_turn(now, &input)? {
            Ok(()) => Ok(()),
            Err(message) => {
                self.objects.rollback()?;
                Err(NodeError::SetupTurnFailed { path: self.path.clone(), input: name, message })
            }
        }
    }

    fn run_turn(&mut self, now: Instant, source: Source) -> Result<(), NodeError> {
        if let Err(message) = self.try_turn(now, &source)? {
            tracing::warn!(node = %self.config.node, input = source.kind(), %message, "turn failed; rolled back");
            self.objects.rollback()?;
            self.commit_failed_turn(now, &source, &message)?;
        }
        Ok(())
    }

    /// Run the handler and, if it succeeds, commit the turn. `Ok(Err(message))`: the handler
    /// failed and nothing was committed (the caller rolls back).
    fn try_turn(&mut self, now: Instant, source: &Source) -> Result<Result<(), String>, NodeError> {
        if !self.pending.is_empty() {
            self.stats.turns_pipelined += 1;
        }
        self.record_housekeeping()?;
        let wall = self.wall_at(now);
        let input = source.input();
        let (sends, stdout, alarm, stop) = {
            let mut turn = Turn {
                heap: TurnHeap::new(&mut self.objects),
                node: self.config.node,
                now: wall,
                limits: self.config.limits,
                next_seq: &self.next_seq,
                unacked: &self.unacked,
                ackd: &self.ackd,
                sends: Vec::new(),
                stdout: Vec::new(),
                alarm: AlarmChange::Keep,
                stop: false,
            };
            let app = &mut self.app;
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| app.turn(&mut turn, input)));
            if let Err(message) = flatten(r) {
                return Ok(Err(message));
            }
            (turn.sends, turn.stdout, turn.alarm, turn.stop)
        };
        // A source's alarm is consumed by its turn, unless the turn set a new one.
        let alarm = match (source, alarm) {
            (Source::Alarm, AlarmChange::Keep) => AlarmChange::Clear,
            (_, a) => a,
        };
        if let Err(e) = self.write_effects(source, &sends, &stdout, alarm, None) {
            return Ok(Err(format!("recording the turn's effects in the heap failed: {e}")));
        }
        for (peer, _, _) in &sends {
            *self.next_seq.get_mut(peer).expect("send checks the peer") += 1;
            *self.unacked.entry(*peer).or_insert(0) += 1;
        }
        self.stats.messages_sent += sends.len() as u64;
        self.stop_requested |= stop;
        self.commit_turn(source, sends, stdout)?;
        Ok(Ok(()))
    }

    /// After a rollback: a turn that only consumes the input and records the failure.
    fn commit_failed_turn(&mut self, _now: Instant, source: &Source, message: &str) -> Result<(), NodeError> {
        self.record_housekeeping()?;
        let alarm = if matches!(source, Source::Alarm) { AlarmChange::Clear } else { AlarmChange::Keep };
        self.write_effects(source, &[], &[], alarm, Some(message))?;
        self.stats.turns_failed += 1;
        self.commit_turn(source, Vec::new(), Vec::new())
    }

    /// Is another input waiting for a turn? (Pulls one message ahead from the transport.)
    fn input_waiting(&mut self, now: Instant) -> bool {
        if self.lookahead.is_none() {
            self.lookahead = self.endpoint.poll_message();
        }
        self.lookahead.is_some() || !self.first.is_empty() || !self.stdin.is_empty() || self.alarm_due(now)
    }

    fn commit_turn(
        &mut self,
        source: &Source,
        sends: Vec<(NodeId, u64, Vec<u8>)>,
        stdout: Vec<u8>,
    ) -> Result<(), NodeError> {
        let mut consumed = match source {
            Source::Message(peer, seq, _) => {
                self.consumed.insert(*peer, *seq);
                self.stats.messages_consumed += 1;
                Some((*peer, *seq))
            }
            _ => None,
        };
        if let (true, Some((peer, seq))) = (mutations::is_on(Mutation::AckBeforeDurable), consumed) {
            // Negative control only: acknowledge before the turn is durable.
            self.endpoint.consumed_durable(self.last_now, peer, seq)?;
            consumed = None;
        }
        // Nothing in flight and no other input waiting: nothing could run while this turn's
        // record is written, so write it on this thread (the heap does so when its log writer
        // is idle) — no hand-off to the writer thread and back, the shortest turn latency.
        // Otherwise pipeline: the next turn runs while this one is written.
        let ticket = if self.pending.is_empty() && !self.input_waiting(self.last_now) {
            self.stats.turns_synchronous += 1;
            self.objects.commit()?
        } else {
            self.objects.commit_async()?
        };
        self.housekeeping_committed();
        self.stats.turns += 1;
        self.last_turn_at = self.last_now;
        self.pending.push_back(PendingTurn { ticket, is_turn: true, sends, consumed, stdout });
        self.stats.turns_in_flight_peak = self.stats.turns_in_flight_peak.max(self.pending.len() as u64);
        Ok(())
    }

    /// Write a turn's effects into the node state (in the heap). On a full heap nothing
    /// half-written matters: the caller rolls the turn back.
    fn write_effects(
        &mut self,
        source: &Source,
        sends: &[(NodeId, u64, Vec<u8>)],
        stdout: &[u8],
        alarm: AlarmChange,
        failure: Option<&str>,
    ) -> Result<(), ObjectError> {
        let (st, alloc) = state::node_state(&mut self.objects)?;
        for (peer, seq, bytes) in sends {
            let p = st.peer_or_insert(alloc, *peer, None)?;
            debug_assert_eq!(p.next_send_seq, *seq, "sequence numbers of {peer} out of step");
            let mut body = PVec::new_in(alloc);
            body.try_reserve_exact(bytes.len()).map_err(|_| state::exhausted(bytes.len()))?;
            body.extend_from_slice(bytes);
            p.outbox.try_reserve(1).map_err(|_| state::exhausted(std::mem::size_of::<OutMessage<'_>>()))?;
            p.outbox.push(OutMessage { seq: *seq, bytes: body });
            p.next_send_seq = seq + 1;
            st.messages_sent += 1;
        }
        if !stdout.is_empty() {
            st.stdout_pending.try_reserve(stdout.len()).map_err(|_| state::exhausted(stdout.len()))?;
            st.stdout_pending.extend_from_slice(stdout);
        }
        match source {
            Source::Start => st.started = true,
            Source::Message(peer, seq, _) => {
                let p = st.peer_or_insert(alloc, *peer, None)?;
                debug_assert!(*seq > p.consumed);
                p.consumed = *seq;
                st.messages_consumed += 1;
            }
            _ => {}
        }
        match alarm {
            AlarmChange::Keep => {}
            AlarmChange::Clear => st.alarm_unix_ns = 0,
            AlarmChange::At(ns) => st.alarm_unix_ns = ns,
        }
        self.alarm_unix_ns = st.alarm_unix_ns;
        st.turns += 1;
        if let Some(message) = failure {
            st.turns_failed += 1;
            st.set_last_failure(message);
        }
        Ok(())
    }

    /// Record in the heap what happened outside turns: acknowledgements (freeing outbox
    /// entries), stdout bytes written, addresses learned. Part of the next commit. Idempotent:
    /// after a rollback it is simply done again (the flags are cleared once a commit holds it).
    fn record_housekeeping(&mut self) -> Result<(), ObjectError> {
        let (st, alloc) = state::node_state(&mut self.objects)?;
        if self.acks_unrecorded {
            for (&peer, &acked) in &self.ackd {
                if let Some(p) = st.peers.get_mut(&peer.0) {
                    if acked > p.acked_by_peer {
                        p.acked_by_peer = acked;
                        let k = p.outbox.iter().take_while(|m| m.seq <= acked).count();
                        p.outbox.drain(..k);
                    }
                }
            }
        }
        let written = self.stdout_emitted.saturating_sub(st.stdout_base) as usize;
        if written > 0 {
            let k = written.min(st.stdout_pending.len());
            st.stdout_pending.drain(..k);
            st.stdout_base += k as u64;
        }
        for (&peer, &addr) in &self.addr_updates {
            let p = st.peer_or_insert(alloc, peer, Some(addr))?;
            p.addr = StoredAddr::from_socket_addr(addr);
        }
        Ok(())
    }

    /// A commit now holds the housekeeping recorded before it.
    fn housekeeping_committed(&mut self) {
        self.acks_unrecorded = false;
        self.addr_updates.clear();
    }

    /// No input is waiting but acknowledged outbox entries are still in the heap: free them
    /// in a commit of their own, so an idle node's outbox empties.
    fn housekeeping(&mut self, now: Instant) -> Result<(), NodeError> {
        self.record_housekeeping()?;
        self.commit_bookkeeping()?;
        self.housekeeping_committed();
        self.last_turn_at = now;
        self.stats.housekeeping_commits += 1;
        Ok(())
    }

    /// Commit what the node changed outside a turn; it is in flight like a turn, with no outputs.
    fn commit_bookkeeping(&mut self) -> Result<(), NodeError> {
        let ticket = self.objects.commit_async()?;
        let bookkeeping = PendingTurn { ticket, is_turn: false, sends: Vec::new(), consumed: None, stdout: Vec::new() };
        self.pending.push_back(bookkeeping);
        Ok(())
    }

    /// Retire a peer that is gone for good: drop its outbox, refuse its messages (committed at
    /// once, asynchronously).
    pub fn retire_peer(&mut self, peer: NodeId) -> Result<(), NodeError> {
        state::node_state(&mut self.objects)?.0.retire(peer);
        self.endpoint.remove_peer(peer);
        self.retired.push(peer);
        self.unacked.remove(&peer);
        self.next_seq.remove(&peer);
        self.commit_bookkeeping()
    }
}

/// Where a turn's input comes from.
enum Source {
    Start,
    Restarted,
    Alarm,
    Message(NodeId, u64, Vec<u8>),
    Stdin(Vec<u8>),
}

impl Source {
    fn input(&self) -> Input<'_> {
        match self {
            Source::Start => Input::Start,
            Source::Restarted => Input::Restarted,
            Source::Alarm => Input::Alarm,
            Source::Message(from, seq, bytes) => Input::Message { from: *from, seq: *seq, bytes },
            Source::Stdin(line) => Input::Stdin(line),
        }
    }

    fn kind(&self) -> &'static str {
        self.input().kind()
    }
}

/// A handler's result, with a panic turned into its message.
fn flatten(r: std::thread::Result<Result<(), TurnError>>) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(panic) => Err(match panic.downcast::<String>() {
            Ok(s) => format!("panicked: {s}"),
            Err(p) => match p.downcast::<&'static str>() {
                Ok(s) => format!("panicked: {s}"),
                Err(_) => "panicked".to_string(),
            },
        }),
    }
}
