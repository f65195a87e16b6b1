//! A bank cluster of real node processes on loopback, killed with SIGKILL and restarted at
//! random while it runs, then checked: the total is conserved, every transfer was applied
//! exactly once and in order, and the run finished (liveness). Used by `famsd demo`,
//! `famsd node cluster` and the CI tests.
//!
//! With [`ClusterConfig::relay`] the nodes talk through a `famsd relay` child process (see
//! [`crate::relay`]): every node's peers are configured at the relay's faces, the relay loses,
//! duplicates, reorders and delays what they send, and it stays up while the nodes are killed
//! and restarted; its counters are in the report.

use crate::node::bank_report;
use crate::relay::RelayFaults;
use crate::workload::Rng;
use fams::apps::bank::{self, BankReport};
use nix::sys::signal::Signal;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Faults the nodes inject into their own outgoing datagrams (the socket seam).
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub famsd: PathBuf,
    pub dir: PathBuf,
    pub nodes: usize,
    pub transfers_per_node: u64,
    pub interval_ms: u64,
    /// Kill every node at least this many times (if the run lasts long enough; see the report).
    pub kills_per_node: u64,
    /// Pause between kills, in milliseconds (uniform in the range).
    pub kill_gap_ms: (u64, u64),
    /// How long a killed node stays down, in milliseconds (uniform in the range).
    pub down_ms: (u64, u64),
    pub seed: u64,
    pub faults: Option<Faults>,
    /// Route every datagram through a `famsd relay` process with these faults.
    pub relay: Option<RelayFaults>,
    pub key: Option<String>,
    /// Give up (a liveness failure) after this long.
    pub timeout: Duration,
    pub tracker: Option<String>,
    pub progress: bool,
    /// A deliberate bug for every node (a build with the `mutations` feature): a negative control.
    pub mutation: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClusterReport {
    pub nodes: usize,
    /// Kills asked for per node (`ClusterConfig::kills_per_node`).
    pub kills_asked_per_node: u64,
    pub transfers: u64,
    pub kills: Vec<u64>,
    pub elapsed: Duration,
    pub finished: bool,
    pub reports: Vec<BankReport>,
    pub problems: Vec<String>,
    /// After each restart: from spawning the process to its `Restarted` turn being durable and
    /// printed, in milliseconds.
    pub restart_to_turn_ms: Vec<f64>,
    /// Sums over the nodes' last runs (the counters of killed runs die with them).
    pub last_run_counters: serde_json::Value,
    /// The relay's report (its counters over the whole run), when the run had one.
    pub relay: Option<serde_json::Value>,
}

impl ClusterReport {
    pub fn to_json(&self) -> serde_json::Value {
        let mut r = self.restart_to_turn_ms.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| if r.is_empty() { 0.0 } else { r[((r.len() - 1) as f64 * p).round() as usize] };
        serde_json::json!({
            "nodes": self.nodes, "transfers": self.transfers, "kills": self.kills.iter().sum::<u64>(),
            "kills_per_node": self.kills, "elapsed_s": self.elapsed.as_secs_f64(), "finished": self.finished,
            "total": self.reports.iter().map(|r| r.total()).sum::<u64>(),
            "expected_total": self.nodes as u64 * bank::ACCOUNTS as u64 * bank::INITIAL_BALANCE,
            "transfers_applied": self.reports.iter().map(|r| r.transfers_applied).sum::<u64>(),
            "violations": self.problems.len(), "problems": self.problems,
            "last_run_counters": self.last_run_counters,
            "relay": self.relay,
            "restart_to_turn_ms": { "count": r.len(), "p50": pct(0.5), "p99": pct(0.99), "max": r.last().copied().unwrap_or(0.0) },
        })
    }
}

pub use fams_bench::turns::free_ports;

enum Line {
    Out(usize, u64, String),
    Closed,
}

