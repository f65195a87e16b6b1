//! The key-value example under SIGKILL: a child `kv load` applies a stream of puts and deletes,
//! one commit each, printing "ok N" once line N is durable; it is killed at random moments
//! (sometimes while it is still recovering from the previous kill). After each kill `kv check`
//! must pass (the allocator's fsck and the map), and the store must equal the model after
//! exactly the first S commands for some S between the last acknowledged line and the last line
//! sent: every acknowledged write is there, nothing half-done is. Each value also encodes its key
//! and the command's sequence number, and its length, so a torn value would show by itself.
//! The checks run on a copy of the files, so the next child recovers from exactly what the kill
//! left: a real replay, which the early kills interrupt.

use fams_tests::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KILLS: usize = 40;
const KEYS: u64 = 300;
/// Lines sent but not yet acknowledged, at most (the window S may fall in).
const IN_FLIGHT_MAX: usize = 32;

/// The `kv` example binary of the same profile as this test, built if needed.
fn kv_binary() -> PathBuf {
    built_binary("fams", &["--example", "kv"], Path::new("examples/kv"))
}

#[derive(Clone, Debug)]
enum Cmd {
    Put(String, String),
    Del(String),
}

fn value_for(key: &str, seq: u64) -> String {
    // Lengths from 1 byte past the header to ~3 KB: small objects and large blocks.
    let pad = (seq.wrapping_mul(7919) % 3000) as usize;
    let head = format!("{key}@{seq}:{pad}:");
    let body: String = (0..pad).map(|i| (b'a' + ((seq as usize + i) % 26) as u8) as char).collect();
    format!("{head}{body}")
}

/// A value must be exactly what value_for made for its key and some sequence number.
fn value_ok(key: &str, value: &str) -> Result<u64, String> {
    let (k, rest) = value.split_once('@').ok_or("no @")?;
    if k != key {
        return Err(format!("value of {key} names key {k}"));
    }
    let seq: u64 = rest.split(':').next().and_then(|s| s.parse().ok()).ok_or("no sequence number")?;
    if value != value_for(key, seq) {
        return Err(format!("value of {key} at seq {seq} is torn ({} bytes)", value.len()));
    }
    Ok(seq)
}

fn apply(state: &mut BTreeMap<String, String>, c: &Cmd) {
    match c {
        Cmd::Put(k, v) => {
            state.insert(k.clone(), v.clone());
        }
        Cmd::Del(k) => {
            state.remove(k);
        }
    }
}

fn kv(bin: &Path, heap: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).arg("--heap").arg(heap).args(args).output().expect("run kv");
    assert!(out.status.success(), "kv {args:?} failed: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Copy the heap file and its log (the files beside it named after it) into `to`; returns the
/// copy of the heap file.
fn copy_heap(heap: &Path, to: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("make the verify directory");
    let name = heap.file_name().expect("a file name").to_string_lossy().into_owned();
    for entry in std::fs::read_dir(heap.parent().expect("a directory")).expect("list the heap's directory") {
        let entry = entry.expect("a directory entry");
        if entry.file_name().to_string_lossy().starts_with(&name) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a heap file");
        }
    }
    to.join(name)
}

