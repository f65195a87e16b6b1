//! Deliberate bugs, for negative controls only (cargo feature `mutations`, never enabled in a
//! product build): a test switches one on and shows that the checks meant to catch it do.
//!
//! The one mutation, `transmit-before-durable`, makes the turn manager hand every committed
//! turn's outputs (messages, the ack of what it consumed, stdout) to the world at once, without
//! waiting for the turn to be durable — the output-commit violation `tests/turns_output_commit.rs`
//! must catch. It is chosen with [`set`], or with the environment variable `FAMS_MUTATION` (read
//! once, at the first check or [`set`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// Release a turn's outputs before it is durable (see the module docs).
pub const TRANSMIT_BEFORE_DURABLE: &str = "transmit-before-durable";

static TRANSMIT_BEFORE_DURABLE_ON: AtomicBool = AtomicBool::new(false);
static FROM_ENV: Once = Once::new();

fn init() {
    FROM_ENV.call_once(|| {
        if let Ok(name) = std::env::var("FAMS_MUTATION") {
            switch(&name).unwrap_or_else(|e| panic!("FAMS_MUTATION: {e}"));
        }
    });
}

/// Switch on the mutation called `name` (process-wide), or every mutation off with `""` or
/// `"none"`.
pub fn set(name: &str) -> Result<(), String> {
    init();
    switch(name)
}

fn switch(name: &str) -> Result<(), String> {
    match name {
        "" | "none" => TRANSMIT_BEFORE_DURABLE_ON.store(false, Ordering::SeqCst),
        TRANSMIT_BEFORE_DURABLE => TRANSMIT_BEFORE_DURABLE_ON.store(true, Ordering::SeqCst),
        other => return Err(format!("unknown mutation {other:?}; known: {TRANSMIT_BEFORE_DURABLE:?}")),
    }
    Ok(())
}

/// Whether `transmit-before-durable` is on.
pub fn transmit_before_durable() -> bool {
    init();
    TRANSMIT_BEFORE_DURABLE_ON.load(Ordering::Relaxed)
}
