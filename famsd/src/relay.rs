//! `famsd relay`: a UDP fault relay between node processes on loopback. It drops, duplicates,
//! reorders and delays the datagrams the nodes send each other, all drawn from one seed; no root
//! and no `tc netem` needed (the test kernel has no netem, see kernel-facts.md).
//!
//! **Faces.** The relay binds one socket S_i per node i, the *face* of node i; every other node
//! is configured with peer i at S_i. A datagram arriving on S_i from node j's real address A_j
//! is forwarded to A_i **from S_j**, j's own face. So node i sees every datagram of j come from
//! the address it was told is j's, and its replies (sent to S_j) come back through the relay to
//! A_j. Each node's view of its peers' addresses therefore stays consistent, and nothing looks
//! like a peer that moved: an unkeyed node (which drops datagrams from any address but the one
//! configured for that peer) and a keyed one (which would follow a fresh authenticated datagram
//! to a new address) both keep talking through the relay.
//!
//! **Faults**, per datagram arriving on a face from a known node, in this order from one
//! generator: lost (probability `loss`); else duplicated (probability `duplicate`: two copies);
//! then each copy is held for a delay uniform in `delay_ms` (a delay of 0 forwards at once), or,
//! with probability `reorder`, held past the whole delay range (from `delay_max + 1 ms` to
//! `delay_max + 1 ms + max(delay_max, 10 ms)`), so that datagrams sent after it overtake it. The same seed and the
//! same arrivals give the same fates; real time decides the arrivals, so a run on sockets is not
//! replayable datagram for datagram, only its fault rates are.
//!
//! Held datagrams wait in one queue bounded in datagrams and bytes; a datagram that does not
//! fit is dropped and counted (`queue_full_dropped`). A datagram from an address that is no
//! node's is counted and dropped (`unknown_source_dropped`), as is one a node sends to its own
//! face (`self_addressed_dropped`). `reordered` counts datagrams that reached their node after a
//! datagram of the same sender that had reached the relay later (measured at forwarding, on the
//! path j → i), whether a reorder hold or two delays caused it.
//!
//! Only 127.0.0.0/8 addresses are accepted, for nodes and faces. The relay stops on SIGTERM or
//! SIGINT, after `--timeout-s`, or (with `--exit-with-parent`) when the process that started it
//! is gone; held datagrams are then discarded (counted in `queued_at_exit`).

use crate::workload::Rng;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::BinaryHeap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What happens to the datagrams: probabilities in [0, 1), delays in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelayFaults {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
    /// Each forwarded copy is held uniformly this long (min, max), in milliseconds.
    pub delay_ms: (u64, u64),
    pub seed: u64,
}

/// Longest delay accepted (a bound on how long a datagram can sit in the queue).
pub const DELAY_MS_MAX: u64 = 10_000;

impl RelayFaults {
    /// No faults: a plain forwarder.
    pub const NONE: RelayFaults = RelayFaults { loss: 0.0, duplicate: 0.0, reorder: 0.0, delay_ms: (0, 0), seed: 1 };

    /// "LOSS,DUP,REORDER,DELAY_MIN..DELAY_MAX,SEED", e.g. "0.2,0.1,0.1,0..20,7" (the form of
    /// `famsd node cluster --relay`, beside `--faults LOSS,DUP,REORDER,SEED`).
    pub fn parse(s: &str) -> Result<RelayFaults, String> {
        let bad = |why: String| {
            format!(
                "`{s}`: {why}; relay faults are LOSS,DUP,REORDER,DELAY_MIN..DELAY_MAX,SEED with probabilities \
in [0, 1) and delays in milliseconds, e.g. 0.2,0.1,0.1,0..20,7"
            )
        };
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 5 {
            return Err(bad(format!("{} fields, not 5", parts.len())));
        }
        let p = |i: usize| parts[i].parse::<f64>().map_err(|_| bad(format!("`{}` is not a number", parts[i])));
        let f = RelayFaults {
            loss: p(0)?,
            duplicate: p(1)?,
            reorder: p(2)?,
            delay_ms: parse_delay_range(parts[3]).map_err(bad)?,
            seed: parts[4].parse().map_err(|_| bad(format!("the seed `{}` is not a whole number", parts[4])))?,
        };
        f.check().map_err(bad)?;
        Ok(f)
    }