#[test]
fn acknowledged_writes_survive_sigkill_and_nothing_is_half_done() {
    let bin = kv_binary();
    let dir = TempDir::new("kv-crash");
    let heap = dir.join("store.heap");
    // Format first (formatting a heap file is not itself crash-atomic; recovering is).
    kv(&bin, &heap, &["--size", "32M", "--log-size", "8M", "check"]);
    let mut rng = Rng::new(0x6b76);
    // The store as of the last recovery.
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    let mut seq = 0u64;
    let started = Instant::now();
    let (mut acked_total, mut lost_unacked, mut during_startup) = (0u64, 0u64, 0u64);
    for kill in 0..KILLS {
        let mut child = Command::new(&bin)
            .arg("--heap")
            .arg(&heap)
            .arg("load")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kv load");
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let n = line.strip_prefix("ok ").and_then(|n| n.parse().ok()).expect("ok N");
                if tx.send(n).is_err() {
                    break;
                }
            }
        });
        // Commands of this run, in order (line i+1 is sent[i]).
        let mut sent: Vec<Cmd> = Vec::new();
        let mut acked = 0u64;
        // One run in eight is killed within 3 ms of its start: while it opens and recovers.
        let run_for = if rng.below(8) == 0 {
            Duration::from_micros(rng.below(3000))
        } else {
            Duration::from_millis(5 + rng.below(300))
        };
        let t0 = Instant::now();
        while t0.elapsed() < run_for {
            while let Ok(n) = rx.try_recv() {
                acked = acked.max(n);
            }
            if sent.len() - acked as usize >= IN_FLIGHT_MAX {
                if let Ok(n) = rx.recv_timeout(Duration::from_millis(2)) {
                    acked = acked.max(n);
                }
                continue;
            }
            seq += 1;
            let key = format!("k{:03}", rng.below(KEYS));
            let c = if rng.below(5) == 0 { Cmd::Del(key) } else { Cmd::Put(key.clone(), value_for(&key, seq)) };
            let line = match &c {
                Cmd::Put(k, v) => format!("put {k} {v}\n"),
                Cmd::Del(k) => format!("del {k}\n"),
            };
            if stdin.write_all(line.as_bytes()).is_err() {
                break; // the child died on its own: reported below
            }
            sent.push(c);
        }
        famsd::child::signal_child(&mut child, Signal::SIGKILL);
        let status = child.wait().unwrap();
        drop(stdin);
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            acked = acked.max(n);
        }
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(Signal::SIGKILL as i32) {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("kill {kill}: kv load ended by itself: {status:?}\n{err}");
        }
        if acked == 0 {
            during_startup += 1;
        }

        // Recover and verify a copy: the files stay as the kill left them, so the next child's
        // own open replays a real log (and the early kills land inside that replay).
        let copy = copy_heap(&heap, &dir.join("verify"));
        let check = kv(&bin, &copy, &["check"]);
        assert!(check.starts_with("ok:"), "kill {kill}: {check}");
        let dump = kv(&bin, &copy, &["scan"]);
        let mut found: BTreeMap<String, String> = BTreeMap::new();
        for line in dump.lines() {
            let (k, v) = line.split_once('\t').unwrap_or_else(|| panic!("kill {kill}: bad scan line {line:?}"));
            if let Err(e) = value_ok(k, v) {
                panic!("kill {kill}: {e}");
            }
            found.insert(k.to_string(), v.to_string());
        }
        // The store must equal the model after exactly the first s lines, acked <= s <= sent.
        let mut model = state.clone();
        for c in &sent[..acked as usize] {
            apply(&mut model, c);
        }
        let mut matched = None;
        for s in acked as usize..=sent.len() {
            if s > acked as usize {
                apply(&mut model, &sent[s - 1]);
            }
            if model == found {
                matched = Some(s);
                break;
            }
        }
        let Some(s) = matched else {
            let mut expected = state.clone();
            for c in &sent[..acked as usize] {
                apply(&mut expected, c);
            }
            let missing: Vec<_> =
                expected.iter().filter(|(k, v)| found.get(*k) != Some(v)).map(|(k, _)| k).take(5).collect();
            panic!(
                "kill {kill}: the store matches no prefix of the commands between the {acked} acknowledged and the {} sent; e.g. differing keys {missing:?}",
                sent.len()
            );
        };
        acked_total += acked;
        lost_unacked += (sent.len() - s) as u64;
        state = found;
        // Continue from what survived: commands after s are gone, as if never sent.
        let _ = sent;
    }
    eprintln!(
        "{KILLS} kills in {:.1} s: {acked_total} acknowledged commands, {lost_unacked} unacknowledged ones lost (never applied), {during_startup} kills before the first ack, {} keys at the end",
        started.elapsed().as_secs_f64(),
        state.len()
    );
    assert!(acked_total > 100, "the workload made progress");
}
