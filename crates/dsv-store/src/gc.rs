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
use crate::pack::{pack_path, parse_pack_name, PackWriter, PACK_HEADER_LEN, RECORD_HEADER_LEN};
use crate::schema::{self, ChunkLoc, DraftRecord};
use crate::store::Store;
use crate::tree::read_object;

/// Options for gc.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Packs whose dead bytes exceed this fraction are rewritten.
    pub repack_threshold: f64,
    /// Unindexed pack files younger than this are left alone even when no
    /// writer holds them (default: none — a live writer is recognised by
    /// the `flock` it holds on each pack it writes, not by age).
    pub orphan_grace: Duration,
    /// On a team repository: unindexed packs on the shared object store
    /// younger than this (their Last-Modified time against this machine's
    /// clock) are left alone (default 24
    /// hours). A writer on any machine publishes its packs just before its
    /// commit and holds no lock the others could see, so age is the only
    /// sign of a writer that died between the two.
    pub shared_orphan_grace: Duration,
    /// Testing aid: keep the final commit transaction open this long before
    /// committing (the worst case of a gc on a huge repository: writers
    /// wait, leases must survive). Zero by default.
    pub hold_commit: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            repack_threshold: 0.2,
            orphan_grace: Duration::ZERO,
            shared_orphan_grace: SHARED_ORPHAN_GRACE,
            hold_commit: Duration::ZERO,
        }
    }
}

/// Default [`GcOptions::shared_orphan_grace`].
pub const SHARED_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The keyspaces a gc plan is computed from: when none of them changed
/// between the plan's snapshot and its commit, the plan is still exact.
const PLAN_KEYSPACES: [&str; 7] = [
    "objects",
    "chunks",
    "refs",
    "tags",
    "drafts",
    "roots",
    "meta:damaged/",
];

/// How often gc plans on a snapshot (writers keep writing meanwhile) before
/// it plans inside its commit transaction.
const OPTIMISTIC_PLANS: usize = 3;

/// Deletes every stat cache entry (read inside the commit transaction, so
/// entries written since the plan's snapshot go too): after objects or
/// chunks are removed, a cached "unchanged file → file object" answer may
/// point at what is gone.
fn drop_stat_cache(kv: &dyn KvRead, b: &mut Batch) -> Result<()> {
    let mut keys = Vec::new();
    kv.scan(Cf::StatCache, b"", &mut |k, _| {
        keys.push(k.to_vec());
        Ok(true)
    })?;
    for k in keys {
        b.delete(Cf::StatCache, k);
    }
    Ok(())
}

fn plan_counters(kv: &dyn KvRead) -> Result<Vec<u64>> {
    PLAN_KEYSPACES
        .iter()
        .map(|k| crate::txn::keyspace_counter(kv, k))
        .collect()
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
    /// Bytes of disk freed (pack files, net of rewritten ones). A dry run
    /// reports what the real run would free, to the byte, when nothing
    /// changes in between.
    pub bytes_freed: u64,
    /// Unindexed pack files no live writer holds (left by killed
    /// processes), among the deleted ones.
    pub orphan_packs: u64,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// Damaged-chunk records dropped (chunks nothing references any more).
    pub damaged_records_removed: u64,
    /// Whether this was only a plan.
    pub dry_run: bool,
}

