//! A trigger loop in a few lines: fires the repository's triggers on what
//! happened since they last ran, then exits.
//!
//! ```text
//! cargo run -p dsv-runtime --example triggers -- PATH/.dsv
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use dsv_runtime::{TriggerEvents, TriggerLoop, TriggerOptions};

/// Prints each firing.
struct Print;

impl TriggerEvents for Print {
    fn fired(&self, f: &dsv::Firing) {
        println!(
            "{}: event #{} ({:?}): {}",
            f.trigger, f.event, f.kind, f.note
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".dsv".into());
    let repo = Arc::new(dsv::Repo::open(dir.as_ref(), Default::default())?);
    let triggers = TriggerLoop::new(
        repo,
        TriggerOptions {
            once: true,
            ..Default::default()
        },
    );
    let fired = triggers.run(&AtomicBool::new(false), &Print)?;
    println!("{} firing(s)", fired.len());
    Ok(())
}
