//! `fsck`: every object decodes and hashes to its id, every reference
//! resolves, every chunk's index entry points inside an existing pack; with
//! `read_data`, every chunk is read, decompressed and rehashed.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::id::{hash, ChunkId, ObjectId, VersionId};
use crate::kv::{Batch, Cf, KvRead};
use crate::object::{stored, EntryTarget, Object, TreeNode};
use crate::pack::{check_pack_header, pack_path, PACK_HEADER_LEN, RECORD_HEADER_LEN};
use crate::schema::{self, ChunkLoc, DamagedChunk, DraftRecord, StatEntry};
use crate::store::{Progress, Store};

/// What `verify` checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Read, decompress and rehash every chunk.
    pub read_data: bool,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What is wrong: `corrupt-object`, `missing-object`, `missing-chunk`,
    /// `corrupt-chunk`, `missing-pack`, `bad-index`, `dangling-ref`, ...
    pub kind: &'static str,
    /// The id, key or file at fault.
    pub what: String,
    /// Details, including the versions and paths that use a bad chunk.
    pub detail: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Objects decoded.
    pub objects: u64,
    /// Versions among them.
    pub versions: u64,
    /// Chunk index entries checked.
    pub chunks: u64,
    /// Chunk bytes read and rehashed (with `read_data`).
    pub bytes_read: u64,
    /// Chunks used by versions that are not stored here but on a remote
    /// this repository reads them from (a lazy clone); not read by
    /// `read_data`.
    pub remote_chunks: u64,
    /// Everything wrong.
    pub problems: Vec<Problem>,
    /// Chunks whose stored copy cannot be read back intact, with the index
    /// entry they were checked under and why: what [`Store::repair`] takes
    /// out of service.
    #[serde(skip)]
    pub damaged: Vec<(ChunkId, ChunkLoc, String)>,
}

/// What [`Store::repair`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RepairReport {
    /// Chunks taken out of the index and recorded as damaged.
    pub marked: Vec<String>,
    /// Chunks left alone because their index entry changed since the check
    /// (a concurrent `gc` moved them): check again.
    pub skipped: Vec<String>,
    /// Stat-cache entries dropped so that the next sync rereads those files.
    pub stat_entries_dropped: u64,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn problem(kind: &'static str, what: impl Into<String>, detail: impl Into<String>) -> Problem {
    Problem {
        kind,
        what: what.into(),
        detail: detail.into(),
    }
}

