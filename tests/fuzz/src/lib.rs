//! The code paths the fuzz targets drive, with the properties they check. Each function takes
//! any bytes, must never panic on its own account, and panics (an assert) only when a property
//! of fams is violated.
//!
//! This file is also compiled into the `fams-tests` test `fuzz_regressions` (with `#[path]`), so
//! the regression inputs under `tests/fuzz/regressions/` run through exactly these paths in CI.
//! It depends on nothing but `fams` and std.

use fams::heap_file::{HeapHeader, HeapId, HEADER_BYTES};
use fams::log_format::{self, RecordHeader, Superblock, AREA_START, BLOCK, ENTRY_LEN_MAX, RECORD_HEADER_BYTES};

/// The heap `recover_from_bytes` recovers into: small, so entries of real seed logs (made by
/// `examples/make_seeds.rs` with the same size) fit.
pub const FUZZ_HEAP_PAGES: u64 = 16;
const FIXED_ID: HeapId = HeapId([0x5a; 16]);

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), so the targets can re-seal mutated headers and payloads and get past the
// checksums to the checks behind them. Table-driven; the table is built at compile time.

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC_TABLE: [u32; 256] = crc_table();

pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------------
// decode_superblock

/// `Superblock::decode` on the bytes as they are, and with the checksum fixed up (padded to a
/// slot) so its field checks are reached. Never panics; what decodes round-trips.
pub fn decode_superblock(data: &[u8]) {
    check_superblock(data);
    let mut b = data.to_vec();
    if b.len() < BLOCK {
        b.resize(BLOCK, 0);
    }
    // Where the checksum sits depends on the superblock version (1: at 96; 2: at 104; 3: at 120;
    // 4: at 128).
    let crc_at = match u32_at(&b, 8) {
        1 => 96,
        2 => 104,
        3 => 120,
        _ => 128,
    };
    let crc = crc32c(&b[..crc_at]);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    check_superblock(&b);
}

fn check_superblock(b: &[u8]) {
    let Ok(sb) = Superblock::decode(b) else { return };
    // What decode accepts is self-consistent, so the code that follows may trust it.
    assert!(sb.area_start == AREA_START && sb.area_start < sb.area_end && sb.area_end <= sb.log_size);
    assert!(sb.area_start <= sb.tail_offset && sb.tail_offset < sb.area_end);
    assert!(sb.tail_offset % BLOCK as u64 == 0 && sb.area_end % BLOCK as u64 == 0);
    assert!(sb.capacity_bytes() > 0);
    assert!(sb.slot_offset() < 2 * BLOCK as u64);
    // encode → decode is the identity; the fields and the checksum are where the format says.
    let mut out = vec![0u8; BLOCK];
    sb.encode(&mut out);
    assert_eq!(Superblock::decode(&out), Ok(sb), "encode/decode round trip");
    // (Older slots are written back as version 4, with what they did not record as 0.)
    assert!(sb.written_limit_bytes <= sb.capacity_bytes());
    assert_eq!(out[0..8], b[0..8], "magic");
    assert_eq!(out[16..96], b[16..96], "fields");
    if u32_at(b, 8) >= 2 {
        assert_eq!(out[96..104], b[96..104], "heap size");
    }
    if u32_at(b, 8) >= 3 {
        assert_eq!(out[104..120], b[104..120], "written limit and I/O choice");
    }
    if u32_at(b, 8) == 4 {
        assert_eq!(out[8..12], b[8..12], "version");
        assert_eq!(out[120..128], b[120..128], "replayed-until LSN");
    }
}

// ---------------------------------------------------------------------------------------------
// decode_heap_header

