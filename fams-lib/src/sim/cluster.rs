//! A deterministic simulation of a whole turn cluster (in the style of FoundationDB's simulator
//! and TigerBeetle's VOPR): `n` nodes, each a [`NodeCore`] running an [`App`] on a heap on its own
//! [`SimMachine`](super::SimMachine), connected by a simulated network under a simulated clock.
//!
//! Everything is driven by one event queue ordered by (simulated time, sequence number): datagram
//! deliveries, the log writer's device writes (each heap is opened with
//! [`WriterMode::Manual`](crate::WriterMode::Manual), and a write completes after a simulated
//! device latency, so turns pipeline and share writes), node timers, faults and restarts. There
//! is no real time, no thread and no socket; addresses are made-up loopback identities
//! (`127.0.0.1:(10 + id)`) never bound. Every choice comes from the seed, so **a seed replays the
//! same run exactly**: [`SeedReport::trace_hash`] hashes every datagram, output and fault.
//!
//! Faults, all drawn from the seed, during the first part of a run only (the rest is fault-free,
//! partitions healed, so liveness can be judged):
//! - network: loss, duplication, delay ranges with reordering, partitions that heal;
//! - process kill: the core is dropped as a crash would drop it; the machine keeps what the
//!   kernel had accepted (written but unflushed data survives; commits never written are lost);
//! - power cut: now, or during one of the next few I/O operations (a log write, a write-back, a
//!   checkpoint); unflushed writes are kept, dropped or torn; the machine reboots;
//! - power cut during recovery: while the heap is being reopened after a crash.
//!
//! Invariants checked in every run (violations are recorded with the seed, never panicked on):
//! - output commit: at every recovery, the recovered heap accounts for everything the node let
//!   out — every DATA sequence number sent is below `next_send_seq`, every cumulative ack sent is
//!   at most `consumed` (no ack ahead of durability), every stdout byte printed is within what
//!   durable turns produced;
//! - the transport's contract: no sequence number delivered twice to the turn manager;
//! - liveness: once faults stop, the cluster quiesces (every message delivered, acknowledged and
//!   committed) within [`ClusterConfig::liveness_bound`] of simulated time;
//! - the application's own invariants, by the checker given to [`Cluster::new`], over every
//!   node's heap after the run (e.g. [`crate::apps::bank::check_cluster`]).
//!
//! # Running your own application
//!
//! Give [`Cluster::new`] a factory that makes your [`App`] for each node and seed, and a checker
//! that reads your invariants from the nodes' heaps once a run has quiesced; then run seeds. A
//! failing seed's report names it, and running that seed again replays the failure exactly.
//! A complete example (a vote counter whose tally must match what every voter cast) is
//! `tests/tests/turns_sim_user_app.rs`:
//!
//! ```no_run
//! use fams::sim::cluster::{AppChecker, AppFactory, Cluster, ClusterConfig};
//! # struct MyApp;
//! # impl fams::turns::App for MyApp {
//! #     fn turn(&mut self, _: &mut fams::turns::Turn<'_>, _: fams::turns::Input<'_>) -> Result<(), fams::turns::TurnError> { Ok(()) }
//! # }
//! let factory: AppFactory<MyApp> = Box::new(|_node, _seed| MyApp);
//! let checker: AppChecker = Box::new(|seed, heaps| {
//!     let mut problems = Vec::new();
//!     // read each node's roots from `heaps` and push a message per broken invariant
//!     # let _ = (seed, heaps, &mut problems);
//!     problems
//! });
//! let mut cluster = Cluster::new("/var/tmp".as_ref(), ClusterConfig::new(3), factory, checker)?;
//! for seed in 1..=1000 {
//!     let report = cluster.run_seed(seed);
//!     assert_eq!(report.violations, 0, "{:?}", report.details); // replay: cluster.run_seed(seed)
//! }
//! # Ok::<(), fams::Error>(())
//! ```

use super::{seed_randomness, SimHeap, SimRng};
use crate::alloc::{ObjectHeap, ObjectOptions};
use crate::transport::wire::Datagram;
use crate::transport::{decode, NodeId, Transmit};
use crate::turns::{App, NodeConfig, NodeCore, NodeSnapshot, NodeStats};
use crate::{HeapOptions, WriterMode};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Most nodes in a simulated cluster.
pub const NODES_MAX: usize = 7;

/// The made-up address of a node (never bound to a socket).
pub fn addr_of(node: NodeId) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10 + node.0 as u16))
}

/// Violations kept per seed (the count goes on).
const DETAILS_PER_SEED_MAX: usize = 8;

/// How a cluster is simulated.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Nodes, `2..=NODES_MAX` (ids `1..=nodes`).
    pub nodes: usize,
    pub heap_bytes: u64,
    pub log_bytes: u64,
    /// Faults happen during the first part of a run, of a length drawn from the seed up to this.
    pub fault_time_max: Duration,
    /// After faults stop, the cluster must be quiescent within this much simulated time.
    pub liveness_bound: Duration,
    /// Inject faults at all (false: a fault-free run).
    pub faults: bool,
    /// Most events one seed may take (a run beyond it is reported as a liveness failure).
    pub events_max: u64,
}

impl ClusterConfig {
    pub fn new(nodes: usize) -> ClusterConfig {
        ClusterConfig {
            nodes,
            heap_bytes: 1 << 20,
            log_bytes: 1 << 20,
            fault_time_max: Duration::from_millis(150),
            liveness_bound: Duration::from_secs(60),
            faults: true,
            events_max: 2_000_000,
        }
    }
}