    /// Probabilities in [0, 1), delays ordered and at most [`DELAY_MS_MAX`].
    pub fn check(&self) -> Result<(), String> {
        for (name, p) in [("loss", self.loss), ("duplicate", self.duplicate), ("reorder", self.reorder)] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("the {name} probability {p} is not in [0, 1)"));
            }
        }
        let (lo, hi) = self.delay_ms;
        if lo > hi || hi > DELAY_MS_MAX {
            return Err(format!("the delay range {lo}..{hi} ms is not ordered or exceeds {DELAY_MS_MAX} ms"));
        }
        Ok(())
    }

    /// The flags of `famsd relay` that ask for these faults.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--loss".into(),
            self.loss.to_string(),
            "--duplicate".into(),
            self.duplicate.to_string(),
            "--reorder".into(),
            self.reorder.to_string(),
            "--delay-ms".into(),
            format!("{}..{}", self.delay_ms.0, self.delay_ms.1),
            "--seed".into(),
            self.seed.to_string(),
        ]
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "loss": self.loss, "duplicate": self.duplicate, "reorder": self.reorder,
            "delay_ms": [self.delay_ms.0, self.delay_ms.1], "seed": self.seed,
        })
    }
}

/// "0..20" (or "5" for a fixed delay) → (0, 20) milliseconds.
pub fn parse_delay_range(s: &str) -> Result<(u64, u64), String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a delay range in milliseconds like 0..20");
    let (lo, hi) = match t.split_once("..") {
        Some((lo, hi)) => (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?),
        None => {
            let d: u64 = t.parse().map_err(|_| bad())?;
            (d, d)
        }
    };
    if lo > hi || hi > DELAY_MS_MAX {
        return Err(format!("{}: low above high, or above {DELAY_MS_MAX} ms", bad()));
    }
    Ok((lo, hi))
}

/// Refuse anything outside 127.0.0.0/8: the relay is a test tool for loopback only.
pub fn check_loopback(addr: SocketAddr, what: &str) -> Result<(), String> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Ok(()),
        _ => Err(format!(
            "{what} {addr} is not a loopback address: the relay accepts only 127.0.0.0/8 (e.g. 127.0.0.1:7001)"
        )),
    }
}

/// Where a datagram that arrived on a face goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// From node `from` to node `to`: send it to `to`'s real address from `from`'s face.
    Forward { from: usize, to: usize },
    /// The source is no node's real address.
    UnknownSource,
    /// A node sent to its own face.
    SelfAddressed,
}

/// The nodes' real addresses; face i belongs to node i.
#[derive(Clone, Debug)]
pub struct FaceMap {
    nodes: Vec<SocketAddr>,
}

impl FaceMap {
    pub fn new(nodes: Vec<SocketAddr>) -> Result<FaceMap, String> {
        if nodes.len() < 2 {
            return Err(format!("a relay needs at least 2 nodes, not {}", nodes.len()));
        }
        for (i, a) in nodes.iter().enumerate() {
            check_loopback(*a, &format!("node {}", i + 1))?;
            if nodes[..i].contains(a) {
                return Err(format!("node address {a} is given twice"));
            }
        }
        Ok(FaceMap { nodes })
    }

    pub fn nodes(&self) -> &[SocketAddr] {
        &self.nodes
    }

    /// A datagram arrived on face `face` (node `face`'s) from `src`.
    pub fn route(&self, face: usize, src: SocketAddr) -> Route {
        match self.nodes.iter().position(|a| *a == src) {
            None => Route::UnknownSource,
            Some(from) if from == face => Route::SelfAddressed,
            Some(from) => Route::Forward { from, to: face },
        }
    }
}

