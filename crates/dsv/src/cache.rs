//! The read side: read-only cached copies of versions, mutable copies, and
//! folder verification.
//!
//! Layout under the repository directory (`.dsv/cache/`, see
//! `docs/FORMAT.md`):
//!
//! ```text
//! cache/lock                     flock: shared while a copy is built, checked or pinned, exclusive to publish or prune
//! cache/config.json              {"max_bytes": N | null} — the byte budget
//! cache/files/<ab>/<id>[.x]      one read-only file per (file object id, executable bit)
//! cache/seals/<ab>/<id>[.x]      the content file's stamp after dsv last linked or unlinked it
//! cache/versions/<name>/         a version's tree of hard links to files/, directories 0555
//! cache/meta/<name>.json         what the entry holds (version, selection, files, bytes)
//! cache/meta/<name>.files        the stamp of every folder, file and link of the entry
//! cache/meta/<name>.used         its mtime is the entry's last use (the LRU clock)
//! cache/meta/<name>.pin          shared flock held by a process using the copy
//! ```
//!
//! An entry's `<name>` is the version id in hex, plus `+` and 16 hex digits
//! of the selection's hash when only some files were asked for. Entries are
//! built in a dot-named sibling folder and renamed into place, so an entry
//! that exists is complete; two processes building the same entry both
//! succeed and one result is kept. A content file's bytes are written to a
//! temporary name and renamed, and carry a seal (mode without write bits,
//! mtime 1980-01-01) and a seal record (its stamp: inode, size, mode,
//! mtime, ctime). Nothing can write, truncate, chmod, link or rename a file
//! without changing its ctime, so one `lstat` tells whether an entry or a
//! content file is still what dsv made: a changed entry is rebuilt, a
//! changed content file is written again before it is linked.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dsv_store::{
    ChunkId, Entry, EntryTarget, FileObject, NoProgress, ObjectId, Progress, Store, VersionId,
};
use fs4::fs_std::FileExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::{DatasetVersion, PathPattern, Repo};

/// Modification time every cached content file carries (1980-01-01 UTC).
pub const SEAL_MTIME_SECS: u64 = 315_532_800;
const SEAL_MTIME_NS: i64 = SEAL_MTIME_SECS as i64 * 1_000_000_000;

fn io_err(action: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action: action.to_string(),
        path: path.to_path_buf(),
        source,
    }
}

fn seal_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(SEAL_MTIME_SECS)
}

fn now_ms() -> i64 {
    dsv_store::store::now_ms()
}

fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{}{:03}", std::process::id(), n, c % 1000)
}

/// `path` made absolute with every symlink of its existing part resolved;
/// the components that do not exist yet are appended lexically (`..` pops).
fn resolve_path(path: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io_err("resolve", path, e))?
            .join(path)
    };
    let comps: Vec<Component<'_>> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let head: PathBuf = comps[..k].iter().collect();
        match head.canonicalize() {
            Ok(mut base) => {
                for c in &comps[k..] {
                    match c {
                        Component::ParentDir => {
                            base.pop();
                        }
                        Component::Normal(n) => base.push(n),
                        _ => {}
                    }
                }
                return Ok(base);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("resolve", path, e)),
        }
    }
    Ok(abs)
}

/// Refuses a folder that a destructive command (`copy --overwrite`,
/// `mount`) would replace or hide when it is the repository's folder, holds
/// the repository, or lies inside its `.dsv` folder (packs, database,
/// cache). Paths are compared after resolving symlinks.
pub fn check_target(dot_dsv: &Path, target: &Path, action: &str) -> Result<()> {
    let t = resolve_path(target)?;
    let dot = resolve_path(dot_dsv)?;
    let work = dot
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dot.clone());
    let why = if t.starts_with(&dot) {
        if t.starts_with(dot.join("cache")) {
            format!(
                "it is inside the repository's cache {}",
                dot.join("cache").display()
            )
        } else {
            format!("it is inside the repository's {} folder", dot.display())
        }
    } else if t == work {
        format!("it is the repository's folder (it holds {})", dot.display())
    } else if dot.starts_with(&t) {
        format!("it contains the repository {}", dot.display())
    } else {
        return Ok(());
    };
    Err(Error::Invalid(format!(
        "refusing to {action} {} ({}): {why}",
        target.display(),
        t.display()
    )))
}

/// The cache's settings (`cache/config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Byte budget of the cache's content files; `None` means unbounded.
    pub max_bytes: Option<u64>,
}

/// What a cache entry holds (`cache/meta/<name>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// The version (hex id).
    pub version: String,
    /// Include patterns; empty for the whole version.
    pub include: Vec<String>,
    /// Files (and symlinks) in the entry.
    pub files: u64,
    /// Logical bytes of its files.
    pub bytes: u64,
    /// When it was built, ms since the epoch.
    pub created_ms: i64,
}

/// One cached copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheEntry {
    /// Entry name (`<version hex>` or `<version hex>+<selection hash>`).
    pub name: String,
    /// The version.
    pub version: VersionId,
    /// Include patterns; empty for the whole version.
    pub include: Vec<String>,
    /// The read-only folder.
    pub path: PathBuf,
    /// Files in it.
    pub files: u64,
    /// Logical bytes of its files.
    pub bytes: u64,
    /// Last use, ms since the epoch.
    pub last_used_ms: i64,
    /// Whether a running process holds it.
    pub pinned: bool,
}

/// Totals of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheSize {
    /// Bytes of content files (each stored once, however many entries link it).
    pub bytes: u64,
    /// Content files.
    pub files: u64,
    /// Entries (cached copies).
    pub entries: u64,
    /// The budget, if any.
    pub max_bytes: Option<u64>,
}

/// What to prune.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Evict least recently used entries until the content bytes fit.
    pub max_bytes: Option<u64>,
    /// Remove every entry of these versions.
    pub versions: Vec<VersionId>,
    /// Never evict this entry (the one just returned to a caller).
    pub keep: Option<String>,
    /// Only report.
    pub dry_run: bool,
}

/// What a prune did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Entries removed.
    pub removed: Vec<String>,
    /// Entries kept because a process holds them.
    pub pinned: Vec<String>,
    /// Content bytes freed.
    pub freed_bytes: u64,
    /// Content files freed.
    pub freed_files: u64,
    /// Content bytes after.
    pub bytes_after: u64,
}

/// Options of [`Repo::get_local`].
pub struct GetLocalOptions<'a> {
    /// Only files matching one of these globs (or under these folders).
    pub include: Vec<String>,
    /// Hold the copy (it is not evicted) while the returned pin lives.
    pub pin: bool,
    /// Progress in bytes materialized.
    pub progress: &'a dyn Progress,
}

impl Default for GetLocalOptions<'_> {
    fn default() -> Self {
        Self {
            include: Vec::new(),
            pin: false,
            progress: &NoProgress,
        }
    }
}

/// Keeps a cached copy from being evicted while it lives.
#[derive(Debug)]
pub struct Pin {
    _file: File,
}

/// A read-only cached copy.
#[derive(Debug)]
pub struct LocalCopy {
    /// The folder.
    pub path: PathBuf,
    /// Entry name.
    pub name: String,
    /// Files in it.
    pub files: u64,
    /// Logical bytes of its files.
    pub bytes: u64,
    /// Whether it was already cached (nothing materialized).
    pub cached: bool,
    /// Content files written by this call.
    pub materialized_files: u64,
    /// Bytes written by this call.
    pub materialized_bytes: u64,
    /// Entries evicted to stay within the budget.
    pub evicted: Vec<String>,
    /// Present when asked for with [`GetLocalOptions::pin`].
    pub pin: Option<Pin>,
    /// What was found changed in the cached entry (which was then rebuilt).
    pub repaired: Vec<EntryDamage>,
}

/// A mutable copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    /// The target folder.
    pub path: PathBuf,
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// One difference between a folder and a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FolderMismatch {
    /// Path relative to the folder.
    pub path: String,
    /// `missing`, `extra`, `type`, `size`, `content` or `link`.
    pub kind: String,
    /// Details.
    pub detail: String,
}

/// The result of [`Repo::verify_folder`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FolderReport {
    /// Files of the version checked.
    pub files: u64,
    /// Files whose bytes were hashed.
    pub hashed: u64,
    /// Files accepted by the stat shortcut (unchanged since dsv read them).
    pub stat_matched: u64,
    /// Every difference, in path order.
    pub mismatches: Vec<FolderMismatch>,
}

