use fams::{FormatOptions, Heap, HeapOptions};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let mib: u64 = args[2].parse().unwrap();
    let n: usize = args[3].parse().unwrap();
    let _ = std::fs::remove_file(dir.join("p.heap"));
    let _ = std::fs::remove_file(dir.join("p.heap.log"));
    let mut f = FormatOptions::new(dir.join("p.heap"), mib << 20);
    f.log_size_bytes = Some(256 << 20);
    Heap::format(&f).unwrap();
    let mut o = HeapOptions::default();
    if let Ok(t) = std::env::var("TRACKER") {
        o.tracker = Some(t.parse().unwrap());
    }
    let mut h = Heap::open(dir.join("p.heap"), &o).unwrap();
    // make resident
    let len = h.len();
    for i in (0..len).step_by(4096) {
        h.bytes_mut()[i] = 1;
        if i % (32 << 20) == 0 {
            h.commit().unwrap();
        }
    }
    h.commit().unwrap();
    let s0 = h.stats();
    let mut lat = Vec::new();
    let mut wl = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        h.bytes_mut()[(i * 7919 % (len / 4096)) * 4096 + 8] = i as u8;
        wl.push(t.elapsed().as_nanos() as u64);
        h.commit().unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort();
    wl.sort();
    println!("write p50 {:.1} us", wl[n / 2] as f64 / 1e3);
    let s = h.stats();
    let c = (s.commits - s0.commits) as f64;
    println!(
        "p50 {:.1} us; per commit: collect {:.1} capture {:.1} device {:.1} us; tracker {} io {} {}",
        lat[n / 2] as f64 / 1e3,
        (s.collect_ns - s0.collect_ns) as f64 / c / 1e3,
        (s.capture_ns - s0.capture_ns) as f64 / c / 1e3,
        (s.device_write_ns - s0.device_write_ns) as f64 / c / 1e3,
        s.tracker,
        s.io_path,
        s.flush_mode
    );
}
