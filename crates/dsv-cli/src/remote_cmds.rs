//! `dsv remote`, `push`, `fetch`, `pull`, `clone`, `dataset prefetch`: the
//! CLI side of `dsv-remote` (argument parsing, credentials from the
//! environment, progress bars, tables and `--json`).

use std::path::PathBuf;
use std::sync::Mutex;

use clap::{Args, Subcommand};
use serde_json::json;

use dsv::Repo;
use dsv_remote::{Connect, FetchMode, PushTarget, RemoteRecord};

use crate::error::CliError;
use crate::output;
use crate::repo;
use crate::Ctx;

/// `dsv remote …`.
#[derive(Debug, Subcommand)]
pub enum RemoteCmd {
    /// Add a remote: s3://BUCKET/PREFIX (also gs://, az://), file:///PATH or a path.
    Add(AddArgs),
    /// The remotes: name, URL, endpoint, lazy.
    List,
    /// Remove a remote and what this repository knows about it.
    Remove(NameArg),
    /// Delete the remote's packs no dataset refers to (left by interrupted
    /// pushes); never runs at the same time as a push.
    Gc(GcArgs),
}

/// `remote gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Remote name (default: the only remote, or origin).
    name: Option<String>,
    /// Keep unreferenced packs written less than this long ago: 30s, 10m,
    /// 1h, 2d, 0.
    #[arg(long, default_value = "1h", value_parser = parse_age)]
    grace: u64,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `30s`, `10m`, `1h`, `2d`, `0` → milliseconds.
fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (like 30s, 10m, 1h, 2d)"))?;
    let ms = match unit {
        "" if n == 0 => 0,
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{s}' is not a duration (like 30s, 10m, 1h, 2d)")),
    };
    n.checked_mul(ms)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// `remote add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Name (e.g. origin).
    name: String,
    /// URL.
    url: String,
    /// Endpoint of an S3-compatible server (MinIO, R2, a local server …).
    #[arg(long)]
    endpoint: Option<String>,
    /// Region (default: AWS_REGION, the profile's, or us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Do not contact the remote to check access.
    #[arg(long)]
    no_check: bool,
}

/// A remote name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// Remote name.
    name: String,
}

/// `dsv push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// [REMOTE] then datasets (PROJECT/NAME) or versions (REV); default:
    /// the only remote (or origin), every dataset.
    args: Vec<String>,
    /// Crash tests: abort the process after this many uploads.
    #[arg(long, hide = true)]
    abort_after_uploads: Option<u32>,
}

/// `dsv fetch` / `dsv pull`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// [REMOTE] then datasets (PROJECT/NAME); default: the only remote (or
    /// origin), every dataset.
    args: Vec<String>,
}

/// `dsv clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The remote's URL.
    url: String,
    /// Folder to create the repository in (default: the URL's last part).
    dir: Option<PathBuf>,
    /// Endpoint of an S3-compatible server.
    #[arg(long)]
    endpoint: Option<String>,
    /// Region.
    #[arg(long)]
    region: Option<String>,
    /// Download every chunk now (default: metadata only; data is read on demand).
    #[arg(long)]
    full: bool,
}

/// `dsv dataset prefetch`.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// Versions (PROJECT/NAME[@VERSION|@TAG] or id prefixes).
    #[arg(required = true)]
    revs: Vec<String>,
}