/// One copy to forward: after `hold` (zero: at once); `reorder` says it was held past the delay
/// range on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub hold: Duration,
    pub reorder: bool,
}

/// A datagram's fate: no copies (lost), one, or two (duplicated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fate {
    pub copies: Vec<Hold>,
}

/// Draws each datagram's fate from the seed.
pub struct FaultDraw {
    faults: RelayFaults,
    rng: Rng,
}

impl FaultDraw {
    pub fn new(faults: RelayFaults) -> FaultDraw {
        FaultDraw { faults, rng: Rng::new(faults.seed ^ 0x72_656c_6179) }
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn draw(&mut self) -> Fate {
        if self.chance(self.faults.loss) {
            return Fate { copies: Vec::new() };
        }
        let n = if self.chance(self.faults.duplicate) { 2 } else { 1 };
        let (lo, hi) = (self.faults.delay_ms.0 * 1000, self.faults.delay_ms.1 * 1000);
        let copies = (0..n)
            .map(|_| {
                if self.chance(self.faults.reorder) {
                    // Past the delay range: everything sent within the next (hi - lo + 1 ms) and
                    // not itself reordered overtakes it.
                    let extra = 1000 + self.rng.below(hi.max(10_000) + 1);
                    Hold { hold: Duration::from_micros(hi + extra), reorder: true }
                } else {
                    Hold { hold: Duration::from_micros(lo + self.rng.below(hi - lo + 1)), reorder: false }
                }
            })
            .collect();
        Fate { copies }
    }
}

/// What the relay did; written as JSON (`--json`, `--stats-json`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Datagrams that arrived on the faces (all of them).
    pub received: u64,
    /// Copies sent on to a node (a duplicated datagram counts twice).
    pub forwarded: u64,
    /// Datagrams lost on purpose.
    pub dropped: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Copies held past the delay range on purpose.
    pub reorder_held: u64,
    /// Copies that reached their node after a later datagram of the same sender (measured).
    pub reordered: u64,
    /// Copies held for a delay above zero (reorder holds included).
    pub delayed: u64,
    /// Copies dropped because the queue of held datagrams was full.
    pub queue_full_dropped: u64,
    /// Datagrams from an address that is no node's.
    pub unknown_source_dropped: u64,
    /// Datagrams a node sent to its own face.
    pub self_addressed_dropped: u64,
    /// Copies the kernel refused to send (e.g. a full socket buffer).
    pub send_errors: u64,
    /// Failed receives (other than "nothing to read").
    pub recv_errors: u64,
    pub queue_peak_datagrams: u64,
    pub queue_peak_bytes: u64,
    /// Held datagrams discarded when the relay stopped.
    pub queued_at_exit: u64,
}

impl RelayCounters {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "received": self.received, "forwarded": self.forwarded, "dropped": self.dropped,
            "duplicated": self.duplicated, "reorder_held": self.reorder_held, "reordered": self.reordered,
            "delayed": self.delayed, "queue_full_dropped": self.queue_full_dropped,
            "unknown_source_dropped": self.unknown_source_dropped,
            "self_addressed_dropped": self.self_addressed_dropped, "send_errors": self.send_errors,
            "recv_errors": self.recv_errors, "queue_peak_datagrams": self.queue_peak_datagrams,
            "queue_peak_bytes": self.queue_peak_bytes, "queued_at_exit": self.queued_at_exit,
        })
    }
}

/// How to run a relay.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The nodes' real (listening) addresses, node 1 first.
    pub nodes: Vec<SocketAddr>,
    /// The faces to bind, one per node (port 0: any free port); empty: 127.0.0.1:0 for each.
    pub faces: Vec<SocketAddr>,
    pub faults: RelayFaults,
    /// Held datagrams at most, and their bytes at most; beyond, a copy is dropped and counted.
    pub queue_datagrams_max: usize,
    pub queue_bytes_max: usize,
    /// Stop after this long.
    pub timeout: Duration,
    /// Rewrite the counters here every `stats_interval` and at exit.
    pub stats_json: Option<PathBuf>,
    pub stats_interval: Duration,
    /// Stop when the parent process is gone (so a harness killed hard leaves no relay behind).
    pub exit_with_parent: bool,
}

