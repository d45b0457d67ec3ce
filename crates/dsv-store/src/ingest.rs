//! Folder ingest: list → (stat cache) → read → chunk → hash → compress →
//! pack, in parallel with rayon, then build the folder's tree and stage it
//! into a draft in one atomic write.
//!
//! Files are read with `pread` into bounded windows rather than memory-mapped:
//! a labeling tool may truncate a file while we read it, which would turn a
//! mapped read into SIGBUS; with `pread` it is a short read we detect and
//! report. Memory stays bounded: a file larger than [`WINDOW`] is processed
//! one window at a time.

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::chunker::Chunker;
use crate::compress::{compress, CODEC_RAW, CODEC_ZSTD};
use crate::error::{Error, Result};
use crate::id::{hash, ChunkId, DraftId, ObjectId};
use crate::kv::{Batch, Cf, KvRead};
use crate::object::{validate_name, Entry, EntryTarget, FileObject, Object};
use crate::pack::{PackWriter, WrittenPacks, RECORD_HEADER_LEN};
use crate::schema::{self, ChunkLoc, DraftRecord, StatEntry};
use crate::store::{open_draft, Progress, StageReport, Store};
use crate::tree::{self, Change, Objs, Pending};

/// Files larger than this are read one window at a time.
pub const WINDOW: usize = 32 << 20;
/// A stat-cache entry is trusted only when the file's mtime is at least this
/// much older than the moment it was read (timestamps are coarse; a change
/// within the same tick would otherwise go unnoticed).
pub const RACY_NS: i64 = 100_000_000;

/// How long after its mtime a file's stat entry may be trusted: [`RACY_NS`],
/// or 2 s when the mtime is a whole second — a file system with coarse
/// timestamps (FAT/exFAT, HFS+, some NFS/SMB) cannot tell two writes within
/// the same second apart by mtime. (On a fine-grained one a whole-second
/// mtime only costs one extra hash.)
fn racy_margin(mtime_ns: i64) -> i64 {
    if mtime_ns % 1_000_000_000 == 0 {
        2_000_000_000
    } else {
        RACY_NS
    }
}

/// A predicate on a file's path relative to the ingested folder.
pub type PathFilter = dyn Fn(&[u8]) -> bool + Sync;

/// A hashed file: its id, stat fingerprint, and manifest when it was read.
type Hashed = Option<(ObjectId, StatEntry, Option<FileObject>)>;

/// How a folder is staged into a draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageMode {
    /// Add and overwrite; keep what the draft has that the folder lacks.
    Add,
    /// Make the draft's `dataset_path` match the folder exactly.
    Sync,
}

/// Options for [`Store::stage_folder`].
pub struct IngestOptions<'a> {
    /// Where in the dataset the folder goes (`""` = root, `a/b`).
    pub dataset_path: &'a str,
    /// Add or sync.
    pub mode: StageMode,
    /// Descend into sub-folders.
    pub recursive: bool,
    /// Keep only files whose path relative to the folder passes.
    pub filter: Option<&'a PathFilter>,
    /// Progress in bytes.
    pub progress: &'a dyn Progress,
}

impl Default for IngestOptions<'_> {
    fn default() -> Self {
        Self {
            dataset_path: "",
            mode: StageMode::Sync,
            recursive: true,
            filter: None,
            progress: &crate::store::NoProgress,
        }
    }
}

enum Item {
    File {
        name: Vec<u8>,
        job: usize,
    },
    Dir {
        name: Vec<u8>,
        mode: u32,
        dir: ScanDir,
    },
    Symlink {
        name: Vec<u8>,
        mode: u32,
        target: Vec<u8>,
    },
}

#[derive(Default)]
struct ScanDir {
    items: Vec<Item>,
}

struct Job {
    path: PathBuf,
    stat: StatEntry,
}

#[derive(Default)]
struct ScanOut {
    jobs: Vec<Job>,
    special: Vec<PathBuf>,
}

