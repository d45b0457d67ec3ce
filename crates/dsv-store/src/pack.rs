//! Pack files: append-only files of compressed chunks, outside the LSM tree.
//!
//! Chunk data never passes through RocksDB's memtables, WAL or compactions:
//! it is appended once to a pack file (with `O_DIRECT` where the file system
//! allows it, so not through the page cache either), fsynced, and only then
//! indexed (chunk id → pack, offset) in the same atomic batch as the objects
//! that use it.
//! A writer keeps an exclusive `flock` on each pack it writes until its
//! commit is done, so `gc` never deletes a pack that is about to be indexed.
//! A crash leaves at worst an unindexed pack, which `gc` removes.
//!
//! Layout: a 16-byte header (`DSVPACK\0`, format u32 LE, reserved u32), then
//! records `codec u8 | raw_len u32 | stored_len u32 | chunk id [32] | data`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::schema::ChunkLoc;

/// Pack file magic.
pub const PACK_MAGIC: &[u8; 8] = b"DSVPACK\0";
/// Pack format version.
pub const PACK_FORMAT: u32 = 1;
/// Header length.
pub const PACK_HEADER_LEN: u64 = 16;
/// Record header length.
pub const RECORD_HEADER_LEN: u64 = 41;

/// Path of pack `id` in `dir`.
pub fn pack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.pack"))
}

/// Parses a pack file name back to its id.
pub fn parse_pack_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".pack")?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

/// A pack id: 8 bytes from the OS random generator (unique across the
/// machines writing to one repository, unlike a time- or pid-derived one).
fn random_pack_id() -> Result<u64> {
    crate::id::random_bytes().map(u64::from_le_bytes)
}

/// Alignment of direct writes: offsets, lengths and buffer addresses are
/// multiples of it (the largest logical block size in common use).
const ALIGN: usize = 4096;
/// Size of one staging buffer; full buffers are written at aligned offsets.
const STAGE_LEN: usize = 8 << 20;
/// Staging buffers per writer: the bound on its memory (4 × 8 MiB).
const STAGES: usize = 4;

/// An aligned staging buffer of `STAGE_LEN` bytes.
struct Stage {
    mem: Vec<u8>,
    start: usize,
    used: usize,
}

impl Stage {
    fn new() -> Self {
        let mem = vec![0u8; STAGE_LEN + ALIGN];
        // An address that cannot be aligned (never on the platforms we
        // build for) only costs the direct path: the write falls back.
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        Stage {
            mem,
            start,
            used: 0,
        }
    }
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(STAGE_LEN - self.used);
        let at = self.start + self.used;
        self.mem[at..at + n].copy_from_slice(&data[..n]);
        self.used += n;
        n
    }
    /// Zero-pads the used part to the alignment; returns the padded length.
    fn pad(&mut self) -> usize {
        let len = self.used.div_ceil(ALIGN) * ALIGN;
        let (a, b) = (self.start + self.used, self.start + len);
        self.mem[a..b].fill(0);
        len
    }
    fn bytes(&self, len: usize) -> &[u8] {
        &self.mem[self.start..self.start + len]
    }
}

/// Work for the writer's I/O thread, in order.
enum Job {
    /// A pack was created: its file and the `flock`ed handle.
    Open {
        id: u64,
        path: PathBuf,
        file: File,
        direct: bool,
        lock: File,
    },
    /// Write `len` bytes of `stage` at `pos` of pack `id`.
    Write {
        id: u64,
        pos: u64,
        stage: Stage,
        len: usize,
    },
    /// Cut pack `id` to `len` (dropping the padding) and fsync it.
    Seal { id: u64, len: u64 },
}

/// The first I/O failure, replayed to every later caller.
#[derive(Clone)]
struct Failure {
    op: &'static str,
    path: PathBuf,
    kind: std::io::ErrorKind,
    message: String,
}

impl Failure {
    fn error(&self) -> Error {
        Error::io(
            self.op,
            &self.path,
            std::io::Error::new(self.kind, self.message.clone()),
        )
    }
}

