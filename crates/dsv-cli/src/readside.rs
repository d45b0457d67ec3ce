//! The read side: `dsv dataset get/copy/mount`, `verify --folder`, and
//! `dsv cache …`.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::json;

use dsv::{GetLocalOptions, PruneOptions, Repo};

use crate::error::CliError;
use crate::output::{self, Bar};
use crate::Ctx;

/// `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Revision.
    rev: String,
    /// Only files matching these globs (or under these folders).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
}

/// `copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Revision.
    rev: String,
    /// Target folder (created when missing; must be empty unless
    /// --overwrite; never the repository's folder, one holding it, or
    /// anything inside .dsv). Written aside and renamed into place.
    target: PathBuf,
    /// Replace the target's contents.
    #[arg(long)]
    overwrite: bool,
    /// Only files matching these globs (or under these folders).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
}

/// `mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Revision.
    rev: String,
    /// An existing, empty folder.
    mountpoint: PathBuf,
    /// Memory for decompressed chunks (e.g. 256MiB).
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    chunk_cache: u64,
    /// Let other users read the mount.
    #[arg(long)]
    allow_other: bool,
}

/// `dsv cache`.
#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// Cached copies, least recently used first.
    List,
    /// Bytes the cache holds, and its budget.
    Size,
    /// Evict copies (least recently used first) and free unlinked files.
    Prune(PruneArgs),
    /// Show or set the byte budget (e.g. 10GB, 500MiB, or 'none').
    Budget(BudgetArgs),
}

/// `cache prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Evict until the cache holds at most this many bytes (e.g. 10MB).
    #[arg(long, value_parser = parse_bytes)]
    max_bytes: Option<u64>,
    /// Remove the copies of these versions.
    #[arg(long = "version", value_name = "REV")]
    versions: Vec<String>,
    /// Only report what would be removed.
    #[arg(long)]
    dry_run: bool,
}

/// `cache budget`.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// New budget in bytes (suffixes KB, MB, GB, KiB, MiB, GiB) or 'none'.
    value: Option<String>,
}

/// Parses `10MB`, `1.5GiB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 10MB, 1.5GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    Ok((n * mult as f64).round() as u64)
}

fn open(ctx: &Ctx) -> Result<Repo, CliError> {
    crate::repo::open_repo(ctx)
}

/// `dsv dataset get`.
pub fn get(ctx: &Ctx, a: GetArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let bar = Bar::new(ctx.progress);
    let got = repo.get_local(
        &v,
        &GetLocalOptions {
            include: a.include,
            pin: false,
            progress: &bar,
        },
    )?;
    for d in &got.repaired {
        eprintln!(
            "warning: the cached copy {} had been changed ({}: {}); it was rebuilt from the repository",
            got.path.display(),
            d.path,
            d.detail
        );
    }
    if ctx.json {
        output::json(&json!({
            "path": got.path,
            "id": v.id,
            "repaired": got.repaired,
            "files": got.files,
            "bytes": got.bytes,
            "cached": got.cached,
            "materialized_files": got.materialized_files,
            "materialized_bytes": got.materialized_bytes,
            "evicted": got.evicted,
        }))
    } else {
        println!("{}", got.path.display());
        Ok(())
    }
}

/// `dsv dataset copy`.
pub fn copy(ctx: &Ctx, a: CopyArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let bar = Bar::new(ctx.progress);
    let r = repo.copy_to(&v, &a.target, &a.include, a.overwrite, &bar)?;
    if ctx.json {
        output::json(&json!({"path": r.path, "files": r.files, "bytes": r.bytes, "id": v.id}))
    } else {
        println!(
            "{}: {} files, {}",
            r.path.display(),
            r.files,
            output::bytes(r.bytes)
        );
        Ok(())
    }
}

enum MountEvent {
    Signal(i32),
    Ended,
}

