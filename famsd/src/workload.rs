//! The verifiable workload shared by `torture` and `demo`.
//!
//! Commit number `k` (k = 1, 2, …) applies mutation `k`: a few writes at places and with bytes
//! that depend only on (seed, k), plus `k` itself stored in the heap's first 8 bytes. So the heap
//! after commit `c` is a pure function of (seed, c), and a checker can rebuild it in memory.

/// Small, fast, seedable PRNG (splitmix64), the simulator's: good enough to choose pages and bytes.
pub use fams::sim::SimRng as Rng;

pub const PAGE: usize = 4096;

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
