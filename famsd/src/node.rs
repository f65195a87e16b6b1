//! `famsd node`: run the reference turn-based applications (the bank, ping-pong) as real node
//! processes on UDP, and read their state back from their heaps.

use fams::apps::bank::{self, BankApp, BankReport};
use fams::apps::pingpong::PingPongApp;
use fams::transport::{NodeId, PeerView};
use fams::turns::{self, App, NodeConfig, NodeSnapshot, NodeStats, RunOptions};
use fams::{FormatOptions, Heap, HeapOptions, ObjectHeap, ObjectOptions, TrackerKind};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where and as whom a node runs.
#[derive(Clone, Debug)]
pub struct NodeArgs {
    pub heap: PathBuf,
    pub id: u64,
    pub listen: SocketAddr,
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Shared key: datagrams carry a keyed MAC and others are rejected.
    pub key: Option<[u8; 32]>,
    /// Heap size when the heap is made on first use.
    pub size_bytes: u64,
    pub tracker: Option<TrackerKind>,
    pub turns_in_flight_max: u64,
    pub stdin: bool,
    /// Write the node's counters as JSON here when it stops.
    pub stats_json: Option<PathBuf>,
    /// Faults to inject into outgoing datagrams (fault runs).
    pub faults: Option<turns::FaultConfig>,
}

/// "2=127.0.0.1:7002" → (NodeId(2), address).
pub fn parse_peer(s: &str) -> Result<(NodeId, SocketAddr), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("`{s}`: a peer is ID=ADDRESS, e.g. 2=127.0.0.1:7002"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("`{s}`: the peer id must be a number"))?;
    let addr: SocketAddr =
        addr.trim().parse().map_err(|_| format!("`{s}`: `{addr}` is not an address like 127.0.0.1:7002"))?;
    Ok((NodeId(id), addr))
}

/// 64 hex digits → a 32-byte key.
pub fn parse_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a key is 64 hex digits (32 bytes), e.g. from `head -c 32 /dev/urandom | xxd -p -c 64`".into());
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex checked");
    }
    Ok(key)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: std::ffi::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGTERM and SIGINT ask the node to stop cleanly (finish durable turns, then exit).
pub fn stop_on_signals() -> &'static AtomicBool {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { signal(sig, SigHandler::Handler(on_stop_signal)) };
    }
    &STOP
}

/// How large a node's heap may grow (see `open_or_format`).
pub const NODE_HEAP_MAX_BYTES: u64 = 64 << 30;

/// Open the node's heap, making it first if it does not exist.
pub fn open_or_format(path: &Path, size_bytes: u64, tracker: Option<TrackerKind>) -> Result<Heap, String> {
    if !path.exists() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut opts = FormatOptions::new(path, size_bytes);
        // Recovery reads the whole log, so a node's restart time follows its size: an eighth of
        // the heap (at least 4 MiB, at most 64 MiB) holds many turns between checkpoints.
        opts.log_size_bytes = Some((size_bytes / 8).clamp(4 << 20, 64 << 20));
        // A node's state grows with its peers' backlogs: let the heap grow on demand (address
        // space only; disk is reserved as it grows).
        opts.max_size_bytes = Some(size_bytes.max(NODE_HEAP_MAX_BYTES));
        Heap::format(&opts).map_err(|e| e.to_string())?;
    }
    let opts = HeapOptions { tracker, ..HeapOptions::default() };
    Heap::open(path, &opts).map_err(|e| e.to_string())
}

fn config(args: &NodeArgs) -> NodeConfig {
    let mut config = NodeConfig::new(NodeId(args.id));
    config.peers = args.peers.clone();
    config.endpoint.key = args.key;
    config.turns_in_flight_max = args.turns_in_flight_max;
    config
}

