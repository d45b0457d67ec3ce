//! `dsv dataset watch`: arguments, signals and rendering. The watch itself
//! (settle, stage, resume, finalize) is `dsv_runtime::Watcher`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use dsv_runtime::{WatchEvents, WatchOptions, Watcher};

use crate::error::CliError;
use crate::output;
use crate::Ctx;

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// PROJECT/NAME.
    dataset: String,
    /// Folder to watch.
    folder: PathBuf,
    /// Seconds a file must stay unchanged before it is added.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Folder inside the dataset the watched folder maps to.
    #[arg(long, default_value = "")]
    dataset_path: String,
}

/// Progress on stderr (nothing but warnings with `--json`).
struct WatchOutput {
    json: bool,
}

impl WatchEvents for WatchOutput {
    fn staged(&self, path: &str) {
        if !self.json {
            eprintln!("  staged {path}");
        }
    }
    fn watch_error(&self, message: &str) {
        eprintln!("warning: file watching: {message}");
    }
    fn not_added(&self, file: &Path, error: &dsv::Error) {
        eprintln!("warning: {} not added: {error}", file.display());
    }
    fn unsettled(&self, files: &[PathBuf]) {
        if !self.json {
            eprintln!(
                "{} file(s) still changing were not added: {}",
                files.len(),
                files
                    .iter()
                    .take(5)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}

/// Runs the watch until SIGINT or SIGTERM.
pub fn watch(ctx: &Ctx, a: WatchArgs) -> Result<(), CliError> {
    let repo = crate::dataset::open(ctx)?;
    let (project, name) = dsv::rev::parse_dataset_name(&a.dataset)?;
    if !(a.settle.is_finite() && a.settle >= 0.0) {
        return Err(CliError::user(format!(
            "--settle {}: must be a number of seconds ≥ 0",
            a.settle
        )));
    }
    let watcher = Watcher::new(
        &repo,
        WatchOptions {
            project: project.clone(),
            name: name.clone(),
            folder: a.folder.clone(),
            settle: Duration::from_secs_f64(a.settle),
            dataset_path: a.dataset_path.clone(),
        },
    )?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| CliError::repo(format!("cannot handle signals: {e}")))?;
    let stopper = watcher.stopper();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            stopper.stop(sig);
        }
    });
    if !ctx.json {
        eprintln!(
            "{} draft {} of {}/{}; watching {} (settle {:.1}s); Ctrl-C finalizes",
            if watcher.resumed() {
                "resuming"
            } else {
                "started"
            },
            watcher.draft().id.short(12),
            project,
            name,
            watcher.folder().display(),
            a.settle
        );
    }
    let out = watcher.run(&WatchOutput { json: ctx.json })?;
    let shown = (|| -> Result<(), CliError> {
        let Some(v) = out.version else {
            if ctx.json {
                return output::json(&json!({"changed": false, "signal": out.signal}));
            }
            eprintln!("nothing new; no version created");
            return Ok(());
        };
        if ctx.json {
            let mut doc = crate::dataset::version_json(&v);
            doc["changed"] = json!(true);
            doc["staged_this_run"] = json!(out.staged);
            return output::json(&doc);
        }
        let d = &v.delta;
        println!(
            "{}/{} {} {}: +{} ~{} -{} ({} files)",
            project,
            name,
            v.version,
            v.id.short(12),
            d.added,
            d.modified,
            d.removed,
            v.file_count
        );
        Ok(())
    })();
    shown?;
    // Shown first: a flush that fails does not hide the version made.
    crate::remote_cmds::flush_objects(ctx, &repo)
}
