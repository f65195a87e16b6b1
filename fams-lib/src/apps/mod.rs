//! Reference applications of the turn manager, small enough to read in one sitting and with
//! correctness that is easy to state. The examples, `famsd node`, `famsd demo`, the crash tests
//! and the benchmarks all run these same handlers.

pub mod bank;
pub mod chat;
pub mod pingpong;
pub mod ring;
