//! Team repositories: the metadata in PostgreSQL, shared by every machine;
//! the packs on object storage (`dsv init --metadata postgres://…
//! --objects s3://…`, `dsv connect`).
//!
//! Each machine keeps a small folder (`.dsv`): `config.json` (a copy of
//! the shared one), `team.json` (the database URL without its password and
//! the object store's URL), the packs it wrote itself, and a chunk cache.
//! No secret is stored: the database password comes from the caller (the
//! CLI reads `PGPASSWORD` or `.pgpass`), object-store credentials from
//! [`Connect`].
//!
//! **Data first, then metadata**: every pack a machine writes is uploaded
//! to `packs/{id:016x}.pack` on the object store before the transaction
//! naming its chunks commits ([`dsv_store::Store::set_pack_storage`]), so a
//! version any machine can see is readable by every machine; a crash in
//! between leaves at worst an unreferenced pack. A pack this machine does
//! not hold is read through [`SharedPacks`]: ranged reads of exactly the
//! chunks wanted, checked against their ids, kept in the cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use dsv::Repo;
use dsv_pg::{PgKv, PgOptions};
use dsv_store::kv::{Backend, Batch, Cf, KvRead};
use dsv_store::pack::{decode_record, RECORD_HEADER_LEN};
use dsv_store::schema::ChunkLoc;
use dsv_store::storage::{ChunkSource, FetchedChunk, PackStorage, PutMode, PutOutcome};
use dsv_store::{ChunkId, RepoConfig, Store, StoreOptions};

use crate::cache::ChunkCache;
use crate::error::{Error, Result};
use crate::keys::RemoteRecord;
use crate::open::{open_storage, Connect};

/// The machine's record of its team repository, in the `.dsv` folder.
pub const TEAM_FILE: &str = "team.json";
/// The object store's marker of a team repository's packs.
pub const MARKER: &str = "dsv-team.json";
/// The shared team record's key (meta family).
const SHARED_KEY: &[u8] = b"team";

/// Where a team repository's object store is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectsAt {
    /// `s3://bucket/prefix`, `gs://…`, `az://…`, or a folder.
    pub url: String,
    /// Endpoint of an S3-compatible server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl ObjectsAt {
    fn record(&self) -> RemoteRecord {
        RemoteRecord {
            url: self.url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            lazy: false,
            primary: false,
            added_ms: 0,
        }
    }
}

/// `team.json`: this machine's way to the shared repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamFile {
    /// The PostgreSQL URL, without a password.
    pub metadata: String,
    /// The object store.
    pub objects: ObjectsAt,
    /// This machine's id (16 hex, random): the scope of its stat-cache
    /// entries in the shared database.
    #[serde(default)]
    pub machine: String,
}

fn new_machine_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Store options for the machine of `team`: its stat-cache scope.
fn machine_options(team: &TeamFile, o: &TeamOptions) -> StoreOptions {
    StoreOptions {
        stat_scope: if team.machine.is_empty() {
            Vec::new()
        } else {
            format!("@{}", team.machine).into_bytes()
        },
        ..o.store.clone()
    }
}

/// The shared record (in the database): what `connect` copies.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shared {
    objects: ObjectsAt,
    config: RepoConfig,
    created_ms: i64,
}

/// How to reach a team repository's services, from the caller.
#[derive(Debug, Clone, Default)]
pub struct TeamOptions {
    /// The database: password, application name, timeouts.
    pub pg: PgOptions,
    /// Object-store credentials.
    pub connect: Connect,
    /// Store options.
    pub store: StoreOptions,
    /// Chunk cache folder (chunks other machines wrote).
    pub cache_dir: PathBuf,
    /// Its byte budget.
    pub cache_budget: u64,
}

