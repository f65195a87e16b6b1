//! The on-disk format of the redo log: two superblock slots and a circular area of records.
//!
//! ```text
//!  offset 0        4096            8192                                         log end
//!  +---------------+---------------+-------------------------------------------+
//!  | superblock A  | superblock B  | record area (circular)                    |
//!  +---------------+---------------+-------------------------------------------+
//! ```
//!
//! All integers are little-endian. Every record and superblock starts on a 4096-byte boundary
//! and occupies a whole number of 4096-byte blocks, so each is written with one O_DIRECT write.
//!
//! ## Superblock (one 4096-byte slot; fields then zeros)
//! | off | size | field |
//! |-----|------|-------|
//! | 0   | 8    | magic `FAMSLOG1` |
//! | 8   | 4    | superblock version (4; versions 1 to 3 are read too) |
//! | 12  | 4    | reserved, zero |
//! | 16  | 16   | heap identity (random, shared with the heap file header) |
//! | 32  | 8    | sequence number: the slot with the larger valid one is current |
//! | 40  | 8    | epoch: bumped by every open; records carry it |
//! | 48  | 8    | log size in bytes |
//! | 56  | 8    | record area start (8192) |
//! | 64  | 8    | record area end |
//! | 72  | 8    | tail offset: where replay starts |
//! | 80  | 8    | tail LSN: the LSN of the record expected at the tail |
//! | 88  | 8    | checkpoints taken over the log's life |
//! | 96  | 8    | version 2: the heap's current size in bytes (version 1: absent, the header's size) |
//! | 104 | 8    | version 3: written limit — bytes from the tail (ring distance) at and past which no record of this epoch was written; 0: not recorded (versions 1 and 2) |
//! | 112 | 4    | version 3: the I/O path measured fastest for this device when the log was formatted: 0 none recorded, 1 io_uring, 2 plain system calls |
//! | 116 | 4    | version 3: likewise the flush mode: 0 none recorded, 1 `RWF_DSYNC` writes, 2 writes then `fdatasync` |
//! | 120 | 8    | version 4: replayed-until LSN — records from the tail LSN up to (not including) this one were replayed into the heap file by the open that wrote this superblock, which did not sync the heap file; they carry the previous epoch (epoch − 1). At most the tail LSN: no such records |
//! | 128 | 4    | CRC32C of bytes 0..128 (version 3: of bytes 0..120, at 120; version 2: of 0..104, at 104; version 1: of 0..96, at 96) |
//!
//! The I/O choice is made once, by measurement, because the right one depends on the device: on
//! a RAM-backed block device a plain `pwritev2` took ~2 µs where io_uring took ~39 µs (it hands
//! the write to a worker thread on a device without non-blocking submission), while on a disk
//! the two are equal within noise. An open uses it unless told otherwise.
//!
//! The heap's size lives here, not in the heap file's header, because growing must be atomic:
//! `Heap::grow` extends the heap file and makes that durable first, then writes a superblock
//! with the new size (same tail) — one durable write that either happened or did not.
//!
//! Slots are written alternately (sequence number parity picks the slot), each with one durable
//! write. A torn superblock write leaves the other slot, which describes a tail whose records
//! have not been overwritten yet: records are only written over the old tail after the new
//! superblock is durable.
//!
//! ## Record (header, entries, zero padding up to a 4096 multiple)
//! | off | size | field |
//! |-----|------|-------|
//! | 0   | 4    | magic `FAMR` |
//! | 4   | 2    | format version (1) |
//! | 6   | 2    | flags, zero |
//! | 8   | 8    | LSN (consecutive, starting at 1) |
//! | 16  | 8    | group first LSN: the first LSN of the device write this record went out in |
//! | 24  | 16   | heap identity |
//! | 40  | 8    | epoch (must equal the superblock's) |
//! | 48  | 4    | total length in bytes, padded (multiple of 4096) |
//! | 52  | 4    | payload length in bytes (entries, without padding) |
//! | 56  | 4    | entry count |
//! | 60  | 4    | CRC32C of the payload |
//! | 64  | 4    | CRC32C of header bytes 0..64 |
//! | 68  | 4    | reserved, zero |
//!
//! The payload (from byte 72) is a sequence of entries, each: heap offset (u64), length (u32),
//! reserved (u32), then `length` bytes of the committed image, padded to 8 bytes. An entry
//! never crosses a heap page, so `length <= 4096`.
//!
//! ## Why these fields
//! - The LSN chain decides what is a record: recovery expects LSN `n+1` right after `n`, or at
//!   the area start when the writer wrapped. Stale records from earlier laps have smaller LSNs.
//! - The epoch separates histories: after a crash the next open writes a superblock with a new
//!   epoch *before* any new record, so a record that was written but never made durable before a
//!   crash (and may sit intact past the torn tail) can never be mistaken for a later commit that
//!   reuses its LSN.
//! - The group first LSN tells a torn tail from media corruption: a device write is acknowledged
//!   only when all of it is durable, and the next group is written only after that. A damaged
//!   record followed by an intact record of the *same* group is a torn write (power cut mid
//!   write); followed by an intact record of a *later* group, the damaged one had been durable,
//!   so the damage is corruption and recovery refuses to guess.
//! - The replayed-until LSN lets an open skip the heap file's `fdatasync` (on a fast device the
//!   larger part of recovery: 15–25 ms of ~35 ms for 16 MiB of records on zram). Recovery
//!   replays into the heap file's page cache and writes a superblock that keeps the old tail,
//!   starts a new epoch as always, and records where the replayed records end. Those records
//!   stay in the log until the first checkpoint syncs the heap file and moves the tail past
//!   them; a crash before that replays them again (replay is idempotent), then everything the
//!   new epoch committed after them. They carry the old epoch and everything from the
//!   replayed-until LSN on carries the new one, so leftovers of the group torn by the crash
//!   (old epoch, LSN at or past the replayed-until LSN) are still never mistaken for commits.
//!   Only one such old-epoch stretch is ever recorded: an open that finds one already there
//!   syncs the heap file and moves the tail, as every open did before version 4. A record
//!   missing from the stretch is damage, not a torn tail: an earlier open replayed it.
//! - The written limit bounds where such a later record can be, so recovery reads what it
//!   replays plus at most the rest of the limit, not the whole area (an 8 GiB log once meant
//!   8 GiB read at every open). The writer keeps every record it writes inside the limit of the
//!   durable superblock: before a group would end past it, it raises the limit (by at least
//!   [`WRITTEN_LIMIT_STEP_BYTES`], and by a few groups' worth for large groups) with one durable
//!   superblock write, and only then writes the group. A checkpoint or a recovery writes a new
//!   superblock anyway and starts a fresh limit from its new tail: records of this epoch past
//!   that limit are all older than the tail LSN and can never count as later. Under power cuts
//!   the newest readable slot's limit is right: a raise whose write was torn or lost was never
//!   acknowledged, so nothing was written past it. If a slot is damaged (not merely never
//!   written), recovery cannot know whether it held a larger limit and scans the whole area.

