//! `famsd torture --turns`: the deterministic cluster simulation ([`fams::sim::cluster`]) over
//! many seeds, with totals and the failing seeds (each replays with `--seed S --seeds 1`).

use fams::sim::cluster::{bank_cluster, ring_cluster, Cluster, ClusterConfig, SeedReport, Totals};
use fams::turns::App;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimApp {
    Bank,
    Ring,
}

impl std::str::FromStr for SimApp {
    type Err = String;
    fn from_str(s: &str) -> Result<SimApp, String> {
        match s {
            "bank" => Ok(SimApp::Bank),
            "ring" => Ok(SimApp::Ring),
            other => Err(format!("unknown app {other:?}: bank or ring")),
        }
    }
}

pub struct TurnSimConfig {
    pub first_seed: u64,
    pub seeds: u64,
    pub nodes: usize,
    pub app: SimApp,
    pub dir: PathBuf,
    /// Print a line per 100 seeds (and every failing seed) on stderr.
    pub progress: bool,
}

pub struct TurnSimReport {
    pub config_app: SimApp,
    pub nodes: usize,
    pub first_seed: u64,
    pub totals: Totals,
    pub elapsed: Duration,
    /// Trace hash of the last seed run (for replay checks).
    pub last_trace_hash: u64,
}

impl TurnSimReport {
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.totals;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        serde_json::json!({
            "app": match self.config_app { SimApp::Bank => "bank", SimApp::Ring => "ring" },
            "nodes": self.nodes,
            "first_seed": self.first_seed,
            "seeds": t.seeds,
            "events": t.events,
            "sim_time_s": t.sim_time.as_secs_f64(),
            "turns": t.turns,
            "turns_pipelined": t.turns_pipelined,
            "device_writes": t.device_writes,
            "messages": t.messages,
            "datagrams": t.datagrams,
            "datagrams_lost": t.datagrams_lost,
            "datagrams_duplicated": t.datagrams_duplicated,
            "datagrams_reordered": t.datagrams_reordered,
            "partitions": t.partitions,
            "kills": t.kills,
            "power_cuts": t.power_cuts,
            "cuts_during_recovery": t.cuts_during_recovery,
            "recoveries_checked": t.recoveries_checked,
            "violations": t.violations,
            "failing_seeds": t.failing_seeds,
            "violation_details": t.details,
            "last_trace_hash": format!("{:016x}", self.last_trace_hash),
            "elapsed_s": secs,
            "seeds_per_s": t.seeds as f64 / secs,
            "turns_per_s": t.turns as f64 / secs,
        })
    }
}

fn run_all<A: App>(mut cluster: Cluster<A>, cfg: &TurnSimConfig) -> (Totals, u64) {
    let mut totals = Totals::default();
    let mut last = 0;
    let progress = crate::progress::Progress::new(cfg.progress, cfg.seeds as usize);
    for k in 0..cfg.seeds {
        let seed = cfg.first_seed.wrapping_add(k);
        let r: SeedReport = cluster.run_seed(seed);
        last = r.trace_hash;
        if cfg.progress && r.violations > 0 {
            progress.println(&format!("seed {seed}: {} violations (replay: --seed {seed} --seeds 1)", r.violations));
            for d in &r.details {
                progress.println(&format!("  {d}"));
            }
        }
        totals.add(&r);
        if (k + 1) % 20 == 0 {
            progress.at(
                k + 1,
                format!(
                    "seeds: {} turns, {} kills, {} power cuts ({} during recovery), {} violations",
                    totals.turns, totals.kills, totals.power_cuts, totals.cuts_during_recovery, totals.violations
                ),
            );
        }
    }
    (totals, last)
}

pub fn run(cfg: &TurnSimConfig) -> Result<TurnSimReport, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let config = ClusterConfig::new(cfg.nodes);
    let started = Instant::now();
    let (totals, last) = match cfg.app {
        SimApp::Bank => run_all(bank_cluster(&cfg.dir, config).map_err(|e| e.to_string())?, cfg),
        SimApp::Ring => run_all(ring_cluster(&cfg.dir, config).map_err(|e| e.to_string())?, cfg),
    };
    Ok(TurnSimReport {
        config_app: cfg.app,
        nodes: cfg.nodes,
        first_seed: cfg.first_seed,
        totals,
        elapsed: started.elapsed(),
        last_trace_hash: last,
    })
}