/// What dsv knows of a file, folder or link it made in the cache: enough to
/// tell with one `lstat` whether anything changed it since. Every write,
/// truncation, `chmod`, link, unlink or rename changes the change time
/// (ctime), which no user, root included, can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Change time, ns since the epoch; 0 when not known yet (an entry's
    /// root folder between its publication and the record's completion).
    pub ctime_ns: i64,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.len(),
            mode: m.mode(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }

    /// Equal, ignoring an unknown change time.
    fn matches(&self, now: &Stamp) -> bool {
        if self.ctime_ns == 0 {
            Stamp {
                ctime_ns: 0,
                ..*now
            } == *self
        } else {
            self == now
        }
    }

    /// Which fields differ, for messages.
    fn differences(&self, now: &Stamp) -> String {
        let mut d = Vec::new();
        if self.ino != now.ino {
            d.push("replaced (another inode)".to_string());
        }
        if self.size != now.size {
            d.push(format!("size {} -> {}", self.size, now.size));
        }
        if self.mode != now.mode {
            d.push(format!("mode {:o} -> {:o}", self.mode, now.mode));
        }
        if self.mtime_ns != now.mtime_ns {
            d.push("modified".to_string());
        }
        if d.is_empty() {
            d.push("changed (inode change time)".to_string());
        }
        d.join(", ")
    }
}

/// One object of a cached entry as dsv made it (`cache/meta/<name>.files`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeRecord {
    /// Path inside the entry ("" for its root folder), when UTF-8.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    path: String,
    /// The path's bytes in hex, when not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    /// For a file: its content file (`ab/<id hex>[.x]` under `files/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    /// For a file: a sealed copy of its own rather than a hard link.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    own: bool,
    /// What it looked like when the entry was sealed.
    stamp: Stamp,
}

impl NodeRecord {
    fn new(path: &[u8], content: Option<String>, own: bool, stamp: Stamp) -> Self {
        match std::str::from_utf8(path) {
            Ok(p) => NodeRecord {
                path: p.to_string(),
                path_hex: None,
                content,
                own,
                stamp,
            },
            Err(_) => NodeRecord {
                path: String::new(),
                path_hex: Some(hex::encode(path)),
                content,
                own,
                stamp,
            },
        }
    }

    fn path_bytes(&self) -> Vec<u8> {
        match &self.path_hex {
            Some(h) => hex::decode(h).unwrap_or_default(),
            None => self.path.as_bytes().to_vec(),
        }
    }

    fn display(&self) -> String {
        let p = self.path_bytes();
        if p.is_empty() {
            ".".to_string()
        } else {
            String::from_utf8_lossy(&p).into_owned()
        }
    }

    /// The file object id of a file's content.
    fn object_id(&self) -> Option<ObjectId> {
        let c = self.content.as_deref()?;
        let name = c.rsplit('/').next()?;
        name.trim_end_matches(".x").parse().ok()
    }
}

/// The record of an entry: every folder, file and link in it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EntryRecord {
    nodes: Vec<NodeRecord>,
}

/// Something in a cached entry that is not as dsv made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryDamage {
    /// Path inside the entry (`.` for the entry's folder itself).
    pub path: String,
    /// What changed.
    pub detail: String,
}

/// A damaged cached entry found by [`Repo::check_cache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheProblem {
    /// Entry name.
    pub entry: String,
    /// The entry's folder.
    pub folder: PathBuf,
    /// Its version (hex).
    pub version: String,
    /// Path inside the entry.
    pub path: String,
    /// What is wrong.
    pub detail: String,
}

/// The result of [`Repo::check_cache`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheCheck {
    /// Entries checked.
    pub entries: u64,
    /// Files, folders and links compared with their records.
    pub objects: u64,
    /// Bytes of cached files rehashed (`read_data`).
    pub bytes_read: u64,
    /// Every difference found.
    pub problems: Vec<CacheProblem>,
}

/// The repository's cache of read-only copies.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

enum Node {
    Dir(Vec<u8>),
    File {
        path: Vec<u8>,
        id: ObjectId,
        size: u64,
        mode: u32,
    },
    Link {
        path: Vec<u8>,
        target: Vec<u8>,
    },
}

/// A version's (selected) contents: directories, files and links in path order.
struct Listing {
    nodes: Vec<Node>,
    files: u64,
    bytes: u64,
}

fn list_version(store: &Store, root: &ObjectId, filter: Option<&PathPattern>) -> Result<Listing> {
    let mut out = Listing {
        nodes: Vec::new(),
        files: 0,
        bytes: 0,
    };
    fn walk(
        store: &Store,
        dir: &ObjectId,
        prefix: &[u8],
        filter: Option<&PathPattern>,
        out: &mut Listing,
    ) -> Result<bool> {
        let mut any = false;
        for e in store.list_dir(dir)? {
            let path = dsv_store::tree::join(prefix, &e.name);
            match &e.target {
                EntryTarget::Dir { id, .. } => {
                    let at = out.nodes.len();
                    out.nodes.push(Node::Dir(path.clone()));
                    let inner = walk(store, id, &path, filter, out)?;
                    if filter.is_some() && !inner {
                        out.nodes.truncate(at);
                    } else {
                        any = true;
                    }
                }
                EntryTarget::File(id) => {
                    if filter.is_none_or(|f| f.matches(&path)) {
                        out.files += 1;
                        out.bytes += e.size;
                        out.nodes.push(Node::File {
                            path,
                            id: *id,
                            size: e.size,
                            mode: e.mode,
                        });
                        any = true;
                    }
                }
                EntryTarget::Symlink(t) => {
                    if filter.is_none_or(|f| f.matches(&path)) {
                        out.files += 1;
                        out.nodes.push(Node::Link {
                            path,
                            target: t.clone(),
                        });
                        any = true;
                    }
                }
            }
        }
        Ok(any)
    }
    walk(store, root, b"", filter, &mut out)?;
    Ok(out)
}

fn rel(base: &Path, p: &[u8]) -> PathBuf {
    base.join(OsStr::from_bytes(p))
}

/// Writes a stored file's bytes into `out`, decoding runs of chunks in
/// parallel when the file has many.
fn write_stored(store: &Store, fo: &FileObject, out: &mut File, what: &Path) -> Result<u64> {
    let mut n = 0u64;
    const RUN: usize = 16;
    // A lazy clone fetches the file's missing chunks in one batch first.
    let ids: Vec<dsv_store::ChunkId> = fo.chunks.iter().map(|(c, _)| *c).collect();
    store.prefetch_missing(&ids)?;
    if fo.chunks.len() <= 2 {
        for (cid, _) in &fo.chunks {
            let data = store.read_chunk(cid)?;
            out.write_all(&data).map_err(|e| io_err("write", what, e))?;
            n += data.len() as u64;
        }
        return Ok(n);
    }
    for run in fo.chunks.chunks(RUN) {
        let datas: Vec<dsv_store::Result<Vec<u8>>> = run
            .par_iter()
            .map(|(cid, _)| store.read_chunk(cid))
            .collect();
        for d in datas {
            let d = d?;
            out.write_all(&d).map_err(|e| io_err("write", what, e))?;
            n += d.len() as u64;
        }
    }
    Ok(n)
}

fn make_writable_tree(path: &Path) {
    // Best effort: directories need write permission to be emptied.
    if let Ok(m) = fs::symlink_metadata(path) {
        if m.is_dir() {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs::read_dir(path) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        make_writable_tree(&e.path());
                    }
                }
            }
        }
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    make_writable_tree(path);
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

fn selection_name(version: &VersionId, include: &[String]) -> String {
    if include.is_empty() {
        return version.to_hex();
    }
    let mut pats: Vec<&str> = include.iter().map(|s| s.as_str()).collect();
    pats.sort_unstable();
    pats.dedup();
    let h = blake3::hash(pats.join("\0").as_bytes());
    format!("{}+{}", version.to_hex(), &h.to_hex()[..16])
}

struct CacheLock {
    file: File,
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// An entry built aside, not yet published.
struct Built {
    path: PathBuf,
    /// Held while the build lives (a `.new-` folder whose flock is free is
    /// a dead builder's).
    _lock: File,
    record: EntryRecord,
    materialized_files: u64,
    materialized_bytes: u64,
}

/// The record of a content file's last known stamp
/// (`cache/seals/<ab>/<id>[.x]`), flocked while read or updated.
struct Seal {
    file: File,
    path: PathBuf,
}

impl Seal {
    fn read(&self) -> Option<Stamp> {
        use std::os::unix::fs::FileExt as _;
        let len = self.file.metadata().ok()?.len();
        let mut b = vec![0u8; len.min(4096) as usize];
        self.file.read_exact_at(&mut b, 0).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn write(&self, s: &Stamp) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let body = serde_json::to_vec(s).map_err(|e| Error::Invalid(e.to_string()))?;
        self.file
            .set_len(0)
            .and_then(|_| self.file.write_all_at(&body, 0))
            .map_err(|e| io_err("write", &self.path, e))
    }
}

impl Cache {
    /// The cache of the repository at `repo_dir` (its `.dsv` folder).
    pub fn new(repo_dir: &Path) -> Cache {
        Cache {
            dir: repo_dir.join("cache"),
        }
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }
    fn versions_dir(&self) -> PathBuf {
        self.dir.join("versions")
    }
    fn meta_dir(&self) -> PathBuf {
        self.dir.join("meta")
    }

