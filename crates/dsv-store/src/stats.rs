//! Repository statistics.

use crate::error::Result;
use crate::id::ChunkId;
use crate::kv::Cf;
use crate::schema::ChunkLoc;
use crate::store::Store;

/// Sizes and counts (`dsv stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Objects (files, trees, versions).
    pub objects: u64,
    /// Unique chunks.
    pub chunks: u64,
    /// Live versions.
    pub versions: u64,
    /// Sum of every live version's size: what storing each one whole would take.
    pub logical_bytes: u64,
    /// Bytes of the unique chunks before compression.
    pub unique_bytes: u64,
    /// Bytes of chunk data as stored, after dedup and compression.
    pub stored_bytes: u64,
    /// Bytes of pack files on disk (stored bytes plus record headers and garbage).
    pub pack_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Unindexed pack files no live writer holds: leftovers of killed
    /// processes, which the next `gc` deletes.
    pub orphan_packs: u64,
    /// Their bytes (included in `pack_bytes`).
    pub orphan_bytes: u64,
    /// Deduplication alone: `logical_bytes / unique_bytes` (what the live
    /// versions would take whole, over their unique chunks before
    /// compression); 0 when nothing is stored.
    pub dedup_ratio: f64,
    /// Compression alone: `unique_bytes / stored_bytes`; 0 when nothing is
    /// stored. Both together: `logical_bytes / stored_bytes`.
    pub compression_ratio: f64,
}

impl Store {
    /// Counts everything (reads metadata only).
    pub fn stats(&self) -> Result<Stats> {
        // Probed before the index is read (see `gc::unlocked_packs`).
        let unlocked = crate::gc::unlocked_packs(&self.packs_dir())?;
        if !unlocked.is_empty() {
            self.refresh()?;
        }
        let kv = self.reader();
        let mut s = Stats::default();
        kv.scan(Cf::Objects, b"", &mut |_, _| {
            s.objects += 1;
            Ok(true)
        })?;
        let mut indexed = std::collections::HashSet::new();
        kv.scan(Cf::Chunks, b"", &mut |k, v| {
            if let Some(id) = ChunkId::from_slice(k) {
                let loc = ChunkLoc::decode(v, &id)?;
                indexed.insert(loc.pack);
                s.chunks += 1;
                s.unique_bytes += loc.raw_len as u64;
                s.stored_bytes += loc.stored_len as u64;
            }
            Ok(true)
        })?;
        for (v, _) in self.list_versions()? {
            s.versions += 1;
            s.logical_bytes += self.version(&v)?.object.total_bytes;
        }
        for (pack, _, len) in crate::gc::pack_files(&self.packs_dir())? {
            s.packs += 1;
            s.pack_bytes += len;
            if !indexed.contains(&pack) && unlocked.contains(&pack) {
                s.orphan_packs += 1;
                s.orphan_bytes += len;
            }
        }
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        s.dedup_ratio = ratio(s.logical_bytes, s.unique_bytes);
        s.compression_ratio = ratio(s.unique_bytes, s.stored_bytes);
        Ok(s)
    }
}
