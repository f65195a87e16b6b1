//! `famsd mount`: failure-atomic fsync/msync for unmodified programs, tested through real
//! clients (std::fs, Python's `mmap` and `os` modules) on a real FUSE mount, with SIGKILLs of
//! the clients and of the daemon itself.
//!
//! Needs root (the daemon mounts with mount(2)) and /dev/fuse; where every test must run (CI,
//! or FAMS_REQUIRE_ROOT_TESTS) a missing one fails instead of skipping. Every step that waits on
//! the FUSE daemon runs under the FUSE watchdog (`fams_tests::fuse_disk::Watchdog`), which aborts
//! a wedged connection so that the test fails instead of hanging; every wait has a deadline.

use fams_tests::famsd_mount::{can_mount, famsd, format_store, generation_of, MmapWriters, Mounted, PAGE, PATIENCE};
use fams_tests::fuse_disk::{fuse_connection_of, Watchdog};
use fams_tests::{note_violation, skip, ChildProc, Rng, TempDir};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn file_system_operations_and_what_survives_a_remount() {
    if !can_mount() {
        return;
    }
    let famsd = famsd();
    let dir = TempDir::new("mount-basic");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "8M", Some("1G"));
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    let big = pattern(300_000, 1);
    m.watch("file system operations", || {
        // create, write, fsync, read back
        std::fs::create_dir(m.path("dir")).unwrap();
        write_synced(&m.path("dir/f1"), b"one").unwrap();
        assert_eq!(std::fs::read(m.path("dir/f1")).unwrap(), b"one");
        write_synced(&m.path("big"), &big).unwrap();
        assert_eq!(std::fs::read(m.path("big")).unwrap(), big);
        // rename, readdir
        std::fs::rename(m.path("dir/f1"), m.path("f1b")).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(&m.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["big", "dir", "f1b"]);
        assert_eq!(std::fs::read_dir(m.path("dir")).unwrap().count(), 0);
        // unlink, mkdir, rmdir
        write_synced(&m.path("gone"), b"x").unwrap();
        std::fs::remove_file(m.path("gone")).unwrap();
        assert!(!m.path("gone").exists());
        std::fs::create_dir(m.path("dir/sub")).unwrap();
        std::fs::remove_dir(m.path("dir/sub")).unwrap();
        std::fs::write(m.path("dir/x"), b"").unwrap();
        let e = std::fs::remove_dir(m.path("dir")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}");
        assert_eq!(std::fs::remove_file(m.path("nothing")).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        // truncate and extend, synced
        let f = std::fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
        f.set_len(100_000).unwrap();
        f.sync_all().unwrap();
        f.set_len(200_000).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let b = std::fs::read(m.path("big")).unwrap();
        assert_eq!(b.len(), 200_000);
        assert_eq!(&b[..100_000], &big[..100_000]);
        assert!(b[100_000..].iter().all(|&x| x == 0), "extended bytes read as zero");
        // stat, chmod (durable at once)
        std::fs::set_permissions(m.path("f1b"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let md = std::fs::metadata(m.path("f1b")).unwrap();
        assert_eq!((md.len(), md.permissions().mode() & 0o777, md.is_file()), (3, 0o600, true));
        assert!(std::fs::metadata(m.path("dir")).unwrap().is_dir());
    });
    // Unsynced changes: visible while open, gone at the last close.
    m.watch("unsynced changes", || {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(m.path("f1b")).unwrap();
        f.write_all_at(b"UNSYNCED", 0).unwrap();
        assert_eq!(std::fs::read(m.path("f1b")).unwrap(), b"UNSYNCED", "staged data is seen while the file is open");
        assert!(m.status("f1b").contains("staged_pages=1"), "{}", m.status("f1b"));
        drop(f);
        m.wait_closed("f1b").unwrap();
        assert_eq!(std::fs::read(m.path("f1b")).unwrap(), b"one", "discarded at the last close");
        std::fs::write(m.path("fresh"), b"never synced").unwrap(); // cp/echo-like: no fsync
        m.wait_closed("fresh").unwrap();
        assert_eq!(std::fs::read(m.path("fresh")).unwrap(), b"", "the name is durable, the data was discarded");
    });
    // An unsynced change still open when the file system is unmounted... (the test closes it
    // first: a busy mount does not unmount) — and one left staged on a file that stays open
    // until the daemon is killed.
    let f = std::fs::OpenOptions::new().write(true).open(m.path("big")).unwrap();
    m.watch("an unsynced write", || f.write_all_at(b"LOST", 0).unwrap());
    m.kill_daemon();
    drop(f);
    m.unmount().unwrap();
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    m.watch("checking after a remount", || {
        assert_eq!(std::fs::read(m.path("f1b")).unwrap(), b"one");
        assert_eq!(std::fs::metadata(m.path("f1b")).unwrap().permissions().mode() & 0o777, 0o600);
        let b = std::fs::read(m.path("big")).unwrap();
        assert_eq!((b.len(), &b[..100_000]), (200_000, &big[..100_000]));
        assert!(b[100_000..].iter().all(|&x| x == 0));
        assert!(m.path("dir/x").exists() && !m.path("gone").exists() && !m.path("dir/f1").exists());
        assert_eq!(std::fs::read(m.path("fresh")).unwrap(), b"");
    });
    m.unmount().unwrap();
    // --commit-on-close: tools that never fsync keep what they wrote.
    let mut m = Mounted::start(&famsd, &store, &mp, &["--commit-on-close"]).unwrap();
    m.watch("commit on close", || std::fs::write(m.path("copied"), b"kept by close").unwrap());
    m.unmount().unwrap();
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    m.watch("after commit on close", || assert_eq!(std::fs::read(m.path("copied")).unwrap(), b"kept by close"));
    m.unmount().unwrap();
}

/// Two files written alternately, only A synced: whoever dies — the writer or the daemon —
/// B's staged changes are gone and A holds its last synced state.
#[test]
fn a_sync_of_one_file_never_makes_another_durable() {
    if !can_mount() {
        return;
    }
    const WRITER: &str = r#"
import os, sys
a = os.open(sys.argv[1], os.O_RDWR); b = os.open(sys.argv[2], os.O_RDWR)
for g in range(1, int(sys.argv[3]) + 1):
    os.pwrite(a, b"A%06d" % g * 1000, 0); os.fsync(a)
    os.pwrite(b, b"B%06d" % g * 1000, 0)
print("done", flush=True)
sys.stdin.read()
"#;
    let famsd = famsd();
    let dir = TempDir::new("mount-per-file");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "8M", Some("1G"));
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    let initial_b = b"B000000".repeat(1000);
    m.watch("setup", || {
        write_synced(&m.path("a"), &b"A000000".repeat(1000)).unwrap();
        write_synced(&m.path("b"), &initial_b).unwrap();
    });
    for kill_daemon in [false, true] {
        let n = 20;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(WRITER)
            .arg(m.path("a"))
            .arg(m.path("b"))
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut writer = ChildProc::new(&child);
        let mut line = String::new();
        m.watch("the writer", || BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap());
        assert_eq!(line.trim(), "done");
        let staged_b = format!("B{n:06}").repeat(1000).into_bytes();
        m.watch("reading B while staged", || assert_eq!(std::fs::read(m.path("b")).unwrap(), staged_b));
        if kill_daemon {
            m.kill_daemon();
            writer.kill();
            drop(child);
            m.unmount().unwrap();
            m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
        } else {
            writer.kill();
            drop(child);
            m.wait_closed("a").unwrap();
            m.wait_closed("b").unwrap();
        }
        m.watch("checking", || {
            let a = std::fs::read(m.path("a")).unwrap();
            assert_eq!(
                a,
                format!("A{n:06}").repeat(1000).into_bytes(),
                "A: its last sync (daemon killed: {kill_daemon})"
            );
            let b = std::fs::read(m.path("b")).unwrap();
            assert!(
                b == initial_b,
                "B was never synced, yet holds {:?}… (daemon killed: {kill_daemon})",
                &b[..14.min(b.len())]
            );
        });
    }
    m.unmount().unwrap();
}

/// Python's mmap (the workload of `fams_tests::famsd_mount::MmapWriters`): a child maps a file
/// MAP_SHARED and applies updates that each write one generation number into every other page
/// (so the kernel writes the dirty pages back as many separate WRITEs), with `flush()`
/// (msync(MS_SYNC)) after each, acknowledging each generation once flush returned. It is
/// SIGKILLed at a random moment; in every other cycle the daemon is SIGKILLed first (often
/// mid-msync), then the writer, and the store is mounted again. After each kill the file must
/// hold exactly one generation — all written pages the same number, the other pages zero — and
/// never an older one than the last acknowledged.
///
/// The writers are forked by one long-lived Python process, which reaps each killed writer and
/// says so, so every acknowledgement of a writer is read before the cycle is checked.
#[test]
fn python_mmap_survives_sigkill_of_the_writer_and_of_the_daemon() {
    if !can_mount() {
        return;
    }
    let kills_wanted: u64 = std::env::var("FAMS_MOUNT_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let budget =
        Duration::from_secs(std::env::var("FAMS_MOUNT_KILL_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(75));
    let npages = 32usize;
    let famsd = famsd();
    let dir = TempDir::new("mount-mmap");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "16M", Some("1G"));
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    m.watch("setup", || {
        let f = std::fs::File::create(m.path("m")).unwrap();
        f.set_len((npages * PAGE) as u64).unwrap();
        f.sync_all().unwrap();
    });
    let mut writers = MmapWriters::start(&m.path("m"), npages).unwrap();
    let mut rng = Rng::new(0x6d6d6170);
    let started = Instant::now();
    let (mut kills, mut daemon_kills, mut violations, mut details) = (0u64, 0u64, 0u64, Vec::new());
    let (mut acked_total, mut in_flight_kept, mut no_ack_cycles) = (0u64, 0u64, 0u64);
    let mut verified = 0u64; // the generation the file held after the last kill
    while kills < kills_wanted && started.elapsed() < budget {
        let kill_daemon = kills % 2 == 1;
        let pid = writers.go(verified).unwrap_or_else(|e| panic!("cycle {kills}: {e}"));
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        if kill_daemon {
            m.kill_daemon();
            std::thread::sleep(Duration::from_micros(rng.below(3_000)));
            daemon_kills += 1;
        }
        // Every acknowledgement the writer printed (only after flush() returned), up to its death.
        let acked = writers.kill(pid).unwrap_or_else(|e| panic!("cycle {kills}: {e}")).acked;
        kills += 1;
        if acked.is_none() {
            no_ack_cycles += 1;
        }
        acked_total += acked.map_or(0, |a| a.saturating_sub(verified));
        let floor = acked.unwrap_or(verified).max(verified);
        if kill_daemon {
            m.unmount().unwrap_or_else(|e| panic!("cycle {kills}: cleaning up after the daemon's death: {e}"));
            m = Mounted::start(&famsd, &store, &mp, &[]).unwrap_or_else(|e| panic!("cycle {kills}: remount: {e}"));
        } else {
            m.wait_closed("m").unwrap_or_else(|e| panic!("cycle {kills}: {e}"));
        }
        let data = m.watch("reading the file", || std::fs::read(m.path("m")).unwrap());
        // Exactly one generation, never older than acknowledged, never newer than written.
        let what = match generation_of(&data, npages) {
            Err(w) => Err(w),
            Ok(g) if g < floor => Err(format!("generation {g}, older than the last acknowledged {floor}")),
            Ok(g) if g > floor + 1 => {
                Err(format!("generation {g}, newer than any written (last acknowledged {floor})"))
            }
            Ok(g) => Ok(g),
        };
        match what {
            Err(w) => {
                let msg = format!(
                    "cycle {kills} ({}): {w}",
                    if kill_daemon { "daemon and writer killed" } else { "writer killed" }
                );
                eprintln!("VIOLATION {msg}");
                note_violation(&mut violations, &mut details, msg);
                let g = u64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
                verified = floor.max(g.min(u64::MAX / 2));
            }
            Ok(g) => {
                if g == floor + 1 {
                    in_flight_kept += 1; // committed, killed before the acknowledgement
                }
                verified = g;
            }
        }
    }
    drop(writers);
    m.unmount().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "kills": kills, "daemon_kills": daemon_kills, "writer_only_kills": kills - daemon_kills,
        "violations": violations, "acknowledged_generations": acked_total,
        "committed_but_unacknowledged": in_flight_kept, "cycles_without_an_acknowledgement": no_ack_cycles,
        "last_generation": verified, "seconds": secs,
    });
    println!("mount mmap SIGKILL: {report}");
    assert_eq!(violations, 0, "{details:#?}\n{report}");
    assert!(kills >= 20, "only {kills} kills in {secs:.0} s: {report}");
    assert!(daemon_kills * 2 >= kills, "{report}");
    assert!(acked_total > 0, "the writer never got an acknowledgement: {report}");
}

/// Bad input: not a store, a mount point that is not a directory or is already mounted, a
/// store too small for a file: clear errors, nothing lost.
#[test]
fn bad_stores_and_mount_points_and_a_full_store_give_clear_errors() {
    if !can_mount() {
        return;
    }
    let famsd = famsd();
    let dir = TempDir::new("mount-bad");
    let mp = dir.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(&famsd).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Not a heap.
    let junk = dir.join("junk");
    std::fs::write(&junk, pattern(1 << 16, 3)).unwrap();
    let (ok, err) = run(&["mount".as_ref(), junk.as_os_str(), mp.as_os_str(), "--foreground".as_ref()]);
    assert!(!ok && err.contains("cannot open the store"), "{err}");
    assert!(fuse_connection_of(&mp).is_none(), "nothing was mounted");
    // The mount point is a file.
    let store = dir.join("small.heap");
    format_store(&store, "2M", None); // cannot grow
    let (ok, err) = run(&["mount".as_ref(), store.as_os_str(), junk.as_os_str(), "--foreground".as_ref()]);
    assert!(!ok && err.contains("not a directory"), "{err}");
    // Already mounted.
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    let other = dir.join("other.heap");
    format_store(&other, "2M", None);
    let (ok, err) = run(&["mount".as_ref(), other.as_os_str(), mp.as_os_str(), "--foreground".as_ref()]);
    assert!(!ok && err.contains("already a mount point"), "{err}");
    // The same store twice: the heap is locked.
    let mp2 = dir.join("mnt2");
    std::fs::create_dir_all(&mp2).unwrap();
    let (ok, err) = run(&["mount".as_ref(), store.as_os_str(), mp2.as_os_str(), "--foreground".as_ref()]);
    assert!(!ok && err.contains("cannot open the store"), "{err}");
    // A full store: the sync fails with ENOSPC, commits nothing, and the file keeps its
    // last synced content.
    m.watch("filling the store", || {
        write_synced(&m.path("keep"), b"kept").unwrap();
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(m.path("huge")).unwrap();
        f.write_all(&pattern(8 << 20, 4)).unwrap();
        let e = f.sync_all().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        // Past the largest file size the mount takes (2^50 bytes).
        let e = f.write_all_at(b"x", 1 << 51).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    });
    m.unmount().unwrap();
    // A sync larger than the store's log (16 MiB here): ENOSPC too, nothing committed.
    let roomy = dir.join("roomy.heap");
    format_store(&roomy, "8M", Some("1G"));
    let mut r = Mounted::start(&famsd, &roomy, &mp2, &[]).unwrap();
    r.watch("a sync larger than the log", || {
        let mut f = std::fs::File::create(r.path("large")).unwrap();
        f.write_all(&pattern(20 << 20, 5)).unwrap();
        let e = f.sync_all().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        f.set_len(1 << 20).unwrap();
        f.sync_all().unwrap(); // a smaller one then fits
    });
    r.unmount().unwrap();
    let mut r = Mounted::start(&famsd, &roomy, &mp2, &[]).unwrap();
    r.watch("after the sync larger than the log", || {
        assert!(std::fs::read(r.path("large")).unwrap() == pattern(20 << 20, 5)[..1 << 20]);
    });
    r.unmount().unwrap();
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    m.watch("after the full store", || {
        assert_eq!(std::fs::read(m.path("keep")).unwrap(), b"kept");
        assert_eq!(std::fs::metadata(m.path("huge")).unwrap().len(), 0);
    });
    m.unmount().unwrap();
    // famsd umount of something that is not mounted.
    let (ok, err) = run(&["umount".as_ref(), mp.as_os_str()]);
    assert!(!ok && err.contains("nothing is mounted"), "{err}");
}

/// Without `--foreground`, `famsd mount` returns once the daemon has mounted; SIGTERM makes
/// the daemon unmount and end; after a SIGKILL the mount point answers ENOTCONN until
/// `famsd umount` detaches it, and the store mounts again with everything synced.
#[test]
fn a_background_daemon_stops_on_sigterm_and_a_dead_one_is_cleaned_up() {
    if !can_mount() {
        return;
    }
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let famsd = famsd();
    let dir = TempDir::new("mount-background");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "8M", Some("1G"));
    std::fs::create_dir_all(&mp).unwrap();
    let start = || -> (i32, Watchdog) {
        let out = Command::new(&famsd).arg("mount").arg(&store).arg(&mp).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        let pid: i32 = text
            .split("daemon pid ")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no daemon pid in {text:?}"));
        let wd = Watchdog::new();
        wd.set_target(fuse_connection_of(&mp), Some(pid as u32));
        (pid, wd)
    };
    let gone = |pid: i32| {
        let deadline = Instant::now() + PATIENCE;
        while kill(Pid::from_raw(pid), None).is_ok() {
            assert!(Instant::now() < deadline, "daemon {pid} still there after {} s", PATIENCE.as_secs());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (pid, wd) = start();
    wd.watch("writing", PATIENCE, || write_synced(&mp.join("f"), b"background").unwrap()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    gone(pid);
    assert!(fuse_connection_of(&mp).is_none(), "SIGTERM unmounted");
    let log = std::fs::read_to_string(dir.join("files.heap.mount.log")).unwrap();
    assert!(log.contains("SIGTERM: unmounting"), "{log}");
    // A daemon that dies: ENOTCONN, then famsd umount, then a new mount.
    let (pid, _wd) = start();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    gone(pid);
    let e = std::fs::metadata(&mp).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let out = Command::new(&famsd).arg("mount").arg(&store).arg(&mp).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("famsd umount"));
    let out = Command::new(&famsd).arg("umount").arg(&mp).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("daemon was gone"), "{out:?}");
    let (pid, wd) = start();
    wd.watch("reading", PATIENCE, || assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"background")).unwrap();
    let out = Command::new(&famsd).arg("umount").arg(&mp).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    gone(pid);
}