/// What one seed did and found.
#[derive(Clone, Debug, Default)]
pub struct SeedReport {
    pub seed: u64,
    /// Hash of every datagram delivered and sent, every output and every fault, in order: two
    /// runs of one seed give the same hash.
    pub trace_hash: u64,
    pub events: u64,
    pub sim_time: Duration,
    pub turns: u64,
    /// Turns started while at least one earlier turn was in flight (not yet durable).
    pub turns_pipelined: u64,
    pub device_writes: u64,
    /// Application messages sent (turn sends).
    pub messages: u64,
    pub datagrams: u64,
    pub datagrams_lost: u64,
    pub datagrams_duplicated: u64,
    /// Datagrams delivered after one sent later on the same link.
    pub datagrams_reordered: u64,
    pub partitions: u64,
    pub kills: u64,
    pub power_cuts: u64,
    /// Power cuts that hit while a node was recovering (reopening its heap or its node).
    pub cuts_during_recovery: u64,
    pub recoveries_checked: u64,
    pub violations: u64,
    /// The first violations, each naming the seed.
    pub details: Vec<String>,
}

impl SeedReport {
    fn violation(&mut self, now: Duration, what: String) {
        self.violations += 1;
        if self.details.len() < DETAILS_PER_SEED_MAX {
            self.details.push(format!("seed {} t={:?}: {what}", self.seed, now));
        }
    }
}

/// Totals over many seeds.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub seeds: u64,
    pub events: u64,
    pub sim_time: Duration,
    pub turns: u64,
    pub turns_pipelined: u64,
    pub device_writes: u64,
    pub messages: u64,
    pub datagrams: u64,
    pub datagrams_lost: u64,
    pub datagrams_duplicated: u64,
    pub datagrams_reordered: u64,
    pub partitions: u64,
    pub kills: u64,
    pub power_cuts: u64,
    pub cuts_during_recovery: u64,
    pub recoveries_checked: u64,
    pub violations: u64,
    /// Seeds with at least one violation.
    pub failing_seeds: Vec<u64>,
    pub details: Vec<String>,
}

impl Totals {
    pub fn add(&mut self, r: &SeedReport) {
        self.seeds += 1;
        self.events += r.events;
        self.sim_time += r.sim_time;
        self.turns += r.turns;
        self.turns_pipelined += r.turns_pipelined;
        self.device_writes += r.device_writes;
        self.messages += r.messages;
        self.datagrams += r.datagrams;
        self.datagrams_lost += r.datagrams_lost;
        self.datagrams_duplicated += r.datagrams_duplicated;
        self.datagrams_reordered += r.datagrams_reordered;
        self.partitions += r.partitions;
        self.kills += r.kills;
        self.power_cuts += r.power_cuts;
        self.cuts_during_recovery += r.cuts_during_recovery;
        self.recoveries_checked += r.recoveries_checked;
        self.violations += r.violations;
        if r.violations > 0 {
            self.failing_seeds.push(r.seed);
            if self.details.len() < 40 {
                self.details.extend(r.details.iter().take(40 - self.details.len()).cloned());
            }
        }
    }
}

/// Makes a node's application: `(node, seed)`. Called at every (re)open, so it must give the same
/// application for the same arguments.
pub type AppFactory<A> = Box<dyn FnMut(NodeId, u64) -> A>;

/// Checks the application's invariants over every node's heap once a run has quiesced:
/// `(seed, heaps in node order)`; returns the problems found.
pub type AppChecker = Box<dyn FnMut(u64, &mut [ObjectHeap]) -> Vec<String>>;

/// A simulated cluster: its machines (formatted once, reset for every seed) and its application.
pub struct Cluster<A: App> {
    config: ClusterConfig,
    dir: PathBuf,
    heaps: Vec<SimHeap>,
    factory: AppFactory<A>,
    checker: AppChecker,
}

