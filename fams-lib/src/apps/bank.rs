//! A bank spread over several nodes: the reference application whose correctness is easy to
//! state, used by the example, `famsd node bank`, the demo and the crash tests.
//!
//! Each node holds [`ACCOUNTS`] accounts. It makes `transfers` transfers, one per alarm turn,
//! each debiting one of its accounts and sending a credit message to another node, which
//! applies it in its own turn. Money is never created or destroyed, so once every transfer is
//! applied the total over all nodes is exactly `nodes × ACCOUNTS × INITIAL_BALANCE`.
//!
//! Every node keeps, per peer, what it sent (count and sum) and what it applied (count, sum and
//! the last per-pair transfer number): a transfer applied twice, lost, or applied out of order
//! shows as a mismatch or in the `fifo_violations` counter. [`BankReport`] reads it all from a
//! heap, and [`check_cluster`] checks the invariants across the nodes' reports.
//!
//! Messages (little-endian): `b"T"`, pair counter u64, from account u32, to account u32,
//! amount u64 — 25 bytes. A message that does not parse fails its turn (and is counted).

use crate::alloc::{ObjectHeap, PHashMap};
use crate::transport::NodeId;
use crate::turns::{App, Input, Turn, TurnError};
use std::collections::BTreeMap;
use std::time::Duration;

pub const ACCOUNTS: usize = 4;
pub const INITIAL_BALANCE: u64 = 1_000_000;
const MESSAGE_BYTES: usize = 25;

crate::persistent! {
    /// What one node sent to, or applied from, one peer.
    pub struct PairTally {
        pub count: u64,
        pub amount: u64,
        /// Applied: the per-pair counter of the last transfer (FIFO check).
        pub last_counter: u64,
    }
}

crate::persistent! {
    /// The bank's root object.
    pub struct Bank<'h> {
        pub accounts: [u64; ACCOUNTS],
        pub transfers_planned: u64,
        pub transfers_sent: u64,
        pub transfers_applied: u64,
        /// Seed of the transfer choices (transfer k uses seed ^ k ^ the turn's clock).
        pub rng: u64,
        pub fifo_violations: u64,
        pub bad_messages: u64,
        pub restarts: u64,
        pub sent: PHashMap<'h, u64, PairTally>,
        pub applied: PHashMap<'h, u64, PairTally>,
    }
}

/// The bank application.
pub struct BankApp {
    /// Transfers this node makes in all.
    pub transfers: u64,
    /// Pause between transfers (0: back to back).
    pub interval: Duration,
    /// Print a line per applied transfer (`applied N`), for harnesses that follow progress.
    pub verbose: bool,
}