struct Plan {
    dead_objects: Vec<ObjectId>,
    dead_chunks: Vec<ChunkId>,
    live_chunks: u64,
    /// Live chunks of the packs being rewritten, in (pack, offset) order:
    /// the order they are copied in.
    moved: Vec<(ChunkId, ChunkLoc)>,
    /// Bytes the rewritten packs will take (records plus pack headers).
    moved_bytes: u64,
    /// Indexed packs with nothing live: (id, file length).
    delete_packs: Vec<(u64, u64)>,
    /// Unindexed packs no writer holds: (id, file length).
    orphans: Vec<(u64, u64)>,
    repack: Vec<(u64, u64)>,
    dead_damaged: Vec<ChunkId>,
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

/// The pack files no writer holds now (their `flock` could be taken). To
/// tell orphans apart, call this *before* reading the index: a pack found
/// unlocked then and not indexed in a later view has no writer to commit
/// it any more.
pub(crate) fn unlocked_packs(dir: &std::path::Path) -> Result<HashSet<u64>> {
    Ok(pack_files(dir)?
        .into_iter()
        .filter(|(_, path, _)| is_orphan(path))
        .map(|(id, _, _)| id)
        .collect())
}

/// The packs a plan may delete or rewrite: (id, length, whether it may be
/// deleted as an orphan when the index does not name it).
type Inventory = Vec<(u64, u64, bool)>;

/// This folder's pack files: an unindexed one is an orphan when no writer
/// holds it (`unlocked`, probed before the view) and it is old enough.
fn local_inventory(store: &Store, opts: &GcOptions, unlocked: &HashSet<u64>) -> Result<Inventory> {
    Ok(pack_files(&store.packs_dir())?
        .into_iter()
        .map(|(pack, path, len)| {
            let orphan = unlocked.contains(&pack) && old_enough(&path, opts.orphan_grace);
            (pack, len, orphan)
        })
        .collect())
}

/// A team's packs, listed on its object store (before the view is read):
/// an unindexed one is an orphan once it is older than the grace period by
/// the store's clock — a writer publishes its packs just before its commit,
/// and no machine's writer holds a lock the others could see.
fn shared_inventory(
    storage: &dyn crate::storage::PackStorage,
    opts: &GcOptions,
    now_ms: i64,
) -> Result<Inventory> {
    let grace = opts.shared_orphan_grace.as_millis() as i64;
    Ok(storage
        .list("packs/")?
        .into_iter()
        .filter_map(|l| {
            let pack = l.name.strip_prefix("packs/").and_then(parse_pack_name)?;
            Some((pack, l.size, now_ms - l.modified_ms >= grace))
        })
        .collect())
}

fn plan(store: &Store, kv: &dyn KvRead, opts: &GcOptions, packs: Inventory) -> Result<Plan> {
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
    let mut live_chunks: HashMap<u64, Vec<(ChunkId, ChunkLoc)>> = HashMap::new();
    let mut live_count = 0;
    // Live record bytes per indexed pack (0 when every entry in it is dead).
    let mut usage: HashMap<u64, u64> = HashMap::new();
    kv.scan(Cf::Chunks, b"", &mut |k, v| {
        let Some(id) = ChunkId::from_slice(k) else {
            return Ok(true);
        };
        let loc = ChunkLoc::decode(v, &id)?;
        let u = usage.entry(loc.pack).or_default();
        if live_chunk_ids.contains(&id) {
            *u += loc.stored_len as u64 + RECORD_HEADER_LEN;
            live_count += 1;
            live_chunks.entry(loc.pack).or_default().push((id, loc));
        } else {
            dead_chunks.push(id);
        }
        Ok(true)
    })?;
    let mut dead_damaged = Vec::new();
    kv.scan(Cf::Meta, schema::META_DAMAGED, &mut |k, _| {
        if let Some(id) = ChunkId::from_slice(&k[schema::META_DAMAGED.len()..]) {
            if !live_chunk_ids.contains(&id) {
                dead_damaged.push(id);
            }
        }
        Ok(true)
    })?;
    let mut delete_packs = Vec::new();
    let mut orphans = Vec::new();
    let mut repack = Vec::new();
    for (pack, file_len, orphan) in packs {
        match usage.get(&pack) {
            Some(0) => delete_packs.push((pack, file_len)),
            None => {
                // Unindexed: a writer's pack until it commits (it holds a
                // lock on it), or the leftover of a writer that died.
                if orphan {
                    orphans.push((pack, file_len));
                }
            }
            Some(&live) => {
                // Dead bytes: everything but the header and the live
                // records (dead entries, records a repair took out of the
                // index, duplicates of concurrent writers).
                let dead = file_len.saturating_sub(live + PACK_HEADER_LEN);
                if file_len > 0 && (dead as f64) / (file_len as f64) > opts.repack_threshold {
                    repack.push((pack, file_len));
                }
            }
        }
    }
    delete_packs.sort_unstable();
    orphans.sort_unstable();
    repack.sort_unstable();
    let mut moved: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    for (pack, _) in &repack {
        let mut chunks = live_chunks.remove(pack).unwrap_or_default();
        chunks.sort_unstable_by_key(|(_, l)| l.offset);
        moved.extend(chunks);
    }
    let moved_bytes = packed_size(
        moved
            .iter()
            .map(|(_, l)| RECORD_HEADER_LEN + l.stored_len as u64),
        store.config().pack_target_size,
    );
    Ok(Plan {
        dead_objects,
        dead_chunks,
        live_chunks: live_count,
        moved,
        moved_bytes,
        delete_packs,
        orphans,
        repack,
        dead_damaged,
        live_objects,
    })
}

/// The bytes a [`PackWriter`] with `target` writes for records of these
/// sizes, appended in this order: it starts a new pack (16-byte header)
/// before a record once the current one reached `target`.
fn packed_size(records: impl Iterator<Item = u64>, target: u64) -> u64 {
    let mut total = 0;
    let mut cur: Option<u64> = None;
    for r in records {
        if let Some(len) = cur.filter(|&l| l >= target) {
            total += len;
            cur = None;
        }
        *cur.get_or_insert(PACK_HEADER_LEN) += r;
    }
    total + cur.unwrap_or(0)
}

/// Every pack file in `dir`: (id, path, length).
pub(crate) fn pack_files(dir: &std::path::Path) -> Result<Vec<(u64, std::path::PathBuf, u64)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("list", dir, e))?;
        let name = ent.file_name();
        let Some(pack) = name.to_str().and_then(parse_pack_name) else {
            continue;
        };
        let len = match ent.metadata() {
            Ok(m) => m.len(),
            // Deleted meanwhile (a writer's failure, another gc).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", ent.path(), e)),
        };
        out.push((pack, ent.path(), len));
    }
    Ok(out)
}

