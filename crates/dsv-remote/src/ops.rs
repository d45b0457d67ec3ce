//! The operations: remotes, push, fetch (and pull), prefetch.
//!
//! **Push** sends what the remote lacks and then publishes it. It reads the
//! remote's pack indexes it has not seen (one listing, one ranged read per
//! new pack), walks the versions to send down to their chunks, skipping
//! every object and chunk the remote holds (an object on the remote implies
//! everything below it is there: packs of chunks are uploaded before packs
//! of the objects that use them, and child objects before parents), uploads
//! new packs (chunks first, several at once; then objects, in order), and
//! finally replaces the dataset's document with a conditional write. A push
//! killed at any point leaves at worst packs no document names yet; the
//! next push finds them (their names are content hashes) and does not
//! upload them again.
//!
//! **Fetch** reads new pack indexes and every dataset document, downloads
//! the metadata objects of versions this repository lacks (breadth-first,
//! coalesced ranged reads), checks each against its id, and imports them
//! in one write per dataset. Chunks stay on the remote (read on demand) —
//! **pull** also downloads them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use dsv::exchange::{DatasetHeader, VersionHeader};
use dsv::{Dataset, DatasetId, Repo};
use dsv_store::bundle::{BundleBuilder, EntryKind, IndexEntry, TRAILER_LEN};
use dsv_store::import::references;
use dsv_store::storage::{FetchedChunk, PackStorage, PutMode, PutOutcome};
use dsv_store::{Batch, Cf, ChunkId, KvRead, ObjectId, VersionId};
use serde::Serialize;

use crate::doc::{self, DatasetDoc, Manifest, Tracking};
use crate::error::{Error, Result};
use crate::keys::{self, RemoteLoc, RemoteRecord};
use crate::open::{open_storage, Connect};
use crate::source::fetch_records;

/// Target size of the packs a push writes.
pub const PACK_TARGET: u64 = 32 << 20;
/// Bytes of ranged reads per download batch.
const DOWNLOAD_BATCH: u64 = 64 << 20;
/// How much of a pack's end is read to find its index in one request.
const TAIL_READ: u64 = 64 << 10;
/// Conditional-write attempts on a dataset document before giving up.
const DOC_TRIES: u32 = 20;

