//! Printing helpers shared by commands: JSON lines on stdout, progress bars on stderr.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Prints one JSON object as a line on stdout.
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(value)?;
    line.push('\n');
    text(&line)
}

/// Writes `text` to stdout. A reader that has gone (`graft fleet status | head -1`) ends the
/// output quietly: the commands that hold network connections keep SIGPIPE ignored (see
/// `main`), so they learn of it as an error here instead of from the signal.
pub fn text(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A progress bar on stderr for `len` steps; invisible when stderr is not a terminal or there
/// is only one step.
pub fn progress(len: usize, what: &str) -> ProgressBar {
    if len < 2 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A path for a line of text output: as it is, or quoted with escapes (`"shots/a\nb.jpg"`) when
/// it holds a control character, which would break the line (a newline) or the terminal.
pub fn path_text(path: &Path) -> String {
    let text = path.to_string_lossy();
    if text.chars().any(char::is_control) {
        format!("{path:?}")
    } else {
        text.into_owned()
    }
}
