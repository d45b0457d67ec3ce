//! Garbage collection of a remote: deletes the packs nothing refers to
//! (what interrupted pushes left behind).
//!
//! Runs under a gc lease (see [`crate::lease`]): never at the same time as
//! a push. Marks from every version of every dataset document on the
//! remote, through the remote's own packs (an object this repository lacks
//! is read from the remote), then keeps every pack that holds anything
//! live. Because a push skips an object the remote holds *together with
//! everything below it*, each object in a kept pack is marked too, to a
//! fixed point: after a gc, every object on the remote still has its whole
//! subtree there. A pack is deleted only when none of its records is live
//! and it was last written longer ago than the grace period before the
//! gc's lease (by the storage's clock). A document that refers to
//! something the remote lacks stops the gc before it deletes anything.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use dsv::Repo;
use dsv_store::bundle::{EntryKind, IndexEntry};
use dsv_store::import::{check_object, decode_object_record, references};
use dsv_store::storage::PackStorage;
use dsv_store::ObjectId;

use crate::doc;
use crate::error::{Error, Result};
use crate::keys::RemoteLoc;
use crate::lease::{with_lease, LeaseKind};
use crate::ops::{parse_doc, read_indexes, sync_index, Progress};
use crate::source::fetch_records;

/// What a remote gc does.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Packs written less than this long before the gc started are kept
    /// even when unreferenced, ms.
    pub grace_ms: i64,
    /// Report only; delete nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace_ms: 3_600_000,
            dry_run: false,
        }
    }
}

/// What a remote gc found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// The remote's name.
    pub remote: String,
    /// Datasets on the remote.
    pub datasets: usize,
    /// Versions on the remote (the marking's roots).
    pub versions: usize,
    /// Packs on the remote before the gc.
    pub packs: usize,
    /// Bytes in them.
    pub bytes: u64,
    /// Live objects.
    pub live_objects: usize,
    /// Live chunks.
    pub live_chunks: usize,
    /// Unreferenced packs kept because they are younger than the grace
    /// period.
    pub young_packs: usize,
    /// Packs deleted (or, with `dry_run`, that would be).
    pub deleted_packs: usize,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Expired leases of processes that died, removed.
    pub expired_leases: usize,
    /// Nothing was deleted.
    pub dry_run: bool,
}

/// Collects the remote `name` (opened as `storage`).
pub fn gc_remote(
    repo: &Repo,
    name: &str,
    storage: &dyn PackStorage,
    opts: &GcOptions,
    progress: &dyn Progress,
) -> Result<GcReport> {
    if crate::ops::read_manifest(storage)?.is_none() {
        return Err(Error::EmptyRemote(storage.location()));
    }
    if opts.dry_run {
        // Deletes nothing, so it takes no lease (a push may run meanwhile);
        // ages are judged on this machine's clock.
        return collect(
            repo,
            storage,
            name,
            opts,
            progress,
            None,
            dsv_store::store::now_ms(),
        );
    }
    with_lease(storage, LeaseKind::Gc, |held| {
        collect(
            repo,
            storage,
            name,
            opts,
            progress,
            Some(held),
            held.started_ms,
        )
    })
    .and_then(|report| {
        // This repository's view of the remote forgets the deleted packs.
        if report.deleted_packs > 0 {
            sync_index(repo, name, storage)?;
        }
        Ok(report)
    })
}

