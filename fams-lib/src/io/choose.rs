//! Choosing how to write a log device, by measuring it once, when the log is formatted.
//!
//! Which way of making a 4 KiB write durable is fastest depends on the device, not on a rule:
//! on this project's virtual disk io_uring and plain system calls are equal within noise, while
//! on a RAM-backed block device a plain `pwritev2(RWF_DSYNC)` took ~2 µs and the same write
//! through io_uring ~39 µs (io_uring hands it to a worker thread when the device cannot take a
//! non-blocking submission; NVMe can). So `Heap::format` times each candidate — io_uring or
//! plain calls, each with `RWF_DSYNC` writes or writes followed by `fdatasync` — and records the
//! fastest in the log's superblock (`log_format`), where every open finds it.

use super::{open_log, AlignedBuf, FlushMode, IoPath, LogOpenOptions, LOG_ALIGN};
use std::io;
use std::path::Path;

/// Timed durable writes per candidate, taken in [`ROUNDS`] rounds so that a drifting device
/// affects every candidate alike.
pub const CHOICE_SAMPLES: usize = 16;
const ROUNDS: usize = 2;
/// Untimed writes after each open (the first write after an open pays for cold paths).
const WARMUP: usize = 1;

/// One candidate's measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IoMeasurement {
    pub io_path: IoPath,
    pub flush_mode: FlushMode,
    /// Median of [`CHOICE_SAMPLES`] durable 4 KiB writes, µs.
    pub p50_us: f64,
}

/// The fastest candidate, and what every candidate measured (none if there was no choice).
#[derive(Clone, Debug, PartialEq)]
pub struct IoChoice {
    pub io_path: IoPath,
    pub flush_mode: FlushMode,
    pub measured: Vec<IoMeasurement>,
}

/// Measure every candidate allowed by `io_path` / `flush_mode` (None: both values) on the log
/// at `path` by writing a block of zeros at `offset` durably, and return the fastest by median.
/// The caller owns the bytes at `offset` (a log being formatted). io_uring is left out if it
/// cannot be set up here. Nothing is measured when both are given.
pub fn choose_io(
    path: &Path,
    offset: u64,
    io_path: Option<IoPath>,
    flush_mode: Option<FlushMode>,
) -> io::Result<IoChoice> {
    if let (Some(io_path), Some(flush_mode)) = (io_path, flush_mode) {
        return Ok(IoChoice { io_path, flush_mode, measured: Vec::new() });
    }
    let paths = io_path.map_or(vec![IoPath::Uring, IoPath::Sync], |p| vec![p]);
    let modes = flush_mode.map_or(vec![FlushMode::Dsync, FlushMode::Fdatasync], |m| vec![m]);
    let mut candidates: Vec<(IoPath, FlushMode, Vec<f64>)> =
        paths.iter().flat_map(|&p| modes.iter().map(move |&m| (p, m, Vec::new()))).collect();
    let block = AlignedBuf::zeroed(LOG_ALIGN);
    for _ in 0..ROUNDS {
        for (p, m, samples) in candidates.iter_mut() {
            // One device open at a time: a block device is opened exclusively.
            let mut dev = match open_log(path, &LogOpenOptions { io_path: Some(*p), flush_mode: Some(*m) }) {
                Ok(dev) => dev,
                // io_uring unavailable here (seccomp, disabled, old kernel): not a candidate.
                Err(_) if *p == IoPath::Uring && io_path.is_none() => continue,
                Err(e) => return Err(e),
            };
            for i in 0..WARMUP + CHOICE_SAMPLES / ROUNDS {
                let started = std::time::Instant::now();
                dev.write_durable(&[(offset, &block)])?;
                if i >= WARMUP {
                    samples.push(started.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    let measured: Vec<IoMeasurement> = candidates
        .into_iter()
        .filter(|(_, _, s)| !s.is_empty())
        .map(|(io_path, flush_mode, mut s)| {
            s.sort_by(f64::total_cmp);
            IoMeasurement { io_path, flush_mode, p50_us: s[s.len() / 2] }
        })
        .collect();
    let best = measured
        .iter()
        .min_by(|a, b| a.p50_us.total_cmp(&b.p50_us))
        .ok_or_else(|| io::Error::other(format!("{}: no way of writing the log could be measured", path.display())))?;
    Ok(IoChoice { io_path: best.io_path, flush_mode: best.flush_mode, measured })
}
