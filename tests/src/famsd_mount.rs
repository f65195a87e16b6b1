//! `famsd mount` in a test: the daemon run in the foreground under a FUSE watchdog, and the
//! Python `mmap` workload of the mount's crash tests (tests/tests/mount.rs, SIGKILLs;
//! tests/tests/mount_power_cut.rs, power cuts under the store).

use crate::fuse_disk::{fuse_connection_of, Watchdog};
use crate::{built_binary, is_root, skip, ChildProc};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a step that needs the daemon may take before the watchdog aborts its connection.
pub const PATIENCE: Duration = Duration::from_secs(30);
pub const PAGE: usize = 4096;

/// The `famsd` binary of this tree.
pub fn famsd() -> PathBuf {
    built_binary("famsd", &["--bin", "famsd"], Path::new("famsd"))
}

/// Can this machine run the mount tests? Says why not (and fails where every test must run).
pub fn can_mount() -> bool {
    if !is_root() {
        skip("famsd mount tests need root (mount(2) of a FUSE file system)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        skip("famsd mount tests need /dev/fuse");
        return false;
    }
    if Command::new("python3").arg("-c").arg("pass").status().map(|s| !s.success()).unwrap_or(true) {
        skip("famsd mount tests need python3");
        return false;
    }
    true
}

/// `famsd format` a store with a 16 MiB log.
pub fn format_store(store: &Path, size: &str, max: Option<&str>) {
    format_store_with_log(store, size, max, "16M").unwrap_or_else(|e| panic!("{e}"));
}

/// `famsd format` a store of `size` (growing up to `max`) with a log file of `log_size`.
pub fn format_store_with_log(store: &Path, size: &str, max: Option<&str>, log_size: &str) -> Result<(), String> {
    let mut cmd = Command::new(famsd());
    cmd.args(["format", "--heap"]).arg(store).args(["--size", size, "--log-size", log_size]);
    if let Some(m) = max {
        cmd.args(["--max-size", m]);
    }
    let out = cmd.output().map_err(|e| format!("famsd format: {e}"))?;
    if !out.status.success() {
        return Err(format!("famsd format: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// A running `famsd mount --foreground`. Dropping it unmounts (lazily) and kills the daemon.
pub struct Mounted {
    famsd: PathBuf,
    pub mountpoint: PathBuf,
    daemon: Option<ChildProc>,
    /// Still mounted (alive or dead): Drop detaches it.
    mounted: bool,
    /// Aborts this mount's FUSE connection (or kills the daemon) when a watched step hangs.
    pub watchdog: Watchdog,
}

impl Mounted {
    /// Start `famsd mount --foreground EXTRA…`; returns once it has mounted. Its log (warnings
    /// and errors, unless FAMS_LOG says otherwise) goes on to this process's stderr.
    pub fn start(famsd: &Path, store: &Path, mountpoint: &Path, extra: &[&str]) -> Result<Mounted, String> {
        Mounted::start_logging(famsd, store, mountpoint, extra, true)
    }

    /// [`Mounted::start`], with the daemon's log passed on only if `echo_log` (it is in the
    /// error if the daemon does not mount, either way): for tests whose daemons see errors on
    /// purpose (a drive that lost its power).
    pub fn start_logging(
        famsd: &Path,
        store: &Path,
        mountpoint: &Path,
        extra: &[&str],
        echo_log: bool,
    ) -> Result<Mounted, String> {
        std::fs::create_dir_all(mountpoint).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(famsd);
        cmd.arg("mount").arg(store).arg(mountpoint).arg("--foreground").args(extra);
        cmd.env("FAMS_LOG", std::env::var("FAMS_LOG").unwrap_or_else(|_| "warn".into()));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("starting famsd mount: {e}"))?;
        let proc = ChildProc::new(&child);
        let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        drop(child);
        let (err_tx, err_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo_log {
                    eprintln!("famsd mount: {line}");
                }
                let _ = err_tx.send(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut m = Mounted {
            famsd: famsd.into(),
            mountpoint: mountpoint.into(),
            daemon: Some(proc),
            mounted: true,
            watchdog: Watchdog::new(),
        };
        match rx.recv_timeout(PATIENCE) {
            Ok(line) if line.starts_with("famsd: mounted ") => {}
            other => {
                let status = m.daemon.as_mut().and_then(|d| d.kill());
                std::thread::sleep(Duration::from_millis(50));
                let log: Vec<String> = err_rx.try_iter().collect();
                m.daemon = None;
                m.mounted = false;
                return Err(format!(
                    "famsd mount did not mount ({other:?}, wait status {status:?}): {}",
                    log.join(" | ")
                ));
            }
        }
        m.watchdog.set_target(fuse_connection_of(mountpoint), m.daemon.as_ref().map(|d| d.pid.as_raw() as u32));
        Ok(m)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Run a step that needs the daemon under the watchdog.
    pub fn watch<T>(&self, what: &str, step: impl FnOnce() -> T) -> T {
        self.watchdog.watch(what, PATIENCE, step).unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGKILL the daemon: the mount point then answers ENOTCONN until `famsd umount`.
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// `famsd umount`; then wait for the daemon (if alive) to end by itself.
    pub fn unmount(&mut self) -> Result<String, String> {
        let out = self.watch("famsd umount", || Command::new(&self.famsd).arg("umount").arg(&self.mountpoint).output());
        let out = out.map_err(|e| format!("famsd umount: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("famsd umount failed: {text}"));
        }
        self.mounted = false;
        if let Some(mut d) = self.daemon.take() {
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(status) = d.ended() {
                    if status != nix::sys::wait::WaitStatus::Exited(d.pid, 0) {
                        return Err(format!("the daemon ended with {status:?} after the unmount"));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    d.kill();
                    return Err("the daemon did not end after the unmount; killed".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(text)
    }

    /// The daemon's status attribute of a file (open handles, staged bytes).
    pub fn status(&self, name: &str) -> String {
        let path = self.path(name);
        self.watch(&format!("getxattr {name}"), || xattr(&path, "user.fams.status")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Wait until the daemon has processed every release of `name` (RELEASE is asynchronous
    /// to close(), and to the death of a process).
    pub fn wait_closed(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.status(name);
            if s.starts_with("openers=0 ") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{name} still open in the daemon after {} s: {s}", PATIENCE.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new(&self.famsd).arg("umount").arg("--lazy").arg(&self.mountpoint).output();
        }
        if let Some(mut d) = self.daemon.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.ended().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            d.kill();
        }
    }
}

pub fn xattr(path: &Path, name: &str) -> Result<String, String> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let n = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: getxattr with NUL-terminated strings and a buffer of the length passed.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(format!("getxattr {} {name}: {}", path.display(), std::io::Error::last_os_error()));
    }
    buf.truncate(r as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The Python `mmap` workload: one long-lived Python process (starting Python costs more than a
/// SIGKILL cycle on a loaded machine) forks each writer. A writer maps the file `MAP_SHARED` and
/// applies generations g+1, g+2, …: each writes the number g, as 512 little-endian u64s, into
/// every other page (so the kernel sends the dirty pages as many separate WRITEs), then
/// `flush()` (msync(MS_SYNC)). It says `sync g` before the flush and `ack g` once it returned;
/// a failure (a flush whose daemon or drive is gone, a file too short to map) says `error …`
/// and ends the writer.
const MMAP_SPAWNER: &str = r#"
import mmap, os, struct, sys
path, npages = sys.argv[1], int(sys.argv[2])
def writer(g):
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, npages * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.write(1, b"start\n")
    while True:
        g += 1
        page = struct.pack("<Q", g) * 512
        for p in range(0, npages, 2):
            mm[p * 4096:(p + 1) * 4096] = page
        os.write(1, b"sync %d\n" % g)
        mm.flush()
        os.write(1, b"ack %d\n" % g)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "go":
        pid = os.fork()
        if pid == 0:
            try:
                writer(int(arg))
            except Exception as e:
                os.write(1, ("error %r\n" % e).encode())
            finally:
                os._exit(1)
        os.write(1, b"pid %d\n" % pid)
    elif cmd == "reap":
        os.waitpid(int(arg), 0)
        os.write(1, b"dead %s\n" % arg.encode())
"#;

/// What the current writer of [`MmapWriters`] has said so far.
#[derive(Clone, Debug, Default)]
pub struct WriterState {
    /// The highest generation whose `flush()` returned.
    pub acked: Option<u64>,
    /// The highest generation whose `flush()` was called.
    pub synced: Option<u64>,
    /// The writer's flush failed (it said `error …`).
    pub error: Option<String>,
}

impl WriterState {
    /// Inside msync: it called flush() for a generation and has not returned from it.
    pub fn in_msync(&self) -> bool {
        self.error.is_none() && self.synced > self.acked
    }
}

/// [`MMAP_SPAWNER`] running on one file of `npages` pages, its output read with a deadline.
pub struct MmapWriters {
    to: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    _proc: ChildProc,
    /// The writer forked last.
    pub state: WriterState,
}

impl MmapWriters {
    pub fn start(file: &Path, npages: usize) -> Result<MmapWriters, String> {
        let mut child = Command::new("python3")
            .arg("-S")
            .arg("-c")
            .arg(MMAP_SPAWNER)
            .arg(file)
            .arg(npages.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting python3: {e}"))?;
        let proc = ChildProc::new(&child);
        let to = child.stdin.take().expect("piped");
        let from = child.stdout.take().expect("piped");
        drop(child);
        let (line_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(from).lines().map_while(Result::ok) {
                if line_tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(MmapWriters { to, lines, _proc: proc, state: WriterState::default() })
    }

    /// Take in one line of the writer's; Some(line) if it is not one of the writer's reports.
    fn take_in(&mut self, l: String) -> Option<String> {
        let num = |p: &str| l.strip_prefix(p).and_then(|g| g.trim().parse::<u64>().ok());
        if let Some(g) = num("ack ") {
            self.state.acked = self.state.acked.max(Some(g));
        } else if let Some(g) = num("sync ") {
            self.state.synced = self.state.synced.max(Some(g));
        } else if let Some(e) = l.strip_prefix("error ") {
            self.state.error = Some(e.to_string());
        } else {
            return Some(l);
        }
        None
    }

    fn line(&mut self, what: &str, patience: Duration) -> Result<Option<String>, String> {
        let l =
            self.lines.recv_timeout(patience).map_err(|e| format!("waiting for the Python writer ({what}): {e}"))?;
        Ok(self.take_in(l))
    }

    /// Take in every line already printed (the writer's state as of now).
    pub fn catch_up(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.take_in(l);
        }
    }

    /// Fork a writer that goes on from generation `from`; returns its pid once it has mapped
    /// the file.
    pub fn go(&mut self, from: u64) -> Result<i32, String> {
        self.state = WriterState::default();
        writeln!(self.to, "go {from}").map_err(|e| format!("to the Python writer: {e}"))?;
        let (mut pid, mut writing) = (None, false);
        while pid.is_none() || !writing {
            match self.line("start", PATIENCE)? {
                Some(l) if l == "start" => writing = true,
                Some(l) => match l.strip_prefix("pid ").and_then(|p| p.parse::<i32>().ok()) {
                    Some(p) => pid = Some(p),
                    None => return Err(format!("the Python writer said {l:?}")),
                },
                None if self.state.error.is_some() => {
                    return Err(format!("the writer failed: {:?}", self.state.error));
                }
                None => {}
            }
        }
        Ok(pid.expect("set in the loop"))
    }

    /// Wait until the writer has acknowledged generation `g`. Err if it failed or did not
    /// within `patience`.
    pub fn wait_for_ack(&mut self, g: u64, patience: Duration) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        while self.state.acked < Some(g) {
            if let Some(e) = &self.state.error {
                return Err(format!("the writer failed before acknowledging generation {g}: {e}"));
            }
            self.line(&format!("ack {g}"), deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    /// SIGKILL writer `pid` (which may have ended) and reap it, taking in everything it said
    /// up to its death. Returns its final state.
    pub fn kill(&mut self, pid: i32) -> Result<WriterState, String> {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        writeln!(self.to, "reap {pid}").map_err(|e| format!("to the Python writer: {e}"))?;
        let dead = format!("dead {pid}");
        loop {
            if self.line("reaping", PATIENCE)?.is_some_and(|l| l == dead) {
                return Ok(self.state.clone());
            }
        }
    }
}

/// The generation a file written by [`MmapWriters`] holds, if it holds exactly one: every
/// written (even) page is that number as 512 u64s, every other page zero, the size
/// `npages` pages. Otherwise what is wrong.
pub fn generation_of(data: &[u8], npages: usize) -> Result<u64, String> {
    if data.len() != npages * PAGE {
        return Err(format!("size {} instead of {}", data.len(), npages * PAGE));
    }
    let g = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let want = g.to_le_bytes().repeat(PAGE / 8);
    for (p, page) in data.chunks(PAGE).enumerate() {
        let ok = if p % 2 == 0 { page == &want[..] } else { page.iter().all(|&b| b == 0) };
        if !ok {
            let found = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
            return Err(format!("a mix: page 0 holds generation {g}, page {p} holds {found}"));
        }
    }
    Ok(g)
}