/// Dirty mapped pages the kernel writes back on its own (here forced with sync(2), as its
/// ~30 s background writeback would) reach the daemon as WRITEs but are only staged: killing
/// the program — or the daemon — leaves the file at its last msync.
#[test]
fn pages_written_back_without_msync_never_become_durable() {
    if !can_mount() {
        return;
    }
    const WRITER: &str = r#"
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mm = mmap.mmap(fd, 8 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
mm[:] = b"S" * (8 * 4096); mm.flush()
mm[:] = b"U" * (8 * 4096)
os.sync()
print("done", flush=True)
sys.stdin.read()
"#;
    let famsd = famsd();
    let dir = TempDir::new("mount-writeback");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "8M", Some("1G"));
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    m.watch("setup", || {
        let f = std::fs::File::create(m.path("w")).unwrap();
        f.set_len(8 * PAGE as u64).unwrap();
        f.sync_all().unwrap();
    });
    for kill_daemon in [false, true] {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(WRITER)
            .arg(m.path("w"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut writer = ChildProc::new(&child);
        let mut line = String::new();
        m.watch("the writer", || BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap());
        assert_eq!(line.trim(), "done");
        let status = m.status("w");
        assert!(status.contains("staged_pages=8"), "sync(2) wrote the dirty pages back to the daemon: {status}");
        if kill_daemon {
            m.kill_daemon();
            writer.kill();
            drop(child);
            m.unmount().unwrap();
            m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
        } else {
            writer.kill();
            drop(child);
            m.wait_closed("w").unwrap();
        }
        let data = m.watch("reading", || std::fs::read(m.path("w")).unwrap());
        assert!(data == b"S".repeat(8 * PAGE), "not the msynced content (daemon killed: {kill_daemon})");
    }
    m.unmount().unwrap();
}

/// A Python program that runs SQLite (`journal_mode=OFF`, `synchronous=FULL`) on one database:
/// `setup` (re)creates it, `go` forks a writer that commits transactions of `rows` rows of
/// `blob`-byte values forever and prints each committed transaction's number, `reap` waits for a
/// killed writer, `check` opens the database in a fresh process and reports what it holds.
const SQLITE_PROGRAM: &str = r#"
import os, sqlite3, sys
path, rows, blob = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def connect():
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF"); db.execute("PRAGMA synchronous=FULL")
    return db
def writer():
    db = connect()
    n = db.execute("SELECT last FROM meta").fetchone()[0] + 1
    os.write(1, b"start\n")
    while True:
        db.execute("BEGIN")
        for k in range(rows):
            db.execute("INSERT INTO t VALUES (?, ?, ?)", (n, k, bytes([n % 251]) * blob))
        db.execute("UPDATE meta SET last = ?", (n,))
        db.execute("COMMIT")
        os.write(1, b"%d\n" % n)
        n += 1
def check():
    try:
        db = connect()
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        last = db.execute("SELECT last FROM meta").fetchone()[0]
        bad = db.execute("SELECT count(*) FROM (SELECT txn, count(*) AS c, min(length(v)) AS l, max(length(v)) AS h, count(DISTINCT v) AS d FROM t GROUP BY txn HAVING c != ? OR l != ? OR h != ? OR d != 1)", (rows, blob, blob)).fetchone()[0]
        txns, hi = db.execute("SELECT count(DISTINCT txn), coalesce(max(txn), 0) FROM t").fetchone()
        db.close()
        os.write(1, ("check %s last=%d txns=%d max=%d bad=%d\n" % (ok.replace(" ", "_"), last, txns, hi, bad)).encode())
    except Exception as e:
        os.write(1, ("check error %s\n" % str(e).replace("\n", " ")).encode())
def forked(f):
    pid = os.fork()
    if pid == 0:
        try:
            f()
        finally:
            os._exit(1)
    return pid
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "setup":
        if os.path.exists(path):
            os.remove(path)
        db = connect()
        db.execute("CREATE TABLE t (txn INTEGER, k INTEGER, v BLOB)")
        db.execute("CREATE TABLE meta (last INTEGER)")
        db.execute("INSERT INTO meta VALUES (0)")
        db.close()
        os.write(1, b"ready\n")
    elif cmd == "go":
        os.write(1, b"pid %d\n" % forked(writer))
    elif cmd == "reap":
        os.waitpid(int(arg), 0)
        os.write(1, b"dead %s\n" % arg.encode())
    elif cmd == "check":
        os.waitpid(forked(check), 0)
"#;

/// What `check` found after a kill.
enum SqliteOutcome {
    /// `integrity_check` ok and exactly the transactions up to one at or after the last
    /// acknowledged, each complete: the number of the last one.
    Whole(u64),
    /// `integrity_check` ok but not a committed state (a partial or missing transaction, or
    /// older than the last acknowledged).
    Torn,
    /// `integrity_check` fails or the database cannot be read.
    Corrupt,
}

/// [`SQLITE_PROGRAM`] running on `db`, its output read line by line with a deadline.
struct SqliteProgram {
    to: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    _proc: ChildProc,
}

impl SqliteProgram {
    fn start(db: &Path, rows: usize, blob: usize) -> SqliteProgram {
        let mut child = Command::new("python3")
            .arg("-S")
            .arg("-c")
            .arg(SQLITE_PROGRAM)
            .arg(db)
            .arg(rows.to_string())
            .arg(blob.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let proc = ChildProc::new(&child);
        let to = child.stdin.take().unwrap();
        let from = child.stdout.take().unwrap();
        drop(child);
        let (line_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(from).lines().map_while(Result::ok) {
                if line_tx.send(l).is_err() {
                    return;
                }
            }
        });
        SqliteProgram { to, lines, _proc: proc }
    }

    fn line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("waiting for the Python SQLite program ({what}): {e}"))
    }

    /// Creates a fresh database (removing any old one).
    fn setup(&mut self) {
        writeln!(self.to, "setup -").unwrap();
        assert_eq!(self.line("setup"), "ready");
    }

    /// Starts a writer; returns its pid once it writes, and the last transaction it acknowledged.
    fn go(&mut self) -> (i32, Option<u64>) {
        writeln!(self.to, "go -").unwrap();
        let (mut pid, mut writing, mut acked) = (None, false, None::<u64>);
        while pid.is_none() || !writing {
            let l = self.line("start");
            if let Some(p) = l.strip_prefix("pid ") {
                pid = p.parse::<i32>().ok();
            } else if l == "start" {
                writing = true;
            } else if let Ok(g) = l.parse::<u64>() {
                acked = Some(g);
            } else {
                panic!("the SQLite program said {l:?}");
            }
        }
        (pid.unwrap(), acked)
    }

    /// SIGKILLs the writer `pid` (which may already be dead) and reaps it; returns the last
    /// transaction acknowledged, `acked` if none after it.
    fn kill(&mut self, pid: i32, mut acked: Option<u64>) -> Option<u64> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        writeln!(self.to, "reap {pid}").unwrap();
        loop {
            let l = self.line("reaping");
            if l == format!("dead {pid}") {
                return acked;
            }
            if let Ok(g) = l.parse::<u64>() {
                acked = Some(g);
            }
        }
    }

    /// Opens the database in a fresh process and classifies it against `floor`, the last
    /// transaction acknowledged; also returns the program's report.
    fn check(&mut self, floor: u64) -> (SqliteOutcome, String) {
        writeln!(self.to, "check -").unwrap();
        let check = self.line("check");
        let field = |k: &str| -> u64 {
            check.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
        };
        let (last, txns, max, bad) = (field("last="), field("txns="), field("max="), field("bad="));
        let outcome = if !check.starts_with("check ok ") {
            SqliteOutcome::Corrupt
        } else if bad == 0 && last == txns && last == max && last >= floor && last <= floor + 1 {
            SqliteOutcome::Whole(last)
        } else {
            SqliteOutcome::Torn
        };
        (outcome, check)
    }
}