fn old_enough(path: &std::path::Path, grace: Duration) -> bool {
    grace.is_zero()
        || std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= grace)
}

/// Whether no live writer holds this unindexed pack: a writer holds an
/// exclusive `flock` on each pack from its creation until its commit is
/// done, and the kernel drops it when the writer dies. (The lock is only
/// tried, never waited for.)
fn is_orphan(path: &std::path::Path) -> bool {
    match std::fs::File::open(path) {
        Ok(f) => matches!(fs4::fs_std::FileExt::try_lock_exclusive(&f), Ok(true)),
        Err(_) => false,
    }
}

/// Deletes an orphan pack if no writer holds it now, holding its lock while
/// unlinking (a writer that created the file but has not locked it yet
/// finds it gone once it has, and takes another name). Returns its length
/// when it was deleted.
fn delete_orphan(path: &std::path::Path) -> Result<Option<u64>> {
    use std::os::unix::fs::MetadataExt;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    if !matches!(fs4::fs_std::FileExt::try_lock_exclusive(&f), Ok(true)) {
        return Ok(None);
    }
    let meta = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {}
        _ => return Ok(None),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(Some(meta.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("delete", path, e)),
    }
}

impl Store {
    /// Plans (`dry_run`) or runs a gc. Both use the same plan; the dry run
    /// reports what the real run frees, including the bytes its rewritten
    /// packs take back and the orphan packs of dead writers.
    ///
    /// On a full disk the run releases the repository's reserve to open the
    /// database (see [`Store::write_freeing`]); when even rewriting packs
    /// does not fit, it runs without rewriting (whole dead packs and orphans
    /// are deleted, which needs no new space).
    ///
    /// On a team repository (packs published to a shared object store) the
    /// plan is made from the shared index and the store's listing, the
    /// rewritten packs are published before the commit, and the packs it
    /// frees are deleted from the object store (and this machine's copies);
    /// an unindexed pack there is an orphan once older than
    /// [`GcOptions::orphan_grace`].
    pub fn gc(&self, opts: GcOptions, dry_run: bool) -> Result<GcReport> {
        if !dry_run {
            // Before any pack is rewritten.
            self.check_writable()?;
        }
        // A team's index rebuild must not index a pack this deletes.
        let lease = match (self.pack_storage(), dry_run) {
            (Some(_), false) => Some(self.take_maintenance("gc")?),
            _ => None,
        };
        match self.gc_once(opts, dry_run, lease.as_ref()) {
            Err(e) if !dry_run && crate::store::is_disk_full(&e) => {
                tracing::warn!(
                    "disk full while rewriting packs ({e}); collecting without rewriting"
                );
                let r = self.gc_once(
                    GcOptions {
                        repack_threshold: f64::INFINITY,
                        ..opts
                    },
                    false,
                    lease.as_ref(),
                )?;
                crate::store::ensure_reserve(self.dir());
                Ok(r)
            }
            r => r,
        }
    }

