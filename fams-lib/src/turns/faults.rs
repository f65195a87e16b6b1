//! Network faults injected at the socket seam of a real node: each outgoing datagram may be
//! dropped, duplicated, or held back for a while (which reorders it behind later ones). Seeded,
//! for tests and fault runs on real sockets where `tc netem` is not available.

use crate::sim::SimRng;
use crate::transport::Transmit;
use std::time::{Duration, Instant};

/// Probabilities per outgoing datagram.
#[derive(Clone, Copy, Debug)]
pub struct FaultConfig {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
    /// A reordered datagram is held back up to this long.
    pub delay_max: Duration,
    pub seed: u64,
}

impl FaultConfig {
    /// "LOSS,DUP,REORDER,SEED", e.g. "0.3,0.1,0.1,7".
    pub fn parse(s: &str) -> Result<FaultConfig, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let bad = || {
            format!("`{s}`: faults are LOSS,DUPLICATE,REORDER,SEED with probabilities in [0, 1), e.g. 0.3,0.1,0.1,7")
        };
        if parts.len() != 4 {
            return Err(bad());
        }
        let p = |i: usize| parts[i].parse::<f64>().ok().filter(|p| (0.0..1.0).contains(p)).ok_or_else(bad);
        Ok(FaultConfig {
            loss: p(0)?,
            duplicate: p(1)?,
            reorder: p(2)?,
            delay_max: Duration::from_millis(20),
            seed: parts[3].parse().map_err(|_| bad())?,
        })
    }
}

/// What the fault layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    pub dropped: u64,
    pub duplicated: u64,
    pub delayed: u64,
}

/// Datagrams held back, and the generator deciding each datagram's fate.
pub(crate) struct FaultLayer {
    config: FaultConfig,
    rng: SimRng,
    held: Vec<(Instant, Transmit)>,
    pub counters: FaultCounters,
}

/// Held datagrams at most (a bound on memory; beyond it datagrams are sent at once).
const HELD_DATAGRAMS_MAX: usize = 4096;

impl FaultLayer {
    pub fn new(config: FaultConfig) -> FaultLayer {
        FaultLayer { config, rng: SimRng::new(config.seed), held: Vec::new(), counters: FaultCounters::default() }
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// What to send now in place of `t` (nothing, it, it twice); may hold it for later.
    pub fn outgoing(&mut self, now: Instant, t: Transmit, out: &mut Vec<Transmit>) {
        if self.chance(self.config.loss) {
            self.counters.dropped += 1;
            return;
        }
        let copies = if self.chance(self.config.duplicate) {
            self.counters.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.held.len() < HELD_DATAGRAMS_MAX && self.chance(self.config.reorder) {
                let delay_us = self.rng.below(self.config.delay_max.as_micros() as u64 + 1);
                self.counters.delayed += 1;
                self.held.push((now + Duration::from_micros(delay_us), t.clone()));
            } else {
                out.push(t.clone());
            }
        }
    }

    /// Held datagrams whose time has come.
    pub fn due(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                out.push(self.held.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.0).min()
    }
}
