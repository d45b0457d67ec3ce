//! The store: a repository directory with its metadata database and packs.
//!
//! ```text
//! REPO/.dsv/
//!   config.json   format version, chunking, compression (fixed at init)
//!   lock          the write lock (flock) and the holder's description
//!   db/           RocksDB: objects, chunk index, refs, tags, drafts, ...
//!   packs/        append-only pack files of compressed chunks
//! ```
//!
//! Reads go through a read handle that never blocks writers. Every
//! mutation goes through [`Store::write`]: take the write lock (bounded
//! wait), open the database read-write, build one batch from the latest
//! state, apply it atomically, close, release.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::RepoConfig;
use crate::diff::{diff_trees, Diff};
use crate::error::{Error, Kind, Result};
use crate::id::{ChunkId, DraftId, HexPrefix, ObjectId, VersionId};
use crate::kv::{Backend, Batch, Cf, KvRead};
use crate::object::{
    stored, DirSummary, Entry, EntryTarget, FileObject, Object, TreeNode, VersionObject,
};
use crate::pack::PackReader;
use crate::schema::{self, ChunkLoc, DraftRecord};
use crate::tree::{self, Change, KvObjects, ObjectRead, Objs, Pending};

/// Options for opening a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long a writer waits for the write lock.
    pub lock_timeout: Duration,
    /// This process, as other processes will see it in lock messages.
    pub holder: String,
    /// Prefix of this process's stat-cache keys (`statcache` family: the
    /// path follows). Empty on a repository of one machine; a team
    /// repository's machines each use their own (`@` and the machine id),
    /// so that one machine's "unchanged file" answers never serve another
    /// machine's files of the same path.
    pub stat_scope: Vec<u8>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(60),
            holder: "dsv".into(),
            stat_scope: Vec::new(),
        }
    }
}

/// Progress reports from long operations (the CLI draws bars).
pub trait Progress: Sync {
    /// A phase starts with `total` units (bytes or items).
    fn start(&self, _phase: &str, _total: u64) {}
    /// `n` more units are done.
    fn advance(&self, _n: u64) {}
    /// The phase ended.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// A version with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Its id.
    pub id: VersionId,
    /// The stored object.
    pub object: VersionObject,
}

/// A draft with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// Its id.
    pub id: DraftId,
    /// The stored record.
    pub record: DraftRecord,
}

/// What a staging operation changed in a draft.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageReport {
    /// The draft's tree before and after.
    pub diff: Diff,
    /// Files looked at in the folder.
    pub files_scanned: u64,
    /// Files read and hashed (the rest were known from the stat cache).
    pub files_hashed: u64,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    /// Bytes of the files looked at.
    pub bytes_scanned: u64,
    /// Bytes newly stored (chunks after compression, plus metadata).
    pub stored_bytes: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Paths skipped because they are neither file, directory nor symlink.
    pub skipped_special: Vec<PathBuf>,
    /// Files that disappeared between listing and reading.
    pub vanished: Vec<PathBuf>,
    /// Whether anything was written.
    pub committed: bool,
}

/// The storage engine.
pub struct Store {
    dir: PathBuf,
    config: RepoConfig,
    backend: Box<dyn Backend>,
    /// The read view; `None` once released after a write (reopened by the
    /// next [`Store::reader`]).
    reader: RwLock<Option<Arc<dyn KvRead>>>,
    stale: std::sync::atomic::AtomicBool,
    packs: PackReader,
    pub(crate) opts: StoreOptions,
    /// Unknown `ro_compat` features of the repository: writes are refused
    /// while there are any.
    read_only: Vec<String>,
    /// Where chunks missing from the packs come from (a lazy clone's
    /// remote); none by default.
    source: RwLock<Option<Arc<dyn crate::storage::ChunkSource>>>,
    /// Where new packs are published before the metadata naming their
    /// chunks commits (a team repository's object store); none by default.
    pack_storage: RwLock<Option<Arc<dyn crate::storage::PackStorage>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sub-directory of packs.
pub const PACKS_DIR: &str = "packs";

/// The name of pack `id` on a team repository's object store (the same
/// bytes as `packs/{id:016x}.pack` in a repository folder).
pub fn shared_pack_name(id: u64) -> String {
    format!("packs/{id:016x}.pack")
}
/// Space kept in reserve for a full disk: `gc` and `dataset delete` release
/// it when the disk is full, so that they can open the database and free
/// what the repository holds.
pub const RESERVE_FILE: &str = "reserve";
/// Size of the reserve: room for the database to open read-write (new log,
/// manifest and options files, the flush of the previous log) and commit
/// one batch.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// Whether an error is a full disk (`ENOSPC`, from the file system or from
/// the database).
pub fn is_disk_full(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } | Error::Input { source, .. } => {
            source.raw_os_error() == Some(libc::ENOSPC)
        }
        Error::Kv(m) => m.contains("No space left on device"),
        _ => false,
    }
}
/// Sub-directory of the database.
pub const DB_DIR: &str = "db";

impl Store {
    /// Creates a repository in `dir` (the `.dsv` directory) with RocksDB.
    #[cfg(feature = "rocksdb")]
    pub fn init(dir: &Path, config: RepoConfig, opts: StoreOptions) -> Result<Store> {
        let backend = Box::new(Self::rocks_backend(dir, &opts));
        Self::init_with_backend(dir, config, backend, opts)
    }

    /// Opens the repository in `dir` (the `.dsv` directory) with RocksDB.
    #[cfg(feature = "rocksdb")]
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store> {
        if !dir.join(crate::config::CONFIG_FILE).exists() {
            return Err(Error::NotARepository(dir.to_path_buf()));
        }
        let backend = Box::new(Self::rocks_backend(dir, &opts));
        Self::open_with_backend(dir, backend, opts)
    }

    #[cfg(feature = "rocksdb")]
    pub(crate) fn rocks_backend(dir: &Path, opts: &StoreOptions) -> crate::kv::RocksBackend {
        crate::kv::RocksBackend::new(
            dir.join(DB_DIR),
            dir,
            opts.lock_timeout,
            opts.holder.clone(),
        )
    }

