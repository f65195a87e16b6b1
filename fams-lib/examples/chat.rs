//! A chat room over turns: every line typed goes to every peer, which prints it once the turn
//! that received it is durable. Kill a node mid-conversation and restart it: nothing said to it
//! while it was down is lost, nothing is shown twice by the turns (stdout is at-least-once only
//! for lines printed but not yet known to be written when it crashed).
//!
//! ```sh
//! cargo run --release -p fams --example chat -- --heap a.heap --id 1 --listen 127.0.0.1:7001 --peer 2=127.0.0.1:7002
//! cargo run --release -p fams --example chat -- --heap b.heap --id 2 --listen 127.0.0.1:7002 --peer 1=127.0.0.1:7001
//! ```

mod node_args;

use fams::apps::chat::ChatApp;

fn main() {
    let args = node_args::parse("chat", "");
    node_args::stop_on_signals();
    let result = args.open().map_err(|e| e.to_string()).and_then(|(heap, config)| {
        fams::turns::run(heap, config, ChatApp, &args.run_options(true), &node_args::STOP).map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        eprintln!("chat: {e}");
        std::process::exit(1);
    }
}
