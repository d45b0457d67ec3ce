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
use dsv_store::pack::{check_record_header, RECORD_HEADER_LEN};
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

/// The URL without its password (what `team.json` keeps).
pub fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_string(),
    }
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
/// nothing is created when a check fails, and what was made is removed
/// again when a later step fails.
pub fn init(
    base: &Path,
    metadata_url: &str,
    objects: ObjectsAt,
    config: RepoConfig,
    o: &TeamOptions,
) -> Result<Repo> {
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
    if pg
        .open_read()?
        .get(Cf::Meta, dsv_store::schema::META_FORMAT)?
        .is_some()
    {
        return Err(Error::BadRemote {
            location: pg.location().to_string(),
            reason: "holds a dsv repository already; attach to it with 'dsv connect'".into(),
        });
    }
    let dot = base.join(".dsv");
    if dot.exists() {
        return Err(Error::TargetExists(base.to_path_buf()));
    }
    let created_base = !base.exists();
    std::fs::create_dir_all(base).map_err(|e| dsv_store::Error::io("create folder", base, e))?;
    let run = || -> Result<Repo> {
        let store = Store::init_with_backend(&dot, config, Box::new(pg), o.store.clone())?;
        let shared = Shared {
            objects: objects.clone(),
            config: store.config().clone(),
            created_ms: dsv_store::store::now_ms(),
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
        let marker = serde_json::json!({
            "format": 1,
            "metadata": without_password(metadata_url),
            "created_ms": shared.created_ms,
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
        write_json(
            &dot.join(TEAM_FILE),
            &TeamFile {
                metadata: without_password(metadata_url),
                objects: objects.clone(),
            },
        )?;
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
    let objects = objects.unwrap_or(shared.objects);
    let storage = open_storage(&objects.record(), &o.connect)?;
    storage.check()?;
    if storage.get(MARKER)?.is_none() {
        return Err(Error::BadRemote {
            location: storage.location(),
            reason: format!("holds no team repository's packs (no {MARKER})"),
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
        write_json(
            &dot.join(TEAM_FILE),
            &TeamFile {
                metadata: without_password(metadata_url),
                objects: objects.clone(),
            },
        )?;
        // config.json last: its presence marks a complete repository folder.
        shared.config.save(&dot)?;
        let store = Store::open_with_backend(&dot, Box::new(pg), o.store.clone())?;
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
    let store = Store::open_with_backend(dir, Box::new(pg), o.store.clone())?;
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
            check_record_header(&rec, id, loc).map_err(|e| dsv_store::Error::Storage {
                what: at(),
                reason: e.to_string(),
            })?;
            let c = FetchedChunk {
                codec: loc.codec,
                raw_len: loc.raw_len,
                stored: rec[RECORD_HEADER_LEN as usize..].to_vec(),
            };
            // Never cache bytes that are not the chunk.
            dsv_store::compress::decode_chunk(id, c.codec, &c.stored, c.raw_len).map_err(|e| {
                dsv_store::Error::Storage {
                    what: at(),
                    reason: format!("chunk {id} is damaged on the object store: {e}"),
                }
            })?;
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
        crate::ops::add_remote(repo, &name, rec.clone(), &o.connect, false)?;
        let pushed = crate::ops::push(repo, &name, targets, &o.connect, progress);
        let _ = crate::ops::remove_remote(repo, &name);
        let push = pushed?;
        crate::ops::add_remote(&team, &name, rec.clone(), &o.connect, false)?;
        let fetched = crate::ops::fetch(
            &team,
            &name,
            crate::FetchMode::Full,
            None,
            &o.connect,
            progress,
        );
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
