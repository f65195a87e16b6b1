//! The turn system on real processes and real UDP sockets on loopback: a bank cluster whose
//! nodes are SIGKILLed and restarted mid-run, with and without a seeded fault layer at each
//! node's socket (loss, duplication, reordering) or a `famsd relay` process between the nodes
//! (loss, duplication, reordering, delay). At the end the total must be conserved, every
//! transfer applied exactly once and in per-pair order, and the run must have finished.

use fams_tests::TempDir;
use std::process::Command;

fn cluster(extra: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("cluster");
    let out = Command::new(env!("CARGO_BIN_EXE_famsd"))
        .args(["node", "cluster", "--json", "--dir"])
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .expect("run famsd node cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    eprintln!("cluster {extra:?}: {v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(v["total"], v["expected_total"], "{v}");
    assert_eq!(v["transfers_applied"], v["transfers"], "{v}");
    v
}

#[test]
fn bank_survives_sigkills_of_every_node() {
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "400",
        "--interval-ms",
        "12",
        "--kills-per-node",
        "5",
        "--kill-gap-ms",
        "50,200",
        "--seed",
        "3",
    ]);
    assert!(v["transfers"].as_u64().unwrap() >= 1000, "{v}");
    for k in v["kills_per_node"].as_array().unwrap() {
        assert!(k.as_u64().unwrap() >= 5, "every node must be killed at least 5 times: {v}");
    }
}

/// At least a hundred real SIGKILLs in one run: a kill every 10–40 ms, each node down for up
/// to 200 ms, so nodes die mid-turn, mid-recovery and right after restarting, while the
/// transfers (enough of them to outlast the kills) keep flowing.
#[test]
fn bank_survives_a_hundred_sigkills() {
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "3000",
        "--interval-ms",
        "1",
        "--kills-per-node",
        "34",
        "--kill-gap-ms",
        "10,40",
        "--seed",
        "21",
    ]);
    let kills = v["kills"].as_u64().unwrap();
    eprintln!("a hundred SIGKILLs: {kills} kills {} in {:.1} s, 0 violations", v["kills_per_node"], v["elapsed_s"]);
    assert!(kills >= 100, "only {kills} SIGKILLs landed while transfers were going: {v}");
}

#[test]
fn bank_with_back_to_back_pipelined_transfers_survives_sigkills() {
    // No pause between transfers: turns pipeline, so kills land while turns are in flight — the
    // run CI repeats with deliberate output-commit bugs, which it must catch.
    // Kills come every 20–80 ms: the run is short.
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "3000",
        "--interval-ms",
        "0",
        "--kills-per-node",
        "6",
        "--kill-gap-ms",
        "20,80",
        "--seed",
        "3",
    ]);
    assert!(v["last_run_counters"]["turns_pipelined"].as_u64().unwrap() > 0, "{v}");
    assert!(v["kills"].as_u64().unwrap() >= 6, "{v}");
}

#[test]
fn bank_survives_loss_duplication_reordering_and_kills() {
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "200",
        "--interval-ms",
        "5",
        "--kills-per-node",
        "2",
        "--kill-gap-ms",
        "30,120",
        "--faults",
        "0.3,0.1,0.1,9",
        "--seed",
        "5",
    ]);
    assert!(v["kills"].as_u64().unwrap() >= 6, "{v}");
    // The faults really happened (counted in the nodes' last runs).
    let c = &v["last_run_counters"];
    for key in
        ["faults_dropped", "faults_duplicated", "faults_delayed", "fragments_retransmitted", "duplicates_dropped"]
    {
        assert!(c[key].as_u64().unwrap_or(0) > 0, "{key} is 0: {v}");
    }
}

/// The nodes talk through a `famsd relay` process (one face per node: node j reaches node i at
/// i's face, and the relay sends to i from j's face) that loses, duplicates, reorders and delays
/// their datagrams; every node is SIGKILLed and restarted while the relay stays up.
#[test]
fn bank_survives_a_fault_relay_and_sigkills_of_every_node() {
    let started = std::time::Instant::now();
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "300",
        "--interval-ms",
        "5",
        "--kills-per-node",
        "3",
        "--kill-gap-ms",
        "30,120",
        "--relay",
        "0.2,0.1,0.1,0..20,9",
        "--seed",
        "5",
        "--timeout-s",
        "60",
    ]);
    for k in v["kills_per_node"].as_array().unwrap() {
        assert!(k.as_u64().unwrap() >= 3, "every node must be killed at least 3 times: {v}");
    }
    let relay = &v["relay"];
    assert_eq!(relay["stopped_by"], "signal", "the harness stops the relay, after the nodes: {v}");
    // Each fault really happened, in the relay's own counters over the whole run.
    let c = &relay["counters"];
    for key in ["forwarded", "dropped", "duplicated", "reordered", "reorder_held", "delayed"] {
        assert!(c[key].as_u64().unwrap_or(0) > 0, "relay counter {key} is 0: {v}");
    }
    // Only the nodes send to the faces, each to the others' faces.
    assert_eq!((c["unknown_source_dropped"].as_u64(), c["self_addressed_dropped"].as_u64()), (Some(0), Some(0)), "{v}");
    // Every node saw each peer's datagrams come from the address it was configured with (the
    // peer's face): none refused for coming from elsewhere, no peer seen to move.
    let n = &v["last_run_counters"];
    assert_eq!((n["address_mismatch"].as_u64(), n["address_changes"].as_u64()), (Some(0), Some(0)), "{v}");
    // The transport suppressed every duplicate itself (the turn layer refuses any it lets
    // through, so the bank cannot see them: this counter is where such a bug shows).
    assert_eq!(n["duplicate_deliveries_refused"].as_u64(), Some(0), "{v}");
    // The transport had to repair what the relay did.
    assert!(n["fragments_retransmitted"].as_u64().unwrap_or(0) > 0, "{v}");
    eprintln!(
        "through the relay: {} kills, relay counters {c}, run {:.1} s (test {:.1} s)",
        v["kills"],
        v["elapsed_s"].as_f64().unwrap_or(0.0),
        started.elapsed().as_secs_f64()
    );
}

