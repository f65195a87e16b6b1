//! Tests for the log device. Files go under /var/tmp (disk-backed; O_DIRECT works there).

use super::device::{self, detect_signature};
use super::*;

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

const PATHS: [IoPath; 2] = [IoPath::Uring, IoPath::Sync];
const MODES: [FlushMode; 2] = [FlushMode::Dsync, FlushMode::Fdatasync];

/// A directory removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = if Path::new("/var/tmp").is_dir() { PathBuf::from("/var/tmp") } else { std::env::temp_dir() };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir =
            base.join(format!("fams-io-{tag}-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn opts(io_path: IoPath, flush_mode: FlushMode) -> LogOpenOptions {
    LogOpenOptions { io_path: Some(io_path), flush_mode: Some(flush_mode) }
}

/// An aligned buffer of `len` bytes filled with a pattern derived from `seed`.
fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
    }
    b
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------- AlignedBuf

#[test]
fn aligned_buf_is_aligned_and_zeroed() {
    for len in [4096usize, 8192, 3 * 4096, 1 << 20] {
        let mut b = AlignedBuf::zeroed(len);
        assert_eq!(b.len(), len);
        assert_eq!(b.as_ptr() as usize % 4096, 0, "len {len}: not 4096-aligned");
        assert!(b.iter().all(|&x| x == 0), "len {len}: not zeroed");
        b[len - 1] = 7;
        let c = b.clone();
        assert_eq!(c.as_ptr() as usize % 4096, 0);
        assert!(c[..] == b[..]);
    }
    let empty = AlignedBuf::zeroed(0);
    assert!(empty.is_empty());
    assert_eq!(empty.as_ptr() as usize % 4096, 0);
}

#[test]
#[should_panic(expected = "not a multiple of LOG_ALIGN")]
fn aligned_buf_rejects_unaligned_length() {
    let _ = AlignedBuf::zeroed(100);
}

// ---------------------------------------------------------------- names

#[test]
fn names_and_parsing() {
    assert_eq!(IoPath::Uring.name(), "io_uring");
    assert_eq!(IoPath::Sync.name(), "sync");
    assert_eq!("uring".parse::<IoPath>(), Ok(IoPath::Uring));
    assert_eq!("io_uring".parse::<IoPath>(), Ok(IoPath::Uring));
    assert_eq!("sync".parse::<IoPath>(), Ok(IoPath::Sync));
    assert!("aio".parse::<IoPath>().is_err());
    assert_eq!(FlushMode::Dsync.name(), "dsync");
    assert_eq!(FlushMode::Fdatasync.name(), "fdatasync");
    assert_eq!("dsync".parse::<FlushMode>(), Ok(FlushMode::Dsync));
    assert_eq!("fdatasync".parse::<FlushMode>(), Ok(FlushMode::Fdatasync));
    assert!("fsync".parse::<FlushMode>().is_err());
    assert_eq!(LogKind::File.name(), "file");
    assert_eq!(LogKind::BlockDevice.name(), "block");
    for p in PATHS {
        assert_eq!(p.name().parse::<IoPath>(), Ok(p));
    }
    for m in MODES {
        assert_eq!(m.name().parse::<FlushMode>(), Ok(m));
    }
}

// ---------------------------------------------------------------- files