/// `dsv dataset mount`: serves until SIGINT/SIGTERM/SIGHUP or an external unmount.
pub fn mount(ctx: &Ctx, a: MountArgs) -> Result<(), CliError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    dsv::cache::check_target(repo.store().dir(), &a.mountpoint, "mount on")?;
    dsv::mount::check_mountpoint(&a.mountpoint)?;
    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| CliError::repo(format!("cannot install signal handlers: {e}")))?;
    let stx = tx.clone();
    std::thread::spawn(move || {
        for s in signals.forever() {
            if stx.send(MountEvent::Signal(s)).is_err() {
                break;
            }
        }
    });
    let opts = dsv::mount::MountOptions {
        chunk_cache_bytes: a.chunk_cache as usize,
        allow_other: a.allow_other,
        ..Default::default()
    };
    let etx = tx.clone();
    let mounted = dsv::mount::mount(
        Arc::new(repo),
        &v,
        &a.mountpoint,
        &opts,
        Box::new(move || {
            let _ = etx.send(MountEvent::Ended);
        }),
    )?;
    if ctx.json {
        output::json(&json!({"mountpoint": a.mountpoint, "id": v.id, "pid": std::process::id()}))?;
    } else {
        eprintln!(
            "mounted {} at {} (read-only); Ctrl-C or SIGTERM unmounts",
            v.label(),
            a.mountpoint.display()
        );
    }
    let mut lazy = false;
    loop {
        match rx.recv() {
            Ok(MountEvent::Signal(s)) => {
                tracing::info!("signal {s}: unmounting");
                match fusermount_unmount(&a.mountpoint, lazy) {
                    Ok(()) => {}
                    Err(why) if !lazy && why.contains("busy") => {
                        eprintln!(
                            "{} is busy (files are open); close them, or signal again to detach it lazily",
                            a.mountpoint.display()
                        );
                        // Keep serving until the next signal.
                        lazy = true;
                        continue;
                    }
                    Err(why) => return Err(CliError::repo(why)),
                }
                mounted.join();
                break;
            }
            Ok(MountEvent::Ended) | Err(_) => {
                mounted.join();
                break;
            }
        }
    }
    if !ctx.json {
        eprintln!("unmounted {}", a.mountpoint.display());
    }
    Ok(())
}

/// Unmounts through `fusermount3` (or `fusermount`), lazily when asked.
fn fusermount_unmount(at: &std::path::Path, lazy: bool) -> Result<(), String> {
    let mut last = String::new();
    for bin in ["fusermount3", "fusermount"] {
        let mut c = std::process::Command::new(bin);
        c.arg("-u");
        if lazy {
            c.arg("-z");
        }
        match c.arg(at).output() {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
                if e.to_ascii_lowercase().contains("busy") {
                    return Err(format!("cannot unmount {}: busy", at.display()));
                }
                last = format!("cannot unmount {}: {e}", at.display());
            }
            Err(e) => last = format!("cannot run {bin}: {e}"),
        }
    }
    Err(last)
}

/// `dsv dataset verify REV --folder DIR`.
pub fn verify_folder(
    ctx: &Ctx,
    rev: &str,
    folder: &std::path::Path,
    full: bool,
) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(rev)?;
    let r = repo.verify_folder(&v, folder, full)?;
    if ctx.json {
        output::json(&json!({
            "id": v.id,
            "folder": folder,
            "ok": r.mismatches.is_empty(),
            "files": r.files,
            "hashed": r.hashed,
            "stat_matched": r.stat_matched,
            "mismatches": r.mismatches,
        }))?;
    } else {
        for m in &r.mismatches {
            println!("{:<8} {}: {}", m.kind.to_uppercase(), m.path, m.detail);
        }
        if r.mismatches.is_empty() {
            println!(
                "{} matches {}: {} files ({} hashed, {} unchanged by stat)",
                folder.display(),
                v.label(),
                r.files,
                r.hashed,
                r.stat_matched
            );
        }
    }
    if r.mismatches.is_empty() {
        Ok(())
    } else {
        Err(CliError::user(format!(
            "{} differs from {} in {} place(s)",
            folder.display(),
            v.label(),
            r.mismatches.len()
        ))
        .hint("'dsv dataset copy REV DIR --overwrite' restores it"))
    }
}

