//! The repository's config file (`config.json`), fixed at `init`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::schema::REPO_FORMAT;

/// Name of the config file inside the repository directory.
pub const CONFIG_FILE: &str = "config.json";

/// Settings recorded when a repository is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Repository format version.
    pub format_version: u32,
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

    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
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
        if cfg.format_version != REPO_FORMAT {
            return Err(Error::UnsupportedFormatVersion {
                what: path.display().to_string(),
                found: cfg.format_version,
                supported: REPO_FORMAT,
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `dir/config.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(CONFIG_FILE);
        let tmp = dir.join("config.json.tmp");
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
