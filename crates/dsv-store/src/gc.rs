//! Garbage collection: mark everything reachable from the roots (finalized
//! versions, refs, tags, open drafts, porcelain roots), then sweep objects,
//! chunk index entries and packs. A plan is computed first; `apply` runs
//! under the write lock and recomputes it there, so nothing committed in
//! between is lost.
//!
//! Order of an apply (crash-safe at every step): (1) copy the live chunks of
//! mostly-dead packs into new packs and fsync them; (2) one batch deletes dead
//! objects and index entries, repoints moved chunks, clears the stat cache
//! and bumps the gc generation; (3) delete the old pack files. A crash after
//! (1) or (2) leaves unindexed packs, which the next gc removes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::id::{ChunkId, ObjectId, VersionId};
use crate::kv::{Batch, Cf, KvRead};
use crate::object::{EntryTarget, Object, TreeNode};
use crate::pack::{pack_path, parse_pack_name, PackWriter, RECORD_HEADER_LEN};
use crate::schema::{self, ChunkLoc, DraftRecord};
use crate::store::Store;
use crate::tree::read_object;

/// Options for gc.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Packs whose dead bytes exceed this fraction are rewritten.
    pub repack_threshold: f64,
    /// Unindexed pack files younger than this are left alone (a writer may
    /// be about to commit them; writers also hold a lock on them).
    pub orphan_grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            repack_threshold: 0.2,
            orphan_grace: Duration::from_secs(600),
        }
    }
}

/// What a gc removes (or removed).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Objects kept.
    pub live_objects: u64,
    /// Objects removed.
    pub dead_objects: u64,
    /// Chunks kept.
    pub live_chunks: u64,
    /// Chunks removed.
    pub dead_chunks: u64,
    /// Pack files deleted whole.
    pub packs_deleted: u64,
    /// Pack files rewritten without their dead chunks.
    pub packs_repacked: u64,
    /// Bytes of disk freed (pack files, net of rewritten ones).
    pub bytes_freed: u64,
    /// Whether this was only a plan.
    pub dry_run: bool,
}

struct Plan {
    dead_objects: Vec<ObjectId>,
    dead_chunks: Vec<ChunkId>,
    live_chunks: HashMap<ChunkId, ChunkLoc>,
    delete_packs: Vec<(u64, u64)>,
    repack: Vec<(u64, u64)>,
    live_objects: u64,
}

