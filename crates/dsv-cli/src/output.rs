//! Output helpers: JSON printing, byte formatting, progress bars.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::CliError;

/// Prints a JSON value on stdout.
pub fn json(value: &serde_json::Value) -> Result<(), CliError> {
    // Buffered: stdout is line-buffered, and a long listing would
    // otherwise cost one write(2) per line.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value).map_err(|e| CliError::repo(e.to_string()))?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The width of the terminal on stdout, or `None` when stdout is not one.
#[allow(unsafe_code)]
pub fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// Human-readable bytes (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A progress reporter drawing an indicatif bar on stderr (or nothing).
pub struct Bar {
    bar: Option<ProgressBar>,
    target: fn() -> indicatif::ProgressDrawTarget,
}

impl Bar {
    /// A bar when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self {
            bar: enabled.then(ProgressBar::hidden),
            target: indicatif::ProgressDrawTarget::stderr,
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl dsv_store::Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if let Some(b) = &self.bar {
            // Style, length and phase are set while the bar is hidden: it
            // becomes visible only once it looks as it should (showing it
            // first drew one frame in indicatif's default style).
            b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            b.reset();
            b.set_style(style());
            b.set_length(total);
            b.set_position(0);
            b.set_message(phase.to_string());
            b.set_draw_target((self.target)());
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use dsv_store::Progress;

    use super::*;

    /// A terminal that records every line and string drawn.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            // Blank writes erase a previous frame; only frames count.
            if !s.trim().is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static SCREEN: Mutex<Option<Screen>> = Mutex::new(None);

    fn screen_target() -> indicatif::ProgressDrawTarget {
        let s = SCREEN.lock().unwrap().clone().expect("screen set");
        indicatif::ProgressDrawTarget::term_like(Box::new(s))
    }

    #[test]
    fn every_frame_drawn_is_styled() {
        let screen = Screen::default();
        *SCREEN.lock().unwrap() = Some(screen.clone());
        let bar = Bar {
            bar: Some(ProgressBar::hidden()),
            target: screen_target,
        };
        for phase in ["hashing", "storing"] {
            bar.start(phase, 1000);
            bar.advance(10);
            bar.advance(990);
            bar.finish();
        }
        let frames = screen.0.lock().unwrap().clone();
        assert!(!frames.is_empty(), "the bar drew nothing");
        for f in &frames {
            assert!(
                (f.contains("hashing") || f.contains("storing")) && f.contains('['),
                "an unstyled frame was drawn: {f:?} (all: {frames:?})"
            );
        }
    }
}
