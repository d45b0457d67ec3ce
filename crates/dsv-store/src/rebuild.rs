//! `fsck --rebuild-index`: the chunk index rebuilt from the pack files.
//!
//! Every record of every pack is read, decoded and hashed; a record whose
//! bytes hash to its id is a good copy of that chunk. The index gains each
//! good chunk it lacks (an entry lost with a damaged database, or taken out
//! of service by `fsck --repair` while an intact copy sat in another pack),
//! and an entry pointing into a pack that is gone or too short is pointed
//! at a good copy. Entries that point at existing records are left alone
//! (`fsck --read-data` judges their bytes). A pack a writer still holds
//! (its `flock`) is skipped: its writer indexes it. Each pack is indexed
//! in its own transaction while this holds the pack's lock (a `gc` deletes
//! an unindexed pack only under its lock), and only if no `gc` committed
//! since the pack was read (`gc_generation`); otherwise it is judged again
//! against the index as the gc left it.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::gc::pack_files;
use crate::id::ChunkId;
use crate::kv::{Batch, Cf};
use crate::pack::{parse_pack, RECORD_HEADER_LEN};
use crate::schema::{self, ChunkLoc};
use crate::store::{Progress, Store};

/// What a rebuild found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    /// Packs read.
    pub packs: usize,
    /// Records in them.
    pub records: u64,
    /// Records whose bytes do not hash to their id (not indexed).
    pub damaged_records: u64,
    /// Index entries added for chunks the index lacked.
    pub added: u64,
    /// Of those, chunks `fsck --repair` had taken out of service that are
    /// back in service from an intact copy.
    pub restored: u64,
    /// Entries that pointed into a missing or short pack, now pointing at
    /// a good copy.
    pub repointed: u64,
    /// Packs a writer holds (skipped: their writer indexes them).
    pub busy_packs: usize,
    /// Packs that could not be parsed to the end, with the reason (the
    /// records before the damage are used).
    pub unreadable: Vec<String>,
}

impl Store {
    /// Rebuilds the chunk index from the pack files (see the module
    /// documentation).
    pub fn rebuild_chunk_index(&self, progress: &dyn Progress) -> Result<RebuildReport> {
        if let Some(storage) = self.pack_storage() {
            return self.rebuild_shared_index(&*storage, progress);
        }
        let dir = self.packs_dir();
        let mut files = pack_files(&dir)?;
        files.sort_unstable_by_key(|(id, _, _)| *id);
        let sizes: HashMap<u64, u64> = files.iter().map(|(id, _, len)| (*id, *len)).collect();
        let local_len = |pack: u64| -> Option<u64> {
            sizes.get(&pack).copied().or_else(|| {
                // A pack made after the listing (a writer's, a repack).
                std::fs::metadata(crate::pack::pack_path(&dir, pack))
                    .ok()
                    .map(|m| m.len())
            })
        };
        let mut report = RebuildReport::default();
        progress.start(
            "rebuilding the chunk index",
            files.iter().map(|f| f.2).sum(),
        );
        for (pack, path, len) in &files {
            // The pack's lock: held by a writer until its commit (skip), and
            // by us until ours (a gc deletes only packs it can lock).
            let lock = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", path, e)),
            };
            if !matches!(fs4::fs_std::FileExt::try_lock_exclusive(&lock), Ok(true)) {
                report.busy_packs += 1;
                progress.advance(*len);
                continue;
            }
            // A gc that commits after this read may have moved or dropped
            // what the pack holds: then the write below is not applied and
            // the pack is judged again.
            let generation = Store::gc_generation(&*self.reader())?;
            let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
            let what = path.to_string_lossy().into_owned();
            self.index_pack(
                *pack,
                &bytes,
                &what,
                generation,
                &local_len,
                // Still there after that gc? Then index it against the
                // index as it is now.
                &|| Ok(path.exists()),
                &mut report,
            )?;
            drop(lock);
            progress.advance(*len);
        }
        progress.finish();
        self.pack_reader().reset();
        Ok(report)
    }

    /// Judges one pack's bytes (read while the gc generation was
    /// `generation`) and indexes its good records in a transaction that
    /// goes in only if no gc committed since; after a gc, a pack that is
    /// `still_there` is judged again against the index the gc left.
    #[allow(clippy::too_many_arguments)]
    fn index_pack(
        &self,
        pack: u64,
        bytes: &[u8],
        what: &str,
        generation: u64,
        pack_len: &dyn Fn(u64) -> Option<u64>,
        still_there: &dyn Fn() -> Result<bool>,
        report: &mut RebuildReport,
    ) -> Result<()> {
        let records = match parse_pack(bytes, what) {
            Ok(r) => r,
            Err(e) => {
                report.unreadable.push(format!("{what}: {e}"));
                parse_prefix(bytes, what)
            }
        };
        report.packs += 1;
        report.records += records.len() as u64;
        let good = good_records(pack, &records);
        report.damaged_records += (records.len() - good.len()) as u64;
        let mut pending = Some(generation);
        let mut outcome = (0u64, 0u64, 0u64);
        for _ in 0..8 {
            let Some(generation) = pending.take() else {
                break;
            };
            let done = self.write(|kv| {
                let now = Store::gc_generation(kv)?;
                if now != generation {
                    return Ok((Batch::default(), Err(now)));
                }
                self.index_good(kv, &good, pack_len)
                    .map(|(b, r)| (b, Ok(r)))
            })?;
            match done {
                Ok(r) => outcome = r,
                Err(now) if still_there()? => pending = Some(now),
                Err(_) => {}
            }
        }
        let (added, restored, repointed) = outcome;
        report.added += added;
        report.restored += restored;
        report.repointed += repointed;
        Ok(())
    }

    /// The batch indexing `good` records against the index in `kv`.
    fn index_good(
        &self,
        kv: &dyn crate::kv::KvRead,
        good: &[(ChunkId, ChunkLoc)],
        pack_len: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(Batch, (u64, u64, u64))> {
        let mut b = Batch::default();
        let (mut added, mut restored, mut repointed) = (0u64, 0u64, 0u64);
        let mut seen: std::collections::HashSet<ChunkId> = Default::default();
        for (id, loc) in good {
            if !seen.insert(*id) {
                continue;
            }
            match kv.get(Cf::Chunks, id.as_bytes())? {
                None => {
                    b.put(Cf::Chunks, id.as_bytes().to_vec(), loc.encode());
                    added += 1;
                    let dk = schema::damaged_key(id);
                    if kv.get(Cf::Meta, &dk)?.is_some() {
                        b.delete(Cf::Meta, dk);
                        restored += 1;
                    }
                }
                Some(v) => {
                    let ok = ChunkLoc::decode(&v, id).is_ok_and(|cur| {
                        let end = cur
                            .offset
                            .checked_add(RECORD_HEADER_LEN + cur.stored_len as u64);
                        matches!((end, pack_len(cur.pack)), (Some(e), Some(l)) if e <= l)
                    });
                    if !ok {
                        b.put(Cf::Chunks, id.as_bytes().to_vec(), loc.encode());
                        repointed += 1;
                    }
                }
            }
        }
        Ok((b, (added, restored, repointed)))
    }
}

