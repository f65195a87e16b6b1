//! Turn measurements shared by the criterion benchmark `benches/turns.rs` and `famsd bench
//! --turns`: ping-pong between two fams nodes, the floors they are judged against (a loopback
//! UDP round trip; the device's commit floor and grouped write rate live in the crate root), and
//! the Ken-style baseline (one fsynced end-of-turn file per turn, as `ken.md` describes).
//!
//! Everything here runs in this process on 127.0.0.1 only.

use crate::Samples;
use fams::alloc::{ObjectHeap, ObjectOptions};
use fams::apps::pingpong::{PingPong, PingPongApp};
use fams::transport::NodeId;
use fams::turns::{NodeConfig, RunOptions};
use fams::{FormatOptions, Heap, HeapOptions};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of every ping and pong (fams and Ken-style alike).
pub const MESSAGE_BYTES: usize = 64;

/// Round trips of a 64-byte datagram between two sockets on 127.0.0.1, each served by its own
/// thread with blocking calls, µs.
pub fn udp_round_trip(iters: usize) -> std::io::Result<Samples> {
    let a = UdpSocket::bind("127.0.0.1:0")?;
    let b = UdpSocket::bind("127.0.0.1:0")?;
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    let warm = 200;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 256];
        for _ in 0..iters + warm {
            let n = b.recv(&mut buf)?;
            b.send(&buf[..n])?;
        }
        Ok(())
    });
    let msg = [0x5au8; MESSAGE_BYTES];
    let mut buf = [0u8; 256];
    let mut s = Samples::default();
    for i in 0..iters + warm {
        let t = Instant::now();
        a.send(&msg)?;
        let n = a.recv(&mut buf)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if n != MESSAGE_BYTES {
            return Err(std::io::Error::other(format!("echoed {n} bytes, sent {MESSAGE_BYTES}")));
        }
        if i >= warm {
            s.0.push(us);
        }
    }
    echo.join().map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// fams ping-pong, two nodes in this process

/// Heap of each in-process node: room for 16 touched pages and the turn state, small enough
/// to format quickly before every sample.
const NODE_HEAP_BYTES: u64 = 16 << 20;
/// Log of each in-process node: it wraps and checkpoints in long samples, as a real node's does.
const NODE_LOG_BYTES: u64 = 8 << 20;
/// No sample waits longer than this for its nodes.
const NODE_PATIENCE: Duration = Duration::from_secs(300);

/// One in-process ping-pong run.
#[derive(Clone, Debug)]
pub struct PingPongRun {
    pub round_trips: u64,
    pub window: u64,
    pub touch_pages: usize,
    /// From the initiator's first turn to the start of its last pong's turn, as the initiator
    /// recorded them in its heap (node start-up and shutdown are not in it).
    pub elapsed: Duration,
}

impl PingPongRun {
    pub fn us_per_round_trip(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.round_trips.max(1) as f64
    }
}