/// Run `app` as node `args.id` until SIGTERM/SIGINT or the app stops itself.
pub fn run_app<A: App>(args: &NodeArgs, app: A) -> Result<NodeStats, String> {
    let stop = stop_on_signals();
    let heap = open_or_format(&args.heap, args.size_bytes, args.tracker)?;
    let options =
        RunOptions { listen: args.listen, stdin: args.stdin, linger: Duration::from_secs(2), faults: args.faults };
    let status_path = status_path(&args.heap);
    let mut write_status = |stats: &NodeStats, peers: &[(NodeId, PeerView)]| {
        let v = serde_json::json!({
            "node": args.id, "pid": std::process::id(), "listen": args.listen.to_string(),
            "written_unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "stats": stats_json(stats), "peers": peer_views_json(peers),
        });
        // Written whole then renamed, so a reader never sees half a file.
        let tmp = status_path.with_extension("status.json.tmp");
        if std::fs::write(&tmp, serde_json::to_string_pretty(&v).expect("json") + "\n").is_ok() {
            let _ = std::fs::rename(&tmp, &status_path);
        }
    };
    let stats = turns::run_with_status(heap, config(args), app, &options, stop, &mut write_status)
        .map_err(|e| e.to_string())?;
    if let Some(path) = &args.stats_json {
        let text = serde_json::to_string_pretty(&stats_json(&stats)).expect("json");
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(stats)
}

/// Where a running node writes its status (counters and peers) every second: beside the heap.
pub fn status_path(heap: &Path) -> PathBuf {
    let mut name = heap.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".status.json");
    heap.with_file_name(name)
}

fn peer_views_json(peers: &[(NodeId, PeerView)]) -> serde_json::Value {
    peers
        .iter()
        .map(|(id, p)| {
            serde_json::json!({
                "peer": id.0, "addr": p.addr.to_string(), "incarnation_seen": p.incarnation_seen,
                "next_expected": p.next_expected, "ack_to_send": p.ack_to_send, "acked_by_peer": p.acked_by_peer,
                "highest_queued_seq": p.highest_queued_seq, "unacked_messages": p.unacked_messages,
                "unacked_bytes": p.unacked_bytes, "in_flight_fragments": p.in_flight_fragments,
                "buffered_messages": p.buffered_messages,
                "srtt_us": p.srtt.map(|d| d.as_micros() as u64), "rto_us": p.rto.as_micros() as u64,
            })
        })
        .collect()
}

fn transport_json(t: &fams::transport::TransportStats) -> serde_json::Value {
    let malformed: serde_json::Map<String, serde_json::Value> =
        t.malformed.by_reason().iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    serde_json::json!({
        "datagrams_sent": t.datagrams_sent, "datagrams_received": t.datagrams_received,
        "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received, "messages_delivered": t.messages_delivered,
        "fragments_sent": t.fragments_sent, "fragments_retransmitted": t.fragments_retransmitted,
        "messages_retransmitted": t.messages_retransmitted, "duplicates_dropped": t.duplicates_dropped,
        "acks_sent": t.acks_sent, "out_of_order_buffered": t.out_of_order_buffered,
        "buffer_full_dropped": t.buffer_full_dropped, "rejected_malformed": t.rejected_malformed,
        "malformed": malformed, "rejected_checksum": t.rejected_checksum, "rejected_mac": t.rejected_mac,
        "rejected_auth_mode": t.rejected_auth_mode, "wrong_receiver": t.wrong_receiver,
        "unknown_peer": t.unknown_peer, "address_mismatch": t.address_mismatch, "address_changes": t.address_changes,
        "stale_incarnation": t.stale_incarnation, "timeouts": t.timeouts,
        "hellos_sent": t.hellos_sent, "hellos_received": t.hellos_received, "peer_restarts": t.peer_restarts,
    })
}

