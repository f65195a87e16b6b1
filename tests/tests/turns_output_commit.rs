//! Output commit under power cuts.
//!
//! The turn manager promises that nothing a turn produced — its messages, the cumulative ack of
//! the message it consumed, its stdout — leaves the process before the turn is durable. This test
//! watches everything node A lets out and cuts A's power at random moments, with turns pipelined
//! (`commit_async`) and not yet durable; then it reboots A's simulated machine, recovers the heap
//! and checks that the recovered heap accounts for everything the world saw:
//!
//! - every DATA seq A sent to B is below the recovered `next_send_seq` for B;
//! - every cumulative ack A sent to B is at most the recovered `consumed` for B;
//! - every `reply N` line A printed has N at most the recovered reply counter (and lines come in
//!   order, at least once: never a gap);
//! - the recovered heap is consistent: the counter equals `consumed` equals replies sent.
//!
//! A runs [`NodeCore`] on a heap on a [`SimMachine`](fams::sim::SimMachine) (volatile write caches
//! and a power switch; unflushed writes are kept, dropped or torn at a cut); B runs one on a
//! simulated machine that is never cut. They talk through an in-test network (a queue of
//! datagrams with seeded loss, duplication and reordering) under a fake clock. B sends A a stream
//! of requests; A, for each, bumps a counter in its heap, replies and prints `reply N`. The power
//! is cut either right after A yielded a datagram (`cut_power_now`), or a few I/O operations after
//! that (`cut_power_at`), which lands inside a log write or a checkpoint. After its cuts a run goes
//! on to completion and checks liveness and exactly-once: B got every reply once and in order, A
//! printed every line at least once, and A's heap, closed and reopened, agrees.
//!
//! The log writer is a real thread, so a run is not bit-replayable, but every choice is seeded:
//! `FAMS_OC_SEED` and `FAMS_OC_CUTS` change the seed and the number of cuts.
//!
//! With the cargo feature `mutations`, a second test switches on `transmit-before-durable` (the
//! turn manager releases outputs without waiting for durability) and asserts this test catches it.

use fams::alloc::{ObjectHeap, ObjectOptions};
use fams::sim::{SimHeap, SimRng};
use fams::transport::wire::Datagram;
use fams::transport::{decode, NodeId, Transmit};
use fams::turns::{App, Input, NodeConfig, NodeCore, Turn, TurnError};
use fams::{Heap, HeapOptions};
use fams_tests::TempDir;
use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const HEAP_BYTES: u64 = 2 << 20;
const LOG_BYTES: u64 = 1 << 20;
/// Requests B sends A in one run.
const REQUESTS: u64 = 200;
/// A run that has not finished after this much (fake) time is stuck: a liveness failure.
const RUN_TIME_MAX: Duration = Duration::from_secs(120);
const REPLIER_ROOT: &str = "oc.replier";
const CLIENT_ROOT: &str = "oc.client";

fn addr_of(node: NodeId) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.0 as u16))
}

fams::persistent! {
    /// A's state: replies made, and requests that came out of order (must stay 0).
    struct ReplierState {
        replies: u64,
        out_of_order: u64,
    }
}

fams::persistent! {
    /// B's state.
    struct ClientState {
        sent: u64,
        received: u64,
        out_of_order: u64,
    }
}

/// `tag`, then two u64 (little-endian).
fn encode(tag: u8, a: u64, b: u64) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&a.to_le_bytes());
    m.extend_from_slice(&b.to_le_bytes());
    m
}

fn parse(tag: u8, bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() != 17 || bytes[0] != tag {
        return None;
    }
    Some((u64::from_le_bytes(bytes[1..9].try_into().ok()?), u64::from_le_bytes(bytes[9..17].try_into().ok()?)))
}

/// Node A: for request i from B, bump the counter to N (= i, requests are processed in order),
/// reply `R N i` and print `reply N`.
struct Replier {
    /// The counter after the last turn this process ran (volatile; for the statistics).
    last_reply: u64,
}

impl App for Replier {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let Input::Message { from, bytes, .. } = input else { return Ok(()) };
        let (request, _) = parse(b'Q', bytes).ok_or_else(|| TurnError::new("malformed request"))?;
        let (st, _) = t.heap.named_root(REPLIER_ROOT, |_| ReplierState { replies: 0, out_of_order: 0 })?;
        if request != st.replies + 1 {
            st.out_of_order += 1;
        }
        st.replies += 1;
        let n = st.replies;
        t.send(from, &encode(b'R', n, request))?;
        t.println(&format!("reply {n}"))?;
        self.last_reply = n;
        Ok(())
    }
}