/// Progress of a transfer (the CLI draws bars from it).
pub trait Progress: Sync {
    /// A phase starts: what, and its size in bytes when known.
    fn phase(&self, _what: &str, _total_bytes: Option<u64>) {}
    /// Bytes moved.
    fn bytes(&self, _n: u64) {}
    /// The phase ended.
    fn finish_phase(&self) {}
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

fn invalid(msg: String) -> Error {
    Error::Repo(dsv::Error::Invalid(msg))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

// ---- remote records ---------------------------------------------------------

/// Every configured remote, by name.
pub fn remotes(repo: &Repo) -> Result<Vec<(String, RemoteRecord)>> {
    remotes_of(repo.store())
}

/// [`remotes`] of an engine handle.
pub fn remotes_of(store: &dsv_store::Store) -> Result<Vec<(String, RemoteRecord)>> {
    let kv = store.reader();
    let mut out = Vec::new();
    let mut err = None;
    kv.scan(Cf::App, keys::REMOTE, &mut |k, v| {
        let name = String::from_utf8_lossy(&k[keys::REMOTE.len()..]).into_owned();
        match serde_json::from_slice::<RemoteRecord>(v) {
            Ok(r) => out.push((name, r)),
            Err(e) => {
                err = Some(Error::Repo(dsv::Error::Store(dsv_store::Error::corrupted(
                    format!("remote record {name}"),
                    e.to_string(),
                ))));
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    err.map_or(Ok(out), Err)
}

/// One remote's record.
pub fn get_remote(repo: &Repo, name: &str) -> Result<RemoteRecord> {
    remotes(repo)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| r)
        .ok_or_else(|| Error::NoSuchRemote(name.to_string()))
}

/// Reads and checks a remote's manifest; `None` for an empty remote.
pub fn read_manifest(storage: &dyn PackStorage) -> Result<Option<Manifest>> {
    let Some(got) = storage.get(doc::MANIFEST)? else {
        return Ok(None);
    };
    let location = format!("{}/{}", storage.location(), doc::MANIFEST);
    let m: Manifest = serde_json::from_slice(&got.data).map_err(|e| Error::BadRemote {
        location: location.clone(),
        reason: format!("not a dsv remote manifest: {e}"),
    })?;
    let unknown: Vec<String> = m
        .features
        .iter()
        .filter(|f| !doc::KNOWN_FEATURES.contains(&f.as_str()))
        .cloned()
        .collect();
    if m.format > doc::FORMAT || !unknown.is_empty() {
        return Err(Error::NewerFormat {
            location: storage.location(),
            found: m.format,
            features: unknown,
            supported: doc::FORMAT,
        });
    }
    Ok(Some(m))
}

/// Checks that a remote can be reached and read (URL, endpoint, bucket,
/// credentials: a listing fails on each) and returns its manifest; `None`
/// for an empty remote.
pub fn probe(storage: &dyn PackStorage) -> Result<Option<Manifest>> {
    storage.check()?;
    read_manifest(storage)
}

/// Checks that the storage honours conditional writes, which keep
/// concurrent pushes from losing versions: a second create-only write of
/// one name must be refused, and so must a write conditional on a wrong
/// entity tag. Writes (and removes) one small probe object; a storage that
/// refuses writes altogether (read-only credentials) passes, since it
/// cannot be pushed to anyway.
pub fn check_conditional_writes(storage: &dyn PackStorage) -> Result<()> {
    let rnd = dsv_store::id::random_bytes::<8>()?;
    let name = format!("probe/{}", hex::encode(rnd));
    let bad = |what: &str| Error::BadRemote {
        location: storage.location(),
        reason: format!(
            "the storage ignores {what}: two pushes at once could lose a version; use a server \
             that supports conditional writes (AWS S3, GCS, Azure, MinIO, R2, moto)"
        ),
    };
    match storage.put(&name, b"1".to_vec(), PutMode::Create) {
        Ok(PutOutcome::Written(_)) => {}
        Ok(_) => return Err(bad("If-None-Match (a fresh name reported as existing)")),
        Err(dsv_store::Error::Storage { reason, .. }) if reason.contains("denied") => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let r = (|| {
        if storage.put(&name, b"2".to_vec(), PutMode::Create)? != PutOutcome::Exists {
            return Err(bad("If-None-Match"));
        }
        let wrong = PutMode::Update("\"dsv-probe-no-such-tag\"".into());
        if storage.put(&name, b"3".to_vec(), wrong)? != PutOutcome::Changed {
            return Err(bad("If-Match"));
        }
        Ok(())
    })();
    let _ = storage.delete(&name);
    r
}

fn ensure_manifest(repo: &Repo, storage: &dyn PackStorage) -> Result<()> {
    if read_manifest(storage)?.is_some() {
        return Ok(());
    }
    // A new remote: make sure its writes can be conditional before relying on it.
    check_conditional_writes(storage)?;
    let m = Manifest {
        format: doc::FORMAT,
        features: Vec::new(),
        created_ms: dsv_store::store::now_ms(),
        chunking: Some(repo.store().config().chunking),
    };
    match storage.put(doc::MANIFEST, json(&m), PutMode::Create)? {
        PutOutcome::Written(_) => Ok(()),
        // Another writer created it first: check what it wrote.
        _ => read_manifest(storage).map(|_| ()),
    }
}

/// Adds a remote. With `check`, first reads the remote's manifest, which
/// proves the URL, the endpoint, the credentials and the bucket (an empty
/// remote is fine; a newer one is refused). Returns the manifest.
pub fn add_remote(
    repo: &Repo,
    name: &str,
    rec: RemoteRecord,
    connect: &Connect,
    check: bool,
) -> Result<Option<Manifest>> {
    keys::check_name(name)?;
    crate::open::parse_url(&rec.url)?;
    if remotes(repo)?.iter().any(|(n, _)| n == name) {
        return Err(Error::RemoteExists(name.to_string()));
    }
    let manifest = if check {
        let storage = open_storage(&rec, connect)?;
        let m = probe(&*storage)?;
        check_conditional_writes(&*storage)?;
        m
    } else {
        None
    };
    repo.store()
        .enable_ro_compat_feature(dsv_store::config::FEATURE_REMOTES)?;
    let mut exists = false;
    repo.store().write(|kv| {
        let mut b = Batch::default();
        exists = kv.get(Cf::App, &keys::remote(name))?.is_some();
        if !exists {
            b.put(Cf::App, keys::remote(name), json(&rec));
        }
        Ok((b, ()))
    })?;
    if exists {
        return Err(Error::RemoteExists(name.to_string()));
    }
    Ok(manifest)
}

/// Removes a remote and everything recorded about it (its index and
/// tracking documents). Chunks a lazy clone has not downloaded can no
/// longer be read.
pub fn remove_remote(repo: &Repo, name: &str) -> Result<()> {
    if get_remote(repo, name)?.primary {
        return Err(invalid(format!(
            "'{name}' holds this repository's packs (init --objects); it cannot be removed"
        )));
    }
    get_remote(repo, name)?;
    repo.store().write(|kv| {
        let mut b = Batch::default();
        b.delete(Cf::App, keys::remote(name));
        for p in [keys::REMOTE_INDEX, keys::REMOTE_PACK, keys::REMOTE_TRACKING] {
            kv.scan(Cf::App, &keys::scoped(p, name), &mut |k, _| {
                b.delete(Cf::App, k.to_vec());
                Ok(true)
            })?;
        }
        Ok((b, ()))
    })?;
    Ok(())
}

// ---- the remote's index ------------------------------------------------------

fn has(kv: &dyn KvRead, name: &str, id: &[u8; 32]) -> Result<bool> {
    Ok(kv.contains(Cf::App, &keys::index_entry(name, id))?)
}

fn loc_of(kv: &dyn KvRead, name: &str, id: &[u8; 32]) -> Result<Option<RemoteLoc>> {
    match kv.get(Cf::App, &keys::index_entry(name, id))? {
        Some(v) => Ok(Some(RemoteLoc::decode(&v)?)),
        None => Ok(None),
    }
}

fn record_packs(repo: &Repo, name: &str, packs: &[(String, u64, Vec<IndexEntry>)]) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    repo.store().write(|_| {
        let mut b = Batch::default();
        for (hash, size, entries) in packs {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(hash, &mut raw).map_err(|_| {
                dsv_store::Error::corrupted(format!("pack name {hash}"), "not 64 hex digits")
            })?;
            b.put(Cf::App, keys::pack(name, hash), size.to_le_bytes().to_vec());
            for e in entries {
                // A later pack holding the same record is as good a place.
                let k = keys::index_entry(name, &e.id);
                let loc = RemoteLoc {
                    pack: raw,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    raw_len: e.raw_len,
                    codec: e.codec,
                    kind: match e.kind {
                        EntryKind::Chunk => 0,
                        EntryKind::Object => 1,
                    },
                };
                b.put(Cf::App, k, loc.encode());
            }
        }
        Ok((b, ()))
    })?;
    Ok(())
}

/// Reads the indexes of the remote's packs this repository has not read
/// yet; returns how many.
pub fn sync_index(repo: &Repo, name: &str, storage: &dyn PackStorage) -> Result<usize> {
    let listed = storage.list("packs/")?;
    let kv = repo.store().reader();
    let mut known: HashSet<String> = HashSet::new();
    let scope = keys::scoped(keys::REMOTE_PACK, name);
    kv.scan(Cf::App, &scope, &mut |k, _| {
        known.insert(String::from_utf8_lossy(&k[scope.len()..]).into_owned());
        Ok(true)
    })?;
    let mut present: HashSet<&str> = HashSet::new();
    let mut new = Vec::new();
    for l in &listed {
        let Some(h) = doc::pack_hash(&l.name) else {
            continue;
        };
        present.insert(h);
        if !known.contains(h) {
            new.push((l.name.clone(), h.to_string(), l.size));
        }
    }
    drop(kv);
    // Packs that are gone (a bucket emptied or recreated at the same URL):
    // forget what they held, so that a push sends it again.
    let gone: HashSet<[u8; 32]> = known
        .iter()
        .filter(|h| !present.contains(h.as_str()))
        .filter_map(|h| {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(h, &mut raw).ok().map(|()| raw)
        })
        .collect();
    if !gone.is_empty() {
        repo.store().write(|kv| {
            let mut b = Batch::default();
            for h in &gone {
                b.delete(Cf::App, keys::pack(name, &hex::encode(h)));
            }
            kv.scan(
                Cf::App,
                &keys::scoped(keys::REMOTE_INDEX, name),
                &mut |k, v| {
                    if v.len() == 50 && gone.contains(&v[..32]) {
                        b.delete(Cf::App, k.to_vec());
                    }
                    Ok(true)
                },
            )?;
            Ok((b, ()))
        })?;
    }
    // New packs' indexes, a thousand packs per round (bounded memory; each
    // round is recorded).
    let mut total = 0;
    for batch in new.chunks(1000) {
        total += index_packs(repo, name, storage, batch)?;
    }
    Ok(total)
}

fn index_packs(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    new: &[(String, String, u64)],
) -> Result<usize> {
    let sized: Vec<(String, u64)> = new.iter().map(|(n, _, size)| (n.clone(), *size)).collect();
    let indexes = read_indexes(storage, &sized)?;
    let packs: Vec<_> = new
        .iter()
        .zip(indexes)
        .map(|((_, h, size), entries)| (h.clone(), *size, entries))
        .collect();
    record_packs(repo, name, &packs)?;
    Ok(packs.len())
}

/// Reads the indexes of packs `(object name, size)`: one ranged read of
/// each pack's tail, a second for an index longer than the tail.
pub(crate) fn read_indexes(
    storage: &dyn PackStorage,
    packs: &[(String, u64)],
) -> Result<Vec<Vec<IndexEntry>>> {
    let what = |n: &str| format!("{}/{n}", storage.location());
    let reqs: Vec<_> = packs
        .iter()
        .map(|(n, size)| (n.clone(), size.saturating_sub(TAIL_READ)..*size))
        .collect();
    let tails = storage.get_ranges(&reqs, &|_| {})?;
    let mut trailers = Vec::with_capacity(packs.len());
    let mut indexes: Vec<Option<Vec<u8>>> = Vec::with_capacity(packs.len());
    let mut second = Vec::new();
    for (i, ((n, size), tail)) in packs.iter().zip(&tails).enumerate() {
        let t = dsv_store::bundle::parse_trailer(tail, *size, &what(n))?;
        let tail_start = size - tail.len() as u64;
        if t.index_offset >= tail_start {
            let from = (t.index_offset - tail_start) as usize;
            indexes.push(Some(tail[from..tail.len() - TRAILER_LEN as usize].to_vec()));
        } else {
            indexes.push(None);
            second.push((i, (n.clone(), t.index_offset..size - TRAILER_LEN)));
        }
        trailers.push(t);
    }
    if !second.is_empty() {
        let reqs: Vec<_> = second.iter().map(|(_, r)| r.clone()).collect();
        let got = storage.get_ranges(&reqs, &|_| {})?;
        for ((i, _), idx) in second.iter().zip(got) {
            indexes[*i] = Some(idx);
        }
    }
    packs
        .iter()
        .zip(&trailers)
        .zip(indexes)
        .map(|(((n, _), t), idx)| {
            Ok(dsv_store::bundle::parse_index(
                &idx.unwrap_or_default(),
                t,
                &what(n),
            )?)
        })
        .collect()
}

// ---- documents ------------------------------------------------------------------

fn read_doc(
    storage: &dyn PackStorage,
    id: &DatasetId,
) -> Result<Option<(DatasetDoc, Option<String>)>> {
    let name = doc::dataset_doc(id);
    let Some(got) = storage.get(&name)? else {
        return Ok(None);
    };
    parse_doc(storage, &name, &got.data).map(|d| Some((d, got.etag)))
}

pub(crate) fn parse_doc(storage: &dyn PackStorage, name: &str, data: &[u8]) -> Result<DatasetDoc> {
    let location = format!("{}/{name}", storage.location());
    let d: DatasetDoc = serde_json::from_slice(data).map_err(|e| Error::BadRemote {
        location: location.clone(),
        reason: format!("not a dataset document: {e}"),
    })?;
    if d.format > doc::FORMAT {
        return Err(Error::NewerFormat {
            location,
            found: d.format,
            features: Vec::new(),
            supported: doc::FORMAT,
        });
    }
    Ok(d)
}

fn tracking(repo: &Repo, name: &str, id: &DatasetId) -> Result<Option<Tracking>> {
    match repo
        .store()
        .reader()
        .get(Cf::App, &keys::tracking(name, id))?
    {
        Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(|e| {
            dsv_store::Error::corrupted(format!("remote tracking of dataset {id}"), e.to_string())
        })?)),
        None => Ok(None),
    }
}

/// Three-way merge of a version's tags and metadata: `base` as last seen
/// on the remote, `ours` here, `theirs` on the remote now. `Err(())` when
/// both changed it differently.
fn merge_mutable<'a>(
    base: Option<&'a VersionHeader>,
    ours: &'a VersionHeader,
    theirs: &'a VersionHeader,
) -> std::result::Result<&'a VersionHeader, ()> {
    if ours.mutable() == theirs.mutable() {
        return Ok(theirs);
    }
    match base {
        Some(b) if b.mutable() == theirs.mutable() => Ok(ours),
        Some(b) if b.mutable() == ours.mutable() => Ok(theirs),
        _ => Err(()),
    }
}

// ---- push -------------------------------------------------------------------------

/// What to push.
#[derive(Debug, Clone)]
pub enum PushTarget {
    /// Every version of a dataset.
    Dataset(Dataset),
    /// One version (and those of its ancestors in its dataset the remote
    /// lacks).
    Version(Dataset, VersionId),
}

/// One dataset's push.
#[derive(Debug, Clone, Serialize)]
pub struct PushedDataset {
    /// `project/name`.
    pub dataset: String,
    /// Dataset id.
    pub id: String,
    /// Versions the remote got.
    pub versions_sent: Vec<String>,
    /// `pushed` or `up to date`.
    pub status: String,
}

/// What a push did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushReport {
    /// The remote.
    pub remote: String,
    /// Per dataset published (or up to date).
    pub datasets: Vec<PushedDataset>,
    /// Datasets the remote refused ([`push_to`] turns the first into
    /// [`Error::Rejected`]; [`push_report`] returns them here).
    pub rejected: Vec<Rejection>,
    /// Packs uploaded.
    pub packs: usize,
    /// Bytes uploaded in packs.
    pub uploaded_bytes: u64,
    /// Chunks sent.
    pub chunks: usize,
    /// Metadata objects sent.
    pub objects: usize,
    /// Models sent (record and body).
    pub models: usize,
    /// Models not sent because a dataset version they were trained on is
    /// not on the remote (push those datasets too).
    pub models_held_back: usize,
}

