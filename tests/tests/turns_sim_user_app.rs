//! The cluster simulator as an application developer uses it: an `App` of one's own (here a
//! vote counter: every node casts votes to node 1, which tallies them per voter), run in a
//! simulated cluster with faults, over many seeds, with the app's own invariant checked after
//! every run — through the public API only, as a user's crate would.

use fams::alloc::{ObjectHeap, PHashMap};
use fams::sim::cluster::{AppChecker, AppFactory, Cluster, ClusterConfig, Totals};
use fams::transport::NodeId;
use fams::turns::{App, Input, Turn, TurnError};
use std::time::Duration;

fams::persistent! {
    /// Node 1's tally (votes per voter) and every voter's own count of votes cast.
    struct Ballots<'h> {
        cast: u64,
        tally: PHashMap<'h, u64, u64>,
    }
}

struct Voter {
    votes: u64,
}

impl App for Voter {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let me = t.node();
        let (b, _) = t.heap.root_with_alloc(|a| Ballots { cast: 0, tally: PHashMap::new_in(a) })?;
        match input {
            Input::Start | Input::Alarm if me != NodeId(1) && b.cast < self.votes => {
                b.cast += 1;
                t.send(NodeId(1), b"vote")?;
                t.set_alarm(Duration::from_micros(300));
            }
            Input::Message { from, .. } => *b.tally.entry(from.0).or_insert(0) += 1,
            _ => {}
        }
        Ok(())
    }
}

fn votes_of(h: &mut ObjectHeap) -> (u64, Vec<(u64, u64)>) {
    let (b, _) = h.root_with_alloc(|a| Ballots { cast: 0, tally: PHashMap::new_in(a) }).expect("root");
    let mut tally: Vec<(u64, u64)> = b.tally.iter().map(|(&k, &v)| (k, v)).collect();
    tally.sort();
    (b.cast, tally)
}

#[test]
fn a_users_app_runs_in_the_simulated_cluster_and_its_invariant_holds() {
    let votes = 6;
    let factory: AppFactory<Voter> = Box::new(move |_node, _seed| Voter { votes });
    // Every vote cast is counted exactly once by node 1: its tally per voter equals what that
    // voter's heap says it cast — whatever crashed or was lost on the way.
    let checker: AppChecker = Box::new(|seed, heaps| {
        let (_, tally) = votes_of(&mut heaps[0]);
        let mut problems = Vec::new();
        for (i, h) in heaps.iter_mut().enumerate().skip(1) {
            let voter = i as u64 + 1;
            let (cast, _) = votes_of(h);
            let counted = tally.iter().find(|(v, _)| *v == voter).map_or(0, |(_, n)| *n);
            if counted != cast {
                problems.push(format!("seed {seed}: voter {voter} cast {cast} votes, node 1 counted {counted}"));
            }
        }
        problems
    });
    let mut cluster = Cluster::new(std::path::Path::new("/var/tmp"), ClusterConfig::new(4), factory, checker)
        .expect("a simulated cluster");
    let mut totals = Totals::default();
    for seed in 1..=150 {
        let report = cluster.run_seed(seed);
        assert_eq!(report.violations, 0, "{:?}", report.details);
        totals.add(&report);
    }
    eprintln!("{totals:?}");
    assert!(totals.kills > 0 && totals.power_cuts > 0 && totals.datagrams_lost > 0, "{totals:?}");
    assert!(totals.messages >= 150 * 3 * votes, "every voter cast its votes in every seed: {totals:?}");
}
