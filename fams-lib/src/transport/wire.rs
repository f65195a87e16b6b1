//! The datagram format, version 1, documented beside its encoder and decoder.
//!
//! One UDP datagram carries one of three kinds: DATA (one fragment of one message), ACK (the
//! cumulative ack, optionally with a selective ack of one message's fragments) and HELLO ("I
//! restarted"). All integers are little-endian, as in the heap's log format.
//!
//! ```text
//! offset size field
//!  0     2    magic "FT" (0x46 0x54)
//!  2     1    version = 1
//!  3     1    kind: 1 = DATA, 2 = ACK, 3 = HELLO
//!  4     1    flags: bit 0 = keyed (16-byte MAC trailer), else a 4-byte CRC32C trailer;
//!             other bits zero
//!  5     3    reserved, zero
//!  8     8    sender node id
//! 16     8    receiver node id
//! 24     8    sender incarnation
//! 32     8    cumulative ack: every seq from the receiver to the sender ≤ this was durably
//!             consumed by the sender of this datagram
//! 40          kind-specific fields:
//!   DATA  40  8  seq (≥ 1)
//!         48  4  message_len (≤ MESSAGE_BYTES_MAX)
//!         52  4  frag_index (< frag_count)
//!         56  4  frag_count (≥ 1, see "Fragments" below)
//!         60  4  payload_len (= the length of fragment frag_index; = the bytes up to the trailer)
//!         64     payload
//!   ACK   40  8  sack_seq (0 = no selective ack)
//!         48  4  sack_frag_count: how many fragments, from fragment 0, the bitmap describes
//!         52  4  bitmap_len = ceil(sack_frag_count / 8) (0 when sack_seq is 0)
//!         56     bitmap: bit i (byte i / 8, bit i % 8) set = fragment i is held; padding bits 0
//!   HELLO     nothing more: the fields end at 40
//!  …     4/16 trailer: CRC32C (flags bit 0 clear) or HMAC-SHA256 truncated to 16 bytes (set),
//!             over every byte before it
//! ```
//!
//! Why this shape:
//! - **Magic and version first** so that a datagram from anything else (or a later version) is
//!   recognised in two comparisons and dropped without reading further.
//! - **Both node ids in every datagram.** Identity is the node id, not the address: the receiver
//!   drops what is addressed to another node (a stale address after a peer moved, a
//!   misconfigured port), and with a key the id is proven by the MAC, so a peer behind a NAT may
//!   change address and still be recognised.
//! - **The incarnation in every datagram** lets a receiver tell a restarted peer (higher: its
//!   volatile state — reassembly buffers, selective acks — is gone, resend everything now) from
//!   a delayed or replayed datagram of an earlier life (lower: drop it).
//! - **The cumulative ack in every datagram** (piggybacking): data going one way carries the ack
//!   for the other way, so a busy pair sends few pure ACKs. It only ever means "consumed by a
//!   durable turn" — never merely "received" — so a sender may forget a message once it is
//!   covered (the output-commit rule, see `transport` module docs).
//! - **Fragments.** A message of up to [`MESSAGE_BYTES_MAX`] bytes is cut into `frag_count`
//!   fragments of `ceil(message_len / frag_count)` bytes (the last one shorter), so the receiver
//!   can place any fragment without having seen the others, and the decoder can check every
//!   fragment's length from the header alone. A layout whose last fragment would be empty is
//!   malformed, which also bounds `frag_count ≤ message_len` (an empty message is one empty
//!   fragment). The sender chooses `frag_count = ceil(message_len / payload_max)`, which always
//!   satisfies this.
//! - **Selective ack of one message per ACK**: the receiver reports which fragments of a
//!   partly received (or completed, or delivered) message it holds, so the sender resends only
//!   the missing ones. The bitmap covers fragments `0..sack_frag_count`, the message's whole
//!   fragment count: an endpoint's configuration is refused when the bitmap of its largest
//!   message would not fit in one of its datagrams. (A receiver facing a peer with smaller
//!   datagrams, hence more fragments, sends the bitmap whole in a larger datagram, up to the UDP
//!   limit; only a message cut into more than ~520,000 fragments — which no valid sender
//!   configuration produces — would have its bitmap cut to a prefix, the rest unknown.)
//! - **Trailer last and over everything**, so it is computed in one pass when sealing, and the
//!   header flag says which trailer to expect. Reserved bytes and unused flag bits must be zero
//!   so that a later version can give them meaning.
//!
//! The decoder checks everything before returning: no field of a returned [`Datagram`] can make
//! the endpoint index out of bounds or allocate more than [`MESSAGE_BYTES_MAX`]. Every failure is
//! a [`DecodeError`] variant, and the endpoint counts each in its statistics.

