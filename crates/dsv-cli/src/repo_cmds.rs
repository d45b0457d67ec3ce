//! `dsv init`, `fsck`, `gc`, `stats`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use dsv_store::{ChunkerParams, GcOptions, RepoConfig, Store, VerifyOptions};

use crate::error::CliError;
use crate::output::{self, Bar};
use crate::repo::{self, DOT_DSV};
use crate::Ctx;

/// `dsv init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Folder to create the repository in (PATH/.dsv).
    path: Option<PathBuf>,
    /// Smallest chunk in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    chunk_min: u32,
    /// Average chunk in bytes (a power of two).
    #[arg(long, default_value_t = 64 * 1024)]
    chunk_avg: u32,
    /// Largest chunk in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    chunk_max: u32,
    /// zstd level (1..=19).
    #[arg(long, default_value_t = 3)]
    compression_level: i32,
}

/// `dsv fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Read, decompress and rehash every stored chunk.
    #[arg(long)]
    read_data: bool,
    /// Take the damaged chunks found out of service, so that syncing an
    /// intact copy of their files stores them again and heals every version
    /// that uses them.
    #[arg(long, requires = "read_data")]
    repair: bool,
}

/// `dsv gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Show what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn init(ctx: &Ctx, a: InitArgs) -> Result<(), CliError> {
    let base = match a.path {
        Some(p) => p,
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&base)
        .map_err(|e| CliError::user(format!("cannot create {}: {e}", base.display())))?;
    let dir = base.join(DOT_DSV);
    let config = RepoConfig {
        chunking: ChunkerParams {
            min_size: a.chunk_min,
            avg_size: a.chunk_avg,
            max_size: a.chunk_max,
        },
        compression_level: a.compression_level,
        ..RepoConfig::default()
    };
    let store = Store::init(&dir, config, repo::options(ctx))?;
    let dir = std::fs::canonicalize(store.dir()).unwrap_or_else(|_| store.dir().to_path_buf());
    if ctx.json {
        output::json(&json!({ "path": dir, "config": store.config() }))
    } else {
        println!("Initialized empty dsv repository in {}", dir.display());
        Ok(())
    }
}

pub fn fsck(ctx: &Ctx, a: FsckArgs) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    let bar = Bar::new(ctx.progress);
    let r = store.verify(
        VerifyOptions {
            read_data: a.read_data,
        },
        &bar,
    )?;
    // `--repair`: the damaged chunks found go out of service (see
    // `Store::repair`); the problems stay until intact copies are synced.
    let fixed = if a.repair && !r.damaged.is_empty() {
        Some(store.repair(&r)?)
    } else {
        None
    };
    if ctx.json {
        output::json(&json!({
            "ok": r.ok(),
            "objects": r.objects,
            "versions": r.versions,
            "chunks": r.chunks,
            "bytes_read": r.bytes_read,
            "read_data": a.read_data,
            "problems": r.problems,
            "repair": fixed,
        }))?;
    } else {
        for p in &r.problems {
            println!("{}: {} — {}", p.kind, p.what, p.detail);
        }
        let data = if a.read_data {
            format!(", {} of chunk data rehashed", output::bytes(r.bytes_read))
        } else {
            String::new()
        };
        println!(
            "checked {} objects ({} versions), {} chunks{data}: {}",
            r.objects,
            r.versions,
            r.chunks,
            if r.ok() {
                "no problems".to_string()
            } else {
                format!("{} problems", r.problems.len())
            }
        );
        if let Some(f) = &fixed {
            println!(
                "repair: {} damaged chunks taken out of service{}",
                f.marked.len(),
                if f.skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} moved by a gc since the check: run fsck again)",
                        f.skipped.len()
                    )
                }
            );
        }
    }
    if r.ok() {
        return Ok(());
    }
    let hint = match &fixed {
        Some(_) => "sync intact copies of the files listed above (`dsv dataset sync …`): every version using them is whole again; `dsv fsck` lists what is still damaged",
        None => "versions that use a damaged chunk are listed above; `dsv fsck --read-data --repair` marks the damaged chunks, then sync intact copies of those files",
    };
    Err(CliError::repo(format!(
        "repository {} has {} problems",
        store.dir().display(),
        r.problems.len()
    ))
    .hint(hint))
}

pub fn gc(ctx: &Ctx, a: GcArgs) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    let r = store.gc(GcOptions::default(), a.dry_run)?;
    let repo = dsv::Repo::from_store(store);
    let c = repo.prune_cache_of_deleted(a.dry_run)?;
    if ctx.json {
        let mut v = serde_json::to_value(&r).map_err(|e| CliError::repo(e.to_string()))?;
        v["cache_entries_removed"] = serde_json::json!(c.removed.len());
        v["cache_bytes_freed"] = serde_json::json!(c.freed_bytes);
        return output::json(&v);
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} objects and {} chunks; {} packs deleted, {} rewritten; {} freed",
        r.dead_objects,
        r.dead_chunks,
        r.packs_deleted,
        r.packs_repacked,
        output::bytes(r.bytes_freed)
    );
    if r.orphan_packs > 0 {
        println!(
            "  of which {} orphan packs of interrupted writers ({})",
            r.orphan_packs,
            output::bytes(r.orphan_bytes)
        );
    }
    if !c.removed.is_empty() {
        println!(
            "{verb} {} cached copies of deleted versions; {} freed",
            c.removed.len(),
            output::bytes(c.freed_bytes)
        );
    }
    Ok(())
}

pub fn stats(ctx: &Ctx) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    let s = store.stats()?;
    if ctx.json {
        return output::json(&serde_json::to_value(&s).map_err(|e| CliError::repo(e.to_string()))?);
    }
    println!("versions       {}", s.versions);
    println!("objects        {}", s.objects);
    println!("chunks         {}", s.chunks);
    println!(
        "logical bytes  {} ({})",
        s.logical_bytes,
        output::bytes(s.logical_bytes)
    );
    println!(
        "unique bytes   {} ({})",
        s.unique_bytes,
        output::bytes(s.unique_bytes)
    );
    println!(
        "stored bytes   {} ({})",
        s.stored_bytes,
        output::bytes(s.stored_bytes)
    );
    println!(
        "pack files     {} ({})",
        s.packs,
        output::bytes(s.pack_bytes)
    );
    if s.orphan_packs > 0 {
        println!(
            "orphan packs   {} ({}; left by interrupted writers, `dsv gc` deletes them)",
            s.orphan_packs,
            output::bytes(s.orphan_bytes)
        );
    }
    println!("dedup ratio    {:.2}", s.dedup_ratio);
    Ok(())
}
