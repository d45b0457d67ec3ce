//! A repository whose packs live on object storage (`dsv init --objects
//! URL`).
//!
//! Its metadata stays in the local database; its chunks live on the
//! object store, in the remote layout (self-describing packs, dataset and
//! model documents), under a remote named [`PRIMARY`] that is marked
//! primary. Writes stage locally first, exactly as in any repository (a
//! crash never leaves a half-written version, and an offline machine keeps
//! working); [`flush`] then pushes everything to the object store and
//! evicts the local packs whose every chunk is there, so the local disk
//! holds only metadata and a byte-bounded cache. Reads of evicted chunks
//! go through the remote chunk source (coalesced ranged reads, checked
//! against their ids, cached). The CLI flushes after every command that
//! writes data and after each task an agent runs; a flush that fails (the
//! store unreachable) loses nothing — the next one sends what is pending.

use std::collections::HashSet;

use serde::Serialize;

use dsv::Repo;
use dsv_store::{Cf, EvictReport};

use crate::doc::Manifest;
use crate::error::{Error, Result};
use crate::keys::{self, RemoteRecord};
use crate::open::{open_storage, Connect};
use crate::ops::{push_report, remotes, Progress, PushReport, PushTarget};

/// The name of the object store's remote.
pub const PRIMARY: &str = "objects";

/// The repository's primary remote (where its packs live), if it has one.
pub fn primary(repo: &Repo) -> Result<Option<(String, RemoteRecord)>> {
    Ok(remotes(repo)?.into_iter().find(|(_, r)| r.primary))
}

/// Checks an object store before a repository is created on it:
/// reachable, readable, conditional writes honoured. Returns its manifest
/// when it already holds a remote (the new repository then takes its
/// chunking and fetches its datasets).
pub fn probe_objects(rec: &RemoteRecord, connect: &Connect) -> Result<Option<Manifest>> {
    let storage = open_storage(rec, connect)?;
    let m = crate::ops::probe(&*storage)?;
    crate::ops::check_conditional_writes(&*storage)?;
    Ok(m)
}

/// Makes a new repository's packs live at `rec` (checked with
/// [`probe_objects`] first).
pub fn init_objects(repo: &Repo, mut rec: RemoteRecord, connect: &Connect) -> Result<()> {
    if primary(repo)?.is_some() {
        return Err(Error::RemoteExists(PRIMARY.to_string()));
    }
    rec.primary = true;
    rec.lazy = true;
    crate::ops::add_remote(repo, PRIMARY, rec, connect, false)?;
    Ok(())
}

/// What a flush did.
#[derive(Debug, Clone, Serialize)]
pub struct FlushReport {
    /// The primary remote.
    pub remote: String,
    /// The push of every dataset and model.
    pub push: PushReport,
    /// Local packs evicted.
    pub evicted: EvictReport,
}

/// Pushes everything to the primary remote and evicts the local packs it
/// now holds (see the module documentation). `None` for a repository
/// without a primary remote.
pub fn flush(
    repo: &Repo,
    connect: &Connect,
    progress: &dyn Progress,
) -> Result<Option<FlushReport>> {
    let Some((name, rec)) = primary(repo)? else {
        return Ok(None);
    };
    let storage = open_storage(&rec, connect)?;
    let targets: Vec<PushTarget> = repo
        .datasets()?
        .into_iter()
        .map(PushTarget::Dataset)
        .collect();
    // A dataset the store refuses (it moved on) does not stop the others,
    // nor the eviction of what is published.
    let push = push_report(repo, &name, &*storage, &targets, progress)?;
    let evicted = evict_published(repo, &name)?;
    Ok(Some(FlushReport {
        remote: name,
        push,
        evicted,
    }))
}

/// Evicts the local packs whose every chunk the primary remote holds *and*
/// keeps alive: reachable from a version its dataset documents list (as
/// last read or written, `rt/`). A chunk that is merely in some remote
/// pack (the leftover of a killed push) is kept here: a remote gc may
/// delete that pack.
pub fn evict_published(repo: &Repo, name: &str) -> Result<EvictReport> {
    let store = repo.store();
    if std::fs::read_dir(store.packs_dir())
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        return Ok(EvictReport::default());
    }
    let mut roots: Vec<dsv_store::ObjectId> = Vec::new();
    {
        let kv = store.reader();
        let scope = keys::scoped(keys::REMOTE_TRACKING, name);
        kv.scan(Cf::App, &scope, &mut |_, v| {
            if let Ok(t) = serde_json::from_slice::<crate::doc::Tracking>(v) {
                roots.extend(t.doc.versions.iter().map(|h| dsv_store::ObjectId(h.id.0)));
            }
            Ok(true)
        })?;
    }
    let mut live: HashSet<dsv_store::ChunkId> = HashSet::new();
    let mut seen: HashSet<dsv_store::ObjectId> = HashSet::new();
    while let Some(id) = roots.pop() {
        if !seen.insert(id) || !store.has_object(&id)? {
            continue;
        }
        let (children, chunks) = dsv_store::import::references(&store.object(&id)?);
        roots.extend(children);
        live.extend(chunks);
    }
    Ok(store.evict_packs(&|kv, id| {
        Ok(live.contains(id) && kv.contains(Cf::App, &keys::index_entry(name, id.as_bytes()))?)
    })?)
}
