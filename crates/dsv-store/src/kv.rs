//! The key-value seam: the few operations the engine needs from its
//! metadata database, with a RocksDB implementation and an in-memory one
//! for fast tests and crash simulation.
//!
//! Readers get a point-in-time view ([`Backend::open_read`]); writers run
//! transactions ([`Backend::transact`]) whose batch commits atomically only
//! if nothing they read changed meanwhile (see [`crate::txn`] for the
//! semantics every backend carries: conflict detection, snapshot reads,
//! keyspace counters, the change feed, write stalls).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::txn::{counter_in, first_conflict, seal, ChangeSource, Recording};

/// Column families. The numeric values are not stored; names are (see `name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Object id → stored object.
    Objects,
    /// Chunk id → pack location.
    Chunks,
    /// Ref name → version id.
    Refs,
    /// Tag ↔ version index.
    Tags,
    /// Draft id → draft record.
    Drafts,
    /// Absolute path → stat fingerprint and file id.
    StatCache,
    /// GC roots: finalized versions and what the porcelain registers.
    Roots,
    /// Repository-wide counters (format version, gc generation).
    Meta,
    /// The porcelain's records (events, tasks, models, triggers).
    App,
}

/// Every column family, in creation order.
pub const ALL_CFS: [Cf; 9] = [
    Cf::Objects,
    Cf::Chunks,
    Cf::Refs,
    Cf::Tags,
    Cf::Drafts,
    Cf::StatCache,
    Cf::Roots,
    Cf::Meta,
    Cf::App,
];

impl Cf {
    /// The column family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Objects => "objects",
            Cf::Chunks => "chunks",
            Cf::Refs => "refs",
            Cf::Tags => "tags",
            Cf::Drafts => "drafts",
            Cf::StatCache => "statcache",
            Cf::Roots => "roots",
            Cf::Meta => "meta",
            Cf::App => "app",
        }
    }
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key.
    Put(Cf, Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Cf, Vec<u8>),
    /// Append `value` at the next number of a sequence: the backend, at
    /// commit and in commit order, reads the counter `seq` (u64 LE, 0 when
    /// absent), puts `value` at `prefix` · (counter + 1) as u64 BE, and
    /// stores the new counter. Numbers are gap-free and never reused, and a
    /// transaction that appends does not read the counter itself, so
    /// appenders never conflict with one another on it.
    Append {
        /// Where the sequence's counter lives.
        seq: (Cf, Vec<u8>),
        /// Column family of the appended record.
        cf: Cf,
        /// Key prefix of the appended record.
        prefix: Vec<u8>,
        /// The record.
        value: Vec<u8>,
    },
}

