//! The parts of `famsd` other programs and tests reuse: the verifiable workload, the SIGKILL
//! torture run, the power-loss explorer, the UDP fault relay, the benchmarks (heap and turns) and the demo.

pub mod bench;
pub mod child;
pub mod cluster;
pub mod demo;
pub mod mount;
pub mod mount_bench;
pub mod node;
pub mod power_loss;
mod progress;
pub mod relay;
pub mod torture;
pub mod turn_bench;
pub mod turn_sim;
pub mod workload;