use crate::heap_file::HeapId;
use crate::io::{FlushMode, IoPath};

pub const BLOCK: usize = 4096;
pub const SUPERBLOCK_SLOTS: u64 = 2;
pub const AREA_START: u64 = SUPERBLOCK_SLOTS * BLOCK as u64;
/// The smallest log: the superblocks and 16 blocks of records.
pub const LOG_SIZE_MIN: u64 = AREA_START + 16 * BLOCK as u64;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"FAMSLOG1";
const RECORD_MAGIC: &[u8; 4] = b"FAMR";
const FORMAT_VERSION: u32 = 1;
const SUPERBLOCK_VERSION: u32 = 4;
const SUPERBLOCK_CRC_AT: usize = 128;
const SUPERBLOCK_V3_CRC_AT: usize = 120;
const SUPERBLOCK_V2_CRC_AT: usize = 104;
const SUPERBLOCK_V1_CRC_AT: usize = 96;
/// The least a written limit is raised by, and where it starts after a checkpoint or recovery,
/// in a log of 32 MiB or more (smaller logs step by 1/32 of their area, at least 16 KiB): the
/// writer makes one extra durable superblock write per this many bytes of small records, and
/// recovery reads at most about this much past what it replays.
pub const WRITTEN_LIMIT_STEP_BYTES: u64 = 1 << 20;
const WRITTEN_LIMIT_STEP_MIN_BYTES: u64 = 4 * BLOCK as u64;
/// A raise covers this many times the group that needs it, so large groups raise it rarely.
pub const WRITTEN_LIMIT_GROUPS_AHEAD: u64 = 4;
pub const RECORD_HEADER_BYTES: usize = 72;
pub const ENTRY_HEADER_BYTES: usize = 16;
/// An entry never crosses a heap page.
pub const ENTRY_LEN_MAX: usize = crate::PAGE_SIZE;
/// Superblock counters (sequence, epoch, LSNs, checkpoints) above this are refused as damage.
pub const COUNTER_MAX: u64 = 1 << 62;

