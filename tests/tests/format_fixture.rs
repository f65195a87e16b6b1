//! The on-disk formats are a contract with every heap already written. A heap and its log made
//! by this version are kept in `tests/fixtures/format-v1/` (made by `make_the_v1_fixture`, below,
//! killed before its last checkpoint so its log holds records to replay). Every build must open
//! them: replay the log, find the object layer and the values written — or, once a format
//! version is bumped, refuse them with an error that names the version (and `famsd upgrade`,
//! when it exists). A format change without a version bump fails here.
//!
//! Layout of the fixtures (versions in the files): `format-v1` has heap header version 1, log
//! superblock and record version 1, object layer version 1. `format-v2` (made by
//! `make_the_v2_fixture`) has heap header version 2 (a maximum size), log superblock version 2
//! (the current size: it was grown after formatting), records and object layer version 1.

use fams::alloc::{ObjectHeap, ObjectOptions, PVec};
use fams::{FormatOptions, Heap, HeapOptions};
use fams_tests::TempDir;
use std::path::{Path, PathBuf};

/// Where the fixture maps (recorded in its header): far from where anything else maps.
const FIXTURE_BASE: u64 = 0x5f1e_0000_0000;
const FIXTURE_HEAP_BYTES: u64 = 256 << 10;
const FIXTURE_LOG_BYTES: u64 = 256 << 10;

fams::persistent! {
    struct FixtureRoot<'h> {
        commits: u64,
        greeting: PVec<'h, u8>,
        squares: PVec<'h, u64>,
    }
}

fn fixture_dir() -> PathBuf {
    fixture_dir_of("format-v1")
}

