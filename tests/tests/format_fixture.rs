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
