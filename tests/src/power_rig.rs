//! The simulated hardware of the power-cut tests (tests/tests/power_cut.rs,
//! tests/tests/turns_power_cut.rs): one `fams-fuse-disk` program serving two drives with
//! volatile write caches, `log` (used raw, through a loop device) and `fs` (ext4 on a loop
//! device), and the steps of a power cycle: cut, tear down, power on from the durable images.
//!
//! Every step that depends on the FUSE program runs under its watchdog
//! ([`FuseDisk::watch`]): a wedged connection is aborted and the step fails with a message
//! naming it, instead of hanging the test.

use crate::fuse_disk::{umount_retrying, CutReport, DiskCounters, DiskSpec, FuseDisk, FUSE_PATIENCE};
use crate::{is_root, TempDir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Print past the test harness's capture, so CI logs show it for passing tests too.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// A knob from the environment (a number), or its default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Run a command to completion; its trimmed stdout, or an error with its output.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Why this machine cannot run a power-cut test, if it cannot.
pub fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some("needs root (FUSE mount, losetup, mount)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (no FUSE in this kernel)".into());
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "e2fsck"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map_or(true, |o| !o.status.success())
        {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

/// Wait (bounded by `patience`) until process `pid` is stopped by SIGSTOP, or gone.
pub fn wait_stopped(pid: u32, patience: Duration) {
    let deadline = std::time::Instant::now() + patience;
    while std::time::Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) S …": the state follows the last ')'.
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next());
        // Stopped, or already dead (say, a node that saw an I/O error and left).
        if matches!(state, Some('T' | 't' | 'Z' | 'X') | None) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Attach a loop device to `file`, with direct I/O when the kernel takes it. Returns the device and
/// whether direct I/O is on.
pub fn losetup(file: &Path) -> Result<(PathBuf, bool), String> {
    let mut tries = 0;
    let dev = loop {
        // Another process may take the free device first: try again.
        let r = run(Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(file))
            .or_else(|_| run(Command::new("losetup").args(["-f", "--show"]).arg(file)));
        match r {
            Ok(d) => break d,
            Err(e) if tries >= 5 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20 * tries));
            }
        }
    };
    let name = Path::new(&dev).file_name().unwrap_or_default().to_string_lossy().to_string();
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).is_ok_and(|s| s.trim() == "1");
    Ok((PathBuf::from(dev), dio))
}

pub fn losetup_detach(dev: &Path) {
    let _ = Command::new("losetup").arg("-d").arg(dev).stderr(Stdio::null()).status();
}

/// Wait (bounded by `patience`) until loop device `dev` has let go of its backing file. A detach
/// of a device that is still open — by the io_uring work of a killed process, say — only takes
/// effect at its last close; until then the FUSE drive under it stays busy. True once released.
pub fn wait_released(dev: &Path, patience: Duration) -> bool {
    let name = dev.file_name().unwrap_or_default().to_string_lossy().to_string();
    let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    let deadline = std::time::Instant::now() + patience;
    while backing.exists() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// A loop device attached by a test, detached on drop.
pub struct LoopGuard(pub PathBuf);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        losetup_detach(&self.0);
    }
}

/// The counters of each drive in a `stats` answer, in drive order (`log`, `fs`).
pub fn counters(stats: &serde_json::Value) -> Vec<DiskCounters> {
    stats["disks"].as_array().map(|a| a.iter().map(DiskCounters::from_json).collect()).unwrap_or_default()
}

/// The stack of simulated hardware: FUSE drives `log` and `fs`, a loop device on each, ext4 on
/// the one over `fs`. Torn down on drop.
pub struct Rig {
    pub dir: TempDir,
    fuse: Option<FuseDisk>,
    log_dev: Option<PathBuf>,
    fs_dev: Option<PathBuf>,
    fs_mounted: bool,
    pub loop_dio: bool,
    /// Where the FUSE program writes a trace of every request, one file per power-on.
    pub trace: Option<PathBuf>,
    power_ons: u64,
    /// The `fams-fuse-disk` program (a test has it as `env!("CARGO_BIN_EXE_fams-fuse-disk")`).
    fuse_exe: PathBuf,
    log_disk_bytes: u64,
    fs_disk_bytes: u64,
    /// After the first power-on, this drive acknowledges flushes without flushing (a lying
    /// drive, for proving that a test notices lost "durable" data).
    pub lying_drive: Option<String>,
}

impl Rig {
    /// A rig in a fresh directory named after `tag`; nothing runs until [`Rig::power_on`].
    pub fn new(tag: &str, fuse_exe: &Path, log_disk_bytes: u64, fs_disk_bytes: u64) -> Rig {
        Rig {
            dir: TempDir::new(tag),
            fuse: None,
            log_dev: None,
            fs_dev: None,
            fs_mounted: false,
            loop_dio: true,
            trace: None,
            power_ons: 0,
            fuse_exe: fuse_exe.to_path_buf(),
            log_disk_bytes,
            fs_disk_bytes,
            lying_drive: None,
        }
    }