/// Credentials and client options from the environment and the profile
/// files (never stored, never printed): `AWS_*`, `GOOGLE_*`, `AZURE_*`;
/// without `AWS_ACCESS_KEY_ID`, the `[AWS_PROFILE or default]` section of
/// `~/.aws/credentials` (or `AWS_SHARED_CREDENTIALS_FILE`), and the region
/// from `~/.aws/config`. Instance metadata credentials are the object
/// store client's last resort.
pub fn connect_from_env() -> Connect {
    let mut options: Vec<(String, String)> = Vec::new();
    for (k, v) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_") {
            options.push((k.to_ascii_lowercase(), v));
        }
    }
    let has = |o: &[(String, String)], k: &str| o.iter().any(|(x, _)| x == k);
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if !has(&options, "aws_access_key_id") {
        let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
        if let Some(sec) = file.and_then(|f| ini_section(&f, &profile)) {
            for (k, ok) in [
                ("aws_access_key_id", "aws_access_key_id"),
                ("aws_secret_access_key", "aws_secret_access_key"),
                ("aws_session_token", "aws_session_token"),
            ] {
                if let Some((_, v)) = sec.iter().find(|(x, _)| x == k) {
                    options.push((ok.into(), v.clone()));
                }
            }
        }
    }
    if !has(&options, "aws_region") && !has(&options, "aws_default_region") {
        let file = std::env::var_os("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
        let section = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        if let Some(sec) = file.and_then(|f| ini_section(&f, &section)) {
            if let Some((_, v)) = sec.iter().find(|(x, _)| x == "region") {
                options.push(("aws_region".into(), v.clone()));
            }
        }
    }
    Connect { options }
}

/// The `key = value` lines of `[section]` of an INI file.
fn ini_section(path: &std::path::Path, section: &str) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') && l.ends_with(']') {
            inside = l[1..l.len() - 1].trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = l.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Byte budget of the remote chunk cache: `DSV_REMOTE_CACHE` (bytes, or
/// with a K/M/G suffix), 2 GiB by default.
pub fn cache_budget() -> u64 {
    std::env::var("DSV_REMOTE_CACHE")
        .ok()
        .and_then(|s| parse_size(&s))
        .unwrap_or(dsv_remote::cache::DEFAULT_BUDGET)
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mul)
}

/// Makes an opened repository read missing chunks from its remotes.
pub fn attach(store: &dsv_store::Store) -> Result<(), CliError> {
    let dir = store.dir().join("remote-cache");
    dsv_remote::attach(store, &connect_from_env(), dir, cache_budget())?;
    Ok(())
}

impl From<dsv_remote::Error> for CliError {
    fn from(e: dsv_remote::Error) -> Self {
        use dsv_remote::Error as E;
        let code = if e.is_repository_problem() { 2 } else { 1 };
        match e {
            E::Repo(r) => {
                let storage = matches!(&r, dsv::Error::Store(dsv_store::Error::Storage { .. }));
                let mut c: CliError = r.into();
                if storage && c.hint.is_none() {
                    c.hint = Some(
                        "check the URL, --endpoint, the bucket and the credentials \
                         (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials)"
                            .into(),
                    );
                }
                c
            }
            E::NoSuchRemote(_) => CliError {
                code,
                message: e.to_string(),
                hint: Some(
                    "'dsv remote list' shows the remotes; 'dsv remote add NAME URL' adds one"
                        .into(),
                ),
            },
            E::EmptyRemote(_) => CliError {
                code,
                message: e.to_string(),
                hint: Some(
                    "'dsv remote add origin URL' and 'dsv push' in a repository create it".into(),
                ),
            },
            E::Rejected { .. } => CliError {
                code,
                message: e.to_string(),
                hint: None,
            },
            other => CliError {
                code,
                message: other.to_string(),
                hint: None,
            },
        }
    }
}