fn lazy_hint(c: &ChunkId) -> Error {
    invalid(format!(
        "chunk {c} is not stored in this repository (a lazy clone reads it from its remote); \
         run 'dsv dataset prefetch' on the versions to push first"
    ))
}

/// What a push sends: objects with their records (children before
/// parents) and chunks with their locations here.
type Missing = (
    Vec<(ObjectId, dsv_store::import::ObjectRecord)>,
    Vec<(ChunkId, dsv_store::schema::ChunkLoc)>,
);

/// Objects (children before parents) and chunks below `roots` that the
/// remote `name` does not hold; each object and chunk index entry is read
/// once.
fn missing_below(repo: &Repo, name: &str, roots: &[VersionId]) -> Result<Missing> {
    let store = repo.store();
    let kv = store.reader();
    // A remote this repository knows nothing of (a first push) holds
    // nothing of ours: no lookups.
    let mut any = false;
    kv.scan(
        Cf::App,
        &keys::scoped(keys::REMOTE_INDEX, name),
        &mut |_, _| {
            any = true;
            Ok(false)
        },
    )?;
    let has = |kv: &dyn KvRead, name: &str, id: &[u8; 32]| -> Result<bool> {
        if any {
            has(kv, name, id)
        } else {
            Ok(false)
        }
    };
    let mut objs = Vec::new();
    let mut chunks = Vec::new();
    let mut seen_o: HashSet<ObjectId> = HashSet::new();
    let mut seen_c: HashSet<ChunkId> = HashSet::new();
    let mut pending: HashMap<ObjectId, dsv_store::import::ObjectRecord> = HashMap::new();
    let mut stack: Vec<(ObjectId, bool)> =
        roots.iter().rev().map(|v| (ObjectId(v.0), false)).collect();
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            let rec = pending.remove(&id).expect("read when expanded");
            objs.push((id, rec));
            continue;
        }
        if !seen_o.insert(id) || has(&*kv, name, id.as_bytes())? {
            continue;
        }
        let (obj, rec) = store.object_with_record(&id)?;
        pending.insert(id, rec);
        let (children, cs) = references(&obj);
        stack.push((id, true));
        for c in children.into_iter().rev() {
            if !seen_o.contains(&c) {
                stack.push((c, false));
            }
        }
        for c in cs {
            if seen_c.insert(c) && !has(&*kv, name, c.as_bytes())? {
                let loc = store.chunk_loc(&c).map_err(|e| match e {
                    dsv_store::Error::NotFound { .. } => lazy_hint(&c),
                    e => e.into(),
                })?;
                chunks.push((c, loc));
            }
        }
    }
    Ok((objs, chunks))
}

type Built = Mutex<Vec<(String, u64, Vec<IndexEntry>)>>;

/// Finishes a pack: names it, records its index in `built`, returns it
/// for upload.
fn seal(b: BundleBuilder, built: &Built) -> (String, Vec<u8>) {
    let p = b.finish();
    let name = doc::pack_name(&p.hash);
    built
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((p.hash, p.bytes.len() as u64, p.entries));
    (name, p.bytes)
}

/// Packs of about [`PACK_TARGET`] bytes of the objects to push (read
/// already, children before parents), in order.
fn object_bundles<'a>(
    objs: &'a [(ObjectId, dsv_store::import::ObjectRecord)],
    built: &'a Built,
) -> impl Iterator<Item = (String, Vec<u8>)> + 'a {
    let mut it = objs.iter().peekable();
    std::iter::from_fn(move || {
        it.peek()?;
        let mut b = BundleBuilder::new();
        for (o, r) in it.by_ref() {
            b.add(EntryKind::Object, o.0, r.codec, r.raw_len, &r.data);
            if b.len() >= PACK_TARGET {
                break;
            }
        }
        Some(seal(b, built))
    })
}

/// The labeling tool's "upload" button in one call: makes `dataset`
/// (`PROJECT/NAME`)'s newest version match `folder` (see [`Repo::sync`])
/// and pushes the dataset to the remote `remote`. The remote is checked
/// before anything is written here.
pub fn sync_and_push(
    repo: &Repo,
    remote: &str,
    dataset: &str,
    folder: &std::path::Path,
    opts: &dsv::repo::SyncOptions<'_>,
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<(dsv::repo::SyncOutcome, PushReport)> {
    let (project, name) = dsv::rev::parse_dataset_name(dataset)?;
    let rec = get_remote(repo, remote)?;
    let storage = open_storage(&rec, connect)?;
    probe(&*storage)?;
    let out = repo.sync(&project, &name, folder, opts)?;
    let ds = repo
        .dataset(&project, &name)?
        .ok_or_else(|| invalid(format!("dataset not found: {dataset}")))?;
    let report = push_to(
        repo,
        remote,
        &*storage,
        &[PushTarget::Dataset(ds)],
        progress,
    )?;
    Ok((out, report))
}

/// Packs of about [`PACK_TARGET`] bytes of the chunks to push, produced
/// lazily: each pack's chunks are read from the local packs
/// and checked against their ids in parallel first, so a chunk damaged here
/// never reaches the remote (where every other repository would trust it).
fn chunk_bundles<'a>(
    store: &'a dsv_store::Store,
    chunks: &'a [(ChunkId, dsv_store::schema::ChunkLoc)],
    built: &'a Built,
) -> impl Iterator<Item = dsv_store::Result<(String, Vec<u8>)>> + 'a {
    use rayon::prelude::*;
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= chunks.len() {
            return None;
        }
        let start = at;
        let mut size = 0u64;
        while at < chunks.len() && size < PACK_TARGET {
            size += chunks[at].1.stored_len as u64 + dsv_store::pack::RECORD_HEADER_LEN;
            at += 1;
        }
        let group = &chunks[start..at];
        if store.pack_storage().is_some() {
            // A team repository: the chunks of other machines' packs in a
            // few coalesced reads of the shared object store, not one each.
            let ids: Vec<ChunkId> = group.iter().map(|(c, _)| *c).collect();
            if let Err(e) = store.prefetch_missing(&ids) {
                failed = true;
                return Some(Err(e));
            }
        }
        let datas: dsv_store::Result<Vec<Vec<u8>>> = group
            .iter()
            .map(|(c, l)| store.read_stored_at(c, l))
            .collect();
        let checked = datas.and_then(|datas| {
            group
                .par_iter()
                .zip(datas.par_iter())
                .try_for_each(|((c, l), d)| {
                    dsv_store::compress::decode_chunk(c, l.codec, d, l.raw_len).map(|_| ())
                })
                .map(|()| datas)
        });
        let datas = match checked {
            Ok(d) => d,
            Err(e) => {
                failed = true;
                return Some(Err(e));
            }
        };
        let mut b = BundleBuilder::new();
        for ((c, l), d) in group.iter().zip(&datas) {
            b.add(EntryKind::Chunk, c.0, l.codec, l.raw_len, d);
        }
        Some(Ok(seal(b, built)))
    })
}