impl Store {
    /// Checks the repository.
    pub fn verify(&self, opts: VerifyOptions, progress: &dyn Progress) -> Result<VerifyReport> {
        let kv = self.reader();
        let mut report = VerifyReport::default();
        let mut objects: HashSet<ObjectId> = HashSet::new();
        let mut object_refs: Vec<(ObjectId, ObjectId)> = Vec::new();
        let mut chunk_refs: HashMap<ChunkId, ObjectId> = HashMap::new();
        let mut version_parents: Vec<(VersionId, VersionId)> = Vec::new();

        kv.scan(Cf::Objects, b"", &mut |k, v| {
            report.objects += 1;
            let Some(id) = ObjectId::from_slice(k) else {
                report.problems.push(problem(
                    "bad-key",
                    hex::encode(k),
                    "object key is not 32 bytes",
                ));
                return Ok(true);
            };
            let what = format!("object {id}");
            let decoded = stored::unwrap(v, &what).and_then(|c| {
                if hash(&c) != id.0 {
                    return Err(Error::corrupted(&what, "content does not hash to its id"));
                }
                Object::decode(&c, &what)
            });
            match decoded {
                Ok(obj) => {
                    objects.insert(id);
                    match obj {
                        Object::File(f) => {
                            for (c, _) in f.chunks {
                                chunk_refs.entry(c).or_insert(id);
                            }
                        }
                        Object::Tree(TreeNode::Leaf(entries)) => {
                            for e in entries {
                                match e.target {
                                    EntryTarget::File(t) | EntryTarget::Dir { id: t, .. } => {
                                        object_refs.push((id, t))
                                    }
                                    EntryTarget::Symlink(_) => {}
                                }
                            }
                        }
                        Object::Tree(TreeNode::Shard(s)) => {
                            object_refs.extend(s.children.iter().map(|(_, c)| (id, *c)));
                        }
                        Object::Version(v) => {
                            report.versions += 1;
                            object_refs.push((id, v.root));
                            let vid = VersionId(id.0);
                            version_parents.extend(v.parents.iter().map(|p| (vid, *p)));
                        }
                    }
                }
                Err(e) => {
                    report
                        .problems
                        .push(problem("corrupt-object", id.to_hex(), e.to_string()))
                }
            }
            Ok(true)
        })?;

        for (from, to) in &object_refs {
            if !objects.contains(to) {
                report.problems.push(problem(
                    "missing-object",
                    to.to_hex(),
                    format!("referenced by {from}"),
                ));
            }
        }
        let live_versions: HashSet<VersionId> =
            self.list_versions()?.into_iter().map(|(v, _)| v).collect();
        for v in &live_versions {
            if !objects.contains(&ObjectId(v.0)) {
                report.problems.push(problem(
                    "missing-object",
                    v.to_hex(),
                    "finalized version has no object",
                ));
            }
        }
        let _ = version_parents; // Parents may be deleted versions: lineage only, not an error.

        // Refs, tags and drafts must point at live data.
        kv.scan(Cf::Refs, b"", &mut |k, v| {
            match VersionId::from_slice(v) {
                Some(id) if live_versions.contains(&id) => {}
                _ => report.problems.push(problem(
                    "dangling-ref",
                    String::from_utf8_lossy(k),
                    "points at no live version",
                )),
            }
            Ok(true)
        })?;
        kv.scan(Cf::Drafts, b"", &mut |k, v| {
            let Some(id) = crate::id::DraftId::from_slice(k) else {
                return Ok(true);
            };
            match DraftRecord::decode(v, &id) {
                Ok(d) if d.finalized.is_none() && !objects.contains(&d.root) => {
                    report.problems.push(problem(
                        "missing-object",
                        d.root.to_hex(),
                        format!("root of draft {id}"),
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    report
                        .problems
                        .push(problem("corrupt-draft", id.to_hex(), e.to_string()))
                }
            }
            Ok(true)
        })?;

        // Chunk index. A team repository's packs may be on its object store
        // only (written by another machine).
        let storage = self.pack_storage();
        let mut shared_sizes: HashMap<u64, u64> = HashMap::new();
        if let Some(s) = &storage {
            for l in s.list("packs/")? {
                let name = l.name.strip_prefix("packs/").unwrap_or(&l.name);
                if let Some(id) = crate::pack::parse_pack_name(name) {
                    shared_sizes.insert(id, l.size);
                }
            }
        }
        let mut pack_state: HashMap<u64, PackState> = HashMap::new();
        let mut bad_pack_chunks: HashMap<u64, Vec<ChunkId>> = HashMap::new();
        let mut by_pack: HashMap<u64, Vec<(ChunkId, ChunkLoc)>> = HashMap::new();
        let mut indexed: HashSet<ChunkId> = HashSet::new();
        kv.scan(Cf::Chunks, b"", &mut |k, v| {
            report.chunks += 1;
            let Some(id) = ChunkId::from_slice(k) else {
                report.problems.push(problem(
                    "bad-index",
                    hex::encode(k),
                    "chunk key is not 32 bytes",
                ));
                return Ok(true);
            };
            match ChunkLoc::decode(v, &id) {
                Ok(loc) => {
                    indexed.insert(id);
                    let state = pack_state.entry(loc.pack).or_insert_with(|| {
                        match pack_status(&pack_path(&self.packs_dir(), loc.pack)) {
                            PackState::Missing => shared_sizes
                                .get(&loc.pack)
                                .map(|n| PackState::Ok(*n))
                                .unwrap_or(PackState::Missing),
                            st => st,
                        }
                    });
                    match state {
                        PackState::Missing => {
                            let why = format!("pack {:016x}.pack is missing", loc.pack);
                            report.problems.push(problem(
                                "missing-pack",
                                format!("{:016x}.pack", loc.pack),
                                format!("holds chunk {id}"),
                            ));
                            report.damaged.push((id, loc, why));
                        }
                        PackState::Bad(kind, e) => {
                            if *kind == "corrupt-pack" {
                                report.damaged.push((id, loc, e.clone()));
                            }
                            bad_pack_chunks.entry(loc.pack).or_default().push(id);
                        }
                        PackState::Ok(s)
                            if loc.offset + RECORD_HEADER_LEN + loc.stored_len as u64 > *s =>
                        {
                            let why = format!("pack {:016x} is truncated", loc.pack);
                            report.problems.push(problem(
                                "corrupt-chunk",
                                id.to_hex(),
                                why.clone(),
                            ));
                            report.damaged.push((id, loc, why));
                        }
                        PackState::Ok(_) => by_pack.entry(loc.pack).or_default().push((id, loc)),
                    }
                }
                Err(e) => report
                    .problems
                    .push(problem("bad-index", id.to_hex(), e.to_string())),
            }
            Ok(true)
        })?;
        let mut bad_packs: Vec<_> = bad_pack_chunks.into_iter().collect();
        bad_packs.sort();
        for (pack, ids) in bad_packs {
            if let Some(PackState::Bad(kind, e)) = pack_state.get(&pack) {
                report.problems.push(problem(
                    kind,
                    format!("{pack:016x}.pack"),
                    format!("{e}; holds {} indexed chunks", ids.len()),
                ));
            }
        }
        let mut damaged_refs: HashSet<ChunkId> = HashSet::new();
        let source = self.chunk_source();
        for (c, user) in &chunk_refs {
            if !indexed.contains(c) {
                if let Some(src) = &source {
                    if src.has(&*kv, c)? {
                        report.remote_chunks += 1;
                        continue;
                    }
                }
                match kv.get(Cf::Meta, &schema::damaged_key(c))? {
                    Some(_) => {
                        damaged_refs.insert(*c);
                    }
                    None => report.problems.push(problem(
                        "missing-chunk",
                        c.to_hex(),
                        format!("used by file {user}"),
                    )),
                }
            }
        }
        if !damaged_refs.is_empty() {
            // Marked by `fsck --repair`: name what to sync again.
            let users = self.paths_using(&damaged_refs)?;
            let mut ids: Vec<_> = damaged_refs.into_iter().collect();
            ids.sort();
            for id in ids {
                let used = users.get(&id).map(|u| u.join(", ")).unwrap_or_default();
                report.problems.push(problem(
                    "damaged-chunk",
                    id.to_hex(),
                    format!(
                        "marked damaged by fsck --repair; sync an intact copy of: {}",
                        if used.is_empty() {
                            "(no live version uses it)".to_string()
                        } else {
                            used
                        }
                    ),
                ));
            }
        }

        if opts.read_data {
            let total: u64 = by_pack
                .values()
                .flatten()
                .map(|(_, l)| l.stored_len as u64)
                .sum();
            progress.start("reading chunks", total);
            let dir = self.packs_dir();
            let locs: HashMap<ChunkId, ChunkLoc> = by_pack.values().flatten().copied().collect();
            let packs: Vec<(u64, Vec<(ChunkId, ChunkLoc)>)> = by_pack.into_iter().collect();
            let results: Result<Vec<PackCheck>> = packs
                .into_par_iter()
                .map(|(pack, mut entries)| {
                    entries.sort_by_key(|(_, l)| l.offset);
                    let path = pack_path(&dir, pack);
                    if let (Some(s), false) = (&storage, path.exists()) {
                        return verify_shared(&**s, pack, &entries, progress);
                    }
                    let map = match std::fs::File::open(&path).and_then(|f| map_file(&f)) {
                        Ok(m) => m,
                        Err(e) => {
                            return Ok((
                                0,
                                entries
                                    .iter()
                                    .map(|(id, _)| (*id, format!("{}: {e}", path.display())))
                                    .collect(),
                            ))
                        }
                    };
                    let bad: Vec<(ChunkId, String)> = entries
                        .par_iter()
                        .filter_map(|(id, loc)| {
                            let start = loc.offset as usize;
                            let end = start + RECORD_HEADER_LEN as usize + loc.stored_len as usize;
                            let rec = map.get(start..end)?;
                            let res = crate::pack::decode_record(rec, id, loc);
                            progress.advance(loc.stored_len as u64);
                            res.err().map(|e| (*id, e.to_string()))
                        })
                        .collect();
                    let bytes = entries.iter().map(|(_, l)| l.raw_len as u64).sum();
                    Ok((bytes, bad))
                })
                .collect();
            progress.finish();
            // The object store unreachable is not damage: the check stops
            // (nothing is marked) and says why.
            let results = results?;
            let mut bad_chunks: HashMap<ChunkId, String> = HashMap::new();
            for (bytes, bad) in results {
                report.bytes_read += bytes;
                bad_chunks.extend(bad);
            }
            for (id, why) in &bad_chunks {
                if let Some(loc) = locs.get(id) {
                    report.damaged.push((*id, *loc, why.clone()));
                }
            }
            if !bad_chunks.is_empty() {
                let users = self.paths_using(&bad_chunks.keys().copied().collect())?;
                let mut bad: Vec<_> = bad_chunks.into_iter().collect();
                bad.sort();
                for (id, why) in bad {
                    let used = users.get(&id).map(|u| u.join(", ")).unwrap_or_default();
                    let detail = if used.is_empty() {
                        why
                    } else {
                        format!("{why}; used by {used}")
                    };
                    report
                        .problems
                        .push(problem("corrupt-chunk", id.to_hex(), detail));
                }
            }
        }
        Ok(report)
    }

    /// Takes the damaged chunks a check found out of service, in one atomic
    /// write: each one's index entry is removed (so the next ingest of the
    /// intact bytes stores them again instead of deduplicating against the
    /// bad copy) and a damaged-chunk record takes its place (so reads say
    /// "damaged", never serve wrong bytes, and `fsck` lists the files to
    /// sync again). Stat-cache entries of files using them are dropped so
    /// that the next sync rereads those files. A chunk whose index entry
    /// changed since the check (a concurrent gc moved it) is skipped.
    pub fn repair(&self, checked: &VerifyReport) -> Result<RepairReport> {
        let out = self.write(|kv| {
            let mut b = Batch::default();
            let mut r = RepairReport::default();
            let mut marked: HashSet<ChunkId> = HashSet::new();
            let now = crate::store::now_ms();
            for (id, loc, why) in &checked.damaged {
                let current = kv.get(Cf::Chunks, id.as_bytes())?;
                if current.as_deref() != Some(loc.encode().as_slice()) {
                    r.skipped.push(id.to_hex());
                    continue;
                }
                if !marked.insert(*id) {
                    continue;
                }
                b.delete(Cf::Chunks, id.as_bytes().to_vec());
                b.put(
                    Cf::Meta,
                    schema::damaged_key(id),
                    DamagedChunk {
                        loc: *loc,
                        marked_ms: now,
                        reason: why.clone(),
                    }
                    .encode(),
                );
                r.marked.push(id.to_hex());
            }
            if !marked.is_empty() {
                let mut uses: HashMap<ObjectId, bool> = HashMap::new();
                let mut drop_keys = Vec::new();
                kv.scan(Cf::StatCache, b"", &mut |k, v| {
                    let Ok(st) = StatEntry::decode(v) else {
                        drop_keys.push(k.to_vec());
                        return Ok(true);
                    };
                    let hit = match uses.get(&st.file) {
                        Some(h) => *h,
                        None => {
                            let h = match crate::tree::read_object(kv, &st.file) {
                                Ok(Object::File(f)) => {
                                    f.chunks.iter().any(|(c, _)| marked.contains(c))
                                }
                                _ => true,
                            };
                            uses.insert(st.file, h);
                            h
                        }
                    };
                    if hit {
                        drop_keys.push(k.to_vec());
                    }
                    Ok(true)
                })?;
                r.stat_entries_dropped = drop_keys.len() as u64;
                for k in drop_keys {
                    b.delete(Cf::StatCache, k);
                }
                // Like a gc: a writer that read the index before this
                // write checks that what it references is still indexed.
                Store::bump_gc_generation(kv, &mut b)?;
            }
            Ok((b, r))
        })?;
        self.pack_reader().reset();
        Ok(out)
    }

    /// For each chunk, the `version:path` places that use it.
    pub fn paths_using(&self, chunks: &HashSet<ChunkId>) -> Result<HashMap<ChunkId, Vec<String>>> {
        let mut out: HashMap<ChunkId, Vec<String>> = HashMap::new();
        for (v, _) in self.list_versions()? {
            let root = self.version(&v)?.object.root;
            self.walk_files(&root, &mut |p, e| {
                if let EntryTarget::File(f) = e.target {
                    if let Ok(file) = self.file_object(&f) {
                        for (c, _) in &file.chunks {
                            if chunks.contains(c) {
                                out.entry(*c).or_default().push(format!(
                                    "{}:{}",
                                    v.short(12),
                                    String::from_utf8_lossy(p)
                                ));
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// Bytes checked in a pack and its bad chunks (with why).
type PackCheck = (u64, Vec<(ChunkId, String)>);

/// Reads and checks the chunks `entries` of pack `pack` on a team
/// repository's object store (in batches of ranged reads); returns the
/// bytes checked and the bad chunks. A failed request is an error, not
/// damage.
fn verify_shared(
    storage: &dyn crate::storage::PackStorage,
    pack: u64,
    entries: &[(ChunkId, ChunkLoc)],
    progress: &dyn Progress,
) -> Result<PackCheck> {
    let name = crate::store::shared_pack_name(pack);
    let mut bad = Vec::new();
    let mut bytes = 0;
    for batch in entries.chunks(256) {
        let reqs: Vec<(String, std::ops::Range<u64>)> = batch
            .iter()
            .map(|(_, l)| {
                let end = l.offset + RECORD_HEADER_LEN + l.stored_len as u64;
                (name.clone(), l.offset..end)
            })
            .collect();
        let recs = storage.get_ranges(&reqs, &|_| {})?;
        for ((id, loc), rec) in batch.iter().zip(recs) {
            let res = crate::pack::decode_record(&rec, id, loc);
            progress.advance(loc.stored_len as u64);
            bytes += loc.raw_len as u64;
            if let Err(e) = res {
                bad.push((*id, format!("{}/{name}: {e}", storage.location())));
            }
        }
    }
    Ok((bytes, bad))
}

/// What a pack file looks like to `fsck`.
enum PackState {
    /// Present, with a valid header, this long.
    Ok(u64),
    /// Not there.
    Missing,
    /// Not usable: the problem kind (`corrupt-pack`: damage;
    /// `unsupported-pack`: a newer format; `unreadable-pack`: cannot be
    /// opened), and the error.
    Bad(&'static str, String),
}

fn pack_status(path: &std::path::Path) -> PackState {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return PackState::Missing,
        Err(e) => return PackState::Bad("unreadable-pack", format!("{}: {e}", path.display())),
    };
    let len = match f.metadata() {
        Ok(m) => m.len(),
        Err(e) => return PackState::Bad("unreadable-pack", format!("{}: {e}", path.display())),
    };
    let mut head = [0u8; PACK_HEADER_LEN as usize];
    let n = f.read_at(&mut head, 0).unwrap_or(0);
    match check_pack_header(&head[..n], path) {
        Ok(()) => PackState::Ok(len),
        Err(e @ Error::UnsupportedFormatVersion { .. }) => {
            PackState::Bad("unsupported-pack", e.to_string())
        }
        Err(e) => PackState::Bad("corrupt-pack", e.to_string()),
    }
}

/// Memory-maps an indexed pack for sequential verification. A pack is cut
/// to its exact length before it is indexed, is immutable from then on, and
/// is only ever deleted (never truncated) by gc, so the mapping cannot
/// shrink under us.
#[allow(unsafe_code)]
fn map_file(f: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: pack files are append-only while locked by their writer and
    // never modified afterwards; gc unlinks them, which keeps the mapping valid.
    let m = unsafe { memmap2::Mmap::map(f)? };
    let _ = m.advise(memmap2::Advice::Sequential);
    Ok(m)
}

/// Reads the repository format marker (for `stats`).
pub fn format_of(kv: &dyn KvRead) -> Result<Option<u32>> {
    Ok(kv
        .get(Cf::Meta, schema::META_FORMAT)?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_le_bytes))
}
