//! The demo's mount part: `famsd mount` serving a store from the demo's data directory, a file
//! in it updated through a `MAP_SHARED` mapping with `msync(MS_SYNC)` after each generation, and
//! the daemon SIGKILLed — sometimes while an msync is on its way, always with unsynced pages in
//! the mapping. After each kill the mount is detached and mounted again, and the file must hold
//! exactly one synced generation, never one older than the last acknowledged msync.
//!
//! Needs FUSE: root, or `fusermount3` (package fuse3), and `/dev/fuse`. Without them this part
//! says why and is skipped: the rest of the demo does not depend on it.

use crate::mount::daemon::{check_can_mount, Daemon};
use crate::mount::{umount, MountArgs};
use fams::sim::SimRng;
use fams::{FormatOptions, Heap};
use std::path::Path;
use std::time::Duration;

const PAGES: usize = 16;
const PAGE_BYTES: usize = 4096;
const KILLS: u64 = 6;

/// Generation `g` of the file: every page starts with `g` and is filled with a byte of it.
fn write_generation(map: &mut [u8], g: u64) {
    for page in map.chunks_mut(PAGE_BYTES) {
        page[..8].copy_from_slice(&g.to_le_bytes());
        page[8..].fill(fill_byte(g));
    }
}

fn fill_byte(g: u64) -> u8 {
    (g.wrapping_mul(37) % 251) as u8 + 1
}

/// The one generation the file holds, or what is wrong with it.
fn generation_of(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() != PAGES * PAGE_BYTES {
        return Err(format!("the file is {} bytes, {} expected", bytes.len(), PAGES * PAGE_BYTES));
    }
    let mut found = None;
    for (i, page) in bytes.chunks(PAGE_BYTES).enumerate() {
        let g = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
        if page[8..].iter().any(|&b| b != fill_byte(g)) {
            return Err(format!("page {i} is torn (generation {g} in its header, other bytes in its body)"));
        }
        match found {
            None => found = Some(g),
            Some(f) if f != g => return Err(format!("pages of generations {f} and {g} mixed (page {i})")),
            Some(_) => {}
        }
    }
    found.ok_or_else(|| "the file is empty".into())
}

pub fn run(dir: &Path) -> Result<(), String> {
    println!("  mount: unmodified programs get failure-atomic msync through `famsd mount`…");
    if let Err(why) = check_can_mount("the demo's mount part") {
        println!("  (skipped: {why})");
        return Ok(());
    }
    let store = dir.join("files.heap");
    let mp = dir.join("mnt");
    let daemon_log = dir.join("files.heap.mount.log");
    if crate::mount::mount_entry(&mp).is_some() {
        umount(&mp, true)?;
    }
    for f in [&store, &dir.join("files.heap.log"), &daemon_log] {
        let _ = std::fs::remove_file(f);
    }
    std::fs::create_dir_all(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
    let mut format = FormatOptions::new(&store, 4 << 20);
    format.max_size_bytes = Some(1 << 30);
    format.log_size_bytes = Some(16 << 20);
    Heap::format(&format).map_err(|e| e.to_string())?;
    let famsd = std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?;
    let args = MountArgs::new(&store, &mp);
    let file = mp.join("pages.bin");
    let mut rng = SimRng::new(5);
    let (mut acked, mut mid_msync, mut in_flight_kept) = (0u64, 0u64, 0u64);
    // An msync whose outcome the kill left unknown: the file may hold the generation after `acked`.
    let mut unknown = false;
    for kill in 0..=KILLS {
        let mut daemon = Daemon::start(&famsd, &args, &daemon_log)?;
        let result = (|| -> Result<(), String> {
            if kill == 0 {
                let f = std::fs::File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                f.set_len((PAGES * PAGE_BYTES) as u64).map_err(|e| e.to_string())?;
                let mut map = map_file(&file)?;
                write_generation(&mut map, 0);
                map.flush().map_err(|e| format!("msync: {e}"))?;
                return Ok(());
            }
            let held = generation_of(&std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?)?;
            let newest = acked + u64::from(unknown);
            if held < acked || held > newest {
                return Err(format!(
                    "the file holds generation {held}; it must hold one from {acked} (the last acknowledged msync) to {newest}"
                ));
            }
            in_flight_kept += u64::from(held == acked + 1);
            if kill == KILLS {
                return Ok(());
            }
            unknown = false;
            let mut map = map_file(&file)?;
            let mut g = held;
            for _ in 0..1 + rng.below(4) {
                g += 1;
                write_generation(&mut map, g);
                map.flush().map_err(|e| format!("msync: {e}"))?;
                acked = g;
            }
            // The next generation, written into the mapping: sometimes its msync is racing the
            // kill, otherwise it is never synced at all.
            write_generation(&mut map, g + 1);
            if rng.below(2) == 0 {
                mid_msync += 1;
                let delay_us = rng.below(3000);
                let (synced, killed) = std::thread::scope(|s| {
                    let msync = s.spawn(|| map.flush().is_ok());
                    std::thread::sleep(Duration::from_micros(delay_us));
                    let killed = daemon.kill();
                    (msync.join().unwrap_or(false), killed)
                });
                killed?;
                if synced {
                    acked = g + 1;
                } else {
                    unknown = true;
                }
            } else {
                drop(map);
                daemon.kill()?;
            }
            Ok(())
        })();
        // A clean unmount after the first and the last mount; the kills above already detached
        // theirs. (On an error the handle's drop unmounts too.)
        let stopped = daemon.stop();
        result?;
        stopped?;
    }
    println!(
        "  {KILLS} SIGKILLs of the mount's daemon ({mid_msync} while an msync of {PAGES} pages was on its way), each with unsynced pages in a MAP_SHARED mapping; remounted each time"
    );
    println!(
        "  verified: the file always held exactly one synced generation, never older than the last acknowledged msync ({acked}); of the msyncs cut short by a kill, {in_flight_kept} had committed"
    );
    println!("  the store is {} (`famsd mount {} MOUNTPOINT`)", store.display(), store.display());
    Ok(())
}

fn map_file(path: &Path) -> Result<memmap2::MmapMut, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the file lives in our own mount and no other process maps or truncates it while
    // the mapping lives; its length is fixed at PAGES pages.
    unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(|e| format!("mapping {}: {e}", path.display()))
}