bitflags::bitflags! {
    /// The record header's flags (bytes 6..8). Format version 1 defines none: a record with any
    /// bit set is refused as not ours.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RecordFlags: u16 {}
}

pub fn round_up_block(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub heap_id: HeapId,
    pub sequence: u64,
    pub epoch: u64,
    pub log_size: u64,
    pub area_start: u64,
    pub area_end: u64,
    pub tail_offset: u64,
    pub tail_lsn: u64,
    pub checkpoints: u64,
    /// The heap's current size (0 in a version-1 superblock: the heap header's size).
    pub heap_size: u64,
    /// Ring distance from the tail at and past which no record of this epoch was written; 0
    /// when not recorded (superblocks before version 3): recovery then scans the whole area.
    /// At most the area's capacity.
    pub written_limit_bytes: u64,
    /// The I/O path and flush mode measured fastest on this device at format (None: not
    /// recorded — an older log, or a format that was told which to use and recorded that).
    pub io_path_preferred: Option<IoPath>,
    pub flush_mode_preferred: Option<FlushMode>,
    /// Records with LSNs in `tail_lsn..replayed_until_lsn` were replayed (not synced) by the open
    /// that wrote this superblock and carry epoch `epoch - 1`; see the module docs. At most
    /// `tail_lsn` (0 in older superblocks): none.
    pub replayed_until_lsn: u64,
}

fn io_path_code(p: Option<IoPath>) -> u32 {
    match p {
        None => 0,
        Some(IoPath::Uring) => 1,
        Some(IoPath::Sync) => 2,
    }
}

fn flush_mode_code(m: Option<FlushMode>) -> u32 {
    match m {
        None => 0,
        Some(FlushMode::Dsync) => 1,
        Some(FlushMode::Fdatasync) => 2,
    }
}

impl Superblock {
    /// A fresh log for `heap_id` on a device of `log_size` bytes.
    pub fn new(heap_id: HeapId, log_size: u64) -> Superblock {
        let area_end = log_size / BLOCK as u64 * BLOCK as u64;
        Superblock {
            heap_id,
            sequence: 1,
            epoch: 1,
            log_size,
            area_start: AREA_START,
            area_end,
            tail_offset: AREA_START,
            tail_lsn: 1,
            checkpoints: 0,
            heap_size: 0,
            written_limit_bytes: written_limit_step(area_end - AREA_START),
            io_path_preferred: None,
            flush_mode_preferred: None,
            replayed_until_lsn: 0,
        }
    }

    /// Whether the log holds records of the previous epoch that an open replayed without
    /// syncing the heap file (`tail_lsn..replayed_until_lsn`).
    pub fn has_replayed_stretch(&self) -> bool {
        self.replayed_until_lsn > self.tail_lsn
    }

    /// The epoch the record with `lsn` must carry: the previous one inside the replayed stretch.
    pub fn epoch_of(&self, lsn: u64) -> u64 {
        if lsn < self.replayed_until_lsn {
            self.epoch - 1
        } else {
            self.epoch
        }
    }

