//! `dsv upgrade`: a repository of an older format (1) to this build's (2).
//!
//! The engine's [`dsv_store::Store::upgrade`] writes one database batch (the
//! porcelain's backfill below, plus the format marker), then rewrites
//! `config.json`; it is resumable after a crash between the two (see
//! `docs/FORMAT.md`, "Upgrading"). The upgrade is explicit rather than done
//! on open: it is a one-way change (format-1 builds can no longer open the
//! repository), it needs write access, and a read-only user must get a
//! clear message rather than a half-upgraded repository.

use std::path::Path;

use dsv_store::{Batch, KvRead, Store, StoreOptions, UpgradeReport};

use crate::repo::Repo;

/// The keys of the task indexes (by status, project) and model indexes
/// (by project, tag) for the records a format-1 repository holds, computed
/// from `kv` as format 1 left it ([`crate::index::backfill_indexes`]). It
/// only reads `kv` and returns the puts: the upgrade commits them
/// atomically with the format marker.
pub fn backfill_indexes(kv: &dyn KvRead) -> dsv_store::Result<Batch> {
    crate::index::backfill_indexes(kv).map_err(|e| match e {
        crate::Error::Store(e) => e,
        other => dsv_store::Error::corrupted("task and model records", other.to_string()),
    })
}

/// Everything the porcelain adds to the upgrade's database batch.
fn backfill(kv: &dyn KvRead) -> dsv_store::Result<Batch> {
    backfill_indexes(kv)
}

impl Repo {
    /// Upgrades the repository in `dir` (the `.dsv` folder) to this build's
    /// format, or leaves it as it is when it is current, and opens it.
    pub fn upgrade(dir: &Path, opts: StoreOptions) -> crate::Result<(Repo, UpgradeReport)> {
        let (store, report) = Store::upgrade(dir, opts, &mut backfill)?;
        let repo = Repo::from_store(store);
        // The index of versions in finalize order (added within format 2):
        // built once, by the first upgrade that finds it missing.
        repo.index_version_order()?;
        Ok((repo, report))
    }
}