/// `HeapHeader::decode` on the bytes as they are, and padded to a header block with the checksum
/// fixed up so the field checks are reached. Never panics; what decodes is usable (the mapping
/// code that follows trusts it) and round-trips through `encode`.
pub fn decode_heap_header(data: &[u8]) {
    check_heap_header(data);
    let mut b = data.to_vec();
    b.resize(HEADER_BYTES as usize, 0);
    let crc = crc32c(&b[..HEADER_BYTES as usize - 4]);
    b[HEADER_BYTES as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    check_heap_header(&b);
}

fn check_heap_header(b: &[u8]) {
    let Ok(h) = HeapHeader::decode(b) else { return };
    let page = fams::PAGE_SIZE as u64;
    assert!(h.heap_size > 0 && h.heap_size % page == 0, "size {}", h.heap_size);
    assert!(h.max_size >= h.heap_size && h.max_size % page == 0, "max {}", h.max_size);
    assert!(h.base_addr % page == 0 && h.base_addr.checked_add(h.max_size).is_some(), "base {:#x}", h.base_addr);
    assert!(h.log_path.len() <= fams::heap_file::LOG_PATH_MAX);
    let out = h.encode();
    assert_eq!(HeapHeader::decode(&out).as_ref(), Ok(&h), "encode/decode round trip");
    // A version-2 header is written back byte for byte (version 1 comes back as version 2).
    if u32_at(b, 8) == 2 {
        assert_eq!(&out[..], &b[..HEADER_BYTES as usize], "version-2 header round trip");
    }
}

// ---------------------------------------------------------------------------------------------
// decode_record

/// `RecordHeader::decode` with a fixed identity and epoch, with the identity and epoch the bytes
/// themselves carry, and with the header checksum fixed up; `decode_entries` on the payload of
/// whatever decodes, and on the raw bytes after the header. Never panics; decoded entries lie
/// inside the heap size passed, inside one page, inside the payload.
pub fn decode_record(data: &[u8]) {
    check_record(data, FIXED_ID, 1);
    if data.len() >= 48 {
        let id = HeapId(data[24..40].try_into().unwrap());
        let epoch = u64_at(data, 40);
        check_record(data, id, epoch);
        if data.len() >= RECORD_HEADER_BYTES {
            let mut b = data.to_vec();
            let crc = crc32c(&b[..64]);
            b[64..68].copy_from_slice(&crc.to_le_bytes());
            check_record(&b, id, epoch);
        }
    }
    // The entry decoder on its own: the payload is whatever follows a header, the count is the
    // header's field, whatever the checksums say.
    if data.len() >= RECORD_HEADER_BYTES {
        let count = u32_at(data, 56);
        let payload_len = (u32_at(data, 52) as usize).min(data.len() - RECORD_HEADER_BYTES);
        let payload = &data[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len];
        check_entries(payload, count);
        check_entries(&data[RECORD_HEADER_BYTES..], count);
    }
}

fn check_record(b: &[u8], id: HeapId, epoch: u64) {
    let h = match RecordHeader::decode(b, id, epoch) {
        Ok(h) => h,
        Err(_) => return,
    };
    assert_eq!(h.heap_id, id);
    assert_eq!(h.epoch, epoch);
    assert!(h.total_len > 0 && h.total_len as usize % BLOCK == 0);
    assert!(RECORD_HEADER_BYTES as u64 + h.payload_len as u64 <= h.total_len as u64);
    assert!(h.group_first_lsn <= h.lsn);
    // Everything decode checks is in the header: encoding what it returned gives the bytes back.
    let mut out = [0u8; RECORD_HEADER_BYTES];
    h.encode(&mut out);
    assert_eq!(out[..], b[..RECORD_HEADER_BYTES], "header encode/decode round trip");
    // Recovery reads total_len bytes and checksums 72..72+payload_len of them.
    let end = RECORD_HEADER_BYTES + h.payload_len as usize;
    if end <= b.len() {
        check_entries(&b[RECORD_HEADER_BYTES..end], h.entry_count);
    }
}

fn check_entries(payload: &[u8], count: u32) {
    for heap_size in [BLOCK as u64, FUZZ_HEAP_PAGES * BLOCK as u64, u64::MAX / BLOCK as u64 * BLOCK as u64] {
        let Ok(entries) = log_format::decode_entries(payload, count, heap_size) else { continue };
        assert_eq!(entries.len(), count as usize);
        let range = payload.as_ptr_range();
        for e in &entries {
            assert!(!e.data.is_empty() && e.data.len() <= ENTRY_LEN_MAX);
            let end = e.offset.checked_add(e.data.len() as u64).expect("entry end overflows");
            assert!(end <= heap_size, "entry {}+{} outside a heap of {heap_size}", e.offset, e.data.len());
            assert_eq!(e.offset / BLOCK as u64, (end - 1) / BLOCK as u64, "entry crosses a page");
            let d = e.data.as_ptr_range();
            assert!(range.start <= d.start && d.end <= range.end, "entry data outside the payload");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// recover_from_bytes

/// Shape of the log built from a `recover_from_bytes` input, chosen by its first byte.
///
/// Byte 0 (`sel`): bit 0 set = **raw**: bytes 1.. are the whole log image (the heap's identity
/// is taken from superblock slot A, or slot B with bit 1). Bit 0 clear = **area**: bytes 3.. are
/// the record area behind a valid superblock that the target writes:
/// - byte 1: the tail block (modulo the area's blocks); the heap identity, the epoch and the tail
///   LSN come from the first block from the tail on (circularly) that starts with the record
///   magic, or from the tail block when none does;
/// - byte 2: added to that LSN (as i8);
/// - bit 1: the superblock goes to slot B (sequence 3) instead of slot A (sequence 2);
/// - bit 2: the superblock's epoch is one less than the tail record's (records of a newer epoch
///   than the superblock: proof that a newer superblock was lost);
/// - bit 3: re-seal: every block of the area that starts with the record magic gets its payload
///   and header checksums recomputed, so mutated headers and entries are reached;
/// - bit 4: the other slot holds an older valid superblock (sequence and epoch one less, tail at
///   the area start).
///
/// In both shapes bit 7 asks for `salvage`. The heap file is a valid header for a heap of
/// [`FUZZ_HEAP_PAGES`] pages followed by a pattern.
pub struct Built {
    pub log: Vec<u8>,
    pub heap: Vec<u8>,
    pub salvage: bool,
}

pub fn build(data: &[u8]) -> Option<Built> {
    let (&sel, rest) = data.split_first()?;
    let salvage = sel & 0x80 != 0;
    let (log, id) = if sel & 1 == 1 {
        let log = rest.to_vec();
        let slot = if sel & 2 != 0 { BLOCK } else { 0 };
        let id = log.get(slot + 16..slot + 32).map_or(FIXED_ID, |b| HeapId(b.try_into().unwrap()));
        (log, id)
    } else {
        let [tail_block, lsn_delta, area @ ..] = rest else { return None };
        let area_blocks = area.len().div_ceil(BLOCK).max(1);
        let log_len = AREA_START as usize + area_blocks * BLOCK;
        let mut log = vec![0u8; log_len];
        log[AREA_START as usize..AREA_START as usize + area.len()].copy_from_slice(area);
        if sel & 8 != 0 {
            reseal(&mut log);
        }
        let tail = AREA_START as usize + (*tail_block as usize % area_blocks) * BLOCK;
        // The first record-looking block from the tail on (circularly): where the writer
        // wrapped, the tail's record is at the area start.
        let first = (0..area_blocks)
            .map(|i| tail + i * BLOCK)
            .map(|at| if at >= log_len { at - area_blocks * BLOCK } else { at })
            .find(|&at| &log[at..at + 4] == b"FAMR")
            .unwrap_or(tail);
        let at_tail = &log[first..first + BLOCK];
        let id = HeapId(at_tail[24..40].try_into().unwrap());
        let rec_epoch = u64_at(at_tail, 40).max(1);
        let epoch = if sel & 4 != 0 { (rec_epoch - 1).max(1) } else { rec_epoch };
        let tail_lsn = u64_at(at_tail, 8).wrapping_add(*lsn_delta as i8 as i64 as u64).max(1);
        let mut sb = Superblock::new(id, log_len as u64);
        sb.sequence = if sel & 2 != 0 { 3 } else { 2 };
        sb.epoch = epoch;
        sb.tail_offset = tail as u64;
        sb.tail_lsn = tail_lsn;
        let mut slot = vec![0u8; BLOCK];
        sb.encode(&mut slot);
        let at = sb.slot_offset() as usize;
        log[at..at + BLOCK].copy_from_slice(&slot);
        if sel & 0x10 != 0 {
            let mut old = Superblock::new(id, log_len as u64);
            old.sequence = sb.sequence - 1;
            old.epoch = (epoch - 1).max(1);
            old.encode(&mut slot);
            let at = old.slot_offset() as usize;
            log[at..at + BLOCK].copy_from_slice(&slot);
        }
        (log, id)
    };
    let header = HeapHeader {
        heap_id: id,
        heap_size: FUZZ_HEAP_PAGES * BLOCK as u64,
        max_size: FUZZ_HEAP_PAGES * BLOCK as u64,
        base_addr: 0x4000_0000_0000,
        log_size: log.len() as u64,
        created_unix: 0,
        log_path: "fuzz.log".into(),
    };
    let mut heap = header.encode();
    heap.extend((0..header.heap_size).map(|i| (i % 251) as u8));
    Some(Built { log, heap, salvage })
}

/// Recompute the checksums of every block that starts with the record magic and whose lengths
/// fit in the log.
fn reseal(log: &mut [u8]) {
    let mut at = AREA_START as usize;
    while at + BLOCK <= log.len() {
        if &log[at..at + 4] == b"FAMR" {
            let payload_len = u32_at(log, at + 52) as usize;
            let end = at + RECORD_HEADER_BYTES + payload_len;
            if end <= log.len() {
                let crc = crc32c(&log[at + RECORD_HEADER_BYTES..end]);
                log[at + 60..at + 64].copy_from_slice(&crc.to_le_bytes());
            }
            let crc = crc32c(&log[at..at + 64]);
            log[at + 64..at + 68].copy_from_slice(&crc.to_le_bytes());
        }
        at += BLOCK;
    }
}

/// The current superblock of a log image, as recovery picks it.
pub fn current_superblock(log: &[u8]) -> Option<Superblock> {
    let a = log.get(..BLOCK).and_then(|b| Superblock::decode(b).ok());
    let b = log.get(BLOCK..2 * BLOCK).and_then(|b| Superblock::decode(b).ok());
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.sequence >= b.sequence { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Heap-file byte ranges some record in the log could have written: every block of the record
/// area that holds a fully valid record of the superblock's identity and epoch contributes its
/// entries. Replay writes nothing else.
fn writable_ranges(log: &[u8], sb: &Superblock, heap_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = sb.area_start as usize;
    let end = (sb.area_end as usize).min(log.len());
    while at + BLOCK <= end {
        if let Ok(h) = RecordHeader::decode(&log[at..at + BLOCK], sb.heap_id, sb.epoch) {
            let body = at + RECORD_HEADER_BYTES + h.payload_len as usize;
            if at + h.total_len as usize <= end && body <= end {
                let payload = &log[at + RECORD_HEADER_BYTES..body];
                if crc32c(payload) == h.payload_crc {
                    if let Ok(entries) = log_format::decode_entries(payload, h.entry_count, heap_size) {
                        out.extend(
                            entries
                                .iter()
                                .map(|e| (HEADER_BYTES + e.offset, HEADER_BYTES + e.offset + e.data.len() as u64)),
                        );
                    }
                }
            }
        }
        at += BLOCK;
    }
    out
}

/// Recovery on a log built from the input (see [`build`]) and a valid heap file.
pub fn recover_from_bytes(data: &[u8]) {
    let Some(b) = build(data) else { return };
    check_recovery(b);
}

/// [`recover_from_bytes`] without skipping known findings.
pub fn recover_from_bytes_unfiltered(data: &[u8]) {
    if let Some(b) = build(data) {
        check_recovery(b);
    }
}

/// Recovery must never panic; when it succeeds: the heap header is unchanged, every changed heap
/// byte lies in an entry of a valid record, the record area of the log is unchanged and the new
/// superblock (valid, decodable) follows the old one. When it fails, the log is unchanged.
pub fn check_recovery(b: Built) {
    let Built { log, heap, salvage } = b;
    let log_len = log.len() / BLOCK * BLOCK;
    let (res, heap_after, log_after) = fams::sim::recover_images(log.clone(), heap.clone(), salvage);
    assert_eq!(heap_after.len(), heap.len());
    assert_eq!(log_after.len(), log_len);
    let log = &log[..log_len];
    match res {
        Ok(report) => {
            assert_eq!(
                heap_after[..HEADER_BYTES as usize],
                heap[..HEADER_BYTES as usize],
                "recovery changed the heap header"
            );
            let sb = current_superblock(log).expect("recovery succeeded without a valid superblock");
            let heap_size = FUZZ_HEAP_PAGES * BLOCK as u64;
            let ranges = writable_ranges(log, &sb, heap_size);
            for (i, (a, b)) in heap.iter().zip(&heap_after).enumerate() {
                if a != b {
                    let i = i as u64;
                    assert!(
                        ranges.iter().any(|&(lo, hi)| lo <= i && i < hi),
                        "heap-file byte {i} changed but no valid record covers it ({report:?})"
                    );
                }
            }
            if report.records_replayed == 0 {
                assert!(heap_after == heap, "nothing replayed but the heap changed");
            }
            assert!(report.salvaged.is_none() || salvage, "salvaged without salvage: {report:?}");
            assert!(log_after[AREA_START as usize..] == log[AREA_START as usize..], "recovery changed the record area");
            let next = current_superblock(&log_after).expect("no valid superblock after recovery");
            assert_eq!((next.sequence, next.epoch), (sb.sequence + 1, sb.epoch + 1), "{sb:?} → {next:?}");
            // The new tail is the end of what was replayed, or (the heap file not synced) the old
            // tail stays and the replayed stretch ends there.
            let end = if next.has_replayed_stretch() {
                assert_eq!((next.tail_lsn, next.tail_offset), (sb.tail_lsn, sb.tail_offset), "{sb:?} → {next:?}");
                next.replayed_until_lsn
            } else {
                next.tail_lsn
            };
            assert_eq!(end, report.next_lsn);
            assert_eq!(end, sb.tail_lsn + report.records_replayed, "{sb:?} → {next:?}: {report:?}");
            assert_eq!((next.heap_id, next.area_start, next.area_end), (sb.heap_id, sb.area_start, sb.area_end));
        }
        Err(e) => {
            assert!(log_after == log, "failed recovery ({e}) changed the log");
            if let fams::Error::Io { .. } = e {
                // The simulated devices fail only reads and writes outside them: recovery must
                // stay inside a log its superblock describes.
                assert!(log_len < 2 * BLOCK, "recovery read or wrote outside the devices: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// decode_datagram

use fams::transport::{self, wire, Endpoint, EndpointConfig, NodeId, PeerRestore};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The shared key the keyed half of the transport targets uses.
const FUZZ_KEY: [u8; 32] = [0x42; 32];

/// `transport::decode` on the bytes as they are and re-sealed (a valid CRC32C or MAC trailer in
/// place of the last bytes), unkeyed and keyed, so the structural checks behind the trailer are
/// reached. Never panics; whatever decodes re-encodes to exactly the same bytes.
pub fn decode_datagram(data: &[u8]) {
    for key in [None, Some(&FUZZ_KEY)] {
        check_datagram(data, key);
        let auth = transport::auth::Auth::new(key);
        let body = data.len().saturating_sub(auth.trailer_bytes());
        let mut sealed = data[..body].to_vec();
        auth.seal(&mut sealed);
        check_datagram(&sealed, key);
    }
}

fn check_datagram(bytes: &[u8], key: Option<&[u8; 32]>) {
    if let Ok(d) = transport::decode(bytes, key) {
        let mut again = Vec::new();
        wire::encode(&d, key, &mut again);
        assert_eq!(again, bytes, "a decoded datagram must re-encode to the same bytes");
    }
}

// ---------------------------------------------------------------------------------------------
// endpoint_inputs

/// An endpoint (node 1, peer 2) driven by the bytes as a script: each step is one command byte
/// and its operands — a datagram from the peer (re-sealed, so most get past the checksum), time
/// passing, a message of ours made durable, consumption made durable, a restart announcement,
/// polls. Never panics, and the property of the protocol that matters most holds throughout:
/// no datagram we send acknowledges more than the consumption we reported durable.
/// Returns how many messages were delivered (for the tests: a script that reaches delivery).
pub fn endpoint_inputs(data: &[u8]) -> u64 {
    let start = Instant::now();
    let mut now = start;
    let peer_addr: SocketAddr = "127.0.0.1:2".parse().unwrap();
    let mut config = EndpointConfig::new(NodeId(1), 1);
    config.datagram_bytes_max = 512;
    config.message_bytes_max = 64 << 10;
    let Ok(mut ep) = Endpoint::new(config, now) else { return 0 };
    ep.add_peer(NodeId(2), peer_addr, PeerRestore::NEW).expect("add the peer");
    let auth = transport::auth::Auth::new(None);
    let (mut next_send, mut delivered, mut consumed) = (1u64, 0u64, 0u64);
    let mut i = 0;
    while i < data.len() {
        let op = data[i];
        i += 1;
        match op % 8 {
            0 | 1 => {
                // A datagram of up to 255 bytes from the script, re-sealed.
                let len = data.get(i).copied().unwrap_or(0) as usize;
                i = (i + 1).min(data.len());
                let end = (i + len).min(data.len());
                let mut d = data[i..end].to_vec();
                i = end;
                if op % 8 == 0 {
                    let body = d.len().saturating_sub(auth.trailer_bytes());
                    d.truncate(body);
                    auth.seal(&mut d);
                }
                ep.handle_datagram(now, peer_addr, &d);
            }
            2 => now += Duration::from_millis(data.get(i).copied().unwrap_or(1) as u64),
            3 => {
                let len = data.get(i).copied().unwrap_or(0) as usize * 64;
                i += 1;
                if ep.send_durable(now, NodeId(2), next_send, vec![op; len]).is_ok() {
                    next_send += 1;
                }
            }
            4 if consumed < delivered => {
                consumed += 1;
                ep.consumed_durable(now, NodeId(2), consumed).expect("consumed what was delivered");
            }
            5 => ep.announce_restart(now),
            6 if ep.poll_timeout().is_some_and(|t| t <= now) => ep.handle_timeout(now),
            _ => {}
        }
        while let Some(m) = ep.poll_message() {
            assert_eq!(m.seq, delivered + 1, "delivery in order, each seq once");
            delivered = m.seq;
        }
        while ep.poll_event().is_some() {}
        while let Some(t) = ep.poll_transmit(now) {
            let d = transport::decode(&t.bytes, None).expect("we send only well-formed datagrams");
            assert!(
                d.header().ack <= consumed,
                "an ack ({}) ahead of durable consumption ({consumed})",
                d.header().ack
            );
        }
    }
    delivered
}

// ---------------------------------------------------------------------------------------------
// alloc_damage: the object layer's allocator over damaged metadata (see `fams::alloc::fuzz`).

/// Damage a populated allocator image as `data` says, then allocate, free and check: any panic
/// (or an allocation outside the block region) is a finding.
pub fn alloc_damage(data: &[u8]) {
    fams::alloc::fuzz::run(data);
}