use super::auth::{Auth, Key, CHECKSUM_BYTES, MAC_BYTES};
use super::NodeId;

/// The first two bytes of every datagram: "FT" (fams transport).
pub const MAGIC: [u8; 2] = *b"FT";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Kind byte of a DATA datagram.
pub const KIND_DATA: u8 = 1;
/// Kind byte of an ACK datagram.
pub const KIND_ACK: u8 = 2;
/// Kind byte of a HELLO datagram.
pub const KIND_HELLO: u8 = 3;
/// Flags bit 0: the trailer is a 16-byte MAC (else a 4-byte CRC32C).
pub const FLAG_KEYED: u8 = 1;

/// Bytes of the common header (up to and including the cumulative ack).
pub const HEADER_BYTES: usize = 40;
/// Bytes before a DATA datagram's payload.
pub const DATA_HEADER_BYTES: usize = 64;
/// Bytes before an ACK datagram's bitmap.
pub const ACK_HEADER_BYTES: usize = 56;
/// Bytes of a HELLO datagram before its trailer.
pub const HELLO_HEADER_BYTES: usize = HEADER_BYTES;

/// The hard limit on one message's length: 4 MiB. The configuration may lower it, never raise it.
pub const MESSAGE_BYTES_MAX: usize = 4 << 20;
/// The largest UDP payload over IPv4 (65,535 − 20 IP − 8 UDP).
pub const UDP_PAYLOAD_BYTES_MAX: usize = 65_507;
/// The smallest datagram size an endpoint may be configured with (every fragment then still
/// carries at least 432 payload bytes).
pub const DATAGRAM_BYTES_MIN: usize = 512;

/// The common header of every datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    pub sender: NodeId,
    pub receiver: NodeId,
    pub incarnation: u64,
    /// Every seq from `receiver` to `sender` up to this one was durably consumed by `sender`.
    pub ack: u64,
}

/// One fragment of one message (the body of a DATA datagram).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fragment<'a> {
    pub seq: u64,
    pub message_len: u32,
    pub frag_index: u32,
    pub frag_count: u32,
    pub payload: &'a [u8],
}

/// A selective ack: which fragments of message `seq` the receiver holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sack<'a> {
    pub seq: u64,
    /// How many fragments (from fragment 0) `bitmap` describes.
    pub frag_count: u32,
    /// Bit i (byte i / 8, bit i % 8) set = fragment i is held.
    pub bitmap: &'a [u8],
}

impl Sack<'_> {
    /// True when the bitmap says fragment `index` is held.
    pub fn holds(&self, index: u32) -> bool {
        index < self.frag_count && self.bitmap[(index / 8) as usize] & (1 << (index % 8)) != 0
    }
}

