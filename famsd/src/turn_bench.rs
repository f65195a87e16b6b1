//! `famsd bench --turns`: turn latency, turn throughput and restart time of real `famsd node
//! pingpong` processes on loopback, each next to its floor or baseline measured in the same run:
//!
//! - the device commit floor (a 4 KiB O_DIRECT write made durable with `RWF_DSYNC`, on the
//!   directory the nodes' logs live in) and a loopback UDP round trip;
//! - strict ping-pong (window 1) against `2 × commit floor + 1 UDP round trip`;
//! - windowed ping-pong (64 pings in flight) against the heap's own `commit_async` rate and
//!   against a Ken-style ping-pong (one fsync'd end-of-turn file + directory fsync per turn, then
//!   send) run in this process on the same directory;
//! - SIGKILL of a node mid-run → restart → its first durable turn.
//!
//! Rows are compared as ratios within the run; absolute numbers from a shared machine say little.
//! Because the machine drifts within a run (on a shared VM a flush can take 0.15 ms for a while,
//! then 4 ms), every row is measured in several rounds, each ratio is taken within a round —
//! the window-1 rows against the commit floor measured just before and just after them — and
//! the median over the rounds is reported, with each round's ratio beside it.

use crate::cluster::free_ports;
use crate::progress::Progress;
use fams::io::FlushMode;
use fams_bench::turns::{ken_pingpong, udp_round_trip, KenRun, MESSAGE_BYTES};
use fams_bench::{Samples, Target};
use nix::sys::signal::Signal;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What `famsd bench --turns` runs.
pub struct TurnBenchConfig {
    /// The `famsd` binary to start the nodes with (normally the running one).
    pub famsd: PathBuf,
    /// Directory on the device under test: the nodes' heaps and logs, the floor, Ken's turn files.
    pub dir: PathBuf,
    pub quick: bool,
    pub progress: bool,
}

/// Pings in flight in the windowed rows.
pub const WINDOW: u64 = 64;
/// Commits in flight in the heap's `commit_async` row.
pub const COMMIT_ASYNC_DEPTH: usize = 64;
/// How long a node process or a Ken-style turn may take before the run is abandoned.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(600);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How the UDP round trip floor is measured (also in the JSON).
pub const UDP_HOW: &str = "two threads in one process, one blocking UDP socket each on 127.0.0.1; \
one thread sends a 64-byte datagram and waits for the other to send it back";

/// One run of two `famsd node pingpong` processes.
#[derive(Clone, Debug)]
pub struct PingPongRun {
    pub window: u64,
    pub pages: usize,
    pub round_trips: u64,
    /// From the initiator's `Start` turn to the start of the turn of its last pong (the
    /// initiator's own report).
    pub elapsed_ns: u64,
    /// The nodes' counters (`--stats-json`).
    pub initiator: serde_json::Value,
    pub responder: serde_json::Value,
}

impl PingPongRun {
    pub fn round_trips_per_s(&self) -> f64 {
        self.round_trips as f64 * 1e9 / self.elapsed_ns.max(1) as f64
    }
    pub fn us_per_round_trip(&self) -> f64 {
        self.elapsed_ns as f64 / 1e3 / self.round_trips.max(1) as f64
    }
    /// Every round trip is two turns, one on each node.
    pub fn turns_per_s(&self) -> f64 {
        2.0 * self.round_trips_per_s()
    }
}

/// SIGKILL → restart → first durable turn, repeated.
#[derive(Clone, Debug, Default)]
pub struct RestartRun {
    pub window: u64,
    /// From spawning the restarted process to its `{"restarted":true}` line (printed only once
    /// its `Restarted` turn is durable), ms.
    pub to_turn_ms: Vec<f64>,
    /// From spawning it to its "node opened" log line: process start, heap open with log
    /// recovery, and the node's open (reading its state, committing the new incarnation), ms.
    pub to_open_ms: Vec<f64>,
    /// The initiator's counters at the end: its turns and the restarts of its peer it noticed
    /// (work resumed after each restart).
    pub initiator_turns: u64,
    pub initiator_peers_restarted: u64,
    /// After a last SIGKILL of the responder: its heap opened in this process, recovery included.
    pub recovery: RecoveryAfterKill,
}

/// `Heap::open` of a node's heap right after the node was SIGKILLed mid-run.
#[derive(Clone, Debug, Default)]
pub struct RecoveryAfterKill {
    /// The whole `Heap::open` call.
    pub open_ms: f64,
    /// The recovery inside it (replay, scan of the rest of the log, superblock).
    pub recovery_ms: f64,
    pub records_replayed: u64,
    pub log_bytes_read: u64,
    pub log_size_bytes: u64,
}

/// Every row once, back to back. The machine drifts within a run (on a shared VM the device's
/// flush time can jump from 0.15 ms to 4 ms for seconds), so the rows are measured in several
/// rounds and each ratio is taken within a round, between numbers measured seconds apart.
pub struct Round {
    /// The device commit floor in three parts: before the window-1 row with 1 page, between it
    /// and the row with 16 pages, after that one. Each row's floor is the two parts around it.
    pub floor_parts: [Samples; 3],
    pub udp: Samples,
    /// Window 1: 1 page, then 16 pages per turn.
    pub strict: Vec<PingPongRun>,
    pub windowed: PingPongRun,
    pub sync_rate: f64,
    pub async_rate: f64,
    pub async_groups: u64,
    pub async_commits: usize,
    pub ken_strict: KenRun,
    pub ken_windowed: KenRun,
}

