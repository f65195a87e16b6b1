//! A heap four times larger than the memory its process may use.
//!
//! As root, with the cgroup v1 memory controller at /sys/fs/cgroup/memory (otherwise the test
//! says why it is skipped and passes): a child process is put in a new memory cgroup limited to
//! a quarter of the heap (heap 1 GiB, limit 256 MiB). Over many commits it fills the whole heap
//! with objects from the persistent allocator — each commit allocates and writes 8 MiB, then
//! `release_committed()` gives the clean pages back — and then reads everything back. It must
//! finish without being OOM-killed, and its private (anonymous) memory must stay near the
//! per-commit working set, not grow with the heap. The heap file's page cache is charged to the
//! cgroup too, but it is clean once written back and checkpointed, so the kernel reclaims it.

use fams::alloc::{ObjectHeap, ObjectOptions, PVec};
use fams::{Heap, HeapOptions, PAGE_SIZE};
use fams_tests::*;
use std::alloc::Layout;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const HEAP_BYTES: u64 = 1 << 30;
const LIMIT_BYTES: u64 = HEAP_BYTES / 4;
const CHUNK_BYTES: usize = 1 << 20;
/// Bytes allocated and written per commit: the working set of one commit.
const COMMIT_BYTES: usize = 8 << 20;
const CGROUP_V1_MEMORY: &str = "/sys/fs/cgroup/memory";
const TEST_NAME: &str = "heap_four_times_the_memory_limit_fits_with_release_committed";

fams::persistent! {
    struct Chunks<'h> {
        /// Offsets of the 1 MiB chunks from the heap's base.
        offsets: PVec<'h, u64>,
    }
}

fn word(chunk: u64, page: u64) -> u64 {
    (chunk << 32 | page) ^ 0x5a5a_0000_a5a5
}

/// A memory cgroup, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.0.join(file), value)
            .unwrap_or_else(|e| panic!("writing {value} to {}/{file}: {e}", self.0.display()));
    }
    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once the child has exited; its page cache charges move to the parent.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root to create a memory cgroup".into());
    }
    let root = Path::new(CGROUP_V1_MEMORY);
    if !root.join("memory.limit_in_bytes").exists() {
        return Some(format!("no cgroup v1 memory controller at {CGROUP_V1_MEMORY}"));
    }
    None
}

