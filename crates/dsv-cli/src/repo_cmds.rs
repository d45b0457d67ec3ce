//! `dsv init`, `fsck`, `gc`, `stats`, `upgrade`.

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
    /// Keep the packs on object storage (s3://BUCKET/PREFIX, gs://…, az://…,
    /// or a folder): data is staged here, sent after each command that
    /// writes it, and read back on demand through a bounded cache.
    #[arg(long, value_name = "URL")]
    objects: Option<String>,
    /// A team repository: the metadata in this PostgreSQL database
    /// (postgres://USER@HOST:PORT/DB; the password comes from PGPASSWORD or
    /// ~/.pgpass and is never stored), the packs at --objects.
    #[arg(long, value_name = "URL", requires = "objects")]
    metadata: Option<String>,
    /// Endpoint of an S3-compatible server (with --objects).
    #[arg(long, requires = "objects")]
    endpoint: Option<String>,
    /// Region (with --objects).
    #[arg(long, requires = "objects")]
    region: Option<String>,
}

/// `dsv fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Read, decompress and rehash every stored chunk (and every cached file).
    #[arg(long)]
    read_data: bool,
    /// Also check the cached copies made by `dataset get` (one stat per
    /// file; with --read-data their bytes are rehashed too).
    #[arg(long)]
    cache: bool,
    /// Repair what can be repaired: rebuild the task and model indexes from
    /// their records, and (with --read-data) take the damaged chunks found
    /// out of service, so that syncing an intact copy of their files stores
    /// them again and heals every version that uses them.
    #[arg(long)]
    repair: bool,
    /// Rebuild the indexes from what is stored before checking: the chunk
    /// index from the pack files (every record rehashed), and for each
    /// remote, its pack indexes read again and every dataset's metadata
    /// fetched (what this repository lost comes back from the remote).
    #[arg(long)]
    rebuild_index: bool,
    /// With --read-data: also download every chunk that lives on a remote
    /// (a lazy clone's, an `init --objects` repository's) from the remote —
    /// not from the cache — and rehash it.
    #[arg(long, requires = "read_data")]
    remote: bool,
}

/// `dsv gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Show what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds an unindexed pack must have existed before it counts as an
    /// interrupted writer's leftover and is deleted. Embedded repositories
    /// recognise live writers by their file locks (default 0); on a team
    /// repository, where writers on other machines hold no lock this
    /// machine sees, the default is 86400 (a day; ages are the object
    /// store's Last-Modified times against this machine's clock).
    #[arg(long, value_name = "SECONDS")]
    orphan_grace: Option<u64>,
    /// Testing aid: keep the final commit transaction open this many
    /// milliseconds (a gc on a huge repository, at its worst).
    #[arg(long, hide = true, default_value_t = 0)]
    hold_commit_ms: u64,
}