/// The URL without its password (what `team.json`, the object store's
/// marker and every message keep): the user-info password and any
/// `password` query parameter of a `postgres://` URL go; a key=value
/// connection string keeps no `password=` pair.
pub fn without_password(url: &str) -> String {
    if let Ok(mut u) = url::Url::parse(url) {
        if u.password().is_some() {
            let _ = u.set_password(None);
        }
        if u.query_pairs().any(|(k, _)| k == "password") {
            let kept: Vec<(String, String)> = u
                .query_pairs()
                .filter(|(k, _)| k != "password")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if kept.is_empty() {
                u.set_query(None);
            } else {
                u.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
        return u.to_string();
    }
    // key=value pairs: values may be quoted ('…' with \' and \\ escapes).
    let mut out = Vec::new();
    let mut rest = url.trim();
    while !rest.is_empty() {
        let end = {
            let (mut i, mut quoted, mut esc) = (0, false, false);
            for (j, ch) in rest.char_indices() {
                i = j + ch.len_utf8();
                match ch {
                    _ if esc => esc = false,
                    '\\' => esc = true,
                    '\'' => quoted = !quoted,
                    c if c.is_whitespace() && !quoted => {
                        i = j;
                        break;
                    }
                    _ => {}
                }
            }
            i
        };
        let pair = &rest[..end];
        if pair.split('=').next().map(str::trim) != Some("password") {
            out.push(pair);
        }
        rest = rest[end..].trim_start();
    }
    out.join(" ")
}

/// The URL to store: without its password, or an error when the password
/// cannot be separated from it (never stored).
fn storable(url: &str) -> Result<String> {
    let kept = without_password(url);
    if dsv_pg::has_password(&kept) {
        return Err(Error::BadUrl {
            url: "the PostgreSQL connection string".into(),
            reason: "its password cannot be separated from it; give the password in \
                     PGPASSWORD or ~/.pgpass instead"
                .into(),
        });
    }
    Ok(kept)
}

/// Whether `dir` (a `.dsv` folder) is a team repository's.
pub fn is_team(dir: &Path) -> bool {
    dir.join(TEAM_FILE).is_file()
}

fn read_team_file(dir: &Path) -> Result<TeamFile> {
    let p = dir.join(TEAM_FILE);
    let data = std::fs::read(&p).map_err(|e| dsv_store::Error::io("read", &p, e))?;
    serde_json::from_slice(&data).map_err(|e| {
        dsv_store::Error::corrupted(p.display().to_string(), format!("not a team file: {e}")).into()
    })
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let data = serde_json::to_vec_pretty(v).expect("serializable");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data).map_err(|e| dsv_store::Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| dsv_store::Error::io("rename", path, e))?;
    Ok(())
}

fn shared_in(kv: &dyn KvRead) -> Result<Option<Shared>> {
    match kv.get(Cf::Meta, SHARED_KEY)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| {
            dsv_store::Error::corrupted("the shared team record", e.to_string()).into()
        }),
    }
}

/// Makes `store` publish its packs to `objects` and read other machines'
/// packs from there.
fn attach(store: &Store, objects: &ObjectsAt, o: &TeamOptions) -> Result<()> {
    let storage = open_storage(&objects.record(), &o.connect)?;
    store.set_pack_storage(Some(storage.clone()));
    store.set_chunk_source(Some(Arc::new(SharedPacks {
        storage,
        cache: ChunkCache::new(o.cache_dir.clone(), o.cache_budget),
    })));
    Ok(())
}