fn fixture_dir_of(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The v2 fixture: formatted at 128 KiB with a maximum of 1 MiB, grown to 256 KiB, then ten
/// commits left in the log (killed before the last checkpoint).
const V2_BASE: u64 = 0x5f2e_0000_0000;
const V2_HEAP_BYTES: u64 = 128 << 10;
const V2_GROWN_BYTES: u64 = 256 << 10;
const V2_MAX_BYTES: u64 = 1 << 20;
const V2_LOG_BYTES: u64 = 128 << 10;

/// Rebuild the v2 fixture:
/// `cargo test --release -p fams-tests --test format_fixture -- --ignored make_the_v2_fixture`.
#[test]
#[ignore]
fn make_the_v2_fixture() {
    let dir = fixture_dir_of("format-v2");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let heap_path = dir.join("heap");
    let mut f = FormatOptions::new(&heap_path, V2_HEAP_BYTES);
    f.max_size_bytes = Some(V2_MAX_BYTES);
    f.log_size_bytes = Some(V2_LOG_BYTES);
    f.base_addr = Some(V2_BASE);
    Heap::format(&f).unwrap();
    let mut heap = Heap::open(&heap_path, &HeapOptions::default()).unwrap();
    heap.grow(V2_GROWN_BYTES).unwrap();
    let o = ObjectHeap::open(heap, &ObjectOptions::schema(7)).unwrap();
    commit_ten_and_leave_them_in_the_log(o, b"written by fams format v2");
}

#[test]
fn a_heap_made_by_format_v2_opens_replays_and_reads_back() {
    let dir = TempDir::new("fixture-v2");
    for name in ["heap", "heap.log"] {
        std::fs::copy(fixture_dir_of("format-v2").join(name), dir.0.join(name)).unwrap();
    }
    let heap =
        Heap::open(dir.0.join("heap"), &HeapOptions::default()).unwrap_or_else(|e| panic!("the v2 fixture: {e}"));
    assert!(heap.stats().recovery.records_replayed > 0, "the fixture's log holds its commits");
    assert_eq!((heap.len() as u64, heap.max_len() as u64), (V2_GROWN_BYTES, V2_MAX_BYTES), "the grown size is kept");
    let mut o = ObjectHeap::open(heap, &ObjectOptions::schema(7)).unwrap();
    let root = o.root::<FixtureRoot>(|_| panic!("the fixture has its root")).unwrap();
    assert_eq!(root.commits, 10);
    assert_eq!(&root.greeting[..], b"written by fams format v2");
    assert_eq!(&root.squares[..], &(0..10u64).map(|i| i * i).collect::<Vec<_>>()[..]);
    o.check().expect("the fixture's allocator metadata is whole");
    // It goes on growing.
    o.grow(512 << 10).unwrap();
    o.commit().unwrap();
}

/// Rebuild the fixture (only when a deliberate format change asks for a new one next to it):
/// `cargo test --release -p fams-tests --test format_fixture -- --ignored make_the_v1_fixture`.
#[test]
#[ignore]
fn make_the_v1_fixture() {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let heap_path = dir.join("heap");
    let mut f = FormatOptions::new(&heap_path, FIXTURE_HEAP_BYTES);
    f.log_size_bytes = Some(FIXTURE_LOG_BYTES);
    f.base_addr = Some(FIXTURE_BASE);
    f.force = true;
    Heap::format(&f).unwrap();
    let heap = Heap::open(&heap_path, &HeapOptions::default()).unwrap();
    let o = ObjectHeap::open(heap, &ObjectOptions::schema(7)).unwrap();
    commit_ten_and_leave_them_in_the_log(o, b"written by fams format v1");
}

/// The fixtures' content: ten commits (a counter, squares, a greeting), then a close without the
/// final checkpoint, so the log keeps the commits for the next open to replay.
fn commit_ten_and_leave_them_in_the_log(mut o: ObjectHeap, greeting: &[u8]) {
    for i in 0..10u64 {
        let (root, _) = o
            .root_with_alloc(|a| FixtureRoot { commits: 0, greeting: PVec::new_in(a), squares: PVec::new_in(a) })
            .unwrap();
        root.commits += 1;
        root.squares.push(i * i);
        if i == 0 {
            root.greeting.extend_from_slice(greeting);
        }
        o.commit().unwrap();
    }
    o.abandon();
}

fn open_copy(dir: &Path) -> Result<(ObjectHeap, u64), String> {
    for name in ["heap", "heap.log"] {
        std::fs::copy(fixture_dir().join(name), dir.join(name)).map_err(|e| format!("copying {name}: {e}"))?;
    }
    let heap = Heap::open(dir.join("heap"), &HeapOptions::default()).map_err(|e| e.to_string())?;
    let replayed = heap.stats().recovery.records_replayed;
    let o = ObjectHeap::open(heap, &ObjectOptions::schema(7)).map_err(|e| e.to_string())?;
    Ok((o, replayed))
}

#[test]
fn a_heap_made_by_format_v1_opens_replays_and_reads_back() {
    let _address = v1_address();
    let dir = TempDir::new("fixture-v1");
    let (mut o, replayed) = match open_copy(&dir.0) {
        Ok(x) => x,
        // After a deliberate format change the old fixture may be refused — but only with an
        // error that says which version it is and what to do.
        Err(e) => {
            assert!(
                e.contains("version") && e.contains("famsd upgrade"),
                "the v1 fixture fails without saying why: {e}"
            );
            return;
        }
    };
    assert!(replayed > 0, "the fixture's log holds its commits: opening must replay them");
    let root = o
        .root::<FixtureRoot>(|_| panic!("the fixture has its root"))
        .unwrap_or_else(|e| panic!("the v1 fixture's root: {e}"));
    assert_eq!(root.commits, 10);
    assert_eq!(&root.greeting[..], b"written by fams format v1");
    assert_eq!(&root.squares[..], &(0..10u64).map(|i| i * i).collect::<Vec<_>>()[..]);
    o.check().expect("the fixture's allocator metadata is whole");
    // And it goes on working: a new commit on top of the old format.
    o.root::<FixtureRoot>(|_| unreachable!()).unwrap().commits += 1;
    o.commit().unwrap();
}

// ---- Upgrading a header (`famsd upgrade`, `Heap::upgrade`) --------------------------------------

/// The v1 fixture maps at one fixed address: the tests of this binary that open it (they run on
/// parallel threads of one process) take turns.
static V1_ADDRESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn v1_address() -> std::sync::MutexGuard<'static, ()> {
    V1_ADDRESS.lock().unwrap_or_else(|p| p.into_inner())
}

fn copy_fixture(name: &str, dir: &Path) {
    for f in ["heap", "heap.log"] {
        std::fs::copy(fixture_dir_of(name).join(f), dir.join(f)).unwrap();
    }
}

/// The heap's bytes after a plain open of an untouched copy of the v1 fixture: what every upgraded
/// copy must hold.
fn reference_image() -> Vec<u8> {
    let dir = TempDir::new("upgrade-ref");
    copy_fixture("format-v1", &dir.0);
    let h = Heap::open(dir.join("heap"), &HeapOptions::default()).unwrap();
    let image = h.bytes().to_vec();
    h.close().unwrap();
    image
}

fn raw_header(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..4096].to_vec()
}