    /// The limit to start from at a new tail (after a checkpoint or a recovery).
    pub fn fresh_written_limit(&self) -> u64 {
        written_limit_step(self.capacity_bytes())
    }

    /// The raised limit for a group ending `group_end_bytes` from the tail, `group_bytes` long.
    pub fn raised_written_limit(&self, group_end_bytes: u64, group_bytes: u64) -> u64 {
        let step = written_limit_step(self.capacity_bytes());
        let ahead = step.max(group_bytes.saturating_mul(WRITTEN_LIMIT_GROUPS_AHEAD));
        group_end_bytes.saturating_add(ahead).min(self.capacity_bytes())
    }

    /// How far past the tail recovery must look for records: the written limit, or the whole
    /// area when it is not recorded.
    pub fn scan_limit_bytes(&self) -> u64 {
        if self.written_limit_bytes == 0 {
            self.capacity_bytes()
        } else {
            self.written_limit_bytes
        }
    }

    /// Byte offset of the slot this superblock is written to.
    pub fn slot_offset(&self) -> u64 {
        (self.sequence % SUPERBLOCK_SLOTS) * BLOCK as u64
    }

    /// Whether this superblock, once written, decodes again: every counter below [`COUNTER_MAX`].
    pub fn counters_writable(&self) -> bool {
        self.sequence < COUNTER_MAX
            && self.epoch < COUNTER_MAX
            && self.tail_lsn < COUNTER_MAX
            && self.checkpoints < COUNTER_MAX
            && self.replayed_until_lsn < COUNTER_MAX
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.area_end - self.area_start
    }

    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK);
        out.fill(0);
        out[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
        put_u32(out, 8, SUPERBLOCK_VERSION);
        out[16..32].copy_from_slice(&self.heap_id.0);
        put_u64(out, 32, self.sequence);
        put_u64(out, 40, self.epoch);
        put_u64(out, 48, self.log_size);
        put_u64(out, 56, self.area_start);
        put_u64(out, 64, self.area_end);
        put_u64(out, 72, self.tail_offset);
        put_u64(out, 80, self.tail_lsn);
        put_u64(out, 88, self.checkpoints);
        put_u64(out, 96, self.heap_size);
        put_u64(out, 104, self.written_limit_bytes);
        put_u32(out, 112, io_path_code(self.io_path_preferred));
        put_u32(out, 116, flush_mode_code(self.flush_mode_preferred));
        put_u64(out, 120, self.replayed_until_lsn);
        let crc = crc32c::crc32c(&out[..SUPERBLOCK_CRC_AT]);
        put_u32(out, SUPERBLOCK_CRC_AT, crc);
    }

    /// Decode one slot; every field is checked for self-consistency so a decoded superblock can
    /// be trusted by the code that follows.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() < BLOCK {
            return Err(format!("slot is {} bytes, expected {BLOCK}", b.len()));
        }
        if &b[0..8] != SUPERBLOCK_MAGIC {
            return Err("no superblock magic".into());
        }
        let version = u32_at(b, 8);
        let crc_at = match version {
            1 => SUPERBLOCK_V1_CRC_AT,
            2 => SUPERBLOCK_V2_CRC_AT,
            3 => SUPERBLOCK_V3_CRC_AT,
            SUPERBLOCK_VERSION => SUPERBLOCK_CRC_AT,
            _ => return Err(format!("superblock version {version}, this build reads versions 1 to {SUPERBLOCK_VERSION}")),
        };
        if u32_at(b, crc_at) != crc32c::crc32c(&b[..crc_at]) {
            return Err("superblock checksum mismatch".into());
        }
        // Reserved bytes are zero in every slot we write: anything else was not written by us.
        if u32_at(b, 12) != 0 || b[crc_at + 4..BLOCK].iter().any(|&x| x != 0) {
            return Err("reserved superblock bytes are not zero".into());
        }
        let sb = Superblock {
            heap_id: HeapId(b[16..32].try_into().expect("16 bytes")),
            sequence: u64_at(b, 32),
            epoch: u64_at(b, 40),
            log_size: u64_at(b, 48),
            area_start: u64_at(b, 56),
            area_end: u64_at(b, 64),
            tail_offset: u64_at(b, 72),
            tail_lsn: u64_at(b, 80),
            checkpoints: u64_at(b, 88),
            heap_size: if version == 1 { 0 } else { u64_at(b, 96) },
            written_limit_bytes: if version < 3 { 0 } else { u64_at(b, 104) },
            io_path_preferred: None,
            flush_mode_preferred: None,
            replayed_until_lsn: if version < 4 { 0 } else { u64_at(b, 120) },
        };
        let mut sb = sb;
        if version >= 3 {
            sb.io_path_preferred = match u32_at(b, 112) {
                0 => None,
                1 => Some(IoPath::Uring),
                2 => Some(IoPath::Sync),
                x => return Err(format!("unknown I/O path {x} in the superblock")),
            };
            sb.flush_mode_preferred = match u32_at(b, 116) {
                0 => None,
                1 => Some(FlushMode::Dsync),
                2 => Some(FlushMode::Fdatasync),
                x => return Err(format!("unknown flush mode {x} in the superblock")),
            };
        }
        let block = BLOCK as u64;
        let sane = sb.area_start == AREA_START
            && sb.area_end > sb.area_start
            && sb.area_end <= sb.log_size
            && sb.area_end % block == 0
            && sb.tail_offset >= sb.area_start
            && sb.tail_offset < sb.area_end
            && sb.tail_offset % block == 0
            && sb.tail_lsn >= 1
            && sb.epoch >= 1
            && sb.sequence >= 1
            // Counters only ever grow by one; values near the top are damage, and refusing them
            // keeps every `+ 1` below from overflowing.
            && sb.sequence < COUNTER_MAX
            && sb.epoch < COUNTER_MAX
            && sb.tail_lsn < COUNTER_MAX
            && sb.checkpoints < COUNTER_MAX
            && sb.heap_size % crate::PAGE_SIZE as u64 == 0
            && sb.written_limit_bytes <= sb.area_end - sb.area_start
            // A replayed stretch belongs to the epoch before this one.
            && (sb.replayed_until_lsn <= sb.tail_lsn || sb.epoch >= 2)
            && sb.replayed_until_lsn < COUNTER_MAX;
        if !sane {
            return Err(format!("superblock fields are inconsistent: {sb:?}"));
        }
        Ok(sb)
    }
}

