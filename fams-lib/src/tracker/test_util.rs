//! Helpers shared by the trackers' unit tests.

use super::PAGE_SIZE;

/// A fresh private anonymous read-write mapping of `pages` pages, chosen by the kernel. The
/// caller unmaps it (or lets the test process end) after dropping every tracker on it.
pub(super) fn anon(pages: usize) -> usize {
    use nix::sys::mman::{madvise, mmap_anonymous, MapFlags, MmapAdvise, ProtFlags};
    let len = std::num::NonZeroUsize::new(pages * PAGE_SIZE).expect("at least one page");
    let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping chosen by the kernel; it overlaps nothing.
    let p = unsafe { mmap_anonymous(None, len, rw, MapFlags::MAP_PRIVATE) }.expect("mmap of a test mapping");
    // SAFETY: advice on the mapping just made; huge pages would coarsen uffd tracking to 2 MiB.
    let _ = unsafe { madvise(p, len.get(), MmapAdvise::MADV_NOHUGEPAGE) };
    p.as_ptr() as usize
}

/// The address `a` (of a test mapping) as the pointer nix's memory calls take.
pub(super) fn at(a: usize) -> std::ptr::NonNull<std::ffi::c_void> {
    std::ptr::NonNull::new(a as *mut std::ffi::c_void).expect("a mapping is never at address 0")
}

/// Run the `#[ignore]`d test `name` of the test module `module` (pass `module_path!()`) alone in
/// a child process (for tests that must not share the process with the others: they fill the
/// global table, exhaust vm.max_map_count, or crash on purpose). Returns its exit status.
pub(super) fn run_child(module: &str, name: &str) -> std::process::ExitStatus {
    use std::process::{Command, Stdio};
    let module = module.split_once("::").map(|(_, m)| m).unwrap_or("");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::{name}"), "--exact", "--ignored", "--test-threads=1"])
        .args(["--nocapture"])
        .env("FAMS_TRACKER_CHILD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn test child");
    // A broken handler can make the child fault forever: give up after 60 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().expect("wait for test child") {
            eprintln!("child {name}: {st:?}");
            return st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().expect("reap test child");
            panic!("child {name} hung (killed: {st:?})");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// True in a child started by [`run_child`]; otherwise says why the test does nothing.
pub(super) fn in_child() -> bool {
    if std::env::var_os("FAMS_TRACKER_CHILD").is_none() {
        eprintln!("runs only as a child of another test");
        return false;
    }
    true
}

/// Does `/proc/self/maps` show the page at `addr` as writable? (Panics if it is not mapped.)
pub(super) fn is_writable(addr: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let Some((lo, hi)) = range.split_once('-') else { continue };
        let lo = usize::from_str_radix(lo, 16).expect("maps start");
        let hi = usize::from_str_radix(hi, 16).expect("maps end");
        if (lo..hi).contains(&addr) {
            return perms.as_bytes().get(1) == Some(&b'w');
        }
    }
    panic!("{addr:#x} is not mapped");
}

/// `vm.max_map_count`: how many VMAs a process may have (65530 if it cannot be read).
pub(super) fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}