/// SQLite (Python's `sqlite3`) with `journal_mode=OFF`, `synchronous=FULL` on the mount: with no
/// journal, SQLite's only protection is the file system's — each COMMIT writes its pages and
/// fsyncs once, so the mount's sync must make the whole transaction durable or none of it.
/// Transactions of many rows are killed at random (in every other cycle the daemon first);
/// after each kill `PRAGMA integrity_check` must say ok and the database must hold exactly the
/// transactions up to one at or after the last acknowledged, each complete.
#[test]
fn sqlite_without_a_journal_keeps_whole_transactions() {
    if !can_mount() {
        return;
    }
    let kills_wanted: u64 = std::env::var("FAMS_MOUNT_SQLITE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let rows = 40;
    let famsd = famsd();
    let dir = TempDir::new("mount-sqlite");
    let (store, mp) = (dir.join("files.heap"), dir.join("mnt"));
    format_store(&store, "16M", Some("1G"));
    let mut m = Mounted::start(&famsd, &store, &mp, &[]).unwrap();
    let mut sqlite = SqliteProgram::start(&m.path("db.sqlite"), rows, 200);
    sqlite.setup();
    let mut rng = Rng::new(0x5117e);
    let started = Instant::now();
    let (mut kills, mut daemon_kills, mut violations, mut details) = (0u64, 0u64, 0u64, Vec::new());
    let (mut committed_unacked, mut verified) = (0u64, 0u64);
    while kills < kills_wanted {
        let kill_daemon = kills % 2 == 1;
        let (pid, acked) = sqlite.go();
        std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        if kill_daemon {
            m.kill_daemon();
            daemon_kills += 1;
        }
        let acked = sqlite.kill(pid, acked);
        kills += 1;
        let floor = acked.unwrap_or(verified).max(verified);
        if kill_daemon {
            m.unmount().unwrap_or_else(|e| panic!("cycle {kills}: {e}"));
            m = Mounted::start(&famsd, &store, &mp, &[]).unwrap_or_else(|e| panic!("cycle {kills}: remount: {e}"));
        } else {
            m.wait_closed("db.sqlite").unwrap_or_else(|e| panic!("cycle {kills}: {e}"));
        }
        let (outcome, check) = m.watch("checking the database", || sqlite.check(floor));
        if let SqliteOutcome::Whole(last) = outcome {
            committed_unacked += u64::from(last == floor + 1);
            verified = last;
        } else {
            let msg = format!(
                "cycle {kills} ({}): {check} (last acknowledged {floor})",
                if kill_daemon { "daemon and writer killed" } else { "writer killed" }
            );
            eprintln!("VIOLATION {msg}");
            note_violation(&mut violations, &mut details, msg);
            break; // a damaged database stays damaged: later cycles would only repeat it
        }
    }
    drop(sqlite);
    m.unmount().unwrap();
    let report = serde_json::json!({
        "kills": kills, "daemon_kills": daemon_kills, "violations": violations,
        "transactions": verified, "committed_but_unacknowledged": committed_unacked,
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("mount SQLite SIGKILL: {report}");
    assert_eq!(violations, 0, "{details:#?}\n{report}");
    assert!(verified > 0, "no transaction was ever committed: {report}");
}

/// The same SQLite workload (`journal_mode=OFF`, `synchronous=FULL`) on a plain ext4 directory,
/// without the mount, with large transactions (64 rows of 32 KiB, about 2 MiB each, so the
/// write phase is long): SIGKILLs of the writer at random times must leave at least one torn or
/// corrupt database — the comparison that shows what the mount adds. Each cycle starts from a
/// fresh database; the counts and the rate are printed.
#[test]
fn sqlite_without_a_journal_tears_on_plain_ext4() {
    if Command::new("python3").arg("-c").arg("pass").status().map(|s| !s.success()).unwrap_or(true) {
        skip("the plain-ext4 SQLite comparison needs python3");
        return;
    }
    let dir = TempDir::new("ext4-sqlite");
    let fs = Command::new("stat").args(["-f", "-c", "%T"]).arg(dir.path()).output().expect("stat -f");
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_string();
    if fs != "ext2/ext3" {
        skip(&format!("the plain-ext4 SQLite comparison needs ext4 under /var/tmp, not {fs:?}"));
        return;
    }
    let kills_wanted: u64 = std::env::var("FAMS_EXT4_SQLITE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut sqlite = SqliteProgram::start(&dir.join("db.sqlite"), 64, 32 * 1024);
    let mut rng = Rng::new(0xe4704);
    let started = Instant::now();
    let (mut kills, mut whole, mut torn, mut corrupt, mut transactions) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut examples = Vec::new();
    while kills < kills_wanted {
        sqlite.setup();
        let (pid, acked) = sqlite.go();
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        let floor = sqlite.kill(pid, acked).unwrap_or(0);
        kills += 1;
        let (outcome, check) = sqlite.check(floor);
        match outcome {
            SqliteOutcome::Whole(last) => {
                whole += 1;
                transactions += last;
            }
            SqliteOutcome::Torn => torn += 1,
            SqliteOutcome::Corrupt => corrupt += 1,
        }
        if !matches!(outcome, SqliteOutcome::Whole(_)) && examples.len() < 3 {
            examples.push(format!("cycle {kills}: {check} (last acknowledged {floor})"));
        }
    }
    drop(sqlite);
    let rate = 100.0 * (torn + corrupt) as f64 / kills as f64;
    println!(
        "plain ext4, journal_mode=OFF: {kills} kills, {corrupt} corrupt, {torn} torn ({rate:.1} %), {whole} whole \
         ({transactions} transactions committed) in {:.1} s; e.g. {examples:#?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        torn + corrupt > 0,
        "no torn or corrupt database in {kills} kills on plain ext4: the comparison shows nothing"
    );
}

/// `famsd bench --mount` on a real mount, with 3 updates per row: every row of the report is
/// there with positive samples (SQLite rows included: famsd builds with `baselines` by default),
/// and nothing is left mounted or on disk afterwards. No timing is checked.
#[test]
fn bench_mount_reports_every_row_and_leaves_no_mount_behind() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("mount-bench");
    let started = Instant::now();
    let out = Command::new(famsd())
        .args(["bench", "--mount", "--quick", "--iterations", "3", "--json", "--dir"])
        .arg(dir.path())
        .output()
        .expect("famsd bench --mount");
    eprintln!("famsd bench --mount --quick --iterations 3: {:.1} s", started.elapsed().as_secs_f64());
    // A mount left under the directory is a bug; detach it so the test run is not wedged.
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| Path::new(p).starts_with(dir.path()))
        .collect();
    for p in &left {
        let _ = nix::mount::umount2(Path::new(p), nix::mount::MntFlags::MNT_DETACH);
    }
    assert!(out.status.success(), "famsd bench --mount failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(left.is_empty(), "famsd bench --mount left mounts behind: {left:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("the bench directory").flatten().collect();
    assert!(leftovers.is_empty(), "famsd bench --mount left files behind: {leftovers:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let rows = report["rows"].as_array().expect("rows");
    for key in famsd::mount_bench::ROW_KEYS {
        let row = rows.iter().find(|r| r["key"] == *key).unwrap_or_else(|| panic!("row {key} missing: {report}"));
        assert_eq!(row["samples"], 3, "row {key}: {row}");
        assert!(row["p50_us"].as_f64().is_some_and(|v| v > 0.0), "row {key}: {row}");
    }
    assert_eq!(rows.len(), famsd::mount_bench::ROW_KEYS.len(), "{report}");
    assert!(report["ratios"].as_array().is_some_and(|r| r.len() == 8), "{report}");
}