    /// The packs a plan considers: this folder's, or (a team repository)
    /// the shared object store's. Read *before* the view the plan uses: a
    /// pack committed just before the probe is indexed in that view.
    fn gc_inventory(&self, opts: &GcOptions) -> Result<Inventory> {
        match self.pack_storage() {
            Some(storage) => shared_inventory(&*storage, opts, crate::store::now_ms()),
            None => local_inventory(self, opts, &unlocked_packs(&self.packs_dir())?),
        }
    }

    fn gc_once(
        &self,
        opts: GcOptions,
        dry_run: bool,
        lease: Option<&MaintenanceLease<'_>>,
    ) -> Result<GcReport> {
        if dry_run {
            let inv = self.gc_inventory(&opts)?;
            // A view newer than the probe: a pack a writer committed and
            // unlocked just before it is indexed there.
            self.refresh()?;
            let kv = self.reader();
            let p = plan(self, &*kv, &opts, inv)?;
            let mut r = report_of(&p, true);
            r.bytes_freed = planned_freed(&p);
            return Ok(r);
        }
        // Plan on a snapshot, without blocking writers: marking and
        // rewriting packs take long on a big repository. The commit checks
        // that nothing the plan depends on changed since (keyspace
        // counters); if something did, plan again — and the last time inside
        // the commit transaction, as a serialized fallback.
        let mut to_delete: Vec<(u64, u64)> = Vec::new();
        let mut orphans: Vec<(u64, u64)> = Vec::new();
        let mut written_packs: Option<crate::pack::WrittenPacks> = None;
        let mut report = None;
        for _ in 0..OPTIMISTIC_PLANS {
            // The probe before the view: a pack a writer committed and
            // unlocked just before the probe is indexed in the view.
            if let Some(l) = lease {
                l.keep()?;
            }
            let inv = self.gc_inventory(&opts)?;
            self.refresh()?;
            let snap = self.reader();
            let seen = plan_counters(&*snap)?;
            let p = plan(self, &*snap, &opts, inv)?;
            let (b0, changed, written, new_bytes) = self.gc_writes(&*snap, &p)?;
            let r = self.write_freeing(|kv| {
                if plan_counters(kv)? != seen {
                    return Ok((Batch::default(), false));
                }
                let mut b = b0.clone();
                if let Some(l) = lease {
                    l.hold_in(kv, &mut b)?;
                }
                if changed {
                    drop_stat_cache(kv, &mut b)?;
                    Store::bump_gc_generation(kv, &mut b)?;
                }
                if !opts.hold_commit.is_zero() {
                    std::thread::sleep(opts.hold_commit);
                }
                Ok((b, true))
            });
            match r {
                Ok(true) => {
                    to_delete = p.delete_packs.iter().chain(&p.repack).copied().collect();
                    orphans = p.orphans.clone();
                    written_packs = written;
                    report = Some(Ok((report_of(&p, false), new_bytes)));
                    break;
                }
                Ok(false) => {
                    if let Some(w) = written {
                        w.discard();
                    }
                }
                Err(e) => {
                    if let Some(w) = written {
                        w.discard();
                    }
                    return Err(e);
                }
            }
        }
        let report = match report {
            Some(r) => r,
            None => self.write_freeing(|kv| {
                if let Some(w) = written_packs.take() {
                    w.discard(); // of a try that failed on a full disk
                }
                // Under the commit transaction nothing commits: the order of
                // the probe and the index scan does not matter here.
                let inv = self.gc_inventory(&opts)?;
                let p = plan(self, kv, &opts, inv)?;
                let (mut b, changed, written, new_bytes) = self.gc_writes(kv, &p)?;
                written_packs = written;
                if let Some(l) = lease {
                    l.hold_in(kv, &mut b)?;
                }
                if changed {
                    drop_stat_cache(kv, &mut b)?;
                    Store::bump_gc_generation(kv, &mut b)?;
                }
                if !opts.hold_commit.is_zero() {
                    std::thread::sleep(opts.hold_commit);
                }
                to_delete = p.delete_packs.iter().chain(&p.repack).copied().collect();
                orphans = p.orphans.clone();
                Ok((b, (report_of(&p, false), new_bytes)))
            }),
        };
        let (mut report, new_bytes) = match report {
            Ok(r) => r,
            Err(e) => {
                if let Some(w) = written_packs {
                    w.discard();
                }
                return Err(e);
            }
        };
        drop(written_packs);
        let mut freed = 0u64;
        report.packs_deleted -= report.orphan_packs;
        report.orphan_packs = 0;
        report.orphan_bytes = 0;
        if let Some(storage) = self.pack_storage() {
            // The shared copies first (the bytes the team pays for), then
            // this machine's: a pack another machine still reads through a
            // view from before the commit is read again at its new place.
            for (pack, len) in to_delete.iter().chain(&orphans) {
                storage.delete(&crate::store::shared_pack_name(*pack))?;
                freed += len;
                let path = pack_path(&self.packs_dir(), *pack);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("delete", &path, e)),
                }
            }
            report.orphan_packs = orphans.len() as u64;
            report.orphan_bytes = orphans.iter().map(|x| x.1).sum();
            // This machine's copies of packs other machines' gcs freed:
            // unindexed, and no writer here holds them.
            let unlocked = unlocked_packs(&self.packs_dir())?;
            if !unlocked.is_empty() {
                self.refresh()?;
                let indexed = indexed_packs(&*self.reader())?;
                for pack in unlocked.difference(&indexed) {
                    delete_orphan(&pack_path(&self.packs_dir(), *pack))?;
                }
            }
            report.packs_deleted += report.orphan_packs;
            report.bytes_freed = freed.saturating_sub(new_bytes);
            self.pack_reader().reset();
            return Ok(report);
        }
        for (pack, len) in to_delete {
            let path = pack_path(&self.packs_dir(), pack);
            match std::fs::remove_file(&path) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete", &path, e)),
            }
        }
        for (pack, _) in orphans {
            // Checked again: a writer that took this name since the plan
            // holds its lock and keeps it.
            if let Some(len) = delete_orphan(&pack_path(&self.packs_dir(), pack))? {
                freed += len;
                report.orphan_packs += 1;
                report.orphan_bytes += len;
            }
        }
        report.packs_deleted += report.orphan_packs;
        report.bytes_freed = freed.saturating_sub(new_bytes);
        self.pack_reader().reset();
        // The space is free now: take the reserve back if it was spent.
        crate::store::ensure_reserve(self.dir());
        Ok(report)
    }
}