/// One decoded (or to-be-encoded) datagram. Payloads borrow from the datagram's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Datagram<'a> {
    Data { header: Header, fragment: Fragment<'a> },
    Ack { header: Header, sack: Option<Sack<'a>> },
    Hello { header: Header },
}

impl<'a> Datagram<'a> {
    /// The common header.
    pub fn header(&self) -> &Header {
        match self {
            Datagram::Data { header, .. } | Datagram::Ack { header, .. } | Datagram::Hello { header } => header,
        }
    }

    /// The kind byte this datagram is encoded with.
    pub fn kind(&self) -> u8 {
        match self {
            Datagram::Data { .. } => KIND_DATA,
            Datagram::Ack { .. } => KIND_ACK,
            Datagram::Hello { .. } => KIND_HELLO,
        }
    }
}

/// Why a datagram was rejected. The endpoint counts every variant (see
/// [`TransportStats`](super::TransportStats)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("datagram too short: {len} bytes")]
    TooShort { len: usize },
    #[error("bad magic (not a fams transport datagram)")]
    BadMagic,
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    #[error("reserved bytes are not zero")]
    ReservedNonzero,
    #[error("datagram is {} but this endpoint is {}", keyed_name(*datagram_keyed), keyed_name(!*datagram_keyed))]
    AuthMode { datagram_keyed: bool },
    #[error("bad CRC32C checksum")]
    BadChecksum,
    #[error("bad MAC")]
    BadMac,
    #[error("DATA with sequence number 0")]
    ZeroSequence,
    #[error("message length {len} exceeds the limit {max}")]
    MessageTooLarge { len: u64, max: u64 },
    #[error("fragment count {frag_count} inconsistent with message length {message_len}")]
    FragmentCount { message_len: u32, frag_count: u32 },
    #[error("fragment index {index} not below fragment count {count}")]
    FragmentIndex { index: u32, count: u32 },
    #[error("fragment {index} carries {len} bytes, its layout says {expected}")]
    FragmentLength { index: u32, len: u32, expected: u32 },
    #[error("length field says {field} bytes, the datagram holds {actual}")]
    PayloadLength { field: u64, actual: u64 },
    #[error("selective ack fields inconsistent")]
    SackInconsistent,
    #[error("selective ack bitmap length {bitmap_len} inconsistent (fragments {frag_count}, bytes left {actual})")]
    SackBitmapLength { frag_count: u32, bitmap_len: u32, actual: u64 },
}

fn keyed_name(keyed: bool) -> &'static str {
    if keyed {
        "keyed"
    } else {
        "unkeyed"
    }
}

impl DecodeError {
    /// A short stable name for the reason, as used in statistics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooShort { .. } => "too_short",
            DecodeError::BadMagic => "bad_magic",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::UnknownFlags(_) => "unknown_flags",
            DecodeError::ReservedNonzero => "reserved_nonzero",
            DecodeError::AuthMode { .. } => "auth_mode",
            DecodeError::BadChecksum => "bad_checksum",
            DecodeError::BadMac => "bad_mac",
            DecodeError::ZeroSequence => "zero_sequence",
            DecodeError::MessageTooLarge { .. } => "message_too_large",
            DecodeError::FragmentCount { .. } => "fragment_count",
            DecodeError::FragmentIndex { .. } => "fragment_index",
            DecodeError::FragmentLength { .. } => "fragment_length",
            DecodeError::PayloadLength { .. } => "payload_length",
            DecodeError::SackInconsistent => "sack_inconsistent",
            DecodeError::SackBitmapLength { .. } => "sack_bitmap_length",
        }
    }
}

/// The length of every fragment but the last of a `message_len`-byte message cut into
/// `frag_count` fragments: `ceil(message_len / frag_count)`. `None` when the layout is invalid
/// (no fragment, or the last fragment would be empty); an empty message is one empty fragment.
pub fn fragment_stride(message_len: u64, frag_count: u64) -> Option<u64> {
    if frag_count == 0 {
        return None;
    }
    if message_len == 0 {
        return (frag_count == 1).then_some(0);
    }
    if frag_count > message_len {
        return None;
    }
    let stride = message_len.div_ceil(frag_count);
    ((frag_count - 1) * stride < message_len).then_some(stride)
}

/// The byte range of fragment `index` in a message with a valid layout (see [`fragment_stride`]).
///
/// Panics on an invalid layout or index: call it only on what [`decode`] returned or a sender built.
pub fn fragment_range(message_len: u64, frag_count: u64, index: u64) -> std::ops::Range<usize> {
    let stride = fragment_stride(message_len, frag_count).expect("fragment_range of an invalid layout");
    debug_assert!(index < frag_count);
    let start = index * stride;
    let end = (start + stride).min(message_len);
    start as usize..end as usize
}

