//! The production driver of a [`NodeCore`]: one UDP socket, stdin, the heap's durability
//! descriptor and timers, multiplexed with `mio`.
//!
//! `mio` because the loop waits on four kinds of readiness at once (the socket, the eventfd the
//! log writer signals, a waker for stdin lines read on a helper thread, a deadline) and `mio`
//! is the thin, well-kept epoll wrapper that does exactly that without an async runtime; the
//! node's logic stays in the sans-IO core, which knows nothing of it.

use super::app::App;
use super::core::{NodeConfig, NodeCore, NodeError, NodeStats};
use super::faults::{FaultConfig, FaultLayer};
use crate::transport::{NodeId, PeerView, Transmit};
use crate::Heap;
use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const SOCKET: Token = Token(0);
const DURABLE: Token = Token(1);
const STDIN: Token = Token(2);

/// Socket buffer sizes asked for: a 4 MiB message arrives as ~3,000 datagrams.
const SOCKET_BUFFER_BYTES: usize = 8 << 20;
/// Datagrams read per wake-up before turns get to run.
const DATAGRAMS_PER_WAKEUP_MAX: usize = 1024;
/// Turns per loop iteration before the socket is serviced again.
const TURNS_PER_ITERATION_MAX: usize = 256;
/// How often [`run_with_status`] reports.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The loop wakes at least this often (to see the stop flag).
const IDLE_WAKEUP: Duration = Duration::from_millis(50);

/// How to run a node.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The UDP address to listen on (peers send here).
    pub listen: SocketAddr,
    /// Feed stdin lines to the node as [`super::Input::Stdin`].
    pub stdin: bool,
    /// After a stop is asked: how long to keep running so peers acknowledge what was sent.
    pub linger: Duration,
    /// Inject faults into outgoing datagrams (tests and fault runs).
    pub faults: Option<FaultConfig>,
}

/// Run `app` on `heap` until `stop` is set or a turn calls [`super::Turn::stop`]. Output of
/// durable turns goes to stdout.
pub fn run<A: App>(
    heap: Heap,
    config: NodeConfig,
    app: A,
    options: &RunOptions,
    stop: &AtomicBool,
) -> Result<NodeStats, NodeError> {
    run_with_status(heap, config, app, options, stop, &mut |_, _| {})
}

/// Receives the node's counters and its peers' protocol state.
pub type StatusFn<'a> = dyn FnMut(&NodeStats, &[(NodeId, PeerView)]) + 'a;