impl Store {
    /// The writes of a plan (without the gc generation bump and the stat
    /// cache, added inside the commit): deletes of dead objects, chunks and
    /// damaged records, and the live chunks of rewritten packs copied into
    /// new packs (written here). Returns the batch, whether it changes
    /// anything, the new packs and their bytes.
    #[allow(clippy::type_complexity)]
    fn gc_writes(
        &self,
        kv: &dyn KvRead,
        p: &Plan,
    ) -> Result<(Batch, bool, Option<crate::pack::WrittenPacks>, u64)> {
        let mut b = Batch::default();
        for id in &p.dead_objects {
            b.delete(Cf::Objects, id.as_bytes().to_vec());
        }
        for id in &p.dead_chunks {
            b.delete(Cf::Chunks, id.as_bytes().to_vec());
        }
        for id in &p.dead_damaged {
            b.delete(Cf::Meta, schema::damaged_key(id));
        }
        // Copy live chunks out of packs being rewritten.
        let mut new_bytes = 0;
        let mut written_packs = None;
        if !p.moved.is_empty() {
            let w = PackWriter::new(self.packs_dir(), self.config().pack_target_size);
            let team = self.pack_storage().is_some();
            for (id, loc) in &p.moved {
                let data = if team && !self.pack_is_local(loc.pack) {
                    // Another machine's pack: its records from the object
                    // store (checked against their ids by the source).
                    self.shared_stored(kv, id)?
                } else {
                    self.pack_reader().read_stored(id, loc)?
                };
                let nl = w.append(id, loc.codec, loc.raw_len, &data)?;
                b.put(Cf::Chunks, id.as_bytes().to_vec(), nl.encode());
            }
            let written = w.finish()?;
            new_bytes = written.bytes()?;
            // A team's new packs are on the object store before the index
            // points at them.
            if let Err(e) = self.publish_packs(&written.ids()) {
                written.discard();
                return Err(e);
            }
            written_packs = Some(written);
        }
        let changed =
            !p.dead_objects.is_empty() || !p.dead_chunks.is_empty() || !p.repack.is_empty();
        Ok((b, changed, written_packs, new_bytes))
    }
}