pub fn stats_json(s: &NodeStats) -> serde_json::Value {
    let h = &s.heap;
    let per_commit = |v: u64| v as f64 / h.commits.max(1) as f64;
    serde_json::json!({
        "heap": { "tracker": h.tracker, "io_path": h.io_path, "flush_mode": h.flush_mode, "commits": h.commits,
                  "pages_per_commit": per_commit(h.pages_tracked), "record_bytes_per_commit": per_commit(h.record_bytes),
                  "capture_us_per_commit": per_commit(h.capture_ns) / 1e3, "collect_us_per_commit": per_commit(h.collect_ns) / 1e3,
                  "device_write_us_per_group": h.device_write_ns as f64 / 1e3 / h.groups.max(1) as f64,
                  "groups": h.groups, "checkpoints": h.checkpoints, "background_checkpoints": h.background_checkpoints,
                  "recovery_ms": h.recovery.duration.as_secs_f64() * 1e3, "records_replayed": h.recovery.records_replayed },
        "transport": transport_json(&s.transport),
        "faults_injected": { "dropped": s.faults_injected.dropped, "duplicated": s.faults_injected.duplicated,
                             "delayed": s.faults_injected.delayed },
        "turns": s.turns, "turns_failed": s.turns_failed, "turns_pipelined": s.turns_pipelined, "turns_synchronous": s.turns_synchronous,
        "turns_in_flight_peak": s.turns_in_flight_peak, "turns_durable": s.turns_durable,
        "messages_sent": s.messages_sent, "messages_consumed": s.messages_consumed,
        "stdin_lines": s.stdin_lines, "alarms": s.alarms, "housekeeping_commits": s.housekeeping_commits,
        "device_writes": s.device_writes, "turns_per_device_write": s.turns_per_device_write(),
        "peers_restarted": s.peers_restarted, "duplicate_deliveries_refused": s.duplicate_deliveries_refused,
    })
}

pub fn run_bank(args: &NodeArgs, transfers: u64, interval: Duration, verbose: bool) -> Result<NodeStats, String> {
    run_app(args, BankApp { transfers, interval, verbose })
}

pub fn run_pingpong(args: &NodeArgs, app: PingPongApp) -> Result<NodeStats, String> {
    run_app(args, app)
}

fn open_objects(path: &Path) -> Result<ObjectHeap, String> {
    let heap = Heap::open(path, &HeapOptions::default()).map_err(|e| e.to_string())?;
    ObjectHeap::open(heap, &ObjectOptions { create: false, ..ObjectOptions::default() }).map_err(|e| e.to_string())
}

/// The bank held by a (stopped) node's heap.
pub fn bank_report(path: &Path) -> Result<Option<BankReport>, String> {
    let mut objects = open_objects(path)?;
    bank::report(&mut objects).map_err(|e| format!("{}: {e}", path.display()))
}

/// The turn state held by a (stopped) node's heap; `None` if it never ran as a node.
pub fn turn_state(path: &Path) -> Result<Option<NodeSnapshot>, String> {
    let heap = Heap::open(path, &HeapOptions::default()).map_err(|e| e.to_string())?;
    let mut objects = match ObjectHeap::open(heap, &ObjectOptions { create: false, ..ObjectOptions::default() }) {
        Ok(o) => o,
        Err(fams::ObjectError::NotAnObjectHeap { .. }) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    turns::state::snapshot(&mut objects).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn snapshot_json(s: &NodeSnapshot) -> serde_json::Value {
    let peers: Vec<serde_json::Value> = s
        .peers
        .iter()
        .map(|p| {
            serde_json::json!({
                "peer": p.peer.0, "addr": p.addr.map(|a| a.to_string()), "next_send_seq": p.next_send_seq,
                "acked_by_peer": p.acked_by_peer, "consumed": p.consumed, "retired": p.retired,
                "unacked_messages": p.unacked_messages, "unacked_bytes": p.unacked_bytes,
            })
        })
        .collect();
    serde_json::json!({
        "node": s.node.0, "incarnation": s.incarnation, "started": s.started, "turns": s.turns,
        "turns_failed": s.turns_failed, "messages_sent": s.messages_sent, "messages_consumed": s.messages_consumed,
        "alarm_unix_ns": s.alarm_unix_ns, "stdout_pending_bytes": s.stdout_pending_bytes,
        "last_failure": s.last_failure, "peers": peers,
    })
}

/// See [`turns::state::retire_peer`].
pub fn retire_peer(path: &Path, peer: NodeId) -> Result<Option<u64>, String> {
    let mut objects = open_objects(path)?;
    turns::state::retire_peer(&mut objects, peer).map_err(|e| format!("{}: {e}", path.display()))
}

/// See [`turns::state::set_peer_addr`].
pub fn set_peer_addr(path: &Path, peer: NodeId, addr: SocketAddr) -> Result<(), String> {
    let mut objects = open_objects(path)?;
    turns::state::set_peer_addr(&mut objects, peer, addr).map_err(|e| format!("{}: {e}", path.display()))
}
