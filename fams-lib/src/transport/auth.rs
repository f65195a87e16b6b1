//! The trailer of every datagram: a keyed MAC when the endpoints share a key, else a checksum.
//!
//! - Keyed: HMAC-SHA256 over every byte before the trailer, truncated to its first
//!   [`MAC_BYTES`] (16) bytes (RFC 2104 §5 allows truncation to at least half the hash; 128 bits
//!   leave a forger a 2^-128 chance per attempt). The comparison is constant-time
//!   (`Mac::verify_truncated_left`), so a forger learns nothing from how long a rejection took.
//! - Unkeyed: CRC32C over the same bytes, [`CHECKSUM_BYTES`] (4) bytes. It catches corruption
//!   that the UDP checksum missed (or that a zero UDP checksum never looked for); it proves
//!   nothing about who sent the datagram.
//!
//! The key is a 32-byte shared secret ([`Key`]). The HMAC state after absorbing the key is
//! computed once per endpoint and cloned per datagram, so a MAC costs the hash of the datagram
//! plus two compression-function calls, not a fresh key schedule.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A shared secret: every endpoint of one fams system that authenticates uses the same key.
pub type Key = [u8; 32];

/// Bytes of the truncated HMAC-SHA256 trailer of a keyed datagram.
pub const MAC_BYTES: usize = 16;

/// Bytes of the CRC32C trailer of an unkeyed datagram.
pub const CHECKSUM_BYTES: usize = 4;

type HmacSha256 = Hmac<Sha256>;

/// How an endpoint seals and checks its datagrams' trailers.
#[derive(Clone)]
pub enum Auth {
    /// No key: a CRC32C trailer.
    Checksum,
    /// A shared key: an HMAC-SHA256 trailer truncated to [`MAC_BYTES`]. Holds the keyed state.
    Keyed(Box<HmacSha256>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key (or state derived from it).
        match self {
            Auth::Checksum => f.write_str("Auth::Checksum"),
            Auth::Keyed(_) => f.write_str("Auth::Keyed(..)"),
        }
    }
}

impl Auth {
    /// The trailer scheme for an optional key.
    pub fn new(key: Option<&Key>) -> Auth {
        match key {
            None => Auth::Checksum,
            // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
            Some(key) => Auth::Keyed(Box::new(HmacSha256::new_from_slice(key).expect("HMAC takes any key length"))),
        }
    }

    /// True when datagrams carry a MAC.
    pub fn keyed(&self) -> bool {
        matches!(self, Auth::Keyed(_))
    }

    /// Bytes of the trailer this scheme appends.
    pub fn trailer_bytes(&self) -> usize {
        if self.keyed() {
            MAC_BYTES
        } else {
            CHECKSUM_BYTES
        }
    }

    /// Appends the trailer over everything already in `out`.
    pub fn seal(&self, out: &mut Vec<u8>) {
        match self {
            Auth::Checksum => {
                let crc = crc32c::crc32c(out);
                out.extend_from_slice(&crc.to_le_bytes());
            }
            Auth::Keyed(state) => {
                let mut mac = (**state).clone();
                mac.update(out);
                let tag = mac.finalize().into_bytes();
                out.extend_from_slice(&tag[..MAC_BYTES]);
            }
        }
    }

    /// Checks `trailer` against `body` (the bytes before it). The trailer's length must be this
    /// scheme's [`Auth::trailer_bytes`]; anything else fails. MAC comparison is constant-time.
    pub fn verify(&self, body: &[u8], trailer: &[u8]) -> bool {
        match self {
            Auth::Checksum => trailer.len() == CHECKSUM_BYTES && crc32c::crc32c(body).to_le_bytes()[..] == trailer[..],
            Auth::Keyed(state) => {
                if trailer.len() != MAC_BYTES {
                    return false;
                }
                let mut mac = (**state).clone();
                mac.update(body);
                mac.verify_truncated_left(trailer).is_ok()
            }
        }
    }
}