/// `dsv init BASE --metadata URL --objects URL`: a new team repository.
/// The object store and the database are checked first (reachable,
/// credentials accepted, neither holding a team repository already);
/// nothing is created when a check fails. The object store's marker is
/// claimed first (create-only), then the database is initialized in two
/// transactions (the repository, then the shared team record), then the
/// machine folder is written; when a step fails, the marker and the folder
/// are removed again, and a database left without its team record is
/// taken over by the next `init`.
pub fn init(
    base: &Path,
    metadata_url: &str,
    objects: ObjectsAt,
    config: RepoConfig,
    o: &TeamOptions,
) -> Result<Repo> {
    let stored_url = storable(metadata_url)?;
    let storage = open_storage(&objects.record(), &o.connect)?;
    storage.check()?;
    if storage.get(MARKER)?.is_some() {
        return Err(Error::BadRemote {
            location: format!("{}/{MARKER}", storage.location()),
            reason: "holds a team repository already; attach to it with 'dsv connect'".into(),
        });
    }
    crate::ops::check_conditional_writes(&*storage)?;
    let pg = PgKv::connect(metadata_url, &o.pg)?;
    if shared_in(&*pg.open_read()?)?.is_some() {
        return Err(Error::BadRemote {
            location: pg.location().to_string(),
            reason: "holds a dsv repository already; attach to it with 'dsv connect'".into(),
        });
    }
    let dot = base.join(".dsv");
    if dot.exists() {
        return Err(Error::TargetExists(base.to_path_buf()));
    }
    let created_ms = dsv_store::store::now_ms();
    let marker = serde_json::json!({
        "format": 1,
        "metadata": stored_url,
        "created_ms": created_ms,
    });
    match storage.put(
        MARKER,
        serde_json::to_vec_pretty(&marker).expect("json"),
        PutMode::Create,
    )? {
        PutOutcome::Exists => {
            return Err(Error::BadRemote {
                location: format!("{}/{MARKER}", storage.location()),
                reason: "another team repository claimed this object store meanwhile".into(),
            })
        }
        PutOutcome::Written(_) | PutOutcome::Changed => {}
    }
    let created_base = !base.exists();
    let team = TeamFile {
        metadata: stored_url.clone(),
        objects: objects.clone(),
        machine: new_machine_id(),
    };
    let run = || -> Result<Repo> {
        std::fs::create_dir_all(base)
            .map_err(|e| dsv_store::Error::io("create folder", base, e))?;
        let store =
            Store::init_with_backend(&dot, config, Box::new(pg), machine_options(&team, o))?;
        let shared = Shared {
            objects: objects.clone(),
            config: store.config().clone(),
            created_ms,
        };
        let json = serde_json::to_vec(&shared).expect("serializable");
        store.write(|kv| {
            if kv.get(Cf::Meta, SHARED_KEY)?.is_some() {
                return Err(dsv_store::Error::Invalid(
                    "another machine initialized this database meanwhile".into(),
                ));
            }
            let mut b = Batch::default();
            b.put(Cf::Meta, SHARED_KEY.to_vec(), json.clone());
            Ok((b, ()))
        })?;
        write_json(&dot.join(TEAM_FILE), &team)?;
        attach(&store, &objects, o)?;
        let repo = Repo::from_store(store);
        repo.index_version_order()?;
        Ok(repo)
    };
    run().inspect_err(|_| {
        let _ = storage.delete(MARKER);
        let _ = std::fs::remove_dir_all(&dot);
        if created_base {
            let _ = std::fs::remove_dir(base);
        }
    })
}

/// `dsv connect --metadata URL [--objects URL] BASE`: attaches this
/// machine to a team repository (a `.dsv` folder with the shared config,
/// the team file and an empty pack folder). `objects` overrides the shared
/// object store's address (another endpoint for this machine).
pub fn connect(
    base: &Path,
    metadata_url: &str,
    objects: Option<ObjectsAt>,
    o: &TeamOptions,
) -> Result<Repo> {
    let pg = PgKv::connect(metadata_url, &o.pg)?;
    let Some(shared) = shared_in(&*pg.open_read()?)? else {
        return Err(Error::BadRemote {
            location: pg.location().to_string(),
            reason: "holds no team repository; create one with 'dsv init PATH --metadata URL --objects URL'".into(),
        });
    };
    let stored_url = storable(metadata_url)?;
    let objects = objects.unwrap_or(shared.objects);
    let storage = open_storage(&objects.record(), &o.connect)?;
    storage.check()?;
    let Some(got) = storage.get(MARKER)? else {
        return Err(Error::BadRemote {
            location: storage.location(),
            reason: format!("holds no team repository's packs (no {MARKER})"),
        });
    };
    // The marker of this very repository, not another team's.
    let marker_ms = serde_json::from_slice::<serde_json::Value>(&got.data)
        .ok()
        .and_then(|m| m["created_ms"].as_i64());
    if marker_ms != Some(shared.created_ms) {
        return Err(Error::BadRemote {
            location: format!("{}/{MARKER}", storage.location()),
            reason: format!(
                "belongs to another team repository than the one in {}",
                without_password(metadata_url)
            ),
        });
    }
    let dot = base.join(".dsv");
    if dot.exists() {
        return Err(Error::TargetExists(base.to_path_buf()));
    }
    let created_base = !base.exists();
    let run = || -> Result<Repo> {
        std::fs::create_dir_all(dot.join(dsv_store::store::PACKS_DIR))
            .map_err(|e| dsv_store::Error::io("create folder", &dot, e))?;
        let team = TeamFile {
            metadata: stored_url.clone(),
            objects: objects.clone(),
            machine: new_machine_id(),
        };
        write_json(&dot.join(TEAM_FILE), &team)?;
        // config.json last: its presence marks a complete repository folder.
        shared.config.save(&dot)?;
        let store = Store::open_with_backend(&dot, Box::new(pg), machine_options(&team, o))?;
        attach(&store, &objects, o)?;
        Ok(Repo::from_store(store))
    };
    run().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dot);
        if created_base {
            let _ = std::fs::remove_dir(base);
        }
    })
}