/// Node B: sends `requests` requests `Q i` in chunks, one chunk per alarm, and records the
/// replies (it is never cut, so its volatile record is its committed history).
struct Client {
    requests: u64,
    chunk: u64,
    interval: Duration,
    /// Reply numbers in the order applied.
    replies: Vec<u64>,
    /// Replies that were not the next expected one, or answered another request.
    bad_replies: u64,
}

impl App for Client {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let init = |_| ClientState { sent: 0, received: 0, out_of_order: 0 };
        match input {
            Input::Start => {
                t.heap.named_root(CLIENT_ROOT, init)?;
                t.set_alarm(Duration::ZERO);
            }
            Input::Alarm => {
                let (st, _) = t.heap.named_root(CLIENT_ROOT, init)?;
                let first = st.sent + 1;
                st.sent = (st.sent + self.chunk).min(self.requests);
                let last = st.sent;
                for i in first..=last {
                    t.send(A, &encode(b'Q', i, 0))?;
                }
                if last < self.requests {
                    t.set_alarm(self.interval);
                }
            }
            Input::Message { bytes, .. } => {
                let (n, request) = parse(b'R', bytes).ok_or_else(|| TurnError::new("malformed reply"))?;
                let (st, _) = t.heap.named_root(CLIENT_ROOT, init)?;
                if n != st.received + 1 || request != n {
                    st.out_of_order += 1;
                    self.bad_replies += 1;
                }
                st.received += 1;
                self.replies.push(n);
            }
            _ => {}
        }
        Ok(())
    }
}

/// What A let out, over all its incarnations in one run.
#[derive(Default)]
struct Emitted {
    /// Highest DATA seq sent to B (0: none).
    data_seq_max: u64,
    /// Highest cumulative ack sent to B.
    ack_max: u64,
    /// Highest N of a `reply N` line.
    reply_max: u64,
    /// Every N printed (at least once).
    replies_printed: BTreeSet<u64>,
    /// Bytes of an unfinished line.
    partial: Vec<u8>,
}

/// A's turn state and counter as recovered from its heap.
#[derive(Clone, Copy, Debug)]
struct Recovered {
    next_send_seq: u64,
    consumed: u64,
    replies: u64,
    out_of_order: u64,
}

#[derive(Default, Debug)]
struct Report {
    runs: u64,
    runs_completed: u64,
    cuts: u64,
    cuts_now: u64,
    cuts_at_op: u64,
    /// Cuts with at least one committed turn not yet released (pipelined, in flight).
    cuts_with_turns_in_flight: u64,
    /// Cuts after which the recovered heap lacks turns that had committed (they were in flight
    /// and not durable): the cases where releasing early would have been visible.
    cuts_losing_turns: u64,
    turns_lost: u64,
    /// Most turns in flight at one cut.
    in_flight_max: u64,
    datagrams_from_a: u64,
    /// Cuts after which the recovered heap did not account for what A had let out.
    cuts_violating: u64,
    violations: u64,
    liveness_failures: u64,
    details: Vec<String>,
}

impl Report {
    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.details.len() < 20 {
            self.details.push(what);
        }
    }
}

struct Config {
    seed: u64,
    cuts: u64,
}

impl Config {
    fn from_env(cuts_default: u64) -> Config {
        let num = |name: &str, default: u64| match std::env::var(name) {
            Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")),
            Err(_) => default,
        };
        Config { seed: num("FAMS_OC_SEED", 0x0c0c_2024), cuts: num("FAMS_OC_CUTS", cuts_default) }
    }
}

/// The two nodes' simulated machines and heap files.
struct Machines {
    a: SimHeap,
    b: SimHeap,
    _dir: TempDir,
}

fn heap_options() -> HeapOptions {
    // Checkpoint often, so cuts also land in checkpoints.
    HeapOptions { checkpoint_threshold_bytes: Some(LOG_BYTES / 5), ..HeapOptions::default() }
}

fn node_config(node: NodeId, peer: NodeId) -> NodeConfig {
    let mut c = NodeConfig::new(node);
    c.peers.push((peer, addr_of(peer)));
    c
}