fn stat_of(m: &Metadata) -> StatEntry {
    StatEntry {
        size: m.len(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
        dev: m.dev(),
        mode: m.mode() & 0o7777,
        file: ObjectId([0; 32]),
    }
}

struct RawScan {
    items: Vec<RawItem>,
}

enum RawItem {
    File {
        name: Vec<u8>,
        path: PathBuf,
        stat: StatEntry,
    },
    Dir {
        name: Vec<u8>,
        mode: u32,
        scan: RawScan,
    },
    Symlink {
        name: Vec<u8>,
        mode: u32,
        target: Vec<u8>,
    },
    Special(PathBuf),
}

/// A file or folder listed by the scan that is gone when read: the ingest
/// fails (nothing is stored) rather than drop it; running again is safe.
fn vanished(path: &Path) -> Error {
    Error::input(
        "read",
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "it vanished while the folder was being read; nothing was stored, \
             run the command again once the folder is stable",
        ),
    )
}

fn scan_dir(dir: &Path, rel: &[u8], opts: &IngestOptions<'_>) -> Result<RawScan> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::input("list", dir, e))?;
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::input("list", dir, e))?;
        let ft = match ent.file_type() {
            Ok(ft) => ft,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(vanished(&ent.path()))
            }
            Err(e) => return Err(Error::input("stat", ent.path(), e)),
        };
        names.push((ent.file_name().as_bytes().to_vec(), ent, ft));
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let results: Vec<Result<Option<RawItem>>> = names
        .into_par_iter()
        .map(|(name, ent, ft)| -> Result<Option<RawItem>> {
            let path = ent.path();
            validate_name(&name)
                .map_err(|why| Error::Invalid(format!("cannot store {}: {why}", path.display())))?;
            let rel_path = || tree::join(rel, &name);
            if ft.is_dir() {
                if !opts.recursive {
                    return Ok(None);
                }
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(vanished(&path))
                    }
                    Err(e) => return Err(Error::input("stat", &path, e)),
                };
                let scan = scan_dir(&path, &rel_path(), opts)?;
                return Ok(Some(RawItem::Dir {
                    name,
                    mode: meta.mode() & 0o7777,
                    scan,
                }));
            }
            if let Some(f) = opts.filter {
                if !f(&rel_path()) {
                    return Ok(None);
                }
            }
            if ft.is_symlink() {
                let target = match std::fs::read_link(&path) {
                    Ok(t) => t.as_os_str().as_bytes().to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(vanished(&path))
                    }
                    Err(e) => return Err(Error::input("read link", &path, e)),
                };
                if target.len() > crate::object::MAX_LINK_LEN {
                    return Err(Error::Invalid(format!(
                        "symlink target of {} is too long",
                        path.display()
                    )));
                }
                return Ok(Some(RawItem::Symlink {
                    name,
                    mode: 0o777,
                    target,
                }));
            }
            if ft.is_file() {
                // Relative to the open directory (fstatat), not a path walk.
                let meta = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(vanished(&path))
                    }
                    Err(e) => return Err(Error::input("stat", &path, e)),
                };
                return Ok(Some(RawItem::File {
                    name,
                    path,
                    stat: stat_of(&meta),
                }));
            }
            Ok(Some(RawItem::Special(path)))
        })
        .collect();
    let mut items = Vec::with_capacity(results.len());
    for r in results {
        items.extend(r?);
    }
    Ok(RawScan { items })
}

fn flatten(raw: RawScan, out: &mut ScanOut, keep_empty: bool) -> ScanDir {
    let mut items = Vec::with_capacity(raw.items.len());
    for it in raw.items {
        match it {
            RawItem::File { name, path, stat } => {
                out.jobs.push(Job { path, stat });
                items.push(Item::File {
                    name,
                    job: out.jobs.len() - 1,
                });
            }
            RawItem::Dir { name, mode, scan } => {
                let had_items = !scan.items.is_empty();
                let dir = flatten(scan, out, keep_empty);
                // A folder emptied only by the filter is left out; a folder
                // that is really empty is kept.
                if !dir.items.is_empty() || (!had_items && keep_empty) {
                    items.push(Item::Dir { name, mode, dir });
                }
            }
            RawItem::Symlink { name, mode, target } => {
                items.push(Item::Symlink { name, mode, target })
            }
            RawItem::Special(p) => out.special.push(p),
        }
    }
    ScanDir { items }
}

