//! The byte-bounded local cache of chunks read from a remote.
//!
//! A lazy clone reads chunks it has not downloaded from its remote; each
//! one fetched is kept here (`.dsv/remote-cache/XX/HEX`: `codec u8 |
//! raw_len u32 LE | stored bytes`, written to a temporary file and renamed)
//! so that the next read of it is local. When the cache grows past its
//! budget the least recently used files go until it is at 80 % of it.
//! Every chunk read from the cache is checked against its id by the store,
//! so a damaged cache file is never served (it is removed and fetched
//! again). Failing to write the cache (a read-only repository, a full disk)
//! only costs the next read a download.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dsv_store::storage::FetchedChunk;
use dsv_store::ChunkId;

/// Default budget: 2 GiB.
pub const DEFAULT_BUDGET: u64 = 2 << 30;

/// The chunk cache.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    budget: u64,
    used: AtomicU64,
    scanned: Mutex<bool>,
}

impl ChunkCache {
    /// A cache in `dir` holding at most about `budget` bytes.
    pub fn new(dir: impl Into<PathBuf>, budget: u64) -> Self {
        Self {
            dir: dir.into(),
            budget,
            used: AtomicU64::new(0),
            scanned: Mutex::new(false),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.dir.join(&h[..2]).join(&h)
    }

    /// A cached chunk, if there is one (its hash is checked by the caller).
    pub fn get(&self, id: &ChunkId) -> Option<FetchedChunk> {
        let p = self.path(id);
        let v = std::fs::read(&p).ok()?;
        if v.len() < 5 || v[0] > 1 {
            let _ = std::fs::remove_file(&p);
            return None;
        }
        // Mark it recently used.
        if let Ok(f) = std::fs::File::options().write(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(FetchedChunk {
            codec: v[0],
            raw_len: u32::from_le_bytes(v[1..5].try_into().expect("4 bytes")),
            stored: v[5..].to_vec(),
        })
    }

    /// Drops a cached chunk (found damaged).
    pub fn remove(&self, id: &ChunkId) {
        let _ = std::fs::remove_file(self.path(id));
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Keeps a chunk (best effort); whether it was kept.
    pub fn put(&self, id: &ChunkId, c: &FetchedChunk) -> bool {
        if self.budget == 0 {
            return false;
        }
        let p = self.path(id);
        let Some(dir) = p.parent() else { return false };
        if std::fs::create_dir_all(dir).is_err() {
            return false;
        }
        let tmp = dir.join(format!(".{}.{}", id.to_hex(), std::process::id()));
        let mut v = Vec::with_capacity(5 + c.stored.len());
        v.push(c.codec);
        v.extend_from_slice(&c.raw_len.to_le_bytes());
        v.extend_from_slice(&c.stored);
        if std::fs::write(&tmp, &v).is_err() || std::fs::rename(&tmp, &p).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return false;
        }
        self.ensure_scanned();
        let used = self.used.fetch_add(v.len() as u64, Ordering::Relaxed) + v.len() as u64;
        if used > self.budget {
            self.evict();
        }
        true
    }

    fn ensure_scanned(&self) {
        let mut s = self.scanned.lock().unwrap_or_else(|e| e.into_inner());
        if !*s {
            let total: u64 = self.files().iter().map(|(_, len, _)| len).sum();
            self.used.store(total, Ordering::Relaxed);
            *s = true;
        }
    }

    fn files(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for sub in rd.flatten() {
            let Ok(inner) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in inner.flatten() {
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        out.push((f.path(), m.len(), t));
                    }
                }
            }
        }
        out
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.files().iter().map(|(_, l, _)| l).sum()
    }

    /// Removes the least recently used files down to 80 % of the budget.
    pub fn evict(&self) {
        let mut files = self.files();
        files.sort_by_key(|(_, _, t)| *t);
        let mut total: u64 = files.iter().map(|(_, l, _)| l).sum();
        let goal = self.budget / 5 * 4;
        for (p, len, _) in files {
            if total <= goal {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
        self.used.store(total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_oldest_out() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(d.path(), 10_000);
        let ids: Vec<ChunkId> = (0..30u8).map(|i| ChunkId([i; 32])).collect();
        for id in &ids {
            c.put(
                id,
                &FetchedChunk {
                    codec: 0,
                    raw_len: 1000,
                    stored: vec![1; 1000],
                },
            );
        }
        assert!(c.used() <= 10_000, "{}", c.used());
        assert!(c.get(ids.last().unwrap()).is_some());
        assert!(c.get(&ids[0]).is_none());
    }
}
