//! A persistent key-value store: a hashbrown map of byte strings that lives in a fams heap.
//!
//! ```sh
//! kv --heap store.heap put greeting hello     # formats store.heap on first use
//! kv --heap store.heap get greeting           # prints hello
//! kv --heap store.heap scan [PREFIX]          # KEY<TAB>VALUE lines, sorted by key
//! kv --heap store.heap del greeting
//! kv --heap store.heap load < commands        # "put KEY VALUE" / "del KEY" per line;
//!                                             # prints "ok N" once line N is durable
//! kv --heap store.heap check                  # verify the allocator's metadata and the map
//! ```
//!
//! Every command is one commit: after a crash the store holds every acknowledged write and no
//! half-done one. The map, its keys and values are all in the heap; nothing is loaded or saved.
//! Options: `--size BYTES` (heap size when formatting; K/M/G suffixes; default 256M),
//! `--log-size BYTES` (default 64M).

use fams::alloc::{BySlice, HeapAlloc, ObjectError, ObjectHeap, ObjectOptions, PHashMap, PVec};
use fams::{FormatOptions, Heap, HeapOptions};
use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Bump when `Store` changes; older heaps are then refused with a clear error.
const SCHEMA_VERSION: u64 = 1;

fams::persistent! {
    /// The root object: the map and a few counters.
    struct Store<'h> {
        map: PHashMap<'h, PVec<'h, u8>, PVec<'h, u8>>,
        puts: u64,
        dels: u64,
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: kv --heap PATH [--size BYTES] [--log-size BYTES] COMMAND\n\
         commands: put KEY VALUE | get KEY | del KEY | scan [PREFIX] | load | check"
    );
    ExitCode::from(64)
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Why a command failed: a full heap is a message and exit status 2, not a crash.
enum Failure {
    Full(String),
    Other(String),
}

impl From<ObjectError> for Failure {
    fn from(e: ObjectError) -> Failure {
        match e {
            e @ ObjectError::Exhausted { .. } => Failure::Full(e.to_string()),
            e => Failure::Other(e.to_string()),
        }
    }
}

fn bytes_in<'h>(a: HeapAlloc<'h>, b: &[u8]) -> Result<PVec<'h, u8>, Failure> {
    let mut v = PVec::new_in(a);
    v.try_reserve_exact(b.len()).map_err(|_| Failure::Full(format!("heap full: no room for {} bytes", b.len())))?;
    v.extend_from_slice(b);
    Ok(v)
}

/// Insert or replace. Reserves everything first, so a full heap fails before changing anything.
fn put<'h>(store: &mut Store<'h>, a: HeapAlloc<'h>, key: &[u8], value: &[u8]) -> Result<(), Failure> {
    let full = |what: &str| Failure::Full(format!("heap full: no room for {what}"));
    if let Some(v) = store.map.get_mut(&BySlice(key)) {
        if v.capacity() < value.len() || v.capacity() > 2 * value.len().max(16) {
            let fresh = bytes_in(a, value)?;
            *v = fresh;
        } else {
            v.clear();
            v.extend_from_slice(value);
        }
    } else {
        let k = bytes_in(a, key)?;
        let v = bytes_in(a, value)?;
        store.map.try_reserve(1).map_err(|_| full("another map entry"))?;
        store.map.insert(k, v);
    }
    store.puts += 1;
    Ok(())
}

fn del(store: &mut Store<'_>, key: &[u8]) -> bool {
    let found = store.map.remove(&BySlice(key)).is_some();
    store.dels += found as u64;
    found
}

fn open(path: &PathBuf, size: u64, log_size: u64) -> Result<ObjectHeap, String> {
    if !path.exists() {
        let mut f = FormatOptions::new(path, size);
        f.log_size_bytes = Some(log_size);
        Heap::format(&f).map_err(|e| e.to_string())?;
    }
    let heap = Heap::open(path, &HeapOptions::default()).map_err(|e| e.to_string())?;
    ObjectHeap::open(heap, &ObjectOptions::schema(SCHEMA_VERSION)).map_err(|e| e.to_string())
}

