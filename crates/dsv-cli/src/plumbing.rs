//! Plumbing: `dsv snapshot` stores a folder as a version on a ref, the
//! engine-level building block under `dsv dataset sync`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use dsv_store::{IngestOptions, StageMode};

use crate::error::CliError;
use crate::output::{self, Bar};
use crate::repo;
use crate::Ctx;

/// `dsv snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Folder to store.
    folder: PathBuf,
    /// Ref to advance (its current version becomes the parent).
    #[arg(long = "ref", default_value = "snapshots/main")]
    refname: String,
    /// Message recorded in the version.
    #[arg(long, short, default_value = "")]
    message: String,
    /// Keep paths the ref's version has that the folder lacks.
    #[arg(long)]
    add: bool,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

pub fn snapshot(ctx: &Ctx, a: SnapshotArgs) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    dsv_store::store::validate_label(&a.refname, "ref name")?;
    let parent = store.get_ref(&a.refname)?;
    let bar = Bar::new(ctx.progress);
    let opts = IngestOptions {
        mode: if a.add {
            StageMode::Add
        } else {
            StageMode::Sync
        },
        progress: &bar,
        ..Default::default()
    };
    let parents: Vec<_> = parent.into_iter().collect();
    let refname = a.refname.clone();
    let out = store.commit_folder(
        &parents,
        &a.folder,
        &opts,
        &a.message,
        Default::default(),
        &mut |kv, v, b| {
            // The ref must still point where it did when we read it.
            if dsv_store::store::get_ref_in(kv, &refname)? != parent {
                return Err(dsv_store::Error::Invalid(format!(
                    "ref {refname} moved while the folder was read; run again"
                )));
            }
            dsv_store::store::set_ref_batch(&refname, &v.id, b)
        },
    )?;
    let r = &out.report;
    let d = &r.diff;
    if ctx.json {
        let mut doc = json!({
            "changed": out.version.is_some(),
            "ref": a.refname,
            "files": r.files_scanned,
            "files_hashed": r.files_hashed,
            "bytes_hashed": r.bytes_hashed,
            "new_chunks": r.new_chunks,
            "stored_bytes": r.stored_bytes,
            "added": d.added.iter().map(|p| lossy(&p.path)).collect::<Vec<_>>(),
            "modified": d.modified.iter().map(|p| lossy(&p.path)).collect::<Vec<_>>(),
            "removed": d.removed.iter().map(|p| lossy(&p.path)).collect::<Vec<_>>(),
            "renamed": d.renamed.iter().map(|p| json!({"from": lossy(&p.from), "to": lossy(&p.to)})).collect::<Vec<_>>(),
            "skipped": r.skipped_special.iter().chain(&r.vanished).map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        match &out.version {
            Some(v) => {
                doc["id"] = json!(v.id);
                doc["parents"] = json!(v.object.parents);
                doc["file_count"] = json!(v.object.file_count);
                doc["total_bytes"] = json!(v.object.total_bytes);
                doc["delta"] = json!(v.object.delta);
            }
            None => doc["id"] = json!(parent),
        }
        return output::json(&doc);
    }
    for p in &r.skipped_special {
        eprintln!(
            "warning: skipped {} (not a file, folder or symlink)",
            p.display()
        );
    }
    for p in &r.vanished {
        eprintln!(
            "warning: {} vanished while being read; not stored",
            p.display()
        );
    }
    match &out.version {
        Some(v) => {
            let dl = &v.object.delta;
            println!(
                "{} {}: +{} ~{} -{} >{} ({} files, {}; {} newly stored)",
                a.refname,
                v.id.short(12),
                dl.added,
                dl.modified,
                dl.removed,
                dl.renamed,
                v.object.file_count,
                output::bytes(v.object.total_bytes),
                output::bytes(dl.stored_bytes)
            );
        }
        None => println!(
            "{} unchanged ({} files checked, {} hashed)",
            a.refname, r.files_scanned, r.files_hashed
        ),
    }
    Ok(())
}
