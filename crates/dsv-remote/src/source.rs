//! Lazy reads: the chunk source a clone's store asks for chunks it has not
//! downloaded.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use dsv_store::storage::{ChunkSource, FetchedChunk, PackStorage};
use dsv_store::{Cf, ChunkId, KvRead};

use crate::cache::ChunkCache;
use crate::keys::{self, RemoteLoc, RemoteRecord};
use crate::open::{open_storage, Connect};

/// A remote's storage, opened on first use (the error as text).
type Lazy = OnceLock<std::result::Result<Arc<dyn PackStorage>, String>>;

/// Reads missing chunks from the repository's remotes (through the cache).
pub struct RemoteSource {
    remotes: Vec<(String, RemoteRecord, Lazy)>,
    connect: Connect,
    cache: ChunkCache,
    /// Cleared when the cache cannot be written (a read-only repository):
    /// prefetching would then download every chunk twice.
    cache_writable: std::sync::atomic::AtomicBool,
}

/// Chunks per prefetch request batch.
const PREFETCH_BATCH: usize = 256;

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field(
                "remotes",
                &self.remotes.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RemoteSource {
    fn storage(&self, i: usize) -> dsv_store::Result<Arc<dyn PackStorage>> {
        let (name, rec, cell) = &self.remotes[i];
        cell.get_or_init(|| open_storage(rec, &self.connect).map_err(|e| e.to_string()))
            .clone()
            .map_err(|reason| dsv_store::Error::Storage {
                what: format!("remote {name} ({})", rec.url),
                reason,
            })
    }
}

/// Fetches records from one remote: `(id, loc)` pairs → stored bytes
/// checked against the pack index entry (the caller checks the hash).
pub fn fetch_records(
    storage: &dyn PackStorage,
    wanted: &[([u8; 32], RemoteLoc)],
    on_bytes: dsv_store::storage::OnBytes<'_>,
) -> dsv_store::Result<Vec<FetchedChunk>> {
    let reqs: Vec<(String, std::ops::Range<u64>)> = wanted
        .iter()
        .map(|(_, l)| (l.pack_name(), l.range()))
        .collect();
    let got = storage.get_ranges(&reqs, on_bytes)?;
    wanted
        .iter()
        .zip(got)
        .map(|((id, l), rec)| {
            let what = format!("{}/{}", storage.location(), l.pack_name());
            let data = dsv_store::bundle::record_data(rec, &l.entry(*id), &what)?;
            Ok(FetchedChunk {
                codec: l.codec,
                raw_len: l.raw_len,
                stored: data,
            })
        })
        .collect()
}

impl ChunkSource for RemoteSource {
    fn forget(&self, id: &ChunkId) {
        self.cache.remove(id);
    }

    fn prefetch(&self, kv: &dyn KvRead, ids: &[ChunkId]) -> dsv_store::Result<()> {
        // Batches of bounded memory, and no more than half the cache (what
        // is fetched must still be there when it is read).
        let mut fetched = 0u64;
        for batch in ids.chunks(PREFETCH_BATCH) {
            if !self
                .cache_writable
                .load(std::sync::atomic::Ordering::Relaxed)
                || fetched > self.cache.budget() / 2
            {
                break;
            }
            for c in self.fetch(kv, batch)?.into_iter().flatten() {
                fetched += c.stored.len() as u64;
            }
        }
        Ok(())
    }

    fn has(&self, kv: &dyn KvRead, id: &ChunkId) -> dsv_store::Result<bool> {
        for (name, _, _) in &self.remotes {
            if kv.contains(Cf::App, &keys::index_entry(name, id.as_bytes()))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn fetch(
        &self,
        kv: &dyn KvRead,
        ids: &[ChunkId],
    ) -> dsv_store::Result<Vec<Option<FetchedChunk>>> {
        let mut out: Vec<Option<FetchedChunk>> = vec![None; ids.len()];
        let mut todo: Vec<usize> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            // Kept copies are checked by the store when it uses them (and
            // forgotten if damaged): not decoded twice on every read.
            match self.cache.get(id) {
                Some(c) => out[i] = Some(c),
                None => todo.push(i),
            }
        }
        for r in 0..self.remotes.len() {
            if todo.is_empty() {
                break;
            }
            let name = &self.remotes[r].0;
            let mut wanted: Vec<(usize, [u8; 32], RemoteLoc)> = Vec::new();
            let mut rest = Vec::new();
            for &i in &todo {
                match kv.get(Cf::App, &keys::index_entry(name, ids[i].as_bytes()))? {
                    Some(v) => {
                        let loc = RemoteLoc::decode(&v).map_err(|e| {
                            dsv_store::Error::corrupted(
                                format!("remote index of {}", ids[i]),
                                e.to_string(),
                            )
                        })?;
                        wanted.push((i, *ids[i].as_bytes(), loc));
                    }
                    None => rest.push(i),
                }
            }
            if wanted.is_empty() {
                continue;
            }
            // Pack order, then offset: neighbours coalesce into one request.
            wanted.sort_by_key(|(_, _, l)| (l.pack, l.offset));
            let storage = self.storage(r)?;
            let pairs: Vec<([u8; 32], RemoteLoc)> =
                wanted.iter().map(|(_, id, l)| (*id, *l)).collect();
            let got = fetch_records(&*storage, &pairs, &|_| {})?;
            for ((i, _, _), c) in wanted.iter().zip(got) {
                let id = &ids[*i];
                // Never hand out (or cache) bytes that are not the chunk.
                dsv_store::compress::decode_chunk(id, c.codec, &c.stored, c.raw_len).map_err(
                    |e| dsv_store::Error::Storage {
                        what: format!("{}/{}", storage.location(), wanted_pack(&pairs, id)),
                        reason: format!("chunk {id} is damaged on the remote: {e}"),
                    },
                )?;
                if !self.cache.put(id, &c) {
                    self.cache_writable
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                out[*i] = Some(c);
            }
            todo = rest;
        }
        Ok(out)
    }
}

fn wanted_pack(pairs: &[([u8; 32], RemoteLoc)], id: &ChunkId) -> String {
    pairs
        .iter()
        .find(|(i, _)| i == id.as_bytes())
        .map(|(_, l)| l.pack_name())
        .unwrap_or_default()
}

/// Makes `store` read chunks it lacks from its remotes (in name order;
/// lazy clones' remotes first), keeping them in `cache_dir` up to
/// `cache_budget` bytes. A no-op for a repository without remotes, and for
/// a team repository.
pub fn attach(
    store: &dsv_store::Store,
    connect: &Connect,
    cache_dir: std::path::PathBuf,
    cache_budget: u64,
) -> crate::Result<()> {
    // A team repository reads other machines' packs through its own
    // source ([`crate::team`]), which this must not replace.
    if store.pack_storage().is_some() {
        return Ok(());
    }
    let mut remotes = crate::ops::remotes_of(store)?;
    if remotes.is_empty() {
        return Ok(());
    }
    remotes.sort_by_key(|(n, r)| (!r.lazy, n.clone()));
    let src = RemoteSource {
        remotes: remotes
            .into_iter()
            .map(|(n, r)| (n, r, OnceLock::new()))
            .collect(),
        connect: connect.clone(),
        cache: ChunkCache::new(cache_dir, cache_budget),
        cache_writable: std::sync::atomic::AtomicBool::new(cache_budget > 0),
    };
    store.set_chunk_source(Some(Arc::new(src)));
    Ok(())
}

/// Groups `(id, loc)` by pack (for batched reads).
pub fn by_pack(
    items: Vec<([u8; 32], RemoteLoc)>,
) -> BTreeMap<[u8; 32], Vec<([u8; 32], RemoteLoc)>> {
    let mut m: BTreeMap<[u8; 32], Vec<([u8; 32], RemoteLoc)>> = BTreeMap::new();
    for (id, l) in items {
        m.entry(l.pack).or_default().push((id, l));
    }
    m
}
