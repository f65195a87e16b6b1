//! The verifiable workload shared by `torture` and `demo`.
//!
//! Commit number `k` (k = 1, 2, …) applies mutation `k`: a few writes at places and with bytes
//! that depend only on (seed, k), plus `k` itself stored in the heap's first 8 bytes. So the heap
//! after commit `c` is a pure function of (seed, c), and a checker can rebuild it in memory.
//!
//! Between commits, [`failed_turn`] scribbles over the heap and rolls back: a checker that finds
//! the heap equal to a committed state has also shown that no rolled-back byte reached the disk.

use fams::Heap;

/// Small, fast, seedable PRNG (splitmix64), the simulator's: good enough to choose pages and bytes.
pub use fams::sim::SimRng as Rng;

pub const PAGE: usize = fams::PAGE_SIZE;

/// Apply mutation `k` to `heap` (the whole heap image).
pub fn mutate(heap: &mut [u8], seed: u64, k: u64) {
    let pages = (heap.len() / PAGE) as u64;
    let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(k));
    // Mostly small commits, sometimes large ones (hundreds of pages) to exercise grouping,
    // wrap-around and checkpoints.
    let writes = match rng.below(100) {
        0..=69 => 1 + rng.below(4),
        70..=94 => 4 + rng.below(28),
        _ => 32 + rng.below(224),
    };
    for _ in 0..writes {
        let page = 1 + rng.below(pages - 1);
        let (off, len) = match rng.below(4) {
            0 => (0, PAGE as u64), // whole page
            _ => {
                let len = 1 + rng.below(200);
                (rng.below(PAGE as u64 - len), len)
            }
        };
        let start = (page as usize) * PAGE + off as usize;
        let byte = (rng.next_u64() as u8) | 1;
        for (i, b) in heap[start..start + len as usize].iter_mut().enumerate() {
            *b = byte.wrapping_add(i as u8).wrapping_add(k as u8);
        }
    }
    heap[..8].copy_from_slice(&k.to_le_bytes());
}

/// What a rolled-back turn writes: text no mutation writes, so that a heap showing it (in a
/// hexdump, or at the byte a checker reports) points straight at rollback.
pub const ROLLED_BACK: &[u8] = b"<rolled back: never durable>";

/// A turn that fails: scribble [`ROLLED_BACK`] over a few pages (a few bytes of some, the whole
/// of others; now and then over half the heap), then [`Heap::rollback`]. Returns a description
/// of the first page that then differs from what it held before, if one does: the scribbles
/// must vanish at once (and, as whoever verifies recoveries checks, never reach the disk). Uses
/// only `rng` for its choices, so a seeded workload replays exactly.
pub fn failed_turn(heap: &mut Heap, rng: &mut Rng) -> fams::Result<Option<String>> {
    let pages = (heap.len() / PAGE) as u64;
    let count = match rng.below(8) {
        0 => pages / 2 + rng.below(pages / 2),
        _ => 1 + rng.below(4),
    };
    let mut chosen: Vec<usize> = (0..count).map(|_| rng.below(pages) as usize).collect();
    chosen.sort_unstable();
    chosen.dedup();
    let before: Vec<Vec<u8>> = chosen.iter().map(|&p| heap.bytes()[p * PAGE..(p + 1) * PAGE].to_vec()).collect();
    for &p in &chosen {
        let (off, len) = match rng.below(2) {
            0 => (0, PAGE),
            _ => {
                let len = 1 + rng.below(64) as usize;
                (rng.below((PAGE - len) as u64) as usize, len)
            }
        };
        let page = &mut heap.bytes_mut()[p * PAGE..(p + 1) * PAGE];
        for (i, b) in page[off..off + len].iter_mut().enumerate() {
            *b = ROLLED_BACK[(off + i) % ROLLED_BACK.len()];
        }
    }
    heap.rollback()?;
    for (&p, before) in chosen.iter().zip(&before) {
        let now = &heap.bytes()[p * PAGE..(p + 1) * PAGE];
        if let Some(at) = now.iter().zip(before).position(|(a, b)| a != b) {
            return Ok(Some(format!("rollback left page {p} changed (first at byte {at} of the page)")));
        }
    }
    Ok(None)
}

/// The commit number recorded in a heap image.
pub fn commit_number(heap: &[u8]) -> u64 {
    u64::from_le_bytes(heap[..8].try_into().expect("8 bytes"))
}

/// An in-memory model of the heap that advances commit by commit.
pub struct Model {
    pub image: Vec<u8>,
    pub seed: u64,
    pub at: u64,
}

impl Model {
    pub fn new(size: usize, seed: u64) -> Model {
        Model { image: vec![0; size], seed, at: 0 }
    }
    /// Advance to commit `c` (never backwards: committed states only grow).
    pub fn advance_to(&mut self, c: u64) {
        while self.at < c {
            self.at += 1;
            mutate(&mut self.image, self.seed, self.at);
        }
    }
    /// First differing offset, if any.
    pub fn first_difference(&self, heap: &[u8]) -> Option<usize> {
        if heap.len() != self.image.len() {
            return Some(0);
        }
        heap.chunks(PAGE).zip(self.image.chunks(PAGE)).position(|(a, b)| a != b).map(|page| {
            let a = &heap[page * PAGE..];
            let b = &self.image[page * PAGE..];
            page * PAGE + a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0)
        })
    }
}

/// What opening the heap at `heap_path` would recover, computed in memory: the heap file and its
/// log (`log`, or the one its header names) are read, never written, and the same recovery code
/// the heap uses replays the log over a copy. A crash test verifies with this so that the files
/// stay exactly as the crash left them: the next child's own open then replays a real log, and
/// kills and power cuts can land inside that replay. Returns the recovered heap bytes (what
/// [`Heap::bytes`] would show) and what recovery did.
pub fn recovered_image(heap_path: &std::path::Path, log: Option<&std::path::Path>) -> Result<RecoveredImage, String> {
    use std::os::unix::fs::FileExt;
    let heap_file =
        std::fs::read(heap_path).map_err(|e| format!("{}: reading the heap file: {e}", heap_path.display()))?;
    let header = fams::HeapHeader::decode(&heap_file).map_err(|e| format!("{}: {e}", heap_path.display()))?;
    let log_path = log.map(|l| l.to_path_buf()).unwrap_or_else(|| header.resolve_log_path(heap_path));
    let mut log_image = vec![0u8; header.log_size as usize];
    std::fs::File::open(&log_path)
        .and_then(|f| f.read_exact_at(&mut log_image, 0))
        .map_err(|e| format!("{}: reading the log: {e}", log_path.display()))?;
    let (result, heap_after, _log_after) = fams::sim::recover_images(log_image, heap_file, false);
    let report = result.map_err(|e| format!("recovering {} in memory: {e}", heap_path.display()))?;
    let start = fams::heap_file::HEADER_BYTES as usize;
    let bytes = heap_after[start..start + report.heap_size_bytes as usize].to_vec();
    Ok(RecoveredImage { bytes, report })
}

/// See [`recovered_image`].
pub struct RecoveredImage {
    pub bytes: Vec<u8>,
    pub report: fams::RecoveryReport,
}

impl RecoveredImage {
    /// The [`fingerprint`] of the bytes, to compare with what a real recovery produced.
    pub fn crc(&self) -> u32 {
        fingerprint(&self.bytes)
    }
}

/// A checksum of a heap image: how a crash test's child tells its parent, in one line, what its
/// own recovery produced.
pub fn fingerprint(heap: &[u8]) -> u32 {
    crc32c::crc32c(heap)
}