/// Every pack some chunk index entry names (one scan of the index).
fn indexed_packs(kv: &dyn KvRead) -> Result<HashSet<u64>> {
    let mut packs = HashSet::new();
    kv.scan(Cf::Chunks, b"", &mut |k, v| {
        if let Some(id) = ChunkId::from_slice(k) {
            packs.insert(ChunkLoc::decode(v, &id)?.pack);
        }
        Ok(true)
    })?;
    Ok(packs)
}

/// `meta` key of a team repository's maintenance lease (JSON
/// [`Maintenance`]): a `gc` or an index rebuild holds it, so that one
/// never indexes a pack the other is deleting.
const MAINTENANCE: &[u8] = b"maintenance";
/// How long a maintenance lease lasts without being given back (a holder
/// that died frees it after this).
const MAINTENANCE_TTL_MS: i64 = 3_600_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct Maintenance {
    what: String,
    holder: String,
    token: u64,
    expires_ms: i64,
}

/// A held maintenance lease; given back when dropped. A long holder keeps
/// it ([`MaintenanceLease::keep`]) and checks it in every commit that
/// depends on it ([`MaintenanceLease::hold_in`]): a holder that lost it
/// (it lapsed and another machine took it) fails before changing anything.
pub(crate) struct MaintenanceLease<'a> {
    store: &'a Store,
    token: u64,
    /// When it was last taken or extended, ms (this machine's clock).
    renewed_ms: std::cell::Cell<i64>,
}

impl MaintenanceLease<'_> {
    /// Inside a write transaction: fails unless this lease is still the
    /// repository's, and extends it by a full term in `b`.
    pub(crate) fn hold_in(&self, kv: &dyn KvRead, b: &mut Batch) -> Result<()> {
        let now = self.store.now_ms();
        let current = kv
            .get(Cf::Meta, MAINTENANCE)?
            .and_then(|v| serde_json::from_slice::<Maintenance>(&v).ok());
        match current {
            Some(mut m) if m.token == self.token => {
                m.expires_ms = now + MAINTENANCE_TTL_MS;
                b.put(
                    Cf::Meta,
                    MAINTENANCE.to_vec(),
                    serde_json::to_vec(&m).unwrap_or_default(),
                );
                Ok(())
            }
            other => Err(Error::LockTimeout {
                holder: match other {
                    Some(m) => format!(
                        "'{}' by {} (this run's maintenance lease lapsed and was taken)",
                        m.what, m.holder
                    ),
                    None => "nobody (this run's maintenance lease lapsed; run it again)".into(),
                },
                waited_ms: 0,
            }),
        }
    }

    /// Extends the lease when a quarter of its term passed since it was
    /// last taken or extended (cheap to call often).
    pub(crate) fn keep(&self) -> Result<()> {
        let now = crate::store::now_ms();
        if now - self.renewed_ms.get() < MAINTENANCE_TTL_MS / 4 {
            return Ok(());
        }
        self.store.write(|kv| {
            let mut b = Batch::default();
            self.hold_in(kv, &mut b)?;
            Ok((b, ()))
        })?;
        self.renewed_ms.set(now);
        Ok(())
    }
}

impl Drop for MaintenanceLease<'_> {
    fn drop(&mut self) {
        let token = self.token;
        let r = self.store.write(|kv| {
            let mut b = Batch::default();
            if let Some(v) = kv.get(Cf::Meta, MAINTENANCE)? {
                if serde_json::from_slice::<Maintenance>(&v).is_ok_and(|m| m.token == token) {
                    b.delete(Cf::Meta, MAINTENANCE.to_vec());
                }
            }
            Ok((b, ()))
        });
        if let Err(e) = r {
            tracing::warn!("cannot give back the maintenance lease (it lapses by itself): {e}");
        }
    }
}

