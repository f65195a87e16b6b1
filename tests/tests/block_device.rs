//! A log on a raw block device (a loop device here, as root): commits persist, a device holding
//! a filesystem is refused unless forced, and a device smaller than the formatted log is refused.

use fams::{Error, FormatOptions, Heap, HeapOptions};
use fams_tests::*;
use std::process::Command;

#[test]
fn heap_with_its_log_on_a_block_device() {
    let dir = TempDir::new("blk");
    let Some(dev) = LoopDevice::new(dir.join("backing"), 16 << 20) else { return };
    let path = dir.join("h");
    let mut f = FormatOptions::new(&path, 1 << 20);
    f.log_path = Some(dev.device.clone());
    let header = Heap::format(&f).unwrap();
    assert_eq!(header.log_size, 16 << 20, "the whole device by default");
    {
        let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
        assert_eq!(h.stats().log_kind, "block");
        h.bytes_mut()[100] = 7;
        h.commit().unwrap();
        let s = h.stats();
        assert!(s.io.dsync_writes + s.io.fdatasyncs >= 1, "{:?}", s.io);
    }
    let h = Heap::open(&path, &HeapOptions::default()).unwrap();
    assert_eq!(h.bytes()[100], 7);
}

/// Inspecting a heap whose block-device log another opener holds says who holds it (rather than
/// waiting on the device and failing with EBUSY); once the heap is closed, inspect reads the log.
#[test]
fn inspect_names_the_process_holding_a_block_device_log() {
    let dir = TempDir::new("blkinspect");
    let Some(dev) = LoopDevice::new(dir.join("backing"), 16 << 20) else { return };
    let path = dir.join("h");
    let mut f = FormatOptions::new(&path, 1 << 20);
    f.log_path = Some(dev.device.clone());
    Heap::format(&f).unwrap();
    let mut h = Heap::open(&path, &HeapOptions::default()).unwrap();
    h.bytes_mut()[8] = 1;
    h.commit().unwrap();
    let e = fams::inspect::inspect(&path, None).expect_err("the log is held by the open heap");
    let msg = e.to_string();
    assert!(matches!(e, Error::LogInUse { .. }), "{msg}");
    assert!(msg.contains(&std::process::id().to_string()) && msg.contains(&dev.device.display().to_string()), "{msg}");
    drop(h);
    let seen = fams::inspect::inspect(&path, None).unwrap();
    assert!(!seen.locked && seen.log_kind == "block", "{seen:?}");
}

#[test]
fn a_block_device_with_a_filesystem_is_refused_unless_forced() {
    let dir = TempDir::new("blkfs");
    let Some(dev) = LoopDevice::new(dir.join("backing"), 16 << 20) else { return };
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.device).status();
    if !matches!(mkfs, Ok(s) if s.success()) {
        fams_tests::skip(&format!("mkfs.ext4 not available ({mkfs:?})"));
        return;
    }
    let path = dir.join("h");
    let mut f = FormatOptions::new(&path, 1 << 20);
    f.log_path = Some(dev.device.clone());
    let e = Heap::format(&f).err().unwrap();
    assert!(matches!(e, Error::BadLogDevice { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("ext4") && msg.contains("--force") && msg.contains(&dev.device.display().to_string()),
        "{msg}"
    );
    assert!(!path.exists(), "a refused format creates nothing");
    f.force = true;
    Heap::format(&f).unwrap();
    Heap::open(&path, &HeapOptions::default()).unwrap();
}

#[test]
fn a_log_size_larger_than_the_device_is_refused() {
    let dir = TempDir::new("blksmall");
    let Some(dev) = LoopDevice::new(dir.join("backing"), 1 << 20) else { return };
    let mut f = FormatOptions::new(dir.join("h"), 1 << 20);
    f.log_path = Some(dev.device.clone());
    f.log_size_bytes = Some(64 << 20);
    let e = Heap::format(&f).err().unwrap();
    assert!(matches!(e, Error::BadLogDevice { .. }) && e.to_string().contains("larger than the device"), "{e}");
}
