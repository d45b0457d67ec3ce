//! Team repositories from the command line: `dsv init --metadata`,
//! `dsv connect`, and the credentials the libraries never read themselves
//! (`PGPASSWORD`, `PGPASSFILE` / `~/.pgpass`).

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use dsv_pg::PgOptions;
use dsv_remote::team::{ObjectsAt, TeamOptions};

use crate::error::CliError;
use crate::output;
use crate::repo::{self, DOT_DSV};
use crate::Ctx;

/// `dsv connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Folder for this machine's part (PATH/.dsv): config, packs it writes,
    /// chunk cache.
    path: Option<PathBuf>,
    /// The team's PostgreSQL database (postgres://USER@HOST:PORT/DB); the
    /// password comes from PGPASSWORD or ~/.pgpass and is never stored.
    #[arg(long, value_name = "URL")]
    metadata: String,
    /// The object store, when this machine reaches it at another address
    /// than the one the team recorded.
    #[arg(long, value_name = "URL")]
    objects: Option<String>,
    /// Endpoint of an S3-compatible server (with --objects).
    #[arg(long, requires = "objects")]
    endpoint: Option<String>,
    /// Region (with --objects).
    #[arg(long, requires = "objects")]
    region: Option<String>,
}

/// One `.pgpass` line's fields (`host:port:db:user:password`, `*` matches
/// anything, `\:` and `\\` escaped).
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("non-empty").push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("non-empty").push(c),
        }
    }
    out
}

/// The password for `url` from a `.pgpass`-format file, as libpq finds it.
fn pgpass_lookup(file: &Path, url: &str) -> Option<String> {
    let data = std::fs::read_to_string(file).ok()?;
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str().unwrap_or("localhost").to_string();
    let port = u.port().unwrap_or(5432).to_string();
    let db = u.path().trim_start_matches('/').to_string();
    let user = u.username().to_string();
    let want = [host, port, db, user];
    data.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(pgpass_fields)
        .find(|f| f.len() == 5 && f[..4].iter().zip(&want).all(|(a, b)| a == "*" || a == b))
        .map(|f| f[4].clone())
}

/// [`pgpass_lookup`] on a password file libpq would use: a plain file
/// without group or world access (else it is ignored, with a warning
/// naming it, as libpq does).
fn pgpass_checked(file: &Path, url: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(file).ok()?;
    if !md.is_file() {
        eprintln!(
            "warning: password file {} is not a plain file; it is ignored",
            file.display()
        );
        return None;
    }
    if md.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: password file {} has group or world access; it is ignored \
             (permissions should be u=rw: chmod 600 {})",
            file.display(),
            file.display()
        );
        return None;
    }
    pgpass_lookup(file, url)
}

/// Database options: the password from `PGPASSWORD`, else from
/// `PGPASSFILE` or `~/.pgpass` (as libpq would), and this command's name
/// for `pg_stat_activity`.
pub fn pg_options(ctx: &Ctx, url: &str) -> PgOptions {
    let password = std::env::var("PGPASSWORD").ok().or_else(|| {
        let file = std::env::var_os("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
        pgpass_checked(&file, url)
    });
    PgOptions {
        password,
        application_name: Some(format!(
            "dsv {} on {}",
            ctx.command,
            dsv_runtime::agent::hostname()
        )),
        statement_timeout: None,
        lock_timeout: Some(ctx.lock_timeout),
    }
}

/// Everything a team repository's libraries need from this machine.
pub fn team_options(ctx: &Ctx, dir: &Path, url: &str) -> TeamOptions {
    TeamOptions {
        pg: pg_options(ctx, url),
        connect: crate::remote_cmds::connect_from_env(),
        store: repo::options(ctx),
        cache_dir: dir.join("remote-cache"),
        cache_budget: crate::remote_cmds::cache_budget(),
    }
}

/// Opens the team repository whose machine folder is `dir`.
pub fn open(ctx: &Ctx, dir: &Path) -> Result<dsv_store::Store, CliError> {
    let team = dsv_remote::team::team_file(dir)?
        .ok_or_else(|| CliError::user(format!("{} is not a team repository", dir.display())))?;
    Ok(dsv_remote::team::open(
        dir,
        &team_options(ctx, dir, &team.metadata),
    )?)
}

/// `dsv init PATH --metadata URL --objects URL`.
pub fn init(
    ctx: &Ctx,
    base: &Path,
    metadata: &str,
    objects: ObjectsAt,
    config: dsv_store::RepoConfig,
) -> Result<(), CliError> {
    let dot = base.join(DOT_DSV);
    let repo = dsv_remote::team::init(
        base,
        metadata,
        objects.clone(),
        config,
        &team_options(ctx, &dot, metadata),
    )?;
    let dir = std::fs::canonicalize(repo.store().dir()).unwrap_or(dot);
    let metadata = dsv_remote::team::without_password(metadata);
    if ctx.json {
        return output::json(&json!({
            "path": dir, "config": repo.store().config(), "metadata": metadata,
            "objects": objects.url, "team": true,
        }));
    }
    println!(
        "Initialized a team repository; this machine's folder is {}",
        dir.display()
    );
    println!("metadata: {metadata}");
    println!("packs:    {}", objects.url);
    println!("attach another machine with: dsv connect --metadata {metadata} PATH");
    Ok(())
}

/// `dsv connect`.
pub fn connect(ctx: &Ctx, a: ConnectArgs) -> Result<(), CliError> {
    let base = match a.path {
        Some(p) => p,
        None => std::env::current_dir()?,
    };
    let objects = match a.objects {
        Some(url) => Some(ObjectsAt {
            url: crate::remote_cmds::normalize_url(&url)?,
            endpoint: a.endpoint,
            region: a.region,
        }),
        None => None,
    };
    let dot = base.join(DOT_DSV);
    let repo = dsv_remote::team::connect(
        &base,
        &a.metadata,
        objects,
        &team_options(ctx, &dot, &a.metadata),
    )?;
    let team = dsv_remote::team::team_file(repo.store().dir())?.expect("just written");
    let datasets = repo.datasets()?.len();
    let dir = std::fs::canonicalize(repo.store().dir()).unwrap_or(dot);
    if ctx.json {
        return output::json(&json!({
            "path": dir, "metadata": team.metadata, "objects": team.objects.url,
            "datasets": datasets,
        }));
    }
    println!("Connected {} to the team repository", dir.display());
    println!("metadata: {}", team.metadata);
    println!("packs:    {}", team.objects.url);
    println!("{datasets} dataset(s)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_matches_like_libpq() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:5432:*:dsv:nope\n127.0.0.1:5999:team:dsv:s\\:e\\\\cret\n*:*:*:*:fallback\n",
        )
        .unwrap();
        assert_eq!(
            pgpass_lookup(&f, "postgres://dsv@127.0.0.1:5999/team").as_deref(),
            Some("s:e\\cret")
        );
        assert_eq!(
            pgpass_lookup(&f, "postgres://bob@127.0.0.1:5999/team").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_lookup(&dir.path().join("none"), "postgres://a@b/c"),
            None
        );
    }
}