impl App for BankApp {
    const SCHEMA_VERSION: u64 = 1;

    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let node = t.node();
        let planned = self.transfers;
        match input {
            Input::Start => {
                t.heap.root_with_alloc(|a| Bank {
                    accounts: [INITIAL_BALANCE; ACCOUNTS],
                    transfers_planned: planned,
                    transfers_sent: 0,
                    transfers_applied: 0,
                    rng: node.0.wrapping_mul(0x2545_f491_4f6c_dd1d),
                    fifo_violations: 0,
                    bad_messages: 0,
                    restarts: 0,
                    sent: PHashMap::new_in(a),
                    applied: PHashMap::new_in(a),
                })?;
                t.println(&format!("node {node}: bank open, {planned} transfers to make"))?;
                t.set_alarm(Duration::ZERO);
            }
            Input::Restarted => {
                let (bank, _) = t.heap.root_with_alloc(|_| unreachable_root())?;
                bank.restarts += 1;
                let line = format!(
                    "node {node}: restarted ({} sent, {} applied)",
                    bank.transfers_sent, bank.transfers_applied
                );
                t.println(&line)?;
            }
            Input::Alarm => {
                let now_ns = t.now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
                let peers = t.peers();
                if peers.is_empty() {
                    return Err(TurnError::new("no peers to transfer to"));
                }
                let (bank, _) = t.heap.root_with_alloc(|_| unreachable_root())?;
                if bank.transfers_sent >= bank.transfers_planned {
                    return Ok(());
                }
                // The clock makes a re-executed turn differ from the original: a turn that leaked its
                // message and was then lost would show as a mismatch, not be masked by replay.
                let r = crate::sim::SimRng::new(bank.rng ^ bank.transfers_sent ^ now_ns).next_u64();
                let to = peers[(r % peers.len() as u64) as usize];
                let from_account = ((r >> 8) % ACCOUNTS as u64) as u32;
                let to_account = ((r >> 16) % ACCOUNTS as u64) as u32;
                let amount = 1 + (r >> 24) % 100;
                let balance = &mut bank.accounts[from_account as usize];
                let amount = amount.min(*balance);
                *balance -= amount;
                bank.transfers_sent += 1;
                let tally = bank.sent.entry(to.0).or_insert(PairTally { count: 0, amount: 0, last_counter: 0 });
                tally.count += 1;
                tally.amount += amount;
                let counter = tally.count;
                let done = bank.transfers_sent == bank.transfers_planned;
                let sent = bank.transfers_sent;
                let mut msg = Vec::with_capacity(MESSAGE_BYTES);
                msg.push(b'T');
                msg.extend_from_slice(&counter.to_le_bytes());
                msg.extend_from_slice(&from_account.to_le_bytes());
                msg.extend_from_slice(&to_account.to_le_bytes());
                msg.extend_from_slice(&amount.to_le_bytes());
                t.send(to, &msg)?;
                if done {
                    t.println(&format!("node {node}: sent {sent}"))?;
                } else {
                    t.set_alarm(self.interval);
                }
            }
            Input::Message { from, bytes, .. } => {
                let Some((counter, _from_account, to_account, amount)) = parse(bytes) else {
                    let (bank, _) = t.heap.root_with_alloc(|_| unreachable_root())?;
                    bank.bad_messages += 1;
                    return Err(TurnError::new(format!("node {node}: malformed transfer from {from}")));
                };
                let (bank, _) = t.heap.root_with_alloc(|_| unreachable_root())?;
                let tally = bank.applied.entry(from.0).or_insert(PairTally { count: 0, amount: 0, last_counter: 0 });
                if counter != tally.last_counter + 1 {
                    bank.fifo_violations += 1;
                }
                tally.count += 1;
                tally.amount += amount;
                tally.last_counter = counter;
                bank.accounts[to_account as usize % ACCOUNTS] += amount;
                bank.transfers_applied += 1;
                let applied = bank.transfers_applied;
                if self.verbose {
                    t.println(&format!("node {node}: applied {applied}"))?;
                }
            }
            Input::Stdin(line) => {
                let (bank, _) = t.heap.root_with_alloc(|_| unreachable_root())?;
                let line = String::from_utf8_lossy(line);
                match line.trim() {
                    "balances" | "b" => {
                        let total: u64 = bank.accounts.iter().sum();
                        let text = format!("node {node}: accounts {:?} total {total}", bank.accounts);
                        t.println(&text)?;
                    }
                    "" => {}
                    other => t.println(&format!("unknown command {other:?}; try `balances`"))?,
                }
            }
        }
        Ok(())
    }
}

/// Turns other than `Start` find the root made by `Start`; this is never called then.
fn unreachable_root<'h>() -> Bank<'h> {
    panic!("the bank's root is missing: the Start turn did not commit")
}

fn parse(bytes: &[u8]) -> Option<(u64, u32, u32, u64)> {
    if bytes.len() != MESSAGE_BYTES || bytes[0] != b'T' {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    Some((u64_at(1), u32_at(9), u32_at(13), u64_at(17)))
}

/// One node's bank, as read from its heap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankReport {
    pub node: NodeId,
    pub accounts: [u64; ACCOUNTS],
    pub transfers_planned: u64,
    pub transfers_sent: u64,
    pub transfers_applied: u64,
    pub fifo_violations: u64,
    pub bad_messages: u64,
    pub restarts: u64,
    /// Per peer: (count, amount) sent.
    pub sent: BTreeMap<u64, (u64, u64)>,
    /// Per peer: (count, amount, last counter) applied.
    pub applied: BTreeMap<u64, (u64, u64, u64)>,
}

