//! `dsv dataset …`: the dataset commands of `cli.md`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use dsv::{
    AddOptions, AddReport, CreateOptions, DatasetVersion, DraftHandle, Repo, Resolved, SyncOptions,
};
use dsv_store::VersionId;

use crate::error::CliError;
use crate::output::{self, Bar};
use crate::Ctx;

/// `dsv dataset`.
#[derive(Debug, Subcommand)]
pub enum DatasetCmd {
    /// Start a draft version of PROJECT/NAME (the dataset is created on first use).
    Create(CreateArgs),
    /// Add files and folders to a draft.
    Add(AddArgs),
    /// Remove files (glob patterns or folder paths) from a draft.
    Remove(RemoveArgs),
    /// Freeze a draft into an immutable version.
    Finalize(FinalizeArgs),
    /// Open drafts (of a project or dataset): id, dataset, parents, created, files staged.
    Drafts(DraftsArgs),
    /// Delete an open draft; the bytes only it staged are freed by the next gc.
    Discard(DiscardArgs),
    /// The "upload" button: make a new version match FOLDER (nothing when unchanged).
    Sync(SyncArgs),
    /// Add each finished file as it appears in FOLDER; finalize on SIGINT/SIGTERM.
    Watch(crate::watch::WatchArgs),
    /// A version's metadata and delta (reads no file data).
    Show(RevArg),
    /// Versions, newest first.
    List(ListArgs),
    /// File entries of a version.
    Files(FilesArgs),
    /// What changed between two versions.
    Diff(DiffArgs),
    /// Write one file of a version to stdout.
    Cat(CatArgs),
    /// Add or remove tags.
    Tag(TagArgs),
    /// Read or set user metadata (KEY=VALUE, VALUE parsed as JSON when it is JSON).
    Meta(MetaArgs),
    /// First rows and per-column statistics of tabular files, and the delta.
    Preview(PreviewArgs),
    /// Rehash every stored chunk of a version, or compare a folder with it (--folder).
    Verify(VerifyArgs),
    /// A read-only cached copy of a version; prints its path.
    Get(crate::readside::GetArgs),
    /// A mutable copy of a version in TARGET.
    Copy(crate::readside::CopyArgs),
    /// Mount a version read-only (FUSE) until interrupted or unmounted.
    Mount(crate::readside::MountArgs),
    /// One standalone version from several.
    Squash(SquashArgs),
    /// Delete a version (refuses while others depend on it unless --force).
    Delete(DeleteArgs),
    /// Rename or move a dataset (versions keep their ids).
    Rename(RenameArgs),
    /// Download the data of versions from the remotes (a lazy clone reads it on demand otherwise).
    Prefetch(crate::remote_cmds::PrefetchArgs),
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// PROJECT/NAME.
    dataset: String,
    /// Parent revision (repeat for a merge: later parents win per path).
    #[arg(long = "parent", value_name = "REV")]
    parents: Vec<String>,
    /// Tag for the version.
    #[arg(long = "tag", value_name = "T")]
    tags: Vec<String>,
    /// Version string (default: next patch version at finalize).
    #[arg(long)]
    version: Option<String>,
    /// Message.
    #[arg(long, short, default_value = "")]
    message: String,
    /// Start from the dataset's newest version (a writable copy).
    #[arg(long, conflicts_with = "parents")]
    from_latest: bool,
}

/// `add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Draft id (or unique prefix).
    id: String,
    /// Files and folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Folder inside the dataset.
    #[arg(long, default_value = "")]
    dataset_path: String,
    /// Only files matching (path relative to the folder, or file name).
    #[arg(long = "wildcard", value_name = "GLOB")]
    wildcards: Vec<String>,
    /// Do not descend into sub-folders.
    #[arg(long)]
    non_recursive: bool,
}

/// `remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Draft id.
    id: String,
    /// Glob patterns or folder paths.
    #[arg(required = true)]
    patterns: Vec<String>,
}

/// `finalize`.
#[derive(Debug, Args)]
pub struct FinalizeArgs {
    /// Draft id.
    id: String,
}

/// `drafts`.
#[derive(Debug, Args)]
pub struct DraftsArgs {
    /// PROJECT or PROJECT/NAME.
    filter: Option<String>,
}

/// `discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// Draft id (or unique prefix).
    id: String,
}