impl Round {
    /// All the floor samples of the round.
    pub fn floor(&self) -> Samples {
        Samples(self.floor_parts.iter().flat_map(|p| p.0.iter().copied()).collect())
    }
    /// The floor samples measured just before and just after window-1 row `i`.
    pub fn floor_around(&self, i: usize) -> Samples {
        Samples(self.floor_parts[i..=i + 1].iter().flat_map(|p| p.0.iter().copied()).collect())
    }
    /// The floor of one strict round trip of row `i`: two commits (one per node) and one UDP
    /// round trip.
    pub fn strict_floor_us(&self, i: usize) -> f64 {
        2.0 * self.floor_around(i).p50() + self.udp.p50()
    }
    pub fn strict_ratio(&self, i: usize) -> f64 {
        self.strict[i].us_per_round_trip() / self.strict_floor_us(i)
    }
    pub fn of_commit_async(&self) -> f64 {
        self.windowed.turns_per_s() / self.async_rate
    }
    pub fn over_ken(&self) -> f64 {
        self.windowed.turns_per_s() / self.ken_windowed.turns_per_s()
    }
}

pub struct TurnBenchReport {
    pub rounds: Vec<Round>,
    pub restart: RestartRun,
    pub seconds: f64,
}

struct Sizes {
    rounds: usize,
    /// Per round (the floor: per part, three parts):
    floor_iters: usize,
    udp_iters: usize,
    strict_round_trips: u64,
    windowed_round_trips: u64,
    rate_commits: usize,
    ken_strict_round_trips: u64,
    ken_windowed_round_trips: u64,
    /// Once:
    restarts: usize,
}

pub fn run(cfg: &TurnBenchConfig) -> Result<TurnBenchReport, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let z = if cfg.quick {
        Sizes {
            rounds: 2,
            floor_iters: 75,
            udp_iters: 1500,
            strict_round_trips: 150,
            windowed_round_trips: 1500,
            rate_commits: 1000,
            ken_strict_round_trips: 150,
            ken_windowed_round_trips: 500,
            restarts: 5,
        }
    } else {
        Sizes {
            rounds: 4,
            floor_iters: 400,
            udp_iters: 7500,
            strict_round_trips: 500,
            windowed_round_trips: 5000,
            rate_commits: 2500,
            ken_strict_round_trips: 500,
            ken_windowed_round_trips: 1250,
            restarts: 20,
        }
    };
    let mut p = Progress::new(cfg.progress, z.rounds * 10 + 1);
    let target = Target { dir: cfg.dir.clone(), log_device: None };
    let mut rounds = Vec::new();
    for r in 1..=z.rounds {
        let n = z.rounds;
        let floor_part = |p: &mut Progress, part: usize| -> Result<Samples, String> {
            p.next(&format!(
                "round {r}/{n}: device commit floor, part {part}/3: {} × 4 KiB O_DIRECT write + RWF_DSYNC",
                z.floor_iters
            ));
            fams_bench::floor_write_flush(&target, 4096, z.floor_iters, FlushMode::Dsync)
                .map_err(|e| format!("floor measurement: {e}"))
        };
        let mut strict = Vec::new();
        let a = floor_part(&mut p, 1)?;
        p.next(&format!(
            "round {r}/{n}: ping-pong, window 1, 1 dirty page per turn: {} round trips",
            z.strict_round_trips
        ));
        strict.push(pingpong(cfg, "turns-strict-1", 1, 1, z.strict_round_trips)?);
        fams_bench::settle();
        let b = floor_part(&mut p, 2)?;
        p.next(&format!("round {r}/{n}: loopback UDP round trip: {} × 64 bytes", z.udp_iters));
        let udp = udp_round_trip(z.udp_iters).map_err(|e| format!("UDP round trip: {e}"))?;
        p.next(&format!(
            "round {r}/{n}: ping-pong, window 1, 16 dirty pages per turn: {} round trips",
            z.strict_round_trips
        ));
        strict.push(pingpong(cfg, "turns-strict-16", 1, 16, z.strict_round_trips)?);
        fams_bench::settle();
        let c = floor_part(&mut p, 3)?;
        p.next(&format!("round {r}/{n}: ping-pong, window {WINDOW}: {} round trips", z.windowed_round_trips));
        let windowed = pingpong(cfg, "turns-windowed", WINDOW, 1, z.windowed_round_trips)?;
        fams_bench::settle();
        p.next(&format!(
            "round {r}/{n}: heap commit rate: {} 1-page commits, synchronous, then {COMMIT_ASYNC_DEPTH} in flight",
            z.rate_commits
        ));
        let (sync_rate, async_rate, async_groups) =
            fams_bench::commit_rate(&target, z.rate_commits, COMMIT_ASYNC_DEPTH, None).map_err(|e| e.to_string())?;
        fams_bench::settle();
        p.next(&format!(
            "round {r}/{n}: Ken-style ping-pong, window {WINDOW}: {} round trips",
            z.ken_windowed_round_trips
        ));
        let ken_windowed = ken_pingpong(&cfg.dir.join("ken-windowed"), WINDOW, z.ken_windowed_round_trips)?;
        fams_bench::settle();
        p.next(&format!("round {r}/{n}: Ken-style ping-pong, window 1: {} round trips", z.ken_strict_round_trips));
        let ken_strict = ken_pingpong(&cfg.dir.join("ken-strict"), 1, z.ken_strict_round_trips)?;
        fams_bench::settle();
        rounds.push(Round {
            floor_parts: [a, b, c],
            udp,
            strict,
            windowed,
            sync_rate,
            async_rate,
            async_groups,
            async_commits: z.rate_commits,
            ken_strict,
            ken_windowed,
        });
    }
    p.next(&format!("restart to next turn: {} × SIGKILL of a node mid-run, restart at once", z.restarts));
    let restart = restarts(cfg, z.restarts)?;
    Ok(TurnBenchReport { rounds, restart, seconds: p.started.elapsed().as_secs_f64() })
}

