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
}

impl Bar {
    /// A bar when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self {
            bar: enabled.then(ProgressBar::hidden),
        }
    }
}

impl dsv_store::Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.reset();
            b.set_length(total);
            b.set_position(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(phase.to_string());
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
