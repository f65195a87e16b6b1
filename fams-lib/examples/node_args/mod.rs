#![allow(dead_code)] // each example uses part of it
//! The command line shared by the turn examples (no dependency: a few flags).

use fams::transport::NodeId;
use fams::turns::{NodeConfig, RunOptions};
use fams::{FormatOptions, Heap, HeapOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

pub struct NodeArgs {
    pub heap: PathBuf,
    pub id: u64,
    pub listen: SocketAddr,
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Flags this module does not know, for the example: (name, value).
    pub rest: Vec<(String, String)>,
}

pub fn usage(example: &str, extra: &str) -> ! {
    eprintln!(
        "usage: {example} --heap PATH --id N --listen ADDR [--peer ID=ADDR]... {extra}\n\
         The heap is made on first use (64 MiB, its log beside it). Stop with Ctrl-C."
    );
    std::process::exit(64)
}

pub fn parse(example: &str, extra: &str) -> NodeArgs {
    let mut args = std::env::args().skip(1);
    let (mut heap, mut id, mut listen, mut peers, mut rest) = (None, None, None, Vec::new(), Vec::new());
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else { usage(example, extra) };
        match flag.as_str() {
            "--heap" => heap = Some(PathBuf::from(value)),
            "--id" => id = value.parse().ok(),
            "--listen" => listen = value.parse().ok(),
            "--peer" => {
                let Some((i, a)) = value.split_once('=') else { usage(example, extra) };
                let (Ok(i), Ok(a)) = (i.parse(), a.parse()) else { usage(example, extra) };
                peers.push((NodeId(i), a));
            }
            other => rest.push((other.trim_start_matches("--").to_string(), value)),
        }
    }
    let (Some(heap), Some(id), Some(listen)) = (heap, id, listen) else { usage(example, extra) };
    NodeArgs { heap, id, listen, peers, rest }
}

impl NodeArgs {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.rest.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn open(&self) -> Result<(Heap, NodeConfig), fams::Error> {
        if !self.heap.exists() {
            Heap::format(&FormatOptions::new(&self.heap, 64 << 20))?;
        }
        let heap = Heap::open(&self.heap, &HeapOptions::default())?;
        let mut config = NodeConfig::new(NodeId(self.id));
        config.peers = self.peers.clone();
        Ok((heap, config))
    }

    pub fn run_options(&self, stdin: bool) -> RunOptions {
        RunOptions { listen: self.listen, stdin, linger: std::time::Duration::from_secs(1), faults: None }
    }
}

/// Set by SIGINT/SIGTERM: the node finishes what is durable and stops.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn stop_on_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe { signal(sig, SigHandler::Handler(on_signal)) };
    }
}
