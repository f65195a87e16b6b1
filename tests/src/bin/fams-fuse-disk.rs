//! `fams-fuse-disk`: a FUSE-served disk with a volatile write cache and a "power cut" command,
//! for crash tests on the real kernel path. See `fams_tests::fuse_disk`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = fams_tests::fuse_disk::serve_main(args) {
        eprintln!("fams-fuse-disk: {e}");
        std::process::exit(1);
    }
}