// ---------------------------------------------------------------------------------------------
// Node processes

/// Send `sig` to our child unless it has already been reaped (then its pid may belong to
/// another process by now).
fn signal(child: &mut Child, sig: Signal) {
    crate::child::signal_child(child, sig);
}

/// Wait for a child, killing it after `timeout`.
fn wait_for(child: &mut Child, timeout: Duration, what: &str) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            signal(child, Signal::SIGKILL);
            let _ = child.wait();
            return Err(format!("{what}: still running after {:.0} s; killed", timeout.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stop a node cleanly (SIGTERM: it finishes its durable turns, lingers for acks, writes its
/// stats), or kill it if it does not stop.
fn stop(child: &mut Child, what: &str) -> Result<(), String> {
    signal(child, Signal::SIGTERM);
    wait_for(child, Duration::from_secs(15), what).map(|_| ())
}

/// Is a UDP socket bound to 127.0.0.1:`port` (or the wildcard address)? Read from
/// /proc/net/udp, so nothing is bound or sent to find out.
fn udp_port_bound(port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/net/udp") else { return false };
    text.lines().skip(1).any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit_once(':'))
            .is_some_and(|(_, p)| u16::from_str_radix(p, 16) == Ok(port))
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Wait until the node has bound its socket (its heap is open by then; datagrams sent to it
/// from now on wait in its socket buffer).
fn wait_bound(child: &mut Child, port: u16, err_file: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !udp_port_bound(port) {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("{what} exited ({status}) before binding its socket:\n{}", tail(err_file)));
        }
        if Instant::now() >= deadline {
            signal(child, Signal::SIGKILL);
            let _ = child.wait();
            return Err(format!("{what} did not bind 127.0.0.1:{port} within {} s", STARTUP_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

struct Pair {
    dir: PathBuf,
    addrs: [SocketAddr; 2],
}

impl Pair {
    fn new(dir: PathBuf) -> Result<Pair, String> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ports = free_ports(2)?;
        Ok(Pair { dir, addrs: [0, 1].map(|i| SocketAddr::from(([127, 0, 0, 1], ports[i]))) })
    }

    fn file(&self, id: usize, ext: &str) -> PathBuf {
        self.dir.join(format!("n{id}.{ext}"))
    }

    /// `famsd node pingpong` as node `id` (1 = initiator, 2 = responder), stderr to a file.
    fn command(&self, famsd: &Path, id: usize, pages: usize, extra: &[String]) -> Result<Command, String> {
        let mut cmd = Command::new(famsd);
        cmd.args(["node", "pingpong", "--id", &id.to_string(), "--listen", &self.addrs[id - 1].to_string()])
            .arg("--heap")
            .arg(self.file(id, "heap"))
            .arg("--peer")
            .arg(format!("{}={}", 3 - id, self.addrs[2 - id]))
            .arg("--stats-json")
            .arg(self.file(id, "json"))
            .args(["--pages", &pages.to_string(), "--message-bytes", &MESSAGE_BYTES.to_string()])
            .args(extra)
            .env("FAMS_LOG", "warn")
            .stdin(Stdio::null());
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.file(id, "err"))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        cmd.stderr(err);
        Ok(cmd)
    }

    fn stats(&self, id: usize) -> Result<serde_json::Value, String> {
        let path = self.file(id, "json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn initiator_args(round_trips: u64, window: u64) -> Vec<String> {
    ["--initiator-of", "2", "--round-trips", &round_trips.to_string(), "--window", &window.to_string()]
        .map(String::from)
        .to_vec()
}

/// Run `round_trips` ping-pong round trips between two fresh nodes in `cfg.dir/name`.
pub fn pingpong(
    cfg: &TurnBenchConfig,
    name: &str,
    window: u64,
    pages: usize,
    round_trips: u64,
) -> Result<PingPongRun, String> {
    let pair = Pair::new(cfg.dir.join(name))?;
    let mut responder = pair
        .command(&cfg.famsd, 2, pages, &[])?
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting famsd: {e}"))?;
    wait_bound(&mut responder, pair.addrs[1].port(), &pair.file(2, "err"), "the responder")?;
    let spawned = pair
        .command(&cfg.famsd, 1, pages, &initiator_args(round_trips, window))
        .and_then(|mut c| c.stdout(Stdio::piped()).spawn().map_err(|e| format!("starting famsd: {e}")));
    let mut initiator = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = stop(&mut responder, "the responder");
            return Err(e);
        }
    };
    let mut out = String::new();
    let stdout = initiator.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stdout).read_to_string(&mut s);
        s
    });
    let status = wait_for(&mut initiator, PROCESS_TIMEOUT, "the initiator");
    out.push_str(&reader.join().unwrap_or_default());
    let stopped = stop(&mut responder, "the responder");
    let status = status?;
    stopped?;
    if !status.success() {
        return Err(format!("the initiator failed ({status}):\n{}", tail(&pair.file(1, "err"))));
    }
    let line = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("round_trips").is_some())
        .ok_or_else(|| format!("the initiator printed no result: {out:?}"))?;
    let done = line["round_trips"].as_u64().unwrap_or(0);
    if done != round_trips {
        return Err(format!("the initiator reports {done} round trips, not {round_trips}: {line}"));
    }
    let run = PingPongRun {
        window,
        pages,
        round_trips,
        elapsed_ns: line["elapsed_ns"].as_u64().unwrap_or(0).max(1),
        initiator: pair.stats(1)?,
        responder: pair.stats(2)?,
    };
    pair.remove();
    Ok(run)
}

enum Seen {
    Opened(u64, Instant),
    Restarted(u64, Instant),
}

/// Forward the lines of a restarted node's stdout/stderr that mark its progress, timestamped
/// when they arrive.
fn watch(generation: u64, pipe: impl Read + Send + 'static, tx: mpsc::Sender<Seen>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let now = Instant::now();
            let seen = if line.contains("\"restarted\":true") {
                Seen::Restarted(generation, now)
            } else if line.contains("node opened") {
                Seen::Opened(generation, now)
            } else {
                continue;
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
}

/// A windowed ping-pong running "forever"; the responder is SIGKILLed `count` times, each time
/// restarted at once, and timed from spawn to its first durable turn.
pub fn restarts(cfg: &TurnBenchConfig, count: usize) -> Result<RestartRun, String> {
    let pair = Pair::new(cfg.dir.join("turns-restart"))?;
    let (tx, rx) = mpsc::channel();
    let spawn_responder = |generation: u64| -> Result<Child, String> {
        let mut cmd = pair.command(&cfg.famsd, 2, 1, &[])?;
        // The restarted node's info log says when its open (recovery included) is done.
        cmd.env("FAMS_LOG", if generation == 0 { "warn" } else { "info" });
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("starting famsd: {e}"))?;
        watch(generation, child.stdout.take().expect("piped"), tx.clone());
        watch(generation, child.stderr.take().expect("piped"), tx.clone());
        Ok(child)
    };
    let mut responder = spawn_responder(0)?;
    wait_bound(&mut responder, pair.addrs[1].port(), &pair.file(2, "err"), "the responder")?;
    let spawned = pair
        .command(&cfg.famsd, 1, 1, &initiator_args(1 << 40, WINDOW))
        .and_then(|mut c| c.stdout(Stdio::null()).spawn().map_err(|e| format!("starting famsd: {e}")));
    let mut initiator = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = stop(&mut responder, "the responder");
            return Err(e);
        }
    };
    let mut run = RestartRun { window: WINDOW, ..RestartRun::default() };
    let result = (|| -> Result<(), String> {
        wait_bound(&mut initiator, pair.addrs[0].port(), &pair.file(1, "err"), "the initiator")?;
        std::thread::sleep(Duration::from_millis(500));
        for generation in 1..=count as u64 {
            if let Some(status) = initiator.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("the initiator exited ({status}):\n{}", tail(&pair.file(1, "err"))));
            }
            signal(&mut responder, Signal::SIGKILL);
            let _ = responder.wait();
            let spawned = Instant::now();
            responder = spawn_responder(generation)?;
            let deadline = spawned + STARTUP_TIMEOUT;
            let mut opened = None;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(Seen::Opened(g, at)) if g == generation => opened = Some(at),
                    Ok(Seen::Restarted(g, at)) if g == generation => {
                        run.to_turn_ms.push(at.duration_since(spawned).as_secs_f64() * 1e3);
                        // The open is logged (stderr) before the turn (stdout), but the two pipes
                        // are read by two threads: on a busy machine the turn's line can arrive
                        // first. Wait a little for the open's.
                        let open_deadline = Instant::now() + Duration::from_secs(2);
                        while opened.is_none() {
                            let left = open_deadline.saturating_duration_since(Instant::now());
                            match rx.recv_timeout(left) {
                                Ok(Seen::Opened(g, at)) if g == generation => opened = Some(at),
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                        if let Some(o) = opened {
                            run.to_open_ms.push(o.duration_since(spawned).as_secs_f64() * 1e3);
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(format!(
                            "restart {generation}: no durable Restarted turn within {} s",
                            STARTUP_TIMEOUT.as_secs()
                        ))
                    }
                }
            }
            // Let the pair run (and the log grow) before the next kill.
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    })();
    // A last SIGKILL of the responder mid-run, then the initiator stops (it lingers for acks
    // that do not come, then writes its counters).
    signal(&mut responder, Signal::SIGKILL);
    let _ = responder.wait();
    let a = stop(&mut initiator, "the initiator");
    result?;
    a?;
    if run.to_open_ms.len() != run.to_turn_ms.len() {
        // The open line was missed (logging format changed?): report no split rather than a wrong one.
        run.to_open_ms.clear();
    }
    let stats = pair.stats(1)?;
    run.initiator_turns = stats["turns"].as_u64().unwrap_or(0);
    run.initiator_peers_restarted = stats["peers_restarted"].as_u64().unwrap_or(0);
    let t = Instant::now();
    let heap = fams::Heap::open(pair.file(2, "heap"), &fams::HeapOptions::default())
        .map_err(|e| format!("opening the killed responder's heap: {e}"))?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let st = heap.stats();
    run.recovery = RecoveryAfterKill {
        open_ms,
        recovery_ms: st.recovery.duration.as_secs_f64() * 1e3,
        records_replayed: st.recovery.records_replayed,
        log_bytes_read: st.recovery.log_bytes_read,
        log_size_bytes: std::fs::metadata(&st.log_path).map(|m| m.len()).unwrap_or(0),
    };
    drop(heap);
    pair.remove();
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Report