/// Keyed nodes through the relay: a keyed endpoint would follow a fresh authenticated datagram
/// to a new address, so the relay must never make a peer look as if it moved.
#[test]
fn bank_with_a_shared_key_through_the_relay() {
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let v = cluster(&[
        "--nodes",
        "3",
        "--transfers",
        "100",
        "--kills-per-node",
        "1",
        "--kill-gap-ms",
        "30,120",
        "--key",
        key,
        "--relay",
        "0.1,0.1,0.1,0..10,4",
        "--seed",
        "8",
        "--timeout-s",
        "60",
    ]);
    let n = &v["last_run_counters"];
    assert_eq!((n["address_mismatch"].as_u64(), n["address_changes"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(n["duplicate_deliveries_refused"].as_u64(), Some(0), "{v}");
    assert!(v["relay"]["counters"]["dropped"].as_u64().unwrap_or(0) > 0, "{v}");
}

#[test]
fn bank_survives_sigkills_under_the_other_trackers() {
    for tracker in fams_tests::trackers().iter().filter(|t| **t != fams::TrackerKind::Uffd) {
        let name = tracker.name();
        let v = cluster(&[
            "--nodes",
            "3",
            "--transfers",
            "150",
            "--interval-ms",
            "8",
            "--kills-per-node",
            "2",
            "--kill-gap-ms",
            "30,120",
            "--tracker",
            name,
        ]);
        assert!(v["kills"].as_u64().unwrap() >= 6, "{name}: {v}");
    }
}

#[test]
fn bank_with_a_shared_key() {
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    cluster(&["--nodes", "3", "--transfers", "100", "--kills-per-node", "1", "--key", key, "--seed", "8"]);
}

/// Ping-pong between two node processes; returns the initiator's stdout and both nodes' stats.
fn pingpong(window: u64, round_trips: u64) -> (String, serde_json::Value, serde_json::Value) {
    let dir = TempDir::new("pingpong");
    let ports = famsd::cluster::free_ports(2).expect("ports");
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let node = |id: usize, extra: &[String]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_famsd"));
        cmd.args(["node", "pingpong", "--id", &id.to_string(), "--listen", &addr(id - 1)])
            .arg("--heap")
            .arg(dir.join(&format!("n{id}.heap")))
            .arg("--peer")
            .arg(format!("{}={}", 3 - id, addr(2 - id)))
            .arg("--stats-json")
            .arg(dir.join(&format!("n{id}.json")))
            .args(extra)
            .env("FAMS_LOG", "warn");
        cmd
    };
    let mut responder = node(2, &[]).stdout(std::process::Stdio::null()).spawn().expect("responder");
    let initiator = node(
        1,
        &[
            "--initiator-of".into(),
            "2".into(),
            "--round-trips".into(),
            round_trips.to_string(),
            "--window".into(),
            window.to_string(),
        ],
    )
    .output()
    .expect("initiator");
    famsd::child::signal_child(&mut responder, nix::sys::signal::Signal::SIGTERM);
    let _ = responder.wait();
    assert!(initiator.status.success(), "initiator failed: {}", String::from_utf8_lossy(&initiator.stderr));
    let read = |id: usize| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(&format!("n{id}.json"))).expect("stats file"))
            .expect("json")
    };
    (String::from_utf8_lossy(&initiator.stdout).into_owned(), read(1), read(2))
}

#[test]
fn pipelined_turns_overlap_and_share_device_writes() {
    let (out, initiator, responder) = pingpong(64, 3000);
    eprintln!("{out}\ninitiator {initiator}\nresponder {responder}");
    assert!(out.contains("\"round_trips\":3000"), "{out}");
    for s in [&initiator, &responder] {
        let turns = s["turns"].as_u64().unwrap();
        let pipelined = s["turns_pipelined"].as_u64().unwrap();
        assert!(turns >= 3000, "{s}");
        // Most turns start while an earlier one is still on its way to the disk.
        assert!(pipelined * 2 > turns, "few pipelined turns: {s}");
        assert!(s["turns_per_device_write"].as_f64().unwrap() > 2.0, "turns do not share device writes: {s}");
    }
}