    /// Creates a repository with any backend.
    pub fn init_with_backend(
        dir: &Path,
        config: RepoConfig,
        backend: Box<dyn Backend>,
        opts: StoreOptions,
    ) -> Result<Store> {
        config.validate()?;
        // A new repository is of this build's format, with its features.
        let config = RepoConfig {
            format_version: schema::REPO_FORMAT,
            features: Some(
                config
                    .features
                    .unwrap_or_else(crate::config::Features::current),
            ),
            ..config
        };
        if dir.join(crate::config::CONFIG_FILE).exists() {
            return Err(Error::AlreadyExists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir.join(PACKS_DIR))
            .map_err(|e| Error::io("create", dir.join(PACKS_DIR), e))?;
        backend.transact(&mut |_kv| {
            let mut b = Batch::default();
            b.put(
                Cf::Meta,
                schema::META_FORMAT,
                schema::REPO_FORMAT.to_le_bytes().to_vec(),
            );
            b.put(
                Cf::Meta,
                schema::META_GC_GENERATION,
                0u64.to_le_bytes().to_vec(),
            );
            let empty = TreeNode::Leaf(Vec::new()).encode();
            b.put(
                Cf::Objects,
                tree::empty_tree_id().as_bytes().to_vec(),
                stored::wrap(&empty, config.compression_level),
            );
            Ok(b)
        })?;
        // Best effort: a disk too full for it gets it at a later write.
        ensure_reserve(dir);
        // The config file is written last: its presence marks a complete repository.
        config.save(dir)?;
        Self::open_with_backend(dir, backend, opts)
    }

    /// Opens a repository with any backend.
    pub fn open_with_backend(
        dir: &Path,
        backend: Box<dyn Backend>,
        opts: StoreOptions,
    ) -> Result<Store> {
        let config = RepoConfig::load(dir)?;
        let reader = backend.open_read()?;
        match reader.get(Cf::Meta, schema::META_FORMAT)? {
            Some(v) => {
                let found = u32::from_le_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| Error::corrupted("meta format", "bad length"))?,
                );
                if found > schema::REPO_FORMAT {
                    return Err(Error::UnsupportedFormatVersion {
                        what: "database".into(),
                        found,
                        supported: schema::REPO_FORMAT,
                    });
                }
                if found < schema::REPO_FORMAT {
                    // config.json is rewritten after the database by
                    // `upgrade` (and read first here): an older database
                    // under a current config is not something it leaves.
                    return Err(Error::NeedsUpgrade {
                        repo: crate::config::repo_display(dir),
                        found,
                        current: schema::REPO_FORMAT,
                    });
                }
            }
            None => {
                return Err(Error::corrupted(
                    dir.join(DB_DIR).display().to_string(),
                    "no format marker",
                ))
            }
        }
        Ok(Store {
            packs: PackReader::new(dir.join(PACKS_DIR)),
            dir: dir.to_path_buf(),
            read_only: config.read_only_features(),
            config,
            backend,
            reader: RwLock::new(Some(reader)),
            stale: std::sync::atomic::AtomicBool::new(false),
            opts,
            source: RwLock::new(None),
            pack_storage: RwLock::new(None),
        })
    }

    /// The repository directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The packs directory.
    pub fn packs_dir(&self) -> PathBuf {
        self.dir.join(PACKS_DIR)
    }
    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }
    /// The repository's `ro_compat` features this build does not know:
    /// while there are any, every write is refused.
    pub fn read_only_features(&self) -> &[String] {
        &self.read_only
    }

    /// Refuses to write to a repository with unknown `ro_compat` features.
    pub fn check_writable(&self) -> Result<()> {
        if self.read_only.is_empty() {
            return Ok(());
        }
        Err(Error::ReadOnlyFeatures {
            repo: crate::config::repo_display(&self.dir),
            features: self.read_only.clone(),
        })
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The current read handle (reopened first if this store wrote since).
    pub fn reader(&self) -> Arc<dyn KvRead> {
        if self.stale.swap(false, std::sync::atomic::Ordering::AcqRel) {
            if let Err(e) = self.refresh() {
                // Keep the old view; the next call tries again.
                tracing::warn!("cannot reopen the database for reading: {e}");
                self.stale.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let current = self
            .reader
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        if let Some(r) = current {
            return r;
        }
        // Released after a write: reopened here, under the lock, so that
        // concurrent readers share one fresh view.
        let mut slot = self.reader.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = slot.as_ref() {
            return r.clone();
        }
        match self.backend.open_read() {
            Ok(fresh) => {
                self.packs.reset();
                *slot = Some(fresh.clone());
                fresh
            }
            Err(e) => {
                tracing::warn!("cannot reopen the database for reading: {e}");
                Arc::new(ReleasedView)
            }
        }
    }

    /// Re-opens the read handle to see other processes' commits.
    pub fn refresh(&self) -> Result<()> {
        let fresh = self.backend.open_read()?;
        match self.reader.write() {
            Ok(mut r) => *r = Some(fresh),
            Err(p) => *p.into_inner() = Some(fresh),
        }
        self.packs.reset();
        Ok(())
    }

    /// Watches keyspaces ([`crate::txn::keyspace_of`], e.g.
    /// `txn::app_keyspace(b"tq/")`): the subscription's `wait` returns as
    /// soon as a commit by any process changed one of them.
    pub fn subscribe(&self, keyspaces: &[String]) -> Result<crate::txn::Subscription<'_>> {
        crate::txn::Subscription::new(self, self.backend.change_source()?, keyspaces.to_vec())
    }

    /// Write stalls (intervals in which the metadata store refused every
    /// write, e.g. a long gc holding it) that ended at or after `from_ms`.
    pub fn stalls_since(&self, from_ms: i64) -> Result<Vec<(i64, i64)>> {
        crate::txn::stalls_since(&*self.reader(), from_ms)
    }

    pub(crate) fn pack_reader(&self) -> &PackReader {
        &self.packs
    }

    /// Runs one mutation: takes the write lock, opens the database
    /// read-write, lets `f` read the latest state and build a batch, applies
    /// it atomically, then refreshes the read handle.
    ///
    /// This is a transaction of the metadata backend: `f` may run more than
    /// once (when a concurrent writer changed what it read), so it must not
    /// have effects outside the batch it returns that a second run would
    /// repeat.
    pub fn write<T>(&self, f: impl FnMut(&dyn KvRead) -> Result<(Batch, T)>) -> Result<T> {
        let out = self.write_once(f)?;
        // Existing repositories get their reserve at their next write; one
        // whose reserve was spent gets it back once there is room.
        ensure_reserve(&self.dir);
        Ok(out)
    }

    /// Like [`Store::write`], for the writes that free space (`gc`, deleting
    /// versions): on a full disk it releases the repository's reserve
    /// (`.dsv/reserve`) and tries once more, so that the database can open
    /// and the space the repository holds can be given back. `f` may run
    /// twice.
    pub fn write_freeing<T>(
        &self,
        mut f: impl FnMut(&dyn KvRead) -> Result<(Batch, T)>,
    ) -> Result<T> {
        match self.write_once(&mut f) {
            Err(e) if is_disk_full(&e) && release_reserve(&self.dir) => {
                tracing::warn!("disk full: released the repository's reserve to run");
                let out = self.write_once(&mut f)?;
                ensure_reserve(&self.dir);
                Ok(out)
            }
            Err(e) => Err(e),
            Ok(out) => {
                ensure_reserve(&self.dir);
                Ok(out)
            }
        }
    }

    /// Whether claims run without serializing writers
    /// ([`Backend::claims_concurrently`](crate::kv::Backend::claims_concurrently)).
    pub fn claims_concurrently(&self) -> bool {
        self.backend.claims_concurrently()
    }

    /// A claim ([`crate::kv::Backend::claim`]): `f` gets the first entry
    /// under each of `prefixes` (`app` keys) that no concurrent claim holds,
    /// reads what else it needs and builds its batch; retried on conflict
    /// like [`Store::write`]. Concurrent claimers get different entries.
    pub fn claim<T>(
        &self,
        prefixes: &[Vec<u8>],
        mut f: impl FnMut(&dyn KvRead, &[(Vec<u8>, Vec<u8>)]) -> Result<(Batch, T)>,
    ) -> Result<T> {
        self.check_writable()?;
        self.run_txn(&mut |backend, slot| {
            backend.claim(prefixes, &mut |kv, found| {
                let (batch, o) = f(kv, found).inspect_err(|e| self.note_gc(e))?;
                *slot = Some(o);
                Ok(batch)
            })
        })
    }

    /// Runs `attempt` until it commits or fails with something else than
    /// a conflict (at most [`crate::txn::MAX_CONFLICT_RETRIES`] tries).
    fn run_txn<T>(&self, attempt: &mut TxnAttempt<'_, T>) -> Result<T> {
        let mut tries = 0u32;
        let out = loop {
            tries += 1;
            let mut out = None;
            match attempt(&*self.backend, &mut out) {
                Ok(()) => {
                    break out.ok_or_else(|| {
                        Error::Kv("transaction committed without running its body".into())
                    })?
                }
                Err(Error::Conflict { what, .. }) => {
                    if tries >= crate::txn::MAX_CONFLICT_RETRIES {
                        return Err(Error::Conflict { what, tries });
                    }
                    tracing::debug!("transaction conflict on {what}; retrying ({tries})");
                    std::thread::sleep(crate::txn::conflict_backoff(tries));
                }
                Err(e) => return Err(e),
            }
        };
        self.release_view();
        Ok(out)
    }

    /// A body failed because a gc ran meanwhile: our read view predates
    /// it, and a retry must see it.
    fn note_gc(&self, e: &Error) {
        if matches!(e, Error::ConcurrentGc(_)) {
            self.stale.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Lets go of the read view after a commit: the next [`Store::reader`]
    /// opens a fresh one. Released now rather than kept until then, so an
    /// idle store holds no snapshot (on a database server, an open snapshot
    /// keeps every row version after it from being cleaned up).
    fn release_view(&self) {
        let old = match self.reader.write() {
            Ok(mut r) => r.take(),
            Err(p) => p.into_inner().take(),
        };
        // Whoever reads next opens a fresh view (`reader` finds none), and
        // a refresh that raced this (its view may predate our commit) is
        // redone by the next `reader`.
        self.stale.store(true, std::sync::atomic::Ordering::Release);
        drop(old);
    }

    fn write_once<T>(&self, mut f: impl FnMut(&dyn KvRead) -> Result<(Batch, T)>) -> Result<T> {
        self.check_writable()?;
        // The read view is reopened lazily after a commit: a command that
        // exits after its write never pays for it.
        self.run_txn(&mut |backend, slot| {
            backend.transact(&mut |kv| {
                let (batch, o) = f(kv).inspect_err(|e| self.note_gc(e))?;
                *slot = Some(o);
                Ok(batch)
            })
        })
    }

    // ---- objects and chunks -------------------------------------------

    /// Reads an object.
    pub fn object(&self, id: &ObjectId) -> Result<Object> {
        tree::read_object(&*self.reader(), id)
    }

    /// Reads a tree node.
    pub fn tree_node(&self, id: &ObjectId) -> Result<TreeNode> {
        KvObjects(&*self.reader()).tree(id)
    }

    /// Reads a file manifest.
    pub fn file_object(&self, id: &ObjectId) -> Result<FileObject> {
        KvObjects(&*self.reader()).file(id)
    }

    /// All entries of a directory, sorted.
    pub fn list_dir(&self, id: &ObjectId) -> Result<Vec<Entry>> {
        tree::list_dir(&KvObjects(&*self.reader()), id)
    }

    /// Looks up a path in a tree.
    pub fn lookup(&self, root: &ObjectId, path: &[u8]) -> Result<Option<Entry>> {
        tree::lookup(&KvObjects(&*self.reader()), root, path)
    }

    /// Visits every file and symlink below `root`, in path order.
    pub fn walk_files(
        &self,
        root: &ObjectId,
        visit: &mut dyn FnMut(&[u8], &Entry) -> Result<()>,
    ) -> Result<()> {
        tree::walk_files(&KvObjects(&*self.reader()), root, b"", visit)
    }

    /// Where a chunk is stored.
    pub fn chunk_loc(&self, id: &ChunkId) -> Result<ChunkLoc> {
        let kv = self.reader();
        match kv.get(Cf::Chunks, id.as_bytes())? {
            Some(v) => ChunkLoc::decode(&v, id),
            None => match kv.get(Cf::Meta, &schema::damaged_key(id))? {
                // Taken out of service by `fsck --repair`: say so, never
                // "not found" (and never the damaged bytes).
                Some(d) => Err(Error::DamagedChunk {
                    chunk: *id,
                    file: None,
                    reason: schema::DamagedChunk::decode(&d, id)?.reason,
                }),
                None => Err(Error::not_found(Kind::Chunk, id.to_hex())),
            },
        }
    }

    /// Records a `ro_compat` feature this build knows in `config.json` when
    /// the repository does not list it yet (a repository made before the
    /// feature existed starts using it): builds that do not know it then
    /// open the repository read-only.
    pub fn enable_ro_compat_feature(&self, name: &str) -> Result<()> {
        if !crate::config::KNOWN_RO_COMPAT.contains(&name) {
            return Err(Error::Invalid(format!("unknown feature {name}")));
        }
        let mut cfg = RepoConfig::load(&self.dir)?;
        let features = cfg.features.get_or_insert_with(Default::default);
        if features.ro_compat.iter().any(|f| f == name) {
            return Ok(());
        }
        features.ro_compat.push(name.to_string());
        cfg.save(&self.dir)
    }

    /// Sets where chunks missing from this repository's packs are read
    /// from (a lazy clone's remote). Every chunk a source returns is
    /// checked against its id before it is used.
    pub fn set_chunk_source(&self, source: Option<Arc<dyn crate::storage::ChunkSource>>) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// Publishes every pack this store writes to `storage` (under
    /// [`shared_pack_name`]) before the metadata that names its chunks
    /// commits: the data of a team repository is on the shared object
    /// store before any machine can see a version that needs it. A pack
    /// this machine does not have is then read from there (through the
    /// chunk source, which the caller sets to read `storage`).
    pub fn set_pack_storage(&self, storage: Option<Arc<dyn crate::storage::PackStorage>>) {
        *self.pack_storage.write().unwrap_or_else(|e| e.into_inner()) = storage;
    }

    /// Now, in ms since the epoch, by the metadata database's clock (this
    /// machine's clock plus [`Backend::clock_offset_ms`]): the time leases,
    /// heartbeats and their expiry are judged by, the same on every
    /// machine of a team whatever their own clocks say.
    pub fn now_ms(&self) -> i64 {
        now_ms() + self.backend.clock_offset_ms()
    }

    /// Where packs are published, if anywhere.
    pub fn pack_storage(&self) -> Option<Arc<dyn crate::storage::PackStorage>> {
        self.pack_storage
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Uploads the packs `ids` (just written here) to the pack storage, if
    /// any; every one is on it when this returns `Ok`.
    pub(crate) fn publish_packs(&self, ids: &[u64]) -> Result<()> {
        let Some(storage) = self.pack_storage() else {
            return Ok(());
        };
        let dir = self.packs_dir();
        let mut items = ids.iter().map(|id| {
            let path = crate::pack::pack_path(&dir, *id);
            std::fs::read(&path)
                .map_err(|e| Error::io("read pack", &path, e))
                .map(|data| (shared_pack_name(*id), data))
        });
        storage.put_many(&mut items, &|_| {})?;
        Ok(())
    }

    /// Whether the chunk can be read from this machine's packs (on a team
    /// repository, a chunk in another machine's pack is indexed but read
    /// from the object store).
    pub fn has_local_chunk(&self, id: &ChunkId) -> Result<bool> {
        match self.reader().get(Cf::Chunks, id.as_bytes())? {
            None => Ok(false),
            Some(v) if self.pack_storage().is_some() => {
                Ok(self.pack_is_local(ChunkLoc::decode(&v, id)?.pack))
            }
            Some(_) => Ok(true),
        }
    }

    /// Whether pack `id` is in this repository's folder.
    pub fn pack_is_local(&self, id: u64) -> bool {
        crate::pack::pack_path(&self.packs_dir(), id).exists()
    }

    pub(crate) fn chunk_source(&self) -> Option<Arc<dyn crate::storage::ChunkSource>> {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the chunk is in this repository's packs.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.reader().contains(Cf::Chunks, id.as_bytes())
    }

    /// Asks the chunk source (if any) for those of `ids` the packs lack,
    /// in one batch, so that a file read from a remote costs a few
    /// coalesced requests instead of one per chunk. The source keeps what
    /// it fetched in its cache; reads then find it there.
    pub fn prefetch_missing(&self, ids: &[ChunkId]) -> Result<()> {
        let Some(src) = self.chunk_source() else {
            return Ok(());
        };
        let kv = self.reader();
        // In the file's order (its chunks lie together on a remote, so
        // batches of them are a few coalesced ranges), each chunk once.
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            let here = match kv.get(Cf::Chunks, id.as_bytes())? {
                Some(v) => self.pack_is_local(ChunkLoc::decode(&v, id)?.pack),
                None => false,
            };
            if !here {
                missing.push(*id);
            }
        }
        if !missing.is_empty() {
            src.prefetch(&*kv, &missing)?;
        }
        Ok(())
    }

    /// Reads a chunk from the chunk source; `Ok(None)` when there is none
    /// or it does not know the chunk.
    fn read_remote_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let Some(src) = self.chunk_source() else {
            return Ok(None);
        };
        let mut kv = self.reader();
        // Checked here, once: a kept copy that fails the check is dropped
        // and fetched again (from the remote, where the source checks it).
        for attempt in 0..2 {
            let fetched = match src.fetch(&*kv, std::slice::from_ref(id)) {
                Ok(f) => f,
                Err(e) if attempt == 0 && self.pack_storage().is_some() => {
                    // A team's gc may have rewritten the chunk's pack and
                    // deleted it since this view: read again where a newer
                    // view says it is.
                    tracing::debug!("chunk {id}: {e}; reading it again from a newer view");
                    self.refresh()?;
                    kv = self.reader();
                    src.fetch(&*kv, std::slice::from_ref(id))?
                }
                Err(e) => return Err(e),
            };
            let Some(c) = fetched.into_iter().next().flatten() else {
                return Ok(None);
            };
            match crate::compress::decode_chunk(id, c.codec, &c.stored, c.raw_len) {
                Ok(data) => return Ok(Some(data)),
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => src.forget(id),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// A chunk's stored record from the team's object store, through the
    /// chunk source (which checks it against its id), as `kv` locates it.
    pub(crate) fn shared_stored(&self, kv: &dyn KvRead, id: &ChunkId) -> Result<Vec<u8>> {
        let src = self
            .chunk_source()
            .ok_or_else(|| Error::not_found(Kind::Chunk, id.to_string()))?;
        match src.fetch(kv, std::slice::from_ref(id))?.pop().flatten() {
            Some(c) => Ok(c.stored),
            None => Err(Error::not_found(Kind::Chunk, id.to_string())),
        }
    }

    /// Reads a chunk's bytes, checking its hash.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = match self.chunk_loc(id) {
            Ok(loc) => loc,
            Err(e @ Error::NotFound { .. }) => {
                return match self.read_remote_chunk(id)? {
                    Some(data) => Ok(data),
                    None => Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if self.pack_storage().is_some() && !self.pack_is_local(loc.pack) {
            // A pack another machine of a team wrote: it is on the shared
            // object store, read through the chunk source (and its cache).
            if let Some(data) = self.read_remote_chunk(id)? {
                return Ok(data);
            }
        }
        let stored = match self.packs.read_stored(id, &loc) {
            Ok(s) => s,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // A gc may have repacked the chunk since our read view was
                // opened, or its pack was evicted (its chunks are read from
                // the chunk source now).
                self.refresh()?;
                match self.chunk_loc(id) {
                    // Another machine's pack (a team repository): from
                    // the shared object store.
                    Ok(loc) if !self.pack_is_local(loc.pack) && self.chunk_source().is_some() => {
                        return match self.read_remote_chunk(id)? {
                            Some(data) => Ok(data),
                            None => Err(Error::not_found(Kind::Chunk, id.to_string())),
                        };
                    }
                    Ok(loc) => {
                        let stored = self.packs.read_stored(id, &loc)?;
                        return crate::compress::decode_chunk(id, loc.codec, &stored, loc.raw_len);
                    }
                    Err(e @ Error::NotFound { .. }) => {
                        return match self.read_remote_chunk(id)? {
                            Some(data) => Ok(data),
                            None => Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        crate::compress::decode_chunk(id, loc.codec, &stored, loc.raw_len)
    }

    /// A chunk as a file object lists it: its length must be the listed one.
    fn read_listed_chunk(&self, id: &ChunkId, len: u32) -> Result<Vec<u8>> {
        let data = self.read_chunk(id)?;
        if data.len() != len as usize {
            return Err(Error::corrupted(
                format!("chunk {id}"),
                format!("{} bytes where the file lists {len}", data.len()),
            ));
        }
        Ok(data)
    }

    /// Streams a file's bytes into `out`; returns the bytes written.
    pub fn read_file_to(&self, file: &ObjectId, out: &mut dyn std::io::Write) -> Result<u64> {
        let f = self.file_object(file)?;
        if self.chunk_source().is_some() {
            let ids: Vec<ChunkId> = f.chunks.iter().map(|(c, _)| *c).collect();
            self.prefetch_missing(&ids)?;
        }
        let mut n = 0;
        for (cid, len) in &f.chunks {
            let data = self.read_listed_chunk(cid, *len).map_err(|e| match e {
                Error::DamagedChunk { chunk, reason, .. } => Error::DamagedChunk {
                    chunk,
                    file: Some(*file),
                    reason,
                },
                e => e,
            })?;
            out.write_all(&data)
                .map_err(|e| Error::io("write", "output", e))?;
            n += data.len() as u64;
        }
        if n != f.size {
            return Err(Error::corrupted(
                format!("file {file}"),
                format!("its chunks hold {n} bytes, its size says {}", f.size),
            ));
        }
        Ok(n)
    }

    /// Reads `len` bytes of a file from `offset` (fewer at the end).
    pub fn read_file_range(&self, file: &FileObject, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(file.size.saturating_sub(offset) as usize));
        let end = offset.saturating_add(len as u64).min(file.size);
        if self.chunk_source().is_some() {
            let mut pos = 0u64;
            let mut ids = Vec::new();
            for (cid, clen) in &file.chunks {
                let cend = pos + *clen as u64;
                if cend > offset && pos < end {
                    ids.push(*cid);
                }
                pos = cend;
            }
            self.prefetch_missing(&ids)?;
        }
        let mut pos = 0u64;
        for (cid, clen) in &file.chunks {
            let cend = pos + *clen as u64;
            if cend > offset && pos < end {
                let data = self.read_listed_chunk(cid, *clen)?;
                let from = offset.saturating_sub(pos) as usize;
                let to = ((end - pos) as usize).min(data.len());
                out.extend_from_slice(&data[from..to]);
            }
            if cend >= end {
                break;
            }
            pos = cend;
        }
        Ok(out)
    }

    /// Reads a path of a version's tree into `out`.
    pub fn cat(&self, root: &ObjectId, path: &[u8], out: &mut dyn std::io::Write) -> Result<u64> {
        let e = self
            .lookup(root, path)?
            .ok_or_else(|| Error::not_found(Kind::Path, String::from_utf8_lossy(path)))?;
        match e.target {
            EntryTarget::File(id) => self.read_file_to(&id, out),
            EntryTarget::Symlink(t) => {
                out.write_all(&t)
                    .map_err(|e| Error::io("write", "output", e))?;
                Ok(t.len() as u64)
            }
            EntryTarget::Dir { .. } => Err(Error::Invalid(format!(
                "'{}' is a directory",
                String::from_utf8_lossy(path)
            ))),
        }
    }

    // ---- versions, refs, tags -----------------------------------------

    /// Reads a version.
    pub fn version(&self, id: &VersionId) -> Result<Version> {
        version_in(&*self.reader(), id)
    }

    /// Every finalized (not deleted) version id with its creation time.
    pub fn list_versions(&self) -> Result<Vec<(VersionId, i64)>> {
        let mut out = Vec::new();
        self.reader()
            .scan(Cf::Roots, &[schema::ROOT_VERSION], &mut |k, v| {
                if let (Some(id), Ok(ms)) = (VersionId::from_slice(&k[1..]), <[u8; 8]>::try_from(v))
                {
                    out.push((id, i64::from_le_bytes(ms)));
                }
                Ok(true)
            })?;
        Ok(out)
    }

    /// Whether a version is live (finalized and not deleted).
    pub fn version_exists(&self, id: &VersionId) -> Result<bool> {
        self.reader()
            .contains(Cf::Roots, &schema::root_version_key(id))
    }

    /// The one live version whose id starts with `prefix`.
    pub fn resolve_version_prefix(&self, prefix: &str) -> Result<VersionId> {
        let p = HexPrefix::parse(prefix)?;
        let mut key = vec![schema::ROOT_VERSION];
        key.extend_from_slice(&p.bytes);
        let mut found = Vec::new();
        self.reader().scan(Cf::Roots, &key, &mut |k, _| {
            if p.matches(&k[1..]) {
                found.extend(VersionId::from_slice(&k[1..]));
            }
            Ok(found.len() < 8)
        })?;
        one_of(found, Kind::Version, p.as_str())
    }

    /// The one draft whose id starts with `prefix`.
    pub fn resolve_draft_prefix(&self, prefix: &str) -> Result<DraftId> {
        let p = HexPrefix::parse(prefix)?;
        let mut found = Vec::new();
        self.reader().scan(Cf::Drafts, &p.bytes, &mut |k, _| {
            if p.matches(k) {
                found.extend(DraftId::from_slice(k));
            }
            Ok(found.len() < 8)
        })?;
        one_of(found, Kind::Draft, p.as_str())
    }

    /// A ref's target.
    pub fn get_ref(&self, name: &str) -> Result<Option<VersionId>> {
        get_ref_in(&*self.reader(), name)
    }

    /// Refs whose names start with `prefix`.
    pub fn list_refs(&self, prefix: &str) -> Result<Vec<(String, VersionId)>> {
        let mut out = Vec::new();
        self.reader()
            .scan(Cf::Refs, prefix.as_bytes(), &mut |k, v| {
                if let (Ok(name), Some(id)) = (std::str::from_utf8(k), VersionId::from_slice(v)) {
                    out.push((name.to_string(), id));
                }
                Ok(true)
            })?;
        Ok(out)
    }

    /// Tags of a version, sorted.
    pub fn tags_of(&self, id: &VersionId) -> Result<Vec<String>> {
        tags_of_in(&*self.reader(), id)
    }

    /// Versions carrying a tag.
    pub fn versions_tagged(&self, tag: &str) -> Result<Vec<VersionId>> {
        let mut out = Vec::new();
        let prefix = schema::tag_by_name_prefix(tag);
        self.reader().scan(Cf::Tags, &prefix, &mut |k, _| {
            out.extend(VersionId::from_slice(&k[prefix.len()..]));
            Ok(true)
        })?;
        Ok(out)
    }

    // ---- drafts ---------------------------------------------------------

    /// Reads a draft.
    pub fn draft(&self, id: &DraftId) -> Result<Draft> {
        draft_in(&*self.reader(), id)
    }

    /// Every draft (including finalized ones, which redirect to their version).
    pub fn list_drafts(&self) -> Result<Vec<Draft>> {
        let mut out = Vec::new();
        self.reader().scan(Cf::Drafts, b"", &mut |k, v| {
            if let Some(id) = DraftId::from_slice(k) {
                out.push(Draft {
                    id,
                    record: DraftRecord::decode(v, &id)?,
                });
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Creates a draft whose tree is its parents' merged (later parents win
    /// per path), or empty without parents.
    pub fn create_draft(&self, parents: &[VersionId]) -> Result<DraftId> {
        self.write(|kv| {
            let mut b = Batch::default();
            let id = self.create_draft_batch(kv, parents, &mut b)?;
            Ok((b, id))
        })
    }

    /// Adds the writes creating a draft to `b` (for callers composing one
    /// atomic write).
    pub fn create_draft_batch(
        &self,
        kv: &dyn KvRead,
        parents: &[VersionId],
        b: &mut Batch,
    ) -> Result<DraftId> {
        let mut pending = Pending::default();
        let root = merged_root(kv, parents, &mut pending)?;
        let stored = self.pending_batch(kv, &pending, b)?;
        let id = DraftId::random()?;
        let rec = DraftRecord {
            parents: parents.to_vec(),
            root,
            created_ms: now_ms(),
            stored_bytes: stored,
            finalized: None,
        };
        b.put(Cf::Drafts, id.as_bytes().to_vec(), rec.encode());
        Ok(id)
    }

    /// Writes pending objects that are not stored yet into `b`; returns
    /// their stored size.
    pub(crate) fn pending_batch(
        &self,
        kv: &dyn KvRead,
        pending: &Pending,
        b: &mut Batch,
    ) -> Result<u64> {
        let mut bytes = 0;
        for (id, canonical) in pending.encodings() {
            if kv.contains(Cf::Objects, id.as_bytes())? {
                continue;
            }
            let v = stored::wrap(canonical, self.config.compression_level);
            bytes += v.len() as u64 + 32;
            b.put(Cf::Objects, id.as_bytes().to_vec(), v);
        }
        Ok(bytes)
    }

    /// Stores objects built with [`tree::build_dir`] (those not stored yet)
    /// in one write; returns the bytes written.
    pub fn write_objects(&self, pending: &Pending) -> Result<u64> {
        self.write(|kv| {
            let mut b = Batch::default();
            let n = self.pending_batch(kv, pending, &mut b)?;
            Ok((b, n))
        })
    }

    /// Applies path changes (set, remove, descend, merge) to a draft.
    pub fn stage_changes(
        &self,
        draft: &DraftId,
        changes: Vec<(Vec<u8>, Change)>,
    ) -> Result<StageReport> {
        let changes = tree::changes_from_paths(changes)?;
        self.write(|kv| {
            let rec = open_draft(kv, draft)?;
            let mut pending = Pending::default();
            let mut w = Objs {
                kv,
                pending: &mut pending,
            };
            let (root, _) = tree::apply_root(&mut w, rec.root, changes.clone())?;
            let diff = diff_trees(&w, &rec.root, &root)?;
            let mut b = Batch::default();
            if root == rec.root {
                return Ok((b, StageReport::default()));
            }
            let stored = self.pending_batch(kv, &pending, &mut b)?;
            let rec = DraftRecord {
                root,
                stored_bytes: rec.stored_bytes + stored,
                ..rec
            };
            b.put(Cf::Drafts, draft.as_bytes().to_vec(), rec.encode());
            Ok((
                b,
                StageReport {
                    diff,
                    stored_bytes: stored,
                    committed: true,
                    ..Default::default()
                },
            ))
        })
    }

    /// Replaces a draft's whole tree with another tree (already stored).
    pub fn set_draft_root(&self, draft: &DraftId, root: ObjectId) -> Result<Diff> {
        self.write(|kv| {
            let rec = open_draft(kv, draft)?;
            let r = KvObjects(kv);
            r.tree(&root)?;
            let diff = diff_trees(&r, &rec.root, &root)?;
            let mut b = Batch::default();
            b.put(
                Cf::Drafts,
                draft.as_bytes().to_vec(),
                DraftRecord { root, ..rec }.encode(),
            );
            Ok((b, diff))
        })
    }

    /// Freezes a draft into a version. `extra` may add the caller's own
    /// writes (events, indexes) to the same atomic batch.
    pub fn finalize(
        &self,
        draft: &DraftId,
        message: &str,
        metadata: BTreeMap<String, String>,
        extra: &mut dyn FnMut(&dyn KvRead, &Version, &mut Batch) -> Result<()>,
    ) -> Result<Version> {
        self.write(|kv| {
            let mut b = Batch::default();
            let v = self.finalize_batch(kv, draft, message, metadata.clone(), &mut b)?;
            extra(kv, &v, &mut b)?;
            Ok((b, v))
        })
    }

    /// The writes that finalize a draft, added to `b`.
    pub fn finalize_batch(
        &self,
        kv: &dyn KvRead,
        draft: &DraftId,
        message: &str,
        metadata: BTreeMap<String, String>,
        b: &mut Batch,
    ) -> Result<Version> {
        let rec = open_draft(kv, draft)?;
        let r = KvObjects(kv);
        let base = match rec.parents.first() {
            Some(p) => version_in(kv, p)?.object.root,
            None => tree::empty_tree_id(),
        };
        let diff = diff_trees(&r, &base, &rec.root)?;
        let v = self.version_batch(
            kv,
            rec.root,
            &rec.parents,
            &diff,
            rec.stored_bytes,
            message,
            metadata,
            b,
        )?;
        b.put(
            Cf::Drafts,
            draft.as_bytes().to_vec(),
            DraftRecord {
                finalized: Some(v.id),
                ..rec
            }
            .encode(),
        );
        Ok(v)
    }

    /// The writes that create a version object and register it as a root.
    /// The root tree must be stored, or put into `b` before this call.
    #[allow(clippy::too_many_arguments)]
    pub fn version_batch(
        &self,
        kv: &dyn KvRead,
        root: ObjectId,
        parents: &[VersionId],
        diff: &Diff,
        stored_bytes: u64,
        message: &str,
        metadata: BTreeMap<String, String>,
        b: &mut Batch,
    ) -> Result<Version> {
        // The encoding's length fields: refuse what it cannot hold rather
        // than commit a version that does not decode.
        if parents.len() > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "{} parents; a version has at most {}",
                parents.len(),
                u16::MAX
            )));
        }
        if let Some(k) = metadata.keys().find(|k| k.len() > u16::MAX as usize) {
            return Err(Error::Invalid(format!(
                "metadata key of {} bytes (at most {}): {}…",
                k.len(),
                u16::MAX,
                k.chars().take(40).collect::<String>()
            )));
        }
        let mut delta = diff.delta();
        delta.stored_bytes = stored_bytes;
        let pending_root = b.ops.iter().rev().find_map(|op| match op {
            crate::kv::Op::Put(Cf::Objects, k, v) if k.as_slice() == root.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        });
        let summary: DirSummary = match pending_root {
            Some(v) => match Object::decode(&stored::unwrap(&v, "new root")?, "new root")? {
                Object::Tree(t) => t.summary(),
                _ => return Err(Error::corrupted("new root", "not a tree")),
            },
            None => KvObjects(kv).tree(&root)?.summary(),
        };
        let object = VersionObject {
            root,
            parents: parents.to_vec(),
            created_ms: now_ms(),
            message: message.to_string(),
            metadata,
            delta,
            file_count: summary.file_count,
            total_bytes: summary.total_size,
            // Two versions of equal content, lineage, message and
            // millisecond (two datasets, two machines) get distinct ids.
            salt: Some(crate::id::random_bytes()?),
        };
        let canonical = object.encode();
        let id = VersionId(crate::id::hash(&canonical));
        b.put(
            Cf::Objects,
            id.as_bytes().to_vec(),
            stored::wrap(&canonical, self.config.compression_level),
        );
        b.put(
            Cf::Roots,
            schema::root_version_key(&id),
            object.created_ms.to_le_bytes().to_vec(),
        );
        Ok(Version { id, object })
    }

    /// The writes that create one standalone version (no parents) whose
    /// tree is `sources` merged, later sources winning per path. Chunks are
    /// shared with the sources; only merged tree nodes and the version are
    /// new.
    pub fn squash_batch(
        &self,
        kv: &dyn KvRead,
        sources: &[VersionId],
        message: &str,
        metadata: BTreeMap<String, String>,
        b: &mut Batch,
    ) -> Result<Version> {
        let mut pending = Pending::default();
        let root = merged_root(kv, sources, &mut pending)?;
        let diff = diff_trees(
            &Objs {
                kv,
                pending: &mut pending,
            },
            &tree::empty_tree_id(),
            &root,
        )?;
        let stored = self.pending_batch(kv, &pending, b)?;
        self.version_batch(kv, root, &[], &diff, stored, message, metadata, b)
    }

    /// Discards a draft that was never finalized.
    pub fn discard_draft_batch(
        &self,
        kv: &dyn KvRead,
        draft: &DraftId,
        b: &mut Batch,
    ) -> Result<()> {
        open_draft(kv, draft)?;
        b.delete(Cf::Drafts, draft.as_bytes().to_vec());
        Ok(())
    }

    /// The writes that delete a version: its root entry, tags and refs to
    /// it. Its data stays until `gc`.
    pub fn delete_version_batch(
        &self,
        kv: &dyn KvRead,
        id: &VersionId,
        b: &mut Batch,
    ) -> Result<()> {
        if !kv.contains(Cf::Roots, &schema::root_version_key(id))? {
            return Err(Error::not_found(Kind::Version, id.to_hex()));
        }
        b.delete(Cf::Roots, schema::root_version_key(id));
        for t in tags_of_in(kv, id)? {
            b.delete(Cf::Tags, schema::tag_by_name_key(&t, id));
            b.delete(Cf::Tags, schema::tag_by_version_key(id, &t));
        }
        kv.scan(Cf::Refs, b"", &mut |k, v| {
            if v == id.as_bytes() {
                b.delete(Cf::Refs, k.to_vec());
            }
            Ok(true)
        })?;
        Ok(())
    }

    /// Compares two trees.
    pub fn diff(&self, a: &ObjectId, b: &ObjectId) -> Result<Diff> {
        diff_trees(&KvObjects(&*self.reader()), a, b)
    }

    /// Compares two versions.
    pub fn diff_versions(&self, a: &VersionId, b: &VersionId) -> Result<Diff> {
        let ra = self.version(a)?.object.root;
        let rb = self.version(b)?.object.root;
        self.diff(&ra, &rb)
    }
}

/// Deletes the reserve; whether there was one.
fn release_reserve(dir: &Path) -> bool {
    std::fs::remove_file(dir.join(RESERVE_FILE)).is_ok()
}

/// Creates the reserve if it is missing and the disk has room for it (a
/// temporary name, allocated in full, then renamed: never a partial one).
/// Failing is not an error: the next write tries again.
/// One attempt of a transaction in [`Store`]'s retry loop: runs it on the
/// backend and leaves the body's output in the slot.
type TxnAttempt<'a, T> = dyn FnMut(&dyn crate::kv::Backend, &mut Option<T>) -> Result<()> + 'a;

/// What [`Store::reader`] returns when, after a write, a fresh view could
/// not be opened (the error was logged): its reads fail.
struct ReleasedView;

impl ReleasedView {
    fn unavailable() -> Error {
        Error::Unavailable(
            "the metadata could not be read again after a write (see the warning above)".into(),
        )
    }
}

impl KvRead for ReleasedView {
    fn get(&self, _: Cf, _: &[u8]) -> Result<Option<Vec<u8>>> {
        Err(Self::unavailable())
    }
    fn scan_from(&self, _: Cf, _: &[u8], _: &[u8], _: &mut crate::kv::Visitor<'_>) -> Result<()> {
        Err(Self::unavailable())
    }
    fn scan_rev(&self, _: Cf, _: &[u8], _: &[u8], _: &mut crate::kv::Visitor<'_>) -> Result<()> {
        Err(Self::unavailable())
    }
}

pub(crate) fn ensure_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    if path.exists() {
        return;
    }
    let tmp = dir.join(format!(".{RESERVE_FILE}.{}", std::process::id()));
    let made = allocate_reserve(&tmp).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!("no reserve at {}: {e}", path.display());
    }
}

/// Writes a reserve file of [`RESERVE_BYTES`] at `tmp`, fsynced.
fn allocate_reserve(tmp: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    // Allocated (fallocate), not a sparse file that would free nothing.
    if let Err(e) = fs4::fs_std::FileExt::allocate(&f, RESERVE_BYTES) {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(e);
        }
        // No fallocate on this file system: write zeros instead.
        let zeros = vec![0u8; 1 << 20];
        for i in 0..RESERVE_BYTES >> 20 {
            std::os::unix::fs::FileExt::write_all_at(&f, &zeros, i << 20)?;
        }
    }
    f.sync_all()
}

fn one_of<T: std::fmt::Display + Copy>(found: Vec<T>, kind: Kind, prefix: &str) -> Result<T> {
    match found.as_slice() {
        [] => Err(Error::not_found(kind, prefix)),
        [one] => Ok(*one),
        many => Err(Error::Ambiguous {
            kind,
            prefix: prefix.to_string(),
            candidates: many
                .iter()
                .map(|c| c.to_string()[..12].to_string())
                .collect(),
        }),
    }
}

/// The tree of `versions` merged in order (later versions win per path;
/// the empty tree for none). Each must be a live version. New merged
/// nodes go to `pending`.
pub(crate) fn merged_root(
    kv: &dyn KvRead,
    versions: &[VersionId],
    pending: &mut Pending,
) -> Result<ObjectId> {
    let mut root = tree::empty_tree_id();
    for (i, v) in versions.iter().enumerate() {
        if !kv.contains(Cf::Roots, &schema::root_version_key(v))? {
            return Err(Error::not_found(Kind::Version, v.to_hex()));
        }
        let r = version_in(kv, v)?.object.root;
        root = if i == 0 {
            r
        } else {
            tree::merge_dirs(&mut Objs { kv, pending }, root, r)?.0
        };
    }
    Ok(root)
}

/// Reads a version from a handle.
pub fn version_in(kv: &dyn KvRead, id: &VersionId) -> Result<Version> {
    let oid = ObjectId(id.0);
    match tree::read_object(kv, &oid) {
        Ok(Object::Version(object)) => Ok(Version { id: *id, object }),
        Ok(other) => Err(Error::WrongObjectType {
            id: oid,
            found: other.type_name(),
            expected: "version",
        }),
        Err(Error::NotFound { .. }) => Err(Error::not_found(Kind::Version, id.to_hex())),
        Err(e) => Err(e),
    }
}

/// Reads a ref from a handle.
pub fn get_ref_in(kv: &dyn KvRead, name: &str) -> Result<Option<VersionId>> {
    match kv.get(Cf::Refs, name.as_bytes())? {
        Some(v) => Ok(Some(VersionId::from_slice(&v).ok_or_else(|| {
            Error::corrupted(format!("ref {name}"), "bad length")
        })?)),
        None => Ok(None),
    }
}

/// Tags of a version from a handle.
pub fn tags_of_in(kv: &dyn KvRead, id: &VersionId) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let prefix = schema::tag_by_version_prefix(id);
    kv.scan(Cf::Tags, &prefix, &mut |k, _| {
        out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        Ok(true)
    })?;
    Ok(out)
}

/// Adds a tag to a version (in `b`).
pub fn add_tag_batch(id: &VersionId, tag: &str, b: &mut Batch) -> Result<()> {
    validate_label(tag, "tag")?;
    b.put(Cf::Tags, schema::tag_by_name_key(tag, id), Vec::new());
    b.put(Cf::Tags, schema::tag_by_version_key(id, tag), Vec::new());
    Ok(())
}

/// Removes a tag from a version (in `b`).
pub fn remove_tag_batch(id: &VersionId, tag: &str, b: &mut Batch) {
    b.delete(Cf::Tags, schema::tag_by_name_key(tag, id));
    b.delete(Cf::Tags, schema::tag_by_version_key(id, tag));
}

/// Points a ref at a version (in `b`).
pub fn set_ref_batch(name: &str, id: &VersionId, b: &mut Batch) -> Result<()> {
    validate_label(name, "ref name")?;
    b.put(Cf::Refs, name.as_bytes().to_vec(), id.as_bytes().to_vec());
    Ok(())
}

/// Checks a tag or ref name: 1–255 bytes, no NUL or control characters.
pub fn validate_label(s: &str, what: &str) -> Result<()> {
    if s.is_empty() || s.len() > 255 || s.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "invalid {what} '{s}': 1 to 255 printable characters"
        )));
    }
    Ok(())
}

/// Reads a draft from a handle.
pub fn draft_in(kv: &dyn KvRead, id: &DraftId) -> Result<Draft> {
    let v = kv
        .get(Cf::Drafts, id.as_bytes())?
        .ok_or_else(|| Error::not_found(Kind::Draft, id.to_hex()))?;
    Ok(Draft {
        id: *id,
        record: DraftRecord::decode(&v, id)?,
    })
}

/// Reads a draft that still accepts changes.
pub(crate) fn open_draft(kv: &dyn KvRead, id: &DraftId) -> Result<DraftRecord> {
    let d = draft_in(kv, id)?;
    if let Some(v) = d.record.finalized {
        return Err(Error::DraftFinalized(*id, v));
    }
    Ok(d.record)
}