impl RelayConfig {
    pub fn new(nodes: Vec<SocketAddr>, faults: RelayFaults) -> RelayConfig {
        RelayConfig {
            nodes,
            faces: Vec::new(),
            faults,
            queue_datagrams_max: 4096,
            queue_bytes_max: 8 << 20,
            timeout: Duration::from_secs(600),
            stats_json: None,
            stats_interval: Duration::from_secs(1),
            exit_with_parent: false,
        }
    }
}

/// A datagram waiting for its time.
struct Held {
    due: Instant,
    /// Queueing order: equal due times go out first-in, first-out.
    order: u64,
    from: usize,
    to: usize,
    /// The datagram's arrival number on its path (from, to).
    arrival: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Held) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// Reversed: the max-heap's top is the earliest datagram.
    fn cmp(&self, other: &Held) -> std::cmp::Ordering {
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

/// Why the relay stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    Timeout,
    ParentGone,
}

impl StopReason {
    fn name(self) -> &'static str {
        match self {
            StopReason::Signal => "signal",
            StopReason::Timeout => "timeout",
            StopReason::ParentGone => "parent-gone",
        }
    }
}

/// The relay's state apart from its sockets: routing, fates, the queue and the counters.
pub struct Relay {
    map: FaceMap,
    draw: FaultDraw,
    queue: BinaryHeap<Held>,
    queue_bytes: usize,
    queue_datagrams_max: usize,
    queue_bytes_max: usize,
    order: u64,
    /// Per path (from × n + to): datagrams arrived, and the highest arrival number forwarded.
    arrivals: Vec<u64>,
    forwarded_high: Vec<u64>,
    pub counters: RelayCounters,
}

/// Datagrams read from one face per wake-up at most (so one busy face cannot starve the rest).
const RECV_BURST_MAX: usize = 256;
/// The longest the relay sleeps between checks of its stop conditions.
const POLL_MS_MAX: u64 = 50;

impl Relay {
    pub fn new(cfg: &RelayConfig) -> Result<Relay, String> {
        cfg.faults.check()?;
        let map = FaceMap::new(cfg.nodes.clone())?;
        let n = map.nodes().len();
        if cfg.queue_datagrams_max == 0 || cfg.queue_bytes_max == 0 {
            return Err("the queue limits must be above zero".into());
        }
        Ok(Relay {
            map,
            draw: FaultDraw::new(cfg.faults),
            queue: BinaryHeap::new(),
            queue_bytes: 0,
            queue_datagrams_max: cfg.queue_datagrams_max,
            queue_bytes_max: cfg.queue_bytes_max,
            order: 0,
            arrivals: vec![0; n * n],
            forwarded_high: vec![0; n * n],
            counters: RelayCounters::default(),
        })
    }

    /// A datagram arrived on face `face` from `src` at `now`: route it, draw its fate, and put
    /// the copies that go out at once into `out`; the rest is held (or dropped if the queue is full).
    fn arrive(&mut self, now: Instant, face: usize, src: SocketAddr, bytes: &[u8], out: &mut Vec<Held>) {
        self.counters.received += 1;
        let (from, to) = match self.map.route(face, src) {
            Route::Forward { from, to } => (from, to),
            Route::UnknownSource => {
                self.counters.unknown_source_dropped += 1;
                tracing::debug!(%src, face, "datagram from an unknown source dropped");
                return;
            }
            Route::SelfAddressed => {
                self.counters.self_addressed_dropped += 1;
                return;
            }
        };
        let path = from * self.map.nodes().len() + to;
        self.arrivals[path] += 1;
        let arrival = self.arrivals[path];
        let fate = self.draw.draw();
        if fate.copies.is_empty() {
            self.counters.dropped += 1;
            return;
        }
        if fate.copies.len() > 1 {
            self.counters.duplicated += 1;
        }
        for c in fate.copies {
            self.order += 1;
            let held = Held { due: now + c.hold, order: self.order, from, to, arrival, bytes: bytes.to_vec() };
            if c.hold.is_zero() {
                out.push(held);
                continue;
            }
            if self.queue.len() >= self.queue_datagrams_max || self.queue_bytes + bytes.len() > self.queue_bytes_max {
                self.counters.queue_full_dropped += 1;
                continue;
            }
            self.counters.delayed += 1;
            self.counters.reorder_held += c.reorder as u64;
            self.queue_bytes += bytes.len();
            self.queue.push(held);
            self.counters.queue_peak_datagrams = self.counters.queue_peak_datagrams.max(self.queue.len() as u64);
            self.counters.queue_peak_bytes = self.counters.queue_peak_bytes.max(self.queue_bytes as u64);
        }
    }