#[test]
fn strict_pingpong_completes() {
    let (out, initiator, _) = pingpong(1, 300);
    eprintln!("{out}\n{initiator}");
    assert!(out.contains("\"round_trips\":300"), "{out}");
}

/// Two network namespaces joined by a veth pair at MTU 1,500 (made and removed by the test).
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn new() -> Option<Netns> {
        if !fams_tests::is_root() {
            fams_tests::skip("network namespaces need root");
            return None;
        }
        let tag = std::process::id() % 100_000;
        let names = [format!("famsa{tag}"), format!("famsb{tag}")];
        let ns = Netns { names };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let (a, b) = (&ns.names[0], &ns.names[1]);
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&["link", "add", &va, "mtu", "1500", "type", "veth", "peer", "name", &vb, "mtu", "1500"]);
        ip(&["link", "set", &va, "netns", a]);
        ip(&["link", "set", &vb, "netns", b]);
        for (n, v, addr) in [(a, &va, "10.201.77.1/24"), (b, &vb, "10.201.77.2/24")] {
            ip(&["-n", n, "addr", "add", addr, "dev", v]);
            ip(&["-n", n, "link", "set", v, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn one_mib_messages_cross_a_1500_byte_mtu_between_namespaces() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("netns");
    let node = |i: usize, extra: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.names[i], env!("CARGO_BIN_EXE_famsd"), "node", "pingpong"])
            .args(["--id", &(i + 1).to_string(), "--listen", &format!("10.201.77.{}:7000", i + 1)])
            .args(["--peer", &format!("{}=10.201.77.{}:7000", 2 - i, 2 - i)])
            .arg("--heap")
            .arg(dir.join(&format!("n{}.heap", i + 1)))
            .arg("--stats-json")
            .arg(dir.join(&format!("n{}.json", i + 1)))
            .args(["--size", "128M"])
            .args(extra)
            .env("FAMS_LOG", "warn");
        cmd
    };
    let mut responder = node(1, &[]).stdout(std::process::Stdio::null()).spawn().expect("responder");
    let out = node(0, &["--initiator-of", "2", "--round-trips", "12", "--window", "2", "--message-bytes", "1048576"])
        .output()
        .expect("initiator");
    famsd::child::signal_child(&mut responder, nix::sys::signal::Signal::SIGTERM);
    let _ = responder.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"round_trips\":12"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("n1.json")).expect("stats")).expect("json");
    eprintln!("{stdout}{stats}");
    // 12 messages of 1 MiB each way, in datagrams that fit the 1,500-byte MTU.
    let t = &stats["transport"];
    assert!(t["fragments_sent"].as_u64().unwrap() >= 12 * (1 << 20) / 1400, "{stats}");
    assert!(t["bytes_received"].as_u64().unwrap() >= 12 << 20, "{stats}");
}

/// The operator's commands on a stopped node's heap: inspect shows its peers, retire drops a dead
/// peer's outbox and marks it, set-peer gives it a new address (and takes it back).
#[test]
fn inspect_retire_and_set_peer_on_a_stopped_node() {
    let dir = TempDir::new("operator");
    let run = dir.join("run");
    let famsd = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_famsd")).args(args).output().expect("run famsd");
        assert!(out.status.success(), "famsd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run_s = run.to_str().unwrap();
    famsd(&["node", "cluster", "--nodes", "2", "--transfers", "20", "--kills-per-node", "0", "--json", "--dir", run_s]);
    let heap = run.join("node1.heap");
    let heap_s = heap.to_str().unwrap();
    let inspect = |heap: &str| -> serde_json::Value {
        serde_json::from_str(&famsd(&["inspect", "--heap", heap, "--json"])).expect("inspect json")
    };
    let v = inspect(heap_s);
    assert_eq!(v["node"]["node"], 1, "{v}");
    assert_eq!(v["node"]["peers"][0]["peer"], 2, "{v}");
    assert_eq!(v["node"]["peers"][0]["next_send_seq"], 21, "20 transfers sent to the only peer: {v}");
    assert!(famsd(&["node", "retire", "--heap", heap_s, "--peer", "2"]).contains("retired peer 2"));
    assert_eq!(inspect(heap_s)["node"]["peers"][0]["retired"], true);
    famsd(&["node", "set-peer", "--heap", heap_s, "--peer", "2=127.0.0.1:9"]);
    let v = inspect(heap_s);
    assert_eq!(
        (v["node"]["peers"][0]["retired"].clone(), v["node"]["peers"][0]["addr"].clone()),
        (false.into(), "127.0.0.1:9".into()),
        "{v}"
    );
}