struct NodeProc {
    child: Option<Child>,
    generation: u64,
    spawned: Instant,
    waiting_restart_line: bool,
    applied: u64,
    sent_all: bool,
}

/// Start node `i`, listening at `addrs[i]`, with peer j at `peers[j]` (`addrs[j]`, or j's face on
/// the relay).
#[allow(clippy::too_many_arguments)]
fn spawn(
    cfg: &ClusterConfig,
    i: usize,
    heap: &Path,
    size_bytes: u64,
    addrs: &[SocketAddr],
    peers: &[SocketAddr],
    generation: u64,
    tx: &mpsc::Sender<Line>,
) -> Result<Child, String> {
    let mut cmd = Command::new(&cfg.famsd);
    cmd.arg("node").arg("bank");
    cmd.arg("--heap").arg(heap);
    cmd.arg("--id").arg((i + 1).to_string()).arg("--listen").arg(addrs[i].to_string());
    for (j, a) in peers.iter().enumerate() {
        if j != i {
            cmd.arg("--peer").arg(format!("{}={a}", j + 1));
        }
    }
    cmd.arg("--transfers").arg(cfg.transfers_per_node.to_string());
    cmd.arg("--interval-ms").arg(cfg.interval_ms.to_string()).arg("--verbose");
    cmd.arg("--size").arg(size_bytes.to_string());
    cmd.arg("--stats-json").arg(stats_path(&cfg.dir, i));
    if let Some(k) = &cfg.key {
        cmd.arg("--key").arg(k);
    }
    if let Some(t) = &cfg.tracker {
        cmd.arg("--tracker").arg(t);
    }
    if let Some(f) = cfg.faults {
        let seed = cfg.seed ^ (generation << 8) ^ i as u64;
        cmd.arg("--faults").arg(format!("{},{},{},{seed}", f.loss, f.duplicate, f.reorder));
    }
    cmd.env("FAMS_LOG", "warn");
    if let Some(m) = &cfg.mutation {
        cmd.env("FAMS_MUTATION", m);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", cfg.famsd.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(Line::Out(i, generation, line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Line::Closed);
    });
    Ok(child)
}

fn kill(child: &mut Child, signal: Signal) {
    crate::child::signal_child(child, signal);
}

/// A `famsd relay` child process and the faces it bound.
struct RelayProc {
    child: Option<Child>,
    faces: Vec<SocketAddr>,
    stats: PathBuf,
}

/// How long the relay may take to bind its faces and say so.
const RELAY_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Start a relay in front of the nodes at `addrs` and wait for its faces.
fn start_relay(cfg: &ClusterConfig, faults: &RelayFaults, addrs: &[SocketAddr]) -> Result<RelayProc, String> {
    let stats = cfg.dir.join("relay.stats.json");
    let _ = std::fs::remove_file(&stats);
    let mut cmd = Command::new(&cfg.famsd);
    cmd.arg("relay");
    for a in addrs {
        cmd.arg("--node").arg(a.to_string());
    }
    cmd.args(faults.to_args());
    // A backstop only: the harness stops the relay itself, after the nodes.
    cmd.arg("--timeout-s").arg((cfg.timeout.as_secs() + 120).to_string());
    cmd.arg("--stats-json").arg(&stats).arg("--exit-with-parent");
    cmd.env("FAMS_LOG", "warn");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("starting the relay ({}): {e}", cfg.famsd.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
        // Read on until the relay exits, so it never blocks on a full pipe.
        for _ in lines {}
    });
    let mut fail = |why: String| {
        kill(&mut child, Signal::SIGKILL);
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        Err(format!("the relay did not start ({status}): {why}"))
    };
    let line = match rx.recv_timeout(RELAY_READY_TIMEOUT) {
        Ok(line) => line,
        Err(_) => return fail(format!("no ready line within {} s", RELAY_READY_TIMEOUT.as_secs())),
    };
    let faces: Option<Vec<SocketAddr>> = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v["faces"].as_array()?.iter().map(|f| f.as_str().and_then(|f| f.parse().ok())).collect());
    match faces {
        Some(faces) if faces.len() == addrs.len() => Ok(RelayProc { child: Some(child), faces, stats }),
        _ => fail(format!("its first line is not the ready line with {} faces: {line:?}", addrs.len())),
    }
}