/// `sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// PROJECT/NAME.
    dataset: String,
    /// Folder to upload.
    folder: PathBuf,
    /// Folder inside the dataset the folder maps to.
    #[arg(long, default_value = "")]
    dataset_path: String,
    /// Tag for the new version.
    #[arg(long = "tag", value_name = "T")]
    tags: Vec<String>,
    /// Message.
    #[arg(long, short, default_value = "")]
    message: String,
    /// Version string (default: next patch version).
    #[arg(long)]
    version: Option<String>,
    /// Push the dataset to a remote afterwards (the only one, or origin, when no name is given).
    #[arg(long, value_name = "REMOTE", num_args = 0..=1, default_missing_value = "")]
    push: Option<String>,
}

/// A revision argument.
#[derive(Debug, Args)]
pub struct RevArg {
    /// PROJECT/NAME[@VERSION|@TAG] or a version id prefix.
    rev: String,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// PROJECT or PROJECT/NAME.
    filter: Option<String>,
    /// Only versions with this tag (repeat: all of them).
    #[arg(long = "tag", value_name = "T")]
    tags: Vec<String>,
    /// At most N versions (the newest).
    #[arg(long, short = 'n', value_name = "N")]
    limit: Option<usize>,
}

/// `files`.
#[derive(Debug, Args)]
pub struct FilesArgs {
    /// Revision, or the id of an open draft.
    rev: String,
    /// Only paths matching.
    glob: Option<String>,
    /// Only files added against the parent (or --against).
    #[arg(long, group = "which")]
    added: bool,
    /// Only files modified.
    #[arg(long, group = "which")]
    modified: bool,
    /// Only files removed.
    #[arg(long, group = "which")]
    removed: bool,
    /// Compare with this revision instead of the first parent.
    #[arg(long, value_name = "REV")]
    against: Option<String>,
}

/// `diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// From.
    a: String,
    /// To.
    b: String,
}

/// `cat`.
#[derive(Debug, Args)]
pub struct CatArgs {
    /// Revision.
    rev: String,
    /// Path in the version.
    path: String,
}

/// `tag`.
#[derive(Debug, Args)]
pub struct TagArgs {
    /// Revision.
    rev: String,
    /// Tags to add.
    #[arg(long = "add", value_name = "T")]
    add: Vec<String>,
    /// Tags to remove.
    #[arg(long = "remove", value_name = "T")]
    remove: Vec<String>,
}

/// `meta`.
#[derive(Debug, Args)]
pub struct MetaArgs {
    /// Revision.
    rev: String,
    /// KEY=VALUE (VALUE as JSON when it parses, else a string; `null` removes).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print one key's value.
    #[arg(long)]
    get: Option<String>,
    /// Set the description.
    #[arg(long)]
    description: Option<String>,
}

/// `preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Revision.
    rev: String,
    /// Rows shown per file.
    #[arg(long, default_value_t = 5)]
    rows: usize,
    /// Tabular files previewed at most.
    #[arg(long, default_value_t = 10)]
    max_files: usize,
    /// Rows read per file for the statistics.
    #[arg(long, default_value_t = 1_000_000)]
    max_rows: u64,
    /// Columns shown per file at most (also limited to the terminal's
    /// width); the number left out is printed. `--json` has them all.
    #[arg(long, default_value_t = 20)]
    max_columns: usize,
}

/// `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Revision.
    rev: String,
    /// Compare this folder (a cached or mutable copy, or the synced folder) with the version.
    #[arg(long, value_name = "DIR")]
    folder: Option<PathBuf>,
    /// With --folder: hash every file, even those unchanged since dsv read them.
    #[arg(long, requires = "folder")]
    full: bool,
}

/// `squash`.
#[derive(Debug, Args)]
pub struct SquashArgs {
    /// PROJECT/NAME of the result.
    dataset: String,
    /// Versions to squash (later win per path).
    #[arg(required = true)]
    revs: Vec<String>,
    /// Version string.
    #[arg(long)]
    version: Option<String>,
    /// Message.
    #[arg(long, short, default_value = "")]
    message: String,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Revision.
    rev: String,
    /// Delete even when other versions depend on it, or tasks or models
    /// reference it (a referenced version leaves its dataset but its data
    /// is kept, readable by id, for their lineage).
    #[arg(long)]
    force: bool,
}

/// `rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// PROJECT/NAME now.
    from: String,
    /// New PROJECT/NAME.
    to: String,
}

