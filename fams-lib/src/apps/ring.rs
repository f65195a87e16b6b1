//! A token ring: the simplest application whose correctness is exact, a second witness beside
//! the bank for the cluster simulation (so the bank's shape cannot hide a bug).
//!
//! Nodes `1..=n` form a ring in id order. Node 1's `Start` turn sends the token with counter 1
//! to node 2; each node that receives counter `c` records it and, while `c < hops`, passes
//! `c + 1` to the next node. There is one token, so at any moment exactly one message is (or
//! will be) in flight, and node `k` receives exactly the counters `c ≡ k - 1 (mod n)`, each once,
//! in increasing order, by steps of `n`. Every receipt prints `token c`.
//!
//! Each node checks on receipt that `c` is the next counter it must see (`c == expected`); a
//! duplicate, a lost hop or a second token breaks that, and [`check_cluster`] checks the totals.
//!
//! Message: `b"K"`, counter u64 little-endian — 9 bytes.

use crate::alloc::ObjectHeap;
use crate::transport::NodeId;
use crate::turns::{App, Input, Turn, TurnError};

const ROOT: &str = "ring";

crate::persistent! {
    /// One node's view of the ring.
    pub struct RingState {
        /// Ring size (this node and its peers) as seen at Start.
        pub nodes: u64,
        pub hops: u64,
        /// The next counter this node must receive.
        pub expected: u64,
        pub received: u64,
        /// The last counter received.
        pub last: u64,
        /// Receipts of a counter other than `expected` (duplicates, skips, a second token).
        pub bad: u64,
        pub passed: u64,
    }
}

/// The ring application.
pub struct RingApp {
    /// The token stops when its counter reaches this.
    pub hops: u64,
}

fn next_node(me: NodeId, peers: &[NodeId]) -> Option<NodeId> {
    peers.iter().copied().find(|&p| p > me).or_else(|| peers.first().copied())
}

fn token(counter: u64) -> Vec<u8> {
    let mut m = vec![b'K'];
    m.extend_from_slice(&counter.to_le_bytes());
    m
}

impl App for RingApp {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let me = t.node();
        let peers = t.peers();
        let n = peers.len() as u64 + 1;
        let hops = self.hops;
        match input {
            Input::Start => {
                // Node k first receives counter k - 1 (node 1: n, after a full round).
                let expected = if me.0 == 1 { n } else { me.0 - 1 };
                let init = |_| RingState { nodes: n, hops, expected, received: 0, last: 0, bad: 0, passed: 0 };
                let (st, _) = t.heap.named_root(ROOT, init)?;
                if me.0 == 1 && hops >= 1 {
                    st.passed += 1;
                    let to = next_node(me, &peers).ok_or_else(|| TurnError::new("a ring needs two nodes"))?;
                    t.send(to, &token(1))?;
                }
            }
            Input::Message { bytes, .. } => {
                if bytes.len() != 9 || bytes[0] != b'K' {
                    return Err(TurnError::new("malformed token"));
                }
                let c = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
                let (st, _) = t.heap.named_root(ROOT, |_| missing())?;
                if c != st.expected {
                    st.bad += 1;
                }
                st.expected = c + st.nodes;
                st.received += 1;
                st.last = c;
                let pass = c < st.hops;
                if pass {
                    st.passed += 1;
                }
                t.println(&format!("token {c}"))?;
                if pass {
                    let to = next_node(me, &peers).ok_or_else(|| TurnError::new("a ring needs two nodes"))?;
                    t.send(to, &token(c + 1))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn missing() -> RingState {
    panic!("the ring's root is missing: the Start turn did not commit")
}

/// One node's ring state, as read from its heap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingReport {
    pub node: NodeId,
    pub nodes: u64,
    pub hops: u64,
    pub received: u64,
    pub last: u64,
    pub bad: u64,
    pub passed: u64,
}

/// Read the ring state from a node's heap (`Ok(None)` before its Start turn committed).
pub fn report(objects: &mut ObjectHeap) -> Result<Option<RingReport>, crate::ObjectError> {
    let Some(node) = crate::turns::state::snapshot(objects)?.filter(|s| s.started).map(|s| s.node) else {
        return Ok(None);
    };
    let (st, _) = objects.named_root(ROOT, |_| missing())?;
    Ok(Some(RingReport {
        node,
        nodes: st.nodes,
        hops: st.hops,
        received: st.received,
        last: st.last,
        bad: st.bad,
        passed: st.passed,
    }))
}

/// Check the ring over every node's report (nodes `1..=n`): every counter `1..=hops` was
/// received exactly once, by the node it belongs to, in order. Returns the problems found.
pub fn check_cluster(reports: &[RingReport], nodes: u64, hops: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if reports.len() as u64 != nodes {
        problems.push(format!("{} of {nodes} nodes have a ring", reports.len()));
    }
    let mut total = 0;
    for r in reports {
        let k = r.node.0;
        // Counters c in 1..=hops with c ≡ k - 1 (mod n).
        let first = if k == 1 { nodes } else { k - 1 };
        let want = if first > hops { 0 } else { (hops - first) / nodes + 1 };
        let last = if want == 0 { 0 } else { first + (want - 1) * nodes };
        if r.bad != 0 {
            problems.push(format!("node {k}: {} tokens out of turn (duplicated, skipped or a second token)", r.bad));
        }
        if r.received != want || r.last != last {
            problems.push(format!(
                "node {k}: received {} tokens (last {}), expected {want} (last {last})",
                r.received, r.last
            ));
        }
        total += r.received;
        let passes = r.passed;
        let want_passes = want - u64::from(last == hops && want > 0) + u64::from(k == 1 && hops >= 1);
        if passes != want_passes {
            problems.push(format!("node {k}: passed the token {passes} times, expected {want_passes}"));
        }
    }
    if total != hops {
        problems.push(format!("{total} hops in all, expected {hops}"));
    }
    problems
}