/// An atomic group of writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The writes, applied in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// Adds a put.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(cf, key.into(), value.into()));
    }
    /// Adds a delete.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, key.into()));
    }
    /// Adds a sequenced append ([`Op::Append`]).
    pub fn append(
        &mut self,
        seq: (Cf, &[u8]),
        cf: Cf,
        prefix: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.ops.push(Op::Append {
            seq: (seq.0, seq.1.to_vec()),
            cf,
            prefix: prefix.into(),
            value: value.into(),
        });
    }
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Bytes of keys and values put.
    pub fn put_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) => (k.len() + v.len()) as u64,
                Op::Append { prefix, value, .. } => (prefix.len() + 8 + value.len()) as u64,
                Op::Delete(..) => 0,
            })
            .sum()
    }
    /// Appends another batch.
    pub fn extend(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

/// A scan visitor: return `Ok(false)` to stop.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// Read access.
pub trait KvRead: Send + Sync {
    /// One key.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Keys starting with `prefix`, ascending, from `start` (which must
    /// itself start with `prefix`, or be empty to mean `prefix`).
    fn scan_from(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: &mut Visitor<'_>)
        -> Result<()>;
    /// Keys starting with `prefix`, ascending.
    fn scan(&self, cf: Cf, prefix: &[u8], visit: &mut Visitor<'_>) -> Result<()> {
        self.scan_from(cf, prefix, prefix, visit)
    }
    /// Keys starting with `prefix` and below `before` (no bound when empty),
    /// in descending order.
    fn scan_rev(&self, cf: Cf, prefix: &[u8], before: &[u8], visit: &mut Visitor<'_>)
        -> Result<()>;
    /// The last key (and value) starting with `prefix`.
    fn last(&self, cf: Cf, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut out = None;
        self.scan_rev(cf, prefix, b"", &mut |k, v| {
            out = Some((k.to_vec(), v.to_vec()));
            Ok(false)
        })?;
        Ok(out)
    }
    /// Whether a key exists.
    fn contains(&self, cf: Cf, key: &[u8]) -> Result<bool> {
        Ok(self.get(cf, key)?.is_some())
    }
}

/// Direct read-write access (tests and tools building a database by hand;
/// the engine writes through [`Backend::transact`]).
pub trait KvWrite: KvRead {
    /// Applies a batch atomically and durably.
    fn write(&self, batch: Batch) -> Result<()>;
}

/// A transaction's body: reads through the given view (the latest
/// committed state) and returns the writes to commit. It may run more than
/// once (after a conflict), so it must not have effects outside its batch
/// that a second run would repeat.
pub type TxnBody<'a> = dyn FnMut(&dyn KvRead) -> Result<Batch> + 'a;

/// A claim's body ([`Backend::claim`]): like a [`TxnBody`], and also given
/// the claimed entries (key, value), at most one per prefix, in the order
/// of the prefixes.
pub type ClaimBody<'a> = dyn FnMut(&dyn KvRead, &[(Vec<u8>, Vec<u8>)]) -> Result<Batch> + 'a;

/// One metadata database, with the semantics of [`crate::txn`].
pub trait Backend: Send + Sync {
    /// A point-in-time view: later commits are invisible to it.
    fn open_read(&self) -> Result<Arc<dyn KvRead>>;
    /// Runs `body` once as a transaction and commits its batch atomically
    /// (with the keyspace counter bumps, [`crate::txn::seal`]), or fails with
    /// [`Error::Conflict`] when something it read changed before the commit
    /// (the caller retries), or with [`Error::LockTimeout`] /
    /// [`Error::Unavailable`] when the database cannot be written now.
    fn transact(&self, body: &mut TxnBody<'_>) -> Result<()>;
    /// A source of wake-ups on commits by any writer.
    fn change_source(&self) -> Result<Box<dyn ChangeSource>>;
    /// Whether [`Backend::claim`] runs without serializing writers, so
    /// that a claim finding nothing costs no more than a read (callers
    /// then skip their unlocked "is there anything?" check). Default:
    /// `false`.
    fn claims_concurrently(&self) -> bool {
        false
    }
    /// How far the database's clock is ahead of this machine's, in ms (0
    /// for an embedded database): lease deadlines and heartbeats written
    /// by machines whose clocks disagree are then all in the database's
    /// time. Backends measure it at most every few minutes; it may cost a
    /// round trip when it does.
    fn clock_offset_ms(&self) -> i64 {
        0
    }
    /// A transaction that claims work: for each of `prefixes` (`app`
    /// keys), the first entry under it that no concurrent claim holds is
    /// given to `body`, and stays held (no other claim gets it, and it is
    /// neither changed nor removed by anyone else) until this transaction
    /// ends. Concurrent claimers thus get different entries instead of
    /// conflicting on the first one — a job queue's dequeue. The body's
    /// other reads are validated as in [`Backend::transact`].
    ///
    /// The default runs a plain transaction that reads the first entry of
    /// each prefix: right for backends that serialize their writers.
    fn claim(&self, prefixes: &[Vec<u8>], body: &mut ClaimBody<'_>) -> Result<()> {
        self.transact(&mut |kv| {
            let mut found = Vec::new();
            for p in prefixes {
                kv.scan(Cf::App, p, &mut |k, v| {
                    found.push((k.to_vec(), v.to_vec()));
                    Ok(false)
                })?;
            }
            body(kv, &found)
        })
    }
}

type MemMap = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

/// Commit signal of the in-memory database.
#[derive(Debug, Default)]
struct Commits {
    count: Mutex<u64>,
    changed: Condvar,
}

/// An in-memory database (tests): optimistic transactions validated at
/// commit, snapshots by copy-on-write. Clones share the same data.
#[derive(Debug, Clone, Default)]
pub struct MemKv {
    data: Arc<RwLock<Arc<MemMap>>>,
    commits: Arc<Commits>,
}

/// A point-in-time view of a [`MemKv`].
#[derive(Debug, Clone)]
pub struct MemSnapshot(Arc<MemMap>);

fn mem_scan(
    map: &MemMap,
    cf: Cf,
    prefix: &[u8],
    bound: &[u8],
    reverse: bool,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    use std::ops::Bound;
    if reverse {
        let upper = if bound.is_empty() {
            match prefix_successor(prefix) {
                Some(s) => Bound::Excluded((cf, s)),
                None => Bound::Unbounded,
            }
        } else {
            Bound::Excluded((cf, bound.to_vec()))
        };
        map.range((Bound::Included((cf, prefix.to_vec())), upper))
            .rev()
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    } else {
        let from = if bound.is_empty() { prefix } else { bound };
        map.range((cf, from.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

fn visit_all(items: Vec<(Vec<u8>, Vec<u8>)>, visit: &mut Visitor<'_>) -> Result<()> {
    for (k, v) in items {
        if !visit(&k, &v)? {
            break;
        }
    }
    Ok(())
}

impl KvRead for MemSnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(&(cf, key.to_vec())).cloned())
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        visit_all(mem_scan(&self.0, cf, prefix, start, false), visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        visit_all(mem_scan(&self.0, cf, prefix, before, true), visit)
    }
}

impl MemKv {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }
    /// A deep copy of the current contents (to compare states in tests).
    pub fn snapshot(&self) -> BTreeMap<(Cf, Vec<u8>), Vec<u8>> {
        self.data
            .read()
            .map(|d| d.as_ref().clone())
            .unwrap_or_default()
    }
    /// A point-in-time view.
    pub fn view(&self) -> Result<MemSnapshot> {
        Ok(MemSnapshot(
            self.data.read().map_err(|_| poisoned())?.clone(),
        ))
    }

    /// Runs `body` optimistically on a snapshot taken when it starts (so it
    /// reads one consistent state), recording every read; then, under the
    /// commit lock, the reads are replayed against the current state. Any
    /// difference is [`Error::Conflict`] — also when the body failed, since
    /// its error may come from the stale state — else the sealed batch is
    /// applied by `apply`.
    fn transact_with(
        &self,
        body: &mut TxnBody<'_>,
        apply: &mut dyn FnMut(&mut MemMap, Batch) -> Result<()>,
    ) -> Result<()> {
        let snap = self.view()?;
        let rec = Recording::new(&snap);
        let result = body(&rec);
        let reads = rec.into_reads();
        drop(snap);
        let mut guard = self.data.write().map_err(|_| poisoned())?;
        let mut batch = {
            let now = MemSnapshot(guard.clone());
            let conflict = first_conflict(&reads, &now)?;
            let mut batch = match (result, conflict) {
                (_, Some(what)) => return Err(Error::Conflict { what, tries: 1 }),
                (Err(e), None) => return Err(e),
                (Ok(b), None) => b,
            };
            if batch.is_empty() {
                return Ok(());
            }
            seal(&mut batch, &mut |cf, k| counter_in(&now, cf, k))?;
            batch
        };
        apply(Arc::make_mut(&mut guard), std::mem::take(&mut batch))?;
        drop(guard);
        let mut n = self.commits.count.lock().map_err(|_| poisoned())?;
        *n += 1;
        self.commits.changed.notify_all();
        Ok(())
    }
    /// Number of keys in one column family.
    pub fn count(&self, cf: Cf) -> usize {
        self.data
            .read()
            .map(|d| d.keys().filter(|(c, _)| *c == cf).count())
            .unwrap_or(0)
    }
}

fn poisoned() -> Error {
    Error::Kv("in-memory database lock poisoned".into())
}

/// Live reads of the current state (each read sees the latest commit).
impl KvRead for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let d = self.data.read().map_err(|_| poisoned())?;
        Ok(d.get(&(cf, key.to_vec())).cloned())
    }

    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        // Copy the matching range first so the visitor may call back into the store.
        let items = {
            let d = self.data.read().map_err(|_| poisoned())?;
            mem_scan(&d, cf, prefix, start, false)
        };
        visit_all(items, visit)
    }

    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let items = {
            let d = self.data.read().map_err(|_| poisoned())?;
            mem_scan(&d, cf, prefix, before, true)
        };
        visit_all(items, visit)
    }
}

fn apply_ops(d: &mut MemMap, batch: Batch) {
    for op in batch.ops {
        match op {
            Op::Put(cf, k, v) => {
                d.insert((cf, k), v);
            }
            Op::Delete(cf, k) => {
                d.remove(&(cf, k));
            }
            // Resolved by `txn::resolve_appends` before any write.
            Op::Append { .. } => {}
        }
    }
}

impl KvWrite for MemKv {
    fn write(&self, mut batch: Batch) -> Result<()> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let now = MemSnapshot(d.clone());
        crate::txn::resolve_appends(&mut batch, &mut |cf, k| counter_in(&now, cf, k))?;
        apply_ops(Arc::make_mut(&mut d), batch);
        drop(d);
        let mut n = self.commits.count.lock().map_err(|_| poisoned())?;
        *n += 1;
        self.commits.changed.notify_all();
        Ok(())
    }
}

