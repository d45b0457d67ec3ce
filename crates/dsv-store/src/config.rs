//! The repository's config file (`config.json`), fixed at `init`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::schema::REPO_FORMAT;

/// Name of the config file inside the repository directory.
pub const CONFIG_FILE: &str = "config.json";

/// Feature `version-salt` (incompat): version objects carry a random salt
/// (object format 2); a reader that does not know it cannot decode them.
pub const FEATURE_VERSION_SALT: &str = "version-salt";
/// Feature `task-indexes` (ro_compat): secondary indexes of tasks (by
/// status, project) and models (by project, tag) in `app`. A build that does
/// not know them can read, but its writes would leave the indexes stale.
pub const FEATURE_TASK_INDEXES: &str = "task-indexes";
/// Feature `leases` (ro_compat): running tasks are held by leases that
/// agents renew. A build that does not know them can read, but would judge
/// liveness by pids and fail or requeue tasks that live agents hold.
pub const FEATURE_LEASES: &str = "leases";
/// Every commit bumps `meta ks/` keyspace counters (the change feed, gc's
/// optimistic plan check): a writer without them would make gc trust a stale
/// plan.
pub const FEATURE_KEYSPACE_COUNTERS: &str = "keyspace-counters";
/// `ro_compat`: remotes (`app` keys `rm/`, `rx/`, `rp/`, `rt/`, the
/// `version_rebased` event kind, `.dsv/remote-cache/`); set by `init` and
/// by the first `remote add` (or `clone`).
pub const FEATURE_REMOTES: &str = "remotes";
/// `ro_compat`: the index of each dataset's versions in finalize order
/// (`app` keys `dq/`, marker `mk/version-order`); set by `init` and by the
/// `dsv upgrade` that builds the index. A build that does not know it would
/// finalize versions the index misses.
pub const FEATURE_VERSION_ORDER: &str = "version-order";
/// `ro_compat`: the index of each dataset's versions by version string
/// (`app` keys `vs/`, marker `mk/version-names`); set by `init` and by the
/// `dsv upgrade` that builds the index. A build that does not know it would
/// finalize versions the index misses (and could reuse their numbers).
pub const FEATURE_VERSION_NAMES: &str = "version-names";

/// Features this build understands, by class (what a repository it creates
/// or upgrades records).
pub const KNOWN_INCOMPAT: &[&str] = &[FEATURE_VERSION_SALT];
/// See [`KNOWN_INCOMPAT`].
pub const KNOWN_RO_COMPAT: &[&str] = &[
    FEATURE_TASK_INDEXES,
    FEATURE_LEASES,
    FEATURE_KEYSPACE_COUNTERS,
    FEATURE_REMOTES,
    FEATURE_VERSION_ORDER,
    FEATURE_VERSION_NAMES,
];
/// See [`KNOWN_INCOMPAT`].
pub const KNOWN_COMPAT: &[&str] = &[];

/// The repository's feature flags (git's `extensions`, ext4's feature
/// sets): a build that finds a feature it does not know in `incompat`
/// refuses to open the repository, in `ro_compat` opens it read-only, in
/// `compat` ignores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Features any build may ignore.
    #[serde(default)]
    pub compat: Vec<String>,
    /// Features a build must know to write (it may read without).
    #[serde(default)]
    pub ro_compat: Vec<String>,
    /// Features a build must know to open the repository at all.
    #[serde(default)]
    pub incompat: Vec<String>,
}

impl Features {
    /// Everything this build knows (what `init` and `upgrade` record).
    pub fn current() -> Self {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Self {
            compat: own(KNOWN_COMPAT),
            ro_compat: own(KNOWN_RO_COMPAT),
            incompat: own(KNOWN_INCOMPAT),
        }
    }
    /// `incompat` features this build does not know.
    pub fn unknown_incompat(&self) -> Vec<String> {
        unknown(&self.incompat, KNOWN_INCOMPAT)
    }
    /// `ro_compat` features this build does not know.
    pub fn unknown_ro_compat(&self) -> Vec<String> {
        unknown(&self.ro_compat, KNOWN_RO_COMPAT)
    }
}

fn unknown(listed: &[String], known: &[&str]) -> Vec<String> {
    listed
        .iter()
        .filter(|f| !known.contains(&f.as_str()))
        .cloned()
        .collect()
}