impl<A: App> Drop for Cluster<A> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl<A: App> Cluster<A> {
    /// Format `config.nodes` heaps in a new directory under `work_dir` (it must not be a tmpfs:
    /// heaps refuse volatile storage). The directory is removed when the cluster is dropped.
    pub fn new(
        work_dir: &Path,
        config: ClusterConfig,
        factory: AppFactory<A>,
        checker: AppChecker,
    ) -> Result<Cluster<A>, crate::Error> {
        if !(2..=NODES_MAX).contains(&config.nodes) {
            return Err(crate::Error::InvalidArgument(format!("a cluster has 2 to {NODES_MAX} nodes")));
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = work_dir.join(format!("fams-cluster-sim-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, "creating the simulation directory", e))?;
        let mut heaps = Vec::new();
        for i in 0..config.nodes {
            let path = dir.join(format!("node{}.heap", i + 1));
            heaps.push(SimHeap::format(&path, config.heap_bytes, config.log_bytes, i as u64)?);
        }
        Ok(Cluster { config, dir, heaps, factory, checker })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Run one seed from freshly formatted heaps.
    pub fn run_seed(&mut self, seed: u64) -> SeedReport {
        seed_randomness(Some(seed));
        struct Unseed;
        impl Drop for Unseed {
            fn drop(&mut self) {
                seed_randomness(None);
            }
        }
        let _unseed = Unseed;
        let mut report = SeedReport { seed, ..SeedReport::default() };
        for (i, h) in self.heaps.iter().enumerate() {
            if let Err(e) = h.reset() {
                report.violation(Duration::ZERO, format!("resetting a machine: {e}"));
                return report;
            }
            // What a power cut does to cached writes (kept, dropped, torn) follows the seed too.
            h.machine.reseed(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let mut run = Run::new(self, seed, report);
        run.run();
        run.finish()
    }
}

/// A seed's network and fault parameters.
#[derive(Clone, Debug)]
struct Params {
    loss_pct: u64,
    dup_pct: u64,
    delay_min_ns: u64,
    delay_spread_ns: u64,
    /// Datagrams held back by an extra delay (reordering).
    spike_pct: u64,
    spike_ns: u64,
    device_min_ns: u64,
    device_spread_ns: u64,
    fault_end_ns: u64,
    recovery_cut_pct: u64,
    turns_in_flight_max: u64,
    down_ns_max: u64,
}

impl Params {
    fn draw(rng: &mut SimRng, config: &ClusterConfig) -> Params {
        let fault_max = config.fault_time_max.as_nanos() as u64;
        Params {
            loss_pct: rng.below(10),
            dup_pct: rng.below(5),
            delay_min_ns: 10_000 + rng.below(200_000),
            delay_spread_ns: rng.below(3_000_000),
            spike_pct: rng.below(10),
            spike_ns: 1_000_000 + rng.below(10_000_000),
            device_min_ns: 10_000 + rng.below(100_000),
            device_spread_ns: rng.below(2_000_000),
            fault_end_ns: if config.faults { fault_max / 4 + rng.below(fault_max - fault_max / 4 + 1) } else { 0 },
            recovery_cut_pct: rng.below(60),
            turns_in_flight_max: [1, 2, 3, 4, 8, 16, 64][rng.below(7) as usize],
            down_ns_max: 1 + rng.below(30_000_000),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    Kill,
    CutNow,
    /// Cut during one of the next few I/O operations.
    CutAt(u64),
}

#[derive(Debug)]
enum Ev {
    Deliver { from: usize, to: usize, link_seq: u64, bytes: Vec<u8> },
    WriteDone { node: usize, epoch: u64 },
    Wake { node: usize, epoch: u64, at: u64 },
    Crash { node: usize, kind: Crash },
    Restart { node: usize },
    Partition { side: u64 },
    Heal,
    FaultsEnd,
}

/// What one node let out into the world, over all its incarnations, to check against what its
/// heap recovers (output commit): the highest DATA sequence number and cumulative ack it sent
/// each peer, and how far into its stdout it printed. Reusable by any harness that drives a
/// [`NodeCore`] and crashes it.
#[derive(Clone, Debug, Default)]
pub struct OutputLedger {
    pub data_seq_max: BTreeMap<NodeId, u64>,
    pub ack_max: BTreeMap<NodeId, u64>,
    /// Absolute stdout offset of the next byte this incarnation prints.
    pub stdout_pos: u64,
    /// Highest absolute stdout offset ever printed (end of the bytes printed).
    pub stdout_high: u64,
}

impl OutputLedger {
    /// Note a datagram node `me` let out. Err: it does not decode, or its header does not name
    /// `me` as the sender.
    pub fn record_transmit(&mut self, me: NodeId, t: &Transmit) -> Result<(), String> {
        let d = decode(&t.bytes, None).map_err(|e| format!("node {me} sent a datagram that does not decode: {e}"))?;
        let h = *d.header();
        let a = self.ack_max.entry(h.receiver).or_insert(0);
        *a = (*a).max(h.ack);
        if let Datagram::Data { fragment, .. } = d {
            let s = self.data_seq_max.entry(h.receiver).or_insert(0);
            *s = (*s).max(fragment.seq);
        }
        if h.sender != me {
            return Err(format!("node {me} sent a datagram from {} to {} at {}", h.sender, h.receiver, t.dest));
        }
        Ok(())
    }

    /// Note stdout bytes the node printed.
    pub fn record_stdout(&mut self, bytes: usize) {
        self.stdout_pos += bytes as u64;
        self.stdout_high = self.stdout_high.max(self.stdout_pos);
    }

    /// The node was reopened on a heap whose turn state is `snap`: it prints again from there.
    pub fn reopened(&mut self, snap: Option<&NodeSnapshot>) {
        self.stdout_pos = snap.map_or(0, |s| s.stdout_base);
    }

    /// Everything let out must be covered by the recovered durable state `snap` (None: the heap
    /// holds no turn state yet). Returns the violations.
    pub fn check(&self, me: NodeId, snap: Option<&NodeSnapshot>) -> Vec<String> {
        let peer = |p: NodeId| snap.and_then(|s| s.peers.iter().find(|x| x.peer == p));
        let mut problems = Vec::new();
        for (&p, &seq) in &self.data_seq_max {
            let next = peer(p).map_or(1, |x| x.next_send_seq);
            if seq >= next {
                problems.push(format!(
                    "output commit: node {me} sent DATA seq {seq} to {p}, but its recovered heap's next_send_seq is \
                     {next} (a message of a turn that did not survive left the node)"
                ));
            }
        }
        for (&p, &ack) in &self.ack_max {
            let consumed = peer(p).map_or(0, |x| x.consumed);
            if ack > consumed {
                problems.push(format!(
                    "ack before durable: node {me} acknowledged {p}'s seq {ack}, but its recovered heap consumed only \
                     {consumed}"
                ));
            }
        }
        let durable_end = snap.map_or(0, |s| s.stdout_base + s.stdout_pending_bytes);
        if self.stdout_high > durable_end {
            problems.push(format!(
                "output commit: node {me} printed {} stdout bytes, but its recovered durable turns produced {durable_end}",
                self.stdout_high
            ));
        }
        problems
    }
}

struct SimNode<A: App> {
    id: NodeId,
    core: Option<NodeCore<A>>,
    /// Bumped at every crash: events of an earlier incarnation are ignored.
    epoch: u64,
    write_pending: bool,
    wake_at: Option<u64>,
    restart_pending: bool,
    cut_armed: bool,
    emitted: OutputLedger,
}

/// Fowler–Noll–Vo 1a: a hash that is the same in every process and build.
struct Trace(u64);

impl Trace {
    fn mix(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
    fn mix_u64(&mut self, v: u64) {
        self.mix(&v.to_le_bytes());
    }
}

struct Run<'c, A: App> {
    cluster: &'c mut Cluster<A>,
    seed: u64,
    rng: SimRng,
    p: Params,
    report: SeedReport,
    nodes: Vec<SimNode<A>>,
    queue: BTreeMap<(u64, u64), Ev>,
    next_ev: u64,
    /// Events other than wake-ups pending (deliveries, writes, restarts, faults).
    busy_events: u64,
    now_ns: u64,
    t0: Instant,
    wall0: SystemTime,
    /// Nodes on the partition's side (bit i: node i), 0 when healed.
    partition: u64,
    link_sent: BTreeMap<(usize, usize), u64>,
    link_delivered: BTreeMap<(usize, usize), u64>,
    faults_over: bool,
    stopped: bool,
    stats: NodeStats,
    quiesced: bool,
}

impl<'c, A: App> Run<'c, A> {
    fn new(cluster: &'c mut Cluster<A>, seed: u64, report: SeedReport) -> Run<'c, A> {
        let mut rng = SimRng::new(seed);
        let p = Params::draw(&mut rng, &cluster.config);
        let nodes = (0..cluster.config.nodes)
            .map(|i| SimNode {
                id: NodeId(i as u64 + 1),
                core: None,
                epoch: 0,
                write_pending: false,
                wake_at: None,
                restart_pending: false,
                cut_armed: false,
                emitted: OutputLedger::default(),
            })
            .collect();
        Run {
            cluster,
            seed,
            rng,
            p,
            report,
            nodes,
            queue: BTreeMap::new(),
            next_ev: 0,
            busy_events: 0,
            now_ns: 0,
            t0: Instant::now(),
            wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            partition: 0,
            link_sent: BTreeMap::new(),
            link_delivered: BTreeMap::new(),
            faults_over: false,
            stopped: false,
            stats: NodeStats::default(),
            quiesced: false,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_nanos(self.now_ns)
    }

    fn wall(&self) -> SystemTime {
        self.wall0 + Duration::from_nanos(self.now_ns)
    }

    fn at(&self) -> Duration {
        Duration::from_nanos(self.now_ns)
    }

    fn violation(&mut self, what: String) {
        let at = self.at();
        self.report.violation(at, what);
    }

    fn trace(&mut self, tag: u8, node: usize, bytes: &[u8]) {
        let t = &mut self.report.trace_hash;
        let mut tr = Trace(*t);
        tr.mix_u64(self.now_ns);
        tr.mix(&[tag, node as u8]);
        tr.mix_u64(bytes.len() as u64);
        tr.mix(bytes);
        *t = tr.0;
    }

    fn push(&mut self, at_ns: u64, ev: Ev) {
        if !matches!(ev, Ev::Wake { .. }) {
            self.busy_events += 1;
        }
        self.queue.insert((at_ns, self.next_ev), ev);
        self.next_ev += 1;
    }

    fn heap_options(&self) -> HeapOptions {
        HeapOptions {
            writer: WriterMode::Manual,
            // Checkpoint often, so cuts land in checkpoints too.
            checkpoint_threshold_bytes: Some(self.cluster.config.log_bytes / 5),
            ..HeapOptions::default()
        }
    }

    fn node_config(&self, i: usize) -> NodeConfig {
        let id = self.nodes[i].id;
        let mut c = NodeConfig::new(id);
        for n in &self.nodes {
            if n.id != id {
                c.peers.push((n.id, addr_of(n.id)));
            }
        }
        c.turns_in_flight_max = self.p.turns_in_flight_max;
        c
    }

    fn schedule_faults(&mut self) {
        self.report.trace_hash = 0xcbf2_9ce4_8422_2325 ^ self.seed;
        let end = self.p.fault_end_ns;
        if end > 0 {
            let n = self.nodes.len() as u64;
            for _ in 0..self.rng.below(7) {
                let at = self.rng.below(end);
                let node = self.rng.below(n) as usize;
                let kind = match self.rng.below(10) {
                    0..=3 => Crash::Kill,
                    4..=5 => Crash::CutNow,
                    _ => Crash::CutAt(1 + self.rng.below(8)),
                };
                self.push(at, Ev::Crash { node, kind });
            }
            for _ in 0..self.rng.below(3) {
                let at = self.rng.below(end);
                // A non-empty proper subset of the nodes.
                let side = 1 + self.rng.below((1 << n) - 2);
                let heal = (at + 1_000_000 + self.rng.below(50_000_000)).min(end);
                self.push(at, Ev::Partition { side });
                self.push(heal, Ev::Heal);
            }
        }
        self.push(end, Ev::FaultsEnd);
    }

    fn run(&mut self) {
        self.schedule_faults();
        for i in 0..self.nodes.len() {
            self.open_node(i);
            if self.stopped {
                return;
            }
        }
        let deadline = self.p.fault_end_ns + self.cluster.config.liveness_bound.as_nanos() as u64;
        while !self.stopped {
            if self.faults_over && self.is_quiescent() {
                self.quiesced = true;
                break;
            }
            let Some(((t, _), ev)) = self.queue.pop_first() else { break };
            if t > deadline {
                break;
            }
            self.report.events += 1;
            if self.report.events > self.cluster.config.events_max {
                break;
            }
            self.now_ns = self.now_ns.max(t);
            if !matches!(ev, Ev::Wake { .. }) {
                self.busy_events -= 1;
            }
            self.handle(ev);
        }
        if !self.quiesced && !self.stopped {
            let detail = self.app_problems().join("; ");
            self.violation(format!(
                "liveness: not quiescent {:?} after faults stopped ({} events; {} pending): {detail}",
                self.at().saturating_sub(Duration::from_nanos(self.p.fault_end_ns)),
                self.report.events,
                self.busy_events
            ));
        }
    }

    fn is_quiescent(&self) -> bool {
        self.busy_events == 0
            && self.nodes.iter().all(|n| {
                n.core.as_ref().is_some_and(|c| c.is_quiescent() && c.poll_timeout().is_none() && !c.writes_queued())
            })
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, link_seq, bytes } => {
                if self.partition != 0 && ((self.partition >> from) & 1) != ((self.partition >> to) & 1) {
                    self.report.datagrams_lost += 1;
                    return;
                }
                let Some(core) = self.nodes[to].core.as_mut() else {
                    // Nobody listens on a dead node's port.
                    self.report.datagrams_lost += 1;
                    return;
                };
                let seen = self.link_delivered.entry((from, to)).or_insert(0);
                if link_seq < *seen {
                    self.report.datagrams_reordered += 1;
                }
                *seen = (*seen).max(link_seq);
                let now = self.t0 + Duration::from_nanos(self.now_ns);
                core.handle_datagram(now, addr_of(NodeId(from as u64 + 1)), &bytes);
                self.trace(b'D', to, &bytes);
                self.drive(to);
            }
            Ev::WriteDone { node, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                self.nodes[node].write_pending = false;
                let Some(core) = self.nodes[node].core.as_mut() else { return };
                let r = core.write_step();
                self.trace(b'W', node, &[]);
                if let Err(e) = r {
                    self.node_error(node, format!("log write: {e}"));
                    return;
                }
                self.drive(node);
            }
            Ev::Wake { node, epoch, at } => {
                if self.nodes[node].epoch != epoch || self.nodes[node].wake_at != Some(at) {
                    return;
                }
                self.nodes[node].wake_at = None;
                self.drive(node);
            }
            Ev::Crash { node, kind } => self.crash(node, kind),
            Ev::Restart { node } => {
                self.nodes[node].restart_pending = false;
                self.open_node(node);
            }
            Ev::Partition { side } => {
                self.partition = side;
                self.report.partitions += 1;
                self.trace(b'P', 0, &side.to_le_bytes());
            }
            Ev::Heal => {
                self.partition = 0;
                self.trace(b'H', 0, &[]);
            }
            Ev::FaultsEnd => {
                self.faults_over = true;
                self.partition = 0;
                for n in &mut self.nodes {
                    if n.cut_armed {
                        n.cut_armed = false;
                    }
                }
                for h in &self.cluster.heaps {
                    if h.machine.powered() {
                        h.machine.cut_power_at(None);
                    }
                }
                self.trace(b'E', 0, &[]);
                // Wake every node: some may wait for nothing else.
                for i in 0..self.nodes.len() {
                    self.drive(i);
                }
            }
        }
    }

    /// A node's operation failed: a power cut it ran into, or a real failure (a violation).
    fn node_error(&mut self, i: usize, what: String) {
        if !self.cluster.heaps[i].machine.powered() {
            self.crash_now(i, true);
        } else {
            self.violation(format!("node {} failed without a fault: {what}", self.nodes[i].id));
            self.stopped = true;
        }
    }

    /// Let node `i` do what is due: timers, released outputs, turns; send what it yields and
    /// schedule its next write and wake-up.
    fn drive(&mut self, i: usize) {
        let now = self.now();
        let turns_max = 1 + self.rng.below(8) as usize;
        let Some(core) = self.nodes[i].core.as_mut() else { return };
        let ran = match core.step(now, turns_max) {
            Ok(ran) => ran,
            Err(e) => {
                self.node_error(i, format!("step: {e}"));
                return;
            }
        };
        let mut transmits = Vec::new();
        while let Some(t) = core.poll_transmit(now) {
            transmits.push(t);
        }
        let mut out = Vec::new();
        while let Some(bytes) = core.poll_stdout() {
            out.extend_from_slice(&bytes);
        }
        let queued = core.writes_queued();
        let timeout = core.poll_timeout();
        for t in transmits {
            self.transmit(i, t);
        }
        if !out.is_empty() {
            self.nodes[i].emitted.record_stdout(out.len());
            self.trace(b'O', i, &out);
        }
        if !self.cluster.heaps[i].machine.powered() {
            // A cut during a synchronous commit that the step did not notice (yet).
            self.crash_now(i, true);
            return;
        }
        let epoch = self.nodes[i].epoch;
        if queued && !self.nodes[i].write_pending {
            self.nodes[i].write_pending = true;
            let d = self.p.device_min_ns + self.rng.below(self.p.device_spread_ns + 1);
            self.push(self.now_ns + d, Ev::WriteDone { node: i, epoch });
        }
        let mut wake = timeout.map(|t| t.saturating_duration_since(self.t0).as_nanos() as u64);
        if wake.is_some_and(|w| w <= self.now_ns) {
            // Due already, yet the step did not act: the node waits for turns in flight (an
            // in-flight bound). The write that completes them drives it; without one, look
            // again a little later.
            wake = if self.nodes[i].write_pending { None } else { Some(self.now_ns + 100_000) };
        }
        if ran == turns_max {
            // More input may wait: come back after a little CPU time.
            let soon = self.now_ns + 2_000 + self.rng.below(20_000);
            wake = Some(wake.map_or(soon, |w| w.min(soon)));
        }
        if let Some(w) = wake {
            let w = w.max(self.now_ns + 1);
            if self.nodes[i].wake_at.is_none_or(|cur| w < cur) {
                self.nodes[i].wake_at = Some(w);
                self.push(w, Ev::Wake { node: i, epoch, at: w });
            }
        }
    }

    /// Note what a datagram says (output commit) and put it on the network.
    fn transmit(&mut self, i: usize, t: Transmit) {
        self.report.datagrams += 1;
        self.trace(b'T', i, &t.bytes);
        let me = self.nodes[i].id;
        let Some(to) = self.nodes.iter().position(|n| addr_of(n.id) == t.dest) else {
            self.violation(format!("node {me} sent a datagram to {}, no node's address", t.dest));
            return;
        };
        if let Err(e) = self.nodes[i].emitted.record_transmit(me, &t) {
            self.violation(e);
        }
        if self.faults_over {
            let d = self.p.delay_min_ns + self.rng.below(self.p.delay_spread_ns + 1);
            self.deliver_after(i, to, d, t.bytes);
            return;
        }
        let r = self.rng.below(100);
        if r < self.p.loss_pct {
            self.report.datagrams_lost += 1;
            return;
        }
        let copies = if r < self.p.loss_pct + self.p.dup_pct { 2 } else { 1 };
        if copies == 2 {
            self.report.datagrams_duplicated += 1;
        }
        for _ in 0..copies {
            let mut d = self.p.delay_min_ns + self.rng.below(self.p.delay_spread_ns + 1);
            if self.rng.below(100) < self.p.spike_pct {
                d += self.rng.below(self.p.spike_ns);
            }
            self.deliver_after(i, to, d, t.bytes.clone());
        }
    }

    fn deliver_after(&mut self, from: usize, to: usize, delay_ns: u64, bytes: Vec<u8>) {
        let link = self.link_sent.entry((from, to)).or_insert(0);
        *link += 1;
        let link_seq = *link;
        self.push(self.now_ns + delay_ns, Ev::Deliver { from, to, link_seq, bytes });
    }

    fn crash(&mut self, i: usize, kind: Crash) {
        if self.nodes[i].core.is_none() || self.faults_over {
            return;
        }
        self.trace(b'C', i, &[kind_code(kind)]);
        match kind {
            Crash::Kill => {
                self.report.kills += 1;
                self.crash_now(i, false);
            }
            Crash::CutNow => {
                self.cluster.heaps[i].machine.cut_power_now();
                self.crash_now(i, true);
            }
            Crash::CutAt(ops) => {
                self.cluster.heaps[i].machine.cut_power_at(Some(ops));
                self.nodes[i].cut_armed = true;
            }
        }
    }

    /// The node dies now (its machine's power is already off for a power cut).
    fn crash_now(&mut self, i: usize, power_cut: bool) {
        let Some(core) = self.nodes[i].core.take() else { return };
        self.add_stats(&core.stats());
        core.abandon();
        if power_cut {
            self.report.power_cuts += 1;
            self.nodes[i].cut_armed = false;
        }
        let n = &mut self.nodes[i];
        n.epoch += 1;
        n.write_pending = false;
        n.wake_at = None;
        self.trace(b'X', i, &[u8::from(power_cut)]);
        self.schedule_restart(i);
    }

    fn schedule_restart(&mut self, i: usize) {
        if self.nodes[i].restart_pending {
            return;
        }
        self.nodes[i].restart_pending = true;
        let down = self.rng.below(self.p.down_ns_max);
        self.push(self.now_ns + down, Ev::Restart { node: i });
    }

    fn add_stats(&mut self, s: &NodeStats) {
        self.stats.turns += s.turns;
        self.stats.turns_pipelined += s.turns_pipelined;
        self.stats.messages_sent += s.messages_sent;
        self.stats.device_writes += s.device_writes;
        self.stats.duplicate_deliveries_refused += s.duplicate_deliveries_refused;
    }

    /// (Re)open node `i`: reboot its machine if the power is off, recover the heap, check that it
    /// accounts for everything the node let out, open the node. A cut may be armed to hit during
    /// this; then the node stays down and tries again later.
    fn open_node(&mut self, i: usize) {
        if self.nodes[i].core.is_some() {
            return;
        }
        let sim = &self.cluster.heaps[i];
        if !sim.machine.powered() {
            if let Err(e) = sim.reboot() {
                self.violation(format!("rebooting node {}'s machine: {e}", self.nodes[i].id));
                self.stopped = true;
                return;
            }
        }
        let armed = !self.faults_over && self.report.events > 0 && self.rng.below(100) < self.p.recovery_cut_pct;
        if armed {
            sim.machine.cut_power_at(Some(1 + self.rng.below(10)));
        }
        let opts = self.heap_options();
        let opened = self.recover(i, &opts);
        let sim = &self.cluster.heaps[i];
        if !sim.machine.powered() {
            // The cut hit while recovering.
            self.report.power_cuts += 1;
            self.report.cuts_during_recovery += 1;
            self.trace(b'R', i, &[]);
            self.nodes[i].epoch += 1;
            self.schedule_restart(i);
            return;
        }
        if armed {
            sim.machine.cut_power_at(None);
        }
        match opened {
            Ok(core) => {
                self.nodes[i].core = Some(core);
                self.nodes[i].epoch += 1;
                self.trace(b'U', i, &[]);
                self.drive(i);
            }
            Err(e) => {
                self.violation(format!("node {} does not reopen: {e}", self.nodes[i].id));
                self.stopped = true;
            }
        }
    }

    fn recover(&mut self, i: usize, opts: &HeapOptions) -> Result<NodeCore<A>, String> {
        let heap = self.cluster.heaps[i].open(opts).map_err(|e| format!("heap: {e}"))?;
        let mut objects = ObjectHeap::open(heap, &ObjectOptions::default())
            .map_err(|e| format!("object heap: {e}"))?;
        let snap = crate::turns::state::snapshot(&mut objects).map_err(|e| format!("turn state: {e}"))?;
        self.report.recoveries_checked += 1;
        self.check_output_commit(i, snap.as_ref());
        self.nodes[i].emitted.reopened(snap.as_ref());
        let id = self.nodes[i].id;
        let app = (self.cluster.factory)(id, self.seed);
        let config = self.node_config(i);
        let (now, wall) = (self.now(), self.wall());
        NodeCore::open(objects.into_heap(), config, app, now, wall).map_err(|e| format!("node: {e}"))
    }

    /// Everything node `i` let out must be covered by its recovered durable state.
    fn check_output_commit(&mut self, i: usize, snap: Option<&NodeSnapshot>) {
        for p in self.nodes[i].emitted.check(self.nodes[i].id, snap) {
            self.violation(p);
        }
    }

    /// The application's invariants over the nodes' heaps as they are (for a liveness report).
    fn app_problems(&mut self) -> Vec<String> {
        let down: Vec<String> =
            self.nodes.iter().filter(|n| n.core.is_none()).map(|n| format!("node {} down", n.id)).collect();
        let busy: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref().map(|c| (n.id, c)))
            .filter(|(_, c)| !c.is_quiescent())
            .map(|(id, c)| format!("node {id}: {} turns in flight, not quiescent", c.turns_in_flight()))
            .collect();
        down.into_iter().chain(busy).collect()
    }

    /// Close every node cleanly, check output commit once more on the reopened heaps, and run
    /// the application's checker over them.
    fn finish(mut self) -> SeedReport {
        let now = self.now();
        for i in 0..self.nodes.len() {
            if let Some(core) = self.nodes[i].core.take() {
                self.add_stats(&core.stats());
                if self.cluster.heaps[i].machine.powered() {
                    if let Err(e) = core.close(now) {
                        self.violation(format!("closing node {}: {e}", self.nodes[i].id));
                    }
                } else {
                    core.abandon();
                }
            }
        }
        self.report.sim_time = self.at();
        self.report.turns = self.stats.turns;
        self.report.turns_pipelined = self.stats.turns_pipelined;
        self.report.messages = self.stats.messages_sent;
        self.report.device_writes = self.stats.device_writes;
        if self.stats.duplicate_deliveries_refused > 0 {
            self.violation(format!(
                "exactly-once: the transport delivered {} already consumed messages again (the turn manager \
                 refused them)",
                self.stats.duplicate_deliveries_refused
            ));
        }
        if self.stopped {
            return self.report;
        }
        let opts = HeapOptions { writer: WriterMode::Manual, ..HeapOptions::default() };
        let mut heaps = Vec::new();
        for i in 0..self.nodes.len() {
            let sim = &self.cluster.heaps[i];
            if !sim.machine.powered() {
                let _ = sim.reboot();
            }
            let opened = sim.open(&opts).map_err(|e| e.to_string()).and_then(|h| {
                ObjectHeap::open(h, &ObjectOptions::default()).map_err(|e| e.to_string())
            });
            match opened {
                Ok(mut objects) => {
                    match crate::turns::state::snapshot(&mut objects) {
                        Ok(snap) => self.check_output_commit(i, snap.as_ref()),
                        Err(e) => self.violation(format!("node {}: reading the turn state: {e}", self.nodes[i].id)),
                    }
                    heaps.push(objects);
                }
                Err(e) => {
                    self.violation(format!("node {}: reopening after the run: {e}", self.nodes[i].id));
                    return self.report;
                }
            }
        }
        if self.quiesced {
            let problems = (self.cluster.checker)(self.seed, &mut heaps);
            for p in problems {
                self.violation(p);
            }
        }
        drop(heaps);
        self.report
    }
}

fn kind_code(kind: Crash) -> u8 {
    match kind {
        Crash::Kill => 1,
        Crash::CutNow => 2,
        Crash::CutAt(n) => 2 + n as u8,
    }
}

/// The bank ([`crate::apps::bank`]) as a simulated cluster: each node makes a few transfers (how
/// many, and how far apart, from the seed); the checker is [`crate::apps::bank::check_cluster`].
pub fn bank_cluster(
    work_dir: &Path,
    config: ClusterConfig,
) -> Result<Cluster<crate::apps::bank::BankApp>, crate::Error> {
    let factory: AppFactory<crate::apps::bank::BankApp> = Box::new(|_node, seed| {
        let mut rng = SimRng::new(seed ^ 0xba4c);
        crate::apps::bank::BankApp {
            transfers: 2 + rng.below(12),
            interval: Duration::from_micros(rng.below(3) * rng.below(2_000)),
            verbose: true,
        }
    });
    let checker: AppChecker = Box::new(|_seed, heaps| {
        let mut reports = Vec::new();
        let mut problems = Vec::new();
        for h in heaps.iter_mut() {
            match crate::apps::bank::report(h) {
                Ok(Some(r)) => reports.push(r),
                Ok(None) => {
                    problems.push(format!("{}: no bank (the Start turn never committed)", h.heap().path().display()))
                }
                Err(e) => problems.push(format!("{}: reading the bank: {e}", h.heap().path().display())),
            }
        }
        problems.extend(crate::apps::bank::check_cluster(&reports).into_iter().map(|p| format!("bank: {p}")));
        problems
    });
    Cluster::new(work_dir, config, factory, checker)
}

/// The token ring ([`crate::apps::ring`]) as a simulated cluster: the token makes a number of
/// hops drawn from the seed; the checker is [`crate::apps::ring::check_cluster`].
pub fn ring_cluster(
    work_dir: &Path,
    config: ClusterConfig,
) -> Result<Cluster<crate::apps::ring::RingApp>, crate::Error> {
    let hops = |seed: u64| 5 + SimRng::new(seed ^ 0x7269).below(40);
    let factory: AppFactory<crate::apps::ring::RingApp> =
        Box::new(move |_node, seed| crate::apps::ring::RingApp { hops: hops(seed) });
    let nodes = config.nodes as u64;
    let checker: AppChecker = Box::new(move |seed, heaps| {
        let mut reports = Vec::new();
        let mut problems = Vec::new();
        for h in heaps.iter_mut() {
            match crate::apps::ring::report(h) {
                Ok(Some(r)) => reports.push(r),
                Ok(None) => {
                    problems.push(format!("{}: no ring (the Start turn never committed)", h.heap().path().display()))
                }
                Err(e) => problems.push(format!("{}: reading the ring: {e}", h.heap().path().display())),
            }
        }
        problems.extend(
            crate::apps::ring::check_cluster(&reports, nodes, hops(seed)).into_iter().map(|p| format!("ring: {p}")),
        );
        problems
    });
    Cluster::new(work_dir, config, factory, checker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work_dir() -> PathBuf {
        PathBuf::from("/var/tmp")
    }

    #[test]
    fn a_seed_replays_exactly() {
        let mut a = bank_cluster(&work_dir(), ClusterConfig::new(3)).unwrap();
        let mut b = bank_cluster(&work_dir(), ClusterConfig::new(3)).unwrap();
        for seed in 0..6 {
            let (ra, rb) = (a.run_seed(seed), b.run_seed(seed));
            assert_eq!(ra.violations, 0, "{:#?}", ra.details);
            assert_eq!(ra.trace_hash, rb.trace_hash, "seed {seed} does not replay");
            assert_eq!((ra.events, ra.turns, ra.datagrams), (rb.events, rb.turns, rb.datagrams));
            // And again on the same machines.
            assert_eq!(a.run_seed(seed).trace_hash, ra.trace_hash);
        }
        assert_ne!(a.run_seed(1).trace_hash, a.run_seed(2).trace_hash);
    }
}

#[cfg(test)]
mod smoke {
    use super::*;

    fn run<A: App>(mut c: Cluster<A>, seeds: std::ops::Range<u64>) -> Totals {
        let mut t = Totals::default();
        for s in seeds {
            t.add(&c.run_seed(s));
        }
        t
    }

    #[test]
    fn some_seeds_of_each_app_find_nothing() {
        let started = std::time::Instant::now();
        let t = run(bank_cluster(Path::new("/var/tmp"), ClusterConfig::new(3)).unwrap(), 0..40);
        eprintln!("bank: {t:#?} in {:?}", started.elapsed());
        assert_eq!(t.violations, 0, "{:#?}", t.details);
        let started = std::time::Instant::now();
        let t = run(ring_cluster(Path::new("/var/tmp"), ClusterConfig::new(4)).unwrap(), 0..40);
        eprintln!("ring: {t:#?} in {:?}", started.elapsed());
        assert_eq!(t.violations, 0, "{:#?}", t.details);
    }
}