/// Write two segments, read them back, check stats and the error cases, on an open device.
fn exercise(dev: &mut dyn LogDevice, io_path: IoPath, mode: FlushMode) {
    let ctx = format!("{} {} {}", dev.path().display(), io_path, mode);
    let size = dev.size_bytes();
    let a = pattern(4096, 1);
    let b = pattern(3 * 4096, 2);
    // Like a wrap-around of the circular log: one segment at the end, one at the start.
    let (off_a, off_b) = (size - 4096, 8192);
    dev.write_durable(&[(off_a, &a[..]), (off_b, &b[..])]).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let mut ra = AlignedBuf::zeroed(4096);
    let mut rb = AlignedBuf::zeroed(3 * 4096);
    dev.read_exact_at(off_a, &mut ra).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    dev.read_exact_at(off_b, &mut rb).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert!(ra[..] == a[..], "{ctx}: segment a differs");
    assert!(rb[..] == b[..], "{ctx}: segment b differs");
    // Bytes around the segments are still zero.
    let mut z = AlignedBuf::zeroed(8192);
    dev.read_exact_at(0, &mut z).unwrap();
    assert!(z.iter().all(|&x| x == 0), "{ctx}: bytes before segment b changed");

    let s = dev.stats();
    assert_eq!(s.writes, 2, "{ctx}: {s:?}");
    assert_eq!(s.bytes_written, 4 * 4096, "{ctx}: {s:?}");
    match mode {
        FlushMode::Dsync => assert_eq!((s.dsync_writes, s.fdatasyncs), (2, 0), "{ctx}: {s:?}"),
        FlushMode::Fdatasync => assert_eq!((s.dsync_writes, s.fdatasyncs), (0, 1), "{ctx}: {s:?}"),
    }
    assert_eq!((s.reads, s.bytes_read), (3, 4 * 4096 + 8192), "{ctx}: {s:?}");

    // Misuse: errors, not panics, and no I/O.
    let e = dev.write_durable(&[(100, &a[..])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{ctx}: {e}");
    assert!(e.to_string().contains(&dev.path().display().to_string()), "{ctx}: error must name the path: {e}");
    let e = dev.write_durable(&[(4096, &a[..100])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{ctx}: {e}");
    let e = dev.write_durable(&[(size, &a[..])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{ctx}: {e}");
    let e = dev.write_durable(&[(0, &b[..]), (8192, &a[..])]).unwrap_err();
    assert!(e.to_string().contains("overlap"), "{ctx}: {e}");
    let e = dev.read_exact_at(size - 4096, &mut rb).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{ctx}: {e}");
    let e = dev.read_exact_at(size, &mut ra).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{ctx}: {e}");
    let e = dev.read_exact_at(512, &mut ra).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{ctx}: {e}");
    assert_eq!(dev.stats(), s, "{ctx}: rejected calls must not do I/O");

    // Nothing to write: nothing happens.
    dev.write_durable(&[]).unwrap();
    dev.write_durable(&[(4096, &a[..0])]).unwrap();
    assert_eq!(dev.stats(), s);

    // Misaligned caller memory is bounced through an aligned buffer.
    let mut raw = vec![0u8; 2 * 4096 + 1];
    raw[1..4097].copy_from_slice(&a);
    dev.write_durable(&[(65536, &raw[1..4097])]).unwrap_or_else(|e| panic!("{ctx}: unaligned memory: {e}"));
    let mut back = vec![0u8; 4096 + 3];
    dev.read_exact_at(65536, &mut back[3..]).unwrap_or_else(|e| panic!("{ctx}: unaligned memory: {e}"));
    assert!(back[3..] == a[..], "{ctx}: unaligned round trip");

    // zero_range_durable wipes exactly the range.
    zero_range_durable(dev, off_b, 4096).unwrap();
    dev.read_exact_at(off_b, &mut rb).unwrap();
    assert!(rb[..4096].iter().all(|&x| x == 0), "{ctx}: range not zeroed");
    assert!(rb[4096..] == b[4096..], "{ctx}: zeroing went past the range");
    assert!(zero_range_durable(dev, 4096, 100).is_err());
    assert!(zero_range_durable(dev, size, 4096).is_err());
}

#[test]
fn file_round_trip_every_path_and_mode() {
    let dir = TempDir::new("file");
    for io_path in PATHS {
        for mode in MODES {
            let path = dir.join(&format!("log-{io_path}-{mode}"));
            let size = 1 << 20;
            create_log_file(&path, size).unwrap();
            let content = fs::read(&path).unwrap();
            assert_eq!(content.len() as u64, size);
            assert!(content.iter().all(|&x| x == 0), "new log file is not all zeros");

            let mut dev = open_log(&path, &opts(io_path, mode)).unwrap();
            assert_eq!(dev.io_path(), io_path);
            assert_eq!(dev.flush_mode(), mode);
            assert_eq!(dev.kind(), LogKind::File);
            assert_eq!(dev.size_bytes(), size);
            assert_eq!(dev.path(), path.as_path());
            assert_eq!(dev.fallback_reason(), None);
            exercise(dev.as_mut(), io_path, mode);
            drop(dev);

            // The data is in the file, as seen through the page cache by another open.
            let content = fs::read(&path).unwrap();
            assert!(content[(size - 4096) as usize..] == pattern(4096, 1)[..]);

            // Creating over an existing log fails and leaves it alone.
            let e = create_log_file(&path, 4096).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
            assert_eq!(fs::metadata(&path).unwrap().len(), size);
        }
    }
}

#[test]
fn many_segments_are_batched() {
    // More segments than the ring has entries: the uring path splits them into batches (in
    // Fdatasync mode, one linked fdatasync per batch of 63 writes).
    let dir = TempDir::new("batch");
    let path = dir.join("log");
    create_log_file(&path, 1 << 20).unwrap();
    let bufs: Vec<AlignedBuf> = (0..100).map(|i| pattern(4096, i as u8)).collect();
    for io_path in PATHS {
        for mode in MODES {
            let mut dev = open_log(&path, &opts(io_path, mode)).unwrap();
            let segs: Vec<(u64, &[u8])> =
                bufs.iter().enumerate().map(|(i, b)| ((2 * i as u64) * 4096, &b[..])).collect();
            dev.write_durable(&segs).unwrap();
            for (off, data) in &segs {
                let mut r = AlignedBuf::zeroed(4096);
                dev.read_exact_at(*off, &mut r).unwrap();
                assert!(&r[..] == *data);
            }
            let s = dev.stats();
            assert_eq!(s.writes, 100);
            let expect_syncs = match (io_path, mode) {
                (_, FlushMode::Dsync) => 0,
                (IoPath::Uring, FlushMode::Fdatasync) => 2,
                (IoPath::Sync, FlushMode::Fdatasync) => 1,
            };
            assert_eq!(s.fdatasyncs, expect_syncs, "{io_path} {mode}: {s:?}");
            assert_eq!(s.dsync_writes, if mode == FlushMode::Dsync { 100 } else { 0 });
        }
    }
}

#[test]
fn failed_request_is_reported_not_its_cancellations() {
    // Call the backends directly with a request the kernel rejects (an O_DIRECT write at a
    // misaligned offset: EINVAL) followed by a good one. In a linked chain the good write and
    // the fdatasync complete with -ECANCELED; the error reported must be the EINVAL.
    let dir = TempDir::new("chain");
    let path = dir.join("log");
    create_log_file(&path, 1 << 20).unwrap();
    let buf = pattern(4096, 9);
    for io_path in PATHS {
        for mode in MODES {
            let t = device::open_target(&path).unwrap();
            let mut stats = IoStats::default();
            let pieces: [(u64, &[u8]); 2] = [(1, &buf[..]), (8192, &buf[..])];
            let r = match io_path {
                IoPath::Uring => {
                    let mut io = uring::UringIo::new().unwrap();
                    io.write_durable(&t, mode, &pieces, &mut stats)
                }
                IoPath::Sync => sync::SyncIo.write_durable(&t, mode, &pieces, &mut stats),
            };
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{io_path} {mode}: {msg}");
            assert!(msg.contains("at offset 1") && msg.contains(&path.display().to_string()), "{msg}");
            assert_eq!(stats.fdatasyncs, 0, "{io_path} {mode}: no sync may be counted: {stats:?}");
            if mode == FlushMode::Fdatasync {
                assert_eq!(stats.writes, 0, "{io_path} {mode}: chain must stop: {stats:?}");
            }
        }
    }
}

#[test]
fn open_and_create_refuse_bad_targets() {
    let dir = TempDir::new("bad");
    let missing = dir.join("missing");
    let e = open_log(&missing, &LogOpenOptions::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("missing"), "{e}");

    let e = open_log(&dir.0, &LogOpenOptions::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");

    let odd = dir.join("odd");
    fs::write(&odd, vec![0u8; 5000]).unwrap();
    let e = open_log(&odd, &LogOpenOptions::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let empty = dir.join("empty");
    fs::write(&empty, b"").unwrap();
    assert!(open_log(&empty, &LogOpenOptions::default()).is_err());

    for bad in [0u64, 100, 4097] {
        let p = dir.join(&format!("size-{bad}"));
        let e = create_log_file(&p, bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(!p.exists(), "a refused create must not leave a file");
    }
    assert!(create_log_file(&dir.join("no/such/dir/log"), 4096).is_err());

    // Not a block device.
    assert!(block_device_info(&odd).unwrap().is_none());
    assert!(block_device_info(&missing).is_err());
}

#[test]
fn automatic_choice_is_consistent() {
    let dir = TempDir::new("auto");
    let path = dir.join("log");
    create_log_file(&path, 64 * 1024).unwrap();
    let mut dev = open_log(&path, &LogOpenOptions::default()).unwrap();
    assert_eq!(dev.flush_mode(), FlushMode::Dsync, "default flush mode");
    match dev.io_path() {
        IoPath::Uring => assert_eq!(dev.fallback_reason(), None),
        IoPath::Sync => {
            let why = dev.fallback_reason().expect("a fallback to sync must say why");
            eprintln!("note: io_uring unavailable here, automatic choice is sync: {why}");
        }
    }
    let a = pattern(4096, 3);
    dev.write_durable(&[(4096, &a[..])]).unwrap();
    let mut r = AlignedBuf::zeroed(4096);
    dev.read_exact_at(4096, &mut r).unwrap();
    assert!(r[..] == a[..]);
}

// ---------------------------------------------------------------- seccomp fallback

const SECCOMP_ENV: &str = "FAMS_IO_SECCOMP_CHILD_LOG";

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

/// Make io_uring_setup fail with EPERM for the calling thread, as a container's seccomp
/// profile does.
fn block_io_uring_setup_for_this_thread(arch: u32) {
    const PR_SET_SECCOMP: libc::c_int = 22;
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter { code: code as u16, jt, jf, k };
    let mut filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4), // seccomp_data.arch
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, arch, 0, 3),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0), // seccomp_data.nr
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    nix::sys::prctl::set_no_new_privs().expect("PR_SET_NO_NEW_PRIVS");
    // raw libc: nix has no wrapper for installing a seccomp filter (PR_SET_SECCOMP).
    // SAFETY: `prog` points to `filter`, both alive for the call; the kernel copies the program.
    let rc = unsafe { libc::prctl(PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) };
    assert_eq!(rc, 0, "PR_SET_SECCOMP: {}", std::io::Error::last_os_error());
}

#[test]
fn automatic_choice_falls_back_to_sync_when_io_uring_is_blocked() {
    let Some(_) = AUDIT_ARCH else {
        eprintln!("skipped: no seccomp arch constant for this target");
        return;
    };
    let dir = TempDir::new("seccomp");
    let path = dir.join("log");
    create_log_file(&path, 64 * 1024).unwrap();
    // Run `seccomp_child` in a fresh process so the filter cannot leak into other tests.
    let module = module_path!().split_once("::").map_or(module_path!(), |(_, rest)| rest);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::seccomp_child"), "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(SECCOMP_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("SECCOMP_CHILD_OK"),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

#[test]
#[ignore = "run in a child process by automatic_choice_falls_back_to_sync_when_io_uring_is_blocked"]
fn seccomp_child() {
    let (Some(path), Some(arch)) = (std::env::var_os(SECCOMP_ENV), AUDIT_ARCH) else {
        eprintln!("seccomp_child: only meaningful when run by its parent test");
        return;
    };
    let path = PathBuf::from(path);
    block_io_uring_setup_for_this_thread(arch);
    assert!(io_uring::IoUring::new(8).is_err(), "the filter did not block io_uring_setup");

    let mut dev = open_log(&path, &LogOpenOptions::default()).unwrap();
    assert_eq!(dev.io_path(), IoPath::Sync);
    let why = dev.fallback_reason().expect("fallback reason").to_string();
    assert!(why.contains("io_uring_setup"), "{why}");
    let a = pattern(4096, 5);
    dev.write_durable(&[(0, &a[..])]).unwrap();
    let mut r = AlignedBuf::zeroed(4096);
    dev.read_exact_at(0, &mut r).unwrap();
    assert!(r[..] == a[..]);
    drop(dev);

    let e = open_log(&path, &opts(IoPath::Uring, FlushMode::Dsync)).err().expect("explicit io_uring must fail");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let dev = open_log(&path, &opts(IoPath::Sync, FlushMode::Fdatasync)).unwrap();
    assert_eq!(dev.fallback_reason(), None, "an explicit sync choice is not a fallback");
    println!("SECCOMP_CHILD_OK ({why})");
}

// ---------------------------------------------------------------- signatures

#[test]
fn signatures_are_recognised() {
    let blank = vec![0u8; 72 * 1024];
    assert_eq!(detect_signature(&blank), None);
    assert_eq!(detect_signature(&[]), None);
    let with = |edits: &[(usize, &[u8])]| {
        let mut h = blank.clone();
        for (off, bytes) in edits {
            h[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        detect_signature(&h)
    };
    assert_eq!(with(&[(1080, &[0x53, 0xEF])]), Some("ext2"));
    assert_eq!(with(&[(1080, &[0x53, 0xEF]), (1024 + 0x5C, &[4, 0, 0, 0])]), Some("ext3"));
    assert_eq!(with(&[(1080, &[0x53, 0xEF]), (1024 + 0x60, &[0x40, 0, 0, 0])]), Some("ext4"));
    assert_eq!(with(&[(0, b"XFSB")]), Some("xfs"));
    assert_eq!(with(&[(65600, b"_BHRfS_M")]), Some("btrfs"));
    assert_eq!(with(&[(4086, b"SWAPSPACE2")]), Some("swap"));
    assert_eq!(with(&[(0, b"LUKS\xba\xbe")]), Some("crypto_LUKS"));
    assert_eq!(with(&[(512, b"EFI PART"), (510, &[0x55, 0xAA])]), Some("gpt partition table"));
    assert_eq!(with(&[(510, &[0x55, 0xAA]), (446 + 4, &[0x83])]), Some("dos partition table"));
    // A boot signature with an empty partition table is not a partition table.
    assert_eq!(with(&[(510, &[0x55, 0xAA])]), None);
    // Truncated head: signatures beyond it are simply not found.
    assert_eq!(detect_signature(&b"XFS"[..]), None);
}

// ---------------------------------------------------------------- block devices

/// A loop device, detached on drop (even if the test panics).
struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path, extra: &[&str]) -> LoopDev {
        let out = Command::new("losetup").args(extra).args(["-f", "--show"]).arg(file).output().expect("run losetup");
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev(PathBuf::from(dev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let ok = Command::new("losetup").arg("-d").arg(&self.0).status().map(|s| s.success());
        if ok.ok() != Some(true) {
            eprintln!("warning: could not detach {}", self.0.display());
        }
    }
}

fn loop_devices_usable() -> Result<(), String> {
    if !is_root() {
        return Err("not root (needs losetup)".into());
    }
    if find_tool("losetup").is_none() {
        return Err("losetup not installed".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control".into());
    }
    Ok(())
}

#[test]
fn loop_device_round_trip_and_info() {
    if let Err(why) = loop_devices_usable() {
        eprintln!("skipped loop_device_round_trip_and_info: {why}");
        return;
    }
    let dir = TempDir::new("loop");
    let backing = dir.join("backing");
    let size: u64 = 16 << 20;
    create_log_file(&backing, size).unwrap();
    let lo = LoopDev::attach(&backing, &[]);
    let dev_path = lo.0.clone();

    let info = block_device_info(&dev_path).unwrap().expect("a loop device is a block device");
    assert_eq!(info.size_bytes, size);
    assert!(info.logical_block_bytes.is_power_of_two() && info.logical_block_bytes <= 4096, "{info:?}");
    assert_eq!(info.filesystem, None, "{info:?}");

    for io_path in PATHS {
        for mode in MODES {
            let mut dev = open_log(&dev_path, &opts(io_path, mode)).unwrap();
            assert_eq!(dev.kind(), LogKind::BlockDevice);
            assert_eq!(dev.size_bytes(), size);
            assert_eq!(dev.io_path(), io_path);
            // O_EXCL: a second opener is refused while the first holds the device.
            let e = open_log(&dev_path, &opts(io_path, mode)).err().expect("second open must fail");
            assert_eq!(e.kind(), std::io::Error::from(nix::errno::Errno::EBUSY).kind(), "{e}");
            assert!(e.to_string().contains("in use"), "{e}");
            exercise(dev.as_mut(), io_path, mode);
            zero_range_durable(dev.as_mut(), 0, size).unwrap();
            let mut r = AlignedBuf::zeroed(size as usize);
            dev.read_exact_at(0, &mut r).unwrap();
            assert!(r.iter().all(|&x| x == 0), "zero_range_durable over the whole device");
        }
    }
    // What went to the device reached the backing file.
    {
        let mut dev = open_log(&dev_path, &opts(IoPath::Uring, FlushMode::Dsync)).unwrap();
        dev.write_durable(&[(4096, &pattern(4096, 77)[..])]).unwrap();
    }
    let content = fs::read(&backing).unwrap();
    assert!(content[4096..8192] == pattern(4096, 77)[..]);

    match find_tool("mkfs.ext4") {
        None => eprintln!("mkfs.ext4 not installed: skipped the ext4 signature check"),
        Some(mkfs) => {
            let out = Command::new(mkfs).args(["-q", "-F"]).arg(&dev_path).output().unwrap();
            assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
            let info = block_device_info(&dev_path).unwrap().unwrap();
            assert_eq!(info.filesystem.as_deref(), Some("ext4"), "{info:?}");
        }
    }
    drop(lo);
}

// ---------------------------------------------------------------- measurement

/// Time `iterations` single-page `write_durable` calls at successive offsets from `*next`.
fn time_writes(dev: &mut dyn LogDevice, next: &mut u64, iterations: usize, out: &mut Vec<f64>) {
    let buf = pattern(4096, 42);
    let slots = dev.size_bytes() / 4096;
    for _ in 0..iterations {
        let off = (*next % slots) * 4096;
        *next += 1;
        let t = Instant::now();
        dev.write_durable(&[(off, &buf[..])]).unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
}

/// 2000 timed writes per path x mode, in 10 interleaved rounds of 200 (after 20 untimed
/// warm-up writes per round), so that background load hits every combination alike.
fn report(label: &str, path: &Path) {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 200;
    let combos: Vec<(IoPath, FlushMode)> = PATHS.iter().flat_map(|&p| MODES.iter().map(move |&m| (p, m))).collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS * PER_ROUND); combos.len()];
    let mut next = 0u64;
    for _ in 0..ROUNDS {
        for (i, &(io_path, mode)) in combos.iter().enumerate() {
            // Reopened each round: a block device is opened O_EXCL, so one at a time.
            let mut dev = open_log(path, &opts(io_path, mode)).unwrap();
            time_writes(dev.as_mut(), &mut next, 20, &mut Vec::new());
            time_writes(dev.as_mut(), &mut next, PER_ROUND, &mut samples[i]);
        }
    }
    for (&(io_path, mode), us) in combos.iter().zip(&mut samples) {
        us.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mean = us.iter().sum::<f64>() / us.len() as f64;
        println!(
            "{label:<20} {:<8} {:<9} median {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  mean {mean:7.1} us",
            io_path.name(),
            mode.name(),
            us[us.len() / 2],
            us[us.len() * 9 / 10],
            us[us.len() * 99 / 100],
        );
    }
}

#[test]
#[ignore = "measurement: cargo test -- --ignored --nocapture latency"]
fn latency_of_one_page_write_durable() {
    let dir = TempDir::new("latency");
    let file = dir.join("log");
    create_log_file(&file, 64 << 20).unwrap();
    println!("write_durable of one 4096-byte segment: 2000 per combination, 10 interleaved rounds");
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {} (CPU contention inflates these numbers)", load.trim());
    report("file /var/tmp", &file);
    match loop_devices_usable() {
        Err(why) => println!("loop device: skipped ({why})"),
        Ok(()) => {
            for (label, extra) in [("loop (buffered)", &[][..]), ("loop (direct-io=on)", &["--direct-io=on"][..])] {
                let backing = dir.join(&format!("backing-{}", extra.len()));
                create_log_file(&backing, 64 << 20).unwrap();
                let lo = LoopDev::attach(&backing, extra);
                report(label, &lo.0);
            }
        }
    }
}
