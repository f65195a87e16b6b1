//! Progress of long commands on stderr, as `indicatif` bars: drawn only when stderr is a terminal
//! and the command was not asked for `--json`; otherwise silent (logs and scripts get the result,
//! not the drawing).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

/// Steps of a command, each with what it is doing.
pub(crate) struct Progress {
    bar: ProgressBar,
    pub(crate) started: Instant,
}

impl Progress {
    /// `wanted`: the command wants progress (not `--json`). Drawn only on a terminal.
    pub(crate) fn new(wanted: bool, steps: usize) -> Progress {
        let bar = if wanted && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("[{bar:24}] {pos}/{len} {msg} ({elapsed})")
                    .expect("a valid template")
                    .progress_chars("#>."),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, started: Instant::now() }
    }

    /// A step begins.
    pub(crate) fn next(&mut self, what: &str) {
        self.bar.inc(1);
        self.bar.set_message(what.to_string());
    }

    /// Where a counted loop is (`position` of the length given at `new`), and what it has seen.
    pub(crate) fn at(&self, position: u64, what: String) {
        self.bar.set_position(position);
        self.bar.set_message(what);
    }

    /// Print a line above the bar (or plainly when there is no bar).
    pub(crate) fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