/// Opens the team repository whose machine folder is `dir` (a `.dsv`
/// folder with a [`TEAM_FILE`]).
pub fn open(dir: &Path, o: &TeamOptions) -> Result<Store> {
    let team = read_team_file(dir)?;
    let pg = PgKv::connect(&team.metadata, &o.pg)?;
    let store = Store::open_with_backend(dir, Box::new(pg), machine_options(&team, o))?;
    attach(&store, &team.objects, o)?;
    Ok(store)
}

/// This machine's team file, if `dir` is a team repository's folder.
pub fn team_file(dir: &Path) -> Result<Option<TeamFile>> {
    if !is_team(dir) {
        return Ok(None);
    }
    read_team_file(dir).map(Some)
}

/// Reads chunks of packs other machines wrote from the team's object store:
/// ranged reads of the records wanted (their locations come from the
/// shared chunk index), checked against their ids, kept in the cache.
struct SharedPacks {
    storage: Arc<dyn PackStorage>,
    cache: ChunkCache,
}

/// Chunks per batch of ranged reads.
const BATCH: usize = 256;

impl SharedPacks {
    fn fetch_batch(
        &self,
        kv: &dyn KvRead,
        ids: &[ChunkId],
        out: &mut [Option<FetchedChunk>],
    ) -> dsv_store::Result<()> {
        let mut wanted: Vec<(usize, ChunkLoc)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(c) = self.cache.get(id) {
                out[i] = Some(c);
                continue;
            }
            if let Some(v) = kv.get(Cf::Chunks, id.as_bytes())? {
                wanted.push((i, ChunkLoc::decode(&v, id)?));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // Pack order, then offset: neighbours coalesce into one request.
        wanted.sort_by_key(|(_, l)| (l.pack, l.offset));
        let reqs: Vec<(String, std::ops::Range<u64>)> = wanted
            .iter()
            .map(|(_, l)| {
                let end = l.offset + RECORD_HEADER_LEN + l.stored_len as u64;
                (dsv_store::store::shared_pack_name(l.pack), l.offset..end)
            })
            .collect();
        let recs = self.storage.get_ranges(&reqs, &|_| {})?;
        for ((i, loc), rec) in wanted.iter().zip(recs) {
            let id = &ids[*i];
            let at = || {
                format!(
                    "{}/{}",
                    self.storage.location(),
                    dsv_store::store::shared_pack_name(loc.pack)
                )
            };
            // Never cache bytes that are not the chunk.
            decode_record(&rec, id, loc).map_err(|e| dsv_store::Error::Storage {
                what: at(),
                reason: format!("chunk {id} is damaged on the object store: {e}"),
            })?;
            let c = FetchedChunk {
                codec: loc.codec,
                raw_len: loc.raw_len,
                stored: rec[RECORD_HEADER_LEN as usize..].to_vec(),
            };
            self.cache.put(id, &c);
            out[*i] = Some(c);
        }
        Ok(())
    }
}

impl ChunkSource for SharedPacks {
    fn fetch(
        &self,
        kv: &dyn KvRead,
        ids: &[ChunkId],
    ) -> dsv_store::Result<Vec<Option<FetchedChunk>>> {
        let mut out = vec![None; ids.len()];
        for (n, batch) in ids.chunks(BATCH).enumerate() {
            self.fetch_batch(kv, batch, &mut out[n * BATCH..n * BATCH + batch.len()])?;
        }
        Ok(out)
    }

    fn has(&self, kv: &dyn KvRead, id: &ChunkId) -> dsv_store::Result<bool> {
        kv.contains(Cf::Chunks, id.as_bytes())
    }

    fn forget(&self, id: &ChunkId) {
        self.cache.remove(id);
    }