/// A's turn state and counter from a recovered heap; gives the heap back.
fn read_recovered(heap: Heap) -> Result<(Recovered, Heap), String> {
    let mut objects = ObjectHeap::open(heap, &ObjectOptions::default()).map_err(|e| e.to_string())?;
    let snap = fams::turns::state::snapshot(&mut objects).map_err(|e| e.to_string())?;
    let peer = snap.and_then(|s| s.peers.into_iter().find(|p| p.peer == B));
    let (next_send_seq, consumed) = peer.map(|p| (p.next_send_seq, p.consumed)).unwrap_or((1, 0));
    let (replies, out_of_order) = if objects.named_roots().iter().any(|r| r.name == REPLIER_ROOT) {
        let (st, _) = objects
            .named_root(REPLIER_ROOT, |_| ReplierState { replies: 0, out_of_order: 0 })
            .map_err(|e| e.to_string())?;
        (st.replies, st.out_of_order)
    } else {
        (0, 0)
    };
    Ok((Recovered { next_send_seq, consumed, replies, out_of_order }, objects.into_heap()))
}

/// Everything A let out must be accounted for by the recovered heap, which must be consistent.
fn check_recovered(rec: &Recovered, em: &Emitted, report: &mut Report, at: &str) {
    if em.data_seq_max >= rec.next_send_seq {
        report.violation(format!(
            "{at}: A sent DATA seq {} to B, but the recovered heap's next_send_seq is {} (a message of a turn \
             that did not survive left the process)",
            em.data_seq_max, rec.next_send_seq
        ));
    }
    if em.ack_max > rec.consumed {
        report.violation(format!(
            "{at}: A acknowledged B's seq {}, but the recovered heap consumed only {} (ack ahead of durability)",
            em.ack_max, rec.consumed
        ));
    }
    if em.reply_max > rec.replies {
        report.violation(format!(
            "{at}: A printed `reply {}`, but the recovered heap made {} replies (stdout ahead of durability)",
            em.reply_max, rec.replies
        ));
    }
    if rec.replies != rec.consumed || rec.replies + 1 != rec.next_send_seq || rec.out_of_order != 0 {
        report.violation(format!("{at}: recovered heap inconsistent: {rec:?}"));
    }
}

/// Note one datagram A let out.
fn record_transmit(t: &Transmit, em: &mut Emitted, report: &mut Report, at: &str) {
    report.datagrams_from_a += 1;
    match decode(&t.bytes, None) {
        Ok(d) => {
            let h = d.header();
            if h.sender != A || h.receiver != B || t.dest != addr_of(B) {
                report.violation(format!("{at}: A sent a datagram from {} to {} at {}", h.sender, h.receiver, t.dest));
            }
            em.ack_max = em.ack_max.max(h.ack);
            if let Datagram::Data { fragment, .. } = d {
                em.data_seq_max = em.data_seq_max.max(fragment.seq);
            }
        }
        Err(e) => report.violation(format!("{at}: A sent a datagram that does not decode: {e}")),
    }
}

/// Note bytes A printed.
fn record_stdout(bytes: &[u8], em: &mut Emitted, report: &mut Report, at: &str) {
    em.partial.extend_from_slice(bytes);
    while let Some(end) = em.partial.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = em.partial.drain(..=end).collect();
        let text = String::from_utf8_lossy(&line[..end]);
        match text.strip_prefix("reply ").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => {
                // Lines leave in turn order, at least once: never past the next one.
                if n > em.reply_max + 1 {
                    report.violation(format!("{at}: A printed `reply {n}` after `reply {}`", em.reply_max));
                }
                em.reply_max = em.reply_max.max(n);
                em.replies_printed.insert(n);
            }
            None => report.violation(format!("{at}: A printed an unexpected line {text:?}")),
        }
    }
}