/// The gc's work: under `held` it deletes; without, it only reports.
fn collect(
    repo: &Repo,
    storage: &dyn PackStorage,
    name: &str,
    opts: &GcOptions,
    progress: &dyn Progress,
    held: Option<&crate::lease::Held>,
    now_ms: i64,
) -> Result<GcReport> {
    let location = storage.location();
    let mut report = GcReport {
        remote: name.to_string(),
        dry_run: held.is_none(),
        ..Default::default()
    };
    let cutoff = now_ms - opts.grace_ms.max(0);
    progress.phase("reading the remote's documents and pack indexes", None);
    // Roots: every version of every dataset document.
    let mut roots: Vec<ObjectId> = Vec::new();
    for l in storage.list("datasets/")? {
        if !l.name.ends_with(".json") {
            continue;
        }
        let Some(got) = storage.get(&l.name)? else {
            // Documents are never deleted; one that vanished between
            // the listing and the read means someone else is at work.
            return Err(Error::BadRemote {
                location: format!("{location}/{}", l.name),
                reason: "listed but gone when read; nothing deleted".into(),
            });
        };
        let d = parse_doc(storage, &l.name, &got.data)?;
        report.datasets += 1;
        report.versions += d.versions.len();
        roots.extend(d.versions.iter().map(|v| ObjectId(v.id.0)));
    }
    // Every pack's index.
    let listed: Vec<_> = storage
        .list("packs/")?
        .into_iter()
        .filter(|l| doc::pack_hash(&l.name).is_some())
        .collect();
    report.packs = listed.len();
    report.bytes = listed.iter().map(|l| l.size).sum();
    let mut indexes: Vec<Vec<IndexEntry>> = Vec::with_capacity(listed.len());
    for part in listed.chunks(1000) {
        let sized: Vec<(String, u64)> = part.iter().map(|l| (l.name.clone(), l.size)).collect();
        indexes.extend(read_indexes(storage, &sized)?);
    }
    // Where each object is (one location is enough to read it).
    let mut object_at: HashMap<[u8; 32], (usize, IndexEntry)> = HashMap::new();
    for (p, entries) in indexes.iter().enumerate() {
        for e in entries {
            if e.kind == EntryKind::Object {
                object_at.entry(e.id).or_insert((p, *e));
            }
        }
    }
    progress.finish_phase();
    progress.phase("marking", None);
    let store = repo.store();
    let mut live_o: HashSet<[u8; 32]> = HashSet::new();
    let mut live_c: HashSet<[u8; 32]> = HashSet::new();
    let mut kept: Vec<bool> = vec![false; listed.len()];
    let mut frontier: Vec<ObjectId> = roots;
    loop {
        while !frontier.is_empty() {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for id in frontier.drain(..) {
                if !live_o.insert(id.0) {
                    continue;
                }
                if store.has_object(&id)? {
                    local.push(id);
                } else {
                    match object_at.get(&id.0) {
                        Some((p, e)) => remote.push((id, *p, *e)),
                        None => {
                            return Err(Error::BadRemote {
                                location: location.clone(),
                                reason: format!(
                                    "object {id} is referred to but held by no pack; the \
                                     remote is damaged (nothing deleted; push the versions \
                                     again from a repository that has them)"
                                ),
                            })
                        }
                    }
                }
            }
            let mut next = Vec::new();
            let mut expand = |obj: &dsv_store::object::Object| {
                let (children, chunks) = references(obj);
                for c in chunks {
                    live_c.insert(*c.as_bytes());
                }
                next.extend(children);
            };
            for id in local {
                expand(&store.object(&id)?);
            }
            for batch in remote.chunks(4096) {
                let wanted: Vec<([u8; 32], RemoteLoc)> = batch
                    .iter()
                    .map(|(id, p, e)| {
                        let hash = doc::pack_hash(&listed[*p].name).expect("filtered");
                        let mut pack = [0u8; 32];
                        hex::decode_to_slice(hash, &mut pack).expect("checked hex");
                        (
                            id.0,
                            RemoteLoc {
                                pack,
                                offset: e.offset,
                                stored_len: e.stored_len,
                                raw_len: e.raw_len,
                                codec: e.codec,
                                kind: 1,
                            },
                        )
                    })
                    .collect();
                let got = fetch_records(storage, &wanted, &|_| {})?;
                for ((id, p, _), rec) in batch.iter().zip(got) {
                    let what = format!("{location}/{}", listed[*p].name);
                    let canonical =
                        decode_object_record(rec.codec, &rec.stored, rec.raw_len, &what)?;
                    expand(&check_object(id, &canonical, &what)?);
                }
            }
            frontier = next;
        }
        // Keep every pack with a live record; the objects in a kept
        // pack are live too (their subtrees must stay).
        for (p, entries) in indexes.iter().enumerate() {
            if kept[p] {
                continue;
            }
            let live = entries.iter().any(|e| match e.kind {
                EntryKind::Object => live_o.contains(&e.id),
                EntryKind::Chunk => live_c.contains(&e.id),
            });
            if live {
                kept[p] = true;
                frontier.extend(
                    entries
                        .iter()
                        .filter(|e| e.kind == EntryKind::Object && !live_o.contains(&e.id))
                        .map(|e| ObjectId(e.id)),
                );
            }
        }
        if frontier.is_empty() {
            break;
        }
    }
    report.live_objects = live_o.len();
    report.live_chunks = live_c.len();
    progress.finish_phase();
    // Sweep.
    let dead: Vec<usize> = (0..listed.len()).filter(|p| !kept[*p]).collect();
    let total: u64 = dead.iter().map(|p| listed[*p].size).sum();
    progress.phase("deleting unreferenced packs", Some(total));
    for p in dead {
        let l = &listed[p];
        if l.modified_ms > cutoff {
            report.young_packs += 1;
            continue;
        }
        if let Some(held) = held {
            if !held.healthy() {
                return Err(Error::Busy {
                    location: location.clone(),
                    reason: "the gc's lease could not be renewed in time; stopped before \
                             deleting more (what was deleted was unreferenced)"
                        .into(),
                });
            }
            storage.delete(&l.name)?;
        }
        report.deleted_packs += 1;
        report.deleted_bytes += l.size;
        progress.bytes(l.size);
    }
    progress.finish_phase();
    // Leases of processes that died.
    if let Some(held) = held {
        for l in crate::lease::list_leases(storage)? {
            if l.name != held.name && !l.live(held.started_ms) {
                storage.delete(&l.name)?;
                report.expired_leases += 1;
            }
        }
    }
    Ok(report)
}
