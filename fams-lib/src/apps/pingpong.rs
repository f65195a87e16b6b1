//! Two nodes bouncing a counter: the turn latency and throughput benchmark's application.
//!
//! The initiator's `Start` turn sends `window` pings; the responder answers each ping with a
//! pong in its own turn; each pong turn on the initiator sends the next ping until `round_trips`
//! pongs came back. With `window = 1` that is strict ping-pong: every round trip is two turns,
//! two commits and one UDP round trip. With a larger window the turns pipeline.
//!
//! Each turn writes its counter into `touch_pages` distinct heap pages (the dirty set a turn
//! commits besides the turn manager's own state).
//!
//! Either side prints `{"restarted":true}` in its `Restarted` turn (the first turn after a
//! recovery), so a driver can see when a restarted node has completed a durable turn.

use crate::alloc::PVec;
use crate::transport::NodeId;
use crate::turns::{App, Input, Turn, TurnError};
use crate::PAGE_SIZE;
use std::time::SystemTime;

crate::persistent! {
    /// The root of either side.
    pub struct PingPong<'h> {
        pub pings_sent: u64,
        pub pongs_received: u64,
        pub pings_answered: u64,
        /// Wall-clock ns of the first ping and of the last pong (initiator).
        pub started_unix_ns: u64,
        pub finished_unix_ns: u64,
        /// Pages each turn writes.
        pub pages: PVec<'h, u8>,
    }
}

pub struct PingPongApp {
    /// The initiator's peer; `None` on the responder.
    pub initiator_of: Option<NodeId>,
    pub round_trips: u64,
    pub window: u64,
    pub message_bytes: usize,
    /// Heap pages each turn writes (≥ 1).
    pub touch_pages: usize,
    /// Stop the node when done (initiator) — the responder runs until stopped.
    pub stop_when_done: bool,
    /// Print the result line when done (initiator); in-process benchmarks read the heap instead.
    pub print_result: bool,
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

impl PingPongApp {
    fn message(&self, counter: u64) -> Vec<u8> {
        let mut m = vec![0u8; self.message_bytes.max(8)];
        m[..8].copy_from_slice(&counter.to_le_bytes());
        m
    }
}

impl App for PingPongApp {
    const SCHEMA_VERSION: u64 = 1;

    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let pages = self.touch_pages.max(1);
        let now = unix_ns(t.now());
        let (root, _) = t.heap.root_with_alloc(|a| {
            let mut v = PVec::new_in(a);
            v.resize(pages * PAGE_SIZE, 0u8);
            PingPong {
                pings_sent: 0,
                pongs_received: 0,
                pings_answered: 0,
                started_unix_ns: 0,
                finished_unix_ns: 0,
                pages: v,
            }
        })?;
        let counter = root.pings_sent + root.pongs_received + root.pings_answered;
        for page in 0..pages.min(root.pages.len() / PAGE_SIZE) {
            root.pages[page * PAGE_SIZE..page * PAGE_SIZE + 8].copy_from_slice(&counter.to_le_bytes());
        }
        match input {
            Input::Start => {
                let Some(peer) = self.initiator_of else { return Ok(()) };
                root.started_unix_ns = now;
                let n = self.window.min(self.round_trips);
                root.pings_sent = n;
                for i in 0..n {
                    let m = self.message(i + 1);
                    t.send(peer, &m)?;
                }
            }
            Input::Message { from, bytes, .. } => {
                if bytes.len() < 8 {
                    return Err(TurnError::new(format!("a {}-byte message from {from} is too short", bytes.len())));
                }
                match self.initiator_of {
                    None => {
                        root.pings_answered += 1;
                        t.send(from, bytes)?;
                    }
                    Some(peer) => {
                        root.pongs_received += 1;
                        let received = root.pongs_received;
                        let next = (root.pings_sent < self.round_trips).then(|| {
                            root.pings_sent += 1;
                            root.pings_sent
                        });
                        let finished = received == self.round_trips;
                        let mut elapsed_ns = 0;
                        if finished {
                            root.finished_unix_ns = now;
                            elapsed_ns = now.saturating_sub(root.started_unix_ns).max(1);
                        }
                        if let Some(n) = next {
                            let m = self.message(n);
                            t.send(peer, &m)?;
                        }
                        if finished && self.print_result {
                            t.println(&format!(
                                "{{\"round_trips\":{received},\"elapsed_ns\":{elapsed_ns},\"round_trips_per_s\":{:.1}}}",
                                received as f64 * 1e9 / elapsed_ns as f64
                            ))?;
                        }
                        if finished && self.stop_when_done {
                            t.stop();
                        }
                    }
                }
            }
            // Printed only once this turn is durable: a restarted node's first turn is done
            // (`famsd bench --turns` times SIGKILL → restart → this line).
            Input::Restarted => t.println("{\"restarted\":true}")?,
            Input::Alarm | Input::Stdin(_) => {}
        }
        Ok(())
    }
}
