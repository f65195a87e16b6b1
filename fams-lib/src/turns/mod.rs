//! The turn manager: Ken's programming model on the persistent heap, with pipelined output
//! commit.
//!
//! An application is an [`App`]: a handler called once per input (a message from a peer, a line
//! of stdin, the alarm, and [`Input::Start`] / [`Input::Restarted`]). Each call is a *turn*.
//! Everything a turn does — its heap changes, the messages it sends, what it prints, the alarm it
//! sets, the input it consumed — commits together or not at all. Guarantees:
//!
//! - messages between nodes are processed exactly once, in the order each sender sent them
//!   (pairwise FIFO), whatever is lost, duplicated or reordered on the way and whichever node
//!   crashes;
//! - **output commit**: nothing a turn produced (messages, the acknowledgement of what it
//!   consumed, stdout) leaves the process before the turn is durable, so nothing the world saw
//!   can be rolled back;
//! - stdout is at-least-once across crashes (output of durable turns not yet known to be written
//!   is written again after a restart); stdin is at-most-once (a line read but not yet committed
//!   when the node crashes is lost);
//! - a failed turn (an `Err` or a panic) is rolled back in place; its input is consumed by a
//!   turn that records only the failure, so a poison message cannot wedge the node.
//!
//! Turns are pipelined: turn N+1 runs while turn N's log record is being written, and several
//! turns share one device write; N's outputs are held until N is durable.
//!
//! Layout: [`app`] (what applications implement and see), [`state`] (the turn state that lives in
//! the heap), [`core`] (the sans-IO node: the same code runs in production and in simulation),
//! [`node`] (the UDP/stdin/eventfd event loop).
//!
//! ```no_run
//! use fams::turns::{App, Input, NodeConfig, RunOptions, Turn, TurnError};
//! use fams::transport::NodeId;
//! use fams::{Heap, HeapOptions};
//!
//! fams::persistent! {
//!     struct Counter { hits: u64 }
//! }
//!
//! struct Echo;
//! impl App for Echo {
//!     fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
//!         if let Input::Message { from, bytes, .. } = input {
//!             let root = t.heap.root(|_| Counter { hits: 0 })?;
//!             root.hits += 1;
//!             t.send(from, bytes)?; // leaves only once this turn is durable
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let heap = Heap::open("/var/lib/echo/node1.heap", &HeapOptions::default())?;
//! let mut config = NodeConfig::new(NodeId(1));
//! config.peers.push((NodeId(2), "127.0.0.1:7002".parse().unwrap()));
//! let options = RunOptions { listen: "127.0.0.1:7001".parse().unwrap(), stdin: false, linger: Default::default(), faults: None };
//! let stop = std::sync::atomic::AtomicBool::new(false);
//! fams::turns::run(heap, config, Echo, &options, &stop)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod app;
pub mod core;
pub mod faults;
pub mod node;
pub mod state;

pub use app::{App, Input, Turn, TurnError, TurnHeap, TurnLimits};
pub use core::{NodeConfig, NodeCore, NodeError, NodeStats};
pub use faults::{FaultConfig, FaultCounters};
pub use node::{run, run_with_status, RunOptions};
pub use state::{NodeSnapshot, PeerSnapshot};