/// The written limit's step for a record area of `capacity_bytes` (see
/// [`WRITTEN_LIMIT_STEP_BYTES`]); never more than the area.
pub fn written_limit_step(capacity_bytes: u64) -> u64 {
    let step = (capacity_bytes / 32).clamp(WRITTEN_LIMIT_STEP_MIN_BYTES, WRITTEN_LIMIT_STEP_BYTES);
    (step / BLOCK as u64 * BLOCK as u64).min(capacity_bytes)
}

/// The fixed-size front of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub lsn: u64,
    pub group_first_lsn: u64,
    pub heap_id: HeapId,
    pub epoch: u64,
    pub total_len: u32,
    pub payload_len: u32,
    pub entry_count: u32,
    pub payload_crc: u32,
}

/// Why bytes at a record position are not a record we may replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    /// No magic, bad header checksum: not a record header at all (or a torn one).
    NotARecord(&'static str),
    /// A valid header of another heap: left over on a reused device.
    OtherHeap,
    /// A valid header of this heap from another log epoch (the epoch is given): left over from
    /// an earlier history when older; proof of a newer superblock when newer.
    OtherEpoch(RecordHeader),
    /// A valid header with impossible contents (version, lengths).
    Foreign(String),
}

impl RecordHeader {
    pub fn encode(&self, out: &mut [u8]) {
        out[..RECORD_HEADER_BYTES].fill(0);
        out[0..4].copy_from_slice(RECORD_MAGIC);
        out[4..6].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
        out[6..8].copy_from_slice(&RecordFlags::empty().bits().to_le_bytes());
        put_u64(out, 8, self.lsn);
        put_u64(out, 16, self.group_first_lsn);
        out[24..40].copy_from_slice(&self.heap_id.0);
        put_u64(out, 40, self.epoch);
        put_u32(out, 48, self.total_len);
        put_u32(out, 52, self.payload_len);
        put_u32(out, 56, self.entry_count);
        put_u32(out, 60, self.payload_crc);
        let crc = crc32c::crc32c(&out[..64]);
        put_u32(out, 64, crc);
    }