/// State shared by the appenders and the I/O thread.
#[derive(Default)]
struct Shared {
    failure: Mutex<Option<Failure>>,
    done: Mutex<Vec<(u64, PathBuf, File)>>,
    /// Every pack file this writer created (removed again if it fails).
    created: Mutex<Vec<PathBuf>>,
    /// Set once the file system refused direct I/O: later packs are buffered.
    buffered: AtomicBool,
    /// Tests: the I/O thread fails every write from then on (a full disk).
    #[cfg(test)]
    fail_writes: AtomicBool,
}

impl Shared {
    fn failure(&self) -> Option<Failure> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
    fn fail(&self, op: &'static str, path: &Path, e: std::io::Error) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(Failure {
                op,
                path: path.to_path_buf(),
                kind: e.kind(),
                message: e.to_string(),
            });
        }
    }
}

struct OpenPack {
    id: u64,
    /// Bytes appended so far (the pack's length once sealed).
    len: u64,
    /// Offset in the pack where the current staging buffer starts.
    flushed: u64,
}

struct Io {
    jobs: SyncSender<Job>,
    recycled: Receiver<Stage>,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    pack: Option<OpenPack>,
    stage: Option<Stage>,
    io: Option<Io>,
    allocated: usize,
}

/// Packs written by one operation, held locked until it commits.
///
/// Appenders (the ingest's worker threads) copy records into aligned
/// staging buffers under a mutex; one I/O thread writes full buffers with
/// `O_DIRECT` (falling back to buffered writes where the file system
/// refuses it) and fsyncs each finished pack. Chunk data thus never goes
/// through the page cache on its way to disk, the workers never wait on a
/// disk (only on a free buffer, which bounds memory), and the fsync at the
/// end of a pack only writes metadata.
pub struct PackWriter {
    dir: PathBuf,
    target_size: u64,
    direct: bool,
    state: Mutex<State>,
    shared: Arc<Shared>,
    /// `finish` ran: what it wrote belongs to the caller now.
    finished: bool,
}

/// Packs a writer finished: fsynced and still locked until dropped.
pub struct WrittenPacks {
    held: Vec<(u64, PathBuf, File)>,
}

impl WrittenPacks {
    /// Ids of the packs.
    pub fn ids(&self) -> Vec<u64> {
        self.held.iter().map(|(id, _, _)| *id).collect()
    }
    /// Bytes of the packs on disk.
    pub fn bytes(&self) -> Result<u64> {
        let mut n = 0;
        for (_, path, f) in &self.held {
            n += f.metadata().map_err(|e| Error::io("stat", path, e))?.len();
        }
        Ok(n)
    }
    /// Deletes the packs (the operation failed before indexing them).
    pub fn discard(self) {
        for (_, path, _) in &self.held {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn poisoned() -> Error {
    Error::Kv("pack writer poisoned".into())
}

impl PackWriter {
    /// A writer creating packs in `dir`, each up to about `target_size` bytes.
    pub fn new(dir: impl Into<PathBuf>, target_size: u64) -> Self {
        Self::with_direct_io(dir, target_size, true)
    }

    /// Like [`PackWriter::new`]; `direct = false` writes through the page
    /// cache (what the writer falls back to where `O_DIRECT` is refused).
    pub fn with_direct_io(dir: impl Into<PathBuf>, target_size: u64, direct: bool) -> Self {
        Self {
            dir: dir.into(),
            target_size,
            direct,
            state: Mutex::new(State::default()),
            shared: Arc::new(Shared::default()),
            finished: false,
        }
    }

    fn create(&self, path: &Path, direct: bool) -> std::io::Result<File> {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    }

    fn open_new(&self, st: &mut State) -> Result<()> {
        let (id, path, file, direct, lock) = loop {
            let id = random_pack_id()?;
            let path = pack_path(&self.dir, id);
            let direct = self.direct && !self.shared.buffered.load(Ordering::Relaxed);
            let (file, direct) = match self.create(&path, direct) {
                Ok(f) => (f, direct),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // The kernel creates the file before it refuses
                    // O_DIRECT: open that same file again, buffered.
                    self.shared.buffered.store(true, Ordering::Relaxed);
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&path)
                        .map_err(|e| Error::io("create pack", &path, e))?;
                    (f, false)
                }
                Err(e) => return Err(Error::io("create pack", &path, e)),
            };
            // The lock marks the pack as a live writer's: gc and stats take
            // an unlocked, unindexed pack for the leftover of a dead one.
            // Between the create and the lock a gc may have taken it for
            // one and deleted it (holding its lock): then the name no
            // longer leads to our file, and we take another.
            let lock = file
                .try_clone()
                .and_then(|l| fs4::fs_std::FileExt::lock_exclusive(&l).map(|()| l));
            let lock = match lock {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(Error::io("lock pack", &path, e));
                }
            };
            if same_file(&lock, &path) {
                break (id, path, file, direct, lock);
            }
        };
        // From here on the file is ours: on any failure it is recorded as
        // the writer's failure, so that `finish` (or drop) deletes it.
        self.shared
            .created
            .lock()
            .map_err(|_| poisoned())?
            .push(path.clone());
        let open = Job::Open {
            id,
            path: path.clone(),
            file,
            direct,
            lock,
        };
        if let Err(e) = self.send(st, open) {
            self.shared
                .fail("start pack", &path, std::io::Error::other(e.to_string()));
            return Err(e);
        }
        st.pack = Some(OpenPack {
            id,
            len: 0,
            flushed: 0,
        });
        let mut head = [0u8; PACK_HEADER_LEN as usize];
        head[..8].copy_from_slice(PACK_MAGIC);
        head[8..12].copy_from_slice(&PACK_FORMAT.to_le_bytes());
        self.push(st, &head)
    }