    /// Where ext4 is mounted.
    pub fn fs_mnt(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// The loop device over the `log` drive (its name may change at every power-on).
    pub fn log_dev(&self) -> PathBuf {
        self.log_dev.clone().expect("powered on")
    }

    pub fn fuse(&self) -> &FuseDisk {
        self.fuse.as_ref().expect("powered on")
    }

    /// The drives' program, if powered on (for a teardown that must not assume it is).
    pub fn fuse_if_on(&self) -> Option<&FuseDisk> {
        self.fuse.as_ref()
    }

    /// Start the drives from their durable images, attach loop devices, mount ext4 (first time:
    /// make it). With `fsck`, check the file system after its journal replay (a problem found is
    /// returned, not an error).
    pub fn power_on(&mut self, first: bool, fsck: bool) -> Result<Option<String>, String> {
        let disks = [
            DiskSpec { name: "log".into(), image: self.dir.join("log.img"), size: self.log_disk_bytes },
            DiskSpec { name: "fs".into(), image: self.dir.join("fs.img"), size: self.fs_disk_bytes },
        ];
        let trace = self.trace.as_ref().map(|d| d.join(format!("trace-{}.txt", self.power_ons)));
        self.power_ons += 1;
        let fuse = FuseDisk::start(
            &self.fuse_exe,
            &self.dir.join("disk"),
            &disks,
            &self.dir.join("control.sock"),
            trace.as_deref(),
        )?;
        if let (Some(d), false) = (&self.lying_drive, first) {
            fuse.command(&format!("ignore-flushes {d}"))?;
        }
        // ext4's drive tears per sector without garbage unless a test says otherwise (see
        // `fuse_disk`); the raw fams log's drive keeps the full model.
        fuse.command("sector-atomic fs on")?;
        let (log_file, fs_file) = (fuse.disk_path("log"), fuse.disk_path("fs"));
        self.fuse = Some(fuse);
        let fuse = self.fuse.as_ref().expect("just set");
        let (log_dev, dio1) =
            fuse.watch("attaching a loop device to the log drive", FUSE_PATIENCE, || losetup(&log_file))??;
        self.log_dev = Some(log_dev);
        let (fs_dev, dio2) =
            fuse.watch("attaching a loop device to the fs drive", FUSE_PATIENCE, || losetup(&fs_file))??;
        self.fs_dev = Some(fs_dev.clone());
        self.loop_dio = dio1 && dio2;
        let mnt = self.fs_mnt();
        if first {
            fuse.watch("mkfs.ext4 on the fs drive", FUSE_PATIENCE, || {
                run(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard"]).arg(&fs_dev))
            })??;
        }
        std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
        let mount = || run(Command::new("mount").args(["-t", "ext4"]).arg(&fs_dev).arg(&mnt));
        let mut fsck_problem = None;
        fuse.watch("mounting ext4 (journal replay)", FUSE_PATIENCE, mount)??;
        self.fs_mounted = true;
        if fsck {
            // The journal is replayed now; a clean unmount, then a read-only full check.
            fuse.watch("unmounting ext4 for e2fsck", FUSE_PATIENCE, || run(Command::new("umount").arg(&mnt)))??;
            self.fs_mounted = false;
            let check =
                fuse.watch("e2fsck", FUSE_PATIENCE, || run(Command::new("e2fsck").args(["-f", "-n"]).arg(&fs_dev)))?;
            if let Err(e) = check {
                fsck_problem = Some(e);
            }
            fuse.watch("mounting ext4 after e2fsck", FUSE_PATIENCE, mount)??;
            self.fs_mounted = true;
        }
        Ok(fsck_problem)
    }

    /// Power loss on both drives at once.
    pub fn cut(&self, seed: u64) -> Result<(CutReport, Vec<DiskCounters>), String> {
        let (r, stats) = self.fuse().cut(seed)?;
        Ok((r, counters(&stats)))
    }

    /// Power loss on both drives right after the `n`-th write from now reaches a drive (or to
    /// `disk`; or now, if that takes longer than `patience`).
    pub fn cut_after_writes(
        &self,
        seed: u64,
        n: u64,
        disk: Option<&str>,
        patience: Duration,
    ) -> Result<(CutReport, Vec<DiskCounters>), String> {
        self.fuse().arm(seed, n, disk)?;
        match self.fuse().wait_for_cut(patience)? {
            Some((r, stats)) => Ok((r, counters(&stats))),
            None => match self.cut(seed) {
                Ok(r) => Ok(r),
                // The armed cut came in between.
                Err(_) => self.fuse().wait_for_cut(patience)?.map(|(r, st)| (r, counters(&st))).ok_or("no cut".into()),
            },
        }
    }

    /// Tear the stack down (after a cut the drives ignore whatever this writes).
    pub fn power_off(&mut self) -> Result<(), String> {
        let mut err = None;
        if let Some(fuse) = &self.fuse {
            let mnt = self.fs_mnt();
            if self.fs_mounted {
                // Busy for a moment after a kill (a killed process's io_uring work lets go of its
                // files asynchronously): retry for a while before giving up.
                match fuse.watch("unmounting ext4", FUSE_PATIENCE, || umount_retrying(&mnt, Duration::from_secs(30))) {
                    Ok(true) => {}
                    Ok(false) => err = Some(format!("{} stayed busy; unmounted lazily", mnt.display())),
                    Err(e) => err = Some(e),
                }
                self.fs_mounted = false;
            }
            for dev in [self.fs_dev.take(), self.log_dev.take()].into_iter().flatten() {
                let what = format!("detaching {}", dev.display());
                match fuse.watch(&what, FUSE_PATIENCE, || {
                    losetup_detach(&dev);
                    wait_released(&dev, Duration::from_secs(30))
                }) {
                    Ok(true) => {}
                    Ok(false) => {
                        err.get_or_insert(format!(
                            "{} still holds its backing file 30 s after detaching",
                            dev.display()
                        ));
                    }
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(mut f) = self.fuse.take() {
            if let Err(e) = f.stop() {
                err.get_or_insert(e);
            }
        }
        err.map_or(Ok(()), Err)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Err(e) = self.power_off() {
            say(&format!("power-cut rig teardown: {e}"));
        }
    }
}