pub fn init(ctx: &Ctx, a: InitArgs) -> Result<(), CliError> {
    let base = match a.path {
        Some(p) => p,
        None => std::env::current_dir()?,
    };
    if let Some(inside) = repository_folder_above(&base) {
        return Err(CliError::user(format!(
            "{} is inside the repository folder {}; a repository cannot hold another",
            base.display(),
            inside.display()
        ))
        .hint("run 'dsv init PATH' on the folder that should hold .dsv"));
    }
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
    if let (Some(metadata), Some(objects)) = (&a.metadata, &a.objects) {
        let objects = dsv_remote::team::ObjectsAt {
            url: crate::remote_cmds::normalize_url(objects)?,
            endpoint: a.endpoint.clone(),
            region: a.region.clone(),
        };
        return crate::team::init(ctx, &base, metadata, objects, config);
    }
    let (dir, config, fetched) = match &a.objects {
        Some(url) => {
            let rec = dsv_remote::RemoteRecord {
                url: crate::remote_cmds::normalize_url(url)?,
                endpoint: a.endpoint.clone(),
                region: a.region.clone(),
                lazy: true,
                primary: true,
                added_ms: dsv_store::store::now_ms(),
            };
            let (repo, fetched) = dsv_remote::objects::init_repository(
                &base,
                config,
                rec,
                &crate::remote_cmds::connect_from_env(),
                repo::options(ctx),
            )?;
            (
                repo.store().dir().to_path_buf(),
                repo.store().config().clone(),
                fetched,
            )
        }
        None => {
            std::fs::create_dir_all(&base)
                .map_err(|e| CliError::user(format!("cannot create {}: {e}", base.display())))?;
            let store = Store::init(&dir, config, repo::options(ctx))?;
            (store.dir().to_path_buf(), store.config().clone(), None)
        }
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    if ctx.json {
        output::json(&json!({
            "path": dir, "config": config, "objects": a.objects,
            "fetched": fetched.as_ref().map(|f| f.datasets.len()),
        }))
    } else {
        println!("Initialized empty dsv repository in {}", dir.display());
        if let Some(url) = &a.objects {
            println!("packs live in {url} (remote 'objects'); data is read back on demand");
        }
        if let Some(f) = &fetched {
            println!(
                "{url} already held {} dataset(s): their versions are listed here",
                f.datasets.len(),
                url = a.objects.as_deref().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// `dsv upgrade`: the repository to this build's format (see
/// [`dsv::Repo::upgrade`]); nothing to do when it is current.
pub fn upgrade(ctx: &Ctx) -> Result<(), CliError> {
    let dir = repo::locate(ctx)?;
    let (repo, report) = dsv::Repo::upgrade(&dir, repo::options(ctx))?;
    let shown = dsv_store::config::repo_display(repo.store().dir()).to_path_buf();
    let upgraded = !report.was_current();
    if ctx.json {
        return output::json(&json!({
            "path": shown,
            "from": report.from,
            "to": report.to,
            "upgraded": upgraded,
            "database_upgraded": report.database_upgraded,
            "config_rewritten": report.config_rewritten,
            "features": repo.store().config().features,
        }));
    }
    if upgraded {
        println!(
            "Upgraded the repository at {} from format {} to format {}",
            shown.display(),
            report.from,
            report.to
        );
        println!(
            "Restart any dsv process that was running during the upgrade (agents, \
             watches): an older dsv must not write to it any more."
        );
    } else {
        println!(
            "The repository at {} is already at format {}; nothing to do",
            shown.display(),
            report.to
        );
    }
    Ok(())
}

/// The repository folder (`.dsv`, or a folder holding a dsv `config.json`
/// and database) that `path` is or lies inside, if any. Parts of `path` that
/// do not exist yet are judged by name; the rest with symbolic links
/// resolved.
fn repository_folder_above(path: &std::path::Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    // Resolve the deepest existing ancestor; keep the missing tail as given.
    let mut existing = abs.as_path();
    let mut tail = Vec::new();
    while !existing.exists() {
        tail.push(existing.components().next_back()?);
        existing = existing.parent()?;
    }
    let mut full = std::fs::canonicalize(existing).ok()?;
    for part in tail.iter().rev() {
        match part {
            std::path::Component::ParentDir => {
                full.pop();
            }
            std::path::Component::CurDir => {}
            other => full.push(other),
        }
    }
    full.ancestors()
        .find(|a| {
            a.file_name().is_some_and(|n| n == DOT_DSV)
                || (a.join("config.json").is_file() && a.join("db").is_dir())
        })
        .map(std::path::Path::to_path_buf)
}

pub fn fsck(ctx: &Ctx, a: FsckArgs) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    let rebuilt_chunks = if a.rebuild_index {
        Some(store.rebuild_chunk_index(&Bar::new(ctx.progress))?)
    } else {
        None
    };
    // A lazy clone's chunks on its remote are not missing.
    crate::remote_cmds::attach(&store)?;
    let repo = dsv::Repo::from_store(store);
    let reindexed = if a.rebuild_index {
        crate::remote_cmds::rebuild_remote_indexes(ctx, &repo)?
    } else {
        Vec::new()
    };
    let store = repo.store();
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
    let dir = store.dir().to_path_buf();
    // The secondary indexes of tasks and models against their records;
    // `--repair` rebuilds them from the records.
    let index = repo.index_problems()?;
    let rebuilt = if a.repair && !index.is_empty() {
        Some(repo.rebuild_indexes()?)
    } else {
        None
    };
    let cache = if a.cache || a.read_data {
        let bar = Bar::new(ctx.progress);
        Some(repo.check_cache(a.read_data, &bar)?)
    } else {
        None
    };
    let remote_check = if a.remote {
        Some(crate::remote_cmds::check_remote_chunks(ctx, &repo)?)
    } else {
        None
    };
    let remote_problems = remote_check.as_ref().map_or(0, |r| r.problems.len());
    let cache_problems = cache.as_ref().map(|c| c.problems.len()).unwrap_or(0);
    let index_problems = if rebuilt.is_some() { 0 } else { index.len() };
    if ctx.json {
        output::json(&json!({
            "ok": r.ok() && cache_problems == 0 && index_problems == 0 && remote_problems == 0,
            "index_problems": index,
            "index_entries_rewritten": rebuilt,
            "objects": r.objects,
            "versions": r.versions,
            "chunks": r.chunks,
            "bytes_read": r.bytes_read,
            "remote_chunks": r.remote_chunks,
            "read_data": a.read_data,
            "problems": r.problems,
            "cache": cache,
            "repair": fixed,
            "rebuilt": rebuilt_chunks.as_ref().map(|c| json!({"chunks": c, "remotes": reindexed})),
            "remote": remote_check,
        }))?;
    } else {
        if let Some(rc) = &remote_check {
            for (what, why) in &rc.problems {
                println!("remote: {what} — {why}");
            }
            println!(
                "remote: {} chunk(s), {} downloaded and rehashed",
                rc.chunks,
                output::bytes(rc.bytes)
            );
        }
        if let Some(c) = &rebuilt_chunks {
            println!(
                "rebuild: {} pack(s), {} record(s) rehashed: {} chunk(s) added to the index ({} back in service), {} repointed, {} damaged record(s) skipped{}{}",
                c.packs,
                c.records,
                c.added,
                c.restored,
                c.repointed,
                c.damaged_records,
                if c.busy_packs > 0 {
                    format!(", {} pack(s) being written skipped", c.busy_packs)
                } else {
                    String::new()
                },
                if c.unreadable.is_empty() {
                    String::new()
                } else {
                    format!("; damaged packs: {}", c.unreadable.join("; "))
                }
            );
        }
        for r in &reindexed {
            println!(
                "rebuild: remote {}: {} pack index(es) read again, {} version(s) fetched",
                r.remote,
                r.packs,
                r.fetch
                    .datasets
                    .iter()
                    .map(|d| d.imported.len())
                    .sum::<usize>()
            );
        }
        for p in &r.problems {
            println!("{}: {} — {}", p.kind, p.what, p.detail);
        }
        for p in &index {
            println!("index: {p}");
        }
        if let Some(n) = rebuilt {
            println!("repair: indexes rebuilt from the task and model records ({n} entries written or removed)");
        }
        if let Some(c) = &cache {
            for p in &c.problems {
                println!(
                    "damaged-cache-entry: {} — {}: {}",
                    p.folder.display(),
                    p.path,
                    p.detail
                );
            }
        }
        let data = if a.read_data {
            format!(", {} of chunk data rehashed", output::bytes(r.bytes_read))
        } else {
            String::new()
        };
        let remote = if r.remote_chunks > 0 {
            format!(" (+{} on the remote, read on demand)", r.remote_chunks)
        } else {
            String::new()
        };
        let cached = match &cache {
            Some(c) if a.read_data => format!(
                "; {} cached copies ({} of files rehashed)",
                c.entries,
                output::bytes(c.bytes_read)
            ),
            Some(c) => format!("; {} cached copies", c.entries),
            None => String::new(),
        };
        let n = r.problems.len() + cache_problems + index_problems + remote_problems;
        println!(
            "checked {} objects ({} versions), {} chunks{remote}{data}{cached}: {}",
            r.objects,
            r.versions,
            r.chunks,
            if n == 0 {
                "no problems".to_string()
            } else {
                format!("{n} problems")
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
    if !r.ok() {
        let hint = match &fixed {
            Some(_) => "sync intact copies of the files listed above (`dsv dataset sync …`): every version using them is whole again; `dsv fsck` lists what is still damaged",
            None => "versions that use a damaged chunk are listed above; `dsv fsck --read-data --repair` marks the damaged chunks, then sync intact copies of those files",
        };
        return Err(CliError::repo(format!(
            "repository {} has {} problems",
            dir.display(),
            r.problems.len()
        ))
        .hint(hint));
    }
    if index_problems > 0 {
        return Err(CliError::repo(format!(
            "{index_problems} problems in the task and model indexes of {}",
            dir.display()
        ))
        .hint("'dsv fsck --repair' rebuilds them from the records"));
    }
    if cache_problems > 0 {
        return Err(CliError::repo(format!(
            "{cache_problems} problems in the cached copies of {}",
            dir.display()
        ))
        .hint("the next 'dsv dataset get' of each version rebuilds its copy; 'dsv cache prune --version REV' drops it"));
    }
    if remote_problems > 0 {
        return Err(CliError::repo(format!(
            "{remote_problems} problems in the chunks the remotes of {} hold",
            dir.display()
        ))
        .hint("push the versions again from a repository that stores them whole"));
    }
    Ok(())
}

pub fn gc(ctx: &Ctx, a: GcArgs) -> Result<(), CliError> {
    let store = repo::open(ctx)?;
    let mut opts = GcOptions {
        hold_commit: std::time::Duration::from_millis(a.hold_commit_ms),
        ..GcOptions::default()
    };
    if let Some(s) = a.orphan_grace {
        opts.orphan_grace = std::time::Duration::from_secs(s);
        opts.shared_orphan_grace = opts.orphan_grace;
    }
    let r = store.gc(opts, a.dry_run)?;
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
    println!(
        "dedup ratio    {:.2} (logical / unique bytes)",
        s.dedup_ratio
    );
    println!(
        "compression    {:.2} (unique / stored bytes)",
        s.compression_ratio
    );
    Ok(())
}