/// What hashing a folder produced, before it is committed.
pub(crate) struct Ingested {
    pub root: ObjectId,
    pub pending: Pending,
    pub new_chunks: Vec<(ChunkId, ChunkLoc)>,
    pub stat_updates: Vec<(Vec<u8>, StatEntry)>,
    pub packs: WrittenPacks,
    pub gc_generation: u64,
    pub report: StageReport,
}

const SHARDS: usize = 64;

struct Session<'a> {
    store: &'a Store,
    kv: &'a dyn KvRead,
    chunker: Chunker,
    level: i32,
    packs: PackWriter,
    seen: Vec<Mutex<HashMap<ChunkId, Option<ChunkLoc>>>>,
    stored_bytes: AtomicU64,
    progress: &'a dyn Progress,
}

impl Session<'_> {
    fn store_chunk(&self, data: &[u8]) -> Result<(ChunkId, u32)> {
        let id = ChunkId(hash(data));
        let shard = &self.seen[id.0[0] as usize % SHARDS];
        {
            let mut m = shard
                .lock()
                .map_err(|_| Error::Kv("ingest state poisoned".into()))?;
            if m.contains_key(&id) {
                return Ok((id, data.len() as u32));
            }
            m.insert(id, None);
        }
        if self.kv.contains(Cf::Chunks, id.as_bytes())? {
            return Ok((id, data.len() as u32));
        }
        let (codec, loc) = match compress(data, self.level) {
            Some(z) => (
                CODEC_ZSTD,
                self.packs.append(&id, CODEC_ZSTD, data.len() as u32, &z)?,
            ),
            None => (
                CODEC_RAW,
                self.packs.append(&id, CODEC_RAW, data.len() as u32, data)?,
            ),
        };
        debug_assert_eq!(codec, loc.codec);
        self.stored_bytes
            .fetch_add(loc.stored_len as u64 + RECORD_HEADER_LEN, Ordering::Relaxed);
        shard
            .lock()
            .map_err(|_| Error::Kv("ingest state poisoned".into()))?
            .insert(id, Some(loc));
        Ok((id, data.len() as u32))
    }

    fn store_chunks(
        &self,
        data: &[u8],
        lens: &[usize],
        out: &mut Vec<(ChunkId, u32)>,
    ) -> Result<()> {
        let mut offs = Vec::with_capacity(lens.len());
        let mut o = 0;
        for &l in lens {
            offs.push((o, l));
            o += l;
        }
        if lens.len() > 8 {
            let res: Vec<Result<(ChunkId, u32)>> = offs
                .par_iter()
                .map(|&(o, l)| self.store_chunk(&data[o..o + l]))
                .collect();
            for r in res {
                out.push(r?);
            }
        } else {
            for (o, l) in offs {
                out.push(self.store_chunk(&data[o..o + l])?);
            }
        }
        self.progress.advance(lens.iter().sum::<usize>() as u64);
        Ok(())
    }

    /// Reads and stores one file. A file that vanished (or was replaced by
    /// something that is not a file) since the scan is an error: storing
    /// the folder without it would drop it silently.
    fn hash_file(&self, job: &Job) -> Result<Option<(FileObject, StatEntry)>> {
        for _attempt in 0..3 {
            // O_NONBLOCK: a name swapped for a FIFO since the scan must not
            // block the open (regular files ignore the flag).
            let file = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&job.path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(vanished(&job.path))
                }
                Err(e) => return Err(Error::input("open", &job.path, e)),
            };
            let meta = file
                .metadata()
                .map_err(|e| Error::input("stat", &job.path, e))?;
            if !meta.is_file() {
                return Err(vanished(&job.path)); // replaced by something else
            }
            let before = stat_of(&meta);
            let obj = self.read_and_store(&file, &job.path, before.size)?;
            let after = stat_of(
                &file
                    .metadata()
                    .map_err(|e| Error::input("stat", &job.path, e))?,
            );
            if obj.is_some() && before.same_stat(&after) {
                return Ok(obj.map(|o| (o, before)));
            }
        }
        Err(Error::Invalid(format!(
            "{} kept changing while it was read; retry when it is finished",
            job.path.display()
        )))
    }

    /// `None` when the file's length changed under us.
    fn read_and_store(&self, file: &File, path: &Path, size: u64) -> Result<Option<FileObject>> {
        let mut chunks =
            Vec::with_capacity((size / self.chunker.params().avg_size as u64 + 1) as usize);
        let mut reader = file;
        if size as usize <= WINDOW {
            let mut buf = Vec::with_capacity(size as usize + 1);
            // One byte more than fstat said tells that it grew; no more, so
            // a file still being written cannot fill memory.
            reader
                .take(size + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Error::input("read", path, e))?;
            if buf.len() as u64 != size {
                return Ok(None);
            }
            let lens = self.chunker.chunk_lengths(&buf);
            self.store_chunks(&buf, &lens, &mut chunks)?;
        } else {
            let max = self.chunker.params().max_size as usize;
            let mut buf = vec![0u8; WINDOW + max];
            let mut filled = 0usize;
            let mut total = 0u64;
            let mut eof = false;
            let mut lens = Vec::new();
            loop {
                while !eof && filled < buf.len() {
                    let n = reader
                        .read(&mut buf[filled..])
                        .map_err(|e| Error::input("read", path, e))?;
                    if n == 0 {
                        eof = true;
                    }
                    filled += n;
                    total += n as u64;
                }
                if total > size {
                    return Ok(None); // it grew while we read: retried
                }
                lens.clear();
                let used = if eof {
                    lens.extend(self.chunker.chunk_lengths(&buf[..filled]));
                    filled
                } else {
                    self.chunker.cut_window(&buf[..filled], &mut lens)
                };
                self.store_chunks(&buf[..used], &lens, &mut chunks)?;
                buf.copy_within(used..filled, 0);
                filled -= used;
                if eof && filled == 0 {
                    break;
                }
            }
            if total != size {
                return Ok(None);
            }
        }
        Ok(Some(FileObject { size, chunks }))
    }
}