    /// Decode and check a header: magic, checksum, version, identity, epoch and lengths.
    pub fn decode(b: &[u8], heap_id: HeapId, epoch: u64) -> Result<RecordHeader, HeaderProblem> {
        if b.len() < RECORD_HEADER_BYTES {
            return Err(HeaderProblem::NotARecord("short header"));
        }
        if &b[0..4] != RECORD_MAGIC {
            return Err(HeaderProblem::NotARecord("no record magic"));
        }
        if u32_at(b, 64) != crc32c::crc32c(&b[..64]) {
            return Err(HeaderProblem::NotARecord("header checksum mismatch"));
        }
        if u32_at(b, 68) != 0 || RecordFlags::from_bits(u16::from_le_bytes([b[6], b[7]])).is_none() {
            return Err(HeaderProblem::Foreign("reserved header bytes are not zero".into()));
        }
        let h = RecordHeader {
            lsn: u64_at(b, 8),
            group_first_lsn: u64_at(b, 16),
            heap_id: HeapId(b[24..40].try_into().expect("16 bytes")),
            epoch: u64_at(b, 40),
            total_len: u32_at(b, 48),
            payload_len: u32_at(b, 52),
            entry_count: u32_at(b, 56),
            payload_crc: u32_at(b, 60),
        };
        let version = u16::from_le_bytes([b[4], b[5]]) as u32;
        if version != FORMAT_VERSION {
            return Err(HeaderProblem::Foreign(format!("record version {version}")));
        }
        // Lengths first: a header reported as another heap's or epoch's is otherwise valid.
        let total = h.total_len as u64;
        let body = RECORD_HEADER_BYTES as u64 + h.payload_len as u64;
        if total == 0 || total % BLOCK as u64 != 0 || body > total || h.group_first_lsn > h.lsn {
            return Err(HeaderProblem::Foreign(format!("impossible record lengths {h:?}")));
        }
        if h.heap_id != heap_id {
            return Err(HeaderProblem::OtherHeap);
        }
        if h.epoch != epoch {
            return Err(HeaderProblem::OtherEpoch(h));
        }
        Ok(h)
    }
}

/// One piece of committed heap image: `data` goes to heap offset `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub offset: u64,
    pub data: &'a [u8],
}

pub fn entry_encoded_len(data_len: usize) -> usize {
    ENTRY_HEADER_BYTES + data_len.div_ceil(8) * 8
}

/// Append one entry to a payload under construction.
pub fn push_entry(payload: &mut Vec<u8>, offset: u64, data: &[u8]) {
    debug_assert!(data.len() <= ENTRY_LEN_MAX && !data.is_empty());
    let start = payload.len();
    payload.extend_from_slice(&offset.to_le_bytes());
    payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(data);
    payload.resize(start + entry_encoded_len(data.len()), 0);
}

