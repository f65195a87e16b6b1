//! Heaps that grow (`Heap::grow`, `famsd grow`): online across trackers, offline in another
//! process, failure-atomic under SIGKILL and under simulated power cuts at every step of a grow,
//! and a full disk that refuses the growth and loses nothing.
//!
//! A grow extends the heap file with its space reserved and makes that durable, then writes a
//! log superblock naming the new size; after a crash the heap opens with the old size or the
//! new one and the same committed bytes.

use fams::sim::SimHeap;
use fams::{FormatOptions, Heap, HeapOptions};
use fams_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn format_growable(path: &Path, size: u64, max: u64, log_size: u64) {
    let mut f = FormatOptions::new(path, size);
    f.max_size_bytes = Some(max);
    f.log_size_bytes = Some(log_size);
    Heap::format(&f).expect("format a growable heap");
}

/// The byte a step's region holds: [size(k-1), size(k)) is filled with `fill(k)` by commit k.
fn fill(k: u64) -> u8 {
    (k % 251) as u8 + 1
}

/// Size after step k of the SIGKILL test: 1 MiB, then 256 KiB more per step.
fn step_size(k: u64) -> u64 {
    MIB + k * (256 << 10)
}

/// Committed state after step c: bytes 0..8 hold c, region k (1..=c) holds fill(k), the rest
/// zero. Returns the first problem.
fn check_steps(bytes: &[u8], c: u64) -> Result<(), String> {
    if (bytes.len() as u64) < step_size(c) {
        return Err(format!("heap is {} bytes but commit {c} needs {}", bytes.len(), step_size(c)));
    }
    for k in 1..=c {
        let (lo, hi) = (step_size(k - 1) as usize, step_size(k) as usize);
        if let Some(at) = bytes[lo..hi].iter().position(|&b| b != fill(k)) {
            return Err(format!("region of step {k} differs at byte {}", lo + at));
        }
    }
    if let Some(at) = bytes[step_size(c) as usize..].iter().position(|&b| b != 0) {
        return Err(format!("byte {} past the last committed step {c} is not zero", step_size(c) as usize + at));
    }
    Ok(())
}