/// Pushes datasets or versions to the remote `name`.
pub fn push(
    repo: &Repo,
    name: &str,
    targets: &[PushTarget],
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<PushReport> {
    let rec = get_remote(repo, name)?;
    let storage = open_storage(&rec, connect)?;
    let report = push_to(repo, name, &*storage, targets, progress)?;
    // The object store of an `init --objects` repository: what it now keeps
    // alive needs no local copy.
    if rec.primary {
        crate::objects::evict_published(repo, name)?;
    }
    Ok(report)
}

/// [`push`] on an opened storage: under a push lease (see [`crate::lease`]),
/// so that no remote gc runs meanwhile.
pub fn push_to(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    targets: &[PushTarget],
    progress: &dyn Progress,
) -> Result<PushReport> {
    let mut report = push_report(repo, name, storage, targets, progress)?;
    if !report.rejected.is_empty() {
        let r = report.rejected.remove(0);
        return Err(Error::Rejected {
            dataset: r.dataset,
            remote: r.remote,
            reason: r.reason,
        });
    }
    Ok(report)
}

/// [`push_to`], with the datasets the remote refused in the report
/// instead of an error (the others are published).
pub fn push_report(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    targets: &[PushTarget],
    progress: &dyn Progress,
) -> Result<PushReport> {
    ensure_manifest(repo, storage)?;
    crate::lease::with_lease(storage, crate::lease::LeaseKind::Push, |held| {
        push_leased(repo, name, storage, targets, progress, held)
    })
}

fn push_leased(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    targets: &[PushTarget],
    progress: &dyn Progress,
    held: &crate::lease::Held,
) -> Result<PushReport> {
    sync_index(repo, name, storage)?;
    let mut report = PushReport {
        remote: name.to_string(),
        ..Default::default()
    };
    // What each dataset publishes, and the versions whose content goes up.
    struct Plan {
        ds: Dataset,
        local: Vec<VersionHeader>,
        publish: HashSet<VersionId>,
    }
    let mut plans: Vec<Plan> = Vec::new();
    for t in targets {
        let (ds, only) = match t {
            PushTarget::Dataset(ds) => (ds.clone(), None),
            PushTarget::Version(ds, v) => (ds.clone(), Some(*v)),
        };
        let local = repo.version_headers(&ds)?;
        let publish: HashSet<VersionId> = match only {
            None => local.iter().map(|v| v.id).collect(),
            Some(v) => {
                // The version and its ancestors in this dataset.
                let ids: HashSet<VersionId> = local.iter().map(|h| h.id).collect();
                let mut out = HashSet::new();
                let mut stack = vec![v];
                while let Some(x) = stack.pop() {
                    if ids.contains(&x) && out.insert(x) {
                        stack.extend(repo.version(&x)?.parents);
                    }
                }
                out
            }
        };
        match plans.iter_mut().find(|p| p.ds.id == ds.id) {
            Some(p) => p.publish.extend(publish),
            None => plans.push(Plan { ds, local, publish }),
        }
    }
    // Content first: everything below the published versions the remote lacks.
    let mut roots: Vec<VersionId> = Vec::new();
    for p in &plans {
        for v in &p.local {
            if p.publish.contains(&v.id) {
                roots.push(v.id);
            }
        }
    }
    // Chunks in walk order, file by file: each file's chunks lie together in
    // the remote's packs, so a lazy read of a file is a few coalesced ranges
    // (local packs interleave files that were ingested in parallel).
    let (objs, chunks) = missing_below(repo, name, &roots)?;
    let store = repo.store();
    if !chunks.is_empty() {
        // The bar's total: the chunks' stored bytes and record headers.
        let total: u64 = chunks
            .iter()
            .map(|(_, l)| l.stored_len as u64 + dsv_store::pack::RECORD_HEADER_LEN)
            .sum();
        progress.phase("uploading chunks", Some(total));
        let built: Built = Mutex::new(Vec::new());
        let mut gen = chunk_bundles(store, &chunks, &built);
        let res = storage.put_many(&mut gen, &|n| progress.bytes(n));
        drop(gen);
        let built = built.into_inner().unwrap_or_else(|e| e.into_inner());
        // Recorded once every upload succeeded; after a failure the next
        // push finds the packs that did go up by listing (their names are
        // content hashes) and reads their indexes.
        if res.is_ok() {
            record_packs(repo, name, &built)?;
        }
        let n = res?;
        progress.finish_phase();
        report.uploaded_bytes += n;
        report.packs += built.len();
        report.chunks = chunks.len();
    }
    if !objs.is_empty() {
        progress.phase("uploading metadata", None);
        let built: Built = Mutex::new(Vec::new());
        // One at a time, in order: children's packs land before parents'.
        for item in object_bundles(&objs, &built) {
            let mut one = std::iter::once(Ok(item));
            report.uploaded_bytes += storage.put_many(&mut one, &|n| progress.bytes(n))?;
        }
        let built = built.into_inner().unwrap_or_else(|e| e.into_inner());
        record_packs(repo, name, &built)?;
        progress.finish_phase();
        report.packs += built.len();
        report.objects = objs.len();
    }
    // Then publish each dataset with a conditional write — only while
    // this push's lease held all along (no gc can have deleted what it
    // skipped as already on the remote).
    if !plans.is_empty() {
        held.check_still_alone(storage)?;
    }
    // A dataset the remote refuses does not stop the others (git's
    // per-ref results); the refusals are reported together.
    for p in &plans {
        match publish(repo, name, storage, p.ds.clone(), &p.local, &p.publish) {
            Ok(d) => report.datasets.push(d),
            Err(Error::Rejected {
                dataset,
                remote,
                reason,
            }) => report.rejected.push(Rejection {
                dataset,
                remote,
                reason,
            }),
            Err(e) => return Err(e),
        }
    }
    push_models(repo, name, storage, &mut report)?;
    Ok(report)
}

/// A dataset a push could not publish.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// PROJECT/NAME.
    pub dataset: String,
    /// The remote.
    pub remote: String,
    /// Why, and what to do.
    pub reason: String,
}

/// Sends the models the remote lacks whose training datasets are all on it:
/// the body first, then the document, both create-only.
fn push_models(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    report: &mut PushReport,
) -> Result<()> {
    let local = repo.models(None)?;
    if local.is_empty() {
        return Ok(());
    }
    let on_remote: HashSet<String> = storage
        .list("models/")?
        .iter()
        .filter_map(|l| doc::model_id(&l.name).map(str::to_string))
        .collect();
    let kv = repo.store().reader();
    for m in local {
        if on_remote.contains(&m.id) {
            continue;
        }
        let mut all_there = true;
        for d in &m.datasets {
            let mut raw = [0u8; 32];
            if hex::decode_to_slice(d, &mut raw).is_err() || !has(&*kv, name, &raw)? {
                all_there = false;
                break;
            }
        }
        if !all_there {
            report.models_held_back += 1;
            continue;
        }
        let body = repo.model_body(&m)?;
        let d = doc::ModelDoc {
            format: doc::FORMAT,
            body_blake3: blake3::hash(&body).to_hex().to_string(),
            body_len: body.len() as u64,
            model: m.clone(),
        };
        let n = body.len() as u64;
        let body_name = doc::model_body(&m.id);
        if storage.put(&body_name, body.clone(), PutMode::Create)? == PutOutcome::Exists {
            // Left by a push that died before its document: the same bytes,
            // unless something else wrote there (then ours replace them —
            // the model's id is this repository's).
            let same = storage.get(&body_name)?.is_some_and(|g| g.data == body);
            if !same {
                storage.put(&body_name, body, PutMode::Overwrite)?;
            }
        }
        if storage.put(&doc::model_doc(&m.id), json(&d), PutMode::Create)? == PutOutcome::Exists {
            continue;
        }
        report.models += 1;
        report.uploaded_bytes += n;
    }
    Ok(())
}

