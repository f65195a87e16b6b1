//! `famsd format` is all-or-nothing under SIGKILL: after a kill at any moment the heap either
//! does not exist (and formatting again succeeds) or opens. Found by the turn cluster, whose
//! nodes format their heaps on first start and are killed at random.

use fams_tests::TempDir;
use std::process::Command;
use std::time::{Duration, Instant};

fn format_cmd(dir: &TempDir) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_famsd"));
    cmd.args(["format", "--size", "32M", "--log-size", "32M", "--heap"]).arg(dir.join("h.heap"));
    cmd.stdout(std::process::Stdio::null());
    cmd
}

#[test]
fn a_format_killed_at_any_moment_leaves_no_heap_or_a_whole_one() {
    let dir = TempDir::new("format-crash");
    let clean = |dir: &TempDir| {
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    };
    // How long an uninterrupted format takes here, to spread the kills over it.
    let t = Instant::now();
    assert!(format_cmd(&dir).status().unwrap().success());
    let format_us = t.elapsed().as_micros() as u64;
    clean(&dir);
    let mut rng = fams_tests::Rng::new(42);
    let (mut interrupted, mut completed) = (0, 0);
    for i in 0..40 {
        let mut child = format_cmd(&dir).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(2 * format_us + 1)));
        famsd::child::signal_child(&mut child, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        let heap = dir.join("h.heap");
        if heap.exists() {
            completed += 1;
            let h = fams::Heap::open(&heap, &fams::HeapOptions::default())
                .unwrap_or_else(|e| panic!("kill {i}: a heap left by a killed format does not open: {e}"));
            drop(h);
        } else {
            interrupted += 1;
            // Formatting again must succeed: nothing left behind may be in the way.
            let out = format_cmd(&dir).stderr(std::process::Stdio::piped()).output().unwrap();
            assert!(
                out.status.success(),
                "kill {i}: format after an interrupted format: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            fams::Heap::open(&heap, &fams::HeapOptions::default()).expect("open the new heap");
        }
        clean(&dir);
    }
    eprintln!("{interrupted} formats interrupted, {completed} completed before the kill");
    assert!(interrupted > 0, "no kill landed inside a format: the test proved nothing");
}