impl Store {
    /// [`Store::rebuild_chunk_index`] of a team repository: every pack on
    /// the shared object store (this machine's copy when it has one of the
    /// same length, else downloaded), judged against the shared index; a
    /// pack's length is the store's. It holds the repository's maintenance
    /// lease, so no gc deletes a pack while it is being indexed.
    fn rebuild_shared_index(
        &self,
        storage: &dyn crate::storage::PackStorage,
        progress: &dyn Progress,
    ) -> Result<RebuildReport> {
        let lease = self.take_maintenance("fsck --rebuild-index")?;
        let mut listed: Vec<(u64, String, u64)> = storage
            .list("packs/")?
            .into_iter()
            .filter_map(|l| {
                let id = l
                    .name
                    .strip_prefix("packs/")
                    .and_then(crate::pack::parse_pack_name)?;
                Some((id, l.name, l.size))
            })
            .collect();
        listed.sort_unstable();
        let sizes: HashMap<u64, u64> = listed.iter().map(|(id, _, len)| (*id, *len)).collect();
        let shared_len = |pack: u64| -> Option<u64> {
            match sizes.get(&pack) {
                Some(l) => Some(*l),
                // Published after the listing (a writer's, a repack).
                None => storage
                    .size(&crate::store::shared_pack_name(pack))
                    .ok()
                    .flatten(),
            }
        };
        let mut report = RebuildReport::default();
        progress.start(
            "rebuilding the chunk index",
            listed.iter().map(|l| l.2).sum(),
        );
        let dir = self.packs_dir();
        for (pack, name, len) in &listed {
            lease.keep()?;
            let generation = Store::gc_generation(&*self.reader())?;
            let local = crate::pack::pack_path(&dir, *pack);
            let bytes = match std::fs::metadata(&local) {
                Ok(m) if m.len() == *len => {
                    std::fs::read(&local).map_err(|e| Error::io("read", &local, e))?
                }
                _ => match storage.get(name)? {
                    Some(got) => got.data,
                    // Deleted since the listing (a gc).
                    None => {
                        progress.advance(*len);
                        continue;
                    }
                },
            };
            let what = format!("{}/{name}", storage.location());
            self.index_pack(
                *pack,
                &bytes,
                &what,
                generation,
                &shared_len,
                &|| Ok(storage.size(name)?.is_some()),
                &mut report,
            )?;
            progress.advance(*len);
        }
        progress.finish();
        self.pack_reader().reset();
        Ok(report)
    }
}