fn mark(kv: &dyn KvRead) -> Result<(HashSet<ObjectId>, HashSet<ChunkId>)> {
    let mut objects: HashSet<ObjectId> = HashSet::new();
    let mut chunks: HashSet<ChunkId> = HashSet::new();
    let mut stack: Vec<ObjectId> = Vec::new();
    let mut versions: Vec<VersionId> = Vec::new();

    kv.scan(Cf::Roots, b"", &mut |k, v| {
        match k.first() {
            Some(&schema::ROOT_VERSION) => versions.extend(VersionId::from_slice(&k[1..])),
            Some(&schema::ROOT_APP) => {
                for item in v.chunks(33) {
                    if let (Some(&kind), Some(id)) =
                        (item.first(), ObjectId::from_slice(&item[1..]))
                    {
                        if kind == 2 {
                            versions.push(VersionId(id.0));
                        } else {
                            stack.push(id);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    })?;
    kv.scan(Cf::Refs, b"", &mut |_, v| {
        versions.extend(VersionId::from_slice(v));
        Ok(true)
    })?;
    kv.scan(Cf::Tags, &[schema::TAG_BY_VERSION], &mut |k, _| {
        versions.extend(k.get(1..33).and_then(VersionId::from_slice));
        Ok(true)
    })?;
    kv.scan(Cf::Drafts, b"", &mut |k, v| {
        if let Some(id) = crate::id::DraftId::from_slice(k) {
            let d = DraftRecord::decode(v, &id)?;
            match d.finalized {
                Some(_) => {}
                None => {
                    stack.push(d.root);
                    versions.extend(d.parents);
                }
            }
        }
        Ok(true)
    })?;
    for v in versions {
        stack.push(ObjectId(v.0));
    }
    while let Some(id) = stack.pop() {
        if !objects.insert(id) {
            continue;
        }
        let obj = match read_object(kv, &id) {
            Ok(o) => o,
            // A missing object is fsck's business; gc must not delete more because of it.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        match obj {
            Object::File(f) => chunks.extend(f.chunks.iter().map(|c| c.0)),
            Object::Tree(TreeNode::Leaf(entries)) => {
                for e in entries {
                    match e.target {
                        EntryTarget::File(t) | EntryTarget::Dir { id: t, .. } => stack.push(t),
                        EntryTarget::Symlink(_) => {}
                    }
                }
            }
            Object::Tree(TreeNode::Shard(s)) => stack.extend(s.children.iter().map(|c| c.1)),
            Object::Version(v) => stack.push(v.root),
        }
    }
    objects.insert(crate::tree::empty_tree_id());
    Ok((objects, chunks))
}

fn plan(store: &Store, kv: &dyn KvRead, opts: &GcOptions) -> Result<Plan> {
    let (live_obj, live_chunk_ids) = mark(kv)?;
    let mut dead_objects = Vec::new();
    let mut live_objects = 0;
    kv.scan(Cf::Objects, b"", &mut |k, _| {
        match ObjectId::from_slice(k) {
            Some(id) if live_obj.contains(&id) => live_objects += 1,
            Some(id) => dead_objects.push(id),
            None => {}
        }
        Ok(true)
    })?;
    let mut dead_chunks = Vec::new();
    let mut live_chunks = HashMap::new();
    // (live bytes, dead bytes) per pack
    let mut usage: HashMap<u64, (u64, u64)> = HashMap::new();
    kv.scan(Cf::Chunks, b"", &mut |k, v| {
        let Some(id) = ChunkId::from_slice(k) else {
            return Ok(true);
        };
        let loc = ChunkLoc::decode(v, &id)?;
        let size = loc.stored_len as u64 + RECORD_HEADER_LEN;
        let u = usage.entry(loc.pack).or_default();
        if live_chunk_ids.contains(&id) {
            u.0 += size;
            live_chunks.insert(id, loc);
        } else {
            u.1 += size;
            dead_chunks.push(id);
        }
        Ok(true)
    })?;
    let mut delete_packs = Vec::new();
    let mut repack = Vec::new();
    let dir = store.packs_dir();
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("list", &dir, e))?;
        let name = ent.file_name();
        let Some(pack) = name.to_str().and_then(parse_pack_name) else {
            continue;
        };
        let meta = ent
            .metadata()
            .map_err(|e| Error::io("stat", ent.path(), e))?;
        let file_len = meta.len();
        match usage.get(&pack) {
            None | Some((0, _)) => {
                // Nothing live. Unindexed packs may belong to a writer about to commit.
                if usage.contains_key(&pack) || is_orphan(&ent.path(), &meta, opts.orphan_grace) {
                    delete_packs.push((pack, file_len));
                }
            }
            Some((live, dead)) => {
                let total = live + dead;
                if total > 0 && (*dead as f64) / (total as f64) > opts.repack_threshold {
                    repack.push((pack, file_len));
                }
            }
        }
    }
    Ok(Plan {
        dead_objects,
        dead_chunks,
        live_chunks,
        delete_packs,
        repack,
        live_objects,
    })
}

fn is_orphan(path: &std::path::Path, meta: &std::fs::Metadata, grace: Duration) -> bool {
    let old_enough = meta
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age >= grace);
    if !old_enough {
        return false;
    }
    // A writer holds an exclusive lock on a pack until its commit is done.
    match std::fs::File::open(path) {
        Ok(f) => match fs4::fs_std::FileExt::try_lock_exclusive(&f) {
            Ok(true) => {
                let _ = fs4::fs_std::FileExt::unlock(&f);
                true
            }
            _ => false,
        },
        Err(_) => false,
    }
}

impl Store {
    /// Plans (`dry_run`) or runs a gc.
    pub fn gc(&self, opts: GcOptions, dry_run: bool) -> Result<GcReport> {
        if dry_run {
            let kv = self.reader();
            let p = plan(self, &*kv, &opts)?;
            return Ok(report_of(&p, true));
        }
        let mut to_delete: Vec<u64> = Vec::new();
        let mut written_packs = None;
        let report = self.write(|kv| {
            let p = plan(self, kv, &opts)?;
            let mut b = Batch::default();
            for id in &p.dead_objects {
                b.delete(Cf::Objects, id.as_bytes().to_vec());
            }
            for id in &p.dead_chunks {
                b.delete(Cf::Chunks, id.as_bytes().to_vec());
            }
            // Copy live chunks out of packs being rewritten.
            let repack_set: HashSet<u64> = p.repack.iter().map(|r| r.0).collect();
            let mut new_bytes = 0;
            if !repack_set.is_empty() {
                let w = PackWriter::new(self.packs_dir(), self.config().pack_target_size);
                for (id, loc) in p
                    .live_chunks
                    .iter()
                    .filter(|(_, l)| repack_set.contains(&l.pack))
                {
                    let data = self.pack_reader().read_stored(id, loc)?;
                    let nl = w.append(id, loc.codec, loc.raw_len, &data)?;
                    new_bytes += RECORD_HEADER_LEN + data.len() as u64;
                    b.put(Cf::Chunks, id.as_bytes().to_vec(), nl.encode());
                }
                written_packs = Some(w.finish()?);
            }
            let mut stat_keys = Vec::new();
            kv.scan(Cf::StatCache, b"", &mut |k, _| {
                stat_keys.push(k.to_vec());
                Ok(true)
            })?;
            let changed =
                !p.dead_objects.is_empty() || !p.dead_chunks.is_empty() || !repack_set.is_empty();
            if changed {
                for k in stat_keys {
                    b.delete(Cf::StatCache, k);
                }
                let gen = kv
                    .get(Cf::Meta, schema::META_GC_GENERATION)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0);
                b.put(
                    Cf::Meta,
                    schema::META_GC_GENERATION,
                    (gen + 1).to_le_bytes().to_vec(),
                );
            }
            to_delete = p
                .delete_packs
                .iter()
                .chain(&p.repack)
                .map(|x| x.0)
                .collect();
            let mut r = report_of(&p, false);
            r.bytes_freed = r.bytes_freed.saturating_sub(new_bytes);
            Ok((b, r))
        });
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                if let Some(w) = written_packs {
                    w.discard();
                }
                return Err(e);
            }
        };
        drop(written_packs);
        for pack in to_delete {
            let path = pack_path(&self.packs_dir(), pack);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete", &path, e)),
            }
        }
        self.pack_reader().reset();
        Ok(report)
    }
}

fn report_of(p: &Plan, dry_run: bool) -> GcReport {
    GcReport {
        live_objects: p.live_objects,
        dead_objects: p.dead_objects.len() as u64,
        live_chunks: p.live_chunks.len() as u64,
        dead_chunks: p.dead_chunks.len() as u64,
        packs_deleted: p.delete_packs.len() as u64,
        packs_repacked: p.repack.len() as u64,
        bytes_freed: p.delete_packs.iter().chain(&p.repack).map(|x| x.1).sum(),
        dry_run,
    }
}