fn new_store(a: HeapAlloc<'_>) -> Store<'_> {
    Store { map: PHashMap::new_in(a), puts: 0, dels: 0 }
}

fn run(objects: &mut ObjectHeap, cmd: &str, args: &[std::ffi::OsString]) -> Result<ExitCode, Failure> {
    let arg = |i: usize| args.get(i).map(|a| a.as_bytes());
    let out = std::io::stdout();
    let mut out = out.lock();
    match (cmd, args.len()) {
        ("put", 2) => {
            let (store, a) = objects.root_with_alloc(new_store)?;
            put(store, a, arg(0).unwrap(), arg(1).unwrap())?;
            objects.commit()?;
        }
        ("get", 1) => {
            let store = objects.root(new_store)?;
            match store.map.get(&BySlice(arg(0).unwrap())) {
                Some(v) => {
                    let _ = out.write_all(v).and_then(|_| out.write_all(b"\n"));
                }
                None => {
                    eprintln!("not found");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        ("del", 1) => {
            let store = objects.root(new_store)?;
            let found = del(store, arg(0).unwrap());
            objects.commit()?;
            if !found {
                eprintln!("not found");
                return Ok(ExitCode::from(1));
            }
        }
        ("scan", 0 | 1) => {
            let prefix = arg(0).unwrap_or(b"");
            let store = objects.root(new_store)?;
            let mut rows: Vec<(&[u8], &[u8])> =
                store.map.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (&k[..], &v[..])).collect();
            rows.sort_unstable();
            for (k, v) in rows {
                let _ = out
                    .write_all(k)
                    .and_then(|_| out.write_all(b"\t"))
                    .and_then(|_| out.write_all(v))
                    .and_then(|_| out.write_all(b"\n"));
            }
        }
        ("check", 0) => {
            let report = objects.check()?;
            let store = objects.root(new_store)?;
            let (entries, bytes) =
                store.map.iter().fold((0u64, 0u64), |(n, b), (k, v)| (n + 1, b + (k.len() + v.len()) as u64));
            let _ = writeln!(
                out,
                "ok: {entries} entries, {bytes} bytes of keys and values, {} puts, {} dels; {report:?}",
                store.puts, store.dels
            );
        }
        ("load", 0) => {
            let stdin = std::io::stdin();
            let mut n = 0u64;
            for line in stdin.lock().split(b'\n') {
                let line = line.map_err(|e| Failure::Other(format!("reading stdin: {e}")))?;
                if line.is_empty() {
                    continue;
                }
                let mut parts = line.splitn(3, |&b| b == b' ');
                let (op, key, value) = (parts.next(), parts.next(), parts.next());
                let (store, a) = objects.root_with_alloc(new_store)?;
                match (op, key, value) {
                    (Some(b"put"), Some(k), Some(v)) => put(store, a, k, v)?,
                    (Some(b"del"), Some(k), None) => {
                        del(store, k);
                    }
                    _ => {
                        return Err(Failure::Other(format!("bad line {}: {:?}", n + 1, String::from_utf8_lossy(&line))))
                    }
                }
                objects.commit()?;
                n += 1;
                let _ = writeln!(out, "ok {n}");
            }
        }
        _ => return Ok(usage()),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut heap = None;
    let (mut size, mut log_size) = (256u64 << 20, 64u64 << 20);
    while args.first().is_some_and(|a| a.as_bytes().starts_with(b"--")) {
        let flag = args.remove(0);
        let Some(value) = (!args.is_empty()).then(|| args.remove(0)) else { return usage() };
        let value_str = value.to_string_lossy().into_owned();
        match flag.to_str() {
            Some("--heap") => heap = Some(PathBuf::from(value)),
            Some("--size") => match parse_size(&value_str) {
                Some(s) => size = s,
                None => return usage(),
            },
            Some("--log-size") => match parse_size(&value_str) {
                Some(s) => log_size = s,
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    let (Some(heap), false) = (heap, args.is_empty()) else { return usage() };
    let cmd = args.remove(0).to_string_lossy().into_owned();
    let mut objects = match open(&heap, size, log_size) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kv: {e}");
            return ExitCode::from(3);
        }
    };
    match run(&mut objects, &cmd, &args) {
        Ok(code) => code,
        Err(Failure::Full(e)) => {
            eprintln!("kv: {e} (nothing was changed)");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("kv: {e}");
            ExitCode::from(3)
        }
    }
}