fn build_tree(
    dir: ScanDir,
    files: &[Option<(ObjectId, StatEntry)>],
    pending: &mut Pending,
) -> (ObjectId, crate::object::DirSummary) {
    let mut entries = Vec::with_capacity(dir.items.len());
    for it in dir.items {
        match it {
            Item::File { name, job } => {
                if let Some((id, st)) = &files[job] {
                    entries.push(Entry {
                        name,
                        mode: st.mode & 0o7777,
                        size: st.size,
                        target: EntryTarget::File(*id),
                    });
                }
            }
            Item::Dir { name, mode, dir } => {
                let (id, s) = build_tree(dir, files, pending);
                entries.push(Entry {
                    name,
                    mode,
                    size: s.total_size,
                    target: EntryTarget::Dir {
                        id,
                        file_count: s.file_count,
                    },
                });
            }
            Item::Symlink { name, mode, target } => {
                entries.push(Entry {
                    name,
                    mode,
                    size: target.len() as u64,
                    target: EntryTarget::Symlink(target),
                });
            }
        }
    }
    tree::build_dir(pending, entries, 0)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Store {
    pub(crate) fn gc_generation(kv: &dyn KvRead) -> Result<u64> {
        Ok(kv
            .get(Cf::Meta, schema::META_GC_GENERATION)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0))
    }

    /// Adds to `b` the next gc generation (after a gc or a repair removed
    /// something): writers that read state before it check what they
    /// reference.
    pub(crate) fn bump_gc_generation(kv: &dyn KvRead, b: &mut crate::kv::Batch) -> Result<()> {
        let gen = Self::gc_generation(kv)?;
        b.put(
            Cf::Meta,
            schema::META_GC_GENERATION,
            (gen + 1).to_le_bytes().to_vec(),
        );
        Ok(())
    }

    /// Hashes a folder into pending objects and packed chunks.
    pub(crate) fn ingest_folder(
        &self,
        folder: &Path,
        opts: &IngestOptions<'_>,
    ) -> Result<Ingested> {
        // Before any pack is written.
        self.check_writable()?;
        let meta = std::fs::metadata(folder).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Invalid(format!("folder {} does not exist", folder.display()))
            } else {
                Error::input("open folder", folder, e)
            }
        })?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a folder",
                folder.display()
            )));
        }
        let abs = std::fs::canonicalize(folder).map_err(|e| Error::input("resolve", folder, e))?;
        let kv = self.reader();
        let generation = Self::gc_generation(&*kv)?;
        let started = now_ns();
        // The folder scan and the stat cache's ordered scan over the
        // folder's key range run at the same time.
        let scope = self.options().stat_scope.clone();
        let stat_key = |p: &Path| [scope.as_slice(), p.as_os_str().as_bytes()].concat();
        let mut prefix = stat_key(&abs);
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        let (raw, cache) = rayon::join(
            || scan_dir(&abs, b"", opts),
            || -> Result<HashMap<Vec<u8>, StatEntry>> {
                let mut cache = HashMap::new();
                kv.scan(Cf::StatCache, &prefix, &mut |k, v| {
                    if let Ok(s) = StatEntry::decode(v) {
                        cache.insert(k.to_vec(), s);
                    }
                    Ok(true)
                })?;
                Ok(cache)
            },
        );
        let raw = raw?;
        let cache = cache?;
        let mut scan = ScanOut::default();
        let dir = flatten(raw, &mut scan, opts.filter.is_none());

        let session = Session {
            store: self,
            kv: &*kv,
            chunker: Chunker::new(self.config().chunking),
            level: self.config().compression_level,
            packs: PackWriter::new(self.packs_dir(), self.config().pack_target_size),
            seen: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            stored_bytes: AtomicU64::new(0),
            progress: opts.progress,
        };
        let _ = session.store;
        let known: Vec<Option<StatEntry>> = scan
            .jobs
            .iter()
            .map(|j| {
                cache
                    .get(&stat_key(&j.path))
                    .filter(|c| {
                        c.same_stat(&j.stat) && c.mtime_ns + racy_margin(c.mtime_ns) < started
                    })
                    .copied()
            })
            .collect();
        let to_hash: u64 = scan
            .jobs
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(j, _)| j.stat.size)
            .sum();
        opts.progress.start("hashing", to_hash);

        let results: Vec<Result<Hashed>> = scan
            .jobs
            .par_iter()
            .zip(known.par_iter())
            .map(|(job, known)| {
                if let Some(k) = known {
                    return Ok(Some((k.file, *k, None)));
                }
                match session.hash_file(job)? {
                    Some((obj, st)) => {
                        let id = ObjectId(hash(&obj.encode()));
                        Ok(Some((id, StatEntry { file: id, ..st }, Some(obj))))
                    }
                    None => Ok(None),
                }
            })
            .collect();
        opts.progress.finish();

        let mut report = StageReport {
            files_scanned: scan.jobs.len() as u64,
            skipped_special: scan.special,
            ..Default::default()
        };
        let mut pending = Pending::default();
        let mut files: Vec<Option<(ObjectId, StatEntry)>> = Vec::with_capacity(results.len());
        let mut stat_updates = Vec::new();
        let mut first_err = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(Some((id, st, obj))) => {
                    report.bytes_scanned += st.size;
                    if let Some(o) = obj {
                        report.files_hashed += 1;
                        report.bytes_hashed += st.size;
                        pending.put(Object::File(o));
                        if st.mtime_ns + racy_margin(st.mtime_ns) < started {
                            stat_updates.push((stat_key(&scan.jobs[i].path), st));
                        }
                    }
                    files.push(Some((id, st)));
                }
                Ok(None) => {
                    report.vanished.push(scan.jobs[i].path.clone());
                    files.push(None);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                    files.push(None);
                }
            }
        }
        let Session {
            packs,
            seen,
            stored_bytes,
            ..
        } = session;
        let packs = packs.finish();
        if let Some(e) = first_err {
            if let Ok(p) = packs {
                p.discard();
            }
            return Err(e);
        }
        let packs = packs?;
        // A team repository's packs are on the shared object store before
        // any version naming their chunks can commit.
        if let Err(e) = self.publish_packs(&packs.ids()) {
            packs.discard();
            return Err(e);
        }
        let (root, _) = build_tree(dir, &files, &mut pending);
        let mut new_chunks = Vec::new();
        for shard in seen {
            let m = shard
                .into_inner()
                .map_err(|_| Error::Kv("ingest state poisoned".into()))?;
            new_chunks.extend(m.into_iter().filter_map(|(id, loc)| loc.map(|l| (id, l))));
        }
        report.new_chunks = new_chunks.len() as u64;
        report.stored_bytes = stored_bytes.into_inner();
        Ok(Ingested {
            root,
            pending,
            new_chunks,
            stat_updates,
            packs,
            gc_generation: generation,
            report,
        })
    }

    /// Stages a folder into a draft: reads what changed (the stat cache
    /// skips unchanged files), stores new chunks, and updates the draft's
    /// tree at `dataset_path` in one atomic write. On error the repository
    /// is unchanged.
    ///
    /// A `gc` that runs meanwhile fails the write only when it removed
    /// something the write references; the ingest is then run again (the
    /// missing data is stored anew), up to [`GC_RETRIES`] times.
    pub fn stage_folder(
        &self,
        draft: &DraftId,
        folder: &Path,
        opts: &IngestOptions<'_>,
    ) -> Result<StageReport> {
        retry_after_gc(|| self.stage_folder_once(draft, folder, opts))
    }

    fn stage_folder_once(
        &self,
        draft: &DraftId,
        folder: &Path,
        opts: &IngestOptions<'_>,
    ) -> Result<StageReport> {
        let dataset_path = opts.dataset_path.trim_matches('/').as_bytes().to_vec();
        tree::split_path(&dataset_path)?;
        open_draft(&*self.reader(), draft)?;
        let ing = self.ingest_folder(folder, opts)?;
        let Ingested {
            root: folder_root,
            mut pending,
            new_chunks,
            stat_updates,
            packs,
            gc_generation,
            mut report,
        } = ing;

        let mode = opts.mode;
        let new_root = |kv: &dyn KvRead, pending: &mut Pending, base: ObjectId| {
            place_folder(kv, pending, base, folder_root, mode, &dataset_path)
        };

        // Quick path: nothing new to store and the tree is unchanged.
        {
            let kv = self.reader();
            let rec = open_draft(&*kv, draft)?;
            let root = new_root(&*kv, &mut pending, rec.root)?;
            if root == rec.root && new_chunks.is_empty() && stat_updates.is_empty() {
                packs.discard();
                return Ok(report);
            }
        }

        let chunk_bytes = report.stored_bytes;
        let result = self.write(|kv| {
            let rec = open_draft(kv, draft)?;
            let root = new_root(kv, &mut pending, rec.root)?;
            if Self::gc_generation(kv)? != gc_generation {
                check_closure(kv, &pending, root, &new_chunks)?;
            }
            let diff = crate::diff::diff_trees(
                &Objs {
                    kv,
                    pending: &mut pending,
                },
                &rec.root,
                &root,
            )?;
            let mut b = Batch::default();
            let meta_bytes = self.pending_batch(kv, &pending, &mut b)?;
            index_chunks(&new_chunks, &mut b);
            for (k, st) in &stat_updates {
                b.put(Cf::StatCache, k.clone(), st.encode());
            }
            let stored = chunk_bytes + meta_bytes;
            if root != rec.root {
                let rec = DraftRecord {
                    root,
                    stored_bytes: rec.stored_bytes + stored,
                    ..rec
                };
                b.put(Cf::Drafts, draft.as_bytes().to_vec(), rec.encode());
            }
            Ok((b, (diff, stored)))
        });
        match result {
            Ok((diff, stored)) => {
                drop(packs);
                report.diff = diff;
                report.stored_bytes = stored;
                report.committed = true;
                Ok(report)
            }
            Err(e) => {
                packs.discard();
                Err(e)
            }
        }
    }
}

