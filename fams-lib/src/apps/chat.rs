//! A chat room: every line typed on a node's stdin goes to every peer, which prints it. Shows
//! stdin and stdout externalization: a line is read at most once, and printed (at least once)
//! only after the turn that received it is durable; the room's history count lives in the heap.

use crate::turns::{App, Input, Turn, TurnError};

crate::persistent! {
    /// Counters kept in the heap.
    pub struct Room {
        pub said: u64,
        pub heard: u64,
    }
}

/// The chat application.
pub struct ChatApp;

impl App for ChatApp {
    const SCHEMA_VERSION: u64 = 1;

    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let me = t.node();
        match input {
            Input::Start => {
                t.heap.root(|_| Room { said: 0, heard: 0 })?;
                t.println(&format!("[node {me} joined; type a line to send it to {} peers]", t.peers().len()))?;
            }
            Input::Restarted => {
                let room = t.heap.root(|_| Room { said: 0, heard: 0 })?;
                let (said, heard) = (room.said, room.heard);
                t.println(&format!("[node {me} is back: {said} lines said, {heard} heard so far]"))?;
            }
            Input::Stdin(line) => {
                if line.is_empty() {
                    return Ok(());
                }
                let room = t.heap.root(|_| Room { said: 0, heard: 0 })?;
                room.said += 1;
                for peer in t.peers() {
                    t.send(peer, line)?;
                }
            }
            Input::Message { from, bytes, .. } => {
                let room = t.heap.root(|_| Room { said: 0, heard: 0 })?;
                room.heard += 1;
                t.println(&format!("{from}: {}", String::from_utf8_lossy(bytes)))?;
            }
            Input::Alarm => {}
        }
        Ok(())
    }
}
