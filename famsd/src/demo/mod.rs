//! `famsd demo`: the tour on a fresh machine. Formats a heap in a data directory, measures commit
//! latency next to the device floor, runs grouped async commits, then kills a committing child
//! with SIGKILL several times, recovering and verifying after each kill; then the same promise for
//! unmodified programs through `famsd mount` ([`mount`]), and a turn-based cluster.

mod mount;

use crate::torture::{self, TortureConfig};
use fams::io::{self, AlignedBuf, LogOpenOptions};
use fams::{FormatOptions, Heap, HeapOptions};
use std::path::Path;
use std::time::Instant;

fn percentile_us(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

pub fn run(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let heap_path = dir.join("demo.heap");
    for f in ["demo.heap", "demo.heap.log", "floor.scratch"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    println!("fams demo in {}", dir.display());
    let mut format = FormatOptions::new(&heap_path, 16 << 20);
    format.max_size_bytes = Some(1 << 40);
    let header = Heap::format(&format).map_err(|e| e.to_string())?;
    println!(
        "  formatted a 16 MiB heap at {:#x}, growable to 1 TiB (address space only), with a 64 MiB log beside it",
        header.base_addr
    );

    let mut heap = Heap::open(&heap_path, &HeapOptions::default()).map_err(|e| e.to_string())?;
    let t = Instant::now();
    heap.grow(64 << 20).map_err(|e| e.to_string())?;
    println!(
        "  grew it to 64 MiB in {:.1} ms (disk reserved first, then one durable superblock write: a crash leaves 16 or 64)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let s = heap.stats();
    println!(
        "  dirty tracking: {}; log I/O: {} ({}), on a {} — {}",
        s.tracker, s.io_path, s.flush_mode, s.log_kind, s.io_choice
    );

    // 1-page synchronous commits.
    const N: usize = 400;
    let mut lat = Vec::with_capacity(N);
    for i in 0..N {
        let page = 1 + (i * 7) % 1000;
        heap.bytes_mut()[page * 4096 + (i % 4000)] = i as u8 | 1;
        heap.bytes_mut()[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        heap.commit().map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99) = (percentile_us(&mut lat, 0.5), percentile_us(&mut lat, 0.99));
    let s = heap.stats();
    println!(
        "  where the time goes (mean per commit): capture {:.0} µs on the caller (tracker {:.0} µs, waiting for write-back {:.0} µs), device write {:.0} µs on the log writer",
        s.capture_ns as f64 / 1e3 / s.commits as f64,
        s.collect_ns as f64 / 1e3 / s.commits as f64,
        s.write_back_wait_ns as f64 / 1e3 / s.commits as f64,
        s.device_write_ns as f64 / 1e3 / s.groups.max(1) as f64
    );

    // The floor: the same device, one 4 KiB O_DIRECT write made durable the same way.
    let floor_path = dir.join("floor.scratch");
    io::create_log_file(&floor_path, 1 << 20).map_err(|e| format!("{}: {e}", floor_path.display()))?;
    let mut dev = io::open_log(&floor_path, &LogOpenOptions::default()).map_err(|e| e.to_string())?;
    let buf = AlignedBuf::zeroed(4096);
    let mut floor = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        dev.write_durable(&[(((i % 200) * 4096) as u64, &buf)]).map_err(|e| e.to_string())?;
        floor.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(dev);
    let _ = std::fs::remove_file(&floor_path);
    let floor_p50 = percentile_us(&mut floor, 0.5);
    println!(
        "  1-page commit: p50 {p50:.0} µs, p99 {p99:.0} µs; device floor (4 KiB O_DIRECT write + flush) p50 {floor_p50:.0} µs → {:.2}× the floor",
        p50 / floor_p50
    );

    // Grouped async commits.
    const M: usize = 4000;
    let t = Instant::now();
    let mut last = None;
    for i in 0..M {
        heap.bytes_mut()[4096 * (1 + i % 1000) + 8] = i as u8;
        last = Some(heap.commit_async().map_err(|e| e.to_string())?);
        if i % 64 == 63 {
            // Keep a bounded number in flight, as a real pipeline would.
            heap.wait(last.expect("set")).map_err(|e| e.to_string())?;
        }
    }
    heap.wait(last.expect("M > 0")).map_err(|e| e.to_string())?;
    let async_rate = M as f64 / t.elapsed().as_secs_f64();
    let s = heap.stats();
    println!(
        "  commit_async: {M} 1-page commits in {:.0} ms = {async_rate:.0} commits/s ({:.1}× synchronous), {} device writes",
        t.elapsed().as_secs_f64() * 1e3,
        async_rate * p50 / 1e6,
        s.groups
    );
    println!(
        "  wrote {} log bytes ({} of them page images logged whole, first change after a checkpoint) for {} changed bytes; {} checkpoint{} ({} taken beside the commits, off their path)",
        s.log_bytes_written,
        s.full_images_after_checkpoint * 4096,
        s.bytes_changed,
        s.checkpoints,
        if s.checkpoints == 1 { "" } else { "s" },
        s.background_checkpoints
    );
    drop(heap);

    println!(
        "  crash test: a child commits; it is killed with SIGKILL mid-commit, the heap is recovered and verified…"
    );
    let cfg = TortureConfig {
        cycles: 12,
        dir: dir.join("crash"),
        force: false,
        choice: Default::default(),
        heap_size_bytes: 8 << 20,
        log_size_bytes: Some(2 << 20),
        seed: 7,
        kill_after_ms_max: 60,
        progress: false,
        stop_at_first_violation: false,
    };
    let report = torture::run(&cfg)?;
    let mut rec = report.recovery_ms.clone();
    let rec_p50 = percentile_us(&mut rec, 0.5);
    let rec_max = rec.last().copied().unwrap_or(0.0);
    println!(
        "  {} kills ({} during recovery itself), {} commits acknowledged, {} records replayed; recovery (open) p50 {rec_p50:.1} ms, max {rec_max:.1} ms",
        report.cycles, report.killed_during_open, report.commits_acknowledged, report.records_replayed
    );
    let _ = std::fs::remove_dir_all(dir.join("crash"));
    if report.violations == 0 {
        println!("  verified: after every kill the heap held exactly one committed state, none older than the last acknowledged commit");
    } else {
        for v in &report.violation_details {
            println!("  VIOLATION: {v}");
        }
        return Err(format!("{} violations", report.violations));
    }
    mount::run(dir)?;
    bank_cluster(dir)
}

/// A turn-based bank on three node processes over UDP on loopback, nodes killed with SIGKILL and
/// restarted while transfers fly between them.
fn bank_cluster(dir: &Path) -> Result<(), String> {
    println!("  turn-based cluster: a bank on 3 node processes (UDP on 127.0.0.1), 300 transfers each,");
    println!("  nodes SIGKILLed and restarted at random while money moves between them…");
    let cfg = crate::cluster::ClusterConfig {
        famsd: std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?,
        dir: dir.join("bank"),
        nodes: 3,
        transfers_per_node: 300,
        interval_ms: 5,
        kills_per_node: 2,
        kill_gap_ms: (150, 400),
        down_ms: (0, 150),
        seed: 11,
        faults: None,
        relay: None,
        key: None,
        timeout: std::time::Duration::from_secs(90),
        tracker: None,
        progress: false,
        mutation: None,
    };
    let report = crate::cluster::run_bank_cluster(&cfg)?;
    crate::cluster::print_summary(&report);
    println!(
        "  the nodes' heaps are in {} (`famsd node report --heap {}`)",
        cfg.dir.display(),
        crate::cluster::heap_path(&cfg.dir, 0).display()
    );
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{} violations in the bank cluster", report.problems.len()))
    }
}