/// A model imported by a fetch.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedModel {
    /// Its id.
    pub id: String,
    /// PROJECT/NAME.
    pub line: String,
    /// Its tags here.
    pub tags: Vec<String>,
    /// Exclusive tags (`production`, `canary`) it had on the remote that a
    /// model here holds: not taken over.
    pub dropped_tags: Vec<String>,
}

/// The largest model document and body a fetch accepts.
const MODEL_DOC_MAX: u64 = 1 << 20;
const MODEL_BODY_MAX: u64 = 1 << 30;

/// Imports the remote's models this repository lacks; each body is checked
/// against the BLAKE3 its document names. A model that cannot be imported
/// (damaged, too large, newer format, invalid) is skipped and named in
/// `problems`; it never stops the fetch.
fn fetch_models(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    problems: &mut Vec<(String, String)>,
) -> Result<Vec<FetchedModel>> {
    let mut out = Vec::new();
    let listed = storage.list("models/")?;
    for l in &listed {
        let Some(id) = doc::model_id(&l.name) else {
            continue;
        };
        if repo.model(id).is_ok_and(|m| m.id == id) {
            continue;
        }
        let location = format!("{}/{}", storage.location(), l.name);
        match fetch_model(repo, name, storage, id, l.size, &location) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => {}
            Err(e @ (Error::BadRemote { .. } | Error::NewerFormat { .. })) => {
                problems.push((location, e.to_string()))
            }
            Err(Error::Repo(dsv::Error::Invalid(why))) => problems.push((location, why)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn fetch_model(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    id: &str,
    size: u64,
    location: &str,
) -> Result<Option<FetchedModel>> {
    let bad = |reason: String| Error::BadRemote {
        location: location.to_string(),
        reason,
    };
    if size > MODEL_DOC_MAX {
        return Err(bad(format!("{size} bytes: not a model document")));
    }
    let Some(got) = storage.get(&doc::model_doc(id))? else {
        return Ok(None);
    };
    let d: doc::ModelDoc =
        serde_json::from_slice(&got.data).map_err(|e| bad(format!("not a model document: {e}")))?;
    if d.format > doc::FORMAT {
        return Err(Error::NewerFormat {
            location: location.to_string(),
            found: d.format,
            features: Vec::new(),
            supported: doc::FORMAT,
        });
    }
    if d.model.id != id {
        return Err(bad(format!(
            "names model {} under the name of {id}",
            d.model.id
        )));
    }
    if d.body_len > MODEL_BODY_MAX {
        return Err(bad(format!("a body of {} bytes is refused", d.body_len)));
    }
    let body_name = doc::model_body(id);
    let body_loc = format!("{}/{body_name}", storage.location());
    let body = storage
        .get(&body_name)?
        .ok_or_else(|| Error::BadRemote {
            location: body_loc.clone(),
            reason: "the model's body is missing".into(),
        })?
        .data;
    let hash = blake3::hash(&body).to_hex();
    if body.len() as u64 != d.body_len || hash.as_str() != d.body_blake3 {
        return Err(Error::BadRemote {
            location: body_loc,
            reason: format!(
                "damaged: {} bytes hashing to {hash}, the document says {} bytes hashing to {}",
                body.len(),
                d.body_len,
                d.body_blake3
            ),
        });
    }
    let Some(dropped) = repo.import_model(&d.model, &body, name)? else {
        return Ok(None);
    };
    let tags = d
        .model
        .tags
        .iter()
        .filter(|t| !dropped.contains(t))
        .cloned()
        .collect();
    Ok(Some(FetchedModel {
        id: id.to_string(),
        line: format!("{}/{}", d.model.project, d.model.name),
        tags,
        dropped_tags: dropped,
    }))
}

fn publish(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    ds: Dataset,
    local: &[VersionHeader],
    publish: &HashSet<VersionId>,
) -> Result<PushedDataset> {
    let header: DatasetHeader = repo.dataset_header(&ds)?;
    let doc_name = doc::dataset_doc(&ds.id);
    let base = tracking(repo, name, &ds.id)?;
    let local_ids: HashSet<VersionId> = local.iter().map(|v| v.id).collect();
    let by_id: HashMap<VersionId, &VersionHeader> = local.iter().map(|v| (v.id, v)).collect();
    let reject = |reason: String| Error::Rejected {
        dataset: ds.full_name(),
        remote: name.to_string(),
        reason,
    };
    for _ in 0..DOC_TRIES {
        let current = read_doc(storage, &ds.id)?;
        let (remote_versions, etag) = match &current {
            Some((d, e)) => (d.versions.clone(), e.clone()),
            None => (Vec::new(), None),
        };
        let lacking: Vec<&VersionHeader> = remote_versions
            .iter()
            .filter(|v| !local_ids.contains(&v.id))
            .collect();
        if !lacking.is_empty() {
            let some: Vec<&str> = lacking.iter().take(3).map(|v| v.version.as_str()).collect();
            return Err(reject(format!(
                "the remote has {} version(s) this repository lacks ({}{}); run 'dsv pull {name}' first",
                lacking.len(),
                some.join(", "),
                if lacking.len() > 3 { ", …" } else { "" }
            )));
        }
        let mut versions = Vec::with_capacity(local.len());
        let mut on_remote = HashSet::new();
        for theirs in &remote_versions {
            on_remote.insert(theirs.id);
            let ours = by_id[&theirs.id];
            let b = base
                .as_ref()
                .and_then(|t| t.doc.versions.iter().find(|v| v.id == theirs.id));
            match merge_mutable(b, ours, theirs) {
                Ok(m) => versions.push(m.clone()),
                Err(()) => {
                    return Err(reject(format!(
                        "the tags or metadata of version {} changed both here and on the remote; \
                         run 'dsv pull {name}' first",
                        theirs.version
                    )))
                }
            }
        }
        let mut sent = Vec::new();
        for v in local {
            if publish.contains(&v.id) && !on_remote.contains(&v.id) {
                versions.push(v.clone());
                sent.push(v.version.clone());
            }
        }
        let doc = DatasetDoc {
            format: doc::FORMAT,
            dataset: header.clone(),
            versions,
            updated_ms: dsv_store::store::now_ms(),
        };
        let unchanged = current
            .as_ref()
            .is_some_and(|(d, _)| d.versions == doc.versions && d.dataset == doc.dataset);
        if unchanged {
            save_tracking(
                repo,
                name,
                &ds.id,
                &Tracking {
                    etag,
                    doc: current.expect("some").0,
                },
            )?;
            return Ok(PushedDataset {
                dataset: ds.full_name(),
                id: ds.id.to_string(),
                versions_sent: Vec::new(),
                status: "up to date".into(),
            });
        }
        let mode = match (&current, etag) {
            (None, _) => PutMode::Create,
            (Some(_), Some(e)) => PutMode::Update(e),
            (Some(_), None) => {
                return Err(Error::BadRemote {
                    location: format!("{}/{doc_name}", storage.location()),
                    reason: "the storage gave no entity tag; conditional writes are impossible"
                        .into(),
                })
            }
        };
        match storage.put(&doc_name, json(&doc), mode)? {
            PutOutcome::Written(etag) => {
                save_tracking(repo, name, &ds.id, &Tracking { etag, doc })?;
                return Ok(PushedDataset {
                    dataset: ds.full_name(),
                    id: ds.id.to_string(),
                    versions_sent: sent,
                    status: "pushed".into(),
                });
            }
            // Someone wrote it since we read it: read again and re-decide.
            PutOutcome::Exists | PutOutcome::Changed => continue,
        }
    }
    Err(reject(format!(
        "the remote's document kept changing ({DOC_TRIES} attempts); run the push again"
    )))
}

fn save_tracking(repo: &Repo, name: &str, id: &DatasetId, t: &Tracking) -> Result<()> {
    repo.store().write(|_| {
        let mut b = Batch::default();
        b.put(Cf::App, keys::tracking(name, id), json(t));
        Ok((b, ()))
    })?;
    Ok(())
}

// ---- fetch / pull -----------------------------------------------------------------

/// How much a fetch downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchMode {
    /// Versions and their metadata; chunks are read on demand (and kept in
    /// the cache) when a file is read.
    Metadata,
    /// Also every chunk of the versions fetched (they work offline).
    Full,
}

/// One dataset's fetch.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedDataset {
    /// `project/name` here.
    pub dataset: String,
    /// Dataset id.
    pub id: String,
    /// The dataset was created here.
    pub created: bool,
    /// Version strings imported.
    pub imported: Vec<String>,
    /// Local versions moved after them: (old, new) version strings.
    pub rebased: Vec<(String, String)>,
    /// Versions whose tags or metadata were updated.
    pub updated: usize,
    /// Versions whose tags or metadata changed both here and on the remote
    /// (kept as they are here).
    pub conflicts: Vec<String>,
}

/// What a fetch did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FetchReport {
    /// The remote.
    pub remote: String,
    /// The remote holds nothing yet.
    pub empty_remote: bool,
    /// Per dataset with news.
    pub datasets: Vec<FetchedDataset>,
    /// Pack indexes read.
    pub packs_indexed: usize,
    /// Metadata bytes downloaded.
    pub metadata_bytes: u64,
    /// Chunks downloaded (pull).
    pub chunks: u64,
    /// Chunk bytes downloaded (pull).
    pub chunk_bytes: u64,
    /// Models imported.
    pub models: Vec<FetchedModel>,
    /// Models on the remote that were skipped: `(where, why)`.
    pub model_problems: Vec<(String, String)>,
}