    fn send(&self, st: &mut State, job: Job) -> Result<()> {
        if st.io.is_none() {
            let (jobs, rx) = sync_channel(STAGES);
            let (back, recycled) = sync_channel(STAGES);
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("dsv-pack-io".into())
                .spawn(move || io_loop(rx, back, &shared))
                .map_err(|e| Error::io("start pack writer", &self.dir, e))?;
            st.io = Some(Io {
                jobs,
                recycled,
                thread,
            });
        }
        let io = st.io.as_ref().expect("started above");
        io.jobs
            .send(job)
            .map_err(|_| Error::Kv("pack writer's I/O thread stopped".into()))
    }

    /// Appends bytes to the open pack, handing full buffers to the I/O thread.
    fn push(&self, st: &mut State, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if st.stage.is_none() {
                st.stage = Some(if st.allocated < STAGES {
                    st.allocated += 1;
                    Stage::new()
                } else {
                    let io = st.io.as_ref().expect("a buffer is out only once started");
                    let mut s = io
                        .recycled
                        .recv()
                        .map_err(|_| Error::Kv("pack writer's I/O thread stopped".into()))?;
                    s.used = 0;
                    s
                });
            }
            let stage = st.stage.as_mut().expect("set above");
            let n = stage.push(data);
            data = &data[n..];
            let pack = st.pack.as_mut().expect("push only into an open pack");
            pack.len += n as u64;
            if stage.used == STAGE_LEN {
                let (id, pos) = (pack.id, pack.flushed);
                pack.flushed += STAGE_LEN as u64;
                let stage = st.stage.take().expect("set above");
                self.send(
                    st,
                    Job::Write {
                        id,
                        pos,
                        stage,
                        len: STAGE_LEN,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Writes the open pack's tail (padded) and asks for its seal.
    fn seal(&self, st: &mut State) -> Result<()> {
        let Some(pack) = st.pack.take() else {
            return Ok(());
        };
        if let Some(mut stage) = st.stage.take() {
            if stage.used > 0 {
                let len = stage.pad();
                self.send(
                    st,
                    Job::Write {
                        id: pack.id,
                        pos: pack.flushed,
                        stage,
                        len,
                    },
                )?;
            } else {
                st.stage = Some(stage);
            }
        }
        self.send(
            st,
            Job::Seal {
                id: pack.id,
                len: pack.len,
            },
        )
    }

    /// Appends one stored chunk; returns where it went.
    pub fn append(&self, id: &ChunkId, codec: u8, raw_len: u32, data: &[u8]) -> Result<ChunkLoc> {
        if let Some(f) = self.shared.failure() {
            return Err(f.error());
        }
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        if st.pack.as_ref().is_some_and(|p| p.len >= self.target_size) {
            self.seal(&mut st)?;
        }
        if st.pack.is_none() {
            self.open_new(&mut st)?;
        }
        let (pack, offset) = {
            let p = st.pack.as_ref().expect("opened above");
            (p.id, p.len)
        };
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        head[0] = codec;
        head[1..5].copy_from_slice(&raw_len.to_le_bytes());
        head[5..9].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[9..41].copy_from_slice(id.as_bytes());
        self.push(&mut st, &head)?;
        self.push(&mut st, data)?;
        Ok(ChunkLoc {
            pack,
            offset,
            stored_len: data.len() as u32,
            raw_len,
            codec,
        })
    }

    /// Writes and fsyncs every pack (and the folder); the packs stay locked
    /// until the returned value is dropped, which must be after the commit.
    /// On failure every pack this writer created is deleted again.
    pub fn finish(mut self) -> Result<WrittenPacks> {
        let res = self.drain();
        if res.is_err() {
            self.remove_created();
        }
        self.finished = true;
        res
    }

    fn remove_created(&self) {
        if let Ok(created) = self.shared.created.lock() {
            for p in created.iter() {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn drain(&self) -> Result<WrittenPacks> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        let sealed = self.seal(&mut st);
        let io = st.io.take();
        drop(st);
        // Even when sealing failed, stop the I/O thread before the caller
        // removes the files it may still be writing.
        if let Some(io) = io {
            drop(io.jobs);
            drop(io.recycled);
            io.thread
                .join()
                .map_err(|_| Error::Kv("pack writer's I/O thread panicked".into()))?;
        }
        sealed?;
        if let Some(f) = self.shared.failure() {
            return Err(f.error());
        }
        let held = std::mem::take(&mut *self.shared.done.lock().map_err(|_| poisoned())?);
        if !held.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(WrittenPacks { held })
    }
}

/// A writer dropped without `finish` (its operation failed early): stop the
/// I/O thread, then delete every pack it created — none was indexed.
impl Drop for PackWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let io = match self.state.get_mut() {
            Ok(st) => st.io.take(),
            Err(poisoned) => poisoned.into_inner().io.take(),
        };
        if let Some(io) = io {
            drop(io.jobs);
            drop(io.recycled);
            let _ = io.thread.join();
        }
        self.remove_created();
    }
}

/// The I/O thread: writes buffers, seals packs, recycles buffers. After the
/// first failure it only recycles (the appenders see the failure and stop).
fn io_loop(jobs: Receiver<Job>, recycle: SyncSender<Stage>, shared: &Shared) {
    struct Target {
        path: PathBuf,
        file: File,
        direct: bool,
        lock: File,
    }
    let mut open: HashMap<u64, Target> = HashMap::new();
    for job in jobs {
        let failed = shared.failure().is_some();
        match job {
            Job::Open {
                id,
                path,
                file,
                direct,
                lock,
            } => {
                open.insert(
                    id,
                    Target {
                        path,
                        file,
                        direct,
                        lock,
                    },
                );
            }
            Job::Write {
                id,
                pos,
                stage,
                len,
            } => {
                if let (false, Some(t)) = (failed, open.get_mut(&id)) {
                    let mut res = t.file.write_all_at(stage.bytes(len), pos);
                    if t.direct
                        && res
                            .as_ref()
                            .is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL))
                    {
                        // Accepted at open, refused at write (alignment
                        // stricter than ours): continue through the cache.
                        shared.buffered.store(true, Ordering::Relaxed);
                        res = OpenOptions::new().write(true).open(&t.path).and_then(|f| {
                            t.file = f;
                            t.direct = false;
                            t.file.write_all_at(stage.bytes(len), pos)
                        });
                    }
                    #[cfg(test)]
                    if shared.fail_writes.load(Ordering::Relaxed) {
                        res = Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                    if let Err(e) = res {
                        shared.fail("write pack", &t.path, e);
                    }
                }
                let _ = recycle.send(stage);
            }
            Job::Seal { id, len } => {
                if let Some(t) = open.remove(&id) {
                    if !failed {
                        match t.file.set_len(len).and_then(|()| t.file.sync_all()) {
                            Ok(()) => match shared.done.lock() {
                                Ok(mut d) => d.push((id, t.path, t.lock)),
                                Err(_) => shared.fail(
                                    "seal pack",
                                    &t.path,
                                    std::io::Error::other("pack writer poisoned"),
                                ),
                            },
                            Err(e) => shared.fail("fsync pack", &t.path, e),
                        }
                    }
                }
            }
        }
    }
}

/// Whether `path` still names the file `f` is open on.
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// fsyncs a directory so that new names in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync folder", dir, e))
}

/// Reads chunk records from packs, keeping files open.
#[derive(Default)]
pub struct PackReader {
    dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<File>>>,
}

impl std::fmt::Debug for PackReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackReader")
            .field("dir", &self.dir)
            .finish()
    }
}