/// Opens the repository with dataset semantics.
pub fn open(ctx: &Ctx) -> Result<Repo, CliError> {
    crate::repo::open_repo(ctx)
}

/// ISO-8601 UTC from ms since the epoch.
pub fn iso(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The version object as `show --json` prints it.
pub fn version_json(v: &DatasetVersion) -> Value {
    json!({
        "id": v.id,
        "dataset_id": v.dataset.id,
        "project": v.dataset.project,
        "name": v.dataset.name,
        "version": v.version,
        "parents": v.parents,
        "tags": v.tags,
        "created": iso(v.created_ms),
        "created_ms": v.created_ms,
        "file_count": v.file_count,
        "total_bytes": v.total_bytes,
        "delta": v.delta,
        "message": v.message,
        "description": v.description,
        "metadata": v.metadata,
        "deleted": v.deleted,
    })
}

fn draft_json(d: &DraftHandle) -> Value {
    json!({
        "id": d.id,
        "draft": true,
        "dataset_id": d.dataset.id,
        "project": d.dataset.project,
        "name": d.dataset.name,
        "version": d.info.version,
        "parents": d.parents,
        "tags": d.info.tags,
        "message": d.info.message,
        "created": iso(d.info.created_ms),
        "created_ms": d.info.created_ms,
        "file_count": d.file_count,
        "total_bytes": d.total_bytes,
        "watch": d.info.watch,
    })
}

fn print_version_line(v: &DatasetVersion) {
    println!("{}", version_line(v));
}

fn version_line(v: &DatasetVersion) -> String {
    let d = &v.delta;
    format!(
        "{}/{} {}  {}  +{} ~{} -{} >{}  {} files, {} ({} newly stored){}",
        v.dataset.project,
        v.dataset.name,
        v.version,
        v.id.short(12),
        d.added,
        d.modified,
        d.removed,
        d.renamed,
        v.file_count,
        output::bytes(v.total_bytes),
        output::bytes(d.stored_bytes),
        if v.tags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", v.tags.join(", "))
        }
    )
}

fn print_report(r: &AddReport, limit: usize) {
    let mut shown = 0;
    let mut line = |s: String| {
        if shown < limit {
            println!("{s}");
        }
        shown += 1;
    };
    for p in &r.added {
        line(format!("  added     {p}"));
    }
    for p in &r.modified {
        line(format!("  modified  {p}"));
    }
    for p in &r.removed {
        line(format!("  removed   {p}"));
    }
    for (a, b) in &r.renamed {
        line(format!("  renamed   {a} -> {b}"));
    }
    if shown > limit {
        println!("  … and {} more", shown - limit);
    }
}

fn changes_json(r: &AddReport) -> Value {
    json!({
        "added": r.added,
        "modified": r.modified,
        "removed": r.removed,
        "renamed": r.renamed.iter().map(|(a, b)| json!({"from": a, "to": b})).collect::<Vec<_>>(),
    })
}

fn resolve_versions(repo: &Repo, revs: &[String]) -> Result<Vec<VersionId>, CliError> {
    revs.iter()
        .map(|r| Ok(repo.resolve(r)?.id))
        .collect::<Result<Vec<_>, CliError>>()
}

/// Runs a dataset command.
pub fn run(ctx: &Ctx, cmd: DatasetCmd) -> Result<(), CliError> {
    match cmd {
        DatasetCmd::Create(a) => create(ctx, a),
        DatasetCmd::Add(a) => add(ctx, a),
        DatasetCmd::Remove(a) => remove(ctx, a),
        DatasetCmd::Finalize(a) => finalize(ctx, a),
        DatasetCmd::Drafts(a) => drafts(ctx, a),
        DatasetCmd::Discard(a) => discard(ctx, a),
        DatasetCmd::Sync(a) => sync(ctx, a),
        DatasetCmd::Watch(a) => crate::watch::watch(ctx, a),
        DatasetCmd::Show(a) => show(ctx, a),
        DatasetCmd::List(a) => list(ctx, a),
        DatasetCmd::Files(a) => files(ctx, a),
        DatasetCmd::Diff(a) => diff(ctx, a),
        DatasetCmd::Cat(a) => cat(ctx, a),
        DatasetCmd::Tag(a) => tag(ctx, a),
        DatasetCmd::Meta(a) => meta(ctx, a),
        DatasetCmd::Preview(a) => preview(ctx, a),
        DatasetCmd::Verify(a) => match &a.folder {
            Some(f) => crate::readside::verify_folder(ctx, &a.rev, f, a.full),
            None => verify(ctx, a),
        },
        DatasetCmd::Get(a) => crate::readside::get(ctx, a),
        DatasetCmd::Copy(a) => crate::readside::copy(ctx, a),
        DatasetCmd::Mount(a) => crate::readside::mount(ctx, a),
        DatasetCmd::Squash(a) => squash(ctx, a),
        DatasetCmd::Delete(a) => delete(ctx, a),
        DatasetCmd::Rename(a) => rename(ctx, a),
        DatasetCmd::Prefetch(a) => crate::remote_cmds::prefetch(ctx, a),
    }
}