/// How many fragments a sender cuts a `message_len`-byte message into when each fragment may
/// carry at most `payload_max` bytes.
pub fn fragment_count_for(message_len: u64, payload_max: u64) -> u64 {
    debug_assert!(payload_max > 0);
    message_len.div_ceil(payload_max).max(1)
}

/// Bytes of the trailer for a keyed or unkeyed datagram.
pub fn trailer_bytes(keyed: bool) -> usize {
    if keyed {
        MAC_BYTES
    } else {
        CHECKSUM_BYTES
    }
}

/// Encodes `datagram` (appending to `out`, which is cleared first) and seals it with `auth`'s
/// trailer. The datagram must be valid (as [`decode`] would return it); this is checked in debug
/// builds only, since the endpoint only encodes what it built itself.
pub fn encode_with(datagram: &Datagram<'_>, auth: &Auth, out: &mut Vec<u8>) {
    out.clear();
    let header = datagram.header();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(datagram.kind());
    out.push(if auth.keyed() { FLAG_KEYED } else { 0 });
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&header.sender.0.to_le_bytes());
    out.extend_from_slice(&header.receiver.0.to_le_bytes());
    out.extend_from_slice(&header.incarnation.to_le_bytes());
    out.extend_from_slice(&header.ack.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_BYTES);
    match datagram {
        Datagram::Data { fragment, .. } => {
            debug_assert!(fragment.seq != 0);
            debug_assert!(fragment.frag_index < fragment.frag_count);
            debug_assert_eq!(
                fragment_range(fragment.message_len as u64, fragment.frag_count as u64, fragment.frag_index as u64)
                    .len(),
                fragment.payload.len()
            );
            out.extend_from_slice(&fragment.seq.to_le_bytes());
            out.extend_from_slice(&fragment.message_len.to_le_bytes());
            out.extend_from_slice(&fragment.frag_index.to_le_bytes());
            out.extend_from_slice(&fragment.frag_count.to_le_bytes());
            out.extend_from_slice(&(fragment.payload.len() as u32).to_le_bytes());
            debug_assert_eq!(out.len(), DATA_HEADER_BYTES);
            out.extend_from_slice(fragment.payload);
        }
        Datagram::Ack { sack, .. } => {
            let (seq, count, bitmap) = match sack {
                Some(s) => (s.seq, s.frag_count, s.bitmap),
                None => (0, 0, &[][..]),
            };
            debug_assert_eq!(bitmap.len(), (count as usize).div_ceil(8));
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&(bitmap.len() as u32).to_le_bytes());
            debug_assert_eq!(out.len(), ACK_HEADER_BYTES);
            out.extend_from_slice(bitmap);
        }
        Datagram::Hello { .. } => {}
    }
    auth.seal(out);
}

/// Encodes `datagram` into `out` (cleared first), sealed with a MAC under `key` or with a CRC32C
/// when `key` is `None`. The endpoint uses [`encode_with`], which keeps the keyed state.
pub fn encode(datagram: &Datagram<'_>, key: Option<&Key>, out: &mut Vec<u8>) {
    encode_with(datagram, &Auth::new(key), out)
}

/// Decodes and verifies one datagram: fuzz-friendly, never panics, checks every field.
/// `key` must be the endpoint's key (`None` for an unkeyed endpoint).
pub fn decode<'a>(bytes: &'a [u8], key: Option<&Key>) -> Result<Datagram<'a>, DecodeError> {
    decode_with(bytes, &Auth::new(key))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// [`decode`] with the endpoint's prepared trailer scheme.