fn pct(v: &[f64], p: f64) -> f64 {
    Samples(v.to_vec()).percentile(p)
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

/// The median (the mean of the middle two of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn sum_of(stats: &[&serde_json::Value], f: impl Fn(&serde_json::Value) -> f64) -> f64 {
    stats.iter().map(|v| f(v)).sum()
}

/// Turns that started while an earlier turn of the same node was not yet durable, as a
/// fraction of all turns (summed over the runs given).
pub fn pipelined_fraction(stats: &[&serde_json::Value]) -> f64 {
    let n = |k: &'static str| move |v: &serde_json::Value| v[k].as_f64().unwrap_or(0.0);
    sum_of(stats, n("turns_pipelined")) / sum_of(stats, n("turns")).max(1.0)
}

/// Commits (turns and housekeeping) per device write of the log (summed over the runs given).
pub fn turns_per_device_write(stats: &[&serde_json::Value]) -> f64 {
    let n = |k: &'static str| move |v: &serde_json::Value| v[k].as_f64().unwrap_or(0.0);
    (sum_of(stats, n("turns")) + sum_of(stats, n("housekeeping_commits"))) / sum_of(stats, n("device_writes")).max(1.0)
}

pub fn retransmitted(stats: &[&serde_json::Value]) -> u64 {
    sum_of(stats, |v| v["transport"]["messages_retransmitted"].as_f64().unwrap_or(0.0)) as u64
}

