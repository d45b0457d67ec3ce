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

/// `dsv init BASE --objects URL`: a new repository at `BASE/.dsv` whose
/// packs live at `rec`. The store is checked first (reachable, readable,
/// conditional writes honoured) and nothing is created when it fails; a
/// store that already holds a remote lends its chunking, and its datasets
/// and models are fetched (metadata only). On any later failure what was
/// made is removed again.
pub fn init_repository(
    base: &std::path::Path,
    mut config: dsv_store::RepoConfig,
    mut rec: RemoteRecord,
    connect: &Connect,
    store_opts: dsv_store::StoreOptions,
) -> Result<(Repo, Option<crate::FetchReport>)> {
    rec.primary = true;
    rec.lazy = true;
    let storage = open_storage(&rec, connect)?;
    let manifest = crate::ops::probe(&*storage)?;
    crate::ops::check_conditional_writes(&*storage)?;
    drop(storage);
    if let Some(c) = manifest.as_ref().and_then(|m| m.chunking) {
        config.chunking = c;
    }
    let dot = base.join(".dsv");
    if dot.exists() {
        return Err(Error::TargetExists(base.to_path_buf()));
    }
    let created_base = !base.exists();
    std::fs::create_dir_all(base).map_err(|e| dsv_store::Error::io("create folder", base, e))?;
    let run = || -> Result<(Repo, Option<crate::FetchReport>)> {
        let repo = Repo::from_store(dsv_store::Store::init(&dot, config, store_opts)?);
        crate::ops::add_remote(&repo, PRIMARY, rec, connect, false)?;
        let fetched = match manifest {
            Some(_) => Some(crate::ops::fetch(
                &repo,
                PRIMARY,
                crate::FetchMode::Metadata,
                None,
                connect,
                &crate::NoProgress,
            )?),
            None => None,
        };
        Ok((repo, fetched))
    };
    run().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dot);
        if created_base {
            let _ = std::fs::remove_dir(base);
        }
    })
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