/// Objects with their canonical encodings.
type Objects = Vec<(ObjectId, Vec<u8>)>;

/// Downloads the objects below `roots` this repository lacks. Also
/// returns the chunks those objects reference, each once, and the bytes
/// read.
fn fetch_objects(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    roots: Vec<ObjectId>,
    progress: &dyn Progress,
) -> Result<(Objects, Vec<ChunkId>, u64)> {
    let store = repo.store();
    let kv = store.reader();
    let mut out = Vec::new();
    let mut chunks = Vec::new();
    let mut seen = HashSet::new();
    let mut frontier = roots;
    let mut bytes = 0u64;
    while !frontier.is_empty() {
        let mut want = Vec::new();
        for id in frontier.drain(..) {
            if !seen.insert(id) || store.has_object(&id)? {
                continue;
            }
            let loc = loc_of(&*kv, name, id.as_bytes())?.ok_or_else(|| Error::BadRemote {
                location: storage.location(),
                reason: format!(
                    "object {id} is in none of the remote's packs (a push that did not finish, or a pack removed)"
                ),
            })?;
            want.push((id.0, loc));
        }
        want.sort_by_key(|(_, l)| (l.pack, l.offset));
        for batch in want.chunks(4096) {
            let got = fetch_records(storage, batch, &|n| progress.bytes(n))?;
            for ((id, l), c) in batch.iter().zip(got) {
                bytes += c.stored.len() as u64;
                let what = format!("{}/{}", storage.location(), l.pack_name());
                let canonical = dsv_store::import::decode_object_record(
                    c.codec,
                    &c.stored,
                    c.raw_len,
                    &format!("object {} in {what}", hex::encode(id)),
                )
                .map_err(|e| Error::BadRemote {
                    location: what.clone(),
                    reason: format!("object {} is damaged: {e}", hex::encode(id)),
                })?;
                let oid = ObjectId(*id);
                let obj = dsv_store::import::check_object(&oid, &canonical, &what)?;
                let (children, cs) = references(&obj);
                frontier.extend(children);
                chunks.extend(cs);
                out.push((oid, canonical));
            }
        }
    }
    chunks.sort_unstable();
    chunks.dedup();
    Ok((out, chunks, bytes))
}

/// Fetches every dataset of the remote `name` (or those in `only`). Into
/// a team repository even a metadata-only fetch copies the data of the
/// versions it adds, first: the other machines read only the team's object
/// store.
pub fn fetch(
    repo: &Repo,
    name: &str,
    mode: FetchMode,
    only: Option<&[DatasetId]>,
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<FetchReport> {
    let rec = get_remote(repo, name)?;
    let storage = open_storage(&rec, connect)?;
    fetch_from(repo, name, &*storage, mode, only, progress)
}

/// What [`rebuild_index`] did for one remote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReindexReport {
    /// The remote.
    pub remote: String,
    /// Index entries of the remote dropped before reading it again.
    pub dropped_entries: u64,
    /// Packs whose index was read.
    pub packs: usize,
    /// What the fetch of every dataset on the remote brought.
    pub fetch: FetchReport,
}