impl PackReader {
    /// A reader over packs in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, pack: u64) -> Result<Arc<File>> {
        let mut files = self
            .files
            .lock()
            .map_err(|_| Error::Kv("pack reader poisoned".into()))?;
        if let Some(f) = files.get(&pack) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.dir, pack);
        let f = Arc::new(File::open(&path).map_err(|e| Error::io("open pack", &path, e))?);
        let mut head = [0u8; PACK_HEADER_LEN as usize];
        f.read_exact_at(&mut head, 0).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupted(path.display().to_string(), "pack header is truncated")
            } else {
                Error::io("read pack", &path, e)
            }
        })?;
        check_pack_header(&head, &path)?;
        if files.len() > 256 {
            files.clear();
        }
        files.insert(pack, f.clone());
        Ok(f)
    }

    /// Forgets open files (after gc replaced packs).
    pub fn reset(&self) {
        if let Ok(mut f) = self.files.lock() {
            f.clear();
        }
    }

    /// Reads the stored bytes of a chunk, checking its record header.
    pub fn read_stored(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        if loc.stored_len as usize > crate::compress::MAX_CHUNK + 1024 {
            return Err(Error::corrupted(
                format!("chunk {id}"),
                format!("index entry declares {} stored bytes", loc.stored_len),
            ));
        }
        let f = self.file(loc.pack)?;
        let total = RECORD_HEADER_LEN as usize + loc.stored_len as usize;
        let mut buf = vec![0u8; total];
        let path = pack_path(&self.dir, loc.pack);
        f.read_exact_at(&mut buf, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupted(
                    format!("chunk {id}"),
                    format!("pack {} is truncated", path.display()),
                )
            } else {
                Error::io("read pack", &path, e)
            }
        })?;
        check_record_header(&buf, id, loc)?;
        buf.drain(..RECORD_HEADER_LEN as usize);
        Ok(buf)
    }
}