/// The heap size the cluster's nodes are made with (`famsd node bank --size`).
pub const NODE_HEAP_BYTES: u64 = 32 << 20;

/// The node processes of a running bank cluster: the harness decides when to kill and restart
/// them; this follows their output and, at the end, stops them and checks their heaps.
/// [`run_bank_cluster`] drives one with a random kill schedule; the power-cut test of the turn
/// system (tests/tests/turns_power_cut.rs) drives one whose nodes lose power.
pub struct BankCluster {
    cfg: ClusterConfig,
    heaps: Vec<PathBuf>,
    size_bytes: u64,
    addrs: Vec<SocketAddr>,
    /// Where the nodes reach each other: `addrs`, or the relay's faces.
    peers: Vec<SocketAddr>,
    relay: Option<RelayProc>,
    procs: Vec<NodeProc>,
    tx: mpsc::Sender<Line>,
    rx: mpsc::Receiver<Line>,
    /// SIGKILLs (or power cuts) per node so far.
    pub kills: Vec<u64>,
    /// After each restart: from spawning the process to its `Restarted` turn being durable and
    /// printed, in milliseconds.
    pub restart_to_turn_ms: Vec<f64>,
    started: Instant,
}

impl BankCluster {
    /// Start `cfg.nodes` node processes on free ports of 127.0.0.1; node i keeps its heap at
    /// `heaps[i]` (made with `size_bytes` if missing; an existing heap is used as it is).
    pub fn start(cfg: &ClusterConfig, heaps: Vec<PathBuf>, size_bytes: u64) -> Result<BankCluster, String> {
        if heaps.len() != cfg.nodes {
            return Err(format!("{} heap paths for {} nodes", heaps.len(), cfg.nodes));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let ports = free_ports(cfg.nodes)?;
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
        let (tx, rx) = mpsc::channel();
        let relay = match &cfg.relay {
            Some(faults) => Some(start_relay(cfg, faults, &addrs)?),
            None => None,
        };
        let peers = relay.as_ref().map(|r| r.faces.clone()).unwrap_or_else(|| addrs.clone());
        // From here on, dropping `c` (on any error) stops the relay and the nodes started so far.
        let mut c = BankCluster {
            cfg: cfg.clone(),
            heaps,
            size_bytes,
            addrs,
            peers,
            relay,
            procs: Vec::new(),
            tx,
            rx,
            kills: vec![0; cfg.nodes],
            restart_to_turn_ms: Vec::new(),
            started: Instant::now(),
        };
        for i in 0..cfg.nodes {
            let child = spawn(&c.cfg, i, &c.heaps[i], size_bytes, &c.addrs, &c.peers, 0, &c.tx)?;
            c.procs.push(NodeProc {
                child: Some(child),
                generation: 0,
                spawned: Instant::now(),
                waiting_restart_line: false,
                applied: 0,
                sent_all: false,
            });
        }
        Ok(c)
    }

    pub fn nodes(&self) -> usize {
        self.procs.len()
    }

    /// Transfers the whole run makes.
    pub fn total_transfers(&self) -> u64 {
        self.cfg.nodes as u64 * self.cfg.transfers_per_node
    }

    /// Read what the nodes printed so far (progress, restarts).
    pub fn poll(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            let Line::Out(i, generation, line) = msg else { continue };
            let p = &mut self.procs[i];
            if generation != p.generation {
                continue;
            }
            if p.waiting_restart_line && line.contains("restarted") {
                p.waiting_restart_line = false;
                self.restart_to_turn_ms.push(p.spawned.elapsed().as_secs_f64() * 1e3);
            }
            if let Some(n) = line.rsplit_once("applied ").and_then(|(_, n)| n.trim().parse::<u64>().ok()) {
                p.applied = p.applied.max(n);
            }
            if line.contains(&format!("sent {}", self.cfg.transfers_per_node)) {
                p.sent_all = true;
            }
        }
    }