/// How many times a write is run again after a concurrent `gc` removed
/// something it referenced.
pub const GC_RETRIES: usize = 5;

/// Runs `once`, again while it fails because a concurrent gc removed what
/// it referenced (at most [`GC_RETRIES`] more times).
fn retry_after_gc<T>(mut once: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match once() {
            Err(Error::ConcurrentGc(what)) if tries < GC_RETRIES => {
                tries += 1;
                tracing::debug!("a concurrent gc removed {what}; ingesting again ({tries})");
            }
            r => return r,
        }
    }
}

/// Index entries of newly stored chunks, into `b`. A chunk that a repair
/// had marked damaged is whole again: its damaged record goes.
fn index_chunks(new_chunks: &[(ChunkId, ChunkLoc)], b: &mut Batch) {
    for (id, loc) in new_chunks {
        b.put(Cf::Chunks, id.as_bytes().to_vec(), loc.encode());
        b.delete(Cf::Meta, schema::damaged_key(id));
    }
}

/// After a gc (or a repair) committed since this write read its state:
/// checks that everything the new tree `root` references is still there —
/// objects either pending (then their own references are checked) or
/// stored (then, the repository being consistent, so is all they reference),
/// chunks of pending files either stored by this write or indexed.
/// Fails with `ConcurrentGc` naming the first thing missing.
fn check_closure(
    kv: &dyn KvRead,
    pending: &Pending,
    root: ObjectId,
    new_chunks: &[(ChunkId, ChunkLoc)],
) -> Result<()> {
    let ours: std::collections::HashSet<ChunkId> = new_chunks.iter().map(|(c, _)| *c).collect();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) || kv.contains(Cf::Objects, id.as_bytes())? {
            continue;
        }
        match pending.get(&id) {
            None => return Err(Error::ConcurrentGc(format!("object {id}"))),
            Some(Object::File(f)) => {
                for (c, _) in &f.chunks {
                    if !ours.contains(c) && !kv.contains(Cf::Chunks, c.as_bytes())? {
                        return Err(Error::ConcurrentGc(format!("chunk {c}")));
                    }
                }
            }
            Some(Object::Tree(crate::object::TreeNode::Leaf(entries))) => {
                for e in entries {
                    match &e.target {
                        EntryTarget::File(t) | EntryTarget::Dir { id: t, .. } => stack.push(*t),
                        EntryTarget::Symlink(_) => {}
                    }
                }
            }
            Some(Object::Tree(crate::object::TreeNode::Shard(s))) => {
                stack.extend(s.children.iter().map(|c| c.1))
            }
            Some(Object::Version(v)) => stack.push(v.root),
        }
    }
    Ok(())
}