    /// Held datagrams whose time has come, earliest first.
    fn due(&mut self, now: Instant, out: &mut Vec<Held>) {
        while self.queue.peek().is_some_and(|h| h.due <= now) {
            let h = self.queue.pop().expect("peeked");
            self.queue_bytes -= h.bytes.len();
            out.push(h);
        }
    }

    /// Count a copy as it goes out (reordering is measured here).
    fn forwarding(&mut self, h: &Held) {
        let path = h.from * self.map.nodes().len() + h.to;
        if h.arrival < self.forwarded_high[path] {
            self.counters.reordered += 1;
        }
        self.forwarded_high[path] = self.forwarded_high[path].max(h.arrival);
        self.counters.forwarded += 1;
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|h| h.due)
    }
}

/// Bind the faces (each on loopback, distinct from the nodes).
pub fn bind_faces(cfg: &RelayConfig) -> Result<Vec<UdpSocket>, String> {
    let n = cfg.nodes.len();
    let faces: Vec<SocketAddr> = if cfg.faces.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 0)); n]
    } else if cfg.faces.len() == n {
        cfg.faces.clone()
    } else {
        return Err(format!("{} faces for {n} nodes: give one --face per --node, or none", cfg.faces.len()));
    };
    let mut sockets = Vec::with_capacity(n);
    for (i, f) in faces.iter().enumerate() {
        check_loopback(*f, &format!("face {}", i + 1))?;
        if cfg.nodes.contains(f) {
            return Err(format!("face {} is {f}, a node's own address", i + 1));
        }
        let s = UdpSocket::bind(f).map_err(|e| format!("binding face {} at {f}: {e}", i + 1))?;
        s.set_nonblocking(true).map_err(|e| format!("face {}: {e}", i + 1))?;
        sockets.push(s);
    }
    Ok(sockets)
}

/// What a finished relay reports.
#[derive(Clone, Debug)]
pub struct RelayReport {
    pub faces: Vec<SocketAddr>,
    pub nodes: Vec<SocketAddr>,
    pub faults: RelayFaults,
    pub counters: RelayCounters,
    pub elapsed: Duration,
    /// None while running.
    pub stopped_by: Option<StopReason>,
}

impl RelayReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "faces": self.faces.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "nodes": self.nodes.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "faults": self.faults.to_json(),
            "counters": self.counters.to_json(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "stopped_by": self.stopped_by.map(StopReason::name),
        })
    }
}