pub fn decode_with<'a>(bytes: &'a [u8], auth: &Auth) -> Result<Datagram<'a>, DecodeError> {
    let len = bytes.len();
    // The smallest datagram: a HELLO with a checksum.
    if len < HEADER_BYTES + CHECKSUM_BYTES {
        return Err(DecodeError::TooShort { len });
    }
    if bytes[0..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[2]));
    }
    let flags = bytes[4];
    if flags & !FLAG_KEYED != 0 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    let keyed = flags & FLAG_KEYED != 0;
    if keyed != auth.keyed() {
        return Err(DecodeError::AuthMode { datagram_keyed: keyed });
    }
    let trailer = auth.trailer_bytes();
    if len < HEADER_BYTES + trailer {
        return Err(DecodeError::TooShort { len });
    }
    let (body, tag) = bytes.split_at(len - trailer);
    if !auth.verify(body, tag) {
        return Err(if keyed { DecodeError::BadMac } else { DecodeError::BadChecksum });
    }
    if bytes[5..8] != [0, 0, 0] {
        return Err(DecodeError::ReservedNonzero);
    }
    let header = Header {
        sender: NodeId(u64_at(body, 8)),
        receiver: NodeId(u64_at(body, 16)),
        incarnation: u64_at(body, 24),
        ack: u64_at(body, 32),
    };
    match bytes[3] {
        KIND_DATA => {
            if body.len() < DATA_HEADER_BYTES {
                return Err(DecodeError::TooShort { len });
            }
            let seq = u64_at(body, 40);
            let message_len = u32_at(body, 48);
            let frag_index = u32_at(body, 52);
            let frag_count = u32_at(body, 56);
            let payload_len = u32_at(body, 60);
            if seq == 0 {
                return Err(DecodeError::ZeroSequence);
            }
            if message_len as u64 > MESSAGE_BYTES_MAX as u64 {
                return Err(DecodeError::MessageTooLarge { len: message_len as u64, max: MESSAGE_BYTES_MAX as u64 });
            }
            if fragment_stride(message_len as u64, frag_count as u64).is_none() {
                return Err(DecodeError::FragmentCount { message_len, frag_count });
            }
            if frag_index >= frag_count {
                return Err(DecodeError::FragmentIndex { index: frag_index, count: frag_count });
            }
            let payload = &body[DATA_HEADER_BYTES..];
            if payload_len as u64 != payload.len() as u64 {
                return Err(DecodeError::PayloadLength { field: payload_len as u64, actual: payload.len() as u64 });
            }
            let expected = fragment_range(message_len as u64, frag_count as u64, frag_index as u64).len() as u32;
            if payload_len != expected {
                return Err(DecodeError::FragmentLength { index: frag_index, len: payload_len, expected });
            }
            Ok(Datagram::Data { header, fragment: Fragment { seq, message_len, frag_index, frag_count, payload } })
        }
        KIND_ACK => {
            if body.len() < ACK_HEADER_BYTES {
                return Err(DecodeError::TooShort { len });
            }
            let sack_seq = u64_at(body, 40);
            let frag_count = u32_at(body, 48);
            let bitmap_len = u32_at(body, 52);
            let bitmap = &body[ACK_HEADER_BYTES..];
            if sack_seq == 0 {
                if frag_count != 0 || bitmap_len != 0 {
                    return Err(DecodeError::SackInconsistent);
                }
                if !bitmap.is_empty() {
                    return Err(DecodeError::PayloadLength { field: 0, actual: bitmap.len() as u64 });
                }
                return Ok(Datagram::Ack { header, sack: None });
            }
            // Each fragment holds at least one byte, so no message has more fragments than bytes.
            if frag_count == 0 || frag_count as u64 > MESSAGE_BYTES_MAX as u64 {
                return Err(DecodeError::SackInconsistent);
            }
            if bitmap_len as u64 != (frag_count as u64).div_ceil(8) || bitmap_len as u64 != bitmap.len() as u64 {
                return Err(DecodeError::SackBitmapLength { frag_count, bitmap_len, actual: bitmap.len() as u64 });
            }
            let used_bits = frag_count % 8;
            if used_bits != 0 && bitmap[bitmap.len() - 1] >> used_bits != 0 {
                return Err(DecodeError::SackInconsistent);
            }
            Ok(Datagram::Ack { header, sack: Some(Sack { seq: sack_seq, frag_count, bitmap }) })
        }
        KIND_HELLO => {
            if body.len() != HELLO_HEADER_BYTES {
                return Err(DecodeError::PayloadLength { field: 0, actual: (body.len() - HEADER_BYTES) as u64 });
            }
            Ok(Datagram::Hello { header })
        }
        kind => Err(DecodeError::UnknownKind(kind)),
    }
}