fn create(ctx: &Ctx, a: CreateArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let (project, name) = dsv::rev::parse_dataset_name(&a.dataset)?;
    let opts = CreateOptions {
        parents: resolve_versions(&repo, &a.parents)?,
        version: a.version,
        tags: a.tags,
        message: a.message,
        auto_create: true,
        watch: None,
    };
    let d = if a.from_latest {
        repo.writable_copy_or_create(&project, &name, &opts)?
    } else {
        repo.create(&project, &name, &opts)?
    };
    if ctx.json {
        return output::json(&draft_json(&d));
    }
    println!("{}", d.id);
    eprintln!(
        "draft of {} ({} files from {} parent(s)); add files with 'dsv dataset add {} PATH…', then 'dsv dataset finalize {}'",
        d.dataset.full_name(),
        d.file_count,
        d.parents.len(),
        d.id.short(12),
        d.id.short(12)
    );
    Ok(())
}

fn add(ctx: &Ctx, a: AddArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let d = repo.resolve_draft(&a.id)?;
    let bar = Bar::new(ctx.progress);
    let r = repo.add(
        &d,
        &a.paths,
        &AddOptions {
            dataset_path: a.dataset_path,
            wildcards: a.wildcards,
            non_recursive: a.non_recursive,
            progress: Some(&bar),
        },
    )?;
    if ctx.json {
        return output::json(&json!({
            "id": d.id,
            "added": r.added.len(),
            "modified": r.modified.len(),
            "unchanged": r.unchanged,
            "bytes": r.bytes,
            "stored_bytes": r.stored_bytes,
            "changes": changes_json(&r),
        }));
    }
    print_report(&r, 50);
    println!(
        "{}: {} added, {} modified, {} unchanged ({} read, {} newly stored)",
        d.id.short(12),
        r.added.len(),
        r.modified.len(),
        r.unchanged,
        output::bytes(r.bytes),
        output::bytes(r.stored_bytes)
    );
    Ok(())
}

fn remove(ctx: &Ctx, a: RemoveArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let d = repo.resolve_draft(&a.id)?;
    let removed = repo.remove(&d, &a.patterns)?;
    if ctx.json {
        return output::json(&json!({"id": d.id, "removed": removed.len(), "paths": removed}));
    }
    for p in &removed {
        println!("  removed   {p}");
    }
    println!("{}: {} removed", d.id.short(12), removed.len());
    Ok(())
}

fn finalize(ctx: &Ctx, a: FinalizeArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let d = repo.resolve_draft(&a.id)?;
    let v = repo.finalize(&d)?;
    if ctx.json {
        output::json(&version_json(&v))?;
    } else {
        print_version_line(&v);
    }
    crate::remote_cmds::flush_objects(ctx, &repo)
}