/// Iterate the entries of a checksummed payload, checking each against the heap size. Returns an
/// error (never panics) on anything malformed: a record whose checksum matched but whose content
/// is impossible was written by something that is not us.
pub fn decode_entries(payload: &[u8], entry_count: u32, heap_size: u64) -> Result<Vec<Entry<'_>>, String> {
    let mut entries = Vec::with_capacity(entry_count.min(1 << 16) as usize);
    let mut at = 0usize;
    for i in 0..entry_count {
        if payload.len() - at < ENTRY_HEADER_BYTES {
            return Err(format!("entry {i} header runs past the payload"));
        }
        let offset = u64_at(payload, at);
        let len = u32_at(payload, at + 8) as usize;
        if len == 0 || len > ENTRY_LEN_MAX {
            return Err(format!("entry {i} has length {len}"));
        }
        if u32_at(payload, at + 12) != 0 {
            return Err(format!("entry {i}: its reserved word is not zero"));
        }
        let page = BLOCK as u64;
        let end = offset.checked_add(len as u64).ok_or("entry offset overflows")?;
        if end > heap_size || offset / page != (end - 1) / page {
            return Err(format!("entry {i} at {offset}+{len} is outside the heap or crosses a page"));
        }
        let encoded = entry_encoded_len(len);
        if payload.len() - at < encoded {
            return Err(format!("entry {i} data runs past the payload"));
        }
        if payload[at + ENTRY_HEADER_BYTES + len..at + encoded].iter().any(|&x| x != 0) {
            return Err(format!("entry {i}: its padding is not zero"));
        }
        entries.push(Entry { offset, data: &payload[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + len] });
        at += encoded;
    }
    if at != payload.len() {
        return Err(format!("{} stray bytes after the last entry", payload.len() - at));
    }
    Ok(entries)
}