/// Rounds pooled: total round trips over total time.
#[derive(Clone, Copy, Debug)]
pub struct Pooled {
    pub round_trips: u64,
    pub seconds: f64,
}

impl Pooled {
    pub fn round_trips_per_s(&self) -> f64 {
        self.round_trips as f64 / self.seconds
    }
    pub fn turns_per_s(&self) -> f64 {
        2.0 * self.round_trips_per_s()
    }
    pub fn us_per_round_trip(&self) -> f64 {
        self.seconds * 1e6 / self.round_trips.max(1) as f64
    }
}

/// The targets of the turn issue.
pub struct Targets;

impl Targets {
    /// Strict ping-pong, 1 page: time per round trip ≤ 1.5 × (2 × commit floor + UDP round trip).
    pub const STRICT_RATIO_MAX: f64 = 1.5;
    /// Windowed turns/s ≥ 5 × Ken-style (windowed) turns/s.
    pub const OVER_KEN_MIN: f64 = 5.0;
    /// Windowed turns/s ≥ 70 % of the heap's commit_async rate.
    pub const OF_COMMIT_ASYNC_MIN: f64 = 0.7;
    /// Restart to next turn (p50) ≤ 20 ms.
    pub const RESTART_MS_MAX: f64 = 20.0;
}

impl TurnBenchReport {
    pub fn floor(&self) -> Samples {
        Samples(self.rounds.iter().flat_map(|r| r.floor().0).collect())
    }
    pub fn udp(&self) -> Samples {
        Samples(self.rounds.iter().flat_map(|r| r.udp.0.iter().copied()).collect())
    }
    /// Row `i`'s floor: 2 × commit floor p50 + UDP round trip p50, over all rounds' samples
    /// (the commit floor's taken just before and after the row).
    pub fn strict_floor_us(&self, i: usize) -> f64 {
        let around = Samples(self.rounds.iter().flat_map(|r| r.floor_around(i).0).collect());
        2.0 * around.p50() + self.udp().p50()
    }
    fn pool<'a>(runs: impl Iterator<Item = &'a PingPongRun>) -> Pooled {
        let (mut round_trips, mut ns) = (0, 0u64);
        for r in runs {
            round_trips += r.round_trips;
            ns += r.elapsed_ns;
        }
        Pooled { round_trips, seconds: ns as f64 / 1e9 }
    }
    pub fn strict(&self, i: usize) -> Pooled {
        Self::pool(self.rounds.iter().map(|r| &r.strict[i]))
    }
    pub fn windowed(&self) -> Pooled {
        Self::pool(self.rounds.iter().map(|r| &r.windowed))
    }
    fn ken(&self, runs: impl Iterator<Item = KenRun>) -> Pooled {
        let (mut round_trips, mut seconds) = (0, 0.0);
        for r in runs {
            round_trips += r.round_trips;
            seconds += r.elapsed.as_secs_f64();
        }
        Pooled { round_trips, seconds }
    }
    pub fn ken_strict(&self) -> Pooled {
        self.ken(self.rounds.iter().map(|r| r.ken_strict.clone()))
    }
    pub fn ken_windowed(&self) -> Pooled {
        self.ken(self.rounds.iter().map(|r| r.ken_windowed.clone()))
    }
    /// (synchronous, commit_async) commits per second over all rounds.
    pub fn commit_rates(&self) -> (f64, f64) {
        let n: f64 = self.rounds.iter().map(|r| r.async_commits as f64).sum();
        let t = |rate: fn(&Round) -> f64| self.rounds.iter().map(|r| r.async_commits as f64 / rate(r)).sum::<f64>();
        (n / t(|r| r.sync_rate), n / t(|r| r.async_rate))
    }
    fn per_round(&self, f: impl Fn(&Round) -> f64) -> Vec<f64> {
        self.rounds.iter().map(f).collect()
    }
    fn stats<'a>(&'a self, f: impl Fn(&'a Round) -> &'a serde_json::Value) -> Vec<&'a serde_json::Value> {
        self.rounds.iter().map(f).collect()
    }

    pub fn to_json(&self, cfg: &TurnBenchConfig) -> serde_json::Value {
        let (floor, udp) = (self.floor(), self.udp());
        let strict: Vec<_> = [1usize, 16]
            .iter()
            .enumerate()
            .map(|(i, pages)| {
                let p = self.strict(i);
                let strict_floor = self.strict_floor_us(i);
                let rounds = self.per_round(|r| r.strict_ratio(i));
                let initiators = self.stats(|r| &r.strict[i].initiator);
                let responders = self.stats(|r| &r.strict[i].responder);
                serde_json::json!({
                    "window": 1, "pages": pages, "round_trips": p.round_trips,
                    "round_trips_per_s": p.round_trips_per_s(), "us_per_round_trip": p.us_per_round_trip(),
                    "floor_us_per_round_trip": strict_floor,
                    "commit_floor_p50_us_around_row": (strict_floor - udp.p50()) / 2.0,
                    "ratio_to_floor": median(&rounds), "ratio_to_floor_rounds": rounds,
                    "ratio_to_floor_pooled": p.us_per_round_trip() / strict_floor,
                    "turns_per_device_write": turns_per_device_write(&initiators),
                    "messages_retransmitted": retransmitted(&initiators) + retransmitted(&responders),
                })
            })
            .collect();
        let w = self.windowed();
        let (sync_rate, async_rate) = self.commit_rates();
        let (ks, kw) = (self.ken_strict(), self.ken_windowed());
        let of_async = self.per_round(|r| r.of_commit_async());
        let over_ken = self.per_round(|r| r.over_ken());
        let initiators = self.stats(|r| &r.windowed.initiator);
        let responders = self.stats(|r| &r.windowed.responder);
        let r = &self.restart;
        let rec = &r.recovery;
        let opt = |v: &[f64], f: fn(&[f64]) -> f64| serde_json::json!(if v.is_empty() { None } else { Some(f(v)) });
        let after_open: Vec<f64> = r.to_turn_ms.iter().zip(&r.to_open_ms).map(|(t, o)| t - o).collect();
        let strict_ratio = median(&self.per_round(|r| r.strict_ratio(0)));
        let restart_p50 = pct(&r.to_turn_ms, 0.5);
        serde_json::json!({
            "mode": "turns",
            "device": { "dir": cfg.dir, "quick": cfg.quick },
            "rounds": self.rounds.len(),
            "device_commit_floor": {
                "bytes": 4096, "flush": "O_DIRECT + RWF_DSYNC", "p50_us": floor.p50(), "p99_us": floor.p99(),
                "writes": floor.0.len(), "p50_us_rounds": self.per_round(|r| r.floor().p50()),
            },
            "udp_round_trip": {
                "how": UDP_HOW, "message_bytes": MESSAGE_BYTES, "p50_us": udp.p50(), "p99_us": udp.p99(),
                "round_trips": udp.0.len(), "p50_us_rounds": self.per_round(|r| r.udp.p50()),
            },
            "pingpong_strict": strict,
            "pingpong_windowed": {
                "window": WINDOW, "pages": 1, "round_trips": w.round_trips,
                "round_trips_per_s": w.round_trips_per_s(), "turns_per_s": w.turns_per_s(),
                "turns_per_s_per_node": w.round_trips_per_s(),
                "turns_per_s_rounds": self.per_round(|r| r.windowed.turns_per_s()),
                "initiator_turns_pipelined_fraction": pipelined_fraction(&initiators),
                "initiator_turns_per_device_write": turns_per_device_write(&initiators),
                "responder_turns_pipelined_fraction": pipelined_fraction(&responders),
                "responder_turns_per_device_write": turns_per_device_write(&responders),
                "messages_retransmitted": retransmitted(&initiators) + retransmitted(&responders),
                "initiator_stats_last_round": initiators.last(),
            },
            "commit_async": {
                "pages": 1, "in_flight": COMMIT_ASYNC_DEPTH,
                "commits": self.rounds.iter().map(|r| r.async_commits).sum::<usize>(),
                "async_per_s": async_rate, "sync_per_s": sync_rate,
                "async_per_s_rounds": self.per_round(|r| r.async_rate),
                "async_device_writes": self.rounds.iter().map(|r| r.async_groups).sum::<u64>(),
                "windowed_turns_percent_of_async": 100.0 * median(&of_async),
                "windowed_turns_percent_of_async_rounds": of_async.iter().map(|x| 100.0 * x).collect::<Vec<_>>(),
            },
            "ken_style": {
                "turn_file_bytes": self.rounds[0].ken_strict.turn_file_bytes, "dirty_pages": 1,
                "strict": { "window": 1, "round_trips": ks.round_trips, "round_trips_per_s": ks.round_trips_per_s(),
                            "turns_per_s": ks.turns_per_s(), "us_per_round_trip": ks.us_per_round_trip() },
                "windowed": { "window": WINDOW, "round_trips": kw.round_trips, "round_trips_per_s": kw.round_trips_per_s(),
                              "turns_per_s": kw.turns_per_s(),
                              "turns_per_s_rounds": self.per_round(|r| r.ken_windowed.turns_per_s()) },
                "windowed_fams_over_windowed_ken": median(&over_ken),
                "windowed_fams_over_windowed_ken_rounds": over_ken,
                "strict_fams_over_strict_ken":
                    median(&self.per_round(|r| r.strict[0].round_trips_per_s() / r.ken_strict.round_trips_per_s())),
            },
            "restart": {
                "window": r.window, "restarts": r.to_turn_ms.len(),
                "to_next_turn_p50_ms": restart_p50, "to_next_turn_max_ms": max(&r.to_turn_ms),
                "to_node_open_p50_ms": opt(&r.to_open_ms, |v| pct(v, 0.5)), "to_node_open_max_ms": opt(&r.to_open_ms, max),
                "node_open_to_turn_p50_ms": opt(&after_open, |v| pct(v, 0.5)),
                "samples_ms": r.to_turn_ms,
                "initiator_turns": r.initiator_turns, "initiator_peers_restarted": r.initiator_peers_restarted,
                "heap_open_after_kill": {
                    "open_ms": rec.open_ms, "recovery_ms": rec.recovery_ms, "records_replayed": rec.records_replayed,
                    "log_bytes_read": rec.log_bytes_read, "log_size_bytes": rec.log_size_bytes,
                },
            },
            "targets": {
                "strict_ratio_to_floor": strict_ratio, "strict_ratio_to_floor_max": Targets::STRICT_RATIO_MAX,
                "strict_met": strict_ratio <= Targets::STRICT_RATIO_MAX,
                "windowed_over_ken": median(&over_ken), "windowed_over_ken_min": Targets::OVER_KEN_MIN,
                "over_ken_met": median(&over_ken) >= Targets::OVER_KEN_MIN,
                "windowed_of_commit_async": median(&of_async), "windowed_of_commit_async_min": Targets::OF_COMMIT_ASYNC_MIN,
                "of_commit_async_met": median(&of_async) >= Targets::OF_COMMIT_ASYNC_MIN,
                "restart_p50_ms": restart_p50, "restart_ms_max": Targets::RESTART_MS_MAX,
                "restart_met": restart_p50 <= Targets::RESTART_MS_MAX,
            },
            "seconds": self.seconds,
        })
    }

    pub fn print_table(&self) {
        let (floor, udp) = (self.floor(), self.udp());
        let list = |v: &[f64], digits: usize| v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(" ");
        println!(
            "turns: two `famsd node pingpong` processes on 127.0.0.1, {MESSAGE_BYTES}-byte messages, heaps and logs in the \
bench directory; {} rounds, every ratio taken within a round (median over rounds; each round's in brackets)\n",
            self.rounds.len()
        );
        println!("{:<46} {:>12} {:>12} {:>16} {:>8}", "", "p50 / rate", "p99", "floor / baseline", "ratio");
        println!(
            "{:<46} {:>9.0} µs {:>9.0} µs   [p50 per round: {}]",
            "device commit floor (4 KiB O_DIRECT + dsync)",
            floor.p50(),
            floor.p99(),
            list(&self.per_round(|r| r.floor().p50()), 0)
        );
        println!("{:<46} {:>9.0} µs {:>9.0} µs", "loopback UDP round trip (2 threads, 64 B)", udp.p50(), udp.p99());
        for (i, pages) in [1usize, 16].iter().enumerate() {
            let p = self.strict(i);
            let rounds = self.per_round(|r| r.strict_ratio(i));
            println!(
                "{:<46} {:>9.0} µs {:>12} {:>13.0} µs {:>7.2}×  [{}]",
                format!("ping-pong window 1, {pages} page{}: per round trip", if *pages == 1 { "" } else { "s" }),
                p.us_per_round_trip(),
                "",
                self.strict_floor_us(i),
                median(&rounds),
                list(&rounds, 2)
            );
            println!("{:<46} {:>10.0}/s", "  round trips", p.round_trips_per_s());
        }
        let w = self.windowed();
        let (sync_rate, async_rate) = self.commit_rates();
        let (ks, kw) = (self.ken_strict(), self.ken_windowed());
        let of_async = self.per_round(|r| r.of_commit_async());
        let over_ken = self.per_round(|r| r.over_ken());
        let initiators = self.stats(|r| &r.windowed.initiator);
        let responders = self.stats(|r| &r.windowed.responder);
        println!("{:<46} {:>10.0}/s", format!("ping-pong window {WINDOW}: round trips"), w.round_trips_per_s());
        println!(
            "{:<46} {:>10.0}/s {:>12} {:>14.0}/s {:>6.0} %  [{}]",
            "  turns (both nodes) vs heap commit_async",
            w.turns_per_s(),
            "",
            async_rate,
            100.0 * median(&of_async),
            list(&of_async.iter().map(|x| 100.0 * x).collect::<Vec<_>>(), 0)
        );
        println!(
            "{:<46} {:>10.0}/s {:>12} {:>14.0}/s {:>7.2}×  [{}]",
            format!("  turns vs Ken-style, window {WINDOW}"),
            w.turns_per_s(),
            "",
            kw.turns_per_s(),
            median(&over_ken),
            list(&over_ken, 2)
        );
        println!(
            "{:<46} {:>11.0} % (initiator), {:.0} % (responder)",
            "  turns pipelined",
            100.0 * pipelined_fraction(&initiators),
            100.0 * pipelined_fraction(&responders)
        );
        println!(
            "{:<46} {:>12.1} (initiator), {:.1} (responder)",
            "  turns per device write",
            turns_per_device_write(&initiators),
            turns_per_device_write(&responders)
        );
        println!(
            "{:<46} {:>10.0}/s   (synchronous: {:.0}/s)",
            format!("heap commit_async, 1 page, {COMMIT_ASYNC_DEPTH} in flight"),
            async_rate,
            sync_rate
        );
        println!(
            "{:<46} {:>10.0}/s   = {:.0} turns/s, {:.0} µs per round trip",
            "Ken-style ping-pong window 1: round trips",
            ks.round_trips_per_s(),
            ks.turns_per_s(),
            ks.us_per_round_trip()
        );
        println!(
            "{:<46} {:>10.0}/s   = {:.0} turns/s",
            format!("Ken-style ping-pong window {WINDOW}: round trips"),
            kw.round_trips_per_s(),
            kw.turns_per_s()
        );
        let r = &self.restart;
        println!(
            "{:<46} {:>9.1} ms {:>9.1} ms   (max; {} restarts, window {})",
            "restart after SIGKILL → first durable turn",
            pct(&r.to_turn_ms, 0.5),
            max(&r.to_turn_ms),
            r.to_turn_ms.len(),
            r.window
        );
        if !r.to_open_ms.is_empty() {
            println!(
                "{:<46} {:>9.1} ms {:>9.1} ms   (max)",
                "  of which process start + heap open/recovery",
                pct(&r.to_open_ms, 0.5),
                max(&r.to_open_ms)
            );
        }
        println!(
            "{:<46} {:>9.1} ms {:>12}   (Heap::open {:.1} ms; {} records replayed, {:.1} MiB read, log {:.0} MiB)",
            "  recovery of a SIGKILLed node's heap",
            r.recovery.recovery_ms,
            "",
            r.recovery.open_ms,
            r.recovery.records_replayed,
            r.recovery.log_bytes_read as f64 / (1 << 20) as f64,
            r.recovery.log_size_bytes as f64 / (1 << 20) as f64
        );
        let mark = |ok: bool| if ok { "met" } else { "MISSED" };
        let strict_ratio = median(&self.per_round(|r| r.strict_ratio(0)));
        let restart_p50 = pct(&r.to_turn_ms, 0.5);
        println!("\ntargets (this run):");
        println!(
            "  ping-pong round trip ≤ {:.1} × (2 × commit floor + UDP round trip): {:.2}× — {}",
            Targets::STRICT_RATIO_MAX,
            strict_ratio,
            mark(strict_ratio <= Targets::STRICT_RATIO_MAX)
        );
        println!(
            "  windowed turns/s ≥ {:.0} × Ken-style: {:.2}× — {}",
            Targets::OVER_KEN_MIN,
            median(&over_ken),
            mark(median(&over_ken) >= Targets::OVER_KEN_MIN)
        );
        println!(
            "  windowed turns/s ≥ {:.0} % of the heap's commit_async rate: {:.0} % — {}",
            100.0 * Targets::OF_COMMIT_ASYNC_MIN,
            100.0 * median(&of_async),
            mark(median(&of_async) >= Targets::OF_COMMIT_ASYNC_MIN)
        );
        println!(
            "  restart to next turn ≤ {:.0} ms (p50): {:.1} ms — {}",
            Targets::RESTART_MS_MAX,
            restart_p50,
            mark(restart_p50 <= Targets::RESTART_MS_MAX)
        );
        println!("\n(measured in {:.0} s; ratios compare rows of this run on this machine)", self.seconds);
    }
}
