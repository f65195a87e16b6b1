//! Signalling the child processes famsd starts (turn nodes, relays, torture children).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Child;

/// Send `sig` to our child unless it has already been reaped: until we wait for it, a child
/// that exits stays a zombie holding its pid, so the pid cannot name another process; after
/// `try_wait` has reaped it, it could.
pub fn signal_child(child: &mut Child, sig: Signal) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = kill(Pid::from_raw(child.id() as i32), sig);
    }
}
