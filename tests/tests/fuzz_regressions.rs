//! The fuzz targets' code paths, run in CI on the kept inputs: every file under
//! `tests/fuzz/regressions/` goes through every target (`decode_superblock`, `decode_heap_header`, `decode_record`,
//! `recover_from_bytes`, `decode_datagram`, `endpoint_inputs`, `alloc_damage`) and must not panic. The harness is the fuzz project's
//! own (`tests/fuzz/src/lib.rs`), compiled in here, so these are the same checks the fuzzer runs.
//!
//! The kept inputs are seeds made from real logs by `tests/fuzz/examples/make_seeds.rs` (names
//! `area-*` and `raw-*` are recover_from_bytes inputs of the two shapes, some with other selector
//! bits; `sb-*` superblock slots; `rec-*` records) and the inputs of fixed findings (`finding-*`).
//! Inputs of findings (all fixed) live in `tests/fuzz/findings/` and run in the tests below.
//! To replay one input: `cargo test -p fams-tests --test fuzz_regressions -- --nocapture` prints
//! each file as it runs it; or in tests/fuzz, `cargo fuzz run TARGET FILE`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use fams::log_format::{Superblock, BLOCK};
use std::path::PathBuf;

fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions")
}

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(regressions_dir())
        .expect("tests/fuzz/regressions")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(regressions_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_kept_input_passes_every_target() {
    let inputs = inputs();
    assert!(inputs.len() >= 10, "the kept inputs are missing: {} files", inputs.len());
    let mut failed = Vec::new();
    for (name, data) in &inputs {
        for (target, run) in [
            ("decode_superblock", harness::decode_superblock as fn(&[u8])),
            ("decode_heap_header", harness::decode_heap_header),
            ("decode_record", harness::decode_record),
            ("recover_from_bytes", harness::recover_from_bytes),
            ("decode_datagram", harness::decode_datagram),
            ("endpoint_inputs", |d: &[u8]| {
                harness::endpoint_inputs(d);
            }),
            ("alloc_damage", harness::alloc_damage),
        ] {
            eprintln!("{target} {name} ({} bytes)", data.len());
            if std::panic::catch_unwind(|| run(data)).is_err() {
                failed.push(format!("{target} {name}"));
            }
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:?}");
}

/// The seeds are what they claim: real logs whose records recovery replays through the harness's
/// shapes (otherwise the fuzzer would only ever explore rejections).
#[test]
fn the_seeds_from_real_logs_replay_their_records() {
    let replayed = |name: &str| {
        let b = harness::build(&input(name)).expect("builds");
        let (res, _, _) = fams::sim::recover_images(b.log, b.heap, b.salvage);
        res.unwrap_or_else(|e| panic!("{name}: {e}")).records_replayed
    };
    assert_eq!(replayed("area-one"), 1);
    assert_eq!(replayed("area-group"), 6, "six records in four device writes");
    // Tail near the end of the area, the next record at its start: the chain wraps.
    assert_eq!(replayed("area-wrap41"), 1);
    assert_eq!(replayed("raw-wrap42"), 2);
    // Records of the current epoch after stale ones of the previous epoch.
    assert_eq!(replayed("raw-reopened"), 2);
    // Selector variants: the superblock in slot B with an older one in slot A.
    assert_eq!(replayed("area-one-slot-b-with-old-sb"), 1);
    // The superblock one epoch behind the log's record: the newest superblock was lost.
    let b = harness::build(&input("area-one-newer-epoch")).unwrap();
    let (res, _, _) = fams::sim::recover_images(b.log, b.heap, b.salvage);
    assert!(matches!(res, Err(fams::Error::MediaCorruption { .. })), "{res:?}");
    let b = harness::build(&input("area-one-newer-epoch-salvage")).unwrap();
    let (res, _, _) = fams::sim::recover_images(b.log, b.heap, b.salvage);
    let report = res.unwrap();
    assert!(report.salvaged.is_some() && report.records_replayed == 0, "{report:?}");
}

/// The allocator's fuzz target on inputs drawn from a fixed seed (the fuzzer explores further
/// with `cargo fuzz run alloc_damage`): no input may panic, and between them they must reach
/// each outcome — damage written, allocations refused, frees, and problems found by `check`.
#[test]
fn allocator_damage_inputs_never_panic() {
    let mut state = 0x00a1_10c0_da3a_6e00u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut total = fams::alloc::fuzz::DamageOutcome::default();
    let inputs = 5_000;
    for i in 0..inputs {
        let len = 1 + (next() % 160) as usize;
        let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let out = std::panic::catch_unwind(|| fams::alloc::fuzz::run(&input))
            .unwrap_or_else(|_| panic!("input {i} panicked: {input:02x?}"));
        total.damages += out.damages;
        total.allocations_failed += out.allocations_failed;
        total.frees += out.frees;
        total.check_problems += out.check_problems;
    }
    eprintln!("alloc_damage: {inputs} inputs, {total:?}");
    assert!(total.damages > inputs && total.allocations_failed > 0 && total.frees > 0 && total.check_problems > 0);
}

/// The harness's CRC32C (used to re-seal mutated inputs) is the one the format uses.
#[test]
fn the_harness_crc_is_the_formats() {
    let mut sb = Superblock::new(fams::HeapId([3; 16]), 1 << 20);
    sb.tail_lsn = 77;
    let mut out = vec![0u8; BLOCK];
    sb.encode(&mut out);
    assert_eq!(harness::crc32c(&out[..128]).to_le_bytes(), out[128..132]);
    assert_eq!(harness::crc32c(b"123456789"), 0xe306_9283);
}

// ---------------------------------------------------------------------------------------------
// Fuzz findings, fixed in 350fed6. Their inputs are kept in regressions/finding-* (so the test
// above runs them too); these run them directly and add hand-made
// reproductions. An open finding gets an `
fn finding(name: &str) -> Vec<u8> {
    input(&format!("finding-{name}"))
}

/// Counter overflow. The fuzzer's input (minimised, 55 bytes): the area shape, with the tail record's epoch field
/// all ones, so the superblock the harness writes has epoch u64::MAX.
#[test]
fn fixed_counter_overflow_fuzz_input() {
    harness::recover_from_bytes_unfiltered(&finding("counter-overflow-epoch"));
}

const MIN_LOG: usize = fams::log_format::LOG_SIZE_MIN as usize;

/// A valid heap file (16 pages) and a log holding `sb` (changed by `edit`) and, if `lsn` is given,
/// one record with that LSN at the tail writing 8 bytes at heap offset 0.
fn images(edit: impl FnOnce(&mut Superblock), lsn: Option<u64>) -> (Vec<u8>, Vec<u8>, Superblock) {
    use fams::log_format::{push_entry, round_up_block, seal_record, RecordHeader, RECORD_HEADER_BYTES};
    let id = fams::HeapId([0x42; 16]);
    let mut sb = Superblock::new(id, MIN_LOG as u64);
    edit(&mut sb);
    let mut log = vec![0u8; MIN_LOG];
    let at = sb.slot_offset() as usize;
    sb.encode(&mut log[at..at + BLOCK]);
    if let Some(lsn) = lsn {
        let mut payload = Vec::new();
        push_entry(&mut payload, 0, &7u64.to_le_bytes());
        let total = round_up_block((RECORD_HEADER_BYTES + payload.len()) as u64) as usize;
        let mut rec = vec![0u8; total];
        rec[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(&payload);
        let h = RecordHeader {
            lsn,
            group_first_lsn: lsn,
            heap_id: id,
            epoch: sb.epoch,
            total_len: total as u32,
            payload_len: payload.len() as u32,
            entry_count: 1,
            payload_crc: 0,
        };
        seal_record(&mut rec, &h);
        let t = sb.tail_offset as usize;
        log[t..t + total].copy_from_slice(&rec);
    }
    let header = fams::HeapHeader {
        heap_id: id,
        heap_size: 16 * 4096,
        max_size: 16 * 4096,
        base_addr: 0x4000_0000_0000,
        log_size: MIN_LOG as u64,
        created_unix: 0,
        log_path: "x.log".into(),
    };
    let mut heap = header.encode();
    heap.resize(4096 + 16 * 4096, 0);
    (log, heap, sb)
}

/// Recovery must not panic, and when it succeeds the superblock it wrote must be the one the next
/// open reads (otherwise the next open replays from the old tail with the old epoch and ignores
/// every record written since).
fn recovery_writes_a_readable_superblock(log: Vec<u8>, heap: Vec<u8>, before: Superblock) {
    let (res, _, log_after) = std::panic::catch_unwind(|| fams::sim::recover_images(log, heap, false))
        .unwrap_or_else(|_| panic!("recovery panicked on a log whose superblock is {before:?}"));
    if let Ok(report) = res {
        let now = harness::current_superblock(&log_after).expect("a superblock");
        assert_eq!(
            now.sequence,
            before.sequence.wrapping_add(1),
            "after recovery ({report:?}) the current superblock is still {now:?}: the one recovery wrote does not decode"
        );
    }
}

#[test]
fn fixed_counter_overflow_epoch() {
    let (log, heap, sb) = images(|sb| sb.epoch = u64::MAX, None);
    recovery_writes_a_readable_superblock(log, heap, sb);
}

#[test]
fn fixed_counter_overflow_sequence() {
    let (log, heap, sb) = images(|sb| sb.sequence = u64::MAX, None);
    recovery_writes_a_readable_superblock(log, heap, sb);
}

#[test]
fn fixed_counter_overflow_lsn() {
    let (log, heap, sb) = images(|sb| sb.tail_lsn = u64::MAX, Some(u64::MAX));
    recovery_writes_a_readable_superblock(log, heap, sb);
}

/// Counters well below the limit recover normally: the fix refuses only the top.
#[test]
fn large_counters_below_the_limit_recover() {
    let big = fams::log_format::COUNTER_MAX / 2;
    for (edit, lsn) in [
        (Box::new(move |sb: &mut Superblock| sb.epoch = big) as Box<dyn FnOnce(&mut Superblock)>, None),
        (Box::new(move |sb: &mut Superblock| sb.sequence = big), None),
        (Box::new(move |sb: &mut Superblock| sb.tail_lsn = big), Some(big)),
    ] {
        let (log, heap, sb) = images(edit, lsn);
        recovery_writes_a_readable_superblock(log.clone(), heap.clone(), sb);
        let (res, heap_after, _) = fams::sim::recover_images(log, heap, false);
        let report = res.unwrap();
        assert_eq!(report.records_replayed, lsn.is_some() as u64);
        if lsn.is_some() {
            assert_eq!(heap_after[4096..4104], 7u64.to_le_bytes());
        }
    }
}

/// At the limit: a superblock whose epoch or sequence is COUNTER_MAX - 1 still decodes, so
/// recovery accepts it and writes the next one, with COUNTER_MAX, which does not decode.
#[test]
fn fixed_counter_boundary() {
    let top = fams::log_format::COUNTER_MAX - 1;
    let mut failed = Vec::new();
    for (what, edit, lsn) in [
        ("epoch", Box::new(move |sb: &mut Superblock| sb.epoch = top) as Box<dyn FnOnce(&mut Superblock)>, None),
        ("sequence", Box::new(move |sb: &mut Superblock| sb.sequence = top), None),
        ("tail LSN", Box::new(move |sb: &mut Superblock| sb.tail_lsn = top), Some(top)),
    ] {
        let (log, heap, sb) = images(edit, lsn);
        if std::panic::catch_unwind(|| recovery_writes_a_readable_superblock(log, heap, sb)).is_err() {
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "unreadable superblock after recovery with {failed:?} = COUNTER_MAX - 1");
}

/// The fuzz harness's shape of the same: the area shape, whose superblock takes its epoch
/// (COUNTER_MAX - 1) from the bytes at the tail.
#[test]
fn fixed_counter_boundary_fuzz_input() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/findings/counter-boundary-epoch");
    harness::recover_from_bytes_unfiltered(&std::fs::read(p).unwrap());
}

/// Newer-epoch header with impossible lengths. Hand-minimised from the fuzzer's input (75 bytes): the area shape with re-sealing (selector
/// bit 3) and the superblock one epoch behind the record (bit 2); the one "record" is a header
/// with a valid checksum, epoch 5 (the superblock's is 4) and total length 0.
#[test]
fn fixed_newer_epoch_bad_lengths_fuzz_input() {
    harness::recover_from_bytes_unfiltered(&finding("newer-epoch-bad-lengths"));
}

/// The same with a real superblock and no harness: a valid header of a newer epoch with an
/// impossible length anywhere in the unreplayed part of the log panics recovery (release too).
#[test]
fn fixed_newer_epoch_bad_lengths() {
    use fams::log_format::RecordHeader;
    for (total_len, payload_len, group_first_lsn) in [(0u32, 0u32, 1u64), (4096, 8000, 1), (4096, 8, 2)] {
        let (mut log, heap, sb) = images(|sb| sb.epoch = 4, None);
        let h = RecordHeader {
            lsn: 1,
            group_first_lsn,
            heap_id: sb.heap_id,
            epoch: 5,
            total_len,
            payload_len,
            entry_count: 0,
            payload_crc: 0,
        };
        let at = sb.tail_offset as usize + 3 * BLOCK;
        h.encode(&mut log[at..at + BLOCK]);
        let res = std::panic::catch_unwind(|| fams::sim::recover_images(log, heap, false));
        let (res, _, _) = res.unwrap_or_else(|_| panic!("recovery panicked on {h:?}"));
        // A foreign header is not a record of the newer epoch: recovery may ignore it or refuse,
        // but must answer.
        let _ = res;
    }
}

/// Real datagrams (DATA, ACK with a selective ack, HELLO; unkeyed and keyed) and seeded random
/// scripts through the transport targets — what the fuzzer starts from, run in CI.
#[test]
fn transport_targets_on_real_datagrams_and_random_scripts() {
    use fams::transport::wire::{self, Datagram, Fragment, Header, Sack};
    use fams::transport::NodeId;
    let header = Header { sender: NodeId(2), receiver: NodeId(1), incarnation: 1, ack: 0 };
    let payload = [7u8; 100];
    let bitmap = [0b101u8];
    let datagrams = [
        Datagram::Data {
            header,
            fragment: Fragment { seq: 1, message_len: 100, frag_index: 0, frag_count: 1, payload: &payload },
        },
        Datagram::Ack { header, sack: Some(Sack { seq: 1, frag_count: 3, bitmap: &bitmap }) },
        Datagram::Hello { header },
    ];
    let key = [0x42u8; 32];
    let mut script = Vec::new();
    for d in &datagrams {
        for k in [None, Some(&key)] {
            let mut bytes = Vec::new();
            wire::encode(d, k, &mut bytes);
            harness::decode_datagram(&bytes);
            if k.is_none() {
                // As a script step: op 1 (deliver as is), its length, the bytes; then consume.
                script.push(1);
                script.push(bytes.len() as u8);
                script.extend_from_slice(&bytes);
                script.push(4);
            }
        }
    }
    script.extend_from_slice(&[3, 2, 2, 50, 6, 5, 6]);
    assert_eq!(harness::endpoint_inputs(&script), 1, "the scripted DATA must be delivered");
    let mut rng = fams_tests::Rng::new(99);
    for _ in 0..2_000 {
        let len = rng.below(600) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        harness::decode_datagram(&data);
        harness::endpoint_inputs(&data);
    }
}

/// The heap-header target on mutations of the two real headers kept as inputs (the fuzzer
/// explores further with `cargo fuzz run decode_heap_header`): byte flips, length changes and
/// field values at their edges; none may panic, and with the checksum fixed up some must decode.
#[test]
fn heap_header_decode_survives_mutated_headers() {
    let seeds: Vec<Vec<u8>> = ["heap-header-v1", "heap-header-v2"]
        .iter()
        .map(|n| std::fs::read(regressions_dir().join(n)).unwrap())
        .collect();
    let mut rng = fams_tests::Rng::new(0x4ea_d3e2);
    let (mut decoded, runs) = (0u32, 20_000u32);
    for i in 0..runs {
        let mut b = seeds[i as usize % 2].clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(b.len() as u64) as usize;
            b[at] = match rng.below(3) {
                0 => rng.below(256) as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        if rng.below(8) == 0 {
            b.truncate(rng.below(b.len() as u64) as usize);
        }
        let padded = {
            let mut p = b.clone();
            p.resize(4096, 0);
            let crc = harness::crc32c(&p[..4092]);
            p[4092..].copy_from_slice(&crc.to_le_bytes());
            p
        };
        decoded += u32::from(fams::HeapHeader::decode(&padded).is_ok());
        if std::panic::catch_unwind(|| harness::decode_heap_header(&b)).is_err() {
            panic!("decode_heap_header panicked on mutation {i}: {b:?}");
        }
    }
    eprintln!("{runs} mutated headers, {decoded} decoded after resealing");
    assert!(decoded > 0 && decoded < runs, "the mutations reach both outcomes: {decoded} of {runs} decoded");
}
