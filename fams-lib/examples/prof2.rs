use fams::{FormatOptions, Heap, HeapOptions};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let p = dir.join("r.heap");
    if args[2] == "setup" {
        let mib: u64 = args[3].parse().unwrap();
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(dir.join("r.heap.log"));
        let mut f = FormatOptions::new(&p, 1 << 30);
        f.log_size_bytes = Some(1 << 30);
        Heap::format(&f).unwrap();
        let mut h = Heap::open(&p, &HeapOptions::default()).unwrap();
        let pages = (mib << 20) / 4096;
        let mut x = 1u64;
        for c in 0..pages / 64 {
            for i in 0..64u64 {
                let pg = (c * 64 + i) as usize;
                let b = &mut h.bytes_mut()[pg * 4096..pg * 4096 + 4096];
                for w in b.chunks_mut(8) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            h.commit().unwrap();
        }
        h.abandon();
    } else {
        let t = Instant::now();
        let h = Heap::open(&p, &HeapOptions::default()).unwrap();
        let r = h.stats().recovery;
        println!(
            "open {:?}; recovery {:?}: {} records, {} bytes replayed, {} log bytes read",
            t.elapsed(),
            r.duration,
            r.records_replayed,
            r.bytes_replayed,
            r.log_bytes_read
        );
    }
}