/// Wake-ups of a [`MemKv`]: its commit counter's condition variable.
struct MemChanges {
    commits: Arc<Commits>,
    seen: u64,
}

impl ChangeSource for MemChanges {
    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let n = self.commits.count.lock().map_err(|_| poisoned())?;
        let (n, _) = self
            .commits
            .changed
            .wait_timeout_while(n, timeout, |n| *n == self.seen)
            .map_err(|_| poisoned())?;
        self.seen = *n;
        Ok(())
    }
}

impl Backend for MemKv {
    fn open_read(&self) -> Result<Arc<dyn KvRead>> {
        Ok(Arc::new(self.view()?))
    }
    fn transact(&self, body: &mut TxnBody<'_>) -> Result<()> {
        self.transact_with(body, &mut |d, b| {
            apply_ops(d, b);
            Ok(())
        })
    }
    fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
        let seen = *self.commits.count.lock().map_err(|_| poisoned())?;
        Ok(Box::new(MemChanges {
            commits: self.commits.clone(),
            seen,
        }))
    }
}

/// An in-memory database that simulates a crash: the batch write numbered
/// `fail_at` (counting from 0 across every writer it opens) and all later
/// ones fail without applying anything, as if the process died just before
/// the write reached the log.
#[derive(Debug, Clone)]
pub struct CrashingKv {
    inner: MemKv,
    writes: Arc<AtomicUsize>,
    fail_at: usize,
}

