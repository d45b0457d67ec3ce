//! Finding and opening the repository.

use std::path::{Path, PathBuf};

use dsv_store::{Store, StoreOptions};

use crate::error::CliError;
use crate::Ctx;

/// Name of the repository folder.
pub const DOT_DSV: &str = ".dsv";

/// `--repo`, then `$DSV_REPO`, then the nearest `.dsv` upward.
pub fn locate(ctx: &Ctx) -> Result<PathBuf, CliError> {
    let given = ctx
        .repo
        .clone()
        .or_else(|| std::env::var_os("DSV_REPO").map(PathBuf::from));
    if let Some(p) = given {
        return normalize(&p).ok_or_else(|| {
            CliError::user(format!("no dsv repository at {}", p.display()))
                .hint("run 'dsv init PATH' to create one")
        });
    }
    let cwd = std::env::current_dir()?;
    let mut dir: Option<&Path> = Some(&cwd);
    while let Some(d) = dir {
        if d.join(DOT_DSV).join("config.json").is_file() {
            return Ok(d.join(DOT_DSV));
        }
        dir = d.parent();
    }
    Err(CliError::user(format!(
        "no dsv repository in {} or any parent folder",
        cwd.display()
    ))
    .hint("run 'dsv init' here, or pass --repo PATH / set DSV_REPO"))
}

fn normalize(p: &Path) -> Option<PathBuf> {
    if p.join("config.json").is_file() {
        return Some(p.to_path_buf());
    }
    if p.join(DOT_DSV).join("config.json").is_file() {
        return Some(p.join(DOT_DSV));
    }
    None
}

/// Options naming this process in lock messages.
pub fn options(ctx: &Ctx) -> StoreOptions {
    StoreOptions {
        lock_timeout: ctx.lock_timeout,
        holder: ctx.command.clone(),
        ..StoreOptions::default()
    }
}

/// Opens the repository.
pub fn open(ctx: &Ctx) -> Result<Store, CliError> {
    let dir = locate(ctx)?;
    if dsv_remote::team::is_team(&dir) {
        return crate::team::open(ctx, &dir);
    }
    Ok(Store::open(&dir, options(ctx))?)
}

/// Opens the repository with dataset semantics; chunks it lacks (a lazy
/// clone) are read from its remotes (a team repository's, from its object
/// store).
pub fn open_repo(ctx: &Ctx) -> Result<dsv::Repo, CliError> {
    let repo = dsv::Repo::from_store(open(ctx)?);
    crate::remote_cmds::attach(repo.store())?;
    Ok(repo)
}