/// [`run`], calling `status` with the node's counters and its peers' protocol state about
/// every [`STATUS_INTERVAL`] and once more when it stops (for status files and monitoring).
pub fn run_with_status<A: App>(
    heap: Heap,
    config: NodeConfig,
    app: A,
    options: &RunOptions,
    stop: &AtomicBool,
    status: &mut StatusFn<'_>,
) -> Result<NodeStats, NodeError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| NodeError::Io { what, source }
    };
    let mut socket = UdpSocket::bind(options.listen).map_err(io(&format!("binding UDP {}", options.listen)))?;
    {
        use nix::sys::socket::sockopt::{RcvBuf, RcvBufForce, SndBuf, SndBufForce};
        set_buffer(&socket, RcvBufForce, RcvBuf);
        set_buffer(&socket, SndBufForce, SndBuf);
    }
    let mut poll = Poll::new().map_err(io("creating the event loop"))?;
    poll.registry().register(&mut socket, SOCKET, Interest::READABLE).map_err(io("registering the socket"))?;

    let now = Instant::now();
    let mut core = NodeCore::open(heap, config, app, now, SystemTime::now())?;
    let durable_fd = core.durability_fd().as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&durable_fd), DURABLE, Interest::READABLE)
        .map_err(io("registering the durability descriptor"))?;

    let (stdin_tx, stdin_rx) = mpsc::sync_channel::<Vec<u8>>(256);
    if options.stdin {
        let waker = Arc::new(Waker::new(poll.registry(), STDIN).map_err(io("creating the stdin waker"))?);
        std::thread::Builder::new()
            .name("fams-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().split(b'\n') {
                    let Ok(line) = line else { break };
                    if stdin_tx.send(line).is_err() {
                        break;
                    }
                    let _ = waker.wake();
                }
            })
            .map_err(io("starting the stdin reader"))?;
    }

    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 65_536];
    let mut faults = options.faults.map(FaultLayer::new);
    // Datagrams ready to go, oldest first; kept when the socket buffer is full.
    let mut outgoing: std::collections::VecDeque<Transmit> = std::collections::VecDeque::new();
    let mut scratch = Vec::new();
    let mut want_writable = false;
    let mut stdout = std::io::stdout();
    let mut stopping_since: Option<Instant> = None;
    let mut last_status = Instant::now();
    let stats_now = |core: &NodeCore<A>, faults: &Option<FaultLayer>| {
        let mut s = core.stats();
        if let Some(f) = faults {
            s.faults_injected = f.counters;
        }
        s
    };
    loop {
        let now = Instant::now();
        let deadline = match (core.poll_timeout(), faults.as_ref().and_then(|f| f.next_deadline())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = deadline.map(|t| t.saturating_duration_since(now)).unwrap_or(IDLE_WAKEUP);
        match poll.poll(&mut events, Some(timeout.min(IDLE_WAKEUP))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NodeError::Io { what: "waiting for events".into(), source: e }),
        }
        let now = Instant::now();
        for _ in 0..DATAGRAMS_PER_WAKEUP_MAX {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => core.handle_datagram(now, from, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // ICMP errors (a peer's port closed while it restarts) surface here: ignore.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(NodeError::Io { what: "receiving a datagram".into(), source: e }),
            }
        }
        while let Ok(line) = stdin_rx.try_recv() {
            core.push_stdin(line);
        }
        core.step(now, TURNS_PER_ITERATION_MAX)?;
        let now = Instant::now();
        // Send what is due; a full socket buffer keeps the rest for the next round.
        while let Some(t) = core.poll_transmit(now) {
            match faults.as_mut() {
                Some(f) => f.outgoing(now, t, &mut scratch),
                None => scratch.push(t),
            }
        }
        if let Some(f) = faults.as_mut() {
            f.due(now, &mut scratch);
        }
        outgoing.extend(scratch.drain(..));
        while let Some(t) = outgoing.front() {
            match socket.send_to(&t.bytes, t.dest) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // A datagram that cannot be sent is a lost datagram: retransmission covers it.
                Err(e) => tracing::debug!(dest = %t.dest, error = %e, "send failed"),
            }
            outgoing.pop_front();
        }
        // Ask to be woken when the socket can take more only while datagrams wait for it:
        // registered always, every send would wake the loop once more for nothing.
        if outgoing.is_empty() == want_writable {
            want_writable = !outgoing.is_empty();
            let interest = if want_writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            poll.registry().reregister(&mut socket, SOCKET, interest).map_err(io("registering the socket"))?;
        }
        while let Some(bytes) = core.poll_stdout() {
            stdout.write_all(&bytes).map_err(io("writing stdout"))?;
        }
        stdout.flush().map_err(io("writing stdout"))?;

        if now.duration_since(last_status) >= STATUS_INTERVAL {
            last_status = now;
            status(&stats_now(&core, &faults), &core.peer_views());
        }
        if stop.load(Ordering::Relaxed) || core.stop_requested() {
            let since = *stopping_since.get_or_insert(now);
            core.flush(now)?;
            if (core.is_quiescent() && outgoing.is_empty()) || now.duration_since(since) >= options.linger {
                break;
            }
        }
    }
    // Hand out what the last flush released.
    let now = Instant::now();
    while let Some(t) = core.poll_transmit(now) {
        let _ = socket.send_to(&t.bytes, t.dest);
    }
    while let Some(bytes) = core.poll_stdout() {
        stdout.write_all(&bytes).map_err(io("writing stdout"))?;
    }
    let stats = stats_now(&core, &faults);
    status(&stats, &core.peer_views());
    tracing::info!(node = %core.node(), turns = stats.turns, "node stopped");
    core.close(now)?;
    Ok(stats)
}

/// Ask for large socket buffers: the `FORCE` option (allowed with CAP_NET_ADMIN) passes
/// net.core.{r,w}mem_max, the plain one is capped by it. Failure only costs retransmissions,
/// so it is not an error.
fn set_buffer<F, P>(socket: &UdpSocket, force: F, plain: P)
where
    F: nix::sys::socket::SetSockOpt<Val = usize> + std::fmt::Debug + Copy,
    P: nix::sys::socket::SetSockOpt<Val = usize> + std::fmt::Debug + Copy,
{
    if !setsockopt_bytes(socket, force) {
        setsockopt_bytes(socket, plain);
    }
}

fn setsockopt_bytes<O: nix::sys::socket::SetSockOpt<Val = usize> + std::fmt::Debug + Copy>(
    socket: &UdpSocket,
    option: O,
) -> bool {
    match nix::sys::socket::setsockopt(socket, option, &SOCKET_BUFFER_BYTES) {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(?option, %error, "setsockopt(socket buffer) failed");
            false
        }
    }
}
