//! Round-trip time estimation and the retransmission timeout, after RFC 6298.
//!
//! - Before the first sample the timeout is `rto_initial` (default 200 ms: a LAN round trip
//!   plus a commit is typically well below that; Ken used a fixed 250 ms).
//! - The first sample R sets SRTT = R, RTTVAR = R/2; each later sample R' sets
//!   RTTVAR = 3/4 RTTVAR + 1/4 |SRTT − R'| and then SRTT = 7/8 SRTT + 1/8 R'.
//! - RTO = SRTT + max(G, 4 RTTVAR) with the clock granularity G = [`CLOCK_GRANULARITY`], clamped
//!   to `[rto_min, rto_max]`. RFC 6298 asks for a 1 s minimum, sized for the Internet of 2011 and
//!   delayed acks; our peers are typically on one LAN, acks are not delayed on purpose, and the
//!   measured round trip already includes the peer's commit, so the floor is configurable
//!   (default 5 ms).
//! - Each timeout doubles the timeout (exponential backoff), capped at `rto_max` (default 2 s,
//!   far below Ken's one hour: a restarted peer announces itself anyway, and a bounded cap keeps
//!   recovery after a partition heals quick). Progress (an ack or a selective ack that covers
//!   something new) resets the backoff.
//! - Karn's rule is the caller's: samples are taken only from data that was sent exactly once,
//!   because an ack for retransmitted data cannot tell which transmission it answers.
//!
//! A sample from a cumulative ack includes the time the peer took to consume the message in a
//! durable turn (the ack is only sent then). That is what we want the timer to wait for: a
//! retransmission before the peer could possibly ack is wasted.

use std::time::Duration;

/// The clock granularity term G of RFC 6298.
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(1);

/// Doubling beyond this many timeouts cannot change anything any more (2^20 × 1 µs > any sane
/// `rto_max`); the shift is capped to keep the arithmetic in range.
pub const BACKOFF_SHIFT_MAX: u32 = 20;

/// One peer's RTT estimate and retransmission timeout.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    initial: Duration,
    min: Duration,
    max: Duration,
    backoff_shift: u32,
}

impl RttEstimator {
    /// A fresh estimator (no sample yet). Requires `min ≤ initial ≤ max` and `min > 0`.
    pub fn new(initial: Duration, min: Duration, max: Duration) -> RttEstimator {
        assert!(
            !min.is_zero() && min <= initial && initial <= max,
            "rto bounds: min {min:?} initial {initial:?} max {max:?}"
        );
        RttEstimator { srtt: None, rttvar: Duration::ZERO, initial, min, max, backoff_shift: 0 }
    }

    /// Feeds one round-trip sample (from data sent exactly once).
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The smoothed round-trip time, once there was a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The round-trip variation (zero before the first sample).
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// The timeout without backoff.
    pub fn base_rto(&self) -> Duration {
        let rto = match self.srtt {
            None => self.initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(CLOCK_GRANULARITY),
        };
        rto.clamp(self.min, self.max)
    }

    /// The timeout to arm now: the base timeout doubled once per unanswered timeout, capped.
    pub fn rto(&self) -> Duration {
        let base = self.base_rto();
        base.checked_mul(1u32 << self.backoff_shift).unwrap_or(self.max).min(self.max)
    }

    /// A timeout fired: double the timeout (up to `rto_max`).
    pub fn back_off(&mut self) {
        if self.rto() < self.max {
            self.backoff_shift = (self.backoff_shift + 1).min(BACKOFF_SHIFT_MAX);
        }
    }

    /// Something new was acknowledged (or the peer restarted): no more backoff.
    pub fn reset_backoff(&mut self) {
        self.backoff_shift = 0;
    }

    /// How many doublings are in effect.
    pub fn backoff_shift(&self) -> u32 {
        self.backoff_shift
    }
}
