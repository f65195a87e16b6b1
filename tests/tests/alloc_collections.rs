//! Heap collections across processes: a child process builds vectors, boxes and maps in the
//! heap (some of them empty), commits, changes more without committing, and dies without
//! cleaning up; the parent — another process, with the program's code and statics at other
//! addresses (ASLR) — opens the heap and finds exactly the committed collections, usable:
//! lookups, inserts, growth, removal. An empty map is the interesting case: hashbrown points an
//! unallocated table at a static in the binary, which `PHashMap` must never leave in the heap.

use fams::alloc::{BySlice, FixedState, ObjectHeap, ObjectOptions, PBox, PHashMap, PVec};
use fams::{Heap, HeapOptions};
use fams_tests::*;
use std::path::Path;

fams::persistent! {
    struct Root<'h> {
        empty_map: PHashMap<'h, u64, u64>,
        empty_vec: PVec<'h, u32>,
        cleared_map: PHashMap<'h, u64, u64>,
        words: PHashMap<'h, PVec<'h, u8>, (u64, PVec<'h, u8>)>,
        numbers: PVec<'h, u64>,
        nested: PVec<'h, PVec<'h, u16>>,
        boxed: PBox<'h, [u64; 8]>,
        fixed: PHashMap<'h, u32, u32>,
    }
}

const SCHEMA: u64 = 7;

fn open_objects(path: &Path) -> ObjectHeap {
    let heap = Heap::open(path, &HeapOptions::default()).expect("open heap");
    ObjectHeap::open(heap, &ObjectOptions::schema(SCHEMA)).expect("open objects")
}

fn word(i: u64) -> Vec<u8> {
    format!("word-{i}-{}", "x".repeat((i % 40) as usize)).into_bytes()
}

#[test]
fn child_builds_collections() {
    if !is_child() {
        return; // run by the test below in its own process
    }
    let path = std::env::var("FAMS_HEAP").unwrap();
    let mut o = open_objects(Path::new(&path));
    let (root, a) = o
        .root_with_alloc(|a| Root {
            empty_map: PHashMap::new_in(a),
            empty_vec: PVec::new_in(a),
            cleared_map: PHashMap::new_in(a),
            words: PHashMap::new_in(a),
            numbers: PVec::new_in(a),
            nested: PVec::new_in(a),
            boxed: PBox::new_in([0; 8], a),
            fixed: PHashMap::with_hasher_in(FixedState::with_keys(1, 2), a),
        })
        .unwrap();
    for i in 0..5000u64 {
        let mut k = PVec::new_in(a);
        k.extend_from_slice(&word(i));
        let mut v = PVec::new_in(a);
        v.extend_from_slice(&i.to_le_bytes());
        root.words.insert(k, (i, v));
        root.numbers.push(i * i);
    }
    for i in 0..100u64 {
        root.cleared_map.insert(i, i);
        let mut inner = PVec::new_in(a);
        inner.extend((0..i as u16).map(|x| x * 2));
        root.nested.push(inner);
    }
    root.cleared_map.clear();
    root.cleared_map.shrink_to_fit();
    root.boxed[3] = 33;
    for i in 0..1000u32 {
        root.fixed.insert(i, !i);
    }
    o.commit().unwrap();
    // Not committed: lost when the process dies.
    let root: &mut Root = o.root(|_| unreachable!()).unwrap();
    root.empty_map.insert(1, 1);
    root.numbers.clear();
    root.words.clear();
    println!("committed");
    crash_exit();
}

#[test]
fn collections_built_in_another_process_are_usable_here() {
    if is_child() {
        return;
    }
    let dir = TempDir::new("alloc-collections");
    let path = dir.join("h");
    format(&path, 64 << 20, Some(32 << 20));
    let out = run_child("child_builds_collections", &[("FAMS_HEAP", path.display().to_string())]);
    assert!(out.contains("committed"), "{out}");

    let mut o = open_objects(&path);
    let report = o.check().unwrap();
    let root: &mut Root = o.root(|_| unreachable!("the child made the root")).unwrap();
    assert!(root.empty_map.is_empty() && root.empty_map.get(&1).is_none());
    assert!(root.empty_vec.is_empty());
    assert!(root.cleared_map.is_empty() && root.cleared_map.get(&5).is_none());
    assert_eq!(root.words.len(), 5000);
    for i in 0..5000u64 {
        let (n, v) = root.words.get(&BySlice(&word(i))).unwrap_or_else(|| panic!("word {i} missing"));
        assert_eq!((*n, &v[..]), (i, &i.to_le_bytes()[..]));
    }
    assert!(root.numbers.iter().enumerate().all(|(i, &x)| x == (i * i) as u64) && root.numbers.len() == 5000);
    assert!(root
        .nested
        .iter()
        .enumerate()
        .all(|(i, v)| v.len() == i && v.iter().enumerate().all(|(j, &x)| x == 2 * j as u16)));
    assert_eq!(root.boxed[3], 33);
    assert!((0..1000u32).all(|i| root.fixed.get(&i) == Some(&!i)));

    // Everything keeps working here: the empty map and vector grow, the maps change.
    for i in 0..1000u64 {
        root.empty_map.insert(i, i + 1);
        root.cleared_map.insert(i, i);
        root.empty_vec.push(i as u32);
    }
    for i in 0..2500u64 {
        assert!(root.words.remove(&BySlice(&word(i))).is_some());
    }
    root.nested.truncate(10);
    o.commit().unwrap();
    let after = o.check().unwrap();
    assert!(after.small_objects < report.small_objects, "{after:?} vs {report:?}");
    drop(o);
    let mut o = open_objects(&path);
    let root: &mut Root = o.root(|_| unreachable!()).unwrap();
    assert_eq!(root.empty_map.len(), 1000);
    assert_eq!(root.empty_map.get(&999), Some(&1000));
    assert_eq!(root.words.len(), 2500);
    assert_eq!(root.empty_vec.len(), 1000);
}
