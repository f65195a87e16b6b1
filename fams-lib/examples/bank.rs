//! A bank node: accounts in a crash-proof heap, transfers to other nodes by message. Run three
//! (in three terminals), kill any of them with `kill -9` and start it again: the total across
//! the nodes never changes and no transfer is applied twice or lost.
//!
//! ```sh
//! cargo run --release -p fams --example bank -- --heap n1.heap --id 1 --listen 127.0.0.1:7001 \
//!     --peer 2=127.0.0.1:7002 --peer 3=127.0.0.1:7003 --transfers 1000
//! ```
//! Type `balances` to print this node's accounts. `famsd node report --heap n1.heap` reads a
//! stopped node's bank; `famsd node cluster` runs a whole cluster with kills and checks it.

mod node_args;

use fams::apps::bank::BankApp;
use std::time::Duration;

fn main() {
    let extra = "[--transfers N] [--interval-ms MS]";
    let args = node_args::parse("bank", extra);
    let transfers =
        args.get("transfers").map(|v| v.parse().unwrap_or_else(|_| node_args::usage("bank", extra))).unwrap_or(1000);
    let interval_ms =
        args.get("interval-ms").map(|v| v.parse().unwrap_or_else(|_| node_args::usage("bank", extra))).unwrap_or(5);
    node_args::stop_on_signals();
    let result = args.open().map_err(|e| e.to_string()).and_then(|(heap, config)| {
        let app = BankApp { transfers, interval: Duration::from_millis(interval_ms), verbose: false };
        fams::turns::run(heap, config, app, &args.run_options(true), &node_args::STOP).map_err(|e| e.to_string())
    });
    match result {
        Ok(stats) => eprintln!("bank node {}: {} turns, {} messages sent", args.id, stats.turns, stats.messages_sent),
        Err(e) => {
            eprintln!("bank: {e}");
            std::process::exit(1);
        }
    }
}
