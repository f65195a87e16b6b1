//! `famsd mount`: a FUSE file system backed by a fams heap, giving unmodified programs
//! failure-atomic `fsync`/`fdatasync`/`msync(MS_SYNC)`.
//!
//! A file's data and size changes are staged in the daemon's memory ([`staging`]) and become
//! durable together at the file's next sync: one heap commit per sync with all of that file's
//! staged changes and nothing of any other file ([`core::Core::sync`]). Namespace operations
//! are durable when they return. The last release of a file without a sync discards its staged
//! changes (`--commit-on-close` commits them instead). See the README's "Mount" section.
//!
//! The modules, one concern each:
//! - [`layout`]: the file system's format inside the heap, and the operations that commit;
//! - [`staging`]: unsynced data per inode, in memory, bounded;
//! - [`core`]: what each request does (open counts, sync, release, discard);
//! - [`fs`]: the FUSE request handlers (fuser), forwarding to the store thread;
//! - [`power_loss`]: the crash explorer driving [`core`] over a store on simulated storage;
//! - this file: mounting, the daemon's life (signals, unmount, background start) and `famsd umount`.
//!
//! Threads: fuser reads requests on two threads; one store thread owns the heap and executes
//! every request in arrival order (the heap is single-threaded) without waiting for the disk: its
//! commits are written by the heap's log writer, and answers that promise durability (syncs,
//! namespace operations) are sent by a durability thread once their commit is durable, so other
//! requests go on meanwhile and concurrent syncs share device writes; a signal thread unmounts
//! on SIGTERM/SIGINT/SIGHUP.

pub mod core;
pub mod daemon;
pub mod fs;
pub mod layout;
pub mod power_loss;
pub mod staging;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    /// Use this redo log instead of the one recorded in the heap.
    pub log: Option<PathBuf>,
    pub commit_on_close: bool,
    /// Bytes of unsynced pages all files together may hold.
    pub staging_max_bytes: u64,
    /// Background mode: append the daemon's log here.
    pub log_file: Option<PathBuf>,
}

impl MountArgs {
    /// `store` at `mountpoint` with the defaults of `famsd mount`: its own log, unsynced changes
    /// discarded at the last close, 512 MiB of staging, the daemon's log to stderr.
    pub fn new(store: &Path, mountpoint: &Path) -> MountArgs {
        MountArgs {
            store: store.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            log: None,
            commit_on_close: false,
            staging_max_bytes: 512 << 20,
            log_file: None,
        }
    }
}

/// Threads reading requests from the kernel.
const FUSE_THREADS: usize = 2;

/// The line `famsd mount --foreground` prints on stdout once the file system is mounted.
pub const READY_PREFIX: &str = "famsd: mounted ";

/// What /proc/self/mountinfo says is mounted at a path (the last mount there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// E.g. `fuse`, `ext4`.
    pub fstype: String,
    /// The minor device number: for a FUSE mount, its connection number under
    /// `/sys/fs/fuse/connections/`.
    pub minor: Option<u32>,
}

/// Where a mount point stands, from /proc/self/mountinfo — never asking the file system itself,
/// which may be dead or hung (so only the parent directory is canonicalized).
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    let want = match (
        path.parent()
            .and_then(|p| std::fs::canonicalize(if p.as_os_str().is_empty() { Path::new(".") } else { p }).ok()),
        path.file_name(),
    ) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    };
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "36 25 0:32 / /mnt/point rw,… - fuse famsd rw,…"
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|w| *w == "-")?;
            let fstype = f.get(sep + 1)?.to_string();
            let point = f.get(4)?.replace("\\040", " ");
            let minor = f.get(2).and_then(|d| d.split_once(':')).and_then(|(_, m)| m.parse().ok());
            (Path::new(&point) == want).then_some(MountEntry { fstype, minor })
        })
        .next_back()
}

fn mount_at(path: &Path) -> Option<String> {
    mount_entry(path).map(|m| m.fstype)
}

fn check_mountpoint(mp: &Path) -> Result<(), String> {
    if let Some(fstype) = mount_at(mp) {
        return Err(match std::fs::metadata(mp) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => format!(
                "{}: a famsd mount whose daemon is gone (ENOTCONN) is still there; run `famsd umount {}` first",
                mp.display(),
                mp.display()
            ),
            _ => format!("{}: already a mount point ({fstype}); unmount it first", mp.display()),
        });
    }
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{}: the mount point is not a directory", mp.display())),
        Err(e) => Err(format!("{}: the mount point: {e}", mp.display())),
    }
}

