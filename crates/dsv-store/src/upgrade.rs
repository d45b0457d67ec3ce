//! Upgrading a repository of an older format to this build's
//! ([`Store::upgrade`]).
//!
//! Format 1 → 2 in two steps:
//!
//! 1. one transaction of the metadata backend: the caller's backfill (new
//!    keys, indexes) and the `meta/format` marker set to 2 — all or
//!    nothing; the marker is read inside it, so of two concurrent upgrades
//!    one backfills and the other finds the step done;
//! 2. then `config.json` rewritten with `format_version` 2 and the feature
//!    flags (a per-process temp file, fsync, rename, fsync of the folder;
//!    two upgraders write the same contents).
//!
//! Older dsv processes still running from before the upgrade (an agent, a
//! watch) do not re-read the format before each write: stop them first
//! (`dsv upgrade` says so).
//!
//! `config.json` is authoritative: the repository is format 2 once it says
//! so, and every build reads it first. A crash between the two steps leaves
//! `config.json` at 1 over a format-2 database: this build refuses it with
//! "run `dsv upgrade`", a format-1 build refuses the database marker, and
//! the next `upgrade` sees the marker at 2, skips step 1 (the backfill is
//! not run twice) and does step 2.

use std::path::Path;

use crate::config::{Features, RepoConfig};
use crate::error::{Error, Result};
use crate::kv::{Backend, Batch, Cf, KvRead};
use crate::schema;
use crate::store::{Store, StoreOptions};

/// What [`Store::upgrade`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeReport {
    /// The repository's format before (as `config.json` said).
    pub from: u32,
    /// Its format now.
    pub to: u32,
    /// Whether the database batch (backfill and format marker) was written
    /// by this run (false when nothing was to do, or when an interrupted
    /// earlier run had written it).
    pub database_upgraded: bool,
    /// Whether `config.json` was rewritten by this run.
    pub config_rewritten: bool,
}

impl UpgradeReport {
    /// Whether the repository was already current.
    pub fn was_current(&self) -> bool {
        !self.database_upgraded && !self.config_rewritten
    }
}

/// What the caller adds to the upgrade's database batch: reads the
/// repository as the old format left it and returns the new keys.
pub type Backfill<'a> = &'a mut dyn FnMut(&dyn KvRead) -> Result<Batch>;

fn meta_format(kv: &dyn KvRead) -> Result<Option<u32>> {
    kv.get(Cf::Meta, schema::META_FORMAT)?
        .map(|v| {
            <[u8; 4]>::try_from(v.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| Error::corrupted("meta format", "bad length"))
        })
        .transpose()
}

impl Store {
    /// Upgrades the repository in `dir` (the `.dsv` folder, RocksDB) to this
    /// build's format and opens it. See [`Store::upgrade_with_backend`].
    #[cfg(feature = "rocksdb")]
    pub fn upgrade(
        dir: &Path,
        opts: StoreOptions,
        backfill: Backfill<'_>,
    ) -> Result<(Store, UpgradeReport)> {
        if !dir.join(crate::config::CONFIG_FILE).exists() {
            return Err(Error::NotARepository(dir.to_path_buf()));
        }
        let backend = Box::new(Self::rocks_backend(dir, &opts));
        Self::upgrade_with_backend(dir, backend, opts, backfill)
    }

    /// Upgrades a repository of an older format (1) to this build's (2):
    /// one database batch with `backfill`'s keys and the new format marker,
    /// then `config.json` with the new format and feature flags; resumable
    /// after a crash between the two (see the module documentation). A
    /// current repository is left as it is (`backfill` is not called). A
    /// newer one, or one with unknown `incompat` features, is refused.
    pub fn upgrade_with_backend(
        dir: &Path,
        backend: Box<dyn Backend>,
        opts: StoreOptions,
        backfill: Backfill<'_>,
    ) -> Result<(Store, UpgradeReport)> {
        let cfg = RepoConfig::read(dir)?;
        let from = cfg.format_version;
        let current = schema::REPO_FORMAT;
        if from > current {
            return Err(Error::UnsupportedFormatVersion {
                what: dir.join(crate::config::CONFIG_FILE).display().to_string(),
                found: from,
                supported: current,
            });
        }
        if from == current {
            // Unknown incompat features: refused before anything is touched.
            cfg.check_features(dir)?;
        }
        let mut report = UpgradeReport {
            from,
            to: current,
            database_upgraded: false,
            config_rewritten: false,
        };
        let database = meta_format(&*backend.open_read()?)?;
        if from == current && database == Some(current) {
            // Current: nothing to do, and no write access needed.
            let store = Self::open_with_backend(dir, backend, opts)?;
            return Ok((store, report));
        }
        // Step 1, one transaction of the metadata backend: the marker is
        // read inside it, so of two concurrent upgrades one backfills and
        // the other finds step 1 done.
        let mut did_db = false;
        backend.transact(&mut |kv| {
            did_db = false;
            match meta_format(kv)? {
                Some(f) if f > current => Err(Error::UnsupportedFormatVersion {
                    what: "database".into(),
                    found: f,
                    supported: current,
                }),
                // Step 1 done (by an interrupted earlier run, or another
                // upgrade just now).
                Some(f) if f == current => Ok(Batch::default()),
                Some(_) => {
                    let mut b = backfill(kv)?;
                    b.put(
                        Cf::Meta,
                        schema::META_FORMAT,
                        current.to_le_bytes().to_vec(),
                    );
                    did_db = true;
                    Ok(b)
                }
                None => Err(Error::corrupted(
                    dir.join(crate::store::DB_DIR).display().to_string(),
                    "no format marker",
                )),
            }
        })?;
        report.database_upgraded = did_db;
        // Step 2, after the database is at the new format (idempotent: two
        // upgraders write the same file, each through its own temp file).
        let cfg = RepoConfig::read(dir)?;
        if cfg.format_version < current {
            RepoConfig {
                format_version: current,
                features: Some(Features::current()),
                ..cfg
            }
            .save(dir)?;
            report.config_rewritten = true;
        }
        let store = Self::open_with_backend(dir, backend, opts)?;
        Ok((store, report))
    }
}
