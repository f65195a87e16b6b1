//! Running `famsd mount` as a child process: for the background mount (`famsd mount` without
//! `--foreground`, a daemon that outlives the command), and as a handle ([`Daemon`]) for
//! commands that mount for a while and must never leave a mount behind (`famsd bench --mount`,
//! `famsd demo`): started with a bounded wait for its "mounted" line, unmounted and reaped on
//! every way out, SIGTERMed by the kernel if its parent dies, and killable on purpose (a crash).

use super::{check_mountpoint, MountArgs, READY_PREFIX};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the daemon may take to mount, and to end after its unmount.
const DAEMON_PATIENCE: Duration = Duration::from_secs(20);

/// `famsd mount STORE MP --foreground` with `args`' options.
fn command(famsd: &Path, args: &MountArgs) -> Command {
    let mut cmd = Command::new(famsd);
    cmd.arg("mount").arg(&args.store).arg(&args.mountpoint).arg("--foreground");
    cmd.arg("--staging-max").arg(args.staging_max_bytes.to_string());
    if args.commit_on_close {
        cmd.arg("--commit-on-close");
    }
    if let Some(l) = &args.log {
        cmd.arg("--log").arg(l);
    }
    cmd
}

/// The background daemon: this program again with `--foreground`, in its own process group
/// (a terminal's signals do not reach it), its log appended to `log_file`; returns once it has
/// mounted, or the end of its log if it could not.
pub fn spawn_background(args: &MountArgs, log_file: &Path) -> Result<Child, String> {
    check_mountpoint(&args.mountpoint)?;
    if let Err(e) = std::fs::metadata(&args.store) {
        return Err(format!(
            "{}: cannot open the store: {e} (make one with `famsd format --heap STORE --size 64M --max-size 64G`)",
            args.store.display()
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| format!("{}: {e}", log_file.display()))?;
    let mut cmd = command(&exe, args);
    use std::os::unix::process::CommandExt;
    cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log));
    let mut child = cmd.spawn().map_err(|e| format!("starting the daemon: {e}"))?;
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().ok_or("no pipe")?).read_line(&mut line);
    if read.is_ok() && line.starts_with(READY_PREFIX) {
        return Ok(child);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let tail = std::fs::read_to_string(log_file).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
    Err(format!(
        "the daemon did not mount ({status}); the end of {}:\n{}",
        log_file.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}

/// Can this process mount FUSE? Says why not.
pub fn check_can_mount(what: &str) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err(format!("{what} needs /dev/fuse (FUSE), which this machine lacks"));
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let fusermount = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
        .unwrap_or(false);
    if fusermount {
        Ok(())
    } else {
        Err(format!(
            "{what} mounts a FUSE file system: it needs root (mount(2)) or fusermount3 \
             (Debian/Ubuntu package fuse3) for an unprivileged mount"
        ))
    }
}

/// A `famsd mount --foreground` child. Unmounted and reaped on drop if [`Daemon::stop`] was
/// not called (or failed).
pub struct Daemon {
    child: Option<Child>,
    mountpoint: PathBuf,
    mounted: bool,
    log: PathBuf,
}

impl Daemon {
    /// Start `famsd mount --foreground` (the binary `famsd`) for `args`, its log written to
    /// `log`, and return once it has mounted — or why it did not, with the end of its log. If this
    /// process dies, the daemon gets SIGTERM and unmounts itself.
    pub fn start(famsd: &Path, args: &MountArgs, log: &Path) -> Result<Daemon, String> {
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = command(famsd, args);
        let mountpoint = args.mountpoint.as_path();
        // Info: the daemon logs its counters (syncs, commits, writes) when it unmounts.
        cmd.env("FAMS_LOG", "info");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log_file));
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure makes one async-signal-safe system call
        // (prctl) and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies, the daemon gets SIGTERM and unmounts itself.
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGTERM)).map_err(std::io::Error::from)
            })
        };
        let mut child = cmd.spawn().map_err(|e| format!("starting {} mount: {e}", famsd.display()))?;
        let stdout = child.stdout.take().ok_or("no pipe from the daemon")?;
        let mut d =
            Daemon { child: Some(child), mountpoint: mountpoint.to_path_buf(), mounted: false, log: log.into() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(DAEMON_PATIENCE) {
            Ok(line) if line.starts_with(super::READY_PREFIX) => {
                d.mounted = true;
                Ok(d)
            }
            other => {
                let why = match other {
                    Ok(line) if line.is_empty() => "it ended without mounting".to_string(),
                    Ok(line) => format!("it said {:?}", line.trim_end()),
                    Err(_) => format!("no word from it in {} s", DAEMON_PATIENCE.as_secs()),
                };
                // A daemon that mounted but did not say so is still unmounted by drop.
                d.mounted = super::mount_entry(mountpoint).is_some_and(|m| m.fstype.starts_with("fuse"));
                let _ = d.stop();
                Err(format!("famsd mount did not mount {} ({why}); its log: {}", mountpoint.display(), d.log_tail()))
            }
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Unmount (retrying while the kernel finishes releasing closed files, then detaching),
    /// and wait for the daemon to end (killing it after [`DAEMON_PATIENCE`]).
    pub fn stop(&mut self) -> Result<(), String> {
        let mut problem = None;
        if self.mounted {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match super::umount(&self.mountpoint, false) {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => {
                        problem = Some(format!("unmounting {}: {e}; detached it instead", self.mountpoint.display()));
                        let _ = super::umount(&self.mountpoint, true);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            self.mounted = false;
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + DAEMON_PATIENCE;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        problem.get_or_insert(format!("the mount daemon ended with {status}: {}", self.log_tail()));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        problem.get_or_insert(format!(
                            "the mount daemon did not end within {} s of its unmount; killed it",
                            DAEMON_PATIENCE.as_secs()
                        ));
                        break;
                    }
                }
            }
        }
        problem.map_or(Ok(()), Err)
    }

    /// The daemon's "store statistics" log line (after it ended).
    /// A crash: SIGKILL the daemon, reap it, and detach its dead mount (which answers ENOTCONN
    /// until then). Nothing unsynced survives; what was synced is in the store.
    pub fn kill(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            crate::child::signal_child(&mut child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
        if self.mounted {
            self.mounted = false;
            if super::mount_entry(&self.mountpoint).is_some() {
                super::umount(&self.mountpoint, true)?;
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text.lines().rev().find(|l| l.contains("store statistics:"))?;
        Some(line.split_once("store statistics: ")?.1.to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("famsd mount daemon: {e}");
        }
    }
}