/// The tree `base` becomes when `folder_root` is placed at `dataset_path`.
fn place_folder(
    kv: &dyn KvRead,
    pending: &mut Pending,
    base: ObjectId,
    folder_root: ObjectId,
    mode: StageMode,
    dataset_path: &[u8],
) -> Result<ObjectId> {
    use crate::tree::ObjectRead;
    let mut w = Objs { kv, pending };
    match (mode, dataset_path.is_empty()) {
        (StageMode::Sync, true) => Ok(folder_root),
        (StageMode::Add, true) => Ok(tree::merge_dirs(&mut w, base, folder_root)?.0),
        (mode, false) => {
            let s = w.tree(&folder_root)?.summary();
            let e = Entry {
                name: Vec::new(),
                mode: 0o755,
                size: s.total_size,
                target: EntryTarget::Dir {
                    id: folder_root,
                    file_count: s.file_count,
                },
            };
            let change = if mode == StageMode::Sync {
                Change::Set(e)
            } else {
                Change::Merge(e)
            };
            let changes = tree::changes_from_paths(vec![(dataset_path.to_vec(), change)])?;
            Ok(tree::apply_root(&mut w, base, changes)?.0)
        }
    }
}

/// The result of [`Store::commit_folder`].
#[derive(Debug)]
pub struct CommitOutcome {
    /// The new version, or `None` when the folder matched the first parent.
    pub version: Option<crate::store::Version>,
    /// What was read and stored, and the diff against the first parent.
    pub report: StageReport,
}