impl CrashingKv {
    /// Wraps `inner`; writes from number `fail_at` on fail.
    pub fn new(inner: MemKv, fail_at: usize) -> Self {
        Self {
            inner,
            writes: Arc::new(AtomicUsize::new(0)),
            fail_at,
        }
    }
    /// Batch writes attempted so far.
    pub fn attempted(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }
}

impl KvRead for CrashingKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.inner.scan_from(cf, prefix, start, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.inner.scan_rev(cf, prefix, before, visit)
    }
}

impl Backend for CrashingKv {
    fn open_read(&self) -> Result<Arc<dyn KvRead>> {
        self.inner.open_read()
    }
    fn transact(&self, body: &mut TxnBody<'_>) -> Result<()> {
        let writes = self.writes.clone();
        let fail_at = self.fail_at;
        self.inner.transact_with(body, &mut |d, b| {
            let n = writes.fetch_add(1, Ordering::SeqCst);
            if n >= fail_at {
                return Err(Error::Injected("batch write"));
            }
            apply_ops(d, b);
            Ok(())
        })
    }
    fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
        self.inner.change_source()
    }
}

#[cfg(feature = "rocksdb")]
pub use rocks::RocksBackend;

#[cfg(feature = "rocksdb")]
mod rocks {
    use super::*;
    use rocksdb::{
        BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options,
        WriteBatch, WriteOptions, DB,
    };
    use std::path::{Path, PathBuf};

    /// Batches larger than this are flushed to tables right away.
    const FLUSH_AFTER: u64 = 256 << 10;
    /// Tables in one column family above which small ones are merged.
    const MAX_TABLES: usize = 32;
    /// Average table size below which a family counts as fragmented.
    const SMALL_TABLE: u64 = 1 << 20;

    /// RocksDB in a directory. One process at a time may open RocksDB
    /// read-write, so this backend serializes transactions with a lock of
    /// its own (an exclusive `flock` on the repository's `lock` file, naming
    /// its holder), opens the database read-write inside it, runs the body
    /// on the latest state and commits: no conflict can occur, and no other
    /// layer takes a lock around it.
    pub struct RocksBackend {
        path: PathBuf,
        cache: Cache,
        lock_dir: PathBuf,
        lock_timeout: std::time::Duration,
        holder: String,
    }