    fn ensure_dirs(&self) -> Result<()> {
        for d in [self.files_dir(), self.versions_dir(), self.meta_dir()] {
            fs::create_dir_all(&d).map_err(|e| io_err("create", &d, e))?;
        }
        Ok(())
    }

    fn lock(&self, exclusive: bool) -> Result<CacheLock> {
        fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        let r = if exclusive {
            FileExt::lock_exclusive(&file)
        } else {
            FileExt::lock_shared(&file)
        };
        r.map_err(|e| io_err("lock", &path, e))?;
        Ok(CacheLock { file })
    }

    /// The cache's settings.
    pub fn config(&self) -> Result<CacheConfig> {
        let path = self.dir.join("config.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::corrupted(path.display().to_string(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CacheConfig::default()),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    /// Replaces the cache's settings (atomically).
    pub fn set_config(&self, c: &CacheConfig) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        let path = self.dir.join("config.json");
        let tmp = self.dir.join(format!(".config.{}", unique_suffix()));
        let body = serde_json::to_vec_pretty(c).map_err(|e| Error::Invalid(e.to_string()))?;
        fs::write(&tmp, body).map_err(|e| io_err("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err("rename", &path, e))
    }

    fn content_key(id: &ObjectId, exec: bool) -> String {
        let hex = id.to_hex();
        format!("{}/{}{}", &hex[..2], hex, if exec { ".x" } else { "" })
    }

    fn seals_dir(&self) -> PathBuf {
        self.dir.join("seals")
    }

    /// Opens and flocks the seal record of content file `key`.
    fn seal(&self, key: &str, exclusive: bool) -> Result<Seal> {
        let path = self.seals_dir().join(key);
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = path.parent().expect("a seal has a folder");
                fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
                open()
            }
            r => r,
        }
        .map_err(|e| io_err("open", &path, e))?;
        let r = if exclusive {
            FileExt::lock_exclusive(&file)
        } else {
            FileExt::lock_shared(&file)
        };
        r.map_err(|e| io_err("lock", &path, e))?;
        Ok(Seal { file, path })
    }

    /// The content file's current stamp if it is exactly what its seal
    /// record says (nothing touched it since dsv last did).
    fn sealed_stamp(&self, key: &str, seal: &Seal) -> Option<Stamp> {
        let m = fs::symlink_metadata(self.files_dir().join(key)).ok()?;
        let now = Stamp::of(&m);
        (m.is_file() && seal.read() == Some(now) && now.mtime_ns == SEAL_MTIME_NS).then_some(now)
    }

    /// Makes content file `key` hold the stored bytes of `id`: a content
    /// file that is missing or whose stat differs from its seal record is
    /// written again from the store (under a temporary name, flocked while
    /// written, then renamed over the old one). Called with the seal held
    /// exclusively. Returns the bytes written.
    fn ensure_content(
        &self,
        store: &Store,
        seal: &Seal,
        key: &str,
        id: &ObjectId,
        size: u64,
    ) -> Result<u64> {
        if let Some(now) = self.sealed_stamp(key, seal) {
            if now.size == size {
                return Ok(0);
            }
        }
        let dest = self.files_dir().join(key);
        let dir = dest.parent().expect("content path has a parent");
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let fname = key.rsplit('/').next().unwrap_or(key);
        let tmp = dir.join(format!(".{fname}.{}", unique_suffix()));
        // A temporary file whose flock is free belongs to a dead writer: it
        // is created under a name collectors skip and renamed once locked.
        let init = dir.join(format!(".{fname}.{}.init", unique_suffix()));
        let mut f = File::create(&init).map_err(|e| io_err("create", &init, e))?;
        FileExt::lock_exclusive(&f).map_err(|e| io_err("lock", &init, e))?;
        fs::rename(&init, &tmp).map_err(|e| io_err("rename", &tmp, e))?;
        let mode = if key.ends_with(".x") { 0o555 } else { 0o444 };
        let written = (|| -> Result<u64> {
            let fo = store.file_object(id)?;
            let n = write_stored(store, &fo, &mut f, &tmp)?;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .and_then(|_| f.set_modified(seal_time()))
                .map_err(|e| io_err("seal", &tmp, e))?;
            fs::rename(&tmp, &dest).map_err(|e| io_err("rename", &dest, e))?;
            Ok(n)
        })();
        let n = written.inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        let m = fs::symlink_metadata(&dest).map_err(|e| io_err("stat", &dest, e))?;
        seal.write(&Stamp::of(&m))?;
        Ok(n)
    }

    /// Links content file `key` (checked against its seal, rewritten when
    /// changed) at `dst`, and records the content's new stamp. Returns the
    /// bytes written and whether `dst` is a sealed copy of its own (where
    /// hard links fail).
    fn link_content(
        &self,
        store: &Store,
        key: &str,
        id: &ObjectId,
        size: u64,
        dst: &Path,
    ) -> Result<(u64, bool)> {
        let seal = self.seal(key, true)?;
        let n = self.ensure_content(store, &seal, key, id, size)?;
        let src = self.files_dir().join(key);
        match fs::hard_link(&src, dst) {
            Ok(()) => {
                let m = fs::symlink_metadata(&src).map_err(|e| io_err("stat", &src, e))?;
                seal.write(&Stamp::of(&m))?;
                Ok((n, false))
            }
            Err(e) => {
                // Too many links, or a filesystem without them.
                let mode = if key.ends_with(".x") { 0o555 } else { 0o444 };
                copy_instead_of_link(&src, dst, mode, e)?;
                Ok((n, true))
            }
        }
    }

    /// Unlinks the file `path` of an entry being removed, keeping the seal
    /// record of the content it links current.
    fn unlink_file(&self, path: &Path, node: Option<&NodeRecord>) {
        let Some(key) = node.filter(|n| !n.own).and_then(|n| n.content.as_deref()) else {
            let _ = fs::remove_file(path);
            return;
        };
        let Ok(seal) = self.seal(key, true) else {
            let _ = fs::remove_file(path);
            return;
        };
        let before = self.sealed_stamp(key, &seal);
        let same = fs::symlink_metadata(path)
            .map(|m| Some(m.ino()) == before.map(|b| b.ino))
            .unwrap_or(false);
        let _ = fs::remove_file(path);
        if same {
            if let Ok(m) = fs::symlink_metadata(self.files_dir().join(key)) {
                let _ = seal.write(&Stamp::of(&m));
            }
        }
    }

    /// Removes a folder of links (an entry set aside, or a build that lost
    /// a race), keeping the content files' seal records current.
    fn remove_links(&self, dir: &Path, record: Option<&EntryRecord>) {
        make_writable_tree(dir);
        if let Some(r) = record {
            for n in r.nodes.iter().filter(|n| n.content.is_some()) {
                self.unlink_file(&rel(dir, &n.path_bytes()), Some(n));
            }
        }
        let _ = remove_tree(dir);
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.meta_dir().join(format!("{name}.files"))
    }

    fn read_record(&self, name: &str) -> Option<EntryRecord> {
        fs::read(self.record_path(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn write_record(&self, name: &str, r: &EntryRecord) -> Result<()> {
        let path = self.record_path(name);
        let tmp = self
            .meta_dir()
            .join(format!(".{name}.files.{}", unique_suffix()));
        let body = serde_json::to_vec(r).map_err(|e| Error::Invalid(e.to_string()))?;
        fs::write(&tmp, body).map_err(|e| io_err("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err("rename", &path, e))
    }

    /// Compares every folder, file and link of entry `name` with its record
    /// (one `lstat` each). A file whose only change is its change time is
    /// one whose content another entry linked or unlinked since: accepted
    /// when the content's seal record explains it, else its bytes are
    /// rehashed once (after a crash) and the seal renewed when they match.
    /// Returns every difference; empty when the entry is intact.
    fn check_entry(&self, store: &Store, name: &str) -> Result<Vec<EntryDamage>> {
        let base = self.versions_dir().join(name);
        let Some(mut rec) = self.read_record(name) else {
            return Ok(vec![EntryDamage {
                path: ".".into(),
                detail: "no record of what the entry held (made by an older dsv, or its build \
                         was interrupted)"
                    .into(),
            }]);
        };
        let mut damage = Vec::new();
        let mut stale = false;
        for n in rec.nodes.iter_mut() {
            let p = rel(&base, &n.path_bytes());
            let now = match fs::symlink_metadata(&p) {
                Ok(m) => Stamp::of(&m),
                Err(e) => {
                    damage.push(EntryDamage {
                        path: n.display(),
                        detail: if e.kind() == std::io::ErrorKind::NotFound {
                            "deleted".into()
                        } else {
                            e.to_string()
                        },
                    });
                    continue;
                }
            };
            if n.stamp.matches(&now) {
                if n.stamp.ctime_ns == 0 {
                    n.stamp = now;
                    stale = true;
                }
                continue;
            }
            let only_ctime = Stamp {
                ctime_ns: now.ctime_ns,
                ..n.stamp
            } == now;
            if let (true, Some(key), false) = (only_ctime, n.content.as_deref(), n.own) {
                let seal = self.seal(key, true)?;
                let explained = match self.sealed_stamp(key, &seal) {
                    Some(s) => s == now,
                    None => {
                        // The seal does not explain it (a link or unlink by a
                        // process that died before recording it, or by
                        // someone else): when the entry still links the
                        // content file, its bytes decide, and the seal is
                        // renewed if they are right.
                        let content_now = fs::symlink_metadata(self.files_dir().join(key))
                            .map(|m| Stamp::of(&m))
                            .ok();
                        let same = content_now == Some(now)
                            && now.mtime_ns == SEAL_MTIME_NS
                            && n.object_id().is_some_and(|id| {
                                matches!(compare_bytes(store, &id, &p), Ok(None))
                            });
                        if same {
                            seal.write(&now)?;
                        }
                        same
                    }
                };
                if explained {
                    n.stamp = now;
                    stale = true;
                    continue;
                }
            }
            let folder = (n.stamp.mode & libc::S_IFMT) == libc::S_IFDIR;
            damage.push(EntryDamage {
                path: n.display(),
                detail: if folder {
                    format!(
                        "folder changed (a file was added, removed or renamed): {}",
                        n.stamp.differences(&now)
                    )
                } else {
                    n.stamp.differences(&now)
                },
            });
        }
        if stale && damage.is_empty() {
            // Best effort: the next check is one stat per object again.
            let _ = self.write_record(name, &rec);
        }
        Ok(damage)
    }

    /// Removes temporary content files of dead writers (their flock is
    /// free), build folders of dead builders, and folders of removals that
    /// died (a removal holds the exclusive lock, so under the shared lock
    /// any is dead).
    fn collect_dead(&self) {
        if let Ok(rd) = fs::read_dir(self.files_dir()) {
            for sub in rd.flatten() {
                let Ok(rd2) = fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in rd2.flatten() {
                    let n = f.file_name();
                    // `.init`: created but maybe not locked yet; collected by
                    // prune (under the exclusive lock no writer is there).
                    if !n.as_bytes().starts_with(b".") || n.as_bytes().ends_with(b".init") {
                        continue;
                    }
                    if let Ok(file) = File::open(f.path()) {
                        if let Ok(true) = FileExt::try_lock_exclusive(&file) {
                            let _ = fs::remove_file(f.path());
                        }
                    }
                }
            }
        }
        self.collect_dead_records();
        if let Ok(rd) = fs::read_dir(self.versions_dir()) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.as_bytes();
                if n.starts_with(b".del-") {
                    let _ = remove_tree(&e.path());
                } else if n.starts_with(b".new-") {
                    if let Ok(file) = File::open(e.path()) {
                        if let Ok(true) = FileExt::try_lock_exclusive(&file) {
                            let _ = remove_tree(&e.path());
                        }
                    }
                }
            }
        }
    }

    /// Removes temporary records (call under the shared lock): they are
    /// written under the exclusive lock (so any is dead), or by a check
    /// renewing a record's stamps, which does not mind losing its rename.
    fn collect_dead_records(&self) {
        if let Ok(rd) = fs::read_dir(self.meta_dir()) {
            for e in rd.flatten() {
                if e.file_name().as_bytes().starts_with(b".") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    fn touch_used(&self, name: &str) {
        let path = self.meta_dir().join(format!("{name}.used"));
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn pin(&self, name: &str) -> Result<Pin> {
        let path = self.meta_dir().join(format!("{name}.pin"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        FileExt::lock_shared(&file).map_err(|e| io_err("lock", &path, e))?;
        Ok(Pin { _file: file })
    }

    fn is_pinned(&self, name: &str) -> Option<File> {
        let path = self.meta_dir().join(format!("{name}.pin"));
        let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
            return None;
        };
        match FileExt::try_lock_exclusive(&file) {
            Ok(true) => {
                let _ = FileExt::unlock(&file);
                None
            }
            _ => Some(file),
        }
    }

    fn read_meta(&self, name: &str) -> Option<EntryMeta> {
        fs::read(self.meta_dir().join(format!("{name}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// The existing entry `name` as a copy handed to a caller: marks its
    /// use, pins it when asked.
    fn hand_out(&self, name: &str, files: u64, bytes: u64, pin: bool) -> Result<LocalCopy> {
        self.touch_used(name);
        Ok(LocalCopy {
            pin: if pin { Some(self.pin(name)?) } else { None },
            path: self.versions_dir().join(name),
            name: name.to_string(),
            files,
            bytes,
            cached: true,
            materialized_files: 0,
            materialized_bytes: 0,
            evicted: Vec::new(),
            repaired: Vec::new(),
        })
    }

    /// Publishes a built entry under the exclusive lock: its meta and
    /// record are written, then the folder is renamed into place (the
    /// root's change time is recorded after the rename; a crash in between
    /// leaves it unknown, and the next check takes it). An intact entry
    /// published meanwhile by another process is kept and the build
    /// discarded; a damaged one is removed first. Pins before unlocking.
    fn publish(
        &self,
        store: &Store,
        name: &str,
        mut built: Built,
        meta: &EntryMeta,
        pin: bool,
    ) -> Result<LocalCopy> {
        let _excl = self.lock(true)?;
        let final_path = self.versions_dir().join(name);
        let mut won = true;
        if final_path.is_dir() {
            if self.check_entry(store, name)?.is_empty() {
                self.remove_links(&built.path, Some(&built.record));
                won = false;
            } else {
                self.remove_entry(name)?;
            }
        }
        if won {
            let res = (|| -> Result<()> {
                let m = fs::symlink_metadata(&built.path)
                    .map_err(|e| io_err("stat", &built.path, e))?;
                let root = Stamp {
                    ctime_ns: 0,
                    ..Stamp::of(&m)
                };
                built
                    .record
                    .nodes
                    .insert(0, NodeRecord::new(b"", None, false, root));
                let meta_path = self.meta_dir().join(format!("{name}.json"));
                let body =
                    serde_json::to_vec_pretty(meta).map_err(|e| Error::Invalid(e.to_string()))?;
                let tmp_meta = self
                    .meta_dir()
                    .join(format!(".{}.json.{}", name, unique_suffix()));
                fs::write(&tmp_meta, body).map_err(|e| io_err("write", &tmp_meta, e))?;
                fs::rename(&tmp_meta, &meta_path).map_err(|e| io_err("rename", &meta_path, e))?;
                self.write_record(name, &built.record)?;
                fs::rename(&built.path, &final_path)
                    .map_err(|e| io_err("rename", &final_path, e))?;
                if let Ok(m) = fs::symlink_metadata(&final_path) {
                    built.record.nodes[0].stamp = Stamp::of(&m);
                    let _ = self.write_record(name, &built.record);
                }
                Ok(())
            })();
            if let Err(e) = res {
                self.remove_links(&built.path, Some(&built.record));
                for ext in ["json", "files"] {
                    let _ = fs::remove_file(self.meta_dir().join(format!("{name}.{ext}")));
                }
                return Err(e);
            }
        }
        let mut copy = self.hand_out(name, meta.files, meta.bytes, pin)?;
        copy.cached = !won;
        copy.materialized_files = built.materialized_files;
        copy.materialized_bytes = built.materialized_bytes;
        Ok(copy)
    }

    /// Every cached copy, least recently used first.
    pub fn entries(&self) -> Result<Vec<CacheEntry>> {
        let vdir = self.versions_dir();
        let rd = match fs::read_dir(&vdir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &vdir, e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| io_err("list", &vdir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Some(hex) = name.get(..64) else { continue };
            let Ok(version) = hex.parse::<VersionId>() else {
                continue;
            };
            let meta = self.read_meta(&name);
            let used = fs::metadata(self.meta_dir().join(format!("{name}.used")))
                .and_then(|m| m.modified())
                .ok()
                .or_else(|| e.metadata().and_then(|m| m.modified()).ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let pinned = self.is_pinned(&name).is_some();
            out.push(CacheEntry {
                path: e.path(),
                version,
                include: meta.as_ref().map(|m| m.include.clone()).unwrap_or_default(),
                files: meta.as_ref().map(|m| m.files).unwrap_or(0),
                bytes: meta.as_ref().map(|m| m.bytes).unwrap_or(0),
                last_used_ms: used,
                pinned,
                name,
            });
        }
        out.sort_by(|a, b| (a.last_used_ms, &a.name).cmp(&(b.last_used_ms, &b.name)));
        Ok(out)
    }

    fn content_files(&self) -> Result<Vec<(PathBuf, u64, u64)>> {
        let mut out = Vec::new();
        let fdir = self.files_dir();
        let rd = match fs::read_dir(&fdir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("list", &fdir, e)),
        };
        for sub in rd.flatten() {
            let Ok(rd2) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in rd2.flatten() {
                if f.file_name().as_bytes().starts_with(b".") {
                    continue; // a temporary file being written
                }
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        out.push((f.path(), m.len(), m.nlink()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes and files the cache holds.
    pub fn size(&self) -> Result<CacheSize> {
        let files = self.content_files()?;
        Ok(CacheSize {
            bytes: files.iter().map(|f| f.1).sum(),
            files: files.len() as u64,
            entries: self.entries()?.len() as u64,
            max_bytes: self.config()?.max_bytes,
        })
    }

    /// Bytes only `entry` references (freed if it goes).
    fn exclusive_bytes(path: &Path) -> u64 {
        fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>, n: &mut u64) {
            let Ok(rd) = fs::read_dir(p) else { return };
            for e in rd.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    walk(&e.path(), seen, n);
                } else if m.is_file() && m.nlink() <= 2 && seen.insert((m.dev(), m.ino())) {
                    *n += m.len();
                }
            }
        }
        let mut n = 0;
        walk(path, &mut HashSet::new(), &mut n);
        n
    }

    fn remove_entry(&self, name: &str) -> Result<()> {
        let path = self.versions_dir().join(name);
        let record = self.read_record(name);
        let doomed = self
            .versions_dir()
            .join(format!(".del-{}.{}", name, unique_suffix()));
        match fs::rename(&path, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path, e)),
        }
        for ext in ["json", "used", "pin", "files"] {
            let _ = fs::remove_file(self.meta_dir().join(format!("{name}.{ext}")));
        }
        self.remove_links(&doomed, record.as_ref());
        remove_tree(&doomed)
    }

    /// Removes content files no entry links (and their seal records);
    /// returns (files, bytes).
    fn sweep_content(&self, dry: bool) -> Result<(u64, u64)> {
        let mut n = (0, 0);
        let files = self.files_dir();
        for (p, len, nlink) in self.content_files()? {
            if nlink <= 1 {
                if !dry {
                    match fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_err("remove", &p, e)),
                    }
                    if let Ok(key) = p.strip_prefix(&files) {
                        let _ = fs::remove_file(self.seals_dir().join(key));
                    }
                }
                n.0 += 1;
                n.1 += len;
            }
        }
        Ok(n)
    }

    fn clean_leftovers(&self) {
        // Half-built or half-removed entries and temporary files of
        // crashed processes (builders still alive hold flocks on theirs).
        self.collect_dead();
        // Names a writer holds only while it has the shared lock: under the
        // exclusive lock, they are dead.
        if let Ok(rd) = fs::read_dir(self.versions_dir()) {
            for e in rd.flatten() {
                if e.file_name().as_bytes().starts_with(b".mk-") {
                    let _ = remove_tree(&e.path());
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.files_dir()) {
            for sub in rd.flatten() {
                if let Ok(rd2) = fs::read_dir(sub.path()) {
                    for f in rd2.flatten() {
                        let n = f.file_name();
                        if n.as_bytes().starts_with(b".") && n.as_bytes().ends_with(b".init") {
                            let _ = fs::remove_file(f.path());
                        }
                    }
                }
            }
        }
        // Records are written under the exclusive lock we hold: any
        // temporary one is dead, and so is a record without its entry.
        if let Ok(rd) = fs::read_dir(self.meta_dir()) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                let orphan = n
                    .strip_suffix(".files")
                    .or_else(|| n.strip_suffix(".json"))
                    .is_some_and(|name| !self.versions_dir().join(name).is_dir());
                if n.starts_with('.') || orphan {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // Seal records of content files that are gone.
        if let Ok(rd) = fs::read_dir(self.seals_dir()) {
            for sub in rd.flatten() {
                let Ok(rd2) = fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in rd2.flatten() {
                    let content = self.files_dir().join(sub.file_name()).join(f.file_name());
                    if !content.exists() {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
    }

    /// Removes entries (by version, then least recently used first to fit
    /// `max_bytes`) and the content files nothing links any more. Entries
    /// pinned by a running process are never removed.
    pub fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        let _lock = self.lock(true)?;
        self.prune_locked(opts)
    }

    fn prune_locked(&self, opts: &PruneOptions) -> Result<PruneReport> {
        if !opts.dry_run {
            self.clean_leftovers();
        }
        let mut report = PruneReport::default();
        let entries = self.entries()?;
        let files = self.content_files()?;
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        // Content freed by a dry run is estimated per entry.
        let mut doomed: Vec<&CacheEntry> = Vec::new();
        for e in &entries {
            if opts.versions.contains(&e.version) {
                doomed.push(e);
            }
        }
        let remove = |e: &CacheEntry, report: &mut PruneReport, total: &mut u64| -> Result<()> {
            if e.pinned {
                if !report.pinned.contains(&e.name) {
                    report.pinned.push(e.name.clone());
                }
                return Ok(());
            }
            let freed = Self::exclusive_bytes(&e.path);
            if !opts.dry_run {
                // Hold the pin lock while removing so nobody pins it meanwhile.
                let _guard = self.is_pinned(&e.name);
                self.remove_entry(&e.name)?;
            }
            *total = total.saturating_sub(freed);
            report.freed_bytes += freed;
            report.removed.push(e.name.clone());
            Ok(())
        };
        for e in doomed {
            remove(e, &mut report, &mut total)?;
        }
        if let Some(max) = opts.max_bytes {
            for e in &entries {
                if total <= max {
                    break;
                }
                if report.removed.contains(&e.name) || opts.keep.as_deref() == Some(&e.name) {
                    continue;
                }
                remove(e, &mut report, &mut total)?;
            }
        }
        if !opts.dry_run {
            let (n, bytes) = self.sweep_content(false)?;
            report.freed_files = n;
            report.freed_bytes = report.freed_bytes.max(bytes);
            report.bytes_after = self.content_files()?.iter().map(|f| f.1).sum();
        } else {
            report.bytes_after = total;
        }
        Ok(report)
    }
}

impl Repo {
    /// The repository's cache of read-only copies.
    pub fn cache(&self) -> Cache {
        Cache::new(self.store().dir())
    }

    /// Removes the cached copies of versions that no longer exist (the
    /// cache part of `gc`).
    pub fn prune_cache_of_deleted(&self, dry_run: bool) -> Result<PruneReport> {
        let cache = self.cache();
        let mut gone = Vec::new();
        for e in cache.entries()? {
            if !self.store().version_exists(&e.version)? && !gone.contains(&e.version) {
                gone.push(e.version);
            }
        }
        cache.prune(&PruneOptions {
            versions: gone,
            dry_run,
            ..Default::default()
        })
    }

    /// A read-only materialized copy of a version (or of the files matching
    /// `include`) in the cache: content files are shared by every version
    /// that has them, the version's folder is made of hard links. A second
    /// call checks the cached entry (one `lstat` per file, folder and link
    /// against the record made when it was sealed) and hands it out; an
    /// entry that was changed is rebuilt (what was found is in
    /// [`LocalCopy::repaired`]). A version that differs from a cached one in
    /// a few files materializes only those.
    pub fn get_local(&self, v: &DatasetVersion, opts: &GetLocalOptions<'_>) -> Result<LocalCopy> {
        let cache = self.cache();
        let name = selection_name(&v.id, &opts.include);
        let path = cache.versions_dir().join(&name);
        let mut damaged = Vec::new();
        {
            let _shared = cache.lock(false)?;
            if path.is_dir() {
                cache.collect_dead_records();
                damaged = cache.check_entry(self.store(), &name)?;
                if damaged.is_empty() {
                    let meta = cache.read_meta(&name);
                    return cache.hand_out(
                        &name,
                        meta.as_ref().map(|m| m.files).unwrap_or(v.file_count),
                        meta.as_ref().map(|m| m.bytes).unwrap_or(v.total_bytes),
                        opts.pin,
                    );
                }
            }
        }
        let filter = PathPattern::new(&opts.include)?;
        let root = self.store().version(&v.id)?.object.root;
        let listing = list_version(self.store(), &root, filter.as_ref())?;
        if filter.is_some() && listing.files == 0 {
            return Err(Error::Invalid(format!(
                "no file of {} matches {}",
                v.label(),
                opts.include.join(", ")
            )));
        }
        let config = cache.config()?;
        // Unique content of the selection.
        let mut unique: BTreeMap<(ObjectId, bool), u64> = BTreeMap::new();
        let mut largest: Option<(&[u8], u64)> = None;
        for n in &listing.nodes {
            if let Node::File {
                id,
                size,
                mode,
                path,
            } = n
            {
                unique.insert((*id, mode & 0o111 != 0), *size);
                if largest.is_none_or(|(_, s)| *size > s) {
                    largest = Some((path, *size));
                }
            }
        }
        let needed: u64 = unique.values().sum();
        if let Some(max) = config.max_bytes {
            if needed > max {
                let (lp, ls) = largest.unwrap_or((b"", 0));
                return Err(Error::CacheBudget(format!(
                    "{} needs {} bytes in the cache (largest file '{}': {} bytes) but the cache \
                     budget is {} bytes; raise it with `dsv cache budget`, get fewer files with \
                     --include, or use `dsv dataset copy` or `mount`",
                    v.label(),
                    needed,
                    String::from_utf8_lossy(lp),
                    ls,
                    max
                )));
            }
        }
        let built = {
            let _shared = cache.lock(false)?;
            cache.ensure_dirs()?;
            cache.collect_dead();
            self.build_entry(&cache, &name, &listing, &unique, opts)?
        };
        let meta = EntryMeta {
            version: v.id.to_hex(),
            include: opts.include.clone(),
            files: listing.files,
            bytes: listing.bytes,
            created_ms: now_ms(),
        };
        let mut out = cache.publish(self.store(), &name, built, &meta, opts.pin)?;
        out.repaired = damaged;
        if let Some(max) = config.max_bytes {
            let _excl = cache.lock(true)?;
            let r = cache.prune_locked(&PruneOptions {
                max_bytes: Some(max),
                keep: Some(name.clone()),
                ..Default::default()
            })?;
            out.evicted = r.removed;
        }
        Ok(out)
    }

    /// Checks the cached entry `name` without changing anything: every
    /// difference from what was sealed (empty when intact or not cached).
    pub fn check_local(&self, name: &str) -> Result<Vec<EntryDamage>> {
        let cache = self.cache();
        let _shared = cache.lock(false)?;
        if !cache.versions_dir().join(name).is_dir() {
            return Ok(Vec::new());
        }
        cache.check_entry(self.store(), name)
    }

    /// Checks every cached entry against its record (`lstat` level) and,
    /// with `read_data`, rehashes every cached file against its stored
    /// chunk list. Reports; `dataset get` rebuilds a damaged entry.
    pub fn check_cache(&self, read_data: bool, progress: &dyn Progress) -> Result<CacheCheck> {
        let cache = self.cache();
        let mut out = CacheCheck::default();
        let _shared = cache.lock(false)?;
        let entries = cache.entries()?;
        progress.start("check cache", entries.len() as u64);
        for e in &entries {
            out.entries += 1;
            let problem = |path: String, detail: String| CacheProblem {
                entry: e.name.clone(),
                folder: e.path.clone(),
                version: e.version.to_hex(),
                path,
                detail,
            };
            for d in cache.check_entry(self.store(), &e.name)? {
                out.problems.push(problem(d.path, d.detail));
            }
            let Some(rec) = cache.read_record(&e.name) else {
                progress.advance(1);
                continue;
            };
            out.objects += rec.nodes.len() as u64;
            if read_data {
                let mut seen = HashSet::new();
                for n in &rec.nodes {
                    let Some(id) = n.object_id() else { continue };
                    let p = rel(&e.path, &n.path_bytes());
                    let Ok(m) = fs::symlink_metadata(&p) else {
                        continue; // reported above
                    };
                    if !seen.insert(m.ino()) {
                        continue;
                    }
                    out.bytes_read += m.len();
                    match compare_bytes(self.store(), &id, &p) {
                        Ok(None) => {}
                        Ok(Some(why)) => out.problems.push(problem(n.display(), why)),
                        Err(err) => out.problems.push(problem(n.display(), err.to_string())),
                    }
                }
            }
            progress.advance(1);
        }
        progress.finish();
        Ok(out)
    }

    /// Builds entry `name` in a flocked `.new-` folder: content files
    /// checked against their seals (written from the store when missing or
    /// changed, in parallel), then the tree of hard links.
    fn build_entry(
        &self,
        cache: &Cache,
        name: &str,
        listing: &Listing,
        unique: &BTreeMap<(ObjectId, bool), u64>,
        opts: &GetLocalOptions<'_>,
    ) -> Result<Built> {
        let store = self.store();
        // 1. Content files that are missing or changed since sealed.
        let missing: Vec<(ObjectId, bool, u64)> = unique
            .iter()
            .filter(|((id, x), size)| {
                let key = Cache::content_key(id, *x);
                let intact = cache
                    .seal(&key, false)
                    .ok()
                    .and_then(|seal| cache.sealed_stamp(&key, &seal))
                    .is_some_and(|s| s.size == **size);
                !intact
            })
            .map(|((id, x), size)| (*id, *x, *size))
            .collect();
        let total: u64 = missing.iter().map(|m| m.2).sum();
        opts.progress.start("materialize", total);
        let written: u64 = missing
            .par_iter()
            .map(|(id, x, size)| -> Result<u64> {
                let key = Cache::content_key(id, *x);
                let seal = cache.seal(&key, true)?;
                let n = cache.ensure_content(store, &seal, &key, id, *size)?;
                opts.progress.advance(*size);
                Ok(n)
            })
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        opts.progress.finish();
        // 2. The tree of links, built aside (flocked while this process
        // lives) and renamed into place by `publish`.
        let suffix = unique_suffix();
        let path = cache.versions_dir().join(format!(".new-{name}.{suffix}"));
        // Made under a name collectors skip, renamed once locked.
        let init = cache.versions_dir().join(format!(".mk-{name}.{suffix}"));
        fs::create_dir(&init).map_err(|e| io_err("create", &init, e))?;
        let lock = File::open(&init).map_err(|e| io_err("open", &init, e))?;
        FileExt::lock_exclusive(&lock).map_err(|e| io_err("lock", &init, e))?;
        fs::rename(&init, &path).map_err(|e| io_err("rename", &path, e))?;
        let mut built = Built {
            path,
            _lock: lock,
            record: EntryRecord::default(),
            materialized_files: missing.len() as u64,
            materialized_bytes: written,
        };
        let res = (|| -> Result<()> {
            let build = &built.path.clone();
            let mut dirs = vec![build.clone()];
            let mut files = Vec::new();
            for n in &listing.nodes {
                match n {
                    Node::Dir(p) => {
                        let d = rel(build, p);
                        fs::create_dir(&d).map_err(|e| io_err("create", &d, e))?;
                        dirs.push(d);
                    }
                    Node::File { .. } => files.push(n),
                    Node::Link { path, target } => {
                        let dst = rel(build, path);
                        std::os::unix::fs::symlink(OsStr::from_bytes(target), &dst)
                            .map_err(|e| io_err("create link", &dst, e))?;
                    }
                }
            }
            let owns: Vec<bool> = files
                .par_iter()
                .map(|n| -> Result<bool> {
                    let Node::File {
                        path,
                        id,
                        mode,
                        size,
                    } = n
                    else {
                        return Ok(false);
                    };
                    let key = Cache::content_key(id, mode & 0o111 != 0);
                    let (_, own) = cache.link_content(store, &key, id, *size, &rel(build, path))?;
                    Ok(own)
                })
                .collect::<Result<_>>()?;
            for d in dirs.iter().rev() {
                fs::set_permissions(d, fs::Permissions::from_mode(0o555))
                    .map_err(|e| io_err("seal", d, e))?;
            }
            // 3. The record: what every object looks like now.
            let mut own = owns.into_iter();
            for n in &listing.nodes {
                let (p, content, own) = match n {
                    Node::Dir(p) => (p, None, false),
                    Node::File { path, id, mode, .. } => (
                        path,
                        Some(Cache::content_key(id, mode & 0o111 != 0)),
                        own.next().unwrap_or(false),
                    ),
                    Node::Link { path, .. } => (path, None, false),
                };
                let at = rel(build, p);
                let m = fs::symlink_metadata(&at).map_err(|e| io_err("stat", &at, e))?;
                built
                    .record
                    .nodes
                    .push(NodeRecord::new(p, content, own, Stamp::of(&m)));
            }
            Ok(())
        })();
        if let Err(e) = res {
            cache.remove_links(&built.path, Some(&built.record));
            return Err(e);
        }
        Ok(built)
    }
    /// A mutable copy of a version (or of the files matching `include`) in
    /// `target`: real files decoded from the store in parallel (measured
    /// faster than copying the cache's files: 0.62 s against 1.3 s for
    /// 1 GB here), never hard links into the cache. `target` must be
    /// missing or empty unless `overwrite`, which replaces its contents.
    ///
    /// The copy is built in a staging folder beside `target`
    /// (`.NAME.dsv-copy.PID.NS`, flocked while it is written) and renamed
    /// into place at the end, so a failed or killed copy never leaves files
    /// under their final names, and `--overwrite` keeps the old contents
    /// until the new ones are complete. Staging folders of dead copies are
    /// removed by the next copy to the same target. Where the parent folder
    /// is not writable, the staging folder is made inside `target` and its
    /// contents are moved up at the end.
    pub fn copy_to(
        &self,
        v: &DatasetVersion,
        target: &Path,
        include: &[String],
        overwrite: bool,
        progress: &dyn Progress,
    ) -> Result<CopyReport> {
        check_target(self.store().dir(), target, "copy into")?;
        let abs = resolve_path(target)?;
        let (Some(parent), Some(tname)) = (abs.parent(), abs.file_name()) else {
            return Err(Error::Invalid(format!(
                "cannot copy into {}: it has no parent folder",
                target.display()
            )));
        };
        let tname = tname.to_os_string();
        let exists = match fs::symlink_metadata(&abs) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::Invalid(format!(
                    "{} exists and is not a folder",
                    target.display()
                )))
            }
            Ok(_) => {
                // Staging folders of dead copies inside the target do not count.
                collect_dead_staging(&abs, OsStr::new(""));
                let rd = fs::read_dir(&abs).map_err(|e| io_err("list", target, e))?;
                let busy = rd
                    .flatten()
                    .any(|e| !is_staging_name(&e.file_name(), OsStr::new("")));
                if busy && !overwrite {
                    return Err(Error::Invalid(format!(
                        "{} is not empty; pass --overwrite to replace its contents",
                        target.display()
                    )));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("stat", target, e)),
        };
        let filter = PathPattern::new(include)?;
        let root = self.store().version(&v.id)?.object.root;
        let listing = list_version(self.store(), &root, filter.as_ref())?;
        if filter.is_some() && listing.files == 0 {
            return Err(Error::Invalid(format!(
                "no file of {} matches {}",
                v.label(),
                include.join(", ")
            )));
        }
        fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
        collect_dead_staging(parent, &tname);
        let suffix = unique_suffix();
        let mut prefix = OsStr::new(".").to_os_string();
        prefix.push(&tname);
        let mut staging_name = prefix.clone();
        staging_name.push(format!(".dsv-copy.{suffix}"));
        let mut staging = parent.join(&staging_name);
        // The working directory itself (`copy REV .`) is filled in place,
        // so that the caller's shell still sees it.
        let is_cwd = exists
            && std::env::current_dir()
                .ok()
                .and_then(|c| c.canonicalize().ok())
                .is_some_and(|c| c == abs);
        let mut inside = false;
        if let Err(e) = if is_cwd {
            Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
        } else {
            fs::create_dir(&staging)
        } {
            // The parent may not be writable while the target is: stage inside it.
            if !exists {
                return Err(io_err("create", &staging, e));
            }
            staging = abs.join(format!(".dsv-copy.{suffix}"));
            fs::create_dir(&staging).map_err(|e| io_err("create", &staging, e))?;
            inside = true;
        }
        // Held while this copy lives: a staging folder whose lock is free
        // belongs to a dead copy.
        let lock = File::open(&staging).map_err(|e| io_err("open", &staging, e))?;
        FileExt::lock_exclusive(&lock).map_err(|e| io_err("lock", &staging, e))?;
        let built = self.write_copy(&listing, &staging, progress);
        let published = built.and_then(|()| {
            if inside {
                move_contents_up(&staging, &abs, overwrite)
            } else {
                publish_copy(&staging, &abs, parent, &prefix, exists)
            }
        });
        if let Err(e) = published {
            let _ = remove_tree(&staging);
            return Err(e);
        }
        drop(lock);
        Ok(CopyReport {
            path: target.to_path_buf(),
            files: listing.files,
            bytes: listing.bytes,
        })
    }

    /// Writes a listing's folders, links and files under `dest`.
    fn write_copy(&self, listing: &Listing, dest: &Path, progress: &dyn Progress) -> Result<()> {
        let mut files = Vec::new();
        for n in &listing.nodes {
            match n {
                Node::Dir(p) => {
                    let d = rel(dest, p);
                    fs::create_dir(&d).map_err(|e| io_err("create", &d, e))?;
                }
                Node::File { .. } => files.push(n),
                Node::Link { path, target: t } => {
                    let dst = rel(dest, path);
                    std::os::unix::fs::symlink(OsStr::from_bytes(t), &dst)
                        .map_err(|e| io_err("create link", &dst, e))?;
                }
            }
        }
        progress.start("copy", listing.bytes);
        let store = self.store();
        files.par_iter().try_for_each(|n| -> Result<()> {
            let Node::File {
                path,
                id,
                mode,
                size,
            } = n
            else {
                return Ok(());
            };
            let dst = rel(dest, path);
            let fo = store.file_object(id)?;
            let mut f = File::create(&dst).map_err(|e| io_err("create", &dst, e))?;
            write_stored(store, &fo, &mut f, &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode((*mode & 0o777) | 0o200))
                .map_err(|e| io_err("chmod", &dst, e))?;
            progress.advance(*size);
            Ok(())
        })?;
        progress.finish();
        Ok(())
    }

    /// Compares a folder with a version: every file of the version must be
    /// in the folder with the same bytes, and nothing else. Sizes and types
    /// are compared first; a file dsv read at the same path with the same
    /// stat fingerprint is accepted without reading (unless `full`); the
    /// rest is hashed in parallel against the version's chunk list.
    pub fn verify_folder(
        &self,
        v: &DatasetVersion,
        dir: &Path,
        full: bool,
    ) -> Result<FolderReport> {
        let meta = fs::metadata(dir).map_err(|e| io_err("open", dir, e))?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!("{} is not a folder", dir.display())));
        }
        let abs = dir.canonicalize().map_err(|e| io_err("resolve", dir, e))?;
        let store = self.store();
        let root = store.version(&v.id)?.object.root;
        let mut report = FolderReport::default();
        let mut jobs: Vec<(String, PathBuf, ObjectId, fs::Metadata)> = Vec::new();
        let mut mism = |path: &[u8], kind: &str, detail: String, r: &mut FolderReport| {
            r.mismatches.push(FolderMismatch {
                path: String::from_utf8_lossy(path).into_owned(),
                kind: kind.to_string(),
                detail,
            });
        };
        #[allow(clippy::too_many_arguments)]
        fn walk(
            store: &Store,
            tree: Option<&ObjectId>,
            fs_dir: Option<&Path>,
            prefix: &[u8],
            report: &mut FolderReport,
            jobs: &mut Vec<(String, PathBuf, ObjectId, fs::Metadata)>,
            mism: MismatchSink<'_>,
        ) -> Result<()> {
            let entries: Vec<Entry> = match tree {
                Some(t) => store.list_dir(t)?,
                None => Vec::new(),
            };
            let mut on_disk: BTreeMap<Vec<u8>, fs::Metadata> = BTreeMap::new();
            if let Some(d) = fs_dir {
                let rd = fs::read_dir(d).map_err(|e| io_err("list", d, e))?;
                for e in rd {
                    let e = e.map_err(|e| io_err("list", d, e))?;
                    let m = fs::symlink_metadata(e.path())
                        .map_err(|err| io_err("stat", &e.path(), err))?;
                    on_disk.insert(e.file_name().as_bytes().to_vec(), m);
                }
            }
            for e in &entries {
                let path = dsv_store::tree::join(prefix, &e.name);
                let m = on_disk.remove(&e.name);
                let fs_path = fs_dir.map(|d| d.join(OsStr::from_bytes(&e.name)));
                match (&e.target, m) {
                    (EntryTarget::Dir { id, .. }, Some(m)) if m.is_dir() => {
                        walk(
                            store,
                            Some(id),
                            fs_path.as_deref(),
                            &path,
                            report,
                            jobs,
                            mism,
                        )?;
                    }
                    (EntryTarget::Dir { id, .. }, m) => {
                        if let Some(m) = m {
                            mism(
                                &path,
                                "type",
                                format!("a folder in the version, {} here", kind_of(&m)),
                                report,
                            );
                        }
                        // Everything below is missing.
                        walk(store, Some(id), None, &path, report, jobs, mism)?;
                    }
                    (EntryTarget::File(id), Some(m)) if m.is_file() => {
                        report.files += 1;
                        if m.len() != e.size {
                            mism(
                                &path,
                                "size",
                                format!("{} bytes in the version, {} here", e.size, m.len()),
                                report,
                            );
                        } else {
                            jobs.push((
                                String::from_utf8_lossy(&path).into_owned(),
                                fs_path.expect("present on disk"),
                                *id,
                                m,
                            ));
                        }
                    }
                    (EntryTarget::Symlink(t), Some(m)) if m.file_type().is_symlink() => {
                        report.files += 1;
                        let p = fs_path.expect("present on disk");
                        let here = fs::read_link(&p).map_err(|err| io_err("read link", &p, err))?;
                        if here.as_os_str().as_bytes() != t.as_slice() {
                            mism(
                                &path,
                                "link",
                                format!(
                                    "points to '{}' in the version, '{}' here",
                                    String::from_utf8_lossy(t),
                                    here.display()
                                ),
                                report,
                            );
                        }
                    }
                    (_, Some(m)) => {
                        report.files += 1;
                        mism(
                            &path,
                            "type",
                            format!(
                                "a {} in the version, {} here",
                                target_kind(&e.target),
                                kind_of(&m)
                            ),
                            report,
                        );
                    }
                    (_, None) => {
                        report.files += 1;
                        mism(&path, "missing", "not in the folder".into(), report);
                    }
                }
            }
            for (name, m) in on_disk {
                let path = dsv_store::tree::join(prefix, &name);
                mism(
                    &path,
                    "extra",
                    format!("{} not in the version", kind_of(&m)),
                    report,
                );
            }
            Ok(())
        }
        walk(
            store,
            Some(&root),
            Some(dir),
            b"",
            &mut report,
            &mut jobs,
            &mut mism,
        )?;
        // Stat shortcut: the stat cache of ingestion, keyed by absolute path.
        let kv = store.reader();
        let results: Vec<(Option<FolderMismatch>, bool)> = jobs
            .par_iter()
            .map(|(rel_path, p, id, m)| {
                if !full {
                    let key = [
                        store.options().stat_scope.as_slice(),
                        abs.join(rel_path).as_os_str().as_bytes(),
                    ]
                    .concat();
                    if let Ok(Some(v)) = kv.get(dsv_store::kv::Cf::StatCache, &key) {
                        if let Ok(st) = dsv_store::schema::StatEntry::decode(&v) {
                            if st.file == *id
                                && st.size == m.len()
                                && st.ino == m.ino()
                                && st.dev == m.dev()
                                && st.mtime_ns == m.mtime() * 1_000_000_000 + m.mtime_nsec()
                                && st.ctime_ns == m.ctime() * 1_000_000_000 + m.ctime_nsec()
                            {
                                return (None, false);
                            }
                        }
                    }
                }
                let bad = match compare_bytes(store, id, p) {
                    Ok(None) => None,
                    Ok(Some(detail)) => Some(FolderMismatch {
                        path: rel_path.clone(),
                        kind: "content".into(),
                        detail,
                    }),
                    Err(e) => Some(FolderMismatch {
                        path: rel_path.clone(),
                        kind: "content".into(),
                        detail: e.to_string(),
                    }),
                };
                (bad, true)
            })
            .collect();
        for (bad, hashed) in results {
            if hashed {
                report.hashed += 1;
            } else {
                report.stat_matched += 1;
            }
            if let Some(b) = bad {
                report.mismatches.push(b);
            }
        }
        report.mismatches.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(report)
    }
}

/// Receives (path, kind, detail) of each difference found.
type MismatchSink<'a> = &'a mut dyn FnMut(&[u8], &str, String, &mut FolderReport);

fn kind_of(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_file() {
        "a file"
    } else {
        "a special file"
    }
}

fn target_kind(t: &EntryTarget) -> &'static str {
    match t {
        EntryTarget::File(_) => "file",
        EntryTarget::Dir { .. } => "folder",
        EntryTarget::Symlink(_) => "symlink",
    }
}

/// Hashes a file against a stored chunk list; `Some(reason)` when it differs.
fn compare_bytes(store: &Store, id: &ObjectId, path: &Path) -> Result<Option<String>> {
    let fo = store.file_object(id)?;
    let f = File::open(path).map_err(|e| io_err("open", path, e))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::new();
    let mut off = 0u64;
    for (cid, len) in &fo.chunks {
        buf.resize(*len as usize, 0);
        if let Err(e) = r.read_exact(&mut buf) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(Some(format!(
                    "shorter than the version's {} bytes",
                    fo.size
                )))
            } else {
                Err(io_err("read", path, e))
            };
        }
        if ChunkId(blake3::hash(&buf).into()) != *cid {
            return Ok(Some(format!("bytes differ from offset {off}")));
        }
        off += *len as u64;
    }
    let mut one = [0u8; 1];
    if r.read(&mut one).map_err(|e| io_err("read", path, e))? != 0 {
        return Ok(Some(format!("longer than the version's {} bytes", fo.size)));
    }
    Ok(None)
}

fn copy_instead_of_link(src: &Path, dst: &Path, mode: u32, link_err: std::io::Error) -> Result<()> {
    match link_err.raw_os_error() {
        Some(libc::EMLINK) | Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::ENOTSUP) => {
            fs::copy(src, dst).map_err(|e| io_err("copy", dst, e))?;
            // The copy took the sealed source's read-only mode: make it
            // writable to set its time, then seal it.
            fs::set_permissions(dst, fs::Permissions::from_mode(0o600))
                .map_err(|e| io_err("chmod", dst, e))?;
            let f = File::options()
                .write(true)
                .open(dst)
                .map_err(|e| io_err("open", dst, e))?;
            f.set_modified(seal_time())
                .map_err(|e| io_err("seal", dst, e))?;
            fs::set_permissions(dst, fs::Permissions::from_mode(mode))
                .map_err(|e| io_err("seal", dst, e))
        }
        _ => Err(io_err("link", dst, link_err)),
    }
}

/// Whether `name` is a staging (or set-aside) folder of a copy into the
/// target named `target` (`""`: staging made inside the target).
fn is_staging_name(name: &OsStr, target: &OsStr) -> bool {
    let n = name.as_bytes();
    if target.is_empty() {
        return n.starts_with(b".dsv-copy.");
    }
    let t = target.as_bytes();
    n.len() > t.len() + 1
        && n[0] == b'.'
        && n[1..].starts_with(t)
        && (n[1 + t.len()..].starts_with(b".dsv-copy.")
            || n[1 + t.len()..].starts_with(b".dsv-old."))
}

/// Removes the staging folders in `dir` of copies into `target` whose
/// writer is dead (their flock is free).
fn collect_dead_staging(dir: &Path, target: &OsStr) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if !is_staging_name(&e.file_name(), target) {
            continue;
        }
        let p = e.path();
        let Ok(f) = File::open(&p) else { continue };
        if let Ok(true) = FileExt::try_lock_exclusive(&f) {
            let _ = remove_tree(&p);
        }
    }
}

/// Renames a complete staging folder to `target`; an existing target is
/// set aside first (and deleted once the new copy is in place).
fn publish_copy(
    staging: &Path,
    target: &Path,
    parent: &Path,
    prefix: &OsStr,
    exists: bool,
) -> Result<()> {
    if !exists {
        return fs::rename(staging, target).map_err(|e| io_err("rename", target, e));
    }
    let mut old_name = prefix.to_os_string();
    old_name.push(format!(".dsv-old.{}", unique_suffix()));
    let old = parent.join(old_name);
    // Lock the old folder so that, if this process dies between the two
    // renames, the next copy knows the set-aside folder is abandoned.
    let old_lock = File::open(target).map_err(|e| io_err("open", target, e))?;
    FileExt::lock_exclusive(&old_lock).map_err(|e| io_err("lock", target, e))?;
    if let Err(e) = fs::rename(target, &old) {
        // A mount point or a busy folder cannot be renamed: move the
        // contents instead.
        drop(old_lock);
        if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV)) {
            return move_contents_up(staging, target, true)
                .and_then(|()| fs::remove_dir(staging).map_err(|e| io_err("remove", staging, e)));
        }
        return Err(io_err("rename", target, e));
    }
    if let Err(e) = fs::rename(staging, target) {
        let _ = fs::rename(&old, target);
        return Err(io_err("rename", target, e));
    }
    let _ = remove_tree(&old);
    Ok(())
}

/// Moves the entries of a complete staging folder inside `target` up into
/// `target` (emptying it first when `overwrite`), then removes the staging
/// folder.
fn move_contents_up(staging: &Path, target: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        let rd = fs::read_dir(target).map_err(|e| io_err("list", target, e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p == staging {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&p)?;
            } else {
                fs::remove_file(&p).map_err(|e| io_err("remove", &p, e))?;
            }
        }
    }
    let rd = fs::read_dir(staging).map_err(|e| io_err("list", staging, e))?;
    for e in rd.flatten() {
        let dst = target.join(e.file_name());
        fs::rename(e.path(), &dst).map_err(|err| io_err("rename", &dst, err))?;
    }
    if staging.starts_with(target) {
        fs::remove_dir(staging).map_err(|e| io_err("remove", staging, e))?;
    }
    Ok(())
}