/// Finish a record in `out` (which holds the payload at RECORD_HEADER_BYTES.. and is already
/// padded with zeros to a block multiple): fill in the header.
pub fn seal_record(out: &mut [u8], header: &RecordHeader) {
    debug_assert_eq!(out.len() as u32, header.total_len);
    let mut h = *header;
    h.payload_crc = crc32c::crc32c(&out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + h.payload_len as usize]);
    h.encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> HeapId {
        HeapId([7; 16])
    }

    fn build(lsn: u64, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (off, data) in entries {
            push_entry(&mut payload, *off, data);
        }
        let total = round_up_block((RECORD_HEADER_BYTES + payload.len()) as u64) as usize;
        let mut out = vec![0u8; total];
        out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(&payload);
        let h = RecordHeader {
            lsn,
            group_first_lsn: lsn,
            heap_id: id(),
            epoch: 3,
            total_len: total as u32,
            payload_len: payload.len() as u32,
            entry_count: entries.len() as u32,
            payload_crc: 0,
        };
        seal_record(&mut out, &h);
        out
    }

    #[test]
    fn record_flags_are_zero_and_unknown_ones_are_refused() {
        let rec = build(5, &[(0, vec![1; 8])]);
        assert_eq!(&rec[6..8], &[0, 0], "version 1 records carry no flags");
        assert!(RecordHeader::decode(&rec, id(), 3).is_ok());
        for (at, bit) in [(6, 0x01u8), (7, 0x80)] {
            let mut b = rec.clone();
            b[at] |= bit;
            let crc = crc32c::crc32c(&b[..64]);
            b[64..68].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(
                RecordHeader::decode(&b, id(), 3),
                Err(HeaderProblem::Foreign("reserved header bytes are not zero".into()))
            );
        }
    }

    #[test]
    fn reserved_bytes_and_padding_must_be_zero() {
        let mut b = vec![0u8; BLOCK];
        Superblock::new(id(), LOG_SIZE_MIN).encode(&mut b);
        assert!(Superblock::decode(&b).is_ok());
        let mut tail = b.clone();
        tail[BLOCK - 1] = 1;
        assert!(Superblock::decode(&tail).unwrap_err().contains("reserved"));
        let mut payload = Vec::new();
        push_entry(&mut payload, 0, &[1, 2, 3]);
        assert!(decode_entries(&payload, 1, 4096).is_ok());
        let mut reserved = payload.clone();
        reserved[12] = 1;
        assert!(decode_entries(&reserved, 1, 4096).unwrap_err().contains("reserved"));
        let mut padding = payload.clone();
        padding[ENTRY_HEADER_BYTES + 3] = 1;
        assert!(decode_entries(&padding, 1, 4096).unwrap_err().contains("padding"));
    }

    #[test]
    fn record_round_trip() {
        let rec = build(42, &[(0, vec![1, 2, 3]), (4096 * 3 + 5, vec![9; 4091]), (8192, vec![5; 4096])]);
        let h = RecordHeader::decode(&rec, id(), 3).unwrap();
        assert_eq!(h.lsn, 42);
        let payload = &rec[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + h.payload_len as usize];
        assert_eq!(crc32c::crc32c(payload), h.payload_crc);
        let e = decode_entries(payload, h.entry_count, 1 << 20).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0], Entry { offset: 0, data: &[1, 2, 3] });
        assert_eq!(e[1].offset, 4096 * 3 + 5);
        assert_eq!(e[1].data.len(), 4091);
        assert_eq!(e[2].data, &[5u8; 4096][..]);
    }

    #[test]
    fn header_rejects_damage_identity_and_epoch() {
        let rec = build(1, &[(0, vec![1])]);
        for i in 0..RECORD_HEADER_BYTES {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(RecordHeader::decode(&bad, id(), 3).is_err(), "flip at byte {i} accepted");
        }
        assert!(matches!(RecordHeader::decode(&rec, HeapId([8; 16]), 3), Err(HeaderProblem::OtherHeap)));
        assert!(matches!(RecordHeader::decode(&rec, id(), 4), Err(HeaderProblem::OtherEpoch(h)) if h.epoch == 3));
        assert!(matches!(RecordHeader::decode(&[0u8; 4096], id(), 3), Err(HeaderProblem::NotARecord(_))));
    }

    #[test]
    fn entries_outside_the_heap_are_refused() {
        let mut payload = Vec::new();
        push_entry(&mut payload, 4090, &[1; 10]); // crosses a page
        assert!(decode_entries(&payload, 1, 1 << 20).is_err());
        let mut payload = Vec::new();
        push_entry(&mut payload, (1 << 20) - 1, &[1; 2]);
        assert!(decode_entries(&payload, 1, 1 << 20).is_err());
        let mut payload = Vec::new();
        push_entry(&mut payload, 0, &[1; 2]);
        assert!(decode_entries(&payload, 2, 1 << 20).is_err(), "count larger than the payload");
        assert!(decode_entries(&payload[..10], 1, 1 << 20).is_err());
    }

    #[test]
    fn superblock_round_trip_and_damage() {
        let mut sb = Superblock::new(id(), 1 << 20);
        sb.sequence = 8;
        sb.tail_offset = AREA_START + 4096 * 3;
        sb.tail_lsn = 99;
        sb.epoch = 2;
        sb.replayed_until_lsn = 120;
        let mut buf = vec![0u8; BLOCK];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf).unwrap(), sb);
        assert!(sb.has_replayed_stretch());
        assert_eq!((sb.epoch_of(99), sb.epoch_of(119), sb.epoch_of(120)), (1, 1, 2));
        assert_eq!(sb.slot_offset(), 0);
        for i in 0..=SUPERBLOCK_CRC_AT + 3 {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(Superblock::decode(&bad).is_err(), "flip at byte {i} accepted");
        }
        assert!(Superblock::decode(&buf[..100]).is_err());
    }

    /// A version-3 superblock (CRC at 120, no replayed-until LSN) still decodes, with none; a
    /// replayed stretch in epoch 1 (there is no epoch 0 it could belong to) is refused.
    #[test]
    fn superblock_versions_and_the_replayed_stretch() {
        let mut sb = Superblock::new(id(), 1 << 20);
        sb.sequence = 3;
        sb.tail_lsn = 10;
        let mut v3 = vec![0u8; BLOCK];
        sb.encode(&mut v3);
        put_u32(&mut v3, 8, 3);
        v3[120..132].fill(0);
        let crc = crc32c::crc32c(&v3[..SUPERBLOCK_V3_CRC_AT]);
        put_u32(&mut v3, SUPERBLOCK_V3_CRC_AT, crc);
        let d = Superblock::decode(&v3).unwrap();
        assert_eq!(d, sb);
        assert!(!d.has_replayed_stretch());
        assert_eq!(d.epoch_of(10), d.epoch);
        sb.replayed_until_lsn = 12;
        let mut bad = vec![0u8; BLOCK];
        sb.encode(&mut bad);
        assert!(Superblock::decode(&bad).unwrap_err().contains("inconsistent"));
    }
}