/// Checks a chunk's whole record (header, then the stored bytes against
/// the chunk id) as read from a pack at `loc`; returns the chunk's bytes.
pub fn decode_record(record: &[u8], id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>> {
    check_record_header(record, id, loc)?;
    crate::compress::decode_chunk(
        id,
        loc.codec,
        &record[RECORD_HEADER_LEN as usize..],
        loc.raw_len,
    )
}

/// Checks a pack file's 16-byte header: the magic, then a format this build
/// reads. `path` names the pack in the error.
pub fn check_pack_header(head: &[u8], path: &Path) -> Result<()> {
    let what = || path.display().to_string();
    let Some(head) = head.get(..PACK_HEADER_LEN as usize) else {
        return Err(Error::corrupted(what(), "pack header is truncated"));
    };
    if &head[..8] != PACK_MAGIC {
        return Err(Error::corrupted(
            what(),
            format!("not a pack: magic {:02x?}", &head[..8]),
        ));
    }
    let fmt = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if fmt != PACK_FORMAT {
        return Err(Error::UnsupportedFormatVersion {
            what: format!("pack {}", what()),
            found: fmt,
            supported: PACK_FORMAT,
        });
    }
    Ok(())
}

/// Checks a record header against the index entry.
pub fn check_record_header(record: &[u8], id: &ChunkId, loc: &ChunkLoc) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::corrupted(
            format!("chunk {id}"),
            format!("pack {:016x} offset {}: {why}", loc.pack, loc.offset),
        ))
    };
    let Some(head) = record.get(..RECORD_HEADER_LEN as usize) else {
        return bad("record truncated");
    };
    if head[0] != loc.codec
        || head[1..5] != loc.raw_len.to_le_bytes()
        || head[5..9] != loc.stored_len.to_le_bytes()
    {
        return bad("record header disagrees with the index");
    }
    if &head[9..41] != id.as_bytes() {
        return bad("record holds another chunk");
    }
    Ok(())
}