fn write_stats(path: &std::path::Path, v: &serde_json::Value) {
    // Written whole then renamed, so a reader never sees half a file.
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(v).expect("json") + "\n";
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

/// Run the relay on bound faces until a stop condition (see the module docs). `ready` is called
/// once, with the faces' addresses, before the first datagram is read.
pub fn run(
    cfg: &RelayConfig,
    sockets: Vec<UdpSocket>,
    stop: &std::sync::atomic::AtomicBool,
    ready: impl FnOnce(&[SocketAddr]),
) -> Result<RelayReport, String> {
    let mut relay = Relay::new(cfg)?;
    let n = relay.map.nodes().len();
    if sockets.len() != n {
        return Err(format!("{} face sockets for {n} nodes", sockets.len()));
    }
    let faces: Vec<SocketAddr> = sockets
        .iter()
        .map(|s| s.local_addr().map_err(|e| format!("a face's address: {e}")))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let parent = std::os::unix::process::parent_id();
    let report = |relay: &Relay, stopped_by| RelayReport {
        faces: faces.clone(),
        nodes: cfg.nodes.clone(),
        faults: cfg.faults,
        counters: relay.counters.clone(),
        elapsed: started.elapsed(),
        stopped_by,
    };
    tracing::info!(
        faces = ?faces, nodes = ?cfg.nodes, faults = ?cfg.faults,
        "relay up: node j reaches node i at face i; datagrams to i are sent from j's face"
    );
    ready(&faces);
    let mut buf = vec![0u8; 65536];
    let mut out: Vec<Held> = Vec::new();
    let mut last_stats = Instant::now();
    let stopped_by = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break StopReason::Signal;
        }
        if started.elapsed() >= cfg.timeout {
            break StopReason::Timeout;
        }
        if cfg.exit_with_parent && std::os::unix::process::parent_id() != parent {
            break StopReason::ParentGone;
        }
        let now = Instant::now();
        relay.due(now, &mut out);
        for h in out.drain(..) {
            relay.forwarding(&h);
            if let Err(e) = sockets[h.from].send_to(&h.bytes, cfg.nodes[h.to]) {
                relay.counters.send_errors += 1;
                tracing::debug!("sending {} bytes to node {}: {e}", h.bytes.len(), h.to + 1);
            }
        }
        if let Some(path) = &cfg.stats_json {
            if last_stats.elapsed() >= cfg.stats_interval {
                last_stats = Instant::now();
                write_stats(path, &report(&relay, None).to_json());
            }
        }
        let wait_ms = match relay.next_due() {
            // Rounded up: waking a little late is fine, spinning early is not.
            Some(due) => (due.saturating_duration_since(now).as_micros() as u64).div_ceil(1000).min(POLL_MS_MAX),
            None => POLL_MS_MAX,
        };
        let mut fds: Vec<PollFd> = sockets.iter().map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)).collect();
        match poll(&mut fds, PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let readable: Vec<bool> = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(fds);
        let now = Instant::now();
        for (face, s) in sockets.iter().enumerate() {
            if !readable[face] {
                continue;
            }
            for _ in 0..RECV_BURST_MAX {
                match s.recv_from(&mut buf) {
                    Ok((len, src)) => relay.arrive(now, face, src, &buf[..len], &mut out),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // E.g. ECONNREFUSED left by an ICMP error: count it, read on.
                        relay.counters.recv_errors += 1;
                        tracing::debug!(face, "receive: {e}");
                    }
                }
            }
        }
        for h in out.drain(..) {
            relay.forwarding(&h);
            if let Err(e) = sockets[h.from].send_to(&h.bytes, cfg.nodes[h.to]) {
                relay.counters.send_errors += 1;
                tracing::debug!("sending {} bytes to node {}: {e}", h.bytes.len(), h.to + 1);
            }
        }
    };
    relay.counters.queued_at_exit = relay.queue.len() as u64;
    let r = report(&relay, Some(stopped_by));
    tracing::info!(stopped_by = stopped_by.name(), counters = ?r.counters, "relay stopped");
    if let Some(path) = &cfg.stats_json {
        write_stats(path, &r.to_json());
    }
    Ok(r)
}