/// Mount and serve until unmounted (or SIGTERM/SIGINT/SIGHUP). Prints [`READY_PREFIX`]… on
/// stdout once mounted.
pub fn run_foreground(args: &MountArgs) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    check_mountpoint(&args.mountpoint)?;
    // Signals are taken by the signal thread only: block them before any thread starts.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| format!("blocking signals: {e}"))?;

    // The durability thread answers requests that promise durability once their commit is
    // durable (in commit order), so that the store thread never waits for the disk.
    let (durable_tx, durable_rx) = std::sync::mpsc::channel::<core::Deferred>();
    let durability_thread = std::thread::Builder::new()
        .name("famsd-durable".into())
        .spawn(move || {
            for (handle, ticket, answer) in durable_rx {
                answer(
                    handle.wait(ticket).map_err(|e| layout::Fail::Io(format!("a commit did not become durable: {e}"))),
                );
            }
        })
        .map_err(|e| format!("starting the durability thread: {e}"))?;
    // The store thread opens the heap (it must live on one thread) and reports how that went.
    let (tx, rx) = std::sync::mpsc::channel::<fs::Job>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (store, log, on_close, staging_max) = (
        args.store.clone(),
        args.log.clone(),
        if args.commit_on_close { core::OnClose::Commit } else { core::OnClose::Discard },
        args.staging_max_bytes,
    );
    let store_thread = std::thread::Builder::new()
        .name("famsd-store".into())
        .spawn(move || {
            let mut c = match layout::Store::open(&store, log) {
                Ok(s) => {
                    let _ = opened_tx.send(Ok(()));
                    let mut c = core::Core::new(s, staging_max, on_close);
                    c.send_durable_answers_to(durable_tx);
                    c
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            for job in rx {
                job(&mut c);
            }
            c.shutdown();
        })
        .map_err(|e| format!("starting the store thread: {e}"))?;
    match opened_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = store_thread.join();
            let _ = durability_thread.join();
            return Err(e);
        }
        Err(_) => return Err("the store thread ended while opening the store".into()),
    }

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(args.store.display().to_string()),
        fuser::MountOption::Subtype("famsd".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    // Requests are read and decoded on two threads (executed in order on the store thread).
    config.n_threads = Some(FUSE_THREADS);
    let session = match fuser::Session::new(fs::MountFs::new(tx), &args.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            // The file system (and its sender) is dropped: the store thread ends and closes the heap.
            let _ = store_thread.join();
            let _ = durability_thread.join();
            return Err(format!("mounting FUSE at {}: {e}", args.mountpoint.display()));
        }
    };
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    let mp = args.mountpoint.clone();
    std::thread::Builder::new()
        .name("famsd-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig:?}: unmounting {}", mp.display());
                if let Err(e) = unmounter.unmount() {
                    tracing::warn!(
                        "unmounting {}: {e}; detaching it (it goes once the files open in it are closed)",
                        mp.display()
                    );
                    let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    tracing::info!(
        "mounted {} at {} ({}; unsynced data per file at most {} bytes in all)",
        args.store.display(),
        args.mountpoint.display(),
        if args.commit_on_close { "commit on close" } else { "unsynced changes discarded at the last close" },
        args.staging_max_bytes
    );
    println!("{READY_PREFIX}{} at {}", args.store.display(), args.mountpoint.display());
    let _ = std::io::stdout().flush();
    let r = session.run().map_err(|e| format!("serving {}: {e}", args.mountpoint.display()));
    // The session (and the file system's sender) is gone: the store thread drains and closes.
    let _ = store_thread.join();
    // Its last answers: the store (and with it the sender) is gone, so the thread ends.
    let _ = durability_thread.join();
    tracing::info!("unmounted {}", args.mountpoint.display());
    r
}

/// Start the daemon in the background (`famsd mount` without `--foreground`): run this program
/// again with `--foreground` in its own process group, its log appended to `log_file`, and
/// return once it has mounted (or say why it could not).
pub fn run_background(args: &MountArgs, log_file: &Path) -> Result<(), String> {
    let child = daemon::spawn_background(args, log_file)?;
    println!(
        "mounted {} at {} (daemon pid {}, log {})",
        args.store.display(),
        args.mountpoint.display(),
        child.id(),
        log_file.display()
    );
    Ok(())
}

/// `famsd umount MOUNTPOINT`: unmount; a mount whose daemon is gone (ENOTCONN) or, with `lazy`,
/// a busy one is detached lazily. Unprivileged users go through `fusermount3 -u`.
pub fn umount(mp: &Path, lazy: bool) -> Result<String, String> {
    use nix::mount::{umount2, MntFlags};
    let Some(fstype) = mount_at(mp) else {
        return Err(format!("{}: nothing is mounted there", mp.display()));
    };
    if !fstype.starts_with("fuse") {
        return Err(format!("{}: not a famsd mount (it is {fstype})", mp.display()));
    }
    let dead = matches!(std::fs::metadata(mp), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    let flags = if dead || lazy { MntFlags::MNT_DETACH } else { MntFlags::empty() };
    match umount2(mp, flags) {
        Ok(()) if dead => Ok(format!(
            "{}: its daemon was gone (ENOTCONN); detached. Unsynced changes were lost, synced ones are in the store: mount it again",
            mp.display()
        )),
        Ok(()) if lazy => Ok(format!("{}: detached (it goes once the files open in it are closed)", mp.display())),
        Ok(()) => Ok(format!("{}: unmounted", mp.display())),
        Err(nix::errno::Errno::EBUSY) => Err(format!(
            "{}: busy (files are open in it); close them, or `famsd umount --lazy` to detach it now",
            mp.display()
        )),
        Err(nix::errno::Errno::EPERM) => {
            let mut cmd = Command::new("fusermount3");
            cmd.arg("-u");
            if dead || lazy {
                cmd.arg("-z");
            }
            let out = cmd.arg(mp).output().map_err(|e| {
                format!("{}: not permitted, and fusermount3 (package fuse3) could not run: {e}", mp.display())
            })?;
            if out.status.success() {
                Ok(format!("{}: unmounted (fusermount3)", mp.display()))
            } else {
                Err(format!("{}: fusermount3 -u: {}", mp.display(), String::from_utf8_lossy(&out.stderr).trim()))
            }
        }
        Err(e) => Err(format!("{}: unmounting: {e}", mp.display())),
    }
}