    /// Transfers applied, as the nodes printed them (a node's count survives its restarts).
    pub fn applied(&self) -> u64 {
        self.procs.iter().map(|p| p.applied).sum()
    }

    /// Transfers node `i` has applied, as it printed them.
    pub fn applied_by(&self, i: usize) -> u64 {
        self.procs[i].applied
    }

    /// Every node has applied what it was sent and made all its transfers, and every node is up.
    pub fn finished(&self) -> bool {
        self.applied() >= self.total_transfers() && self.procs.iter().all(|p| p.sent_all && p.child.is_some())
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.procs[i].child.is_some()
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].child.as_ref().map(Child::id)
    }

    /// Has node `i` ended by itself (not killed by us)? Its exit status, then.
    pub fn ended_by_itself(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.procs[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL node `i` and reap it (counted as a kill); it stays down until [`Self::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            kill(&mut child, Signal::SIGKILL);
            let _ = child.wait();
            self.kills[i] += 1;
        }
    }

    /// Start node `i` again on its heap (recovery, then its `Restarted` turn).
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        if self.procs[i].child.is_some() {
            return Ok(());
        }
        let p = &mut self.procs[i];
        p.generation += 1;
        p.child = Some(spawn(
            &self.cfg,
            i,
            &self.heaps[i],
            self.size_bytes,
            &self.addrs,
            &self.peers,
            p.generation,
            &self.tx,
        )?);
        p.spawned = Instant::now();
        p.waiting_restart_line = true;
        Ok(())
    }

    /// Stop every node cleanly (SIGTERM; SIGKILL after `patience`).
    pub fn stop_all(&mut self, patience: Duration) -> Result<(), String> {
        for p in self.procs.iter_mut() {
            if let Some(child) = p.child.as_mut() {
                kill(child, Signal::SIGTERM);
            }
        }
        for p in self.procs.iter_mut() {
            if let Some(mut child) = p.child.take() {
                let deadline = Instant::now() + patience;
                loop {
                    if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        kill(&mut child, Signal::SIGKILL);
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        Ok(())
    }

    /// Stop the nodes and check their heaps: the report of the run. `finished` says whether the
    /// run reached its end (false: a liveness failure is reported).
    pub fn finish(mut self, finished: bool) -> Result<ClusterReport, String> {
        let elapsed = self.started.elapsed();
        self.stop_all(Duration::from_secs(10))?;
        let mut problems = Vec::new();
        let relay = self.stop_relay(&mut problems);
        let cfg = &self.cfg;
        let total_transfers = self.total_transfers();
        let mut reports = Vec::new();
        for (i, heap) in self.heaps.iter().enumerate() {
            match bank_report(heap) {
                Ok(Some(r)) => reports.push(r),
                Ok(None) => problems.push(format!("node {} never completed its Start turn", i + 1)),
                // A heap that no longer opens (say, its log was damaged) is a finding, not a
                // harness failure: report it with the rest.
                Err(e) => problems.push(format!("node {}: its heap cannot be read: {e}", i + 1)),
            }
        }
        problems.extend(bank::check_cluster(&reports));
        let mut sums = serde_json::Map::new();
        for i in 0..cfg.nodes {
            let Ok(text) = std::fs::read_to_string(stats_path(&cfg.dir, i)) else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            for (key, value) in [
                ("faults_dropped", &v["faults_injected"]["dropped"]),
                ("faults_duplicated", &v["faults_injected"]["duplicated"]),
                ("faults_delayed", &v["faults_injected"]["delayed"]),
                ("fragments_retransmitted", &v["transport"]["fragments_retransmitted"]),
                ("duplicates_dropped", &v["transport"]["duplicates_dropped"]),
                ("out_of_order_buffered", &v["transport"]["out_of_order_buffered"]),
                ("address_mismatch", &v["transport"]["address_mismatch"]),
                ("address_changes", &v["transport"]["address_changes"]),
                // A duplicate the transport let through, refused by the turn layer: must stay 0.
                ("duplicate_deliveries_refused", &v["duplicate_deliveries_refused"]),
                ("turns_pipelined", &v["turns_pipelined"]),
                ("turns", &v["turns"]),
            ] {
                let sum = sums.get(key).and_then(|s| s.as_u64()).unwrap_or(0) + value.as_u64().unwrap_or(0);
                sums.insert(key.to_string(), serde_json::json!(sum));
            }
        }
        if !finished {
            let applied: u64 = reports.iter().map(|r| r.transfers_applied).sum();
            problems.push(format!(
                "liveness: after {:.0} s only {applied} of {total_transfers} transfers were applied",
                elapsed.as_secs_f64()
            ));
        }
        Ok(ClusterReport {
            nodes: cfg.nodes,
            kills_asked_per_node: cfg.kills_per_node,
            transfers: total_transfers,
            kills: self.kills.clone(),
            elapsed,
            finished,
            reports,
            problems,
            restart_to_turn_ms: std::mem::take(&mut self.restart_to_turn_ms),
            last_run_counters: serde_json::Value::Object(sums),
            relay,
        })
    }

    /// Stop the relay (after the nodes) and read its report; a relay that died during the run, or
    /// left no report, is a problem of the run.
    fn stop_relay(&mut self, problems: &mut Vec<String>) -> Option<serde_json::Value> {
        let r = self.relay.as_mut()?;
        let mut child = r.child.take()?;
        match child.try_wait() {
            Ok(Some(status)) => problems.push(format!("the relay ended during the run: {status}")),
            _ => {
                kill(&mut child, Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while child.try_wait().ok().flatten().is_none() {
                    if Instant::now() > deadline {
                        problems.push("the relay did not stop within 5 s of SIGTERM; killed".into());
                        kill(&mut child, Signal::SIGKILL);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.wait();
            }
        }
        let v = std::fs::read_to_string(&r.stats)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if v.is_none() {
            problems.push(format!("the relay left no report in {}", r.stats.display()));
        }
        v
    }
}

impl Drop for BankCluster {
    fn drop(&mut self) {
        // A harness that failed half way must not leave node processes (or its relay) behind.
        let relay = self.relay.as_mut().and_then(|r| r.child.take());
        for mut child in self.procs.iter_mut().filter_map(|p| p.child.take()).chain(relay) {
            kill(&mut child, Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Run the cluster; see the module docs. The heaps stay in `cfg.dir`.
pub fn run_bank_cluster(cfg: &ClusterConfig) -> Result<ClusterReport, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    for i in 0..cfg.nodes {
        for suffix in ["heap", "heap.log"] {
            let _ = std::fs::remove_file(cfg.dir.join(format!("node{}.{suffix}", i + 1)));
        }
    }
    let heaps = (0..cfg.nodes).map(|i| heap_path(&cfg.dir, i)).collect();
    let mut cluster = BankCluster::start(cfg, heaps, NODE_HEAP_BYTES)?;
    let mut rng = Rng::new(cfg.seed);
    let started = Instant::now();
    let range = |rng: &mut Rng, (lo, hi): (u64, u64)| Duration::from_millis(lo + rng.below(hi.saturating_sub(lo) + 1));
    let mut next_kill = Instant::now() + range(&mut rng, cfg.kill_gap_ms);
    let mut down: Vec<Option<Instant>> = vec![None; cfg.nodes];
    let total_transfers = cluster.total_transfers();
    let mut last_progress = Instant::now();
    let finished = loop {
        let now = Instant::now();
        cluster.poll();
        let applied = cluster.applied();
        let kills_done = cluster.kills.iter().all(|&k| k >= cfg.kills_per_node);
        if cluster.finished() {
            break true;
        }
        if now.duration_since(started) > cfg.timeout {
            break false;
        }
        if cfg.progress && now.duration_since(last_progress) > Duration::from_secs(1) {
            last_progress = now;
            eprintln!(
                "  {:>5.1} s: {applied}/{total_transfers} transfers applied, {} kills",
                started.elapsed().as_secs_f64(),
                cluster.kills.iter().sum::<u64>()
            );
        }
        // Restart nodes whose downtime is over.
        for (i, d) in down.iter_mut().enumerate() {
            if d.is_some_and(|t| now >= t) {
                *d = None;
                cluster.restart(i)?;
            }
        }
        // Kill a node now and then, while the transfers are still going.
        if !kills_done && now >= next_kill && applied < total_transfers {
            let candidates: Vec<usize> = (0..cfg.nodes).filter(|&i| down[i].is_none()).collect();
            if !candidates.is_empty() {
                // Prefer nodes killed least so far.
                let least = candidates.iter().map(|&i| cluster.kills[i]).min().expect("not empty");
                let least: Vec<usize> = candidates.into_iter().filter(|&i| cluster.kills[i] == least).collect();
                let i = least[rng.below(least.len() as u64) as usize];
                cluster.kill(i);
                down[i] = Some(now + range(&mut rng, cfg.down_ms));
            }
            next_kill = now + range(&mut rng, cfg.kill_gap_ms);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    cluster.finish(finished)
}

/// The counters a node writes when it stops (the last run of each node only).
fn stats_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{}.stats.json", i + 1))
}

pub fn heap_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{}.heap", i + 1))
}

/// The human-readable outcome of a cluster run.
pub fn print_summary(r: &ClusterReport) {
    let total: u64 = r.reports.iter().map(|b| b.total()).sum();
    let applied: u64 = r.reports.iter().map(|b| b.transfers_applied).sum();
    let mut restart = r.restart_to_turn_ms.clone();
    restart.sort_by(|a, b| a.total_cmp(b));
    let p50 = restart.get(restart.len() / 2).copied().unwrap_or(0.0);
    println!(
        "  {} nodes, {} transfers applied of {} in {:.1} s; {} SIGKILLs {:?}; restart to next turn p50 {p50:.1} ms",
        r.nodes,
        applied,
        r.transfers,
        r.elapsed.as_secs_f64(),
        r.kills.iter().sum::<u64>(),
        r.kills,
    );
    if r.kills.iter().any(|&k| k < r.kills_asked_per_node) {
        println!(
            "  note: the transfers were done before every node was killed {} times (kills only land while \
transfers are still going): make --kill-gap-ms shorter or --transfers larger",
            r.kills_asked_per_node
        );
    }
    if let Some(c) = r.relay.as_ref().map(|v| &v["counters"]) {
        println!(
            "  relay: {} datagrams received, {} forwarded; {} lost, {} duplicated, {} delayed, {} held to reorder, \
{} arrived reordered; {} dropped on a full queue, {} from unknown sources",
            c["received"],
            c["forwarded"],
            c["dropped"],
            c["duplicated"],
            c["delayed"],
            c["reorder_held"],
            c["reordered"],
            c["queue_full_dropped"],
            c["unknown_source_dropped"]
        );
    }
    for b in &r.reports {
        println!("    node {}: accounts {:?} (sum {}), {} restarts", b.node, b.accounts, b.total(), b.restarts);
    }
    println!(
        "  total over all nodes {total} (expected {})",
        r.nodes as u64 * bank::ACCOUNTS as u64 * bank::INITIAL_BALANCE
    );
    if r.problems.is_empty() {
        println!("  verified: total conserved, every transfer applied exactly once and in order, run finished");
    } else {
        for p in &r.problems {
            println!("  VIOLATION: {p}");
        }
    }
}
