//! Two nodes bouncing a counter: the turn latency benchmark's application.
//!
//! ```sh
//! cargo run --release -p fams --example pingpong -- --heap b.heap --id 2 --listen 127.0.0.1:7002 --peer 1=127.0.0.1:7001 &
//! cargo run --release -p fams --example pingpong -- --heap a.heap --id 1 --listen 127.0.0.1:7001 --peer 2=127.0.0.1:7002 \
//!     --initiator-of 2 --round-trips 1000 --window 1
//! ```
//! The initiator prints `{"round_trips":…,"elapsed_ns":…,"round_trips_per_s":…}` and stops.

mod node_args;

use fams::apps::pingpong::PingPongApp;
use fams::transport::NodeId;

fn main() {
    let extra = "[--initiator-of ID --round-trips N --window W --message-bytes B]";
    let args = node_args::parse("pingpong", extra);
    let num = |name: &str, default: u64| {
        args.get(name).map(|v| v.parse().unwrap_or_else(|_| node_args::usage("pingpong", extra))).unwrap_or(default)
    };
    let app = PingPongApp {
        initiator_of: args.get("initiator-of").and_then(|v| v.parse().ok()).map(NodeId),
        round_trips: num("round-trips", 1000),
        window: num("window", 1),
        message_bytes: num("message-bytes", 64) as usize,
        touch_pages: 1,
        stop_when_done: true,
        print_result: true,
    };
    node_args::stop_on_signals();
    let result = args.open().map_err(|e| e.to_string()).and_then(|(heap, config)| {
        fams::turns::run(heap, config, app, &args.run_options(false), &node_args::STOP).map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        eprintln!("pingpong: {e}");
        std::process::exit(1);
    }
}