/// Wait (a little) until a heap's durability descriptor says a commit may have become durable.
fn wait_durable(fds: &[BorrowedFd<'_>]) {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut polls: Vec<PollFd> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    let _ = poll(&mut polls, 5u16);
}

/// When to cut A's power: after its `after`-th datagram since it was (re)opened, now or a few I/O
/// operations later.
#[derive(Clone, Copy, Debug)]
enum CutPlan {
    Now { after: u64 },
    AtOp { after: u64, ops: u64 },
}

/// One run: fresh heaps, B streams its requests, A's power is cut up to three times (a cut
/// planned past the end of the run does not happen), then the run goes on to completion.
fn run_once(m: &Machines, seed: u64, run: u64, report: &mut Report) {
    let mut rng = SimRng::new(seed ^ run.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    m.a.reset().expect("reset A's machine");
    m.b.reset().expect("reset B's machine");
    report.runs += 1;
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let wall = |now: Instant| wall0 + now.duration_since(t0);
    let mut now = t0;
    let tag = |now: Instant, what: &str| format!("seed {seed} run {run} t={:?} {what}", now.duration_since(t0));

    let client = Client {
        requests: REQUESTS,
        chunk: 1 + rng.below(24),
        interval: Duration::from_micros(rng.below(3) * 500),
        replies: Vec::new(),
        bad_replies: 0,
    };
    let heap_b = m.b.open(&heap_options()).expect("open B's heap");
    let mut b = NodeCore::open(heap_b, node_config(B, A), client, now, wall(now)).expect("open node B");
    let heap_a = m.a.open(&heap_options()).expect("open A's heap");
    let mut a = Some(NodeCore::open(heap_a, node_config(A, B), Replier { last_reply: 0 }, now, wall(now)).unwrap());

    let mut cuts_left = 1 + rng.below(3);
    let plan = |rng: &mut SimRng, replies_done: u64| {
        // Spread over what is left of the run (about one datagram per request, plus acks).
        let after = 1 + rng.below((REQUESTS - replies_done.min(REQUESTS)) * 5 / 4 + 1);
        if rng.below(2) == 0 {
            CutPlan::Now { after }
        } else {
            CutPlan::AtOp { after, ops: 1 + rng.below(6) }
        }
    };
    let mut cut_plan = Some(plan(&mut rng, 0));
    let mut a_transmits = 0u64;
    // A's counter after its last successful step: every turn it ran had committed.
    let mut a_committed = 0u64;
    let mut em = Emitted::default();
    let mut net: VecDeque<(SocketAddr, Transmit)> = VecDeque::new();
    // While A's machine is down: when it comes back.
    let mut a_down_until: Option<Instant> = None;
    let loss = rng.below(3); // percent
    loop {
        if now.duration_since(t0) > RUN_TIME_MAX {
            report.liveness_failures += 1;
            report.violation(tag(
                now,
                &format!(
                    "liveness: the run did not finish: B has {} of {REQUESTS} replies, {} cuts left",
                    b.app().replies.len(),
                    cuts_left
                ),
            ));
            break;
        }
        let mut progress = false;

        // Node A. The power is gone: A is dead, and its machine stays down a while.
        if a.is_some() && !m.a.machine.powered() {
            let core = a.take().expect("alive");
            let in_flight = core.turns_in_flight() as u64;
            match cut_plan.take() {
                Some(CutPlan::AtOp { .. }) => report.cuts_at_op += 1,
                _ => report.cuts_now += 1,
            }
            core.abandon();
            report.cuts += 1;
            cuts_left = cuts_left.saturating_sub(1);
            if in_flight > 0 {
                report.cuts_with_turns_in_flight += 1;
            }
            report.in_flight_max = report.in_flight_max.max(in_flight);
            // Datagrams A's socket had received but not read die with it.
            if rng.below(2) == 0 {
                net.retain(|(_, t)| t.dest != addr_of(A));
            }
            a_down_until = Some(now + Duration::from_micros(rng.below(20_000)));
        }
        // Back up: reboot, recover, check that the heap accounts for what A let out, restart A.
        if a.is_none() && a_down_until.is_some_and(|t| t <= now) {
            a_down_until = None;
            m.a.reboot().expect("reboot A's machine");
            let at = tag(now, &format!("cut {}", report.cuts));
            let heap = match m.a.open(&heap_options()) {
                Ok(h) => h,
                Err(e) => {
                    report.violation(format!("{at}: A's heap does not recover: {e}"));
                    return;
                }
            };
            let (rec, heap) = match read_recovered(heap) {
                Ok(r) => r,
                Err(e) => {
                    report.violation(format!("{at}: A's recovered heap is unreadable: {e}"));
                    return;
                }
            };
            let before = report.violations;
            check_recovered(&rec, &em, report, &at);
            if report.violations > before {
                report.cuts_violating += 1;
            }
            if a_committed > rec.replies {
                report.cuts_losing_turns += 1;
                report.turns_lost += a_committed - rec.replies;
            }
            em.partial.clear();
            a_transmits = 0;
            a_committed = rec.replies;
            if cuts_left > 0 {
                cut_plan = Some(plan(&mut rng, rec.replies));
            }
            let replier = Replier { last_reply: rec.replies };
            match NodeCore::open(heap, node_config(A, B), replier, now, wall(now)) {
                Ok(c) => a = Some(c),
                Err(e) => {
                    report.violation(format!("{at}: node A does not reopen: {e}"));
                    return;
                }
            }
        }
        if let Some(core) = a.as_mut() {
            match core.step(now, 1 + rng.below(12) as usize) {
                Ok(ran) => {
                    progress |= ran > 0;
                    a_committed = core.app().last_reply;
                }
                Err(e) => {
                    if m.a.machine.powered() {
                        report.violation(tag(now, &format!("node A failed without a power cut: {e}")));
                        return;
                    }
                    continue;
                }
            }
            while let Some(t) = core.poll_transmit(now) {
                record_transmit(&t, &mut em, report, &tag(now, "A transmit"));
                net.push_back((addr_of(A), t));
                progress = true;
                a_transmits += 1;
                match cut_plan {
                    Some(CutPlan::Now { after }) if after == a_transmits => {
                        m.a.machine.cut_power_now();
                        break;
                    }
                    Some(CutPlan::AtOp { after, ops }) if after == a_transmits => m.a.machine.cut_power_at(Some(ops)),
                    _ => {}
                }
            }
            if m.a.machine.powered() {
                while let Some(bytes) = core.poll_stdout() {
                    record_stdout(&bytes, &mut em, report, &tag(now, "A stdout"));
                    progress = true;
                }
            }
        }

        // Node B (never cut).
        let ran = b.step(now, 64).expect("node B");
        progress |= ran > 0;
        while let Some(t) = b.poll_transmit(now) {
            net.push_back((addr_of(B), t));
            progress = true;
        }
        while b.poll_stdout().is_some() {}

        // The network: deliver a few datagrams, with seeded loss, duplication and reordering.
        for _ in 0..1 + rng.below(8) {
            let Some((from, t)) = net.pop_front() else { break };
            progress = true;
            let r = rng.below(100);
            if r < loss {
                continue;
            }
            if r < loss + 1 {
                net.push_back((from, t.clone()));
            } else if r < loss + 4 {
                net.push_back((from, t));
                continue;
            }
            if t.dest == addr_of(B) {
                b.handle_datagram(now, from, &t.bytes);
            } else if let Some(core) = a.as_mut() {
                if m.a.machine.powered() {
                    core.handle_datagram(now, from, &t.bytes);
                }
            }
        }

        // Done: every reply applied, everything quiet.
        let a_quiet = a.as_ref().is_some_and(|c| c.is_quiescent());
        if b.app().replies.len() as u64 >= REQUESTS && net.is_empty() && a_quiet && b.is_quiescent() {
            if matches!(cut_plan, Some(CutPlan::AtOp { after, .. }) if after <= a_transmits) {
                m.a.machine.cut_power_at(None);
            }
            if m.a.machine.powered() {
                break;
            }
            continue;
        }

        // The clock.
        if progress {
            now += Duration::from_micros(20 + rng.below(200));
        } else {
            let a_in_flight = a.as_ref().is_some_and(|c| c.turns_in_flight() > 0);
            if a_in_flight || b.turns_in_flight() > 0 {
                let mut fds = vec![b.durability_fd()];
                if let Some(core) = a.as_ref() {
                    fds.push(core.durability_fd());
                }
                wait_durable(&fds);
                now += Duration::from_micros(10);
            } else {
                let next = [a.as_ref().and_then(|c| c.poll_timeout()), b.poll_timeout(), a_down_until]
                    .into_iter()
                    .flatten()
                    .min();
                now = next.unwrap_or(now + Duration::from_millis(1)).max(now + Duration::from_micros(1));
            }
        }
    }

    // Liveness and exactly-once after the cuts.
    let at = tag(now, "end of run");
    let expected: Vec<u64> = (1..=REQUESTS).collect();
    let finished = b.app().replies == expected;
    if finished {
        report.runs_completed += 1;
    } else if b.app().replies.len() as u64 >= REQUESTS || b.app().bad_replies > 0 {
        report.violation(format!(
            "{at}: B did not get replies 1..={REQUESTS} exactly once in order ({} replies, {} bad)",
            b.app().replies.len(),
            b.app().bad_replies
        ));
    }
    if finished && em.replies_printed.len() as u64 != REQUESTS {
        let missing: Vec<u64> = (1..=REQUESTS).filter(|n| !em.replies_printed.contains(n)).take(5).collect();
        report.violation(format!("{at}: A never printed some reply lines (first missing: {missing:?})"));
    }
    drop(b);
    // A cut planned but not reached is called off; one that came in the last moment is a crash.
    m.a.machine.cut_power_at(None);
    if let Some(core) = a.take() {
        if m.a.machine.powered() {
            if let Err(e) = core.close(now) {
                report.violation(format!("{at}: closing A: {e}"));
                return;
            }
        } else {
            core.abandon();
            m.a.reboot().expect("reboot A's machine");
        }
        match m.a.open(&heap_options()).map_err(|e| e.to_string()).and_then(read_recovered) {
            Ok((rec, heap)) => {
                check_recovered(&rec, &em, report, &at);
                if finished && rec.replies != REQUESTS {
                    report.violation(format!("{at}: A's heap made {} replies, not {REQUESTS}", rec.replies));
                }
                drop(heap);
            }
            Err(e) => report.violation(format!("{at}: reopening A after a clean close: {e}")),
        }
    }
}

/// Runs until `cfg.cuts` power cuts were made and checked.
fn explore(cfg: &Config) -> Report {
    let dir = TempDir::new("output-commit");
    let m = Machines {
        a: SimHeap::format(&dir.join("a.heap"), HEAP_BYTES, LOG_BYTES, cfg.seed).expect("format A"),
        b: SimHeap::format(&dir.join("b.heap"), HEAP_BYTES, LOG_BYTES, cfg.seed ^ 1).expect("format B"),
        _dir: dir,
    };
    let mut report = Report::default();
    let mut run = 0;
    while report.cuts < cfg.cuts {
        run_once(&m, cfg.seed, run, &mut report);
        run += 1;
    }
    report
}

/// The mutation switch is process-wide: tests that depend on it run one at a time.
static MUTATION_LOCK: Mutex<()> = Mutex::new(());

fn print_report(name: &str, cfg: &Config, r: &Report, elapsed: Duration) {
    eprintln!(
        "{name}: seed {:#x}: {} cuts ({} right after a transmit, {} inside an I/O operation) in {} runs ({} \
         completed), {} cuts with turns in flight (at most {}), {} cuts lost {} committed turns; {} datagrams from \
         A; {} violations ({} cuts caught one, {} liveness); {:.1} s",
        cfg.seed,
        r.cuts,
        r.cuts_now,
        r.cuts_at_op,
        r.runs,
        r.runs_completed,
        r.cuts_with_turns_in_flight,
        r.in_flight_max,
        r.cuts_losing_turns,
        r.turns_lost,
        r.datagrams_from_a,
        r.violations,
        r.cuts_violating,
        r.liveness_failures,
        elapsed.as_secs_f64()
    );
    for d in &r.details {
        eprintln!("  {d}");
    }
}

#[test]
fn nothing_leaves_before_its_turn_is_durable() {
    let _serial = MUTATION_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = Config::from_env(240);
    let started = Instant::now();
    let r = explore(&cfg);
    print_report("output commit", &cfg, &r, started.elapsed());
    assert_eq!(r.violations, 0, "output commit violated: {:#?}", r.details);
    assert!(r.cuts >= cfg.cuts);
    assert!(r.cuts_with_turns_in_flight > 0, "no cut found a turn in flight: pipelining not exercised");
    assert!(r.cuts_losing_turns > 0, "no cut lost a committed turn: the cuts never landed before durability");
    assert!(r.runs_completed == r.runs, "every run finishes after its cuts");
}

/// The negative control: with the turn manager releasing outputs before durability, the same
/// exploration must report violations.
#[cfg(feature = "mutations")]
#[test]
fn transmit_before_durable_is_caught() {
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            fams::mutations::set("none").expect("switch the mutation off");
        }
    }
    let _serial = MUTATION_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fams::mutations::set("transmit-before-durable").expect("switch the mutation on");
    let _off = Off;
    let cfg = Config::from_env(60);
    let started = Instant::now();
    let r = explore(&cfg);
    print_report("output commit, mutation transmit-before-durable", &cfg, &r, started.elapsed());
    assert!(r.cuts_violating > 0, "releasing outputs before durability went unnoticed in {} cuts", r.cuts);
}