impl Store {
    /// Takes the repository's maintenance lease for `what`, or fails naming
    /// its holder while another live one holds it.
    pub(crate) fn take_maintenance(&self, what: &str) -> Result<MaintenanceLease<'_>> {
        let token = u64::from_le_bytes(crate::id::random_bytes::<8>()?);
        self.write(|kv| {
            let now = self.now_ms();
            if let Some(v) = kv.get(Cf::Meta, MAINTENANCE)? {
                if let Ok(m) = serde_json::from_slice::<Maintenance>(&v) {
                    if m.expires_ms > now && m.token != token {
                        return Err(Error::LockTimeout {
                            holder: format!(
                                "'{}' by {} (its maintenance lease runs {} more s)",
                                m.what,
                                m.holder,
                                (m.expires_ms - now) / 1000
                            ),
                            waited_ms: 0,
                        });
                    }
                }
            }
            let m = Maintenance {
                what: what.to_string(),
                holder: self.opts.holder.clone(),
                token,
                expires_ms: now + MAINTENANCE_TTL_MS,
            };
            let mut b = Batch::default();
            b.put(
                Cf::Meta,
                MAINTENANCE.to_vec(),
                serde_json::to_vec(&m).unwrap_or_default(),
            );
            Ok((b, ()))
        })?;
        Ok(MaintenanceLease {
            store: self,
            token,
            renewed_ms: std::cell::Cell::new(crate::store::now_ms()),
        })
    }
}

/// What the plan frees: every deleted and rewritten pack, less the packs
/// the rewrite writes.
fn planned_freed(p: &Plan) -> u64 {
    p.delete_packs
        .iter()
        .chain(&p.repack)
        .chain(&p.orphans)
        .map(|x| x.1)
        .sum::<u64>()
        .saturating_sub(p.moved_bytes)
}

fn report_of(p: &Plan, dry_run: bool) -> GcReport {
    GcReport {
        live_objects: p.live_objects,
        dead_objects: p.dead_objects.len() as u64,
        live_chunks: p.live_chunks,
        dead_chunks: p.dead_chunks.len() as u64,
        packs_deleted: (p.delete_packs.len() + p.orphans.len()) as u64,
        packs_repacked: p.repack.len() as u64,
        bytes_freed: planned_freed(p),
        orphan_packs: p.orphans.len() as u64,
        orphan_bytes: p.orphans.iter().map(|x| x.1).sum(),
        damaged_records_removed: p.dead_damaged.len() as u64,
        dry_run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_lease(store: &Store) -> Maintenance {
        let v = store.reader().get(Cf::Meta, MAINTENANCE).unwrap().unwrap();
        serde_json::from_slice(&v).unwrap()
    }

    #[test]
    fn a_kept_maintenance_lease_is_extended_and_a_lost_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::init(
            &d.path().join("repo"),
            crate::config::RepoConfig::default(),
            crate::store::StoreOptions::default(),
        )
        .unwrap();
        let lease = store.take_maintenance("gc").unwrap();
        // A second taker is refused while it runs.
        let e = store
            .take_maintenance("fsck --rebuild-index")
            .err()
            .unwrap();
        assert!(e.to_string().contains("'gc'"), "{e}");
        let first = meta_lease(&store).expires_ms;
        // Not due yet: nothing written.
        lease.keep().unwrap();
        assert_eq!(meta_lease(&store).expires_ms, first);
        // Due (a quarter of the term passed): extended by a full term.
        lease
            .renewed_ms
            .set(lease.renewed_ms.get() - MAINTENANCE_TTL_MS / 2);
        lease.keep().unwrap();
        let kept = meta_lease(&store);
        assert!(kept.expires_ms >= first, "{} < {first}", kept.expires_ms);
        assert_eq!(kept.token, lease.token);
        // It lapses and another machine takes it: keeping it and committing
        // under it now fail, naming the new holder, and leave its record.
        let other = Maintenance {
            what: "fsck --rebuild-index".into(),
            holder: "machine-2".into(),
            token: lease.token ^ 1,
            expires_ms: kept.expires_ms,
        };
        store
            .write(|_| {
                let mut b = Batch::default();
                b.put(
                    Cf::Meta,
                    MAINTENANCE.to_vec(),
                    serde_json::to_vec(&other).unwrap(),
                );
                Ok((b, ()))
            })
            .unwrap();
        lease.renewed_ms.set(0);
        let e = lease.keep().unwrap_err();
        assert!(e.to_string().contains("machine-2"), "{e}");
        let e = store
            .write(|kv| {
                let mut b = Batch::default();
                lease.hold_in(kv, &mut b)?;
                Ok((b, ()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("lapsed and was taken"), "{e}");
        assert_eq!(meta_lease(&store).token, other.token);
        // Giving it back leaves the new holder's record alone.
        drop(lease);
        assert_eq!(meta_lease(&store).holder, "machine-2");
    }
}