/// `dsv remote …`.
pub fn remote(ctx: &Ctx, c: RemoteCmd) -> Result<(), CliError> {
    let repo = Repo::from_store(repo::open(ctx)?);
    match c {
        RemoteCmd::Add(a) => {
            let url = normalize_url(&a.url)?;
            let rec = RemoteRecord {
                url: url.clone(),
                endpoint: a.endpoint,
                region: a.region,
                lazy: false,
                primary: false,
                added_ms: dsv_store::store::now_ms(),
            };
            let m = dsv_remote::add_remote(&repo, &a.name, rec, &connect_from_env(), !a.no_check)?;
            if ctx.json {
                return output::json(&json!({
                    "name": a.name, "url": url, "checked": !a.no_check,
                    "empty": !a.no_check && m.is_none(),
                }));
            }
            let state = match (&m, a.no_check) {
                (_, true) => "not checked",
                (None, false) => "reachable, empty",
                (Some(_), false) => "reachable",
            };
            println!("remote {} → {url} ({state})", a.name);
            Ok(())
        }
        RemoteCmd::List => {
            let rs = dsv_remote::remotes(&repo)?;
            if ctx.json {
                let v: Vec<_> = rs
                    .iter()
                    .map(|(n, r)| json!({"name": n, "url": r.url, "endpoint": r.endpoint, "region": r.region, "lazy": r.lazy}))
                    .collect();
                return output::json(&json!(v));
            }
            for (n, r) in rs {
                let mut extra = Vec::new();
                if let Some(e) = &r.endpoint {
                    extra.push(format!("endpoint {e}"));
                }
                if let Some(g) = &r.region {
                    extra.push(format!("region {g}"));
                }
                if r.lazy {
                    extra.push("lazy: data read on demand".into());
                }
                let extra = if extra.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", extra.join(", "))
                };
                println!("{n}\t{}{extra}", r.url);
            }
            Ok(())
        }
        RemoteCmd::Gc(a) => {
            let args: Vec<String> = a.name.into_iter().collect();
            let (name, _) = pick_remote(&repo, &args)?;
            let rec = dsv_remote::get_remote(&repo, &name)?;
            let storage = dsv_remote::open_storage(&rec, &connect_from_env())?;
            let bars = Bars::new(ctx.progress);
            let opts = dsv_remote::gc::GcOptions {
                grace_ms: a.grace.min(i64::MAX as u64) as i64,
                dry_run: a.dry_run,
            };
            let r = dsv_remote::gc::gc_remote(&repo, &name, &*storage, &opts, &bars)?;
            if ctx.json {
                return output::json(&serde_json::to_value(&r).unwrap_or_default());
            }
            println!(
                "{name}: {} dataset(s), {} version(s); {} pack(s), {}; live: {} object(s), {} chunk(s)",
                r.datasets,
                r.versions,
                r.packs,
                output::bytes(r.bytes),
                r.live_objects,
                r.live_chunks
            );
            let verb = if r.dry_run { "would delete" } else { "deleted" };
            println!(
                "{verb} {} unreferenced pack(s), {}; kept {} younger than --grace{}",
                r.deleted_packs,
                output::bytes(r.deleted_bytes),
                r.young_packs,
                if r.expired_leases > 0 {
                    format!("; removed {} expired lease(s)", r.expired_leases)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        RemoteCmd::Remove(a) => {
            dsv_remote::remove_remote(&repo, &a.name)?;
            if ctx.json {
                return output::json(&json!({"removed": a.name}));
            }
            println!("removed remote {}", a.name);
            Ok(())
        }
    }
}

/// After a command that wrote data: in a repository whose packs live on
/// object storage (`init --objects`), pushes what is new and evicts the
/// local packs the object store now holds. A failure loses nothing (the
/// data is stored here) and is reported with what to do.
pub fn flush_objects(ctx: &Ctx, repo: &Repo) -> Result<(), CliError> {
    if dsv_remote::objects::primary(repo)?.is_none() {
        return Ok(());
    }
    let bars = Bars::new(ctx.progress);
    match dsv_remote::objects::flush(repo, &connect_from_env(), &bars) {
        Ok(Some(r)) => {
            if let Some(x) = r.push.rejected.first() {
                return Err(CliError::repo(format!(
                    "stored here, but not sent to the object store: {} of {} rejected: {}",
                    r.push.rejected.len(),
                    x.dataset,
                    x.reason
                ))
                .hint("nothing is lost: run 'dsv pull objects', then the next command sends it"));
            }
            if !ctx.json && (r.push.uploaded_bytes > 0 || r.evicted.packs > 0) {
                eprintln!(
                    "objects: {} uploaded to {}, {} local pack(s) evicted ({})",
                    output::bytes(r.push.uploaded_bytes),
                    r.remote,
                    r.evicted.packs,
                    output::bytes(r.evicted.bytes)
                );
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            let mut c = CliError::from(e);
            c.message = format!(
                "stored here, but not sent to the object store: {}",
                c.message
            );
            c.hint = Some(
                "nothing is lost: the next command that writes data (or 'dsv push objects') sends it"
                    .into(),
            );
            Err(c)
        }
    }
}

/// `fsck --read-data --remote`.
pub fn check_remote_chunks(
    ctx: &Ctx,
    repo: &Repo,
) -> Result<dsv_remote::ops::RemoteCheck, CliError> {
    let bars = Bars::new(ctx.progress);
    Ok(dsv_remote::ops::check_remote_chunks(
        repo,
        &connect_from_env(),
        &bars,
    )?)
}

/// `fsck --rebuild-index` for every remote of the repository.
pub fn rebuild_remote_indexes(
    ctx: &Ctx,
    repo: &Repo,
) -> Result<Vec<dsv_remote::ops::ReindexReport>, CliError> {
    let mut out = Vec::new();
    for (name, _) in dsv_remote::remotes(repo)? {
        let bars = Bars::new(ctx.progress);
        out.push(dsv_remote::ops::rebuild_index(
            repo,
            &name,
            &connect_from_env(),
            &bars,
        )?);
    }
    Ok(out)
}

/// A path given as a remote URL becomes absolute (`remote add origin ../b`).
pub fn normalize_url(u: &str) -> Result<String, CliError> {
    if u.contains("://") || u.starts_with('/') {
        return Ok(u.to_string());
    }
    if u.is_empty() {
        return Err(CliError::user("invalid remote URL '': empty"));
    }
    if u.contains(':') {
        // Not a path and not a URL we know: let the parser name the problem.
        return Ok(u.to_string());
    }
    let abs = std::env::current_dir()?.join(u);
    Ok(abs.to_string_lossy().into_owned())
}

/// Splits `[REMOTE] ARGS…`: the first argument is a remote when one has
/// that name; otherwise the only remote, or `origin`.
fn pick_remote(repo: &Repo, args: &[String]) -> Result<(String, Vec<String>), CliError> {
    let rs = dsv_remote::remotes(repo)?;
    if let Some(first) = args.first() {
        if rs.iter().any(|(n, _)| n == first) {
            return Ok((first.clone(), args[1..].to_vec()));
        }
        // A plain word that is neither PROJECT/NAME, REV nor an id prefix
        // was meant as a remote.
        let id_like = first.len() >= 6 && first.bytes().all(|b| b.is_ascii_hexdigit());
        if !first.contains('/') && !first.contains('@') && !id_like {
            return Err(CliError::from(dsv_remote::Error::NoSuchRemote(
                first.clone(),
            )));
        }
    }
    let name = match rs.len() {
        0 => {
            return Err(CliError::user("this repository has no remote")
                .hint("add one: dsv remote add origin s3://BUCKET/PREFIX"))
        }
        1 => rs[0].0.clone(),
        _ if rs.iter().any(|(n, _)| n == "origin") => "origin".to_string(),
        _ => {
            return Err(CliError::user(format!(
                "several remotes ({}); name one",
                rs.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    Ok((name, args.to_vec()))
}

/// A progress bar per phase (bytes, bytes/s, ETA) on a terminal.
struct Bars {
    enabled: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Bars {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            bar: Mutex::new(None),
        }
    }
}

impl dsv_remote::Progress for Bars {
    fn phase(&self, what: &str, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let b = match total {
            Some(t) => indicatif::ProgressBar::new(t).with_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{msg:>20} {bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            ),
        };
        b.set_message(what.to_string());
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }
    fn bytes(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(n);
        }
    }
    fn finish_phase(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// The remote `dataset sync --push [REMOTE]` pushes to ("" = the default).
/// The remote `dataset sync --push [REMOTE]` pushes to ("" = the only
/// remote, or origin).
pub fn remote_for_push(repo: &Repo, given: &str) -> Result<String, CliError> {
    if given.is_empty() {
        return Ok(pick_remote(repo, &[])?.0);
    }
    dsv_remote::get_remote(repo, given)?;
    Ok(given.to_string())
}

/// `dataset sync --push`: the library's sync-and-push (the remote is
/// checked before anything is written); returns the sync's outcome and the
/// push's rendering (its JSON document with `--json`).
pub fn sync_and_push(
    ctx: &Ctx,
    repo: &Repo,
    remote: &str,
    dataset: &str,
    folder: &std::path::Path,
    opts: &dsv::SyncOptions<'_>,
) -> Result<(dsv::SyncOutcome, Option<serde_json::Value>), CliError> {
    let bars = Bars::new(ctx.progress);
    let started = std::time::Instant::now();
    let (out, r) = dsv_remote::sync_and_push(
        repo,
        remote,
        dataset,
        folder,
        opts,
        &connect_from_env(),
        &bars,
    )?;
    Ok((out, render_push(ctx, remote, &r, started)))
}

/// `dsv push`.
pub fn push(ctx: &Ctx, a: PushArgs) -> Result<(), CliError> {
    let repo = repo::open_repo(ctx)?;
    let team_url = a
        .args
        .first()
        .filter(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
        .cloned();
    let (name, rest) = match &team_url {
        Some(_) => (String::new(), a.args[1..].to_vec()),
        None => pick_remote(&repo, &a.args)?,
    };
    let mut targets = Vec::new();
    if rest.is_empty() {
        for ds in repo.datasets()? {
            targets.push(PushTarget::Dataset(ds));
        }
    }
    for t in &rest {
        if !t.contains('@') {
            if let Ok((p, n)) = dsv::rev::parse_dataset_name(t) {
                if let Some(ds) = repo.dataset(&p, &n)? {
                    targets.push(PushTarget::Dataset(ds));
                    continue;
                }
            }
        }
        let v = repo.resolve(t)?;
        targets.push(PushTarget::Version(v.dataset.clone(), v.id));
    }
    if let Some(url) = team_url {
        return graduate(ctx, &repo, &url, &targets);
    }
    if let Some(doc) = push_with(ctx, &repo, &name, &targets, a.abort_after_uploads)? {
        output::json(&doc)?;
    }
    Ok(())
}

/// `dsv push postgres://…`: datasets and their models into a team
/// repository, with their whole history.
fn graduate(ctx: &Ctx, repo: &Repo, url: &str, targets: &[PushTarget]) -> Result<(), CliError> {
    let bars = Bars::new(ctx.progress);
    let staging = repo
        .store()
        .dir()
        .join(format!("graduate-{}", std::process::id()));
    let opts = crate::team::team_options(ctx, &staging.join("machine/.dsv"), url);
    let r = dsv_remote::team::graduate(repo, targets, url, &opts, &staging, &bars)?;
    let versions: usize = r.fetch.datasets.iter().map(|d| d.imported.len()).sum();
    if ctx.json {
        return output::json(&json!({
            "metadata": r.metadata,
            "datasets": r.push.datasets.iter().map(|d| d.dataset.clone()).collect::<Vec<_>>(),
            "versions_added": versions,
            "models_added": r.fetch.models.len(),
            "chunks_stored": r.fetch.chunks,
            "chunk_bytes": r.fetch.chunk_bytes,
        }));
    }
    println!(
        "graduated {} dataset(s) into the team repository at {}: {versions} version(s) added, {} model(s), {} chunk(s) ({}) stored on its object store",
        r.push.datasets.len(),
        r.metadata,
        r.fetch.models.len(),
        r.fetch.chunks,
        output::bytes(r.fetch.chunk_bytes)
    );
    Ok(())
}

/// Aborts the process after `after` uploads (crash tests).
struct AbortAfter<'a> {
    inner: &'a Bars,
    after: u32,
    count: std::sync::atomic::AtomicU32,
}

impl dsv_remote::Progress for AbortAfter<'_> {
    fn phase(&self, what: &str, total: Option<u64>) {
        self.inner.phase(what, total)
    }
    fn bytes(&self, n: u64) {
        self.inner.bytes(n);
        let c = self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if c >= self.after {
            std::process::abort();
        }
    }
    fn finish_phase(&self) {
        self.inner.finish_phase()
    }
}

/// Pushes and prints the report; with `--json` returns it instead.
fn push_with(
    ctx: &Ctx,
    repo: &Repo,
    name: &str,
    targets: &[PushTarget],
    abort_after: Option<u32>,
) -> Result<Option<serde_json::Value>, CliError> {
    let bars = Bars::new(ctx.progress);
    let started = std::time::Instant::now();
    let aborting = abort_after.map(|after| AbortAfter {
        inner: &bars,
        after,
        count: Default::default(),
    });
    let progress: &dyn dsv_remote::Progress = match &aborting {
        Some(a) => a,
        None => &bars,
    };
    let r = dsv_remote::push(repo, name, targets, &connect_from_env(), progress)?;
    Ok(render_push(ctx, name, &r, started))
}

/// Prints a push report; with `--json` returns it instead (for the
/// caller's one document).
fn render_push(
    ctx: &Ctx,
    name: &str,
    r: &dsv_remote::PushReport,
    started: std::time::Instant,
) -> Option<serde_json::Value> {
    let secs = started.elapsed().as_secs_f64();
    if ctx.json {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["seconds"] = json!(secs);
        return Some(v);
    }
    for d in &r.datasets {
        match d.status.as_str() {
            "up to date" => println!("{}: up to date", d.dataset),
            _ => println!(
                "{}: pushed {} version(s) ({})",
                d.dataset,
                d.versions_sent.len(),
                d.versions_sent.join(", ")
            ),
        }
    }
    if r.models > 0 {
        println!("{} model(s) pushed", r.models);
    }
    if r.models_held_back > 0 {
        println!(
            "{} model(s) not pushed: a dataset version they were trained on is not on {name} \
             (push those datasets too)",
            r.models_held_back
        );
    }
    println!(
        "to {name}: {} packs, {} uploaded ({} chunks, {} objects) in {secs:.2} s",
        r.packs,
        output::bytes(r.uploaded_bytes),
        r.chunks,
        r.objects
    );
    None
}

fn dataset_filter(repo: &Repo, rest: &[String]) -> Result<Option<Vec<dsv::DatasetId>>, CliError> {
    if rest.is_empty() {
        return Ok(None);
    }
    let mut ids = Vec::new();
    for t in rest {
        let (p, n) = dsv::rev::parse_dataset_name(t)?;
        match repo.dataset(&p, &n)? {
            Some(ds) => ids.push(ds.id),
            None => {
                return Err(CliError::user(format!(
                    "dataset not found here: {t}; fetch without names to get new datasets"
                )))
            }
        }
    }
    Ok(Some(ids))
}

/// `dsv fetch` (metadata) and `dsv pull` (and data).
pub fn fetch(ctx: &Ctx, a: FetchArgs, mode: FetchMode) -> Result<(), CliError> {
    let repo = repo::open_repo(ctx)?;
    let (name, rest) = pick_remote(&repo, &a.args)?;
    let only = dataset_filter(&repo, &rest)?;
    fetch_and_report(ctx, &repo, &name, mode, only.as_deref())
}

fn fetch_and_report(
    ctx: &Ctx,
    repo: &Repo,
    name: &str,
    mode: FetchMode,
    only: Option<&[dsv::DatasetId]>,
) -> Result<(), CliError> {
    let bars = Bars::new(ctx.progress);
    let started = std::time::Instant::now();
    let r = dsv_remote::fetch(repo, name, mode, only, &connect_from_env(), &bars)?;
    render_fetch(ctx, name, mode, &r, started)
}

fn render_fetch(
    ctx: &Ctx,
    name: &str,
    mode: FetchMode,
    r: &dsv_remote::FetchReport,
    started: std::time::Instant,
) -> Result<(), CliError> {
    let secs = started.elapsed().as_secs_f64();
    if ctx.json {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["seconds"] = json!(secs);
        return output::json(&v);
    }
    if r.empty_remote {
        println!("{name} is empty: nothing to fetch");
        return Ok(());
    }
    for d in &r.datasets {
        if !d.imported.is_empty() {
            println!(
                "{}{}: {} new version(s) ({})",
                d.dataset,
                if d.created { " (new)" } else { "" },
                d.imported.len(),
                d.imported.join(", ")
            );
        }
        for (old, new) in &d.rebased {
            if old == new {
                println!("  your unpushed version {old} now follows them");
            } else {
                println!("  your unpushed version {old} became {new} (the remote had {old})");
            }
        }
        if d.updated > 0 {
            println!(
                "{}: tags or metadata of {} version(s) updated",
                d.dataset, d.updated
            );
        }
        for c in &d.conflicts {
            println!(
                "{}: the tags or metadata of {c} changed here and on {name}; kept this repository's",
                d.dataset
            );
        }
    }
    for (what, why) in &r.model_problems {
        eprintln!("warning: model skipped: {what}: {why}");
    }
    for m in &r.models {
        println!(
            "model {} of {} imported{}{}",
            &m.id[..12.min(m.id.len())],
            m.line,
            if m.tags.is_empty() {
                String::new()
            } else {
                format!(" (tags: {})", m.tags.join(", "))
            },
            if m.dropped_tags.is_empty() {
                String::new()
            } else {
                format!(
                    "; kept this repository's {} (a model here holds it)",
                    m.dropped_tags.join(", ")
                )
            }
        );
    }
    if r.datasets
        .iter()
        .all(|d| d.imported.is_empty() && d.updated == 0)
        && r.models.is_empty()
    {
        println!("up to date with {name}");
    }
    let data = if mode == FetchMode::Full {
        format!(", {} chunks ({})", r.chunks, output::bytes(r.chunk_bytes))
    } else {
        String::new()
    };
    println!(
        "from {name}: {} metadata{data} in {secs:.2} s",
        output::bytes(r.metadata_bytes)
    );
    Ok(())
}

/// `dsv clone URL [DIR]`.
pub fn clone(ctx: &Ctx, a: CloneArgs) -> Result<(), CliError> {
    let url = normalize_url(&a.url)?;
    let base = match a.dir {
        Some(d) => d,
        None => {
            let last = url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|s| !s.is_empty() && !s.contains(':'))
                .unwrap_or("dsv-clone");
            std::env::current_dir()?.join(last)
        }
    };
    let rec = RemoteRecord {
        url: url.clone(),
        endpoint: a.endpoint,
        region: a.region,
        lazy: !a.full,
        primary: false,
        added_ms: dsv_store::store::now_ms(),
    };
    let opts = dsv_remote::CloneOptions {
        store: repo::options(ctx),
        mode: if a.full {
            FetchMode::Full
        } else {
            FetchMode::Metadata
        },
        cache_budget: cache_budget(),
    };
    let bars = Bars::new(ctx.progress);
    let started = std::time::Instant::now();
    let (_, r) = dsv_remote::clone_into(&base, rec, &connect_from_env(), &opts, &bars)?;
    if !ctx.json {
        println!("Cloned {url} into {}", base.display());
    }
    render_fetch(ctx, "origin", opts.mode, &r, started)
}

/// `dsv dataset prefetch REV…`.
pub fn prefetch(ctx: &Ctx, a: PrefetchArgs) -> Result<(), CliError> {
    let repo = repo::open_repo(ctx)?;
    let mut ids = Vec::new();
    for r in &a.revs {
        ids.push(repo.resolve(r)?.id);
    }
    let bars = Bars::new(ctx.progress);
    let started = std::time::Instant::now();
    let (n, bytes) = dsv_remote::prefetch(&repo, &ids, &connect_from_env(), &bars)?;
    let secs = started.elapsed().as_secs_f64();
    if ctx.json {
        return output::json(&json!({"chunks": n, "bytes": bytes, "seconds": secs}));
    }
    if n == 0 {
        println!("every chunk is here already");
    } else {
        println!(
            "downloaded {n} chunks ({}) in {secs:.2} s",
            output::bytes(bytes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ini() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("x"), None);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\n",
        )
        .unwrap();
        assert_eq!(
            ini_section(&f, "other").unwrap(),
            vec![("aws_access_key_id".to_string(), "B".to_string())]
        );
        assert!(ini_section(&f, "missing").is_none());
    }
}