/// The folder to name in messages: the repository (the parent of `.dsv`).
pub fn repo_display(dir: &Path) -> PathBuf {
    match (dir.file_name(), dir.parent()) {
        (Some(n), Some(p)) if n == ".dsv" && !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// Settings recorded when a repository is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Repository format version.
    pub format_version: u32,
    /// Feature flags (absent in format-1 repositories, required from
    /// format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
    /// Chunk size bounds.
    pub chunking: ChunkerParams,
    /// zstd level for chunks and objects (1..=19).
    pub compression_level: i32,
    /// Packs are closed once they reach this many bytes.
    pub pack_target_size: u64,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            format_version: REPO_FORMAT,
            features: Some(Features::current()),
            chunking: ChunkerParams::default(),
            compression_level: 3,
            pack_target_size: 128 << 20,
        }
    }
}

/// Whether `text` (a `config.json` that does not decode) belongs to something
/// else than a dsv repository: it names no `format_version` and `chunking`,
/// and the folder holds neither dsv's database nor its packs.
fn is_foreign(dir: &Path, text: &str) -> bool {
    let ours = serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("format_version").is_some() && v.get("chunking").is_some());
    !ours && !dir.join(crate::store::DB_DIR).exists() && !dir.join(crate::store::PACKS_DIR).exists()
}

impl RepoConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.chunking.validate().map_err(Error::Invalid)?;
        if !(1..=19).contains(&self.compression_level) {
            return Err(Error::Invalid(format!(
                "compression level {} is outside 1..=19",
                self.compression_level
            )));
        }
        if self.pack_target_size < 1 << 20 {
            return Err(Error::Invalid(
                "pack target size must be at least 1 MiB".into(),
            ));
        }
        Ok(())
    }

    /// Reads and checks `dir/config.json` for opening the repository: a
    /// format other than this build's, or an `incompat` feature it does not
    /// know, is refused. Unknown `ro_compat` features are allowed here (see
    /// [`RepoConfig::read_only_features`]).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = Self::read(dir)?;
        let path = dir.join(CONFIG_FILE);
        if cfg.format_version > REPO_FORMAT {
            return Err(Error::UnsupportedFormatVersion {
                what: path.display().to_string(),
                found: cfg.format_version,
                supported: REPO_FORMAT,
            });
        }
        if cfg.format_version < REPO_FORMAT {
            return Err(Error::NeedsUpgrade {
                repo: repo_display(dir),
                found: cfg.format_version,
                current: REPO_FORMAT,
            });
        }
        cfg.check_features(dir)?;
        Ok(cfg)
    }

    /// Refuses unknown `incompat` features; requires the features section
    /// from format 2 on.
    pub fn check_features(&self, dir: &Path) -> Result<()> {
        let Some(f) = &self.features else {
            return Err(Error::corrupted(
                dir.join(CONFIG_FILE).display().to_string(),
                format!(
                    "format {} without a \"features\" section",
                    self.format_version
                ),
            ));
        };
        let unknown = f.unknown_incompat();
        if !unknown.is_empty() {
            return Err(Error::UnknownFeatures {
                repo: repo_display(dir),
                features: unknown,
            });
        }
        Ok(())
    }

    /// The `ro_compat` features this build does not know: while there are
    /// any, the repository may be read but not written.
    pub fn read_only_features(&self) -> Vec<String> {
        self.features
            .as_ref()
            .map(Features::unknown_ro_compat)
            .unwrap_or_default()
    }

    /// Reads `dir/config.json` and checks its settings, whatever its format
    /// version and features (`upgrade` reads format-1 configs with it).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotARepository(dir.to_path_buf())
            } else {
                Error::io("read", &path, e)
            }
        })?;
        let cfg: RepoConfig = serde_json::from_str(&text).map_err(|e| {
            // Some other tool's `config.json` in a folder without dsv's
            // database and packs is not a damaged repository.
            if is_foreign(dir, &text) {
                Error::NotARepository(dir.to_path_buf())
            } else {
                Error::corrupted(path.display().to_string(), e.to_string())
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `dir/config.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(CONFIG_FILE);
        let tmp = dir.join(format!(
            "config.json.tmp.{}.{}",
            std::process::id(),
            crate::id::random_bytes::<4>()
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        ));
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))?;
        crate::pack::sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_tools_config_is_not_a_repository_but_a_damaged_one_is_corrupted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"name": "my-app"}"#).unwrap();
        assert!(matches!(
            RepoConfig::load(dir.path()),
            Err(Error::NotARepository(_))
        ));
        std::fs::create_dir(dir.path().join(crate::store::PACKS_DIR)).unwrap();
        assert!(matches!(
            RepoConfig::load(dir.path()),
            Err(Error::Corrupted { .. })
        ));
    }
}