/// `fsck --rebuild-index` for a remote: forgets what this repository knew
/// of the remote's packs, reads every pack index again, then fetches the
/// metadata of every dataset on the remote (versions this repository lost
/// or never had come back; data stays lazy).
pub fn rebuild_index(
    repo: &Repo,
    name: &str,
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<ReindexReport> {
    let rec = get_remote(repo, name)?;
    let storage = open_storage(&rec, connect)?;
    // Reachable and readable before anything known of it is dropped.
    storage.check()?;
    if read_manifest(&*storage)?.is_none() {
        return Err(Error::EmptyRemote(storage.location()));
    }
    let mut report = ReindexReport {
        remote: name.to_string(),
        ..Default::default()
    };
    // Dropped a batch at a time (bounded memory on a large remote).
    for prefix in [keys::REMOTE_INDEX, keys::REMOTE_PACK] {
        let scope = keys::scoped(prefix, name);
        loop {
            let n = repo.store().write(|kv| {
                let mut b = Batch::default();
                let mut n = 0u64;
                kv.scan(Cf::App, &scope, &mut |k, _| {
                    b.delete(Cf::App, k.to_vec());
                    n += 1;
                    Ok(n < 100_000)
                })?;
                Ok((b, n))
            })?;
            if prefix == keys::REMOTE_INDEX {
                report.dropped_entries += n;
            }
            if n < 100_000 {
                break;
            }
        }
    }
    progress.phase("reading every pack index of the remote", None);
    report.packs = sync_index(repo, name, &*storage)?;
    progress.finish_phase();
    report.fetch = fetch_from(repo, name, &*storage, FetchMode::Metadata, None, progress)?;
    Ok(report)
}

/// [`fetch`] on an opened storage.
pub fn fetch_from(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    mode: FetchMode,
    only: Option<&[DatasetId]>,
    progress: &dyn Progress,
) -> Result<FetchReport> {
    let mut report = FetchReport {
        remote: name.to_string(),
        ..Default::default()
    };
    if read_manifest(storage)?.is_none() {
        report.empty_remote = true;
        return Ok(report);
    }
    progress.phase("reading the remote's index", None);
    report.packs_indexed = sync_index(repo, name, storage)?;
    let docs = storage.list("datasets/")?;
    progress.finish_phase();
    let mut fetched_versions: Vec<VersionId> = Vec::new();
    for l in docs {
        if !l.name.ends_with(".json") {
            continue;
        }
        let Some(got) = storage.get(&l.name)? else {
            continue;
        };
        let d = parse_doc(storage, &l.name, &got.data)?;
        if only.is_some_and(|o| !o.contains(&d.dataset.id)) {
            continue;
        }
        let local_ds = repo.dataset_by_id(&d.dataset.id)?;
        let local: Vec<VersionHeader> = match &local_ds {
            Some(ds) => repo.version_headers(ds)?,
            None => Vec::new(),
        };
        let by_id: HashMap<VersionId, &VersionHeader> = local.iter().map(|v| (v.id, v)).collect();
        let base = tracking(repo, name, &d.dataset.id)?;
        let incoming: Vec<VersionId> = d
            .versions
            .iter()
            .filter(|v| !by_id.contains_key(&v.id))
            .map(|v| v.id)
            .collect();
        let mut updates = Vec::new();
        let mut conflicts = Vec::new();
        for theirs in &d.versions {
            let Some(ours) = by_id.get(&theirs.id) else {
                continue;
            };
            let b = base
                .as_ref()
                .and_then(|t| t.doc.versions.iter().find(|v| v.id == theirs.id));
            match merge_mutable(b, ours, theirs) {
                Ok(m) if m.mutable() != ours.mutable() => updates.push(m.clone()),
                Ok(_) => {}
                Err(()) => conflicts.push(ours.version.clone()),
            }
        }
        // The copy last seen keeps the old state of versions in conflict,
        // so that a push still sees both sides changed (and is refused)
        // rather than overwriting the remote's.
        let mut seen_doc = d.clone();
        if !conflicts.is_empty() {
            let in_conflict: HashSet<VersionId> = d
                .versions
                .iter()
                .filter(|v| {
                    by_id
                        .get(&v.id)
                        .is_some_and(|o| conflicts.contains(&o.version))
                })
                .map(|v| v.id)
                .collect();
            seen_doc.versions = d
                .versions
                .iter()
                .filter_map(|v| {
                    if !in_conflict.contains(&v.id) {
                        return Some(v.clone());
                    }
                    base.as_ref()
                        .and_then(|t| t.doc.versions.iter().find(|b| b.id == v.id))
                        .cloned()
                })
                .collect();
        }
        let t = Tracking {
            etag: got.etag.clone(),
            doc: seen_doc,
        };
        let extra = vec![(keys::tracking(name, &d.dataset.id), json(&t))];
        if incoming.is_empty() && updates.is_empty() {
            save_tracking(repo, name, &d.dataset.id, &t)?;
            if !conflicts.is_empty() {
                report.datasets.push(FetchedDataset {
                    dataset: local_ds.map(|d| d.full_name()).unwrap_or_default(),
                    id: d.dataset.id.to_string(),
                    created: false,
                    imported: Vec::new(),
                    rebased: Vec::new(),
                    updated: 0,
                    conflicts,
                });
            }
            continue;
        }
        progress.phase(
            &format!("fetching {}/{}", d.dataset.project, d.dataset.name),
            None,
        );
        let (objects, chunks, bytes) = fetch_objects(
            repo,
            name,
            storage,
            incoming.iter().map(|v| ObjectId(v.0)).collect(),
            progress,
        )?;
        report.metadata_bytes += bytes;
        if repo.store().pack_storage().is_some() {
            // A team repository: every chunk of the incoming versions is
            // on the team's object store before the versions reach the
            // shared metadata (where every machine and trigger sees them).
            let mut wanted = Vec::new();
            for c in chunks {
                if !repo.store().has_chunk(&c)? {
                    wanted.push(c);
                }
            }
            let (n, b) = download_chunks(repo, &[(name.to_string(), storage)], &wanted, progress)?;
            report.chunks += n;
            report.chunk_bytes += b;
        }
        let remote_ids: HashSet<VersionId> = d.versions.iter().map(|v| v.id).collect();
        let r = repo.import(
            &d.dataset,
            &d.versions,
            &remote_ids,
            &objects,
            &updates,
            &extra,
        )?;
        progress.finish_phase();
        let ds_name = match repo.dataset_by_id(&d.dataset.id)? {
            Some(ds) => ds.full_name(),
            None => format!("{}/{}", d.dataset.project, d.dataset.name),
        };
        fetched_versions.extend(r.imported.iter().map(|(id, _)| *id));
        report.datasets.push(FetchedDataset {
            dataset: ds_name,
            id: d.dataset.id.to_string(),
            created: r.created_dataset,
            imported: r.imported.iter().map(|(_, v)| v.clone()).collect(),
            rebased: r
                .rebased
                .iter()
                .map(|(_, a, b)| (a.clone(), b.clone()))
                .collect(),
            updated: r.updated.len(),
            conflicts,
        });
    }
    // Models come with a fetch of everything (a fetch of named datasets
    // leaves them).
    if only.is_none() {
        report.models = fetch_models(repo, name, storage, &mut report.model_problems)?;
    }
    if mode == FetchMode::Full {
        let (n, bytes) = prefetch_with(
            repo,
            &[(name.to_string(), storage)],
            &all_live_versions(repo)?,
            progress,
        )?;
        report.chunks += n;
        report.chunk_bytes += bytes;
    }
    let _ = fetched_versions;
    Ok(report)
}

/// What [`clone_into`] needs besides the remote.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// How the new repository's store is opened (lock wait, holder name).
    pub store: dsv_store::StoreOptions,
    /// Metadata only (chunks read on demand) or every chunk.
    pub mode: FetchMode,
    /// Byte budget of the chunk cache of a lazy clone.
    pub cache_budget: u64,
}

/// Creates a repository in `base/.dsv` from the remote `rec` (named
/// `origin`): checks the remote first (nothing is created when it cannot be
/// read or holds no dsv remote), uses the remote's chunking, fetches (and
/// with [`FetchMode::Full`] downloads every chunk). On failure, what it
/// created is removed.
pub fn clone_into(
    base: &std::path::Path,
    mut rec: RemoteRecord,
    connect: &Connect,
    opts: &CloneOptions,
    progress: &dyn Progress,
) -> Result<(Repo, FetchReport)> {
    rec.lazy = opts.mode == FetchMode::Metadata;
    let storage = open_storage(&rec, connect)?;
    let manifest = probe(&*storage)?.ok_or_else(|| Error::EmptyRemote(storage.location()))?;
    drop(storage);
    let dot = base.join(".dsv");
    if dot.exists() {
        return Err(Error::TargetExists(base.to_path_buf()));
    }
    let created_base = !base.exists();
    std::fs::create_dir_all(base).map_err(|e| dsv_store::Error::io("create folder", base, e))?;
    let run = || -> Result<(Repo, FetchReport)> {
        let mut config = dsv_store::RepoConfig::default();
        if let Some(c) = manifest.chunking {
            config.chunking = c;
        }
        let store = dsv_store::Store::init(&dot, config, opts.store.clone())?;
        let repo = Repo::from_store(store);
        add_remote(&repo, "origin", rec.clone(), connect, false)?;
        crate::source::attach(
            repo.store(),
            connect,
            dot.join("remote-cache"),
            opts.cache_budget,
        )?;
        let report = fetch(&repo, "origin", opts.mode, None, connect, progress)?;
        Ok((repo, report))
    };
    run().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dot);
        if created_base {
            let _ = std::fs::remove_dir(base);
        }
    })
}

fn all_live_versions(repo: &Repo) -> Result<Vec<VersionId>> {
    let mut out = Vec::new();
    for ds in repo.datasets()? {
        out.extend(repo.versions(&ds)?.into_iter().map(|v| v.id));
    }
    Ok(out)
}