/// Ping-pong between two fams nodes — two threads of this process, each running
/// [`fams::turns::run`] on a fresh heap in `dir` with its log a file beside it, over real UDP
/// sockets on 127.0.0.1 — for `round_trips` round trips with `window` pings in flight, each turn
/// writing `touch_pages` heap pages. `window = 1` is strict ping-pong: two durable turns and one
/// UDP round trip per round trip.
pub fn pingpong(dir: &Path, round_trips: u64, window: u64, touch_pages: usize) -> Result<PingPongRun, String> {
    assert!(round_trips > 0 && window > 0 && touch_pages > 0);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ports = free_ports(2)?;
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let ids = [NodeId(1), NodeId(2)];
    let heaps: Vec<PathBuf> = ["pp-initiator.heap", "pp-responder.heap"].iter().map(|n| dir.join(n)).collect();
    for heap in &heaps {
        let mut f = FormatOptions::new(heap, NODE_HEAP_BYTES);
        f.log_size_bytes = Some(NODE_LOG_BYTES);
        f.force = true;
        Heap::format(&f).map_err(|e| e.to_string())?;
    }
    let app = |initiator_of| PingPongApp {
        initiator_of,
        round_trips,
        window,
        message_bytes: MESSAGE_BYTES,
        touch_pages,
        stop_when_done: true,
        print_result: false,
    };
    // Node `me` listens on port `me`, with the other as its peer; it stops when `stop` is set
    // (the responder) or when its app says so (the initiator, after the last pong).
    let node = |me: usize, app: PingPongApp, stop: Arc<AtomicBool>| {
        let heap = heaps[me].clone();
        let mut config = NodeConfig::new(ids[me]);
        config.peers.push((ids[1 - me], addr(1 - me)));
        let options = RunOptions { listen: addr(me), stdin: false, linger: Duration::ZERO, faults: None };
        std::thread::spawn(move || -> Result<(), String> {
            let heap = Heap::open(&heap, &HeapOptions::default()).map_err(|e| e.to_string())?;
            fams::turns::run(heap, config, app, &options, &stop).map(|_| ()).map_err(|e| e.to_string())
        })
    };
    let stop_responder = Arc::new(AtomicBool::new(false));
    let responder = node(1, app(None), Arc::clone(&stop_responder));
    let initiator = node(0, app(Some(ids[1])), Arc::new(AtomicBool::new(false)));
    let deadline = Instant::now() + NODE_PATIENCE;
    while !initiator.is_finished() && Instant::now() < deadline && !responder.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
    }
    stop_responder.store(true, Ordering::SeqCst);
    if !initiator.is_finished() {
        // The responder died or the run took too long: say which, without waiting forever.
        let why = if responder.is_finished() {
            match responder.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => "the responder stopped early".into(),
                Err(_) => "the responder panicked".into(),
            }
        } else {
            format!("no result within {} s", NODE_PATIENCE.as_secs())
        };
        return Err(format!("in-process ping-pong in {}: {why}", dir.display()));
    }
    initiator.join().map_err(|_| "the initiator panicked".to_string())??;
    responder.join().map_err(|_| "the responder panicked".to_string())??;
    let heap = Heap::open(&heaps[0], &HeapOptions::default()).map_err(|e| e.to_string())?;
    let mut objects = ObjectHeap::open(heap, &ObjectOptions { create: false, ..ObjectOptions::default() })
        .map_err(|e| e.to_string())?;
    let root = objects
        .root::<PingPong>(|_| unreachable!("the initiator made its root in its first turn"))
        .map_err(|e| e.to_string())?;
    if root.pongs_received != round_trips || root.finished_unix_ns <= root.started_unix_ns {
        return Err(format!(
            "the initiator's heap says {} of {round_trips} pongs came back (started {} ns, finished {} ns)",
            root.pongs_received, root.started_unix_ns, root.finished_unix_ns
        ));
    }
    let elapsed = Duration::from_nanos(root.finished_unix_ns - root.started_unix_ns);
    objects.close().map_err(|e| e.to_string())?;
    for heap in &heaps {
        remove_heap(heap);
    }
    Ok(PingPongRun { round_trips, window, touch_pages, elapsed })
}

/// Remove a heap made by [`pingpong`] and its log file.
fn remove_heap(heap: &Path) {
    let _ = std::fs::remove_file(heap);
    let mut log = heap.as_os_str().to_owned();
    log.push(".log");
    let _ = std::fs::remove_file(PathBuf::from(log));
}