    impl std::fmt::Debug for RocksBackend {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RocksBackend")
                .field("path", &self.path)
                .finish()
        }
    }

    fn kv_err(path: &Path, e: rocksdb::Error) -> Error {
        Error::Kv(format!("{}: {e}", path.display()))
    }

    impl RocksBackend {
        /// A backend for the database at `path` (created by the first
        /// transaction if missing), serialized by the lock file in
        /// `lock_dir`, waiting at most `lock_timeout` for it; `holder`
        /// describes this process to other waiters.
        pub fn new(
            path: impl Into<PathBuf>,
            lock_dir: impl Into<PathBuf>,
            lock_timeout: std::time::Duration,
            holder: impl Into<String>,
        ) -> Self {
            Self {
                path: path.into(),
                cache: Cache::new_lru_cache(64 << 20),
                lock_dir: lock_dir.into(),
                lock_timeout,
                holder: holder.into(),
            }
        }

        fn open_rw(&self) -> Result<RocksKv> {
            let opts = self.db_options();
            let db = DB::open_cf_descriptors(&opts, &self.path, self.descriptors())
                .map_err(|e| kv_err(&self.path, e))?;
            Ok(RocksKv {
                db,
                path: self.path.clone(),
            })
        }

        fn cf_options(&self, cf: Cf) -> Options {
            let mut o = Options::default();
            let mut b = BlockBasedOptions::default();
            b.set_block_cache(&self.cache);
            b.set_bloom_filter(10.0, false);
            b.set_cache_index_and_filter_blocks(true);
            b.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if matches!(cf, Cf::Objects | Cf::Chunks | Cf::StatCache) {
                // Point lookups by hash or path dominate.
                b.set_block_size(16 * 1024);
            }
            o.set_block_based_table_factory(&b);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Metadata only (chunk data lives in packs): small memtables keep
            // the WAL (preallocated to about this size) and recovery small.
            o.set_write_buffer_size(16 << 20);
            o.set_level_compaction_dynamic_level_bytes(true);
            o
        }

        fn descriptors(&self) -> Vec<ColumnFamilyDescriptor> {
            ALL_CFS
                .iter()
                .map(|&cf| ColumnFamilyDescriptor::new(cf.name(), self.cf_options(cf)))
                .collect()
        }

        fn db_options(&self) -> Options {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            o.set_max_open_files(-1);
            o.set_keep_log_file_num(4);
            o.set_max_log_file_size(1 << 20);
            o.set_max_background_jobs(2);
            o.set_manifest_preallocation_size(64 << 10);
            o.set_log_level(rocksdb::LogLevel::Warn);
            o
        }
    }

    struct RocksKv {
        db: DB,
        path: PathBuf,
    }

    impl RocksKv {
        fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
            self.db.cf_handle(cf.name()).ok_or_else(|| {
                Error::corrupted(
                    self.path.display().to_string(),
                    format!("missing column family {}", cf.name()),
                )
            })
        }
    }

    impl KvRead for RocksKv {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
            let h = self.cf(cf)?;
            Ok(self
                .db
                .get_pinned_cf(h, key)
                .map_err(|e| kv_err(&self.path, e))?
                .map(|v| v.to_vec()))
        }

        fn scan_from(
            &self,
            cf: Cf,
            prefix: &[u8],
            start: &[u8],
            visit: &mut Visitor<'_>,
        ) -> Result<()> {
            let h = self.cf(cf)?;
            let from = if start.is_empty() { prefix } else { start };
            let it = self
                .db
                .iterator_cf(h, IteratorMode::From(from, Direction::Forward));
            for item in it {
                let (k, v) = item.map_err(|e| kv_err(&self.path, e))?;
                if !k.starts_with(prefix) {
                    break;
                }
                if !visit(&k, &v)? {
                    break;
                }
            }
            Ok(())
        }

        fn scan_rev(
            &self,
            cf: Cf,
            prefix: &[u8],
            before: &[u8],
            visit: &mut Visitor<'_>,
        ) -> Result<()> {
            let h = self.cf(cf)?;
            let bound = if before.is_empty() {
                prefix_successor(prefix)
            } else {
                Some(before.to_vec())
            };
            let mode = match &bound {
                // Positions at the last key <= bound.
                Some(b) => IteratorMode::From(b, Direction::Reverse),
                None => IteratorMode::End,
            };
            for item in self.db.iterator_cf(h, mode) {
                let (k, v) = item.map_err(|e| kv_err(&self.path, e))?;
                if bound.as_deref().is_some_and(|b| &*k >= b) {
                    continue;
                }
                if !k.starts_with(prefix) {
                    if &*k < prefix {
                        break;
                    }
                    continue;
                }
                if !visit(&k, &v)? {
                    break;
                }
            }
            Ok(())
        }
    }

    impl KvWrite for RocksKv {
        fn write(&self, mut batch: Batch) -> Result<()> {
            crate::txn::resolve_appends(&mut batch, &mut |cf, k| counter_in(self, cf, k))?;
            let mut wb = WriteBatch::default();
            for op in &batch.ops {
                match op {
                    Op::Put(cf, k, v) => wb.put_cf(self.cf(*cf)?, k, v),
                    Op::Delete(cf, k) => wb.delete_cf(self.cf(*cf)?, k),
                    Op::Append { .. } => return Err(Error::Kv("an append left unresolved".into())),
                }
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db
                .write_opt(wb, &wo)
                .map_err(|e| kv_err(&self.path, e))?;
            // The batch is durable from here on: what follows is upkeep, and
            // its failure (a full disk during a flush) must not make the
            // caller believe the write failed — it would delete the packs
            // the committed batch points to.
            if batch.put_bytes() > FLUSH_AFTER {
                // Readers open read-only and replay the WAL on every open:
                // after a large write, move it into tables once, here.
                let handles: Vec<_> = ALL_CFS
                    .iter()
                    .filter_map(|c| self.db.cf_handle(c.name()))
                    .collect();
                if let Err(e) = self
                    .db
                    .flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())
                {
                    tracing::warn!("flush after a committed write failed: {e}");
                }
            }
            if let Err(e) = self.compact_small_files() {
                tracing::warn!("compaction after a committed write failed: {e}");
            }
            Ok(())
        }
    }

    impl RocksKv {
        /// Every command is a short-lived process whose read-write open
        /// flushes the previous write's log into tiny tables. In a family
        /// with random keys (version ids in `roots`) each tiny table is
        /// trivially moved down without ever being merged, so tables pile
        /// up (one per write) and every open pays for all of them. Merge a
        /// family's tables once it holds many small ones.
        fn compact_small_files(&self) -> Result<()> {
            let files = self.db.live_files().map_err(|e| kv_err(&self.path, e))?;
            let mut per_cf: std::collections::HashMap<&str, (usize, u64)> = Default::default();
            for f in &files {
                let e = per_cf.entry(f.column_family_name.as_str()).or_default();
                e.0 += 1;
                e.1 += f.size as u64;
            }
            for (name, (count, bytes)) in per_cf {
                if count > MAX_TABLES && bytes / (count as u64) < SMALL_TABLE {
                    if let Some(h) = self.db.cf_handle(name) {
                        // Force a rewrite: a plain manual compaction would
                        // again just move the one-key tables down.
                        let mut o = rocksdb::CompactOptions::default();
                        o.set_bottommost_level_compaction(
                            rocksdb::BottommostLevelCompaction::Force,
                        );
                        self.db
                            .compact_range_cf_opt(h, None::<&[u8]>, None::<&[u8]>, &o);
                    }
                }
            }
            Ok(())
        }
    }

    impl Backend for RocksBackend {
        fn open_read(&self) -> Result<Arc<dyn KvRead>> {
            let mut last = None;
            // A concurrent writer may delete a file between reading the
            // manifest and opening it; a fresh attempt sees the new manifest.
            for _ in 0..5 {
                let mut opts = self.db_options();
                // A short-lived reader: open the few table files on this
                // thread (the default spawns 16 threads per column family,
                // most of a quick command's run time) and skip the stats
                // pass over them.
                opts.set_max_file_opening_threads(1);
                opts.set_skip_stats_update_on_db_open(true);
                match DB::open_cf_descriptors_read_only(
                    &opts,
                    &self.path,
                    self.descriptors(),
                    false,
                ) {
                    Ok(db) => {
                        return Ok(Arc::new(RocksKv {
                            db,
                            path: self.path.clone(),
                        }))
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(kv_err(
                &self.path,
                last.expect("loop ran at least once because the range is non-empty"),
            ))
        }

        fn transact(&self, body: &mut TxnBody<'_>) -> Result<()> {
            let asked = crate::store::now_ms();
            let lock =
                crate::lock::WriteLock::acquire(&self.lock_dir, self.lock_timeout, &self.holder)?;
            let start = crate::store::now_ms();
            let w = self.open_rw()?;
            let result = body(&w);
            let committed = match result {
                Ok(mut batch) => {
                    seal(&mut batch, &mut |cf, k| counter_in(&w, cf, k))?;
                    if !batch.is_empty() {
                        // Includes the upkeep after the commit (flush,
                        // compaction): all of it under the lock.
                        w.write(batch)?;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            // Nobody could write while this lock was held: a long hold is
            // recorded (body, commit and upkeep) so that leases are not
            // judged expired because of it; so is a long wait for the lock
            // (writers queued behind others: their renewals were delayed
            // too). Best effort after a failed body.
            let end = crate::store::now_ms();
            let mut stalls = Vec::new();
            if start - asked > crate::txn::STALL_MIN_MS {
                stalls.push((asked, start));
            }
            // The previous holder died holding the lock: nobody could write
            // from its start until now (bounded to a day, for a line an old
            // crash left behind).
            if let Some(since) = lock.abandoned_since_ms() {
                let since = since.max(start - 86_400_000);
                if start - since > crate::txn::STALL_MIN_MS {
                    stalls.push((since, start));
                }
            }
            if end - start > crate::txn::STALL_MIN_MS {
                stalls.push((start, end));
            }
            if !stalls.is_empty() {
                let mut b = Batch::default();
                let mut recorded = Ok(());
                for (s, e) in stalls {
                    if recorded.is_ok() {
                        recorded = crate::txn::record_stall(&w, &mut b, s, e);
                    }
                }
                let recorded = recorded
                    .and_then(|()| seal(&mut b, &mut |cf, k| counter_in(&w, cf, k)))
                    .and_then(|()| w.write(b));
                if let Err(e) = recorded {
                    tracing::warn!("cannot record a write stall: {e}");
                }
            }
            drop(w);
            drop(lock);
            committed
        }

        fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
            use notify::Watcher;
            let (tx, rx) = std::sync::mpsc::channel();
            let mut watcher =
                notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                    if let Ok(ev) = res {
                        if !matches!(ev.kind, notify::EventKind::Access(_)) {
                            let _ = tx.send(());
                        }
                    }
                })
                .map_err(|e| Error::Kv(format!("watch {}: {e}", self.path.display())))?;
            watcher
                .watch(&self.path, notify::RecursiveMode::NonRecursive)
                .map_err(|e| Error::Kv(format!("watch {}: {e}", self.path.display())))?;
            Ok(Box::new(DirChanges {
                _watcher: watcher,
                rx,
            }))
        }
    }

    /// Wake-ups of a RocksDB directory: every commit writes its log there.
    struct DirChanges {
        _watcher: notify::RecommendedWatcher,
        rx: std::sync::mpsc::Receiver<()>,
    }

    impl ChangeSource for DirChanges {
        fn wait(&mut self, timeout: std::time::Duration) -> Result<()> {
            if self.rx.recv_timeout(timeout).is_ok() {
                // One commit writes several files: take them as one wake-up.
                while self.rx.try_recv().is_ok() {}
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_scan_respects_prefix_and_start() {
        let kv = MemKv::new();
        let mut b = Batch::default();
        for k in ["a1", "a2", "a3", "b1"] {
            b.put(Cf::Refs, k.as_bytes(), b"v".to_vec());
        }
        b.put(Cf::Tags, b"a0".to_vec(), b"v".to_vec());
        kv.write(b).unwrap();
        let mut seen = Vec::new();
        kv.scan_from(Cf::Refs, b"a", b"a2", &mut |k, _| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, ["a2", "a3"]);
    }

    #[test]
    fn crashing_kv_fails_from_the_given_write() {
        let kv = CrashingKv::new(MemKv::new(), 1);
        let mut b = Batch::default();
        b.put(Cf::Meta, b"k".to_vec(), b"1".to_vec());
        kv.transact(&mut |_| Ok(b.clone())).unwrap();
        let mut b2 = Batch::default();
        b2.put(Cf::Meta, b"k".to_vec(), b"2".to_vec());
        assert!(matches!(
            kv.transact(&mut |_| Ok(b2.clone())),
            Err(Error::Injected(_))
        ));
        assert_eq!(kv.attempted(), 2);
        // Nothing of the failed write is visible.
        assert_eq!(
            kv.open_read()
                .unwrap()
                .get(Cf::Meta, b"k")
                .unwrap()
                .as_deref(),
            Some(&b"1"[..])
        );
    }
}