/// The workload, in the child (inside the cgroup). Prints one RESULT line.
fn child(path: &Path) {
    // Wait until the parent has moved us into the cgroup.
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let started = std::time::Instant::now();
    let heap = Heap::open(path, &HeapOptions::default()).expect("open heap");
    let mut o = ObjectHeap::open(heap, &ObjectOptions::schema(1)).expect("open objects");
    let layout = Layout::from_size_align(CHUNK_BYTES, PAGE_SIZE).unwrap();
    let (mut commits, mut chunks, mut max_private, mut max_resident) = (0u64, 0u64, 0u64, 0u64);
    let pages_per_chunk = (CHUNK_BYTES / PAGE_SIZE) as u64;
    'fill: loop {
        let mut added = Vec::new();
        for _ in 0..COMMIT_BYTES / CHUNK_BYTES {
            match o.alloc(layout, true) {
                Ok(p) => {
                    let c = chunks + added.len() as u64;
                    for page in 0..pages_per_chunk {
                        // SAFETY: inside the fresh, zeroed 1 MiB allocation; no reference into
                        // the heap exists (the ObjectHeap is not borrowed here).
                        unsafe {
                            p.as_ptr().wrapping_add(page as usize * PAGE_SIZE).cast::<u64>().write(word(c, page))
                        };
                    }
                    added.push(p.as_ptr() as u64 - o.heap().base() as u64);
                }
                Err(fams::ObjectError::Exhausted { .. }) => {
                    if added.is_empty() {
                        break 'fill;
                    }
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let n = added.len() as u64;
        let root = o.root(|a| Chunks { offsets: PVec::new_in(a) }).unwrap();
        root.offsets.extend(added);
        o.commit().expect("commit");
        chunks += n;
        commits += 1;
        // Sample before the release: the peak of this commit's working set.
        let s = o.memory();
        max_private = max_private.max(s.private_bytes);
        max_resident = max_resident.max(s.resident_bytes);
        o.release_committed().expect("release");
        if std::env::var_os("FAMS_CGROUP_VERBOSE").is_some() {
            let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let mem = cg.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string())).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("{CGROUP_V1_MEMORY}{mem}/memory.stat")).unwrap_or_default();
            let pick: Vec<&str> = stat
                .lines()
                .filter(|l| {
                    ["cache ", "rss ", "mapped_file ", "dirty ", "writeback ", "inactive_file ", "active_file "]
                        .iter()
                        .any(|k| l.starts_with(k))
                })
                .collect();
            let s = o.memory();
            eprintln!(
                "commit {commits}: private {} MiB resident {} MiB; {pick:?}",
                s.private_bytes >> 20,
                s.resident_bytes >> 20
            );
        }
        if n < (COMMIT_BYTES / CHUNK_BYTES) as u64 {
            break;
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    // Read everything back, releasing as we go.
    let offsets: Vec<u64> =
        o.root::<Chunks>(|_| unreachable!("the root exists")).unwrap().offsets.iter().copied().collect();
    for (c, off) in offsets.iter().enumerate() {
        for page in 0..pages_per_chunk {
            let at = *off as usize + page as usize * PAGE_SIZE;
            let w = u64::from_le_bytes(o.heap().bytes()[at..at + 8].try_into().unwrap());
            assert_eq!(w, word(c as u64, page), "chunk {c} page {page}");
        }
        if c % 64 == 63 {
            let s = o.memory();
            max_private = max_private.max(s.private_bytes);
            max_resident = max_resident.max(s.resident_bytes);
            o.release_committed().unwrap();
        }
    }
    if std::env::var_os("FAMS_CGROUP_VERBOSE").is_some() {
        eprintln!("read back");
    }
    let report = o.check().expect("check");
    let s = o.memory();
    println!(
        "RESULT commits={commits} chunks={chunks} max_private={max_private} max_resident={max_resident} heap_size={} fill_s={fill_s:.1} total_s={:.1} large_objects={}",
        s.heap_bytes,
        started.elapsed().as_secs_f64(),
        report.large_objects
    );
    std::io::stdout().flush().unwrap();
}

#[test]
fn heap_four_times_the_memory_limit_fits_with_release_committed() {
    if is_child() {
        child(Path::new(&std::env::var("FAMS_CGROUP_HEAP").unwrap()));
        crash_exit();
    }
    if let Some(why) = skip_reason() {
        fams_tests::skip(&why);
        return;
    }
    let dir = TempDir::new("cgroup");
    let path = dir.join("big.heap");
    format(&path, HEAP_BYTES, Some(128 << 20));
    let cg = Cgroup(Path::new(CGROUP_V1_MEMORY).join(format!("fams-test-{}", std::process::id())));
    let _ = std::fs::remove_dir(&cg.0);
    std::fs::create_dir(&cg.0).expect("create the memory cgroup");
    cg.write("memory.limit_in_bytes", &LIMIT_BYTES.to_string());

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env("FAMS_CHILD", "1")
        .env("FAMS_CGROUP_HEAP", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    cg.write("cgroup.procs", &child.id().to_string());
    let tasks = cg.read("cgroup.procs");
    assert!(tasks.lines().any(|l| l.trim() == child.id().to_string()), "child not in the cgroup: {tasks}");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut result = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if std::env::var_os("FAMS_CGROUP_VERBOSE").is_some() {
            eprintln!("child: {line}");
        }
        // The line may follow libtest's "test NAME ... " on the same line.
        if let Some(at) = line.find("RESULT ") {
            result = Some(line[at + "RESULT ".len()..].to_string());
        }
    }
    let status = child.wait().unwrap();
    let max_usage: u64 = cg.read("memory.max_usage_in_bytes").trim().parse().unwrap_or(0);
    let failcnt = cg.read("memory.failcnt").trim().to_string();
    let oom_kills =
        cg.read("memory.oom_control").lines().find(|l| l.starts_with("oom_kill ")).unwrap_or("oom_kill ?").to_string();
    drop(cg);
    eprintln!(
        "cgroup limit {} MiB: child {status:?}; cgroup peak usage {} MiB (heap file page cache included), failcnt {failcnt}, {oom_kills}",
        LIMIT_BYTES >> 20,
        max_usage >> 20
    );
    assert!(status.success(), "the child did not finish (OOM-killed?): {status:?}, {oom_kills}");
    let result = result.expect("the child printed its result");
    eprintln!("{result}");
    let field = |name: &str| -> u64 {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {result}")) as u64
    };
    let (max_private, chunks, commits) = (field("max_private"), field("chunks"), field("commits"));
    assert!(chunks * CHUNK_BYTES as u64 >= HEAP_BYTES * 9 / 10, "the workload filled the heap: {chunks} chunks");
    assert!(commits >= 100, "{commits} commits");
    // Private memory follows one commit's working set (plus the allocator's and the root
    // vector's pages), not the heap: at most 4 commits' worth, far below the 1 GiB heap.
    assert!(
        max_private <= 4 * COMMIT_BYTES as u64,
        "private memory peaked at {} MiB for a {} MiB working set",
        max_private >> 20,
        COMMIT_BYTES >> 20
    );
    assert!(max_usage <= LIMIT_BYTES);
}