/// `n` UDP ports on 127.0.0.1 that were free a moment ago.
pub fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("finding a free UDP port: {e}")))
        .collect::<Result<_, _>>()?;
    sockets
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()).map_err(|e| format!("a bound socket's port: {e}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ken-style ping-pong

const KEN_MESSAGE: u8 = 1;
const KEN_ACK: u8 = 2;
const KEN_STOP: u8 = 3;

/// One Ken-style ping-pong run.
#[derive(Clone, Debug)]
pub struct KenRun {
    pub window: u64,
    pub round_trips: u64,
    pub elapsed: Duration,
    /// Size of one end-of-turn file of a one-message turn.
    pub turn_file_bytes: usize,
}

impl KenRun {
    pub fn round_trips_per_s(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64()
    }
    pub fn turns_per_s(&self) -> f64 {
        2.0 * self.round_trips_per_s()
    }
    pub fn us_per_round_trip(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.round_trips.max(1) as f64
    }
}

/// One Ken-style process, reduced to what each turn costs on the critical path: the handler
/// changes one 4 KiB page; the end of the turn is one new file holding the turn's outgoing
/// messages and the dirty page image with a CRC, fsynced, then its directory fsynced; only then
/// the acknowledgement of the consumed message and the turn's messages are sent. One turn at a
/// time. Not run: the patcher (which copies pages into the state file and fsyncs it) and the
/// garbage collection of turn files — both would add device work, so the baseline is generous.
struct KenNode {
    socket: UdpSocket,
    dir: PathBuf,
    dir_file: std::fs::File,
    page: Vec<u8>,
    turn: u64,
    next_seq: u64,
    last_file_bytes: usize,
}

impl KenNode {
    fn new(dir: PathBuf, socket: UdpSocket) -> std::io::Result<KenNode> {
        std::fs::create_dir_all(&dir)?;
        let dir_file = std::fs::File::open(&dir)?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(KenNode {
            socket,
            dir,
            dir_file,
            page: vec![0u8; fams::PAGE_SIZE],
            turn: 0,
            next_seq: 1,
            last_file_bytes: 0,
        })
    }

    fn datagram(kind: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(9 + payload.len());
        d.push(kind);
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(payload);
        d
    }

    /// One turn: `consumed` is the sequence number of the message it processed, `sends` the
    /// payloads of the messages it sends.
    fn turn(&mut self, consumed: Option<u64>, sends: &[&[u8]]) -> std::io::Result<()> {
        self.turn += 1;
        self.page[..8].copy_from_slice(&self.turn.to_le_bytes());
        let messages: Vec<Vec<u8>> =
            sends.iter().enumerate().map(|(i, p)| Self::datagram(KEN_MESSAGE, self.next_seq + i as u64, p)).collect();
        let refs: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
        let path = self.dir.join(format!("turn-{:010}", self.turn));
        self.last_file_bytes = crate::ken_turn_file(&self.dir_file, &path, self.turn, &refs, &[(0, &self.page)])?;
        // Durable: now the ack, then the messages.
        if let Some(seq) = consumed {
            self.socket.send(&Self::datagram(KEN_ACK, seq, &[]))?;
        }
        for m in &messages {
            self.socket.send(m)?;
        }
        self.next_seq += sends.len() as u64;
        Ok(())
    }

    /// The next message (kind, seq, payload), skipping acknowledgements.
    fn receive(&self, buf: &mut [u8]) -> std::io::Result<(u8, u64, usize)> {
        loop {
            let n = self.socket.recv(buf)?;
            if n < 9 {
                return Err(std::io::Error::other("a short Ken-style datagram"));
            }
            let seq = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
            if buf[0] != KEN_ACK {
                return Ok((buf[0], seq, n));
            }
        }
    }
}

/// Ken-style ping-pong between two threads of this process over loopback UDP, each turn
/// durable in its own file in `dir` (one subdirectory per node); the same app shape as the fams
/// rows: the initiator's first turn sends `window` pings, each pong turn sends the next one.
pub fn ken_pingpong(dir: &Path, window: u64, round_trips: u64) -> Result<KenRun, String> {
    let io = |e: std::io::Error| format!("Ken-style ping-pong in {}: {e}", dir.display());
    let _ = std::fs::remove_dir_all(dir);
    let a = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    let b = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    a.connect(b.local_addr().map_err(io)?).map_err(io)?;
    b.connect(a.local_addr().map_err(io)?).map_err(io)?;
    let mut responder = KenNode::new(dir.join("n2"), b).map_err(io)?;
    let mut initiator = KenNode::new(dir.join("n1"), a).map_err(io)?;
    // Returns the size of its last turn file (a one-message turn).
    let answering = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (kind, seq, n) = responder.receive(&mut buf)?;
            if kind == KEN_STOP {
                return Ok(responder.last_file_bytes);
            }
            let payload = buf[9..n].to_vec();
            responder.turn(Some(seq), &[&payload])?;
        }
    });
    let result = (|| -> std::io::Result<Duration> {
        let mut buf = vec![0u8; 65_536];
        let ping = |i: u64| {
            let mut p = vec![0u8; MESSAGE_BYTES];
            p[..8].copy_from_slice(&i.to_le_bytes());
            p
        };
        let started = Instant::now();
        let first: Vec<Vec<u8>> = (1..=window.min(round_trips)).map(ping).collect();
        let mut pings_sent = first.len() as u64;
        initiator.turn(None, &first.iter().map(|p| p.as_slice()).collect::<Vec<_>>())?;
        let mut pongs = 0;
        loop {
            let (kind, seq, _) = initiator.receive(&mut buf)?;
            if kind != KEN_MESSAGE {
                return Err(std::io::Error::other(format!("unexpected datagram kind {kind}")));
            }
            pongs += 1;
            if pongs == round_trips {
                // As the fams initiator reports: up to the start of the last pong's turn.
                return Ok(started.elapsed());
            }
            if pings_sent < round_trips {
                pings_sent += 1;
                let p = ping(pings_sent);
                initiator.turn(Some(seq), &[&p])?;
            } else {
                initiator.turn(Some(seq), &[])?;
            }
        }
    })();
    let _ = initiator.socket.send(&KenNode::datagram(KEN_STOP, 0, &[]));
    let answered = answering.join().map_err(|_| "Ken-style responder panicked".to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    let elapsed = result.map_err(io)?;
    let turn_file_bytes = answered.map_err(io)?;
    Ok(KenRun { window, round_trips, elapsed, turn_file_bytes })
}