fn drafts(ctx: &Ctx, a: DraftsArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let mut ds = repo.drafts(None)?;
    if let Some(f) = &a.filter {
        let f = f.trim_end_matches('/');
        let known = repo.datasets()?.iter().any(|d| {
            d.full_name() == f || d.project == f || d.project.starts_with(&format!("{f}/"))
        });
        if !known {
            return Err(CliError::user(format!("no dataset or project named {f}"))
                .hint("'dsv dataset list' shows every dataset"));
        }
        ds.retain(|d| {
            let p = &d.dataset.project;
            d.dataset.full_name() == f || p == f || p.starts_with(&format!("{f}/"))
        });
    }
    ds.sort_by_key(|d| std::cmp::Reverse(d.info.created_ms));
    let stored = ds
        .iter()
        .map(|d| repo.draft_stored_bytes(d))
        .collect::<Result<Vec<_>, _>>()?;
    if ctx.json {
        return output::json(&Value::Array(
            ds.iter()
                .zip(&stored)
                .map(|(d, s)| {
                    let mut v = draft_json(d);
                    v["stored_bytes"] = json!(s);
                    v
                })
                .collect(),
        ));
    }
    if ds.is_empty() {
        eprintln!("no open drafts");
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (d, s) in ds.iter().zip(&stored) {
        writeln!(
            out,
            "{}  {}  {}  {} files, {} ({} newly stored)  parents [{}]{}",
            d.id.short(12),
            d.dataset.full_name(),
            iso(d.info.created_ms),
            d.file_count,
            output::bytes(d.total_bytes),
            output::bytes(*s),
            d.parents
                .iter()
                .map(|p| p.short(12))
                .collect::<Vec<_>>()
                .join(", "),
            d.info
                .watch
                .as_ref()
                .map(|w| format!("  (watch {w})"))
                .unwrap_or_default()
        )?;
    }
    out.flush()?;
    Ok(())
}

fn discard(ctx: &Ctx, a: DiscardArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let d = repo.resolve_draft(&a.id)?;
    repo.discard(&d)?;
    if ctx.json {
        return output::json(&json!({
            "discarded": d.id,
            "project": d.dataset.project,
            "name": d.dataset.name,
        }));
    }
    println!(
        "discarded draft {} of {}; run 'dsv gc' to reclaim the bytes only it held",
        d.id.short(12),
        d.dataset.full_name()
    );
    Ok(())
}

fn sync(ctx: &Ctx, a: SyncArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let (project, name) = dsv::rev::parse_dataset_name(&a.dataset)?;
    let bar = Bar::new(ctx.progress);
    let opts = SyncOptions {
        dataset_path: a.dataset_path,
        tags: a.tags,
        message: a.message,
        version: a.version,
        progress: Some(&bar),
    };
    let (out, pushed) = match &a.push {
        None => (repo.sync(&project, &name, &a.folder, &opts)?, None),
        Some(r) => {
            let remote = crate::remote_cmds::remote_for_push(&repo, r)?;
            crate::remote_cmds::sync_and_push(ctx, &repo, &remote, &a.dataset, &a.folder, &opts)?
        }
    };
    // One JSON document: the sync's, with the push's report in it.
    if let Some(mut doc) = render_sync(ctx, &project, &name, &out) {
        if let Some(p) = pushed {
            doc["push"] = p;
        }
        output::json(&doc)?;
    }
    // Shown first: a flush that fails does not hide the version made.
    crate::remote_cmds::flush_objects(ctx, &repo)
}

/// Prints what a sync did; with `--json` returns the document instead.
fn render_sync(
    ctx: &Ctx,
    project: &str,
    name: &str,
    out: &dsv::SyncOutcome,
) -> Option<serde_json::Value> {
    match &out.version {
        Some(v) => {
            if ctx.json {
                let mut doc = version_json(v);
                doc["changed"] = json!(true);
                doc["changes"] = changes_json(&out.report);
                return Some(doc);
            }
            print_report(&out.report, 50);
            print_version_line(v);
        }
        None => {
            if ctx.json {
                return Some(json!({
                    "changed": false,
                    "id": out.unchanged_from,
                    "unchanged": out.report.unchanged,
                    "stored_bytes": out.report.stored_bytes,
                }));
            }
            // Bytes stored without a new version: chunks `fsck --repair`
            // had marked damaged, stored again (every version using them is
            // whole again).
            let healed = match out.report.stored_bytes {
                0 => String::new(),
                n => format!(
                    "; {} newly stored (damaged chunks healed)",
                    output::bytes(n)
                ),
            };
            println!(
                "{project}/{name} unchanged ({} files checked, {} read); no version created{healed}",
                out.report.unchanged,
                output::bytes(out.report.bytes_hashed)
            );
        }
    }
    None
}

fn show(ctx: &Ctx, a: RevArg) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let (v, from_draft) = match repo.resolve_any(&a.rev)? {
        Resolved::Version {
            version,
            from_draft,
        } => (*version, from_draft),
        Resolved::Draft(d) => {
            let stored = repo.draft_stored_bytes(&d)?;
            if ctx.json {
                let mut v = draft_json(&d);
                v["stored_bytes"] = json!(stored);
                return output::json(&v);
            }
            println!("draft:       {}", d.id);
            println!("dataset:     {}", d.dataset.full_name());
            println!("created:     {}", iso(d.info.created_ms));
            for p in &d.parents {
                println!("parent:      {p}");
            }
            if let Some(v) = &d.info.version {
                println!("version:     {v} (at finalize)");
            }
            if !d.info.tags.is_empty() {
                println!("tags:        {} (at finalize)", d.info.tags.join(", "));
            }
            println!(
                "files:       {} ({}; {} newly stored)",
                d.file_count,
                output::bytes(d.total_bytes),
                output::bytes(stored)
            );
            if let Some(w) = &d.info.watch {
                println!("watched:     {w}");
            }
            return Ok(());
        }
    };
    if ctx.json {
        let mut doc = version_json(&v);
        if let Some(d) = from_draft {
            doc["finalized_from_draft"] = json!(d);
        }
        return output::json(&doc);
    }
    let d = &v.delta;
    if let Some(draft) = from_draft {
        println!("draft:       {} (finalized into this version)", draft);
    }
    println!("id:          {}", v.id);
    println!("dataset:     {}/{}", v.dataset.project, v.dataset.name);
    println!("version:     {}", v.version);
    println!("created:     {}", iso(v.created_ms));
    for p in &v.parents {
        println!("parent:      {p}");
    }
    println!("tags:        {}", v.tags.join(", "));
    if v.deleted {
        println!(
            "deleted:     removed from its dataset; kept because tasks or models reference it"
        );
    }
    println!(
        "files:       {} ({})",
        v.file_count,
        output::bytes(v.total_bytes)
    );
    println!(
        "delta:       +{} added, ~{} modified, -{} removed, >{} renamed; {} changed, {} newly stored",
        d.added,
        d.modified,
        d.removed,
        d.renamed,
        output::bytes(d.added_bytes),
        output::bytes(d.stored_bytes)
    );
    if !v.message.is_empty() {
        println!("message:     {}", v.message);
    }
    if !v.description.is_empty() {
        println!("description: {}", v.description);
    }
    for (k, val) in &v.metadata {
        println!("meta:        {k} = {val}");
    }
    Ok(())
}