/// `famsd relay`: bind the faces, print `{"relay":"ready","faces":[...]}` on stdout, run until
/// stopped; with `json`, print the report on stdout at the end.
pub fn main(cfg: &RelayConfig, json: bool) -> Result<RelayReport, String> {
    FaceMap::new(cfg.nodes.clone())?;
    cfg.faults.check()?;
    let stop = crate::node::stop_on_signals();
    let sockets = bind_faces(cfg)?;
    let r = run(cfg, sockets, stop, |faces| {
        let line = serde_json::json!({
            "relay": "ready", "faces": faces.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r.to_json()).expect("json"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn faces_map_sources_to_nodes() {
        let map = FaceMap::new(vec![a(7001), a(7002), a(7003)]).unwrap();
        // On node 2's face (index 1), from node 1's real address: node 1 → node 2.
        assert_eq!(map.route(1, a(7001)), Route::Forward { from: 0, to: 1 });
        assert_eq!(map.route(0, a(7003)), Route::Forward { from: 2, to: 0 });
        assert_eq!(map.route(2, a(7003)), Route::SelfAddressed);
        assert_eq!(map.route(0, a(9999)), Route::UnknownSource);
        assert_eq!(map.route(0, SocketAddr::from(([127, 0, 0, 2], 7002))), Route::UnknownSource);
    }

    #[test]
    fn only_loopback_is_accepted() {
        assert!(FaceMap::new(vec![a(1), SocketAddr::from(([10, 0, 0, 1], 2))]).unwrap_err().contains("loopback"));
        assert!(FaceMap::new(vec![a(1), "[::1]:2".parse().unwrap()]).unwrap_err().contains("127.0.0.0/8"));
        assert!(FaceMap::new(vec![a(1), SocketAddr::from(([127, 9, 9, 9], 2))]).is_ok());
        assert!(FaceMap::new(vec![a(1), a(1)]).unwrap_err().contains("twice"));
        assert!(FaceMap::new(vec![a(1)]).is_err());
        let mut cfg = RelayConfig::new(vec![a(1), a(2)], RelayFaults::NONE);
        cfg.faces = vec![a(0), SocketAddr::from(([0, 0, 0, 0], 0))];
        assert!(bind_faces(&cfg).unwrap_err().contains("face 2"));
        cfg.faces = vec![a(0)];
        assert!(bind_faces(&cfg).unwrap_err().contains("1 faces for 2 nodes"));
    }

    #[test]
    fn fault_specs_parse_and_refuse() {
        let f = RelayFaults::parse("0.2, 0.1,0.05,3..20,7").unwrap();
        assert_eq!(f, RelayFaults { loss: 0.2, duplicate: 0.1, reorder: 0.05, delay_ms: (3, 20), seed: 7 });
        assert_eq!(RelayFaults::parse("0,0,0,5,1").unwrap().delay_ms, (5, 5));
        for bad in
            ["0.2,0.1,0.1,7", "1.0,0,0,0..1,1", "0,0,0,20..3,1", "0,0,0,0..99999,1", "0,0,-0.1,0..1,1", "0,0,0,0..1,x"]
        {
            assert!(RelayFaults::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fates_are_deterministic_from_the_seed_and_follow_the_rates() {
        let faults = RelayFaults { loss: 0.2, duplicate: 0.1, reorder: 0.1, delay_ms: (2, 20), seed: 42 };
        let fates = |seed| {
            let mut d = FaultDraw::new(RelayFaults { seed, ..faults });
            (0..10_000).map(|_| d.draw()).collect::<Vec<_>>()
        };
        let (x, y, z) = (fates(42), fates(42), fates(43));
        assert_eq!(x, y, "the same seed must give the same fates");
        assert_ne!(x, z, "another seed, other fates");
        let lost = x.iter().filter(|f| f.copies.is_empty()).count();
        let dup = x.iter().filter(|f| f.copies.len() == 2).count();
        let copies: Vec<&Hold> = x.iter().flat_map(|f| &f.copies).collect();
        let reordered = copies.iter().filter(|c| c.reorder).count();
        // Rates within a wide margin of the asked ones (10,000 draws).
        assert!((1_700..2_300).contains(&lost), "{lost}");
        assert!((600..1_000).contains(&dup), "{dup} of {}", 10_000 - lost);
        assert!((650..1_050).contains(&reordered), "{reordered} of {}", copies.len());
        for c in &copies {
            let ms = c.hold.as_micros() as u64;
            if c.reorder {
                assert!(ms > 20_000, "a reordered copy is held past the delay range: {c:?}");
            } else {
                assert!((2_000..=20_000).contains(&ms), "{c:?}");
            }
        }
        // No faults: one copy each, at once.
        let mut d = FaultDraw::new(RelayFaults::NONE);
        assert!((0..1000).all(|_| d.draw() == Fate { copies: vec![Hold { hold: Duration::ZERO, reorder: false }] }));
    }

    #[test]
    fn the_queue_is_bounded_and_reordering_is_measured() {
        let faults = RelayFaults { loss: 0.0, duplicate: 0.0, reorder: 0.0, delay_ms: (5, 5), seed: 1 };
        let mut cfg = RelayConfig::new(vec![a(7001), a(7002)], faults);
        cfg.queue_datagrams_max = 3;
        cfg.queue_bytes_max = 250;
        let mut relay = Relay::new(&cfg).unwrap();
        let t0 = Instant::now();
        let mut out = Vec::new();
        // Bytes bound first (100 + 100 fit, a third 100 does not), then the count bound.
        for len in [100, 100, 100, 10, 10] {
            relay.arrive(t0, 1, a(7001), &vec![0u8; len], &mut out);
        }
        assert!(out.is_empty());
        assert_eq!((relay.counters.delayed, relay.counters.queue_full_dropped), (3, 2));
        relay.arrive(t0, 0, a(9), b"x", &mut out);
        assert_eq!(relay.counters.unknown_source_dropped, 1);
        relay.due(t0 + Duration::from_millis(5), &mut out);
        assert_eq!(out.len(), 3);
        // In arrival order: nothing reordered.
        for h in out.drain(..) {
            assert_eq!((h.from, h.to), (0, 1));
            relay.forwarding(&h);
        }
        assert_eq!((relay.counters.forwarded, relay.counters.reordered), (3, 0));
        // A datagram that reached the relay before another but goes out after it is reordered.
        let late = Held { due: t0, order: 99, from: 0, to: 1, arrival: 1, bytes: vec![] };
        relay.forwarding(&late);
        assert_eq!(relay.counters.reordered, 1);
    }

    /// Real sockets on loopback: two "nodes" talk through the relay's faces and each sees the
    /// other's datagrams come from the address it was configured with (the other's face).
    #[test]
    fn datagrams_cross_the_relay_from_the_senders_face() {
        let n1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let n2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&n1, &n2] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut cfg = RelayConfig::new(vec![n1.local_addr().unwrap(), n2.local_addr().unwrap()], RelayFaults::NONE);
        cfg.timeout = Duration::from_secs(20);
        let sockets = bind_faces(&cfg).unwrap();
        let faces: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let relay = std::thread::spawn(move || run(&cfg, sockets, &stop2, |_| {}).unwrap());
        let mut buf = [0u8; 64];
        n1.send_to(b"to two", faces[1]).unwrap();
        let (len, from) = n2.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], from), (&b"to two"[..], faces[0]));
        n2.send_to(b"back to one", faces[0]).unwrap();
        let (len, from) = n1.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], from), (&b"back to one"[..], faces[1]));
        stranger.send_to(b"spoof", faces[1]).unwrap();
        n1.send_to(b"to myself", faces[0]).unwrap();
        n1.send_to(b"after", faces[1]).unwrap();
        let (len, _) = n2.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"after");
        // "last" queues behind "to myself" on node 1's face: once it arrives, both were read.
        n2.send_to(b"last", faces[0]).unwrap();
        let (len, _) = n1.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"last");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = relay.join().unwrap();
        assert_eq!(r.stopped_by, Some(StopReason::Signal));
        let c = &r.counters;
        assert_eq!(
            (c.received, c.forwarded, c.unknown_source_dropped, c.self_addressed_dropped),
            (6, 4, 1, 1),
            "{c:?}"
        );
    }
}