impl BankReport {
    pub fn total(&self) -> u64 {
        self.accounts.iter().sum()
    }

    pub fn to_json(&self) -> String {
        let sent: Vec<String> = self.sent.iter().map(|(p, (c, a))| format!("\"{p}\":[{c},{a}]")).collect();
        let applied: Vec<String> = self.applied.iter().map(|(p, (c, a, l))| format!("\"{p}\":[{c},{a},{l}]")).collect();
        format!(
            "{{\"node\":{},\"accounts\":{:?},\"total\":{},\"transfers_planned\":{},\"transfers_sent\":{},\
\"transfers_applied\":{},\"fifo_violations\":{},\"bad_messages\":{},\"restarts\":{},\"sent\":{{{}}},\"applied\":{{{}}}}}",
            self.node.0,
            self.accounts,
            self.total(),
            self.transfers_planned,
            self.transfers_sent,
            self.transfers_applied,
            self.fifo_violations,
            self.bad_messages,
            self.restarts,
            sent.join(","),
            applied.join(",")
        )
    }
}

/// Read the bank from a node's object heap (`Ok(None)` before its Start turn committed).
pub fn report(objects: &mut ObjectHeap) -> Result<Option<BankReport>, crate::ObjectError> {
    let Some(node) = crate::turns::state::snapshot(objects)?.filter(|s| s.started).map(|s| s.node) else {
        return Ok(None);
    };
    let (bank, _) = objects.root_with_alloc(|_| unreachable_root())?;
    Ok(Some(BankReport {
        node,
        accounts: bank.accounts,
        transfers_planned: bank.transfers_planned,
        transfers_sent: bank.transfers_sent,
        transfers_applied: bank.transfers_applied,
        fifo_violations: bank.fifo_violations,
        bad_messages: bank.bad_messages,
        restarts: bank.restarts,
        sent: bank.sent.iter().map(|(&p, t)| (p, (t.count, t.amount))).collect(),
        applied: bank.applied.iter().map(|(&p, t)| (p, (t.count, t.amount, t.last_counter))).collect(),
    }))
}

/// Check the cluster-wide invariants over every node's report: the total is conserved, every
/// transfer sent was applied exactly once (counts and sums match per pair), no FIFO violation,
/// every node made all its transfers. Returns the problems found (empty: all good).
pub fn check_cluster(reports: &[BankReport]) -> Vec<String> {
    let mut problems = Vec::new();
    let expected_total = reports.len() as u64 * ACCOUNTS as u64 * INITIAL_BALANCE;
    let total: u64 = reports.iter().map(|r| r.total()).sum();
    if total != expected_total {
        problems.push(format!("total is {total}, expected {expected_total} (money created or lost)"));
    }
    for r in reports {
        if r.fifo_violations != 0 {
            problems.push(format!("node {}: {} transfers applied out of order or twice", r.node, r.fifo_violations));
        }
        if r.transfers_sent != r.transfers_planned {
            problems.push(format!("node {}: sent {} of {} transfers", r.node, r.transfers_sent, r.transfers_planned));
        }
        for (&peer, &(count, amount)) in &r.sent {
            let applied = reports
                .iter()
                .find(|o| o.node.0 == peer)
                .and_then(|o| o.applied.get(&r.node.0).copied())
                .unwrap_or((0, 0, 0));
            if (applied.0, applied.1) != (count, amount) {
                problems.push(format!(
                    "{} → {peer}: sent {count} transfers ({amount}), applied {} ({})",
                    r.node, applied.0, applied.1
                ));
            }
        }
        for (&peer, &(count, _, _)) in &r.applied {
            let sent = reports.iter().find(|o| o.node.0 == peer).and_then(|o| o.sent.get(&r.node.0));
            if sent.is_none() && count > 0 {
                problems.push(format!("node {} applied {count} transfers {peer} never sent", r.node));
            }
        }
    }
    problems
}