/// The records of `pack` whose bytes hash to their ids, as index entries.
fn good_records(pack: u64, records: &[crate::pack::Record<'_>]) -> Vec<(ChunkId, ChunkLoc)> {
    records
        .par_iter()
        .filter_map(|r| {
            crate::compress::decode_chunk(&r.id, r.codec, r.data, r.raw_len)
                .ok()
                .map(|_| {
                    (
                        r.id,
                        ChunkLoc {
                            pack,
                            offset: r.offset,
                            stored_len: r.data.len() as u32,
                            raw_len: r.raw_len,
                            codec: r.codec,
                        },
                    )
                })
        })
        .collect()
}

/// The records of a pack before the first damaged header.
fn parse_prefix<'a>(bytes: &'a [u8], what: &str) -> Vec<crate::pack::Record<'a>> {
    // Cut the image at successively earlier record boundaries until it
    // parses: walk the headers by hand, stopping at the first bad one.
    if bytes.len() < crate::pack::PACK_HEADER_LEN as usize {
        return Vec::new();
    }
    let mut end = crate::pack::PACK_HEADER_LEN as usize;
    let mut last_good = end;
    while end + RECORD_HEADER_LEN as usize <= bytes.len() {
        let stored = u32::from_le_bytes(bytes[end + 5..end + 9].try_into().expect("4")) as usize;
        let next = end + RECORD_HEADER_LEN as usize + stored;
        if next > bytes.len() || bytes[end] > 1 {
            break;
        }
        end = next;
        last_good = end;
    }
    parse_pack(&bytes[..last_good], what).unwrap_or_default()
}

/// What [`Store::evict_packs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvictReport {
    /// Local packs deleted.
    pub packs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Chunk index entries dropped (the chunks are read from the remote).
    pub chunks: u64,
}

impl Store {
    /// Deletes the local packs whose every indexed chunk `elsewhere` says
    /// is stored elsewhere (a repository whose packs live on object
    /// storage: once pushed, its local packs are only a staging copy). In
    /// one write their index entries go (reads then go to the chunk
    /// source; `elsewhere` must only say yes for chunks the source keeps
    /// alive); then the files go, each under its `flock` (a pack a writer
    /// holds is kept).
    pub fn evict_packs(
        &self,
        elsewhere: &(dyn Fn(&dyn crate::kv::KvRead, &ChunkId) -> Result<bool> + Sync),
    ) -> Result<EvictReport> {
        let dir = self.packs_dir();
        let mut files = pack_files(&dir)?;
        files.sort_unstable_by_key(|(id, _, _)| *id);
        // Lock the candidates first: no writer can be indexing them.
        let mut locked: HashMap<u64, (std::fs::File, std::path::PathBuf, u64)> = HashMap::new();
        for (pack, path, len) in files {
            if let Ok(f) = std::fs::File::open(&path) {
                if matches!(fs4::fs_std::FileExt::try_lock_exclusive(&f), Ok(true)) {
                    locked.insert(pack, (f, path, len));
                }
            }
        }
        if locked.is_empty() {
            return Ok(EvictReport::default());
        }
        let (gone, chunks) = self.write(|kv| {
            let mut per_pack: HashMap<u64, (bool, Vec<ChunkId>)> = HashMap::new();
            kv.scan(Cf::Chunks, b"", &mut |k, v| {
                let Some(id) = ChunkId::from_slice(k) else {
                    return Ok(true);
                };
                let loc = ChunkLoc::decode(v, &id)?;
                if locked.contains_key(&loc.pack) {
                    let e = per_pack.entry(loc.pack).or_insert((true, Vec::new()));
                    if e.0 {
                        if elsewhere(kv, &id)? {
                            e.1.push(id);
                        } else {
                            e.0 = false;
                            e.1.clear();
                        }
                    }
                }
                Ok(true)
            })?;
            let mut b = Batch::default();
            let mut gone = Vec::new();
            let mut n = 0u64;
            for (pack, (all, ids)) in per_pack {
                if !all {
                    continue;
                }
                for id in &ids {
                    b.delete(Cf::Chunks, id.as_bytes().to_vec());
                }
                n += ids.len() as u64;
                gone.push(pack);
            }
            // No gc generation bump: a writer that deduplicated against
            // an evicted chunk still references something readable (the
            // chunk source holds it, and keeps it alive).
            Ok((b, (gone, n)))
        })?;
        let mut report = EvictReport {
            chunks,
            ..Default::default()
        };
        for pack in gone {
            if let Some((_f, path, len)) = locked.get(&pack) {
                match std::fs::remove_file(path) {
                    Ok(()) => {
                        report.packs += 1;
                        report.bytes += len;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("delete", path, e)),
                }
            }
        }
        drop(locked);
        self.pack_reader().reset();
        Ok(report)
    }
}