/// Downloads every chunk of `versions` this repository lacks (from its
/// remotes, lazy clones' first) into its own packs; returns the chunks and
/// bytes downloaded.
pub fn prefetch(
    repo: &Repo,
    versions: &[VersionId],
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let mut rs = remotes(repo)?;
    rs.sort_by_key(|(n, r)| (!r.lazy, n.clone()));
    let opened: Vec<(String, Arc<dyn PackStorage>)> = rs
        .iter()
        .map(|(n, r)| Ok((n.clone(), open_storage(r, connect)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(String, &dyn PackStorage)> =
        opened.iter().map(|(n, s)| (n.clone(), &**s)).collect();
    prefetch_with(repo, &refs, versions, progress)
}

/// Every chunk below `versions` that is not stored here (in walk order).
fn chunks_not_here(repo: &Repo, versions: &[VersionId]) -> Result<Vec<ChunkId>> {
    let store = repo.store();
    let mut missing: Vec<ChunkId> = Vec::new();
    let mut seen_o = HashSet::new();
    let mut seen_c = HashSet::new();
    let mut stack: Vec<ObjectId> = versions.iter().map(|v| ObjectId(v.0)).collect();
    while let Some(id) = stack.pop() {
        if !seen_o.insert(id) {
            continue;
        }
        let (children, cs) = references(&store.object(&id)?);
        stack.extend(children);
        for c in cs {
            if seen_c.insert(c) && !store.has_chunk(&c)? {
                missing.push(c);
            }
        }
    }
    Ok(missing)
}

/// What [`check_remote_chunks`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemoteCheck {
    /// Chunks of live versions that live on a remote.
    pub chunks: u64,
    /// Their stored bytes, downloaded and rehashed.
    pub bytes: u64,
    /// What is wrong: `(what, why)` — a chunk no remote holds, a pack that
    /// cannot be read, a chunk whose bytes do not hash to its id.
    pub problems: Vec<(String, String)>,
}

/// `fsck --read-data --remote`: downloads every chunk of the live versions
/// that is not stored here from the remote that holds it — never from the
/// cache — and rehashes it. Pack by pack, so a damaged or missing pack is
/// named once.
pub fn check_remote_chunks(
    repo: &Repo,
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<RemoteCheck> {
    let mut report = RemoteCheck::default();
    let missing = chunks_not_here(repo, &all_live_versions(repo)?)?;
    if missing.is_empty() {
        return Ok(report);
    }
    let remotes = remotes(repo)?;
    let kv = repo.store().reader();
    // Per remote, per pack: the chunks to read.
    // (remote index, pack hash) → the chunks to read from it.
    type PerPack = BTreeMap<(usize, [u8; 32]), Vec<([u8; 32], RemoteLoc)>>;
    let mut plan: PerPack = BTreeMap::new();
    for c in &missing {
        let mut found = false;
        for (i, (name, _)) in remotes.iter().enumerate() {
            if let Some(l) = loc_of(&*kv, name, c.as_bytes())? {
                plan.entry((i, l.pack)).or_default().push((c.0, l));
                found = true;
                break;
            }
        }
        if !found {
            report.problems.push((
                format!("chunk {c}"),
                "stored neither here nor on any remote".into(),
            ));
        }
    }
    drop(kv);
    report.chunks = missing.len() as u64;
    let total: u64 = plan
        .values()
        .flatten()
        .map(|(_, l)| l.stored_len as u64)
        .sum();
    progress.phase("downloading and rehashing remote chunks", Some(total));
    let mut opened: HashMap<usize, Arc<dyn PackStorage>> = HashMap::new();
    for ((ri, _), mut items) in plan {
        let storage = match opened.entry(ri) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(open_storage(&remotes[ri].1, connect)?)
            }
        };
        items.sort_by_key(|(_, l)| l.offset);
        for part in items.chunks(4096) {
            match fetch_records(&**storage, part, &|n| progress.bytes(n)) {
                Ok(got) => {
                    for ((id, _), c) in part.iter().zip(got) {
                        report.bytes += c.stored.len() as u64;
                        let cid = ChunkId(*id);
                        if let Err(e) =
                            dsv_store::compress::decode_chunk(&cid, c.codec, &c.stored, c.raw_len)
                        {
                            report
                                .problems
                                .push((format!("chunk {cid}"), e.to_string()));
                        }
                    }
                }
                Err(e) => report.problems.push((
                    format!("{}/{}", storage.location(), part[0].1.pack_name()),
                    format!("{e} ({} chunk(s) in it not checked)", part.len()),
                )),
            }
        }
    }
    progress.finish_phase();
    Ok(report)
}

fn prefetch_with(
    repo: &Repo,
    remotes: &[(String, &dyn PackStorage)],
    versions: &[VersionId],
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    // Every chunk below the versions that is not stored here.
    let missing = chunks_not_here(repo, versions)?;
    download_chunks(repo, remotes, &missing, progress)
}

/// Downloads the chunks `missing` from the first of `remotes` that has
/// each, into this repository's packs (a team's are published to its
/// object store as they are written).
fn download_chunks(
    repo: &Repo,
    remotes: &[(String, &dyn PackStorage)],
    missing: &[ChunkId],
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let store = repo.store();
    if missing.is_empty() {
        return Ok((0, 0));
    }
    let kv = store.reader();
    // Where each is: the first remote that has it.
    let mut plan: Vec<(usize, [u8; 32], RemoteLoc)> = Vec::with_capacity(missing.len());
    for c in missing {
        let mut found = None;
        for (i, (name, _)) in remotes.iter().enumerate() {
            if let Some(l) = loc_of(&*kv, name, c.as_bytes())? {
                found = Some((i, c.0, l));
                break;
            }
        }
        plan.push(found.ok_or_else(|| {
            invalid(format!(
                "chunk {c} is stored neither here nor on any remote; it cannot be downloaded"
            ))
        })?);
    }
    drop(kv);
    plan.sort_by_key(|(i, _, l)| (*i, l.pack, l.offset));
    let total: u64 = plan.iter().map(|(_, _, l)| l.stored_len as u64).sum();
    progress.phase("downloading chunks", Some(total));
    // Batches of about DOWNLOAD_BATCH bytes, fetched lazily as the store
    // writes the previous ones into its packs.
    let mut batches: Vec<&[(usize, [u8; 32], RemoteLoc)]> = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (k, (i, _, l)) in plan.iter().enumerate() {
        acc += l.stored_len as u64;
        let next_remote_differs = plan.get(k + 1).is_some_and(|n| n.0 != *i);
        if acc >= DOWNLOAD_BATCH || next_remote_differs || k + 1 == plan.len() {
            batches.push(&plan[start..=k]);
            start = k + 1;
            acc = 0;
        }
    }
    let mut pending: std::collections::VecDeque<dsv_store::Result<(ChunkId, FetchedChunk)>> =
        Default::default();
    let mut bi = 0;
    let mut count = 0u64;
    let mut bytes = 0u64;
    {
        let mut gen = std::iter::from_fn(|| loop {
            if let Some(x) = pending.pop_front() {
                if let Ok((_, c)) = &x {
                    count += 1;
                    bytes += c.stored.len() as u64;
                }
                return Some(x);
            }
            let batch = batches.get(bi)?;
            bi += 1;
            let (ri, _, _) = batch[0];
            let (_, storage) = &remotes[ri];
            let pairs: Vec<([u8; 32], RemoteLoc)> =
                batch.iter().map(|(_, id, l)| (*id, *l)).collect();
            match fetch_records(*storage, &pairs, &|n| progress.bytes(n)) {
                Ok(got) => {
                    for ((id, _), c) in pairs.iter().zip(got) {
                        pending.push_back(Ok((ChunkId(*id), c)));
                    }
                }
                Err(e) => pending.push_back(Err(e)),
            }
        });
        store.import_chunks(&mut gen)?;
    }
    progress.finish_phase();
    Ok((count, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv_store::storage::{Got, Listed, LocalDir, OnBytes};

    /// A storage that ignores write conditions (as some S3-compatible
    /// servers do).
    #[derive(Debug)]
    struct Unconditional(LocalDir);

    impl PackStorage for Unconditional {
        fn location(&self) -> String {
            self.0.location()
        }
        fn put(&self, name: &str, data: Vec<u8>, _: PutMode) -> dsv_store::Result<PutOutcome> {
            self.0.put(name, data, PutMode::Overwrite)
        }
        fn put_many(
            &self,
            items: &mut dyn Iterator<Item = dsv_store::Result<(String, Vec<u8>)>>,
            on_bytes: OnBytes<'_>,
        ) -> dsv_store::Result<u64> {
            self.0.put_many(items, on_bytes)
        }
        fn get(&self, name: &str) -> dsv_store::Result<Option<Got>> {
            self.0.get(name)
        }
        fn get_ranges(
            &self,
            reqs: &[(String, std::ops::Range<u64>)],
            on_bytes: OnBytes<'_>,
        ) -> dsv_store::Result<Vec<Vec<u8>>> {
            self.0.get_ranges(reqs, on_bytes)
        }
        fn size(&self, name: &str) -> dsv_store::Result<Option<u64>> {
            self.0.size(name)
        }
        fn list(&self, prefix: &str) -> dsv_store::Result<Vec<Listed>> {
            self.0.list(prefix)
        }
        fn delete(&self, name: &str) -> dsv_store::Result<()> {
            self.0.delete(name)
        }
        fn check(&self) -> dsv_store::Result<()> {
            self.0.check()
        }
    }

    #[test]
    fn storage_that_ignores_write_conditions_is_refused() {
        let d = tempfile::tempdir().unwrap();
        check_conditional_writes(&LocalDir::new(d.path())).unwrap();
        let e = check_conditional_writes(&Unconditional(LocalDir::new(d.path())))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("If-None-Match") && e.contains("lose a version"),
            "{e}"
        );
        // The probe object is gone either way.
        assert!(LocalDir::new(d.path()).list("probe/").unwrap().is_empty());
    }
}