    fn prefetch(&self, kv: &dyn KvRead, ids: &[ChunkId]) -> dsv_store::Result<()> {
        if self.cache.budget() == 0 {
            return Ok(());
        }
        self.fetch(kv, ids).map(|_| ())
    }
}

/// What [`graduate`] did.
#[derive(Debug, Clone, Serialize)]
pub struct GraduateReport {
    /// The team's database (no password).
    pub metadata: String,
    /// The push out of the embedded repository (datasets, versions,
    /// models sent).
    pub push: crate::PushReport,
    /// The fetch into the team repository (versions and models it gained,
    /// chunks it stored).
    pub fetch: crate::FetchReport,
}

/// `dsv push postgres://…`: graduates datasets (with every version, their
/// parents, tags and metadata) and the models trained on them from the
/// embedded repository `repo` into the team repository at `metadata_url`,
/// without losing history: version ids stay the same, and the data goes
/// to the team's object store before the team's metadata names it.
///
/// It runs the git-style transfer both repositories already speak: a push
/// into a staging remote in `staging` (a local folder, removed afterwards),
/// then a full fetch of it into the team repository through a temporary
/// machine folder. Tasks, events and triggers of the embedded repository
/// stay there.
pub fn graduate(
    repo: &Repo,
    targets: &[crate::PushTarget],
    metadata_url: &str,
    o: &TeamOptions,
    staging: &Path,
    progress: &dyn crate::Progress,
) -> Result<GraduateReport> {
    if repo.store().pack_storage().is_some() {
        return Err(Error::Repo(dsv::Error::Store(dsv_store::Error::Invalid(
            "this is a team repository already; push to a remote, or graduate from an embedded one"
                .into(),
        ))));
    }
    std::fs::create_dir_all(staging).map_err(|e| dsv_store::Error::io("create", staging, e))?;
    let name = format!("graduate-{:016x}", rand::random::<u64>());
    let rec = RemoteRecord {
        url: staging.join("remote").display().to_string(),
        endpoint: None,
        region: None,
        lazy: false,
        primary: false,
        added_ms: dsv_store::store::now_ms(),
    };
    let run = || -> Result<GraduateReport> {
        let team = connect(&staging.join("machine"), metadata_url, None, o)?;
        // Data first: every chunk of these datasets is on the team's object
        // store (and in its chunk index) before any of their versions is in
        // its metadata, where other machines and triggers would see it.
        copy_chunks(repo, &team, targets)?;
        crate::ops::add_remote(repo, &name, rec.clone(), &o.connect, false)?;
        let pushed = crate::ops::push(repo, &name, targets, &o.connect, progress);
        let _ = crate::ops::remove_remote(repo, &name);
        let push = pushed?;
        crate::ops::add_remote(&team, &name, rec.clone(), &o.connect, false)?;
        // The chunks are there already: the fetch adds the metadata.
        let fetched = open_storage(&rec, &o.connect).and_then(|storage| {
            crate::ops::fetch_from(
                &team,
                &name,
                &*storage,
                crate::FetchMode::Full,
                None,
                progress,
            )
        });
        let _ = crate::ops::remove_remote(&team, &name);
        Ok(GraduateReport {
            metadata: without_password(metadata_url),
            push,
            fetch: fetched?,
        })
    };
    let out = run();
    let _ = std::fs::remove_dir_all(staging);
    out
}

/// Stores in `team` (publishing its packs) every chunk of every version of
/// the datasets of `targets` that it lacks, read from `repo`'s packs.
fn copy_chunks(repo: &Repo, team: &Repo, targets: &[crate::PushTarget]) -> Result<u64> {
    let mut datasets = Vec::new();
    for t in targets {
        let ds = match t {
            crate::PushTarget::Dataset(ds) | crate::PushTarget::Version(ds, _) => ds,
        };
        if !datasets.iter().any(|d: &dsv::Dataset| d.id == ds.id) {
            datasets.push(ds.clone());
        }
    }
    let store = repo.store();
    let mut wanted = std::collections::BTreeSet::new();
    for ds in &datasets {
        for v in repo.versions(ds)? {
            let root = store.version(&v.id)?.object.root;
            store.walk_files(&root, &mut |_, e| {
                if let dsv_store::EntryTarget::File(f) = &e.target {
                    for (c, _) in store.file_object(f)?.chunks {
                        wanted.insert(c);
                    }
                }
                Ok(())
            })?;
        }
    }
    let have = team.store().reader();
    let mut missing = Vec::new();
    for c in wanted {
        if !have.contains(Cf::Chunks, c.as_bytes())? {
            missing.push(c);
        }
    }
    drop(have);
    let mut items = missing.into_iter().map(|id| {
        store.read_stored_chunk(&id).map(|(loc, stored)| {
            (
                id,
                FetchedChunk {
                    codec: loc.codec,
                    raw_len: loc.raw_len,
                    stored,
                },
            )
        })
    });
    Ok(team.store().import_chunks(&mut items)?)
}