#[test]
fn famsd_upgrade_raises_a_v1_heaps_maximum_and_it_grows() {
    let famsd = fams_tests::built_binary("famsd", &["--bin", "famsd"], Path::new("famsd"));
    let _address = v1_address();
    let dir = TempDir::new("upgrade-cli");
    copy_fixture("format-v1", &dir.0);
    let heap = dir.join("heap");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&famsd).args(args).output().expect("run famsd");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let h = heap.to_str().unwrap();
    let (ok, out) = run(&["inspect", "--heap", h, "--json"]);
    assert!(ok && out.contains("\"header_version\": 1"), "{out}");
    // A v1 heap cannot grow past the size it was formatted with.
    let mut opened = Heap::open(&heap, &HeapOptions::default()).unwrap();
    assert_eq!(opened.max_len() as u64, FIXTURE_HEAP_BYTES);
    assert!(opened.grow(FIXTURE_HEAP_BYTES * 2).is_err());
    // The lock is held: an upgrade of an open heap is refused, naming the holder.
    let (ok, out) = run(&["upgrade", "--heap", h, "--max-size", "4M"]);
    assert!(!ok && out.contains("locked"), "an upgrade must refuse a heap open elsewhere: {out}");
    opened.close().unwrap();

    let (ok, out) = run(&["upgrade", "--heap", h, "--max-size", "4M", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["changed"].as_bool(), v["version_before"].as_u64(), v["version_after"].as_u64()),
        (Some(true), Some(1), Some(2))
    );
    assert_eq!(v["max_size_bytes"].as_u64(), Some(4 << 20));
    assert!(!fams::heap::upgrade::side_path(&heap).exists(), "the side file is removed");
    let (ok, out) = run(&["upgrade", "--heap", h, "--max-size", "4M"]);
    assert!(ok && out.contains("nothing to do"), "{out}");
    let (ok, out) = run(&["upgrade", "--heap", h, "--max-size", "1M"]);
    assert!(!ok && out.contains("can only be raised"), "{out}");

    // The upgraded heap holds the same committed state, and grows to its new maximum.
    let reference = reference_image();
    let mut g = Heap::open(&heap, &HeapOptions::default()).unwrap();
    assert_eq!(g.bytes(), &reference[..]);
    assert_eq!(g.max_len(), 4 << 20);
    g.grow(4 << 20).unwrap();
    g.bytes_mut()[(4 << 20) - 1] = 7;
    g.commit().unwrap();
    g.close().unwrap();
    let o = ObjectHeap::open(Heap::open(&heap, &HeapOptions::default()).unwrap(), &ObjectOptions::schema(7)).unwrap();
    let mut o = o;
    let root = o.root::<FixtureRoot>(|_| panic!("the fixture has its root")).unwrap();
    assert_eq!(root.commits, 10);
    assert_eq!(&root.greeting[..], b"written by fams format v1");
    assert_eq!(o.heap().len(), 4 << 20);
    o.close().unwrap();
    let (ok, out) = run(&["inspect", "--heap", h, "--json"]);
    assert!(ok && out.contains("\"header_version\": 2"), "{out}");
}

/// The power-loss model of the file system under an upgrade (as in the brief: anything written
/// since its last sync may be kept, dropped, or torn per 512-byte sector; a file created or
/// removed since the directory's last sync may or may not be there).
struct UpgradeDisk {
    header_durable: Vec<u8>,
    header_pending: Option<Vec<u8>>,
    side_durable: Option<Vec<u8>>,
    side_pending: Option<Vec<u8>>,
    side_exists: bool,
    side_exists_durable: bool,
}

impl UpgradeDisk {
    fn apply(&mut self, op: &fams::heap::upgrade::UpgradeOp) {
        use fams::heap::upgrade::UpgradeOp::*;
        match op {
            WriteSide(b) => {
                self.side_exists = true;
                self.side_pending = Some(b.clone());
            }
            SyncSide => self.side_durable = self.side_pending.take().or(self.side_durable.take()),
            SyncDir => self.side_exists_durable = self.side_exists,
            WriteHeader(b) => self.header_pending = Some(b.clone()),
            SyncHeader => self.header_durable = self.header_pending.take().unwrap_or(self.header_durable.clone()),
            RemoveSide => self.side_exists = false,
        }
    }

