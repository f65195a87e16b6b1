//! Shared helpers for the integration and crash tests.

pub mod alloc_workload;
pub mod famsd_mount;
pub mod fuse_disk;
pub mod power_rig;

use fams::{FormatOptions, Heap, HeapOptions, TrackerKind};
use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh directory under /var/tmp (a real disk: O_DIRECT does not work on tmpfs), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = PathBuf::from(format!("/var/tmp/fams-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every tracker usable here; prints why uffd (and regions, which needs it) is skipped when it is.
pub fn trackers() -> Vec<TrackerKind> {
    match fams::tracker::uffd_available() {
        Ok(()) => vec![TrackerKind::Uffd, TrackerKind::Mprotect, TrackerKind::Regions],
        Err(why) => {
            eprintln!("uffd and regions trackers not tested here: {why}");
            vec![TrackerKind::Mprotect]
        }
    }
}

pub fn format(path: &Path, size: u64, log_size: Option<u64>) -> fams::HeapHeader {
    let mut f = FormatOptions::new(path, size);
    f.log_size_bytes = log_size;
    Heap::format(&f).expect("format")
}

pub fn open(path: &Path, tracker: TrackerKind) -> Heap {
    Heap::open(path, &HeapOptions { tracker: Some(tracker), ..HeapOptions::default() }).expect("open")
}

/// Run the named test of the current test binary in a child process with `FAMS_CHILD` set; the
/// child does its work and leaves with `_exit` (no destructors: a crash as far as the heap is
/// concerned). Returns the child's stdout.
pub fn run_child(test_name: &str, env: &[(&str, String)]) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.arg("--exact").arg(test_name).arg("--nocapture").arg("--test-threads=1").env("FAMS_CHILD", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn child");
    assert!(
        out.status.code() == Some(0),
        "child {test_name} failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A binary of this workspace, of the same profile as the running test (`target/<profile>/REL`),
/// built with `cargo build -p PACKAGE TARGET_ARGS…` first — a no-op when `cargo test` already
/// built the workspace. For tests that run another package's program (the `kv` example, the
/// `famsd` binary), which cargo does not build for this package's tests by itself.
pub fn built_binary(package: &str, target_args: &[&str], rel: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/TEST-HASH
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target dir");
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    let bin = profile_dir.join(rel);
    // CI sets this for the `cargo test --workspace` run that has just built every binary and
    // example of this tree (with the workspace's unified features); building the package alone
    // would only build it once more with its own feature set.
    if std::env::var_os("FAMS_TESTS_USE_BUILT_BINARIES").is_some() && bin.exists() {
        return bin;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package]).args(target_args).arg("--manifest-path").arg(&manifest);
    cmd.arg("--target-dir").arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        p => {
            cmd.args(["--profile", p]);
        }
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => {
            assert!(
                bin.exists(),
                "cannot build {} ({other:?}) and it does not exist; run `cargo build --release -p {package} {}`",
                bin.display(),
                target_args.join(" ")
            );
            eprintln!("could not rebuild {} ({other:?}); using it as it is", bin.display());
        }
    }
    bin
}

/// A child process this test started, SIGKILLed and reaped on drop if still there: a test that
/// fails or panics part way never leaves an orphan behind. Take the pid from the
/// `std::process::Child` and drop that (std's handle neither waits nor kills).
pub struct ChildProc {
    pub pid: Pid,
    /// How it ended, once reaped.
    reaped: Option<WaitStatus>,
}

impl ChildProc {
    pub fn new(child: &std::process::Child) -> ChildProc {
        ChildProc { pid: Pid::from_raw(child.id() as i32), reaped: None }
    }
    /// Our own child's pid is not reaped until `reaped` is set, so it is not reused: the signal
    /// reaches it, or it had already exited (a zombie ignores it).
    pub fn signal(&self, sig: Signal) {
        if self.reaped.is_none() {
            let _ = kill(self.pid, sig);
        }
    }
    /// Stop it and wait until every thread is stopped. Err(how it ended) if it had ended instead.
    pub fn stop(&mut self) -> Result<(), String> {
        self.signal(Signal::SIGSTOP);
        match waitpid(self.pid, Some(WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::Stopped(..)) => Ok(()),
            Ok(status) => {
                self.reaped = Some(status);
                Err(format!("the child ended by itself ({status:?})"))
            }
            Err(e) => Err(format!("waiting for the child to stop: {e}")),
        }
    }
    /// Has it ended by itself? How, if so (and it is reaped).
    pub fn ended(&mut self) -> Option<WaitStatus> {
        if self.reaped.is_none() {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => {}
                Ok(status) => self.reaped = Some(status),
            }
        }
        self.reaped
    }
    /// SIGKILL it (if not reaped yet) and reap it. How it ended, None if it was reaped before.
    pub fn kill(&mut self) -> Option<WaitStatus> {
        if self.reaped.is_some() {
            return None;
        }
        self.signal(Signal::SIGKILL);
        let status = waitpid(self.pid, None).ok();
        self.reaped = status.or(Some(WaitStatus::StillAlive));
        status
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn is_child() -> bool {
    std::env::var_os("FAMS_CHILD").is_some()
}

/// Leave the process at once, as a crash would: no destructors, no checkpoint, no unmapping.
pub fn crash_exit() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    exit_now(0)
}

/// End the process at once with `code`: no destructors, no atexit handlers, nothing flushed.
pub fn exit_now(code: i32) -> ! {
    // raw libc: nix 0.31 has no _exit, and std's exit runs atexit handlers a crash would not.
    // SAFETY: _exit ends the process immediately; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Send `sig` to a process this test started by pid (and has not reaped). No error if it has
/// ended: a zombie ignores signals.
pub fn signal_pid(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// A test that cannot run here says why and returns. Where every test must run — under CI
/// (`CI=true`) or with `FAMS_REQUIRE_ROOT_TESTS` set — a skip fails instead: a privileged test
/// that quietly skipped would look like a pass.
pub fn skip(why: &str) {
    let required =
        std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var_os("FAMS_REQUIRE_ROOT_TESTS").is_some();
    assert!(!required, "this run requires every test to run, but this one cannot: {why}");
    eprintln!("SKIPPED: {why}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A loop device over a fresh file, detached on drop. None (with the reason printed) when not root
/// or losetup is missing.
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing: PathBuf,
}

impl LoopDevice {
    pub fn new(backing: PathBuf, size_bytes: u64) -> Option<LoopDevice> {
        if !is_root() {
            skip("loop-device test needs root (losetup)");
            return None;
        }
        let f = std::fs::File::create(&backing).expect("create backing file");
        f.set_len(size_bytes).expect("size backing file");
        drop(f);
        let out = match Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(&backing).output() {
            Ok(o) => o,
            Err(e) => {
                skip(&format!("cannot run losetup: {e}"));
                return None;
            }
        };
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Some(LoopDevice { device, backing })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Count a violation a crash test found, keeping the first ten descriptions for its report.
pub fn note_violation(violations: &mut u64, details: &mut Vec<String>, what: String) {
    *violations += 1;
    if details.len() < 10 {
        details.push(what);
    }
}

/// Deterministic randomness for tests (the same generator the torture workload uses).
pub use famsd::workload::Rng;

/// The names of the deliberate bugs of one layer (`heap`, `turns`, `mount`) that the `famsd`
/// binary at `famsd` knows (`famsd torture --list-mutations --json`), for negative controls.
pub fn mutations_of_layer(famsd: &Path, layer: &str) -> Vec<String> {
    let out = Command::new(famsd)
        .args(["torture", "--list-mutations", "--json"])
        .output()
        .expect("run famsd torture --list-mutations");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON list of mutations");
    list.as_array()
        .expect("an array")
        .iter()
        .filter(|m| m["layer"] == layer)
        .map(|m| m["name"].as_str().expect("a name").to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "requires every test to run")]
    fn a_skip_fails_where_every_test_must_run() {
        std::env::set_var("FAMS_REQUIRE_ROOT_TESTS", "1");
        super::skip("checking that a required run refuses to skip");
    }
}