fn list(ctx: &Ctx, a: ListArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let vs = match &a.filter {
        None => repo.list_limited(None, None, &a.tags, a.limit)?,
        Some(f) => repo
            .list_path_limited(f, &a.tags, a.limit)?
            .ok_or_else(|| {
                CliError::user(format!("no dataset or project named {f}"))
                    .hint("'dsv dataset list' shows every dataset")
            })?,
    };
    let mut vs = vs;
    if let Some(n) = a.limit {
        vs.truncate(n);
    }
    if ctx.json {
        return output::json(&Value::Array(vs.iter().map(version_json).collect()));
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for v in &vs {
        writeln!(out, "{}", version_line(v))?;
    }
    out.flush()?;
    Ok(())
}

fn file_json(f: &dsv::FileItem) -> Value {
    json!({"path": f.path, "size": f.size, "hash": f.hash, "mode": format!("{:o}", f.mode), "symlink": f.symlink})
}

fn files(ctx: &Ctx, a: FilesArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = match repo.resolve_any(&a.rev)? {
        Resolved::Version { version, .. } => *version,
        Resolved::Draft(d) => {
            if a.added || a.modified || a.removed {
                return Err(CliError::user(format!(
                    "{} is an open draft; --added/--modified/--removed compare versions",
                    d.id.short(12)
                ))
                .hint("finalize it first, or list all its files without these flags"));
            }
            let list = repo.draft_files(&d, a.glob.as_deref())?;
            return print_files(ctx, &list);
        }
    };
    let globs: Vec<String> = a.glob.iter().cloned().collect();
    let set = dsv::PathPattern::new(&globs)?;
    let list: Vec<dsv::FileItem> = if a.added || a.modified || a.removed {
        let ch = match &a.against {
            Some(r) => repo.diff(&repo.resolve(r)?.id, &v.id)?,
            None => repo.changes(&v)?,
        };
        let mut l = if a.added {
            ch.added
        } else if a.modified {
            ch.modified
        } else {
            ch.removed
        };
        if let Some(s) = &set {
            l.retain(|f| s.matches(f.path.as_bytes()));
        }
        l
    } else {
        repo.files(&v, a.glob.as_deref())?
    };
    print_files(ctx, &list)
}

fn print_files(ctx: &Ctx, list: &[dsv::FileItem]) -> Result<(), CliError> {
    if ctx.json {
        return output::json(&Value::Array(list.iter().map(file_json).collect()));
    }
    let mut out = std::io::stdout().lock();
    for f in list {
        writeln!(
            out,
            "{:>12}  {}  {}",
            f.size,
            &f.hash[..f.hash.len().min(12)],
            f.path
        )?;
    }
    Ok(())
}

fn diff(ctx: &Ctx, a: DiffArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let va = repo.resolve(&a.a)?;
    let vb = repo.resolve(&a.b)?;
    let ch = repo.diff(&va.id, &vb.id)?;
    if ctx.json {
        return output::json(&json!({
            "from": va.id,
            "to": vb.id,
            "added": ch.added.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "modified": ch.modified.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "removed": ch.removed.iter().map(|f| &f.path).collect::<Vec<_>>(),
            // cli.md: arrays of paths — a moved file's path in REV_B;
            // where it came from is under `renames`.
            "renamed": ch.renamed.iter().map(|(_, b)| b).collect::<Vec<_>>(),
            "renames": ch.renamed.iter().map(|(a, b)| json!({"from": a, "to": b})).collect::<Vec<_>>(),
        }));
    }
    let mut out = std::io::stdout().lock();
    for f in &ch.added {
        writeln!(out, "A  {}", f.path)?;
    }
    for f in &ch.modified {
        writeln!(out, "M  {}", f.path)?;
    }
    for f in &ch.removed {
        writeln!(out, "D  {}", f.path)?;
    }
    for (x, y) in &ch.renamed {
        writeln!(out, "R  {x} -> {y}")?;
    }
    Ok(())
}

fn cat(ctx: &Ctx, a: CatArgs) -> Result<(), CliError> {
    if ctx.json {
        return Err(
            CliError::user("dataset cat streams a file's bytes; --json is not supported")
                .hint("'dsv --json dataset files REV PATH' gives its size and hash"),
        );
    }
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let mut out = std::io::stdout().lock();
    repo.cat(&v, &a.path, &mut out)?;
    out.flush()?;
    Ok(())
}

fn tag(ctx: &Ctx, a: TagArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let tags = if a.add.is_empty() && a.remove.is_empty() {
        v.tags.clone()
    } else {
        repo.tag(&v, &a.add, &a.remove)?
    };
    if ctx.json {
        return output::json(&json!({"id": v.id, "tags": tags}));
    }
    println!("{}", tags.join(" "));
    Ok(())
}

fn meta(ctx: &Ctx, a: MetaArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let mut set = BTreeMap::new();
    for kv in &a.set {
        let (k, val) = kv
            .split_once('=')
            .ok_or_else(|| CliError::user(format!("--set {kv}: expected KEY=VALUE")))?;
        let value =
            serde_json::from_str::<Value>(val).unwrap_or_else(|_| Value::String(val.to_string()));
        set.insert(k.to_string(), value);
    }
    let metadata = if set.is_empty() && a.description.is_none() {
        v.metadata.clone()
    } else {
        repo.set_metadata(&v, &set, a.description.as_deref())?
    };
    if let Some(k) = &a.get {
        let val = metadata.get(k).ok_or_else(|| {
            CliError::user(format!(
                "version {} has no metadata key '{k}'",
                v.id.short(12)
            ))
        })?;
        if ctx.json {
            return output::json(val);
        }
        match val {
            Value::String(s) => println!("{s}"),
            other => println!("{other}"),
        }
        return Ok(());
    }
    if ctx.json {
        return output::json(&json!(metadata));
    }
    for (k, val) in &metadata {
        println!("{k} = {val}");
    }
    Ok(())
}

fn preview(ctx: &Ctx, a: PreviewArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let previews = repo.preview(&v, a.rows, a.max_files, a.max_rows)?;
    if ctx.json {
        return output::json(&json!({
            "version": version_json(&v),
            "delta": v.delta,
            "files": previews,
        }));
    }
    print_version_line(&v);
    if previews.is_empty() {
        println!("(no tabular files)");
    }
    let width = output::terminal_width();
    for p in &previews {
        println!("\n== {} ({} rows)", p.path, p.row_count);
        let shown = preview_columns(&p.header, &p.rows, a.max_columns, width);
        let total = p
            .header
            .len()
            .max(p.rows.iter().map(Vec::len).max().unwrap_or(0));
        println!("{}", preview_line(&p.header, shown));
        for r in &p.rows {
            println!("{}", preview_line(r, shown));
        }
        if shown < total {
            println!(
                "… {} more columns not shown (--max-columns, or --json for all)",
                total - shown
            );
        }
        println!(
            "{:<20} {:>8} {:>14} {:>14} {:>14}",
            "column", "count", "min", "max", "mean"
        );
        let stats_shown = p.columns.len().min(a.max_columns.max(1));
        for c in &p.columns[..stats_shown] {
            let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!(
                "{:<20} {:>8} {:>14} {:>14} {:>14}",
                c.name,
                c.count,
                f(c.min),
                f(c.max),
                f(c.mean)
            );
        }
        if stats_shown < p.columns.len() {
            println!(
                "… statistics of {} more columns not shown",
                p.columns.len() - stats_shown
            );
        }
    }
    Ok(())
}

/// The longest cell shown in a preview.
const MAX_CELL: usize = 40;

/// A cell cut to [`MAX_CELL`] characters.
fn preview_cell(c: &str) -> String {
    if c.chars().count() <= MAX_CELL {
        c.to_string()
    } else {
        let mut t: String = c.chars().take(MAX_CELL - 1).collect();
        t.push('…');
        t
    }
}

/// How many leading columns to show: at most `max`, and as many as fit in
/// `width` characters (at least one) when the output is a terminal.
fn preview_columns(
    header: &[String],
    rows: &[Vec<String>],
    max: usize,
    width: Option<usize>,
) -> usize {
    let total = header
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut n = total.min(max.max(1));
    if let Some(w) = width {
        let line = |k: usize| {
            std::iter::once(header)
                .chain(rows.iter().map(Vec::as_slice))
                .map(|r| {
                    r.iter()
                        .take(k)
                        .map(|c| preview_cell(c).chars().count() + 3)
                        .sum::<usize>()
                })
                .max()
                .unwrap_or(0)
        };
        while n > 1 && line(n) > w {
            n -= 1;
        }
    }
    n
}

fn preview_line(cells: &[String], n: usize) -> String {
    cells
        .iter()
        .take(n)
        .map(|c| preview_cell(c))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn verify(ctx: &Ctx, a: VerifyArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let bad = repo.verify(&v)?;
    if ctx.json {
        output::json(
            &json!({"id": v.id, "ok": bad.is_empty(), "files": v.file_count, "mismatches": bad}),
        )?;
    } else if bad.is_empty() {
        println!(
            "{} ok: {} files, {} rehashed",
            v.id.short(12),
            v.file_count,
            output::bytes(v.total_bytes)
        );
    } else {
        for m in &bad {
            println!("BAD  {}: {}", m.path, m.error);
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::repo(format!(
            "{} damaged file(s) in version {}",
            bad.len(),
            v.id.short(12)
        ))
        .hint("run 'dsv fsck --read-data' for the whole repository"))
    }
}

fn squash(ctx: &Ctx, a: SquashArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let (project, name) = dsv::rev::parse_dataset_name(&a.dataset)?;
    let sources = a
        .revs
        .iter()
        .map(|r| repo.resolve(r))
        .collect::<Result<Vec<_>, _>>()?;
    let v = repo.squash(&project, &name, &sources, a.version.as_deref(), &a.message)?;
    if ctx.json {
        output::json(&version_json(&v))?;
    } else {
        print_version_line(&v);
    }
    crate::remote_cmds::flush_objects(ctx, &repo)
}

fn delete(ctx: &Ctx, a: DeleteArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let v = repo.resolve(&a.rev)?;
    let refs = repo.references(&v)?;
    repo.delete(&v, a.force)?;
    if ctx.json {
        return output::json(&json!({"deleted": v.id, "kept_for": refs}));
    }
    if !refs.is_empty() {
        println!(
            "removed {} from its dataset; its data is kept (readable by id) for {}",
            v.label(),
            refs.join(", ")
        );
        return Ok(());
    }
    println!(
        "deleted {}/{} {} ({}); run 'dsv gc' to reclaim its bytes",
        v.dataset.project,
        v.dataset.name,
        v.version,
        v.id.short(12)
    );
    Ok(())
}

fn rename(ctx: &Ctx, a: RenameArgs) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let d = repo.rename_dataset(&a.from, &a.to)?;
    if ctx.json {
        return output::json(&json!({"id": d.id, "project": d.project, "name": d.name}));
    }
    println!("{} -> {}", a.from, d.full_name());
    Ok(())
}