    /// One state the power cut may leave: (the header block, the side file if it is there).
    fn cut(&self, rng: &mut fams_tests::Rng) -> (Vec<u8>, Option<Vec<u8>>) {
        let tear = |old: &[u8], new: &[u8], rng: &mut fams_tests::Rng| -> Vec<u8> {
            let mut out = old.to_vec();
            for s in 0..new.len().div_ceil(512) {
                let r = s * 512..((s + 1) * 512).min(new.len());
                match rng.below(4) {
                    0 => {}
                    1 => out[r.clone()].fill(0xA5), // garbage
                    _ => out[r.clone()].copy_from_slice(&new[r]),
                }
            }
            out
        };
        let header = match &self.header_pending {
            Some(new) => tear(&self.header_durable, new, rng),
            None => self.header_durable.clone(),
        };
        let there = if self.side_exists == self.side_exists_durable { self.side_exists } else { rng.below(2) == 0 };
        let side = there.then(|| {
            let durable = self.side_durable.clone().unwrap_or_default();
            match &self.side_pending {
                Some(new) => {
                    // A torn new file: some prefix of its sectors reached the disk, torn.
                    let len = (rng.below(new.len() as u64 / 512 + 1) * 512) as usize;
                    let mut base = durable.clone();
                    base.resize(len, 0);
                    tear(&base, &new[..len], rng)
                }
                None => durable,
            }
        });
        (header, side)
    }
}

/// Cut the power after every operation of an upgrade's plan, `samples` torn states each; every
/// state must open with the committed data and with the old header or the new one. Returns the
/// states that failed.
fn cut_everywhere(ops: &[fams::heap::upgrade::UpgradeOp], old: &[u8], new: &[u8], samples: u64) -> (u64, Vec<String>) {
    let reference = reference_image();
    let mut rng = fams_tests::Rng::new(0x0b5e_1e7e);
    let (mut states, mut failures) = (0u64, Vec::new());
    for cut_after in 0..=ops.len() {
        let mut disk = UpgradeDisk {
            header_durable: old.to_vec(),
            header_pending: None,
            side_durable: None,
            side_pending: None,
            side_exists: false,
            side_exists_durable: false,
        };
        ops[..cut_after].iter().for_each(|op| disk.apply(op));
        for _ in 0..samples {
            let (header, side) = disk.cut(&mut rng);
            let dir = TempDir::new("upgrade-cut");
            copy_fixture("format-v1", &dir.0);
            let heap = dir.join("heap");
            let mut f = std::fs::OpenOptions::new().write(true).open(&heap).unwrap();
            std::io::Write::write_all(&mut f, &header).unwrap();
            drop(f);
            if let Some(s) = &side {
                std::fs::write(fams::heap::upgrade::side_path(&heap), s).unwrap();
            }
            states += 1;
            let what = format!(
                "cut after op {cut_after} ({:?}), side file {}",
                ops.get(cut_after.wrapping_sub(1)).map(short),
                side.as_ref().map_or("absent".into(), |s| format!("{} bytes", s.len()))
            );
            match Heap::open(&heap, &HeapOptions::default()) {
                Err(e) => failures.push(format!("{what}: the heap does not open: {e}")),
                Ok(h) => {
                    let ok_data = h.bytes() == &reference[..];
                    h.close().unwrap();
                    let now = raw_header(&heap);
                    if !ok_data {
                        failures.push(format!("{what}: the committed data changed"));
                    } else if now != old && now != new {
                        failures.push(format!("{what}: the header is neither the old nor the new one"));
                    } else if fams::heap::upgrade::side_path(&heap).exists() {
                        failures.push(format!("{what}: the side file was left behind"));
                    }
                }
            }
        }
    }
    (states, failures)
}

fn short(op: &fams::heap::upgrade::UpgradeOp) -> &'static str {
    use fams::heap::upgrade::UpgradeOp::*;
    match op {
        WriteSide(_) => "write side",
        SyncSide => "sync side",
        SyncDir => "sync dir",
        WriteHeader(_) => "write header",
        SyncHeader => "sync header",
        RemoveSide => "remove side",
    }
}

#[test]
fn an_upgrade_cut_by_power_loss_anywhere_leaves_the_old_header_or_the_new() {
    let _address = v1_address();
    let old = raw_header(&fixture_dir().join("heap"));
    let old_header = fams::HeapHeader::decode(&old).unwrap();
    let new = fams::HeapHeader { max_size: 4 << 20, ..old_header }.encode();
    let plan = fams::heap::upgrade::plan(&new);
    let (states, failures) = cut_everywhere(&plan, &old, &new, 24);
    eprintln!("upgrade plan: {states} power-cut states, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {states} states failed:\n{}", failures.len(), failures.join("\n"));

    // The checker can fail: writing the header in place without the side file leaves torn
    // headers that refuse to open.
    let naive = [fams::heap::upgrade::UpgradeOp::WriteHeader(new.clone()), fams::heap::upgrade::UpgradeOp::SyncHeader];
    let (states, failures) = cut_everywhere(&naive, &old, &new, 24);
    eprintln!("in-place write without a side file: {} of {states} states failed", failures.len());
    assert!(
        failures.iter().any(|f| f.contains("does not open")),
        "the power-loss model must catch an in-place header write"
    );
}