impl Store {
    /// Stores a folder as a new version whose parents are `parents` (their
    /// trees merged, later parents winning), in one atomic write together
    /// with whatever `extra` adds. Creates nothing when the result equals
    /// the first parent's tree. This is the fast path of "sync a folder":
    /// no draft, one lock, one batch.
    ///
    /// A `gc` that runs meanwhile fails the write only when it removed
    /// something the write references; the ingest is then run again (the
    /// missing data is stored anew), up to [`GC_RETRIES`] times, so `extra`
    /// may be called more than once (only the last call's batch commits).
    pub fn commit_folder(
        &self,
        parents: &[crate::id::VersionId],
        folder: &Path,
        opts: &IngestOptions<'_>,
        message: &str,
        metadata: std::collections::BTreeMap<String, String>,
        extra: &mut dyn FnMut(&dyn KvRead, &crate::store::Version, &mut Batch) -> Result<()>,
    ) -> Result<CommitOutcome> {
        retry_after_gc(|| {
            self.commit_folder_once(parents, folder, opts, message, metadata.clone(), extra)
        })
    }

    fn commit_folder_once(
        &self,
        parents: &[crate::id::VersionId],
        folder: &Path,
        opts: &IngestOptions<'_>,
        message: &str,
        metadata: std::collections::BTreeMap<String, String>,
        extra: &mut dyn FnMut(&dyn KvRead, &crate::store::Version, &mut Batch) -> Result<()>,
    ) -> Result<CommitOutcome> {
        let dataset_path = opts.dataset_path.trim_matches('/').as_bytes().to_vec();
        tree::split_path(&dataset_path)?;
        let ing = self.ingest_folder(folder, opts)?;
        let Ingested {
            root: folder_root,
            mut pending,
            new_chunks,
            stat_updates,
            packs,
            gc_generation,
            mut report,
        } = ing;
        let chunk_bytes = report.stored_bytes;
        let build = |kv: &dyn KvRead, pending: &mut Pending| -> Result<(ObjectId, ObjectId)> {
            let base = crate::store::merged_root(kv, parents, pending)?;
            let first = match parents.first() {
                Some(p) => crate::store::version_in(kv, p)?.object.root,
                None => tree::empty_tree_id(),
            };
            let root = place_folder(kv, pending, base, folder_root, opts.mode, &dataset_path)?;
            Ok((first, root))
        };
        {
            let kv = self.reader();
            let (first, root) = build(&*kv, &mut pending)?;
            if root == first
                && !parents.is_empty()
                && stat_updates.is_empty()
                && new_chunks.is_empty()
            {
                packs.discard();
                return Ok(CommitOutcome {
                    version: None,
                    report,
                });
            }
        }
        let result = self.write(|kv| {
            let (first, root) = build(kv, &mut pending)?;
            if Self::gc_generation(kv)? != gc_generation {
                check_closure(kv, &pending, root, &new_chunks)?;
            }
            let diff = crate::diff::diff_trees(
                &Objs {
                    kv,
                    pending: &mut pending,
                },
                &first,
                &root,
            )?;
            let mut b = Batch::default();
            for (k, st) in &stat_updates {
                b.put(Cf::StatCache, k.clone(), st.encode());
            }
            if root == first && !parents.is_empty() {
                // No new version; chunks stored anyway are copies of chunks
                // the index lacked (damaged ones, taken out by a repair):
                // indexing them heals every version that uses them.
                index_chunks(&new_chunks, &mut b);
                return Ok((b, (diff, None)));
            }
            let meta_bytes = self.pending_batch(kv, &pending, &mut b)?;
            index_chunks(&new_chunks, &mut b);
            let v = self.version_batch(
                kv,
                root,
                parents,
                &diff,
                chunk_bytes + meta_bytes,
                message,
                metadata.clone(),
                &mut b,
            )?;
            extra(kv, &v, &mut b)?;
            Ok((b, (diff, Some(v))))
        });
        match result {
            Ok((diff, version)) => {
                if version.is_none() && new_chunks.is_empty() {
                    // Only stat-cache entries were written: the tree is the
                    // parent's, so nothing indexed points into these packs.
                    packs.discard();
                } else {
                    drop(packs);
                }
                report.diff = diff;
                report.committed = true;
                if let Some(v) = &version {
                    report.stored_bytes = v.object.delta.stored_bytes;
                }
                Ok(CommitOutcome { version, report })
            }
            Err(e) => {
                packs.discard();
                Err(e)
            }
        }
    }
}