fn commit_number(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Step k: grow to step_size(k), fill the new region, write k, commit.
fn step(heap: &mut Heap, k: u64, say: &mut dyn FnMut(&str)) -> fams::Result<()> {
    say(&format!("growing {k}"));
    heap.grow(step_size(k))?;
    say(&format!("grown {k}"));
    let (lo, hi) = (step_size(k - 1) as usize, step_size(k) as usize);
    heap.bytes_mut()[lo..hi].fill(fill(k));
    heap.bytes_mut()[..8].copy_from_slice(&k.to_le_bytes());
    heap.commit()?;
    say(&format!("ack {k}"));
    Ok(())
}

#[test]
fn online_growth_keeps_committed_and_pending_bytes_for_each_tracker() {
    if is_child() {
        return;
    }
    for t in trackers() {
        let dir = TempDir::new("grow-online");
        let path = dir.join("g.heap");
        format_growable(&path, MIB, 64 * MIB, 8 * MIB);
        let mut heap = open(&path, t);
        let base = heap.base();
        assert_eq!((heap.len(), heap.max_len()), (MIB as usize, 64 * MIB as usize));
        heap.bytes_mut()[100..200].fill(7);
        heap.commit().unwrap();
        // Written before the grow, committed after it: the tracker must not lose it.
        heap.bytes_mut()[5000..5100].fill(9);
        heap.grow(3 * MIB + 1).unwrap();
        assert_eq!(heap.len(), 3 * MIB as usize + 4096, "rounded up to a page ({})", t.name());
        assert_eq!(heap.base(), base, "the heap stays where it was");
        assert!(heap.bytes()[MIB as usize..].iter().all(|&b| b == 0), "grown bytes start zero");
        heap.bytes_mut()[2 * MIB as usize..2 * MIB as usize + 10].fill(3);
        heap.commit().unwrap();
        // Rolled back after a grow: the pending write made before it goes too.
        heap.bytes_mut()[6000] = 1;
        heap.grow(4 * MIB).unwrap();
        heap.bytes_mut()[3 * MIB as usize + 8192] = 1;
        heap.rollback().unwrap();
        assert_eq!((heap.bytes()[6000], heap.bytes()[3 * MIB as usize + 8192]), (0, 0), "{}", t.name());
        assert!(heap.grow(65 * MIB).is_err(), "past the maximum");
        assert_eq!(heap.len(), 4 * MIB as usize);
        drop(heap);
        let heap = open(&path, t);
        assert_eq!(heap.len(), 4 * MIB as usize, "the grown size survives a reopen ({})", t.name());
        assert!(heap.bytes()[100..200].iter().all(|&b| b == 7));
        assert!(heap.bytes()[5000..5100].iter().all(|&b| b == 9));
        assert!(heap.bytes()[2 * MIB as usize..2 * MIB as usize + 10].iter().all(|&b| b == 3));
        assert_eq!(heap.bytes()[6000], 0);
        let i = fams::inspect::inspect(&path, None).unwrap();
        assert_eq!((i.heap_size_bytes, i.header.heap_size, i.header.max_size), (4 * MIB, MIB, 64 * MIB));
        assert!(i.disk_used_bytes >= 4 * MIB, "the grown part is reserved on disk: {}", i.disk_used_bytes);
    }
}

#[test]
fn offline_growth_with_famsd_grow_in_another_process() {
    if is_child() {
        return;
    }
    let famsd = built_binary("famsd", &["--bin", "famsd"], Path::new("famsd"));
    let dir = TempDir::new("grow-offline");
    let path = dir.join("g.heap");
    let run = |args: &[&str]| {
        let out = Command::new(&famsd).args(args).output().expect("run famsd");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let p = path.to_str().unwrap();
    let (ok, out) = run(&["format", "--heap", p, "--size", "1M", "--max-size", "1G", "--log-size", "4M"]);
    assert!(ok, "{out}");
    let mut heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    heap.bytes_mut()[..4].copy_from_slice(b"fams");
    heap.commit().unwrap();
    drop(heap);
    let (ok, out) = run(&["grow", "--heap", p, "--size", "300M"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["grow", "--heap", p, "--size", "2G"]);
    assert!(!ok && out.contains("maximum size"), "growing past the maximum must fail clearly: {out}");
    let (ok, out) = run(&["inspect", "--heap", p, "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect --json");
    assert_eq!((v["size_bytes"].as_u64(), v["max_size_bytes"].as_u64()), (Some(300 * MIB), Some(1 << 30)), "{v}");
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert_eq!(heap.len(), 300 * MIB as usize);
    assert_eq!(&heap.bytes()[..4], b"fams");
}

/// The child of the SIGKILL test: step forever from the committed step on.
#[test]
fn grow_kill_child() {
    if !is_child() || std::env::var_os("FAMS_GROW_HEAP").is_none() {
        return;
    }
    let path = std::path::PathBuf::from(std::env::var("FAMS_GROW_HEAP").unwrap());
    let tracker = std::env::var("FAMS_GROW_TRACKER").unwrap().parse().unwrap();
    let mut heap = Heap::open(&path, &HeapOptions { tracker: Some(tracker), ..HeapOptions::default() }).unwrap();
    let mut out = std::io::stdout().lock();
    let mut say = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say("\nready");
    let mut k = commit_number(heap.bytes());
    loop {
        k += 1;
        if step_size(k) > heap.max_len() as u64 {
            crash_exit();
        }
        step(&mut heap, k, &mut say).expect("a step");
    }
}

#[test]
fn grow_is_failure_atomic_under_sigkill() {
    if is_child() {
        return;
    }
    let dir = TempDir::new("grow-kill");
    let path = dir.join("g.heap");
    format_growable(&path, MIB, 1 << 30, 16 * MIB);
    let mut rng = Rng::new(0x6_0e);
    let (mut acked, mut issued_max) = (0u64, 0u64);
    let (mut kills_in_grow, mut grown_uncommitted, mut kills) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let trackers = trackers();
    for cycle in 0..60 {
        let t = trackers[cycle % trackers.len()];
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "grow_kill_child", "--nocapture", "--test-threads=1"])
            .env("FAMS_CHILD", "1")
            .env("FAMS_GROW_HEAP", &path)
            .env("FAMS_GROW_TRACKER", t.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let mut guard = ChildProc::new(&child);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut lines = Vec::new();
        // Mostly once it runs (at a random moment of its steps), sometimes while it starts.
        if rng.below(8) != 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                let ready = l.trim() == "ready";
                lines.push(l);
                if ready {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        guard.kill();
        let _ = child.wait();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        kills += 1;
        let mut last = "";
        for l in &lines {
            if let Some(k) = l.strip_prefix("ack ") {
                acked = acked.max(k.parse().unwrap());
            }
            if let Some(k) = l.strip_prefix("growing ") {
                issued_max = issued_max.max(k.parse().unwrap());
            }
            if !l.trim().is_empty() {
                last = l;
            }
        }
        kills_in_grow += last.starts_with("growing ") as u64;
        let heap = Heap::open(&path, &HeapOptions::default())
            .unwrap_or_else(|e| panic!("cycle {cycle}: the heap does not open after a kill ({last}): {e}"));
        let c = commit_number(heap.bytes());
        assert!(
            c >= acked && c <= issued_max.max(acked),
            "cycle {cycle}: commit {c}, acked {acked}, issued {issued_max}"
        );
        let len = heap.len() as u64;
        assert!(len == step_size(c) || len == step_size(c + 1), "cycle {cycle}: size {len} at commit {c}");
        grown_uncommitted += (len == step_size(c + 1)) as u64;
        check_steps(heap.bytes(), c).unwrap_or_else(|e| panic!("cycle {cycle} ({}): {e}", t.name()));
        acked = c;
    }
    eprintln!(
        "{kills} kills in {:.1} s: final step {acked}, {kills_in_grow} inside a grow, {grown_uncommitted} recovered a grown size before its commit",
        started.elapsed().as_secs_f64()
    );
    assert!(acked > 20, "the children should have made progress");
    assert!(kills_in_grow > 0, "no kill landed inside a grow");
}

#[test]
fn grow_is_failure_atomic_under_simulated_power_cuts() {
    if is_child() {
        return;
    }
    // Cut the power at every mutating operation of (grow, fill, commit) steps, several outcomes
    // each; after the reboot the heap must open with the size before or after the grow and the
    // committed steps intact.
    let dir = TempDir::new("grow-sim");
    let path = dir.join("g.heap");
    let sim = SimHeap::format_with(
        &{
            let mut f = FormatOptions::new(&path, MIB);
            f.max_size_bytes = Some(64 * MIB);
            f.log_size_bytes = Some(8 * MIB);
            f
        },
        7,
    )
    .expect("format on the simulated machine");
    let opts = HeapOptions::default();
    // Count the operations of three steps with the power on.
    let mut heap = sim.open(&opts).unwrap();
    let before = sim.machine.ops();
    for k in 1..=3 {
        step(&mut heap, k, &mut |_| {}).expect("a step with the power on");
    }
    let ops = sim.machine.ops() - before;
    drop(heap);
    let (mut states, mut grown_only) = (0u64, 0u64);
    for point in 1..=ops {
        for outcome in 0..3u64 {
            sim.reset().unwrap();
            sim.machine.reseed(point * 7 + outcome);
            let mut heap = sim.open(&opts).unwrap();
            sim.machine.cut_power_at(Some(sim.machine.ops() + point));
            let mut acked = 0;
            for k in 1..=3 {
                if step(&mut heap, k, &mut |_| {}).is_err() || !sim.machine.powered() {
                    break;
                }
                acked = k;
            }
            drop(heap); // with the power off: nothing more reaches the disks
            sim.reboot().unwrap();
            let heap = sim.open(&opts).unwrap_or_else(|e| panic!("cut at op {point}: the heap does not open: {e}"));
            let c = commit_number(heap.bytes());
            assert!(c >= acked, "cut at op {point}: commit {c} but {acked} was acknowledged");
            let len = heap.len() as u64;
            assert!(len == step_size(c) || len == step_size(c + 1), "cut at op {point}: size {len} at commit {c}");
            grown_only += (len == step_size(c + 1)) as u64;
            check_steps(heap.bytes(), c).unwrap_or_else(|e| panic!("cut at op {point}: {e}"));
            states += 1;
            drop(heap);
        }
    }
    eprintln!("{states} power-cut states over {ops} operations of three grow steps; {grown_only} recovered a grown size before its commit");
    assert!(grown_only > 0, "no cut landed between a grow's superblock and the commit after it");
}

/// What the allocation-heavy run writes into object `i`: its first and last bytes (up to 256
/// each; the rest stays zero).
fn object_byte(i: u64, at: usize) -> u8 {
    ((i.wrapping_mul(31) as usize + at) % 253) as u8 + 1
}

fn object_size(i: u64) -> usize {
    // Mostly small, a tail of large ones: ~16 KiB on average.
    match i % 10 {
        0..=5 => 16 + (i as usize * 7) % 2000,
        6..=8 => 4096 + (i as usize * 13) % 20_000,
        _ => 128 << 10,
    }
}

fn written_ranges(size: usize) -> [std::ops::Range<usize>; 2] {
    let head = size.min(256);
    [0..head, size - size.min(256).min(size - head)..size]
}

#[test]
fn allocation_heavy_growth_from_64_mib_to_gibs() {
    if is_child() {
        return;
    }
    use fams::{ObjectHeap, ObjectOptions};
    use std::alloc::Layout;
    const OBJECTS: u64 = 120_000;
    let dir = TempDir::new("grow-alloc");
    let path = dir.join("g.heap");
    format_growable(&path, 64 * MIB, 8 << 30, 64 * MIB);
    let started = Instant::now();
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    let mut objects = ObjectHeap::open(heap, &ObjectOptions::default()).unwrap();
    let base = objects.heap().base() as usize;
    let mut placed: Vec<(usize, usize)> = Vec::with_capacity(OBJECTS as usize);
    let (mut grow_steps, mut last_len, mut bytes_allocated) = (0u64, objects.heap().len(), 0u64);
    for i in 0..OBJECTS {
        let size = object_size(i);
        // Not zeroed: nothing is ever freed here, so every object is carved from space the heap
        // grew by, which reads as zeros (and the check after the reopen proves it).
        let p = objects
            .alloc(Layout::from_size_align(size, 16).unwrap(), false)
            .unwrap_or_else(|e| panic!("object {i}: {e}"));
        // SAFETY: `p` is a fresh allocation of `size` bytes in the heap, used only here.
        let obj = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) };
        for r in written_ranges(size) {
            for at in r {
                obj[at] = object_byte(i, at);
            }
        }
        placed.push((p.as_ptr() as usize - base, size));
        bytes_allocated += size as u64;
        if objects.heap().len() != last_len {
            grow_steps += 1;
            last_len = objects.heap().len();
        }
        if i % 2000 == 1999 {
            objects.commit().unwrap();
            objects.release_committed().unwrap();
        }
    }
    objects.commit().unwrap();
    let len = objects.heap().len() as u64;
    objects.close().unwrap();
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert_eq!(heap.len() as u64, len, "the grown size after a reopen");
    for (i, &(off, size)) in placed.iter().enumerate() {
        let obj = &heap.bytes()[off..off + size];
        let [a, b] = written_ranges(size);
        for at in a.clone().chain(b.clone()) {
            assert_eq!(
                obj[at],
                object_byte(i as u64, at),
                "object {i} ({size} bytes at {off:#x}) differs at byte {at}"
            );
        }
        assert!(obj[a.end..b.start.max(a.end)].iter().all(|&x| x == 0), "object {i}: its middle is not zero");
    }
    let disk = fams::inspect::inspect(&path, None).unwrap().disk_used_bytes;
    eprintln!(
        "{OBJECTS} objects, {bytes_allocated} bytes, in {:.1} s: the heap grew from 64 MiB to {} MiB in {grow_steps} steps; {} MiB on disk",
        started.elapsed().as_secs_f64(),
        len >> 20,
        disk >> 20
    );
    assert!(grow_steps >= 20, "{grow_steps} grow steps");
    assert!(len >= 2 << 30, "the heap should reach GiBs: {len}");
    // The disk holds what was grown to, not the maximum: within the last growth step (64 MiB)
    // plus the allocator's overhead of what was allocated.
    assert!(
        disk <= bytes_allocated + bytes_allocated / 8 + 128 * MIB,
        "{disk} bytes on disk for {bytes_allocated} allocated"
    );
}

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_the_growth_and_loses_nothing() {
    if is_child() {
        return;
    }
    let dir = TempDir::new("grow-enospc");
    // A 64 MiB ext4 on a loop device: room for a 16 MiB heap, its 8 MiB log and one growth
    // step of 16 MiB, not for the next one (32 MiB).
    let Some(dev) = LoopDevice::new(dir.join("disk"), 64 * MIB) else { return };
    let ok = Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard"]).arg(&dev.device).status();
    assert!(ok.is_ok_and(|s| s.success()), "mkfs.ext4 on {}", dev.device.display());
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount").arg(&dev.device).arg(&mnt).status();
    assert!(ok.is_ok_and(|s| s.success()), "mount {}", dev.device.display());
    let mounted = Mounted(mnt.clone());
    let path = mnt.join("g.heap");
    format_growable(&path, 16 * MIB, 1 << 30, 8 * MIB);
    {
        let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
        let mut objects = fams::ObjectHeap::open(heap, &fams::ObjectOptions::default()).unwrap();
        let layout = std::alloc::Layout::from_size_align(1 << 20, 16).unwrap();
        let mut committed = Vec::new();
        let err = loop {
            match objects.alloc(layout, false) {
                Ok(p) => {
                    // SAFETY: a fresh allocation of 1 MiB in the heap, used only here.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), committed.len() as u8 + 1, 1 << 20) };
                    objects.commit().unwrap();
                    committed.push(p.as_ptr() as usize - objects.heap().base() as usize);
                }
                Err(e) => break e,
            }
            assert!(committed.len() < 1000, "the disk never filled");
        };
        let msg = err.to_string();
        assert!(msg.contains("No space left") || msg.contains("disk space"), "a full disk must say so: {msg}");
        // The heap still works: commit more into what is there, and it all survives a reopen.
        let len = objects.heap().len();
        assert!(len > 16 * MIB as usize, "the heap should have grown once before the disk filled");
        let small = std::alloc::Layout::from_size_align(64, 8).unwrap();
        let p = objects.alloc(small, true).expect("small objects still fit");
        // SAFETY: a fresh 64-byte allocation.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0xab, 64) };
        objects.commit().expect("commits go on after a refused growth");
        let small_off = p.as_ptr() as usize - objects.heap().base() as usize;
        objects.close().unwrap();
        let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
        assert_eq!(heap.len(), len);
        for (i, &off) in committed.iter().enumerate() {
            assert!(heap.bytes()[off..off + (1 << 20)].iter().all(|&b| b == i as u8 + 1), "object {i} lost");
        }
        assert!(heap.bytes()[small_off..small_off + 64].iter().all(|&b| b == 0xab));
        eprintln!("a full disk refused growth past {} MiB ({msg}); {} MiB objects kept", len >> 20, committed.len());
    }
    drop(mounted);
}

fams::persistent! {
    struct GrowRoot<'h> {
        numbers: fams::alloc::PVec<'h, u64>,
        map: fams::alloc::PHashMap<'h, u64, u64>,
    }
}

#[test]
fn collections_grow_the_heap_as_they_grow() {
    if is_child() {
        return;
    }
    use fams::alloc::{PHashMap, PVec};
    use fams::{ObjectHeap, ObjectOptions};
    let dir = TempDir::new("grow-collections");
    let path = dir.join("g.heap");
    format_growable(&path, MIB, 512 * MIB, 64 * MIB);
    let opts = ObjectOptions { grow_step_bytes: 4 * MIB, ..ObjectOptions::default() };
    const N: u64 = 3_000_000;
    {
        let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
        let mut objects = ObjectHeap::open(heap, &opts).unwrap();
        // A vector of 24 MiB and a map of a few MiB, in a heap that starts at 1 MiB, committed
        // in slices (each commit must fit in the log).
        for chunk in (0..N).collect::<Vec<_>>().chunks(300_000) {
            let root = objects.root_with_alloc(|a| GrowRoot { numbers: PVec::new_in(a), map: PHashMap::new_in(a) });
            let (root, _) = root.unwrap();
            for &i in chunk {
                root.numbers.push(i * 3);
                if i % 16 == 0 {
                    root.map.insert(i, i + 1);
                }
            }
            objects.commit().unwrap();
        }
        let len = objects.heap().len();
        assert!(len as u64 > 32 * MIB, "the heap grew for the collections: {len}");
        objects.close().unwrap();
    }
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    let mut objects = ObjectHeap::open(heap, &opts).unwrap();
    let (root, _) =
        objects.root_with_alloc(|a| GrowRoot { numbers: PVec::new_in(a), map: PHashMap::new_in(a) }).unwrap();
    assert_eq!(root.numbers.len() as u64, N);
    assert!(root.numbers.iter().enumerate().all(|(i, &v)| v == i as u64 * 3));
    assert_eq!(root.map.len() as u64, N.div_ceil(16));
    assert!((0..N).step_by(16).all(|i| root.map.get(&i) == Some(&(i + 1))));
    let problems = objects.check();
    assert!(problems.is_ok(), "{problems:?}");
}

/// An operation during which the heap grew, rolled back: the growth stays (a heap's size is
/// durable when `grow` returns), the allocator's record of it was rolled back with the rest, so
/// the object layer must take the space again — and allocate from it, commit, and reopen.
#[test]
fn rolling_back_an_operation_that_grew_the_heap_keeps_the_space() {
    if is_child() {
        return;
    }
    use fams::alloc::PVec;
    use fams::{ObjectHeap, ObjectOptions};
    let dir = TempDir::new("grow-rollback");
    let path = dir.join("g.heap");
    format_growable(&path, MIB, 256 * MIB, 64 * MIB);
    let opts = ObjectOptions { grow_step_bytes: 4 * MIB, ..ObjectOptions::default() };
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    let mut objects = ObjectHeap::open(heap, &opts).unwrap();
    let (root, _) = objects.root_with_alloc(PVec::<u64>::new_in).unwrap();
    for i in 0..1000u64 {
        root.push(i);
    }
    objects.commit().unwrap();
    let len_before = objects.heap().len();
    // 2 MiB of numbers do not fit in the 1 MiB heap: it grows during the operation.
    let (root, _) = objects.root_with_alloc(PVec::<u64>::new_in).unwrap();
    for i in 1000..300_000u64 {
        root.push(i);
    }
    let len_grown = objects.heap().len();
    assert!(len_grown > len_before, "the operation grew the heap: {len_before} -> {len_grown}");
    objects.rollback().expect("rolling back an operation that grew the heap");
    assert_eq!(objects.heap().len(), len_grown, "the growth stays");
    let (root, _) = objects.root_with_alloc(PVec::<u64>::new_in).unwrap();
    assert_eq!(root.len(), 1000, "the rolled-back pushes are gone");
    // The grown space is the allocator's again: the same operation now fits without growing.
    for i in 1000..200_000u64 {
        root.push(i);
    }
    assert_eq!(objects.heap().len(), len_grown, "allocated from the space taken back");
    objects.commit().unwrap();
    let problems = objects.check();
    assert!(problems.is_ok(), "{problems:?}");
    objects.close().unwrap();
    let heap = Heap::open(&path, &HeapOptions::default()).unwrap();
    let mut objects = ObjectHeap::open(heap, &opts).unwrap();
    let (root, _) = objects.root_with_alloc(PVec::<u64>::new_in).unwrap();
    assert!(root.len() == 200_000 && root.iter().enumerate().all(|(i, &v)| v == i as u64));
    let problems = objects.check();
    assert!(problems.is_ok(), "{problems:?}");
}