/// One record parsed from a pack (for rebuild and verification scans).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Offset of the record header.
    pub offset: u64,
    /// Chunk id recorded.
    pub id: ChunkId,
    /// Codec.
    pub codec: u8,
    /// Uncompressed length.
    pub raw_len: u32,
    /// Stored bytes.
    pub data: &'a [u8],
}

/// Parses every record of a pack image; stops with an error at the first
/// damaged header. Used by the fuzz target and by `fsck`.
pub fn parse_pack<'a>(bytes: &'a [u8], what: &str) -> Result<Vec<Record<'a>>> {
    let mut d = crate::codec::Dec::new(bytes, what);
    check_pack_header(bytes, Path::new(what))?;
    d.take(PACK_HEADER_LEN as usize)?;
    let mut out = Vec::new();
    let mut offset = PACK_HEADER_LEN;
    while d.remaining() > 0 {
        let codec = d.u8()?;
        let raw_len = d.u32()?;
        let stored_len = d.u32()?;
        let id = ChunkId(d.id()?);
        let data = d.take(stored_len as usize)?;
        if codec > 1 {
            return Err(d.err(format!("unknown codec {codec}")));
        }
        out.push(Record {
            offset,
            id,
            codec,
            raw_len,
            data,
        });
        offset += RECORD_HEADER_LEN + stored_len as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes records of every size class (tiny, a buffer's worth, larger
    /// than a buffer) through `w` and checks each pack reads back exactly:
    /// records where they were reported, no padding left at the end.
    fn round_trip(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::with_direct_io(dir.path(), 20 << 20, direct);
        let sizes = [
            1usize,
            50,
            4096,
            4055,
            STAGE_LEN - 41,
            STAGE_LEN + 3,
            100_000,
            17,
        ];
        let mut locs = Vec::new();
        for (i, &n) in sizes.iter().cycle().take(24).enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (j * 31 + i) as u8).collect();
            let id = ChunkId(crate::id::hash(&data));
            let loc = w.append(&id, 0, n as u32, &data).unwrap();
            locs.push((id, loc, data));
        }
        let packs = w.finish().unwrap();
        let ids = packs.ids();
        assert!(ids.len() >= 3, "rotation at the target size: {ids:?}");
        let r = PackReader::new(dir.path());
        for (id, loc, data) in &locs {
            assert_eq!(&r.read_stored(id, loc).unwrap(), data);
        }
        let mut records = 0;
        for p in ids {
            let bytes = std::fs::read(pack_path(dir.path(), p)).unwrap();
            let recs = parse_pack(&bytes, "p").unwrap();
            let end = recs
                .last()
                .map(|r| r.offset + RECORD_HEADER_LEN + r.data.len() as u64);
            assert_eq!(
                end,
                Some(bytes.len() as u64),
                "pack {p:016x} ends with its last record"
            );
            records += recs.len();
        }
        assert_eq!(records, locs.len());
    }

    #[test]
    fn direct_and_buffered_writers_produce_exact_packs() {
        round_trip(true);
        round_trip(false);
    }

    #[test]
    fn a_failed_write_removes_every_pack_of_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::new(dir.path(), 1 << 20);
        let record = |i: u32| {
            let data: Vec<u8> = (0..300_000u32).map(|j| (j ^ i) as u8).collect();
            (ChunkId(crate::id::hash(&data)), data)
        };
        // Two sealed packs first, then the disk "fills up".
        for i in 0..8 {
            let (id, data) = record(i);
            w.append(&id, 0, data.len() as u32, &data).unwrap();
        }
        w.shared.fail_writes.store(true, Ordering::Relaxed);
        let mut err = None;
        for i in 8..200 {
            let (id, data) = record(i);
            if let Err(e) = w.append(&id, 0, data.len() as u32, &data) {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("appends stop once a write failed").to_string();
        assert!(e.contains("write pack") && e.contains(".pack"), "{e}");
        let e = w
            .finish()
            .err()
            .expect("finish reports the failure")
            .to_string();
        assert!(e.contains("No space left"), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "no pack left behind: {left:?}");
    }

    #[test]
    fn a_writer_dropped_without_finish_removes_its_packs() {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::new(dir.path(), 1 << 20);
        for i in 0..10u32 {
            let data: Vec<u8> = (0..300_000u32).map(|j| (j ^ i) as u8).collect();
            let id = ChunkId(crate::id::hash(&data));
            w.append(&id, 0, data.len() as u32, &data).unwrap();
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().count() >= 2);
        drop(w);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_pack_folder_that_cannot_be_written_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::new(dir.path().join("missing"), 1 << 20);
        let id = ChunkId(crate::id::hash(b"x"));
        let e = w.append(&id, 0, 1, b"x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_pack_with_a_wrong_magic_or_a_newer_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::new(dir.path(), 1 << 20);
        let data = b"some chunk bytes".to_vec();
        let id = ChunkId(crate::id::hash(&data));
        let loc = w.append(&id, 0, data.len() as u32, &data).unwrap();
        drop(w.finish().unwrap());
        let path = pack_path(dir.path(), loc.pack);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(
            PackReader::new(dir.path()).read_stored(&id, &loc).unwrap(),
            data
        );

        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        let e = PackReader::new(dir.path())
            .read_stored(&id, &loc)
            .unwrap_err();
        assert!(matches!(e, Error::Corrupted { .. }), "{e:?}");
        assert!(
            e.to_string().contains(&format!("{:016x}.pack", loc.pack)),
            "{e}"
        );

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(PACK_FORMAT + 1).to_le_bytes());
        std::fs::write(&path, &newer).unwrap();
        let e = PackReader::new(dir.path())
            .read_stored(&id, &loc)
            .unwrap_err();
        match &e {
            Error::UnsupportedFormatVersion { what, found, .. } => {
                assert_eq!(*found, PACK_FORMAT + 1);
                assert!(what.contains(&format!("{:016x}.pack", loc.pack)), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_pack(&newer, "p").is_err());
        assert!(parse_pack(&bad, "p").is_err());
    }

    #[test]
    fn write_then_read_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let w = PackWriter::new(dir.path(), 100);
        let mut locs = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 50 + i as usize];
            let id = ChunkId(crate::id::hash(&data));
            locs.push((
                id,
                w.append(&id, 0, data.len() as u32, &data).unwrap(),
                data,
            ));
        }
        let packs = w.finish().unwrap();
        assert!(packs.ids().len() >= 2, "rotation at the target size");
        let r = PackReader::new(dir.path());
        for (id, loc, data) in &locs {
            assert_eq!(&r.read_stored(id, loc).unwrap(), data);
        }
        let (id0, loc0, _) = &locs[0];
        let bytes = std::fs::read(pack_path(dir.path(), loc0.pack)).unwrap();
        let recs = parse_pack(&bytes, "p").unwrap();
        assert_eq!(recs[0].id, *id0);
        assert!(parse_pack(&bytes[..bytes.len() - 1], "p").is_err());
        let other = ChunkId(crate::id::hash(b"nope"));
        assert!(r.read_stored(&other, loc0).is_err());
    }
}