/// `dsv cache …`.
pub fn cache(ctx: &Ctx, cmd: CacheCmd) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let cache = repo.cache();
    match cmd {
        CacheCmd::List => {
            let entries = cache.entries()?;
            let mut rows = Vec::new();
            for e in &entries {
                let v = repo.version(&e.version).ok();
                rows.push(json!({
                    "name": e.name,
                    "id": e.version,
                    "dataset": v.as_ref().map(|v| v.dataset.full_name()),
                    "version": v.as_ref().map(|v| v.version.clone()),
                    "include": e.include,
                    "path": e.path,
                    "files": e.files,
                    "bytes": e.bytes,
                    "last_used": crate::dataset::iso(e.last_used_ms),
                    "last_used_ms": e.last_used_ms,
                    "pinned": e.pinned,
                    "deleted": v.is_none(),
                }));
            }
            if ctx.json {
                return output::json(&serde_json::Value::Array(rows));
            }
            if entries.is_empty() {
                println!("the cache is empty");
            }
            for (e, r) in entries.iter().zip(&rows) {
                println!(
                    "{}  {:<28} {:>7} files {:>10}  used {}{}{}",
                    &e.name[..12],
                    format!(
                        "{}@{}",
                        r["dataset"].as_str().unwrap_or("(deleted)"),
                        r["version"].as_str().unwrap_or("?")
                    ),
                    e.files,
                    output::bytes(e.bytes),
                    r["last_used"].as_str().unwrap_or(""),
                    if e.include.is_empty() {
                        String::new()
                    } else {
                        format!("  only {}", e.include.join(","))
                    },
                    if e.pinned { "  (in use)" } else { "" }
                );
            }
            Ok(())
        }
        CacheCmd::Size => {
            let s = cache.size()?;
            if ctx.json {
                return output::json(&json!({
                    "bytes": s.bytes, "files": s.files, "entries": s.entries, "max_bytes": s.max_bytes,
                }));
            }
            println!(
                "{} in {} files, {} cached copies; budget {}",
                output::bytes(s.bytes),
                s.files,
                s.entries,
                s.max_bytes
                    .map(output::bytes)
                    .unwrap_or_else(|| "none".into())
            );
            Ok(())
        }
        CacheCmd::Prune(a) => {
            let mut versions = Vec::new();
            for r in &a.versions {
                versions.push(repo.resolve(r)?.id);
            }
            if a.max_bytes.is_none() && versions.is_empty() {
                return Err(CliError::user("nothing to prune by")
                    .hint("pass --max-bytes N and/or --version REV"));
            }
            let r = cache.prune(&PruneOptions {
                max_bytes: a.max_bytes,
                versions,
                keep: None,
                dry_run: a.dry_run,
            })?;
            if ctx.json {
                return output::json(
                    &serde_json::to_value(&r).map_err(|e| CliError::repo(e.to_string()))?,
                );
            }
            let verb = if a.dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} cached copies, {} freed; {} left{}",
                r.removed.len(),
                output::bytes(r.freed_bytes),
                output::bytes(r.bytes_after),
                if r.pinned.is_empty() {
                    String::new()
                } else {
                    format!("; {} in use kept", r.pinned.len())
                }
            );
            Ok(())
        }
        CacheCmd::Budget(a) => {
            let mut c = cache.config()?;
            if let Some(v) = a.value {
                c.max_bytes = if v.eq_ignore_ascii_case("none") {
                    None
                } else {
                    Some(parse_bytes(&v).map_err(CliError::user)?)
                };
                cache.set_config(&c)?;
                if let Some(max) = c.max_bytes {
                    cache.prune(&PruneOptions {
                        max_bytes: Some(max),
                        ..Default::default()
                    })?;
                }
            }
            if ctx.json {
                return output::json(&json!({"max_bytes": c.max_bytes}));
            }
            println!(
                "cache budget: {}",
                c.max_bytes
                    .map(|b| format!("{} ({b} bytes)", output::bytes(b)))
                    .unwrap_or_else(|| "none".into())
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_bytes("2 kib"), Ok(2048));
        assert!(parse_bytes("ten").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }
}
