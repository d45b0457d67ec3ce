//! What a labeling tool's "upload" button calls: link the `dsv` library,
//! get-or-create the dataset, start a writable copy of its newest version,
//! add the files the labeler just finished under their `dataset_path`, and
//! finalize — one new version that stores only what is new.
//!
//! ```text
//! cargo run -p dsv --example labeling_tool -- REPO_DIR PROJECT/NAME DATASET_PATH FILE...
//! ```
//! `REPO_DIR` is a folder holding `.dsv` (created when missing).

use std::path::{Path, PathBuf};

use dsv::{AddOptions, CreateOptions, Repo};
use dsv_store::{RepoConfig, StoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: labeling_tool REPO_DIR PROJECT/NAME DATASET_PATH FILE...".into());
    }
    let dot = Path::new(&args[0]).join(".dsv");
    let opts = StoreOptions {
        holder: "labeling-tool upload".into(),
        ..Default::default()
    };
    let repo = if dot.join("config.json").exists() {
        Repo::open(&dot, opts)?
    } else {
        Repo::init(&dot, RepoConfig::default(), opts)?
    };
    let (project, name) = dsv::rev::parse_dataset_name(&args[1])?;
    let files: Vec<PathBuf> = args[3..].iter().map(PathBuf::from).collect();

    // Get-or-create + writable copy of the newest version.
    let draft = repo.writable_copy_or_create(
        &project,
        &name,
        &CreateOptions {
            message: format!("upload of {} file(s)", files.len()),
            ..Default::default()
        },
    )?;
    // Add what the labeler finished, where it belongs in the dataset.
    let report = repo.add(
        &draft,
        &files,
        &AddOptions {
            dataset_path: args[2].clone(),
            ..Default::default()
        },
    )?;
    if report.added.is_empty() && report.modified.is_empty() {
        repo.discard(&draft)?;
        println!("nothing new in {project}/{name}");
        return Ok(());
    }
    let v = repo.finalize(&draft)?;
    println!(
        "{project}/{name} {} ({}): +{} ~{}, {} newly stored bytes",
        v.version,
        v.id.short(12),
        v.delta.added,
        v.delta.modified,
        v.delta.stored_bytes
    );
    Ok(())
}
